"""segment_sum: every CPU backend against an independent float64 oracle, autograd, opcheck,
torch.compile, determinism and bad-input messages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mixkernels
from mixkernels import _extension
from tests._devices import DEVICES, cuda_marks, device_backends, on
from tests._tolerances import tol

BACKENDS = ["reference", "cxx"]
# (device, backend): cpu-reference, cpu-cxx, cuda-reference, cuda-cxx, cuda-triton
DB = device_backends("segment_sum")


def oracle(values, ids, num_segments, mask=None, *, abs_sums=False):
    """numpy's unbuffered ``np.add.at`` in float64: independent of every implementation (and of torch)."""
    v = values.double().numpy()
    i = ids.long().numpy()
    if mask is not None:
        keep = mask.numpy()
        v, i = v[keep], i[keep]
    sums = np.zeros((num_segments, *values.shape[1:]), dtype=np.float64)
    mags = np.zeros_like(sums)
    np.add.at(sums, i, v)
    np.add.at(mags, i, np.abs(v))
    counts = np.bincount(i, minlength=num_segments).astype(np.int64)
    out = (torch.from_numpy(sums), torch.from_numpy(counts), torch.from_numpy(mags))
    return out if abs_sums else out[:2]


def run(backend, *args, device="cpu", **kwargs):
    """segment_sum through ``backend`` on ``device`` (inputs moved there, results back to CPU)."""
    with mixkernels.backend(backend):
        return on(device, mixkernels.segment_sum)(*args, **kwargs)


def check(backend, values, ids, s, mask=None, device="cpu"):
    sums, counts = run(backend, values, ids, s, mask=mask, device=device)
    ref_sums, ref_counts, mags = oracle(values, ids, s, mask, abs_sums=True)
    assert sums.dtype == torch.float32 and counts.dtype == torch.int64
    assert sums.shape == ref_sums.shape and counts.shape == (s,)
    torch.testing.assert_close(counts, ref_counts, atol=0, rtol=0)
    # fp32 accumulation: the error bound grows with the segment's sum of magnitudes.
    bound = tol(torch.float32, device)["atol"] + 1e-6 * mags
    err = (sums.double() - ref_sums).abs()
    assert bool((err <= bound).all()), f"max error {err.max():.3e} exceeds the fp32 accumulation bound"


@pytest.mark.parametrize("device,backend", DB)
@pytest.mark.parametrize("n", [0, 1, 7, 1000, 70001])
@pytest.mark.parametrize("c", [None, 1, 3])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_parity(device, backend, n, c, id_dtype):
    shape = (n,) if c is None else (n, c)
    values = torch.randn(shape)
    ids = torch.randint(0, 13, (n,), dtype=id_dtype)
    check(backend, values, ids, 13, device=device)


@pytest.mark.parametrize("device,backend", DB)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_accumulate_in_fp32(device, backend, dtype):
    values = torch.randn(5000, 2).to(dtype)
    ids = torch.randint(0, 3, (5000,))
    check(backend, values, ids, 3, device=device)


@pytest.mark.parametrize("device,backend", DB)
def test_mask_and_noncontiguous(device, backend):
    base = torch.randn(6, 301)
    values = base.t()[:, ::2]  # [301, 3], non-contiguous
    ids = torch.randint(0, 5, (602,))[::2]
    mask = torch.rand(301) > 0.4
    assert not values.is_contiguous() and not ids.is_contiguous()
    check(backend, values, ids, 5, mask=mask, device=device)
    check(backend, values[:, 0], ids, 5, mask=mask, device=device)


@pytest.mark.parametrize("device,backend", DB)
def test_empty_segments_and_all_masked(device, backend):
    values = torch.randn(10)
    ids = torch.zeros(10, dtype=torch.long)
    sums, counts = run(backend, values, ids, 4, mask=torch.zeros(10, dtype=torch.bool), device=device)
    assert counts.tolist() == [0, 0, 0, 0] and sums.abs().sum() == 0


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 300), c=st.integers(1, 4), s=st.integers(1, 40), use_mask=st.booleans(), seed=st.integers(0, 9999))
def test_property_cxx_matches_oracle(device, n, c, s, use_mask, seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(n, c, generator=g)
    ids = torch.randint(0, s, (n,), generator=g)
    mask = (torch.rand(n, generator=g) > 0.5) if use_mask else None
    check("cxx", values, ids, s, mask=mask, device=device)


def test_cpu_deterministic_bits():
    values = torch.randn(300_000, 2)
    ids = torch.randint(0, 16, (300_000,))
    first = run("cxx", values, ids, 16)[0]
    torch.set_num_threads(1)
    try:
        single = run("cxx", values, ids, 16)[0]
    finally:
        torch.set_num_threads(2)
    again = run("cxx", values, ids, 16)[0]
    assert torch.equal(first, again) and torch.equal(first, single)


@pytest.mark.parametrize("device,backend", DB)
@pytest.mark.parametrize("c", [None, 3])
def test_gradient_against_oracle(device, backend, c):
    shape = (50,) if c is None else (50, c)
    values = torch.randn(shape, requires_grad=True)
    ids = torch.randint(0, 6, (50,))
    mask = torch.rand(50) > 0.3
    weights = torch.randn((6,) if c is None else (6, c))
    sums, _ = run(backend, values, ids, 6, mask=mask, device=device)
    (sums * weights).sum().backward()
    expected = weights[ids] * mask.reshape(-1, *([1] * (values.dim() - 1)))
    torch.testing.assert_close(values.grad, expected)


@pytest.mark.parametrize("device,backend", DB)
def test_gradcheck_float64(device, backend):
    # float64 values are accepted by the autograd path only through the reference; the op itself
    # takes fp32/fp16/bf16, so gradcheck the registered op's backward with fp32->fp64 promotion.
    values = torch.randn(20, 2, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 4, (20,))
    mask = torch.rand(20) > 0.2

    def fn(v):
        return run(backend, v.float(), ids, 4, mask=mask, device=device)[0].double()

    assert torch.autograd.gradcheck(fn, (values,), eps=1e-3, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("device,backend", device_backends("segment_sum", ("cxx", "triton")))
@pytest.mark.parametrize("with_mask", [False, True])
def test_opcheck(device, backend, with_mask):
    op = torch.ops.mixkernels.segment_sum_triton if backend == "triton" else torch.ops.mixkernels.segment_sum
    values = torch.randn(33, 3, device=device, requires_grad=True)
    ids = torch.randint(0, 5, (33,), device=device)
    mask = (torch.rand(33, device=device) > 0.5) if with_mask else None
    torch.library.opcheck(op.default, (values, ids, 5, mask))
    torch.library.opcheck(op.default, (values[:, 0].detach(), ids.int(), 5, mask))


@pytest.mark.parametrize("device,backend", DB)
def test_torch_compile_fullgraph(device, backend):
    torch._dynamo.reset()

    def f(v, i, m):
        with mixkernels.backend(backend):
            sums, counts = mixkernels.segment_sum(v * 2, i, 7, mask=m)
        return sums.sum(-1) / counts.clamp(min=1)

    values = torch.randn(64, 4, device=device)
    ids = torch.randint(0, 7, (64,), device=device)
    mask = torch.rand(64, device=device) > 0.2
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(values, ids, mask), f(values, ids, mask))


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_id_message(backend):
    ids = torch.tensor([0, 2, 9, 1])
    with pytest.raises((ValueError, RuntimeError), match=r"segment_ids\[2\] = 9 .*\[0, 4\)"):
        run(backend, torch.randn(4), ids, 4)
    with pytest.raises((ValueError, RuntimeError), match=r"segment_ids\[0\] = -1"):
        run(backend, torch.randn(4), torch.tensor([-1, 0, 0, 0]), 4)


@pytest.mark.parametrize("device,backend", DB)
def test_masked_out_of_range_ids_are_ignored(device, backend):
    ids = torch.tensor([0, 9, 1])
    mask = torch.tensor([True, False, True])
    _, counts = run(backend, torch.ones(3), ids, 2, mask=mask, device=device)
    assert counts.tolist() == [1, 1]


@pytest.mark.parametrize("backend", ["cxx", "triton"])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_marks())])
def test_cuda_out_of_range_id_trips_device_assert(device, backend):
    """On CUDA a bad id raises at the next synchronisation (no host sync is added). The assert
    poisons the CUDA context, so it runs in a fresh process."""
    import subprocess
    import sys

    code = ("import torch, mixkernels\n"
            f"with mixkernels.backend({backend!r}):\n"
            "    mixkernels.segment_sum(torch.ones(4, device='cuda'), torch.tensor([0, 2, 9, 1], device='cuda'), 4)\n"
            "torch.cuda.synchronize()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=300)
    assert r.returncode != 0, "an out-of-range id on CUDA must not pass silently"
    assert "assert" in (r.stderr + r.stdout).lower(), r.stderr[-2000:]


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((torch.randn(4).double(), torch.zeros(4, dtype=torch.long), 2), {}, "values must be one of float32"),
        ((torch.randn(4), torch.zeros(4), 2), {}, "segment_ids must be one of int32, int64, got float32"),
        ((torch.randn(4), torch.zeros(3, dtype=torch.long), 2), {}, r"segment_ids must be \[N\] with N = .* = 4"),
        ((torch.randn(2, 2, 2), torch.zeros(2, dtype=torch.long), 2), {}, r"values must be \[N\] or \[N, C\]"),
        ((torch.randn(4), torch.zeros(4, dtype=torch.long), -1), {}, "num_segments must be an int >= 0, got -1"),
        ((torch.randn(4), torch.zeros(4, dtype=torch.long), 2), {"mask": torch.ones(3, dtype=torch.bool)}, "mask must be bool"),
        ((torch.randn(4), torch.zeros(4, dtype=torch.long), 2), {"mask": torch.ones(4)}, "mask must be bool"),
    ],
)
@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_messages(device, args, kwargs, match):
    backends = BACKENDS if device == "cpu" else [*BACKENDS, "triton"]
    for backend in backends:
        with pytest.raises((TypeError, ValueError), match=match):
            run(backend, *args, **kwargs, device=device)


def test_cxx_kernel_checks_directly():
    """The C++ op validates its own arguments too (users may call torch.ops directly)."""
    if not _extension.LOADED:
        pytest.skip(_extension.REASON)
    with pytest.raises(RuntimeError, match=r"segment_ids\[1\] = 7 is out of range \[0, 3\)"):
        torch.ops.mixkernels.segment_sum(torch.randn(2), torch.tensor([0, 7]), 3, None)
    with pytest.raises(RuntimeError, match="segment_ids must be int32 or int64"):
        torch.ops.mixkernels.segment_sum(torch.randn(2), torch.tensor([0.0, 1.0]), 3, None)


def test_explicit_unavailable_backend_raises():
    # Triton on CPU needs the interpreter, which this process does not have.
    with pytest.raises(RuntimeError, match=r"segment_sum: backend 'triton' is unavailable on cpu: .*TRITON_INTERPRET"):
        run("triton", torch.randn(3), torch.zeros(3, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="backend name 'fast'"), mixkernels.backend("fast"):
        pass


@pytest.mark.parametrize("position", [0, 5, 65_537, 99_999])
def test_out_of_range_id_found_in_large_input(position):
    ids = torch.randint(0, 3, (100_000,))
    ids[position] = 3
    with pytest.raises(RuntimeError, match=rf"segment_ids\[{position}\] = 3 is out of range \[0, 3\)"):
        run("cxx", torch.randn(100_000), ids, 3)
