"""bench/gpu_check.sh --dry-run (the plan, its budgets, and that every referenced test and bench
exists) and the peak table the GPU benches divide by. Both run on CPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_check.sh"


def _dry_run(py: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PY": py, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600, check=False)


def test_dry_run_passes_and_prints_the_plan():
    r = _dry_run(sys.executable)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    out = r.stdout
    assert "dry run: ok" in out
    budgets = {m[0]: int(m[1]) for m in re.findall(r"^  (\w+)\s+(\d+)s  ", out, flags=re.MULTILINE)}
    for part in ("setup", "info", "selftest", "tests_ops", "tests_models", "bench_segment_sum",
                 "bench_router_stats", "bench_linear_ce", "bench_grad_proj", "bench_gradex", "bench_loop"):
        assert part in budgets, f"{part} missing from the plan:\n{out}"
    assert sum(budgets.values()) <= 480, budgets  # 8 minutes on one GPU, set-up included
    assert "--selftest --device cuda" in out and "-m cuda" in out
    collected = int(re.search(r"ok: (\d+) cuda test ids collected", out).group(1))
    assert collected > 100


def test_dry_run_fails_when_the_python_cannot_run_the_benches():
    r = _dry_run("/bin/false")
    assert r.returncode != 0
    assert "dry run: FAILED" in r.stdout and "bench_segment_sum.py --help" in r.stdout


@pytest.mark.parametrize("name, hbm, tflops", [
    ("NVIDIA H100 80GB HBM3", 3350, 989),   # SXM5
    ("NVIDIA H100 PCIe", 2000, 756),
    ("NVIDIA H100 NVL", 3900, 835),
    ("NVIDIA H200", 4800, 989),
    ("NVIDIA A100-SXM4-40GB", 1555, 312),
    ("NVIDIA A100-SXM4-80GB", 2039, 312),
    ("NVIDIA L40S", 864, 362),
    ("NVIDIA L4", 300, 121),
])
def test_datasheet_peaks_by_device_name(name, hbm, tflops):
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from _gpu import lookup
    finally:
        sys.path.remove(str(REPO / "bench"))
    gbs, tf, source = lookup(name)
    assert (gbs, tf) == (hbm, tflops) and "datasheet" in source


def test_unknown_device_falls_back_to_measurement():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from _gpu import lookup
    finally:
        sys.path.remove(str(REPO / "bench"))
    assert lookup("NVIDIA A10G") is None  # no datasheet figure: measured (not the A10's)
    assert lookup("Some Future GPU") is None


@pytest.mark.parametrize("bench, columns", [
    ("segment_sum", ("gbs", "hbm_fraction", "target")),
    ("router_stats", ("hbm_fraction", "speedup_vs_baseline", "target")),
    ("linear_ce", ("x_floor", "bf16_fraction", "mem_vs_eager", "target")),
    ("grad_proj", ("x_plain", "bf16_fraction", "target")),
])
def test_gpu_bench_modes_run_on_cpu_smoke(tmp_path, bench, columns):
    """The --device cuda code of each bench, on CPU at tiny sizes (BENCH_GPU_SMOKE=1): the GPU modes
    cannot break unseen before a GPU runs them. CSVs go to BENCH_RESULTS_DIR, not bench/results."""
    env = {**os.environ, "BENCH_GPU_SMOKE": "1", "BENCH_RESULTS_DIR": str(tmp_path),
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, f"bench/bench_{bench}.py", "--device", "cuda", "--quick"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    header = next(line for line in r.stdout.splitlines() if line.startswith("case "))
    for col in columns:
        assert col in header, (col, header)
    assert (tmp_path / f"{bench}_cuda.csv").stat().st_size > 0
    assert "peaks: cpu (BENCH_GPU_SMOKE)" in r.stdout


def test_check_orchestration_reports_ok_failed_and_timeout(tmp_path):
    """The real run loop with three cheap parts (GPU_CHECK_PARTS): one passes, one fails (the cuda
    selftest on a machine without a GPU), one overruns its 1 s budget and is stopped; every part
    runs, and summary.md / logs/ say which is which."""
    out = tmp_path / "out"
    env = {**os.environ, "PY": sys.executable, "GPU_CHECK_PARTS": "info:120 selftest:120 bench_segment_sum:1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run(["bash", str(SCRIPT), str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600, check=False)
    assert r.returncode != 0  # a part was not ok
    summary = (out / "summary.md").read_text()
    import torch

    selftest = "ok" if torch.cuda.is_available() else "FAILED (exit 1)"
    assert "| info | ok |" in summary
    assert f"| selftest | {selftest} |" in summary
    assert "| bench_segment_sum | TIMEOUT (stopped at 1s) | 1 | 1 |" in summary
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["01-info.log", "02-selftest.log",
                                                               "03-bench_segment_sum.log"]
    assert "op                       device auto" in (out / "logs" / "01-info.log").read_text()
