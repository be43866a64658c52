"""Statistics for comparing training runs: intervals over seeds, paired tests, a paired bootstrap
over dev examples, and the Holm correction. Used by ``mixtrain compare`` (``docs/compare.md``).

* :func:`t_interval`: mean and Student-t confidence interval over seeds,
  ``mean ± t_{(1+c)/2, n-1} · s / √n`` (``scipy.stats.t``).
* :func:`paired_t`: two-sided paired t-test over seeds (``scipy.stats.ttest_rel``): the runs of
  two policies with the same seed form a pair.
* :func:`sign_flip`: two-sided sign-flip permutation test of the mean paired difference
  (``scipy.stats.permutation_test`` with ``permutation_type="samples"``), exact for up to 13
  pairs. Its smallest attainable p-value is ``2 / 2^n``: 0.25 with 3 seeds, 0.0625 with 5, so
  it cannot reach ``α = 0.05`` with fewer than 6 seeds.
* :func:`paired_bootstrap`: percentile bootstrap over dev **examples** of the difference of a
  ratio metric (accuracy = Σ correct / Σ 1, dev loss = Σ token loss / Σ tokens per domain,
  then the unweighted mean over domains, then the mean over seeds). Examples are resampled
  within each domain (stratified) and the **same** resampled example ids are used for both
  policies and for every seed, since every run is evaluated on the same dev rows. It measures
  the noise of the finite dev set given the trained models, not the seed-to-seed variance of
  training.
* :func:`holm`: Holm's step-down adjustment of a family of p-values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["BootstrapResult", "RatioData", "holm", "paired_bootstrap", "paired_t", "sign_flip", "t_interval"]


def _finite(x: Sequence[float]) -> np.ndarray:
    a = np.asarray([v for v in x if v is not None and math.isfinite(v)], dtype=np.float64)
    return a


def t_interval(x: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """``(mean, lo, hi)`` of the Student-t interval over the finite values of ``x`` [n].

    ``lo``/``hi`` are NaN with fewer than 2 values; all NaN with none.

    Raises:
        ValueError: ``confidence`` not in (0, 1).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"t_interval: confidence {confidence}, expected a number in (0, 1)")
    from scipy import stats

    a = _finite(x)
    if len(a) == 0:
        return math.nan, math.nan, math.nan
    m = float(a.mean())
    if len(a) < 2:
        return m, math.nan, math.nan
    sem = float(a.std(ddof=1)) / math.sqrt(len(a))
    if sem == 0:
        return m, m, m
    lo, hi = stats.t.interval(confidence, len(a) - 1, loc=m, scale=sem)
    return m, float(lo), float(hi)


def _pairs(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    if len(a) != len(b):
        raise ValueError(f"paired test: {len(a)} values against {len(b)}; expected one pair per seed")
    keep = [(x, y) for x, y in zip(a, b) if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)]
    return np.array([k[0] for k in keep], dtype=np.float64), np.array([k[1] for k in keep], dtype=np.float64)


def paired_t(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of the paired t-test of ``a`` [n] vs ``b`` [n] (pair ``i`` = seed ``i``).

    Pairs with a non-finite value are dropped. NaN with fewer than 2 pairs, and when the
    differences are all equal but not 0 (no spread: ``t`` is undefined, and coarse metrics such as
    accuracy on few examples make this happen; the bootstrap over examples still applies); 1.0
    when every difference is 0 (no difference to test).

    Raises:
        ValueError: ``a`` and ``b`` differ in length.
    """
    from scipy import stats

    x, y = _pairs(a, b)
    if len(x) < 2:
        return math.nan
    d = x - y
    scale = max(1.0, float(np.abs(x).max()), float(np.abs(y).max()))
    if np.all(np.abs(d) <= 1e-12 * scale):
        return 1.0
    if np.ptp(d) <= 1e-12 * scale:
        return math.nan  # no spread (up to rounding): t = ±inf is not evidence
    return float(stats.ttest_rel(x, y).pvalue)


def sign_flip(a: Sequence[float], b: Sequence[float], *, seed: int = 0) -> float:
    """Two-sided p-value of the sign-flip permutation test of the mean of ``a - b`` ([n] each).

    Exact (all ``2^n`` sign patterns) for ``n ≤ 13``, otherwise 9999 random patterns drawn with
    ``seed``. NaN with no pair; 1.0 when every difference is 0 or with a single pair.

    Raises:
        ValueError: ``a`` and ``b`` differ in length.
    """
    from scipy import stats

    x, y = _pairs(a, b)
    if len(x) == 0:
        return math.nan
    if np.all(np.abs(x - y) <= 1e-12 * max(1.0, float(np.abs(x).max()), float(np.abs(y).max()))):
        return 1.0
    if len(x) == 1:
        return 1.0  # both sign patterns give the same |mean|
    n_resamples = 2 ** len(x) if len(x) <= 13 else 9999
    res = stats.permutation_test((x, y), lambda u, v, axis=-1: np.mean(u - v, axis=axis), vectorized=True,
                                 permutation_type="samples", alternative="two-sided",
                                 n_resamples=n_resamples, rng=np.random.default_rng(seed))
    return float(res.pvalue)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values (same order as ``pvalues`` [m]).

    With the finite p-values sorted ascending ``p_(1) ≤ … ≤ p_(m)``:
    ``adj_(i) = max_{j ≤ i} min(1, (m - j + 1) · p_(j))``. NaN entries stay NaN and do not count
    in ``m``. Rejecting ``adj ≤ α`` controls the family-wise error rate at ``α``.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(np.isfinite(p))
    m = len(idx)
    if m == 0:
        return out.tolist()
    order = idx[np.argsort(p[idx], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


@dataclass(frozen=True)
class RatioData:
    """Per-example numerators and denominators of one policy, for one domain.

    ``num``, ``den``: [S, n] float64, seed ``s`` × example ``j`` (the same example ids, in the
    same order, for every seed and for both policies being compared). The domain metric of seed
    ``s`` is ``num[s].sum() / den[s].sum()``.
    """

    num: np.ndarray
    den: np.ndarray


@dataclass(frozen=True)
class BootstrapResult:
    """Observed difference, percentile interval, two-sided p-value and the resample count."""

    diff: float
    lo: float
    hi: float
    p: float
    n_boot: int


def _metric(counts: np.ndarray, r: RatioData) -> np.ndarray:
    # counts [B, n] resample multiplicities -> [B, S] domain metric per replicate and seed
    with np.errstate(invalid="ignore", divide="ignore"):
        return (counts @ r.num.T) / (counts @ r.den.T)


def paired_bootstrap(a: Sequence[RatioData], b: Sequence[RatioData], *, n_boot: int = 10000, seed: int = 0,
                     confidence: float = 0.95) -> BootstrapResult:
    """Paired, domain-stratified percentile bootstrap over dev examples of ``metric(a) - metric(b)``.

    ``metric`` = mean over seeds of the unweighted mean over domains of the per-domain ratio
    (``RatioData``). ``a[k]`` and ``b[k]`` are domain ``k`` of the two policies ([S, n_k] each).
    One replicate draws ``n_k`` example ids with replacement in every domain and evaluates both
    policies and all seeds on those ids. ``p`` = ``min(1, 2 · min(#{δ* ≤ 0} + 1, #{δ* ≥ 0} + 1) /
    (n_boot + 1))`` (the smallest two-sided level whose percentile interval excludes 0).

    Raises:
        ValueError: no domain, mismatched shapes, an empty domain, ``n_boot < 1``.
    """
    if not a or len(a) != len(b):
        raise ValueError(f"paired_bootstrap: {len(a)} domains against {len(b)}; expected the same, >= 1")
    if n_boot < 1:
        raise ValueError(f"paired_bootstrap: n_boot {n_boot}, expected >= 1")
    for k, (x, y) in enumerate(zip(a, b)):
        shapes = {x.num.shape, x.den.shape, y.num.shape, y.den.shape}
        if len(shapes) != 1 or x.num.ndim != 2 or x.num.shape[1] == 0:
            raise ValueError(f"paired_bootstrap: domain {k} has arrays of shapes {sorted(shapes)}; "
                             "expected one non-empty [seeds, examples] shape for both policies")
    rng = np.random.default_rng(seed)
    obs = np.mean([np.mean(x.num.sum(1) / x.den.sum(1) - y.num.sum(1) / y.den.sum(1)) for x, y in zip(a, b)])
    delta = np.zeros(n_boot)
    for x, y in zip(a, b):
        n = x.num.shape[1]
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)
        delta += (_metric(counts, x) - _metric(counts, y)).mean(1)
    delta /= len(a)
    delta = delta[np.isfinite(delta)]
    q = (1 - confidence) / 2
    lo, hi = np.quantile(delta, [q, 1 - q]) if len(delta) else (math.nan, math.nan)
    nb = len(delta)
    p = min(1.0, 2 * min(int((delta <= 0).sum()) + 1, int((delta >= 0).sum()) + 1) / (nb + 1))
    return BootstrapResult(float(obs), float(lo), float(hi), float(p), nb)
