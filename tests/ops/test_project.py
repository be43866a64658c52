"""project / lift / projection_matrix: every CPU backend against ``x @ projection_matrix(...)``,
the same R on every backend (bitwise), the hash's structural properties, JL statistics,
autograd (the gradient of project is lift), opcheck, torch.compile and bad-input messages."""

from __future__ import annotations

import math

import pytest
import torch

import mixkernels
from mixkernels import lift, project, projection_matrix
from mixkernels.reference import project as ref
from tests._devices import device_backends, on
from tests._tolerances import tol

BACKENDS = ["reference", "cxx"]
# (device, backend): cpu-reference, cpu-cxx, cuda-reference, cuda-cxx, cuda-triton
DB = device_backends("project")
KINDS = ["rademacher", "gaussian", "sjlt"]


def run(target, fn, *args, **kwargs):
    """``fn`` through a backend name (CPU) or a ``(device, backend)`` pair; CPU tensors in and out."""
    device, backend = target if isinstance(target, tuple) else ("cpu", target)
    with mixkernels.backend(backend):
        return on(device, fn)(*args, **kwargs)


def rows_of_r(row_offset, in_dim, out_dim, *, seed, kind, nnz=4):
    """projection_matrix(row_offset + in_dim, ...)[row_offset:] without materialising the first rows
    (test_matrix_properties checks that rows do not depend on how many precede them)."""
    if row_offset < 4096:
        return projection_matrix(row_offset + in_dim, out_dim, seed=seed, kind=kind, nnz=nnz)[row_offset:].double()
    return ref.projection_matrix(in_dim, out_dim, seed=seed, kind=kind, nnz=nnz, row_offset=row_offset).double()


def oracle_project(x, out_dim, *, seed, kind, nnz=4, row_offset=0):
    return x.double() @ rows_of_r(row_offset, x.shape[-1], out_dim, seed=seed, kind=kind, nnz=nnz)


def oracle_lift(y, in_dim, *, seed, kind, nnz=4, row_offset=0):
    return y.double() @ rows_of_r(row_offset, in_dim, y.shape[-1], seed=seed, kind=kind, nnz=nnz).T


def assert_fp32_close(got, expected, x):
    """fp32 accumulation of in_dim products: the bound scales with sum |x| |R|."""
    assert got.dtype == torch.float32
    scale = x.double().abs().sum(-1, keepdim=True).clamp(min=1) / math.sqrt(max(got.shape[-1], 1))
    err = (got.double() - expected).abs()
    assert bool((err <= 1e-5 + 2e-6 * scale).all()), f"max error {err.max():.3e}"


@pytest.mark.parametrize("device,backend", DB)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n, in_dim, out_dim, row_offset", [(1, 1, 1, 0), (3, 257, 70, 0), (5, 1000, 33, 12345),
                                                             (2, 70, 4096, 3), (4, 3001, 128, 2**33 + 5)])
def test_project_and_lift_match_matmul(device, backend, kind, n, in_dim, out_dim, row_offset):
    nnz = min(4, out_dim)
    x = torch.randn(n, in_dim)
    y = run((device, backend), project, x, out_dim, seed=11, kind=kind, nnz=nnz, row_offset=row_offset)
    assert y.shape == (n, out_dim)
    assert_fp32_close(y, oracle_project(x, out_dim, seed=11, kind=kind, nnz=nnz, row_offset=row_offset), x)
    z = torch.randn(n, out_dim)
    back = run((device, backend), lift, z, in_dim, seed=11, kind=kind, nnz=nnz, row_offset=row_offset)
    assert back.shape == (n, in_dim)
    assert_fp32_close(back, oracle_lift(z, in_dim, seed=11, kind=kind, nnz=nnz, row_offset=row_offset), z)


@pytest.mark.parametrize("device,backend", DB)
@pytest.mark.parametrize("kind", KINDS)
def test_same_matrix_on_every_backend_bitwise(device, backend, kind):
    # project(one-hot rows) returns rows of R exactly: 1 * R[i, j] plus exact zeros, times the scale.
    eye = torch.eye(67)
    r = projection_matrix(67 + 1000, 45, seed=2**40 + 7, kind=kind, nnz=3)[1000:]
    got = run((device, backend), project, eye, 45, seed=2**40 + 7, kind=kind, nnz=3, row_offset=1000)
    assert torch.equal(got, r)
    got_t = run((device, backend), lift, torch.eye(45), 67, seed=2**40 + 7, kind=kind, nnz=3, row_offset=1000)
    assert torch.equal(got_t, r.T)


@pytest.mark.parametrize("kind", KINDS)
def test_matrix_properties(kind):
    big = projection_matrix(300, 64, seed=5, kind=kind, nnz=4)
    assert torch.equal(projection_matrix(100, 64, seed=5, kind=kind, nnz=4), big[:100])  # extends
    assert torch.equal(ref.projection_matrix(50, 64, seed=5, kind=kind, nnz=4, row_offset=250), big[250:])
    assert not torch.equal(projection_matrix(100, 64, seed=6, kind=kind, nnz=4), big[:100])  # seeded
    assert not torch.equal(projection_matrix(100, 65, seed=5, kind=kind, nnz=4)[:, :64], big[:100])  # keyed by out_dim
    assert projection_matrix(10, 8, seed=5, kind=kind, dtype=torch.float16).dtype == torch.float16
    if kind == "sjlt":
        assert bool(((big != 0).sum(1) == 4).all())
        assert set(big[big != 0].abs().unique().tolist()) == {0.5}
        for b in range(4):  # exactly one non-zero per column block
            lo, hi = ref.sjlt_block(b, 64, 4)
            assert bool(((big[:, lo:hi] != 0).sum(1) == 1).all())
    elif kind == "rademacher":
        assert set(big.unique().tolist()) == {-1 / 8, 1 / 8}
    # squared row norms have expectation 1
    assert abs(big.pow(2).sum(1).mean().item() - 1) < 0.05


def test_rademacher_sign_bits_are_balanced_and_uncorrelated():
    r = projection_matrix(4000, 96, seed=1, kind="rademacher") * math.sqrt(96)
    assert abs(r.mean().item()) < 4 / math.sqrt(r.numel())
    gram = r.T @ r / 4000  # ~ identity; off-diagonal sd = 1/sqrt(4000)
    off = gram - torch.eye(96)
    assert off.abs().max().item() < 5.5 / math.sqrt(4000)


@pytest.mark.parametrize("kind", KINDS)
def test_jl_inner_products_preserved_in_expectation(kind):
    """Over 300 seeds, the mean of <Ra, Rb> is within 4.5 standard errors of <a, b>, and its sample
    variance is within [0.6, 1.6] x the theory. Theory (K = 64): Rademacher
    (|a|^2|b|^2 + <a,b>^2 - 2 sum a_i^2 b_i^2)/K; Gaussian (|a|^2|b|^2 + <a,b>^2)/K; sjlt has the
    Rademacher variance up to collisions within blocks (bounded by the Gaussian one)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, generator=g, dtype=torch.float64)
    b = 0.6 * a + torch.randn(200, generator=g, dtype=torch.float64)
    ab = float(a @ b)
    k, seeds = 64, 300
    pairs = [project(torch.stack([a, b]).float(), k, seed=s, kind=kind).double() for s in range(seeds)]
    est = torch.tensor([float(y[0] @ y[1]) for y in pairs])
    base = float(a.pow(2).sum() * b.pow(2).sum() + ab**2)
    theory = {"gaussian": base / k, "rademacher": (base - 2 * float((a * a * b * b).sum())) / k}
    var = est.var().item()
    assert abs(est.mean().item() - ab) < 4.5 * math.sqrt(var / seeds), (est.mean().item(), ab)
    if kind in theory:
        assert 0.6 < var / theory[kind] < 1.6, var / theory[kind]
    else:
        assert var < 1.6 * base / k


@pytest.mark.parametrize("device,backend", DB)
@pytest.mark.parametrize("kind", KINDS)
def test_row_offset_splits_a_long_vector(device, backend, kind):
    x = torch.randn(3, 901)
    whole = run((device, backend), project, x, 50, seed=4, kind=kind)
    parts = sum(run((device, backend), project, x[:, s:e], 50, seed=4, kind=kind, row_offset=s)
                for s, e in ((0, 100), (100, 513), (513, 901)))
    torch.testing.assert_close(parts, whole, **tol(torch.float32, device))


@pytest.mark.parametrize("device,backend", DB)
@pytest.mark.parametrize("kind", KINDS)
def test_lift_is_the_adjoint(device, backend, kind):
    x, y = torch.randn(2, 333, dtype=torch.float64), torch.randn(2, 40, dtype=torch.float64)
    px = run((device, backend), project, x.float(), 40, seed=8, kind=kind).double()
    ly = run((device, backend), lift, y.float(), 333, seed=8, kind=kind).double()
    torch.testing.assert_close((px * y).sum(), (x * ly).sum(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device,backend", DB)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_accumulate_in_fp32(device, backend, dtype):
    x = torch.randn(4, 777).to(dtype)
    for kind in KINDS:
        y = run((device, backend), project, x, 96, seed=1, kind=kind)
        assert_fp32_close(y, oracle_project(x, 96, seed=1, kind=kind), x)  # x is exact in fp32
        z = run((device, backend), lift, x[:, :96], 500, seed=1, kind=kind)
        assert_fp32_close(z, oracle_lift(x[:, :96], 500, seed=1, kind=kind), x[:, :96])


@pytest.mark.parametrize("device,backend", DB)
def test_noncontiguous_batched_and_empty(device, backend):
    x = torch.randn(300, 6).t()  # [6, 300], non-contiguous
    y = run((device, backend), project, x, 20, seed=3, kind="sjlt")
    torch.testing.assert_close(y, run("reference", project, x.contiguous(), 20, seed=3, kind="sjlt"))
    x3 = torch.randn(2, 3, 50)
    y3 = run((device, backend), project, x3, 16, seed=3)
    assert y3.shape == (2, 3, 16)
    torch.testing.assert_close(y3.reshape(6, 16), run((device, backend), project, x3.reshape(6, 50), 16, seed=3))
    assert run((device, backend), project, torch.randn(0, 50), 16, seed=3).shape == (0, 16)
    assert torch.equal(run((device, backend), project, torch.randn(4, 0), 16, seed=3), torch.zeros(4, 16))
    assert run((device, backend), lift, torch.randn(4, 16), 0, seed=3).shape == (4, 0)
    assert run((device, backend), lift, torch.randn(0, 16), 9, seed=3).shape == (0, 9)


@pytest.mark.parametrize("device,backend", DB)
@pytest.mark.parametrize("kind", KINDS)
def test_gradient_of_project_is_lift(device, backend, kind):
    x = torch.randn(3, 129, requires_grad=True)
    w = torch.randn(3, 31)
    (run((device, backend), project, x, 31, seed=2, kind=kind) * w).sum().backward()
    torch.testing.assert_close(x.grad, oracle_lift(w, 129, seed=2, kind=kind).float(), rtol=1e-4, atol=1e-5)
    y = torch.randn(3, 31, requires_grad=True)
    v = torch.randn(3, 129)
    (run((device, backend), lift, y, 129, seed=2, kind=kind) * v).sum().backward()
    torch.testing.assert_close(y.grad, oracle_project(v, 31, seed=2, kind=kind).float(), rtol=1e-4, atol=1e-5)
    xb = torch.randn(2, 40, dtype=torch.bfloat16, requires_grad=True)
    run((device, backend), project, xb, 8, seed=2, kind=kind).sum().backward()
    assert xb.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("device,backend", DB)
def test_gradcheck(device, backend):
    # The ops take fp32/fp16/bf16; gradcheck in fp32 with a step that is exact for linear maps.
    x = torch.randn(2, 37, requires_grad=True)
    y = torch.randn(2, 9, requires_grad=True)

    def fx(t):
        return run((device, backend), project, t, 9, seed=1, kind="gaussian", row_offset=5)

    def fy(t):
        return run((device, backend), lift, t, 37, seed=1, kind="sjlt")

    with pytest.warns(UserWarning, match="double precision"):
        assert torch.autograd.gradcheck(fx, (x,), eps=1e-2, atol=1e-3, rtol=1e-3)
    with pytest.warns(UserWarning, match="double precision"):
        assert torch.autograd.gradcheck(fy, (y,), eps=1e-2, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("device,backend", device_backends("project", ("cxx", "triton")))
@pytest.mark.parametrize("kind", KINDS)
def test_opcheck(device, backend, kind):
    suffix = "_triton" if backend == "triton" else ""
    ops = torch.ops.mixkernels
    x = torch.randn(3, 41, device=device, requires_grad=True)
    torch.library.opcheck(getattr(ops, f"project{suffix}").default, (x, 17, 3, kind, 2, 7))
    y = torch.randn(3, 17, device=device, requires_grad=True)
    torch.library.opcheck(getattr(ops, f"lift{suffix}").default, (y, 41, 3, kind, 2, 7))


@pytest.mark.parametrize("device,backend", DB)
def test_torch_compile_fullgraph(device, backend):
    torch._dynamo.reset()

    def f(x):
        with mixkernels.backend(backend):
            y = project(x * 2, 24, seed=5, kind="rademacher", row_offset=3)
            return lift(y, 40, seed=5, kind="sjlt")

    x = torch.randn(3, 40, device=device)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), f(x))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: project(torch.randn(2, 3), 4, seed=1, kind="dense"), "kind must be one of rademacher, gaussian, sjlt, got 'dense'"),
        (lambda: project(torch.randn(2, 3), 0, seed=1), "out_dim must be an int >= 1, got 0"),
        (lambda: project(torch.randn(2, 3), 4, seed=-1), "seed must be an int >= 0, got -1"),
        (lambda: project(torch.randn(2, 3), 4, seed=1, kind="sjlt", nnz=5), "nnz must be <= out_dim = 4 for kind 'sjlt', got 5"),
        (lambda: project(torch.randn(2, 3), 4, seed=1, row_offset=-2), "row_offset must be an int >= 0, got -2"),
        (lambda: project(torch.ones(2, 3, dtype=torch.int64), 4, seed=1), "x must be one of float32, float16, bfloat16, got int64"),
        (lambda: project(torch.tensor(1.0), 4, seed=1), "x must have at least 1 dimension"),
        (lambda: lift(torch.randn(2, 3), -1, seed=1), "in_dim must be an int >= 0, got -1"),
        (lambda: projection_matrix(3, 4, seed=1.5), "seed must be an int >= 0, got 1.5"),
    ],
)
def test_bad_input_messages(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
