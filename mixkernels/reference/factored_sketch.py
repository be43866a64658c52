"""factored_sketch, pure-PyTorch reference (what LoGra / LogIX-style hook pipelines compute).

    xp = float32(x) @ p_in          [N, k_in]    (x is used as is when p_in is None)
    gp = float32(g) @ p_out         [N, k_out]   (g is used as is when p_out is None)
    S[b] = sum_{t in [offsets[b], offsets[b+1])} gp[t]^T xp[t]    -> float32 [B, k_out, k_in]

For a linear layer with input x and output gradient g this is ``p_out^T G_b p_in`` with
``G_b = sum_t g_t x_t^T`` the per-example weight gradient, without ever forming ``G_b``.
Tokens outside every segment are ignored. fp32 accumulation; differentiable through PyTorch.
"""

from __future__ import annotations

import torch


def segment_ids_from_offsets(offsets: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(segment id per row [N] int64, bool mask of rows inside some segment [N])."""
    offsets = offsets.to(torch.int64)
    rows = torch.arange(n, device=offsets.device)
    ids = torch.searchsorted(offsets, rows, right=True) - 1
    valid = (ids >= 0) & (ids < offsets.numel() - 1)
    return ids.clamp(0, max(offsets.numel() - 2, 0)), valid


def factored_sketch(
    x: torch.Tensor,
    g: torch.Tensor,
    offsets: torch.Tensor,
    p_in: torch.Tensor | None = None,
    p_out: torch.Tensor | None = None,
) -> torch.Tensor:
    xp = x.to(torch.float32) if p_in is None else x.to(torch.float32) @ p_in.to(torch.float32)
    gp = g.to(torch.float32) if p_out is None else g.to(torch.float32) @ p_out.to(torch.float32)
    b = offsets.numel() - 1
    ids, valid = segment_ids_from_offsets(offsets, x.shape[0])
    outer = torch.einsum("no,ni->noi", gp * valid[:, None].to(gp.dtype), xp)
    out = xp.new_zeros((b, gp.shape[1], xp.shape[1]))
    return out.index_add(0, ids, outer) if x.shape[0] and b else out
