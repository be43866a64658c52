"""GradEx step 2: per-example projected gradients of the objective at θ*, into a GradientStore.

For every example x (a training example of a task, or a target dev example)::

    g̃(x) = Rᵀ ∇_θ f(x; θ*)       (θ = the trainable linear weights, LoRA A/B by default)

computed for a whole batch in one forward + backward by :class:`mixkernels.GradientProjector`
(``capture(weight_grads=False)``: no weight-gradient GEMMs, no stored projection matrix; the
released code loops ``autograd.grad`` per example and multiplies by a dense ``D × d`` matrix).
Rows go to ``<dir>/grads`` (a :class:`mixkernels.GradientStore`, K columns) and f(x; θ*) to
``<dir>/outputs`` (a float32 store with one column), keyed by a stable **example id**
(``domain position << 32 | example index``), never by batch position: the released
``idx // batch_size`` indexing breaks as soon as the loader shuffles.

Resumable: both stores commit block by block; a rerun skips every id already in both and
recomputes only the rest. ``<dir>/gradex_meta.json`` records the projection (kind, dim, seed), the
objective, the module list and a fingerprint of θ*; reopening with different settings is refused.
"""

from __future__ import annotations

import bisect
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import Config, ConfigError
from .config import GradexConfig
from .model import gradex_modules, trainable_vector, weights_fingerprint
from .objective import per_example_objective

log = logging.getLogger("mixtrain.gradex")
META = "gradex_meta.json"
ID_SHIFT = 32
COMMIT_ROWS = 64

Row = tuple[list[int], list[int]]


@dataclass
class Examples:
    """Examples for one gradient pass: ids [N] int64, task label per example, token rows."""

    ids: list[int]
    tasks: list[str]
    rows: RowRefs


class RowRefs(Sequence):
    """Rows read on demand from the domains' rows (segments of ``(rows, indices)``)."""

    def __init__(self) -> None:
        self.segments: list[tuple[Sequence[Row], np.ndarray]] = []
        self.ends: list[int] = []

    def extend(self, rows: Sequence[Row], idx: np.ndarray) -> None:
        self.segments.append((rows, np.asarray(idx, dtype=np.int64)))
        self.ends.append((self.ends[-1] if self.ends else 0) + len(idx))

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def __getitem__(self, k: Any) -> Any:
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        k = int(k)
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(f"row {k} out of range for {len(self)} rows")
        seg = bisect.bisect_right(self.ends, k)
        rows, idx = self.segments[seg]
        return rows[int(idx[k - (self.ends[seg - 1] if seg else 0)])]


@dataclass
class TaskData:
    """Tokenised tasks (training split) and target dev examples."""

    train: Examples
    target: Examples
    task_names: list[str]
    target_names: list[str]
    domain_order: list[str]
    pad_token_id: int
    vocab_size: int


def load_task_data(cfg: Config, g: GradexConfig) -> TaskData:
    """Tasks and target dev data from the config's ``data`` section.

    Raises:
        ConfigError: unknown task/target name, a task with no examples, a target without dev data.
    """
    from ..data import encode_config_domains

    # GradEx's unit is the example: one gradient per example, never a packed row
    tok, enc = encode_config_domains(cfg, packing=False)
    order = [d.name for d in enc]
    by_name = {d.name: (i, d) for i, d in enumerate(enc)}
    tasks = list(g.tasks) if g.tasks else order
    for name in (*tasks, *g.target):
        if name not in by_name:
            raise ConfigError(f"gradex: {name!r} is not a configured domain; domains: {order}")
    train = Examples([], [], RowRefs())
    for name in tasks:
        pos, d = by_name[name]
        keep = np.flatnonzero(d.train_label_counts() > 0)
        if g.max_examples_per_task is not None:
            keep = keep[: g.max_examples_per_task]
        if not len(keep):
            raise ConfigError(f"gradex: task {name!r} has no examples with target tokens (after max_length "
                              f"{cfg.data.max_length} truncation)")
        train.ids.extend(((pos << ID_SHIFT) | keep).tolist())
        train.tasks.extend([name] * len(keep))
        train.rows.extend(d.train, keep)
    target = Examples([], [], RowRefs())
    for name in g.target:
        pos, d = by_name[name]
        keep = np.array([i for i, r in enumerate(d.dev) if (np.asarray(r[1][1:]) != -100).any()], dtype=np.int64)
        if not len(keep):
            raise ConfigError(f"gradex: target {name!r} has no dev data; set data.dev_fraction > 0 or give "
                              "data.domains.<name>: {train: ..., dev: ...}")
        target.ids.extend(((pos << ID_SHIFT) | keep).tolist())
        target.tasks.extend([name] * len(keep))
        target.rows.extend(d.dev, keep)
    return TaskData(train, target, tasks, list(g.target), order, tok.pad_token_id, tok.vocab_size)


def collate_rows(rows: list[Row], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask``, ``labels`` [B, T]."""
    from ..data import collate

    b = collate(rows, [0] * len(rows), pad)
    b.pop("domain_ids")
    return b


def make_projector(model: nn.Module, g: GradexConfig, modules: list[str]) -> Any:
    """The :class:`mixkernels.GradientProjector` for ``g.projection``.

    Raises:
        ConfigError: projection dimension larger than the parameter count.
    """
    import mixkernels

    mods = dict(model.named_modules())
    num_params = sum(mods[n].weight.numel() for n in modules)
    if g.projection == "factored":
        k = len(modules) * g.factored_rank[0] * g.factored_rank[1]
        if k > num_params:
            raise ConfigError(f"gradex.factored_rank: {g.factored_rank} gives {k} projected dimensions, more than "
                              f"the {num_params} trainable parameters; lower it")
        return mixkernels.GradientProjector(model, kind="factored", rank=tuple(g.factored_rank),
                                            seed=g.projection_seed, modules=modules)
    if g.project_dim > num_params:
        raise ConfigError(f"gradex.project_dim: {g.project_dim} is larger than the parameter count {num_params} "
                          "of the trainable weights; a projection must reduce the dimension")
    return mixkernels.GradientProjector(model, kind=g.projection, proj_dim=g.project_dim,
                                        seed=g.projection_seed, modules=modules)


def store_meta(model: nn.Module, g: GradexConfig, modules: list[str], dim: int) -> dict[str, Any]:
    """What must match for stored gradients to be reused."""
    mods = dict(model.named_modules())
    theta = trainable_vector(model, modules)
    return {
        "projection": g.projection,
        "dim": dim,
        "project_dim": g.project_dim if g.projection != "factored" else None,
        "factored_rank": list(g.factored_rank) if g.projection == "factored" else None,
        "projection_seed": g.projection_seed,
        "objective": g.objective,
        "modules": [[n, list(mods[n].weight.shape)] for n in modules],
        "num_params": int(theta.numel()),
        "theta_norm": float(theta.norm()),
        "theta_fingerprint": weights_fingerprint(theta),
        "store_dtype": g.store_dtype,
    }


def check_meta(path: Path, meta: dict[str, Any]) -> None:
    """Write ``meta`` for a new store; refuse an existing one written with other settings."""
    f = path / META
    if not f.exists():
        path.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(meta, indent=1))
        return
    old = json.loads(f.read_text())
    labels = {"projection_seed": "projection seed", "theta_fingerprint": "θ* (trainable weights)"}
    for key, value in meta.items():
        if old.get(key) != value:
            raise ConfigError(
                f"gradex: the gradient store {str(path)!r} was written with {labels.get(key, key)} = {old.get(key)!r}, "
                f"but this run has {value!r}; use another output_dir or delete the store to recompute"
            )


def gradient_pass(model: nn.Module, examples: Examples, path: str | Path, g: GradexConfig, pad_token_id: int,
                  modules: list[str] | None = None) -> dict[str, Any]:
    """Project every example's ∇f(x; θ*) into ``path``; returns the store metadata.

    Resumes: examples already in both stores are skipped (their gradients are never recomputed).
    """
    import mixkernels

    path = Path(path)
    modules = modules or gradex_modules(model)
    gp = make_projector(model, g, modules)
    meta = store_meta(model, g, modules, gp.dim)
    check_meta(path, meta)
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[g.store_dtype]
    # durable=False: still safe against a killed process (the manifest commit is atomic); fsync
    # per block made the pass I/O-bound on shared disks
    grads = mixkernels.GradientStore(path / "grads", gp.dim, dtype, durable=False)
    outs = mixkernels.GradientStore(path / "outputs", 1, torch.float32, durable=False)
    have_g = set(grads.ids().tolist())
    have_o = set(outs.ids().tolist())
    todo = [k for k, i in enumerate(examples.ids) if i not in have_g or i not in have_o]
    if len(todo) < len(examples.ids):
        log.info("gradient store %s: %d of %d examples already stored, computing %d", path,
                 len(examples.ids) - len(todo), len(examples.ids), len(todo))
    was_training = model.training
    model.eval()  # LoRA dropout off, as released
    pending: list[tuple[torch.Tensor, torch.Tensor, list[int], list[str], list[bool], list[bool]]] = []

    def flush() -> None:
        if not pending:
            return
        G = torch.cat([p[0] for p in pending])
        f = torch.cat([p[1] for p in pending])
        ids = [i for p in pending for i in p[2]]
        tasks = [t for p in pending for t in p[3]]
        new_g = [j for j, keep in enumerate(x for p in pending for x in p[4]) if keep]
        new_o = [j for j, keep in enumerate(x for p in pending for x in p[5]) if keep]
        if new_g:
            grads.append(G[new_g], [ids[j] for j in new_g], [tasks[j] for j in new_g])
        if new_o:
            outs.append(f[new_o].unsqueeze(1), [ids[j] for j in new_o], [tasks[j] for j in new_o])
        pending.clear()

    try:
        for start in range(0, len(todo), g.batch_size):
            sel = todo[start:start + g.batch_size]
            batch = collate_rows([examples.rows[k] for k in sel], pad_token_id)
            with torch.enable_grad(), gp.capture(weight_grads=False):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               use_cache=False).logits
                f = per_example_objective(logits, batch["labels"], g.objective)
                f.sum().backward()
            ids = [examples.ids[k] for k in sel]
            pending.append((gp.grads(), f.detach(), ids, [examples.tasks[k] for k in sel],
                            [i not in have_g for i in ids], [i not in have_o for i in ids]))
            if sum(len(p[2]) for p in pending) >= COMMIT_ROWS:
                flush()  # one commit per COMMIT_ROWS examples: a crash loses at most these
        flush()
    finally:
        model.train(was_training)
    return meta


@dataclass
class Stored:
    """Everything estimation needs, read back from a store (rows in ``ids`` order)."""

    ids: np.ndarray        # [N] int64
    tasks: list[str]       # [N]
    grads: np.ndarray      # [N, K] float64
    outputs: np.ndarray    # [N] float64, f(x; θ*)
    meta: dict[str, Any]


def read_store(path: str | Path, examples: Examples) -> Stored:
    """Read the rows of ``examples`` (by id) from a store written by :func:`gradient_pass`."""
    import mixkernels

    path = Path(path)
    if not (path / META).exists():
        raise ConfigError(f"gradex: no gradient store at {str(path)!r} (run the gradient pass first)")
    meta = json.loads((path / META).read_text())
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[meta["store_dtype"]]
    grads = mixkernels.GradientStore(path / "grads", meta["dim"], dtype)
    outs = mixkernels.GradientStore(path / "outputs", 1, torch.float32)
    try:
        G = grads.get(examples.ids).float().double().numpy()
        f = outs.get(examples.ids).double().numpy()[:, 0]
    except KeyError as e:
        raise ConfigError(f"gradex: the store {str(path)!r} is incomplete ({e}); rerun the gradient pass") from None
    return Stored(np.asarray(examples.ids, dtype=np.int64), list(examples.tasks), G, f, meta)
