"""``dynamic_moe``: dynamic data mixing from MoE router load (Zhu et al. 2024, NAACL 2025;
released code ``Spico197/MoE-SFT``, ``src/callbacks.py::AdaptiveSamplingCallback``).

Every ``update_every`` optimizer steps (default 100):

1. per domain i, count the top-k expert assignments of the **last** MoE layer (``layers``:
   ``"last"`` | ``"all"`` | list of indices, counts summed over the chosen layers) over a fixed
   dev probe: the same first ``probe_batches`` dev batches (of ``probe_batch_size`` rows) every
   time, model in eval mode (no router noise), padding excluded (``include_padding: true``
   counts pads, as the released MoLM path does in eval). Counts come from
   ``mixkernels.hf.RouterStatsCollector`` → ``mixkernels.router_stats``.
2. Ô = counts row-normalised; δᵢⱼ = ‖Ôᵢ − Ôⱼ‖₂ (``distance: l2``, the released default) or
   1 − cos(Ôᵢ, Ôⱼ) (``cos``);
3. Δᵢ = (1/|D|) Σⱼ δᵢⱼ over **all** j including i (``criterion: mean``), or min / max over j ≠ i;
4. w ← softmax(log w + η Δ); w ← (1 − c) w + c/|D|; w ← w / Σ w  (η = 10, c = 0.05).

The update is cumulative (multiplicative weights on the previous weights) and mixed toward
uniform every round, so each weight stays ≥ about c/|D|. The domain whose expert usage is
farthest from the others' is up-weighted.

Freezing (applied before the optimizer is built, via :meth:`DynamicMoE.prepare_model`):

* ``freeze_router: true`` freezes only the router parameters (``*TopKRouter`` modules, or legacy
  ``mlp.gate`` / ``block_sparse_moe.gate`` linears with one output per expert);
* ``freeze_gate_faithful: true`` reproduces the released ``--freeze_gate``: every parameter whose
  name contains ``"gate"``, which in most MoE models also hits the experts' gated-MLP
  projections (``gate_proj``, ``gate_up_proj``, Qwen2-MoE's ``shared_expert_gate``).

Differences from the released code, on purpose: a domain whose probe routes no token is an error
(the released code would divide by zero and sample from NaNs); the ``"~l2"`` inverse-hypothesis
ablation is not provided.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from . import register
from ._util import as_matrix, as_weights, check_int, check_nonneg_float, check_prob
from .base import MixingPolicy, PolicyContext, sizes_and_names

__all__ = ["DynamicMoE", "distances", "gate_parameters", "router_parameters", "update_weights"]

log = logging.getLogger("mixtrain")

DISTANCES = ("l2", "cos")
CRITERIA = ("mean", "min", "max")


def distances(expert_counts: Any, distance: str = "l2") -> torch.Tensor:
    """Pairwise distances δ [D, D] between the row-normalised expert histograms.

    Args:
        expert_counts: ``[D, E]`` non-negative counts (one row per domain).
        distance: ``"l2"`` (‖Ôᵢ − Ôⱼ‖₂) or ``"cos"`` (1 − cos(Ôᵢ, Ôⱼ)).

    Raises:
        ValueError: bad shape, negative / non-finite entries, a domain with no routed token, or an
            unknown ``distance``.
    """
    if distance not in DISTANCES:
        raise ValueError(f"distance: got {distance!r}, expected one of {', '.join(DISTANCES)}")
    counts = as_matrix("expert_counts", expert_counts)
    if bool((counts < 0).any()):
        i, j = (int(v) for v in (counts < 0).nonzero()[0])
        raise ValueError(f"expert_counts: entry ({i}, {j}) is {counts[i, j].item()}, expected >= 0")
    rows = counts.sum(1)
    if bool((rows <= 0).any()):
        i = int((rows <= 0).nonzero()[0, 0])
        raise ValueError(
            f"expert_counts: row {i} (domain {i}) sums to 0: no token of that domain was routed in the "
            "probe, so its expert distribution is undefined; give every domain dev data"
        )
    o = counts / rows[:, None]
    if distance == "l2":
        diff = o[:, None, :] - o[None, :, :]
        return diff.pow(2).sum(-1).sqrt()
    unit = o / o.norm(dim=1, keepdim=True)
    return 1.0 - unit @ unit.T


def update_weights(
    prev_weights: Any,
    expert_counts: Any,
    *,
    eta: float = 10.0,
    c: float = 0.05,
    distance: str = "l2",
    criterion: str = "mean",
) -> torch.Tensor:
    """One dynamic-MoE mixing update (Zhu et al., Algorithm 1; released ``_update_weights``).

    ``w ← softmax(log w_prev + η Δ)``, ``w ← (1 − c) w + c/|D|``, ``w ← w / Σ w`` with Δ from
    :func:`distances` and ``criterion`` (``mean`` over all j including i; ``min`` / ``max`` over
    j ≠ i, 0 for a single domain).

    Args:
        prev_weights: ``[D]`` current weights (≥ 0, positive sum; normalised here).
        expert_counts: ``[D, E]`` per-domain top-k expert counts of the chosen layer(s).
        eta: step size η ≥ 0.
        c: uniform smoothing in [0, 1].

    Returns:
        ``[D]`` float64 tensor summing to 1.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion: got {criterion!r}, expected one of {', '.join(CRITERIA)}")
    eta = check_nonneg_float("eta", eta)
    c = check_prob("c", c)
    counts = as_matrix("expert_counts", expert_counts)
    d = counts.shape[0]
    w = as_weights("prev_weights", prev_weights, d)
    delta = distances(counts, distance)
    if criterion == "mean":
        score = delta.mean(1)
    elif d == 1:
        score = torch.zeros(1, dtype=torch.float64)
    else:
        off = ~torch.eye(d, dtype=torch.bool)
        vals = delta[off].view(d, d - 1)
        score = vals.min(1).values if criterion == "min" else vals.max(1).values
    logw = torch.log(w)  # a zero weight is -inf → 0 after the softmax, then c/|D| after smoothing
    alpha = torch.softmax(logw + eta * score, dim=0)
    new = (1.0 - c) * alpha + c / d
    return new / new.sum()


def router_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the router (gating-network) parameters of an MoE model: parameters of modules
    whose class name ends with ``Router`` (transformers 5 ``*TopKRouter``), else of linears
    named ``gate`` under ``mlp`` / ``block_sparse_moe`` / ``moe`` with one output per expert."""
    cfg = getattr(model, "config", None)
    n_exp = None
    for key in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 1:
            n_exp = v
            break
    names: list[str] = []
    for mname, mod in model.named_modules():
        is_router = type(mod).__name__.endswith("Router")
        if not is_router and isinstance(mod, torch.nn.Linear):
            parts = mname.split(".")
            is_router = (
                len(parts) >= 2 and parts[-1] == "gate" and parts[-2] in ("mlp", "block_sparse_moe", "moe")
                and (n_exp is None or mod.out_features == n_exp) and mod.out_features > 1
            )
        if is_router:
            names += [f"{mname}.{p}" if mname else p for p, _ in mod.named_parameters(recurse=True)]
    return sorted(set(names))


def gate_parameters(model: torch.nn.Module) -> list[str]:
    """Every parameter whose name contains ``"gate"`` (the released ``--freeze_gate`` rule)."""
    return [n for n, _ in model.named_parameters() if "gate" in n]


@register("dynamic_moe")
class DynamicMoE(MixingPolicy):
    """Router-load dynamic mixing for MoE models (see the module docstring).

    Args:
        eta, c, distance, criterion: the update rule of :func:`update_weights`.
        layers: ``"last"`` (released), ``"all"`` or a list of MoE layer indices.
        probe_batches: dev batches per domain in the fixed probe (released scripts: 5).
        probe_batch_size: rows per probe batch (released: 4 per device).
        top_k: experts per token; ``None`` reads the model config.
        include_padding: count pad tokens (the released MoLM eval behaviour) instead of
            excluding them.
        freeze_router: freeze only the router parameters.
        freeze_gate_faithful: freeze every parameter whose name contains "gate" (released).
        init_weights: starting weights (list in domain order or ``{domain: w}``); uniform if
            ``None`` (released default).
        update_every: optimizer steps between updates (released LLaMA-MoE: 100).
    """

    name = "dynamic_moe"
    required_signals = frozenset()
    needs_dev = True

    def __init__(
        self,
        eta: float = 10.0,
        c: float = 0.05,
        distance: str = "l2",
        criterion: str = "mean",
        layers: str | list[int] = "last",
        probe_batches: int = 5,
        probe_batch_size: int = 4,
        top_k: int | None = None,
        include_padding: bool = False,
        freeze_router: bool = False,
        freeze_gate_faithful: bool = False,
        init_weights: Sequence[float] | Mapping[str, float] | None = None,
        update_every: int | None = 100,
    ) -> None:
        super().__init__(update_every)
        self.eta = check_nonneg_float("eta", eta)
        self.c = check_prob("c", c)
        if distance not in DISTANCES:
            raise ValueError(f"distance: got {distance!r}, expected one of {', '.join(DISTANCES)}")
        if criterion not in CRITERIA:
            raise ValueError(f"criterion: got {criterion!r}, expected one of {', '.join(CRITERIA)}")
        self.distance, self.criterion = distance, criterion
        if not (layers in ("last", "all") or (isinstance(layers, list) and layers
                                               and all(isinstance(i, int) and not isinstance(i, bool) for i in layers))):
            raise ValueError(f"layers: got {layers!r}, expected 'last', 'all' or a non-empty list of layer indices")
        self.layers = layers
        self.probe_batches = check_int("probe_batches", probe_batches)
        self.probe_batch_size = check_int("probe_batch_size", probe_batch_size)
        self.top_k = None if top_k is None else check_int("top_k", top_k)
        self.include_padding = bool(include_padding)
        if freeze_router and freeze_gate_faithful:
            raise ValueError("freeze_router and freeze_gate_faithful are exclusive; choose one")
        self.freeze_router = bool(freeze_router)
        self.freeze_gate_faithful = bool(freeze_gate_faithful)
        self.init_weights = init_weights
        self.weights: np.ndarray | None = None
        self.frozen: list[str] = []
        self.last_counts: list[list[float]] | None = None

    # -- model ------------------------------------------------------------------------------
    def prepare_model(self, model: torch.nn.Module) -> None:
        """Freeze router / "gate" parameters before the optimizer is built (if configured)."""
        if not (self.freeze_router or self.freeze_gate_faithful):
            return
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        names = gate_parameters(base) if self.freeze_gate_faithful else router_parameters(base)
        if not names:
            raise ValueError(
                f"{'freeze_gate_faithful' if self.freeze_gate_faithful else 'freeze_router'}: found no "
                f"router parameters in {type(base).__name__}; is it an MoE model?"
            )
        params = dict(base.named_parameters())
        for n in names:
            params[n].requires_grad_(False)
        self.frozen = names
        if self.freeze_gate_faithful:
            log.info("dynamic_moe: freeze_gate_faithful froze every parameter whose name contains 'gate' "
                     "(released --freeze_gate behaviour, expert gate projections included): %d tensors: %s",
                     len(names), ", ".join(names))
        else:
            log.info("dynamic_moe: froze %d router parameter tensors: %s", len(names), ", ".join(names))

    def setup(self, ctx: PolicyContext) -> None:
        super().setup(ctx)
        if ctx.model is not None and ctx.domains:
            missing = [d.name for d in ctx.domains if not d.dev]
            if missing:
                raise ValueError(f"dynamic_moe: domain(s) {missing} have no dev rows for the router probe")

    def initial_weights(self, domain_sizes: Mapping[str, int] | Sequence[int]) -> np.ndarray:
        sizes, names = sizes_and_names(domain_sizes)
        if self.init_weights is None:
            w = np.full(len(sizes), 1.0 / len(sizes))
        elif isinstance(self.init_weights, Mapping):
            unknown = sorted(set(self.init_weights) - set(names))
            if unknown:
                raise ValueError(f"init_weights: unknown domain(s) {unknown}; domains: {names}")
            w = as_weights("init_weights", [float(self.init_weights.get(n, 0.0)) for n in names]).numpy()
        else:
            w = as_weights("init_weights", list(self.init_weights), len(sizes)).numpy()
        if self.weights is None:
            self.weights = w
        return self.weights.copy()

    # -- probe ------------------------------------------------------------------------------
    def probe_counts(self) -> np.ndarray:
        """Per-domain expert counts ``[D, E]`` over the fixed dev probe (summed over layers and
        ranks). Every rank runs the same number of forwards (ZeRO-3 needs it)."""
        ctx = self.ctx
        if ctx is None or ctx.model is None or ctx.batches is None:
            raise RuntimeError("dynamic_moe: setup(ctx) with a model is required before update()")
        try:
            from mixkernels.hf import RouterStatsCollector
        except ImportError as e:  # pragma: no cover - depends on the kernels being installed
            raise RuntimeError("dynamic_moe needs mixkernels.hf.RouterStatsCollector (mixkernels with router_stats)") from e
        d = len(ctx.domain_names)
        jobs: list[tuple[int, list[int]]] = []
        for di, dom in enumerate(ctx.domains):
            rows = list(range(min(len(dom.dev), self.probe_batches * self.probe_batch_size)))
            for b in range(0, len(rows), self.probe_batch_size):
                jobs.append((di, rows[b:b + self.probe_batch_size]))
        w, r = max(1, ctx.world_size), ctx.rank
        per_rank = math.ceil(len(jobs) / w)
        model = ctx.model
        was_training = model.training
        total: torch.Tensor | None = None
        model.eval()
        try:
            with torch.no_grad():
                for k in range(per_rank):
                    idx = k * w + r
                    real = idx < len(jobs)
                    di, rows = jobs[idx] if real else jobs[0]
                    batch = ctx.batches(di, rows, "dev")
                    with RouterStatsCollector(model, top_k=self.top_k, layers=self.layers) as col:
                        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
                    am = batch["attention_mask"]
                    st = col.stats(group_ids=batch["domain_ids"], num_groups=d,
                                   attention_mask=torch.ones_like(am) if self.include_padding else am)
                    counts = st.expert_counts.to(torch.float64).sum(0).cpu()  # [G, E]
                    if not real:
                        counts = torch.zeros_like(counts)
                    total = counts if total is None else total + counts
        finally:
            model.train(was_training)
        assert total is not None
        total = ctx.all_reduce(total)
        return total.numpy()

    def update(self, step: int, signals: Any) -> np.ndarray | None:
        counts = self.probe_counts()
        self.last_counts = counts.tolist()
        prev = self.weights if self.weights is not None else np.asarray(signals.weights, dtype=np.float64)
        new = update_weights(prev, counts, eta=self.eta, c=self.c, distance=self.distance, criterion=self.criterion)
        self.weights = new.numpy()
        return self.weights.copy()

    def state_dict(self) -> dict[str, Any]:
        return {"weights": None if self.weights is None else self.weights.tolist(), "last_counts": self.last_counts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weights = None if state.get("weights") is None else np.asarray(state["weights"], dtype=np.float64)
        self.last_counts = state.get("last_counts")

    def describe(self) -> str:
        return (f"dynamic_moe(η={self.eta}, c={self.c}, {self.distance}/{self.criterion}, layers={self.layers}, "
                f"probe {self.probe_batches}x{self.probe_batch_size})")
