"""Verified, atomic checkpoints: DeepSpeed's state plus everything mixtrain needs to resume exactly.

Layout under ``output_dir/checkpoints``::

    step-00000040/            a complete checkpoint (the only kind resume ever picks)
      ds/...                  engine.save_checkpoint (model, optimizer, LR scheduler; per rank)
      mixtrain_state.json     step, tokens, sampler, policy, signal-bus window, weight history,
                              config fingerprint, global batch size
      rng-rank{r}.safetensors torch RNG state of every rank
      manifest.json           size + sha256 of every other file, written last
    .tmp-step-00000050/       a save in progress (ignored, removed by the next save)

A save writes into ``.tmp-step-N``; after every rank has finished, rank 0 writes the state file,
then the manifest (which hashes every file of the directory, DeepSpeed's included), then renames
the directory to ``step-N`` (a directory rename is atomic on POSIX). A crash at any point leaves
the previous complete checkpoint; a failed write (a full disk) removes the partial directory and
raises :class:`CheckpointError` naming the file and the reason.

On resume (:func:`find_resumable`) the newest checkpoint is verified against its manifest; a
missing, truncated or corrupt file makes it fall back, with a warning naming the first bad file,
to the newest checkpoint that verifies. Checkpoints written before manifests existed (no
``manifest.json``) stay resumable when their state file parses, with a warning that their files
cannot be verified. Our own files are JSON and safetensors (no pickle); DeepSpeed's own files are
loaded by DeepSpeed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "MANIFEST_FILE",
    "CheckpointError",
    "Verification",
    "atomic_write_text",
    "find_resumable",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "read_state",
    "replace_dir",
    "save_checkpoint",
    "verify_dir",
    "write_manifest",
]

log = logging.getLogger("mixtrain")

_PAT = re.compile(r"^step-(\d+)$")
STATE_FILE = "mixtrain_state.json"
MANIFEST_FILE = "manifest.json"
_CHUNK = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used or written by this run (message says why)."""


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file + fsync + rename (the temp file is removed on error)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _gather_errors(err: str | None) -> list[str]:
    """Every rank's error (or ``None``) on every rank: all ranks take the same branch after a write."""
    if _world() == 1:
        return [err] if err else []
    out: list[Any] = [None] * _world()
    dist.all_gather_object(out, err)
    return [e for e in out if e]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: str | Path, kind: str) -> dict[str, Any]:
    """Hash every file under ``directory`` (except the manifest) into ``directory/manifest.json``.

    ``kind`` names what the directory is (``checkpoint``, ``model``, ``adapter``). Returns the
    manifest: ``{"kind", "version", "files": {relative posix path: {"size", "sha256"}}}``.
    """
    directory = Path(directory)
    files: dict[str, dict[str, Any]] = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MANIFEST_FILE:
            files[p.relative_to(directory).as_posix()] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    manifest = {"kind": kind, "version": 1, "files": files}
    atomic_write_text(directory / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")
    return manifest


@dataclass
class Verification:
    """Result of :func:`verify_dir`.

    Attributes:
        path: the directory checked.
        ok: usable (every file in the manifest present with its size and sha256; or, without a
            manifest, only when ``allow_unverified``).
        problem: the first problem found (``None`` when fully verified).
        verified: a manifest was found and every file matched it.
        files, size: number and total bytes of the files checked.
    """

    path: Path
    ok: bool
    problem: str | None
    verified: bool
    files: int = 0
    size: int = 0


def verify_dir(directory: str | Path, *, required: tuple[str, ...] = (), allow_unverified: bool = False
               ) -> Verification:
    """Check ``directory`` against its ``manifest.json``; stops at the first bad file.

    ``required``: files that must be listed (e.g. the state file). Without a manifest the result
    is ``ok`` only if ``allow_unverified`` and every ``required`` file exists.
    """
    directory = Path(directory)
    mf = directory / MANIFEST_FILE
    if not directory.is_dir():
        return Verification(directory, False, f"{directory}: not a directory", False)
    if not mf.is_file():
        missing = [r for r in required if not (directory / r).is_file()]
        if missing:
            return Verification(directory, False, f"{directory / missing[0]}: missing (and no {MANIFEST_FILE})", False)
        return Verification(directory, allow_unverified, f"{directory}: no {MANIFEST_FILE} (written by an older "
                            "mixtrain); its files cannot be verified", False)
    try:
        manifest = json.loads(mf.read_bytes().decode("utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not a mapping")
        entries = [(str(k), int(v["size"]), str(v["sha256"])) for k, v in files.items()]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        return Verification(directory, False, f"{mf}: unreadable manifest ({type(e).__name__}: {e})", False)
    listed = {k for k, _, _ in entries}
    for r in required:
        if r not in listed:
            return Verification(directory, False, f"{directory / r}: not listed in {MANIFEST_FILE}", False)
    total = 0
    root = directory.resolve()
    for rel, size, digest in entries:
        p = directory / rel
        if ".." in Path(rel).parts or not p.resolve().is_relative_to(root):
            return Verification(directory, False, f"{mf}: entry {rel!r} points outside the directory", False)
        if not p.is_file():
            return Verification(directory, False, f"{p}: missing", False, len(entries), total)
        got = p.stat().st_size
        if got != size:
            return Verification(directory, False, f"{p}: {got} bytes, the manifest says {size} (truncated or "
                                "overwritten)", False, len(entries), total)
        if _sha256(p) != digest:
            return Verification(directory, False, f"{p}: sha256 differs from the manifest (corrupt)", False,
                                len(entries), total)
        total += size
    return Verification(directory, True, None, True, len(entries), total)


def step_dirs(root: str | Path) -> list[tuple[int, Path]]:
    """Every ``step-N`` directory under ``root`` (complete or not) as ``(step, path)``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _PAT.match(p.name)) and p.is_dir())


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` (a state file is present) as ``(step, path)``, oldest first."""
    return [(s, p) for s, p in step_dirs(root) if (p / STATE_FILE).is_file()]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (``None`` if there is none); not verified,
    see :func:`find_resumable`."""
    cps = list_checkpoints(root)
    return cps[-1][1] if cps else None


def read_state(path: str | Path) -> dict[str, Any]:
    """The parsed ``mixtrain_state.json`` of checkpoint ``path``.

    Raises:
        CheckpointError: missing, not UTF-8, not JSON or not an object (the message names the file).
    """
    sf = Path(path) / STATE_FILE
    if not sf.is_file():
        raise CheckpointError(f"{Path(path)} is not a complete mixtrain checkpoint (no {STATE_FILE})")
    try:
        state = json.loads(sf.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{sf}: corrupt state file ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{sf}: corrupt state file (expected a JSON object with an integer 'step')")
    return state


def check_checkpoint(path: str | Path) -> Verification:
    """Verify checkpoint ``path``: its manifest (or, for an older checkpoint without one, that its
    state file parses)."""
    v = verify_dir(path, required=(STATE_FILE,), allow_unverified=True)
    if v.ok:
        try:
            read_state(path)
        except CheckpointError as e:
            return Verification(v.path, False, str(e), False, v.files, v.size)
    return v


def find_resumable(root: str | Path) -> tuple[Path | None, list[Verification]]:
    """The newest checkpoint under ``root`` that verifies, and the checks of the newer ones that
    did not (each logged as a warning naming its first bad file).

    Returns ``(None, [])`` when there is no checkpoint at all.

    Raises:
        CheckpointError: checkpoints exist but none verifies; the message lists each one tried.
    """
    tried: list[Verification] = []
    for _, p in reversed(step_dirs(root)):
        v = check_checkpoint(p)
        if v.ok:
            if not v.verified:
                log.warning("checkpoint %s: %s; resuming from it unverified", p, v.problem)
            return p, tried
        log.warning("checkpoint %s is unusable: %s; trying the previous one", p, v.problem)
        tried.append(v)
    if tried:
        lines = "\n".join(f"  {v.path.name}: {v.problem}" for v in tried)
        raise CheckpointError(
            f"no usable checkpoint under {root}; tried, newest first:\n{lines}\n"
            "remove the bad ones (or use train.resume=none / another output_dir) to start over"
        )
    return None, tried


def replace_dir(tmp: Path, final: Path) -> None:
    """Rename the complete directory ``tmp`` to ``final``; an existing ``final`` is moved aside
    first and removed after, so ``final`` is never half-written."""
    old = final.with_name(f".old-{final.name}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _describe(e: BaseException, default: Path) -> str:
    """``path: reason`` of a failed write. ``torch.save`` reports a full disk as a RuntimeError
    ("file write failed"), sometimes with the OSError as its context: use the OSError when there
    is one, else the message and the free space left."""
    seen = e
    while seen is not None and not isinstance(seen, OSError):
        seen = seen.__cause__ or seen.__context__
    if isinstance(seen, OSError):
        return f"{seen.filename or default}: {seen.strerror or seen}"
    try:
        free = f"; {shutil.disk_usage(default if default.exists() else default.parent).free} bytes free there"
    except OSError:
        free = ""
    return f"{default}: {str(e).strip().splitlines()[0][:300]}{free}"


def save_checkpoint(engine: Any, root: str | Path, step: int, state: dict[str, Any], *, rank: int,
                    keep: int = 2) -> Path:
    """Save collectively (every rank must call); returns the final directory.

    Raises:
        CheckpointError: a write failed (e.g. the disk is full); the partial directory is removed
            and the previous checkpoints are untouched. The message names the file and the reason.
    """
    from safetensors.torch import save_file

    root = Path(root)
    tmp = root / f".tmp-step-{step:08d}"
    final = root / f"step-{step:08d}"
    err: str | None = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            for p in root.glob(".tmp-step-*"):
                shutil.rmtree(p, ignore_errors=True)
        except OSError as e:
            err = _describe(e, root)
    _barrier()
    try:
        engine.save_checkpoint(str(tmp), tag="ds", save_latest=False)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(tmp / f"rng-rank{rank}.safetensors"))
    except (OSError, RuntimeError) as e:  # RuntimeError: torch.save's "file write failed"
        err = err or _describe(e, tmp)
    errors = _gather_errors(err)
    if not errors and rank == 0:
        try:
            atomic_write_text(tmp / STATE_FILE, json.dumps(state, allow_nan=True))
            write_manifest(tmp, "checkpoint")
            replace_dir(tmp, final)
        except OSError as e:
            err = _describe(e, tmp)
    errors = errors or _gather_errors(err)
    if errors:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        prev = [p.name for _, p in list_checkpoints(root)]
        raise CheckpointError(
            f"could not write the checkpoint of step {step}: {errors[0]}; its partial files were removed"
            + (f", the previous checkpoint(s) {', '.join(prev)} are intact" if prev else "")
        )
    if rank == 0:
        # only checkpoints up to this step count: a newer one (left by an earlier attempt, perhaps the
        # corrupt one resume fell back from) must not push the good older ones out
        for _, old in [c for c in list_checkpoints(root) if c[0] <= step][:-keep]:
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
    state = read_state(path)
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


def verify_output(output_dir: str | Path) -> list[tuple[str, Verification]]:
    """Check every checkpoint of a run directory and its exported ``model`` / ``adapter``.

    Returns ``(label, result)`` pairs, checkpoints oldest first, then the exports; a checkpoint
    save in progress (``.tmp-step-*``) is not listed.
    """
    out = Path(output_dir)
    res = [(f"checkpoints/{p.name}", check_checkpoint(p)) for _, p in step_dirs(out / "checkpoints")]
    for name in ("model", "adapter"):
        if (out / name).is_dir():
            res.append((name, verify_dir(out / name, allow_unverified=True)))
    return res
