"""softcap / logit_scale / z_loss through the Triton backend under TRITON_INTERPRET=1 (tiny shapes:
the interpreter is slow), against the fp64 eager oracle and torch.func gradients of tests/ops."""

from __future__ import annotations

import pytest
import torch

import mixkernels
from mixkernels import _backend
from tests._tolerances import TOL
from tests.ops.test_linear_ce import make
from tests.ops.test_linear_ce_options import OPTION_IDS, OPTIONS, check, eager_loss, oracle, run

pytestmark = pytest.mark.triton

if _backend.unavailable_reason("linear_ce", "cpu", "triton"):
    pytest.skip(_backend.unavailable_reason("linear_ce", "cpu", "triton"), allow_module_level=True)

TRITON = ("cpu", "triton")


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("softcap,logit_scale,z_loss", OPTIONS, ids=OPTION_IDS)
def test_options_parity(reduction, softcap, logit_scale, z_loss):
    # V = 37 with BLOCK_V = 64 masks a partial tile (the masked lanes must stay out of the max after
    # the softcap); N = 11 is not a multiple of chunk_size = 4
    h, w, b, y = make(n=11, d=8, v=37, bias=True, ignore_every=4, scale=0.8)
    groups = torch.tensor([0, 1, 2, 1, 0, 2, 2, 1, 0, 0, 1])
    up = torch.randn(11, generator=torch.Generator().manual_seed(2)) if reduction == "none" else None
    opts = {"softcap": softcap, "logit_scale": logit_scale, "z_loss": z_loss}
    out, grads = run(TRITON, h, w, y, b, upstream=up, group_ids=groups, num_groups=3, chunk_size=4,
                     reduction=reduction, label_smoothing=0.1, **opts)
    ref = oracle(h, w, y, b, groups, 3, upstream=up, reduction=reduction, smoothing=0.1, **opts)
    check(out, grads, ref, z_loss=z_loss)


def test_sum_multiple_vocab_tiles_and_fp16():
    # V = 4100 > BLOCK_V = 4096: the online log-sum-exp of the capped logits crosses a tile boundary
    opts = {"softcap": 2.0, "logit_scale": 1.5, "z_loss": 0.01}
    h, w, _b, y = make(n=3, d=4, v=4100, ignore_every=0, scale=2.0)
    out, grads = run(TRITON, h, w, y, reduction="sum", **opts)
    check(out, grads, oracle(h, w, y, reduction="sum", **opts), z_loss=0.01, groups=False)
    h16, w16 = h.detach().half().requires_grad_(), w.detach().half().requires_grad_()
    out16, (gh, _gw, _) = run(TRITON, h16, w16, y, reduction="sum", **opts)
    ref16 = oracle(h16, w16, y, reduction="sum", **opts)
    torch.testing.assert_close(out16.loss.double(), ref16[0], **TOL[torch.float32])
    assert gh.dtype == torch.float16
    torch.testing.assert_close(gh.double(), ref16[4][0], **TOL[torch.float16])


def test_cross_entropy_options():
    z = (torch.randn(6, 23, generator=torch.Generator().manual_seed(3)) * 3).requires_grad_()
    yz = torch.tensor([1, -100, 22, 0, 5, 7])
    opts = {"softcap": 2.5, "logit_scale": 0.7, "z_loss": 0.05}
    with mixkernels.backend("triton"):
        got = mixkernels.cross_entropy(z, yz, reduction="none", label_smoothing=0.2, return_token_loss=True, **opts)
    up = torch.randn(6)
    got.loss.backward(up)
    zd = z.detach().double()
    loss, vjp = torch.func.vjp(lambda t: eager_loss(t, yz, smoothing=0.2, reduction="none", **opts)[0], zd)
    (gz,) = vjp(up.double())
    _, tok, _, zl = eager_loss(zd, yz, smoothing=0.2, reduction="none", **opts)
    torch.testing.assert_close(got.loss.double(), loss, **TOL[torch.float32])
    torch.testing.assert_close(got.token_loss.double(), tok, **TOL[torch.float32])
    torch.testing.assert_close(got.z_loss.double(), zl, **TOL[torch.float32])
    torch.testing.assert_close(z.grad.double(), gz, **TOL[torch.float32])


def test_opcheck_triton_options():
    h, w, b, y = make(n=6, d=4, v=13, bias=True)
    g = torch.tensor([0, 1, 0, 1, 1, 0])
    for reduction in (0, 2):
        args = (h, w, y, b, g, 2, -100, 0.0, reduction, 4, True, True, 2.0, 0.5, 0.01)
        torch.library.opcheck(torch.ops.mixkernels.linear_ce_triton.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    z = torch.randn(6, 13, requires_grad=True)
    torch.library.opcheck(torch.ops.mixkernels.cross_entropy_triton.default, (z, y, g, 2, -100, 0.0, 0, 2.0, 0.5, 0.01),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
