"""The exact, resumable, world-size-independent mixture sampler.

The run consumes one **global sample stream**. Global sample ``i`` (0-based over the run) belongs
to optimizer step ``i // B`` (``B`` = global batch = micro batch × grad accum × world size) and:

1. draws its domain by inverse-CDF on ``u_i = U(seed, i)``, a counter-based uniform
   (two rounds of splitmix64 over ``(seed, i)``), against the weights of that step restricted to
   non-exhausted domains. So the draw is a pure function of ``(seed, i, weights, exhausted set)``;
   no generator state needs to be carried or replayed.
2. takes the next example of that domain: without replacement, the ``k``-th draw of domain ``d``
   is ``perm(seed, d, k // n_d)[k % n_d]`` where ``perm`` is a Philox permutation keyed by
   ``(seed, d, epoch)``, i.e. every epoch is a fresh shuffle; with replacement it is
   ``floor(U'(seed, i) * n_d)`` from an independent counter stream.

Weights are set with :meth:`MixtureSampler.set_weights`, which only ever happens between two
global batches: a whole optimizer step (all micro-steps, all ranks) uses one weight vector.
Every rank computes the same global batch and keeps its share (:func:`shard`), so the stream is
identical for any world size with the same ``B``, and :meth:`state_dict` (cursors, counters,
weights, exhaustion flags) is global: a checkpoint resumes at any world size.

Exhaustion per domain: ``cycle`` (endless epochs), ``stop`` (one epoch) or ``max_epochs``
(``max_epochs`` epochs). An exhausted domain is removed from the draw immediately (its weight is
treated as 0 and the others renormalised); when no domain with positive weight is left,
:meth:`next_global_batch` raises :class:`SamplerExhausted`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "GlobalBatch",
    "MixtureSampler",
    "SamplerExhausted",
    "counter_uniform",
    "shard",
    "validate_weights",
]

_MASK = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_DOMAIN_STREAM = 0x243F6A8885A308D3
_EXAMPLE_STREAM = 0x13198A2E03707344


class SamplerExhausted(StopIteration):
    """Every domain with positive weight is exhausted (``stop`` / ``max_epochs``)."""


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def counter_uniform(seed: int, stream: int, index: np.ndarray | Sequence[int]) -> np.ndarray:
    """Uniforms in [0, 1) as a pure function of ``(seed, stream, index)`` (float64, 53 bits)."""
    key = np.uint64(((seed & _MASK) * 0x9E3779B97F4A7C15 ^ stream) & _MASK)
    k = _splitmix64(np.array([key], dtype=np.uint64))[0]
    idx = np.asarray(index, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = _splitmix64(_splitmix64(idx ^ k) + k)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def validate_weights(weights: Any, num_domains: int, names: Sequence[str] | None = None) -> np.ndarray:
    """Check a weight vector and return it normalised (float64).

    Raises:
        ValueError: wrong length, NaN/inf, negative entry, or zero sum (message names the value).
    """
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape[0] != num_domains:
        raise ValueError(f"weights: got {w.shape[0]} values, expected {num_domains} (one per domain)")
    label = (lambda i: repr(names[i])) if names else (lambda i: str(i))
    for i, x in enumerate(w):
        if not math.isfinite(x):
            raise ValueError(f"weights: entry for domain {label(i)} is {x}, expected a finite number")
        if x < 0:
            raise ValueError(f"weights: entry for domain {label(i)} is {x}, expected >= 0")
    s = float(w.sum())
    if s <= 0:
        raise ValueError(f"weights: sum to {s}, expected a positive sum")
    return w / s


@dataclass(frozen=True)
class GlobalBatch:
    """One optimizer step's worth of the global stream.

    ``domains[j]``, ``examples[j]`` are the domain and example index of global sample
    ``start + j``; ``weights`` is the (normalised) weight vector the step was drawn with.
    """

    step: int
    start: int
    domains: np.ndarray
    examples: np.ndarray
    weights: np.ndarray


def shard(
    batch: GlobalBatch, rank: int, world_size: int, micro_batch_size: int, grad_accum: int,
    lengths: Sequence[int] | None = None,
) -> list[list[tuple[int, int]]]:
    """Rank ``rank``'s micro-batches of a global batch: micro-step ``m`` takes global positions
    ``m*mbs*W + rank*mbs + [0, mbs)``. Returns ``grad_accum`` lists of ``(domain, example)``.

    ``lengths`` (tokens of each row of the global batch, in stream order): the positions are
    first ordered by length, longest first (stable: ties keep stream order), so each micro-step
    pads rows of similar length together. The step still trains exactly the rows of the global
    batch, and micro-step ``m`` holds the same rows for every world size.
    """
    b = micro_batch_size * grad_accum * world_size
    if len(batch.domains) != b:
        raise ValueError(
            f"shard: global batch has {len(batch.domains)} samples, expected micro_batch_size "
            f"{micro_batch_size} x grad_accum {grad_accum} x world_size {world_size} = {b}"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"shard: rank {rank} not in [0, {world_size})")
    order: Sequence[int] = range(b)
    if lengths is not None:
        if len(lengths) != b:
            raise ValueError(f"shard: lengths has {len(lengths)} entries, the global batch {b} samples")
        order = sorted(range(b), key=lambda j: -lengths[j])
    out = []
    for m in range(grad_accum):
        base = m * micro_batch_size * world_size + rank * micro_batch_size
        out.append([(int(batch.domains[j]), int(batch.examples[j])) for j in order[base:base + micro_batch_size]])
    return out


class MixtureSampler:
    """See the module docstring.

    Args:
        domain_sizes: examples per domain (each ≥ 1).
        weights: initial weights (validated, normalised).
        global_batch_size: samples per optimizer step over all ranks.
        seed: stream seed.
        with_replacement: draw examples i.i.d. instead of epoch permutations.
        exhaustion: ``cycle`` | ``stop`` | ``max_epochs``, one value or one per domain.
        max_epochs: epochs per domain under ``max_epochs``.
        domain_names: for messages and :meth:`fractions`.
    """

    def __init__(
        self,
        domain_sizes: Sequence[int],
        weights: Any,
        *,
        global_batch_size: int,
        seed: int = 0,
        with_replacement: bool = False,
        exhaustion: str | Sequence[str] = "cycle",
        max_epochs: int = 1,
        domain_names: Sequence[str] | None = None,
    ) -> None:
        self.sizes = [int(n) for n in domain_sizes]
        if not self.sizes:
            raise ValueError("MixtureSampler: no domains")
        self.names = list(domain_names) if domain_names is not None else [str(i) for i in range(len(self.sizes))]
        if len(self.names) != len(self.sizes):
            raise ValueError(f"MixtureSampler: {len(self.names)} names for {len(self.sizes)} domains")
        for name, n in zip(self.names, self.sizes):
            if n < 1:
                raise ValueError(f"MixtureSampler: domain {name!r} is empty (size {n})")
        if global_batch_size < 1:
            raise ValueError(f"MixtureSampler: global_batch_size {global_batch_size}, expected >= 1")
        ex = [exhaustion] * len(self.sizes) if isinstance(exhaustion, str) else list(exhaustion)
        if len(ex) != len(self.sizes) or any(e not in ("cycle", "stop", "max_epochs") for e in ex):
            raise ValueError(
                f"MixtureSampler: exhaustion {exhaustion!r}, expected cycle|stop|max_epochs "
                "(one value or one per domain)"
            )
        if max_epochs < 1:
            raise ValueError(f"MixtureSampler: max_epochs {max_epochs}, expected >= 1")
        self.exhaustion = ex
        self.max_epochs = int(max_epochs)
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self.with_replacement = bool(with_replacement)
        self.weights = validate_weights(weights, len(self.sizes), self.names)
        self.index = 0  # next global sample index
        self.step = 0  # global batches drawn so far
        self.drawn = [0] * len(self.sizes)  # per-domain draw counter (the cursor)
        self._perm_cache: dict[int, tuple[int, np.ndarray]] = {}

    # -- weights -------------------------------------------------------------------------------
    def set_weights(self, weights: Any) -> None:
        """Replace the weights; takes effect at the next global batch (an optimizer step)."""
        self.weights = validate_weights(weights, len(self.sizes), self.names)

    def _limit(self, d: int) -> float:
        e = self.exhaustion[d]
        if e == "cycle":
            return math.inf
        return self.sizes[d] * (1 if e == "stop" else self.max_epochs)

    def exhausted(self) -> list[bool]:
        """Per-domain exhaustion flags."""
        return [self.drawn[d] >= self._limit(d) for d in range(len(self.sizes))]

    def effective_weights(self) -> np.ndarray:
        """Weights with exhausted domains removed and renormalised (all zeros if none left)."""
        w = self.weights * ~np.array(self.exhausted())
        s = w.sum()
        return w / s if s > 0 else w

    # -- drawing -------------------------------------------------------------------------------
    def _perm(self, d: int, epoch: int) -> np.ndarray:
        hit = self._perm_cache.get(d)
        if hit is not None and hit[0] == epoch:
            return hit[1]
        key = [(self.seed * 0x9E3779B97F4A7C15 + 0x6A09E667) & _MASK, (d << 32) | (epoch & 0xFFFFFFFF)]
        p = np.random.Generator(np.random.Philox(key=key)).permutation(self.sizes[d])
        self._perm_cache[d] = (epoch, p)
        return p

    def next_global_batch(self) -> GlobalBatch:
        """Draw the next ``global_batch_size`` samples (one optimizer step) and advance.

        Raises:
            SamplerExhausted: no domain with positive weight is left (state is not advanced).
        """
        b = self.global_batch_size
        idx = np.arange(self.index, self.index + b, dtype=np.uint64)
        u = counter_uniform(self.seed, _DOMAIN_STREAM, idx)
        u2 = counter_uniform(self.seed, _EXAMPLE_STREAM, idx) if self.with_replacement else None
        drawn = list(self.drawn)
        limits = [self._limit(d) for d in range(len(self.sizes))]
        active = np.array([drawn[d] < limits[d] for d in range(len(self.sizes))])
        cdf = np.cumsum(self.weights * active)
        domains = np.empty(b, dtype=np.int64)
        examples = np.empty(b, dtype=np.int64)
        for j in range(b):
            if cdf[-1] <= 0:
                raise SamplerExhausted(
                    f"all domains with positive weight are exhausted at global sample {self.index + j}"
                )
            d = int(np.searchsorted(cdf, u[j] * cdf[-1], side="right"))
            d = min(d, len(self.sizes) - 1)
            k = drawn[d]
            n = self.sizes[d]
            if self.with_replacement:
                e = min(int(u2[j] * n), n - 1)  # type: ignore[index]
            else:
                e = int(self._perm(d, k // n)[k % n])
            drawn[d] = k + 1
            domains[j], examples[j] = d, e
            if drawn[d] >= limits[d]:
                active[d] = False
                cdf = np.cumsum(self.weights * active)
        batch = GlobalBatch(self.step, self.index, domains, examples, self.weights.copy())
        self.drawn = drawn
        self.index += b
        self.step += 1
        return batch

    # -- bookkeeping ---------------------------------------------------------------------------
    def fractions(self) -> dict[str, float]:
        """Realised fraction of all samples drawn so far, per domain name."""
        total = sum(self.drawn)
        return {n: (c / total if total else 0.0) for n, c in zip(self.names, self.drawn)}

    def epochs(self) -> dict[str, float]:
        """Epochs consumed per domain (draws / size)."""
        return {n: c / s for n, c, s in zip(self.names, self.drawn, self.sizes)}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (floats round-trip exactly through JSON)."""
        return {
            "version": 1,
            "names": list(self.names),
            "sizes": list(self.sizes),
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "with_replacement": self.with_replacement,
            "exhaustion": list(self.exhaustion),
            "max_epochs": self.max_epochs,
            "index": self.index,
            "step": self.step,
            "drawn": list(self.drawn),
            "weights": [float(x) for x in self.weights],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output.

        Raises:
            ValueError: the state belongs to a different dataset/seed/global batch (named).
        """
        for key in ("names", "sizes", "seed", "global_batch_size", "with_replacement"):
            mine = getattr(self, key if key != "sizes" else "sizes")
            if state.get(key) != mine:
                raise ValueError(
                    f"sampler checkpoint mismatch: {key} is {state.get(key)!r} in the checkpoint "
                    f"but {mine!r} in this run"
                )
        self.exhaustion = list(state["exhaustion"])
        self.max_epochs = int(state["max_epochs"])
        self.index = int(state["index"])
        self.step = int(state["step"])
        self.drawn = [int(x) for x in state["drawn"]]
        validate_weights(state["weights"], len(self.sizes), self.names)
        # Already normalised when saved; renormalising again could change the last bit.
        self.weights = np.asarray(state["weights"], dtype=np.float64)
        self._perm_cache = {}
