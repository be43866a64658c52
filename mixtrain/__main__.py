"""``python -m mixtrain {train CONFIG.yaml [k=v ...] | demo [k=v ...] | report DIR | compare CONFIG.yaml --policies ...}``."""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # no GPU here; DeepSpeed must not probe CUDA


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m mixtrain", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("train", help="train from a YAML config")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="section.key=value (YAML values)")
    p = sub.add_parser("demo", help="the embedded default: tiny Llama, built-in corpus")
    p.add_argument("overrides", nargs="*", help="section.key=value (YAML values)")
    p = sub.add_parser("report", help="regenerate report.png from a run directory")
    p.add_argument("run_dir")
    # ---- issue 9: compare ------------------------------------------------------------------
    p = sub.add_parser("compare", help="one run per policy x seed, then comparison.md/.png vs baselines")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="section.key=value applied to every run")
    p.add_argument("--policies", required=True,
                   help="comma-separated name[:key=value...][@label] (baselines uniform, random are added)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    p.add_argument("--output", default=None, help="output directory (default <output_dir>/compare)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (default 1)")
    p.add_argument("--report-only", action="store_true", help="only rebuild the table/plot from finished runs")
    # ---- end issue 9 ----------------------------------------------------------------------
    args, extra = parser.parse_known_args(argv)
    if extra:  # issue 9: `compare` accepts section.key=value overrides after its options too
        if args.cmd != "compare" or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra

    from .config import ConfigError, apply_overrides, demo_config, from_dict, load_config

    try:
        if args.cmd == "report":
            from .report import make_report

            print(make_report(args.run_dir))
            return 0
        if args.cmd == "compare":  # issue 9
            import logging

            from .compare import run_compare

            logging.basicConfig(level=logging.INFO, format="[compare] %(message)s")
            try:
                md = run_compare(args.config, args.policies, args.seeds, overrides=args.overrides,
                                 output=args.output, jobs=args.jobs, only_report=args.report_only)
            except RuntimeError as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            except KeyboardInterrupt:
                print("compare interrupted; its runs were stopped. Re-run the same command to continue.",
                      file=sys.stderr)
                return 130
            print(f"comparison: {md} (+ comparison.png, comparison.json)")
            return 0
        if args.cmd == "train":
            cfg = load_config(args.config, args.overrides)
        else:
            cfg = from_dict(apply_overrides(demo_config(), args.overrides))
        from .loop import train

        summary = train(cfg)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"output: {summary['output_dir']} (metrics.jsonl, report.png, schedule.json)")
        return 0
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
