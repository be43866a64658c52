"""``report.png`` and ``schedule.json`` from a run directory.

``python -m mixtrain report DIR`` regenerates the figure from ``DIR/metrics.jsonl`` alone:
weights over steps (stacked area), per-domain train loss, per-domain dev loss, realised
sample fractions against the step-averaged target weights and, with ``eval.accuracy``, dev
exact-match accuracy over steps and first vs last evaluation per domain.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import atomic_write_text

__all__ = ["export_schedule", "make_report", "read_metrics"]


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Records of ``run_dir/metrics.jsonl`` (a torn last line is ignored).

    Raises:
        FileNotFoundError: no metrics file (message names the path).
    """
    p = Path(run_dir) / "metrics.jsonl"
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist; is {run_dir!r} a mixtrain output_dir?")
    recs = []
    for line in p.read_text().splitlines():
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return recs


def export_schedule(run_dir: str | Path, names: Sequence[str], history: Sequence[Sequence[Any]]) -> Path:
    """Write ``schedule.json`` (``domains``, ``steps``, ``weights``) for the ``schedule`` policy.

    Entry ``(k, w)``: weights ``w`` were used from optimizer step ``k + 1`` on.
    """
    p = Path(run_dir) / "schedule.json"
    data = {"domains": list(names), "steps": [int(s) for s, _ in history],
            "weights": [[float(x) for x in w] for _, w in history]}
    atomic_write_text(p, json.dumps(data, indent=1))
    return p


def _series(recs: list[dict[str, Any]], key: str, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    rows = [r for r in recs if isinstance(r.get(key), dict)]
    steps = np.array([r["step"] for r in rows], dtype=float)
    vals = np.array([[np.nan if r[key].get(n) is None else r[key][n] for n in names] for r in rows], dtype=float)
    return steps, vals.reshape(len(rows), len(names))


def make_report(run_dir: str | Path, path: str | Path | None = None) -> Path:
    """Render ``report.png`` (or ``path``) from ``run_dir/metrics.jsonl``; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(run_dir)
    if not recs:
        raise ValueError(f"{run_dir}/metrics.jsonl has no records")
    names = list(recs[-1]["weights"])
    cmap = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    colors = [cmap(i % cmap.N) for i in range(len(names))]
    has_acc = any(isinstance(r.get("dev_accuracy"), dict) for r in recs)
    fig, axes = plt.subplots(2, 3 if has_acc else 2, figsize=(20 if has_acc else 14, 9))
    ax = axes[0, 0]
    s, w = _series(recs, "step_weights" if "step_weights" in recs[-1] else "weights", names)
    ax.stackplot(s, w.T, labels=names, colors=colors, alpha=0.9)
    ax.set(title="sampling weights (target)", xlabel="step", ylabel="weight", ylim=(0, 1),
           xlim=(s.min(), s.max()) if len(s) > 1 else None)
    ax = axes[0, 1]
    s, v = _series(recs, "domain_loss", names)
    for i, n in enumerate(names):
        ok = ~np.isnan(v[:, i])
        ax.plot(s[ok], v[ok, i], color=colors[i], lw=1.2, label=n)
    ax.set(title="train loss per domain (mean token loss)", xlabel="step", ylabel="loss")
    ax = axes[1, 0]
    s, v = _series(recs, "dev_loss", names)
    if len(s):
        for i, n in enumerate(names):
            ok = ~np.isnan(v[:, i])
            ax.plot(s[ok], v[ok, i], marker="o", ms=3, color=colors[i], lw=1.2, label=n)
        ax.set(title="dev loss per domain", xlabel="step", ylabel="loss")
    else:
        ax.text(0.5, 0.5, "no dev evaluations (train.eval_every = 0)", ha="center", va="center")
        ax.set(title="dev loss per domain")
    ax = axes[1, 1]
    _, sw = _series(recs, "step_weights" if "step_weights" in recs[-1] else "weights", names)
    target = np.nanmean(sw, axis=0) if len(sw) else np.zeros(len(names))
    realised = np.array([recs[-1]["domain_fraction"].get(n) or 0.0 for n in names])
    x = np.arange(len(names))
    ax.bar(x - 0.2, target, 0.4, label="target (mean weight)", color="0.6")
    ax.bar(x + 0.2, realised, 0.4, label="realised fraction", color=colors)
    ax.set_xticks(x, names, rotation=45, ha="right")
    ax.set(title="realised vs target sample fractions", ylabel="fraction")
    ax.legend(loc="upper right", fontsize=8)
    if has_acc:
        from .accuracy import plot_accuracy, plot_accuracy_change

        plot_accuracy(axes[0, 2], recs)
        if not plot_accuracy_change(axes[1, 2], recs):
            axes[1, 2].axis("off")
    handles, labels = axes[0, 1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=9, title="domain")
    last = recs[-1]
    fig.suptitle(f"{Path(run_dir).resolve().name}: {last['step']} steps, loss {last['loss']:.3f}, "
                 f"{last.get('tokens', 0):,} trained tokens")
    fig.tight_layout(rect=(0, 0, 0.88, 0.96))
    out = Path(path) if path is not None else Path(run_dir) / "report.png"
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(out)
    return out


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
