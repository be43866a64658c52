"""Simulated full disk for tests: writes to paths containing ``marker`` raise ``OSError(ENOSPC)``
once ``budget`` bytes have been written to such paths (the failing write lands partially, as on
a real disk that fills up mid-file).

Covers the three ways mixtrain writes files: ``open`` (JSON), ``torch.save`` (DeepSpeed's
checkpoint files) and safetensors' ``save_file`` (RNG state, HF ``save_pretrained``).
``install(marker, budget)`` patches them in this process;
``python tests/mixtrain/_diskfull.py MARKER BUDGET train CONFIG ...`` runs the CLI with them.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import sys
from typing import Any

_state = {"left": 0, "marker": None, "hits": []}


class _Full(io.RawIOBase):
    def __init__(self, path: str, f: Any) -> None:
        self.path, self.f = path, f

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b) if not isinstance(b, str) else b.encode()
        if _state["left"] < len(data):
            n = max(0, _state["left"])
            self.f.write(data[:n] if not isinstance(b, str) else b[:n])
            self.f.flush()
            _state["left"] = 0
            _state["hits"].append(self.path)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)
        _state["left"] -= len(data)
        return self.f.write(b)

    def flush(self) -> None:
        if not self.f.closed:
            self.f.flush()

    def fileno(self) -> int:
        return self.f.fileno()

    def close(self) -> None:
        super().close()
        self.f.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)


def _hit(path: Any) -> bool:
    return isinstance(path, (str, os.PathLike)) and _state["marker"] in os.fspath(path)


def install(marker: str, budget: int) -> Any:
    """Patch ``open``, ``torch.save`` and safetensors ``save_file`` (also where transformers
    imported it) for paths containing ``marker``; returns a function that undoes the patches."""
    import safetensors.torch
    import torch

    _state.update(left=int(budget), marker=marker)
    real_open = builtins.open

    def fake_open(file: Any, mode: str = "r", *a: Any, **k: Any) -> Any:
        f = real_open(file, mode, *a, **k)
        if _hit(file) and any(c in mode for c in "wax"):
            return _Full(os.fspath(file), f)
        return f

    builtins.open = fake_open
    real_save = torch.save

    def fake_save(obj: Any, f: Any, *a: Any, **k: Any) -> Any:
        if _hit(f):
            with fake_open(f, "wb") as fh:
                return real_save(obj, fh, *a, **k)
        return real_save(obj, f, *a, **k)

    torch.save = fake_save
    real_bytes = safetensors.torch.save
    real_file = safetensors.torch.save_file

    def fake_save_file(tensors: Any, filename: Any, metadata: Any = None) -> None:
        if not _hit(filename):
            return real_file(tensors, filename, metadata=metadata)
        data = real_bytes(tensors, metadata=metadata)
        with fake_open(filename, "wb") as fh:
            fh.write(data)
        return None

    safetensors.torch.save_file = fake_save_file
    patched = [m for m in list(sys.modules.values()) if getattr(m, "__name__", "").startswith("transformers")
               and getattr(m, "safe_save_file", None) is real_file]
    for mod in patched:
        mod.safe_save_file = fake_save_file

    def undo() -> None:
        builtins.open, torch.save, safetensors.torch.save_file = real_open, real_save, real_file
        for mod in patched:
            mod.safe_save_file = real_file
        _state.update(left=0, marker=None, hits=[])

    return undo


def hits() -> list[str]:
    """Paths whose write raised ENOSPC."""
    return list(_state["hits"])


if __name__ == "__main__":  # python _diskfull.py MARKER BUDGET <mixtrain CLI arguments>
    import transformers.modeling_utils  # noqa: F401  (imported first: patched where it bound save_file)

    install(sys.argv[1], int(sys.argv[2]))
    from mixtrain.__main__ import main

    sys.exit(main(sys.argv[3:]))
