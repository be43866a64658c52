"""Two-rank worker for tests/test_hf_apply_dist.py (run under torch.distributed.run, gloo, CPU).

    python -m torch.distributed.run --nproc_per_node 2 -m tests._hf_apply_dist_worker {zero3,fsdp2} OUT_DIR

Trains a tiny Llama (tied embeddings: the head weight is shared with the embedding) for 3 SGD
steps, each rank on its own rows, three times: with the model's own loss (plain), the ``apply``'d
model, and ``causal_lm_loss``; rank 0 writes the per-step losses (averaged over ranks) and the full final
parameters to OUT_DIR/<framework>-<mode>.pt (tensors only; read with weights_only=True).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

import mixkernels.hf as mkhf

STEPS = 3
VOCAB = 67


def tiny_model() -> torch.nn.Module:
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def batch(step: int, rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    ids = torch.randint(0, VOCAB, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6 + rank:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :3] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_of(model: torch.nn.Module, mode: str, data: dict[str, torch.Tensor]) -> torch.Tensor:
    if mode == "causal_lm_loss":
        return mkhf.causal_lm_loss(model, data["input_ids"], data["attention_mask"], data["labels"]).loss
    out = model(**data)
    assert (out.logits is None) == (mode == "apply"), "apply must drop the logits, plain must keep them"
    return out.loss


def run_zero3(mode: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    import deepspeed

    model = tiny_model()
    if mode == "apply":
        mkhf.apply(model)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "optimizer": {"type": "SGD", "params": {"lr": 0.5}}, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    head = engine.module.get_output_embeddings().weight
    assert head.numel() == 0 and hasattr(head, "ds_id"), "the head weight must be partitioned by ZeRO-3"
    losses = []
    for step in range(STEPS):
        loss = loss_of(engine.module if mode == "causal_lm_loss" else engine, mode, batch(step, dist.get_rank()))
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())
    params = {}
    for name, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            params[name] = p.detach().clone()
    return losses, params


def run_fsdp2(mode: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    from torch.distributed.fsdp import fully_shard

    model = tiny_model()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    if mode == "apply":
        mkhf.apply(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for step in range(STEPS):
        loss = loss_of(model, mode, batch(step, dist.get_rank()))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    params = {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}
    return losses, params


def main() -> None:
    framework, out_dir = sys.argv[1:3]
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    for mode in ("plain", "apply", "causal_lm_loss"):
        losses, params = (run_zero3 if framework == "zero3" else run_fsdp2)(mode)
        mean_losses = []
        for loss in losses:
            t = loss.clone()
            dist.all_reduce(t)
            mean_losses.append(t / dist.get_world_size())
        if dist.get_rank() == 0:
            path = os.path.join(out_dir, f"{framework}-{mode}.pt")
            torch.save({"losses": torch.stack(mean_losses), **{f"param/{k}": v for k, v in params.items()}},
                       path + ".tmp")
            os.replace(path + ".tmp", path)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
