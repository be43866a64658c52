"""Every op schema of the ``mixkernels`` namespace, and which backend serves each op where.

Schemas are defined here in Python, so the ops exist even when the compiled extension ``_C``
was not built; ``_C`` only adds ``TORCH_LIBRARY_IMPL`` kernels for CPU and CUDA.

Per public op ``X`` there are up to two registered ops:

* ``mixkernels::X``         -- the ``cxx`` backend: C++ CPU kernel and CUDA kernel from ``_C``
  (the pure-PyTorch reference is registered in their place when ``_C`` is absent);
* ``mixkernels::X_triton``  -- the ``triton`` backend: a Python implementation launching Triton
  kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).

The ``reference`` backend is the plain PyTorch function in ``mixkernels/reference/X.py``; it is
called directly (its autograd is PyTorch's own).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

lib = torch.library.Library("mixkernels", "DEF")

SCHEMAS: dict[str, str] = {
    "segment_sum": (
        "segment_sum(Tensor values, Tensor segment_ids, int num_segments, Tensor? mask=None) "
        "-> (Tensor, Tensor)"
    ),
    "segment_sum_triton": (
        "segment_sum_triton(Tensor values, Tensor segment_ids, int num_segments, Tensor? mask=None) "
        "-> (Tensor, Tensor)"
    ),
    # router_stats: one pass over a list of L router-logit tensors [N, E]; returns
    # (prob_sum, entropy_sum, aux_loss, expert_counts, token_count) -- float outputs first, the
    # public RouterStats names them. The backward op is shared by both backends (one fused pass
    # recomputing the softmax).
    "router_stats": (
        "router_stats(Tensor[] router_logits, int top_k, Tensor? group_ids, int num_groups, Tensor? mask=None) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "router_stats_triton": (
        "router_stats_triton(Tensor[] router_logits, int top_k, Tensor? group_ids, int num_groups, "
        "Tensor? mask=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "router_stats_backward": (
        "router_stats_backward(Tensor[] router_logits, Tensor? group_ids, int num_groups, Tensor? mask, "
        "Tensor grad_prob_sum, Tensor grad_entropy_sum) -> Tensor[]"
    ),
}

for _schema in SCHEMAS.values():
    lib.define(_schema)


@dataclass(frozen=True)
class OpInfo:
    """Where each backend of a public op lives and which one ``auto`` prefers per device.

    ``auto`` takes the first available backend of ``auto_order[device_type]``. On CPU the
    Triton interpreter is a test vehicle, never a fast path, so it is not in the CPU order.
    """

    name: str
    backends: tuple[str, ...] = ("reference", "cxx", "triton")
    auto_order: dict[str, tuple[str, ...]] = field(default_factory=dict)
    why: str = ""

    @property
    def cxx_op(self) -> str:
        return f"mixkernels::{self.name}"

    @property
    def triton_op(self) -> str:
        return f"mixkernels::{self.name}_triton"


OPS: dict[str, OpInfo] = {
    "segment_sum": OpInfo(
        "segment_sum",
        auto_order={"cpu": ("cxx", "reference"), "cuda": ("cxx", "triton", "reference")},
        why=(
            "CUDA: the C++ kernel bins into shared memory per block and flushes once, "
            "where the Triton kernel issues one global atomic per element"
        ),
    ),
    "router_stats": OpInfo(
        "router_stats",
        auto_order={"cpu": ("cxx", "reference"), "cuda": ("cxx", "triton", "reference")},
        why=(
            "CPU: the C++ kernel is the only fast path (the reference is ~20x slower). CUDA: the C++ "
            "kernel runs one warp per token (shuffle reductions, warp arg-max top-k) and bins [G, E] per "
            "block in shared memory; the Triton kernel reduces a token tile per group, then atomics. "
            "Neither has been timed on a GPU (none available), so cxx is first by design, not measurement"
        ),
    ),
}
