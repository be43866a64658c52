"""linear_cross_entropy / cross_entropy through the Triton backend under TRITON_INTERPRET=1
(tiny shapes: the interpreter is slow), against the fp64 eager oracle of tests/ops."""

from __future__ import annotations

import pytest
import torch

import mixkernels
from mixkernels import _backend
from tests._tolerances import TOL
from tests.ops.test_linear_ce import check_all, make, oracle, run

pytestmark = pytest.mark.triton

if _backend.unavailable_reason("linear_ce", "cpu", "triton"):
    pytest.skip(_backend.unavailable_reason("linear_ce", "cpu", "triton"), allow_module_level=True)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("bias,smoothing", [(False, 0.0), (True, 0.1)])
def test_parity(reduction, bias, smoothing):
    # V = 37 with BLOCK_V = 64 masks a partial tile; N = 11 is not a multiple of chunk_size = 4
    h, w, b, y = make(n=11, d=8, v=37, bias=bias, ignore_every=4)
    groups = torch.tensor([0, 1, 2, 1, 0, 2, 2, 1, 0, 0, 1])
    up = torch.randn(11, generator=torch.Generator().manual_seed(2)) if reduction == "none" else None
    out, *grads = run("triton", h, w, y, b, upstream=up, group_ids=groups, num_groups=3, chunk_size=4,
                      reduction=reduction, label_smoothing=smoothing)
    check_all(out, grads, oracle(h, w, y, b, groups, 3, smoothing=smoothing, reduction=reduction, upstream=up))


def test_multiple_vocab_tiles_and_fp16():
    # V = 4100 > BLOCK_V = 4096: the online log-sum-exp crosses a tile boundary
    h, w, _b, y = make(n=3, d=4, v=4100, ignore_every=0, scale=2.0)
    out, *grads = run("triton", h, w, y, reduction="sum")
    check_all(out, grads, oracle(h, w, y, reduction="sum"), groups=False)
    h16, w16 = h.detach().half().requires_grad_(), w.detach().half().requires_grad_()
    out16, gh, _gw, _ = run("triton", h16, w16, y, reduction="sum")
    ref16 = oracle(h16, w16, y, reduction="sum")
    torch.testing.assert_close(out16.loss.double(), ref16[0], **TOL[torch.float32])
    assert gh.dtype == torch.float16
    torch.testing.assert_close(gh.double(), ref16[4], **TOL[torch.float16])


def test_all_ignored_and_cross_entropy():
    h, w, _b, y = make(n=5, d=4, v=19)
    y[:] = -100
    out, gh, _gw, _ = run("triton", h, w, y, group_ids=torch.zeros(5, dtype=torch.long), num_groups=1)
    assert out.loss.item() == 0.0 and out.group_count.tolist() == [0] and torch.all(gh == 0)
    z = (torch.randn(6, 23) * 3).requires_grad_()
    yz = torch.tensor([1, -100, 22, 0, 5, 7])
    with mixkernels.backend("triton"):
        got = mixkernels.cross_entropy(z, yz, reduction="none", label_smoothing=0.2)
    up = torch.randn(6)
    got.loss.backward(up)
    zd = z.detach().double().requires_grad_()
    ref = torch.nn.functional.cross_entropy(zd, yz, reduction="none", label_smoothing=0.2)
    ref.backward(up.double())
    torch.testing.assert_close(got.loss.double(), ref.detach(), **TOL[torch.float32])
    torch.testing.assert_close(z.grad.double(), zd.grad, **TOL[torch.float32])


def test_opcheck_triton_op():
    h, w, b, y = make(n=6, d=4, v=13, bias=True)
    args = (h, w, y, b, torch.tensor([0, 1, 0, 1, 1, 0]), 2, -100, 0.0, 2, 4, True)
    torch.library.opcheck(torch.ops.mixkernels.linear_ce_triton.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
