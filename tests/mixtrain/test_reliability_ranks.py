"""Two ranks: a rank killed with SIGKILL, then SIGTERM sent to one rank only; the resumed run's
metrics equal an uninterrupted 2-rank run's, bit for bit.

The dead rank runs as two one-process torchrun "nodes" (each launcher only sees its own worker,
as on two machines, so nobody tears the survivor down): the survivor must name the missing rank
and exit with code 69 within ``train.dist_timeout`` (20 s here) instead of waiting.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_loop import REPO, _config, _env, _free_port, _metrics, _train

from mixtrain.faults import EXIT_DEAD_RANK, EXIT_PREEMPTED

pytestmark = pytest.mark.slow


def _lines(run: Path) -> int:
    p = run / "metrics.jsonl"
    return len(p.read_text().splitlines()) if p.exists() else 0


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(x) for x in (task / "children").read_text().split()]
    return kids


def _rank_of(pid: int) -> int:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(e for e in env if e.startswith(b"RANK="))[5:])


def _wait_lines(run: Path, n: int, procs: list[subprocess.Popen]) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and all(p.poll() is None for p in procs) and _lines(run) < n:
        time.sleep(0.02)
    assert all(p.poll() is None for p in procs), "the run ended before the fault could be injected"


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args, "-m", "mixtrain", "train"]


def test_dead_rank_then_sigterm_on_one_rank_then_identical_metrics(tmp_path):
    oracle_cfg = _config(tmp_path, "oracle", micro_batch_size=2)
    _train(oracle_cfg, nproc=2)
    cfg = _config(tmp_path, "run", micro_batch_size=2, dist_timeout=20)
    run = tmp_path / "run"

    # 1. kill -9 rank 1 (node 1): rank 0 names it and exits within train.dist_timeout
    port = str(_free_port())
    nodes = [subprocess.Popen(_torchrun("--nnodes", "2", "--node_rank", str(i), "--nproc_per_node", "1",
                                        "--master_addr", "127.0.0.1", "--master_port", port) + [str(cfg)],
                              cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in (0, 1)]
    _wait_lines(run, 2, nodes)
    (worker,) = _children(nodes[1].pid)
    assert _rank_of(worker) == 1
    os.kill(worker, signal.SIGKILL)
    killed = time.monotonic()
    _, err0 = nodes[0].communicate(timeout=120)
    waited = time.monotonic() - killed
    nodes[1].communicate(timeout=120)
    assert waited < 20, f"rank 0 took {waited:.0f}s to give up"
    assert "error: rank 1 stopped responding" in err0 and "rank 0 exits instead of waiting" in err0
    assert re.search(rf"exitcode\s*:\s*{EXIT_DEAD_RANK}\b", err0)  # torchrun reports the worker's code
    assert 2 <= _lines(run) < 8

    # 2. resume; SIGTERM to rank 1 only: both ranks stop after the same step, checkpoint, exit 75
    tr = subprocess.Popen(_torchrun("--nproc_per_node", "2", "--master_port", str(_free_port())) + [str(cfg)],
                          cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_lines(run, 4, [tr])
    rank1 = next(p for p in _children(tr.pid) if _rank_of(p) == 1)
    os.kill(rank1, signal.SIGTERM)
    _, err = tr.communicate(timeout=300)
    assert err.count("stopped at step ") == 1, err[-3000:]
    stopped = int(err.split("stopped at step ")[1].split(";")[0])
    assert 4 <= stopped < 8 and _lines(run) == stopped
    codes = re.findall(r"rank\s*:\s*(\d) \(local_rank: \d\)\s*exitcode\s*:\s*(-?\d+)", err)
    assert sorted(codes) == [("0", str(EXIT_PREEMPTED)), ("1", str(EXIT_PREEMPTED))], err[-3000:]
    assert (run / "checkpoints" / f"step-{stopped:08d}" / "manifest.json").is_file()

    # 3. resume to the end
    _train(cfg, nproc=2)
    got, want = _metrics(run), _metrics(tmp_path / "oracle")
    assert [g["step"] for g in got] == list(range(1, 9))
    assert got == want
