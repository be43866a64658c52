"""HF Trainer with ``mixkernels.hf.apply`` vs without: peak memory and training tokens per CPU-second.

Each variant runs in a fresh child process: SmolLM2-135M-Instruct (``mixtrain.models``; vocabulary
49152, tied embeddings) with LoRA (r = 16 on every attention and MLP linear, the base frozen),
``transformers.Trainer`` with micro-batch 4 x 256 tokens, AdamW, fp32 on CPU. Only the
``mixkernels.hf.apply(model)`` call differs: the fused loss never builds the [4 x 256, 49152]
logits (nor their gradient).

Time: process CPU seconds (user + system, all threads) of the steps after ``--warmup``, so start-up
and model load are excluded; on a shared machine wall time mostly measures the neighbours. Memory:
growth of the child's peak RSS (``VmHWM`` reset just before ``trainer.train()``, with
``MALLOC_MMAP_THRESHOLD_=65536``) over the whole training run. Ratios: apply / plain for memory
(< 1 is less), plain / apply for CPU time per token (> 1 is faster).

    python bench/bench_hf_trainer.py                 # SmolLM2-135M + LoRA, 6 steps (2 warm-up)
    python bench/bench_hf_trainer.py --tiny --no-csv # smoke size: a tiny random Llama, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _model(tiny: bool):
    import transformers

    if tiny:
        cfg = transformers.LlamaConfig(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                       tie_word_embeddings=True)
        import torch

        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(cfg)
    from mixtrain.models import prepare_model

    return transformers.AutoModelForCausalLM.from_pretrained(prepare_model("smollm2-135m-instruct"),
                                                             dtype="float32")


def child(a: argparse.Namespace) -> None:
    import peft
    import torch
    import transformers
    from _harness import _reset_peak_rss, current_rss_mb, peak_rss_mb

    import mixkernels.hf

    torch.set_num_threads(a.threads)
    model = _model(a.tiny)
    model = peft.get_peft_model(model, peft.LoraConfig(**LORA))
    if a.child == "apply":
        mixkernels.hf.apply(model)
    vocab = model.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in
            torch.randint(0, vocab, (a.batch * a.steps, a.seq), generator=g).tolist()]
    marks: dict[str, float] = {}

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == a.warmup:
                marks["cpu0"], marks["wall0"] = _cpu_seconds(), time.perf_counter()

    args = transformers.TrainingArguments(
        output_dir=a.out, per_device_train_batch_size=a.batch, max_steps=a.steps, learning_rate=1e-4,
        report_to=[], save_strategy="no", logging_steps=a.steps, use_cpu=True, seed=0, dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, callbacks=[Clock()],
                                   data_collator=transformers.default_data_collator)
    before = current_rss_mb() if _reset_peak_rss() else peak_rss_mb()
    trainer.train()
    cpu, wall = _cpu_seconds() - marks["cpu0"], time.perf_counter() - marks["wall0"]
    tokens = (a.steps - a.warmup) * a.batch * a.seq
    loss = [h["loss"] for h in trainer.state.log_history if "loss" in h][-1]
    print("RESULT=" + json.dumps({"peak_mb": peak_rss_mb() - before, "cpu_s": cpu, "wall_s": wall,
                                  "tokens": tokens, "loss": loss}), flush=True)


def run_child(variant: str, a: argparse.Namespace, out: str) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--steps", str(a.steps), "--warmup", str(a.warmup),
           "--batch", str(a.batch), "--seq", str(a.seq), "--threads", str(a.threads), "--out", out]
    if a.tiny:
        cmd.append("--tiny")
    from mixtrain.engine import standalone_env

    env = {**standalone_env(), "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT="):
            return json.loads(line.split("=", 1)[1])
    raise RuntimeError(f"{variant} child failed:\n{proc.stderr[-4000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="smoke size: a tiny random Llama")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-csv", action="store_true")
    p.add_argument("--child", choices=["plain", "apply"], help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    a.steps = a.steps or (4 if a.tiny else 6)
    a.seq = a.seq or (64 if a.tiny else 256)
    if a.warmup >= a.steps:
        p.error(f"--warmup must be < --steps, got {a.warmup} >= {a.steps}")
    if a.child:
        child(a)
        return
    import tempfile

    from _harness import Harness

    with tempfile.TemporaryDirectory() as out:
        plain = run_child("plain", a, out)
        fused = run_child("apply", a, out)
    case = f"{'tiny llama' if a.tiny else 'SmolLM2-135M'} LoRA r16, micro-batch {a.batch}x{a.seq}"
    h = Harness("hf_trainer")
    mem_ratio = fused["peak_mb"] / plain["peak_mb"] if plain["peak_mb"] > 0 else float("nan")
    tput_ratio = plain["cpu_s"] / fused["cpu_s"]
    for name, r in (("trainer", plain), ("trainer+mixkernels.hf.apply", fused)):
        h.row(case=case, impl=name, seconds=r["cpu_s"], peak_mb=r["peak_mb"],
              tokens_per_cpu_s=round(r["tokens"] / r["cpu_s"], 1), wall_s=round(r["wall_s"], 2),
              final_loss=round(r["loss"], 4))
    h.row(case=case, impl="ratio apply/plain", seconds=fused["cpu_s"], baseline="trainer",
          baseline_seconds=plain["cpu_s"], peak_memory_ratio=round(mem_ratio, 3),
          tokens_per_cpu_s_ratio=round(tput_ratio, 3))
    if a.no_csv:
        print(h.table())
    else:
        h.finish()


if __name__ == "__main__":
    main()
