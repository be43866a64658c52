"""linear_cross_entropy / cross_entropy, pure-PyTorch chunked reference.

For token t with hidden row h_t [d], LM head W [V, d], optional bias b [V], label y_t, label
smoothing eps (PyTorch's definition: the target is (1 - eps) * onehot(y) + eps / V), logit scale
s (1: off), final-logit softcap C (0: off) and z-loss weight lam (0: off):

    r_t      = h_t W^T + b                                   (fp32, one row chunk at a time)
    u_t      = s r_t                                          (Cohere's logit_scale; Granite: s = 1 / d)
    z_t      = C tanh(u_t / C)  if C > 0  else u_t            (Gemma 2's final_logit_softcapping)
    lse_t    = log sum_j exp(z_tj)
    loss_t   = lse_t - (1 - eps) z_{t,y_t} - (eps / V) sum_j z_tj     (0 when y_t == ignore_index)
    zl_t     = lam lse_t^2                                    (0 when y_t == ignore_index)
    dz_tj    = c_t ((1 + 2 lam lse_t) softmax(z_t)_j - (1 - eps) [j == y_t] - eps / V)
               (c_t = upstream grad of loss_t + zl_t)
    dr_tj    = s (1 - (z_tj / C)^2) dz_tj   (softcap on)  or  s dz_tj
    dh_t     = dr_t W,    dW = sum_t dr_t^T h_t,    db = sum_t dr_t
    group_loss[g] = sum_{t : group_t = g, counted} loss_t,   group_count[g] = #{...}

The reduced loss is reduce(loss_t + zl_t); ``z_loss`` is reduce(zl_t) on its own, and token and
group losses are the pure cross-entropy loss_t.

Shapes: hidden [N, d], weight [V, d], labels [N] int64, group_ids [N] int64 (the public
wrappers flatten [B, T] inputs). Logits exist only one chunk of ``chunk_size`` rows at a time,
in fp32 (inputs are upcast); log-sum-exp, losses and group sums accumulate in fp32; gradients
are returned in the input dtype (the weight/bias gradients accumulate in fp32 across chunks).
fp64 inputs (accepted for gradcheck) stay fp64 throughout, losses included.

These functions have the exact signatures of the registered ops ``mixkernels::linear_ce`` /
``linear_ce_backward`` / ``cross_entropy`` / ``cross_entropy_backward`` (see
``mixkernels/_library.py``): they serve as the fallback implementation when ``_C`` is absent and
as the readable specification of every backend. ``reduction``: 0 = none, 1 = sum, 2 = mean.
"""

from __future__ import annotations

import torch

REDUCTION_NONE, REDUCTION_SUM, REDUCTION_MEAN = 0, 1, 2


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / loss dtype: fp32, except fp64 inputs (accepted for gradcheck) stay fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _token_scale(labels: torch.Tensor, ignore_index: int, reduction: int,
                 acc: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Counted-token mask [N] and the scale 1/count (mean) or 1 (sum) as a 0-dim tensor."""
    valid = labels != ignore_index
    count = valid.sum()
    if reduction == REDUCTION_MEAN:
        # all tokens ignored -> count 0 -> scale 1 (every term is 0 anyway): loss 0, never NaN
        scale = 1.0 / count.clamp(min=1).to(acc)
    else:
        scale = torch.ones((), dtype=acc, device=labels.device)
    return valid, scale


def _transform_(u: torch.Tensor, softcap: float, logit_scale: float) -> torch.Tensor:
    """In place: the final logits z = softcap(logit_scale * u) of raw acc-dtype logits u [R, V]."""
    if logit_scale != 1.0:
        u.mul_(logit_scale)
    if softcap > 0.0:
        u.div_(softcap).tanh_().mul_(softcap)
    return u


def _chain_(dz: torch.Tensor, z: torch.Tensor | None, softcap: float, logit_scale: float) -> torch.Tensor:
    """In place: d loss / d raw logits from d loss / d final logits ``dz`` (``z``: the final logits,
    needed only with softcap: d(C tanh(u / C)) / du = 1 - (z / C)^2)."""
    if softcap > 0.0:
        dz.mul_(1.0 - (z / softcap).square())
    if logit_scale != 1.0:
        dz.mul_(logit_scale)
    return dz


def _chunk_losses(z: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (loss, lse) of fp32 final logits z [R, V]; 0 loss where not valid."""
    lse = torch.logsumexp(z, dim=1)
    z_y = z.gather(1, torch.where(valid, y, 0).unsqueeze(1)).squeeze(1)
    loss = lse - (1.0 - label_smoothing) * z_y
    if label_smoothing != 0.0:
        loss = loss - label_smoothing * z.mean(dim=1)
    return torch.where(valid, loss, 0.0), lse


def _chunk_grad_(z: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor,
                 label_smoothing: float, z_loss: float = 0.0) -> torch.Tensor:
    """Overwrite fp32 final logits z [R, V] with dz = coef * ((1 + 2 z_loss lse) softmax - target);
    rows not valid -> 0."""
    v = z.shape[1]
    z.sub_(lse.unsqueeze(1)).exp_()
    if z_loss != 0.0:
        z.mul_((1.0 + 2.0 * z_loss * lse).unsqueeze(1))
    rows = torch.arange(z.shape[0], device=z.device)
    z[rows, torch.where(valid, y, 0)] -= 1.0 - label_smoothing
    if label_smoothing != 0.0:
        z.sub_(label_smoothing / v)
    z.mul_(torch.where(valid, coef, 0.0).unsqueeze(1))
    return z


def _groups(token_loss: torch.Tensor, valid: torch.Tensor, group_ids: torch.Tensor | None,
            num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    dev = token_loss.device
    if group_ids is None:
        return torch.zeros(0, dtype=token_loss.dtype, device=dev), torch.zeros(0, dtype=torch.int64, device=dev)
    gid = torch.where(valid, group_ids.long(), 0)
    group_loss = torch.zeros(num_groups, dtype=token_loss.dtype, device=dev).index_add_(0, gid, token_loss)
    group_count = torch.zeros(num_groups, dtype=torch.int64, device=dev).index_add_(0, gid, valid.long())
    return group_loss, group_count


def _reduce(token_loss: torch.Tensor, scale: torch.Tensor, reduction: int) -> torch.Tensor:
    if reduction == REDUCTION_NONE:
        return token_loss.clone()
    return token_loss.sum() * scale


def _z_loss_out(lse: torch.Tensor, valid: torch.Tensor, z_loss: float, scale: torch.Tensor,
                reduction: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token z-loss [N] (0 at ignored tokens), the z_loss output reduced like the loss, or an
    empty [0] tensor when z_loss is 0)."""
    if z_loss == 0.0:
        return torch.zeros_like(lse), lse.new_zeros(0)
    tok = torch.where(valid, z_loss * lse.square(), 0.0)
    return tok, _reduce(tok, scale, reduction)


def _outputs(token_loss, zl_tok, scale, reduction, z_loss):
    """(loss, token_loss output): the reduced CE + z-loss, and the CE per token ([0] for "none"
    without z-loss: the loss itself is then the token loss)."""
    loss = _reduce(token_loss + zl_tok if z_loss != 0.0 else token_loss, scale, reduction)
    if reduction == REDUCTION_NONE and z_loss == 0.0:
        token_loss = token_loss.new_zeros(0)
    return loss, token_loss


def linear_ce(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    group_ids: torch.Tensor | None,
    num_groups: int,
    ignore_index: int,
    label_smoothing: float,
    reduction: int,
    chunk_size: int,
    compute_grad: bool,
    weight_grad: bool = True,
    softcap: float = 0.0,
    logit_scale: float = 1.0,
    z_loss: float = 0.0,
) -> tuple[torch.Tensor, ...]:
    """Chunked forward; with ``compute_grad`` also the gradients of ``loss`` for upstream grad 1
    (those of weight and bias only with ``weight_grad``).

    Returns ``(loss, token_loss, lse, group_loss, group_count, grad_hidden, grad_weight, grad_bias,
    z_loss)``: loss is [N] for reduction none, else a 0-dim fp32 tensor (cross-entropy + z-loss);
    token_loss (pure cross-entropy) / lse are fp32 [N] (token_loss is [0] for reduction none
    without z-loss, where it equals loss); the gradients are empty [0] tensors unless
    ``compute_grad`` (only meaningful for sum/mean); z_loss is reduced like loss, [0] when off.
    """
    n, _ = hidden.shape
    v = weight.shape[0]
    labels = labels.long()
    acc = acc_dtype(hidden.dtype)
    valid, scale = _token_scale(labels, ignore_index, reduction, acc)
    grads = compute_grad and reduction != REDUCTION_NONE
    wgrad = grads and weight_grad
    w32 = weight.to(acc)
    b32 = bias.to(acc) if bias is not None else None
    token_loss = torch.zeros(n, dtype=acc, device=hidden.device)
    lse = torch.zeros(n, dtype=acc, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if grads else hidden.new_zeros(0)
    grad_w32 = torch.zeros(v, weight.shape[1], dtype=acc, device=hidden.device) if wgrad else None
    grad_b32 = torch.zeros(v, dtype=acc, device=hidden.device) if wgrad and bias is not None else None
    step = max(1, int(chunk_size))
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        h = hidden[lo:hi].to(acc)
        z = h @ w32.T
        if b32 is not None:
            z += b32
        _transform_(z, softcap, logit_scale)
        loss_c, lse_c = _chunk_losses(z, labels[lo:hi], valid[lo:hi], label_smoothing)
        token_loss[lo:hi] = loss_c
        lse[lo:hi] = lse_c
        if grads:
            z_final = z.clone() if softcap > 0.0 else None
            dz = _chunk_grad_(z, labels[lo:hi], valid[lo:hi], lse_c, scale.expand(hi - lo), label_smoothing, z_loss)
            _chain_(dz, z_final, softcap, logit_scale)
            grad_hidden[lo:hi] = (dz @ w32).to(hidden.dtype)
            if grad_w32 is not None:
                grad_w32.addmm_(dz.T, h)
            if grad_b32 is not None:
                grad_b32 += dz.sum(0)
    group_loss, group_count = _groups(token_loss, valid, group_ids, num_groups)
    zl_tok, zl_out = _z_loss_out(lse, valid, z_loss, scale, reduction)
    loss, token_loss = _outputs(token_loss, zl_tok, scale, reduction, z_loss)
    # every output is a distinct tensor (custom ops may not return aliases of one another)
    grad_weight = grad_w32.to(weight.dtype) if grad_w32 is not None else weight.new_zeros(0)
    grad_bias = grad_b32.to(bias.dtype) if grad_b32 is not None else hidden.new_zeros(0)
    return loss, token_loss, lse, group_loss, group_count, grad_hidden, grad_weight, grad_bias, zl_out


def linear_ce_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    lse: torch.Tensor,
    grad_token: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    chunk_size: int,
    softcap: float = 0.0,
    logit_scale: float = 1.0,
    z_loss: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Recompute-in-backward: gradients for an arbitrary fp32 per-token upstream gradient [N].

    Recomputes each chunk's logits from ``hidden``/``weight`` and uses the saved ``lse`` [N]
    (so the softmax needs no second reduction). Returns (grad_hidden, grad_weight, grad_bias)
    in the input dtypes; grad_bias is an empty [0] tensor without bias.
    """
    n = hidden.shape[0]
    labels = labels.long()
    valid = labels != ignore_index
    acc = acc_dtype(hidden.dtype)
    w32 = weight.to(acc)
    b32 = bias.to(acc) if bias is not None else None
    grad_hidden = torch.empty_like(hidden)
    grad_w32 = torch.zeros(weight.shape, dtype=acc, device=hidden.device)
    grad_b32 = torch.zeros(weight.shape[0], dtype=acc, device=hidden.device) if bias is not None else None
    coef = grad_token.to(acc)
    step = max(1, int(chunk_size))
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        h = hidden[lo:hi].to(acc)
        z = h @ w32.T
        if b32 is not None:
            z += b32
        _transform_(z, softcap, logit_scale)
        z_final = z.clone() if softcap > 0.0 else None
        dz = _chunk_grad_(z, labels[lo:hi], valid[lo:hi], lse[lo:hi], coef[lo:hi], label_smoothing, z_loss)
        _chain_(dz, z_final, softcap, logit_scale)
        grad_hidden[lo:hi] = (dz @ w32).to(hidden.dtype)
        grad_w32.addmm_(dz.T, h)
        if grad_b32 is not None:
            grad_b32 += dz.sum(0)
    grad_bias = grad_b32.to(bias.dtype) if grad_b32 is not None else hidden.new_zeros(0)
    return grad_hidden, grad_w32.to(weight.dtype), grad_bias


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    group_ids: torch.Tensor | None,
    num_groups: int,
    ignore_index: int,
    label_smoothing: float,
    reduction: int,
    softcap: float = 0.0,
    logit_scale: float = 1.0,
    z_loss: float = 0.0,
) -> tuple[torch.Tensor, ...]:
    """From given logits [N, V]: ``(loss, token_loss, lse, group_loss, group_count, z_loss)`` (as
    linear_ce). Processed in row chunks so the fp32 upcast of low-precision logits is one chunk at
    a time.
    """
    n, v = logits.shape
    labels = labels.long()
    acc = acc_dtype(logits.dtype)
    valid, scale = _token_scale(labels, ignore_index, reduction, acc)
    token_loss = torch.zeros(n, dtype=acc, device=logits.device)
    lse = torch.zeros(n, dtype=acc, device=logits.device)
    step = max(1, (1 << 24) // max(v, 1))
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        z = _transform_(logits[lo:hi].to(acc, copy=True), softcap, logit_scale)
        loss_c, lse_c = _chunk_losses(z, labels[lo:hi], valid[lo:hi], label_smoothing)
        token_loss[lo:hi] = loss_c
        lse[lo:hi] = lse_c
    group_loss, group_count = _groups(token_loss, valid, group_ids, num_groups)
    zl_tok, zl_out = _z_loss_out(lse, valid, z_loss, scale, reduction)
    loss, token_loss = _outputs(token_loss, zl_tok, scale, reduction, z_loss)
    return loss, token_loss, lse, group_loss, group_count, zl_out


def cross_entropy_backward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_token: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    softcap: float = 0.0,
    logit_scale: float = 1.0,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """d loss / d logits [N, V] in the logits dtype for an fp32 per-token upstream gradient [N]."""
    n, v = logits.shape
    labels = labels.long()
    valid = labels != ignore_index
    grad = torch.empty_like(logits)
    acc = acc_dtype(logits.dtype)
    coef = grad_token.to(acc)
    step = max(1, (1 << 24) // max(v, 1))
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        z = _transform_(logits[lo:hi].to(acc, copy=True), softcap, logit_scale)
        z_final = z.clone() if softcap > 0.0 else None
        dz = _chunk_grad_(z, labels[lo:hi], valid[lo:hi], lse[lo:hi], coef[lo:hi], label_smoothing, z_loss)
        grad[lo:hi] = _chain_(dz, z_final, softcap, logit_scale)
    return grad
