"""Atomic checkpoints: DeepSpeed's state plus everything mixtrain needs to resume exactly.

Layout under ``output_dir/checkpoints``::

    step-00000040/            a complete checkpoint (the only kind resume ever picks)
      ds/...                  engine.save_checkpoint (model, optimizer, LR scheduler; per rank)
      mixtrain_state.json     step, tokens, sampler, policy, signal-bus window, weight history,
                              config fingerprint, global batch size
      rng-rank{r}.safetensors torch RNG state of every rank
    .tmp-step-00000050/       a save in progress (ignored, removed by the next save)

A save writes into ``.tmp-step-N`` and rank 0 renames it to ``step-N`` after every rank has
finished (a directory rename is atomic on POSIX), so a crash at any point during a save leaves
either the previous complete checkpoint or the new one, never a partial one that resume would
pick. Our own files are JSON and safetensors (no pickle); DeepSpeed's own files are loaded by
DeepSpeed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "CheckpointError",
    "atomic_write_text",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "save_checkpoint",
]

_PAT = re.compile(r"^step-(\d+)$")
STATE_FILE = "mixtrain_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used by this run (message says why)."""


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file + fsync + rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as ``(step, path)``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _PAT.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (``None`` if there is none)."""
    cps = list_checkpoints(root)
    return cps[-1][1] if cps else None


def save_checkpoint(engine: Any, root: str | Path, step: int, state: dict[str, Any], *, rank: int,
                    keep: int = 2) -> Path:
    """Save collectively (every rank must call); returns the final directory."""
    from safetensors.torch import save_file

    root = Path(root)
    tmp = root / f".tmp-step-{step:08d}"
    final = root / f"step-{step:08d}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for p in root.glob(".tmp-step-*"):
            shutil.rmtree(p, ignore_errors=True)
        if final.exists():  # re-saving the same step (e.g. resumed right at it)
            shutil.rmtree(final)
    _barrier()
    engine.save_checkpoint(str(tmp), tag="ds", save_latest=False)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(tmp / f"rng-rank{rank}.safetensors"))
    _barrier()
    if rank == 0:
        atomic_write_text(tmp / STATE_FILE, json.dumps(state, allow_nan=True))
        os.replace(tmp, final)
        for _, old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(engine: Any, path: str | Path, *, rank: int) -> dict[str, Any]:
    """Restore engine + RNG from ``path`` and return the mixtrain state dict.

    Raises:
        CheckpointError: not a complete mixtrain checkpoint.
    """
    from safetensors.torch import load_file

    path = Path(path)
    sf = path / STATE_FILE
    if not sf.is_file():
        raise CheckpointError(f"{path} is not a complete mixtrain checkpoint (no {STATE_FILE})")
    try:
        state = json.loads(sf.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{sf}: corrupt state file: {e}") from None
    load_path, _ = engine.load_checkpoint(
        str(path), tag="ds", load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load the checkpoint in {path / 'ds'}")
    rng_file = path / f"rng-rank{rank}.safetensors"
    if rng_file.is_file():
        rng = load_file(str(rng_file))
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return state
