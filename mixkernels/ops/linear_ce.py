"""linear_cross_entropy: fused LM-head linear + cross-entropy with per-group and per-token losses.

    out = mixkernels.linear_cross_entropy(hidden, weight, labels, *, bias=None, group_ids=None,
                                          num_groups=None, ignore_index=-100, label_smoothing=0.0,
                                          reduction="mean", return_token_loss=False, chunk_size=None,
                                          softcap=None, logit_scale=1.0, z_loss=0.0)

    hidden     [N, d] or [B, T, d]   float32 / float16 / bfloat16 (float64 accepted: all-fp64 math, for gradcheck)
    weight     [V, d]                same dtype and device as hidden (the LM head)
    labels     [N] or [B, T]         int64 (int32 accepted); ignore_index marks tokens that do not count
    bias       optional [V]
    group_ids  optional [N] / [B, T] per token, or [B] per sequence (broadcast over T); needs num_groups
    softcap    final-logit softcapping C > 0 (Gemma 2's final_logit_softcapping): z = C tanh(z / C);
               None or 0: off
    logit_scale  logits multiplier s > 0 (Cohere's logit_scale; Granite's logits_scaling d is 1 / d),
               applied before the softcap: z = softcap(s (h W^T + b))
    z_loss     weight lam >= 0 of the z-loss lam * lse^2 per counted token (lse: log-sum-exp of the
               final logits; PaLM's auxiliary loss); 0: off

    out.loss         "mean": 0-dim fp32, sum over counted tokens / their number (0, not NaN, if none);
                     "sum": 0-dim fp32; "none": fp32 per-token losses shaped like labels (0 at ignored
                     tokens). Includes the z-loss. Differentiable w.r.t. hidden, weight and bias.
    out.group_loss   fp32 [num_groups]: sum of token cross-entropy losses per group (detached, no
                     z-loss), or None
    out.group_count  int64 [num_groups]: counted tokens per group, or None
    out.token_loss   fp32 shaped like labels (detached, 0 at ignored tokens, no z-loss) if return_token_loss
    out.z_loss       the z-loss alone, reduced like loss (detached fp32), or None when z_loss == 0

The [N, V] logits are never materialised: the ops work on ``chunk_size`` rows at a time.

Gradient design (documented in docs/linear_ce.md):
* reduction "mean"/"sum" with grad enabled: the forward computes the gradients chunk by chunk
  (3 GEMMs in total, the floor) for upstream gradient 1; the backward multiplies them in place by
  the actual upstream scalar and hands them to autograd (a second backward through the same graph
  recomputes them like reduction "none" does). Extra memory: grad_hidden [N, d] + an fp32 grad_weight accumulator
  [V, d] (the sizes of the gradients themselves) + one [chunk, V] fp32 logits chunk.
* reduction "none": the forward saves only the fp32 log-sum-exp [N]; the backward recomputes each
  chunk's logits and applies the arbitrary per-token upstream gradient (4 GEMMs in total).

Backends: ``reference`` (mixkernels/reference/linear_ce.py), ``cxx`` (csrc/linear_ce.cpp,
csrc/cuda/linear_ce_cuda.cu), ``triton`` (mixkernels/triton/linear_ce.py).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from .. import _backend
from .._library import lib
from ..reference import linear_ce as _reference
from ._common import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_dtype,
    check_ids_in_range,
    check_same_device,
    check_tensor,
    register_with_backward,
)

OP = "linear_ce"
PUBLIC = "linear_cross_entropy"
REDUCTIONS = {"none": 0, "sum": 1, "mean": 2}


@dataclass
class CrossEntropyOutput:
    """Result of :func:`linear_cross_entropy` / :func:`cross_entropy` (shapes in their docstrings)."""

    loss: torch.Tensor
    group_loss: torch.Tensor | None = None
    group_count: torch.Tensor | None = None
    token_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None  # the z-loss term alone (already included in ``loss``)


# ---- argument checks shared with cross_entropy ---------------------------------------------


def _dt(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def check_labels(op: str, labels: torch.Tensor, v: int, ignore_index: int) -> None:
    """Raise naming the first label outside [0, V) that is not ``ignore_index`` (host check on CPU)."""
    if labels.numel() == 0 or torch.compiler.is_compiling():
        return
    bad = ((labels < 0) | (labels >= v)) & (labels != ignore_index)
    if labels.device.type == "cuda":
        torch._assert_async(~bad.any(), f"mixkernels.{op}: labels has a value outside [0, {v}) that is not ignore_index")
        return
    if bool(bad.any()):
        flat = int(bad.flatten().nonzero()[0, 0])
        where = ", ".join(str(int(i)) for i in torch.unravel_index(torch.tensor(flat), labels.shape))
        raise ValueError(
            f"mixkernels.{op}: labels[{where}] = {int(labels.flatten()[flat])} is out of range [0, {v}) "
            f"(vocabulary size V = {v}) and is not ignore_index = {ignore_index}"
        )


def _finite_float(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def check_loss_options(op: str, softcap: float | None, logit_scale: float, z_loss: float) -> tuple[float, float, float]:
    """Validates the logit transform / z-loss options; returns (softcap (0 = off), logit_scale, z_loss)."""
    cap = 0.0
    if softcap is not None:
        cap = _finite_float(softcap)
        if cap is None or cap < 0.0:
            raise ValueError(f"mixkernels.{op}: softcap must be None, 0 (off) or a finite float > 0, got {softcap!r}")
    scale = _finite_float(logit_scale)
    if scale is None or scale <= 0.0:
        raise ValueError(f"mixkernels.{op}: logit_scale must be a finite float > 0, got {logit_scale!r}")
    zl = _finite_float(z_loss)
    if zl is None or zl < 0.0:
        raise ValueError(f"mixkernels.{op}: z_loss must be a finite float >= 0, got {z_loss!r}")
    return cap, scale, zl


def prepare_common(
    op: str,
    lead_name: str,
    lead: torch.Tensor,
    labels: torch.Tensor,
    v: int,
    group_ids: torch.Tensor | None,
    num_groups: int | None,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
) -> tuple[torch.Tensor, torch.Tensor | None, int, int]:
    """Checks labels/group_ids/options against ``lead`` ([N, X] or [B, T, X]); returns flat
    (labels [N] int64, group_ids [N] int64 or None, num_groups, reduction code)."""
    check_tensor(op, "labels", labels)
    check_dtype(op, "labels", labels, INDEX_DTYPES)
    if tuple(labels.shape) != tuple(lead.shape[:-1]):
        raise ValueError(
            f"mixkernels.{op}: labels has shape {tuple(labels.shape)} but {lead_name} has shape "
            f"{tuple(lead.shape)}; expected labels of shape {tuple(lead.shape[:-1])}"
        )
    check_same_device(op, lead_name, lead, "labels", labels)
    if reduction not in REDUCTIONS:
        raise ValueError(f"mixkernels.{op}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"mixkernels.{op}: label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"mixkernels.{op}: ignore_index must be an int, got {ignore_index!r}")
    check_labels(op, labels, v, ignore_index)
    flat_labels = labels.reshape(-1).long()
    flat_groups = None
    if group_ids is None:
        if num_groups is not None:
            raise ValueError(f"mixkernels.{op}: num_groups={num_groups!r} was given without group_ids")
        return flat_labels, None, 0, REDUCTIONS[reduction]
    check_tensor(op, "group_ids", group_ids)
    check_dtype(op, "group_ids", group_ids, INDEX_DTYPES)
    check_same_device(op, "group_ids", group_ids, "labels", labels)
    if num_groups is None or not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups < 1:
        raise ValueError(f"mixkernels.{op}: num_groups must be an int >= 1 when group_ids is given, got {num_groups!r}")
    if tuple(group_ids.shape) == tuple(labels.shape):
        full = group_ids
    elif labels.dim() == 2 and tuple(group_ids.shape) == (labels.shape[0],):
        full = group_ids.unsqueeze(1).expand(labels.shape)  # per-sequence group, broadcast over T
    else:
        allowed = f"{tuple(labels.shape)}" + (f" or ({labels.shape[0]},) per sequence" if labels.dim() == 2 else "")
        raise ValueError(
            f"mixkernels.{op}: group_ids has shape {tuple(group_ids.shape)} but labels has shape "
            f"{tuple(labels.shape)}; expected group_ids of shape {allowed}"
        )
    # Only counted tokens must carry a valid group (padding may use any id, e.g. -1).
    check_ids_in_range(op, "group_ids", full, num_groups, mask=labels != ignore_index)
    flat_groups = full.reshape(-1).long()
    return flat_labels, flat_groups, num_groups, REDUCTIONS[reduction]


def _prepare(hidden, weight, labels, bias, group_ids, num_groups, ignore_index, label_smoothing, reduction, chunk_size):
    check_tensor(PUBLIC, "hidden", hidden)
    check_tensor(PUBLIC, "weight", weight)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"mixkernels.{PUBLIC}: hidden must be [N, d] or [B, T, d], got shape {tuple(hidden.shape)}")
    check_dtype(PUBLIC, "hidden", hidden, (*FLOAT_DTYPES, torch.float64))
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"mixkernels.{PUBLIC}: weight has shape {tuple(weight.shape)} but hidden has shape {tuple(hidden.shape)}; "
            f"expected weight of shape [V, {hidden.shape[-1]}]"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"mixkernels.{PUBLIC}: weight is {_dt(weight)} but hidden is {_dt(hidden)}; expected the same dtype")
    check_same_device(PUBLIC, "hidden", hidden, "weight", weight)
    v = weight.shape[0]
    if bias is not None:
        check_tensor(PUBLIC, "bias", bias)
        if tuple(bias.shape) != (v,):
            raise ValueError(
                f"mixkernels.{PUBLIC}: bias has shape {tuple(bias.shape)} but weight has shape {tuple(weight.shape)}; "
                f"expected bias of shape ({v},)"
            )
        if bias.dtype != weight.dtype:
            raise TypeError(f"mixkernels.{PUBLIC}: bias is {_dt(bias)} but weight is {_dt(weight)}; expected the same dtype")
        check_same_device(PUBLIC, "bias", bias, "weight", weight)
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"mixkernels.{PUBLIC}: chunk_size must be None or an int >= 1, got {chunk_size!r}")
    flat_labels, flat_groups, ng, red = prepare_common(
        PUBLIC, "hidden", hidden, labels, v, group_ids, num_groups, ignore_index, label_smoothing, reduction
    )
    h2 = hidden.reshape(-1, hidden.shape[-1])
    n = h2.shape[0]
    frozen = not (weight.requires_grad or (bias is not None and bias.requires_grad))
    chunk = chunk_size if chunk_size is not None else auto_chunk_size(n, hidden.shape[-1], v, hidden.device,
                                                                      weight_grad=not frozen)
    return h2, flat_labels, flat_groups, ng, red, chunk


def auto_chunk_size(n: int, d: int, v: int, device: torch.device, weight_grad: bool = True) -> int:
    """Rows per chunk: the fp32 logits chunk [rows, V] gets ~128 MiB (32 MiB without a weight
    gradient), at most 1/16 of the available host memory, at least 16 rows, never more than N.

    Why 128 MiB on CPU: the weight-gradient GEMM reads and writes the whole fp32 [V, d]
    accumulator once per chunk, so few large chunks are cheaper. Measured (process CPU time, 2
    threads, N=4096 d=512 V=32000): 1024-row chunks 1.02x the 3-GEMM floor, 256-row chunks 1.12x.
    128 MiB is still far below eager's N x V logits plus their gradient. A frozen head (LoRA) has
    no accumulator, so small chunks cost nothing and keep the peak low.
    """
    budget = (128 << 20 if weight_grad else 32 << 20) if device.type == "cpu" else 256 << 20
    if device.type == "cpu" and hasattr(os, "sysconf"):
        try:
            budget = min(budget, os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 16)
        except (ValueError, OSError):
            pass
    rows = max(16, budget // (4 * max(v, 1)))
    rows = max(16, rows // 16 * 16)
    return int(max(1, min(rows, n)))


# ---- public function -------------------------------------------------------------------------


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    group_ids: torch.Tensor | None = None,
    num_groups: int | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    return_token_loss: bool = False,
    chunk_size: int | None = None,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    z_loss: float = 0.0,
) -> CrossEntropyOutput:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels`` without materialising the
    logits, with per-group sums/counts and per-token losses (see the module docstring for shapes).

    ``softcap`` / ``logit_scale`` transform the logits (``softcap(logit_scale * logits)``) and
    ``z_loss`` adds ``z_loss * lse**2`` per counted token, as Gemma 2 / Cohere / Granite / PaLM do."""
    cap, scale, zl = check_loss_options(PUBLIC, softcap, logit_scale, z_loss)
    h2, y, g, ng, red, chunk = _prepare(
        hidden, weight, labels, bias, group_ids, num_groups, ignore_index, label_smoothing, reduction, chunk_size
    )
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    compute_grad = needs_grad and red != 0
    # a frozen head (LoRA, frozen tied embeddings): no weight-gradient GEMM in the fused forward
    weight_grad = weight.requires_grad or (bias is not None and bias.requires_grad)
    args = (h2, weight, y, bias, g, ng, ignore_index, float(label_smoothing), red, chunk, compute_grad, weight_grad,
            cap, scale, zl)
    chosen = _backend.select(OP, hidden.device)
    if chosen == "cxx":
        outs = torch.ops.mixkernels.linear_ce(*args)
    elif chosen == "triton":
        outs = torch.ops.mixkernels.linear_ce_triton(*args)
    else:
        outs = _ReferenceLinearCE.apply(*args)
    return make_output(outs[:5], outs[8], labels.shape, red, g is not None, return_token_loss, zl)


def make_output(outs, z_out: torch.Tensor, shape: torch.Size, red: int, grouped: bool, return_token_loss: bool,
                zl: float) -> CrossEntropyOutput:
    """The public result from the op outputs (loss, token_loss, lse, group_loss, group_count) and z_loss."""
    loss, token_loss, _lse, group_loss, group_count = outs
    if red == 0:
        loss = loss.reshape(shape)
        if zl == 0.0:  # the op returns no separate token loss: it is the loss itself
            token_loss = loss.detach()
        z_out = z_out.reshape(shape) if zl != 0.0 else z_out
    return CrossEntropyOutput(
        loss=loss,
        group_loss=group_loss.detach() if grouped else None,
        group_count=group_count if grouped else None,
        token_loss=token_loss.detach().reshape(shape) if return_token_loss else None,
        z_loss=z_out.detach() if zl != 0.0 else None,
    )


linear_ce = linear_cross_entropy  # the op's stem name (used by `python -m mixkernels.info --selftest`)


# ---- autograd ----------------------------------------------------------------------------------


def _grad_token(labels: torch.Tensor, grad_loss: torch.Tensor, reduction: int, ignore_index: int) -> torch.Tensor:
    """Per-token fp32 upstream gradient [N] from the gradient of ``loss`` (0 at ignored tokens)."""
    valid = labels != ignore_index
    if reduction == 0:
        return torch.where(valid, grad_loss.reshape(-1).float(), 0.0).contiguous()
    scale = grad_loss.float().reshape(())
    if reduction == 2:
        scale = scale / valid.sum().clamp(min=1).float()
    return torch.where(valid, scale, 0.0).contiguous()


LOSS_OPTION_DEFAULTS = (0.0, 1.0, 0.0)  # softcap, logit_scale, z_loss (schema defaults)


def loss_options(inputs, start: int) -> tuple[float, float, float]:
    """(softcap, logit_scale, z_loss) from the op inputs, the schema defaults where absent."""
    given = tuple(inputs[start:start + 3])
    return given + LOSS_OPTION_DEFAULTS[len(given):]


def _setup_context(ctx, inputs, output):
    hidden, weight, labels, bias, _g, _ng, ignore_index, label_smoothing, reduction, chunk, compute_grad = inputs[:11]
    lse, grad_hidden, grad_weight, grad_bias = output[2], output[5], output[6], output[7]
    ctx.options = (ignore_index, label_smoothing, reduction, chunk)
    ctx.loss_options = loss_options(inputs, 12)
    ctx.has_bias = bias is not None
    # The forward's gradients for upstream 1 (reduction mean/sum), handed over by the first backward;
    # detached, so that holding them makes no reference cycle through the graph.
    ctx.grads = ((grad_hidden.detach(), grad_weight.detach(), grad_bias.detach())
                 if bool(compute_grad) and reduction != 0 else None)
    ctx.save_for_backward(hidden, weight, labels, bias, lse)


def _make_backward(backward_op):
    def _backward(ctx, grad_loss, *_unused):
        none = [None] * 15
        if grad_loss is None:
            return tuple(none)
        ignore_index, label_smoothing, reduction, chunk = ctx.options
        if ctx.grads is not None:
            grad_hidden, grad_weight, grad_bias = ctx.grads
            if (ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[3])) and grad_weight.numel() == 0:
                raise RuntimeError("mixkernels.linear_ce: called with weight_grad=False, but weight or bias "
                                   "requires grad; pass weight_grad=True (linear_cross_entropy decides this itself)")
            # The first backward scales them in place and hands them to autograd: no second [V, d]
            # buffer, and autograd adds a tied embedding's gradient into the same storage. A later
            # backward through the same graph (retain_graph=True) recomputes them below instead.
            ctx.grads = None
            scale = grad_loss.reshape(())
            eager = not torch.compiler.is_compiling() and type(grad_weight) is torch.Tensor  # not traced
            for i, g in ((0, grad_hidden), (1, grad_weight), (3, grad_bias)):
                if ctx.needs_input_grad[i] and (i != 3 or ctx.has_bias):
                    none[i] = g.mul_(scale.to(g.dtype)) if eager else g * scale.to(g.dtype)
            return tuple(none)
        hidden, weight, labels, bias, lse = ctx.saved_tensors
        coef = _grad_token(labels, grad_loss, reduction, ignore_index)
        gh, gw, gb = backward_op(hidden, weight, labels, bias, lse, coef, ignore_index, label_smoothing, chunk,
                                 *ctx.loss_options)
        none[0] = gh if ctx.needs_input_grad[0] else None
        none[1] = gw if ctx.needs_input_grad[1] else None
        none[3] = gb if ctx.has_bias and ctx.needs_input_grad[3] else None
        return tuple(none)

    return _backward


class _ReferenceLinearCE(torch.autograd.Function):
    """The ``reference`` backend: the pure-PyTorch chunked functions under the same autograd rule
    as the registered ops (so it keeps their memory behaviour)."""

    @staticmethod
    def forward(*args):
        return _reference.linear_ce(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)
        ctx.mark_non_differentiable(*output[1:])

    backward = staticmethod(_make_backward(_reference.linear_ce_backward))


# ---- registrations -------------------------------------------------------------------------


def _fake(hidden, weight, labels, bias, group_ids, num_groups, ignore_index, label_smoothing, reduction, chunk,
          compute_grad, weight_grad=True, softcap=0.0, logit_scale=1.0, z_loss=0.0):
    n, v = hidden.shape[0], weight.shape[0]
    f32 = {"dtype": _reference.acc_dtype(hidden.dtype)}
    loss = hidden.new_empty((n,) if reduction == 0 else (), **f32)
    token_loss = hidden.new_empty((0 if reduction == 0 and z_loss == 0.0 else n,), **f32)
    z_out = hidden.new_empty(((n,) if reduction == 0 else ()) if z_loss != 0.0 else (0,), **f32)
    lse = hidden.new_empty((n,), **f32)
    g = num_groups if group_ids is not None else 0
    group_loss = hidden.new_empty((g,), **f32)
    group_count = hidden.new_empty((g,), dtype=torch.int64)
    grads = compute_grad and reduction != 0
    grad_hidden = hidden.new_empty(hidden.shape if grads else (0,))
    wgrad = grads and weight_grad
    grad_weight = weight.new_empty(weight.shape if wgrad else (0,))
    grad_bias = hidden.new_empty((v,) if wgrad and bias is not None else (0,), dtype=bias.dtype if bias is not None else hidden.dtype)
    return loss, token_loss, lse, group_loss, group_count, grad_hidden, grad_weight, grad_bias, z_out


def _fake_backward(hidden, weight, labels, bias, lse, grad_token, ignore_index, label_smoothing, chunk,
                   softcap=0.0, logit_scale=1.0, z_loss=0.0):
    grad_bias = bias.new_empty(bias.shape) if bias is not None else hidden.new_empty((0,))
    return hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), grad_bias


def _triton_kernels():
    from ..triton import linear_ce as kernels

    return kernels.linear_ce, kernels.linear_ce_backward


register_with_backward(lib, OP, reference=_reference.linear_ce, reference_backward=_reference.linear_ce_backward,
                       triton=_triton_kernels, fake=_fake, fake_backward=_fake_backward,
                       make_backward=_make_backward, setup_context=_setup_context)
_backend.refresh_availability(OP)


def selftest_cases() -> list[tuple[str, tuple, dict]]:
    """Small random inputs for ``python -m mixkernels.info --selftest``: (case, args, kwargs)."""
    h = torch.randn(37, 24)
    w = torch.randn(101, 24) * 0.3
    y = torch.randint(0, 101, (37,))
    y[::5] = -100
    g = torch.randint(0, 4, (37,))
    return [
        ("fp32 mean groups", (h, w, y), {"group_ids": g, "num_groups": 4, "chunk_size": 8}),
        ("fp32 none smoothing bias", (h, w, y), {"bias": torch.randn(101), "reduction": "none",
                                                 "label_smoothing": 0.1, "return_token_loss": True}),
        ("[B,T,d] per-seq groups", (h[:36].reshape(4, 9, 24), w, y[:36].reshape(4, 9)),
         {"group_ids": torch.arange(4), "num_groups": 4, "reduction": "sum"}),
        ("fp16", (h.half(), w.half(), y), {}),
        ("softcap logit_scale z_loss", (h, w, y), {"softcap": 3.0, "logit_scale": 0.5, "z_loss": 1e-2,
                                                   "group_ids": g, "num_groups": 4, "chunk_size": 16}),
        ("empty", (h[:0], w, y[:0]), {"group_ids": g[:0], "num_groups": 2}),
    ]
