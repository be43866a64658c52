"""The outputs of ``mixtrain compare``: ``comparison.md`` (tables and tests), ``comparison.png``
(curves, weights, per-domain losses), ``comparison.json`` (everything) and ``summary.json``
(per-arm intervals and every test; schema in ``docs/compare.md``)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .results import METRICS, RunResult, summarize
from .specs import BASELINES, PolicySpec


def _f(ms: Sequence[float], nd: int = 3, pct: bool = False) -> str:
    m, s = ms[0], ms[1]
    if m is None or not math.isfinite(m):
        return "n/a"
    k = 100.0 if pct else 1.0
    if s is None or not math.isfinite(s):
        return f"{m * k:.{nd}f}"
    return f"{m * k:.{nd}f} ± {s * k:.{nd}f}"


def _ci(mlh: Sequence[float], nd: int = 3, pct: bool = False, signed: bool = False) -> str:
    """``mean [lo, hi]`` (just the mean when the interval is undefined)."""
    m, lo, hi = mlh
    if m is None or not math.isfinite(m):
        return "n/a"
    k = 100.0 if pct else 1.0
    m, lo, hi = m + 0.0, lo + 0.0, hi + 0.0  # no "-0.0"
    sg = "+" if signed else ""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{m * k:{sg}.{nd}f}"
    return f"{m * k:{sg}.{nd}f} [{lo * k:{sg}.{nd}f}, {hi * k:{sg}.{nd}f}]"


def _vs(v: dict[str, Any] | None, nd: int = 3, pct: bool = False) -> str:
    if not v or v.get("diff") is None or not math.isfinite(v["diff"]):
        return "n/a"
    k = 100.0 if pct else 1.0
    return f"{v['diff'] * k + 0.0:+.{nd}f}{' *' if v.get('significant') else ''}"


def _p(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:.3f}" if x >= 0.001 else f"{x:.1e}"


_TEST_TEXT = {
    "ttest": "paired t-test over seeds (`scipy.stats.ttest_rel`; runs with the same seed form a pair)",
    "bootstrap": ("paired bootstrap over dev examples (stratified by domain, the same resampled example ids "
                  "for both policies and all seeds; percentile p-value)"),
    "signflip": "exact sign-flip permutation test over seeds",
}


def _summary_json(summ: dict[str, Any], labels: list[str], primary: str) -> dict[str, Any]:
    rows = summ["rows"]
    arms = {}
    for lab in labels:
        r = rows[lab]
        arms[lab] = {
            "n": r["n"], "seeds": r["seeds"],
            "accuracy": {"mean": r["acc_ci"][0], "lo": r["acc_ci"][1], "hi": r["acc_ci"][2], "std": r["acc_avg"][1],
                         "per_seed": r["acc_per_seed"]},
            "dev_loss": {"mean": r["dev_ci"][0], "lo": r["dev_ci"][1], "hi": r["dev_ci"][2], "std": r["dev_avg"][1],
                         "per_seed": r["dev_per_seed"]},
            "steps_to_baseline": r["reach"],
            "wall_time": r["wall_time"][0],
        }
    comps = [{**{k: v for k, v in c.items() if k != "metric"}, "metric": METRICS[c["metric"]].replace(" ", "_")}
             for c in summ["comparisons"]]
    return {"version": 1, "primary_metric": primary, "test": summ["test"], "alpha": summ["alpha"],
            "correction": summ["correction"], "confidence": summ["confidence"], "n_boot": summ["n_boot"],
            "target": summ["target"], "arms": arms, "comparisons": comps}


def write_comparison(out: str | Path, specs: Sequence[PolicySpec], results: dict[str, list[RunResult]],
                     *, header: dict[str, Any] | None = None, failures: Sequence[str] = (), test: str = "ttest",
                     alpha: float = 0.05, n_boot: int = 10000,
                     baselines: Sequence[str] = BASELINES) -> tuple[Path, Path]:
    """Write ``comparison.md``, ``comparison.png``, ``comparison.json`` (everything) and
    ``summary.json`` (per-arm intervals and every test; schema in ``docs/compare.md``) in ``out``.

    ``test``, ``alpha``, ``n_boot``, ``baselines``: see :func:`summarize`.

    Returns:
        ``(md_path, png_path)``.
    """
    out = Path(out)
    summ = summarize(results, baselines, test=test, alpha=alpha, n_boot=n_boot)
    rows = summ["rows"]
    labels = [s.label for s in specs if s.label in results]
    notes = {s.label: s for s in specs}
    has_acc = any(math.isfinite(rows[lab]["acc_avg"][0]) for lab in labels)
    primary = "accuracy" if has_acc else "dev_loss"
    base = summ["baselines"]
    n_seeds = max((rows[lab]["n"] for lab in labels), default=0)
    lines = ["# mixtrain compare", ""]
    for k, v in (header or {}).items():
        lines.append(f"- **{k}**: {v}")
    if list(base) == list(BASELINES):
        base_text = ("- **baselines**: `uniform` = stratified (equal weight per domain/skill); `random` = `proportional` "
                     "(uniform over training examples, p ∝ n). With equal domain sizes the two are the same mixture.")
    else:
        base_text = "- **baselines**: " + ", ".join(f"`{b}`" for b in base) + " (`--baselines`)."
    lines += [
        base_text,
        (f"- **primary metric**: {'dev accuracy (exact match); dev loss second' if has_acc else 'dev loss (no task accuracy in these runs)'}."),
        (f"- values are the mean over seeds with its {summ['confidence']:.0%} Student-t confidence interval "
         "`[lo, hi]` (final evaluation); `Δ` columns are the mean paired difference policy − baseline "
         "over the seeds both have."),
        (f"- **significance** (`*`): {_TEST_TEXT[test]}, two-sided, α = {alpha}, Holm-corrected over all "
         f"{len([c for c in summ['comparisons'] if c['metric'] == 'acc_avg'])} accuracy / "
         f"{len([c for c in summ['comparisons'] if c['metric'] == 'dev_avg'])} dev-loss comparisons "
         "(one family per metric). No `*` means: not shown to differ at that level, not: equal."),
        ("- runs with the same seed share the training data order where the mixtures allow: the same uniform "
         "stream picks each sample's domain (inverse CDF of that step's weights) and the same per-domain "
         "shuffles give the examples; model initialisation, corpus, dev rows and LoRA initialisation are the "
         "same for every seed. The seed-to-seed spread is therefore the data-order variance only."),
        (f"- the exact sign-flip test cannot go below p = 2/2^n (= {2 / 2 ** max(n_seeds, 1):.3g} with "
         f"{n_seeds} seed(s)); it is shown for reference"
         + (" and can never reach α here." if n_seeds and 2 / 2 ** n_seeds > alpha else ".")),
        ("- the bootstrap resamples dev examples only (the noise of a finite dev set for these trained models), "
         "not training seeds."),
        ("- *avg dev loss* = unweighted mean over domains of the per-domain mean token loss on the dev split; "
         "*accuracy* = unweighted mean over the scored domains of greedy exact-match accuracy."),
    ]
    if n_seeds < 3:
        lines.append(f"- **only {n_seeds} seed(s)**: use ≥ 3 seeds for the tests to mean anything.")
    if summ["target"] is not None:
        lines.append(f"- *steps to baseline*: first evaluation step whose avg dev loss ≤ "
                     f"{summ['target']['dev_avg']:.4f} (the final avg dev loss of the best baseline, "
                     f"`{summ['target']['baseline']}`), mean over the seeds that reach it (reached/seeds).")
    lines.append("- *overhead* = Σ policy_time / Σ step_time over logged steps (metrics.jsonl); "
                 "*wall* = seconds of the `train` subprocess(es), start-up and evaluation included.")
    lines.append("")
    head = ["policy"]
    if has_acc:
        head += ["accuracy %"] + [f"Δacc vs {b} (pts)" for b in base]
    head += ["avg dev loss"] + [f"Δ vs {b}" for b in base]
    head += ["steps to baseline", "wall (s)", "overhead %"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for lab in labels:
        r = rows[lab]
        name = f"`{lab}`" + (f" ({notes[lab].note})" if notes[lab].note else "")
        cells = [name]
        if has_acc:
            cells += [_ci(r["acc_ci"], 1, pct=True)] + [
                _vs(r["vs"].get(b, {}).get("acc_avg"), 1, pct=True) if b != lab else "—" for b in base]
        cells += [_ci(r["dev_ci"], 4)] + [_vs(r["vs"].get(b, {}).get("dev_avg"), 4) if b != lab else "—" for b in base]
        rc = r["reach"]
        if rc is None:
            cells.append("n/a")
        else:
            cells.append(f"{rc['mean']:.0f} ({rc['reached']}/{rc['n']})" if rc["mean"] is not None
                         else f"not reached (0/{rc['n']})")
        cells += [_f(r["wall_time"], 0), _f(r["overhead_pct"], 2)]
        lines.append("| " + " | ".join(cells) + " |")
    if summ["comparisons"]:
        lines += ["", "## Tests (policy − baseline)", "",
                  (f"`p` columns are two-sided, unadjusted except `p Holm` (of the `{test}` p-value); "
                   "`Δ [CI]` is the t interval of the paired differences over seeds; the bootstrap gives its own "
                   "Δ and percentile interval over dev examples."), "",
                  ("| policy | vs | metric | seeds | Δ [CI] | p t-test | p sign-flip | bootstrap Δ [CI] "
                   "| p bootstrap | p Holm | significant |"), "|" + "---|" * 11]
        for metric in (["acc_avg"] if has_acc else []) + ["dev_avg"]:
            for c in [c for c in summ["comparisons"] if c["metric"] == metric]:
                pct, nd = (True, 1) if metric == "acc_avg" else (False, 4)
                k = 100.0 if pct else 1.0
                bt = c["bootstrap"]
                lines.append("| " + " | ".join([
                    f"`{c['policy']}`", f"`{c['baseline']}`", METRICS[metric] + (" (pts)" if pct else ""), str(c["n"]),
                    _ci([c["diff"], *c["ci"]], nd, pct=pct, signed=True), _p(c["p_ttest"]), _p(c["p_signflip"]),
                    f"{bt['diff'] * k:+.{nd}f} [{bt['lo'] * k:+.{nd}f}, {bt['hi'] * k:+.{nd}f}]" if bt else "n/a",
                    _p(bt["p"]) if bt else "n/a", _p(c["p_holm"]), "**yes**" if c["significant"] else "no"]) + " |")
    domains = list(rows[labels[0]]["dev_domain"]) if labels else []
    lines += ["", "## Final dev loss per domain (mean ± std over seeds)", "",
              "| policy | " + " | ".join(domains) + " |", "|" + "---|" * (len(domains) + 1)]
    for lab in labels:
        lines.append(f"| `{lab}` | " + " | ".join(_f(rows[lab]["dev_domain"].get(d, (math.nan, math.nan)), 3)
                                                   for d in domains) + " |")
    if has_acc:
        adom = list(rows[labels[0]]["acc_domain"])
        lines += ["", "## Final dev accuracy per domain (%, mean ± std over seeds)", "",
                  "| policy | " + " | ".join(adom) + " |", "|" + "---|" * (len(adom) + 1)]
        for lab in labels:
            lines.append(f"| `{lab}` | " + " | ".join(
                _f(rows[lab]["acc_domain"].get(d, (math.nan, math.nan)), 1, pct=True) for d in adom) + " |")
    wn = list(rows[labels[0]]["weights"]) if labels else []
    lines += ["", "## Final sampling weights (mean over seeds)", "",
              "| policy | " + " | ".join(wn) + " |", "|" + "---|" * (len(wn) + 1)]
    for lab in labels:
        lines.append(f"| `{lab}` | " + " | ".join(f"{rows[lab]['weights'].get(n, math.nan):.3f}" for n in wn) + " |")
    if failures:
        lines += ["", "## Failed runs", ""] + [f"- {f}" for f in failures]
    lines += ["", "![comparison](comparison.png)", ""]
    out.mkdir(parents=True, exist_ok=True)
    md = out / "comparison.md"
    _atomic_write(md, "\n".join(lines))
    _atomic_write(out / "comparison.json", json.dumps(
        {"header": header or {}, "specs": [s.__dict__ for s in specs], "summary": summ,
         "curves": {lab: [r.dev_curve for r in results[lab]] for lab in labels},
         "acc_curves": {lab: [r.acc_curve for r in results[lab]] for lab in labels},
         "failures": list(failures)}, indent=1, default=str))
    _atomic_write(out / "summary.json", json.dumps({"header": header or {}, **_summary_json(summ, labels, primary)},
                                                   indent=1, default=str))
    png = _plot(out / "comparison.png", labels, results, rows, has_acc)
    return md, png


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _mean_curve(curves: list[list[tuple[int, float]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    steps = sorted({s for c in curves for s, _ in c})
    m, sd = [], []
    for s in steps:
        vals = [v for c in curves for st, v in c if st == s and math.isfinite(v)]
        m.append(np.mean(vals) if vals else np.nan)
        sd.append(np.std(vals, ddof=1) if len(vals) > 1 else 0.0)
    return np.array(steps, dtype=float), np.array(m), np.array(sd)


def _plot(path: Path, labels: list[str], results: dict[str, list[RunResult]], rows: dict[str, Any],
          has_acc: bool) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(15, 10))
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    for i, lab in enumerate(labels):
        s, m, sd = _mean_curve([r.dev_curve for r in results[lab]])
        ax = axes[0, 0]
        ax.plot(s, m, color=cmap(i % cmap.N), label=lab, lw=1.5)
        ax.fill_between(s, m - sd, m + sd, color=cmap(i % cmap.N), alpha=0.15)
    axes[0, 0].set(title="average dev loss vs step (mean ± std over seeds)", xlabel="step", ylabel="avg dev loss")
    axes[0, 0].legend(fontsize=8)
    ax = axes[0, 1]
    if has_acc:
        for i, lab in enumerate(labels):
            s, m, sd = _mean_curve([r.acc_curve for r in results[lab]])
            ax.plot(s, m, color=cmap(i % cmap.N), label=lab, lw=1.5, marker="o", ms=3)
            ax.fill_between(s, m - sd, m + sd, color=cmap(i % cmap.N), alpha=0.15)
        ax.set(title="mean dev accuracy vs step (greedy exact match)", xlabel="step", ylabel="accuracy",
               ylim=(-0.02, 1.02))
    else:
        ax.text(0.5, 0.5, "no task accuracy (eval.accuracy: false)", ha="center", va="center")
        ax.set(title="mean dev accuracy")
    # final weights: one stacked bar per policy
    ax = axes[1, 0]
    wn = list(rows[labels[0]]["weights"]) if labels else []
    wcm = plt.get_cmap("tab20" if len(wn) > 10 else "tab10")
    bottom = np.zeros(len(labels))
    for j, n in enumerate(wn):
        vals = np.array([rows[lab]["weights"].get(n, 0.0) for lab in labels])
        ax.bar(range(len(labels)), vals, bottom=bottom, color=wcm(j % wcm.N), label=n)
        bottom += vals
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set(title="final sampling weights (mean over seeds)", ylabel="weight", ylim=(0, 1))
    ax.legend(fontsize=7, loc="upper right")
    # final per-domain dev loss, grouped bars
    ax = axes[1, 1]
    doms = list(rows[labels[0]]["dev_domain"]) if labels else []
    width = 0.8 / max(1, len(labels))
    for i, lab in enumerate(labels):
        ms = [rows[lab]["dev_domain"].get(d, (np.nan, np.nan)) for d in doms]
        ax.bar(np.arange(len(doms)) + (i - (len(labels) - 1) / 2) * width, [m for m, _ in ms], width,
               yerr=[0 if not math.isfinite(s) else s for _, s in ms], color=cmap(i % cmap.N), label=lab)
    ax.set_xticks(range(len(doms)), doms, rotation=30, ha="right", fontsize=8)
    ax.set(title="final dev loss per domain", ylabel="dev loss")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=85)
    plt.close(fig)
    tmp.replace(path)
    return path
