"""GradEx benchmarks: ratios measured in one run, torch threads 2.

1. Subset estimation: ``gradsum`` + ``first_order`` over 1000 subsets (one ``[S, T] x [T, d]``
   product + the projected Taylor term) vs the released per-subset scikit-learn fit
   (``evaluate_subset``: Bernoulli(0.7) labels, sign flip, ``LogisticRegression(C=1e-4,
   solver="liblinear")``) + the same rescale and first-order score, on the same stored gradients.
   The baseline is timed on ``--baseline-subsets`` subsets and scaled linearly to 1000 (printed).
2. Gradient pass: mixtrain.gradex (``GradientProjector``, one forward + backward per batch,
   ``capture(weight_grads=False)``, projection generated on the fly) vs the released approach (a
   Python loop of per-example ``autograd.grad(retain_graph=True)`` + a stored dense projection
   matrix ``D x d``), same tiny Llama + LoRA and data; examples/s and peak RSS of a fresh process.

3. ``--model smollm2-135m-instruct``: the gradient pass again on the real pretrained model with
   LoRA r = 16 on every attention and MLP linear (D = 4.9 M trainable weights, the size GradEx
   runs at), rows of 60-120 tokens, batches of 8 (the released CoT batch size).

    PYTHONPATH=. python bench/bench_gradex.py            # full
    PYTHONPATH=. python bench/bench_gradex.py --smoke    # tiniest sizes (CI)
    PYTHONPATH=. python bench/bench_gradex.py --model smollm2-135m-instruct --skip-toy
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Harness, child_peak_mb, report_child_peak

from mixtrain.gradex.estimate import SubsetEstimator, logreg_direction, sample_subsets
from mixtrain.gradex.gradients import Examples, Stored, collate_rows
from mixtrain.gradex.objective import per_example_objective


def _stores(n: int, tasks: int, d: int, j: int, num_params: int) -> tuple[Stored, Stored, list[str]]:
    rng = np.random.default_rng(0)
    names = [f"task{t}" for t in range(tasks)]
    meta = {"projection": "rademacher", "dim": d, "num_params": num_params, "projection_seed": 0, "theta_norm": 3.0}
    g = (rng.normal(size=(n, d)) * 1e-3).astype(np.float16).astype(np.float64)
    train = Stored(np.arange(n), [names[i % tasks] for i in range(n)], g, np.zeros(n), meta)
    target = Stored(np.arange(j), ["t"] * j, rng.normal(size=(j, d)) * 1e-3, rng.normal(size=j), meta)
    return train, target, names


def bench_estimation(h: Harness, n: int, tasks: int, d: int, subsets: int, baseline_subsets: int) -> None:
    train, target, names = _stores(n, tasks, d, 64, 20_000)
    m = sample_subsets(tasks, subsets, 0.5, 0)
    est = SubsetEstimator(train, target, names, ["t"])
    t0 = time.perf_counter()
    est.lifter.gram()
    gram_s = time.perf_counter() - t0
    ours = h.time(lambda: est.score(m))
    codes = np.array([names.index(t) for t in train.tasks])
    logreg_direction(train.grads[:50], seed=0)  # import scikit-learn outside the timed region

    def released() -> None:
        for s in range(baseline_subsets):
            rows = m[s][codes]
            w = logreg_direction(train.grads[rows], C=1e-4, seed=s)
            c = est.coefficients(w[None])
            _ = target.outputs.mean() + c[0] * (w @ est.target_grad_mean[0])

    base = h.time(released, repeat=1, warmup=0) * subsets / baseline_subsets
    case = f"N={n} T={tasks} d={d} S={subsets}"
    h.row(case=case, impl="gradsum+first_order", seconds=ours, baseline=f"sklearn logreg per subset "
          f"(timed on {baseline_subsets}, x{subsets / baseline_subsets:g})", baseline_seconds=base)
    h.row(case=case, impl="gradsum+first_order incl. one-time Gram (D=20000)", seconds=ours + gram_s,
          baseline="same", baseline_seconds=base)


LORA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model_and_data(n: int, seed: int = 0, pretrained: str | None = None):
    import peft
    import transformers

    torch.manual_seed(seed)
    if pretrained:
        from mixtrain.models import resolve_model

        base = transformers.AutoModelForCausalLM.from_pretrained(resolve_model(pretrained), dtype=torch.float32)
        lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_ALL)
    else:
        cfg = transformers.LlamaConfig(vocab_size=259, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
        base = transformers.LlamaForCausalLM(cfg)
        lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = peft.get_peft_model(base, lora).get_base_model()
    vocab = model.config.vocab_size
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model.eval()
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        t = int(rng.integers(60, 120))
        ids = rng.integers(3, vocab, size=t).tolist()
        rows.append((ids, [-100] * (t // 2) + ids[t // 2:]))
    return model, Examples(list(range(n)), ["a"] * n, rows)


def ours_pass(model, ex: Examples, kind: str, d: int, batch: int = 8) -> None:
    from mixtrain.gradex.config import gradex_config
    from mixtrain.gradex.gradients import make_projector
    from mixtrain.gradex.model import gradex_modules

    g = gradex_config({"target": ["t"], "projection": kind, "project_dim": d, "factored_rank": [4, 4]})
    gp = make_projector(model, g, gradex_modules(model))
    out = []
    for s in range(0, len(ex.rows), batch):
        b = collate_rows(ex.rows[s:s + batch], 0)
        with torch.enable_grad(), gp.capture(weight_grads=False):
            f = per_example_objective(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                      b["labels"])
            f.sum().backward()
        out.append(gp.grads())
    return torch.cat(out)


def released_pass(model, ex: Examples, d: int, batch: int = 8) -> torch.Tensor:
    from mixtrain.gradex.model import gradex_modules

    mods = dict(model.named_modules())
    params = [mods[n].weight for n in gradex_modules(model)]
    D = sum(p.numel() for p in params)
    gen = torch.Generator().manual_seed(0)
    # stored dense matrix, float64 as the released code's np.random matrix
    P = (torch.randint(0, 2, (D, d), generator=gen).double() * 2 - 1) / d ** 0.5
    out = []
    for s in range(0, len(ex.rows), batch):
        b = collate_rows(ex.rows[s:s + batch], 0)
        with torch.enable_grad():
            f = per_example_objective(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                      b["labels"])
            for i in range(f.shape[0]):
                gs = torch.autograd.grad(f[i], params, retain_graph=True)
                out.append(torch.cat([x.reshape(-1) for x in gs]).double() @ P)
    return torch.stack(out)


def bench_pass(h: Harness, n: int, d: int, smoke: bool, pretrained: str | None = None) -> None:
    model, ex = _model_and_data(n, pretrained=pretrained)
    warm = 0 if smoke or pretrained else 1
    base = h.time(lambda: released_pass(model, ex, d), repeat=1, warmup=warm)
    D = sum(p.numel() for p in model.parameters() if p.requires_grad)
    extra = ["--model", pretrained] if pretrained else []
    base_mb = None if smoke else child_peak_mb(__file__, ["--child", "released", str(n), str(d), "rademacher", *extra])
    label = f"{pretrained}+LoRA r16" if pretrained else "tiny Llama+LoRA"
    for kind in ("rademacher", "sjlt", "factored"):
        ours = h.time(lambda kind=kind: ours_pass(model, ex, kind, d), repeat=1, warmup=warm)
        mb = None if smoke else child_peak_mb(__file__, ["--child", "ours", str(n), str(d), kind, *extra])
        h.row(case=f"{label} D={D} N={n} d={d}", impl=f"gradex pass ({kind})", seconds=ours,
              baseline="per-example autograd.grad + dense P", baseline_seconds=base, peak_mb=mb,
              examples_per_s=round(n / ours, 1), baseline_examples_per_s=round(n / base, 1),
              baseline_peak_mb="" if base_mb is None else round(base_mb, 1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--quick", action="store_true", help="the same as --smoke (bench/gpu_check.sh)")
    ap.add_argument("--child", nargs=4)
    ap.add_argument("--model", default=None, help="also the gradient pass on this pretrained model (+ LoRA r16)")
    ap.add_argument("--skip-toy", action="store_true", help="with --model: only the pretrained-model pass")
    args = ap.parse_args()
    args.smoke = args.smoke or args.quick
    torch.set_num_threads(2)
    if args.child:
        which, n, d, kind = args.child
        model, ex = _model_and_data(int(n), pretrained=args.model)
        if which == "ours":
            report_child_peak(lambda: ours_pass(model, ex, kind, int(d)))
        else:
            report_child_peak(lambda: released_pass(model, ex, int(d)))
        return
    h = Harness("gradex", repeat=3, warmup=1, threads=2)
    if args.smoke:
        bench_estimation(h, n=200, tasks=8, d=16, subsets=50, baseline_subsets=5)
        bench_pass(h, n=8, d=16, smoke=True)
    elif not args.skip_toy:
        bench_estimation(h, n=4000, tasks=40, d=200, subsets=1000, baseline_subsets=50)
        bench_pass(h, n=32, d=200, smoke=False)
    if args.model:
        bench_pass(h, n=16, d=200, smoke=False, pretrained=args.model)
    h.finish()


if __name__ == "__main__":
    main()
