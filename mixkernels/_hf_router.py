"""``RouterStatsCollector``: per-domain MoE router statistics from transformers models via hooks.

    with mixkernels.hf.RouterStatsCollector(model, layers="all") as collector:
        model(input_ids=ids, attention_mask=am)
    stats = collector.stats(group_ids=seq_domain, num_groups=G, attention_mask=am)

Which modules are hooked (in model order, one per MoE layer):

* transformers 5.x routers: the ``*TopKRouter`` modules of Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE
  (and other models following the same pattern). Their forward returns
  ``(router_logits [B*S, E], scores, indices)``; the hook keeps ``router_logits``, the tensor
  transformers records as ``outputs.router_logits``. Dense layers (Qwen2-MoE ``mlp_only_layers``)
  have no router and are not counted.
* older layouts where the router is an ``nn.Linear`` called ``gate`` inside a sparse-MoE block
  (``block_sparse_moe.gate`` / ``mlp.gate`` with ``config.num_experts``/``num_local_experts``
  outputs; Qwen2-MoE's one-output ``shared_expert_gate`` is never taken);
* any ``nn.Linear`` (or module returning logits first) named by the user with ``router_names``.

A forward pre-hook on ``model`` records each call's batch shape [B, S] and its 2-D
``attention_mask``, so per-sequence ``group_ids`` [B] can be expanded to tokens, and
``stats(attention_mask="forward")`` excludes the padding each forward was called with. Logits are kept (detached, in their dtype) until
``stats()``, which runs the fused ``mixkernels.router_stats`` once per recorded forward and merges
the results; memory held is what ``output_router_logits=True`` holds. Router calls made while
autograd runs a backward (activation-checkpoint recomputation) are ignored, so checkpointed
training does not double count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .ops.router_stats import RouterStats, router_stats

_LEGACY_GATE_PARENTS = ("block_sparse_moe", "mlp", "moe", "feed_forward")


@dataclass
class _Forward:
    """One model forward: batch shape (when known), its attention mask, logits per collected layer."""

    batch_shape: tuple[int, int] | None
    attention_mask: torch.Tensor | None
    logits: list[list[torch.Tensor]] = field(default_factory=list)


def _is_router_class(module: nn.Module) -> bool:
    return type(module).__name__.endswith("TopKRouter")


def _config_num_experts(config: Any) -> int | None:
    for key in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _find_routers(model: nn.Module, router_names: Sequence[str] | None) -> list[tuple[str, nn.Module]]:
    modules = dict(model.named_modules())
    if router_names is not None:
        found = []
        for name in router_names:
            if name not in modules:
                candidates = [n for n, m in modules.items() if isinstance(m, nn.Linear)][:8]
                raise ValueError(
                    f"RouterStatsCollector: router_names entry {name!r} is not a module of the model; "
                    f"nn.Linear modules include {candidates}"
                )
            found.append((name, modules[name]))
        if not found:
            raise ValueError("RouterStatsCollector: router_names is empty; name at least one router module")
        return found
    routers = [(n, m) for n, m in modules.items() if _is_router_class(m)]
    if routers:
        return routers
    num_experts = _config_num_experts(getattr(model, "config", None))
    legacy = [
        (n, m)
        for n, m in modules.items()
        if isinstance(m, nn.Linear)
        and n.rsplit(".", 1)[-1] == "gate"
        and (n.count(".") >= 1 and n.rsplit(".", 2)[-2] in _LEGACY_GATE_PARENTS)
        and (num_experts is None or m.out_features == num_experts)
        and m.out_features > 1
    ]
    if not legacy:
        raise ValueError(
            f"RouterStatsCollector: found no MoE router in {type(model).__name__} (looked for *TopKRouter "
            "modules and nn.Linear '...mlp.gate' / '...block_sparse_moe.gate'); pass router_names=[...] "
            "naming the router modules"
        )
    return legacy


def _resolve_top_k(model: nn.Module, routers: list[tuple[str, nn.Module]], top_k: int | None) -> int:
    if top_k is None:
        from_module = getattr(routers[0][1], "top_k", None)
        config = getattr(model, "config", None)
        top_k = from_module if isinstance(from_module, int) else None
        for key in ("num_experts_per_tok", "moe_top_k", "top_k"):
            if top_k is None and isinstance(getattr(config, key, None), int):
                top_k = getattr(config, key)
        if top_k is None:
            raise ValueError(
                "RouterStatsCollector: top_k is None and neither the router nor model.config "
                "(num_experts_per_tok) says how many experts a token uses; pass top_k"
            )
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"RouterStatsCollector: top_k must be an int >= 1, got {top_k!r}")
    return top_k


def _select_layers(layers: str | Sequence[int], count: int) -> list[int]:
    if isinstance(layers, str):
        if layers == "all":
            return list(range(count))
        if layers == "last":
            return [count - 1]
        raise ValueError(f"RouterStatsCollector: layers must be 'all', 'last' or a list of ints, got {layers!r}")
    chosen = []
    for index in layers:
        if not isinstance(index, int) or isinstance(index, bool) or not -count <= index < count:
            raise ValueError(
                f"RouterStatsCollector: layers entry {index!r} is out of range for {count} MoE router layers "
                f"(valid: {-count} .. {count - 1})"
            )
        chosen.append(index % count)
    if not chosen:
        raise ValueError("RouterStatsCollector: layers is an empty list; choose at least one router layer")
    return sorted(set(chosen))  # model order


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"RouterStatsCollector: a router returned {type(output).__name__}; expected a logits tensor "
        "or a tuple whose first element is the logits"
    )


class RouterStatsCollector:
    """Context manager collecting router logits of an MoE model's forwards (see the module docstring).

    ``model``: a transformers Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE model (any head) or any MoE
    ``nn.Module`` with ``router_names``; ``top_k``: experts per token (None: the router's
    ``top_k`` or ``config.num_experts_per_tok``); ``layers``: ``"all"``, ``"last"`` or indices into
    the model's MoE router layers (negative allowed); ``router_names``: module names of the
    routers, in model order, when automatic discovery does not apply.
    """

    def __init__(
        self,
        model: nn.Module,
        top_k: int | None = None,
        layers: str | Sequence[int] = "all",
        *,
        router_names: Sequence[str] | None = None,
    ) -> None:
        self.model = model
        all_routers = _find_routers(model, router_names)
        self.top_k = _resolve_top_k(model, all_routers, top_k)
        self.layer_indices = _select_layers(layers, len(all_routers))
        self.router_names = [all_routers[i][0] for i in self.layer_indices]
        self._routers = [all_routers[i][1] for i in self.layer_indices]
        self._forwards: list[_Forward] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    # -- hooks ------------------------------------------------------------------------------

    def __enter__(self) -> RouterStatsCollector:  # noqa: PYI034
        if self._handles:
            raise RuntimeError("RouterStatsCollector is already active; it cannot be entered twice")
        self._handles.append(self.model.register_forward_pre_hook(self._on_model_forward, with_kwargs=True))
        for position, module in enumerate(self._routers):
            self._handles.append(module.register_forward_hook(self._router_hook(position)))
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove the hooks (collected logits are kept until ``stats()`` or ``reset()``)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _on_model_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        shape = tuple(ids.shape[:2]) if isinstance(ids, torch.Tensor) and ids.dim() >= 2 else None
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 and isinstance(args[1], torch.Tensor) else None)
        mask = mask.detach() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self._forwards.append(_Forward(shape, mask, [[] for _ in self._routers]))

    def _router_hook(self, position: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if torch._C._current_graph_task_id() != -1:
                return  # recomputation inside a backward (activation checkpointing)
            if not self._forwards:  # router called outside a model forward
                self._forwards.append(_Forward(None, None, [[] for _ in self._routers]))
            self._forwards[-1].logits[position].append(_first_tensor(output).detach())

        return hook

    # -- results ----------------------------------------------------------------------------

    @property
    def num_forwards(self) -> int:
        """Forward passes recorded since the last ``stats()`` / ``reset()``."""
        return len(self._forwards)

    def reset(self) -> None:
        """Drop everything collected so far."""
        self._forwards.clear()

    def stats(
        self,
        group_ids: torch.Tensor | Sequence[torch.Tensor] | None = None,
        num_groups: int = 1,
        attention_mask: torch.Tensor | Sequence[torch.Tensor] | str | None = None,
    ) -> RouterStats:
        """``RouterStats`` [L_collected, G, E] over every forward since the last call, then reset.

        ``group_ids``: per-sequence [B] (B summed over the recorded forwards, in call order), or
        per-token [B, S] / [N], or a list with one such tensor per forward; None puts every
        token in group 0. ``attention_mask``: [B, S] (all forwards with the same S) or a list per
        forward; non-zero = real token. ``None`` counts every token (padding included), as
        ``router_stats(mask=None)`` does; ``"forward"`` uses the 2-D ``attention_mask`` each
        forward was called with (every token for a forward called without one).
        """
        use_forward_masks = isinstance(attention_mask, str)
        if use_forward_masks and attention_mask != "forward":
            raise ValueError(
                f"RouterStatsCollector.stats(): attention_mask must be a tensor, a list of tensors, None or "
                f"'forward', got {attention_mask!r}"
            )
        forwards = [f for f in self._forwards if any(f.logits)]
        if not forwards:
            raise RuntimeError(
                "RouterStatsCollector.stats(): no router call recorded since the last stats(); run a forward "
                "inside the `with` block first"
            )
        per_forward_groups = _split_per_forward(group_ids, forwards, "group_ids")
        per_forward_masks = _split_per_forward(None if use_forward_masks else attention_mask, forwards, "attention_mask")
        total: RouterStats | None = None
        for i, (record, groups, mask) in enumerate(zip(forwards, per_forward_groups, per_forward_masks)):
            layers = _record_layers(record, i, self.router_names)
            n = layers[0].shape[0]
            token_groups = _tokens(groups, record, n, "group_ids", i)
            if use_forward_masks and record.attention_mask is not None:
                mask = record.attention_mask[:, -record.batch_shape[1]:] if record.batch_shape else record.attention_mask
            token_mask = _tokens(mask, record, n, "attention_mask", i)
            if token_mask is not None:
                token_mask = token_mask.to(device=layers[0].device) != 0
            if token_groups is not None:
                token_groups = token_groups.to(device=layers[0].device)
            result = router_stats(
                layers, self.top_k, group_ids=token_groups, num_groups=num_groups, mask=token_mask
            )
            total = result if total is None else total.merge(result)
        self.reset()
        assert total is not None
        return total


def _record_layers(record: _Forward, index: int, names: list[str],
                   where: str = "RouterStatsCollector.stats()") -> list[torch.Tensor]:
    counts = [len(calls) for calls in record.logits]
    if len(set(counts)) != 1:
        detail = ", ".join(f"{name}: {c}" for name, c in zip(names, counts))
        raise RuntimeError(
            f"{where}: forward {index} called the collected routers unevenly ({detail}); "
            "every collected layer must route the same tokens"
        )
    layers = [calls[0] if len(calls) == 1 else torch.cat(calls) for calls in record.logits]
    n = layers[0].shape[0]
    for name, t in zip(names, layers):
        if t.dim() != 2 or t.shape[0] != n:
            raise RuntimeError(
                f"{where}: router {name} produced logits of shape {tuple(t.shape)} in "
                f"forward {index}; expected [N = {n}, E] like the first collected router"
            )
    return layers


def _split_per_forward(
    value: torch.Tensor | Sequence[torch.Tensor] | None, forwards: list[_Forward], name: str
) -> list[torch.Tensor | None]:
    """One entry per forward: a list is taken as is; a tensor is split along dim 0 by the
    forwards' batch sizes (or used whole for a single forward)."""
    if value is None:
        return [None] * len(forwards)
    if isinstance(value, (list, tuple)):
        if len(value) != len(forwards):
            raise ValueError(
                f"RouterStatsCollector.stats(): {name} is a list of {len(value)} tensors but {len(forwards)} "
                "forwards were recorded; pass one per forward"
            )
        return list(value)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"RouterStatsCollector.stats(): {name} must be a tensor or a list of tensors, got {type(value).__name__}")
    if len(forwards) == 1:
        return [value]
    sizes = [f.batch_shape[0] if f.batch_shape else None for f in forwards]
    if None in sizes:
        raise ValueError(
            f"RouterStatsCollector.stats(): {len(forwards)} forwards recorded but their batch sizes are unknown "
            f"(no input_ids/inputs_embeds seen); pass {name} as a list with one tensor per forward"
        )
    if value.shape[0] != sum(sizes):
        raise ValueError(
            f"RouterStatsCollector.stats(): {name} has {value.shape[0]} rows but the {len(forwards)} recorded "
            f"forwards had batch sizes {sizes} (total {sum(sizes)})"
        )
    return list(value.split(sizes, dim=0))


def _tokens(value: torch.Tensor | None, record: _Forward, n: int, name: str, index: int) -> torch.Tensor | None:
    """Per-sequence [B] / per-token [B, S] or [N] -> per-token [N] in the router's row order."""
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"RouterStatsCollector.stats(): {name} must be a tensor, got {type(value).__name__}")
    if value.numel() == n:
        return value.reshape(n)
    shape = record.batch_shape
    if value.dim() == 1 and shape is not None and value.shape[0] == shape[0] and shape[0] * shape[1] == n:
        return value.repeat_interleave(shape[1])
    expected = f"[B] with B = {shape[0]} or [B, S] = {list(shape)}" if shape else f"[N] with N = {n}"
    raise ValueError(
        f"RouterStatsCollector.stats(): {name} for forward {index} has shape {tuple(value.shape)} but that "
        f"forward routed N = {n} tokens; expected {expected}"
    )


class RouterAuxLoss:
    """The load-balancing loss of an MoE model's forwards, differentiable w.r.t. the routers.

        aux = RouterAuxLoss(model)                     # hooks every MoE router
        out = model(input_ids=ids, attention_mask=am)  # or any forward through the decoder
        loss = out.loss + 0.02 * aux.loss(attention_mask=am)
        aux.remove()

    Each hooked router's logits of the forwards since the last ``loss()`` / ``reset()`` are kept
    *with* their autograd graph (unlike :class:`RouterStatsCollector`); ``loss()`` concatenates
    them per layer and returns the Switch / Mixtral load-balancing loss ``E * sum_e f_e * P_e``
    over them (f: fraction of top-k picks, P: mean routing probability):

    * ``per_layer=True`` (default): the mean over layers of each layer's own loss, as Switch,
      GShard, Megatron-LM and DeepSpeed-MoE apply it; every layer is pushed to balance.
    * ``per_layer=False``: transformers' ``load_balancing_loss_func`` (what Mixtral / Qwen-MoE
      models add with ``output_router_logits=True``): picks and probabilities are pooled over the
      layers first, so layers collapsed onto *different* experts look balanced (minimum k).

    Router calls made while autograd runs a backward (activation-checkpoint recomputation) are
    ignored. ``enabled = False`` pauses collection (e.g. for evaluation forwards).
    """

    def __init__(self, model: nn.Module, top_k: int | None = None, *, per_layer: bool = True,
                 router_names: Sequence[str] | None = None) -> None:
        routers = _find_routers(model, router_names)
        self.top_k = _resolve_top_k(model, routers, top_k)
        self.per_layer = per_layer
        self.router_names = [name for name, _ in routers]
        self.enabled = True
        self._logits: list[list[torch.Tensor]] = [[] for _ in routers]
        self._handles = [module.register_forward_hook(self._hook(i)) for i, (_, module) in enumerate(routers)]

    def _hook(self, position: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if self.enabled and torch._C._current_graph_task_id() == -1:
                self._logits[position].append(_first_tensor(output))

        return hook

    def reset(self) -> None:
        """Drop the logits kept so far (and their graphs)."""
        self._logits = [[] for _ in self._logits]

    def remove(self) -> None:
        """Remove the hooks and drop the kept logits."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.reset()

    def loss(self, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Scalar float32 load-balancing loss of the forwards since the last call (per layer or
        pooled, see the class docstring), then reset.

        ``attention_mask``: None (every routed token counts) or a tensor with one entry per
        routed token in call order ([B, S] for a single forward); non-zero = real token."""
        if not any(self._logits):
            raise RuntimeError("RouterAuxLoss.loss(): no router call recorded since the last loss(); run a forward first")
        record = _Forward(None, None, self._logits)
        layers = _record_layers(record, 0, self.router_names, "RouterAuxLoss.loss()")
        self.reset()
        mask = None
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.numel() != layers[0].shape[0]:
                got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
                raise ValueError(
                    f"RouterAuxLoss.loss(): attention_mask has shape {got} but the routers saw "
                    f"N = {layers[0].shape[0]} tokens; expected one entry per routed token"
                )
            mask = attention_mask.reshape(-1).to(device=layers[0].device) != 0
        stats = router_stats(layers, self.top_k, mask=mask)
        return stats.aux_loss.mean() if self.per_layer else stats.load_balancing_loss()
