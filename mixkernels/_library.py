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
    # linear_cross_entropy (issue 3). reduction: 0 none, 1 sum, 2 mean. With compute_grad (and
    # reduction != none) the forward also returns the gradients of `loss` for upstream grad 1;
    # otherwise those three outputs are empty and the *_backward op recomputes chunk logits.
    "linear_ce": (
        "linear_ce(Tensor hidden, Tensor weight, Tensor labels, Tensor? bias, Tensor? group_ids, "
        "int num_groups, int ignore_index, float label_smoothing, int reduction, int chunk_size, "
        "bool compute_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "linear_ce_backward": (
        "linear_ce_backward(Tensor hidden, Tensor weight, Tensor labels, Tensor? bias, Tensor lse, "
        "Tensor grad_token, int ignore_index, float label_smoothing, int chunk_size) -> (Tensor, Tensor, Tensor)"
    ),
    "linear_ce_triton": (
        "linear_ce_triton(Tensor hidden, Tensor weight, Tensor labels, Tensor? bias, Tensor? group_ids, "
        "int num_groups, int ignore_index, float label_smoothing, int reduction, int chunk_size, "
        "bool compute_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "linear_ce_backward_triton": (
        "linear_ce_backward_triton(Tensor hidden, Tensor weight, Tensor labels, Tensor? bias, Tensor lse, "
        "Tensor grad_token, int ignore_index, float label_smoothing, int chunk_size) -> (Tensor, Tensor, Tensor)"
    ),
    "cross_entropy": (
        "cross_entropy(Tensor logits, Tensor labels, Tensor? group_ids, int num_groups, int ignore_index, "
        "float label_smoothing, int reduction) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "cross_entropy_backward": (
        "cross_entropy_backward(Tensor logits, Tensor labels, Tensor lse, Tensor grad_token, int ignore_index, "
        "float label_smoothing) -> Tensor"
    ),
    "cross_entropy_triton": (
        "cross_entropy_triton(Tensor logits, Tensor labels, Tensor? group_ids, int num_groups, int ignore_index, "
        "float label_smoothing, int reduction) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "cross_entropy_backward_triton": (
        "cross_entropy_backward_triton(Tensor logits, Tensor labels, Tensor lse, Tensor grad_token, "
        "int ignore_index, float label_smoothing) -> Tensor"
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
    "linear_ce": OpInfo(
        "linear_ce",
        auto_order={"cpu": ("cxx", "reference"), "cuda": ("cxx", "triton", "reference")},
        why=(
            "CPU: the C++ kernel fuses softmax/loss/grad/group sums in one vectorised pass per "
            "chunk between ATen GEMMs; CUDA: its per-row kernel keeps the row in shared memory "
            "(one read of the logits chunk for max/sum, one write of the gradient)"
        ),
    ),
    "cross_entropy": OpInfo(
        "cross_entropy",
        auto_order={"cpu": ("cxx", "reference"), "cuda": ("cxx", "triton", "reference")},
        why="same fused per-row kernel as linear_ce, applied to given logits",
    ),
}
