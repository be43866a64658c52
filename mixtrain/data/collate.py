"""Pre-tokenised domains and batch collation.

Each domain is tokenised once up front into a list of ``(input_ids, labels)`` rows (at most
``max_length`` tokens). A row keeps exactly one domain, so per-domain signals stay exact.

Packing (``packing=True``, padding-free / varlen): the examples of a domain are concatenated in
record order and cut into ``max_length`` rows, and every row gets per-token position ids
(:attr:`EncodedDomain.train_positions`) that restart at 0 where an example starts. The first
token of every example is never a target (its label is ``-100``; with unshifted HF labels it
would be predicted from the previous example's last token), and the model attends only within
an example (:func:`packed_attention_inputs` turns the position ids into a block-diagonal causal
mask for ``sdpa`` / ``eager``, or varlen boundaries for flash attention). So a packed row gives,
token for token, the losses of its examples run one at a time. Examples are not truncated when
packing: one longer than the rest of a row continues in the next row(s), its position ids
continuing (not restarting) there, so it is seen in fragments of at most ``max_length`` tokens
without the context of the previous row; the token at each such cut is not a target (position 0
of a row predicts nothing), exactly as before varlen packing. Dev rows are never packed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .sources import Domain, Record
from .tokenizer import IGNORE_INDEX, ByteTokenizer, HFTokenizer, encode_messages

__all__ = [
    "EncodedDomain",
    "collate",
    "collate_examples",
    "encode_domains",
    "encode_records",
    "pack_rows",
    "packed_attention_inputs",
]

Row = tuple[list[int], list[int]]

log = logging.getLogger("mixtrain")


@dataclass
class EncodedDomain:
    """A tokenised domain: ``train``/``dev`` rows of ``(input_ids, labels)``.

    ``train_positions``: with packing, the position ids of every training row (parallel to
    ``train``, restarting at 0 at each example start; see the module docstring); ``None``
    otherwise. Rows stay ``(input_ids, labels)`` pairs so code that only needs tokens is unchanged.
    ``truncated``: training rows longer than ``max_length`` before the cut (0 with packing, which
    never cuts); ``prompt_too_long``: those of them whose prompt alone fills ``max_length``, so
    no trained token is left.
    """

    name: str
    train: list[Row]
    dev: list[Row]
    records: list[Record]
    train_positions: list[list[int]] | None = None
    truncated: int = 0
    prompt_too_long: int = 0

    def __post_init__(self) -> None:
        if self.train_positions is None:
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


def _tokenize(
    tok: ByteTokenizer | HFTokenizer, records: Sequence[Record], max_length: int, train_on_prompt: bool
) -> list[Row]:
    return [
        encode_messages(tok, r.as_messages(), max_length=max_length, train_on_prompt=train_on_prompt,
                        plain_text=r.plain_text)
        for r in records
    ]


def _tokenize_counted(
    tok: ByteTokenizer | HFTokenizer, records: Sequence[Record], max_length: int, train_on_prompt: bool
) -> tuple[list[Row], int, int]:
    """:func:`_tokenize` (truncation is a prefix cut) plus ``(rows cut, rows left without a trained
    label)``, counted on the uncut encoding."""
    rows: list[Row] = []
    cut = dead = 0
    for ids, labels in _tokenize(tok, records, 1 << 30, train_on_prompt):
        if len(ids) > max_length:
            cut += 1
            ids, labels = ids[:max_length], labels[:max_length]
            if all(x == IGNORE_INDEX for x in labels[1:]):
                dead += 1
        rows.append((ids, labels))
    return rows, cut, dead


def pack_rows(rows: Sequence[Row], max_length: int) -> tuple[list[Row], list[list[int]]]:
    """Pack examples (in order) into rows of ``max_length`` tokens with per-token position ids.

    Position ids restart at 0 at the first token of every example, whose label becomes
    ``IGNORE_INDEX``; an example that does not fit in the rest of a row continues in the next
    row with continuing position ids. A last row of a single token (nothing to predict) is
    dropped. Returns ``(packed_rows, positions)``.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"pack_rows: max_length must be an int >= 2, got {max_length!r}")
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    for i, (a, b) in enumerate(rows):
        if len(a) != len(b):
            raise ValueError(f"pack_rows: rows[{i}] has {len(a)} input ids but {len(b)} labels")
        if not a:
            continue
        ids.extend(a)
        labels.append(IGNORE_INDEX)  # predicted from the previous example's last token: no target
        labels.extend(b[1:])
        pos.extend(range(len(a)))
    packed: list[Row] = []
    positions: list[list[int]] = []
    for i in range(0, len(ids), max_length):
        if len(ids) - i > 1:
            packed.append((ids[i : i + max_length], labels[i : i + max_length]))
            positions.append(pos[i : i + max_length])
    return packed, positions


def encode_records(
    tok: ByteTokenizer | HFTokenizer,
    records: Sequence[Record],
    *,
    max_length: int,
    train_on_prompt: bool,
    packing: bool = False,
) -> list[Row]:
    """Tokenise records (see :func:`mixtrain.data.tokenizer.encode_messages`), optionally packed
    (:func:`pack_rows`; use that, or :func:`encode_domains`, to get the position ids as well)."""
    if not packing:
        return _tokenize(tok, records, max_length, train_on_prompt)
    return pack_rows(_tokenize(tok, records, 1 << 30, train_on_prompt), max_length)[0]


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
        positions = None
        cut = dead = 0
        if packing:
            train, positions = pack_rows(_tokenize(tok, d.train, 1 << 30, train_on_prompt), max_length)
            _warn_split(d.name, positions, max_length)
        else:
            train, cut, dead = _tokenize_counted(tok, d.train, max_length, train_on_prompt)
        dev_records = d.dev[:max_dev_examples] if max_dev_examples else d.dev
        dev = encode_records(tok, dev_records, max_length=max_length, train_on_prompt=train_on_prompt)
        if not packing:
            _report_truncation(d.name, len(train), cut, dead, max_length)
        out.append(EncodedDomain(d.name, train, dev, list(d.train), positions, cut, dead))
    return out


def _warn_split(name: str, positions: Sequence[Sequence[int]], max_length: int) -> None:
    """Packing does not truncate: say when examples longer than ``max_length`` are seen in
    fragments, and how far their position ids go (models with learned absolute position
    embeddings need ``max_position_embeddings`` above that)."""
    longest = max((max(p) for p in positions if p), default=-1) + 1
    if longest > max_length:
        n = sum(p.count(max_length) for p in positions)  # one token at that position per long example
        log.warning(
            "domain %r: packing splits %d example(s) longer than max_length=%d over rows (longest %d tokens: "
            "position ids up to %d); raise data.max_length to keep them whole", name, n, max_length, longest,
            longest - 1,
        )


def _report_truncation(name: str, n: int, cut: int, dead: int, max_length: int) -> None:
    """Report per domain how many rows ``max_length`` cuts and how many of them keep no trained
    token (their prompt alone fills it: they teach nothing but are still sampled). A warning when
    more than a quarter are cut or more than a tenth are left empty (so always when most rows
    are cut), else an info line when any row is cut."""
    if not n or not cut:
        return
    level = logging.WARNING if dead / n > 0.1 or cut / n > 0.25 else logging.INFO
    log.log(
        level, "domain %r: %d of %d rows reach max_length=%d (truncated) and %d have no trained token left "
        "(the prompt alone fills max_length)%s", name, cut, n, max_length, dead,
        "; raise data.max_length or shorten the records" if level == logging.WARNING else "",
    )


def collate(
    rows: Sequence[Row],
    domain_ids: Sequence[int],
    pad_token_id: int,
    pad_to_multiple_of: int = 1,
    position_ids: Sequence[Sequence[int]] | None = None,
) -> dict[str, torch.Tensor]:
    """Right-pad rows into a batch.

    ``position_ids``: per-row position ids of packed rows (:attr:`EncodedDomain.train_positions`);
    then the batch also has ``position_ids`` [B, T] int64 (0 on pads). The model must see them
    through :func:`packed_attention_inputs`, not with the plain 2D ``attention_mask``.

    Returns:
        ``input_ids`` [B, T] int64, ``attention_mask`` [B, T] int64, ``labels`` [B, T] int64
        (``-100`` on pads and untrained tokens; unshifted, HF style), ``domain_ids`` [B] int64.
    """
    if len(rows) != len(domain_ids):
        raise ValueError(f"collate: {len(rows)} rows but {len(domain_ids)} domain ids")
    if not rows:
        raise ValueError("collate: empty batch")
    if position_ids is not None and len(position_ids) != len(rows):
        raise ValueError(f"collate: {len(rows)} rows but {len(position_ids)} position_ids rows")
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
    out = {
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": labels,
        "domain_ids": torch.tensor(list(domain_ids), dtype=torch.long),
    }
    if position_ids is not None:
        pos = torch.zeros((b, t), dtype=torch.long)
        for i, ((ids, _), p) in enumerate(zip(rows, position_ids)):
            if len(p) != len(ids):
                raise ValueError(f"collate: position_ids[{i}] has {len(p)} ids but row {i} has {len(ids)} tokens")
            pos[i, : len(p)] = torch.tensor(list(p), dtype=torch.long)
        out["position_ids"] = pos
    return out


def collate_examples(
    domains: Sequence[EncodedDomain], rows: Sequence[tuple[int, int]], pad_token_id: int, split: str = "train"
) -> dict[str, torch.Tensor]:
    """:func:`collate` of ``(domain index, row index)`` pairs of ``split`` (``"train"``/``"dev"``),
    with the position ids of packed training rows (an unpacked row is one example)."""
    data = [getattr(domains[d], split)[e] for d, e in rows]
    pos = None
    if split == "train" and any(domains[d].train_positions is not None for d, _ in rows):
        pos = [domains[d].train_positions[e] if domains[d].train_positions is not None  # type: ignore[index]
               else range(len(data[i][0])) for i, (d, e) in enumerate(rows)]
    return collate(data, [d for d, _ in rows], pad_token_id, position_ids=pos)


def _segment_starts(attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: where a new attention segment starts. A real token starts one when its
    position id is not the previous one + 1 (an example start; row starts always do); the pads
    of a row form one segment of their own, so real tokens never see them and no pad row of the
    mask is empty (an all-masked softmax row would be NaN in sdpa)."""
    valid = attention_mask.bool()
    start = torch.ones_like(valid)
    start[:, 1:] = (valid[:, 1:] != valid[:, :-1]) | (valid[:, 1:] & (position_ids[:, 1:] != position_ids[:, :-1] + 1))
    return start


def _sliding_window(config: Any) -> int | None:
    w = getattr(config, "sliding_window", None)
    if not w:
        return None
    types = getattr(config, "layer_types", None)
    if types is not None:
        return int(w) if any("sliding" in str(x) for x in types) else None
    return int(w) if getattr(config, "use_sliding_window", True) else None


def packed_attention_inputs(
    model: torch.nn.Module, attention_mask: torch.Tensor, position_ids: torch.Tensor
) -> dict[str, Any]:
    """Model keyword arguments that make attention block-diagonal causal per packed example.

    Args:
        model: the transformers model (its ``config._attn_implementation`` picks the form).
        attention_mask: [B, T] 1 on real tokens, 0 on (right) pads, as from :func:`collate`.
        position_ids: [B, T] packed position ids from :func:`collate`.

    Returns ``{"attention_mask": ..., "position_ids": ...}`` (plus ``cu_seq_lens_q/k`` and
    ``max_length_q/k`` for flash attention) to pass to the model instead of the 2D mask.

    Why not let transformers detect the packing from ``position_ids``: it does so (5.x
    ``masking_utils.find_packed_sequence_indices``) only when ``attention_mask`` is ``None`` *and*
    there is no KV cache, and a plain ``model(...)`` call with the config's default
    ``use_cache=True`` (what ``transformers.Trainer`` does) creates one, so attention silently spans
    examples again; 4.x releases before ``masking_utils`` never detect it for sdpa/eager. A 4D
    mask is used as given (5.x ``_preprocess_mask_arguments`` returns it untouched; 4.x had the
    same custom-4D-mask path), whatever ``use_cache``, and it also masks the pads. sdpa gets it boolean (True = may attend; valid
    whatever dtype autocast gives the queries), eager additive (0 / dtype min), as each expects.
    Flash attention takes no 4D mask; it gets ``attention_mask=None`` and explicit varlen
    boundaries over the flattened [B*T] batch (transformers infers them from ``position_ids``
    only for B == 1, and only at position 0, which misses rows that continue an example).
    """
    if attention_mask.dim() != 2 or tuple(position_ids.shape) != tuple(attention_mask.shape):
        raise ValueError(
            f"packed_attention_inputs: attention_mask {tuple(attention_mask.shape)} and position_ids "
            f"{tuple(position_ids.shape)} must both be [B, T]"
        )
    config = getattr(model, "config", None)
    impl = str(getattr(config, "_attn_implementation", None) or "eager")
    start = _segment_starts(attention_mask, position_ids)
    if "flash" in impl:
        b, t = start.shape
        idx = start.reshape(-1).nonzero().flatten()
        cu = torch.cat([idx, idx.new_tensor([b * t])]).to(torch.int32)
        longest = int(cu.diff().max())
        return {"attention_mask": None, "position_ids": position_ids, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
                "max_length_q": longest, "max_length_k": longest}
    if impl not in ("sdpa", "eager"):
        raise ValueError(
            f"packed_attention_inputs: attn_implementation={impl!r} is not supported with packing; use 'sdpa', "
            "'eager' or a flash attention implementation (or data.packing=false)"
        )
    window = _sliding_window(config)
    if window is not None and attention_mask.shape[1] > window:
        raise ValueError(
            f"packed_attention_inputs: the model uses sliding-window attention (sliding_window={window}) and the "
            f"batch has {attention_mask.shape[1]} tokens; the explicit {impl} packing mask would drop the window: "
            "use attn_implementation='flash_attention_2', data.max_length <= the window, or data.packing=false"
        )
    seg = start.cumsum(-1)
    t = seg.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=seg.device).tril()
    allowed = (seg[:, :, None] == seg[:, None, :]) & causal  # [B, T(query), T(key)]
    allowed = allowed[:, None]
    if impl == "sdpa":
        mask: torch.Tensor = allowed
    else:
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        dtype = emb.weight.dtype if emb is not None else next(model.parameters()).dtype
        if not dtype.is_floating_point:
            dtype = torch.float32
        mask = torch.zeros(allowed.shape, dtype=dtype, device=seg.device).masked_fill_(~allowed, torch.finfo(dtype).min)
    return {"attention_mask": mask, "position_ids": position_ids}
