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
    # linear_cross_entropy. reduction: 0 none, 1 sum, 2 mean. With compute_grad (and
    # reduction != none) the forward also returns the gradients of `loss` for upstream grad 1;
    # otherwise those three outputs are empty and the *_backward op recomputes chunk logits.
    # weight_grad=False (neither weight nor bias needs a gradient: a frozen LM head under LoRA)
    # skips the weight-gradient GEMM; grad_weight and grad_bias are then empty.
    # Final logits z = softcap * tanh(logit_scale * (h W^T + b) / softcap) (softcap 0: no tanh);
    # z_loss adds z_loss * lse^2 per counted token to `loss` and is returned alone as the last
    # output (reduced like `loss`; empty when z_loss == 0). token_loss / group_loss stay pure CE.
    "linear_ce": (
        "linear_ce(Tensor hidden, Tensor weight, Tensor labels, Tensor? bias, Tensor? group_ids, "
        "int num_groups, int ignore_index, float label_smoothing, int reduction, int chunk_size, "
        "bool compute_grad, bool weight_grad=True, float softcap=0.0, float logit_scale=1.0, float z_loss=0.0) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "linear_ce_backward": (
        "linear_ce_backward(Tensor hidden, Tensor weight, Tensor labels, Tensor? bias, Tensor lse, "
        "Tensor grad_token, int ignore_index, float label_smoothing, int chunk_size, "
        "float softcap=0.0, float logit_scale=1.0, float z_loss=0.0) -> (Tensor, Tensor, Tensor)"
    ),
    "linear_ce_triton": (
        "linear_ce_triton(Tensor hidden, Tensor weight, Tensor labels, Tensor? bias, Tensor? group_ids, "
        "int num_groups, int ignore_index, float label_smoothing, int reduction, int chunk_size, "
        "bool compute_grad, bool weight_grad=True, float softcap=0.0, float logit_scale=1.0, float z_loss=0.0) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "linear_ce_backward_triton": (
        "linear_ce_backward_triton(Tensor hidden, Tensor weight, Tensor labels, Tensor? bias, Tensor lse, "
        "Tensor grad_token, int ignore_index, float label_smoothing, int chunk_size, "
        "float softcap=0.0, float logit_scale=1.0, float z_loss=0.0) -> (Tensor, Tensor, Tensor)"
    ),
    "cross_entropy": (
        "cross_entropy(Tensor logits, Tensor labels, Tensor? group_ids, int num_groups, int ignore_index, "
        "float label_smoothing, int reduction, float softcap=0.0, float logit_scale=1.0, float z_loss=0.0) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "cross_entropy_backward": (
        "cross_entropy_backward(Tensor logits, Tensor labels, Tensor lse, Tensor grad_token, int ignore_index, "
        "float label_smoothing, float softcap=0.0, float logit_scale=1.0, float z_loss=0.0) -> Tensor"
    ),
    "cross_entropy_triton": (
        "cross_entropy_triton(Tensor logits, Tensor labels, Tensor? group_ids, int num_groups, int ignore_index, "
        "float label_smoothing, int reduction, float softcap=0.0, float logit_scale=1.0, float z_loss=0.0) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "cross_entropy_backward_triton": (
        "cross_entropy_backward_triton(Tensor logits, Tensor labels, Tensor lse, Tensor grad_token, "
        "int ignore_index, float label_smoothing, float softcap=0.0, float logit_scale=1.0, float z_loss=0.0) -> Tensor"
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
    # project / lift: on-the-fly counter-hash random projections; one OpInfo ("project")
    # chooses the backend of both, since each is the other's gradient.
    "project": "project(Tensor x, int out_dim, int seed, str kind, int nnz, int row_offset) -> Tensor",
    "project_triton": "project_triton(Tensor x, int out_dim, int seed, str kind, int nnz, int row_offset) -> Tensor",
    "lift": "lift(Tensor y, int in_dim, int seed, str kind, int nnz, int row_offset) -> Tensor",
    "lift_triton": "lift_triton(Tensor y, int in_dim, int seed, str kind, int nnz, int row_offset) -> Tensor",
    # factored_sketch: per-example LoGra sketches S[b] = sum_t (g_t P_out)^T (x_t P_in).
    "factored_sketch": "factored_sketch(Tensor x, Tensor g, Tensor offsets, Tensor? p_in, Tensor? p_out) -> Tensor",
    "factored_sketch_triton": (
        "factored_sketch_triton(Tensor x, Tensor g, Tensor offsets, Tensor? p_in, Tensor? p_out) -> Tensor"
    ),
    # Host-side launch decisions of the CUDA kernels (shared memory opt-in, grid limits), computed by
    # the same C++ functions the launchers call; CPU only, for tests (csrc/launch_plan.cpp).
    "_launch_plan": "_launch_plan(Tensor device_hint, str kernel, int[] sizes) -> int[]",
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
    "project": OpInfo(
        "project",
        auto_order={"cpu": ("cxx", "reference"), "cuda": ("triton", "cxx", "reference")},
        why=(
            "serves project and lift. CPU: C++ generates R row tiles in cache and runs AVX2 FMAs "
            "(the reference materialises R blocks in memory). CUDA: Triton's tl.dot on generated "
            "tiles uses tensor cores; the CUDA kernel is a plain FMA tile kernel"
        ),
    ),
    "factored_sketch": OpInfo(
        "factored_sketch",
        auto_order={"cpu": ("cxx", "reference"), "cuda": ("triton", "cxx", "reference")},
        why=(
            "CPU: BLAS projections + a segmented outer-product loop without the [N, k_out, k_in] "
            "temporary. CUDA: Triton fuses both projections and the outer products per segment "
            "with tl.dot; the CUDA kernel uses cuBLAS for the projections"
        ),
    ),
}
