"""linear_ce / cross_entropy, Triton kernels.

The [N, V] logits are produced one row chunk at a time by torch GEMMs (``r = h_c @ W^T + b``); the
Triton kernels do the fused per-row step on the fp32 chunk, one program per row, looping over
the vocabulary in BLOCK_V tiles. Each element is loaded as the raw logit r and turned into the
final logit z = C tanh(s r / C) (softcap C, HAS_SOFTCAP) or s r (logit scale s) on the fly:

    pass 1 (online log-sum-exp): m, s = running max and sum exp(z - m); sum_z; z_y
            lse = m + log s;  loss = lse - (1 - eps) z_y - (eps / V) sum_z   (0 if ignored)
            z-loss = lam lse^2 (0 if ignored)
            group_loss[g] += loss, group_count[g] += 1 (float / int64 atomics, one per row)
    pass 2 (HAS_GRAD): r_j <- s c ((1 + 2 lam lse) exp(z_j - lse) - eps / V - (1 - eps) [j == y])
            * (1 - (z_j / C)^2 if HAS_SOFTCAP), in place

The backward-only kernel runs pass 2 from a saved lse (recompute-in-backward for reduction
"none"). fp32 math throughout; int64 offsets (row * V may exceed 2^31). The GEMMs run in fp32
on CPU (the interpreter) and in the input dtype on CUDA (tensor cores), with the weight
gradient accumulated in fp32 across chunks. Float atomics make the last bits of group sums vary
run to run on GPU. Labels and group ids are validated by the caller
(``mixkernels.ops.linear_ce``) before launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    """tanh from exp: (1 - e) / (1 + e) with e = exp(-2|x|); an odd series below |x| = 0.3, where
    that form would lose digits to cancellation (the same split as mk_tanhf in csrc/linear_ce.h)."""
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    a2 = tl.minimum(a, 1.0) * tl.minimum(a, 1.0)  # bounded: the unused series stays finite
    p = -1382.0 / 155925.0
    p = p * a2 + 62.0 / 2835.0
    p = p * a2 - 17.0 / 315.0
    p = p * a2 + 2.0 / 15.0
    p = p * a2 - 1.0 / 3.0
    small = a + a * a2 * p
    t = tl.where(a < 0.3, small, big)
    return tl.where(x < 0, -t, t)


@triton.jit
def _final_logit(r, scale, cap, HAS_SOFTCAP: tl.constexpr):
    u = r * scale
    if HAS_SOFTCAP:
        u = cap * _tanh(u / cap)
    return u


@triton.jit
def _grad_elem(z, is_target, lse, c, pc, eps, v, cap, HAS_SOFTCAP: tl.constexpr):
    """d loss / d u of one element from its final logit z (c already carries the logit scale)."""
    dz = c * (pc * tl.exp(z - lse) - eps / v) - tl.where(is_target, c * (1.0 - eps), 0.0)
    if HAS_SOFTCAP:
        t = z / cap
        dz = dz * (1.0 - t * t)
    return dz


@triton.jit
def _ce_forward_kernel(
    z_ptr, y_ptr, coef_ptr, lse_ptr, loss_ptr, zl_ptr, gid_ptr, gloss_ptr, gcount_ptr,
    v, ignore_index, eps, scale, cap, lam,
    HAS_GRAD: tl.constexpr, HAS_GROUPS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ZLOSS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * v
    label = tl.load(y_ptr + row)
    counted = label != ignore_index
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.full([], 0.0, tl.float32)
    sum_z = tl.full([], 0.0, tl.float32)
    for start in range(0, v, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V).to(tl.int64)
        ok = cols < v
        z = _final_logit(tl.load(base + cols, mask=ok, other=0.0), scale, cap, HAS_SOFTCAP)
        z = tl.where(ok, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        sum_z += tl.sum(tl.where(ok, z, 0.0), axis=0)
        m = m_new
    lse = m + tl.log(s)
    safe_label = tl.where(counted, label, 0).to(tl.int64)
    z_y = _final_logit(tl.load(base + safe_label), scale, cap, HAS_SOFTCAP)
    loss = lse - (1.0 - eps) * z_y - eps * sum_z / v
    loss = tl.where(counted, loss, 0.0)
    tl.store(lse_ptr + row, lse)
    tl.store(loss_ptr + row, loss)
    pc = 1.0
    if HAS_ZLOSS:
        tl.store(zl_ptr + row, tl.where(counted, lam * lse * lse, 0.0))
        pc = 1.0 + 2.0 * lam * lse
    if HAS_GROUPS:
        g = tl.load(gid_ptr + row).to(tl.int64)
        g = tl.where(counted, g, 0)
        tl.atomic_add(gloss_ptr + g, loss, mask=counted)
        tl.atomic_add(gcount_ptr + g, tl.where(counted, 1, 0).to(tl.int64), mask=counted)
    if HAS_GRAD:
        c = tl.where(counted, tl.load(coef_ptr + row), 0.0) * scale
        for start in range(0, v, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V).to(tl.int64)
            ok = cols < v
            z = _final_logit(tl.load(base + cols, mask=ok, other=0.0), scale, cap, HAS_SOFTCAP)
            dz = _grad_elem(z, cols == safe_label, lse, c, pc, eps, v, cap, HAS_SOFTCAP)
            tl.store(base + cols, dz, mask=ok)


@triton.jit
def _ce_grad_kernel(z_ptr, y_ptr, coef_ptr, lse_ptr, out_ptr, v, ignore_index, eps, scale, cap, lam,
                    HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(y_ptr + row)
    counted = label != ignore_index
    safe_label = tl.where(counted, label, 0).to(tl.int64)
    c = tl.where(counted, tl.load(coef_ptr + row), 0.0) * scale
    lse = tl.load(lse_ptr + row)
    pc = 1.0 + 2.0 * lam * lse
    for start in range(0, v, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V).to(tl.int64)
        ok = cols < v
        z = _final_logit(tl.load(z_ptr + row * v + cols, mask=ok, other=0.0).to(tl.float32), scale, cap, HAS_SOFTCAP)
        dz = _grad_elem(z, cols == safe_label, lse, c, pc, eps, v, cap, HAS_SOFTCAP)
        tl.store(out_ptr + row * v + cols, dz.to(out_ptr.dtype.element_ty), mask=ok)


def _block_v(v: int) -> int:
    return min(4096, triton.next_power_of_2(max(v, 16)))


def _check_dtype(t: torch.Tensor, name: str) -> None:
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"mixkernels triton backend: {name} must be float32, float16 or bfloat16, got {t.dtype}")


def _rows_forward(z: torch.Tensor, y: torch.Tensor, coef: torch.Tensor | None, lse: torch.Tensor, loss: torch.Tensor,
                  zl: torch.Tensor | None, gid: torch.Tensor | None, gloss: torch.Tensor, gcount: torch.Tensor,
                  ignore_index: int, eps: float, opts: tuple[float, float, float]) -> None:
    """The fused step on a contiguous fp32 chunk z [R, V] of raw logits (overwritten by the
    gradient w.r.t. them when coef is given). ``opts``: (softcap, logit_scale, z_loss)."""
    r, v = z.shape
    if r == 0:
        return
    cap, scale, lam = opts
    _ce_forward_kernel[(r,)](
        z, y, coef if coef is not None else z, lse, loss, zl if zl is not None else lse, gid if gid is not None else y,
        gloss, gcount, v, ignore_index, eps, scale, cap if cap > 0 else 1.0, lam,
        HAS_GRAD=coef is not None, HAS_GROUPS=gid is not None, HAS_SOFTCAP=cap > 0, HAS_ZLOSS=zl is not None,
        BLOCK_V=_block_v(v),
    )


def _rows_grad(z: torch.Tensor, y: torch.Tensor, coef: torch.Tensor, lse: torch.Tensor, out: torch.Tensor,
               ignore_index: int, eps: float, opts: tuple[float, float, float]) -> None:
    r, v = z.shape
    if r == 0:
        return
    cap, scale, lam = opts
    _ce_grad_kernel[(r,)](z, y, coef, lse, out, v, ignore_index, eps, scale, cap if cap > 0 else 1.0, lam,
                          HAS_SOFTCAP=cap > 0, BLOCK_V=_block_v(v))


def _gemm_dtype(t: torch.Tensor) -> torch.dtype:
    # CUDA: tensor-core GEMMs in the input dtype; the interpreter on CPU: fp32
    return t.dtype if t.device.type == "cuda" else torch.float32


def _scale(valid: torch.Tensor, reduction: int) -> torch.Tensor:
    if reduction == 2:
        return 1.0 / valid.sum().clamp(min=1).float()
    return torch.ones((), dtype=torch.float32, device=valid.device)


def _logits(hc: torch.Tensor, wg: torch.Tensor, bg: torch.Tensor | None) -> torch.Tensor:
    z = torch.addmm(bg, hc, wg.T) if bg is not None else hc @ wg.T
    return z.float().contiguous()


def _losses_out(token_loss, zl, scale, reduction):
    """(loss, token_loss output, z_loss output) as the reference returns them (zl: per-token z-loss
    from the kernel, or None when off)."""
    total = token_loss + zl if zl is not None else token_loss
    loss = total.clone() if reduction == 0 else total.sum() * scale
    z_out = token_loss.new_zeros(0) if zl is None else (zl if reduction == 0 else zl.sum() * scale)
    token_out = token_loss if reduction != 0 or zl is not None else token_loss.new_zeros(0)
    return loss, token_out, z_out


def linear_ce(hidden, weight, labels, bias, group_ids, num_groups, ignore_index, label_smoothing, reduction,
              chunk_size, compute_grad, weight_grad=True, softcap=0.0, logit_scale=1.0, z_loss=0.0):
    """Same contract as ``mixkernels.reference.linear_ce.linear_ce``."""
    opts = (softcap, logit_scale, z_loss)
    _check_dtype(hidden, "hidden")
    n, d = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    gemm = _gemm_dtype(hidden)
    y = labels.long().contiguous()
    valid = y != ignore_index
    scale = _scale(valid, reduction)
    grads = compute_grad and reduction != 0
    wgrad = grads and weight_grad
    token_loss = torch.zeros(n, dtype=torch.float32, device=dev)
    lse = torch.zeros(n, dtype=torch.float32, device=dev)
    g = num_groups if group_ids is not None else 0
    gloss = torch.zeros(g, dtype=torch.float32, device=dev)
    gcount = torch.zeros(g, dtype=torch.int64, device=dev)
    gid = group_ids.long().contiguous() if group_ids is not None else None
    wg = weight.to(gemm)
    bg = bias.to(gemm) if bias is not None else None
    coef = torch.where(valid, scale, 0.0).contiguous() if grads else None
    grad_hidden = torch.empty_like(hidden) if grads else hidden.new_zeros(0)
    gw = torch.zeros(v, d, dtype=torch.float32, device=dev) if wgrad else None
    gb = torch.zeros(v, dtype=torch.float32, device=dev) if wgrad and bias is not None else None
    zl = torch.zeros(n, dtype=torch.float32, device=dev) if z_loss != 0.0 else None
    for lo in range(0, n, chunk_size):
        hi = min(n, lo + chunk_size)
        hc = hidden[lo:hi].to(gemm)
        z = _logits(hc, wg, bg)
        _rows_forward(z, y[lo:hi], coef[lo:hi] if grads else None, lse[lo:hi], token_loss[lo:hi],
                      zl[lo:hi] if zl is not None else None, gid[lo:hi] if gid is not None else None, gloss, gcount,
                      ignore_index, label_smoothing, opts)
        if grads:
            dz = z.to(gemm)
            grad_hidden[lo:hi] = dz @ wg
            if gw is not None:
                gw += (dz.T @ hc).float()
            if gb is not None:
                gb += z.sum(0)
    loss, token_out, z_out = _losses_out(token_loss, zl, scale, reduction)
    return (
        loss, token_out, lse, gloss, gcount, grad_hidden,
        gw.to(weight.dtype) if gw is not None else weight.new_zeros(0),
        gb.to(bias.dtype) if gb is not None else hidden.new_zeros(0),
        z_out,
    )


def linear_ce_backward(hidden, weight, labels, bias, lse, grad_token, ignore_index, label_smoothing, chunk_size,
                       softcap=0.0, logit_scale=1.0, z_loss=0.0):
    """Recompute-in-backward for an arbitrary per-token upstream gradient (see the reference)."""
    _check_dtype(hidden, "hidden")
    n, d = hidden.shape
    v = weight.shape[0]
    gemm = _gemm_dtype(hidden)
    y = labels.long().contiguous()
    lse32 = lse.float().contiguous()
    coef = grad_token.float().contiguous()
    wg = weight.to(gemm)
    bg = bias.to(gemm) if bias is not None else None
    grad_hidden = torch.empty_like(hidden)
    gw = torch.zeros(v, d, dtype=torch.float32, device=hidden.device)
    gb = torch.zeros(v, dtype=torch.float32, device=hidden.device) if bias is not None else None
    for lo in range(0, n, chunk_size):
        hi = min(n, lo + chunk_size)
        hc = hidden[lo:hi].to(gemm)
        z = _logits(hc, wg, bg)
        _rows_grad(z, y[lo:hi], coef[lo:hi], lse32[lo:hi], z, ignore_index, label_smoothing,
                   (softcap, logit_scale, z_loss))
        dz = z.to(gemm)
        grad_hidden[lo:hi] = dz @ wg
        gw += (dz.T @ hc).float()
        if gb is not None:
            gb += z.sum(0)
    return grad_hidden, gw.to(weight.dtype), gb.to(bias.dtype) if gb is not None else hidden.new_zeros(0)


def cross_entropy(logits, labels, group_ids, num_groups, ignore_index, label_smoothing, reduction, softcap=0.0,
                  logit_scale=1.0, z_loss=0.0):
    """Same contract as ``mixkernels.reference.linear_ce.cross_entropy``."""
    _check_dtype(logits, "logits")
    n, v = logits.shape
    dev = logits.device
    y = labels.long().contiguous()
    valid = y != ignore_index
    scale = _scale(valid, reduction)
    token_loss = torch.zeros(n, dtype=torch.float32, device=dev)
    lse = torch.zeros(n, dtype=torch.float32, device=dev)
    g = num_groups if group_ids is not None else 0
    gloss = torch.zeros(g, dtype=torch.float32, device=dev)
    gcount = torch.zeros(g, dtype=torch.int64, device=dev)
    gid = group_ids.long().contiguous() if group_ids is not None else None
    zl = torch.zeros(n, dtype=torch.float32, device=dev) if z_loss != 0.0 else None
    step = max(1, (1 << 22) // max(v, 1))  # bounds the fp32 copy of low-precision logits
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        z = logits[lo:hi].float().contiguous()  # only read without a gradient: no copy for fp32
        _rows_forward(z, y[lo:hi], None, lse[lo:hi], token_loss[lo:hi], zl[lo:hi] if zl is not None else None,
                      gid[lo:hi] if gid is not None else None, gloss, gcount, ignore_index, label_smoothing,
                      (softcap, logit_scale, z_loss))
    loss, token_out, z_out = _losses_out(token_loss, zl, scale, reduction)
    return loss, token_out, lse, gloss, gcount, z_out


def cross_entropy_backward(logits, labels, lse, grad_token, ignore_index, label_smoothing, softcap=0.0,
                           logit_scale=1.0, z_loss=0.0):
    """d loss / d logits in the logits dtype (reads the logits once, writes the gradient once)."""
    _check_dtype(logits, "logits")
    z = logits.contiguous()
    out = torch.empty_like(z)
    _rows_grad(z, labels.long().contiguous(), grad_token.float().contiguous(), lse.float().contiguous(), out,
               ignore_index, label_smoothing, (softcap, logit_scale, z_loss))
    return out
