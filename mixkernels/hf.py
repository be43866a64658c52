"""transformers integration: loss helpers and hooks for Hugging Face causal LMs.

Sections are owned by different features; keep each one contiguous.
"""

from __future__ import annotations

from typing import Any

import torch

from ._hf_router import RouterAuxLoss, RouterStatsCollector  # noqa: F401  (router statistics, aux loss)
from .ops.linear_ce import CrossEntropyOutput, linear_cross_entropy

# ==== causal_lm_loss (fused linear cross-entropy) ====================================

_LCE_KWARGS = frozenset({"ignore_index", "label_smoothing", "reduction", "return_token_loss", "chunk_size"})


def _base_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear]:
    """The decoder stack that returns last hidden states, and the LM head of ``model``."""
    if hasattr(model, "get_base_model"):
        # PEFT wrapper: PeftModelForCausalLM.model is the whole *ForCausalLM (with the LoRA
        # layers injected), not the decoder; unwrap it before looking for the decoder.
        model = model.get_base_model()
    head = getattr(model, "lm_head", None)
    if head is None and hasattr(model, "get_output_embeddings"):
        head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(
            f"mixkernels.hf.causal_lm_loss: {type(model).__name__} has no nn.Linear lm_head "
            f"(got {type(head).__name__}); expected a transformers *ForCausalLM model"
        )
    base = getattr(model, "model", None)
    if not isinstance(base, torch.nn.Module):
        base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "base_model", None)
    if base is None or base is model:
        raise TypeError(f"mixkernels.hf.causal_lm_loss: cannot find the base model of {type(model).__name__}")
    config = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "output_mult"):
        if getattr(config, attr, None) not in (None, 1.0):
            # These models transform the logits after lm_head; the fused op would silently differ.
            raise NotImplementedError(
                f"mixkernels.hf.causal_lm_loss: config.{attr}={getattr(config, attr)!r} rescales the logits; "
                "not supported by the fused loss"
            )
    return base, head


def causal_lm_loss(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    group_ids: torch.Tensor | None = None,
    num_groups: int | None = None,
    **kw: Any,
) -> CrossEntropyOutput:
    """Next-token cross-entropy of a transformers causal LM without materialising its logits.

    Runs the base model (``model.model``, else ``model.get_decoder()``) on ``input_ids`` [B, T]
    and feeds its last hidden states [B, T, d] and ``model.lm_head`` to
    :func:`mixkernels.linear_cross_entropy`. Labels are shifted as in transformers'
    ``ForCausalLMLoss``: position t predicts ``labels[:, t + 1]``, the last position predicts
    nothing; ``-100`` (``ignore_index``) marks tokens that do not count. ``labels=None`` uses
    ``input_ids`` with positions where ``attention_mask == 0`` ignored.

    ``group_ids``: [B] (one group per sequence, e.g. ``arange(B)`` for per-example losses) or
    [B, T] aligned with ``labels`` (the group of the *predicted* token counts). ``kw`` keys among
    ``ignore_index, label_smoothing, reduction, return_token_loss, chunk_size`` go to the loss;
    all others are passed to the base model (e.g. ``position_ids``). With reduction "none" the
    per-token losses are [B, T] aligned with the predicting position (0 at t = T - 1).

    MoE models: only the cross-entropy is returned (transformers adds the router auxiliary loss
    to ``.loss`` when ``output_router_logits`` is enabled; add it yourself if you want it).
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(
            f"mixkernels.hf.causal_lm_loss: input_ids must be a [B, T] tensor, got "
            f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__}"
        )
    loss_kw = {k: kw.pop(k) for k in list(kw) if k in _LCE_KWARGS}
    ignore_index = loss_kw.get("ignore_index", -100)
    base, head = _base_and_head(model)
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, ignore_index)
    if tuple(labels.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"mixkernels.hf.causal_lm_loss: labels has shape {tuple(labels.shape)} but input_ids has shape "
            f"{tuple(input_ids.shape)}; expected the same shape"
        )
    kw.setdefault("use_cache", False)
    outputs = base(input_ids=input_ids, attention_mask=attention_mask, **kw)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=ignore_index)
    if group_ids is not None and group_ids.dim() == 2:
        if tuple(group_ids.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"mixkernels.hf.causal_lm_loss: group_ids has shape {tuple(group_ids.shape)} but input_ids has "
                f"shape {tuple(input_ids.shape)}; expected [B] or the same shape"
            )
        group_ids = torch.nn.functional.pad(group_ids[:, 1:], (0, 1), value=0)
    weight = head.weight
    if weight.numel() == 0 and hasattr(weight, "ds_id"):
        # DeepSpeed ZeRO-3 gathers lm_head.weight only inside lm_head's own forward, which the
        # fused loss never calls.
        raise NotImplementedError(
            "mixkernels.hf.causal_lm_loss: lm_head.weight is partitioned by DeepSpeed ZeRO-3 (numel 0); "
            "use ZeRO stage 0-2, or gather it (deepspeed.zero.GatheredParameters) around the call"
        )
    if hidden.dtype != weight.dtype:  # e.g. autocast-free mixed setups: compute in the head's dtype
        hidden = hidden.to(weight.dtype)
    return linear_cross_entropy(
        hidden, weight, shifted.to(hidden.device), bias=head.bias,
        group_ids=group_ids, num_groups=num_groups, **loss_kw,
    )


# ==== end causal_lm_loss ======================================================================
