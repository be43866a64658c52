"""Static policies: ``uniform``, ``proportional``, ``temperature``, ``fixed``, ``schedule``.

``temperature`` follows MoS (SEEDS §1.2): q_i = n_i / Σ n, p_i ∝ q_i^(1/τ); τ = 1 is
proportional, τ = inf is uniform. ``schedule`` replays a weight trajectory exported as
``schedule.json`` by another run (:func:`mixtrain.report.export_schedule`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..sampler import validate_weights
from . import register
from .base import MixingPolicy, check_positive_finite, sizes_and_names

__all__ = ["Fixed", "Proportional", "Schedule", "Temperature", "Uniform"]


@register("uniform")
class Uniform(MixingPolicy):
    """p_i = 1 / N."""

    name = "uniform"


@register("proportional")
class Proportional(MixingPolicy):
    """p_i = n_i / Σ n (n = training examples of domain i)."""

    name = "proportional"

    def initial_weights(self, domain_sizes: Mapping[str, int] | Sequence[int]) -> np.ndarray:
        sizes, names = sizes_and_names(domain_sizes)
        return validate_weights(sizes, len(sizes), names)


@register("temperature")
class Temperature(MixingPolicy):
    """p_i ∝ n_i^(1/τ); ``temperature`` τ > 0, ``"inf"`` gives uniform."""

    name = "temperature"

    def __init__(self, temperature: float | str = 1.0, update_every: int | None = None) -> None:
        super().__init__(update_every)
        self.temperature = check_positive_finite("temperature", temperature, allow_inf=True)

    def initial_weights(self, domain_sizes: Mapping[str, int] | Sequence[int]) -> np.ndarray:
        sizes, names = sizes_and_names(domain_sizes)
        q = np.asarray(sizes, dtype=np.float64)
        q = q / q.sum()
        if math.isinf(self.temperature):
            return np.full(len(sizes), 1.0 / len(sizes))
        # log-space so large τ or sizes never underflow
        logits = np.log(q) / self.temperature
        p = np.exp(logits - logits.max())
        return validate_weights(p, len(sizes), names)

    def describe(self) -> str:
        return f"temperature(τ={self.temperature})"


@register("fixed")
class Fixed(MixingPolicy):
    """Given weights: a list in domain order or a ``{domain: weight}`` mapping (missing → 0)."""

    name = "fixed"

    def __init__(self, weights: Sequence[float] | Mapping[str, float], update_every: int | None = None) -> None:
        super().__init__(update_every)
        self.weights = weights

    def initial_weights(self, domain_sizes: Mapping[str, int] | Sequence[int]) -> np.ndarray:
        sizes, names = sizes_and_names(domain_sizes)
        if isinstance(self.weights, Mapping):
            unknown = sorted(set(self.weights) - set(names))
            if unknown:
                raise ValueError(f"fixed: weights name unknown domain(s) {unknown}; domains: {names}")
            w = [float(self.weights.get(n, 0.0)) for n in names]
        else:
            w = list(self.weights)
        return validate_weights(w, len(sizes), names)


@register("schedule")
class Schedule(MixingPolicy):
    """Replay ``{"domains": [...], "steps": [...], "weights": [[...], ...]}``.

    Entry ``(k, w)`` means ``w`` is used from optimizer step ``k + 1`` on (``k = 0``: initial
    weights). Give ``path`` (a JSON file, e.g. another run's ``schedule.json``) or ``schedule``
    (the dict itself). Domains are matched by name, so order may differ.
    """

    name = "schedule"

    def __init__(self, path: str | None = None, schedule: Mapping[str, Any] | None = None,
                 update_every: int | None = 1) -> None:
        super().__init__(update_every or 1)
        if (path is None) == (schedule is None):
            raise ValueError("schedule: give exactly one of 'path' or 'schedule'")
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ValueError(f"schedule: path {path!r} does not exist")
            try:
                schedule = json.loads(p.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"schedule: {path!r} is not valid JSON: {e}") from None
        assert schedule is not None
        for key in ("domains", "steps", "weights"):
            if key not in schedule:
                raise ValueError(f"schedule: missing key {key!r} (have {sorted(schedule)})")
        steps = [int(s) for s in schedule["steps"]]
        if len(steps) != len(schedule["weights"]) or not steps:
            raise ValueError("schedule: 'steps' and 'weights' must be non-empty and of equal length")
        if steps != sorted(steps):
            raise ValueError("schedule: 'steps' must be increasing")
        self.domains = [str(d) for d in schedule["domains"]]
        self.steps = steps
        self.table = [list(map(float, w)) for w in schedule["weights"]]
        self._order: list[int] | None = None

    def _at(self, i: int) -> np.ndarray:
        assert self._order is not None
        w = [self.table[i][j] for j in self._order]
        return validate_weights(w, len(w), None)

    def initial_weights(self, domain_sizes: Mapping[str, int] | Sequence[int]) -> np.ndarray:
        _, names = sizes_and_names(domain_sizes)
        if sorted(names) != sorted(self.domains):
            raise ValueError(f"schedule: domains {self.domains} do not match this run's {names}")
        self._order = [self.domains.index(n) for n in names]
        i = max([k for k, s in enumerate(self.steps) if s <= 0], default=0)
        return self._at(i)

    def update(self, step: int, signals: Any) -> np.ndarray | None:
        if step in self.steps:
            return self._at(self.steps.index(step))
        return None
