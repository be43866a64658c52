"""transformers integration: loss helpers and hooks for Hugging Face causal LMs.

Sections are owned by different features; keep each one contiguous.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from ._hf_router import RouterAuxLoss, RouterStatsCollector  # noqa: F401  (router statistics, aux loss)
from .ops.linear_ce import CrossEntropyOutput, linear_cross_entropy

# ==== fused LM head: causal_lm_loss and apply/remove ===========================================
#
# How the fused loss reaches the model's last hidden states, for any architecture: the model's own
# forward runs with ``labels=None`` while its LM head (an ``nn.Linear``) is swapped for a stub that
# records its input and returns tiny probe logits [B, T, 5] with known values instead of [B, T, V].
# Whatever the forward does to its logits it does to the probe, which is then checked against the
# transform the fused op will apply (scale / softcap read from the config): an architecture that
# post-processes its logits in any other way is refused, never silently different. The fused loss
# is then computed by calling the head module again, with its forward swapped for
# ``linear_cross_entropy``: going through the module's ``__call__`` keeps every framework hook
# working (DeepSpeed ZeRO-3 gathers the partitioned weight for the call and again for its backward;
# FSDP2 unshards it), exactly as for the ordinary head.
#
# Also refused, each with one NotImplementedError / TypeError naming the reason: a head that is not a
# plain nn.Linear, a head whose width is not config.vocab_size, and a forward that computes its loss
# itself instead of with transformers' shifted ForCausalLM loss (docs/hf_zoo.md lists them all).

_LCE_KWARGS = frozenset({"ignore_index", "label_smoothing", "reduction", "return_token_loss", "chunk_size"})

# model_type -> why the fused loss would differ from the model's own ``labels=`` loss, for
# architectures whose config does not reveal it (found by tests/test_hf_zoo.py).
_REFUSED_MODEL_TYPES: dict[str, str] = {}


# model_types whose forward multiplies (not divides) the logits by config.logits_scaling
_MULTIPLYING_LOGITS_SCALING = frozenset({"hyperclovax"})

# What the recording head returns instead of logits: a few known values per position. Whatever the
# forward then does to the logits, it does to these; the result must be what the fused op applies
# (the config's scale / softcap), else the architecture is refused. Catches transforms no config
# attribute announces, and shape changes (vocabulary slicing, masking of token ids).
_PROBE = (-3.0, -0.5, 0.25, 2.0, 9.0)


def _op_options() -> frozenset[str]:
    return frozenset(inspect.signature(linear_cross_entropy).parameters)


@dataclass(frozen=True)
class _LogitTransform:
    """logits -> softcap * tanh(scale * z / softcap) (scale first), as read from the config."""

    logit_scale: float = 1.0
    softcap: float | None = None

    def op_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        if self.logit_scale != 1.0:
            kw["logit_scale"] = self.logit_scale
        if self.softcap is not None:
            kw["softcap"] = self.softcap
        return kw


def _text_config(model: torch.nn.Module) -> Any:
    config = getattr(model, "config", None)
    get = getattr(config, "get_text_config", None)
    try:
        return get() if callable(get) else config
    except ValueError:  # several text sub-configs (e.g. encoder and decoder): the top-level one
        return config


def _logit_transform(model: torch.nn.Module, who: str) -> _LogitTransform:
    """The logit transform the model's config announces (scale, then softcap); raises
    NotImplementedError (naming the config attribute) when the fused op has no such option.

    Which part the forward really applies is settled by the probe (:func:`_probe_transform`):
    some forwards ignore an attribute their config carries (MPT's ``logit_scale``, the multimodal
    Gemma 3's softcap)."""
    configs = [c for c in (_text_config(model), getattr(model, "config", None)) if c is not None]

    def read(attr: str) -> Any:
        for c in configs:
            value = getattr(c, attr, None)
            if value is not None:
                return value
        return None

    options = _op_options()
    scale, softcap, found = 1.0, None, []
    value = read("final_logit_softcapping")  # Gemma 2/3: z -> c tanh(z / c)
    if value is not None:
        softcap, found = float(value), [*found, ("final_logit_softcapping", value, "softcap")]
    # multipliers: Cohere logit_scale, Falcon-H1 lm_head_multiplier, output_multiplier
    for attr in ("logit_scale", "lm_head_multiplier", "output_multiplier", "output_mult"):
        value = read(attr)
        if isinstance(value, (int, float)) and float(value) != 1.0:
            scale, found = scale * float(value), [*found, (attr, value, "logit_scale")]
    value = read("logits_scaling")  # Granite, MiniCPM: logits / logits_scaling; HyperCLOVA X: logits * it
    if isinstance(value, (int, float)) and float(value) != 1.0:
        multiplies = getattr(_text_config(model), "model_type", None) in _MULTIPLYING_LOGITS_SCALING
        scale = scale * float(value) if multiplies else scale / float(value)
        found = [*found, ("logits_scaling", value, "logit_scale")]
    for attr, value, option in found:
        if option not in options:
            raise NotImplementedError(
                f"{who}: config.{attr}={value!r} transforms the logits after the LM head, and this mixkernels build's "
                f"linear_cross_entropy has no {option!r} option; the fused loss would differ from the model's own loss"
            )
    return _LogitTransform(scale, softcap)


def _apply_transform(z: torch.Tensor, t: _LogitTransform) -> torch.Tensor:
    z = z * t.logit_scale
    return z if t.softcap is None else t.softcap * torch.tanh(z / t.softcap)


def _probe_transform(got: torch.Tensor, announced: _LogitTransform, low_precision: bool) -> _LogitTransform | None:
    """The transform (among the announced one and its parts) that maps the probe to ``got``, or None."""
    probe = torch.tensor(_PROBE, dtype=torch.float64)
    candidates = [announced, _LogitTransform(announced.logit_scale, None), _LogitTransform(1.0, announced.softcap),
                  _LogitTransform()]
    for t in candidates:
        if torch.allclose(got, _apply_transform(probe, t), rtol=1e-2 if low_precision else 1e-5, atol=1e-6):
            return t
    return None


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper (PeftModel.get_base_model()), else ``model``."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _head(model: torch.nn.Module, who: str) -> torch.nn.Linear:
    inner = _unwrap(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None:
        head = getattr(inner, "lm_head", None)
    if not isinstance(head, torch.nn.Linear) or type(head).forward is not torch.nn.Linear.forward:
        raise TypeError(
            f"{who}: {type(inner).__name__} has no plain nn.Linear LM head (get_output_embeddings() is "
            f"{type(head).__name__}); expected a transformers *ForCausalLM model (a LoRA adapter on the head "
            "itself is not supported)"
        )
    return head


def _check_model(model: torch.nn.Module, who: str) -> tuple[torch.nn.Linear, _LogitTransform]:
    """The LM head and logit transform of ``model``; raises for architectures the fused loss cannot match."""
    inner = _unwrap(model)
    model_type = getattr(getattr(inner, "config", None), "model_type", None)
    if model_type in _REFUSED_MODEL_TYPES:
        raise NotImplementedError(f"{who}: {type(inner).__name__}: {_REFUSED_MODEL_TYPES[model_type]}")
    head = _head(model, who)
    transform = _logit_transform(inner, who)
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING
    except ImportError:  # pragma: no cover - transformers without the loss registry
        LOSS_MAPPING = None
    vocab = getattr(_text_config(inner), "vocab_size", None)
    if isinstance(vocab, int) and head.out_features != vocab:
        raise NotImplementedError(
            f"{who}: the LM head of {type(inner).__name__} has {head.out_features} outputs but config.vocab_size="
            f"{vocab}; the model's loss uses vocab_size classes, the fused loss would use {head.out_features}"
        )
    if not _uses_loss_function(type(inner)):
        raise NotImplementedError(
            f"{who}: {type(inner).__name__}.forward computes its loss itself (not with transformers' "
            "self.loss_function, the shifted ForCausalLM cross-entropy; e.g. labels already aligned with the "
            "positions, no next-token shift); the fused loss would differ"
        )
    loss_fn = getattr(type(inner), "loss_function", None)
    if LOSS_MAPPING is not None and isinstance(loss_fn, property):
        try:
            fn = inner.loss_function
        except Exception:  # noqa: BLE001  (a model without a resolvable loss: the zoo test checks it)
            fn = None
        if fn is not None and fn is not LOSS_MAPPING.get("ForCausalLM"):
            loss_type = getattr(inner.config, "loss_type", None) or type(inner).__name__
            raise NotImplementedError(
                f"{who}: {type(inner).__name__} uses the loss {getattr(fn, '__name__', fn)!r} (config.loss_type="
                f"{loss_type!r}), not the standard shifted cross-entropy ForCausalLM; not supported by the fused loss"
            )
    return head, transform


@functools.cache
def _uses_loss_function(cls: type) -> bool:
    """Whether ``cls.forward`` computes its labels loss with ``self.loss_function`` (transformers'
    loss registry: the shifted cross-entropy for causal LMs), read from its source."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "self.loss_function(" in source


class _Recorder:
    def __init__(self) -> None:
        self.inputs: list[torch.Tensor] = []


@contextmanager
def _swapped_forward(module: torch.nn.Module, fn: Any) -> Iterator[None]:
    """Temporarily replace ``module.forward`` (an instance attribute; hooks still run around it)."""
    had = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    module.forward = fn
    try:
        yield
    finally:
        if had:
            module.forward = previous
        else:
            del module.forward


def _run_recording_head(
    call: Any, head: torch.nn.Linear, who: str, model: torch.nn.Module, transform: _LogitTransform
) -> tuple[Any, torch.Tensor, _LogitTransform]:
    """Run ``call()`` (the model's forward without labels) with the head recording its input and
    returning probe logits; return (model outputs, the head's input [B, T, d], the logit transform
    the forward applied to the probe: ``transform`` or a part of it), or raise if it matches none."""
    rec = _Recorder()

    def record(x: torch.Tensor) -> torch.Tensor:
        rec.inputs.append(x)
        probe = torch.tensor(_PROBE, dtype=torch.float32, device=x.device).to(head.weight.dtype)
        return probe.expand(*x.shape[:-1], len(_PROBE)).clone()

    with _swapped_forward(head, record):
        try:
            outputs = call()
        except Exception as e:
            if not rec.inputs:
                raise
            raise NotImplementedError(
                f"{who}: {type(_unwrap(model)).__name__}.forward post-processes the logits of its LM head "
                f"({type(e).__name__}: {e}); not supported by the fused loss"
            ) from e
    name = type(_unwrap(model)).__name__
    if len(rec.inputs) != 1:
        raise NotImplementedError(
            f"{who}: {name}.forward called its LM head {len(rec.inputs)} times (expected once); not supported by "
            "the fused loss"
        )
    hidden = rec.inputs[0]
    logits = getattr(outputs, "logits", None)
    expected_shape = (*hidden.shape[:-1], len(_PROBE))
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != expected_shape:
        raise NotImplementedError(
            f"{who}: {name}.forward does not return its LM head's output as logits of shape [B, T, V] "
            f"(got {tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__} for a "
            f"head output of shape {expected_shape}); not supported by the fused loss"
        )
    got = logits.detach().reshape(-1, len(_PROBE))[0].double().cpu()
    applied = _probe_transform(got, transform, logits.dtype in (torch.float16, torch.bfloat16))
    if applied is None:
        expected = [round(v, 4) for v in _apply_transform(torch.tensor(_PROBE, dtype=torch.float64), transform).tolist()]
        raise NotImplementedError(
            f"{who}: {name}.forward transforms the logits after the LM head in a way not described by its config "
            f"(probe {list(_PROBE)} -> {[round(v, 4) for v in got.tolist()]}; its config announces {expected}); "
            "not supported by the fused loss"
        )
    return outputs, hidden, applied


def _fused_head_loss(
    head: torch.nn.Linear,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    transform: _LogitTransform,
    **loss_kw: Any,
) -> CrossEntropyOutput:
    """``linear_cross_entropy(hidden, head.weight, targets)`` computed inside ``head.__call__``."""
    result: list[CrossEntropyOutput] = []

    def fused(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        weight = head.weight
        if weight.numel() == 0 and hasattr(weight, "ds_id"):
            raise RuntimeError(
                "mixkernels.hf: lm_head.weight is still partitioned by DeepSpeed ZeRO-3 inside the head's forward "
                "(numel 0); is the model wrapped by deepspeed.initialize?"
            )
        if x.dtype != weight.dtype:  # mixed setups without autocast: compute in the head's dtype
            x = x.to(weight.dtype)
        out = linear_cross_entropy(x, weight, targets.to(x.device), bias=head.bias, **transform.op_kwargs(), **loss_kw)
        result.append(out)
        # returned as a module output, so ZeRO-3 / FSDP hook the loss for the head's backward
        return (out.loss,)

    with _swapped_forward(head, fused):
        (loss,) = head(hidden)
    out = result[0]
    out.loss = loss
    return out


def _shift(t: torch.Tensor, fill: int) -> torch.Tensor:
    """Position t gets ``t[:, t + 1]``; the last position gets ``fill``."""
    return torch.nn.functional.pad(t[..., 1:], (0, 1), value=fill)


def _check_shape(who: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if tuple(t.shape) != tuple(ref.shape):
        raise ValueError(
            f"{who}: {name} has shape {tuple(t.shape)} but {ref_name} has shape {tuple(ref.shape)}; expected the same shape"
        )


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

    Runs ``model`` on ``input_ids`` [B, T] (its own forward, without labels, with its LM head
    recording the last hidden states [B, T, d] instead of computing logits) and feeds those and
    the head's weight to :func:`mixkernels.linear_cross_entropy`. Labels are shifted as in
    transformers' ``ForCausalLMLoss``: position t predicts ``labels[:, t + 1]``, the last position
    predicts nothing; ``-100`` (``ignore_index``) marks tokens that do not count. ``labels=None``
    uses ``input_ids`` with positions where ``attention_mask == 0`` ignored. Logit transforms read
    from the config (Gemma 2 ``final_logit_softcapping``, Cohere ``logit_scale``, Granite
    ``logits_scaling``) are applied by the op; architectures whose loss the op cannot reproduce
    raise ``NotImplementedError`` naming why. Under DeepSpeed ZeRO-3 the partitioned head weight is
    gathered by ZeRO's own module hooks (the loss is computed inside the head module's call).

    ``group_ids``: [B] (one group per sequence, e.g. ``arange(B)`` for per-example losses) or
    [B, T] aligned with ``labels`` (the group of the *predicted* token counts). ``kw`` keys among
    ``ignore_index, label_smoothing, reduction, return_token_loss, chunk_size`` go to the loss;
    all others are passed to the model (e.g. ``position_ids``). With reduction "none" the
    per-token losses are [B, T] aligned with the predicting position (0 at t = T - 1).

    MoE models: only the cross-entropy is returned (transformers adds the router auxiliary loss
    to ``.loss`` when ``output_router_logits`` is enabled; :func:`apply` does the same).
    """
    who = "mixkernels.hf.causal_lm_loss"
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(
            f"{who}: input_ids must be a [B, T] tensor, got "
            f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__}"
        )
    loss_kw = {k: kw.pop(k) for k in list(kw) if k in _LCE_KWARGS}
    ignore_index = loss_kw.get("ignore_index", -100)
    head, transform = _check_model(model, who)
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, ignore_index)
    _check_shape(who, "labels", labels, "input_ids", input_ids)
    if group_ids is not None and group_ids.dim() == 2:
        if tuple(group_ids.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"{who}: group_ids has shape {tuple(group_ids.shape)} but input_ids has "
                f"shape {tuple(input_ids.shape)}; expected [B] or the same shape"
            )
        group_ids = _shift(group_ids, 0)
    kw.setdefault("use_cache", False)
    kw["return_dict"] = True
    _, hidden, transform = _run_recording_head(
        lambda: model(input_ids=input_ids, attention_mask=attention_mask, **kw), head, who, model, transform
    )
    if tuple(hidden.shape[:-1]) != tuple(input_ids.shape):
        raise NotImplementedError(
            f"{who}: the LM head of {type(_unwrap(model)).__name__} received hidden states of shape "
            f"{tuple(hidden.shape)}, not [B, T, d] for input_ids {tuple(input_ids.shape)}; not supported"
        )
    return _fused_head_loss(head, hidden, _shift(labels, ignore_index), transform,
                            group_ids=group_ids, num_groups=num_groups, **loss_kw)


# ---- apply / remove: the fused loss inside model(..., labels=...) ----------------------------

_STATE = "_mixkernels_fused_loss"


@dataclass
class _Applied:
    forward: Any  # the instance attribute ``forward`` before apply, or None
    had_forward: bool
    chunk_size: int | None


def apply(model: torch.nn.Module, *, chunk_size: int | None = None) -> torch.nn.Module:
    """Patch a transformers causal LM (in place; returns it) so that calls with labels compute the
    fused loss and return no logits; calls without labels are unchanged.

    ``model(input_ids, attention_mask=..., labels=...)`` (or ``shift_labels=...``) then returns the
    model's usual output with ``loss`` from :func:`mixkernels.linear_cross_entropy` and
    ``logits=None``. transformers' loss conventions are kept: ``labels`` unshifted ([B, T], position
    t predicts ``labels[:, t + 1]``) or ``shift_labels`` already aligned with the positions;
    ``ignore_index`` (default -100); ``num_items_in_batch`` (what ``Trainer`` passes under gradient
    accumulation: loss = sum of token losses / num_items_in_batch, else the mean over counted
    tokens); logit softcapping / scaling read from the config; for MoE models with
    ``output_router_logits``, ``router_aux_loss_coef * aux_loss`` is added as transformers does.

    Extra keywords of the patched forward (all optional, only with labels):

    * ``group_ids`` [B] (one group per sequence; ``arange(B)`` gives per-example losses) or [B, T]
      aligned with ``labels`` (the group of the predicted token), with ``num_groups`` G: the output
      gains ``group_loss`` fp32 [G] (sum of token losses per group, detached) and ``group_count``
      int64 [G] (counted tokens per group). Per-group mean = ``group_loss / group_count``.
    * ``return_token_loss=True``: ``token_loss`` fp32 [B, T] (detached; aligned with the predicting
      position, 0 where nothing is predicted).

    ``model`` may be a PEFT wrapper (the transformers model inside it is patched); the head must be
    a plain ``nn.Linear``. ``chunk_size`` is passed to the op (None: automatic). Works under
    DeepSpeed ZeRO-3 and FSDP2: the loss is computed inside the head module's call, so their hooks
    gather the head weight. Undo with :func:`remove`. Raises ``NotImplementedError`` (naming the
    reason) for architectures whose loss the fused op cannot reproduce (see docs/hf_zoo.md).
    """
    who = "mixkernels.hf.apply"
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{who}: model must be a torch.nn.Module, got {type(model).__name__}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"{who}: chunk_size must be None or an int >= 1, got {chunk_size!r}")
    inner = _unwrap(model)
    _check_model(inner, who)
    if getattr(inner, _STATE, None) is not None:
        remove(inner)
    state = _Applied(inner.__dict__.get("forward"), "forward" in inner.__dict__, chunk_size)
    original = inner.forward
    patched = functools.wraps(original)(functools.partial(_patched_forward, inner, original, chunk_size))
    sig = inspect.signature(original)
    params = list(sig.parameters.values())
    extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d)
             for n, d in (("group_ids", None), ("num_groups", None), ("return_token_loss", False))
             if n not in sig.parameters]
    var_kw = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    params = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD] + extra + var_kw
    patched.__signature__ = sig.replace(parameters=params)
    inner.forward = patched
    setattr(inner, _STATE, state)
    return model


def remove(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`apply` on ``model`` (or the transformers model inside a PEFT wrapper); returns it."""
    inner = _unwrap(model)
    state = getattr(inner, _STATE, None)
    if state is None:
        raise ValueError(f"mixkernels.hf.remove: {type(inner).__name__} was not patched by mixkernels.hf.apply")
    if state.had_forward:
        inner.forward = state.forward
    else:
        del inner.forward
    delattr(inner, _STATE)
    return model


def is_applied(model: torch.nn.Module) -> bool:
    """Whether :func:`apply` patched ``model`` (or the transformers model inside a PEFT wrapper)."""
    return getattr(_unwrap(model), _STATE, None) is not None


def _patched_forward(
    model: torch.nn.Module,
    original: Any,
    chunk_size: int | None,
    *args: Any,
    labels: torch.Tensor | None = None,
    group_ids: torch.Tensor | None = None,
    num_groups: int | None = None,
    return_token_loss: bool = False,
    **kwargs: Any,
) -> Any:
    who = f"mixkernels.hf.apply ({type(model).__name__}.forward)"
    shift_labels = kwargs.pop("shift_labels", None)
    if labels is None and shift_labels is None:
        if group_ids is not None or num_groups is not None or return_token_loss:
            raise ValueError(f"{who}: group_ids / num_groups / return_token_loss need labels (or shift_labels)")
        return original(*args, **kwargs)
    num_items = kwargs.pop("num_items_in_batch", None)
    ignore_index = kwargs.pop("ignore_index", -100)
    keep = kwargs.get("logits_to_keep", 0)
    if not (isinstance(keep, int) and keep == 0):
        raise ValueError(f"{who}: logits_to_keep={keep!r} with labels; expected 0 (the loss covers every position)")
    return_dict = kwargs.pop("return_dict", None)
    head, transform = _check_model(model, who)
    kwargs["return_dict"] = True
    outputs, hidden, transform = _run_recording_head(lambda: original(*args, **kwargs), head, who, model, transform)
    if shift_labels is not None:
        targets = shift_labels
    else:
        targets = _shift(labels, ignore_index)
        if group_ids is not None and group_ids.dim() == 2:
            _check_shape(who, "group_ids", group_ids, "labels", labels)
            group_ids = _shift(group_ids, 0)
    if tuple(hidden.shape[:-1]) != tuple(targets.shape):
        raise ValueError(
            f"{who}: {'shift_labels' if shift_labels is not None else 'labels'} has shape {tuple(targets.shape)} but "
            f"the LM head received hidden states of shape {tuple(hidden.shape)}; expected [B, T] = "
            f"{tuple(hidden.shape[:-1])}"
        )
    out = _fused_head_loss(
        head, hidden, targets, transform, group_ids=group_ids, num_groups=num_groups, ignore_index=ignore_index,
        reduction="mean" if num_items is None else "sum", return_token_loss=return_token_loss, chunk_size=chunk_size,
    )
    loss = out.loss
    if num_items is not None:
        loss = loss / (num_items.to(loss.device) if isinstance(num_items, torch.Tensor) else num_items)
    aux = getattr(outputs, "aux_loss", None)
    if aux is not None:
        coef = getattr(model, "router_aux_loss_coef", None)
        if coef is None:
            coef = getattr(_text_config(model), "router_aux_loss_coef", 0.0)
        loss = loss + coef * aux.to(loss.device)
    # a fresh output of the model's own type, without logits (to_tuple() then skips them)
    outputs = type(outputs)(**{k: v for k, v in outputs.items() if k not in ("loss", "logits")}, loss=loss)
    if group_ids is not None:
        outputs["group_loss"] = out.group_loss
        outputs["group_count"] = out.group_count
    if return_token_loss:
        outputs["token_loss"] = out.token_loss
    if return_dict is False:
        return outputs.to_tuple()
    return outputs


# ==== end fused LM head ========================================================================
