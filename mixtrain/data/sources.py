"""Sources: the files a domain is read from, streamed in chunks of raw records.

Formats: JSONL (``.jsonl``, gzipped ``.jsonl.gz``), Parquet (``.parquet``), Arrow (``.arrow``: the
IPC stream or file format, as Hugging Face ``save_to_disk`` writes it), a local Hugging Face dataset
(a ``save_to_disk`` folder, or a ``DatasetDict`` one: its ``train`` split), and folders of any of
these (their supported files, sorted by name).

Every record is normalised to ``(messages, plain_text)``:

* ``{"messages": [{"role": ..., "content": ...}, ...]}`` (chat),
* ``{"prompt": ..., "response": ...}`` → user + assistant messages,
* ``{"text": ...}`` → one plain-text document trained on every token.

A per-domain ``fields`` mapping renames the user's fields to these: ``{"prompt": "question",
"response": "answer"}``, ``{"messages": "conversations", "role": "from", "content": "value"}``.

Files are untrusted: JSON only (``json.loads``), and every error is a :class:`DataError` naming
the file, the line (or the row of a Parquet / Arrow / HF file) and what was expected: bytes that
are not UTF-8 (with their offset), a last line cut short, a wrong field type, an unknown role, an
empty response, text with an unpaired surrogate escape (``"\\ud800"``: no UTF-8 form). A UTF-8
byte-order mark at the start of a JSONL file is skipped (as pandas and HF datasets do). A line
longer than :data:`MAX_LINE_BYTES` (16 MiB) is refused after reading at most that much of it: one
record per line is expected, and a line that long is a broken file (or binary data) far more
often than a real example, which ``data.max_length`` would cut anyway.

Reading is split in two so that parsing runs in the build's worker processes: :func:`iter_chunks`
streams raw chunks (JSONL lines as bytes, or rows of columnar files) in file order, and
:func:`normalize_chunk` turns one chunk into :class:`Record` s.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FIELD_NAMES",
    "MAX_LINE_BYTES",
    "Chunk",
    "DataError",
    "Domain",
    "Record",
    "check_fields",
    "iter_chunks",
    "iter_records",
    "load_path",
    "normalize_chunk",
    "normalize_record",
    "read_jsonl",
    "source_files",
    "split_dev",
    "split_dev_indices",
]


class DataError(ValueError):
    """Bad input data; the message names the file/line or domain."""


@dataclass(frozen=True)
class Record:
    """One normalised example; ``meta``: what a scorer needs besides the text (a JSON string: a
    benchmark item's options and gold answer), kept with the record in the token cache."""

    messages: tuple[tuple[str, str], ...]
    plain_text: bool = False
    meta: str | None = None

    def as_messages(self) -> list[dict[str, str]]:
        """``[{"role", "content"}]`` form."""
        return [{"role": r, "content": c} for r, c in self.messages]


@dataclass
class Domain:
    """A named domain with train and dev records (in memory: for small data and tests; the
    training loop reads domains through the token cache, :mod:`mixtrain.data.cache`)."""

    name: str
    train: list[Record]
    dev: list[Record] = field(default_factory=list)


_ROLES = ("system", "user", "assistant", "tool")
FIELD_NAMES = ("messages", "prompt", "response", "text", "role", "content")
MAX_LINE_BYTES = 16 << 20
_SURROGATE = re.compile("[\ud800-\udfff]")
_BOM = b"\xef\xbb\xbf"
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
COLUMNAR_SUFFIXES = (".parquet", ".arrow")


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


def check_fields(fields: Any, where: str) -> dict[str, str]:
    """Validate a ``fields`` mapping (ours → the user's field name).

    Raises:
        DataError: not a mapping, an unknown key, or a non-string value (naming ``where``).
    """
    if fields is None:
        return {}
    if not isinstance(fields, Mapping):
        raise DataError(f"{where}: fields must be a mapping {{our name: your field}}, got {_short(fields)}")
    out = {}
    for k, v in fields.items():
        if k not in FIELD_NAMES:
            raise DataError(f"{where}: fields has unknown key {k!r}; valid keys: {', '.join(FIELD_NAMES)}")
        if not isinstance(v, str) or not v:
            raise DataError(f"{where}: fields.{k} must be a field name (a non-empty string), got {_short(v)}")
        out[k] = v
    return out


def _rename(obj: Any, fields: Mapping[str, str]) -> Any:
    """``obj`` with the user's field names replaced by ours (top level and inside ``messages``)."""
    if not fields or not isinstance(obj, dict):
        return obj
    top = {k: v for k, v in fields.items() if k not in ("role", "content")}
    out = dict(obj)
    for ours, theirs in top.items():
        if theirs in out and ours != theirs:
            out[ours] = out.pop(theirs)
    inner = {k: fields[k] for k in ("role", "content") if k in fields and fields[k] != k}
    msgs = out.get("messages")
    if inner and isinstance(msgs, list):
        renamed = []
        for m in msgs:
            if isinstance(m, dict):
                m = dict(m)
                for ours, theirs in inner.items():
                    if theirs in m:
                        m[ours] = m.pop(theirs)
            renamed.append(m)
        out["messages"] = renamed
    return out


def normalize_record(obj: Any, where: str, fields: Mapping[str, str] | None = None) -> Record:
    """Normalise one raw record (see module docstring); ``where`` is used in error messages.

    Assistant turns, ``response`` and ``text`` must be non-empty strings (the text trained on);
    system / user turns and ``prompt`` may be empty strings.

    Raises:
        DataError: naming ``where``, the field and what was expected.
    """
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with 'messages', 'prompt'+'response' or 'text', got "
                        f"{_kind(obj)} {_short(obj)}")
    obj = _rename(obj, fields or {})
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
    mapped = f" (after renaming by fields {dict(fields)})" if fields else ""
    raise DataError(
        f"{where}: record has keys {sorted(map(str, obj))[:10]}{mapped}; expected 'messages', "
        "'prompt'+'response', or 'text' (map your field names with the domain's fields setting)"
    )


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# ---- chunks: the unit of work of a build -------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """Raw records in file order: ``kind`` ``"lines"`` (``items`` = ``(line number, bytes, ended by
    a newline)`` of the JSONL file ``where``), ``"rows"`` (``items`` = ``(where, object)``) or
    ``"records"`` (``items`` = :class:`Record` s, generated)."""

    kind: str
    where: str
    items: tuple[Any, ...]


def _lines(f: Any, path: Path) -> Iterable[tuple[int, bytes, bool]]:
    """``(line number, bytes without the newline, ended by a newline)``; refuses over-long lines
    after reading at most ``MAX_LINE_BYTES`` + 1 bytes of them; skips a leading UTF-8 BOM."""
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
        if lineno == 1 and line.startswith(_BOM):
            line = line[len(_BOM):]
        ended = line.endswith(b"\n")
        yield lineno, line.rstrip(b"\r\n") if ended else line, ended


def _open_jsonl(path: Path) -> Any:
    try:
        return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot be read: {e.strerror or e}") from None


def _jsonl_chunks(path: Path, rows: int) -> Iterator[Chunk]:
    with _open_jsonl(path) as f:
        buf: list[tuple[int, bytes, bool]] = []
        try:
            for item in _lines(f, path):
                buf.append(item)
                if len(buf) >= rows:
                    yield Chunk("lines", str(path), tuple(buf))
                    buf = []
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise DataError(f"{path}: the gzip stream is damaged or cut short ({e}); expected a whole .jsonl.gz "
                            "file") from None
        except OSError as e:
            raise DataError(f"{path}: cannot be read: {e.strerror or e}") from None
        if buf:
            yield Chunk("lines", str(path), tuple(buf))


def _arrow_batches(path: Path, rows: int) -> Iterator[Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if path.suffix == ".parquet":
            yield from pq.ParquetFile(path).iter_batches(batch_size=rows)
            return
        try:
            reader: Any = pa.ipc.open_stream(pa.memory_map(str(path)))
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(pa.memory_map(str(path)))
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)
            return
        yield from reader
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable {path.suffix[1:]} file ({e}); expected a "
                        f"{'Parquet' if path.suffix == '.parquet' else 'Arrow IPC'} file") from None


def _columnar_chunks(path: Path, rows: int) -> Iterator[Chunk]:
    row = 0
    for batch in _arrow_batches(path, rows):
        for start in range(0, batch.num_rows, rows):
            part = batch.slice(start, rows).to_pylist()
            yield Chunk("rows", str(path), tuple((f"{path} row {row + i}", obj) for i, obj in enumerate(part)))
            row += len(part)


def _is_hf_dir(p: Path) -> bool:
    return (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()


def _hf_train_dir(p: Path) -> Path:
    """The folder of the ``train`` split of a ``save_to_disk`` folder (itself for a ``Dataset``)."""
    dd = p / "dataset_dict.json"
    if not dd.exists():
        return p
    try:
        splits = json.loads(dd.read_text()).get("splits", [])
    except (json.JSONDecodeError, OSError, AttributeError) as e:
        raise DataError(f"{dd}: not a valid dataset_dict.json ({e})") from None
    if "train" not in splits:
        raise DataError(f"{p}: DatasetDict without a 'train' split (has {splits})")
    return p / "train"


def _hf_arrow_files(p: Path) -> list[Path]:
    d = _hf_train_dir(p)
    state = d / "state.json"
    if state.exists():
        try:
            names = [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
        except (json.JSONDecodeError, OSError, KeyError, TypeError) as e:
            raise DataError(f"{state}: not a valid Hugging Face state.json ({e})") from None
        return [d / n for n in names]
    files = sorted(d.glob("*.arrow"))
    if not files:
        raise DataError(f"{d}: Hugging Face dataset folder without .arrow files")
    return files


def _supported(p: Path) -> bool:
    return p.name.endswith(JSONL_SUFFIXES) or p.suffix in COLUMNAR_SUFFIXES


def source_files(path: str | Path) -> list[Path]:
    """The data files ``path`` stands for, in reading order (what a domain's fingerprint hashes).

    Raises:
        DataError: a missing path, an unsupported file type, a folder with nothing to read.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"data path {str(p)!r} does not exist")
    if p.is_dir():
        if _is_hf_dir(p):
            return _hf_arrow_files(p)
        files = sorted(f for f in p.iterdir() if f.is_file() and _supported(f))
        subdirs = sorted(f for f in p.iterdir() if f.is_dir() and _is_hf_dir(f))
        out = files + [x for s in subdirs for x in _hf_arrow_files(s)]
        if not out:
            raise DataError(f"data folder {str(p)!r} has no .jsonl, .jsonl.gz, .parquet or .arrow files and is not "
                            "a Hugging Face dataset folder")
        return out
    if not _supported(p):
        raise DataError(f"data file {str(p)!r}: unsupported type; expected .jsonl, .jsonl.gz, .parquet or .arrow "
                        "(or a folder of them, or a Hugging Face save_to_disk folder)")
    return [p]


def iter_chunks(path: str | Path, rows: int = 2048) -> Iterator[Chunk]:
    """Raw chunks of at most ``rows`` records of every file of ``path``, in order."""
    for f in source_files(path):
        yield from (_jsonl_chunks(f, rows) if f.name.endswith(JSONL_SUFFIXES) else _columnar_chunks(f, rows))


def normalize_chunk(chunk: Chunk, fields: Mapping[str, str] | None = None) -> list[Record]:
    """The records of one chunk (blank JSONL lines are skipped).

    Raises:
        DataError: naming the file, the line or row, and what was expected.
    """
    if chunk.kind == "records":  # already normalised (generated built-ins)
        return list(chunk.items)
    if chunk.kind == "rows":
        return [normalize_record(obj, where, fields) for where, obj in chunk.items]
    path = chunk.where
    out: list[Record] = []
    for lineno, raw, ended in chunk.items:
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
        out.append(normalize_record(obj, f"{path}:{lineno}", fields))
    return out


def iter_records(path: str | Path, fields: Mapping[str, str] | None = None) -> Iterator[Record]:
    """Every record of ``path``, in order, one chunk in memory at a time."""
    for chunk in iter_chunks(path):
        yield from normalize_chunk(chunk, fields)


def read_jsonl(path: Path) -> list[Record]:
    """Read one JSONL file (``.gz`` too); blank lines are skipped.

    Raises:
        DataError: naming the file, the line and what was expected (see the module docstring).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: cannot be read: {'no such file' if not p.exists() else 'not a file'}")
    return [r for c in _jsonl_chunks(p, 2048) for r in normalize_chunk(c)]


def load_path(path: str | Path, fields: Mapping[str, str] | None = None) -> list[Record]:
    """All records of a file, folder or local HF dataset, in memory (small data; see :func:`iter_records`)."""
    return list(iter_records(path, fields))


def _name_seed(name: str, salt: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{salt}:{name}".encode()).digest()[:8], "little")


def split_dev_indices(name: str, n: int, fraction: float) -> np.ndarray:
    """Sorted indices of the held-out examples among ``n``: a fixed permutation keyed by the domain
    name. At least one training example is kept; ``n`` ≥ 2 and ``fraction > 0`` give at least one
    dev example."""
    if fraction <= 0 or n < 2:
        return np.zeros(0, dtype=np.int64)
    n_dev = min(n - 1, max(1, round(fraction * n)))
    perm = np.random.Generator(np.random.Philox(_name_seed(name, "dev"))).permutation(n)
    return np.sort(perm[:n_dev]).astype(np.int64)


def split_dev(name: str, records: list[Record], fraction: float) -> tuple[list[Record], list[Record]]:
    """Deterministic held-out split (:func:`split_dev_indices`); both parts keep record order."""
    dev_idx = split_dev_indices(name, len(records), fraction)
    if not len(dev_idx):
        return list(records), []
    is_dev = np.zeros(len(records), dtype=bool)
    is_dev[dev_idx] = True
    return [r for r, d in zip(records, is_dev) if not d], [r for r, d in zip(records, is_dev) if d]
