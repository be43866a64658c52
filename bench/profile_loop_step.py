"""Where the time of one training step goes: torch profiler tables of one forward + backward of
a pretrained model (+ LoRA) with the fused loss (``mixkernels.hf.causal_lm_loss``) and with HF's
own loss (``model(labels=...)``), same batch.

    python bench/profile_loop_step.py --model smollm2-135m-instruct [--lora] [--batch 4 --seq 128]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LORA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--lora", action="store_true", help="LoRA r=16 on every attention and MLP linear")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, default=12, help="table rows")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import transformers
    from torch.profiler import ProfilerActivity, profile

    from mixkernels.hf import causal_lm_loss
    from mixtrain.models import quiet_progress, resolve_model

    with quiet_progress():
        model = transformers.AutoModelForCausalLM.from_pretrained(resolve_model(a.model), dtype=torch.float32)
    if a.lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=LORA,
                                                           task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (a.batch, a.seq))
    mask = torch.ones_like(ids)

    def step(kind: str) -> None:
        if kind == "hf":
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        else:
            loss = causal_lm_loss(model, ids, mask, ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    for kind in ("mixkernels", "hf"):
        step(kind)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(kind)
        print(f"==== {kind} loss ({a.model}{' + LoRA' if a.lora else ''}, {a.batch} x {a.seq} tokens)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows))


if __name__ == "__main__":
    main()
