"""Time benchmark-style scoring and report a model's step-0 accuracies on our dev splits.

    python bench/bench_scoring.py --task arc_easy --items 300            # timing: shared prefix vs whole sequences
    python bench/bench_scoring.py --accuracy arc_easy boolq piqa medmcqa gsm8k --items 200

Timing compares :func:`mixtrain.scoring.loglikelihoods` with ``share_prefix=True`` (the default:
one context forward per item, options on its repeated cache) against ``share_prefix=False``
(every context + option sequence in full, the usual lm-eval batching) on the same requests, and
checks they agree. The machine may be shared: read the ratio, not the absolute seconds.
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--task", default="arc_easy", help="multiple-choice task timed")
    ap.add_argument("--items", type=int, default=300, help="items per task (first N of the dev split)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--accuracy", nargs="*", default=None, help="tasks whose dev accuracy is reported")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="generation budget (GSM8K, TriviaQA)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the whole-sequence timing")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from mixtrain import scoring
    from mixtrain.data import load_tokenizer
    from mixtrain.data.tasks import load_task
    from mixtrain.models import quiet_progress, resolve_model

    with quiet_progress():
        model = AutoModelForCausalLM.from_pretrained(resolve_model(args.model), dtype=torch.float32).eval()
    tok = load_tokenizer(args.model)
    print(f"# {args.model}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs (shared machine: absolute times are noisy)")

    if args.accuracy is None:
        items = load_task(args.task)["dev"][: args.items]
        t0 = time.perf_counter()
        res = scoring.score_items(model, tok, items, batch_size=args.batch_size)
        t_items = time.perf_counter() - t0
        n_opts = sum(len(it.choices) + len(it.letters) for it in items)
        print(f"score_items {args.task}: {len(items)} items, {n_opts} continuations, {t_items:.1f} s "
              f"({len(items) / t_items:.1f} items/s); " + ", ".join(f"{k}={v:.3f}" for k, v in res["metrics"].items()))
        if not args.no_baseline:
            reqs = [(tok.render_chat([{"role": "user", "content": it.prompt}], add_generation_prompt=True),
                     [tok.encode(c) for c in it.choices] + [tok.encode(x) for x in it.letters]) for it in items]
            t0 = time.perf_counter()
            shared = scoring.loglikelihoods(model, reqs, batch_size=args.batch_size, pad_id=tok.pad_token_id)
            t_shared = time.perf_counter() - t0
            t0 = time.perf_counter()
            whole = scoring.loglikelihoods(model, reqs, batch_size=args.batch_size * 4, pad_id=tok.pad_token_id,
                                           share_prefix=False)
            t_whole = time.perf_counter() - t0
            diff = max(abs(a - b) for ra, rb in zip(shared, whole) for a, b in zip(ra, rb))
            print(f"loglikelihoods: shared prefix {t_shared:.1f} s, whole sequences {t_whole:.1f} s, "
                  f"speed-up {t_whole / t_shared:.2f}x, max |difference| {diff:.2e}")
        return

    print("| task | items | metric | value | seconds |")
    print("|---|---|---|---|---|")
    for name in args.accuracy:
        items = load_task(name)["dev"][: args.items]
        res = scoring.score_items(model, tok, items, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
        for metric, value in res["metrics"].items():
            print(f"| {name} | {len(items)} | {metric} | {value:.3f} | {res['seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
