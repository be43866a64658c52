"""``doremi``: DoReMi domain reweighting, online form (Xie et al., NeurIPS 2023, Algorithm 1).

DoReMi trains a small proxy with Group DRO against a reference model and hands the *average*
domain weights to the final run. Here the model being trained plays the proxy and the update runs
online from the free per-domain training loss:

* reference losses ℓᵢ^ref: mean token loss per domain of a reference model on a fixed pool of
  training rows (``ref_pool_size`` per domain, drawn once from the run seed); the reference is a
  checkpoint (``reference: <HF model dir>``) or, by default, the starting model measured before
  the first step (``reference: start``). ``ref_losses`` gives them directly instead.
* every ``update_every`` steps, with ℓᵢ the per-token-averaged training loss of domain i over the
  interval: λᵢ = max(ℓᵢ − ℓᵢ^ref, 0); log w ← log w + η λ; w ← (1 − c) w / Σ w + c/|D|.
  A domain with no token in the interval (ℓᵢ = NaN: not sampled) gets λᵢ = 0.
* ``average_weights.json`` (the step-weighted mean of the weights used over the run) is written
  at the end: the weights DoReMi proposes for the final run.

Differences from the paper's proxy training: the proxy's loss is not reweighted by w (our loop
samples by w instead, as in ODM/DoGE-style online variants), and the excess loss is the
interval's per-domain token average rather than the per-example max(ℓ_θ − ℓ_ref, 0) of the
current batch.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import register
from ._util import as_vector, as_weights, check_int, check_nonneg_float, check_prob, choice, policy_rng
from .base import MixingPolicy, PolicyContext, sizes_and_names

__all__ = ["DoReMi", "update_weights"]

log = logging.getLogger("mixtrain")


def update_weights(
    prev_weights: Any,
    domain_loss: Any,
    ref_loss: Any,
    *,
    eta: float = 1.0,
    c: float = 1e-3,
) -> torch.Tensor:
    """One DoReMi step: λ = max(ℓ − ℓ^ref, 0); log w ← log w + η λ; w ← (1 − c) w/Σw + c/|D|.

    Args:
        prev_weights: ``[D]`` current weights (≥ 0, positive sum).
        domain_loss: ``[D]`` per-token-averaged loss per domain; NaN marks a domain without tokens
            (its excess is 0, so its weight only moves through the normalisation).
        ref_loss: ``[D]`` reference losses (finite).
        eta: step size η ≥ 0; c: smoothing in [0, 1].

    Returns:
        ``[D]`` float64 weights summing to 1.
    """
    eta = check_nonneg_float("eta", eta)
    c = check_prob("c", c)
    loss = as_vector("domain_loss", domain_loss, allow_nan=True)
    d = loss.shape[0]
    ref = as_vector("ref_loss", ref_loss, d)
    w = as_weights("prev_weights", prev_weights, d)
    excess = torch.clamp(loss - ref, min=0.0)
    excess = torch.where(torch.isnan(loss), torch.zeros_like(excess), excess)
    logw = torch.log(w) + eta * excess
    a = torch.softmax(logw, 0)  # = exp(log w) / Σ exp(log w), computed stably
    new = (1.0 - c) * a + c / d
    return new / new.sum()


@register("doremi")
class DoReMi(MixingPolicy):
    """Online DoReMi (see module docstring).

    Args:
        eta: η (default 1). c: uniform smoothing (default 1e-3).
        reference: ``"start"`` (the starting model) or a local HF checkpoint directory.
        ref_losses: reference losses given directly (list in domain order or ``{domain: loss}``);
            overrides ``reference``.
        ref_pool_size: training rows per domain measured for the reference (default 64).
        ref_batch_size: rows per forward when measuring.
        update_every: steps between updates (default 1: every step, as in DoReMi).
    """

    name = "doremi"
    required_signals = frozenset({"train_domain_loss"})

    def __init__(
        self,
        eta: float = 1.0,
        c: float = 1e-3,
        reference: str = "start",
        ref_losses: Sequence[float] | Mapping[str, float] | None = None,
        ref_pool_size: int = 64,
        ref_batch_size: int = 8,
        update_every: int | None = 1,
    ) -> None:
        super().__init__(update_every)
        self.eta = check_nonneg_float("eta", eta)
        self.c = check_prob("c", c)
        if not isinstance(reference, str) or not reference:
            raise ValueError(f"reference: got {reference!r}, expected 'start' or a checkpoint directory")
        if reference != "start" and ref_losses is None and not Path(reference).is_dir():
            raise ValueError(f"reference: {reference!r} is neither 'start' nor an existing checkpoint directory")
        self.reference = reference
        self.ref_losses_raw = ref_losses
        self.ref_pool_size = check_int("ref_pool_size", ref_pool_size)
        self.ref_batch_size = check_int("ref_batch_size", ref_batch_size)
        self.ref_loss: np.ndarray | None = None
        self.weights: np.ndarray | None = None
        self.weight_sum: np.ndarray | None = None
        self.weight_steps = 0
        self.last_step = 0

    def setup(self, ctx: PolicyContext) -> None:
        super().setup(ctx)
        names = list(ctx.domain_names)
        if self.ref_losses_raw is not None:
            raw = self.ref_losses_raw
            if isinstance(raw, Mapping):
                missing = [n for n in names if n not in raw]
                if missing:
                    raise ValueError(f"ref_losses: missing domain(s) {missing}; domains: {names}")
                vals = [float(raw[n]) for n in names]
            else:
                vals = list(raw)
            self.ref_loss = as_vector("ref_losses", vals, len(names)).numpy()
        elif ctx.model is not None:
            self.ref_loss = self._measure_reference(ctx)
            log.info("doremi: reference losses (%s): %s", self.reference,
                     ", ".join(f"{n}={v:.4f}" for n, v in zip(names, self.ref_loss)))

    def _measure_reference(self, ctx: PolicyContext) -> np.ndarray:
        if ctx.batches is None or ctx.forward_losses is None:
            raise RuntimeError("doremi: the policy context lacks batches/forward_losses to measure reference losses")
        model_swap = None
        if self.reference != "start":
            model_swap = _load_reference(self.reference, ctx)
        losses = []
        try:
            for di, n in enumerate(ctx.domain_sizes):
                idx = choice(policy_rng(ctx.seed, 0xD0E, di), n, self.ref_pool_size, replace=False)
                tot, cnt = 0.0, 0
                for b in range(0, len(idx), self.ref_batch_size):
                    batch = ctx.batches(di, idx[b:b + self.ref_batch_size])
                    valid = (batch["labels"][:, 1:] != -100).sum(1).to(torch.float64).cpu()
                    if model_swap is None:
                        per = ctx.forward_losses(batch).to(torch.float64).cpu()
                    else:
                        per = model_swap(batch)
                    tot += float((per * valid).sum())
                    cnt += int(valid.sum())
                if cnt == 0:
                    raise ValueError(f"doremi: domain {ctx.domain_names[di]!r} has no trainable token in its reference pool")
                losses.append(tot / cnt)
        finally:
            model_swap = None
        return np.asarray(losses, dtype=np.float64)

    def initial_weights(self, domain_sizes: Mapping[str, int] | Sequence[int]) -> np.ndarray:
        sizes, _ = sizes_and_names(domain_sizes)
        if self.weights is None:
            self.weights = np.full(len(sizes), 1.0 / len(sizes))
            self.weight_sum = np.zeros(len(sizes))
        return self.weights.copy()

    def update(self, step: int, signals: Any) -> np.ndarray | None:
        if self.ref_loss is None:
            raise RuntimeError("doremi: no reference losses (setup(ctx) with a model, or ref_losses=...)")
        assert self.weights is not None and self.weight_sum is not None
        self.weight_sum = self.weight_sum + self.weights * (step - self.last_step)
        self.weight_steps += step - self.last_step
        self.last_step = step
        new = update_weights(self.weights, signals.train_domain_loss, self.ref_loss, eta=self.eta, c=self.c)
        self.weights = new.numpy()
        return self.weights.copy()

    def average_weights(self, step: int) -> np.ndarray:
        """Step-weighted mean of the weights used in steps 1..``step``."""
        assert self.weights is not None and self.weight_sum is not None
        tail = max(0, step - self.last_step)
        total = self.weight_sum + self.weights * tail
        n = self.weight_steps + tail
        return total / n if n else self.weights.copy()

    def on_train_end(self, output_dir: Any, step: int) -> None:
        if self.weights is None or self.ctx is None:
            return
        avg = self.average_weights(step)
        out = {"domains": list(self.ctx.domain_names), "average_weights": dict(zip(self.ctx.domain_names, avg.tolist())),
               "final_weights": dict(zip(self.ctx.domain_names, self.weights.tolist())), "steps": step,
               "ref_loss": dict(zip(self.ctx.domain_names, self.ref_loss.tolist())) if self.ref_loss is not None else None}
        Path(output_dir, "average_weights.json").write_text(json.dumps(out, indent=2) + "\n")

    def state_dict(self) -> dict[str, Any]:
        return {
            "weights": None if self.weights is None else self.weights.tolist(),
            "weight_sum": None if self.weight_sum is None else self.weight_sum.tolist(),
            "weight_steps": self.weight_steps,
            "last_step": self.last_step,
            "ref_loss": None if self.ref_loss is None else self.ref_loss.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def arr(k: str) -> np.ndarray | None:
            return None if state.get(k) is None else np.asarray(state[k], dtype=np.float64)

        self.weights, self.weight_sum = arr("weights"), arr("weight_sum")
        self.weight_steps, self.last_step = int(state["weight_steps"]), int(state["last_step"])
        if state.get("ref_loss") is not None:
            self.ref_loss = arr("ref_loss")

    def describe(self) -> str:
        return f"doremi(η={self.eta}, c={self.c}, reference={self.reference})"


def _load_reference(path: str, ctx: PolicyContext) -> Any:
    """A per-example-loss function of a reference HF checkpoint (eval mode, no grad)."""
    import transformers

    from ..models import resolve_model

    try:
        ref = transformers.AutoModelForCausalLM.from_pretrained(resolve_model(path), local_files_only=True,
                                                                 dtype=torch.float32)
    except Exception as e:
        raise ValueError(f"reference: cannot load checkpoint {path!r}: {e}") from e
    ref.eval()

    @torch.no_grad()
    def per_example(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids = batch["input_ids"].cpu()
        out = ref(input_ids=ids, attention_mask=batch["attention_mask"].cpu(), use_cache=False)
        logits = out.logits[:, :-1].float()
        tgt = batch["labels"][:, 1:].cpu()
        tok = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                ignore_index=-100, reduction="none").view_as(tgt)
        valid = tgt != -100
        return ((tok * valid).sum(1) / valid.sum(1).clamp_min(1)).to(torch.float64)

    return per_example
