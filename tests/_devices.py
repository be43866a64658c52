"""Which devices and backends a test runs on, in one place.

Every op test is parametrised over ``(device, backend)`` pairs from :func:`device_backends`:

* ``cpu``: the backends available on CPU in this process (``reference``, ``cxx``); the Triton
  interpreter runs in its own process (``tests/triton``, marker ``triton``).
* ``cuda``: ``reference``, ``cxx`` (the CUDA kernels) and ``triton`` (compiled for real). These
  ids carry the ``cuda`` marker and are always collected; without a GPU they are skipped with the
  reason, so ``pytest --collect-only`` lists them and the CPU test count does not depend on the
  machine. ``MIXKERNELS_TEST_REQUIRE_CUDA=1`` (set by ``bench/gpu_check.sh``) turns those skips
  into failures: on a GPU machine a missing backend is a bug, not a reason to skip.

``MIXKERNELS_TEST_FAKE_CUDA=1`` is a check of the test code itself on a machine without a GPU: the
``cuda`` ids run with the device ``cpu`` (Triton ids skipped, or run by the interpreter when
``TRITON_INTERPRET=1`` is set too), so their bodies execute end to end.
It proves nothing about the kernels; tests that need a real device (subprocesses on ``cuda``,
messages naming ``cuda:0``) fail under it by design.

Tests build their inputs and oracles on CPU (same seeds on every device) and call the op through
:func:`on`, which moves tensor arguments to the device, keeping their strides (non-contiguous
inputs stay non-contiguous) and their autograd link to the CPU leaves, and moves results back.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import torch

from mixkernels import _backend

HAS_CUDA = torch.cuda.is_available()
NO_CUDA = "no CUDA device: torch.cuda.is_available() is False"
REQUIRE_CUDA = os.environ.get("MIXKERNELS_TEST_REQUIRE_CUDA", "").lower() in ("1", "true", "yes", "on")
# Triton on CUDA is compiled; under TRITON_INTERPRET=1 this process is the CPU interpreter run.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
FAKE_CUDA = os.environ.get("MIXKERNELS_TEST_FAKE_CUDA", "").lower() in ("1", "true", "yes", "on")
CUDA = "cpu" if FAKE_CUDA else "cuda"  # the device the ``cuda`` ids run on


def cuda_marks() -> list[pytest.MarkDecorator]:
    """``cuda`` marker plus, without a usable GPU, a skip with the reason."""
    marks = [pytest.mark.cuda]
    if FAKE_CUDA:
        return marks
    if not HAS_CUDA and not REQUIRE_CUDA:
        marks.append(pytest.mark.skip(reason=NO_CUDA))
    elif INTERPRETED:
        marks.append(pytest.mark.skip(reason="cuda tests run in a process without TRITON_INTERPRET=1"))
    return marks


def devices() -> list[Any]:
    """``cpu`` and ``cuda`` as pytest params (``cuda`` marked and skipped without a GPU)."""
    return [pytest.param("cpu", id="cpu"), pytest.param(CUDA, id="cuda", marks=cuda_marks())]


DEVICES = devices()


def device_backends(op: str, backends: Iterable[str] = ("reference", "cxx", "triton"), *,
                    cpu: bool = True, cuda: bool = True) -> list[Any]:
    """``(device, backend)`` params with ids ``cpu-reference``, ``cuda-triton``, ...

    On CPU only the backends available in this process are listed (as before this helper). On
    CUDA every backend of ``op`` is listed; one unavailable on a GPU machine is skipped with the
    reason (or fails under ``MIXKERNELS_TEST_REQUIRE_CUDA=1``).
    """
    params = []
    backends = tuple(backends)
    if cpu:
        for name in backends:
            if name != "triton" and not _backend.unavailable_reason(op, "cpu", name):
                params.append(pytest.param("cpu", name, id=f"cpu-{name}"))
    if cuda:
        for name in backends:
            marks = cuda_marks()
            if HAS_CUDA and not REQUIRE_CUDA:
                reason = _backend.unavailable_reason(op, "cuda", name)
                if reason:
                    marks.append(pytest.mark.skip(reason=f"{name} on cuda: {reason}"))
            if FAKE_CUDA and name == "triton" and not INTERPRETED:
                marks.append(pytest.mark.skip(reason="MIXKERNELS_TEST_FAKE_CUDA: Triton needs a GPU or the interpreter"))
            params.append(pytest.param(CUDA, name, id=f"cuda-{name}", marks=marks))
    return params


def move(t: torch.Tensor, device: str | torch.device, *, force_copy: bool = FAKE_CUDA) -> torch.Tensor:
    """``t`` on ``device`` with the same shape and strides, differentiable back to ``t``.

    ``Tensor.to`` makes gapped views (``x[:, ::2]``) contiguous; the kernels' stride handling is
    what the non-contiguous tests exercise, so those are rebuilt as the same view of a buffer.
    """
    device = torch.device(device)
    if t.device == device and not force_copy:
        return t
    broadcast = [d for d, (size, stride) in enumerate(zip(t.shape, t.stride())) if stride == 0 and size > 1]
    if broadcast:  # an expanded view: move one slice, expand again on the device
        compact = t
        for d in broadcast:
            compact = compact.narrow(d, 0, 1)
        return move(compact, device, force_copy=force_copy).expand(t.shape)
    if t.is_contiguous() or t.numel() == 0 or _dense(t):
        # preserve_format keeps the strides of dense layouts (transposes); force_copy copies on the
        # same device too (FAKE_CUDA: the copies' autograd path is what the test exercises)
        return t.to(device, copy=True)
    return same_strides(t, device)


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t`` covers its storage span without gaps or overlaps (a permuted contiguous layout)."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def same_strides(t: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """A copy of ``t`` on ``device`` with exactly ``t``'s shape and strides (a view of a buffer
    spanning them), differentiable back to ``t``."""
    span = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    buffer = torch.zeros(span, dtype=t.dtype, device=device)
    return buffer.as_strided(t.shape, t.stride()).copy_(t)


def tree_to(obj: Any, device: str | torch.device) -> Any:
    """Every tensor inside ``obj`` (tensors, lists, tuples, dicts, dataclasses) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return move(obj, device)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: tree_to(getattr(obj, f.name), device)
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(tree_to(x, device) for x in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(tree_to(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: tree_to(v, device) for k, v in obj.items()}
    return obj


def on(device: str | torch.device, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run on ``device``: tensor arguments moved there, results moved back to CPU.

    Both moves are differentiable, so gradients of CPU leaves and backward calls on the CPU
    results go through the device kernels. On ``cpu`` this is ``fn`` itself.
    """
    if torch.device(device).type == "cpu" and not FAKE_CUDA:
        return fn

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        out = fn(*tree_to(args, device), **tree_to(kwargs, device))
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()  # a device-side assert surfaces in the test that caused it
        return tree_to(out, "cpu")

    return wrapped
