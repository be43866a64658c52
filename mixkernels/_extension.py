"""Loads the compiled extension ``mixkernels._C`` after checking its build info.

``LOADED`` says whether it loaded; ``REASON`` says why not (shown by ``python -m mixkernels.info``
and in the error of an explicitly requested ``cxx`` backend). A build for another torch, CUDA or
C++ ABI is refused: loading it would crash or misbehave in ways far from the cause.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import torch

from . import env

logger = logging.getLogger("mixkernels")

_REBUILD = "rebuild it with `make setup` (or `pip install --no-build-isolation -e .` in this environment)"
BUILD_INFO_PATH = Path(__file__).with_name("_build_info.json")


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
                f"mixkernels._C was built for {what} {info.get(key)!r} but this process has {now[key]!r}: "
                f"{_REBUILD}"
            )
    return None


def _load() -> tuple[bool, str]:
    if env.disable_extension():
        return False, "disabled by MIXKERNELS_DISABLE_EXT=1"
    if importlib.util.find_spec("mixkernels._C") is None:
        return False, f"mixkernels._C is not built: {_REBUILD}"
    info = read_build_info()
    if info is None:
        return False, f"{BUILD_INFO_PATH.name} is missing or unreadable beside mixkernels._C: {_REBUILD}"
    problem = mismatch(info)
    if problem:
        return False, problem
    try:
        importlib.import_module("mixkernels._C")
    except ImportError as exc:  # e.g. undefined symbols after a torch upgrade
        return False, f"importing mixkernels._C failed ({exc}): {_REBUILD}"
    return True, ""


LOADED, REASON = _load()
if not LOADED and "MIXKERNELS_DISABLE_EXT" not in REASON:
    logger.warning("mixkernels: compiled kernels unavailable, using the PyTorch reference: %s", REASON)
WITH_CUDA: bool = bool(LOADED and (read_build_info() or {}).get("with_cuda"))


def has_kernel(qualname: str, dispatch_key: str) -> bool:
    """Whether ``_C`` registered a kernel for ``qualname`` (``mixkernels::op``) at ``dispatch_key``."""
    return LOADED and torch._C._dispatch_has_kernel_for_dispatch_key(qualname, dispatch_key)
