"""Helpers shared by the op modules: argument checks with messages that name the argument, and
the registration of an op that has a separate backward op."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_dtype(op: str, name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(f"mixkernels.{op}: {name} must be one of {names}, got {str(t.dtype).removeprefix('torch.')}")


def check_same_device(op: str, a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    if a.device != b.device:
        raise ValueError(
            f"mixkernels.{op}: {a_name} is on {a.device} but {b_name} is on {b.device}; expected the same device"
        )


def check_tensor(op: str, name: str, t: object) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"mixkernels.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")


def check_ids_in_range(op: str, name: str, ids: torch.Tensor, upper: int, mask: torch.Tensor | None = None) -> None:
    """Raise ``ValueError`` naming the first id outside ``[0, upper)``.

    On CPU this inspects the values (a cheap reduction). On CUDA it adds a device-side assert
    instead of a host synchronisation.
    """
    if ids.numel() == 0 or torch.compiler.is_compiling():
        return
    bad = (ids < 0) | (ids >= upper)
    if mask is not None:
        bad = bad & mask
    if ids.device.type == "cuda":
        torch._assert_async(~bad.any(), f"mixkernels.{op}: {name} has a value outside [0, {upper})")
        return
    if bool(bad.any()):
        position = int(bad.flatten().nonzero()[0, 0])
        value = int(ids.flatten()[position])
        index = list(torch.unravel_index(torch.tensor(position), ids.shape)) if ids.dim() > 1 else [position]
        where = ", ".join(str(int(i)) for i in index)
        raise ValueError(f"mixkernels.{op}: {name}[{where}] = {value} is out of range [0, {upper})")


def register_with_backward(
    lib: torch.library.Library,
    op: str,
    *,
    reference: Callable[..., Any],
    reference_backward: Callable[..., Any],
    triton: Callable[[], tuple[Callable[..., Any], Callable[..., Any]]],
    fake: Callable[..., Any],
    fake_backward: Callable[..., Any],
    make_backward: Callable[[Any], Callable[..., Any]],
    setup_context: Callable[..., Any],
) -> None:
    """Register ``op`` / ``op_backward`` (C++ kernels, or the reference when ``_C`` lacks them) and
    ``op_triton`` / ``op_backward_triton`` (``triton()`` imports the kernel module lazily and returns
    its forward and backward): fake kernels for all four, autograd for the two forwards."""
    from .. import _extension

    def triton_forward(*args):
        return triton()[0](*args)

    def triton_backward(*args):
        return triton()[1](*args)

    for dev in ("CPU", "CUDA"):
        lib.impl(f"{op}_triton", triton_forward, dev)
        lib.impl(f"{op}_backward_triton", triton_backward, dev)
    if not _extension.has_kernel(f"mixkernels::{op}", "CPU"):
        # Without _C the cxx ops still exist and compute, through the reference.
        for dev in ("CPU", "CUDA"):
            lib.impl(op, reference, dev)
            lib.impl(f"{op}_backward", reference_backward, dev)
    ops = torch.ops.mixkernels
    for name, backward in ((op, getattr(ops, f"{op}_backward")), (f"{op}_triton", getattr(ops, f"{op}_backward_triton"))):
        torch.library.register_fake(f"mixkernels::{name}", fake, lib=lib)
        torch.library.register_autograd(f"mixkernels::{name}", make_backward(backward), setup_context=setup_context,
                                        lib=lib)
    for name in (f"{op}_backward", f"{op}_backward_triton"):
        torch.library.register_fake(f"mixkernels::{name}", fake_backward, lib=lib)
