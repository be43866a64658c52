"""One run survives four faults in a row and still ends with the uninterrupted run's metrics.

The same 8-step command (tiny Llama, checkpoints every 2 steps, as in test_loop) is run until it
finishes:

1. the disk fills up while the step-4 checkpoint is written (ENOSPC after 100 kB): error naming
   the file and the reason, partial files removed, the step-2 checkpoint intact and verifiable;
2. ``train.time_limit=1s``: stops after one more step with a checkpoint, exit code 75;
3. SIGINT mid-run: finishes the step, checkpoints, exit code 75;
4. the newest checkpoint's state file overwritten with random bytes: a warning names the file and
   the run resumes from the previous checkpoint, to the end.

Every metric of every step then equals the uninterrupted reference run's, bit for bit (CPU fp32).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_loop import REPO, _config, _env, _metrics, _train

from mixtrain.__main__ import main as cli
from mixtrain.faults import EXIT_PREEMPTED

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    _train(_config(tmp, "ref"))
    return tmp / "ref"


def _lines(run: Path) -> int:
    p = run / "metrics.jsonl"
    return len(p.read_text().splitlines()) if p.exists() else 0


def _ckpts(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def test_faults_in_a_row_then_identical_metrics(reference, tmp_path, capsys):
    cfg = _config(tmp_path, "run")
    run = tmp_path / "run"

    # 1. full disk during the step-4 checkpoint
    r = subprocess.run([sys.executable, str(REPO / "tests/mixtrain/_diskfull.py"), ".tmp-step-00000004", "100000",
                        "train", str(cfg)], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600,
                       check=False)
    assert r.returncode == 1, r.stderr[-3000:]
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith("error: could not write the checkpoint of step 4: ")
    assert ".tmp-step-00000004/ds/" in err and "No space left on device" in err
    assert "step-00000002 are intact" in err
    assert _ckpts(run) == ["step-00000002"]  # no partial directory left behind
    assert cli(["verify", str(run)]) == 0
    assert "ok          checkpoints/step-00000002" in capsys.readouterr().out

    # 2. a wall-clock limit already used up by the start-up: one step, a checkpoint, exit 75
    r = _train(cfg, "train.time_limit=1s", check=False)
    assert r.returncode == EXIT_PREEMPTED, r.stderr[-3000:]
    assert "stopped at step 3; run the same command to resume" in r.stderr
    assert "step-00000003" in _ckpts(run) and _lines(run) == 3

    # 3. SIGINT (Ctrl-C) mid-run
    p = subprocess.Popen([sys.executable, "-m", "mixtrain", "train", str(cfg)], cwd=REPO, env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and _lines(run) < 4:
        time.sleep(0.02)
    p.send_signal(signal.SIGINT)
    _, stderr = p.communicate(timeout=300)
    assert p.returncode == EXIT_PREEMPTED, stderr[-3000:]
    stopped = int(stderr.split("stopped at step ")[1].split(";")[0])
    assert 4 <= stopped < 8 and f"step-{stopped:08d}" in _ckpts(run)
    assert _lines(run) == stopped

    # 4. the newest checkpoint's state file overwritten with random bytes (not UTF-8)
    newest = run / "checkpoints" / f"step-{stopped:08d}"
    (newest / "mixtrain_state.json").write_bytes(bytes.fromhex("be") + bytes(range(256)) * 3)
    assert cli(["verify", str(run)]) == 1
    out = capsys.readouterr().out
    assert f"BAD         checkpoints/{newest.name}: {newest / 'mixtrain_state.json'}" in out
    previous = max(p for p in (run / "checkpoints").iterdir() if p.name < newest.name)
    r = _train(cfg)
    assert f"checkpoint {newest} is unusable: {newest / 'mixtrain_state.json'}" in r.stderr
    assert f"resumed from {previous} at step {int(previous.name[5:])}" in r.stderr

    got, want = _metrics(run), _metrics(reference)
    assert [g["step"] for g in got] == list(range(1, 9))
    assert got == want
    assert cli(["verify", str(run)]) == 0
    out = capsys.readouterr().out
    assert "ok          model (" in out and "BAD" not in out
