"""GPU timing and the device's limits, shared by the benches' ``--device cuda`` modes.

* :func:`gpu_time` -- median seconds of ``fn`` measured with CUDA events after warm-up
  (launches are asynchronous: wall-clock timing without a synchronisation measures nothing);
* :func:`gpu_peak_mb` -- extra device memory ``fn`` allocates at its peak (torch's allocator
  statistics, so it counts tensors, not the allocator's cached blocks);
* :func:`device_peaks` -- HBM bandwidth and dense bf16 tensor-core throughput of the device: the
  vendor datasheet value from :data:`DATASHEET` by device name, and a measured value from a
  large device-to-device copy and a large bf16 matmul in the same run (the fallback when the
  name is not in the table, and a sanity check when it is);
* :func:`fraction` -- achieved / peak, the number the GPU benches print beside their ratios.

Datasheet numbers are the vendors' published peaks (dense, i.e. without 2:4 sparsity), not
measurements of ours. Nothing in this module has been run on a GPU by the project so far; the
benches print the source of every peak they divide by.

``BENCH_GPU_SMOKE=1`` runs the GPU modes' code on CPU at tiny sizes (``DEVICE`` is then ``cpu``,
timing is wall-clock, there are no peaks and only the backends available on CPU run): the test
suite does this so that the GPU modes cannot break unseen before a GPU is available.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

SMOKE = os.environ.get("BENCH_GPU_SMOKE") == "1"
DEVICE = "cpu" if SMOKE else "cuda"

# (substring of torch.cuda.get_device_name(), HBM GB/s, dense bf16 TFLOP/s, datasheet).
# Ordered: the first matching substring wins, so specific variants precede the generic name.
DATASHEET: list[tuple[str, float, float, str]] = [
    ("H200 NVL", 4800.0, 835.0, "NVIDIA H200 NVL datasheet"),
    ("H200", 4800.0, 989.0, "NVIDIA H200 SXM datasheet"),
    ("GH200", 4000.0, 989.0, "NVIDIA GH200 Grace Hopper datasheet (96 GB HBM3)"),
    ("H100 NVL", 3900.0, 835.0, "NVIDIA H100 NVL datasheet"),
    ("H100 PCIe", 2000.0, 756.0, "NVIDIA H100 PCIe datasheet"),
    ("H100", 3350.0, 989.0, "NVIDIA H100 SXM5 datasheet"),
    ("H800", 3350.0, 989.0, "NVIDIA H800 SXM5 datasheet"),
    ("B200", 8000.0, 2250.0, "NVIDIA HGX B200 datasheet"),
    ("A100-SXM4-40GB", 1555.0, 312.0, "NVIDIA A100 datasheet (40 GB SXM)"),
    ("A100-PCIE-40GB", 1555.0, 312.0, "NVIDIA A100 datasheet (40 GB PCIe)"),
    ("A100 80GB PCIe", 1935.0, 312.0, "NVIDIA A100 datasheet (80 GB PCIe)"),
    ("A100", 2039.0, 312.0, "NVIDIA A100 datasheet (80 GB SXM)"),
    ("A800", 2039.0, 312.0, "NVIDIA A800 datasheet (80 GB SXM)"),
    ("L40S", 864.0, 362.0, "NVIDIA L40S datasheet"),
    ("L40", 864.0, 181.0, "NVIDIA L40 datasheet"),
    ("L4", 300.0, 121.0, "NVIDIA L4 datasheet"),
    ("A10G", 0.0, 0.0, ""),  # no vendor datasheet figure: measured (and keeps "A10" from matching)
    ("A10", 600.0, 125.0, "NVIDIA A10 datasheet"),
]


@dataclass(frozen=True)
class Peaks:
    """The device's limits used as denominators: GB/s and TFLOP/s, and where they came from."""

    device: str
    hbm_gbs: float
    bf16_tflops: float
    source: str
    measured_hbm_gbs: float | None = None
    measured_bf16_tflops: float | None = None

    def describe(self) -> str:
        measured = ""
        if self.measured_hbm_gbs is not None:
            measured = (f"; measured here: copy {self.measured_hbm_gbs:.0f} GB/s, "
                        f"bf16 matmul {self.measured_bf16_tflops:.0f} TFLOP/s")
        return f"{self.device}: HBM {self.hbm_gbs:.0f} GB/s, bf16 {self.bf16_tflops:.0f} TFLOP/s ({self.source}){measured}"


def lookup(name: str) -> tuple[float, float, str] | None:
    """Datasheet (GB/s, TFLOP/s, source) for a device name, or None when it is not in the table."""
    for key, gbs, tflops, source in DATASHEET:
        if key.lower() in name.lower():
            return (gbs, tflops, source) if source else None
    return None


def gpu_time(fn: Callable[[], Any], *, warmup: int = 2, repeat: int = 10) -> float:
    """Median seconds of ``fn()`` on the current CUDA stream, from CUDA events."""
    if SMOKE:
        fn()
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return statistics.median(samples)


def gpu_peak_mb(fn: Callable[[], Any]) -> float:
    """Peak device memory allocated while ``fn()`` runs, above what was allocated before, in MiB."""
    if SMOKE:
        fn()
        return 0.0
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak / 2**20


def measure_hbm_gbs(nbytes: int = 1 << 30, repeat: int = 10) -> float:
    """Device-to-device copy of ``nbytes``: (read + write) bytes / time, in GB/s."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    seconds = gpu_time(lambda: dst.copy_(src), repeat=repeat)
    return 2 * src.numel() * 4 / seconds / 1e9


def measure_bf16_tflops(n: int = 8192, repeat: int = 10) -> float:
    """bf16 ``[n, n] @ [n, n]``: 2 n^3 / time, in TFLOP/s."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    seconds = gpu_time(lambda: a @ b, repeat=repeat)
    return 2 * n**3 / seconds / 1e12


def device_peaks(*, measure: bool = True, quick: bool = False) -> Peaks:
    """The current CUDA device's peaks: datasheet by name, else the measured values.

    ``measure`` also times the copy and matmul (the fallback, and a check of the table);
    ``quick`` uses a 256 MiB copy and a 4096^3 matmul instead of 1 GiB and 8192^3.
    """
    if SMOKE:
        return Peaks("cpu (BENCH_GPU_SMOKE)", 0.0, 0.0, "smoke run on CPU: no peaks")
    name = torch.cuda.get_device_name()
    hbm = flops = None
    if measure or lookup(name) is None:
        hbm = measure_hbm_gbs(256 << 20 if quick else 1 << 30)
        flops = measure_bf16_tflops(4096 if quick else 8192)
    known = lookup(name)
    if known is not None:
        return Peaks(name, known[0], known[1], known[2], hbm, flops)
    return Peaks(name, hbm, flops, "measured in this run (device not in the datasheet table)", hbm, flops)


def fraction(achieved: float, peak: float) -> float:
    """``achieved / peak`` rounded for the tables (0.0 when the peak is unknown)."""
    return round(achieved / peak, 3) if peak else 0.0


def require_cuda(bench: str) -> None:
    """Exit with a clear message when ``--device cuda`` is asked for on a machine without one."""
    if not SMOKE and not torch.cuda.is_available():
        raise SystemExit(f"{bench}: --device cuda needs a CUDA device (torch.cuda.is_available() is False)")


def backends(op: str, wanted: tuple[str, ...] = ("cxx", "triton")) -> tuple[str, ...]:
    """The backends of ``wanted`` that run on ``DEVICE`` (all of them on a GPU machine; an explicit
    backend that is unavailable there then fails loudly in the bench, as it should)."""
    if not SMOKE:
        return wanted
    from mixkernels import _backend

    return tuple(b for b in wanted if not _backend.unavailable_reason(op, DEVICE, b))


def empty_cache() -> None:
    if not SMOKE:
        torch.cuda.empty_cache()
