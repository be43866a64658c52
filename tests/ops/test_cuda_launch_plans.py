"""Launch decisions of the CUDA kernels, as the host functions the launchers call (through
``mixkernels::_launch_plan``, which runs them on CPU), plus the shapes that used to break on a GPU
(cuda-marked: collected everywhere, skipped without a GPU, run by bench/gpu_check.sh):

* segment_sum's binned kernel: one column and 6,145-8,192 segments need more than the 48 KiB of
  dynamic shared memory a kernel gets without opting in (cudaFuncSetAttribute);
* router_stats in fp64: G x E near 4,096 bins (double sums + uint counts) passes 48 KiB;
* dense project / lift: the row tiles lived on grid y (at most 65,535 x 16 rows = 1,048,560);
* factored_sketch's CUDA kernel trusts offsets: the public op checks them on the host for CUDA
  inputs too, and the kernel asserts (device side) when called directly.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import mixkernels
from mixkernels import _backend, _extension
from tests._devices import cuda_marks, device_backends, on
from tests.ops.test_router_stats import _inputs, naive_oracle
from tests.ops.test_segment_sum import check as check_segment_sum

KIB = 1024
H100_OPTIN = 227 * KIB  # cudaDevAttrMaxSharedMemoryPerBlockOptin of an H100
A100_OPTIN = 163 * KIB
NO_OPTIN = 48 * KIB  # a device whose opt-in limit is the default
CUDA_ONLY = [pytest.param("cuda", marks=cuda_marks())]

needs_c = pytest.mark.skipif(not _extension.has_kernel("mixkernels::_launch_plan", "CPU"),
                             reason="needs the compiled extension (mixkernels._C)")


def plan(kernel: str, *sizes: int) -> list[int]:
    return list(torch.ops.mixkernels._launch_plan(torch.empty(0), kernel, list(sizes)))


@needs_c
@pytest.mark.parametrize("segments, c, optin, expected", [
    (16, 3, H100_OPTIN, [1, 0, 16 * 3 * 4 + 16 * 4]),
    (6144, 1, H100_OPTIN, [1, 0, 48 * KIB]),             # exactly the default limit: no opt-in
    (6145, 1, H100_OPTIN, [1, 1, 6145 * 8]),             # the first size that needs the opt-in
    (8192, 1, A100_OPTIN, [1, 1, 64 * KIB]),
    (8192, 1, NO_OPTIN, [0, 0, 0]),                      # cannot opt in: the global-atomics path
    (8193, 1, H100_OPTIN, [0, 0, 0]),                    # over the bin budget: global atomics
    (2048, 4, H100_OPTIN, [1, 0, 2048 * 4 * 4 + 2048 * 4]),
])
def test_segment_sum_shared_memory_plan(segments, c, optin, expected):
    assert plan("segment_sum", segments, c, optin) == expected


@needs_c
@pytest.mark.parametrize("groups, experts, acc_bytes, optin, expected", [
    (64, 64, 4, H100_OPTIN, [1, 0, (4096 + 64) * 8]),    # fp32 sums: 33 KB, no opt-in
    (64, 64, 8, H100_OPTIN, [1, 1, (4096 + 64) * 12]),   # fp64 sums: 49,920 B > 48 KiB -> opt in
    (32, 128, 8, NO_OPTIN, [0, 0, 0]),                    # cannot opt in: global atomics
    (4, 1025, 4, H100_OPTIN, [0, 0, 0]),                  # G x E over the 4,096-bin budget
    (8, 8, 8, H100_OPTIN, [1, 0, (64 + 8) * 12]),
])
def test_router_stats_shared_memory_plan(groups, experts, acc_bytes, optin, expected):
    assert plan("router_stats", groups, experts, acc_bytes, optin) == expected


@needs_c
@pytest.mark.parametrize("rows, expected_grid_y", [
    (1, 1), (16, 1), (17, 2), (65535 * 16, 65535), (65535 * 16 + 1, 65535), (5_000_000, 65535),
])
def test_project_grid_y_and_row_tile_loop_cover_every_row(rows, expected_grid_y):
    grid_y, tile = plan("project_rows", rows)
    assert (grid_y, tile) == (expected_grid_y, 16)
    # the dense kernels loop n0 = blockIdx.y * tile; n0 < rows; n0 += gridDim.y * tile
    covered = set()
    for by in range(grid_y):
        covered.update(range(by * tile, rows, grid_y * tile))
    assert covered == set(range(0, rows, tile))


@needs_c
def test_launch_plan_rejects_unknown_kernels_and_bad_sizes():
    with pytest.raises(RuntimeError, match="unknown kernel 'nope'"):
        plan("nope", 1)
    with pytest.raises(RuntimeError, match=r"segment_sum takes \[num_segments, C, optin_bytes\], got 2 sizes"):
        plan("segment_sum", 1, 2)


# ---- the shapes themselves (on CPU they check the test; on a GPU the launch paths) ---------------


@pytest.mark.parametrize("device,backend", device_backends("segment_sum"))
@pytest.mark.parametrize("segments", [6144, 6145, 8192])
def test_segment_sum_one_column_many_segments(device, backend, segments):
    g = torch.Generator().manual_seed(segments)
    n = 3 * segments
    values = torch.randn(n, 1, generator=g)
    ids = torch.randint(0, segments, (n,), generator=g)
    check_segment_sum(backend, values, ids, segments, device=device)


@pytest.mark.parametrize("device,backend", device_backends("router_stats", ("reference", "cxx")))  # triton: no fp64
def test_router_stats_fp64_many_bins(device, backend):
    # G x E = 64 x 64 = 4,096 bins of double sums: 49,920 bytes of shared memory on CUDA
    z, groups, mask = _inputs(1, 300, 64, 64, dtype=torch.float64)
    with mixkernels.backend(backend):
        stats = on(device, mixkernels.router_stats)(z, 2, group_ids=groups, num_groups=64, mask=mask)
    counts, probs, tokens, ent, _aux = naive_oracle(list(z), 2, groups, 64, mask)
    assert stats.prob_sum.dtype == torch.float64  # fp64 inputs keep fp64 sums (the 8-byte bins)
    assert torch.equal(stats.expert_counts, counts) and torch.equal(stats.token_count, tokens)
    torch.testing.assert_close(stats.prob_sum, probs, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(stats.entropy_sum, ent, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("backend", ["cxx"])
@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_dense_project_and_lift_past_the_grid_y_limit(device, backend, kind):
    """1,048,577 rows: more row tiles (65,537) than grid y allows. Each row's result equals the same
    row projected in a small call (rows are independent), including the last rows."""
    n, in_dim, out_dim = 65535 * 16 + 17, 8, 8
    x = torch.randn(n, in_dim, device=device)
    y = torch.randn(n, out_dim, device=device)
    with mixkernels.backend(backend):
        p_big = mixkernels.project(x, out_dim, seed=3, kind=kind)
        l_big = mixkernels.lift(y, in_dim, seed=3, kind=kind)
        for rows in (slice(0, 5), slice(n - 40, n)):
            torch.testing.assert_close(p_big[rows], mixkernels.project(x[rows], out_dim, seed=3, kind=kind))
            torch.testing.assert_close(l_big[rows], mixkernels.lift(y[rows], in_dim, seed=3, kind=kind))


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("offsets, match", [([0, 9, 4], r"offsets\[1\] = 9 > offsets\[2\] = 4"),
                                            ([0, 60], r"offsets must lie in \[0, N = 53\]"),
                                            ([-1, 3], r"offsets must lie in \[0, N = 53\]")])
def test_factored_sketch_checks_cuda_offsets(device, offsets, match):
    x, g = torch.randn(53, 6, device=device), torch.randn(53, 5, device=device)
    for backend in ("cxx", "triton"):
        if _backend.unavailable_reason("factored_sketch", "cuda", backend):
            continue
        with mixkernels.backend(backend), pytest.raises(ValueError, match=match):
            mixkernels.factored_sketch(x, g, torch.tensor(offsets, device=device))


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_factored_sketch_cuda_kernel_asserts_on_bad_offsets_called_directly(device):
    """The registered op called directly (no Python checks): the kernel's device-side assert fires
    instead of reading outside x / g. The assert poisons the CUDA context: a fresh process."""
    code = ("import torch, mixkernels\n"
            "x, g = torch.randn(53, 6, device='cuda'), torch.randn(53, 5, device='cuda')\n"
            "torch.ops.mixkernels.factored_sketch(x, g, torch.tensor([0, 9, 4], device='cuda'), None, None)\n"
            "torch.cuda.synchronize()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=300)
    assert r.returncode != 0, "bad offsets on CUDA must not pass silently"
    assert "assert" in (r.stderr + r.stdout).lower(), r.stderr[-2000:]
