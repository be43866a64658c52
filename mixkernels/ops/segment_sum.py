"""segment_sum: per-segment sums and counts of rows, the building block of per-domain statistics.

    sums, counts = mixkernels.segment_sum(values, segment_ids, num_segments, mask=None)

    values       [N] or [N, C], float32 / float16 / bfloat16
    segment_ids  [N], int32 or int64, each in [0, num_segments)
    mask         optional [N] bool; False rows are skipped
    sums         float32 [num_segments] or [num_segments, C]  (fp32 accumulation)
    counts       int64 [num_segments]: unmasked rows per segment

Differentiable w.r.t. ``values`` (gradient of ``sums``: d values[i] = d sums[ids[i]] for counted
rows, 0 for masked rows). CPU results are bitwise deterministic. On CUDA an out-of-range id
raises through a device-side assert at the next synchronisation (no host sync is added), and
float atomics make the last bits vary run to run.

Backends: ``reference`` (index_add + bincount), ``cxx`` (csrc/segment_sum.cpp,
csrc/cuda/segment_sum_cuda.cu), ``triton`` (mixkernels/triton/segment_sum.py).
"""

from __future__ import annotations

import torch

from .. import _backend, _extension
from .._library import lib
from ..reference import segment_sum as _reference
from ._common import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_dtype,
    check_ids_in_range,
    check_same_device,
    check_tensor,
)

OP = "segment_sum"


def _check(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int, mask: torch.Tensor | None) -> None:
    check_tensor(OP, "values", values)
    check_tensor(OP, "segment_ids", segment_ids)
    if values.dim() not in (1, 2):
        raise ValueError(f"mixkernels.{OP}: values must be [N] or [N, C], got shape {tuple(values.shape)}")
    check_dtype(OP, "values", values, FLOAT_DTYPES)
    check_dtype(OP, "segment_ids", segment_ids, INDEX_DTYPES)
    if segment_ids.dim() != 1 or segment_ids.shape[0] != values.shape[0]:
        raise ValueError(
            f"mixkernels.{OP}: segment_ids must be [N] with N = values.shape[0] = {values.shape[0]}, "
            f"got shape {tuple(segment_ids.shape)}"
        )
    check_same_device(OP, "values", values, "segment_ids", segment_ids)
    if not isinstance(num_segments, int) or isinstance(num_segments, bool) or num_segments < 0:
        raise ValueError(f"mixkernels.{OP}: num_segments must be an int >= 0, got {num_segments!r}")
    if mask is not None:
        check_tensor(OP, "mask", mask)
        if mask.dtype != torch.bool or mask.dim() != 1 or mask.shape[0] != values.shape[0]:
            raise ValueError(
                f"mixkernels.{OP}: mask must be bool [N] with N = {values.shape[0]}, "
                f"got {str(mask.dtype).removeprefix('torch.')} {tuple(mask.shape)}"
            )
        check_same_device(OP, "values", values, "mask", mask)


def segment_sum(
    values: torch.Tensor,
    segment_ids: torch.Tensor,
    num_segments: int,
    *,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-segment fp32 sums of ``values`` rows and int64 counts (see the module docstring)."""
    _check(values, segment_ids, num_segments, mask)
    chosen = _backend.select(OP, values.device)
    if chosen == "cxx":
        return torch.ops.mixkernels.segment_sum(values, segment_ids, num_segments, mask)
    if chosen == "triton":
        return torch.ops.mixkernels.segment_sum_triton(values, segment_ids, num_segments, mask)
    return _reference.segment_sum(values, segment_ids, num_segments, mask)


# ---- registrations -------------------------------------------------------------------------


def _triton_impl(values, segment_ids, num_segments, mask=None):
    from ..triton import segment_sum as triton_kernels

    check_ids_in_range(OP, "segment_ids", segment_ids, num_segments, mask)
    return triton_kernels.segment_sum(values, segment_ids, num_segments, mask)


def _fake(values, segment_ids, num_segments, mask=None):
    sums = values.new_empty((num_segments, *values.shape[1:]), dtype=torch.float32)
    return sums, values.new_empty((num_segments,), dtype=torch.int64)


def _setup_context(ctx, inputs, output):
    values, segment_ids, _, mask = inputs
    ctx.save_for_backward(segment_ids, mask)
    ctx.values_dtype = values.dtype


def _backward(ctx, grad_sums, _grad_counts):
    segment_ids, mask = ctx.saved_tensors
    if grad_sums is None:
        return None, None, None, None
    grad = grad_sums.index_select(0, segment_ids.long())
    if mask is not None:
        grad = grad * mask.reshape(-1, *([1] * (grad.dim() - 1))).to(grad.dtype)
    return grad.to(ctx.values_dtype), None, None, None


lib.impl(f"{OP}_triton", _triton_impl, "CPU")
lib.impl(f"{OP}_triton", _triton_impl, "CUDA")
if not _extension.has_kernel(f"mixkernels::{OP}", "CPU"):
    # Without _C the cxx op still exists and computes, through the reference.
    lib.impl(OP, _reference.segment_sum, "CPU")
    lib.impl(OP, _reference.segment_sum, "CUDA")
for _name in (OP, f"{OP}_triton"):
    torch.library.register_fake(f"mixkernels::{_name}", _fake, lib=lib)
    torch.library.register_autograd(f"mixkernels::{_name}", _backward, setup_context=_setup_context, lib=lib)
_backend.refresh_availability(OP)


def selftest_cases() -> list[tuple[str, tuple, dict]]:
    """Small random inputs for ``python -m mixkernels.info --selftest``: (case, args, kwargs)."""
    values = torch.randn(37, 5)
    ids = torch.randint(0, 7, (37,))
    mask = torch.rand(37) > 0.3
    return [
        ("1d fp32 int64", (values[:, 0], ids, 7), {}),
        ("2d fp32 int32 mask", (values, ids.int(), 7), {"mask": mask}),
        ("2d fp16", (values.half(), ids, 7), {}),
        ("empty", (values[:0], ids[:0], 3), {}),
    ]
