"""The device helpers every op test goes through (tests/_devices.py), checked on CPU: the strided
rebuild keeps shapes, strides, values and the gradient path; results come back through
dataclasses and named tuples; the parametrisation lists cuda ids with a skip reason."""

from __future__ import annotations

import torch

import mixkernels
from tests import _devices


def test_same_strides_keeps_gapped_views_and_gradients():
    base = torch.randn(6, 10)
    x = base[:, ::3].detach().requires_grad_()  # [6, 4] with strides (10, 3): not dense
    y = _devices.same_strides(x, "cpu")
    assert y.shape == x.shape and y.stride() == x.stride() and not y.is_contiguous()
    assert torch.equal(y, x)
    w = torch.randn(6, 4)
    (y * w).sum().backward()
    torch.testing.assert_close(x.grad, w)
    z = _devices.same_strides(torch.randn(7, 5).t()[::2], "cpu")  # transposed and gapped
    assert z.stride() == (2, 5)


def test_expanded_views_stay_expanded_with_their_gradient():
    base = torch.randn(4, 1, requires_grad=True)
    t = base.expand(4, 13)
    moved = _devices.move(t, "cpu", force_copy=True)  # the path taken for another device
    assert moved.shape == t.shape and moved.stride() == (1, 0) and torch.equal(moved, t)
    assert moved.data_ptr() != base.data_ptr()
    w = torch.randn(4, 13)
    (moved * w).sum().backward()
    torch.testing.assert_close(base.grad, w.sum(1, keepdim=True))


def test_forced_copies_keep_strides_of_every_layout():
    x = torch.randn(5, 6, 7)
    for view in (x, x.permute(2, 0, 1), x[:, ::2], x[..., 1:].transpose(0, 2), x[:0]):
        moved = _devices.move(view, "cpu", force_copy=True)
        assert torch.equal(moved, view) and moved.shape == view.shape
        assert moved.numel() == 0 or moved.data_ptr() != view.data_ptr()
        if view.numel():
            assert moved.stride() == view.stride(), view.stride()


def test_dense_layouts_are_recognised():
    x = torch.randn(3, 4, 5)
    assert _devices._dense(x) and _devices._dense(x.permute(2, 0, 1)) and _devices._dense(x[:1])
    assert not _devices._dense(x[:, ::2]) and not _devices._dense(x[..., 1:]) and not _devices._dense(x[:, :1])
    assert not _devices._dense(torch.randn(4).expand(3, 4))  # overlapping (stride 0)


def test_tree_to_rebuilds_dataclasses_named_tuples_and_lists():
    stats = mixkernels.router_stats(torch.randn(2, 9, 4), 2)
    moved = _devices.tree_to({"s": stats, "l": [torch.ones(2)], "n": None}, "cpu")
    assert isinstance(moved["s"], mixkernels.RouterStats) and moved["n"] is None
    assert torch.equal(moved["s"].prob_sum, stats.prob_sum) and torch.equal(moved["l"][0], torch.ones(2))
    assert _devices.on("cpu", mixkernels.segment_sum) is mixkernels.segment_sum


def test_device_backends_lists_cuda_ids_even_without_a_gpu():
    ids = [p.id for p in _devices.device_backends("segment_sum")]
    assert ids == ["cpu-reference", "cpu-cxx", "cuda-reference", "cuda-cxx", "cuda-triton"]
    cuda = [p for p in _devices.device_backends("segment_sum") if p.values[0] == "cuda"]
    for p in cuda:
        names = [m.name for m in p.marks]
        assert "cuda" in names
        if not torch.cuda.is_available() and not _devices.REQUIRE_CUDA:
            skip = [m for m in p.marks if m.name == "skip"]
            assert skip and "no CUDA device" in skip[0].kwargs["reason"]
