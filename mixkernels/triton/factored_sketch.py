"""factored_sketch, Triton kernel: projections and per-example outer products fused per segment.

One program per example (segment ``[offsets[b], offsets[b+1])``). It walks the segment in BLOCK_T
token tiles; for each tile it projects the input tile (``x [BLOCK_T, d_in] @ p_in``, looping over
``d_in`` in BLOCK_D chunks; or loads the pre-projected ``x`` when ``p_in`` is absent), does the
same for the output gradient, and accumulates ``S_b += gp^T @ xp`` ([K_OUT, K_IN] in registers).
So neither the per-example gradient nor the projected ``[N, k]`` factors ever reach memory.
fp32 accumulation, ``input_precision="ieee"``; k_in, k_out are padded to powers of two >= 16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _project_tile(a_ptr, p_ptr, t_idx, t_ok, d, k, stride_a, stride_p0, stride_p1,
                  HAS_P: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    kk = tl.arange(0, K_PAD).to(tl.int64)
    if HAS_P:
        acc = tl.zeros((BLOCK_T, K_PAD), dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
            a = tl.load(a_ptr + t_idx[:, None] * stride_a + dd[None, :],
                        mask=t_ok[:, None] & (dd[None, :] < d), other=0.0).to(tl.float32)
            p = tl.load(p_ptr + dd[:, None] * stride_p0 + kk[None, :] * stride_p1,
                        mask=(dd[:, None] < d) & (kk[None, :] < k), other=0.0).to(tl.float32)
            acc += tl.dot(a, p, input_precision="ieee")
        return acc
    else:
        return tl.load(a_ptr + t_idx[:, None] * stride_a + kk[None, :],
                       mask=t_ok[:, None] & (kk[None, :] < k), other=0.0).to(tl.float32)


@triton.jit
def _factored_sketch_kernel(
    x_ptr, g_ptr, off_ptr, pin_ptr, pout_ptr, s_ptr,
    d_in, d_out, k_in, k_out, stride_x, stride_g, stride_pin0, stride_pin1, stride_pout0, stride_pout1,
    HAS_PIN: tl.constexpr, HAS_POUT: tl.constexpr, KI_PAD: tl.constexpr, KO_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    start = tl.load(off_ptr + b)
    end = tl.load(off_ptr + b + 1)
    s = tl.zeros((KO_PAD, KI_PAD), dtype=tl.float32)
    for t0 in range(start, end, BLOCK_T):
        t_idx = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        t_ok = t_idx < end
        xp = _project_tile(x_ptr, pin_ptr, t_idx, t_ok, d_in, k_in, stride_x, stride_pin0, stride_pin1,
                           HAS_PIN, KI_PAD, BLOCK_T, BLOCK_D)
        gp = _project_tile(g_ptr, pout_ptr, t_idx, t_ok, d_out, k_out, stride_g, stride_pout0, stride_pout1,
                           HAS_POUT, KO_PAD, BLOCK_T, BLOCK_D)
        s += tl.dot(tl.trans(gp), xp, input_precision="ieee")
    ko = tl.arange(0, KO_PAD).to(tl.int64)
    ki = tl.arange(0, KI_PAD).to(tl.int64)
    tl.store(s_ptr + b * k_out * k_in + ko[:, None] * k_in + ki[None, :], s,
             mask=(ko[:, None] < k_out) & (ki[None, :] < k_in))


def factored_sketch(
    x: torch.Tensor,
    g: torch.Tensor,
    offsets: torch.Tensor,
    p_in: torch.Tensor | None = None,
    p_out: torch.Tensor | None = None,
) -> torch.Tensor:
    b = offsets.numel() - 1
    k_in = x.shape[1] if p_in is None else p_in.shape[1]
    k_out = g.shape[1] if p_out is None else p_out.shape[1]
    out = torch.zeros(b, k_out, k_in, dtype=torch.float32, device=x.device)
    if b == 0 or x.shape[0] == 0 or k_in == 0 or k_out == 0:
        return out
    x = x if x.stride(-1) == 1 else x.contiguous()
    g = g if g.stride(-1) == 1 else g.contiguous()
    pin = p_in if p_in is not None else x
    pout = p_out if p_out is not None else g
    block_t, block_d = (16, 32) if x.device.type == "cpu" else (64, 64)
    _factored_sketch_kernel[(b,)](
        x, g, offsets.contiguous(), pin, pout, out,
        x.shape[1], g.shape[1], k_in, k_out, x.stride(0), g.stride(0),
        pin.stride(0), pin.stride(1), pout.stride(0), pout.stride(1),
        HAS_PIN=p_in is not None, HAS_POUT=p_out is not None,
        KI_PAD=max(16, triton.next_power_of_2(k_in)), KO_PAD=max(16, triton.next_power_of_2(k_out)),
        BLOCK_T=block_t, BLOCK_D=block_d,
    )
    return out
