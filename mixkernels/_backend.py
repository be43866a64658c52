"""Backend selection: ``reference`` | ``cxx`` | ``triton`` | ``auto``.

``with mixkernels.backend(name):`` forces the backend of every op called inside; the default
comes from ``MIXKERNELS_BACKEND`` (``auto``). An explicitly requested backend that cannot run on
the inputs' device raises ``RuntimeError`` naming the op, the backend and the reason; ``auto``
takes the fastest available one (``OpInfo.auto_order``) and logs once when it falls back.

Availability is computed once per op when it is registered, so selection inside
``torch.compile`` is a dictionary lookup that traces without graph breaks. The current backend
is a module global (not thread-local) for the same reason.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Iterator

import torch

from . import _extension, env
from ._library import OPS

logger = logging.getLogger("mixkernels")

BACKENDS = ("reference", "cxx", "triton")
_DEVICE_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
_current: list[str] = [env.default_backend()]
# (op, device_type, backend) -> "" when available, else the reason it is not
_AVAILABILITY: dict[tuple[str, str, str], str] = {}
_logged: set[tuple[str, str]] = set()


def _triton_reason(device_type: str) -> str:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if device_type == "cpu" and not env.triton_interpret():
        return "Triton runs on CPU tensors only under its interpreter: set TRITON_INTERPRET=1 before importing triton"
    if device_type not in ("cpu", "cuda"):
        return f"Triton kernels are not built for device type {device_type!r}"
    return ""


def _cxx_reason(op: str, device_type: str) -> str:
    if not _extension.LOADED:
        return _extension.REASON
    key = _DEVICE_KEYS.get(device_type)
    if key is None or not _extension.has_kernel(f"mixkernels::{op}", key):
        if device_type == "cuda" and not _extension.WITH_CUDA:
            return "mixkernels._C was built without CUDA (torch CPU build or no nvcc at build time)"
        return f"mixkernels._C has no {device_type} kernel for this op"
    return ""


def refresh_availability(op: str) -> None:
    """(Re)compute which backends can serve ``op`` on CPU and CUDA; called at op registration."""
    info = OPS[op]
    for device_type in _DEVICE_KEYS:
        for name in BACKENDS:
            if name not in info.backends:
                reason = f"{op} has no {name} implementation"
            elif name == "cxx":
                reason = _cxx_reason(op, device_type)
            elif name == "triton":
                reason = _triton_reason(device_type)
            else:
                reason = ""
            _AVAILABILITY[(op, device_type, name)] = reason


def unavailable_reason(op: str, device_type: str, name: str) -> str:
    """Empty string when ``name`` can serve ``op`` on ``device_type``, else the reason."""
    return _AVAILABILITY.get((op, device_type, name), f"{name} does not support device type {device_type!r}")


def current() -> str:
    """The backend in force: one of ``auto``, ``reference``, ``cxx``, ``triton``."""
    return _current[-1]


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Force the implementation of every mixkernels op called inside the block.

    ``name``: ``"reference"`` (pure PyTorch), ``"cxx"`` (compiled C++/CUDA), ``"triton"`` or
    ``"auto"`` (fastest available; never raises for unavailability).
    """
    if name not in ("auto", *BACKENDS):
        raise ValueError(f"backend name {name!r} is not one of auto, {', '.join(BACKENDS)}")
    _current.append(name)
    try:
        yield
    finally:
        _current.pop()


def select(op: str, device: torch.device) -> str:
    """The backend that will run ``op`` for inputs on ``device``."""
    requested = _current[-1]
    device_type = device.type
    if requested != "auto":
        reason = unavailable_reason(op, device_type, requested)
        if reason:
            raise RuntimeError(
                f"mixkernels.{op}: backend {requested!r} is unavailable on {device_type}: {reason}"
            )
        return requested
    order = OPS[op].auto_order.get(device_type, ("reference",))
    for name in order:
        if not unavailable_reason(op, device_type, name):
            if name != order[0] and not torch.compiler.is_compiling() and (op, device_type) not in _logged:
                _logged.add((op, device_type))
                logger.info(
                    "mixkernels.%s on %s: using %s (%s unavailable: %s)",
                    op, device_type, name, order[0], unavailable_reason(op, device_type, order[0]),
                )
            return name
    return "reference"
