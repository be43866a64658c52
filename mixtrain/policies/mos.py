"""``mos``: Mixture-of-Skills and MoSpec (Wu et al., EMNLP 2024; released code
``minghao-wu/mixture_of_skills``, ``utils.py::DynaTrainer``).

Rules, as released (SEEDS §1):

* Prior: qᵢ = nᵢ / Σ n, p⁰ᵢ ∝ qᵢ^(1/τ) (``temperature`` τ; ``inf`` → uniform, the default).
* Scorer ψ: ``scorer: logits`` (released ``BaseActor``: a free logit vector w, initialised to
  ones, p = softmax(w)) or ``scorer: mlp`` (the paper's 2-layer perceptron over a constant ones
  input). Pre-fitted with Adam (lr 1e-4) on MSE(softmax, p⁰) — a step is taken, then the loss
  checked, until MSE < 1e-10 (for a uniform prior: one no-op step). **The same Adam optimiser
  persists** for every later update (its moments and step count carry over).
* Every ``update_every`` optimizer steps (default 100), in eval mode without gradients, on
  **training** rows (no dev set), rewards Rᵢ:

  - ``reward: cossim``: m = ``cossim_examples`` (64) rows per domain drawn with replacement, each
    run alone (batch of one, so no padding); its embedding is the mean over **all** its tokens of
    the last hidden state (after the final norm); embeddings containing NaN are skipped;
    zᵢ = mean embedding; Rᵢ = (1/N) Σⱼ cos(zᵢ, zⱼ) **including j = i**.
  - ``reward: diff``: ``diff_examples`` (16) rows per domain drawn with replacement from a fixed
    pool (``diff_pool_size`` = 256 per domain, drawn once from the run seed) whose starting-model
    perplexities PPL_θ₀ were computed once before training; Rᵢ = mean PPL_θ(x) / PPL_θ₀(x) with
    PPL = exp(mean token NLL over the **whole sequence**, prompt included, pads excluded).
  - MoSpec (``specialist: <domain>``): cossim Rᵢ = cos(zᵢ, z_s); diff R_s doubled.
* EMA (``use_ema``, default on): r̄ ← α R + (1 − α) r̄ with r̄ initialised to 1 and α = ``ema_alpha``
  = 0.9 weighting the **new** reward; R ← r̄.
* Scorer update: ``scorer_steps`` (200) steps of the persistent Adam on J(ψ) = −Σᵢ Rᵢ log pψ(i);
  new weights = pψ. For the logit scorer J's unique minimiser is p = R/ΣR, approached at ≤ ~lr
  per logit per Adam step.

:meth:`MixtureOfSkills.apply_rewards` runs the EMA + scorer update on given rewards, so the rule
is testable without a model.

Deviations, each an option (defaults reproduce the release):

* ``per_rank_rng: true``: each rank draws its own reward examples and the statistics are
  averaged over ranks (the release seeds Python's ``random`` identically on every rank, so all
  ranks draw the same examples; with the default every rank computes the same rewards).
* ``response_only_ppl: true``: perplexity over response tokens only (paper Eq. 9) instead of the
  whole sequence (code).
* ``update_rule: reinforce``: one plain REINFORCE step ψ ← ψ + γ Σᵢ Rᵢ ∇ψ log pψ(i) with
  γ = ``reinforce_lr`` (paper Eq. 6 / Algorithm 1 line 11) instead of 200 Adam steps.

The scorer runs in float64 (the release uses float32) so its state round-trips through JSON
checkpoints bit-exactly.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from . import register
from ._util import (
    as_vector,
    check_int,
    check_prob,
    choice,
    names_index,
    policy_rng,
    tensor_from_json,
    tensor_to_json,
)
from .base import MixingPolicy, PolicyContext, check_positive_finite, sizes_and_names

__all__ = ["MixtureOfSkills", "Scorer", "temperature_prior"]

log = logging.getLogger("mixtrain")

_POOL, _COS, _DIFF = 0x5001, 0x5002, 0x5003


def temperature_prior(sizes: Sequence[int], temperature: float) -> np.ndarray:
    """p⁰ᵢ ∝ (nᵢ/Σn)^(1/τ); τ = inf → uniform (computed in log space)."""
    n = np.asarray(sizes, dtype=np.float64)
    if n.ndim != 1 or len(n) == 0 or (n <= 0).any():
        raise ValueError(f"domain sizes: got {list(sizes)}, expected positive example counts")
    if math.isinf(temperature):
        return np.full(len(n), 1.0 / len(n))
    logits = np.log(n / n.sum()) / temperature
    p = np.exp(logits - logits.max())
    return p / p.sum()


class Scorer:
    """The data scorer ψ with its persistent Adam optimiser.

    ``kind="logits"``: ψ = w ∈ ℝᴺ (init ones), logits = w.
    ``kind="mlp"``: logits = W₂ tanh(W₁ 1 + b₁) + b₂ (hidden size ``hidden``; nn.Linear-style
    uniform init from ``seed``).
    """

    def __init__(self, n: int, kind: str = "logits", *, lr: float = 1e-4, hidden: int = 64, seed: int = 0) -> None:
        if kind not in ("logits", "mlp"):
            raise ValueError(f"scorer: got {kind!r}, expected 'logits' or 'mlp'")
        self.n, self.kind, self.lr, self.hidden = n, kind, lr, hidden
        if kind == "logits":
            self.params = [torch.ones(n, dtype=torch.float64, requires_grad=True)]
        else:
            g = torch.Generator().manual_seed(int(seed) & (2**63 - 1))

            def uni(shape: tuple[int, ...], fan_in: int) -> torch.Tensor:
                b = 1.0 / math.sqrt(fan_in)
                return ((torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * b).requires_grad_(True)

            self.params = [uni((hidden, n), n), uni((hidden,), n), uni((n, hidden), hidden), uni((n,), hidden)]
        self.opt = torch.optim.Adam(self.params, lr=lr)
        self.feature = torch.ones(n, dtype=torch.float64)

    def logits(self) -> torch.Tensor:
        """ψ's logits [N] (differentiable)."""
        if self.kind == "logits":
            return self.params[0] * self.feature
        w1, b1, w2, b2 = self.params
        return w2 @ torch.tanh(w1 @ self.feature + b1) + b2

    def probs(self) -> torch.Tensor:
        """pψ = softmax(logits), detached float64 [N]."""
        with torch.no_grad():
            return torch.softmax(self.logits(), 0)

    def _adam_step(self, loss_fn: Any) -> float:
        self.opt.zero_grad(set_to_none=False)
        loss = loss_fn()
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def fit(self, target: torch.Tensor, tol: float = 1e-10, max_steps: int = 1_000_000) -> int:
        """Adam on MSE(softmax(logits), target) until MSE < ``tol`` (step, then check, as
        released). Returns the number of steps taken."""
        steps = 0
        while True:
            mse = self._adam_step(lambda: torch.mean((torch.softmax(self.logits(), 0) - target) ** 2))
            steps += 1
            if mse < tol:
                return steps
            if steps >= max_steps:
                log.warning("mos: scorer pre-fit stopped after %d steps at MSE %.3g (tolerance %.3g)", steps, mse, tol)
                return steps

    def policy_gradient_adam(self, rewards: torch.Tensor, steps: int) -> None:
        """``steps`` Adam steps on J = −Σ Rᵢ log softmax(logits)ᵢ."""
        for _ in range(steps):
            self._adam_step(lambda: -(rewards * torch.log_softmax(self.logits(), 0)).sum())

    def reinforce(self, rewards: torch.Tensor, lr: float) -> None:
        """One plain gradient-ascent step ψ ← ψ + lr Σ Rᵢ ∇ log pψ(i) (optimiser untouched)."""
        for p in self.params:
            p.grad = None
        obj = (rewards * torch.log_softmax(self.logits(), 0)).sum()
        grads = torch.autograd.grad(obj, self.params)
        with torch.no_grad():
            for p, g in zip(self.params, grads):
                p.add_(g, alpha=lr)

    def state_dict(self) -> dict[str, Any]:
        """Exact JSON state: parameters and the Adam moments / step counts."""
        opt_state = []
        for p in self.params:
            st = self.opt.state.get(p, {})
            opt_state.append({k: tensor_to_json(v) if torch.is_tensor(v) else v for k, v in st.items()})
        return {"kind": self.kind, "params": [tensor_to_json(p.detach()) for p in self.params], "adam": opt_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (same kind and sizes)."""
        if state["kind"] != self.kind or len(state["params"]) != len(self.params):
            raise ValueError(f"mos: checkpoint scorer is {state['kind']!r}, this run's is {self.kind!r}")
        with torch.no_grad():
            for p, s in zip(self.params, state["params"]):
                p.copy_(tensor_from_json(s))
        self.opt = torch.optim.Adam(self.params, lr=self.lr)
        for p, st in zip(self.params, state["adam"]):
            if st:
                self.opt.state[p] = {k: tensor_from_json(v) if isinstance(v, dict) else v for k, v in st.items()}


@register("mos")
class MixtureOfSkills(MixingPolicy):
    """Mixture-of-Skills / MoSpec (see the module docstring for the rules).

    Args:
        temperature: τ of the prior (``"inf"`` → uniform).
        reward: ``cossim`` or ``diff``.
        use_ema, ema_alpha: EMA of the rewards (init 1, α on the new reward).
        scorer: ``logits`` (released) or ``mlp`` (paper); ``mlp_hidden``: its hidden size.
        scorer_lr: Adam learning rate (1e-4). scorer_steps: Adam steps per update (200).
        fit_tol, fit_max_steps: pre-fit stopping rule (MSE < 1e-10).
        cossim_examples: rows per domain for cossim (64).
        diff_examples: rows per domain for diff (16). diff_pool_size: fixed pool (256).
        ppl_batch_size: rows per forward when computing perplexities.
        specialist: MoSpec target domain (``None`` = MoS).
        per_rank_rng, response_only_ppl, update_rule, reinforce_lr: deviations (module docstring).
        update_every: optimizer steps between updates (100).
    """

    name = "mos"
    required_signals = frozenset()

    def __init__(
        self,
        temperature: float | str = "inf",
        reward: str = "cossim",
        use_ema: bool = True,
        ema_alpha: float = 0.9,
        scorer: str = "logits",
        mlp_hidden: int = 64,
        scorer_lr: float = 1e-4,
        scorer_steps: int = 200,
        fit_tol: float = 1e-10,
        fit_max_steps: int = 1_000_000,
        cossim_examples: int = 64,
        diff_examples: int = 16,
        diff_pool_size: int = 256,
        ppl_batch_size: int = 8,
        specialist: str | None = None,
        per_rank_rng: bool = False,
        response_only_ppl: bool = False,
        update_rule: str = "adam",
        reinforce_lr: float = 1e-4,
        update_every: int | None = 100,
    ) -> None:
        super().__init__(update_every)
        self.temperature = check_positive_finite("temperature", temperature, allow_inf=True)
        if reward not in ("cossim", "diff"):
            raise ValueError(f"reward: got {reward!r}, expected 'cossim' or 'diff'")
        if scorer not in ("logits", "mlp"):
            raise ValueError(f"scorer: got {scorer!r}, expected 'logits' or 'mlp'")
        if update_rule not in ("adam", "reinforce"):
            raise ValueError(f"update_rule: got {update_rule!r}, expected 'adam' or 'reinforce'")
        self.reward, self.use_ema, self.scorer_kind, self.update_rule = reward, bool(use_ema), scorer, update_rule
        self.ema_alpha = check_prob("ema_alpha", ema_alpha)
        self.mlp_hidden = check_int("mlp_hidden", mlp_hidden)
        self.scorer_lr = check_positive_finite("scorer_lr", scorer_lr)
        self.scorer_steps = check_int("scorer_steps", scorer_steps)
        self.fit_tol = check_positive_finite("fit_tol", fit_tol)
        self.fit_max_steps = check_int("fit_max_steps", fit_max_steps)
        self.cossim_examples = check_int("cossim_examples", cossim_examples)
        self.diff_examples = check_int("diff_examples", diff_examples)
        self.diff_pool_size = check_int("diff_pool_size", diff_pool_size)
        self.ppl_batch_size = check_int("ppl_batch_size", ppl_batch_size)
        self.specialist = specialist
        self.per_rank_rng = bool(per_rank_rng)
        self.response_only_ppl = bool(response_only_ppl)
        self.reinforce_lr = check_positive_finite("reinforce_lr", reinforce_lr)
        self.seed = 0
        self.names: list[str] = []
        self.scorer: Scorer | None = None
        self.rbar: torch.Tensor | None = None
        self.pool: list[list[int]] | None = None
        self.pool_ppl: list[list[float]] | None = None
        self.last_rewards: list[float] | None = None
        self.fit_steps = 0

    # -- set-up ---------------------------------------------------------------------------------
    def setup(self, ctx: PolicyContext) -> None:
        super().setup(ctx)
        self.seed = int(ctx.seed)
        self.names = list(ctx.domain_names)
        self._specialist_index()
        if self.reward == "diff" and ctx.model is not None:
            self._build_pool(ctx)

    def _specialist_index(self) -> int | None:
        if self.specialist is None:
            return None
        return names_index(self.names, self.specialist, "specialist")

    def _build_pool(self, ctx: PolicyContext) -> None:
        """Fixed per-domain pools and their starting-model perplexities (computed once)."""
        self.pool, self.pool_ppl = [], []
        for di, n in enumerate(ctx.domain_sizes):
            idx = choice(policy_rng(self.seed, _POOL, di), n, self.diff_pool_size, replace=False)
            self.pool.append(idx)
            self.pool_ppl.append(self._ppl(di, idx).tolist())
        log.info("mos: starting-model perplexities of the diff pools: %s",
                 ", ".join(f"{n}={np.mean(p):.3f}" for n, p in zip(self.names, self.pool_ppl)))

    def _ppl(self, domain: int, rows: Sequence[int]) -> np.ndarray:
        """Per-example PPL = exp(mean token NLL) (whole sequence unless ``response_only_ppl``)."""
        ctx = self.ctx
        assert ctx is not None and ctx.batches is not None and ctx.forward_losses is not None
        out = []
        for b in range(0, len(rows), self.ppl_batch_size):
            batch = dict(ctx.batches(domain, list(rows[b:b + self.ppl_batch_size])))
            if not self.response_only_ppl:
                batch["labels"] = torch.where(batch["attention_mask"].bool(), batch["input_ids"],
                                              torch.full_like(batch["input_ids"], -100))
            valid = (batch["labels"][:, 1:] != -100).sum(1)
            if bool((valid == 0).any()):
                raise ValueError(f"mos: a row of domain {self.names[domain]!r} has no token to score for perplexity")
            out.append(torch.exp(ctx.forward_losses(batch).to(torch.float64)).cpu())
        return torch.cat(out).numpy()

    def initial_weights(self, domain_sizes: Mapping[str, int] | Sequence[int]) -> np.ndarray:
        sizes, names = sizes_and_names(domain_sizes)
        if not self.names:
            self.names = names
            self._specialist_index()
        p0 = temperature_prior(sizes, self.temperature)
        self.scorer = Scorer(len(sizes), self.scorer_kind, lr=self.scorer_lr, hidden=self.mlp_hidden, seed=self.seed)
        self.fit_steps = self.scorer.fit(torch.as_tensor(p0), self.fit_tol, self.fit_max_steps)
        self.rbar = torch.ones(len(sizes), dtype=torch.float64)
        return self.scorer.probs().numpy()

    # -- the rule -------------------------------------------------------------------------------
    def apply_rewards(self, rewards: Any) -> torch.Tensor:
        """EMA (if enabled) + scorer update on ``rewards`` [D]; returns the new weights [D].

        Raises:
            ValueError: wrong length or a non-finite reward (named by index).
        """
        if self.scorer is None or self.rbar is None:
            raise RuntimeError("mos: initial_weights() must run before apply_rewards()")
        r = as_vector("rewards", rewards, self.scorer.n)
        if self.use_ema:
            self.rbar = self.ema_alpha * r + (1.0 - self.ema_alpha) * self.rbar
            r = self.rbar.clone()
        self.last_rewards = r.tolist()
        if self.update_rule == "adam":
            self.scorer.policy_gradient_adam(r, self.scorer_steps)
        else:
            self.scorer.reinforce(r, self.reinforce_lr)
        return self.scorer.probs()

    # -- rewards from the model -----------------------------------------------------------------
    def _rng(self, kind: int, step: int, domain: int) -> np.random.Generator:
        rank = self.ctx.rank if (self.per_rank_rng and self.ctx is not None) else 0
        return policy_rng(self.seed, kind, step, domain, rank)

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks when every rank drew its own examples; identity otherwise."""
        if self.per_rank_rng and self.ctx is not None and self.ctx.world_size > 1:
            return self.ctx.all_reduce(t)
        return t

    def cossim_rewards(self, step: int) -> torch.Tensor:
        """Rᵢ = mean_j cos(zᵢ, zⱼ) (MoSpec: cos(zᵢ, z_s)) from one-example-at-a-time embeddings."""
        ctx = self.ctx
        assert ctx is not None and ctx.batches is not None and ctx.forward_hidden is not None
        zs = []
        for di, n in enumerate(ctx.domain_sizes):
            idx = choice(self._rng(_COS, step, di), n, self.cossim_examples, replace=True)
            acc: torch.Tensor | None = None
            count = 0
            for i in idx:
                h = ctx.forward_hidden(ctx.batches(di, [i]))
                e = h[0].to(torch.float64).mean(0).cpu()
                if bool(torch.isnan(e).any()):
                    continue
                acc = e if acc is None else acc + e
                count += 1
            hdim = acc.shape[0] if acc is not None else int(h.shape[-1])
            tot = torch.cat([acc if acc is not None else torch.zeros(hdim, dtype=torch.float64),
                             torch.tensor([float(count)], dtype=torch.float64)])
            tot = self._reduce(tot)
            if tot[-1] == 0:
                raise ValueError(f"mos: every embedding of domain {self.names[di]!r} was NaN at step {step}")
            zs.append(tot[:-1] / tot[-1])
        z = torch.stack(zs)
        zn = z / z.norm(dim=1, keepdim=True).clamp_min(1e-300)
        cos = zn @ zn.T
        s = self._specialist_index()
        return cos[:, s].clone() if s is not None else cos.mean(1)

    def diff_rewards(self, step: int) -> torch.Tensor:
        """Rᵢ = mean PPL_θ(x)/PPL_θ₀(x) over ``diff_examples`` draws from the fixed pool
        (MoSpec: the specialist's reward doubled)."""
        ctx = self.ctx
        assert ctx is not None
        if self.pool is None or self.pool_ppl is None:
            raise RuntimeError("mos: reward 'diff' needs the starting-model pool (setup with a model)")
        out = []
        for di in range(len(ctx.domain_sizes)):
            pos = choice(self._rng(_DIFF, step, di), len(self.pool[di]), self.diff_examples, replace=True)
            rows = [self.pool[di][p] for p in pos]
            ppl = self._ppl(di, rows)
            base = np.asarray([self.pool_ppl[di][p] for p in pos])
            tot = self._reduce(torch.tensor([float(np.sum(ppl / base)), float(len(rows))], dtype=torch.float64))
            out.append(tot[0] / tot[1])
        r = torch.stack(out)
        s = self._specialist_index()
        if s is not None:
            r[s] = 2.0 * r[s]
        return r

    def update(self, step: int, signals: Any) -> np.ndarray | None:
        raw = self.cossim_rewards(step) if self.reward == "cossim" else self.diff_rewards(step)
        w = self.apply_rewards(raw)
        log.info("mos step %d: rewards %s -> weights %s", step,
                 ", ".join(f"{n}={v:.4f}" for n, v in zip(self.names, raw.tolist())),
                 ", ".join(f"{n}={v:.4f}" for n, v in zip(self.names, w.tolist())))
        return w.numpy()

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "scorer": None if self.scorer is None else self.scorer.state_dict(),
            "rbar": None if self.rbar is None else self.rbar.tolist(),
            "pool": self.pool,
            "pool_ppl": self.pool_ppl,
            "last_rewards": self.last_rewards,
            "fit_steps": self.fit_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("scorer") is not None:
            if self.scorer is None:
                n = len(state["rbar"])
                self.scorer = Scorer(n, self.scorer_kind, lr=self.scorer_lr, hidden=self.mlp_hidden, seed=self.seed)
            self.scorer.load_state_dict(state["scorer"])
        self.rbar = None if state.get("rbar") is None else torch.tensor(state["rbar"], dtype=torch.float64)
        if state.get("pool") is not None:
            self.pool, self.pool_ppl = state["pool"], state["pool_ppl"]
        self.last_rewards = state.get("last_rewards")
        self.fit_steps = int(state.get("fit_steps", 0))

    def describe(self) -> str:
        spec = f", specialist={self.specialist}" if self.specialist else ""
        return (f"mos(reward={self.reward}, ema={self.use_ema}, τ={self.temperature}, scorer={self.scorer_kind}, "
                f"rule={self.update_rule}{spec})")
