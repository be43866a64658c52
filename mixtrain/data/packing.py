"""Rows a domain trains on: cached examples one per row, or packed whole into rows.

A row keeps exactly one domain, so per-domain signals stay exact. Rows are views over the token
cache's arrays (:class:`~mixtrain.data.cache.Part`): nothing per token or per example is held in
Python objects; ``rows[i]`` reads row ``i`` when it is asked for.

Packing (``data.packing: true``, padding-free / varlen) puts whole examples of a domain into rows
of at most ``max_length`` tokens by **best-fit decreasing** (:func:`pack_bfd`): examples are taken
longest first (ties in an order drawn from the seed) and each goes into the open row with the
least room that still holds it, else a new row. An example is never split across rows; one
longer than ``max_length`` was already cut at ``max_length`` by the cache, as without packing (and
counted per domain). Each row carries per-token position ids restarting at 0 at every example,
the first token of every example is never a target (with unshifted HF labels it would be
predicted from the previous example's last token), and the model attends only within an example
(:func:`~mixtrain.data.collate.packed_attention_inputs`): a packed row gives, token for token, the
losses of its examples run one at a time.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .cache import CachedDomain, Part
from .sources import Domain, Record
from .tokenizer import IGNORE_INDEX, ByteTokenizer, HFTokenizer, encode_batch

__all__ = ["EncodedDomain", "Rows", "encode_domains", "encode_records", "pack_bfd", "pack_rows", "rows_of"]

Row = tuple[Any, Any]
log = logging.getLogger("mixtrain")


def pack_bfd(lengths: np.ndarray, max_length: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit-decreasing packing of examples of ``lengths`` tokens (each ≤ ``max_length``).

    Returns ``(row_offsets, items)``: row ``r`` holds examples ``items[row_offsets[r]:row_offsets[r + 1]]``
    (positions in ``lengths``), longest first. Deterministic in ``seed`` (which breaks ties).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    if n and int(lengths.max()) > max_length:
        raise ValueError(f"pack_bfd: an example has {int(lengths.max())} tokens, more than max_length={max_length}")
    tie = np.random.Generator(np.random.Philox(seed)).permutation(n)
    order = np.lexsort((tie, -lengths))
    caps: list[int] = []  # sorted room left in open rows that have any
    rows_at: dict[int, list[int]] = {}
    row_of = np.empty(n, dtype=np.int64)
    n_rows = 0
    lens = lengths.tolist()
    for e in order.tolist():
        need = lens[e]
        j = bisect.bisect_left(caps, need)
        if j == len(caps):
            r, room = n_rows, max_length - need
            n_rows += 1
        else:
            c = caps[j]
            at = rows_at[c]
            r = at.pop()
            if not at:
                del rows_at[c]
                caps.pop(j)
            room = c - need
        row_of[e] = r
        if room > 0:
            at = rows_at.get(room)
            if at is None:
                rows_at[room] = [r]
                bisect.insort(caps, room)
            else:
                at.append(r)
    items = order[np.argsort(row_of[order], kind="stable")]
    offsets = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(row_of, minlength=n_rows), out=offsets[1:])
    return offsets, items


class Rows(Sequence):
    """The rows of one split: ``examples`` (int64 positions in ``part``) one per row, or, with
    ``row_offsets``, packed: row ``r`` = examples ``examples[row_offsets[r]:row_offsets[r + 1]]``.

    ``rows[i]`` is ``(input_ids, labels)`` as int64 numpy arrays; a slice gives a list of rows."""

    def __init__(self, part: Part, examples: np.ndarray, row_offsets: np.ndarray | None = None) -> None:
        self.part = part
        self.examples = np.asarray(examples, dtype=np.int64)
        self.row_offsets = row_offsets

    @property
    def packed(self) -> bool:
        return self.row_offsets is not None

    def __len__(self) -> int:
        return len(self.examples) if self.row_offsets is None else len(self.row_offsets) - 1

    def _members(self, i: int) -> np.ndarray:
        assert self.row_offsets is not None
        return self.examples[self.row_offsets[i]:self.row_offsets[i + 1]]

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} out of range for {len(self)} rows")
        if self.row_offsets is None:
            return self.part.example(int(self.examples[i]))
        parts = [self.part.example(int(e)) for e in self._members(i)]
        for _, lab in parts:
            lab[:1] = IGNORE_INDEX
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def positions(self, i: int) -> np.ndarray | None:
        """Position ids of packed row ``i`` (restarting at 0 at each example); ``None`` unpacked."""
        if self.row_offsets is None:
            return None
        lens = self.part.lengths[self._members(i)]
        return np.arange(int(lens.sum()), dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)

    def _per_row(self, per_example: np.ndarray) -> np.ndarray:
        v = np.asarray(per_example, dtype=np.int64)[self.examples]
        if self.row_offsets is None:
            return v
        if not len(v):
            return np.zeros(len(self), dtype=np.int64)
        return np.add.reduceat(v, self.row_offsets[:-1])

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per row (int64)."""
        return self._per_row(self.part.lengths)

    @property
    def label_counts(self) -> np.ndarray:
        """Trained labels per row after the causal shift (int64)."""
        return self._per_row(self.part.ntrained)

    def record(self, i: int) -> Record:
        """The record of (unpacked) row ``i``, read back from the cache."""
        if self.row_offsets is not None:
            raise ValueError("record(): a packed row holds several records")
        return self.part.record(int(self.examples[i]))


class _Positions(Sequence):
    def __init__(self, rows: Rows) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self.rows.positions(j) for j in range(*i.indices(len(self)))]
        return self.rows.positions(i)


@dataclass
class EncodedDomain:
    """A tokenised domain: ``train`` / ``dev`` rows of ``(input_ids, labels)``.

    ``train`` / ``dev`` are :class:`Rows` (views over the cache) or plain lists of rows (small data,
    tests). ``train_positions``: position ids of packed training rows (parallel to ``train``),
    ``None`` unpacked. ``truncated``: training examples longer than ``max_length`` before the cut;
    ``prompt_too_long``: those of them whose prompt alone fills ``max_length`` (no trained token
    left). ``cache``: the cached domain the rows read from, if any.
    """

    name: str
    train: Sequence[Row]
    dev: Sequence[Row]
    records: Sequence[Record] | None = None
    train_positions: Sequence[Sequence[int]] | None = None
    truncated: int = 0
    prompt_too_long: int = 0
    cache: CachedDomain | None = None

    def __post_init__(self) -> None:
        if self.train_positions is None and isinstance(self.train, Rows) and self.train.packed:
            self.train_positions = _Positions(self.train)
        if self.train_positions is None or isinstance(self.train_positions, _Positions):
            return
        if len(self.train_positions) != len(self.train):
            raise ValueError(
                f"EncodedDomain {self.name!r}: train_positions has {len(self.train_positions)} rows but train has "
                f"{len(self.train)}"
            )
        for i, (pos, (ids, _)) in enumerate(zip(self.train_positions, self.train)):
            if len(pos) != len(ids):
                raise ValueError(
                    f"EncodedDomain {self.name!r}: train_positions[{i}] has {len(pos)} ids but train[{i}] has "
                    f"{len(ids)} tokens"
                )

    @property
    def size(self) -> int:
        """Number of training rows (what the sampler draws from)."""
        return len(self.train)

    def train_lengths(self) -> np.ndarray:
        """Tokens per training row."""
        if isinstance(self.train, Rows):
            return self.train.lengths
        return np.array([len(ids) for ids, _ in self.train], dtype=np.int64)

    def train_label_counts(self) -> np.ndarray:
        """Trained labels per training row after the causal shift (the loss's token count)."""
        if isinstance(self.train, Rows):
            return self.train.label_counts
        return np.array([int((np.asarray(lab[1:]) != IGNORE_INDEX).sum()) for _, lab in self.train], dtype=np.int64)


def rows_of(dom: CachedDomain, *, packing: bool, max_length: int, seed: int = 0,
            max_dev_examples: int | None = None) -> EncodedDomain:
    """The :class:`EncodedDomain` of a cached domain (dev rows: the first ``max_dev_examples``)."""
    part, idx = dom.train
    offsets = None
    if packing:
        offsets, items = pack_bfd(part.lengths[idx], max_length, seed)
        idx = idx[items]
    dpart, didx = dom.dev
    if max_dev_examples:
        didx = didx[:max_dev_examples]
    st = dom.stats()
    return EncodedDomain(dom.name, Rows(part, idx, offsets), Rows(dpart, didx), None, None, st["truncated"],
                         st["prompt_too_long"], dom)


def encode_records(
    tok: ByteTokenizer | HFTokenizer,
    records: Sequence[Record],
    *,
    max_length: int,
    train_on_prompt: bool,
    packing: bool = False,
) -> list[Row]:
    """Tokenise records (:func:`~mixtrain.data.tokenizer.encode_messages` of each, cut at
    ``max_length``) as ``(input_ids, labels)`` lists, optionally packed (:func:`pack_rows`)."""
    rows = encode_batch(tok, records, max_length=max_length, train_on_prompt=train_on_prompt).rows()
    return pack_rows(rows, max_length)[0] if packing else rows


def pack_rows(rows: Sequence[Row], max_length: int, seed: int = 0) -> tuple[list[Row], list[list[int]]]:
    """Pack examples ``(input_ids, labels)`` whole into rows of at most ``max_length`` tokens
    (:func:`pack_bfd`; longer examples are cut at ``max_length``). Returns ``(rows, position ids)``."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"pack_rows: max_length must be an int >= 2, got {max_length!r}")
    cut = []
    for i, (a, b) in enumerate(rows):
        if len(a) != len(b):
            raise ValueError(f"pack_rows: rows[{i}] has {len(a)} input ids but {len(b)} labels")
        if len(a):
            cut.append((list(a)[:max_length], list(b)[:max_length]))
    offsets, items = pack_bfd(np.array([len(a) for a, _ in cut], dtype=np.int64), max_length, seed)
    out: list[Row] = []
    pos: list[list[int]] = []
    for r in range(len(offsets) - 1):
        ids: list[int] = []
        labels: list[int] = []
        p: list[int] = []
        for e in items[offsets[r]:offsets[r + 1]].tolist():
            a, b = cut[e]
            ids += a
            labels += [IGNORE_INDEX, *b[1:]]
            p += range(len(a))
        out.append((ids, labels))
        pos.append(p)
    return out, pos


def encode_domains(
    domains: Sequence[Domain],
    tok: ByteTokenizer | HFTokenizer,
    *,
    max_length: int,
    train_on_prompt: bool = False,
    packing: bool = False,
    max_dev_examples: int | None = None,
    seed: int = 0,
) -> list[EncodedDomain]:
    """Tokenise in-memory domains (no cache files: small data, tests and notebooks; the loop reads
    configured domains through the token cache). Dev rows are never packed."""
    out = []
    for d in domains:
        train = Part.from_batch(encode_batch(tok, d.train, max_length=max_length, train_on_prompt=train_on_prompt),
                                max_length, list(d.train))
        dev_records = list(d.dev[:max_dev_examples] if max_dev_examples else d.dev)
        dev = Part.from_batch(encode_batch(tok, dev_records, max_length=max_length, train_on_prompt=train_on_prompt),
                              max_length, dev_records)
        cached = CachedDomain(d.name, None, {}, (train, np.arange(len(train))), (dev, np.arange(len(dev))))
        enc = rows_of(cached, packing=packing, max_length=max_length, seed=seed)
        enc.records = list(d.train)
        report_truncation(enc, max_length)
        out.append(enc)
    return out


def report_truncation(d: EncodedDomain, max_length: int) -> None:
    """Report per domain how many training examples ``max_length`` cuts and how many of them keep
    no trained token (their prompt alone fills it: they teach nothing but are still sampled). A
    warning when more than a quarter are cut or more than a tenth are left empty, else an info
    line when any is cut."""
    n = len(d.train.examples) if isinstance(d.train, Rows) else len(d.train)
    cut, dead = d.truncated, d.prompt_too_long
    if not n or not cut:
        return
    level = logging.WARNING if dead / n > 0.1 or cut / n > 0.25 else logging.INFO
    log.log(
        level, "domain %r: %d of %d rows reach max_length=%d (truncated) and %d have no trained token left "
        "(the prompt alone fills max_length)%s", d.name, cut, n, max_length, dead,
        "; raise data.max_length or shorten the records" if level == logging.WARNING else "",
    )
