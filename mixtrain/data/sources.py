"""Domain sources: JSONL files/folders, local HF datasets and the built-in corpus.

Every record is normalised to ``(messages, plain_text)``:

* ``{"messages": [{"role": ..., "content": ...}, ...]}`` (chat),
* ``{"prompt": ..., "response": ...}`` → user + assistant messages,
* ``{"text": ...}`` → one plain-text document trained on every token.

Files are untrusted: JSON only (``json.loads``), and errors name the file and line.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DataError",
    "Domain",
    "Record",
    "load_domains",
    "load_path",
    "normalize_record",
    "read_jsonl",
    "split_dev",
]


class DataError(ValueError):
    """Bad input data; the message names the file/line or domain."""


@dataclass(frozen=True)
class Record:
    """One normalised example."""

    messages: tuple[tuple[str, str], ...]
    plain_text: bool = False

    def as_messages(self) -> list[dict[str, str]]:
        """``[{"role", "content"}]`` form."""
        return [{"role": r, "content": c} for r, c in self.messages]


@dataclass
class Domain:
    """A named domain with train and dev records."""

    name: str
    train: list[Record]
    dev: list[Record] = field(default_factory=list)


_ROLES = {"system", "user", "assistant", "tool"}


def normalize_record(obj: Any, where: str) -> Record:
    """Normalise one raw record (see module docstring); ``where`` is used in error messages."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        out = []
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DataError(f"{where}: messages[{j}] must have 'role' and 'content'")
            if m["role"] not in _ROLES or not isinstance(m["content"], str):
                raise DataError(
                    f"{where}: messages[{j}] has role {m['role']!r} (expected one of "
                    f"{sorted(_ROLES)}) or non-string content"
                )
            out.append((m["role"], m["content"]))
        if not any(r == "assistant" for r, _ in out):
            raise DataError(f"{where}: 'messages' has no assistant turn to train on")
        return Record(tuple(out))
    if "prompt" in obj and "response" in obj:
        p, r = obj["prompt"], obj["response"]
        if not isinstance(p, str) or not isinstance(r, str):
            raise DataError(f"{where}: 'prompt' and 'response' must be strings")
        return Record((("user", p), ("assistant", r)))
    if "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"]:
            raise DataError(f"{where}: 'text' must be a non-empty string")
        return Record((("text", obj["text"]),), plain_text=True)
    raise DataError(
        f"{where}: record has keys {sorted(obj)[:10]}; expected 'messages', "
        "'prompt'+'response', or 'text'"
    )


def read_jsonl(path: Path) -> list[Record]:
    """Read one JSONL file; blank lines are skipped; errors name the file and line."""
    out: list[Record] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON: {e.msg}") from None
            out.append(normalize_record(obj, f"{path}:{lineno}"))
    return out


def _load_hf(path: Path) -> list[Record]:
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError as e:
        raise DataError(
            f"{path}: looks like a Hugging Face dataset but the 'datasets' package is not "
            "installed (pip install datasets)"
        ) from e
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        ds = datasets.load_from_disk(str(path))
    else:
        ext = path.suffix.lstrip(".")
        kind = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}.get(ext)
        if kind is None:
            raise DataError(f"{path}: unsupported data file type {ext!r}")
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: DatasetDict without a 'train' split (has {list(ds)})")
        ds = ds["train"]
    return [normalize_record(dict(row), f"{path}[{i}]") for i, row in enumerate(ds)]


def load_path(path: str | Path) -> list[Record]:
    """Records from a JSONL file, a folder of ``*.jsonl`` files (sorted), or a local HF dataset."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data path {str(p)!r} does not exist")
    if p.is_dir():
        if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists():
            return _load_hf(p)
        files = sorted(p.glob("*.jsonl"))
        if not files:
            raise DataError(f"data folder {str(p)!r} has no *.jsonl files and is not an HF dataset")
        return [r for f in files for r in read_jsonl(f)]
    if p.suffix == ".jsonl":
        return read_jsonl(p)
    return _load_hf(p)


def _name_seed(name: str, salt: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{salt}:{name}".encode()).digest()[:8], "little")


def split_dev(name: str, records: list[Record], fraction: float) -> tuple[list[Record], list[Record]]:
    """Deterministic held-out split: a fixed permutation keyed by the domain name.

    Keeps at least one training example; a domain with ≥ 2 examples and ``fraction > 0`` gets at
    least one dev example.
    """
    n = len(records)
    if fraction <= 0 or n < 2:
        return list(records), []
    n_dev = min(n - 1, max(1, round(fraction * n)))
    perm = np.random.Generator(np.random.Philox(_name_seed(name, "dev"))).permutation(n)
    dev_idx = set(perm[:n_dev].tolist())
    train = [r for i, r in enumerate(records) if i not in dev_idx]
    dev = [r for i, r in enumerate(records) if i in dev_idx]
    return train, dev


def load_domains(
    builtin: Iterable[str],
    domains: dict[str, Any],
    *,
    dev_fraction: float,
    builtin_size: int | dict[str, int],
    builtin_seed: int,
) -> list[Domain]:
    """Load every configured domain; order = built-ins (as listed) then ``domains`` (as listed).

    Raises:
        DataError: unknown built-in, missing path, malformed file, empty or duplicate domain.
    """
    from .builtin import builtin_domains

    out: list[Domain] = []
    for name, recs in builtin_domains(list(builtin), size=builtin_size, seed=builtin_seed):
        train, dev = split_dev(name, recs, dev_fraction)
        out.append(Domain(name, train, dev))
    for name, spec in domains.items():
        if isinstance(spec, dict):
            unknown = set(spec) - {"train", "dev"}
            if unknown or "train" not in spec:
                raise DataError(
                    f"data.domains.{name}: expected a path or {{train: path, dev: path}}, "
                    f"got keys {sorted(spec)}"
                )
            train = load_path(spec["train"])
            dev = load_path(spec["dev"]) if spec.get("dev") else None
            if dev is None:
                train, dev = split_dev(name, train, dev_fraction)
        elif isinstance(spec, str):
            train, dev = split_dev(name, load_path(spec), dev_fraction)
        else:
            raise DataError(f"data.domains.{name}: expected a path string, got {spec!r}")
        out.append(Domain(name, train, dev))
    seen: set[str] = set()
    for d in out:
        if d.name in seen:
            raise DataError(f"domain {d.name!r} is defined twice")
        seen.add(d.name)
        if not d.train:
            raise DataError(f"domain {d.name!r} is empty (no training examples)")
    return out
