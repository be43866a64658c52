"""The policies of ``mixtrain compare``: the ``--policies`` / ``--baselines`` / ``--seeds`` syntax
(described in the :mod:`mixtrain.compare` docstring) and the built-in baselines."""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..config import ConfigError

log = logging.getLogger("mixtrain.compare")

ALIASES: dict[str, tuple[str, str]] = {
    "stratified": ("uniform", "equal weight per domain/skill"),
    "random": ("proportional", "uniform over training examples, p_i ∝ n_i"),
}
BASELINES: tuple[str, ...] = ("uniform", "random")
_BASELINE_NOTES = {
    "uniform": "= stratified: equal weight per domain/skill",
    "random": "= proportional: uniform over examples, p ∝ n",
}


@dataclass(frozen=True)
class PolicySpec:
    """One row of the comparison: a policy with its parameters.

    Attributes:
        label: unique row name and directory name.
        policy: registered policy name (aliases resolved).
        params: policy parameters (``mixing.params``).
        update_every: ``mixing.update_every`` for this policy (``None``: the config's).
        note: what the row is (for baselines and aliases).
    """

    label: str
    policy: str
    params: dict[str, Any] = field(default_factory=dict)
    update_every: int | None = None
    note: str = ""

    @property
    def key(self) -> str:
        """Identity of the run (policy + parameters); equal keys are the same experiment."""
        return json.dumps([self.policy, self.params, self.update_every], sort_keys=True, default=str)


def _split_top(text: str, sep: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


_LABEL_OK = re.compile(r"^[A-Za-z0-9_.=,+\-]+$")


def _fmt_value(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def parse_policies(text: str) -> list[PolicySpec]:
    """Parse the ``--policies`` syntax (the :mod:`mixtrain.compare` docstring) into specs, aliases resolved.

    Raises:
        ConfigError: empty entry, ``key=value`` without ``=``, a bad label, or a duplicate label
            (the message quotes the entry and says what is expected).
    """
    if not text or not text.strip():
        raise ConfigError("--policies: empty; expected e.g. 'uniform,mos:reward=diff,temperature:temperature=10'")
    specs: list[PolicySpec] = []
    for raw in _split_top(text, ","):
        entry = raw.strip()
        if not entry:
            raise ConfigError(f"--policies {text!r}: empty entry (two commas in a row?)")
        label = None
        if "@" in entry:
            entry, label = entry.rsplit("@", 1)
            if not label or not _LABEL_OK.match(label):
                raise ConfigError(f"--policies entry {raw.strip()!r}: label {label!r} must be non-empty "
                                  "and use only letters, digits and _ . = , + -")
        parts = _split_top(entry, ":")
        name = parts[0].strip()
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ConfigError(f"--policies entry {raw.strip()!r}: policy name {name!r} is not a valid name")
        params: dict[str, Any] = {}
        update_every = None
        for kv in parts[1:]:
            if "=" not in kv:
                raise ConfigError(f"--policies entry {raw.strip()!r}: parameter {kv!r} must be key=value")
            k, v = kv.split("=", 1)
            k = k.strip()
            try:
                val = yaml.safe_load(v) if v.strip() != "" else ""
            except yaml.YAMLError as e:
                raise ConfigError(f"--policies entry {raw.strip()!r}: value of {k!r} is not valid YAML: {e}") from None
            if isinstance(val, float) and math.isinf(val):
                val = "inf"
            if k == "update_every":
                if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                    raise ConfigError(f"--policies entry {raw.strip()!r}: update_every={v!r}, expected an integer >= 1")
                update_every = val
            else:
                params[k] = val
        note = ""
        policy = name
        if name in ALIASES:
            policy, note = ALIASES[name]
        if label is None:
            shown = [f"{k}={_fmt_value(v)}" for k, v in params.items()]
            if update_every is not None:
                shown.append(f"update_every={update_every}")
            label = "+".join([name, *shown])
            label = re.sub(r"[^A-Za-z0-9_.=,+\-]", "_", label)
        if name in BASELINES and not params and update_every is None:
            note = _BASELINE_NOTES[name]
        elif name == "stratified" and not params and update_every is None:
            label, note = "uniform", _BASELINE_NOTES["uniform"]
        spec = PolicySpec(label, policy, params, update_every, note)
        specs.append(spec)
    return _dedupe(specs)


def _dedupe(specs: list[PolicySpec]) -> list[PolicySpec]:
    out: list[PolicySpec] = []
    for s in specs:
        same = [o for o in out if o.key == s.key]
        if same:
            if s.label != same[0].label:
                log.warning("`%s` is the same run as `%s` (same policy and parameters): run and listed once, "
                            "as `%s`", s.label, same[0].label, same[0].label)
            continue  # e.g. uniform and stratified: one run
        if any(o.label == s.label for o in out):
            raise ConfigError(f"--policies: label {s.label!r} used twice for different runs; add @label to one")
        out.append(s)
    return out


def with_baselines(specs: list[PolicySpec], baselines: Sequence[str] = BASELINES) -> list[PolicySpec]:
    """Put the baselines first: ``uniform`` / ``random`` / ``stratified`` are added when missing;
    any other name must be the label of one of ``specs`` (e.g. ``--baselines all_tasks`` for a
    ``fixed:...@all_tasks`` entry).

    Raises:
        ConfigError: a baseline that is neither a built-in baseline nor a label of ``specs``.
    """
    base: list[PolicySpec] = []
    for name in baselines:
        own = [s for s in specs if s.label == name]
        if own:
            base += own
        elif name in BASELINES or name == "stratified":
            base += parse_policies(name)
        else:
            raise ConfigError(f"--baselines: {name!r} is neither uniform, random nor the @label of a --policies "
                              f"entry; labels: {[s.label for s in specs]}")
    rest = [s for s in specs if all(s.key != b.key for b in base)]
    return _dedupe(base + rest)


def parse_baselines(text: str) -> list[str]:
    """``"uniform,random"`` → the baseline labels (``stratified`` is ``uniform``).

    Raises:
        ConfigError: empty or repeated names."""
    names = ["uniform" if x.strip() == "stratified" else x.strip() for x in text.split(",") if x.strip()]
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"--baselines {text!r}: expected distinct comma-separated labels, e.g. uniform,random")
    return names


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` → ``[0, 1, 2]``.

    Raises:
        ConfigError: a non-integer, a negative or a repeated seed."""
    try:
        seeds = [int(x) for x in text.split(",") if x.strip() != ""]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: expected distinct non-negative integers, e.g. 0,1,2")
    return seeds

