"""segment_sum, pure-PyTorch reference.

    sums[s]   = sum_{i : segment_ids[i] == s and mask[i]} float32(values[i])   # [S] or [S, C]
    counts[s] = #{i : segment_ids[i] == s and mask[i]}                         # int64 [S]

fp32 accumulation (``index_add_`` into float32 zeros); differentiable w.r.t. ``values`` through
PyTorch's own autograd.
"""

from __future__ import annotations

import torch


def segment_sum(
    values: torch.Tensor,
    segment_ids: torch.Tensor,
    num_segments: int,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    keep = torch.ones_like(segment_ids, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    if segment_ids.numel() and not torch.compiler.is_compiling():
        bad = ((segment_ids < 0) | (segment_ids >= num_segments)) & keep
        if bool(bad.any()):
            position = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"mixkernels.segment_sum: segment_ids[{position}] = {int(segment_ids[position])} "
                f"is out of range [0, {num_segments})"
            )
    sums = values.new_zeros((num_segments, *values.shape[1:]), dtype=torch.float32)
    counts = segment_ids.new_zeros(num_segments, dtype=torch.int64)
    if num_segments == 0:
        return sums, counts
    # Masked rows go to segment 0 with zero weight (no data-dependent shapes, so it compiles).
    ids = torch.where(keep, segment_ids.long(), 0)
    row_keep = keep.reshape(-1, *([1] * (values.dim() - 1)))
    vals = torch.where(row_keep, values.float(), 0.0)
    return sums.index_add(0, ids, vals), counts.index_add(0, ids, keep.long())
