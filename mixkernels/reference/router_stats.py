"""router_stats, pure-PyTorch reference: per-layer, per-group MoE router statistics.

For layer l, token t (counted when ``mask[t]``), group g = group_ids[t], logits z = z[l, t, :]::

    p        = softmax(float32(z))                       # [E], fp32 math whatever the input dtype
    S        = the top_k largest p_e; exact ties go to the lower expert index
    H        = -sum_e p_e log p_e                         # 0 log 0 = 0
    (float64 logits keep float64 math and float64 outputs, for gradcheck)

    expert_counts[l, g, e] = #{t in g : e in S_t}          int64   [L, G, E]
    prob_sum[l, g, e]      = sum_{t in g} p_e               float32 [L, G, E]
    token_count[g]         = #{t in g}                      int64   [G]
    entropy_sum[l, g]      = sum_{t in g} H_t               float32 [L, G]
    aux_loss[l]            = E * sum_e (C_le / T) * (P_le / T)         float32 [L]
                             C_le = sum_g expert_counts, P_le = sum_g prob_sum, T = sum_g token_count
                             (Switch / Mixtral load-balancing loss of layer l; 0 when T = 0)

No one-hot tensors: counts and sums are scattered with ``index_add`` into flat [L, G+1, E] bins,
where bin G receives the masked-out tokens and is dropped (so a NaN in a padding row cannot leak
into the statistics). Differentiable w.r.t. the logits through PyTorch's own autograd (counts
are piecewise constant and carry no gradient). The tie rule uses a stable descending sort, since
``torch.topk``'s choice among exactly equal values is unspecified (on CPU it does not prefer the
lower index).
"""

from __future__ import annotations

import torch


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float32/float16/bfloat16 logits; float64 logits (gradcheck) keep float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def topk_lower_index(probs: torch.Tensor, top_k: int) -> torch.Tensor:
    """Indices [..., top_k] of the ``top_k`` largest values of ``probs`` along the last dim; exact
    ties resolved toward the lower index (a stable descending sort)."""
    return torch.sort(probs, dim=-1, descending=True, stable=True).indices[..., :top_k]


def aux_loss_from_sums(
    expert_counts: torch.Tensor, prob_sum: torch.Tensor, token_count: torch.Tensor
) -> torch.Tensor:
    """Per-layer load-balancing loss [L] from the additive statistics (see the module docstring)."""
    num_experts = prob_sum.shape[-1]
    total = token_count.sum().to(prob_sum.dtype).clamp_min(1.0)
    frac_tokens = expert_counts.sum(1).to(prob_sum.dtype) / total  # [L, E]
    frac_probs = prob_sum.sum(1) / total  # [L, E]
    return num_experts * (frac_tokens * frac_probs).sum(-1)


def router_stats(
    router_logits: list[torch.Tensor] | tuple[torch.Tensor, ...],
    top_k: int,
    group_ids: torch.Tensor | None = None,
    num_groups: int = 1,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference of ``mixkernels.router_stats`` on a list of L tensors [N, E] (arguments already
    validated). Returns (prob_sum, entropy_sum, aux_loss, expert_counts, token_count): the op's
    output order (float outputs first)."""
    z = torch.stack([t.to(math_dtype(t.dtype)) for t in router_logits])  # [L, N, E]
    num_layers, n, num_experts = z.shape
    device = z.device
    bins = num_groups + 1  # bin num_groups collects masked-out tokens
    if group_ids is None:
        gid = torch.zeros(n, dtype=torch.long, device=device)
    else:
        gid = group_ids.long()
    if mask is not None:
        gid = torch.where(mask.to(torch.bool), gid, torch.full_like(gid, num_groups))

    log_p = torch.log_softmax(z, dim=-1)
    p = log_p.exp()
    # sum_e p log p with 0 log 0 = 0 (a -inf logit has p = 0 and must not give 0 * -inf)
    entropy = -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(-1)  # [L, N]
    chosen = topk_lower_index(p.detach(), top_k)  # [L, N, k]

    layer_base = torch.arange(num_layers, device=device).view(-1, 1, 1) * (bins * num_experts)
    flat = (layer_base + gid.view(1, -1, 1) * num_experts + chosen).reshape(-1)
    counts = torch.zeros(num_layers * bins * num_experts, dtype=torch.long, device=device)
    counts.index_add_(0, flat, torch.ones_like(flat))
    counts = counts.view(num_layers, bins, num_experts)[:, :num_groups]

    prob_sum = z.new_zeros(num_layers, bins, num_experts).index_add(1, gid, p)[:, :num_groups]
    entropy_sum = z.new_zeros(num_layers, bins).index_add(1, gid, entropy)[:, :num_groups]
    token_count = torch.zeros(bins, dtype=torch.long, device=device).index_add_(0, gid, torch.ones_like(gid))
    token_count = token_count[:num_groups]
    aux = aux_loss_from_sums(counts, prob_sum, token_count)
    return prob_sum.contiguous(), entropy_sum.contiguous(), aux, counts.contiguous(), token_count


def router_stats_backward(
    router_logits: list[torch.Tensor] | tuple[torch.Tensor, ...],
    group_ids: torch.Tensor | None,
    num_groups: int,
    mask: torch.Tensor | None,
    grad_prob_sum: torch.Tensor,
    grad_entropy_sum: torch.Tensor,
) -> list[torch.Tensor]:
    """Gradient w.r.t. each layer's logits [N, E] (in the logits' dtype), given
    a = ``grad_prob_sum`` float32 [L, G, E] and b = ``grad_entropy_sum`` float32 [L, G]:

        dz[l, t] = p * (a[l, g] - <p, a[l, g]>) - b[l, g] * p * (log p + H_t)   for counted t
        dz[l, t] = 0                                                          for masked t
    """
    z = torch.stack([t.to(math_dtype(t.dtype)) for t in router_logits])  # [L, N, E]
    n = z.shape[1]
    gid = torch.zeros(n, dtype=torch.long, device=z.device) if group_ids is None else group_ids.long()
    if mask is not None:
        gid = torch.where(mask.to(torch.bool), gid, torch.zeros_like(gid))
    log_p = torch.log_softmax(z, dim=-1)
    p = log_p.exp()
    a = grad_prob_sum.to(z.dtype).index_select(1, gid)  # [L, N, E]
    b = grad_entropy_sum.to(z.dtype).index_select(1, gid).unsqueeze(-1)  # [L, N, 1]
    plogp = torch.where(p > 0, p * log_p, torch.zeros_like(p))
    entropy = -plogp.sum(-1, keepdim=True)
    grad = p * (a - (p * a).sum(-1, keepdim=True)) - b * (plogp + p * entropy)
    if mask is not None:
        grad = torch.where(mask.to(torch.bool).view(1, -1, 1), grad, torch.zeros_like(grad))
    return [grad[i].to(t.dtype, copy=True) for i, t in enumerate(router_logits)]  # no aliasing outputs
