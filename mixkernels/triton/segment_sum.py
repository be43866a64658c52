"""segment_sum, Triton kernel.

One program per BLOCK_N rows x BLOCK_C columns: loads ids, mask and a values tile, converts to
fp32 and atomically adds into ``sums[id, c]``; the first column block also adds 1 per counted row
into ``counts[id]``. Float atomics: the summation order (last bits) varies run to run on GPU.
Out-of-range ids are rejected before launch by the caller (``mixkernels.ops.segment_sum``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _segment_sum_kernel(
    values_ptr, ids_ptr, mask_ptr, sums_ptr, counts_ptr,
    n, c, stride_v,
    HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    cols = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    row_ok = rows < n
    if HAS_MASK:
        row_ok = row_ok & (tl.load(mask_ptr + rows, mask=rows < n, other=0) != 0)
    ids = tl.load(ids_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    tile_ok = row_ok[:, None] & (cols[None, :] < c)
    vals = tl.load(values_ptr + rows[:, None] * stride_v + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    tl.atomic_add(sums_ptr + ids[:, None] * c + cols[None, :], vals, mask=tile_ok)
    if pid_c == 0:
        ones = tl.full((BLOCK_N,), 1, tl.int64)
        tl.atomic_add(counts_ptr + ids, ones, mask=row_ok)


def segment_sum(
    values: torch.Tensor,
    segment_ids: torch.Tensor,
    num_segments: int,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    n = values.shape[0]
    c = values.shape[1] if values.dim() == 2 else 1
    sums = torch.zeros((num_segments, *values.shape[1:]), dtype=torch.float32, device=values.device)
    counts = torch.zeros(num_segments, dtype=torch.int64, device=values.device)
    if n == 0:
        return sums, counts
    v = values.reshape(n, c)
    if v.stride(1) != 1:
        v = v.contiguous()
    block_c = min(triton.next_power_of_2(c), 64)
    block_n = max(16, 2048 // block_c)
    grid = (triton.cdiv(n, block_n), triton.cdiv(c, block_c))
    mask_arg = mask.contiguous().view(torch.uint8) if mask is not None else segment_ids
    _segment_sum_kernel[grid](
        v, segment_ids.contiguous(), mask_arg, sums, counts, n, c, v.stride(0),
        HAS_MASK=mask is not None, BLOCK_N=block_n, BLOCK_C=block_c,
    )
    return sums, counts
