"""A test policy that requests every signal the loop provides and checks the policy context
helpers against independent transformers computations. Results go to PROBE_OUT (JSON)."""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from mixtrain import policies


@policies.register("_probe")
class Probe(policies.MixingPolicy):
    name = "_probe"
    required_signals = frozenset({"train_domain_loss", "dev_domain_loss", "domain_embedding", "example_loss"})

    def __init__(self, update_every: int | None = 2) -> None:
        super().__init__(update_every)
        self.log: list[dict] = []

    def update(self, step, s):
        ctx = self.ctx
        batch = ctx.batches(1, [0, 1, 2])
        ours_loss = ctx.forward_losses(batch)
        ours_hidden = ctx.forward_hidden(batch)
        model = ctx.model
        was = model.training
        model.eval()
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_hidden_states=True)
            logits = out.logits[:, :-1].float()
            tgt = batch["labels"][:, 1:]
            tok = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                    ignore_index=-100, reduction="none").view_as(tgt)
            valid = tgt != -100
            ref_loss = (tok * valid).sum(1) / valid.sum(1)
            ref_hidden = out.hidden_states[-1]
        model.train(was)
        doms, ex = s.example_loss
        self.log.append({
            "step": step,
            "loss_err": float((ours_loss - ref_loss).abs().max()),
            "hidden_err": float((ours_hidden - ref_hidden).abs().max()),
            "emb_shape": list(s.domain_embedding.shape),
            "emb_finite_rows": [bool(np.isfinite(r).all()) for r in s.domain_embedding],
            "n_examples": len(ex),
            "example_domains": np.bincount(doms, minlength=len(s.domain_names)).tolist(),
            "fractions": s.fractions.tolist(),
            "dev": s.dev_domain_loss.tolist(),
            "train": s.train_domain_loss.tolist(),
        })
        with open(os.environ["PROBE_OUT"], "w") as f:
            json.dump(self.log, f)

    def state_dict(self):
        return {"log": self.log}

    def load_state_dict(self, state):
        self.log = state["log"]


@policies.register("_probe_router")
class ProbeRouter(policies.MixingPolicy):
    name = "_probe_router"
    required_signals = frozenset({"router_stats"})
    router_layers = "all"

    def __init__(self, update_every: int | None = 2) -> None:
        super().__init__(update_every)
        self.log: list[dict] = []

    def update(self, step, s):
        ctx = self.ctx
        batch = ctx.batches(0, [0, 1]) | {}
        batch["domain_ids"] = torch.tensor([0, 2])
        ours = ctx.forward_router_stats(batch)  # [L, D, E]
        model = ctx.model
        was = model.training
        model.eval()
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_router_logits=True)
        model.train(was)
        k = model.config.num_experts_per_tok
        ref = np.zeros_like(ours)
        mask = batch["attention_mask"].reshape(-1).bool()
        rows = torch.arange(batch["input_ids"].shape[0]).repeat_interleave(batch["input_ids"].shape[1])
        for li, logits in enumerate(out.router_logits):
            top = logits.float().topk(k, dim=-1).indices[mask]
            dom = batch["domain_ids"][rows[mask]]
            for d, t in zip(dom.repeat_interleave(k).tolist(), top.reshape(-1).tolist()):
                ref[li, d, t] += 1
        self.log.append({
            "step": step,
            "probe_equal": bool(np.array_equal(ours, ref)),
            "shape": list(s.router_stats.shape),
            "per_layer_domain_totals": s.router_stats.sum(-1).tolist(),
            "input_tokens": s.input_tokens.tolist(),
            "top_k": k,
        })
        with open(os.environ["PROBE_OUT"], "w") as f:
            json.dump(self.log, f)
