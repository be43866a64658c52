"""The mixing-policy interface.

A policy turns per-domain signals into sampling weights. The training loop drives it like this::

    policy = mixtrain.policies.get(name, **params)
    policy.setup(ctx)                              # once; ctx: PolicyContext (model, data, ...)
    w = policy.initial_weights(domain_sizes)       # {name: n_examples}, in domain order
    for step in 1..steps:                          # step = optimizer steps completed
        train one optimizer step with weights w    # constant over micro-steps and ranks
        if policy.update_every and step % policy.update_every == 0:
            signals = bus.collect(step, policy.required_signals)   # all-reduced, same on all ranks
            new = policy.update(step, signals)     # None = keep the current weights
            w = broadcast_from_rank0(new)          # ranks can never diverge

Rules for implementers (dynamic policies live in ``mixtrain/policies/<name>.py`` and register
themselves with :func:`mixtrain.policies.register`; ``get("<name>")`` imports that module
on first use):

* ``required_signals`` is a set of names from :data:`SIGNALS`; the loop computes only those
  (``train_domain_loss`` is always available since it is free). Declaring ``dev_domain_loss``
  makes the loop refuse to start without dev splits.
* ``update`` receives a :class:`mixtrain.signals.Signals`; it must be deterministic given its
  state and the signals (it runs on every rank; rank 0's result is broadcast).
* Policies that compute their own rewards with the model (e.g. MoS: embeddings / perplexities of
  training examples in eval mode) use ``self.ctx`` from :meth:`setup`: ``ctx.model`` (the HF
  model, same object the engine trains), ``ctx.batches(domain, indices)`` to build collated
  batches, ``ctx.forward_hidden`` / ``ctx.forward_losses`` helpers, ``ctx.all_reduce``. Under
  ZeRO-3 a forward is a collective: call such helpers on **every** rank with the same inputs.
* ``state_dict`` must return JSON-serialisable values (lists, floats, ints, str, dicts); floats
  round-trip exactly. It is saved in every checkpoint and restored on resume.
"""

from __future__ import annotations

import math
from abc import ABC
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from ..signals import Signals

__all__ = ["SIGNALS", "MixingPolicy", "PolicyContext", "sizes_and_names"]

SIGNALS = frozenset(
    {"train_domain_loss", "dev_domain_loss", "domain_embedding", "router_stats", "example_loss"}
)


@dataclass
class PolicyContext:
    """What a policy may use besides signals (given to :meth:`MixingPolicy.setup`).

    Attributes:
        domain_names: domain names in sampler order.
        domain_sizes: training rows per domain.
        model: the HF model being trained (``None`` in pure-sampler uses such as tests).
        tokenizer: the run's tokenizer.
        domains: tokenised domains (``.train`` / ``.dev`` rows of ``(input_ids, labels)``).
        device: torch device of the model.
        rank, world_size: distributed position.
        seed: run seed (derive policy randomness from it and the step, never from global RNG).
        batches: ``batches(domain_index, example_indices, split="train"|"dev")`` → a collated
            batch dict on ``device`` (``input_ids``, ``attention_mask``, ``labels``, ``domain_ids``).
        forward_hidden: ``forward_hidden(batch)`` → last hidden states ``[B, T, H]`` (eval mode,
            no grad; restores train mode).
        forward_losses: ``forward_losses(batch)`` → per-example mean token loss ``[B]`` (eval
            mode, no grad).
        forward_router_stats: MoE models, when the policy requires ``router_stats``:
            ``forward_router_stats(batch)`` → top-k expert counts ``[L, D, E]`` (numpy, per
            domain of ``batch["domain_ids"]``, pads excluded) of an eval-mode forward, for the
            router layers chosen by the policy's ``router_layers``.
        all_reduce: ``all_reduce(tensor)`` → sum over ranks (identity on one process).
        sampler: the :class:`mixtrain.sampler.MixtureSampler` (read-only use).
    """

    domain_names: list[str]
    domain_sizes: list[int]
    model: Any = None
    tokenizer: Any = None
    domains: list[Any] = field(default_factory=list)
    device: Any = "cpu"
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    batches: Callable[..., dict[str, Any]] | None = None
    forward_hidden: Callable[[dict[str, Any]], Any] | None = None
    forward_losses: Callable[[dict[str, Any]], Any] | None = None
    forward_router_stats: Callable[[dict[str, Any]], Any] | None = None
    all_reduce: Callable[[Any], Any] = lambda t: t
    sampler: Any = None


def sizes_and_names(domain_sizes: Mapping[str, int] | Sequence[int]) -> tuple[list[int], list[str]]:
    """Accept ``{name: size}`` or a plain size list (names then ``"0"``, ``"1"``, …)."""
    if isinstance(domain_sizes, Mapping):
        return [int(v) for v in domain_sizes.values()], [str(k) for k in domain_sizes]
    sizes = [int(v) for v in domain_sizes]
    return sizes, [str(i) for i in range(len(sizes))]


class MixingPolicy(ABC):
    """Base class of every mixing policy (see the module docstring for the contract).

    Class attributes:
        name: registry name.
        required_signals: subset of :data:`SIGNALS` that :meth:`update` reads.
        needs_dev: the policy needs dev splits (implied by ``dev_domain_loss``).
        router_layers: which MoE router layers ``router_stats`` covers: ``"last"`` (DynSFT),
            ``"all"`` or a tuple of indices (negative allowed).

    Instance attributes:
        update_every: call :meth:`update` every this many optimizer steps; ``None`` = never
            (static policy). ``mixing.update_every`` in the config overrides it.
    """

    name: ClassVar[str] = "base"
    required_signals: ClassVar[frozenset[str]] = frozenset()
    needs_dev: ClassVar[bool] = False
    router_layers: ClassVar[str | tuple[int, ...]] = "last"

    def __init__(self, update_every: int | None = None) -> None:
        self.update_every = update_every
        self.ctx: PolicyContext | None = None

    @property
    def requires_dev(self) -> bool:
        """Whether the run must have dev splits for this policy."""
        return self.needs_dev or "dev_domain_loss" in self.required_signals

    def setup(self, ctx: PolicyContext) -> None:
        """Receive the run context once, before :meth:`initial_weights`."""
        self.ctx = ctx

    def prepare_model(self, model: Any) -> None:
        """Adjust the freshly built HF model before the optimizer is created (e.g. freeze router
        parameters); called once, before :meth:`setup`. Default: nothing."""

    def initial_weights(self, domain_sizes: Mapping[str, int] | Sequence[int]) -> np.ndarray:
        """Weights for step 1. Default: uniform."""
        sizes, _ = sizes_and_names(domain_sizes)
        return np.full(len(sizes), 1.0 / len(sizes))

    def update(self, step: int, signals: Signals) -> np.ndarray | None:
        """New weights after optimizer step ``step`` (``None`` keeps the current ones)."""
        return None

    def on_train_end(self, output_dir: Any, step: int) -> None:
        """Called once on rank 0 after the last step (``output_dir``: the run directory, ``step``:
        optimizer steps done) to write policy outputs. Default: nothing."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    def describe(self) -> str:
        """One-line description for logs."""
        return self.name


def check_positive_finite(name: str, value: float, allow_inf: bool = False) -> float:
    """Validate a numeric policy parameter (message names it)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: got {value!r}, expected a number") from None
    if math.isnan(v) or v <= 0 or (math.isinf(v) and not allow_inf):
        raise ValueError(
            f"{name}: got {value!r}, expected a positive {'number or inf' if allow_inf else 'finite number'}"
        )
    return v
