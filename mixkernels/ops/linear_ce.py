"""linear_cross_entropy: fused LM-head linear + cross-entropy with per-group and per-token losses.

    out = mixkernels.linear_cross_entropy(hidden, weight, labels, *, bias=None, group_ids=None,
                                          num_groups=None, ignore_index=-100, label_smoothing=0.0,
                                          reduction="mean", return_token_loss=False, chunk_size=None)

    hidden     [N, d] or [B, T, d]   float32 / float16 / bfloat16 (float64 accepted: all-fp64 math, for gradcheck)
    weight     [V, d]                same dtype and device as hidden (the LM head)
    labels     [N] or [B, T]         int64 (int32 accepted); ignore_index marks tokens that do not count
    bias       optional [V]
    group_ids  optional [N] / [B, T] per token, or [B] per sequence (broadcast over T); needs num_groups

    out.loss         "mean": 0-dim fp32, sum over counted tokens / their number (0, not NaN, if none);
                     "sum": 0-dim fp32; "none": fp32 per-token losses shaped like labels (0 at ignored
                     tokens). Differentiable w.r.t. hidden, weight and bias.
    out.group_loss   fp32 [num_groups]: sum of token losses per group (detached), or None
    out.group_count  int64 [num_groups]: counted tokens per group, or None
    out.token_loss   fp32 shaped like labels (detached, 0 at ignored tokens) if return_token_loss

The [N, V] logits are never materialised: the ops work on ``chunk_size`` rows at a time.

Gradient design (documented in docs/linear_ce.md):
* reduction "mean"/"sum" with grad enabled: the forward computes the gradients chunk by chunk
  (3 GEMMs in total, the floor) for upstream gradient 1; the backward multiplies them by the
  actual upstream scalar. Extra memory: grad_hidden [N, d] + an fp32 grad_weight accumulator
  [V, d] (the sizes of the gradients themselves) + one [chunk, V] fp32 logits chunk.
* reduction "none": the forward saves only the fp32 log-sum-exp [N]; the backward recomputes each
  chunk's logits and applies the arbitrary per-token upstream gradient (4 GEMMs in total).

Backends: ``reference`` (mixkernels/reference/linear_ce.py), ``cxx`` (csrc/linear_ce.cpp,
csrc/cuda/linear_ce_cuda.cu), ``triton`` (mixkernels/triton/linear_ce.py).
"""

from __future__ import annotations

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
) -> CrossEntropyOutput:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels`` without materialising the
    logits, with per-group sums/counts and per-token losses (see the module docstring for shapes)."""
    h2, y, g, ng, red, chunk = _prepare(
        hidden, weight, labels, bias, group_ids, num_groups, ignore_index, label_smoothing, reduction, chunk_size
    )
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    compute_grad = needs_grad and red != 0
    # a frozen head (LoRA, frozen tied embeddings): no weight-gradient GEMM in the fused forward
    weight_grad = weight.requires_grad or (bias is not None and bias.requires_grad)
    args = (h2, weight, y, bias, g, ng, ignore_index, float(label_smoothing), red, chunk, compute_grad, weight_grad)
    chosen = _backend.select(OP, hidden.device)
    if chosen == "cxx":
        outs = torch.ops.mixkernels.linear_ce(*args)
    elif chosen == "triton":
        outs = torch.ops.mixkernels.linear_ce_triton(*args)
    else:
        outs = _ReferenceLinearCE.apply(*args)
    loss, token_loss, _lse, group_loss, group_count = outs[:5]
    if red == 0:
        loss = loss.reshape(labels.shape)
        token_loss = loss.detach()
    return CrossEntropyOutput(
        loss=loss,
        group_loss=group_loss.detach() if g is not None else None,
        group_count=group_count if g is not None else None,
        token_loss=token_loss.detach().reshape(labels.shape) if return_token_loss else None,
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


def _setup_context(ctx, inputs, output):
    hidden, weight, labels, bias, _g, _ng, ignore_index, label_smoothing, reduction, chunk, compute_grad = inputs[:11]
    lse, grad_hidden, grad_weight, grad_bias = output[2], output[5], output[6], output[7]
    ctx.precomputed = bool(compute_grad) and reduction != 0
    ctx.options = (ignore_index, label_smoothing, reduction, chunk)
    ctx.has_bias = bias is not None
    if ctx.precomputed:
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
    else:
        ctx.save_for_backward(hidden, weight, labels, bias, lse)


def _make_backward(backward_op):
    def _backward(ctx, grad_loss, *_unused):
        none = [None] * 12
        if grad_loss is None:
            return tuple(none)
        ignore_index, label_smoothing, reduction, chunk = ctx.options
        if ctx.precomputed:
            grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
            scale = grad_loss.reshape(())
            if (ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[3])) and grad_weight.numel() == 0:
                raise RuntimeError("mixkernels.linear_ce: called with weight_grad=False, but weight or bias "
                                   "requires grad; pass weight_grad=True (linear_cross_entropy decides this itself)")
            none[0] = grad_hidden * scale.to(grad_hidden.dtype) if ctx.needs_input_grad[0] else None
            none[1] = grad_weight * scale.to(grad_weight.dtype) if ctx.needs_input_grad[1] else None
            if ctx.has_bias and ctx.needs_input_grad[3]:
                none[3] = grad_bias * scale.to(grad_bias.dtype)
            return tuple(none)
        hidden, weight, labels, bias, lse = ctx.saved_tensors
        coef = _grad_token(labels, grad_loss, reduction, ignore_index)
        gh, gw, gb = backward_op(hidden, weight, labels, bias, lse, coef, ignore_index, label_smoothing, chunk)
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
          compute_grad, weight_grad=True):
    n, v = hidden.shape[0], weight.shape[0]
    f32 = {"dtype": _reference.acc_dtype(hidden.dtype)}
    loss = hidden.new_empty((n,) if reduction == 0 else (), **f32)
    token_loss = hidden.new_empty((0 if reduction == 0 else n,), **f32)
    lse = hidden.new_empty((n,), **f32)
    g = num_groups if group_ids is not None else 0
    group_loss = hidden.new_empty((g,), **f32)
    group_count = hidden.new_empty((g,), dtype=torch.int64)
    grads = compute_grad and reduction != 0
    grad_hidden = hidden.new_empty(hidden.shape if grads else (0,))
    wgrad = grads and weight_grad
    grad_weight = weight.new_empty(weight.shape if wgrad else (0,))
    grad_bias = hidden.new_empty((v,) if wgrad and bias is not None else (0,), dtype=bias.dtype if bias is not None else hidden.dtype)
    return loss, token_loss, lse, group_loss, group_count, grad_hidden, grad_weight, grad_bias


def _fake_backward(hidden, weight, labels, bias, lse, grad_token, ignore_index, label_smoothing, chunk):
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
        ("empty", (h[:0], w, y[:0]), {"group_ids": g[:0], "num_groups": 2}),
    ]
