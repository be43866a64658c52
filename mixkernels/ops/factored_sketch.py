"""factored_sketch: per-example projected gradients of a linear layer, LoGra's factored trick.

    S = mixkernels.factored_sketch(x, g, offsets, p_in, p_out)

    x        [N, d_in]   layer inputs of N tokens (float32 / float16 / bfloat16);
                         already projected [N, k_in] when p_in is None
    g        [N, d_out]  gradients of the layer output for the same tokens;
                         already projected [N, k_out] when p_out is None
    offsets  [B + 1]     int64, non-decreasing: example b owns tokens offsets[b] .. offsets[b+1]-1
    p_in     [d_in, k_in]   / p_out [d_out, k_out]   projections (any float dtype)
    S        float32 [B, k_out, k_in],  S[b] = sum_{t in b} (g_t p_out)^T (x_t p_in)
                                              = p_out^T (sum_t g_t x_t^T) p_in = p_out^T G_b p_in

``G_b`` (the per-example weight gradient, ``[d_out, d_in]``) is never formed. Tokens outside every
segment are ignored; padding tokens contribute nothing as their ``g`` is zero. fp32 accumulation.
Differentiable w.r.t. ``x`` and ``g`` (not the projections).

Backends: ``reference`` (einsum + index_add), ``cxx`` (csrc/factored_sketch.cpp,
csrc/cuda/factored_sketch_cuda.cu), ``triton`` (mixkernels/triton/factored_sketch.py).
"""

from __future__ import annotations

import torch

from .. import _backend, _extension
from .._library import lib
from ..reference import factored_sketch as _reference
from ._common import FLOAT_DTYPES, check_dtype, check_same_device, check_tensor

OP = "factored_sketch"


def _check(x, g, offsets, p_in, p_out) -> None:
    for name, t in (("x", x), ("g", g), ("offsets", offsets)):
        check_tensor(OP, name, t)
    for name, t in (("x", x), ("g", g)):
        check_dtype(OP, name, t, FLOAT_DTYPES)
        if t.dim() != 2:
            raise ValueError(f"mixkernels.{OP}: {name} must be 2-D [N, features], got shape {tuple(t.shape)}")
    if g.shape[0] != x.shape[0]:
        raise ValueError(f"mixkernels.{OP}: g must have N = x.shape[0] = {x.shape[0]} rows, got {g.shape[0]}")
    check_same_device(OP, "x", x, "g", g)
    if offsets.dtype != torch.int64 or offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(
            f"mixkernels.{OP}: offsets must be int64 [B + 1] with B >= 0, "
            f"got {str(offsets.dtype).removeprefix('torch.')} {tuple(offsets.shape)}"
        )
    check_same_device(OP, "x", x, "offsets", offsets)
    for name, p, t, tname in (("p_in", p_in, x, "x"), ("p_out", p_out, g, "g")):
        if p is None:
            continue
        check_tensor(OP, name, p)
        check_dtype(OP, name, p, FLOAT_DTYPES)
        if p.dim() != 2 or p.shape[0] != t.shape[1]:
            raise ValueError(
                f"mixkernels.{OP}: {name} must be [{tname}.shape[1] = {t.shape[1]}, k], got shape {tuple(p.shape)}"
            )
        check_same_device(OP, "x", x, name, p)
    if not torch.compiler.is_compiling() and offsets.numel():
        # CUDA offsets are checked on the host too: B + 1 integers (one small copy), where a bad
        # offset would make the kernel read outside x / g
        offsets = offsets if offsets.device.type == "cpu" else offsets.cpu()
        bad = (offsets[1:] < offsets[:-1]).nonzero()
        if bad.numel():
            b = int(bad[0, 0])
            raise ValueError(
                f"mixkernels.{OP}: offsets must be non-decreasing, got offsets[{b}] = {int(offsets[b])} > "
                f"offsets[{b + 1}] = {int(offsets[b + 1])}"
            )
        lo, hi = int(offsets[0]), int(offsets[-1])
        if lo < 0 or hi > x.shape[0]:
            raise ValueError(
                f"mixkernels.{OP}: offsets must lie in [0, N = {x.shape[0]}], got first {lo} and last {hi}"
            )


def factored_sketch(
    x: torch.Tensor,
    g: torch.Tensor,
    offsets: torch.Tensor,
    p_in: torch.Tensor | None = None,
    p_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-segment sums of projected outer products, float32 ``[B, k_out, k_in]`` (see module doc)."""
    _check(x, g, offsets, p_in, p_out)
    chosen = _backend.select(OP, x.device)
    if chosen == "cxx":
        return torch.ops.mixkernels.factored_sketch(x, g, offsets, p_in, p_out)
    if chosen == "triton":
        return torch.ops.mixkernels.factored_sketch_triton(x, g, offsets, p_in, p_out)
    return _reference.factored_sketch(x, g, offsets, p_in, p_out)


# ---- registrations -------------------------------------------------------------------------


def _triton_impl(x, g, offsets, p_in=None, p_out=None):
    from ..triton import factored_sketch as triton_kernels

    return triton_kernels.factored_sketch(x, g, offsets, p_in, p_out)


def _fake(x, g, offsets, p_in=None, p_out=None):
    k_in = x.shape[1] if p_in is None else p_in.shape[1]
    k_out = g.shape[1] if p_out is None else p_out.shape[1]
    return x.new_empty((offsets.shape[0] - 1, k_out, k_in), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, g, offsets, p_in, p_out = inputs
    ctx.save_for_backward(x, g, offsets, p_in, p_out)


def _backward(ctx, grad_s):
    # dS[b] = dgp_t^T xp_t + gp_t^T dxp_t  =>  dxp_t = dS[b]^T gp_t,  dgp_t = dS[b] xp_t
    x, g, offsets, p_in, p_out = ctx.saved_tensors
    xp = x.float() if p_in is None else x.float() @ p_in.float()
    gp = g.float() if p_out is None else g.float() @ p_out.float()
    ids, valid = _reference.segment_ids_from_offsets(offsets, x.shape[0])
    ds = grad_s.float().index_select(0, ids) * valid[:, None, None].float()  # [N, k_out, k_in]
    dxp = torch.einsum("noi,no->ni", ds, gp)
    dgp = torch.einsum("noi,ni->no", ds, xp)
    dx = dxp if p_in is None else dxp @ p_in.float().T
    dg = dgp if p_out is None else dgp @ p_out.float().T
    return dx.to(x.dtype), dg.to(g.dtype), None, None, None


lib.impl(f"{OP}_triton", _triton_impl, "CPU")
lib.impl(f"{OP}_triton", _triton_impl, "CUDA")
if not _extension.has_kernel(f"mixkernels::{OP}", "CPU"):
    lib.impl(OP, _reference.factored_sketch, "CPU")
    lib.impl(OP, _reference.factored_sketch, "CUDA")
for _name in (OP, f"{OP}_triton"):
    torch.library.register_fake(f"mixkernels::{_name}", _fake, lib=lib)
    torch.library.register_autograd(f"mixkernels::{_name}", _backward, setup_context=_setup_context, lib=lib)
_backend.refresh_availability(OP)


def selftest_cases() -> list[tuple[str, tuple, dict]]:
    """Small random inputs for ``python -m mixkernels.info --selftest``: (case, args, kwargs)."""
    x, g = torch.randn(29, 37), torch.randn(29, 23)
    p_in, p_out = torch.randn(37, 16), torch.randn(23, 8)
    offsets = torch.tensor([0, 5, 5, 17, 29])
    return [
        ("fp32 fused", (x, g, offsets, p_in, p_out), {}),
        ("bf16 fused", (x.bfloat16(), g.bfloat16(), offsets, p_in, p_out), {}),
        ("pre-projected x", (x @ p_in, g, offsets, None, p_out), {}),
        ("partial cover", (x, g, torch.tensor([3, 9, 20]), p_in, p_out), {}),
        ("empty", (x[:0], g[:0], torch.tensor([0, 0]), p_in, p_out), {}),
    ]
