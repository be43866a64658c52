"""Pre-tokenised domains and batch collation.

Each domain is tokenised once up front into a list of ``(input_ids, labels)`` rows (at most
``max_length`` tokens). With ``packing`` the rows of a domain are concatenated (in record order)
and cut into ``max_length`` chunks; attention then spans example boundaries, the usual trade of
packed SFT without varlen kernels. A row keeps exactly one domain, so per-domain signals stay exact.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .sources import Domain, Record
from .tokenizer import IGNORE_INDEX, ByteTokenizer, HFTokenizer, encode_messages

__all__ = ["EncodedDomain", "collate", "encode_domains", "encode_records"]

Row = tuple[list[int], list[int]]

log = logging.getLogger("mixtrain")


@dataclass
class EncodedDomain:
    """A tokenised domain: ``train``/``dev`` rows of ``(input_ids, labels)``."""

    name: str
    train: list[Row]
    dev: list[Row]
    records: list[Record]

    @property
    def size(self) -> int:
        """Number of training rows (what the sampler draws from)."""
        return len(self.train)


def encode_records(
    tok: ByteTokenizer | HFTokenizer,
    records: Sequence[Record],
    *,
    max_length: int,
    train_on_prompt: bool,
    packing: bool = False,
) -> list[Row]:
    """Tokenise records (see :func:`mixtrain.data.tokenizer.encode_messages`), optionally packed."""
    rows = [
        encode_messages(
            tok, r.as_messages(), max_length=max_length if not packing else 1 << 30,
            train_on_prompt=train_on_prompt, plain_text=r.plain_text,
        )
        for r in records
    ]
    if not packing:
        return rows
    ids: list[int] = []
    labels: list[int] = []
    for a, b in rows:
        ids.extend(a)
        labels.extend(b)
    return [
        (ids[i : i + max_length], labels[i : i + max_length])
        for i in range(0, len(ids), max_length)
        if len(ids[i : i + max_length]) > 1
    ]


def encode_domains(
    domains: Sequence[Domain],
    tok: ByteTokenizer | HFTokenizer,
    *,
    max_length: int,
    train_on_prompt: bool = False,
    packing: bool = False,
    max_dev_examples: int | None = None,
) -> list[EncodedDomain]:
    """Tokenise every domain's train and dev records (dev is never packed)."""
    out = []
    for d in domains:
        train = encode_records(
            tok, d.train, max_length=max_length, train_on_prompt=train_on_prompt, packing=packing
        )
        dev_records = d.dev[:max_dev_examples] if max_dev_examples else d.dev
        dev = encode_records(tok, dev_records, max_length=max_length, train_on_prompt=train_on_prompt)
        if not packing:
            _warn_truncation(d.name, train, max_length)
        out.append(EncodedDomain(d.name, train, dev, list(d.train)))
    return out


def _warn_truncation(name: str, rows: Sequence[Row], max_length: int) -> None:
    """Warn when ``max_length`` cuts much of a domain: rows that reach it were (probably)
    truncated; rows left without a trained label token teach nothing but are still sampled."""
    if not rows:
        return
    cut = sum(1 for ids, _ in rows if len(ids) >= max_length)
    dead = sum(1 for _, lab in rows if all(x == IGNORE_INDEX for x in lab[1:]))
    if dead / len(rows) > 0.1 or cut / len(rows) > 0.25:
        log.warning(
            "domain %r: %d of %d rows reach max_length=%d (truncated) and %d have no trained token left; "
            "raise data.max_length or shorten the records", name, cut, len(rows), max_length, dead,
        )


def collate(
    rows: Sequence[Row],
    domain_ids: Sequence[int],
    pad_token_id: int,
    pad_to_multiple_of: int = 1,
) -> dict[str, torch.Tensor]:
    """Right-pad rows into a batch.

    Returns:
        ``input_ids`` [B, T] int64, ``attention_mask`` [B, T] int64, ``labels`` [B, T] int64
        (``-100`` on pads and untrained tokens; unshifted, HF style), ``domain_ids`` [B] int64.
    """
    if len(rows) != len(domain_ids):
        raise ValueError(f"collate: {len(rows)} rows but {len(domain_ids)} domain ids")
    if not rows:
        raise ValueError("collate: empty batch")
    t = max(len(r[0]) for r in rows)
    t = -(-t // pad_to_multiple_of) * pad_to_multiple_of
    b = len(rows)
    input_ids = torch.full((b, t), pad_token_id, dtype=torch.long)
    labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((b, t), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        n = len(ids)
        input_ids[i, :n] = torch.tensor(ids, dtype=torch.long)
        labels[i, :n] = torch.tensor(lab, dtype=torch.long)
        mask[i, :n] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": labels,
        "domain_ids": torch.tensor(list(domain_ids), dtype=torch.long),
    }
