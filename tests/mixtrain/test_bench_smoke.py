"""bench/bench_loop.py at its tiniest size, so the benchmark never rots."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mixtrain.engine import standalone_env

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_loop_tiny(tmp_path):
    env = {**standalone_env(), "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    r = subprocess.run([sys.executable, "bench/bench_loop.py", "--tiny", "--no-csv"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=900, check=False)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "tokens_per_s_ratio" in r.stdout and "signal_overhead_pct" in r.stdout


@pytest.mark.slow
def test_bench_data_tiny(tmp_path):
    env = {**standalone_env(), "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "bench/bench_data.py", "--tiny", "--no-csv"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=900, check=False)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "builds per domain [1, 1, 1, 1]" in r.stdout and "warm_start_s" in r.stdout
