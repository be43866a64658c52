"""Small helpers shared by the dynamic policies (input checks, JSON state, seeded draws).

Every check raises ``ValueError`` with a message naming the argument, the bad value and what
was expected, so a policy fed a broken signal fails loudly instead of sampling from NaNs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "as_matrix",
    "as_vector",
    "as_weights",
    "check_int",
    "check_nonneg_float",
    "check_prob",
    "choice",
    "policy_rng",
    "tensor_from_json",
    "tensor_to_json",
]

Array = Any  # numpy array, torch tensor, or nested sequence


def _to_f64(name: str, x: Array) -> torch.Tensor:
    try:
        if isinstance(x, torch.Tensor):
            return x.detach().to(device="cpu", dtype=torch.float64)
        return torch.as_tensor(np.asarray(x, dtype=np.float64))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: got {x!r}, expected numbers ({e})") from None


def _describe_bad(name: str, t: torch.Tensor) -> str:
    bad = (~torch.isfinite(t)).nonzero()
    idx = tuple(int(i) for i in bad[0]) if len(bad) else ()
    where = idx[0] if len(idx) == 1 else idx
    return f"{name}: entry {where} is {t[idx].item()} ({len(bad)} non-finite in total), expected finite values"


def as_vector(name: str, x: Array, length: int | None = None, *, allow_nan: bool = False) -> torch.Tensor:
    """A 1-D float64 tensor; checks length and finiteness (NaN allowed only if ``allow_nan``)."""
    t = _to_f64(name, x)
    if t.dim() != 1:
        raise ValueError(f"{name}: got shape {tuple(t.shape)}, expected a 1-D vector")
    if length is not None and t.shape[0] != length:
        raise ValueError(f"{name}: got {t.shape[0]} values, expected {length} (one per domain)")
    if t.shape[0] == 0:
        raise ValueError(f"{name}: is empty, expected at least one domain")
    finite = torch.isfinite(t) | (torch.isnan(t) if allow_nan else torch.zeros_like(t, dtype=torch.bool))
    if not bool(finite.all()):
        raise ValueError(_describe_bad(name, t))
    return t


def as_weights(name: str, x: Array, length: int | None = None) -> torch.Tensor:
    """A probability vector: finite, ≥ 0, positive sum; returned normalised (float64)."""
    t = as_vector(name, x, length)
    if bool((t < 0).any()):
        i = int((t < 0).nonzero()[0, 0])
        raise ValueError(f"{name}: entry {i} is {t[i].item()}, expected >= 0")
    s = float(t.sum())
    if not s > 0:
        raise ValueError(f"{name}: sums to {s}, expected a positive sum")
    return t / s


def as_matrix(name: str, x: Array, shape: tuple[int | None, int | None] = (None, None)) -> torch.Tensor:
    """A finite 2-D float64 tensor with optional fixed dimensions."""
    t = _to_f64(name, x)
    if t.dim() != 2:
        raise ValueError(f"{name}: got shape {tuple(t.shape)}, expected a 2-D matrix")
    for k, (got, want) in enumerate(zip(t.shape, shape)):
        if want is not None and got != want:
            raise ValueError(f"{name}: got shape {tuple(t.shape)}, expected dimension {k} = {want}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(_describe_bad(name, t))
    return t


def check_prob(name: str, value: Any, *, open_low: bool = False, open_high: bool = False) -> float:
    """A number in [0, 1] (ends optionally excluded)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: got {value!r}, expected a number in [0, 1]") from None
    lo_ok = v > 0 if open_low else v >= 0
    hi_ok = v < 1 if open_high else v <= 1
    if math.isnan(v) or not (lo_ok and hi_ok):
        rng = f"{'(' if open_low else '['}0, 1{')' if open_high else ']'}"
        raise ValueError(f"{name}: got {value!r}, expected a number in {rng}")
    return v


def check_nonneg_float(name: str, value: Any) -> float:
    """A finite number ≥ 0."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: got {value!r}, expected a finite number >= 0") from None
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name}: got {value!r}, expected a finite number >= 0")
    return v


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """An integer ≥ ``minimum`` (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise ValueError(f"{name}: got {value!r}, expected an integer >= {minimum}")
    return int(value)


def policy_rng(seed: int, *keys: int) -> np.random.Generator:
    """A Philox generator keyed by the run seed and integer keys (step, domain, rank, ...).

    Draws are a pure function of the keys, so a resumed run redraws exactly what an
    uninterrupted one would, with no generator state in the checkpoint.
    """
    key = [int(seed) & (2**64 - 1)]
    for k in keys:
        key.append(int(k) & (2**64 - 1))
    # Philox takes a 2-word key; fold the rest in with SeedSequence (deterministic).
    ss = np.random.SeedSequence(key)
    return np.random.Generator(np.random.Philox(ss))


def choice(rng: np.random.Generator, n: int, size: int, *, replace: bool) -> list[int]:
    """``size`` indices in ``[0, n)`` (with or without replacement; the latter capped at ``n``)."""
    if n < 1:
        raise ValueError(f"cannot draw examples from an empty domain (n={n})")
    if replace:
        return [int(i) for i in rng.integers(0, n, size=size)]
    return [int(i) for i in rng.permutation(n)[: min(size, n)]]


def tensor_to_json(t: torch.Tensor | None) -> Any:
    """Exact JSON form of a float64/int tensor (nested lists of Python floats round-trip)."""
    if t is None:
        return None
    return {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape), "data": t.reshape(-1).tolist()}


def tensor_from_json(obj: Any) -> torch.Tensor | None:
    """Inverse of :func:`tensor_to_json`."""
    if obj is None:
        return None
    dtype = getattr(torch, obj["dtype"])
    return torch.tensor(obj["data"], dtype=dtype).reshape(obj["shape"])


def names_index(names: Sequence[str], name: str, what: str) -> int:
    """Index of ``name`` in ``names`` or a clear error listing the valid names."""
    if name not in names:
        raise ValueError(f"{what}: got {name!r}, expected one of the domains {list(names)}")
    return list(names).index(name)
