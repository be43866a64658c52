"""Per-example GradEx objectives f(x; θ) from causal-LM logits.

GradEx (Li, Zhang, Wang, Zhang, EMNLP 2024 Findings; SEEDS.md §3.3) differentiates, per example,
the **mean gold-token log-odds** over the target (label != -100) tokens::

    p_k  = softmax(logits_{k-1})[y_k]                  (HF causal shift)
    p_k <- p_k - 0.01   if p_k > 0.9                    (released clamps, instruction version;
    p_k <- p_k + 0.01   if p_k < 0.001                   shifts, so dp'/dp = 1)
    f(x) = (1/K) Σ_k log(p_k / (1 - p_k))

``nll`` gives ``f(x) = (1/K) Σ_k log p_k`` (the negative mean token NLL), so for both objectives a
higher f is better and the GradEx direction is the *ascent* direction Σ ∇f (see estimate.py).
Shapes: logits [B, T, V] (any float dtype; computed in float32), labels [B, T] int64 (unshifted,
-100 = ignored) -> f [B] float32; rows with no target token get f = 0 and zero gradient.
"""

from __future__ import annotations

import torch

OBJECTIVES = ("log_odds", "nll")
CLAMP_HIGH, CLAMP_LOW, CLAMP_SHIFT = 0.9, 0.001, 0.01


def gold_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p of the gold next token [B, T-1] float32, valid mask [B, T-1] bool)``."""
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"gradex objective: logits must be [B, T, V] and labels [B, T] with the same B, T; got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    target = labels[:, 1:]
    valid = target != -100
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    gold = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return gold, valid


def per_example_objective(logits: torch.Tensor, labels: torch.Tensor, objective: str = "log_odds") -> torch.Tensor:
    """f(x) per example, float32 [B] (differentiable); see the module docstring."""
    if objective not in OBJECTIVES:
        raise ValueError(f"gradex: objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    gold, valid = gold_log_probs(logits, labels)
    if objective == "nll":
        per_tok = gold
    else:
        p = gold.exp()
        # the released code shifts p in place (outputs[outputs > 0.9] -= 0.01 ...): a shift, so the
        # gradient through p is unchanged; torch.where reproduces exactly that
        p = torch.where(p > CLAMP_HIGH, p - CLAMP_SHIFT, p)
        p = torch.where(p < CLAMP_LOW, p + CLAMP_SHIFT, p)
        per_tok = torch.log(p) - torch.log1p(-p)
    per_tok = torch.where(valid, per_tok, torch.zeros_like(per_tok))
    return per_tok.sum(1) / valid.sum(1).clamp_min(1)


def per_example_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token NLL per example, float32 [B] (the loss mixtrain trains on)."""
    return -per_example_objective(logits, labels, "nll")
