"""Multi-domain data: sources, the built-in corpus, tokenisation and collation."""

from .builtin import BUILTIN_DOMAINS, builtin_domains, generate
from .collate import EncodedDomain, collate, encode_domains
from .sources import DataError, Domain, Record, load_domains, load_path, normalize_record, read_jsonl
from .tokenizer import IGNORE_INDEX, ByteTokenizer, HFTokenizer, encode_messages, load_tokenizer

__all__ = [
    "BUILTIN_DOMAINS", "builtin_domains", "generate", "EncodedDomain", "collate",
    "encode_domains", "DataError", "Domain", "Record", "load_domains", "load_path",
    "normalize_record", "read_jsonl", "IGNORE_INDEX", "ByteTokenizer", "HFTokenizer",
    "encode_messages", "load_tokenizer",
]
