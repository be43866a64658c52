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

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from ..config import Config, ConfigError, load_config
from .report import write_comparison
from .results import METRICS, TESTS, RunResult, _mean_of, read_run, share_start, summarize
from .runner import _execute, _Job, _overrides, _read_marker, _run_dir
from .specs import (
    ALIASES,
    BASELINES,
    PolicySpec,
    parse_baselines,
    parse_policies,
    parse_seeds,
    with_baselines,
)

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


# ---- entry point ---------------------------------------------------------------------------------


def _configured_domains(cfg: Config) -> list[str]:
    """Domain names of the config (built-in families expanded into their skills)."""
    from ..data import config_domain_specs

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
    from .. import policies as registry

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
