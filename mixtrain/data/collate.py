"""Batches: rows of (input_ids, labels) right-padded into tensors, and the attention inputs of
packed rows (:func:`packed_attention_inputs`). The rows come from :mod:`mixtrain.data.packing`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .packing import EncodedDomain, Row
from .tokenizer import IGNORE_INDEX

__all__ = [
    "collate",
    "collate_examples",
    "packed_attention_inputs",
]

log = logging.getLogger("mixtrain")


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
        input_ids[i, :n] = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        labels[i, :n] = torch.from_numpy(np.asarray(lab, dtype=np.int64))
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
            pos[i, : len(p)] = torch.from_numpy(np.asarray(p, dtype=np.int64))
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
