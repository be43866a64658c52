"""``python -m mixtrain compare CONFIG.yaml --policies P1,P2,... [--seeds 0,1,2]``: policies vs baselines.

One normal ``mixtrain train`` run per policy × seed, each a fresh subprocess (so DeepSpeed and
``torch.distributed`` state never leak between runs) in ``OUT/runs/<label>/seed<k>/``; then
``OUT/comparison.md``, ``OUT/comparison.png`` and ``OUT/comparison.json``.

Policy syntax (``--policies``), entries separated by commas outside brackets::

    name[:key=value[:key=value ...]][@label]

``name`` is a registered policy or an alias below; each ``key=value`` becomes a policy parameter
(``mixing.params``; the value is parsed as YAML, so ``10``, ``inf``, ``false``, ``[1, 2]`` work),
except ``update_every``, which sets ``mixing.update_every`` for that policy. ``@label`` names the
row and the directory (default: ``name`` and its parameters joined by ``+``, e.g.
``mos+reward=diff``).
Examples: ``mos:reward=diff,temperature:temperature=10@tau10``,
``skillit:graph=configs/repro/lego_chain_graph.json:update_every=20``.

Parameters from the config file's ``mixing.params`` are used only for the policy the file names
(``mixing.policy``), merged under the entry's own parameters; ``mixing.update_every`` of the file
applies to every policy unless the entry sets its own. Extra ``section.key=value`` arguments
override the config for every run (e.g. ``train.steps=50``).

Baselines (``--baselines``, default ``uniform,random``; always run, added when missing; any
``@label`` of a ``--policies`` entry can be a baseline too, e.g. ``--baselines all_tasks``):

* ``uniform`` — equal weight per domain (per skill for ``lego``/``addition``). This **is** the
  stratified baseline of Skill-It and Aioli; ``stratified`` is accepted as an alias and runs the
  same thing (listed once, as ``uniform``).
* ``random`` — alias of ``proportional``: p_i ∝ n_i, i.e. sampling uniformly over training
  *examples* (Skill-It's "random"; MoS's "Prop. τ = 1"). Identical to ``uniform`` when all
  domains have the same number of examples.

Resumability: a run whose ``compare_run.json`` says ``done`` with the same command-line
overrides is skipped; any other run is (re)started with ``train.resume=auto``, so an interrupted
run continues from its latest checkpoint (``train.save_every`` > 0) or restarts from scratch.

Table (see ``docs/compare.md``): per policy the mean and 95 % Student-t interval over seeds of
the final dev accuracy (``eval.accuracy``; the primary metric when present) and average dev loss
(unweighted mean over domains), steps to reach the best baseline's final average dev loss,
wall-clock, and policy overhead = Σ policy_time / Σ step_time over the logged steps
(``metrics.jsonl``); per-domain tables (mean ± sample std). Per policy × baseline
(:mod:`mixtrain.stats`): the mean paired difference over common seeds, a paired t-test and an
exact sign-flip test over seeds, and a paired bootstrap over dev examples (from each run's
``dev_examples.json``). A difference is marked ``*`` only when the chosen test (``--test``,
default the t-test) rejects at ``--alpha`` after a Holm correction over all comparisons of that
metric. ``summary.json`` holds the per-arm intervals and every test.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .config import Config, ConfigError, load_config
from .engine import default_accelerator, standalone_env
from .stats import RatioData, holm, paired_bootstrap, paired_t, sign_flip, t_interval

__all__ = [
    "ALIASES",
    "BASELINES",
    "METRICS",
    "TESTS",
    "PolicySpec",
    "RunResult",
    "parse_baselines",
    "parse_policies",
    "parse_seeds",
    "read_run",
    "run_compare",
    "summarize",
    "with_baselines",
    "write_comparison",
]

log = logging.getLogger("mixtrain.compare")

ALIASES: dict[str, tuple[str, str]] = {
    "stratified": ("uniform", "equal weight per domain/skill"),
    "random": ("proportional", "uniform over training examples, p_i ∝ n_i"),
}
BASELINES: tuple[str, ...] = ("uniform", "random")
_BASELINE_NOTES = {
    "uniform": "= stratified: equal weight per domain/skill",
    "random": "= proportional: uniform over examples, p ∝ n",
}
MARKER = "compare_run.json"


@dataclass(frozen=True)
class PolicySpec:
    """One row of the comparison: a policy with its parameters.

    Attributes:
        label: unique row name and directory name.
        policy: registered policy name (aliases resolved).
        params: policy parameters (``mixing.params``).
        update_every: ``mixing.update_every`` for this policy (``None``: the config's).
        note: what the row is (for baselines and aliases).
    """

    label: str
    policy: str
    params: dict[str, Any] = field(default_factory=dict)
    update_every: int | None = None
    note: str = ""

    @property
    def key(self) -> str:
        """Identity of the run (policy + parameters); equal keys are the same experiment."""
        return json.dumps([self.policy, self.params, self.update_every], sort_keys=True, default=str)


def _split_top(text: str, sep: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


_LABEL_OK = re.compile(r"^[A-Za-z0-9_.=,+\-]+$")


def _fmt_value(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def parse_policies(text: str) -> list[PolicySpec]:
    """Parse the ``--policies`` syntax (module docstring) into specs, aliases resolved.

    Raises:
        ConfigError: empty entry, ``key=value`` without ``=``, a bad label, or a duplicate label
            (the message quotes the entry and says what is expected).
    """
    if not text or not text.strip():
        raise ConfigError("--policies: empty; expected e.g. 'uniform,mos:reward=diff,temperature:temperature=10'")
    specs: list[PolicySpec] = []
    for raw in _split_top(text, ","):
        entry = raw.strip()
        if not entry:
            raise ConfigError(f"--policies {text!r}: empty entry (two commas in a row?)")
        label = None
        if "@" in entry:
            entry, label = entry.rsplit("@", 1)
            if not label or not _LABEL_OK.match(label):
                raise ConfigError(f"--policies entry {raw.strip()!r}: label {label!r} must be non-empty "
                                  "and use only letters, digits and _ . = , + -")
        parts = _split_top(entry, ":")
        name = parts[0].strip()
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ConfigError(f"--policies entry {raw.strip()!r}: policy name {name!r} is not a valid name")
        params: dict[str, Any] = {}
        update_every = None
        for kv in parts[1:]:
            if "=" not in kv:
                raise ConfigError(f"--policies entry {raw.strip()!r}: parameter {kv!r} must be key=value")
            k, v = kv.split("=", 1)
            k = k.strip()
            try:
                val = yaml.safe_load(v) if v.strip() != "" else ""
            except yaml.YAMLError as e:
                raise ConfigError(f"--policies entry {raw.strip()!r}: value of {k!r} is not valid YAML: {e}") from None
            if isinstance(val, float) and math.isinf(val):
                val = "inf"
            if k == "update_every":
                if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                    raise ConfigError(f"--policies entry {raw.strip()!r}: update_every={v!r}, expected an integer >= 1")
                update_every = val
            else:
                params[k] = val
        note = ""
        policy = name
        if name in ALIASES:
            policy, note = ALIASES[name]
        if label is None:
            shown = [f"{k}={_fmt_value(v)}" for k, v in params.items()]
            if update_every is not None:
                shown.append(f"update_every={update_every}")
            label = "+".join([name, *shown])
            label = re.sub(r"[^A-Za-z0-9_.=,+\-]", "_", label)
        if name in BASELINES and not params and update_every is None:
            note = _BASELINE_NOTES[name]
        elif name == "stratified" and not params and update_every is None:
            label, note = "uniform", _BASELINE_NOTES["uniform"]
        spec = PolicySpec(label, policy, params, update_every, note)
        specs.append(spec)
    return _dedupe(specs)


def _dedupe(specs: list[PolicySpec]) -> list[PolicySpec]:
    out: list[PolicySpec] = []
    for s in specs:
        same = [o for o in out if o.key == s.key]
        if same:
            if s.label != same[0].label:
                log.warning("`%s` is the same run as `%s` (same policy and parameters): run and listed once, "
                            "as `%s`", s.label, same[0].label, same[0].label)
            continue  # e.g. uniform and stratified: one run
        if any(o.label == s.label for o in out):
            raise ConfigError(f"--policies: label {s.label!r} used twice for different runs; add @label to one")
        out.append(s)
    return out


def with_baselines(specs: list[PolicySpec], baselines: Sequence[str] = BASELINES) -> list[PolicySpec]:
    """Put the baselines first: ``uniform`` / ``random`` / ``stratified`` are added when missing;
    any other name must be the label of one of ``specs`` (e.g. ``--baselines all_tasks`` for a
    ``fixed:...@all_tasks`` entry).

    Raises:
        ConfigError: a baseline that is neither a built-in baseline nor a label of ``specs``.
    """
    base: list[PolicySpec] = []
    for name in baselines:
        own = [s for s in specs if s.label == name]
        if own:
            base += own
        elif name in BASELINES or name == "stratified":
            base += parse_policies(name)
        else:
            raise ConfigError(f"--baselines: {name!r} is neither uniform, random nor the @label of a --policies "
                              f"entry; labels: {[s.label for s in specs]}")
    rest = [s for s in specs if all(s.key != b.key for b in base)]
    return _dedupe(base + rest)


def parse_baselines(text: str) -> list[str]:
    """``"uniform,random"`` → the baseline labels (``stratified`` is ``uniform``).

    Raises:
        ConfigError: empty or repeated names."""
    names = ["uniform" if x.strip() == "stratified" else x.strip() for x in text.split(",") if x.strip()]
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"--baselines {text!r}: expected distinct comma-separated labels, e.g. uniform,random")
    return names


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` → ``[0, 1, 2]``.

    Raises:
        ConfigError: a non-integer, a negative or a repeated seed."""
    try:
        seeds = [int(x) for x in text.split(",") if x.strip() != ""]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: expected distinct non-negative integers, e.g. 0,1,2")
    return seeds


# ---- the runs ------------------------------------------------------------------------------------


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


# ---- reading the runs ------------------------------------------------------------------------------


@dataclass
class RunResult:
    """Numbers of one finished run (from its ``metrics.jsonl``, ``compare_run.json`` and, when
    present, the per-example results of its final evaluation, ``dev_examples.json``)."""

    label: str
    seed: int
    steps: int
    dev_final: dict[str, float]
    dev_curve: list[tuple[int, float]]
    acc_final: dict[str, float] | None
    acc_curve: list[tuple[int, float]]
    weights_final: dict[str, float]
    train_time: float
    policy_time: float
    wall_time: float | None
    examples: dict[str, Any] | None = None
    start: dict[str, Any] | None = None  # the step-0 record (``eval.at_start``), when the run has one

    @property
    def dev_avg(self) -> float:
        """Unweighted mean of the final per-domain dev losses."""
        return float(np.mean(list(self.dev_final.values()))) if self.dev_final else math.nan

    @property
    def acc_avg(self) -> float:
        """Unweighted mean of the final per-domain accuracies (NaN without accuracy)."""
        return float(np.mean(list(self.acc_final.values()))) if self.acc_final else math.nan

    @property
    def overhead_pct(self) -> float:
        """Σ policy_time / Σ step_time × 100 over the logged steps."""
        return 100.0 * self.policy_time / self.train_time if self.train_time > 0 else math.nan


def _mean_of(d: dict[str, Any]) -> float:
    vals = [v for v in d.values() if isinstance(v, (int, float)) and math.isfinite(v)]
    return float(np.mean(vals)) if vals else math.nan


def _num_list(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in x)


def _read_examples(run_dir: Path, final_step: int, domains: Sequence[str] | None = None) -> dict[str, Any] | None:
    """``dev_examples.json`` when it is well formed and belongs to the final evaluation, else ``None``."""
    from .report import DEV_EXAMPLES_FILE

    p = run_dir / DEV_EXAMPLES_FILE
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("%s is not valid JSON; no per-example statistics for this run", p)
        return None
    if not isinstance(data, dict) or data.get("step") != final_step:
        log.warning("%s is not from the final evaluation (step %s, expected %d); ignored", p,
                    data.get("step") if isinstance(data, dict) else "?", final_step)
        return None
    out: dict[str, Any] = {"dev_loss": None, "dev_accuracy": None}
    if domains:
        data = _only_domains([data], domains)[0]
    loss = data.get("dev_loss")
    if isinstance(loss, dict) and all(isinstance(v, dict) and _num_list(v.get("loss_sum")) and _num_list(v.get("tokens"))
                                      and len(v["loss_sum"]) == len(v["tokens"]) for v in loss.values()):
        out["dev_loss"] = {k: (np.asarray(v["loss_sum"], float), np.asarray(v["tokens"], float)) for k, v in loss.items()}
    acc = data.get("dev_accuracy")
    if isinstance(acc, dict) and all(isinstance(v, dict) and _num_list(v.get("index")) and _num_list(v.get("correct"))
                                     and len(v["index"]) == len(v["correct"]) for v in acc.values()):
        out["dev_accuracy"] = {k: dict(zip(map(int, v["index"]), map(float, v["correct"]))) for k, v in acc.items()}
    return out


def _only_domains(recs: list[dict[str, Any]], domains: Sequence[str]) -> list[dict[str, Any]]:
    """The records with their ``dev_loss`` / ``dev_accuracy`` restricted to ``domains``."""
    keep = set(domains)
    out = []
    for r in recs:
        r = dict(r)
        for key in ("dev_loss", "dev_accuracy"):
            if isinstance(r.get(key), dict):
                r[key] = {k: v for k, v in r[key].items() if k in keep}
        out.append(r)
    return out


def read_run(run_dir: str | Path, label: str = "", seed: int = 0, domains: Sequence[str] | None = None) -> RunResult:
    """Parse a run directory; with ``domains``, only those domains are scored (dev loss, accuracy,
    their curves and per-example results), e.g. a held-out target the mixtures never train on.

    Raises:
        FileNotFoundError: no ``metrics.jsonl``.
        ValueError: no records, or no dev evaluation (``dev_loss``) in them, or none of ``domains``
            in the dev losses.
    """
    from .report import read_metrics

    run_dir = Path(run_dir)
    recs = read_metrics(run_dir)
    if domains:
        have = {k for r in recs if isinstance(r.get("dev_loss"), dict) for k in r["dev_loss"]}
        if have and not have & set(domains):
            raise ValueError(f"--domains {','.join(domains)}: none is a dev domain of {run_dir} ({sorted(have)})")
        recs = _only_domains(recs, domains)
    if not recs:
        raise ValueError(f"{run_dir}/metrics.jsonl has no records")
    devs = [r for r in recs if isinstance(r.get("dev_loss"), dict)]
    if not devs:
        raise ValueError(f"{run_dir}/metrics.jsonl has no dev_loss records; set train.eval_every > 0")
    accs = [r for r in recs if isinstance(r.get("dev_accuracy"), dict)]
    train_time = policy_time = 0.0
    prev = 0
    for r in recs:
        n = r["step"] - prev
        prev = r["step"]
        train_time += float(r.get("step_time") or 0.0) * n
        policy_time += float(r.get("policy_time") or 0.0) * n
    marker = _read_marker(run_dir)
    return RunResult(
        label=label, seed=seed, steps=int(recs[-1]["step"]),
        dev_final={k: float(v) for k, v in devs[-1]["dev_loss"].items() if v is not None},
        dev_curve=[(int(r["step"]), _mean_of(r["dev_loss"])) for r in devs],
        acc_final={k: float(v) for k, v in accs[-1]["dev_accuracy"].items()} if accs else None,
        acc_curve=[(int(r["step"]), _mean_of(r["dev_accuracy"])) for r in accs],
        weights_final={k: float(v) for k, v in recs[-1]["weights"].items()},
        train_time=train_time, policy_time=policy_time,
        wall_time=float(marker["wall_time"]) if "wall_time" in marker else None,
        examples=_read_examples(run_dir, int(devs[-1]["step"]), domains),
        start=next((r for r in devs if r["step"] == 0), None),
    )


def share_start(results: dict[str, list[RunResult]]) -> dict[str, Any] | None:
    """The starting model's step-0 record (evaluated in one run only: it is the same for all),
    prepended to the curves of every run that lacks it; ``None`` when no run has one."""
    start = next((r.start for runs in results.values() for r in runs if r.start is not None), None)
    if start is None:
        return None
    acc0 = _mean_of(start["dev_accuracy"]) if isinstance(start.get("dev_accuracy"), dict) else None
    for runs in results.values():
        for r in runs:
            if not r.dev_curve or r.dev_curve[0][0] != 0:
                r.dev_curve.insert(0, (0, _mean_of(start["dev_loss"])))
            if acc0 is not None and r.acc_curve and r.acc_curve[0][0] != 0:
                r.acc_curve.insert(0, (0, acc0))
    return start


def _ms(xs: Sequence[float]) -> tuple[float, float]:
    a = np.array([x for x in xs if x is not None and math.isfinite(x)], dtype=float)
    if len(a) == 0:
        return math.nan, math.nan
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else math.nan


def _first_reach(curve: Sequence[tuple[int, float]], target: float) -> int | None:
    for step, v in curve:
        if math.isfinite(v) and v <= target:
            return step
    return None


TESTS: tuple[str, ...] = ("ttest", "bootstrap", "signflip")
"""Tests ``compare`` can mark significance by (``--test``): paired t over seeds (default), paired
bootstrap over dev examples, exact sign-flip over seeds."""
METRICS: dict[str, str] = {"acc_avg": "accuracy", "dev_avg": "dev loss"}
_EX_KEY = {"acc_avg": "dev_accuracy", "dev_avg": "dev_loss"}


def _ratio_data(runs_a: list[RunResult], runs_b: list[RunResult], metric: str
                ) -> tuple[list[RatioData], list[RatioData]] | None:
    """Per-domain ``RatioData`` of two policies over their common seeds (example ids shared by
    every run); ``None`` when some run has no per-example results for ``metric``."""
    key = _EX_KEY[metric]
    if not runs_a or any(r.examples is None or r.examples.get(key) is None for r in runs_a + runs_b):
        return None
    all_runs = runs_a + runs_b
    doms = [d for d in all_runs[0].examples[key] if all(d in r.examples[key] for r in all_runs)]
    xa, xb = [], []
    for d in doms:
        if metric == "acc_avg":
            ids = sorted(set.intersection(*(set(r.examples[key][d]) for r in all_runs)))
            if not ids:
                continue

            def arr(runs: list[RunResult], d: str = d, ids: list[int] = ids) -> RatioData:
                num = np.array([[r.examples[key][d][i] for i in ids] for r in runs])
                return RatioData(num, np.ones_like(num))
        else:
            lens = {len(r.examples[key][d][0]) for r in all_runs}
            if len(lens) != 1 or 0 in lens:
                continue  # not the same dev rows: nothing to pair

            def arr(runs: list[RunResult], d: str = d) -> RatioData:
                return RatioData(np.stack([r.examples[key][d][0] for r in runs]),
                                 np.stack([r.examples[key][d][1] for r in runs]))
        a, b = arr(runs_a), arr(runs_b)
        if (a.den.sum(1) > 0).all() and (b.den.sum(1) > 0).all():
            xa.append(a)
            xb.append(b)
    return (xa, xb) if xa else None


def _compare_pair(runs_a: list[RunResult], runs_b: list[RunResult], metric: str, *, test: str,
                  n_boot: int, boot_seed: int) -> dict[str, Any] | None:
    """Paired statistics of ``metric`` for policy ``a`` vs baseline ``b`` over their common seeds."""
    by_b = {r.seed: r for r in runs_b}
    pa = [r for r in runs_a if r.seed in by_b and math.isfinite(getattr(r, metric))
          and math.isfinite(getattr(by_b[r.seed], metric))]
    pb = [by_b[r.seed] for r in pa]
    if not pa:
        return None
    va = [getattr(r, metric) for r in pa]
    vb = [getattr(r, metric) for r in pb]
    diffs = [x - y for x, y in zip(va, vb)]
    m, lo, hi = t_interval(diffs)
    boot = None
    rd = _ratio_data(pa, pb, metric)
    if rd is not None:
        br = paired_bootstrap(*rd, n_boot=n_boot, seed=boot_seed)
        boot = {"diff": br.diff, "lo": br.lo, "hi": br.hi, "p": br.p, "n_boot": br.n_boot}
    res = {"diff": m, "ci": [lo, hi], "n": len(pa), "seeds": [r.seed for r in pa], "per_seed": diffs,
           "p_ttest": paired_t(va, vb), "p_signflip": sign_flip(va, vb), "bootstrap": boot}
    res["p"] = res["p_" + test] if test != "bootstrap" else (boot["p"] if boot else math.nan)
    return res


def summarize(results: dict[str, list[RunResult]], baselines: Sequence[str] = BASELINES, *,
              test: str = "ttest", alpha: float = 0.05, n_boot: int = 10000, boot_seed: int = 0,
              confidence: float = 0.95) -> dict[str, Any]:
    """Aggregate runs per label over seeds and test every policy against every baseline.

    Args:
        results: ``{label: [RunResult per seed]}`` (labels in table order).
        baselines: labels of the baseline rows present in ``results``.
        test: which test marks a difference significant (:data:`TESTS`).
        alpha: family-wise level; the Holm correction runs over all (policy, baseline)
            comparisons of one metric (accuracy and dev loss are two families).
        n_boot, boot_seed: bootstrap resamples and their seed.
        confidence: level of the intervals.

    Returns:
        A JSON-serialisable dict: ``target`` (best baseline's mean final average dev loss and
        which baseline), ``test``/``alpha``/``correction``, ``comparisons`` (one dict per policy,
        baseline and metric: ``diff`` = mean paired difference policy − baseline, ``ci`` (t over
        seeds), ``p_ttest``, ``p_signflip``, ``bootstrap`` {diff, lo, hi, p, n_boot} or ``None``,
        ``p`` (the chosen test's), ``p_holm``, ``significant``), and per label ``rows[label]``
        with ``dev_avg``, ``acc_avg``, ``dev_domain``, ``acc_domain`` (each ``[mean, std]``),
        ``dev_ci``/``acc_ci`` (``[mean, lo, hi]``), ``reach`` (mean step over seeds that reached the
        target, ``reached``/``n``, ``per_seed``), ``wall_time``, ``overhead_pct``, ``weights`` (mean)
        and ``vs[baseline][metric]`` = the comparison dict.

    Raises:
        ValueError: unknown ``test`` or ``alpha`` outside (0, 1).
    """
    if test not in TESTS:
        raise ValueError(f"--test {test!r}: expected one of {', '.join(TESTS)}")
    if not 0 < alpha < 1:
        raise ValueError(f"--alpha {alpha}: expected a number in (0, 1)")
    rows: dict[str, Any] = {}
    for label, runs in results.items():
        domains = list(runs[0].dev_final)
        acc_domains = list(runs[0].acc_final or {})
        wnames = list(runs[0].weights_final)
        rows[label] = {
            "n": len(runs),
            "seeds": [r.seed for r in runs],
            "dev_avg": _ms([r.dev_avg for r in runs]),
            "acc_avg": _ms([r.acc_avg for r in runs]),
            "dev_ci": list(t_interval([r.dev_avg for r in runs], confidence)),
            "acc_ci": list(t_interval([r.acc_avg for r in runs], confidence)),
            "dev_per_seed": [r.dev_avg for r in runs],
            "acc_per_seed": [r.acc_avg for r in runs],
            "dev_domain": {d: _ms([r.dev_final.get(d, math.nan) for r in runs]) for d in domains},
            "acc_domain": {d: _ms([(r.acc_final or {}).get(d, math.nan) for r in runs]) for d in acc_domains},
            "wall_time": _ms([r.wall_time if r.wall_time is not None else math.nan for r in runs]),
            "train_time": _ms([r.train_time for r in runs]),
            "overhead_pct": _ms([r.overhead_pct for r in runs]),
            "weights": {n: float(np.mean([r.weights_final.get(n, math.nan) for r in runs])) for n in wnames},
            "steps": max(r.steps for r in runs),
        }
    present = [b for b in baselines if b in rows and math.isfinite(rows[b]["dev_avg"][0])]
    target = None
    if present:
        best = min(present, key=lambda b: rows[b]["dev_avg"][0])
        target = {"baseline": best, "dev_avg": rows[best]["dev_avg"][0]}
    comparisons: list[dict[str, Any]] = []
    for label, runs in results.items():
        row = rows[label]
        if target is not None:
            steps = [_first_reach(r.dev_curve, target["dev_avg"]) for r in runs]
            hit = [s for s in steps if s is not None]
            row["reach"] = {"mean": float(np.mean(hit)) if hit else None, "reached": len(hit), "n": len(steps),
                            "per_seed": steps}
        else:
            row["reach"] = None
        row["vs"] = {}
        for b in present:
            if b == label or (label in present and present.index(label) < present.index(b)):
                continue  # a baseline against a later baseline: the mirror of that pair, filled below
            row["vs"][b] = {}
            for metric in METRICS:
                c = _compare_pair(runs, results[b], metric, test=test, n_boot=n_boot, boot_seed=boot_seed)
                row["vs"][b][metric] = c
                if c is not None:
                    comparisons.append({"policy": label, "baseline": b, "metric": metric, **c})
    for metric in METRICS:  # Holm within each metric's family
        fam = [c for c in comparisons if c["metric"] == metric]
        for c, adj in zip(fam, holm([c["p"] for c in fam])):
            c["p_holm"] = adj
            c["significant"] = bool(math.isfinite(adj) and adj <= alpha)
            rows[c["policy"]]["vs"][c["baseline"]][metric].update(p_holm=adj, significant=c["significant"])
    for i, a in enumerate(present):  # baseline pairs are tested once; the earlier row shows the mirror
        for b in present[i + 1:]:
            rows[a]["vs"][b] = {m: _mirror(v) for m, v in rows[b]["vs"].get(a, {}).items()}
    return {"target": target, "baselines": present, "rows": rows, "comparisons": comparisons, "test": test,
            "alpha": alpha, "correction": "holm", "confidence": confidence, "n_boot": n_boot}


def _mirror(c: dict[str, Any] | None) -> dict[str, Any] | None:
    """The comparison ``b`` vs ``a`` from ``a`` vs ``b`` (differences negated, same p-values)."""
    if c is None:
        return None
    out = dict(c, diff=-c["diff"], ci=[-c["ci"][1], -c["ci"][0]], per_seed=[-x for x in c["per_seed"]])
    if c.get("bootstrap"):
        bt = c["bootstrap"]
        out["bootstrap"] = dict(bt, diff=-bt["diff"], lo=-bt["hi"], hi=-bt["lo"])
    return out


# ---- writing the comparison ----------------------------------------------------------------------


def _f(ms: Sequence[float], nd: int = 3, pct: bool = False) -> str:
    m, s = ms[0], ms[1]
    if m is None or not math.isfinite(m):
        return "n/a"
    k = 100.0 if pct else 1.0
    if s is None or not math.isfinite(s):
        return f"{m * k:.{nd}f}"
    return f"{m * k:.{nd}f} ± {s * k:.{nd}f}"


def _ci(mlh: Sequence[float], nd: int = 3, pct: bool = False, signed: bool = False) -> str:
    """``mean [lo, hi]`` (just the mean when the interval is undefined)."""
    m, lo, hi = mlh
    if m is None or not math.isfinite(m):
        return "n/a"
    k = 100.0 if pct else 1.0
    m, lo, hi = m + 0.0, lo + 0.0, hi + 0.0  # no "-0.0"
    sg = "+" if signed else ""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{m * k:{sg}.{nd}f}"
    return f"{m * k:{sg}.{nd}f} [{lo * k:{sg}.{nd}f}, {hi * k:{sg}.{nd}f}]"


def _vs(v: dict[str, Any] | None, nd: int = 3, pct: bool = False) -> str:
    if not v or v.get("diff") is None or not math.isfinite(v["diff"]):
        return "n/a"
    k = 100.0 if pct else 1.0
    return f"{v['diff'] * k + 0.0:+.{nd}f}{' *' if v.get('significant') else ''}"


def _p(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:.3f}" if x >= 0.001 else f"{x:.1e}"


_TEST_TEXT = {
    "ttest": "paired t-test over seeds (`scipy.stats.ttest_rel`; runs with the same seed form a pair)",
    "bootstrap": ("paired bootstrap over dev examples (stratified by domain, the same resampled example ids "
                  "for both policies and all seeds; percentile p-value)"),
    "signflip": "exact sign-flip permutation test over seeds",
}


def _summary_json(summ: dict[str, Any], labels: list[str], primary: str) -> dict[str, Any]:
    rows = summ["rows"]
    arms = {}
    for lab in labels:
        r = rows[lab]
        arms[lab] = {
            "n": r["n"], "seeds": r["seeds"],
            "accuracy": {"mean": r["acc_ci"][0], "lo": r["acc_ci"][1], "hi": r["acc_ci"][2], "std": r["acc_avg"][1],
                         "per_seed": r["acc_per_seed"]},
            "dev_loss": {"mean": r["dev_ci"][0], "lo": r["dev_ci"][1], "hi": r["dev_ci"][2], "std": r["dev_avg"][1],
                         "per_seed": r["dev_per_seed"]},
            "steps_to_baseline": r["reach"],
            "wall_time": r["wall_time"][0],
        }
    comps = [{**{k: v for k, v in c.items() if k != "metric"}, "metric": METRICS[c["metric"]].replace(" ", "_")}
             for c in summ["comparisons"]]
    return {"version": 1, "primary_metric": primary, "test": summ["test"], "alpha": summ["alpha"],
            "correction": summ["correction"], "confidence": summ["confidence"], "n_boot": summ["n_boot"],
            "target": summ["target"], "arms": arms, "comparisons": comps}


def write_comparison(out: str | Path, specs: Sequence[PolicySpec], results: dict[str, list[RunResult]],
                     *, header: dict[str, Any] | None = None, failures: Sequence[str] = (), test: str = "ttest",
                     alpha: float = 0.05, n_boot: int = 10000,
                     baselines: Sequence[str] = BASELINES) -> tuple[Path, Path]:
    """Write ``comparison.md``, ``comparison.png``, ``comparison.json`` (everything) and
    ``summary.json`` (per-arm intervals and every test; schema in ``docs/compare.md``) in ``out``.

    ``test``, ``alpha``, ``n_boot``, ``baselines``: see :func:`summarize`.

    Returns:
        ``(md_path, png_path)``.
    """
    out = Path(out)
    summ = summarize(results, baselines, test=test, alpha=alpha, n_boot=n_boot)
    rows = summ["rows"]
    labels = [s.label for s in specs if s.label in results]
    notes = {s.label: s for s in specs}
    has_acc = any(math.isfinite(rows[lab]["acc_avg"][0]) for lab in labels)
    primary = "accuracy" if has_acc else "dev_loss"
    base = summ["baselines"]
    n_seeds = max((rows[lab]["n"] for lab in labels), default=0)
    lines = ["# mixtrain compare", ""]
    for k, v in (header or {}).items():
        lines.append(f"- **{k}**: {v}")
    if list(base) == list(BASELINES):
        base_text = ("- **baselines**: `uniform` = stratified (equal weight per domain/skill); `random` = `proportional` "
                     "(uniform over training examples, p ∝ n). With equal domain sizes the two are the same mixture.")
    else:
        base_text = "- **baselines**: " + ", ".join(f"`{b}`" for b in base) + " (`--baselines`)."
    lines += [
        base_text,
        (f"- **primary metric**: {'dev accuracy (exact match); dev loss second' if has_acc else 'dev loss (no task accuracy in these runs)'}."),
        (f"- values are the mean over seeds with its {summ['confidence']:.0%} Student-t confidence interval "
         "`[lo, hi]` (final evaluation); `Δ` columns are the mean paired difference policy − baseline "
         "over the seeds both have."),
        (f"- **significance** (`*`): {_TEST_TEXT[test]}, two-sided, α = {alpha}, Holm-corrected over all "
         f"{len([c for c in summ['comparisons'] if c['metric'] == 'acc_avg'])} accuracy / "
         f"{len([c for c in summ['comparisons'] if c['metric'] == 'dev_avg'])} dev-loss comparisons "
         "(one family per metric). No `*` means: not shown to differ at that level, not: equal."),
        ("- runs with the same seed share the training data order where the mixtures allow: the same uniform "
         "stream picks each sample's domain (inverse CDF of that step's weights) and the same per-domain "
         "shuffles give the examples; model initialisation, corpus, dev rows and LoRA initialisation are the "
         "same for every seed. The seed-to-seed spread is therefore the data-order variance only."),
        (f"- the exact sign-flip test cannot go below p = 2/2^n (= {2 / 2 ** max(n_seeds, 1):.3g} with "
         f"{n_seeds} seed(s)); it is shown for reference"
         + (" and can never reach α here." if n_seeds and 2 / 2 ** n_seeds > alpha else ".")),
        ("- the bootstrap resamples dev examples only (the noise of a finite dev set for these trained models), "
         "not training seeds."),
        ("- *avg dev loss* = unweighted mean over domains of the per-domain mean token loss on the dev split; "
         "*accuracy* = unweighted mean over the scored domains of greedy exact-match accuracy."),
    ]
    if n_seeds < 3:
        lines.append(f"- **only {n_seeds} seed(s)**: use ≥ 3 seeds for the tests to mean anything.")
    if summ["target"] is not None:
        lines.append(f"- *steps to baseline*: first evaluation step whose avg dev loss ≤ "
                     f"{summ['target']['dev_avg']:.4f} (the final avg dev loss of the best baseline, "
                     f"`{summ['target']['baseline']}`), mean over the seeds that reach it (reached/seeds).")
    lines.append("- *overhead* = Σ policy_time / Σ step_time over logged steps (metrics.jsonl); "
                 "*wall* = seconds of the `train` subprocess(es), start-up and evaluation included.")
    lines.append("")
    head = ["policy"]
    if has_acc:
        head += ["accuracy %"] + [f"Δacc vs {b} (pts)" for b in base]
    head += ["avg dev loss"] + [f"Δ vs {b}" for b in base]
    head += ["steps to baseline", "wall (s)", "overhead %"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for lab in labels:
        r = rows[lab]
        name = f"`{lab}`" + (f" ({notes[lab].note})" if notes[lab].note else "")
        cells = [name]
        if has_acc:
            cells += [_ci(r["acc_ci"], 1, pct=True)] + [
                _vs(r["vs"].get(b, {}).get("acc_avg"), 1, pct=True) if b != lab else "—" for b in base]
        cells += [_ci(r["dev_ci"], 4)] + [_vs(r["vs"].get(b, {}).get("dev_avg"), 4) if b != lab else "—" for b in base]
        rc = r["reach"]
        if rc is None:
            cells.append("n/a")
        else:
            cells.append(f"{rc['mean']:.0f} ({rc['reached']}/{rc['n']})" if rc["mean"] is not None
                         else f"not reached (0/{rc['n']})")
        cells += [_f(r["wall_time"], 0), _f(r["overhead_pct"], 2)]
        lines.append("| " + " | ".join(cells) + " |")
    if summ["comparisons"]:
        lines += ["", "## Tests (policy − baseline)", "",
                  (f"`p` columns are two-sided, unadjusted except `p Holm` (of the `{test}` p-value); "
                   "`Δ [CI]` is the t interval of the paired differences over seeds; the bootstrap gives its own "
                   "Δ and percentile interval over dev examples."), "",
                  ("| policy | vs | metric | seeds | Δ [CI] | p t-test | p sign-flip | bootstrap Δ [CI] "
                   "| p bootstrap | p Holm | significant |"), "|" + "---|" * 11]
        for metric in (["acc_avg"] if has_acc else []) + ["dev_avg"]:
            for c in [c for c in summ["comparisons"] if c["metric"] == metric]:
                pct, nd = (True, 1) if metric == "acc_avg" else (False, 4)
                k = 100.0 if pct else 1.0
                bt = c["bootstrap"]
                lines.append("| " + " | ".join([
                    f"`{c['policy']}`", f"`{c['baseline']}`", METRICS[metric] + (" (pts)" if pct else ""), str(c["n"]),
                    _ci([c["diff"], *c["ci"]], nd, pct=pct, signed=True), _p(c["p_ttest"]), _p(c["p_signflip"]),
                    f"{bt['diff'] * k:+.{nd}f} [{bt['lo'] * k:+.{nd}f}, {bt['hi'] * k:+.{nd}f}]" if bt else "n/a",
                    _p(bt["p"]) if bt else "n/a", _p(c["p_holm"]), "**yes**" if c["significant"] else "no"]) + " |")
    domains = list(rows[labels[0]]["dev_domain"]) if labels else []
    lines += ["", "## Final dev loss per domain (mean ± std over seeds)", "",
              "| policy | " + " | ".join(domains) + " |", "|" + "---|" * (len(domains) + 1)]
    for lab in labels:
        lines.append(f"| `{lab}` | " + " | ".join(_f(rows[lab]["dev_domain"].get(d, (math.nan, math.nan)), 3)
                                                   for d in domains) + " |")
    if has_acc:
        adom = list(rows[labels[0]]["acc_domain"])
        lines += ["", "## Final dev accuracy per domain (%, mean ± std over seeds)", "",
                  "| policy | " + " | ".join(adom) + " |", "|" + "---|" * (len(adom) + 1)]
        for lab in labels:
            lines.append(f"| `{lab}` | " + " | ".join(
                _f(rows[lab]["acc_domain"].get(d, (math.nan, math.nan)), 1, pct=True) for d in adom) + " |")
    wn = list(rows[labels[0]]["weights"]) if labels else []
    lines += ["", "## Final sampling weights (mean over seeds)", "",
              "| policy | " + " | ".join(wn) + " |", "|" + "---|" * (len(wn) + 1)]
    for lab in labels:
        lines.append(f"| `{lab}` | " + " | ".join(f"{rows[lab]['weights'].get(n, math.nan):.3f}" for n in wn) + " |")
    if failures:
        lines += ["", "## Failed runs", ""] + [f"- {f}" for f in failures]
    lines += ["", "![comparison](comparison.png)", ""]
    out.mkdir(parents=True, exist_ok=True)
    md = out / "comparison.md"
    _atomic_write(md, "\n".join(lines))
    _atomic_write(out / "comparison.json", json.dumps(
        {"header": header or {}, "specs": [s.__dict__ for s in specs], "summary": summ,
         "curves": {lab: [r.dev_curve for r in results[lab]] for lab in labels},
         "acc_curves": {lab: [r.acc_curve for r in results[lab]] for lab in labels},
         "failures": list(failures)}, indent=1, default=str))
    _atomic_write(out / "summary.json", json.dumps({"header": header or {}, **_summary_json(summ, labels, primary)},
                                                   indent=1, default=str))
    png = _plot(out / "comparison.png", labels, results, rows, has_acc)
    return md, png


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _mean_curve(curves: list[list[tuple[int, float]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    steps = sorted({s for c in curves for s, _ in c})
    m, sd = [], []
    for s in steps:
        vals = [v for c in curves for st, v in c if st == s and math.isfinite(v)]
        m.append(np.mean(vals) if vals else np.nan)
        sd.append(np.std(vals, ddof=1) if len(vals) > 1 else 0.0)
    return np.array(steps, dtype=float), np.array(m), np.array(sd)


def _plot(path: Path, labels: list[str], results: dict[str, list[RunResult]], rows: dict[str, Any],
          has_acc: bool) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(15, 10))
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    for i, lab in enumerate(labels):
        s, m, sd = _mean_curve([r.dev_curve for r in results[lab]])
        ax = axes[0, 0]
        ax.plot(s, m, color=cmap(i % cmap.N), label=lab, lw=1.5)
        ax.fill_between(s, m - sd, m + sd, color=cmap(i % cmap.N), alpha=0.15)
    axes[0, 0].set(title="average dev loss vs step (mean ± std over seeds)", xlabel="step", ylabel="avg dev loss")
    axes[0, 0].legend(fontsize=8)
    ax = axes[0, 1]
    if has_acc:
        for i, lab in enumerate(labels):
            s, m, sd = _mean_curve([r.acc_curve for r in results[lab]])
            ax.plot(s, m, color=cmap(i % cmap.N), label=lab, lw=1.5, marker="o", ms=3)
            ax.fill_between(s, m - sd, m + sd, color=cmap(i % cmap.N), alpha=0.15)
        ax.set(title="mean dev accuracy vs step (greedy exact match)", xlabel="step", ylabel="accuracy",
               ylim=(-0.02, 1.02))
    else:
        ax.text(0.5, 0.5, "no task accuracy (eval.accuracy: false)", ha="center", va="center")
        ax.set(title="mean dev accuracy")
    # final weights: one stacked bar per policy
    ax = axes[1, 0]
    wn = list(rows[labels[0]]["weights"]) if labels else []
    wcm = plt.get_cmap("tab20" if len(wn) > 10 else "tab10")
    bottom = np.zeros(len(labels))
    for j, n in enumerate(wn):
        vals = np.array([rows[lab]["weights"].get(n, 0.0) for lab in labels])
        ax.bar(range(len(labels)), vals, bottom=bottom, color=wcm(j % wcm.N), label=n)
        bottom += vals
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set(title="final sampling weights (mean over seeds)", ylabel="weight", ylim=(0, 1))
    ax.legend(fontsize=7, loc="upper right")
    # final per-domain dev loss, grouped bars
    ax = axes[1, 1]
    doms = list(rows[labels[0]]["dev_domain"]) if labels else []
    width = 0.8 / max(1, len(labels))
    for i, lab in enumerate(labels):
        ms = [rows[lab]["dev_domain"].get(d, (np.nan, np.nan)) for d in doms]
        ax.bar(np.arange(len(doms)) + (i - (len(labels) - 1) / 2) * width, [m for m, _ in ms], width,
               yerr=[0 if not math.isfinite(s) else s for _, s in ms], color=cmap(i % cmap.N), label=lab)
    ax.set_xticks(range(len(doms)), doms, rotation=30, ha="right", fontsize=8)
    ax.set(title="final dev loss per domain", ylabel="dev loss")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=85)
    plt.close(fig)
    tmp.replace(path)
    return path


# ---- entry point ---------------------------------------------------------------------------------


def _configured_domains(cfg: Config) -> list[str]:
    """Domain names of the config (built-in families expanded into their skills)."""
    from .data import config_domain_specs

    return [s.name for s in config_domain_specs(cfg)]


def run_compare(config: str, policies: str, seeds: str = "0", *, overrides: Sequence[str] = (),
                output: str | None = None, jobs: int = 1, python: str | None = None,
                only_report: bool = False, test: str = "ttest", alpha: float = 0.05, n_boot: int = 10000,
                baselines: str = ",".join(BASELINES), domains: str | None = None) -> Path:
    """Run (or resume) the comparison and write the outputs; returns ``comparison.md``.

    Args:
        config: the YAML config every run starts from.
        policies: the ``--policies`` string (module docstring); baselines are added.
        seeds: comma-separated seeds (``train.seed`` of each run).
        overrides: ``section.key=value`` applied to every run.
        output: output directory (default ``<config output_dir>/compare``).
        jobs: runs executed in parallel (each a separate process).
        python: interpreter for the runs (default ``sys.executable``).
        only_report: do not run anything; rebuild the outputs from the finished runs.
        test: the test that marks significance (:data:`TESTS`); ``alpha``: its family-wise level
            (Holm); ``n_boot``: bootstrap resamples. All three only affect the report, so they
            can be changed with ``only_report`` without rerunning anything.
        baselines: comma-separated baseline labels (``--baselines``): ``uniform``, ``random`` (added
            when missing) or ``@label``s of ``policies`` entries; every other row is tested against each.
        domains: comma-separated domains to score (``--domains``; default every dev domain): dev
            loss, accuracy, the tests and the curves use only these, e.g. a held-out target.

    Raises:
        ConfigError: bad config, policy spec, parameters or seeds (before anything runs).
        RuntimeError: some runs failed (outputs are still written from the others).
    """
    from . import policies as registry

    if jobs < 1:
        raise ConfigError(f"--jobs: got {jobs}, expected an integer >= 1")
    if test not in TESTS:
        raise ConfigError(f"--test: got {test!r}, expected one of {', '.join(TESTS)}")
    if not 0 < alpha < 1:
        raise ConfigError(f"--alpha: got {alpha}, expected a number in (0, 1)")
    if n_boot < 1:
        raise ConfigError(f"--bootstrap: got {n_boot}, expected an integer >= 1")
    cfg = load_config(config, overrides)
    base_labels = parse_baselines(baselines)
    scored = [d.strip() for d in (domains or "").split(",") if d.strip()] or None
    if scored:
        configured = _configured_domains(cfg)
        unknown = [d for d in scored if d not in configured]
        if unknown:
            raise ConfigError(f"--domains: unknown domain(s) {unknown}; domains: {configured}")
    specs = with_baselines(parse_policies(policies), base_labels)
    seed_list = parse_seeds(seeds)
    for s in specs:  # fail fast on unknown policies / parameters
        params = dict(cfg.mixing.params) if s.policy == cfg.mixing.policy else {}
        params.update(s.params)
        try:
            registry.get(s.policy, **params)
        except ValueError as e:
            raise ConfigError(f"--policies entry {s.label!r}: {e}") from None
    out = Path(output) if output else Path(cfg.output_dir) / "compare"
    out.mkdir(parents=True, exist_ok=True)
    jobs_list: list[_Job] = []
    for s in specs:
        for seed in seed_list:
            rd = _run_dir(out, s, seed)
            ov = _overrides(cfg, s, seed, rd, overrides)
            if cfg.eval.at_start and jobs_list:
                # the starting model is the same for every run (same weights, LoRA B = 0, same dev
                # rows): evaluate it once, in the first run, not policies x seeds times
                ov.append("eval.at_start=false")
            jobs_list.append(_Job(s, seed, rd, ov, marker=_read_marker(rd)))
    todo = [j for j in jobs_list if not (j.marker.get("status") == "done" and j.marker.get("overrides") == j.overrides)]
    skipped = len(jobs_list) - len(todo)
    log.info("%d runs (%d policies x %d seeds): %d finished already, %d to run", len(jobs_list), len(specs),
             len(seed_list), skipped, len(todo))
    failed: list[_Job] = []
    if not only_report and todo:
        failed = _execute(todo, config, jobs, python or sys.executable)
    results: dict[str, list[RunResult]] = {}
    failures = [f"`{j.spec.label}` seed {j.seed}: exit {j.marker.get('returncode')} (log: {j.run_dir / 'train.log'})"
                for j in failed]
    for j in jobs_list:
        if j in failed:
            continue
        if _read_marker(j.run_dir).get("status") != "done":
            failures.append(f"`{j.spec.label}` seed {j.seed}: not finished")
            continue
        try:
            results.setdefault(j.spec.label, []).append(read_run(j.run_dir, j.spec.label, j.seed, scored))
        except (FileNotFoundError, ValueError) as e:
            failures.append(f"`{j.spec.label}` seed {j.seed}: {e}")
    header = {"config": config, "overrides": " ".join(overrides) or "(none)", "seeds": seeds,
              "steps": cfg.train.steps, "model": (cfg.model.config or {}).get("model_type", cfg.model.name_or_path),
              "domains": ", ".join(cfg.data.builtin + list(cfg.data.domains))}
    if scored:
        header["scored domains"] = ", ".join(scored) + " (`--domains`: dev loss and accuracy of these only)"
    if not results:
        raise RuntimeError("compare: no run finished; nothing to compare. " + "; ".join(failures))
    start = share_start(results)
    if start is not None:
        text = f"avg dev loss {_mean_of(start['dev_loss']):.4f}"
        if isinstance(start.get("dev_accuracy"), dict):
            acc = start["dev_accuracy"]
            text = (f"accuracy {100 * _mean_of(acc):.1f} % ("
                    + ", ".join(f"{k} {100 * v:.0f}" for k, v in acc.items()) + "), " + text)
        header["starting model (step 0)"] = text
    walls = [r.wall_time for runs in results.values() for r in runs if r.wall_time is not None]
    header["compute"] = (f"{sum(len(v) for v in results.values())} runs, {sum(walls) / 60:.1f} min of "
                         "`train` wall-clock in all")
    md, _ = write_comparison(out, specs, results, header=header, failures=failures, test=test, alpha=alpha,
                             n_boot=n_boot, baselines=base_labels)
    if failed:
        raise RuntimeError(f"compare: {len(failed)} run(s) failed: " + "; ".join(failures) + f" (partial table in {md})")
    return md
