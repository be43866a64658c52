"""factored_sketch: every CPU backend against a float64 oracle that forms the per-example weight
gradient G_b = sum_t g_t x_t^T explicitly; autograd, opcheck, torch.compile, bad inputs."""

from __future__ import annotations

import pytest
import torch

import mixkernels
from mixkernels import factored_sketch
from tests._devices import DEVICES, device_backends, on, tree_to
from tests._tolerances import assert_error_within, tol

BACKENDS = ["reference", "cxx"]
# (device, backend): cpu-reference, cpu-cxx, cuda-reference, cuda-cxx, cuda-triton
DB = device_backends("factored_sketch")


def oracle(x, g, offsets, p_in, p_out):
    out = []
    for b in range(offsets.numel() - 1):
        s, e = int(offsets[b]), int(offsets[b + 1])
        gb = g[s:e].double().T @ x[s:e].double()  # [d_out, d_in]
        left = gb if p_out is None else p_out.double().T @ gb
        out.append(left if p_in is None else left @ p_in.double())
    k_out = g.shape[1] if p_out is None else p_out.shape[1]
    k_in = x.shape[1] if p_in is None else p_in.shape[1]
    return torch.stack(out) if out else torch.zeros(0, k_out, k_in, dtype=torch.float64)


def run(target, *args):
    """factored_sketch through a backend name (CPU) or a ``(device, backend)`` pair; CPU tensors in and out."""
    device, backend = target if isinstance(target, tuple) else ("cpu", target)
    with mixkernels.backend(backend):
        return on(device, factored_sketch)(*args)


def inputs(n=53, d_in=37, d_out=29, k_in=16, k_out=8, offsets=(0, 7, 7, 30, 53), dtype=torch.float32):
    return (torch.randn(n, d_in).to(dtype), torch.randn(n, d_out).to(dtype), torch.tensor(offsets),
            torch.randn(d_in, k_in) / k_in**0.5, torch.randn(d_out, k_out) / k_out**0.5)


@pytest.mark.parametrize("device,backend", DB)
@pytest.mark.parametrize("shape", [{}, {"n": 1, "offsets": (0, 1)}, {"n": 300, "d_in": 129, "d_out": 65, "k_in": 5, "k_out": 3,
                                   "offsets": (0, 100, 200, 300)}, {"n": 40, "offsets": (5, 9, 33)},
                                   {"n": 20, "k_in": 64, "k_out": 64, "offsets": (0, 20)}])
def test_parity(device, backend, shape):
    x, g, off, p_in, p_out = inputs(**shape)
    s = run((device, backend), x, g, off, p_in, p_out)
    assert s.dtype == torch.float32 and s.shape == (off.numel() - 1, p_out.shape[1], p_in.shape[1])
    torch.testing.assert_close(s.double(), oracle(x, g, off, p_in, p_out), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device,backend", DB)
def test_preprojected_inputs(device, backend):
    x, g, off, p_in, p_out = inputs()
    expected = oracle(x, g, off, p_in, p_out)
    for args in ((x @ p_in, g, off, None, p_out), (x, g @ p_out, off, p_in, None), (x @ p_in, g @ p_out, off, None, None)):
        torch.testing.assert_close(run((device, backend), *args).double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device,backend", DB)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(device, backend, dtype):
    x, g, off, p_in, p_out = inputs(dtype=dtype)
    s = run((device, backend), x, g, off, p_in, p_out)
    expected = oracle(x, g, off, p_in, p_out)
    # PyTorch in the same dtype: per-example gradient and projections in low precision.
    # (on the same device as the kernel: its GEMMs round like the kernel's would)
    xd, gd, pid, pod = tree_to((x, g, p_in.to(dtype), p_out.to(dtype)), device)
    torch_low = torch.stack([pod.T @ (gd[s_:e_].T @ xd[s_:e_]) @ pid
                             for s_, e_ in zip(off[:-1].tolist(), off[1:].tolist())]).cpu()
    assert_error_within(s, expected, torch_low, name="factored_sketch")
    torch.testing.assert_close(s.double(), expected, rtol=1e-4, atol=1e-4)  # inputs are exact in fp32


@pytest.mark.parametrize("device,backend", DB)
def test_noncontiguous_and_empty(device, backend):
    x, g, off, p_in, p_out = inputs()
    xt = x.t().contiguous().t()
    torch.testing.assert_close(run((device, backend), xt, g, off, p_in.t().contiguous().t(), p_out).double(),
                               oracle(x, g, off, p_in, p_out), rtol=1e-4, atol=1e-4)
    assert torch.equal(run((device, backend), x[:0], g[:0], torch.tensor([0, 0, 0]), p_in, p_out), torch.zeros(2, 8, 16))
    assert run((device, backend), x, g, torch.tensor([4]), p_in, p_out).shape == (0, 8, 16)


@pytest.mark.parametrize("device,backend", DB)
def test_gradient(device, backend):
    x, g, off, p_in, p_out = inputs(n=30, offsets=(0, 10, 30))
    x.requires_grad_(True)
    g.requires_grad_(True)
    w = torch.randn(2, 8, 16)
    (run((device, backend), x, g, off, p_in, p_out) * w).sum().backward()
    x2, g2 = x.detach().double().requires_grad_(True), g.detach().double().requires_grad_(True)
    (oracle(x2, g2, off, p_in, p_out) * w.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), x2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g.grad.double(), g2.grad, rtol=1e-4, atol=1e-5)
    xs, gs, offs, pis, pos = inputs(n=6, d_in=5, d_out=4, k_in=3, k_out=2, offsets=(0, 2, 6))
    with mixkernels.backend(backend), pytest.warns(UserWarning, match="double precision"):
        # fp32 inputs (the op takes no float64); the step is exact enough for a bilinear map.
        assert torch.autograd.gradcheck(lambda a, b: on(device, factored_sketch)(a, b, offs, pis, pos),
                                        (xs.requires_grad_(True), gs.requires_grad_(True)),
                                        eps=1e-2, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("device,backend", device_backends("factored_sketch", ("cxx", "triton")))
def test_opcheck(device, backend):
    op = torch.ops.mixkernels.factored_sketch_triton if backend == "triton" else torch.ops.mixkernels.factored_sketch
    x, g, off, p_in, p_out = tree_to(inputs(n=20, offsets=(0, 5, 20)), device)
    torch.library.opcheck(op.default, (x.requires_grad_(True), g.requires_grad_(True), off, p_in, p_out))
    torch.library.opcheck(op.default, (x.detach() @ p_in, g.detach(), off, None, p_out))


@pytest.mark.parametrize("device,backend", DB)
def test_torch_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    x, g, off, p_in, p_out = tree_to(inputs(), device)

    def f(x, g):
        with mixkernels.backend(backend):
            return factored_sketch(x * 2, g, off, p_in, p_out).sum(0)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, g), f(x, g), **tol(torch.float32, device))


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: (a[0][:, None], *a[1:]), r"x must be 2-D \[N, features\]"),
        (lambda a: (a[0], a[1][:5], *a[2:]), "g must have N = x.shape.0. = 53 rows, got 5"),
        (lambda a: (a[0], a[1], a[2].int(), *a[3:]), r"offsets must be int64 \[B \+ 1\]"),
        (lambda a: (a[0], a[1], torch.tensor([0, 9, 4]), *a[3:]), r"offsets\[1\] = 9 > offsets\[2\] = 4"),
        (lambda a: (a[0], a[1], torch.tensor([0, 60]), *a[3:]), r"offsets must lie in \[0, N = 53\], got first 0 and last 60"),
        (lambda a: (*a[:3], a[3][:5], a[4]), r"p_in must be \[x.shape\[1\] = 37, k\], got shape \(5, 16\)"),
        (lambda a: (a[0].long(), *a[1:]), "x must be one of float32, float16, bfloat16, got int64"),
    ],
)
@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_messages(device, mutate, match):
    # offsets values are checked on the host for CUDA inputs too (the same ValueError)
    with pytest.raises((ValueError, TypeError), match=match):
        factored_sketch(*tree_to(mutate(inputs()), device))
