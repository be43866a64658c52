"""cross_entropy: cross-entropy of given logits with per-group and per-token losses.

    out = mixkernels.cross_entropy(logits, labels, *, group_ids=None, num_groups=None,
                                   ignore_index=-100, label_smoothing=0.0, reduction="mean",
                                   return_token_loss=False, softcap=None, logit_scale=1.0, z_loss=0.0)

    logits     [N, V] or [B, T, V], float32 / float16 / bfloat16
    labels     [N] or [B, T], int64 (int32 accepted)
    group_ids  optional [N] / [B, T] per token, or [B] per sequence; needs num_groups

``softcap`` / ``logit_scale`` / ``z_loss`` as in :func:`mixkernels.linear_cross_entropy`: the
loss is computed from ``softcap(logit_scale * logits)`` plus ``z_loss * lse**2``; gradients are
w.r.t. the given logits. Same outputs as :func:`mixkernels.linear_cross_entropy` (a
:class:`CrossEntropyOutput`, with ``z_loss``).
The forward saves only the fp32 log-sum-exp [N]; the backward reads the logits once more and
writes d loss / d logits in the logits' dtype (fp32 math), for any upstream gradient (also
per-token with reduction "none"). Backends: reference, cxx (csrc/linear_ce.cpp's per-row kernel),
triton.
"""

from __future__ import annotations

import torch

from .. import _backend
from .._library import lib
from ..reference import linear_ce as _reference
from ._common import FLOAT_DTYPES, check_dtype, check_tensor, register_with_backward
from .linear_ce import (
    CrossEntropyOutput,
    _grad_token,
    check_loss_options,
    loss_options,
    make_output,
    prepare_common,
)

OP = "cross_entropy"


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    group_ids: torch.Tensor | None = None,
    num_groups: int | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    return_token_loss: bool = False,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    z_loss: float = 0.0,
) -> CrossEntropyOutput:
    """Cross-entropy of ``logits`` against ``labels`` with per-group sums/counts (module docstring)."""
    cap, scale, zl = check_loss_options(OP, softcap, logit_scale, z_loss)
    check_tensor(OP, "logits", logits)
    if logits.dim() not in (2, 3):
        raise ValueError(f"mixkernels.{OP}: logits must be [N, V] or [B, T, V], got shape {tuple(logits.shape)}")
    check_dtype(OP, "logits", logits, (*FLOAT_DTYPES, torch.float64))
    y, g, ng, red = prepare_common(
        OP, "logits", logits, labels, logits.shape[-1], group_ids, num_groups, ignore_index, label_smoothing, reduction
    )
    z = logits.reshape(-1, logits.shape[-1])
    args = (z, y, g, ng, ignore_index, float(label_smoothing), red, cap, scale, zl)
    chosen = _backend.select(OP, logits.device)
    if chosen == "cxx":
        outs = torch.ops.mixkernels.cross_entropy(*args)
    elif chosen == "triton":
        outs = torch.ops.mixkernels.cross_entropy_triton(*args)
    else:
        outs = _ReferenceCE.apply(*args)
    return make_output(outs[:5], outs[5], labels.shape, red, g is not None, return_token_loss, zl)


def _setup_context(ctx, inputs, output):
    logits, labels, _g, _ng, ignore_index, label_smoothing, reduction = inputs[:7]
    ctx.options = (ignore_index, label_smoothing, reduction)
    ctx.loss_options = loss_options(inputs, 7)
    ctx.save_for_backward(logits, labels, output[2])


def _make_backward(backward_op):
    def _backward(ctx, grad_loss, *_unused):
        if grad_loss is None or not ctx.needs_input_grad[0]:
            return (None,) * 10
        logits, labels, lse = ctx.saved_tensors
        ignore_index, label_smoothing, reduction = ctx.options
        coef = _grad_token(labels, grad_loss, reduction, ignore_index)
        return (backward_op(logits, labels, lse, coef, ignore_index, label_smoothing, *ctx.loss_options),) + (None,) * 9

    return _backward


class _ReferenceCE(torch.autograd.Function):
    @staticmethod
    def forward(*args):
        return _reference.cross_entropy(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)
        ctx.mark_non_differentiable(*output[1:])

    backward = staticmethod(_make_backward(_reference.cross_entropy_backward))


def _fake(logits, labels, group_ids, num_groups, ignore_index, label_smoothing, reduction, softcap=0.0,
          logit_scale=1.0, z_loss=0.0):
    n = logits.shape[0]
    f32 = {"dtype": _reference.acc_dtype(logits.dtype)}
    g = num_groups if group_ids is not None else 0
    return (
        logits.new_empty((n,) if reduction == 0 else (), **f32),
        logits.new_empty((0 if reduction == 0 and z_loss == 0.0 else n,), **f32),
        logits.new_empty((n,), **f32),
        logits.new_empty((g,), **f32),
        logits.new_empty((g,), dtype=torch.int64),
        logits.new_empty(((n,) if reduction == 0 else ()) if z_loss != 0.0 else (0,), **f32),
    )


def _fake_backward(logits, labels, lse, grad_token, ignore_index, label_smoothing, softcap=0.0, logit_scale=1.0,
                   z_loss=0.0):
    return logits.new_empty(logits.shape)


def _triton_kernels():
    from ..triton import linear_ce as kernels

    return kernels.cross_entropy, kernels.cross_entropy_backward


register_with_backward(lib, OP, reference=_reference.cross_entropy, reference_backward=_reference.cross_entropy_backward,
                       triton=_triton_kernels, fake=_fake, fake_backward=_fake_backward,
                       make_backward=_make_backward, setup_context=_setup_context)
_backend.refresh_availability(OP)


def selftest_cases() -> list[tuple[str, tuple, dict]]:
    z = torch.randn(29, 53) * 3
    y = torch.randint(0, 53, (29,))
    y[::4] = -100
    g = torch.randint(0, 3, (29,))
    return [
        ("fp32 mean groups", (z, y), {"group_ids": g, "num_groups": 3}),
        ("fp32 none smoothing", (z, y), {"reduction": "none", "label_smoothing": 0.2, "return_token_loss": True}),
        ("bf16 sum", (z.bfloat16(), y), {"reduction": "sum"}),
        ("softcap logit_scale z_loss", (z, y), {"softcap": 5.0, "logit_scale": 1.5, "z_loss": 1e-3,
                                                "reduction": "none"}),
        ("empty", (z[:0], y[:0]), {}),
    ]
