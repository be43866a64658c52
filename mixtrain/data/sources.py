"""Domain sources: JSONL files/folders, local HF datasets and the built-in corpus.

Every record is normalised to ``(messages, plain_text)``:

* ``{"messages": [{"role": ..., "content": ...}, ...]}`` (chat),
* ``{"prompt": ..., "response": ...}`` → user + assistant messages,
* ``{"text": ...}`` → one plain-text document trained on every token.

Files are untrusted: JSON only (``json.loads``), and every error is a :class:`DataError` naming
the file, the line (or the record index of an HF dataset) and what was expected: bytes that are
not UTF-8 (with their offset), a last line cut short, a wrong field type, an unknown role, an
empty response, text with an unpaired surrogate escape (``"\\ud800"``: no UTF-8 form). A line
longer than :data:`MAX_LINE_BYTES` (16 MiB) is refused after reading at most that much of it: one
record per line is expected, and a line that long is a broken file (or binary data) far more
often than a real example, which ``data.max_length`` would cut anyway.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "MAX_LINE_BYTES",
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


_ROLES = ("system", "user", "assistant", "tool")
MAX_LINE_BYTES = 16 << 20
_SURROGATE = re.compile("[\ud800-\udfff]")


def _kind(v: Any) -> str:
    """JSON type name of ``v`` for messages (``object``, ``array``, ``string``, ...)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    return {dict: "object", list: "array", str: "string", int: "number", float: "number"}.get(type(v), type(v).__name__)


def _string(where: str, field_name: str, v: Any, *, non_empty: bool) -> str:
    if not isinstance(v, str):
        raise DataError(f"{where}: {field_name} must be a string, got {_kind(v)} {_short(v)}")
    bad = _SURROGATE.search(v)
    if bad:
        raise DataError(f"{where}: {field_name} contains the unpaired surrogate \\u{ord(bad.group()):04x} at "
                        f"character {bad.start()}; expected valid Unicode text")
    if non_empty and not v.strip():
        raise DataError(f"{where}: {field_name} is {'empty' if not v else 'only whitespace'}; expected text to "
                        "train on")
    return v


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def normalize_record(obj: Any, where: str) -> Record:
    """Normalise one raw record (see module docstring); ``where`` is used in error messages.

    Assistant turns, ``response`` and ``text`` must be non-empty strings (the text trained on);
    system / user turns and ``prompt`` may be empty strings.

    Raises:
        DataError: naming ``where``, the field and what was expected.
    """
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with 'messages', 'prompt'+'response' or 'text', got "
                        f"{_kind(obj)} {_short(obj)}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list):
            raise DataError(f"{where}: 'messages' must be a list of {{role, content}} objects, got {_kind(msgs)}")
        if not msgs:
            raise DataError(f"{where}: 'messages' is empty; expected at least one assistant turn")
        out = []
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                got = sorted(map(str, m))[:10] if isinstance(m, dict) else _kind(m)
                raise DataError(f"{where}: messages[{j}] must be an object with 'role' and 'content', got {got}")
            role = m["role"]
            if not isinstance(role, str) or role not in _ROLES:
                raise DataError(f"{where}: messages[{j}].role is {_short(role)}; expected one of {', '.join(_ROLES)}")
            content = _string(where, f"messages[{j}].content", m["content"], non_empty=role == "assistant")
            out.append((role, content))
        if not any(r == "assistant" for r, _ in out):
            raise DataError(f"{where}: 'messages' has no assistant turn to train on")
        return Record(tuple(out))
    if "prompt" in obj and "response" in obj:
        p = _string(where, "'prompt'", obj["prompt"], non_empty=False)
        r = _string(where, "'response'", obj["response"], non_empty=True)
        return Record((("user", p), ("assistant", r)))
    if "text" in obj:
        return Record((("text", _string(where, "'text'", obj["text"], non_empty=True)),), plain_text=True)
    raise DataError(
        f"{where}: record has keys {sorted(map(str, obj))[:10]}; expected 'messages', "
        "'prompt'+'response', or 'text'"
    )


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _lines(f: Any, path: Path) -> Iterable[tuple[int, bytes, bool]]:
    """``(line number, bytes without the newline, ended by a newline)``; refuses over-long lines
    after reading at most ``MAX_LINE_BYTES`` + 1 bytes of them."""
    lineno = 0
    while True:
        pieces: list[bytes] = []
        size = 0
        while True:  # in 1 MiB pieces, so an over-long line costs at most MAX_LINE_BYTES of memory
            piece = f.readline(1 << 20)
            if not piece:
                break
            pieces.append(piece)
            size += len(piece)
            if piece.endswith(b"\n") or size > MAX_LINE_BYTES:
                break
        if not pieces:
            return
        lineno += 1
        if size > MAX_LINE_BYTES:
            raise DataError(
                f"{path}:{lineno}: line longer than {MAX_LINE_BYTES >> 20} MiB; expected one JSON record per line "
                "(is this a JSONL file? records that long would be cut to data.max_length anyway)"
            )
        line = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        del pieces
        ended = line.endswith(b"\n")
        yield lineno, line.rstrip(b"\r\n") if ended else line, ended


def read_jsonl(path: Path) -> list[Record]:
    """Read one JSONL file; blank lines are skipped.

    Raises:
        DataError: naming the file, the line and what was expected (see the module docstring).
    """
    out: list[Record] = []
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below; bytes, so decoding errors get a line number
    except OSError as e:
        raise DataError(f"{path}: cannot be read: {e.strerror or e}") from None
    with f:
        for lineno, raw, ended in _lines(f, path):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: byte {e.start + 1} of the line (0x{raw[e.start]:02x}) is not "
                                f"UTF-8 ({e.reason}); expected UTF-8 text") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line, parse_constant=_no_constants)
            except json.JSONDecodeError as e:
                if not ended:
                    raise DataError(f"{path}:{lineno}: the last line is cut short (no newline at the end and "
                                    f"not valid JSON: {e.msg} at column {e.colno}); the file looks truncated") from None
                raise DataError(f"{path}:{lineno}: malformed JSON at column {e.colno}: {e.msg}") from None
            except ValueError as e:  # NaN / Infinity constants, over-long integers
                raise DataError(f"{path}:{lineno}: malformed JSON: {e}") from None
            except RecursionError:
                raise DataError(f"{path}:{lineno}: JSON nested too deeply; expected a flat record") from None
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
    return [normalize_record(dict(row), f"{path} record {i}") for i, row in enumerate(ds)]


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
