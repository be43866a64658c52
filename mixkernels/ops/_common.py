"""Helpers shared by the op modules: argument checks with messages that name the argument."""

from __future__ import annotations

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
