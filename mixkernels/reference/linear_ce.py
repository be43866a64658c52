"""linear_cross_entropy / cross_entropy, pure-PyTorch chunked reference.

For token t with hidden row h_t [d], LM head W [V, d], optional bias b [V], label y_t and label
smoothing eps (PyTorch's definition: the target is (1 - eps) * onehot(y) + eps / V):

    z_t      = h_t W^T + b                                   (fp32, one row chunk at a time)
    lse_t    = log sum_j exp(z_tj)
    loss_t   = lse_t - (1 - eps) z_{t,y_t} - (eps / V) sum_j z_tj     (0 when y_t == ignore_index)
    dz_tj    = c_t (softmax(z_t)_j - (1 - eps) [j == y_t] - eps / V)  (c_t = upstream grad of loss_t)
    dh_t     = dz_t W,    dW = sum_t dz_t^T h_t,    db = sum_t dz_t
    group_loss[g] = sum_{t : group_t = g, counted} loss_t,   group_count[g] = #{...}

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


def _chunk_losses(z: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (loss, lse) of fp32 logits z [R, V]; 0 loss where not valid."""
    lse = torch.logsumexp(z, dim=1)
    z_y = z.gather(1, torch.where(valid, y, 0).unsqueeze(1)).squeeze(1)
    loss = lse - (1.0 - label_smoothing) * z_y
    if label_smoothing != 0.0:
        loss = loss - label_smoothing * z.mean(dim=1)
    return torch.where(valid, loss, 0.0), lse


def _chunk_grad_(z: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor,
                 label_smoothing: float) -> torch.Tensor:
    """Overwrite fp32 logits z [R, V] with dz = coef * (softmax - target); rows not valid -> 0."""
    v = z.shape[1]
    z.sub_(lse.unsqueeze(1)).exp_()
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
) -> tuple[torch.Tensor, ...]:
    """Chunked forward; with ``compute_grad`` also the gradients of ``loss`` for upstream grad 1
    (those of weight and bias only with ``weight_grad``).

    Returns ``(loss, token_loss, lse, group_loss, group_count, grad_hidden, grad_weight, grad_bias)``:
    loss is [N] for reduction none, else a 0-dim fp32 tensor; token_loss/lse are fp32 [N];
    the gradients are empty [0] tensors unless ``compute_grad`` (only meaningful for sum/mean).
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
        loss_c, lse_c = _chunk_losses(z, labels[lo:hi], valid[lo:hi], label_smoothing)
        token_loss[lo:hi] = loss_c
        lse[lo:hi] = lse_c
        if grads:
            dz = _chunk_grad_(z, labels[lo:hi], valid[lo:hi], lse_c, scale.expand(hi - lo), label_smoothing)
            grad_hidden[lo:hi] = (dz @ w32).to(hidden.dtype)
            if grad_w32 is not None:
                grad_w32.addmm_(dz.T, h)
            if grad_b32 is not None:
                grad_b32 += dz.sum(0)
    group_loss, group_count = _groups(token_loss, valid, group_ids, num_groups)
    loss = _reduce(token_loss, scale, reduction)
    # every output is a distinct tensor (custom ops may not return aliases of one another)
    grad_weight = grad_w32.to(weight.dtype) if grad_w32 is not None else weight.new_zeros(0)
    grad_bias = grad_b32.to(bias.dtype) if grad_b32 is not None else hidden.new_zeros(0)
    if reduction == REDUCTION_NONE:
        token_loss = token_loss.new_zeros(0)
    return loss, token_loss, lse, group_loss, group_count, grad_hidden, grad_weight, grad_bias


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
        dz = _chunk_grad_(z, labels[lo:hi], valid[lo:hi], lse[lo:hi], coef[lo:hi], label_smoothing)
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
) -> tuple[torch.Tensor, ...]:
    """From given logits [N, V]: ``(loss, token_loss, lse, group_loss, group_count)`` (as linear_ce).

    Processed in row chunks so the fp32 upcast of low-precision logits is one chunk at a time.
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
        loss_c, lse_c = _chunk_losses(logits[lo:hi].to(acc), labels[lo:hi], valid[lo:hi], label_smoothing)
        token_loss[lo:hi] = loss_c
        lse[lo:hi] = lse_c
    group_loss, group_count = _groups(token_loss, valid, group_ids, num_groups)
    loss = _reduce(token_loss, scale, reduction)
    if reduction == REDUCTION_NONE:
        token_loss = token_loss.new_zeros(0)
    return loss, token_loss, lse, group_loss, group_count


def cross_entropy_backward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_token: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
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
        z = logits[lo:hi].to(acc, copy=True)
        grad[lo:hi] = _chunk_grad_(z, labels[lo:hi], valid[lo:hi], lse[lo:hi], coef[lo:hi], label_smoothing)
    return grad
