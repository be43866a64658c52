"""Mixing policies and their registry.

``get(name, **params)`` returns a policy instance. Built-in static policies are registered on
import; any other name ``foo`` is looked up by importing ``mixtrain.policies.foo`` (which must
call :func:`register`), so a new policy is just a new file in this package.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable
from typing import Any, TypeVar

from .base import SIGNALS, MixingPolicy, PolicyContext, sizes_and_names

__all__ = ["SIGNALS", "MixingPolicy", "PolicyContext", "available", "get", "register", "sizes_and_names"]

_REGISTRY: dict[str, type[MixingPolicy]] = {}
T = TypeVar("T", bound=type[MixingPolicy])


def register(name: str) -> Callable[[T], T]:
    """Class decorator: make ``cls`` available as ``get(name)``."""

    def deco(cls: T) -> T:
        if not (isinstance(cls, type) and issubclass(cls, MixingPolicy)):
            raise TypeError(f"register({name!r}): {cls!r} is not a MixingPolicy subclass")
        unknown = set(cls.required_signals) - SIGNALS
        if unknown:
            raise ValueError(
                f"policy {name!r} requires unknown signal(s) {sorted(unknown)}; known: {sorted(SIGNALS)}"
            )
        _REGISTRY[name] = cls
        return cls

    return deco


def available() -> list[str]:
    """Registered policy names (plus nothing lazily importable that was never imported)."""
    return sorted(_REGISTRY)


def get(name: str, **params: Any) -> MixingPolicy:
    """Instantiate policy ``name`` with ``params``.

    Raises:
        ValueError: unknown policy (lists the available ones) or unknown/invalid parameters
            (lists the accepted ones).
    """
    if name not in _REGISTRY and re.fullmatch(r"[a-z_][a-z0-9_]*", name or ""):
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"unknown mixing policy {name!r}; available: {', '.join(available())}")
    sig = inspect.signature(cls.__init__)
    accepted = [p for p in sig.parameters if p != "self"]
    has_var_kw = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    unknown = sorted(set(params) - set(accepted))
    if unknown and not has_var_kw:
        raise ValueError(
            f"policy {name!r}: unknown parameter(s) {unknown}; accepted: {', '.join(accepted) or '(none)'}"
        )
    try:
        return cls(**params)
    except TypeError as e:
        raise ValueError(f"policy {name!r}: bad parameters {params}: {e}") from None


from . import static as _static  # noqa: F401  (registers the built-in policies)
