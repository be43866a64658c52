"""Mixing policies and their registry.

``get(name, **params)`` returns a policy instance. Built-in static policies are registered on
import; any other name ``foo`` is looked up by importing ``mixtrain.policies.foo`` (which must
call :func:`register`), so a new policy is just a new file in this package. :func:`available`
and the error for an unknown name import every policy file first, so they list them all;
:func:`describe` gives name, one-line description and parameters with their defaults
(``python -m mixtrain policies``).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import pkgutil
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .base import SIGNALS, MixingPolicy, PolicyContext, sizes_and_names

__all__ = ["SIGNALS", "MixingPolicy", "PolicyContext", "PolicyInfo", "available", "describe", "get", "register",
           "sizes_and_names"]

log = logging.getLogger("mixtrain")

_REGISTRY: dict[str, type[MixingPolicy]] = {}
_SCANNED = False
_NOT_POLICIES = {"base"}
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


def _import_all() -> None:
    """Import every policy file of this package once (they register themselves)."""
    global _SCANNED
    if _SCANNED:
        return
    _SCANNED = True
    for mod in pkgutil.iter_modules(__path__):
        if mod.name.startswith("_") or mod.name in _NOT_POLICIES:
            continue
        try:
            importlib.import_module(f"{__name__}.{mod.name}")
        except ImportError as e:  # an optional dependency missing: the others are still listed
            log.warning("policy module %s cannot be imported: %s", mod.name, e)


def available() -> list[str]:
    """Every registered policy name, the lazily registered ones (one file each) included, sorted;
    names starting with ``_`` (private, e.g. test probes) still work with :func:`get` but are not
    listed."""
    _import_all()
    return sorted(n for n in _REGISTRY if not n.startswith("_"))


@dataclass(frozen=True)
class PolicyInfo:
    """What ``python -m mixtrain policies`` prints for one policy.

    Attributes:
        name: registry name (``mixing.policy``).
        description: first line of the class docstring.
        params: ``(name, default or None, annotation)`` of each ``mixing.params`` key, from the
            class ``__init__`` signature; ``required`` is True for parameters without a default.
        signals: the signals the policy reads.
    """

    name: str
    description: str
    params: tuple[tuple[str, Any, str, bool], ...]
    signals: tuple[str, ...]


def _summary(cls: type) -> str:
    """First line of the class docstring; when that defers to the module docstring, the module's
    title (a title "``name``: what it is (reference)" gives "what it is")."""
    doc = (inspect.getdoc(cls) or "").strip()
    first = doc.splitlines()[0] if doc else ""
    if "module docstring" in first or not first:
        mod = (inspect.getdoc(importlib.import_module(cls.__module__)) or "").strip().split("\n\n")[0]
        title = re.sub(r"^``[^`]+``:\s*", "", " ".join(mod.split()))
        title = title.split(" (")[0].split(". ")[0].rstrip(".")
        if title:
            return (title[0].upper() + title[1:]).replace("``", "")
    return first.replace("``", "")


def describe() -> list[PolicyInfo]:
    """:class:`PolicyInfo` of every available policy, sorted by name."""
    out = []
    for name in available():
        cls = _REGISTRY[name]
        first = _summary(cls)
        params = []
        for p in inspect.signature(cls.__init__).parameters.values():
            if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            ann = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", str(p.annotation))
            required = p.default is inspect.Parameter.empty
            params.append((p.name, None if required else p.default, "" if ann is inspect.Parameter.empty else ann,
                           required))
        out.append(PolicyInfo(name, first, tuple(params), tuple(sorted(cls.required_signals))))
    return out


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
        _import_all()
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
