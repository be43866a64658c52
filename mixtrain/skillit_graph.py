"""Learn a Skill-It skills graph by short training runs (the released code has none).

``python -m mixtrain skillit-graph CONFIG.yaml [--steps N] [--mode binary|real] [--out DIR] [k=v ...]``

Skill-It (Chen et al., NeurIPS 2023, §2.2 and the README of ``HazyResearch/skill-it``) tests an
edge i → j by training on {i, j} versus {j} alone for the same number of steps and comparing the
loss on skill j. Here every configured domain is a skill and, from the **same** starting model
(the config's initialisation or checkpoint), with the config's optimiser settings:

* one run on {j} alone per skill j (``steps`` optimizer steps, domain weights 1 on j);
* one run on {i, j} per unordered pair (weights ½, ½): it gives the loss on j *and* on i, so
  it serves both edges i → j and j → i.

With L⁰ⱼ the dev loss of j at the start, Lⱼ^(j) after training on {j}, Lⱼ^(i,j) after {i, j}:

* ``mode: binary`` (default; like the released LEGO / addition graphs): A[j, j] = 1 and
  A[i, j] = 1 when Lⱼ^(i,j) < Lⱼ^(j) (training on i as well helps j more than the same steps on j
  alone), else 0. The policy then turns each off-diagonal 1 into 0.5, as released.
* ``mode: real``: A[j, j] = (L⁰ⱼ − Lⱼ^(j)) / L⁰ⱼ and A[i, j] = (Lⱼ^(j) − Lⱼ^(i,j)) / Lⱼ^(j): relative
  loss reductions (negative when i hurts j).

Outputs in ``--out`` (default ``<output_dir>_graph``): ``skillit_graph.json`` (skills, graph,
every measured loss), ``skillit_graph.npy`` and a heat map ``skillit_graph.png``. Point the
``skillit`` policy's ``graph:`` at the JSON (rows/columns are matched by skill name).

Runs are plain single-process PyTorch loops (no DeepSpeed): D + D(D−1)/2 short runs.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import Config, ConfigError
from .data import collate_examples, encode_config_domains
from .engine import adamw, build_model
from .sampler import MixtureSampler
from .signals import causal_lm_loss, dev_losses

__all__ = ["graph_from_losses", "learn_graph", "plot_graph"]

log = logging.getLogger("mixtrain")


def graph_from_losses(start: np.ndarray, alone: np.ndarray, pair: np.ndarray, mode: str = "binary") -> np.ndarray:
    """The graph from measured dev losses.

    Args:
        start: ``[D]`` L⁰ (dev loss per skill before training).
        alone: ``[D]`` Lⱼ^(j) (skill j's dev loss after training on {j}).
        pair: ``[D, D]`` with ``pair[i, j]`` = Lⱼ^(i,j) (skill j's dev loss after training on
            {i, j}); the diagonal is ignored.
        mode: ``binary`` or ``real`` (module docstring).
    """
    if mode not in ("binary", "real"):
        raise ValueError(f"mode: got {mode!r}, expected 'binary' or 'real'")
    start, alone, pair = (np.asarray(x, dtype=np.float64) for x in (start, alone, pair))
    d = start.shape[0]
    if alone.shape != (d,) or pair.shape != (d, d):
        raise ValueError(f"losses: got shapes {start.shape}, {alone.shape}, {pair.shape}; expected ({d},), ({d},), ({d}, {d})")
    off = ~np.eye(d, dtype=bool)
    if not (np.isfinite(start).all() and np.isfinite(alone).all() and np.isfinite(pair[off]).all()):
        raise ValueError("losses: non-finite dev loss (does every skill have dev rows?)")
    if mode == "binary":
        g = (pair < alone[None, :]).astype(np.float64)
        np.fill_diagonal(g, 1.0)
        return g
    g = (alone[None, :] - pair) / alone[None, :]
    np.fill_diagonal(g, (start - alone) / start)
    return g


def plot_graph(graph: np.ndarray, skills: list[str], path: Path, title: str) -> Path:
    """Heat map of A (rows: trained skill i, columns: evaluated skill j) with values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = len(skills)
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * d, 0.8 + 0.8 * d))
    lim = float(np.abs(graph).max()) or 1.0
    im = ax.imshow(graph, cmap="RdBu", vmin=-lim, vmax=lim)
    ax.set_xticks(range(d), skills, rotation=45, ha="right")
    ax.set_yticks(range(d), skills)
    ax.set_xlabel("evaluated skill j")
    ax.set_ylabel("trained with skill i")
    for i in range(d):
        for j in range(d):
            ax.text(j, i, f"{graph[i, j]:.2g}", ha="center", va="center", fontsize=8)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def learn_graph(cfg: Config, *, steps: int = 10, mode: str = "binary", out: str | Path | None = None) -> dict[str, Any]:
    """Run the D + D(D−1)/2 short trainings and write the graph (see module docstring)."""
    if steps < 1:
        raise ConfigError(f"skillit-graph --steps: got {steps}, expected >= 1")
    if mode not in ("binary", "real"):
        raise ConfigError(f"skillit-graph --mode: got {mode!r}, expected binary or real")
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    tok, enc = encode_config_domains(cfg)
    names = [e.name for e in enc]
    d = len(names)
    if d < 2:
        raise ConfigError(f"skillit-graph: needs at least 2 skills (domains), got {names}")
    missing = [e.name for e in enc if not e.dev]
    if missing:
        raise ConfigError(f"skillit-graph: skill(s) {missing} have no dev rows; set data.dev_fraction > 0")
    out_dir = Path(out) if out is not None else Path(str(cfg.output_dir).rstrip("/") + "_graph")
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(cfg, tok.vocab_size)
    start_state = copy.deepcopy(model.state_dict())
    sizes = [e.size for e in enc]
    mbs, ga = t.micro_batch_size, t.grad_accum

    def make_batch(rows: list[tuple[int, int]], split: str = "train") -> dict[str, torch.Tensor]:
        return collate_examples(enc, rows, tok.pad_token_id, split)

    def dev() -> np.ndarray:
        model.eval()
        try:
            return dev_losses(lambda b: causal_lm_loss(model, b, d), lambda rows: make_batch(rows, "dev"),
                              [len(e.dev) for e in enc], batch_size=mbs)
        finally:
            model.train()

    def run(skills: tuple[int, ...]) -> np.ndarray:
        model.load_state_dict(start_state)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = adamw(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
        w = np.zeros(d)
        w[list(skills)] = 1.0
        sampler = MixtureSampler(sizes, w, global_batch_size=mbs * ga, seed=t.seed,
                                 with_replacement=cfg.data.with_replacement, domain_names=names)
        for _ in range(steps):
            gb = sampler.next_global_batch()
            rows = list(zip(gb.domains.tolist(), gb.examples.tolist()))
            opt.zero_grad(set_to_none=True)
            for m in range(ga):
                loss = causal_lm_loss(model, make_batch(rows[m * mbs:(m + 1) * mbs]), d).loss / ga
                loss.backward()
            if t.grad_clip and t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
            opt.step()
        return dev()

    torch.manual_seed(t.seed)
    start = dev()
    alone = np.zeros(d)
    pair = np.full((d, d), np.nan)
    for j in range(d):
        alone[j] = run((j,))[j]
        log.info("skillit-graph: {%s}: dev loss %.4f (start %.4f)", names[j], alone[j], start[j])
    for i in range(d):
        for j in range(i + 1, d):
            losses = run((i, j))
            pair[i, j], pair[j, i] = losses[j], losses[i]
            log.info("skillit-graph: {%s, %s}: dev loss %s=%.4f, %s=%.4f", names[i], names[j], names[j], losses[j],
                     names[i], losses[i])
    graph = graph_from_losses(start, alone, pair, mode)
    result = {
        "skills": names, "graph": graph.tolist(), "mode": mode, "steps": steps,
        "dev_loss_start": start.tolist(), "dev_loss_alone": alone.tolist(),
        "dev_loss_pair": [[None if (i == j or not math.isfinite(v)) else float(v) for j, v in enumerate(row)]
                          for i, row in enumerate(pair.tolist())],
    }
    (out_dir / "skillit_graph.json").write_text(json.dumps(result, indent=2) + "\n")
    np.save(out_dir / "skillit_graph.npy", graph)
    plot_graph(graph, names, out_dir / "skillit_graph.png", f"Skill-It graph ({mode}, {steps} steps)")
    log.info("skillit-graph: wrote %s", out_dir / "skillit_graph.json")
    return {**result, "output_dir": str(out_dir)}
