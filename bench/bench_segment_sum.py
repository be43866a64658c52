"""segment_sum: the C++ CPU kernel vs what users write today, `torch.zeros().index_add_()` for the
sums plus `torch.bincount` for the counts, measured side by side in one run.

    python bench/bench_segment_sum.py            # N = 1M, 8M, 32M x S = 16, 1024 x C = 1, 8
    python bench/bench_segment_sum.py --tiny     # smoke size (the test suite runs this)
    python bench/bench_segment_sum.py --quick    # the same as --tiny on CPU
    python bench/bench_segment_sum.py --device cuda [--quick]   # GPU: cxx and triton vs index_add_

Ratios > 1 mean the C++ kernel is faster. Peak memory: extra RSS of a fresh child process.

GPU mode (CUDA events; ``--quick`` is the target size only) also prints bytes moved / time
against the device's HBM bandwidth (bench/_gpu.py: datasheet by name + a measured copy).
TARGET (not a result): >= 70 % of HBM bandwidth at N = 64M (S = 16, C = 1, fp32 values, int64 ids).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Harness, child_peak_mb, report_child_peak

import mixkernels


def make_inputs(n: int, s: int, c: int):
    g = torch.Generator().manual_seed(0)
    values = torch.randn((n,) if c == 1 else (n, c), generator=g)
    ids = torch.randint(0, s, (n,), generator=g)
    return values, ids


def baseline(values, ids, s):
    sums = torch.zeros((s, *values.shape[1:]), dtype=torch.float32).index_add_(0, ids, values)
    return sums, torch.bincount(ids, minlength=s)


def ours(values, ids, s):
    with mixkernels.backend("cxx"):
        return mixkernels.segment_sum(values, ids, s)


TARGET_HBM_FRACTION = 0.70  # at N = 64M: a target, not a measurement


def gpu_main(quick: bool) -> None:
    """cxx and triton on CUDA vs index_add_ + bincount on CUDA; bytes / time vs HBM bandwidth."""
    from _gpu import DEVICE, SMOKE, backends, device_peaks, fraction, gpu_peak_mb, gpu_time, require_cuda

    require_cuda("bench_segment_sum")
    peaks = device_peaks(quick=quick)
    print(peaks.describe())
    sizes = [(1 << 10, 16, 1)] if SMOKE else [(64 << 20, 16, 1)] if quick else [(1 << 20, 16, 1), (16 << 20, 16, 1), (64 << 20, 16, 1),
                                                (64 << 20, 1024, 1), (16 << 20, 16, 8)]
    h = Harness("segment_sum_cuda")
    for n, s, c in sizes:
        g = torch.Generator(device=DEVICE).manual_seed(0)
        values = torch.randn((n,) if c == 1 else (n, c), generator=g, device=DEVICE)
        ids = torch.randint(0, s, (n,), generator=g, device=DEVICE)
        moved = values.numel() * 4 + ids.numel() * 8 + s * c * 4 + s * 8  # read inputs, write outputs
        ref = baseline(values, ids, s)
        t_base = gpu_time(lambda v=values, i=ids, s=s: baseline(v, i, s))
        case = f"N={n / 2**20:g}M S={s} C={c}"
        target = f">= {TARGET_HBM_FRACTION:.0%} HBM" if (n, s, c) == (64 << 20, 16, 1) else ""
        h.row(case=case, impl="index_add_+bincount (cuda)", seconds=t_base, gbs=round(moved / t_base / 1e9, 1),
              hbm_fraction=fraction(moved / t_base / 1e9, peaks.hbm_gbs), device=peaks.device)
        for backend in backends("segment_sum"):
            def run(v=values, i=ids, s=s, backend=backend):
                with mixkernels.backend(backend):
                    return mixkernels.segment_sum(v, i, s)

            got = run()
            torch.testing.assert_close(got[1], ref[1])
            torch.testing.assert_close(got[0], ref[0], atol=1e-3 * max(1.0, n / s) ** 0.5, rtol=1e-4)
            t = gpu_time(run)
            h.row(case=case, impl=f"mixkernels {backend}", seconds=t, baseline="index_add_+bincount",
                  baseline_seconds=t_base, gbs=round(moved / t / 1e9, 1),
                  hbm_fraction=fraction(moved / t / 1e9, peaks.hbm_gbs), target=target,
                  peak_mb=gpu_peak_mb(run), device=peaks.device)
        del values, ids, ref
    h.finish()
    print(f"peaks: {peaks.describe()}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--quick", action="store_true", help="CPU: the same as --tiny; cuda: the target size only")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=4, metavar=("IMPL", "N", "S", "C"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cuda":
        gpu_main(args.quick)
        return
    args.tiny = args.tiny or args.quick
    torch.set_num_threads(args.threads)
    if args.child:
        impl, n, s, c = args.child[0], *map(int, args.child[1:])
        values, ids = make_inputs(n, s, c)
        report_child_peak(lambda: (ours if impl == "cxx" else baseline)(values, ids, s))
        return

    sizes = [10_000] if args.tiny else [1 << 20, 8 << 20, 32 << 20]
    h = Harness("segment_sum", repeat=3 if args.tiny else 7, threads=args.threads)
    for n in sizes:
        for s in (16, 1024):
            for c in (1, 8):
                if n >= 32 << 20 and c == 8:
                    continue  # 1 GiB of input per call; the trend is clear from 8M
                values, ids = make_inputs(n, s, c)
                got, ref = ours(values, ids, s), baseline(values, ids, s)
                torch.testing.assert_close(got[1], ref[1])
                torch.testing.assert_close(got[0], ref[0], atol=1e-3 * max(1.0, n / s) ** 0.5, rtol=1e-4)
                t_base = h.time(lambda v=values, i=ids, s=s: baseline(v, i, s))
                t_ours = h.time(lambda v=values, i=ids, s=s: ours(v, i, s))
                case = f"N={n / 2**20:g}M S={s} C={c}" if n >= 2**20 else f"N={n} S={s} C={c}"
                mem = {} if args.tiny else {
                    "peak_mb": child_peak_mb(__file__, ["--child", "cxx", str(n), str(s), str(c)]),
                    "baseline_peak_mb": child_peak_mb(__file__, ["--child", "base", str(n), str(s), str(c)]),
                }
                h.row(case=case, impl="index_add_+bincount", seconds=t_base)
                h.row(case=case, impl="mixkernels cxx", seconds=t_ours, baseline="index_add_+bincount",
                      baseline_seconds=t_base, **mem)
    h.finish()


if __name__ == "__main__":
    main()
