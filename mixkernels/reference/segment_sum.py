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
    ids = segment_ids.long()
    vals = values.float()
    if mask is not None:
        keep = mask.to(torch.bool)
        ids = ids[keep]
        vals = vals[keep]
    if ids.numel() and not torch.compiler.is_compiling():
        bad = (ids < 0) | (ids >= num_segments)
        if bool(bad.any()):
            position = int(bad.nonzero()[0, 0])
            if mask is not None:  # report the position in the caller's (unmasked) indexing
                position = int(mask.nonzero()[position, 0])
            raise ValueError(
                f"mixkernels.segment_sum: segment_ids[{position}] = {int(segment_ids[position])} "
                f"is out of range [0, {num_segments})"
            )
    sums = vals.new_zeros((num_segments, *values.shape[1:])).index_add(0, ids, vals)
    counts = torch.bincount(ids, minlength=num_segments)[:num_segments] if ids.numel() else ids.new_zeros(num_segments)
    return sums, counts
