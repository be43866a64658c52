"""GradientStore: per-example projected gradients on disk, in sharded memory-mapped files.

Layout of a store directory::

    manifest.json            {"format", "version", "dim", "dtype", "shard_rows", "domain_names",
                              "shards": [{"name": "shard-000000", "rows": n}, ...]}
    shard-000000.data        raw [rows, dim] array of ``dtype`` (row-major, native byte order)
    shard-000000.ids         int64 example ids, one per row
    shard-000000.dom         int64 domain codes, one per row

Crash safety: ``append`` writes the rows, ids and domains past the committed end of the last
shard, flushes and fsyncs them, and only then commits by writing a new manifest to a temporary
file and ``os.replace``-ing it over ``manifest.json`` (atomic on POSIX), then fsyncing the
directory. Readers trust only the row counts in the manifest, so a writer killed at any point
leaves every committed block intact; bytes it wrote past the committed end are ignored, and
truncated by the next ``append``. One writer at a time (readers may run concurrently).

Reads go through ``numpy.memmap`` views limited to the committed rows, so a GradEx pass over
100k+ examples streams from disk (``iter_blocks``) instead of holding everything in RAM.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

FORMAT = "mixkernels.GradientStore"
VERSION = 1
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_NP_STORAGE = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}  # bf16 kept as raw bits
MANIFEST = "manifest.json"


def _dtype_name(dtype: torch.dtype) -> str:
    for name, d in _DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"GradientStore: dtype must be one of {', '.join(_DTYPES)}, got {dtype}")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class GradientStore:
    """Append-only store of ``[B, dim]`` gradient blocks with int64 example ids and domain labels.

    Args:
        path: store directory; opened if it holds a manifest, else created.
        dim: K, the row width (must match an existing store).
        dtype: storage dtype, ``float16`` (default), ``bfloat16`` or ``float32``; must match an
            existing store.
        shard_rows: rows per shard file (new stores only; default: about 256 MiB per shard).
        durable: fsync data, ids, domains and the manifest on every append (default). ``False``
            keeps the write ordering but skips fsync (a killed *process* still cannot corrupt
            committed data; a power loss might).

    Domain labels are ints, or strings (mapped to ints by ``domain_names``); a store keeps the
    kind it was first given.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        dim: int,
        dtype: torch.dtype = torch.float16,
        *,
        shard_rows: int | None = None,
        durable: bool = True,
    ) -> None:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"GradientStore: dim must be an int >= 1, got {dim!r}")
        name = _dtype_name(dtype)
        self.path = Path(path)
        self.durable = durable
        self._maps: dict[int, tuple[int, np.ndarray, np.ndarray, np.ndarray]] = {}
        manifest_path = self.path / MANIFEST
        if manifest_path.exists():
            self._manifest = json.loads(manifest_path.read_text())
            if self._manifest.get("format") != FORMAT:
                raise ValueError(f"GradientStore: {manifest_path} is not a {FORMAT} manifest")
            if self._manifest["dim"] != dim or self._manifest["dtype"] != name:
                raise ValueError(
                    f"GradientStore: {self.path} holds dim={self._manifest['dim']} dtype={self._manifest['dtype']}, "
                    f"but dim={dim} dtype={name} was requested"
                )
        else:
            if shard_rows is None:
                shard_rows = max(1, (256 << 20) // (dim * torch.empty(0, dtype=dtype).element_size()))
            if not isinstance(shard_rows, int) or shard_rows < 1:
                raise ValueError(f"GradientStore: shard_rows must be an int >= 1, got {shard_rows!r}")
            self.path.mkdir(parents=True, exist_ok=True)
            self._manifest = {
                "format": FORMAT, "version": VERSION, "dim": dim, "dtype": name, "shard_rows": shard_rows,
                "domain_kind": None, "domain_names": [], "shards": [],
            }
            self._write_manifest()
        self.dim = dim
        self.dtype = dtype
        self._np_dtype = _NP_STORAGE[name]
        self._row_bytes = dim * np.dtype(self._np_dtype).itemsize
        self._id_index: dict[int, tuple[int, int]] | None = None

    # ---- metadata ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return sum(s["rows"] for s in self._manifest["shards"])

    def __repr__(self) -> str:
        return f"GradientStore({str(self.path)!r}, dim={self.dim}, dtype={self._manifest['dtype']}, rows={len(self)})"

    @property
    def domain_names(self) -> list[str]:
        """Names of string domain labels, indexed by their code (empty for int labels)."""
        return list(self._manifest["domain_names"])

    def refresh(self) -> None:
        """Re-read the manifest (a reader following a concurrent writer)."""
        self._manifest = json.loads((self.path / MANIFEST).read_text())
        self._id_index = None

    # ---- writing -----------------------------------------------------------------------------

    def _write_manifest(self) -> None:
        tmp = self.path / (MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            json.dump(self._manifest, f)
            f.flush()
            if self.durable:
                os.fsync(f.fileno())
        os.replace(tmp, self.path / MANIFEST)
        if self.durable:
            _fsync_dir(self.path)

    def _domain_codes(self, domains: object, b: int) -> np.ndarray:
        if isinstance(domains, torch.Tensor):
            if domains.is_floating_point() or domains.dim() != 1:
                raise ValueError(f"GradientStore.append: domains must be a 1-D integer tensor, got "
                                 f"{str(domains.dtype).removeprefix('torch.')} {tuple(domains.shape)}")
            values: list = domains.tolist()
        elif isinstance(domains, (str, int)):
            values = [domains] * b
        else:
            values = list(domains)
        if len(values) != b:
            raise ValueError(f"GradientStore.append: domains must have B = {b} labels, got {len(values)}")
        kind = "str" if values and isinstance(values[0], str) else "int"
        if any(isinstance(v, str) != (kind == "str") or isinstance(v, bool) for v in values):
            raise ValueError("GradientStore.append: domains must be all ints or all strings")
        known = self._manifest["domain_kind"]
        if values and known is not None and known != kind:
            raise ValueError(f"GradientStore.append: this store holds {known} domain labels, got {kind} labels")
        if values:
            self._manifest["domain_kind"] = kind
        if kind == "str":
            names = self._manifest["domain_names"]
            lookup = {n: i for i, n in enumerate(names)}
            codes = []
            for v in values:
                if v not in lookup:
                    lookup[v] = len(names)
                    names.append(v)
                codes.append(lookup[v])
            return np.asarray(codes, dtype=np.int64)
        return np.asarray(values, dtype=np.int64)

    def _shard_file(self, k: int, ext: str) -> Path:
        return self.path / f"{self._manifest['shards'][k]['name']}.{ext}"

    def _write_at(self, file: Path, offset: int, data: bytes) -> None:
        with open(file, "r+b" if file.exists() else "w+b") as f:
            f.truncate(offset)  # drops bytes a killed writer left past the committed end
            f.seek(offset)
            f.write(data)
            f.flush()
            if self.durable:
                os.fsync(f.fileno())

    def append(
        self,
        grads: torch.Tensor,
        ids: torch.Tensor | Sequence[int],
        domains: torch.Tensor | Sequence[int] | Sequence[str] | int | str,
    ) -> None:
        """Append ``grads [B, dim]`` (any float dtype; stored as ``dtype``) with unique int64 example
        ``ids [B]`` and ``domains [B]`` (or one label for the whole block). Committed on return."""
        if not isinstance(grads, torch.Tensor) or grads.dim() != 2 or grads.shape[1] != self.dim:
            shape = tuple(grads.shape) if isinstance(grads, torch.Tensor) else type(grads).__name__
            raise ValueError(f"GradientStore.append: grads must be a [B, dim = {self.dim}] tensor, got {shape}")
        if not grads.is_floating_point():
            raise ValueError(f"GradientStore.append: grads must be floating point, got {grads.dtype}")
        b = grads.shape[0]
        id_arr = (ids.detach().cpu() if isinstance(ids, torch.Tensor) else torch.as_tensor(list(ids)))
        if id_arr.dim() != 1 or id_arr.numel() != b or id_arr.is_floating_point():
            raise ValueError(f"GradientStore.append: ids must be {b} integers, got {tuple(id_arr.shape)} "
                             f"{str(id_arr.dtype).removeprefix('torch.')}")
        id_np = id_arr.to(torch.int64).numpy()
        index = self._index()
        if len(set(id_np.tolist())) != b:
            raise ValueError("GradientStore.append: ids has duplicates within the block")
        dup = [int(i) for i in id_np if int(i) in index]
        if dup:
            raise ValueError(f"GradientStore.append: ids already stored: {dup[:5]}")
        dom_np = self._domain_codes(domains, b)
        data = grads.detach().to("cpu", self.dtype).contiguous()
        data_np = data.view(torch.uint16).numpy() if self.dtype == torch.bfloat16 else data.numpy()
        shards = self._manifest["shards"]
        start = 0
        while start < b:
            if not shards or shards[-1]["rows"] >= self._manifest["shard_rows"]:
                shards.append({"name": f"shard-{len(shards):06d}", "rows": 0})
            k = len(shards) - 1
            rows = shards[k]["rows"]
            take = min(b - start, self._manifest["shard_rows"] - rows)
            self._write_at(self._shard_file(k, "data"), rows * self._row_bytes, data_np[start:start + take].tobytes())
            self._write_at(self._shard_file(k, "ids"), rows * 8, id_np[start:start + take].tobytes())
            self._write_at(self._shard_file(k, "dom"), rows * 8, dom_np[start:start + take].tobytes())
            for r in range(take):
                index[int(id_np[start + r])] = (k, rows + r)
            shards[k]["rows"] = rows + take
            start += take
        self._write_manifest()  # the commit point

    # ---- reading -----------------------------------------------------------------------------

    def _shard(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows = self._manifest["shards"][k]["rows"]
        cached = self._maps.get(k)
        if cached is None or cached[0] != rows:
            data = np.memmap(self._shard_file(k, "data"), dtype=self._np_dtype, mode="r", shape=(rows, self.dim))
            ids = np.memmap(self._shard_file(k, "ids"), dtype=np.int64, mode="r", shape=(rows,))
            dom = np.memmap(self._shard_file(k, "dom"), dtype=np.int64, mode="r", shape=(rows,))
            cached = (rows, data, ids, dom)
            self._maps[k] = cached
        return cached[1], cached[2], cached[3]

    def _to_tensor(self, arr: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.array(arr, copy=True))
        return t.view(torch.bfloat16) if self.dtype == torch.bfloat16 else t

    def _index(self) -> dict[int, tuple[int, int]]:
        if self._id_index is None:
            index: dict[int, tuple[int, int]] = {}
            for k, s in enumerate(self._manifest["shards"]):
                if s["rows"]:
                    for r, i in enumerate(self._shard(k)[1].tolist()):
                        index[i] = (k, r)
            self._id_index = index
        return self._id_index

    def ids(self) -> torch.Tensor:
        """int64 ``[len]`` example ids in storage order."""
        parts = [self._to_ids(self._shard(k)[1]) for k, s in enumerate(self._manifest["shards"]) if s["rows"]]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)

    def domains(self) -> torch.Tensor:
        """int64 ``[len]`` domain codes in storage order (index ``domain_names`` for string labels)."""
        parts = [self._to_ids(self._shard(k)[2]) for k, s in enumerate(self._manifest["shards"]) if s["rows"]]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)

    @staticmethod
    def _to_ids(arr: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(arr, copy=True))

    def get(self, ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Rows for example ``ids`` (in the given order), ``[n, dim]`` in the storage dtype."""
        wanted = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        index = self._index()
        missing = [i for i in wanted if i not in index]
        if missing:
            raise KeyError(f"GradientStore.get: ids not stored: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        out = np.empty((len(wanted), self.dim), dtype=self._np_dtype)
        for pos, i in enumerate(wanted):
            k, r = index[i]
            out[pos] = self._shard(k)[0][r]
        t = torch.from_numpy(out)
        return t.view(torch.bfloat16) if self.dtype == torch.bfloat16 else t

    def _domain_code(self, domain: int | str) -> int | None:
        if isinstance(domain, str):
            names = self._manifest["domain_names"]
            return names.index(domain) if domain in names else None
        return int(domain)

    def by_domain(self, domain: int | str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids [n], grads [n, dim])`` of every stored example with this domain label."""
        code = self._domain_code(domain)
        ids, rows = [], []
        for k, s in enumerate(self._manifest["shards"]):
            if not s["rows"] or code is None:
                continue
            data, sid, dom = self._shard(k)
            sel = np.nonzero(np.asarray(dom) == code)[0]
            if sel.size:
                ids.append(self._to_ids(sid[sel]))
                rows.append(self._to_tensor(data[sel]))
        if not rows:
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0, self.dim, dtype=self.dtype)
        return torch.cat(ids), torch.cat(rows)

    def iter_blocks(self, rows: int = 4096) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Stream ``(ids [n], domains [n], grads [n, dim])`` blocks of at most ``rows`` rows."""
        if rows < 1:
            raise ValueError(f"GradientStore.iter_blocks: rows must be >= 1, got {rows}")
        for k, s in enumerate(self._manifest["shards"]):
            if not s["rows"]:
                continue
            data, sid, dom = self._shard(k)
            for start in range(0, s["rows"], rows):
                stop = min(s["rows"], start + rows)
                yield self._to_ids(sid[start:stop]), self._to_ids(dom[start:stop]), self._to_tensor(data[start:stop])
