"""The runs of ``mixtrain compare``: one ``mixtrain train`` subprocess per policy × seed in
``OUT/runs/<label>/seed<k>/``, each with its ``compare_run.json`` marker (status, overrides,
attempts, wall-clock) that makes the comparison resumable."""

from __future__ import annotations

import json
import logging
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config
from ..engine import default_accelerator, standalone_env
from .specs import PolicySpec

log = logging.getLogger("mixtrain.compare")

MARKER = "compare_run.json"


def _run_dir(out: Path, spec: PolicySpec, seed: int) -> Path:
    return out / "runs" / spec.label / f"seed{seed}"


def _overrides(cfg: Config, spec: PolicySpec, seed: int, run_dir: Path, common: Sequence[str]) -> list[str]:
    params = dict(cfg.mixing.params) if spec.policy == cfg.mixing.policy else {}
    params.update(spec.params)
    ov = list(common) + [
        f"mixing.policy={spec.policy}",
        f"mixing.params={json.dumps(params)}",
        f"train.seed={seed}",
        f"output_dir={run_dir}",
        "train.resume=auto",
        "train.progress=false",
    ]
    if spec.update_every is not None:
        ov.append(f"mixing.update_every={spec.update_every}")
    if cfg.train.eval_every == 0:
        ov.append(f"train.eval_every={max(1, cfg.train.steps // 10)}")
    return ov


def _read_marker(run_dir: Path) -> dict[str, Any]:
    p = run_dir / MARKER
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return {}


def _write_marker(run_dir: Path, data: dict[str, Any]) -> None:
    tmp = run_dir / (MARKER + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(run_dir / MARKER)


@dataclass
class _Job:
    spec: PolicySpec
    seed: int
    run_dir: Path
    overrides: list[str]
    proc: subprocess.Popen | None = None
    t0: float = 0.0
    marker: dict[str, Any] = field(default_factory=dict)


def _alive(pid: Any, run_dir: Path) -> bool:
    """Whether ``pid`` is a live process training into ``run_dir`` (Linux ``/proc``; else ``False``)."""
    try:
        cmdline = Path(f"/proc/{int(pid)}/cmdline").read_bytes().decode(errors="replace")
    except (OSError, ValueError, TypeError):
        return False
    return f"output_dir={run_dir}" in cmdline


def _launch(job: _Job, config: str, python: str) -> None:
    if job.marker.get("status") == "running" and _alive(job.marker.get("pid"), job.run_dir):
        raise RuntimeError(
            f"{job.run_dir} is still being trained by process {job.marker['pid']} (from an earlier, killed "
            "`compare`?); stop it or wait for it before resuming"
        )
    job.run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [python, "-m", "mixtrain", "train", config, *job.overrides]
    m = job.marker
    m.update(status="running", overrides=job.overrides, policy=job.spec.policy, label=job.spec.label,
             seed=job.seed, attempts=int(m.get("attempts", 0)) + 1, command=shlex.join(cmd))
    m.setdefault("wall_time", 0.0)
    _write_marker(job.run_dir, m)
    env = standalone_env()  # each run is its own one-process job
    env.setdefault("DS_ACCELERATOR", default_accelerator())
    with open(job.run_dir / "train.log", "a", encoding="utf-8") as logf:
        logf.write(f"\n==== attempt {m['attempts']}: {shlex.join(cmd)}\n")
        logf.flush()
        job.t0 = time.perf_counter()
        # same process group as `compare`: killing the comparison's group (Ctrl-C, kill -- -PGID) stops its runs
        job.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
    m["pid"] = job.proc.pid
    _write_marker(job.run_dir, m)


def _execute(jobs: list[_Job], config: str, n_parallel: int, python: str) -> list[_Job]:
    """Run the jobs, ``n_parallel`` at a time; returns the failed ones."""
    pending, running, failed = list(jobs), [], []

    def _on_term(signum: int, frame: Any) -> None:  # SIGTERM: stop our runs too (finally below)
        raise KeyboardInterrupt(f"signal {signum}")

    old_handler = signal.signal(signal.SIGTERM, _on_term) if threading.current_thread() is threading.main_thread() else None
    try:
        while pending or running:
            while pending and len(running) < n_parallel:
                job = pending.pop(0)
                log.info("run %s seed %d -> %s", job.spec.label, job.seed, job.run_dir)
                _launch(job, config, python)
                running.append(job)
            time.sleep(0.2)
            for job in list(running):
                assert job.proc is not None
                rc = job.proc.poll()
                if rc is None:
                    continue
                running.remove(job)
                job.marker["wall_time"] = float(job.marker.get("wall_time", 0.0)) + time.perf_counter() - job.t0
                job.marker["status"] = "done" if rc == 0 else "failed"
                job.marker["returncode"] = rc
                _write_marker(job.run_dir, job.marker)
                if rc == 0:
                    log.info("done %s seed %d (%.0f s)", job.spec.label, job.seed, job.marker["wall_time"])
                else:
                    failed.append(job)
                    log.error("FAILED %s seed %d (exit %d); see %s", job.spec.label, job.seed, rc,
                              job.run_dir / "train.log")
    finally:  # interrupted: do not leave orphans training in the background
        for job in running:
            if job.proc is not None and job.proc.poll() is None:
                job.proc.terminate()
                job.proc.wait()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    return failed
