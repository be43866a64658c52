"""project / lift, Triton kernels: random projections generated per tile, never stored.

The hash is the one of ``mixkernels/reference/project.py`` in uint32 arithmetic, so every tile
holds the very entries of ``projection_matrix``:

    row(i) = mix(mix(key ^ lo(i)) ^ hi(i)),  word(i, c) = mix(row(i) + mix(c ^ 0x6A09E667))
    rademacher: bit (j & 31) of word(i, j >> 5);  gaussian: fp64 Box-Muller on word(i, j >> 1);
    sjlt: block b holds one +-1 at lo_b + (((h >> 1) * len_b) >> 31), h = word(i, b)

* dense project: program (row block of x, column block of y) loops over ``in_dim`` in BLOCK_I
  steps: loads x [BLOCK_N, BLOCK_I], generates R' [BLOCK_I, BLOCK_J] in registers,
  ``acc += tl.dot(x, R')`` (fp32, ``input_precision="ieee"`` so R' and x are not rounded to tf32).
* dense lift: program (row block of y, row block of R) loops over ``out_dim``: ``acc += y @ R'^T``.
* sjlt project: one program per (BLOCK_I rows of R, example); ``nnz`` atomic adds per input;
  sjlt lift: the matching gathers, no atomics.

The scale (1/sqrt(out_dim) or 1/sqrt(nnz)) is applied once to the result. float32 accumulation;
inputs float32 / float16 / bfloat16 (converted on load).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.project import _KIND_IDS, scale_of, stream_key

RADEMACHER: tl.constexpr = 1
GAUSSIAN: tl.constexpr = 2


@triton.jit
def _mix(h):
    h = h ^ (h >> 16)
    h = h * 0x7FEB352D
    h = h ^ (h >> 15)
    h = h * 0x846CA68B
    return h ^ (h >> 16)


@triton.jit
def _row_hash(key, rows):
    lo = (rows & 0xFFFFFFFF).to(tl.uint32)
    hi = (rows >> 32).to(tl.uint32)
    return _mix(_mix(key ^ lo) ^ hi)


@triton.jit
def _col_hash(c):
    return _mix(c.to(tl.uint32) ^ 0x6A09E667)


@triton.jit
def _dense_entries(rh, cols, KIND: tl.constexpr):
    """Unscaled R' entries for row hashes ``rh`` and column indices ``cols`` (broadcast)."""
    if KIND == 1:
        word = _mix(rh + _col_hash(cols >> 5))
        bit = (word >> (cols & 31).to(tl.uint32)) & 1
        return 1.0 - 2.0 * bit.to(tl.float32)
    else:
        h1 = _mix(rh + _col_hash(cols >> 1))
        h2 = _mix(h1 ^ 0x5BE0CD19)
        u1 = ((h1 >> 8).to(tl.float64) + 0.5) * 5.9604644775390625e-08
        u2 = (h2 >> 8).to(tl.float64) * 5.9604644775390625e-08
        r = tl.sqrt(-2.0 * tl.log(u1))
        theta = 6.283185307179586 * u2
        z = tl.where((cols & 1) == 0, r * tl.cos(theta), r * tl.sin(theta))
        return z.to(tl.float32)


@triton.jit
def _project_dense_kernel(
    x_ptr, y_ptr, n, in_dim, out_dim, stride_x, key, row_offset, scale,
    KIND: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_j = tl.program_id(1)
    key = key.to(tl.uint32)
    rows_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    cols = pid_j.to(tl.int64) * BLOCK_J + tl.arange(0, BLOCK_J).to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_J), dtype=tl.float32)
    for i0 in range(0, in_dim, BLOCK_I):
        ii = i0 + tl.arange(0, BLOCK_I).to(tl.int64)
        xt = tl.load(x_ptr + rows_n[:, None] * stride_x + ii[None, :],
                     mask=(rows_n[:, None] < n) & (ii[None, :] < in_dim), other=0.0).to(tl.float32)
        rh = _row_hash(key, row_offset + ii)
        r = _dense_entries(rh[:, None], cols[None, :], KIND)
        r = tl.where(ii[:, None] < in_dim, r, 0.0)
        acc += tl.dot(xt, r, input_precision="ieee")
    tl.store(y_ptr + rows_n[:, None] * out_dim + cols[None, :], acc * scale,
             mask=(rows_n[:, None] < n) & (cols[None, :] < out_dim))


@triton.jit
def _lift_dense_kernel(
    y_ptr, x_ptr, n, in_dim, out_dim, stride_y, key, row_offset, scale,
    KIND: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_i = tl.program_id(1)
    key = key.to(tl.uint32)
    rows_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    ii = pid_i.to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I).to(tl.int64)
    rh = _row_hash(key, row_offset + ii)
    acc = tl.zeros((BLOCK_N, BLOCK_I), dtype=tl.float32)
    for j0 in range(0, out_dim, BLOCK_J):
        jj = j0 + tl.arange(0, BLOCK_J).to(tl.int64)
        yt = tl.load(y_ptr + rows_n[:, None] * stride_y + jj[None, :],
                     mask=(rows_n[:, None] < n) & (jj[None, :] < out_dim), other=0.0).to(tl.float32)
        rt = _dense_entries(rh[None, :], jj[:, None], KIND)  # R'^T tile [BLOCK_J, BLOCK_I]
        rt = tl.where(jj[:, None] < out_dim, rt, 0.0)
        acc += tl.dot(yt, rt, input_precision="ieee")
    tl.store(x_ptr + rows_n[:, None] * in_dim + ii[None, :], acc * scale,
             mask=(rows_n[:, None] < n) & (ii[None, :] < in_dim))


@triton.jit
def _sjlt_col_sign(rh, b, out_dim, nnz):
    lo = b * out_dim // nnz
    length = (b + 1) * out_dim // nnz - lo
    h = _mix(rh + _col_hash(b + tl.zeros_like(rh).to(tl.int64)))
    col = lo + (((h >> 1).to(tl.int64) * length) >> 31)
    sign = 1.0 - 2.0 * (h & 1).to(tl.float32)
    return col, sign


@triton.jit
def _project_sjlt_kernel(
    x_ptr, y_ptr, in_dim, out_dim, nnz, stride_x, key, row_offset, BLOCK_I: tl.constexpr,
):
    pid_i = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    key = key.to(tl.uint32)
    ii = pid_i.to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I).to(tl.int64)
    ok = ii < in_dim
    xv = tl.load(x_ptr + row * stride_x + ii, mask=ok, other=0.0).to(tl.float32)
    rh = _row_hash(key, row_offset + ii)
    for b in range(nnz):
        col, sign = _sjlt_col_sign(rh, b, out_dim, nnz)
        tl.atomic_add(y_ptr + row * out_dim + col, sign * xv, mask=ok)


@triton.jit
def _lift_sjlt_kernel(
    y_ptr, x_ptr, in_dim, out_dim, nnz, stride_y, key, row_offset, scale, BLOCK_I: tl.constexpr,
):
    pid_i = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    key = key.to(tl.uint32)
    ii = pid_i.to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I).to(tl.int64)
    ok = ii < in_dim
    rh = _row_hash(key, row_offset + ii)
    acc = tl.zeros((BLOCK_I,), dtype=tl.float32)
    for b in range(nnz):
        col, sign = _sjlt_col_sign(rh, b, out_dim, nnz)
        acc += sign * tl.load(y_ptr + row * stride_y + col, mask=ok, other=0.0).to(tl.float32)
    tl.store(x_ptr + row * in_dim + ii, acc * scale, mask=ok)


def _blocks(device: torch.device) -> tuple[int, int, int]:
    # Interpreter: tiny tiles keep numpy emulation fast; GPU: tensor-core friendly tiles.
    return (16, 32, 32) if device.type == "cpu" else (32, 64, 128)


def project(x: torch.Tensor, out_dim: int, seed: int, kind: str, nnz: int, row_offset: int) -> torch.Tensor:
    n, in_dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    key = stream_key(seed, kind, nnz, out_dim)
    scale = scale_of(kind, out_dim, nnz)
    y = torch.zeros(n, out_dim, dtype=torch.float32, device=x.device)
    if n == 0 or in_dim == 0:
        return y
    if kind == "sjlt":
        block_i = 64
        _project_sjlt_kernel[(triton.cdiv(in_dim, block_i), n)](
            x, y, in_dim, out_dim, nnz, x.stride(0), key, row_offset, BLOCK_I=block_i)
        return y.mul_(scale)
    bn, bi, bj = _blocks(x.device)
    _project_dense_kernel[(triton.cdiv(n, bn), triton.cdiv(out_dim, bj))](
        x, y, n, in_dim, out_dim, x.stride(0), key, row_offset, scale,
        KIND=_KIND_IDS[kind], BLOCK_N=bn, BLOCK_I=bi, BLOCK_J=bj)
    return y


def lift(y: torch.Tensor, in_dim: int, seed: int, kind: str, nnz: int, row_offset: int) -> torch.Tensor:
    n, out_dim = y.shape
    if y.stride(-1) != 1:
        y = y.contiguous()
    key = stream_key(seed, kind, nnz, out_dim)
    scale = scale_of(kind, out_dim, nnz)
    x = torch.zeros(n, in_dim, dtype=torch.float32, device=y.device)
    if n == 0 or in_dim == 0:
        return x
    if kind == "sjlt":
        block_i = 64
        _lift_sjlt_kernel[(triton.cdiv(in_dim, block_i), n)](
            y, x, in_dim, out_dim, nnz, y.stride(0), key, row_offset, scale, BLOCK_I=block_i)
        return x
    bn, bi, bj = _blocks(y.device)
    _lift_dense_kernel[(triton.cdiv(n, bn), triton.cdiv(in_dim, bi))](
        y, x, n, in_dim, out_dim, y.stride(0), key, row_offset, scale,
        KIND=_KIND_IDS[kind], BLOCK_N=bn, BLOCK_I=bi, BLOCK_J=bj)
    return x
