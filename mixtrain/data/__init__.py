"""Multi-domain data, in the stages a record goes through:

sources (:mod:`.sources`: files → raw chunks → records) → domains (:mod:`.domains`: what a config
names) → token cache (:mod:`.cache`: tokenised once, memory-mapped) → rows (:mod:`.packing`: one
example per row, or packed whole) → the mixture sampler (:mod:`mixtrain.sampler`) → batches
(:mod:`.collate`). Built-in generated domains: :mod:`.builtin`; tokenisation: :mod:`.tokenizer`.
"""

from __future__ import annotations

from typing import Any

from .builtin import BUILTIN_DOMAINS, builtin_domains, generate
from .cache import CachedDomain, prepare_domains
from .collate import collate, collate_examples, packed_attention_inputs
from .domains import DomainSpec, domain_specs, load_domains
from .packing import (
    EncodedDomain,
    Rows,
    encode_domains,
    encode_records,
    pack_rows,
    report_truncation,
    rows_of,
)
from .sources import DataError, Domain, Record, load_path, normalize_record, read_jsonl
from .tokenizer import IGNORE_INDEX, ByteTokenizer, HFTokenizer, encode_batch, encode_messages, load_tokenizer

__all__ = [
    "BUILTIN_DOMAINS",
    "IGNORE_INDEX",
    "ByteTokenizer",
    "CachedDomain",
    "DataError",
    "Domain",
    "DomainSpec",
    "EncodedDomain",
    "HFTokenizer",
    "Record",
    "Rows",
    "builtin_domains",
    "collate",
    "collate_examples",
    "config_domain_specs",
    "encode_batch",
    "encode_config_domains",
    "encode_domains",
    "encode_messages",
    "encode_records",
    "generate",
    "load_domains",
    "load_path",
    "load_tokenizer",
    "normalize_record",
    "pack_rows",
    "packed_attention_inputs",
    "prepare_config_domains",
    "read_jsonl",
]


def config_domain_specs(cfg: Any) -> list[DomainSpec]:
    """The :class:`DomainSpec` s of a config's ``data`` section."""
    d = cfg.data
    return domain_specs(d.builtin, d.domains, dev_fraction=d.dev_fraction, builtin_size=d.builtin_size,
                        builtin_seed=d.builtin_seed)


def prepare_config_domains(cfg: Any, tok: ByteTokenizer | HFTokenizer, *, progress: bool = False) -> list[CachedDomain]:
    """Map (building what is missing) the token cache of every domain of a config."""
    d = cfg.data
    return prepare_domains(config_domain_specs(cfg), tok, cache_dir=d.cache_dir, max_length=d.max_length,
                           train_on_prompt=d.train_on_prompt, num_workers=d.num_workers, progress=progress)


def encode_config_domains(cfg: Any, *, packing: bool | None = None,
                          progress: bool = False) -> tuple[ByteTokenizer | HFTokenizer, list[EncodedDomain]]:
    """The tokenizer and the domains of a :class:`mixtrain.config.Config`, read through the token
    cache: ``model.tokenizer`` (else the model's own, else bytes) and every ``data`` setting;
    ``packing`` overrides ``data.packing`` (packing is seeded by ``train.seed``)."""
    d = cfg.data
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path or "byte")
    out = []
    for dom in prepare_config_domains(cfg, tok, progress=progress):
        enc = rows_of(dom, packing=d.packing if packing is None else packing, max_length=d.max_length,
                      seed=cfg.train.seed, max_dev_examples=d.max_dev_examples)
        report_truncation(enc, d.max_length)
        out.append(enc)
    return tok, out
