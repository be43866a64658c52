"""router_stats, Triton kernel.

One program per (layer, BLOCK_N tokens): loads the [BLOCK_N, BLOCK_E] logits tile (BLOCK_E =
next power of two >= E, padding masked), converts to fp32 and computes

    x = z - max(z),  s = sum exp(x),  p = exp(x) / s,  H = log s - sum exp(x) x / s

then the top-k set by k rounds of "row maximum, lowest column index attaining it, knock it out",
which is exactly the largest-k with exact ties going to the lower expert index. Per-group sums
of p, of the top-k indicator and of H are reduced inside the tile (a loop over groups when
G <= GROUP_LOOP_MAX, so one atomic per (group, expert) per program) and added to the [L, G, E]
outputs with atomics; token counts come from the layer-0 programs. aux_loss is formed from the
reduced tensors in PyTorch. Float atomics: on GPU the last bits vary run to run.
The logits gradient uses the shared ``router_stats_backward`` op.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.router_stats import aux_loss_from_sums

GROUP_LOOP_MAX = 32


@triton.jit
def _router_stats_kernel(
    z_ptr, gid_ptr, mask_ptr,
    prob_ptr, count_ptr, ent_ptr, tok_ptr,
    n, e, stride_z, top_k, num_groups, layer,
    HAS_GID: tl.constexpr, HAS_MASK: tl.constexpr, COUNT_TOKENS: tl.constexpr, GROUP_LOOP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < n
    if HAS_MASK:
        row_ok = row_ok & (tl.load(mask_ptr + rows, mask=rows < n, other=0) != 0)
    col_ok = cols < e
    tile_ok = row_ok[:, None] & col_ok[None, :]
    z = tl.load(z_ptr + rows[:, None] * stride_z + cols[None, :], mask=tile_ok, other=float("-inf")).to(tl.float32)
    m = tl.max(z, axis=1)
    m = tl.where(row_ok, m, 0.0)
    x = tl.where(tile_ok, z - m[:, None], 0.0)
    ex = tl.where(tile_ok, tl.exp(x), 0.0)
    s = tl.sum(ex, axis=1)
    s = tl.where(row_ok, s, 1.0)
    inv = 1.0 / s
    p = ex * inv[:, None]
    dot = tl.sum(tl.where(ex > 0.0, ex * x, 0.0), axis=1)
    entropy = tl.where(row_ok, tl.log(s) - dot * inv, 0.0)

    # top-k: k rounds of (max, lowest index attaining it); padding columns sit at -1 < any p. A NaN
    # p (a row of all -inf logits, or +inf logits) ranks above every number, as in the reference's
    # descending stable sort and the C++ kernels: an all -inf row picks experts 0..k-1, not none.
    work = tl.where(col_ok[None, :], tl.where(p != p, 2.0, p), -1.0)  # noqa: PLR0124 (p != p: NaN)
    chosen = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.int64)
    for _ in range(top_k):
        best = tl.max(work, axis=1)
        first = tl.min(tl.where(work == best[:, None], cols[None, :], BLOCK_E), axis=1)
        hit = cols[None, :] == first[:, None]
        chosen = tl.where(hit, 1, chosen)
        work = tl.where(hit, -2.0, work)
    chosen = tl.where(tile_ok, chosen, 0)

    if HAS_GID:
        gid = tl.load(gid_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    else:
        gid = tl.zeros((BLOCK_N,), dtype=tl.int64)
    layer_base = layer.to(tl.int64) * num_groups
    if GROUP_LOOP:
        for g in range(num_groups):
            in_g = row_ok & (gid == g)
            p_g = tl.sum(tl.where(in_g[:, None], p, 0.0), axis=0)
            c_g = tl.sum(tl.where(in_g[:, None], chosen, 0), axis=0)
            out = (layer_base + g) * e + cols
            tl.atomic_add(prob_ptr + out, p_g, mask=col_ok)
            tl.atomic_add(count_ptr + out, c_g, mask=col_ok)
            tl.atomic_add(ent_ptr + layer_base + g, tl.sum(tl.where(in_g, entropy, 0.0), axis=0))
            if COUNT_TOKENS:
                tl.atomic_add(tok_ptr + g, tl.sum(in_g.to(tl.int64), axis=0))
    else:
        out = (layer_base + gid)[:, None] * e + cols[None, :]
        tl.atomic_add(prob_ptr + out, p, mask=tile_ok)
        tl.atomic_add(count_ptr + out, chosen, mask=tile_ok)
        tl.atomic_add(ent_ptr + layer_base + gid, entropy, mask=row_ok)
        if COUNT_TOKENS:
            tl.atomic_add(tok_ptr + gid, tl.full((BLOCK_N,), 1, tl.int64), mask=row_ok)


def router_stats(
    router_logits: list[torch.Tensor],
    top_k: int,
    group_ids: torch.Tensor | None,
    num_groups: int,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch one grid per layer; returns (prob_sum, entropy_sum, aux_loss, expert_counts, token_count)."""
    first = router_logits[0]
    if first.dtype == torch.float64:
        raise TypeError(
            "mixkernels.router_stats: the triton backend takes float32/float16/bfloat16 logits, got float64 "
            "(use the reference or cxx backend)"
        )
    num_layers = len(router_logits)
    n, e = first.shape
    device = first.device
    prob_sum = torch.zeros(num_layers, num_groups, e, dtype=torch.float32, device=device)
    counts = torch.zeros(num_layers, num_groups, e, dtype=torch.int64, device=device)
    entropy_sum = torch.zeros(num_layers, num_groups, dtype=torch.float32, device=device)
    token_count = torch.zeros(num_groups, dtype=torch.int64, device=device)
    if n > 0:
        block_e = triton.next_power_of_2(e)
        block_n = max(1, min(64, 4096 // block_e))
        grid = (triton.cdiv(n, block_n),)
        gid = group_ids.contiguous() if group_ids is not None else token_count
        mask_arg = mask.contiguous().view(torch.uint8) if mask is not None else token_count
        for layer, z in enumerate(router_logits):
            if z.stride(1) != 1:
                z = z.contiguous()
            _router_stats_kernel[grid](
                z, gid, mask_arg, prob_sum, counts, entropy_sum, token_count,
                n, e, z.stride(0), top_k, num_groups, layer,
                HAS_GID=group_ids is not None, HAS_MASK=mask is not None, COUNT_TOKENS=layer == 0,
                GROUP_LOOP=num_groups <= GROUP_LOOP_MAX, BLOCK_N=block_n, BLOCK_E=block_e,
            )
    aux = aux_loss_from_sums(counts, prob_sum, token_count)
    return prob_sum, entropy_sum, aux, counts, token_count
