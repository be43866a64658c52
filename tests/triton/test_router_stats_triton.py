"""router_stats through the triton backend (Triton interpreter on CPU tensors, tiny shapes)
against the naive per-group oracle of tests/ops/test_router_stats.py."""

from __future__ import annotations

import pytest
import torch

import mixkernels
from mixkernels import _backend
from tests.ops.test_router_stats import FIELDS, _inputs, assert_matches, naive_oracle

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(
        bool(_backend.unavailable_reason("router_stats", "cpu", "triton")),
        reason=_backend.unavailable_reason("router_stats", "cpu", "triton") or "",
    ),
]


@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (2, 37, 7, 3, 4), (1, 70, 33, 8, 3), (2, 20, 6, 6, 40)],
                         ids=lambda s: "L{}N{}E{}k{}G{}".format(*s))
def test_fields_vs_naive_oracle(shape):
    num_layers, n, e, k, num_groups = shape  # G = 40 takes the per-token atomic path
    z, groups, mask = _inputs(num_layers, n, e, num_groups)
    with mixkernels.backend("triton"):
        stats = mixkernels.router_stats(z, k, group_ids=groups, num_groups=num_groups, mask=mask)
    assert_matches(stats, naive_oracle(list(z), k, groups, num_groups, mask), what=str(shape))


def test_fp16_ties_and_list_input():
    z, groups, mask = _inputs(2, 40, 12, 3, dtype=torch.float16)
    z[:, :5] = 0.5  # rows of exact ties: the lower indices win
    with mixkernels.backend("triton"):
        stats = mixkernels.router_stats([t for t in z], 4, group_ids=groups.int(), num_groups=3, mask=mask)
    assert_matches(stats, naive_oracle(list(z), 4, groups, 3, mask, stable=True), what="fp16 ties")


def test_masked_garbage_and_empty():
    z, groups, mask = _inputs(2, 30, 5, 2)
    z_bad, g_bad = z.clone(), groups.clone()
    z_bad[:, ~mask] = float("nan")
    g_bad[~mask] = 9
    with mixkernels.backend("triton"):
        stats = mixkernels.router_stats(z_bad, 2, group_ids=g_bad, num_groups=2, mask=mask)
        empty = mixkernels.router_stats(z[:, :0], 2)
    assert_matches(stats, naive_oracle(list(z), 2, groups, 2, mask), what="garbage padding")
    assert int(empty.expert_counts.sum()) == 0 and empty.token_count.tolist() == [0]


def test_matches_reference_with_autograd_and_lbl():
    z, groups, mask = _inputs(2, 24, 6, 3)
    outs = {}
    for backend in ("reference", "triton"):
        x = z.clone().requires_grad_()
        with mixkernels.backend(backend):
            stats = mixkernels.router_stats(x, 2, group_ids=groups, num_groups=3, mask=mask)
            lbl = mixkernels.load_balancing_loss(tuple(x.unbind(0)), 6, 2, mask.view(4, 6))
        (stats.entropy_sum.sum() + stats.aux_loss.sum() + lbl).backward()
        outs[backend] = (stats, lbl, x.grad)
    for name in FIELDS:
        torch.testing.assert_close(getattr(outs["triton"][0], name), getattr(outs["reference"][0], name), msg=name)
    torch.testing.assert_close(outs["triton"][1], outs["reference"][1])
    torch.testing.assert_close(outs["triton"][2], outs["reference"][2])


def test_errors():
    z = torch.randn(2, 5, 6)
    with mixkernels.backend("triton"), pytest.raises(ValueError, match=r"group_ids\[1\] = 3 is out of range \[0, 2\)"):
        mixkernels.router_stats(z, 2, group_ids=torch.tensor([0, 3, 0, 1, 1]), num_groups=2)
    with mixkernels.backend("triton"), pytest.raises(TypeError, match="triton backend takes float32"):
        mixkernels.router_stats(z.double(), 2)


def test_opcheck_triton_op():
    z, groups, mask = _inputs(2, 9, 5, 2)
    layers = [t.clone().requires_grad_() for t in z]
    torch.library.opcheck(torch.ops.mixkernels.router_stats_triton.default, (layers, 2, groups, 2, mask),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("top_k", [1, 3])
def test_all_neg_inf_rows_pick_the_first_experts_like_reference(top_k):
    """A token whose router logits are all -inf has NaN probabilities; the reference (a descending
    stable sort, NaN first) and the C++ kernels then count experts 0..k-1 for it. Triton agrees
    (it used to count no expert for such a row)."""
    z = torch.randn(2, 9, 5, generator=torch.Generator().manual_seed(3))
    z[:, 2] = float("-inf")  # every layer: token 2 all -inf
    z[1, 6] = float("-inf")  # layer 1: token 6 too
    groups = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 0])
    with mixkernels.backend("triton"):
        got = mixkernels.router_stats(z, top_k, group_ids=groups, num_groups=2)
    with mixkernels.backend("reference"):
        ref = mixkernels.router_stats(z, top_k, group_ids=groups, num_groups=2)
    assert torch.equal(got.expert_counts, ref.expert_counts)
    # every token routes to exactly k experts; the all -inf token 2 (group 0) to experts 0..k-1
    assert got.expert_counts.sum(dim=(1, 2)).tolist() == [9 * top_k, 9 * top_k]
    finite = torch.randn(2, 9, 5, generator=torch.Generator().manual_seed(3))
    finite[:, 2] = 0.0  # the same tokens, token 2 replaced by a row that surely ranks 0..k-1 first
    finite[1, 6] = 0.0
    with mixkernels.backend("reference"):
        tied = mixkernels.router_stats(finite, top_k, group_ids=groups, num_groups=2)
    assert torch.equal(got.expert_counts, tied.expert_counts)
    if not _backend.unavailable_reason("router_stats", "cpu", "cxx"):
        with mixkernels.backend("cxx"):
            cxx = mixkernels.router_stats(z, top_k, group_ids=groups, num_groups=2)
        assert torch.equal(got.expert_counts, cxx.expert_counts)
