"""Benchmark harness: times, ratios against baselines measured in the same run, peak memory,
and CSV rows appended to ``bench/results/<bench>.csv``.

Absolute times on shared 2-core machines are noise; ratios measured side by side in one run
are what the README quotes. Usage in a bench script::

    h = Harness("segment_sum")
    base = h.time(lambda: baseline(x))
    ours = h.time(lambda: candidate(x))
    h.row(case="N=8M S=16 C=1", impl="cxx", seconds=ours, baseline="index_add_+bincount",
          baseline_seconds=base, peak_mb=...)
    h.finish()   # prints the table, appends the CSV

Peak memory: ``child_peak_mb(script, args)`` reruns a bench script in a fresh process with
``--child ...`` arguments; the child calls ``report_child_peak(fn)``, which prints the growth of
the process's peak RSS caused by ``fn`` (inputs are built before the baseline is taken).
The child runs with ``MALLOC_MMAP_THRESHOLD_=65536`` (every large buffer is its own mapping and
goes back to the OS when freed, so RSS follows live memory instead of glibc's cached heap) and
resets its peak (``VmHWM``, via ``/proc/self/clear_refs``) just before ``fn``, so a warm-up run
in the child does not hide or inflate the measured run's peak.
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# BENCH_RESULTS_DIR redirects the CSVs (bench/gpu_check.sh collects them in its output folder).
RESULTS = Path(os.environ.get("BENCH_RESULTS_DIR") or Path(__file__).resolve().parent / "results")


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def peak_rss_mb() -> float:
    """Peak resident set size of this process image, in MiB.

    Reads ``VmHWM`` from /proc: ``ru_maxrss`` would carry the parent's peak over fork + exec,
    hiding a child's own growth whenever the parent was larger."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return peak_rss_mb()


def _reset_peak_rss() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def report_child_peak(fn: Callable[[], Any]) -> None:
    """In a ``--child`` process: run ``fn`` once and print its peak RSS growth."""
    before = current_rss_mb() if _reset_peak_rss() else max(current_rss_mb(), peak_rss_mb())
    fn()
    print(f"PEAK_EXTRA_MB={max(0.0, peak_rss_mb() - before):.1f}", flush=True)


def child_peak_mb(script: str | Path, args: list[str]) -> float:
    """Run ``python script *args`` in a fresh process and read its ``PEAK_EXTRA_MB`` line."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("PEAK_EXTRA_MB="):
            return float(line.split("=", 1)[1])
    raise RuntimeError(f"memory child {args} failed:\n{proc.stderr[-2000:]}")


class Harness:
    """Collects rows, prints them as a table and appends them to ``bench/results/<name>.csv``."""

    def __init__(self, name: str, *, repeat: int = 5, warmup: int = 1, threads: int | None = None) -> None:
        self.name = name
        self.repeat = repeat
        self.warmup = warmup
        if threads is not None:
            torch.set_num_threads(threads)
        self.rows: list[dict[str, Any]] = []

    def time(self, fn: Callable[[], Any], *, repeat: int | None = None, warmup: int | None = None) -> float:
        """Median wall-clock seconds of ``fn()`` over ``repeat`` runs after ``warmup`` runs."""
        for _ in range(self.warmup if warmup is None else warmup):
            fn()
        samples = []
        for _ in range(self.repeat if repeat is None else repeat):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    def row(
        self,
        *,
        case: str,
        impl: str,
        seconds: float,
        baseline: str = "",
        baseline_seconds: float | None = None,
        peak_mb: float | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Record one measurement; ``ratio`` = baseline time / this time (> 1 means faster)."""
        row = {
            "case": case,
            "impl": impl,
            "ms": round(seconds * 1e3, 3),
            "baseline": baseline,
            "speedup_vs_baseline": round(baseline_seconds / seconds, 3) if baseline_seconds else "",
            "peak_extra_mb": "" if peak_mb is None else round(peak_mb, 1),
            **extra,
        }
        self.rows.append(row)
        return row

    def table(self) -> str:
        if not self.rows:
            return "(no rows)"
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        widths = {k: max(len(k), *(len(str(r.get(k, ""))) for r in self.rows)) for k in keys}
        lines = [" | ".join(k.ljust(widths[k]) for k in keys), "-+-".join("-" * widths[k] for k in keys)]
        lines += [" | ".join(str(r.get(k, "")).ljust(widths[k]) for k in keys) for r in self.rows]
        return "\n".join(lines)

    def finish(self) -> None:
        """Print the table and append the rows (with commit, torch, machine, threads) to the CSV."""
        print(f"\n== {self.name} ==  torch {torch.__version__}, {torch.get_num_threads()} threads, {_cpu_name()}")
        print(self.table())
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"{self.name}.csv"
        meta = {
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "commit": _commit(),
            "torch": torch.__version__,
            "machine": f"{platform.machine()} {_cpu_name()}",
            "threads": torch.get_num_threads(),
        }
        rows = [{**meta, **r} for r in self.rows]
        fields = list(dict.fromkeys(k for r in rows for k in r))
        new = not path.exists()
        if not new:
            with path.open() as f:
                header = next(csv.reader(f), [])
            if header != fields:  # columns changed: start a fresh file rather than misalign
                path.rename(path.with_suffix(f".{int(time.time())}.csv"))
                new = True
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            if new:
                writer.writeheader()
            writer.writerows(rows)
        repo = Path(__file__).resolve().parent.parent
        shown = path.resolve().relative_to(repo) if path.resolve().is_relative_to(repo) else path
        print(f"(appended {len(rows)} rows to {shown})")
