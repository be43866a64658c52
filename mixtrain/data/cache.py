"""The token cache: every domain tokenised once per fingerprint into memory-mapped arrays.

Layout under ``data.cache_dir`` (default ``$MIXTRAIN_DATA_CACHE``, else ``$MIXTRAIN_HOME/data``), one
folder per domain::

    <name>-<fingerprint[:16]>/
        manifest.json                what was built from what: sizes, checksums, statistics
        <part>.ids.bin               token ids of every example, concatenated (uint16 when the
                                     vocabulary fits, else uint32)
        <part>.mask.bin              uint8, 1 where the token is trained on (its label is its id)
        <part>.offsets.bin           int64 [n + 1]: example i is ids[offsets[i]:offsets[i + 1]]
        <part>.ntrained.bin          int32 [n]: trained labels after the causal shift
        <part>.flags.bin             uint8 [n]: 1 = cut at max_length, 2 = and no trained label left
        <part>.records.jsonl         the normalised record of every example (read back by index)
        <part>.recoffsets.bin        int64 [n + 1]: byte offsets of the records

``<part>`` is ``all`` (split into train / dev by ``data.dev_fraction`` when mapped) or ``train``
and ``dev`` (a domain with an explicit dev path).

The **fingerprint** hashes exactly what determines the tokens, as explicit strings: the format
version, the domain's identity (built-in generator, size, seed and version; or each source file's
path, size and content hash, and the field renaming), the dev split settings, the tokenizer's
files and chat template, ``max_length`` and ``train_on_prompt``. A changed source or setting is a
new folder; the old one stays until removed (``mixtrain data clean``).

**Safety.** A domain is built in a temporary folder beside its final one and renamed into place
after its manifest is written, so a folder with the final name is always whole. Every run checks
the manifest when it maps the files (sizes, then a 64-bit xxHash of every file: about 0.1 s per
GB on one core); a folder that fails is moved aside and rebuilt, with a warning naming the file.
Builders of the same domain (the ranks of one node, or two runs) take a file lock: one builds, the
others wait and then map what it built, so each record is tokenised once per fingerprint. A full
disk or a killed build leaves only a temporary folder, removed by the next build.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .domains import DomainSpec
from .sources import Chunk, DataError, Record, normalize_chunk, split_dev_indices
from .tokenizer import (
    ByteTokenizer,
    EncodedBatch,
    HFTokenizer,
    encode_batch,
    load_tokenizer,
    tokenizer_identity,
)

__all__ = [
    "FORMAT_VERSION",
    "BuildReport",
    "CachedDomain",
    "Part",
    "default_cache_dir",
    "prepare_domains",
]

FORMAT_VERSION = 1
log = logging.getLogger("mixtrain")

FLAG_CUT = 1
FLAG_NO_TARGET = 2
_HASH_BLOCK = 8 << 20


def available_cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_cache_dir() -> Path:
    """``$MIXTRAIN_DATA_CACHE`` if set, else ``$MIXTRAIN_HOME/data``."""
    from ..models import cache_root

    env = os.environ.get("MIXTRAIN_DATA_CACHE")
    return Path(env).expanduser() if env else cache_root() / "data"


def _file_hash(path: Path, bits: int = 64) -> str:
    """xxHash (xxh3, 64 or 128 bits) of a file, read in blocks (no memory map: the pages do not
    count towards the process's resident memory)."""
    import xxhash

    h = xxhash.xxh3_64() if bits == 64 else xxhash.xxh3_128()
    buf = bytearray(max(1, min(_HASH_BLOCK, path.stat().st_size)))
    view = memoryview(buf)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def fingerprint_inputs(spec: DomainSpec, tok: ByteTokenizer | HFTokenizer, *, max_length: int,
                       train_on_prompt: bool) -> dict[str, Any]:
    """Everything that determines a domain's cached tokens, as plain data (see the module docstring)."""
    files = {}
    for part, paths in spec.files().items():
        entries = []
        for p in paths:
            f = Path(p).resolve()
            try:
                entries.append({"path": str(f), "bytes": f.stat().st_size, "xxh3_128": _file_hash(f, 128)})
            except OSError as e:
                raise DataError(f"{f}: cannot be read: {e.strerror or e}") from None
        files[part] = entries
    return {
        "format": FORMAT_VERSION,
        "domain": spec.identity(),
        "files": files,
        "tokenizer": tokenizer_identity(tok),
        "max_length": max_length,
        "train_on_prompt": train_on_prompt,
    }


def fingerprint(inputs: dict[str, Any]) -> str:
    """sha256 of :func:`fingerprint_inputs` as canonical JSON."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ---- one stored part, mapped ----------------------------------------------------------------


_ARRAYS = {"ids": None, "mask": np.uint8, "offsets": np.int64, "ntrained": np.int32, "flags": np.uint8,
           "recoffsets": np.int64}


def _map(path: Path, dtype: Any, count: int) -> np.ndarray:
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


@dataclass
class Part:
    """The examples of one stored part: memory-mapped arrays (or in-memory ones, for small data).

    ``ids`` [T], ``mask`` [T] (1 = trained), ``offsets`` [n + 1], ``ntrained`` [n], ``flags`` [n];
    ``records`` / ``recoffsets``: where :meth:`record` reads example ``i`` back."""

    ids: np.ndarray
    mask: np.ndarray
    offsets: np.ndarray
    ntrained: np.ndarray
    flags: np.ndarray
    records: Path | list[Record] | None = None
    recoffsets: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """Tokens of each example (int64 [n])."""
        return np.diff(self.offsets)

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, labels)`` of example ``i`` as int64 arrays (labels ``-100`` where untrained)."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        ids = self.ids[a:b].astype(np.int64)
        return ids, np.where(self.mask[a:b] != 0, ids, -100)

    def record(self, i: int) -> Record:
        """The normalised record example ``i`` was made from."""
        if isinstance(self.records, list):
            return self.records[i]
        if self.records is None or self.recoffsets is None:
            raise ValueError("this part keeps no records")
        a, b = int(self.recoffsets[i]), int(self.recoffsets[i + 1])
        with open(self.records, "rb") as f:
            f.seek(a)
            return _record_from_json(f.read(b - a))

    @classmethod
    def from_batch(cls, batch: EncodedBatch, max_length: int, records: list[Record] | None = None) -> Part:
        """An in-memory part (no cache files)."""
        offsets = np.zeros(len(batch.lengths) + 1, dtype=np.int64)
        np.cumsum(batch.lengths, out=offsets[1:])
        return cls(batch.ids, batch.mask.astype(np.uint8), offsets, batch.n_trained.astype(np.int32),
                   _flags(batch, max_length), records)

    @classmethod
    def load(cls, folder: Path, part: str, manifest: dict[str, Any]) -> Part:
        """Map the files of ``part`` (already verified against ``manifest``)."""
        info = manifest["parts"][part]
        n, t = int(info["rows"]), int(info["tokens"])
        ids_dtype = np.dtype(manifest["ids_dtype"])
        counts = {"ids": t, "mask": t, "offsets": n + 1, "ntrained": n, "flags": n, "recoffsets": n + 1}
        arrays = {k: _map(folder / f"{part}.{k}.bin", ids_dtype if k == "ids" else dt, counts[k])
                  for k, dt in _ARRAYS.items()}
        if n == 0:
            arrays["offsets"] = np.zeros(1, dtype=np.int64)
            arrays["recoffsets"] = np.zeros(1, dtype=np.int64)
        return cls(arrays["ids"], arrays["mask"], arrays["offsets"], arrays["ntrained"], arrays["flags"],
                   folder / f"{part}.records.jsonl", arrays["recoffsets"])


def _flags(batch: EncodedBatch, max_length: int) -> np.ndarray:
    cut = batch.full_lengths > max_length
    return (cut * FLAG_CUT + (cut & (batch.n_trained == 0)) * FLAG_NO_TARGET).astype(np.uint8)


def _record_json(r: Record) -> bytes:
    row: list[Any] = [[list(m) for m in r.messages], r.plain_text]
    if r.meta is not None:
        row.append(r.meta)
    return json.dumps(row, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def _record_from_json(b: bytes) -> Record:
    row = json.loads(b)
    return Record(tuple((str(r), str(c)) for r, c in row[0]), bool(row[1]), row[2] if len(row) > 2 else None)


# ---- a domain, mapped -----------------------------------------------------------------------


@dataclass
class CachedDomain:
    """A domain's parts and its train / dev split, as indices into them.

    ``train`` / ``dev``: ``(part, index)`` with ``index`` int64 positions of the part's examples."""

    name: str
    folder: Path | None
    manifest: dict[str, Any]
    train: tuple[Part, np.ndarray]
    dev: tuple[Part, np.ndarray]
    status: str = "cached"
    parts: dict[str, Part] | None = None

    @property
    def fingerprint(self) -> str:
        return str(self.manifest.get("fingerprint", ""))

    @classmethod
    def from_parts(cls, name: str, parts: dict[str, Part], dev_fraction: float, folder: Path | None = None,
                   manifest: dict[str, Any] | None = None) -> CachedDomain:
        """Split ``all`` by ``dev_fraction`` (or take ``train`` / ``dev`` as they are)."""
        if "all" in parts:
            p = parts["all"]
            dev = split_dev_indices(name, len(p), dev_fraction)
            keep = np.ones(len(p), dtype=bool)
            keep[dev] = False
            return cls(name, folder, manifest or {}, (p, np.flatnonzero(keep)), (p, dev), parts=parts)
        return cls(name, folder, manifest or {}, (parts["train"], np.arange(len(parts["train"]))),
                   (parts["dev"], np.arange(len(parts["dev"]))), parts=parts)

    def stats(self) -> dict[str, int]:
        """Rows / tokens / truncated counts of the training split, rows of the dev split."""
        part, idx = self.train
        flags = np.asarray(part.flags)[idx]
        return {
            "rows": len(idx), "tokens": int(part.lengths[idx].sum()) if len(idx) else 0,
            "truncated": int(((flags & FLAG_CUT) != 0).sum()),
            "prompt_too_long": int(((flags & FLAG_NO_TARGET) != 0).sum()),
            "dev_rows": len(self.dev[1]),
        }


# ---- building -------------------------------------------------------------------------------


def _ids_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


_worker: dict[str, Any] = {}


def _worker_init(tokenizer_spec: str) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _worker["tok"] = load_tokenizer(tokenizer_spec)


def _encode_chunk(task: tuple[Chunk, dict[str, str], int, bool, str]) -> tuple[Any, ...]:
    """Worker: parse, normalise and tokenise one chunk; arrays ready to append to the files."""
    chunk, fields, max_length, train_on_prompt, dtype = task
    recs = normalize_chunk(chunk, fields)
    b = encode_batch(_worker["tok"], recs, max_length=max_length, train_on_prompt=train_on_prompt)
    return (b.ids.astype(dtype), b.mask.astype(np.uint8), b.lengths, b.n_trained.astype(np.int32),
            _flags(b, max_length), [_record_json(r) for r in recs])


class _Writer:
    """Appends encoded chunks of one part to its files in a build folder."""

    def __init__(self, folder: Path, part: str) -> None:
        self.folder, self.part = folder, part
        self.files = {k: open(folder / f"{part}.{k}.bin", "wb") for k in _ARRAYS}  # noqa: SIM115
        self.files["records"] = open(folder / f"{part}.records.jsonl", "wb")  # noqa: SIM115
        self.rows = self.tokens = self.rec_bytes = 0
        self._write("offsets", np.zeros(1, dtype=np.int64))
        self._write("recoffsets", np.zeros(1, dtype=np.int64))

    def _write(self, key: str, arr: np.ndarray) -> None:
        if len(arr):
            self.files[key].write(memoryview(np.ascontiguousarray(arr)).cast("B"))

    def add(self, ids: np.ndarray, mask: np.ndarray, lengths: np.ndarray, ntrained: np.ndarray,
            flags: np.ndarray, records: list[bytes]) -> None:
        self._write("ids", ids)
        self._write("mask", mask)
        self._write("offsets", self.tokens + np.cumsum(lengths, dtype=np.int64))
        self._write("ntrained", ntrained)
        self._write("flags", flags)
        sizes = np.fromiter((len(r) for r in records), dtype=np.int64, count=len(records))
        self._write("recoffsets", self.rec_bytes + np.cumsum(sizes))
        self.files["records"].write(b"".join(records))
        self.rows += len(lengths)
        self.tokens += int(lengths.sum())
        self.rec_bytes += int(sizes.sum())

    def close(self) -> None:
        # no fsync: a folder whose files did not reach the disk (a crash) fails its manifest's
        # sizes or checksums when it is mapped, and is rebuilt
        for f in self.files.values():
            f.close()


@dataclass
class BuildReport:
    """What :func:`prepare_domains` did for one domain."""

    name: str
    status: str  # "built" | "cached" | "rebuilt"
    folder: Path
    seconds: float
    stats: dict[str, int]


class _Pool:
    """Worker processes (spawned on first use, shared by every domain of one prepare call)."""

    def __init__(self, workers: int, tok: ByteTokenizer | HFTokenizer) -> None:
        self.workers, self.tok, self.pool = workers, tok, None
        self.spec = tok.name if isinstance(tok, HFTokenizer) else "byte"

    def map_ordered(self, fn: Callable[[Any], Any], tasks: Iterator[Any], inline: bool) -> Iterator[Any]:
        """``fn`` over ``tasks`` in order, at most 2 tasks per worker in flight (memory stays flat);
        ``inline``: in this process (small domains: starting workers would cost more)."""
        if inline or self.workers <= 1:
            _worker["tok"] = self.tok
            yield from map(fn, tasks)
            return
        if self.pool is None:
            import multiprocessing as mp

            self.pool = mp.get_context("spawn").Pool(self.workers, initializer=_worker_init, initargs=(self.spec,))
        pending: deque[Any] = deque()
        for t in tasks:
            pending.append(self.pool.apply_async(fn, (t,)))
            if len(pending) >= 2 * self.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


_INLINE_ROWS = 20_000


def _small(spec: DomainSpec) -> bool:
    """Few enough rows that this process tokenises them faster than worker processes start."""
    if spec.kind == "builtin":
        return spec.size < _INLINE_ROWS
    if spec.kind == "task":
        return True  # records come from one in-memory reader; tokenising them is the cheap part
    return sum(Path(f).stat().st_size for fs in spec.files().values() for f in fs) < _INLINE_ROWS * 200


def _build(spec: DomainSpec, folder: Path, inputs: dict[str, Any], fp: str, tok: ByteTokenizer | HFTokenizer,
           pool: _Pool, max_length: int, train_on_prompt: bool, progress: Any) -> dict[str, Any]:
    """Build ``spec`` into ``folder`` (a fresh temporary folder); returns the manifest."""
    dtype = _ids_dtype(tok.vocab_size)
    t0 = time.perf_counter()
    parts: dict[str, Any] = {}
    for part, stream in spec.streams().items():
        w = _Writer(folder, part)
        cut = dead = 0
        try:
            tasks = ((c, dict(spec.fields), max_length, train_on_prompt, dtype.str) for c in stream())
            for res in pool.map_ordered(_encode_chunk, tasks, inline=_small(spec)):
                w.add(*res)
                cut += int(((res[4] & FLAG_CUT) != 0).sum())
                dead += int(((res[4] & FLAG_NO_TARGET) != 0).sum())
                if progress is not None:
                    progress.update(len(res[2]))
        finally:
            w.close()
        parts[part] = {"rows": w.rows, "tokens": w.tokens, "truncated": cut, "prompt_too_long": dead}
    files = {}
    for f in sorted(folder.iterdir()):
        files[f.name] = {"bytes": f.stat().st_size, "xxh3_64": _file_hash(f)}
    manifest = {
        "format": FORMAT_VERSION, "domain": spec.name, "fingerprint": fp, "inputs": inputs,
        "ids_dtype": dtype.str, "parts": parts, "files": files,
        "build_seconds": round(time.perf_counter() - t0, 3), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    tmp = folder / "manifest.json.tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, folder / "manifest.json")
    return manifest


def verify(folder: Path, fp: str) -> tuple[dict[str, Any] | None, str | None]:
    """``(manifest, None)`` if ``folder`` holds a whole, unchanged build of fingerprint ``fp``;
    else ``(None, what is wrong)`` (``None, None``: nothing there)."""
    mf = folder / "manifest.json"
    if not folder.exists():
        return None, None
    try:
        manifest = json.loads(mf.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return None, f"{mf}: unreadable manifest ({e})"
    if not isinstance(manifest, dict) or manifest.get("fingerprint") != fp or manifest.get("format") != FORMAT_VERSION:
        return None, f"{mf}: manifest of another build (fingerprint or format differs)"
    files = manifest.get("files")
    if not isinstance(files, dict):
        return None, f"{mf}: manifest lists no files"
    for name, info in files.items():
        f = folder / name
        try:
            size = f.stat().st_size
        except OSError:
            return None, f"{f}: missing"
        if size != info.get("bytes"):
            return None, f"{f}: {size} bytes, the manifest says {info.get('bytes')}"
        if _file_hash(f) != info.get("xxh3_64"):
            return None, f"{f}: checksum differs from the manifest (the file is corrupt)"
    return manifest, None


def _lock(folder: Path) -> Any:
    from filelock import FileLock

    return FileLock(str(folder.parent / f".{folder.name}.lock"))


def _clear_stale(folder: Path) -> None:
    """Remove earlier builds' temporary folders of this domain (only the lock holder builds)."""
    for p in folder.parent.glob(f".{folder.name}.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def _prepare_one(spec: DomainSpec, tok: ByteTokenizer | HFTokenizer, cache_dir: Path, *, max_length: int,
                 train_on_prompt: bool, pool: _Pool, progress: Callable[[str, int], Any]) -> CachedDomain:
    inputs = fingerprint_inputs(spec, tok, max_length=max_length, train_on_prompt=train_on_prompt)
    fp = fingerprint(inputs)
    folder = cache_dir / f"{spec.name}-{fp[:16]}"
    t0 = time.perf_counter()
    manifest, problem = verify(folder, fp)
    status = "cached"
    if manifest is None:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(f"data.cache_dir: cannot create {cache_dir}: {e.strerror or e}") from None
        with _lock(folder):
            manifest, problem = verify(folder, fp)  # another process may have built it meanwhile
            if manifest is None:
                if problem is not None:
                    log.warning("token cache of domain %r is damaged: %s; rebuilding it", spec.name, problem)
                    bad = folder.parent / f".{folder.name}.bad-{os.getpid()}-{time.time_ns()}"
                    os.replace(folder, bad)
                    shutil.rmtree(bad, ignore_errors=True)
                _clear_stale(folder)
                tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{time.time_ns()}"
                tmp.mkdir()
                bar = progress(spec.name, spec.size if spec.kind == "builtin" else 0)
                try:
                    manifest = _build(spec, tmp, inputs, fp, tok, pool, max_length, train_on_prompt, bar)
                    os.replace(tmp, folder)
                except OSError as e:
                    shutil.rmtree(tmp, ignore_errors=True)
                    if e.filename is not None and not str(e.filename).startswith(str(tmp)):
                        raise DataError(f"domain {spec.name!r}: {e.filename}: {e.strerror or e}") from None
                    raise DataError(
                        f"domain {spec.name!r}: cannot write its token cache in {cache_dir}: {e.strerror or e}; free "
                        "some space or set data.cache_dir to a disk with room (nothing partial was kept)"
                    ) from None
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
                finally:
                    if bar is not None:
                        bar.close()
                status = "rebuilt" if problem is not None else "built"
    parts = {p: Part.load(folder, p, manifest) for p in manifest["parts"]}
    dom = CachedDomain.from_parts(spec.name, parts, spec.dev_fraction, folder, manifest)
    dom.status = status
    dom.manifest["seconds"] = round(time.perf_counter() - t0, 3)
    return dom


def _tqdm_progress(enabled: bool) -> Callable[[str, int], Any]:
    def make(name: str, total: int) -> Any:
        if not enabled:
            return None
        from tqdm import tqdm

        return tqdm(total=total or None, desc=f"tokenising {name}", unit=" rows", unit_scale=True, leave=False,
                    file=sys.stderr, mininterval=0.5)
    return make


def prepare_domains(
    specs: Sequence[DomainSpec],
    tok: ByteTokenizer | HFTokenizer,
    *,
    cache_dir: str | Path | None,
    max_length: int,
    train_on_prompt: bool,
    num_workers: int | None = None,
    progress: bool = False,
) -> list[CachedDomain]:
    """Map every domain's cache, building (under a lock, ``num_workers`` processes; default all
    cores) what is missing or damaged.

    Raises:
        DataError: bad or unreadable source data (naming file and line), a full disk, an empty domain.
    """
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    pool = _Pool(num_workers or available_cores(), tok)
    out = []
    try:
        for s in specs:
            dom = _prepare_one(s, tok, root, max_length=max_length, train_on_prompt=train_on_prompt, pool=pool,
                               progress=_tqdm_progress(progress))
            if not len(dom.train[1]):
                raise DataError(f"domain {s.name!r} is empty (no training examples)")
            out.append(dom)
    finally:
        pool.close()
    return out


def cache_folder(spec: DomainSpec, tok: ByteTokenizer | HFTokenizer, data: Any) -> tuple[Path, bool]:
    """Where ``spec``'s cache lives under the ``data`` settings, and whether a whole build is there
    (without verifying checksums)."""
    root = Path(data.cache_dir).expanduser() if data.cache_dir else default_cache_dir()
    fp = fingerprint(fingerprint_inputs(spec, tok, max_length=data.max_length, train_on_prompt=data.train_on_prompt))
    folder = root / f"{spec.name}-{fp[:16]}"
    return folder, (folder / "manifest.json").is_file()
