"""Tokenisation of normalised records into ``(input_ids, labels)``.

Two tokenizers share one interface (:class:`Tokenizer`):

* :class:`ByteTokenizer`: UTF-8 bytes 0..255 plus ``<pad>`` 256, ``<bos>`` 257, ``<eos>`` 258
  (vocab 259). Needs no files, so it works offline on any machine.
* :class:`HFTokenizer`: a local ``transformers`` tokenizer directory; its chat template is used
  when it has one.

A record is a list of chat messages ``[{"role", "content"}]`` (see :mod:`mixtrain.data.sources`).
Labels are ``-100`` on everything except assistant turns (and their end-of-turn token), unless
``train_on_prompt``; a plain ``text`` record (no roles) is trained on every token.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

__all__ = [
    "BYTE_TOKENIZER_FILE",
    "IGNORE_INDEX",
    "ByteTokenizer",
    "EncodedBatch",
    "HFTokenizer",
    "Tokenizer",
    "encode_batch",
    "encode_messages",
    "load_tokenizer",
    "tokenizer_identity",
]

IGNORE_INDEX = -100
Message = dict[str, str]


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    vocab_size: int
    pad_token_id: int
    bos_token_id: int | None
    eos_token_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Inverse of :meth:`encode` (best effort for special tokens)."""
        ...


class ByteTokenizer:
    """Byte-level tokenizer: id = byte value; specials ``<pad>``=256, ``<bos>``=257, ``<eos>``=258."""

    vocab_size = 259
    pad_token_id = 256
    bos_token_id = 257
    eos_token_id = 258
    end_of_turn_id = 258
    name = "byte"

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of ``text``."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes back to text; specials are rendered as ``<pad>``/``<bos>``/``<eos>``."""
        out = bytearray()
        parts: list[str] = []
        for i in ids:
            i = int(i)
            if i < 256:
                out.append(i)
            else:
                parts.append(out.decode("utf-8", errors="replace"))
                out = bytearray()
                parts.append({256: "<pad>", 257: "<bos>", 258: "<eos>"}.get(i, f"<{i}>"))
        parts.append(out.decode("utf-8", errors="replace"))
        return "".join(parts)


class HFTokenizer:
    """Adapter over a local ``transformers`` tokenizer (``AutoTokenizer``, no downloads)."""

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:
            raise ValueError(
                f"model.tokenizer: cannot load a tokenizer from {path!r} "
                f"(expected 'byte' or a local tokenizer directory): {e}"
            ) from e
        self.name = path
        self.vocab_size = len(self.tok)
        eos = self.tok.eos_token_id
        if eos is None:
            raise ValueError(f"model.tokenizer: tokenizer at {path!r} has no eos token")
        self.eos_token_id = int(eos)
        pad = self.tok.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else self.eos_token_id
        bos = self.tok.bos_token_id
        self.bos_token_id = int(bos) if bos is not None else None
        self.has_chat_template = bool(getattr(self.tok, "chat_template", None))
        self.end_of_turn_id = self._find_end_of_turn() if self.has_chat_template else self.eos_token_id

    def _find_end_of_turn(self) -> int:
        """The special token the chat template closes an assistant turn with (``<|im_end|>`` for
        ChatML, ``<|eot_id|>`` for Llama 3): the first special token after a probe reply."""
        probe = [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}]
        try:
            prefix = self.render_chat(probe[:1], add_generation_prompt=True)
            full = self.render_chat(probe, add_generation_prompt=False)
        except Exception:  # noqa: BLE001 - a template that refuses the probe: fall back to eos
            return self.eos_token_id
        special = set(self.tok.all_special_ids)
        return next((t for t in full[len(prefix):] if t in special), self.eos_token_id)

    def encode(self, text: str) -> list[int]:
        """Ids without special tokens."""
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids (special tokens kept)."""
        return self.tok.decode(list(ids))

    def render_chat(self, messages: list[Message], add_generation_prompt: bool) -> list[int]:
        """Ids of ``messages`` rendered with the tokenizer's chat template."""
        out: Any = self.tok.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=add_generation_prompt
        )
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return [int(x) for x in out]


BYTE_TOKENIZER_FILE = "mixtrain_tokenizer.json"  # written by mixtrain.export next to a byte-tokenizer model


def load_tokenizer(spec: str | None) -> ByteTokenizer | HFTokenizer:
    """``"byte"``/``None`` → :class:`ByteTokenizer`; a directory holding ``mixtrain_tokenizer.json``
    (a model exported by a byte-tokenizer run) → :class:`ByteTokenizer`; otherwise a local HF
    tokenizer path. Known model names and ``.gguf`` files resolve through
    :func:`mixtrain.models.resolve_model` (prepared once into the cache)."""
    if spec is None or spec == "byte":
        return ByteTokenizer()
    from ..models import ModelError, resolve_model

    try:
        spec = resolve_model(spec)
    except ModelError as e:
        raise ValueError(f"model.tokenizer: {e}") from None
    marker = Path(spec) / BYTE_TOKENIZER_FILE
    if marker.is_file():
        try:
            kind = json.loads(marker.read_text()).get("type")
        except (json.JSONDecodeError, AttributeError) as e:
            raise ValueError(f"model.tokenizer: {marker} is not a valid mixtrain tokenizer file: {e}") from None
        if kind != "byte":
            raise ValueError(f"model.tokenizer: {marker} names tokenizer type {kind!r}; expected 'byte'")
        return ByteTokenizer()
    return HFTokenizer(spec)


def _template_turn(role: str, content: str) -> str:
    # The plain template for tokenizers without a chat template: readable, unambiguous roles.
    return f"<|{role}|>\n{content}\n"


def encode_messages(
    tok: ByteTokenizer | HFTokenizer,
    messages: list[Message],
    *,
    max_length: int,
    train_on_prompt: bool = False,
    plain_text: bool = False,
) -> tuple[list[int], list[int]]:
    """Tokenise one record; returns ``(input_ids, labels)`` of equal length ≤ ``max_length``.

    ``plain_text`` records (a single ``text``) are trained on every token. Chat records train on
    assistant turns (content + end-of-turn) only, unless ``train_on_prompt``: with a chat
    template, exactly the tokens the template renders for the reply up to and including its
    end-of-turn token (``tok.end_of_turn_id``); what the template adds after it (ChatML's
    newline) is not a target.
    """
    ids: list[int] = []
    labels: list[int] = []

    def add(piece: list[int], train: bool) -> None:
        ids.extend(piece)
        labels.extend(piece if (train or train_on_prompt) else [IGNORE_INDEX] * len(piece))

    if tok.bos_token_id is not None:
        add([tok.bos_token_id], False)
    if plain_text:
        add(tok.encode(messages[0]["content"]) + [tok.eos_token_id], True)
    elif isinstance(tok, HFTokenizer) and tok.has_chat_template:
        ids, labels = [], []
        prev: list[int] = []
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                prefix = tok.render_chat(messages[:i], add_generation_prompt=True)
                full = tok.render_chat(messages[: i + 1], add_generation_prompt=False)
                reply = full[len(prefix):]
                end = reply.index(tok.end_of_turn_id) + 1 if tok.end_of_turn_id in reply else len(reply)
                add(prefix[len(prev):], False)
                add(reply[:end], True)
                add(reply[end:], False)
                prev = full
        if len(prev) < len(tok.render_chat(messages, add_generation_prompt=False)):
            rest = tok.render_chat(messages, add_generation_prompt=False)
            add(rest[len(prev):], False)
    else:
        for m in messages:
            if m["role"] == "assistant":
                add(tok.encode(f"<|{m['role']}|>\n"), False)
                add(tok.encode(m["content"]) + [tok.eos_token_id], True)
            else:
                add(tok.encode(_template_turn(m["role"], m["content"])), False)
    return ids[:max_length], labels[:max_length]


# ---- batch encoding (what the token cache uses) ---------------------------------------------


@dataclass
class EncodedBatch:
    """Records encoded together: token ids and the trained-token mask, concatenated.

    ``ids`` int64 [T], ``mask`` bool [T] (``labels = ids`` where set, else ``IGNORE_INDEX``),
    ``lengths`` int64 [n] (after the cut at ``max_length``), ``full_lengths`` int64 [n] (before it),
    ``n_trained`` int64 [n]: trained labels after the causal shift (``labels[1:]``).
    """

    ids: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray
    full_lengths: np.ndarray
    n_trained: np.ndarray

    def rows(self) -> list[tuple[list[int], list[int]]]:
        """``(input_ids, labels)`` per record (for tests and small data)."""
        out = []
        ends = np.cumsum(self.lengths)
        for s, e in zip(ends - self.lengths, ends):
            ids = self.ids[s:e]
            out.append((ids.tolist(), np.where(self.mask[s:e], ids, IGNORE_INDEX).tolist()))
        return out


def _assemble(pieces: list[list[tuple[Sequence[int], bool]]], max_length: int, train_on_prompt: bool) -> EncodedBatch:
    """Concatenate per-record ``(ids, trained)`` pieces and cut each record at ``max_length``."""
    ids_parts: list[np.ndarray] = []
    mask_parts: list[np.ndarray] = []
    n = len(pieces)
    lengths = np.zeros(n, dtype=np.int64)
    full = np.zeros(n, dtype=np.int64)
    trained = np.zeros(n, dtype=np.int64)
    for i, rec in enumerate(pieces):
        arrs = [np.asarray(p, dtype=np.int64) for p, _ in rec]
        ids = np.concatenate(arrs) if arrs else np.zeros(0, dtype=np.int64)
        mask = np.concatenate([np.full(len(a), t or train_on_prompt) for a, (_, t) in zip(arrs, rec)]) if arrs \
            else np.zeros(0, dtype=bool)
        full[i] = len(ids)
        ids, mask = ids[:max_length], mask[:max_length]
        lengths[i] = len(ids)
        trained[i] = int(mask[1:].sum())
        ids_parts.append(ids)
        mask_parts.append(mask)
    return EncodedBatch(
        np.concatenate(ids_parts) if ids_parts else np.zeros(0, dtype=np.int64),
        np.concatenate(mask_parts).astype(bool) if mask_parts else np.zeros(0, dtype=bool),
        lengths, full, trained,
    )


def _pieces_plain(tok: ByteTokenizer | HFTokenizer, messages: Sequence[tuple[str, str]], plain_text: bool,
                  encode: Any) -> list[tuple[Sequence[int], bool]]:
    """The pieces of :func:`encode_messages` for plain text and for tokenizers without a chat
    template (each piece encoded on its own, exactly as there); ``encode`` maps text → ids."""
    out: list[tuple[Sequence[int], bool]] = []
    if tok.bos_token_id is not None:
        out.append(([tok.bos_token_id], False))
    if plain_text:
        out.append((list(encode(messages[0][1])) + [tok.eos_token_id], True))
        return out
    for role, content in messages:
        if role == "assistant":
            out.append((encode(f"<|{role}|>\n"), False))
            out.append((list(encode(content)) + [tok.eos_token_id], True))
        else:
            out.append((encode(_template_turn(role, content)), False))
    return out


def _byte_encode(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


class _ChatRenders:
    """The texts :func:`encode_messages` renders for chat-template records (for many records per
    template call): per assistant turn ``i`` the conversation up to it with the generation prompt
    and the conversation through it, and the whole conversation."""

    def __init__(self, tok: HFTokenizer) -> None:
        self.tok = tok

    def _render(self, convs: list[list[Message]], gen: bool) -> list[str | None]:
        if not convs:
            return []
        try:
            return [str(x) for x in self.tok.tok.apply_chat_template(convs, tokenize=False, add_generation_prompt=gen)]
        except Exception:  # noqa: BLE001 - a record the template refuses: find it one at a time
            out: list[str | None] = []
            for c in convs:
                try:
                    out.append(str(self.tok.tok.apply_chat_template(c, tokenize=False, add_generation_prompt=gen)))
                except Exception:  # noqa: BLE001 - encode_messages raises the template's own error
                    out.append(None)
            return out

    def texts(self, convs: list[list[Message]]) -> list[tuple[list[str], list[str], str] | None]:
        """Per conversation ``(prefixes, fulls, whole)`` (``None``: the template refused a part)."""
        prefix_req: list[list[Message]] = []
        full_req: list[list[Message]] = []
        plan = []
        for msgs in convs:
            turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
            plan.append((len(turns), len(prefix_req), len(full_req)))
            prefix_req += [msgs[:i] for i in turns]
            full_req += [msgs[: i + 1] for i in turns]
            if not turns or turns[-1] != len(msgs) - 1:  # else the whole conversation is the last turn's
                full_req.append(msgs)
        prefixes, fulls = self._render(prefix_req, True), self._render(full_req, False)
        out: list[tuple[list[str], list[str], str] | None] = []
        for (n, p0, f0), msgs in zip(plan, convs):
            p = prefixes[p0:p0 + n]
            f = fulls[f0:f0 + n + (msgs[-1]["role"] != "assistant")]
            whole = f[-1] if len(f) > n else f[n - 1]
            out.append(None if any(x is None for x in p + f) else (p, f[:n], whole))  # type: ignore[arg-type]
        return out


def _chat_pieces(prefixes: list[list[int]], fulls: list[list[int]], whole: list[int],
                 eot: int) -> list[tuple[Sequence[int], bool]]:
    """:func:`encode_messages`' assembly of a chat record from the token ids of its rendered texts."""
    out: list[tuple[Sequence[int], bool]] = []
    prev: list[int] = []
    for prefix, full in zip(prefixes, fulls):
        reply = full[len(prefix):]
        end = reply.index(eot) + 1 if eot in reply else len(reply)
        out += [(prefix[len(prev):], False), (reply[:end], True), (reply[end:], False)]
        prev = full
    if len(prev) < len(whole):
        out.append((whole[len(prev):], False))
    return out


def _plain_encoder(tok: HFTokenizer, records: Sequence[Any], backend: Any, chat: bool) -> Any:
    """``text → ids`` for every piece :func:`_pieces_plain` asks of ``records``, encoded in one batch."""
    texts: dict[str, list[int]] = {}

    def collect(t: str) -> list[int]:
        texts.setdefault(t, [])
        return []

    for r in records:
        if r.plain_text or not chat:
            _pieces_plain(tok, r.messages, r.plain_text, collect)
    keys = list(texts)
    for k, enc in zip(keys, backend.encode_batch(keys, add_special_tokens=False) if keys else []):
        texts[k] = enc.ids
    return texts.__getitem__


def encode_batch(
    tok: ByteTokenizer | HFTokenizer,
    records: Sequence[Any],
    *,
    max_length: int,
    train_on_prompt: bool = False,
) -> EncodedBatch:
    """Encode many records (:class:`~mixtrain.data.sources.Record` s) at once; the result equals
    :func:`encode_messages` applied to each record (tested on the real tokenizer), only faster:
    bytes via numpy; HF tokenizers render every chat of the batch with one template call and
    tokenise every distinct rendered text with one call of the fast (Rust) tokenizer, then
    assemble each record exactly as :func:`encode_messages` does."""
    if isinstance(tok, ByteTokenizer):
        return _assemble([_pieces_plain(tok, r.messages, r.plain_text, _byte_encode) for r in records],
                         max_length, train_on_prompt)
    backend = getattr(tok.tok, "backend_tokenizer", None)
    if backend is None:  # a slow (Python) tokenizer: one record at a time
        rows = [encode_messages(tok, r.as_messages(), max_length=1 << 30, train_on_prompt=train_on_prompt,
                                plain_text=r.plain_text) for r in records]
        return _assemble([_row_pieces(ids, labels) for ids, labels in rows], max_length, train_on_prompt)
    encode = _plain_encoder(tok, records, backend, tok.has_chat_template)
    if not tok.has_chat_template:
        return _assemble([_pieces_plain(tok, r.messages, r.plain_text, encode) for r in records],
                         max_length, train_on_prompt)
    pieces: list[Any] = [None] * len(records)
    chat_idx = [i for i, r in enumerate(records) if not r.plain_text]
    rendered = _ChatRenders(tok).texts([records[i].as_messages() for i in chat_idx])
    unique: dict[str, list[int]] = {}
    for got in rendered:
        if got is not None:
            for t in (*got[0], *got[1], got[2]):
                unique.setdefault(t, [])
    keys = list(unique)
    for k, enc in zip(keys, backend.encode_batch(keys, add_special_tokens=False) if keys else []):
        unique[k] = enc.ids
    for i, got in zip(chat_idx, rendered):
        if got is None:  # encode_messages raises the template's own error
            encode_messages(tok, records[i].as_messages(), max_length=max_length, train_on_prompt=train_on_prompt)
            raise ValueError(f"chat template refused record {i}")
        pieces[i] = _chat_pieces([unique[t] for t in got[0]], [unique[t] for t in got[1]], unique[got[2]],
                                 tok.end_of_turn_id)
    for i, r in enumerate(records):
        if r.plain_text:
            pieces[i] = _pieces_plain(tok, r.messages, True, encode)
    return _assemble(pieces, max_length, train_on_prompt)


def _row_pieces(ids: Sequence[int], labels: Sequence[int]) -> list[tuple[Sequence[int], bool]]:
    a = np.asarray(ids, dtype=np.int64)
    return _mask_pieces(a, np.asarray(labels, dtype=np.int64) != IGNORE_INDEX)


def _mask_pieces(ids: np.ndarray, trained: np.ndarray) -> list[tuple[Sequence[int], bool]]:
    """Split ``ids`` into runs of equal ``trained``."""
    if not len(ids):
        return []
    cuts = np.flatnonzero(np.diff(trained.astype(np.int8))) + 1
    bounds = [0, *cuts.tolist(), len(ids)]
    return [(ids[a:b], bool(trained[a])) for a, b in itertools.pairwise(bounds)]


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "vocab.txt",
                    "merges.txt", "added_tokens.json", "tokenizer.model", "spiece.model", "chat_template.jinja",
                    "chat_template.json")


def tokenizer_identity(tok: ByteTokenizer | HFTokenizer) -> dict[str, Any]:
    """What determines the tokens a tokenizer gives, as plain strings (part of the data
    fingerprint): the content hashes of its files, its chat template text, its special ids."""
    if isinstance(tok, ByteTokenizer):
        return {"type": "byte", "version": 1}
    import hashlib

    files = {}
    folder = Path(tok.name)
    for name in _TOKENIZER_FILES:
        f = folder / name
        if f.is_file():
            files[name] = hashlib.sha256(f.read_bytes()).hexdigest()
    template = getattr(tok.tok, "chat_template", None)
    return {
        "type": "hf", "class": type(tok.tok).__name__, "files": files,
        "chat_template": template if isinstance(template, str) else json.dumps(template, sort_keys=True),
        "ids": [tok.vocab_size, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.end_of_turn_id],
    }
