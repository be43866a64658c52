"""Reading the runs of ``mixtrain compare`` and their statistics: per-run numbers
(:class:`RunResult`), per-policy means and intervals over seeds, and the paired tests of every
policy against every baseline (:mod:`mixtrain.stats`, Holm-corrected per metric)."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..stats import RatioData, holm, paired_bootstrap, paired_t, sign_flip, t_interval
from .runner import _read_marker
from .specs import BASELINES

log = logging.getLogger("mixtrain.compare")


@dataclass
class RunResult:
    """Numbers of one finished run (from its ``metrics.jsonl``, ``compare_run.json`` and, when
    present, the per-example results of its final evaluation, ``dev_examples.json``)."""

    label: str
    seed: int
    steps: int
    dev_final: dict[str, float]
    dev_curve: list[tuple[int, float]]
    acc_final: dict[str, float] | None
    acc_curve: list[tuple[int, float]]
    weights_final: dict[str, float]
    train_time: float
    policy_time: float
    wall_time: float | None
    examples: dict[str, Any] | None = None
    start: dict[str, Any] | None = None  # the step-0 record (``eval.at_start``), when the run has one

    @property
    def dev_avg(self) -> float:
        """Unweighted mean of the final per-domain dev losses."""
        return float(np.mean(list(self.dev_final.values()))) if self.dev_final else math.nan

    @property
    def acc_avg(self) -> float:
        """Unweighted mean of the final per-domain accuracies (NaN without accuracy)."""
        return float(np.mean(list(self.acc_final.values()))) if self.acc_final else math.nan

    @property
    def overhead_pct(self) -> float:
        """Σ policy_time / Σ step_time × 100 over the logged steps."""
        return 100.0 * self.policy_time / self.train_time if self.train_time > 0 else math.nan


def _mean_of(d: dict[str, Any]) -> float:
    vals = [v for v in d.values() if isinstance(v, (int, float)) and math.isfinite(v)]
    return float(np.mean(vals)) if vals else math.nan


def _num_list(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in x)


def _read_examples(run_dir: Path, final_step: int, domains: Sequence[str] | None = None) -> dict[str, Any] | None:
    """``dev_examples.json`` when it is well formed and belongs to the final evaluation, else ``None``."""
    from ..report import DEV_EXAMPLES_FILE

    p = run_dir / DEV_EXAMPLES_FILE
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("%s is not valid JSON; no per-example statistics for this run", p)
        return None
    if not isinstance(data, dict) or data.get("step") != final_step:
        log.warning("%s is not from the final evaluation (step %s, expected %d); ignored", p,
                    data.get("step") if isinstance(data, dict) else "?", final_step)
        return None
    out: dict[str, Any] = {"dev_loss": None, "dev_accuracy": None}
    if domains:
        data = _only_domains([data], domains)[0]
    loss = data.get("dev_loss")
    if isinstance(loss, dict) and all(isinstance(v, dict) and _num_list(v.get("loss_sum")) and _num_list(v.get("tokens"))
                                      and len(v["loss_sum"]) == len(v["tokens"]) for v in loss.values()):
        out["dev_loss"] = {k: (np.asarray(v["loss_sum"], float), np.asarray(v["tokens"], float)) for k, v in loss.items()}
    acc = data.get("dev_accuracy")
    if isinstance(acc, dict) and all(isinstance(v, dict) and _num_list(v.get("index")) and _num_list(v.get("correct"))
                                     and len(v["index"]) == len(v["correct"]) for v in acc.values()):
        out["dev_accuracy"] = {k: dict(zip(map(int, v["index"]), map(float, v["correct"]))) for k, v in acc.items()}
    return out


def _only_domains(recs: list[dict[str, Any]], domains: Sequence[str]) -> list[dict[str, Any]]:
    """The records with their ``dev_loss`` / ``dev_accuracy`` restricted to ``domains``."""
    keep = set(domains)
    out = []
    for r in recs:
        r = dict(r)
        for key in ("dev_loss", "dev_accuracy"):
            if isinstance(r.get(key), dict):
                r[key] = {k: v for k, v in r[key].items() if k in keep}
        out.append(r)
    return out


def read_run(run_dir: str | Path, label: str = "", seed: int = 0, domains: Sequence[str] | None = None) -> RunResult:
    """Parse a run directory; with ``domains``, only those domains are scored (dev loss, accuracy,
    their curves and per-example results), e.g. a held-out target the mixtures never train on.

    Raises:
        FileNotFoundError: no ``metrics.jsonl``.
        ValueError: no records, or no dev evaluation (``dev_loss``) in them, or none of ``domains``
            in the dev losses.
    """
    from ..report import read_metrics

    run_dir = Path(run_dir)
    recs = read_metrics(run_dir)
    if domains:
        have = {k for r in recs if isinstance(r.get("dev_loss"), dict) for k in r["dev_loss"]}
        if have and not have & set(domains):
            raise ValueError(f"--domains {','.join(domains)}: none is a dev domain of {run_dir} ({sorted(have)})")
        recs = _only_domains(recs, domains)
    if not recs:
        raise ValueError(f"{run_dir}/metrics.jsonl has no records")
    devs = [r for r in recs if isinstance(r.get("dev_loss"), dict)]
    if not devs:
        raise ValueError(f"{run_dir}/metrics.jsonl has no dev_loss records; set train.eval_every > 0")
    accs = [r for r in recs if isinstance(r.get("dev_accuracy"), dict)]
    train_time = policy_time = 0.0
    prev = 0
    for r in recs:
        n = r["step"] - prev
        prev = r["step"]
        train_time += float(r.get("step_time") or 0.0) * n
        policy_time += float(r.get("policy_time") or 0.0) * n
    marker = _read_marker(run_dir)
    return RunResult(
        label=label, seed=seed, steps=int(recs[-1]["step"]),
        dev_final={k: float(v) for k, v in devs[-1]["dev_loss"].items() if v is not None},
        dev_curve=[(int(r["step"]), _mean_of(r["dev_loss"])) for r in devs],
        acc_final={k: float(v) for k, v in accs[-1]["dev_accuracy"].items()} if accs else None,
        acc_curve=[(int(r["step"]), _mean_of(r["dev_accuracy"])) for r in accs],
        weights_final={k: float(v) for k, v in recs[-1]["weights"].items()},
        train_time=train_time, policy_time=policy_time,
        wall_time=float(marker["wall_time"]) if "wall_time" in marker else None,
        examples=_read_examples(run_dir, int(devs[-1]["step"]), domains),
        start=next((r for r in devs if r["step"] == 0), None),
    )


def share_start(results: dict[str, list[RunResult]]) -> dict[str, Any] | None:
    """The starting model's step-0 record (evaluated in one run only: it is the same for all),
    prepended to the curves of every run that lacks it; ``None`` when no run has one."""
    start = next((r.start for runs in results.values() for r in runs if r.start is not None), None)
    if start is None:
        return None
    acc0 = _mean_of(start["dev_accuracy"]) if isinstance(start.get("dev_accuracy"), dict) else None
    for runs in results.values():
        for r in runs:
            if not r.dev_curve or r.dev_curve[0][0] != 0:
                r.dev_curve.insert(0, (0, _mean_of(start["dev_loss"])))
            if acc0 is not None and r.acc_curve and r.acc_curve[0][0] != 0:
                r.acc_curve.insert(0, (0, acc0))
    return start


def _ms(xs: Sequence[float]) -> tuple[float, float]:
    a = np.array([x for x in xs if x is not None and math.isfinite(x)], dtype=float)
    if len(a) == 0:
        return math.nan, math.nan
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else math.nan


def _first_reach(curve: Sequence[tuple[int, float]], target: float) -> int | None:
    for step, v in curve:
        if math.isfinite(v) and v <= target:
            return step
    return None


TESTS: tuple[str, ...] = ("ttest", "bootstrap", "signflip")
"""Tests ``compare`` can mark significance by (``--test``): paired t over seeds (default), paired
bootstrap over dev examples, exact sign-flip over seeds."""
METRICS: dict[str, str] = {"acc_avg": "accuracy", "dev_avg": "dev loss"}
_EX_KEY = {"acc_avg": "dev_accuracy", "dev_avg": "dev_loss"}


def _ratio_data(runs_a: list[RunResult], runs_b: list[RunResult], metric: str
                ) -> tuple[list[RatioData], list[RatioData]] | None:
    """Per-domain ``RatioData`` of two policies over their common seeds (example ids shared by
    every run); ``None`` when some run has no per-example results for ``metric``."""
    key = _EX_KEY[metric]
    if not runs_a or any(r.examples is None or r.examples.get(key) is None for r in runs_a + runs_b):
        return None
    all_runs = runs_a + runs_b
    doms = [d for d in all_runs[0].examples[key] if all(d in r.examples[key] for r in all_runs)]
    xa, xb = [], []
    for d in doms:
        if metric == "acc_avg":
            ids = sorted(set.intersection(*(set(r.examples[key][d]) for r in all_runs)))
            if not ids:
                continue

            def arr(runs: list[RunResult], d: str = d, ids: list[int] = ids) -> RatioData:
                num = np.array([[r.examples[key][d][i] for i in ids] for r in runs])
                return RatioData(num, np.ones_like(num))
        else:
            lens = {len(r.examples[key][d][0]) for r in all_runs}
            if len(lens) != 1 or 0 in lens:
                continue  # not the same dev rows: nothing to pair

            def arr(runs: list[RunResult], d: str = d) -> RatioData:
                return RatioData(np.stack([r.examples[key][d][0] for r in runs]),
                                 np.stack([r.examples[key][d][1] for r in runs]))
        a, b = arr(runs_a), arr(runs_b)
        if (a.den.sum(1) > 0).all() and (b.den.sum(1) > 0).all():
            xa.append(a)
            xb.append(b)
    return (xa, xb) if xa else None


def _compare_pair(runs_a: list[RunResult], runs_b: list[RunResult], metric: str, *, test: str,
                  n_boot: int, boot_seed: int) -> dict[str, Any] | None:
    """Paired statistics of ``metric`` for policy ``a`` vs baseline ``b`` over their common seeds."""
    by_b = {r.seed: r for r in runs_b}
    pa = [r for r in runs_a if r.seed in by_b and math.isfinite(getattr(r, metric))
          and math.isfinite(getattr(by_b[r.seed], metric))]
    pb = [by_b[r.seed] for r in pa]
    if not pa:
        return None
    va = [getattr(r, metric) for r in pa]
    vb = [getattr(r, metric) for r in pb]
    diffs = [x - y for x, y in zip(va, vb)]
    m, lo, hi = t_interval(diffs)
    boot = None
    rd = _ratio_data(pa, pb, metric)
    if rd is not None:
        br = paired_bootstrap(*rd, n_boot=n_boot, seed=boot_seed)
        boot = {"diff": br.diff, "lo": br.lo, "hi": br.hi, "p": br.p, "n_boot": br.n_boot}
    res = {"diff": m, "ci": [lo, hi], "n": len(pa), "seeds": [r.seed for r in pa], "per_seed": diffs,
           "p_ttest": paired_t(va, vb), "p_signflip": sign_flip(va, vb), "bootstrap": boot}
    res["p"] = res["p_" + test] if test != "bootstrap" else (boot["p"] if boot else math.nan)
    return res


def summarize(results: dict[str, list[RunResult]], baselines: Sequence[str] = BASELINES, *,
              test: str = "ttest", alpha: float = 0.05, n_boot: int = 10000, boot_seed: int = 0,
              confidence: float = 0.95) -> dict[str, Any]:
    """Aggregate runs per label over seeds and test every policy against every baseline.

    Args:
        results: ``{label: [RunResult per seed]}`` (labels in table order).
        baselines: labels of the baseline rows present in ``results``.
        test: which test marks a difference significant (:data:`TESTS`).
        alpha: family-wise level; the Holm correction runs over all (policy, baseline)
            comparisons of one metric (accuracy and dev loss are two families).
        n_boot, boot_seed: bootstrap resamples and their seed.
        confidence: level of the intervals.

    Returns:
        A JSON-serialisable dict: ``target`` (best baseline's mean final average dev loss and
        which baseline), ``test``/``alpha``/``correction``, ``comparisons`` (one dict per policy,
        baseline and metric: ``diff`` = mean paired difference policy − baseline, ``ci`` (t over
        seeds), ``p_ttest``, ``p_signflip``, ``bootstrap`` {diff, lo, hi, p, n_boot} or ``None``,
        ``p`` (the chosen test's), ``p_holm``, ``significant``), and per label ``rows[label]``
        with ``dev_avg``, ``acc_avg``, ``dev_domain``, ``acc_domain`` (each ``[mean, std]``),
        ``dev_ci``/``acc_ci`` (``[mean, lo, hi]``), ``reach`` (mean step over seeds that reached the
        target, ``reached``/``n``, ``per_seed``), ``wall_time``, ``overhead_pct``, ``weights`` (mean)
        and ``vs[baseline][metric]`` = the comparison dict.

    Raises:
        ValueError: unknown ``test`` or ``alpha`` outside (0, 1).
    """
    if test not in TESTS:
        raise ValueError(f"--test {test!r}: expected one of {', '.join(TESTS)}")
    if not 0 < alpha < 1:
        raise ValueError(f"--alpha {alpha}: expected a number in (0, 1)")
    rows: dict[str, Any] = {}
    for label, runs in results.items():
        domains = list(runs[0].dev_final)
        acc_domains = list(runs[0].acc_final or {})
        wnames = list(runs[0].weights_final)
        rows[label] = {
            "n": len(runs),
            "seeds": [r.seed for r in runs],
            "dev_avg": _ms([r.dev_avg for r in runs]),
            "acc_avg": _ms([r.acc_avg for r in runs]),
            "dev_ci": list(t_interval([r.dev_avg for r in runs], confidence)),
            "acc_ci": list(t_interval([r.acc_avg for r in runs], confidence)),
            "dev_per_seed": [r.dev_avg for r in runs],
            "acc_per_seed": [r.acc_avg for r in runs],
            "dev_domain": {d: _ms([r.dev_final.get(d, math.nan) for r in runs]) for d in domains},
            "acc_domain": {d: _ms([(r.acc_final or {}).get(d, math.nan) for r in runs]) for d in acc_domains},
            "wall_time": _ms([r.wall_time if r.wall_time is not None else math.nan for r in runs]),
            "train_time": _ms([r.train_time for r in runs]),
            "overhead_pct": _ms([r.overhead_pct for r in runs]),
            "weights": {n: float(np.mean([r.weights_final.get(n, math.nan) for r in runs])) for n in wnames},
            "steps": max(r.steps for r in runs),
        }
    present = [b for b in baselines if b in rows and math.isfinite(rows[b]["dev_avg"][0])]
    target = None
    if present:
        best = min(present, key=lambda b: rows[b]["dev_avg"][0])
        target = {"baseline": best, "dev_avg": rows[best]["dev_avg"][0]}
    comparisons: list[dict[str, Any]] = []
    for label, runs in results.items():
        row = rows[label]
        if target is not None:
            steps = [_first_reach(r.dev_curve, target["dev_avg"]) for r in runs]
            hit = [s for s in steps if s is not None]
            row["reach"] = {"mean": float(np.mean(hit)) if hit else None, "reached": len(hit), "n": len(steps),
                            "per_seed": steps}
        else:
            row["reach"] = None
        row["vs"] = {}
        for b in present:
            if b == label or (label in present and present.index(label) < present.index(b)):
                continue  # a baseline against a later baseline: the mirror of that pair, filled below
            row["vs"][b] = {}
            for metric in METRICS:
                c = _compare_pair(runs, results[b], metric, test=test, n_boot=n_boot, boot_seed=boot_seed)
                row["vs"][b][metric] = c
                if c is not None:
                    comparisons.append({"policy": label, "baseline": b, "metric": metric, **c})
    for metric in METRICS:  # Holm within each metric's family
        fam = [c for c in comparisons if c["metric"] == metric]
        for c, adj in zip(fam, holm([c["p"] for c in fam])):
            c["p_holm"] = adj
            c["significant"] = bool(math.isfinite(adj) and adj <= alpha)
            rows[c["policy"]]["vs"][c["baseline"]][metric].update(p_holm=adj, significant=c["significant"])
    for i, a in enumerate(present):  # baseline pairs are tested once; the earlier row shows the mirror
        for b in present[i + 1:]:
            rows[a]["vs"][b] = {m: _mirror(v) for m, v in rows[b]["vs"].get(a, {}).items()}
    return {"target": target, "baselines": present, "rows": rows, "comparisons": comparisons, "test": test,
            "alpha": alpha, "correction": "holm", "confidence": confidence, "n_boot": n_boot}


def _mirror(c: dict[str, Any] | None) -> dict[str, Any] | None:
    """The comparison ``b`` vs ``a`` from ``a`` vs ``b`` (differences negated, same p-values)."""
    if c is None:
        return None
    out = dict(c, diff=-c["diff"], ci=[-c["ci"][1], -c["ci"][0]], per_seed=[-x for x in c["per_seed"]])
    if c.get("bootstrap"):
        bt = c["bootstrap"]
        out["bootstrap"] = dict(bt, diff=-bt["diff"], lo=-bt["hi"], hi=-bt["lo"])
    return out
