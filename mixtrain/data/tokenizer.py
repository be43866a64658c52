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

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "BYTE_TOKENIZER_FILE",
    "IGNORE_INDEX",
    "ByteTokenizer",
    "HFTokenizer",
    "Tokenizer",
    "encode_messages",
    "load_tokenizer",
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
