"""Loads the compiled extension ``mixkernels._C`` after checking its build info.

``LOADED`` says whether it loaded; ``REASON`` says why not (shown by ``python -m mixkernels.info``
and in the error of an explicitly requested ``cxx`` backend). A build for another torch, CUDA or
C++ ABI is refused: loading it would crash or misbehave in ways far from the cause (an undefined
symbol at import at best, wrong results at worst). In that case, and when importing ``_C`` fails,
``import mixkernels`` emits one :class:`ExtensionWarning` naming both versions and the command that
rebuilds, and every op runs on the reference (CPU) or Triton (CUDA) backend instead.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from . import env

logger = logging.getLogger("mixkernels")

PACKAGE_DIR = Path(__file__).resolve().parent
BUILD_INFO_PATH = PACKAGE_DIR / "_build_info.json"


class ExtensionWarning(RuntimeWarning):
    """``mixkernels._C`` is present but cannot be used here; the ops fall back to other backends."""


def rebuild_command() -> str:
    """How to rebuild ``_C`` for the torch of this process: ``make setup`` in a source checkout
    (an editable install), else a reinstall from source against the installed torch."""
    if (PACKAGE_DIR.parent / "setup.py").is_file() and (PACKAGE_DIR.parent / "csrc").is_dir():
        return (
            f"rebuild it with `make setup` in {PACKAGE_DIR.parent} "
            f"(or `{sys.executable} -m pip install --no-build-isolation -e .` there)"
        )
    return (
        f"rebuild it against this torch with `{sys.executable} -m pip install --no-build-isolation "
        "--no-deps --force-reinstall <mixkernels sdist or source folder>` (docs/install.md)"
    )


def read_build_info() -> dict[str, Any] | None:
    try:
        return json.loads(BUILD_INFO_PATH.read_text())
    except (OSError, ValueError):
        return None


def current_build_info() -> dict[str, Any]:
    return {
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
    }


def mismatch(info: dict[str, Any]) -> str | None:
    """Why a build with ``info`` cannot be loaded into this process, or ``None``."""
    now = current_build_info()
    for key, what in (("torch_version", "torch"), ("cuda_version", "torch CUDA"), ("cxx11_abi", "C++11 ABI")):
        if info.get(key) != now[key]:
            return (
                f"mixkernels._C was built for {what} {info.get(key)} but this process runs {what} {now[key]}: "
                f"{rebuild_command()}"
            )
    return None


def _load() -> tuple[bool, str, bool]:
    """(loaded, reason when not, whether the reason deserves a warning: a build that is there but
    unusable, as opposed to one that was never made or was disabled on purpose)."""
    if env.disable_extension():
        return False, "disabled by MIXKERNELS_DISABLE_EXT=1", False
    if importlib.util.find_spec("mixkernels._C") is None:
        return False, f"mixkernels._C is not built: {rebuild_command()}", False
    info = read_build_info()
    if info is None:
        missing = f"{BUILD_INFO_PATH.name} is missing or unreadable beside mixkernels._C"
        return False, f"{missing}: {rebuild_command()}", True
    problem = mismatch(info)
    if problem:
        return False, problem, True
    try:
        importlib.import_module("mixkernels._C")
    except ImportError as exc:  # e.g. undefined symbols, or a file that is not a loadable library
        return False, f"importing mixkernels._C failed ({exc}): {rebuild_command()}", True
    return True, "", False


_FALLBACK = "the ops run on the reference (CPU) / Triton (CUDA) backends instead"

LOADED, REASON, _WARN = _load()
if _WARN:
    warnings.warn(f"{REASON}; until then {_FALLBACK}", ExtensionWarning, stacklevel=2)
elif not LOADED and "MIXKERNELS_DISABLE_EXT" not in REASON:
    logger.warning("mixkernels: compiled kernels unavailable, using the PyTorch reference: %s", REASON)
WITH_CUDA: bool = bool(LOADED and (read_build_info() or {}).get("with_cuda"))


def has_kernel(qualname: str, dispatch_key: str) -> bool:
    """Whether ``_C`` registered a kernel for ``qualname`` (``mixkernels::op``) at ``dispatch_key``."""
    return LOADED and torch._C._dispatch_has_kernel_for_dispatch_key(qualname, dispatch_key)
