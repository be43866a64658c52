"""project / lift through the Triton kernels under TRITON_INTERPRET=1 (run by `make test` in its
own process), end to end through the public functions, autograd included; tiny shapes."""

from __future__ import annotations

import pytest
import torch

import mixkernels
from mixkernels import lift, project, projection_matrix
from mixkernels.reference import project as ref
from tests.ops.test_project import assert_fp32_close, oracle_lift, oracle_project

pytestmark = pytest.mark.triton
KINDS = ["rademacher", "gaussian", "sjlt"]


def run(fn, *args, **kwargs):
    with mixkernels.backend("triton"):
        return fn(*args, **kwargs)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n, in_dim, out_dim, row_offset", [(1, 1, 1, 0), (3, 77, 45, 0), (17, 40, 70, 2**33 + 5)])
def test_parity(kind, n, in_dim, out_dim, row_offset):
    nnz = min(3, out_dim)
    x = torch.randn(n, in_dim)
    y = run(project, x, out_dim, seed=7, kind=kind, nnz=nnz, row_offset=row_offset)
    assert_fp32_close(y, oracle_project(x, out_dim, seed=7, kind=kind, nnz=nnz, row_offset=row_offset), x)
    z = torch.randn(n, out_dim).half()
    back = run(lift, z, in_dim, seed=7, kind=kind, nnz=nnz, row_offset=row_offset)
    assert_fp32_close(back, oracle_lift(z, in_dim, seed=7, kind=kind, nnz=nnz, row_offset=row_offset), z)


@pytest.mark.parametrize("kind", KINDS)
def test_same_matrix_bitwise(kind):
    r = ref.projection_matrix(33, 40, seed=2**40 + 7, kind=kind, nnz=3, row_offset=10**12)
    assert torch.equal(run(project, torch.eye(33), 40, seed=2**40 + 7, kind=kind, nnz=3, row_offset=10**12), r)
    assert torch.equal(run(lift, torch.eye(40), 33, seed=2**40 + 7, kind=kind, nnz=3, row_offset=10**12), r.T)
    small = projection_matrix(20, 40, seed=3, kind=kind, nnz=3)
    assert torch.equal(run(project, torch.eye(20), 40, seed=3, kind=kind, nnz=3), small)


def test_noncontiguous_empty_and_gradient():
    x = torch.randn(50, 3).t()
    torch.testing.assert_close(run(project, x, 20, seed=1, kind="sjlt"), project(x.contiguous(), 20, seed=1, kind="sjlt"))
    assert run(project, torch.randn(0, 5), 8, seed=1).shape == (0, 8)
    xg = torch.randn(2, 30, requires_grad=True)
    w = torch.randn(2, 16)
    (run(project, xg, 16, seed=4, kind="gaussian") * w).sum().backward()
    torch.testing.assert_close(xg.grad, oracle_lift(w, 30, seed=4, kind="gaussian").float(), rtol=1e-4, atol=1e-5)
