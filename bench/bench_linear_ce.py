"""Benchmark: fused linear cross-entropy with per-group losses vs eager PyTorch and the GEMM floor.

    python bench/bench_linear_ce.py            # the issue's cases (minutes on 2 cores)
    python bench/bench_linear_ce.py --smoke    # tiny shapes, seconds (keeps the script from rotting)

Per case (fp32 unless noted, 8 groups, 2 threads), forward + backward of the mean loss:
* floor   -- the three GEMMs of forward + backward (logits = h W^T, dh = dz W, dW = dz^T h), each
             N*d*V multiply-adds, in fp32 (the CPU compute dtype of every implementation here);
* eager   -- logits = (h @ W^T) in fp32, F.cross_entropy(reduction="none"), index_add_ per group,
             .mean().backward() (what users write today);
* ours    -- mixkernels.linear_cross_entropy(..., group_ids, num_groups) with the auto backend.
Ratios are measured in the same run. Peak extra memory: RSS growth of a fresh child process that
builds the inputs, then runs one forward + backward (bench/_harness.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Shared 2-core machines: OpenMP threads that spin at barriers while other processes hold the
# cores make every parallel region pay a scheduler quantum (100x slowdowns measured on tiny
# shapes). Sleeping waits keep the ratios meaningful. Must be set before torch starts OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _harness import Harness, child_peak_mb, report_child_peak

import mixkernels

GROUPS = 8
CASES = {
    "N=8192 d=512 V=32000 fp32": (8192, 512, 32000, torch.float32),
    "N=4096 d=512 V=128256 fp32": (4096, 512, 128256, torch.float32),
    "N=8192 d=512 V=32000 bf16": (8192, 512, 32000, torch.bfloat16),
}
SMOKE = {"N=64 d=16 V=301 fp32": (64, 16, 301, torch.float32), "N=64 d=16 V=301 bf16": (64, 16, 301, torch.bfloat16)}


def make_inputs(n: int, d: int, v: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) * d**-0.5).to(dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    y[::17] = -100
    groups = torch.randint(0, GROUPS, (n,), generator=g)
    return h, w, y, groups


def floor_fn(h, w, y, groups):
    h32, w32 = h.detach().float(), w.detach().float()

    def run():
        with torch.no_grad():
            z = h32 @ w32.T
            _ = z @ w32
            _ = z.T @ h32

    return run


def eager_fn(h, w, y, groups):
    def run():
        h.grad = w.grad = None
        logits = h.float() @ w.float().T
        tok = F.cross_entropy(logits, y, reduction="none")
        valid = y != -100
        sums = torch.zeros(GROUPS).index_add_(0, groups[valid], tok.detach()[valid])
        counts = torch.bincount(groups[valid], minlength=GROUPS)
        (tok.sum() / valid.sum()).backward()
        return sums, counts

    return run


def ours_fn(h, w, y, groups):
    def run():
        h.grad = w.grad = None
        out = mixkernels.linear_cross_entropy(h, w, y, group_ids=groups, num_groups=GROUPS)
        out.loss.backward()
        return out.group_loss, out.group_count

    return run


IMPLS = {"floor": floor_fn, "eager": eager_fn, "ours": ours_fn}


def child(impl: str, case: str, smoke: bool) -> None:
    torch.set_num_threads(2)
    inputs = make_inputs(*(SMOKE if smoke else CASES)[case])
    fn = IMPLS[impl](*inputs)
    report_child_peak(fn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes only")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--case", action="append", help="run only these case names")
    parser.add_argument("--child", nargs=2, metavar=("IMPL", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.smoke)
        return
    cases = SMOKE if args.smoke else CASES
    h = Harness("linear_ce", repeat=1 if args.smoke else args.repeat, warmup=1, threads=2)
    for case, shape in cases.items():
        if args.case and case not in args.case:
            continue
        inputs = make_inputs(*shape)
        # floor measured twice (before and after) and the faster taken: the machine is shared
        t_floor = h.time(floor_fn(*inputs))
        t_ours = h.time(ours_fn(*inputs))
        t_eager = h.time(eager_fn(*inputs))
        t_floor = min(t_floor, h.time(floor_fn(*inputs)))
        del inputs
        flags = ["--smoke"] if args.smoke else []
        mem = {impl: child_peak_mb(__file__, [*flags, "--child", impl, case]) for impl in ("eager", "ours")}
        backend = mixkernels._backend.select("linear_ce", torch.device("cpu"))
        for impl, t in (("3-GEMM floor", t_floor), ("eager", t_eager), (f"ours ({backend})", t_ours)):
            key = "eager" if impl == "eager" else ("ours" if impl.startswith("ours") else None)
            h.row(case=case, impl=impl, seconds=t, baseline="3-GEMM floor", baseline_seconds=t_floor,
                  x_floor=round(t / t_floor, 3), peak_mb=mem.get(key) if key else None,
                  mem_vs_eager=round(mem[key] / mem["eager"], 3) if key and mem["eager"] > 0 else "")
    h.finish()


if __name__ == "__main__":
    main()
