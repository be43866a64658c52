"""GradEx plots: ``report.png`` (task scores, subset scores, estimate vs truth) and
``estimated_vs_true.png`` (from ``validation.json``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def plot_validation(out: str | Path) -> Path:
    """Scatter of GradEx score and first-order estimate against the true objective."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    v = json.loads((out / "validation.json").read_text())
    true = np.array([r["true_objective"] for r in v["subsets"]])
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    _scatter(axes[0], true, np.array([r["taylor"] for r in v["subsets"]]), "first-order estimate (actual Δθ)")
    _scatter(axes[1], true, np.array([r["gradex_score"] for r in v["subsets"]]),
             f"GradEx score (ρ={v['spearman_gradex_vs_true_objective']:.2f})")
    fig.tight_layout()
    path = out / "estimated_vs_true.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _scatter(ax, true: np.ndarray, est: np.ndarray, title: str) -> None:
    ax.scatter(true, est)
    lo, hi = float(min(true.min(), est.min())), float(max(true.max(), est.max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xlabel("true target objective (fine-tuned)")
    ax.set_ylabel("estimate")
    ax.set_title(title, fontsize=9)


def make_gradex_report(out: str | Path) -> Path:
    """``out/report.png`` from ``task_scores.json``, ``selection.json``, ``estimates.npz`` and,
    when present, ``validation.json``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    ts = json.loads((out / "task_scores.json").read_text())
    sel = json.loads((out / "selection.json").read_text())
    est = np.load(out / "estimates.npz")
    has_val = (out / "validation.json").exists()
    fig, axes = plt.subplots(1, 3 if has_val else 2, figsize=(14 if has_val else 10, 4))
    names = list(ts["tasks"])
    scores = np.array([np.nan if ts["tasks"][n]["score"] is None else ts["tasks"][n]["score"] for n in names])
    colors = ["tab:green" if n in sel["tasks"] else "tab:gray" for n in names]
    axes[0].bar(range(len(names)), scores, color=colors)
    axes[0].set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    axes[0].set_ylim(np.nanmin(scores) - 0.1 * np.nanstd(scores) - 1e-9, np.nanmax(scores) + 0.1 * np.nanstd(scores) + 1e-9)
    axes[0].set_title(f"task scores (random ensemble); green = selected ({sel['method']})", fontsize=9)
    axes[1].hist(est["scores"], bins=40)
    axes[1].axvline(float(np.mean(est["base_per_target"])), color="k", ls="--", label="θ*")
    axes[1].set_title(f"estimated target score over {len(est['scores'])} subsets ({ts['metric']})", fontsize=9)
    axes[1].legend()
    if has_val:
        v = json.loads((out / "validation.json").read_text())
        true = np.array([r["true_objective"] for r in v["subsets"]])
        _scatter(axes[2], true, np.array([r["taylor"] for r in v["subsets"]]),
                 f"estimate vs truth (mean rel. err {100 * v['mean_rel_error']:.2f}%)")
    fig.tight_layout()
    path = out / "report.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
