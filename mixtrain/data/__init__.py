"""Multi-domain data: sources, the built-in corpus, tokenisation and collation."""

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
