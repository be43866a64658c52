"""Multi-domain data: sources, the built-in corpus, tokenisation and collation."""

from __future__ import annotations

from typing import Any

from .builtin import BUILTIN_DOMAINS, builtin_domains, generate
from .collate import (
    EncodedDomain,
    collate,
    collate_examples,
    encode_domains,
    pack_rows,
    packed_attention_inputs,
)
from .sources import DataError, Domain, Record, load_domains, load_path, normalize_record, read_jsonl
from .tokenizer import IGNORE_INDEX, ByteTokenizer, HFTokenizer, encode_messages, load_tokenizer

__all__ = [
    "BUILTIN_DOMAINS",
    "IGNORE_INDEX",
    "ByteTokenizer",
    "DataError",
    "Domain",
    "EncodedDomain",
    "HFTokenizer",
    "Record",
    "builtin_domains",
    "collate",
    "collate_examples",
    "encode_config_domains",
    "encode_domains",
    "encode_messages",
    "generate",
    "load_domains",
    "load_path",
    "load_tokenizer",
    "normalize_record",
    "pack_rows",
    "packed_attention_inputs",
    "read_jsonl",
]


def encode_config_domains(cfg: Any, *, packing: bool | None = None) -> tuple[ByteTokenizer | HFTokenizer, list[EncodedDomain]]:
    """The tokenizer and the encoded domains of a :class:`mixtrain.config.Config`: ``model.tokenizer``
    (else the model's own, else bytes) and every ``data`` setting; ``packing`` overrides ``data.packing``."""
    d = cfg.data
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path or "byte")
    domains = load_domains(d.builtin, d.domains, dev_fraction=d.dev_fraction, builtin_size=d.builtin_size,
                           builtin_seed=d.builtin_seed)
    enc = encode_domains(domains, tok, max_length=d.max_length, train_on_prompt=d.train_on_prompt,
                         packing=d.packing if packing is None else packing, max_dev_examples=d.max_dev_examples)
    return tok, enc
