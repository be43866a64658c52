"""project / lift / projection_matrix, pure-PyTorch reference, and the counter-based hash.

Random projection matrices are never drawn from a stateful RNG. Entry ``R[i, j]`` is a pure
function of ``(seed, kind, nnz, out_dim, i, j)`` built from a 32-bit integer mixer, so every
backend (this reference, C++ CPU, CUDA, Triton) regenerates the very same matrix tile by tile,
and the matrix for a larger ``in_dim`` extends the smaller one (rows are independent of ``in_dim``).

The hash, in uint32 arithmetic (``mix`` is a two-multiply xorshift finaliser; ``lo``/``hi`` are
the 32-bit halves of a 64-bit integer)::

    key    = stream_key(seed, kind, nnz, out_dim)               (host side, once per call)
    row(i) = mix(mix(key ^ lo(i)) ^ hi(i))                       (once per row)
    col(c) = mix(c ^ 0x6A09E667)                                 (once per column word)
    word(i, c) = mix(row(i) + col(c))

Kinds (``s = 1/sqrt(out_dim)`` rounded to float32):

* ``rademacher``: ``R[i, j] = (-1)^bit * s`` with ``bit = (word(i, j >> 5) >> (j & 31)) & 1``
  (one hash per 32 entries);
* ``gaussian``: Box-Muller in float64 on ``h1 = word(i, j >> 1)``, ``h2 = mix(h1 ^ 0x5BE0CD19)``:
  ``u1 = ((h1 >> 8) + 0.5) / 2^24``, ``u2 = (h2 >> 8) / 2^24``, ``r = sqrt(-2 ln u1)``,
  ``z = r cos(2 pi u2)`` for even ``j`` and ``r sin(2 pi u2)`` for odd ``j``;
  ``R[i, j] = float32(z) * s``. (Only here do backends use transcendental functions; computing
  them in float64 and rounding to float32 makes all backends agree except with probability
  ~1e-8 per entry, where the float64 results of two libms straddle a float32 rounding boundary.)
* ``sjlt`` (sparse JL, Kane-Nelson block construction): the columns are split into ``nnz``
  blocks ``[floor(b * out_dim / nnz), floor((b + 1) * out_dim / nnz))``; row ``i`` has exactly one
  non-zero ``+-1/sqrt(nnz)`` per block, at offset ``((h >> 1) * len_b) >> 31`` with sign bit
  ``h & 1``, ``h = word(i, b)``.

The reference ``project``/``lift`` materialise ``R`` in row blocks of at most ``_BLOCK_ELEMS``
entries and multiply in float32; they are the oracle for the kernels and the fallback.
"""

from __future__ import annotations

import math

import torch

KINDS = ("rademacher", "gaussian", "sjlt")
_KIND_IDS = {"rademacher": 1, "gaussian": 2, "sjlt": 3}
MASK32 = 0xFFFFFFFF
_M1 = 0x7FEB352D
_M2 = 0x846CA68B
COL_SALT = 0x6A09E667
GAUSS_SALT = 0x5BE0CD19
_BLOCK_ELEMS = 1 << 22


# ---- the hash, on Python ints (host side) ------------------------------------------------------


def mix32(h: int) -> int:
    """The 32-bit finaliser on a Python int (host side; the same function as every kernel's)."""
    h &= MASK32
    h ^= h >> 16
    h = (h * _M1) & MASK32
    h ^= h >> 15
    h = (h * _M2) & MASK32
    h ^= h >> 16
    return h


def stream_key(seed: int, kind: str, nnz: int, out_dim: int) -> int:
    """32-bit key of one projection matrix: mixes the seed (64 bits), kind, nnz (sjlt only)
    and out_dim (64 bits). Rows and columns are hashed under this key."""
    k = mix32((seed & MASK32) ^ 0x243F6A88)
    k = mix32(k ^ ((seed >> 32) & MASK32))
    k = mix32(k ^ _KIND_IDS[kind])
    k = mix32(k ^ (nnz if kind == "sjlt" else 0))
    k = mix32(k ^ (out_dim & MASK32))
    return mix32(k ^ ((out_dim >> 32) & MASK32))


def scale_of(kind: str, out_dim: int, nnz: int) -> float:
    """The float32 entry scale: 1/sqrt(nnz) for sjlt, else 1/sqrt(out_dim)."""
    return float(torch.tensor(1.0 / math.sqrt(nnz if kind == "sjlt" else out_dim), dtype=torch.float32))


def sjlt_block(b: int, out_dim: int, nnz: int) -> tuple[int, int]:
    """Column range [lo, hi) of sjlt block ``b``."""
    return b * out_dim // nnz, (b + 1) * out_dim // nnz


# ---- the hash, on int64 tensors holding uint32 values ------------------------------------------


def _mul32(h: torch.Tensor, m: int) -> torch.Tensor:
    # (h * m) mod 2^32 without int64 overflow: split m into 16-bit halves.
    lo, hi = m & 0xFFFF, m >> 16
    return (h * lo + (((h * hi) & 0xFFFF) << 16)) & MASK32


def mix32_t(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, _M1)
    h = h ^ (h >> 15)
    h = _mul32(h, _M2)
    return h ^ (h >> 16)


def row_hash_t(key: int, rows: torch.Tensor) -> torch.Tensor:
    """row(i) for int64 row indices ``rows`` (any shape)."""
    return mix32_t(mix32_t(key ^ (rows & MASK32)) ^ ((rows >> 32) & MASK32))


def col_hash_t(cols: torch.Tensor) -> torch.Tensor:
    return mix32_t(cols ^ COL_SALT)


def word_t(row_h: torch.Tensor, col_h: torch.Tensor) -> torch.Tensor:
    return mix32_t((row_h + col_h) & MASK32)


# ---- the matrix ----------------------------------------------------------------------------------


def projection_block(
    row_start: int, rows: int, out_dim: int, *, seed: int, kind: str, nnz: int, device: torch.device | None = None
) -> torch.Tensor:
    """float32 ``R[row_start : row_start + rows, :]`` of the (seed, kind, nnz, out_dim) matrix."""
    device = torch.device("cpu") if device is None else torch.device(device)
    key = stream_key(seed, kind, nnz, out_dim)
    scale = scale_of(kind, out_dim, nnz)
    i = torch.arange(row_start, row_start + rows, dtype=torch.int64, device=device)
    rh = row_hash_t(key, i)[:, None]  # [rows, 1]
    if kind == "rademacher":  # one hash per 32 entries, then its bits
        words = word_t(rh, col_hash_t(torch.arange((out_dim + 31) // 32, dtype=torch.int64, device=device))[None, :])
        bits = (words[:, :, None] >> torch.arange(32, dtype=torch.int64, device=device)) & 1
        return (1 - 2 * bits.reshape(rows, -1)[:, :out_dim]).to(torch.float32) * scale
    if kind == "gaussian":  # one hash per pair of entries: (r cos, r sin)
        h1 = word_t(rh, col_hash_t(torch.arange((out_dim + 1) // 2, dtype=torch.int64, device=device))[None, :])
        h2 = mix32_t(h1 ^ GAUSS_SALT)
        u1 = ((h1 >> 8).to(torch.float64) + 0.5) * 2.0**-24
        u2 = (h2 >> 8).to(torch.float64) * 2.0**-24
        r = torch.sqrt(-2.0 * torch.log(u1))
        theta = (2.0 * math.pi) * u2
        z = torch.stack([r * torch.cos(theta), r * torch.sin(theta)], -1).reshape(rows, -1)[:, :out_dim]
        return z.to(torch.float32) * scale
    if kind == "sjlt":
        out = torch.zeros(rows, out_dim, dtype=torch.float32, device=device)
        blocks = torch.arange(nnz, dtype=torch.int64, device=device)
        lo = blocks * out_dim // nnz
        length = (blocks + 1) * out_dim // nnz - lo
        h = word_t(rh, col_hash_t(blocks)[None, :])  # [rows, nnz]
        cols = lo[None, :] + (((h >> 1) * length[None, :]) >> 31)
        vals = (1 - 2 * (h & 1)).to(torch.float32) * scale
        out.scatter_(1, cols, vals)
        return out
    raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")


def projection_matrix(
    in_dim: int, out_dim: int, *, seed: int, kind: str, nnz: int, row_offset: int = 0,
    device: torch.device | None = None,
) -> torch.Tensor:
    """float32 ``R[row_offset : row_offset + in_dim, :]``, built block by block."""
    if in_dim == 0:
        return torch.zeros(0, out_dim, dtype=torch.float32, device=device)
    step = max(1, _BLOCK_ELEMS // max(out_dim, 1))
    return torch.cat([
        projection_block(row_offset + s, min(step, in_dim - s), out_dim, seed=seed, kind=kind, nnz=nnz, device=device)
        for s in range(0, in_dim, step)
    ])


def project(x: torch.Tensor, out_dim: int, seed: int, kind: str, nnz: int, row_offset: int) -> torch.Tensor:
    """``float32(x[N, in_dim]) @ R[row_offset : row_offset + in_dim]`` -> float32 [N, out_dim]."""
    n, in_dim = x.shape
    y = torch.zeros(n, out_dim, dtype=torch.float32, device=x.device)
    step = max(1, _BLOCK_ELEMS // max(out_dim, 1))
    for s in range(0, in_dim, step):
        e = min(in_dim, s + step)
        r = projection_block(row_offset + s, e - s, out_dim, seed=seed, kind=kind, nnz=nnz, device=x.device)
        y += x[:, s:e].to(torch.float32) @ r
    return y


def lift(y: torch.Tensor, in_dim: int, seed: int, kind: str, nnz: int, row_offset: int) -> torch.Tensor:
    """``float32(y[N, out_dim]) @ R[row_offset : row_offset + in_dim].T`` -> float32 [N, in_dim]."""
    n, out_dim = y.shape
    x = torch.empty(n, in_dim, dtype=torch.float32, device=y.device)
    yf = y.to(torch.float32)
    step = max(1, _BLOCK_ELEMS // max(out_dim, 1))
    for s in range(0, in_dim, step):
        e = min(in_dim, s + step)
        r = projection_block(row_offset + s, e - s, out_dim, seed=seed, kind=kind, nnz=nnz, device=y.device)
        x[:, s:e] = yf @ r.T
    return x
