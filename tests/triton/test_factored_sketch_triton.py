"""factored_sketch through the Triton kernel under TRITON_INTERPRET=1, end to end through the
public function (autograd included); tiny shapes."""

from __future__ import annotations

import pytest
import torch

import mixkernels
from mixkernels import factored_sketch
from tests.ops.test_factored_sketch import inputs
from tests.ops.test_factored_sketch import oracle as sketch_oracle

pytestmark = pytest.mark.triton


def run(fn, *args, **kwargs):
    with mixkernels.backend("triton"):
        return fn(*args, **kwargs)


@pytest.mark.parametrize("shape", [{"n": 23, "offsets": (0, 5, 5, 23)}, {"n": 20, "d_in": 70, "k_in": 5, "k_out": 3, "offsets": (2, 9, 17)}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_factored_sketch(shape, dtype):
    x, g, off, p_in, p_out = inputs(dtype=dtype, **shape)
    expected = sketch_oracle(x, g, off, p_in, p_out)
    torch.testing.assert_close(run(factored_sketch, x, g, off, p_in, p_out).double(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(run(factored_sketch, (x.float() @ p_in), g, off, None, p_out).double(), expected,
                               rtol=1e-4, atol=1e-4)
    xg = x.float().requires_grad_(True)
    run(factored_sketch, xg, g, off, p_in, p_out).sum().backward()
    assert xg.grad.shape == x.shape
