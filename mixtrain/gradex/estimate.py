"""GradEx step 3: estimate the model fine-tuned on any subset S of tasks, for many subsets at once.

The released estimator (``evaluate_subset``, SEEDS.md §3.4) fits, per subset, a logistic
regression on sign-flipped projected gradients with random Bernoulli(0.7) labels and
``C = 1e-4`` (liblinear), lifts the coefficient ``w ∈ R^d`` by the projection itself,
``Δθ = R w``, rescales it to ``scale · ‖θ*_trainable‖`` and scores ``θ* + Δθ`` on the target.

* ``estimator="logreg"`` reproduces that fit (scikit-learn).
* ``estimator="gradsum"`` (default) uses ``w_S = Σ_{i∈S} g̃_i``. At ``w = 0`` the logistic loss
  gradient is ``Σ_i (y_i − ½) s_i g̃_i = ½ Σ_i g̃_i`` (``s_i = 2y_i − 1``), and at C ≤ 1e-4 the
  penalty keeps the fit next to 0, so the fitted ``w`` points along the gradient sum (the labels
  and sign flips cancel; tests check cosine ≥ 0.999 on real stored gradients). With per-task
  sums ``A [T, d]`` and a membership matrix ``M [S, T]``, all directions are one product
  ``W = M A`` ``[S, d]``.

Scoring (higher is better, see objective.py):

* ``evaluate="first_order"``: ``f(x; θ* + Δθ) ≈ f(x; θ*) + ⟨g(x), Δθ⟩`` on the target dev examples.
  Because ``Δθ = c_S · R w_S`` (``lift``), ``⟨g(x), R w_S⟩ = ⟨Rᵀ g(x), w_S⟩ = ⟨g̃(x), w_S⟩``: the
  Taylor term is **exact in projected space** with the stored target projections ``g̃(x)``, so no
  ``D``-dimensional vector is formed. The rescale needs ``‖R w_S‖² = w_Sᵀ (RᵀR) w_S``; the ``d × d``
  Gram ``RᵀR`` is computed once (block by block, never holding ``R``). Per subset the estimate is
  ``f*(x) + c_S ⟨g̃(x), w_S⟩`` with ``c_S = scale · ‖θ*‖ / ‖R w_S‖``: a few ``[S, d]`` products, so
  1000 subsets take milliseconds. The score of S is the mean over target domains of the mean
  estimated f over that domain's dev examples.
* ``evaluate="forward"`` (released): load ``θ* + Δθ`` and measure the target dev loss (mean token
  NLL) per target domain; score = −(mean over target domains of that loss).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ConfigError
from .gradients import Stored

log = logging.getLogger("mixtrain.gradex")


def sample_subsets(num_tasks: int, number: int, size: float, seed: int) -> np.ndarray:
    """``number`` random subsets of ``max(1, round(size · num_tasks))`` tasks: bool ``[S, T]``."""
    if num_tasks < 2:
        raise ConfigError(f"gradex: need at least 2 tasks to sample subsets, got {num_tasks}")
    k = min(num_tasks - 1, max(1, round(size * num_tasks)))
    rng = np.random.default_rng(seed)
    picks = np.argsort(rng.random((number, num_tasks)), axis=1)[:, :k]
    m = np.zeros((number, num_tasks), dtype=bool)
    np.put_along_axis(m, picks, True, axis=1)
    return m


def task_sums(stored: Stored, task_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per-task sums of projected gradients ``[T, d]`` and example counts ``[T]``.

    Raises:
        ConfigError: a task with no stored examples.
    """
    index = {t: i for i, t in enumerate(task_names)}
    codes = np.array([index[t] for t in stored.tasks], dtype=np.int64)
    sums = np.zeros((len(task_names), stored.grads.shape[1]))
    np.add.at(sums, codes, stored.grads)
    counts = np.bincount(codes, minlength=len(task_names))
    empty = [task_names[i] for i in np.nonzero(counts == 0)[0]]
    if empty:
        raise ConfigError(f"gradex: task(s) {empty} have no examples in the gradient store")
    return sums, counts


class Lifter:
    """Maps projected directions ``w [.., K]`` back to parameter space ``Δθ [.., D]`` (the
    adjoint of the gradient projection) and gives ``‖lift(w)‖`` without lifting.

    Built from a store's metadata alone (projections are pure functions of the seed)."""

    def __init__(self, meta: dict[str, Any], nnz: int = 4, cache_dir: Any = None) -> None:
        self.meta = meta
        self.kind = meta["projection"]
        self.dim = int(meta["dim"])
        self.num_params = int(meta["num_params"])
        self.seed = int(meta["projection_seed"])
        self.nnz = nnz
        self._gram: np.ndarray | None = None
        self.cache = None if cache_dir is None else Path(cache_dir) / f"gram-{self.kind}-{self.seed}-{self.dim}.npy"

    def _factored(self) -> list[tuple[int, list[int], torch.Tensor, torch.Tensor]]:
        from mixkernels import projection_matrix
        from mixkernels.grad_projector import module_seed

        k_out, k_in = self.meta["factored_rank"]
        out = []
        for name, shape in self.meta["modules"]:
            d_out, d_in = shape
            p_in = projection_matrix(d_in, k_in, seed=module_seed(self.seed, name, "in"))
            p_out = projection_matrix(d_out, k_out, seed=module_seed(self.seed, name, "out"))
            out.append((d_out * d_in, shape, p_in.double(), p_out.double()))
        return out

    def lift(self, w: torch.Tensor | np.ndarray) -> torch.Tensor:
        """``Δθ = R w`` float32 ``[.., D]`` (factored: per module ``P_out W_m P_inᵀ``)."""
        import mixkernels

        w = torch.as_tensor(np.asarray(w), dtype=torch.float32) if not isinstance(w, torch.Tensor) else w.float()
        if self.kind != "factored":
            return mixkernels.lift(w, self.num_params, seed=self.seed, kind=self.kind, nnz=self.nnz)
        k_out, k_in = self.meta["factored_rank"]
        parts, off = [], 0
        lead = w.shape[:-1]
        for _, (d_out, d_in), p_in, p_out in self._factored():
            wm = w[..., off:off + k_out * k_in].reshape(*lead, k_out, k_in).double()
            parts.append((p_out @ wm @ p_in.T).reshape(*lead, d_out * d_in).float())
            off += k_out * k_in
        return torch.cat(parts, dim=-1)

    def gram(self) -> np.ndarray:
        """``RᵀR`` float64 ``[K, K]`` (computed once, in row blocks of R; cached beside the store)."""
        if self._gram is None and self.cache is not None and self.cache.exists():
            self._gram = np.load(self.cache)
        if self._gram is None:
            self._gram = self._compute_gram()
            if self.cache is not None:
                np.save(self.cache, self._gram)
        return self._gram

    def _compute_gram(self) -> np.ndarray:
        import mixkernels

        if self.kind == "factored":
            blocks = [torch.kron(p_out.T @ p_out, p_in.T @ p_in) for _, _, p_in, p_out in self._factored()]
            return torch.block_diag(*blocks).numpy()
        eye = torch.eye(self.dim, dtype=torch.float32)
        g = np.zeros((self.dim, self.dim))
        chunk = max(1, (1 << 24) // self.dim)
        for off in range(0, self.num_params, chunk):
            n = min(chunk, self.num_params - off)
            rt = mixkernels.lift(eye, n, seed=self.seed, kind=self.kind, nnz=self.nnz, row_offset=off).double()
            g += (rt @ rt.T).numpy()
        return g

    def norms(self, w: np.ndarray) -> np.ndarray:
        """``‖R w_s‖`` for each row of ``w [S, K]``."""
        return np.sqrt(np.maximum(np.einsum("sk,kl,sl->s", w, self.gram(), w), 0.0))


def logreg_direction(x: np.ndarray, *, C: float = 1e-4, label_prob: float = 0.7, seed: int = 0) -> np.ndarray:
    """The released fit (``evaluate_subset``): labels ~ Bernoulli(label_prob), features sign-flipped
    by label, ``LogisticRegression(penalty="l2", C, solver="liblinear", random_state=0)``; returns
    ``coef_[0]`` ``[K]``."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(seed)
    y = (rng.random(x.shape[0]) < label_prob).astype(np.int64)
    if y.min() == y.max():  # sklearn needs both classes; flip one label (and its sign) deterministically
        y[0] = 1 - y[0]
    feats = np.where(y[:, None] == 1, x, -x)
    clf = LogisticRegression(C=C, solver="liblinear", random_state=0)
    clf.fit(feats, y)
    return clf.coef_[0].astype(np.float64)


@dataclass
class Estimates:
    """Subset estimates: ``membership [S, T]``, ``scores [S]`` (higher is better), ``per_target [S, n]``."""

    membership: np.ndarray
    scores: np.ndarray
    per_target: np.ndarray
    task_names: list[str]
    target_names: list[str]
    base_per_target: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


class SubsetEstimator:
    """Scores sets of tasks from stored projected gradients (see the module docstring).

    Args:
        train: stored training-example gradients (tasks = ``task_names``).
        target: stored target dev gradients and f(x; θ*) (domains = ``target_names``).
        scale: ‖Δθ‖ / ‖θ*_trainable‖.
        estimator: ``gradsum`` or ``logreg``.
        evaluate: ``first_order`` or ``forward`` (needs ``forward_fn``).
        forward_fn: ``Δθ [D] -> per-target-domain loss [n]`` for ``evaluate="forward"``.
    """

    def __init__(self, train: Stored, target: Stored, task_names: list[str], target_names: list[str], *,
                 scale: float = 0.02, estimator: str = "gradsum", evaluate: str = "first_order",
                 logreg_C: float = 1e-4, label_prob: float = 0.7, seed: int = 0,
                 forward_fn: Any = None, cache_dir: Any = None) -> None:
        if train.meta["projection_seed"] != target.meta["projection_seed"] or train.meta["dim"] != target.meta["dim"]:
            raise ConfigError("gradex: training and target stores use different projections (seed/dim)")
        if evaluate == "forward" and forward_fn is None:
            raise ConfigError("gradex: evaluate='forward' needs the model (forward_fn)")
        self.train, self.target = train, target
        self.task_names, self.target_names = task_names, target_names
        self.scale, self.estimator, self.evaluate = scale, estimator, evaluate
        self.logreg_C, self.label_prob, self.seed = logreg_C, label_prob, seed
        self.forward_fn = forward_fn
        self.lifter = Lifter(train.meta, cache_dir=cache_dir)
        self.theta_norm = float(train.meta["theta_norm"])
        self.sums, self.counts = task_sums(train, task_names)
        tindex = {t: i for i, t in enumerate(target_names)}
        codes = np.array([tindex[t] for t in target.tasks])
        # averaging matrix [n_target, J]: mean over each target domain's dev examples
        self.avg = np.zeros((len(target_names), len(codes)))
        self.avg[codes, np.arange(len(codes))] = 1.0
        self.avg /= self.avg.sum(1, keepdims=True)
        self.target_grad_mean = self.avg @ target.grads      # [n, K]
        self.base = self.avg @ target.outputs                 # [n]
        self._task_codes = np.array([task_names.index(t) for t in train.tasks])

    def directions(self, membership: np.ndarray) -> np.ndarray:
        """Projected directions ``W [S, K]`` (unnormalised) for bool ``membership [S, T]``."""
        m = np.asarray(membership, dtype=bool)
        if self.estimator == "gradsum":
            return m.astype(np.float64) @ self.sums
        out = np.zeros((m.shape[0], self.sums.shape[1]))
        for s in range(m.shape[0]):
            rows = m[s][self._task_codes]
            out[s] = logreg_direction(self.train.grads[rows], C=self.logreg_C, label_prob=self.label_prob,
                                      seed=self.seed + s)
        return out

    def coefficients(self, w: np.ndarray) -> np.ndarray:
        """``c_S = scale · ‖θ*‖ / ‖R w_S‖`` (0 for a zero direction)."""
        n = self.lifter.norms(w)
        return np.where(n > 0, self.scale * self.theta_norm / np.where(n > 0, n, 1.0), 0.0)

    def deltas(self, membership: np.ndarray) -> torch.Tensor:
        """Δθ ``[S, D]`` float32 (rescaled), for checks and ``forward``."""
        w = self.directions(membership)
        return self.lifter.lift(w * self.coefficients(w)[:, None])

    def score(self, membership: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(scores [S], per_target [S, n])`` for bool ``membership [S, T]``."""
        m = np.atleast_2d(np.asarray(membership, dtype=bool))
        w = self.directions(m)
        c = self.coefficients(w)
        if self.evaluate == "first_order":
            per = self.base[None, :] + c[:, None] * (w @ self.target_grad_mean.T)
            return per.mean(1), per
        per = np.zeros((m.shape[0], len(self.target_names)))
        for s in range(m.shape[0]):
            delta = self.lifter.lift(w[s] * c[s])
            per[s] = np.asarray(self.forward_fn(delta), dtype=np.float64)
        return -per.mean(1), per

    def run(self, membership: np.ndarray) -> Estimates:
        """Score every subset; ``info`` records the settings."""
        scores, per = self.score(membership)
        base = self.base if self.evaluate == "first_order" else np.asarray(self.forward_fn(None), dtype=np.float64)
        return Estimates(np.asarray(membership, dtype=bool), scores, per, self.task_names, self.target_names, base,
                         {"estimator": self.estimator, "evaluate": self.evaluate, "scale": self.scale,
                          "theta_norm": self.theta_norm})
