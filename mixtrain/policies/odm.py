"""``odm``: Online Data Mixing with EXP3 (Albalak, Pan, Raffel, Wang 2023, "Efficient Online Data
Mixing For Language Model Pre-Training", Algorithm 1; code ``alon-albalak/online-data-mixing``,
``megatron/data/data_sampling_utils.py::Exp3WeightUpdater``).

Each domain is an arm; the reward is the training loss of the domain, read from the free
per-domain loss signal (no extra forward or backward). With K domains, after optimizer step t:

1. for every domain i seen in the step's global batch, with mean token loss Lᵢ and πᵢ the
   probability it was sampled with:
   ``mode: smoothed_mean`` (default, the paper's Algorithm 1): R̂ᵢ ← α R̂ᵢ + (1 − α) Lᵢ / πᵢ
   (``smoothing`` α = 0.9); ``mode: exp3`` (classic EXP3, the released ``Exp3WeightUpdater``):
   R̂ᵢ ← R̂ᵢ + Lᵢ / πᵢ;
2. εₜ = min(1/K, √(ln K / (K·t))) and
   πᵢ = (1 − K εₜ) · exp(εₜ₋₁ R̂ᵢ) / Σⱼ exp(εₜ₋₁ R̂ⱼ) + εₜ   (ε₀ = 1/K), used for step t + 1.

``warmup_steps``: the first steps keep uniform weights and leave the bandit untouched (released
``UpdateScheduler.requires_update``: ``iteration > warmup_steps``).

Formula check against the paper and the public code (``Exp3WeightUpdater``, the version stored at
commit 24cf29e of alon-albalak/online-data-mixing), differences noted:

* ε schedule, the (1 − Kεₜ)·softmax(εₜ₋₁ R̂) + εₜ mixture, ε₀ = 1/K and "update R̂ with the π the
  batch was drawn with, *then* advance ε" are identical in paper, code and here.
* The released code scales the reward first: ``reward = loss / 10`` (so R̂ += L/(10 π)). Here the
  scale is the option ``reward_scale`` (default 1, the paper's Lᵢ/πᵢ; 0.1 reproduces the code).
* The stored ``Exp3WeightUpdater`` accumulates (``mode: exp3``); the paper's Algorithm 1 and the
  repository's ``smoothed_mean`` runs (``--data_sampling_smoothing_factor``, 0.5 in
  ``scripts/train_1B_ema_0.5smoothing.sh``) use the smoothed estimate, our default with α = 0.9.
  The ``smoothed_mean`` updater itself is not in the stored snapshot, so its exact code could not
  be compared line by line.
* The released updater is called once per (single-domain) batch with that domain's loss; with
  mixed batches every domain present in the global batch is updated with its own mean token loss.
  The code renormalises π by Σπ afterwards, which is a no-op (Σπ = 1 exactly in real arithmetic).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from . import register
from ._util import as_vector, check_int, check_nonneg_float, check_prob
from .base import MixingPolicy, sizes_and_names

__all__ = ["ODM", "ODMState", "epsilon", "init_state", "update"]

MODES = ("smoothed_mean", "exp3")


@dataclass
class ODMState:
    """EXP3 state (JSON-serialisable through :func:`dataclasses.asdict`).

    Attributes:
        rewards: R̂ [K] estimated rewards.
        weights: π [K] current sampling probabilities (those the next batch is drawn with).
        eps: ε of the last update (ε₀ = 1/K).
        mode: ``smoothed_mean`` or ``exp3``.
        smoothing: α of ``smoothed_mean``.
        reward_scale: multiplies the loss before it becomes a reward (released code: 0.1).
        warmup_steps: steps ≤ this keep uniform weights and do not touch the bandit.
    """

    rewards: list[float]
    weights: list[float]
    eps: float
    mode: str = "smoothed_mean"
    smoothing: float = 0.9
    reward_scale: float = 1.0
    warmup_steps: int = 0
    updates: int = field(default=0)


def epsilon(k: int, t: int) -> float:
    """εₜ = min(1/K, √(ln K / (K t))) for t ≥ 1."""
    return min(1.0 / k, math.sqrt(math.log(k) / (k * t)))


def init_state(num_domains: int, *, mode: str = "smoothed_mean", smoothing: float = 0.9,
               reward_scale: float = 1.0, warmup_steps: int = 0) -> ODMState:
    """Uniform π, R̂ = 0, ε₀ = 1/K."""
    k = check_int("num_domains", num_domains)
    if mode not in MODES:
        raise ValueError(f"mode: got {mode!r}, expected one of {', '.join(MODES)}")
    return ODMState([0.0] * k, [1.0 / k] * k, 1.0 / k, mode, check_prob("smoothing", smoothing),
                    check_nonneg_float("reward_scale", reward_scale), check_int("warmup_steps", warmup_steps, 0))


def update(state: ODMState, domain_loss: Any, seen_mask: Any, step: int) -> tuple[ODMState, torch.Tensor]:
    """One ODM/EXP3 update after optimizer step ``step`` (see module docstring).

    Args:
        state: current :class:`ODMState` (not modified; a new one is returned).
        domain_loss: ``[K]`` mean token loss per domain in the step (NaN allowed where unseen).
        seen_mask: ``[K]`` booleans: domain appeared in the step's global batch.
        step: t ≥ 1, optimizer steps completed.

    Returns:
        ``(new_state, weights)`` with ``weights`` the ``[K]`` float64 π for the next step.

    Raises:
        ValueError: wrong lengths, a seen domain with a non-finite or negative loss, step < 1.
    """
    k = len(state.weights)
    step = check_int("step", step)
    loss = as_vector("domain_loss", domain_loss, k, allow_nan=True)
    seen = torch.as_tensor(np.asarray(seen_mask, dtype=bool).reshape(-1))
    if seen.shape[0] != k:
        raise ValueError(f"seen_mask: got {seen.shape[0]} values, expected {k} (one per domain)")
    bad = [i for i in range(k) if bool(seen[i]) and not (math.isfinite(float(loss[i])) and float(loss[i]) >= 0)]
    if bad:
        raise ValueError(
            f"domain_loss: entry {bad[0]} is {float(loss[bad[0]])} for a seen domain, expected a finite loss >= 0"
        )
    if step <= state.warmup_steps:
        return state, torch.full((k,), 1.0 / k, dtype=torch.float64)
    r = torch.tensor(state.rewards, dtype=torch.float64)
    pi = torch.tensor(state.weights, dtype=torch.float64)
    est = torch.where(seen, state.reward_scale * torch.nan_to_num(loss) / pi, torch.zeros_like(r))
    if state.mode == "exp3":
        r = torch.where(seen, r + est, r)
    else:
        a = state.smoothing
        r = torch.where(seen, a * r + (1.0 - a) * est, r)
    eps_prev = state.eps
    eps = epsilon(k, step)
    new_pi = (1.0 - k * eps) * torch.softmax(eps_prev * r, 0) + eps
    new = ODMState(r.tolist(), new_pi.tolist(), eps, state.mode, state.smoothing, state.reward_scale,
                   state.warmup_steps, state.updates + 1)
    return new, new_pi


@register("odm")
class ODM(MixingPolicy):
    """Online Data Mixing (EXP3 on the training loss); see the module docstring.

    Args:
        mode: ``smoothed_mean`` (default) or ``exp3``.
        smoothing: α (default 0.9).
        reward_scale: loss multiplier (1 = paper; 0.1 = released code).
        warmup_steps: uniform steps before the bandit starts.
        update_every: steps between updates (default 1, as in the paper).
    """

    name = "odm"
    required_signals = frozenset({"train_domain_loss"})

    def __init__(self, mode: str = "smoothed_mean", smoothing: float = 0.9, reward_scale: float = 1.0,
                 warmup_steps: int = 0, update_every: int | None = 1) -> None:
        super().__init__(update_every)
        if mode not in MODES:
            raise ValueError(f"mode: got {mode!r}, expected one of {', '.join(MODES)}")
        self.mode = mode
        self.smoothing = check_prob("smoothing", smoothing)
        self.reward_scale = check_nonneg_float("reward_scale", reward_scale)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 0)
        self.state: ODMState | None = None

    def initial_weights(self, domain_sizes: Mapping[str, int] | Sequence[int]) -> np.ndarray:
        sizes, _ = sizes_and_names(domain_sizes)
        if self.state is None:
            self.state = init_state(len(sizes), mode=self.mode, smoothing=self.smoothing,
                                    reward_scale=self.reward_scale, warmup_steps=self.warmup_steps)
        return np.asarray(self.state.weights, dtype=np.float64)

    def update(self, step: int, signals: Any) -> np.ndarray | None:
        assert self.state is not None, "initial_weights() must run before update()"
        self.state, w = update(self.state, signals.train_domain_loss, signals.train_token_count > 0, step)
        return w.numpy()

    def state_dict(self) -> dict[str, Any]:
        return {} if self.state is None else asdict(self.state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.state = ODMState(**state)

    def describe(self) -> str:
        return f"odm({self.mode}, α={self.smoothing}, reward_scale={self.reward_scale}, warmup={self.warmup_steps})"
