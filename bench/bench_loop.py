"""mixtrain loop vs HF Trainer: training tokens/s with the same DeepSpeed config, model, batch and
data stream; and the cost of the per-domain loss signals.

Times are process CPU seconds (user + system, all threads) of the steps after ``--warmup``,
measured inside one run in each trainer (between step boundaries), so start-up and the run's end
are excluded: on a shared machine wall time mostly measures the neighbours, CPU time measures
the work. Wall times are printed too.

Both trainers run in fresh child processes (one rank, DeepSpeed CPU accelerator, gloo, fp32) on
the same tiny Llama (random init, same seed), the same global sample stream (``MixtureDataset``
drives the HF Trainer, the mixtrain sampler drives mixtrain) and the same DeepSpeed config
(ZeRO stage, micro batch, grad accumulation, clipping, AdamW). Tokens/s counts non-pad input
tokens. Both train the same global batches; mixtrain splits each into micro-batches longest rows
first (``train.sort_by_length``, its default), the HF Trainer in the order drawn.

Signal overhead: one optimizer step of the mixtrain ``LossModel`` (forward, backward, AdamW)
with per-domain ``group_ids`` + the signal bus accumulate/all-reduce, against the same step
without groups (``num_groups = 1``, no bus).

Peak memory: growth of each child's peak RSS (``VmHWM``, reset just before the run,
``MALLOC_MMAP_THRESHOLD_=65536`` so freed buffers leave RSS) through the measured steps, model
load included, in both trainers (mixtrain's end-of-run checkpoint, which the HF child does not
write, is after the last mark).

The real pretrained model (``--model smollm2-135m-instruct``: SmolLM2-135M-Instruct, vocabulary
49152, its own tokenizer and chat template) with ``--finetune lora`` (r = 16 on every attention
and MLP linear, the base frozen) or ``--finetune full``; the model-load row times the one-off
GGUF conversion into a fresh cache and a cached load.

    python bench/bench_loop.py            # default size, 3 interleaved rounds (median reported)
    python bench/bench_loop.py --tiny     # smoke size (seconds)
    python bench/bench_loop.py --model smollm2-135m-instruct --finetune lora   # micro-batch 4 x 256
    python bench/bench_loop.py --model smollm2-135m-instruct --finetune full
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

DOMAINS = ["code", "docs", "math", "lego_2", "addition_2"]
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def _model_section(a: argparse.Namespace) -> dict:
    if not a.model:
        return {"config": _model_cfg(a), "tokenizer": "byte"}
    return {"name_or_path": a.model, **({"lora": dict(LORA)} if a.finetune == "lora" else {})}


def _peak_start() -> float:
    """Reset this process's peak RSS to its current RSS and return that (MiB): the baseline the
    measured run's peak is taken against."""
    from _harness import _reset_peak_rss, peak_rss_mb

    _reset_peak_rss()
    return peak_rss_mb()


def _peak_mb() -> float:
    from _harness import peak_rss_mb

    return peak_rss_mb()


def _model_cfg(a: argparse.Namespace) -> dict:
    return {"model_type": "llama", "hidden_size": a.hidden, "intermediate_size": a.hidden * 3,
            "num_hidden_layers": a.layers, "num_attention_heads": 4, "num_key_value_heads": 4,
            "max_position_embeddings": 512, "tie_word_embeddings": False}


def _config(a: argparse.Namespace, out: str) -> dict:
    return {
        "model": _model_section(a),
        "data": {"builtin": DOMAINS, "builtin_size": 200, "max_length": a.seq, "dev_fraction": 0.0,
                 "packing": bool(a.packing)},
        "mixing": {"policy": "uniform"},
        "train": {"steps": a.steps, "micro_batch_size": a.mbs, "grad_accum": a.ga, "lr": 1e-3, "warmup": 0,
                  "lr_schedule": "constant", "zero_stage": a.zero, "log_every": 1, "save_every": 0,
                  "progress": False, "tensorboard": False, "seed": 0, "grad_clip": 1.0, "threads": a.threads},
        "output_dir": out,
    }


def _cpu() -> float:
    return time.process_time()  # CPU time of all threads of this process


def child_mixtrain(a: argparse.Namespace) -> None:
    """One run of ``steps + 1`` steps; CPU/wall time and input tokens between the starts of steps
    ``warmup + 1`` and ``steps + 1`` (marked when the loop draws each step's batch): the cost of
    ``steps - warmup`` training steps inside one run, as the HF child measures, free of start-up
    and of the run's end (final evaluation and checkpoint). Peak RSS: up to the start of step
    ``steps + 1`` (the HF child saves no checkpoint)."""
    from mixtrain.config import from_dict
    from mixtrain.loop import train
    from mixtrain.sampler import MixtureSampler

    marks: list[tuple[float, float, float]] = []
    draw = MixtureSampler.next_global_batch

    def marked(self, *args, **kw):
        marks.append((_cpu(), time.perf_counter(), _peak_mb()))
        return draw(self, *args, **kw)

    MixtureSampler.next_global_batch = marked
    with tempfile.TemporaryDirectory() as d:
        raw = _config(a, d)
        raw["train"]["steps"] = a.steps + 1
        raw["train"]["save_model"] = False
        base = _peak_start()
        train(from_dict(raw))
        recs = [json.loads(line) for line in (Path(d) / "metrics.jsonl").read_text().splitlines()]
    tokens = {r["step"]: r["input_tokens"] for r in recs if "input_tokens" in r}
    (c0, w0, _), (c1, w1, p1) = marks[a.warmup], marks[a.steps]
    peak = p1 - base  # through the measured steps: model load and set-up included, the run's end not
    toks = tokens[a.steps] - tokens[a.warmup]
    n = a.steps - a.warmup
    print(f"RESULT={json.dumps({'tokens_per_cpu_s': toks / (c1 - c0), 'cpu_step_s': (c1 - c0) / n, 'wall_step_s': (w1 - w0) / n, 'peak_mb': peak, 'setup_peak_mb': marks[0][2] - base})}",
          flush=True)


def child_hf(a: argparse.Namespace) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from mixtrain import policies
    from mixtrain.config import from_dict
    from mixtrain.data import ByteTokenizer, encode_domains, load_domains, load_tokenizer
    from mixtrain.engine import build_ds_config
    from mixtrain.hf import MixtureCallback, MixtureDataset
    from mixtrain.models import resolve_model

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(29500 + os.getpid() % 1000))
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = from_dict(_config(a, "unused"))
    base = _peak_start()  # as in the mixtrain child: tokenizer, data, model and engine set-up included
    tok = load_tokenizer(a.model) if a.model else ByteTokenizer()
    doms = load_domains(DOMAINS, {}, dev_fraction=0.0, builtin_size=200, builtin_seed=0)
    enc = encode_domains(doms, tok, max_length=a.seq)
    ds = MixtureDataset(enc, tok, global_batch_size=a.mbs * a.ga, seed=0)
    cb = MixtureCallback(policies.get("uniform"), ds)
    train_ds: object = ds
    if a.group_by_length:  # HF's own answer to padding needs a map-style dataset: the same stream, drawn up front
        it = iter(ds)
        train_ds = [next(it) for _ in range(a.steps * a.mbs * a.ga)]
    if a.model:  # the same directory mixtrain loads, through plain transformers (+ PEFT)
        model = AutoModelForCausalLM.from_pretrained(resolve_model(a.model), dtype=torch.float32)
        if a.finetune == "lora":
            import peft

            model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **LORA))
    else:
        raw = dict(_model_cfg(a))
        raw["vocab_size"] = tok.vocab_size
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(raw.pop("model_type"), **raw))
    ds_cfg = build_ds_config(cfg, 1)
    ds_cfg["train_batch_size"] = "auto"
    ds_cfg["gradient_clipping"] = "auto"
    tokens: list[int] = []
    marks: dict[int, tuple[float, float, int]] = {}
    setup: list[float] = []
    orig_collate = cb.collator

    def counting_collate(features):
        b = orig_collate(features)
        tokens.append(int(b["attention_mask"].sum()))
        return b

    class Marks(TrainerCallback):
        # CPU/wall/tokens at the end of step `warmup` and of the last step: the difference is the
        # cost of the steps in between, free of start-up
        def on_train_begin(self, args, state, control, **kw):
            setup.append(_peak_mb())  # model, DeepSpeed engine and optimizer built, no step yet

        def on_step_end(self, args, state, control, **kw):
            if state.global_step in (a.warmup, a.steps):
                marks[state.global_step] = (_cpu(), time.perf_counter(), sum(tokens[:state.global_step * a.ga]))

    with tempfile.TemporaryDirectory() as d:
        args = TrainingArguments(
            output_dir=d, max_steps=a.steps, per_device_train_batch_size=a.mbs, gradient_accumulation_steps=a.ga,
            learning_rate=1e-3, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
            weight_decay=0.0, report_to=[], logging_steps=10**6, save_strategy="no", deepspeed=ds_cfg,
            dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True, seed=0,
            **_length_grouping(TrainingArguments, bool(a.group_by_length)),
        )
        trainer = Trainer(model=model, args=args, train_dataset=train_ds, data_collator=counting_collate,
                          callbacks=[cb, Marks()])
        trainer.train()
    peak = _peak_mb() - base
    (c0, w0, t0), (c1, w1, t1) = marks[a.warmup], marks[a.steps]
    n = a.steps - a.warmup
    print(f"RESULT={json.dumps({'tokens_per_cpu_s': (t1 - t0) / (c1 - c0), 'cpu_step_s': (c1 - c0) / n, 'wall_step_s': (w1 - w0) / n, 'peak_mb': peak, 'setup_peak_mb': setup[0] - base})}",
          flush=True)


def _length_grouping(args_cls: type, on: bool) -> dict:
    """HF's own length grouping: ``train_sampling_strategy`` (transformers 5.x) or ``group_by_length`` (4.x)."""
    if not on:
        return {}
    import dataclasses

    names = {f.name for f in dataclasses.fields(args_cls)}
    return {"train_sampling_strategy": "group_by_length"} if "train_sampling_strategy" in names else \
        {"group_by_length": True}


def child_load(a: argparse.Namespace) -> None:
    """First use (GGUF dequantised + written to a fresh cache; the GGUF file already downloaded)
    and a cached load (safetensors + tokenizer) of ``a.model``."""
    import shutil

    from mixtrain import models

    src = models.KNOWN_MODELS[a.model]
    gguf = models.cache_root() / "downloads" / src.file_name
    if not gguf.is_file():
        models.prepare_model(a.model)
    with tempfile.TemporaryDirectory() as home:
        os.makedirs(os.path.join(home, "downloads"))
        shutil.copy(gguf, os.path.join(home, "downloads", src.file_name))
        os.environ["MIXTRAIN_HOME"] = home
        w0 = time.perf_counter()
        path = models.prepare_model(a.model)
        first = time.perf_counter() - w0
        import torch
        import transformers

        from mixtrain.data import load_tokenizer

        w0 = time.perf_counter()
        transformers.AutoModelForCausalLM.from_pretrained(models.resolve_model(a.model), dtype=torch.float32)
        load_tokenizer(a.model)
        cached = time.perf_counter() - w0
        assert str(path) == models.resolve_model(a.model)
    print(f"RESULT={json.dumps({'first_s': first, 'cached_s': cached})}", flush=True)


def child_signals(a: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from mixtrain.config import from_dict
    from mixtrain.data import ByteTokenizer, collate, encode_domains, load_domains
    from mixtrain.engine import LossModel, build_engine, build_model, init_distributed
    from mixtrain.signals import SignalBus

    init_distributed()
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = from_dict(_config(a, "unused"))
    tok = ByteTokenizer()
    enc = encode_domains(load_domains(DOMAINS, {}, dev_fraction=0.0, builtin_size=200, builtin_seed=0), tok,
                         max_length=a.seq)
    rng = np.random.default_rng(0)
    rows = [(int(d), int(rng.integers(enc[d].size))) for d in rng.integers(len(enc), size=a.mbs)]
    batch = collate([enc[d].train[e] for d, e in rows], [d for d, _ in rows], tok.pad_token_id)
    res = {}
    for mode in ("groups", "nogroups", "groups", "nogroups"):
        torch.manual_seed(0)
        groups = mode == "groups"
        wrapper = LossModel(build_model(cfg, tok.vocab_size), len(enc) if groups else 1)
        engine, *_ = build_engine(cfg, wrapper, 1)
        bus = SignalBus([e.name for e in enc]) if groups else None
        b = dict(batch) if groups else {**batch, "domain_ids": torch.zeros_like(batch["domain_ids"])}

        def step(engine=engine, b=b, bus=bus):
            for _ in range(a.ga):
                out = engine(**b)
                engine.backward(out["loss"])
                engine.step()
                if bus is not None:
                    from mixtrain.signals import LossOutput

                    bus.add_micro(b, LossOutput(out["loss"], out["group_loss"], out["group_count"]))
            if bus is not None:
                bus.end_step()

        for _ in range(3):
            step()
        c = _cpu()
        for _ in range(a.steps):
            step()
        res[mode] = min(res.get(mode, 1e9), (_cpu() - c) / a.steps)
    print(f"RESULT={json.dumps(res)}", flush=True)


def _run_child(kind: str, argv: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MALLOC_MMAP_THRESHOLD_="65536")
    p = subprocess.run([sys.executable, __file__, "--child", kind, *argv], capture_output=True, text=True, env=env, check=False,
                       cwd=ROOT)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT="):
            return json.loads(line[7:])
    raise RuntimeError(f"child {kind} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", choices=["mixtrain", "hf", "signals", "load"])
    ap.add_argument("--tiny", action="store_true", help="smoke size")
    ap.add_argument("--quick", action="store_true", help="the same as --tiny (bench/gpu_check.sh)")
    ap.add_argument("--model", default=None, help="a pretrained model name or path (default: a tiny random Llama)")
    ap.add_argument("--finetune", choices=["lora", "full"], default="lora", help="with --model (default lora)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--mbs", type=int, default=8)
    ap.add_argument("--ga", type=int, default=2)
    ap.add_argument("--zero", type=int, default=2)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved HF/mixtrain pairs; the median is reported")
    ap.add_argument("--no-csv", action="store_true", help="print only (smoke tests)")
    ap.add_argument("--load", action="store_true", help="with --model: also time the first and a cached load")
    ap.add_argument("--packing", action="store_true",
                    help="mixtrain packs whole examples (data.packing, best-fit decreasing); HF Trainer stays unpacked")
    ap.add_argument("--group-by-length", action="store_true",
                    help="also run HF Trainer with group_by_length=True (its own answer to padding)")
    a = ap.parse_args()
    a.tiny = a.tiny or a.quick
    if a.tiny:
        a.hidden, a.layers, a.seq, a.mbs, a.ga, a.steps, a.warmup, a.rounds = 32, 1, 208, 2, 1, 5, 2, 1
    elif a.model and not a.child:  # the real model: micro-batch 4 x 256 tokens, fewer (slow) steps
        a.mbs, a.seq = 4, 256
        a.steps, a.warmup = min(a.steps, 6), min(a.warmup, 2)
    if a.child:
        {"mixtrain": child_mixtrain, "hf": child_hf, "signals": child_signals, "load": child_load}[a.child](a)
        return
    from _harness import Harness

    argv = [f"--{k}={getattr(a, k)}" for k in ("hidden", "layers", "seq", "mbs", "ga", "zero", "steps", "warmup",
                                                "threads", "finetune")] + (["--packing"] if a.packing else [])
    if a.model:
        argv.append(f"--model={a.model}")
        case = f"{a.model} {a.finetune} seq{a.seq} mbs{a.mbs}x ga{a.ga} ZeRO-{a.zero}"
    else:
        case = f"llama h{a.hidden} L{a.layers} seq{a.seq} mbs{a.mbs}x ga{a.ga} ZeRO-{a.zero}"
    h = Harness("loop")
    # interleaved rounds, median ratio: one pair of runs on a 2-core machine moves by +-10 %
    if a.packing:
        case += " packed"
    runs = []
    grouped = []
    for _ in range(a.rounds):
        hf, mt = _run_child("hf", argv), _run_child("mixtrain", argv)
        runs.append((mt["tokens_per_cpu_s"] / hf["tokens_per_cpu_s"], hf, mt))
        print(f"round {len(runs)}: tokens/CPU-s ratio {runs[-1][0]:.3f}", flush=True)
        if a.group_by_length:
            g = _run_child("hf", [*argv, "--group-by-length"])
            grouped.append((mt["tokens_per_cpu_s"] / g["tokens_per_cpu_s"], g, mt))
            print(f"round {len(runs)}: vs group_by_length {grouped[-1][0]:.3f}", flush=True)
    ratio, hf, mt = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    h.row(case=case, impl="mixtrain", seconds=mt["cpu_step_s"], baseline="HF Trainer+DeepSpeed",
          baseline_seconds=hf["cpu_step_s"], tokens_per_cpu_s=round(mt["tokens_per_cpu_s"]),
          baseline_tokens_per_cpu_s=round(hf["tokens_per_cpu_s"]), tokens_per_s_ratio=round(ratio, 3),
          ratios_all_rounds=" ".join(f"{r[0]:.3f}" for r in runs),
          wall_ms=round(mt["wall_step_s"] * 1e3, 1), baseline_wall_ms=round(hf["wall_step_s"] * 1e3, 1),
          peak_mb=round(mt["peak_mb"]), baseline_peak_mb=round(hf["peak_mb"]),
          peak_ratio=round(mt["peak_mb"] / max(hf["peak_mb"], 1e-9), 3),
          peak_ratios_all_rounds=" ".join(f"{r[2]['peak_mb'] / max(r[1]['peak_mb'], 1e-9):.3f}" for r in runs))
    if grouped:
        gratio, g, gm = sorted(grouped, key=lambda r: r[0])[len(grouped) // 2]
        h.row(case=case, impl="mixtrain", seconds=gm["cpu_step_s"], baseline="HF Trainer group_by_length",
              baseline_seconds=g["cpu_step_s"], tokens_per_cpu_s=round(gm["tokens_per_cpu_s"]),
              baseline_tokens_per_cpu_s=round(g["tokens_per_cpu_s"]), tokens_per_s_ratio=round(gratio, 3),
              ratios_all_rounds=" ".join(f"{r[0]:.3f}" for r in grouped),
              peak_mb=round(gm["peak_mb"]), baseline_peak_mb=round(g["peak_mb"]),
              peak_ratio=round(gm["peak_mb"] / max(g["peak_mb"], 1e-9), 3))
    if a.model:
        if a.load:
            ld = _run_child("load", argv)
            h.row(case=f"{a.model} load", impl="first use (dequantise + cache)", seconds=ld["first_s"],
                  baseline="cached load (safetensors + tokenizer)", baseline_seconds=ld["cached_s"])
        print(h.table()) if a.no_csv else h.finish()
        return
    sig = _run_child("signals", argv)
    h.row(case=case, impl="step with per-domain signals", seconds=sig["groups"], baseline="same step, no groups",
          baseline_seconds=sig["nogroups"],
          signal_overhead_pct=round(100 * (sig["groups"] - sig["nogroups"]) / sig["nogroups"], 2))
    if a.no_csv:
        print(h.table())
    else:
        h.finish()


if __name__ == "__main__":
    main()
