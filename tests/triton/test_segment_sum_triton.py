"""segment_sum through the Triton kernel under TRITON_INTERPRET=1 (run by `make test` in its own
process), end to end through the public function, autograd included."""

from __future__ import annotations

import pytest
import torch

import mixkernels
from tests.ops.test_segment_sum import check, oracle

pytestmark = pytest.mark.triton


@pytest.mark.parametrize("n", [0, 1, 37, 700])
@pytest.mark.parametrize("c", [None, 3, 70])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_parity(n, c, id_dtype):
    values = torch.randn((n,) if c is None else (n, c))
    ids = torch.randint(0, 11, (n,), dtype=id_dtype)
    check("triton", values, ids, 11)


def test_mask_noncontiguous_fp16():
    values = torch.randn(5, 99).t().half()
    ids = torch.randint(0, 4, (99,))
    mask = torch.rand(99) > 0.5
    check("triton", values, ids, 4, mask=mask)


def test_gradient():
    values = torch.randn(40, 2, requires_grad=True)
    ids = torch.randint(0, 5, (40,))
    weights = torch.randn(5, 2)
    with mixkernels.backend("triton"):
        sums, _ = mixkernels.segment_sum(values, ids, 5)
    (sums * weights).sum().backward()
    torch.testing.assert_close(values.grad, weights[ids])


def test_bad_id_message():
    with (pytest.raises(ValueError, match=r"segment_ids\[1\] = 5 is out of range \[0, 5\)"),
          mixkernels.backend("triton")):
        mixkernels.segment_sum(torch.randn(3), torch.tensor([0, 5, 1]), 5)


def test_opcheck():
    values = torch.randn(17, 2, requires_grad=True)
    ids = torch.randint(0, 3, (17,))
    torch.library.opcheck(torch.ops.mixkernels.segment_sum_triton.default, (values, ids, 3, None))
    assert oracle  # imported oracle is the shared one
