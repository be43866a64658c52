"""project / lift / projection_matrix: random projections generated on the fly from a seed.

    R = mixkernels.projection_matrix(in_dim, out_dim, seed=s, kind="rademacher", nnz=4)   # [in_dim, out_dim]
    y = mixkernels.project(x, out_dim, seed=s, kind=..., nnz=4, row_offset=0)            # [..., out_dim]
      == x @ projection_matrix(row_offset + in_dim, out_dim, ...)[row_offset:]
    x = mixkernels.lift(y, in_dim, seed=s, kind=..., nnz=4, row_offset=0)                # [..., in_dim]
      == y @ projection_matrix(row_offset + in_dim, out_dim, ...)[row_offset:].T

Entry ``R[i, j]`` is a pure function of ``(seed, kind, nnz, out_dim, i, j)`` (a counter-based
integer hash; see ``mixkernels/reference/project.py`` for the exact definition), identical on
every backend and device, so no backend ever stores ``R``: kernels regenerate it tile by tile.
Kinds: ``rademacher`` (+-1/sqrt(out_dim)), ``gaussian`` (N(0, 1/out_dim)), ``sjlt`` (``nnz``
non-zeros +-1/sqrt(nnz) per row, one per column block).

dtypes: ``x``/``y`` float32, float16 or bfloat16; the result is always float32 (fp32
accumulation). ``project`` is differentiable w.r.t. ``x`` (its gradient is ``lift``) and ``lift``
w.r.t. ``y`` (its gradient is ``project``); gradients come back in the input's dtype.

Backends (one OpInfo, ``project``, selects for both ops): ``reference`` (materialised R blocks +
matmul), ``cxx`` (csrc/project.cpp, csrc/cuda/project_cuda.cu), ``triton``
(mixkernels/triton/project.py).
"""

from __future__ import annotations

import math

import torch

from .. import _backend, _extension
from .._library import lib
from ..reference import project as _reference
from ._common import FLOAT_DTYPES, check_dtype, check_tensor

OP = "project"
KINDS = _reference.KINDS
_INT63 = (1 << 63) - 1


def _check_int(op: str, name: str, value: object, lo: int, hi: int = _INT63) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        bound = f"in [{lo}, {hi}]" if hi != _INT63 else f">= {lo}"
        raise ValueError(f"mixkernels.{op}: {name} must be an int {bound}, got {value!r}")


def _check_common(op: str, out_dim: int, seed: int, kind: str, nnz: int, row_offset: int) -> None:
    _check_int(op, "out_dim", out_dim, 1)
    _check_int(op, "seed", seed, 0)
    if kind not in KINDS:
        raise ValueError(f"mixkernels.{op}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    _check_int(op, "nnz", nnz, 1)
    if kind == "sjlt" and nnz > out_dim:
        raise ValueError(f"mixkernels.{op}: nnz must be <= out_dim = {out_dim} for kind 'sjlt', got {nnz}")
    _check_int(op, "row_offset", row_offset, 0)


def projection_matrix(
    in_dim: int,
    out_dim: int,
    *,
    seed: int,
    kind: str = "rademacher",
    nnz: int = 4,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Materialise ``R`` ``[in_dim, out_dim]`` (for tests and small cases; ``project`` never does).

    Rows of a larger ``in_dim`` extend the smaller matrix; the same on every device."""
    _check_int("projection_matrix", "in_dim", in_dim, 0)
    _check_common("projection_matrix", out_dim, seed, kind, nnz, 0)
    r = _reference.projection_matrix(in_dim, out_dim, seed=seed, kind=kind, nnz=nnz, device=device)
    return r.to(dtype)


def project(
    x: torch.Tensor,
    out_dim: int,
    *,
    seed: int,
    kind: str = "rademacher",
    nnz: int = 4,
    row_offset: int = 0,
) -> torch.Tensor:
    """``x [..., in_dim] @ R[row_offset : row_offset + in_dim]`` -> float32 ``[..., out_dim]``."""
    check_tensor(OP, "x", x)
    check_dtype(OP, "x", x, FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError(f"mixkernels.{OP}: x must have at least 1 dimension [..., in_dim], got a scalar")
    _check_common(OP, out_dim, seed, kind, nnz, row_offset)
    if row_offset + x.shape[-1] > _INT63:
        raise ValueError(f"mixkernels.{OP}: row_offset + in_dim = {row_offset + x.shape[-1]} overflows int64")
    x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    chosen = _backend.select(OP, x.device)
    if chosen == "cxx":
        y = torch.ops.mixkernels.project(x2, out_dim, seed, kind, nnz, row_offset)
    elif chosen == "triton":
        y = torch.ops.mixkernels.project_triton(x2, out_dim, seed, kind, nnz, row_offset)
    else:
        y = _reference.project(x2, out_dim, seed, kind, nnz, row_offset)
    return y.reshape(*x.shape[:-1], out_dim)


def lift(
    y: torch.Tensor,
    in_dim: int,
    *,
    seed: int,
    kind: str = "rademacher",
    nnz: int = 4,
    row_offset: int = 0,
) -> torch.Tensor:
    """``y [..., out_dim] @ R[row_offset : row_offset + in_dim].T`` -> float32 ``[..., in_dim]``
    (``out_dim = y.shape[-1]``; the adjoint of ``project``)."""
    check_tensor("lift", "y", y)
    check_dtype("lift", "y", y, FLOAT_DTYPES)
    if y.dim() < 1:
        raise ValueError("mixkernels.lift: y must have at least 1 dimension [..., out_dim], got a scalar")
    _check_int("lift", "in_dim", in_dim, 0)
    if y.shape[-1] < 1:
        raise ValueError(f"mixkernels.lift: y.shape[-1] (out_dim) must be >= 1, got shape {tuple(y.shape)}")
    _check_common("lift", y.shape[-1], seed, kind, nnz, row_offset)
    if row_offset + in_dim > _INT63:
        raise ValueError(f"mixkernels.lift: row_offset + in_dim = {row_offset + in_dim} overflows int64")
    y2 = y.reshape(math.prod(y.shape[:-1]), y.shape[-1])
    chosen = _backend.select(OP, y.device)
    if chosen == "cxx":
        x = torch.ops.mixkernels.lift(y2, in_dim, seed, kind, nnz, row_offset)
    elif chosen == "triton":
        x = torch.ops.mixkernels.lift_triton(y2, in_dim, seed, kind, nnz, row_offset)
    else:
        x = _reference.lift(y2, in_dim, seed, kind, nnz, row_offset)
    return x.reshape(*y.shape[:-1], in_dim)


# ---- registrations -------------------------------------------------------------------------


def _triton_project(x, out_dim, seed, kind, nnz, row_offset):
    from ..triton import project as triton_kernels

    return triton_kernels.project(x, out_dim, seed, kind, nnz, row_offset)


def _triton_lift(y, in_dim, seed, kind, nnz, row_offset):
    from ..triton import project as triton_kernels

    return triton_kernels.lift(y, in_dim, seed, kind, nnz, row_offset)


def _fake_project(x, out_dim, seed, kind, nnz, row_offset):
    return x.new_empty((x.shape[0], out_dim), dtype=torch.float32)


def _fake_lift(y, in_dim, seed, kind, nnz, row_offset):
    return y.new_empty((y.shape[0], in_dim), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    t, _dim, seed, kind, nnz, row_offset = inputs
    ctx.params = (t.shape[1], seed, kind, nnz, row_offset)
    ctx.in_dtype = t.dtype


def _make_backward(adjoint: str):
    def backward(ctx, grad):
        other_dim, seed, kind, nnz, row_offset = ctx.params
        g = getattr(torch.ops.mixkernels, adjoint)(grad.contiguous(), other_dim, seed, kind, nnz, row_offset)
        return g.to(ctx.in_dtype), None, None, None, None, None

    return backward


lib.impl("project_triton", _triton_project, "CPU")
lib.impl("project_triton", _triton_project, "CUDA")
lib.impl("lift_triton", _triton_lift, "CPU")
lib.impl("lift_triton", _triton_lift, "CUDA")
if not _extension.has_kernel("mixkernels::project", "CPU"):
    # Without _C the cxx ops still exist and compute, through the reference.
    for _key in ("CPU", "CUDA"):
        lib.impl("project", _reference.project, _key)
        lib.impl("lift", _reference.lift, _key)
for _suffix in ("", "_triton"):
    torch.library.register_fake(f"mixkernels::project{_suffix}", _fake_project, lib=lib)
    torch.library.register_fake(f"mixkernels::lift{_suffix}", _fake_lift, lib=lib)
    torch.library.register_autograd(
        f"mixkernels::project{_suffix}", _make_backward(f"lift{_suffix}"), setup_context=_setup_context, lib=lib
    )
    torch.library.register_autograd(
        f"mixkernels::lift{_suffix}", _make_backward(f"project{_suffix}"), setup_context=_setup_context, lib=lib
    )
_backend.refresh_availability(OP)


def selftest_cases() -> list[tuple[str, tuple, dict]]:
    """Small random inputs for ``python -m mixkernels.info --selftest``: (case, args, kwargs)."""
    x = torch.randn(3, 301)
    return [
        ("rademacher fp32", (x, 70), {"seed": 1}),
        ("gaussian fp32 row_offset", (x, 33), {"seed": 2, "kind": "gaussian", "row_offset": 1000}),
        ("sjlt fp16", (x.half(), 64), {"seed": 3, "kind": "sjlt", "nnz": 4}),
        ("rademacher bf16 3d", (x.bfloat16().reshape(3, 1, 301), 40), {"seed": 4}),
        ("empty", (x[:0], 16), {"seed": 5}),
    ]
