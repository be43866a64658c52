"""bench/bench_hf_trainer.py at its tiniest size, so the benchmark never rots."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_hf_trainer_tiny():
    pytest.importorskip("peft")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "bench/bench_hf_trainer.py", "--tiny", "--no-csv", "--steps", "3",
                        "--warmup", "1", "--threads", "1"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=900, check=False)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "peak_memory_ratio" in r.stdout and "trainer+mixkernels.hf.apply" in r.stdout
    # the same data and seed: both variants end at the same loss
    losses = [line.split("|")[7].strip() for line in r.stdout.splitlines() if line.startswith("tiny llama")][:2]
    assert len(losses) == 2 and losses[0] == losses[1], r.stdout
