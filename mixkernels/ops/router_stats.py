"""router_stats: MoE router statistics for every layer and group in one fused pass, and the
Switch / Mixtral load-balancing loss computed from them.

    stats = mixkernels.router_stats(router_logits, top_k, group_ids=None, num_groups=1, mask=None)

    router_logits  [N, E], [L, N, E], or a list/tuple of L tensors [N, E] (transformers'
                   ``outputs.router_logits``); float32 / float16 / bfloat16, fp32 math
    group_ids      optional [N] int32/int64 in [0, num_groups) (checked on counted tokens only)
    mask           optional [N] bool; False tokens (padding) are not counted

    stats.expert_counts  int64   [L, G, E]  tokens of group g whose top-k set contains expert e
    stats.prob_sum       float32 [L, G, E]  sum over the group's tokens of softmax(logits)
    stats.token_count    int64   [G]        counted tokens per group
    stats.entropy_sum    float32 [L, G]     sum over the group's tokens of the routing entropy
    stats.aux_loss       float32 [L]        E * sum_e f_le * P_le, f = counts / T, P = probs / T
                                            (T = all counted tokens; equals transformers'
                                            load_balancing_loss_func for that one layer)

Top-k: the ``top_k`` largest softmax probabilities; exact ties go to the lower expert index
(``torch.topk`` itself does not promise which of several equal values it returns; for distinct
values the selected set is the same). No host synchronisation: on CUDA an out-of-range group id
trips a device-side assert (segment_sum's convention).

Autograd: ``prob_sum``, ``entropy_sum`` and ``aux_loss`` are differentiable w.r.t. the logits
(``expert_counts`` is piecewise constant, as in every MoE implementation of this loss). The
backward is one more fused pass: for a counted token of group g at layer l,
``dz = p * (a - <p, a>) - b * p * (log p + H)`` with a = dL/dprob_sum[l, g] (+ the aux-loss
term E * C_le / T^2 * dL/daux_l) and b = dL/dentropy_sum[l, g].

Backends: ``reference`` (mixkernels/reference/router_stats.py), ``cxx`` (csrc/router_stats.cpp,
csrc/cuda/router_stats_cuda.cu), ``triton`` (mixkernels/triton/router_stats.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree

from .. import _backend, _extension
from .._library import lib
from ..reference import router_stats as _reference
from ._common import INDEX_DTYPES, check_dtype, check_ids_in_range, check_same_device, check_tensor

OP = "router_stats"
BACKWARD_OP = "router_stats_backward"

RouterLogits = torch.Tensor | Sequence[torch.Tensor]
# float64 is accepted (float64 math and outputs) so gradcheck can run; the documented dtypes are
# float32 / float16 / bfloat16 with float32 math and outputs.
LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class RouterStats:
    """Router statistics of L layers, G groups, E experts (see ``mixkernels.router_stats``).

    ``expert_counts``, ``prob_sum``, ``token_count`` and ``entropy_sum`` are additive over
    disjoint token sets (micro-batches, ranks); ``aux_loss`` is a function of them
    (:meth:`merge` recomputes it).
    """

    expert_counts: torch.Tensor  # int64 [L, G, E]
    prob_sum: torch.Tensor  # float32 [L, G, E]
    token_count: torch.Tensor  # int64 [G]
    entropy_sum: torch.Tensor  # float32 [L, G]
    aux_loss: torch.Tensor  # float32 [L]

    @property
    def num_layers(self) -> int:
        return self.prob_sum.shape[0]

    @property
    def num_groups(self) -> int:
        return self.prob_sum.shape[1]

    @property
    def num_experts(self) -> int:
        return self.prob_sum.shape[2]

    def load_balancing_loss(self) -> torch.Tensor:
        """Scalar float32: transformers' ``load_balancing_loss_func`` over these tokens, layers
        pooled as transformers pools them (counts and probability sums added over layers, then
        E * sum_e (C_e / (L T)) * (P_e / (L T))). Differentiable through ``prob_sum``."""
        total = (self.token_count.sum().to(self.prob_sum.dtype) * self.num_layers).clamp_min(1.0)
        counts = self.expert_counts.sum((0, 1)).to(self.prob_sum.dtype)
        probs = self.prob_sum.sum((0, 1))
        return self.num_experts * (counts / total * (probs / total)).sum()

    def expert_load(self) -> torch.Tensor:
        """float32 [L, G, E]: each group's top-k assignment histogram normalised to sum to 1 per
        (layer, group) (all zeros for a group without tokens)."""
        counts = self.expert_counts.to(torch.float32)
        return counts / counts.sum(-1, keepdim=True).clamp_min(1.0)

    def mean_entropy(self) -> torch.Tensor:
        """float32 [L, G]: mean routing entropy per token of each group (0 without tokens)."""
        return self.entropy_sum / self.token_count.to(torch.float32).clamp_min(1.0)

    def merge(self, other: RouterStats) -> RouterStats:
        """Statistics of the union of two disjoint token sets with the same L, G, E."""
        if self.prob_sum.shape != other.prob_sum.shape:
            raise ValueError(
                f"RouterStats.merge: shapes [L, G, E] differ: {tuple(self.prob_sum.shape)} vs "
                f"{tuple(other.prob_sum.shape)}"
            )
        counts = self.expert_counts + other.expert_counts
        probs = self.prob_sum + other.prob_sum
        tokens = self.token_count + other.token_count
        return RouterStats(
            counts, probs, tokens, self.entropy_sum + other.entropy_sum,
            _reference.aux_loss_from_sums(counts, probs, tokens),
        )


pytree.register_dataclass(RouterStats)


# ---- argument checks -----------------------------------------------------------------------


def _as_layer_list(op: str, router_logits: RouterLogits, name: str = "router_logits") -> list[torch.Tensor]:
    """[N, E] / [L, N, E] / sequence of [N, E] -> list of L tensors [N, E] (views, no copies)."""
    if isinstance(router_logits, torch.Tensor):
        if router_logits.dim() == 2:
            layers = [router_logits]
        elif router_logits.dim() == 3:
            layers = list(router_logits.unbind(0))
        else:
            raise ValueError(
                f"mixkernels.{op}: {name} must be [N, E], [L, N, E] or a list of [N, E] tensors, "
                f"got shape {tuple(router_logits.shape)}"
            )
        if not layers:
            raise ValueError(f"mixkernels.{op}: {name} has L = 0 layers; expected at least one")
    elif isinstance(router_logits, (list, tuple)):
        if len(router_logits) == 0:
            raise ValueError(f"mixkernels.{op}: {name} is an empty {type(router_logits).__name__}; expected L >= 1 tensors")
        layers = list(router_logits)
    else:
        raise TypeError(
            f"mixkernels.{op}: {name} must be a tensor or a list/tuple of tensors, got {type(router_logits).__name__}"
        )
    first = layers[0]
    for i, t in enumerate(layers):
        check_tensor(op, f"{name}[{i}]", t)
        if t.dim() != 2:
            raise ValueError(f"mixkernels.{op}: {name}[{i}] must be [N, E], got shape {tuple(t.shape)}")
        check_dtype(op, f"{name}[{i}]", t, LOGIT_DTYPES)
        if i and t.shape != first.shape:
            raise ValueError(
                f"mixkernels.{op}: {name}[{i}] has shape {tuple(t.shape)} but {name}[0] has "
                f"{tuple(first.shape)}; every layer needs the same [N, E]"
            )
        if i and t.dtype != first.dtype:
            raise TypeError(
                f"mixkernels.{op}: {name}[{i}] is {str(t.dtype).removeprefix('torch.')} but {name}[0] is "
                f"{str(first.dtype).removeprefix('torch.')}; every layer needs the same dtype"
            )
        if i:
            check_same_device(op, f"{name}[0]", first, f"{name}[{i}]", t)
    if first.shape[1] == 0:
        raise ValueError(f"mixkernels.{op}: {name} has E = 0 experts")
    return layers


def _check_top_k(op: str, top_k: object, num_experts: int) -> None:
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= num_experts:
        raise ValueError(f"mixkernels.{op}: top_k must be an int in [1, E = {num_experts}], got {top_k!r}")


def _check(
    layers: list[torch.Tensor], top_k: int, group_ids: torch.Tensor | None, num_groups: int, mask: torch.Tensor | None
) -> None:
    n, num_experts = layers[0].shape
    _check_top_k(OP, top_k, num_experts)
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups < 1:
        raise ValueError(f"mixkernels.{OP}: num_groups must be an int >= 1, got {num_groups!r}")
    if mask is not None:
        check_tensor(OP, "mask", mask)
        if mask.dtype != torch.bool or mask.dim() != 1 or mask.shape[0] != n:
            raise ValueError(
                f"mixkernels.{OP}: mask must be bool [N] with N = {n} (router_logits rows), "
                f"got {str(mask.dtype).removeprefix('torch.')} {tuple(mask.shape)}"
            )
        check_same_device(OP, "router_logits", layers[0], "mask", mask)
    if group_ids is None:
        if num_groups != 1:
            raise ValueError(
                f"mixkernels.{OP}: num_groups = {num_groups} but group_ids is None; pass group_ids [N] "
                "(or num_groups=1 to put every token in group 0)"
            )
        return
    check_tensor(OP, "group_ids", group_ids)
    check_dtype(OP, "group_ids", group_ids, INDEX_DTYPES)
    if group_ids.dim() != 1 or group_ids.shape[0] != n:
        raise ValueError(
            f"mixkernels.{OP}: group_ids must be [N] with N = {n} (router_logits rows), got shape "
            f"{tuple(group_ids.shape)}"
        )
    check_same_device(OP, "router_logits", layers[0], "group_ids", group_ids)
    check_ids_in_range(OP, "group_ids", group_ids, num_groups, mask)


# ---- public functions ----------------------------------------------------------------------


def router_stats(
    router_logits: RouterLogits,
    top_k: int,
    *,
    group_ids: torch.Tensor | None = None,
    num_groups: int = 1,
    mask: torch.Tensor | None = None,
) -> RouterStats:
    """Per-layer, per-group routing statistics in one fused pass (see the module docstring).

    ``router_logits``: [N, E], [L, N, E] or a list/tuple of L tensors [N, E];
    ``group_ids``: None or int [N]; ``mask``: None or bool [N]. Returns :class:`RouterStats`
    on the logits' device.
    """
    layers = _as_layer_list(OP, router_logits)
    _check(layers, top_k, group_ids, num_groups, mask)
    chosen = _backend.select(OP, layers[0].device)
    if chosen == "cxx":
        out = torch.ops.mixkernels.router_stats(layers, top_k, group_ids, num_groups, mask)
    elif chosen == "triton":
        out = torch.ops.mixkernels.router_stats_triton(layers, top_k, group_ids, num_groups, mask)
    else:
        out = _reference.router_stats(layers, top_k, group_ids, num_groups, mask)
    prob_sum, entropy_sum, aux_loss, expert_counts, token_count = out
    return RouterStats(expert_counts, prob_sum, token_count, entropy_sum, aux_loss)


def load_balancing_loss(
    router_logits: RouterLogits | None,
    num_experts: int | None = None,
    top_k: int = 2,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor | int:
    """transformers' ``load_balancing_loss_func`` (Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE), from
    the fused ``router_stats`` pass; differentiable w.r.t. the router logits.

    ``router_logits``: a tuple/list of L tensors [B*S, E] (``outputs.router_logits``), or
    [L, N, E] / [N, E]; ``attention_mask``: None or [B, S] with B*S = N (non-zero = real token).
    Layers are pooled as transformers pools them: counts and probability sums are added over
    layers, then ``E * sum_e (C_e / (L T)) * (P_e / (L T))`` with T the counted tokens per layer.
    Returns a float32 scalar; ``0`` for ``router_logits=None``, as transformers does. Unlike
    transformers (which returns 0 for a list or a stacked tensor and NaN when every token is
    masked), lists and tensors are accepted and an all-masked batch gives 0.
    """
    op = "load_balancing_loss"
    if router_logits is None:
        return 0
    layers = _as_layer_list(op, router_logits)
    n, e = layers[0].shape
    if num_experts is None:
        num_experts = e
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts != e:
        raise ValueError(
            f"mixkernels.{op}: num_experts = {num_experts!r} but router_logits have E = {e} columns"
        )
    _check_top_k(op, top_k, e)
    mask = None
    if attention_mask is not None:
        check_tensor(op, "attention_mask", attention_mask)
        if attention_mask.numel() != n:
            raise ValueError(
                f"mixkernels.{op}: attention_mask has shape {tuple(attention_mask.shape)} "
                f"({attention_mask.numel()} tokens) but router_logits have N = {n} rows; expected [B, S] with B*S = N"
            )
        mask = attention_mask.reshape(-1).to(device=layers[0].device) != 0
    return router_stats(layers, top_k, mask=mask).load_balancing_loss()


# ---- registrations -------------------------------------------------------------------------


def _triton_impl(router_logits, top_k, group_ids, num_groups, mask=None):
    from ..triton import router_stats as triton_kernels

    if group_ids is not None:
        check_ids_in_range(OP, "group_ids", group_ids, num_groups, mask)
    return triton_kernels.router_stats(router_logits, top_k, group_ids, num_groups, mask)


def _fake(router_logits, top_k, group_ids, num_groups, mask=None):
    num_layers = len(router_logits)
    z = router_logits[0]
    num_experts = z.shape[1]
    acc = _reference.math_dtype(z.dtype)
    return (
        z.new_empty((num_layers, num_groups, num_experts), dtype=acc),
        z.new_empty((num_layers, num_groups), dtype=acc),
        z.new_empty((num_layers,), dtype=acc),
        z.new_empty((num_layers, num_groups, num_experts), dtype=torch.int64),
        z.new_empty((num_groups,), dtype=torch.int64),
    )


def _backward_fake(router_logits, group_ids, num_groups, mask, grad_prob_sum, grad_entropy_sum):
    return [torch.empty_like(z) for z in router_logits]


def _setup_context(ctx, inputs, output):
    router_logits, _top_k, group_ids, num_groups, mask = inputs
    _probs, _ent, _aux, counts, token_count = output
    ctx.save_for_backward(*router_logits, counts, token_count, *(t for t in (group_ids, mask) if t is not None))
    ctx.num_layers = len(router_logits)
    ctx.has_group_ids = group_ids is not None
    ctx.has_mask = mask is not None
    ctx.num_groups = num_groups


def _backward(ctx, grad_prob_sum, grad_entropy_sum, grad_aux, _grad_counts, _grad_token_count):
    saved = list(ctx.saved_tensors)
    num_layers = ctx.num_layers
    layers, (counts, token_count), rest = saved[:num_layers], saved[num_layers : num_layers + 2], saved[num_layers + 2 :]
    group_ids = rest.pop(0) if ctx.has_group_ids else None
    mask = rest.pop(0) if ctx.has_mask else None
    num_experts = layers[0].shape[1]
    shape = (num_layers, ctx.num_groups, num_experts)
    acc = _reference.math_dtype(layers[0].dtype)
    device = layers[0].device
    gp = torch.zeros(shape, dtype=acc, device=device) if grad_prob_sum is None else grad_prob_sum.to(acc)
    if grad_aux is not None:
        # aux_l = E * sum_e C_le P_le / T^2 with P_le = sum_g prob_sum[l, g, e]
        total = token_count.sum().to(acc).clamp_min(1.0)
        coef = grad_aux.to(acc).view(-1, 1) * (num_experts / (total * total)) * counts.sum(1).to(acc)
        gp = gp + coef.unsqueeze(1)
    ge = torch.zeros(shape[:2], dtype=acc, device=device) if grad_entropy_sum is None else grad_entropy_sum.to(acc)
    grads = torch.ops.mixkernels.router_stats_backward(layers, group_ids, ctx.num_groups, mask, gp.contiguous(), ge.contiguous())
    return list(grads), None, None, None, None


def _backward_reference(router_logits, group_ids, num_groups, mask, grad_prob_sum, grad_entropy_sum):
    return _reference.router_stats_backward(router_logits, group_ids, num_groups, mask, grad_prob_sum, grad_entropy_sum)


lib.impl(f"{OP}_triton", _triton_impl, "CPU")
lib.impl(f"{OP}_triton", _triton_impl, "CUDA")
if not _extension.has_kernel(f"mixkernels::{OP}", "CPU"):
    # Without _C the cxx op still exists and computes, through the reference.
    lib.impl(OP, _reference.router_stats, "CPU")
    lib.impl(OP, _reference.router_stats, "CUDA")
if not _extension.has_kernel(f"mixkernels::{BACKWARD_OP}", "CPU"):
    lib.impl(BACKWARD_OP, _backward_reference, "CPU")
if not _extension.has_kernel(f"mixkernels::{BACKWARD_OP}", "CUDA"):
    lib.impl(BACKWARD_OP, _backward_reference, "CUDA")
torch.library.register_fake(f"mixkernels::{BACKWARD_OP}", _backward_fake, lib=lib)
for _name in (OP, f"{OP}_triton"):
    torch.library.register_fake(f"mixkernels::{_name}", _fake, lib=lib)
    torch.library.register_autograd(f"mixkernels::{_name}", _backward, setup_context=_setup_context, lib=lib)
_backend.refresh_availability(OP)


def selftest_cases() -> list[tuple[str, tuple, dict]]:
    """Small random inputs for ``python -m mixkernels.info --selftest``: (case, args, kwargs)."""
    z = torch.randn(3, 41, 7)
    groups = torch.randint(0, 5, (41,))
    mask = torch.rand(41) > 0.25
    return [
        ("L=3 E=7 k=2 fp32", (z, 2), {}),
        ("L=3 E=7 k=3 groups mask", (z, 3), {"group_ids": groups, "num_groups": 5, "mask": mask}),
        ("list fp16 k=1", ([z[0].half(), z[1].half()], 1), {"group_ids": groups.int(), "num_groups": 5}),
        ("bf16 k=7", (z[0].bfloat16(), 7), {}),
        ("empty N", (z[:, :0], 2), {}),
    ]
