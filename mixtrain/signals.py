"""Per-domain training signals, computed only when a policy asks for them.

* ``train_domain_loss``: per-domain sums of token losses and token counts from every micro-batch.
  They come out of the training loss itself (``mixkernels.hf.causal_lm_loss`` with
  ``group_ids`` = the row's domain: a fused linear + cross-entropy that never materialises the
  logits), so they cost one ``[D]`` accumulate per micro-batch and one all-reduce per optimizer
  step. Always collected (metrics need them).
* ``dev_domain_loss``: mean token loss per domain on the dev split (``eval_every`` steps, and at
  policy updates when the policy requires it).
* ``domain_embedding``: per-domain mean of the mean-pooled last hidden state of the sampled
  training rows (forward hook on the decoder; no extra forward).
* ``router_stats``: per-domain top-k expert counts ``[L, D, E]`` of the training micro-batches
  (pads excluded) via ``mixkernels.hf.RouterStatsCollector`` + ``mixkernels.router_stats``.
* ``example_loss``: per-row mean token loss and domain of every sampled row.

All sums are all-reduced once per optimizer step, so every rank sees identical :class:`Signals`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["LossOutput", "SignalBus", "Signals", "causal_lm_loss", "dev_losses"]

log = logging.getLogger(__name__)


@dataclass
class LossOutput:
    """Loss of one micro-batch: ``loss`` (scalar, differentiable), ``group_loss`` [D] float32
    sums of token losses per domain (detached), ``group_count`` [D] int64 token counts,
    ``token_loss`` [B, T-1] (or ``None``)."""

    loss: torch.Tensor
    group_loss: torch.Tensor
    group_count: torch.Tensor
    token_loss: torch.Tensor | None = None


def causal_lm_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    num_groups: int,
    *,
    return_token_loss: bool = False,
    reduction: str = "mean",
) -> LossOutput:
    """Token loss of a collated batch (``reduction`` ``mean`` or ``sum`` over label tokens) plus
    per-domain sums (HF label shift).

    Uses ``mixkernels.hf.causal_lm_loss`` (fused, logits never materialised) with per-row
    ``group_ids`` = ``batch["domain_ids"]``. A packed batch (``batch["position_ids"]`` present,
    see :func:`mixtrain.data.collate.collate`) attends within each example only: the model gets
    :func:`mixtrain.data.collate.packed_attention_inputs` instead of the 2D mask.
    """
    import mixkernels.hf as mkhf

    ids, mask, labels, groups = batch["input_ids"], batch["attention_mask"], batch["labels"], batch["domain_ids"]
    model_kw: dict[str, Any] = {"attention_mask": mask}
    if batch.get("position_ids") is not None:
        from .data.collate import packed_attention_inputs

        model_kw = packed_attention_inputs(model, mask, batch["position_ids"])
    # labels are given, so mixkernels uses attention_mask only for the model; the rest of
    # model_kw (position_ids, flash varlen boundaries) goes to the base model via **kw
    out = mkhf.causal_lm_loss(
        model, ids, labels=labels, group_ids=groups,
        num_groups=num_groups, reduction=reduction, return_token_loss=return_token_loss, **model_kw,
    )
    tl = out.token_loss if return_token_loss else None
    if tl is not None and tl.shape[-1] == ids.shape[-1]:
        tl = tl[:, :-1]  # mixkernels aligns to the predicting position; the last predicts nothing
    return LossOutput(out.loss, out.group_loss.detach().float(), out.group_count.to(torch.int64), tl)


@dataclass
class Signals:
    """Everything a policy may read at an update (identical on all ranks).

    Arrays are indexed by domain in sampler order (``domain_names``). Fields not requested by
    the policy are ``None``. Over the interval since the previous update: ``train_loss_sum`` /
    ``train_token_count`` (label tokens), ``input_tokens`` (non-pad tokens), ``fractions`` (of
    sampled rows); ``domain_embedding`` [D, H]; ``router_stats`` [L, D, E] top-k expert counts;
    ``example_loss`` = (domain ids, per-row mean token loss). ``dev_domain_loss`` [D] is fresh
    at this step.
    """

    step: int
    domain_names: list[str]
    weights: np.ndarray
    train_loss_sum: np.ndarray
    train_token_count: np.ndarray
    fractions: np.ndarray
    dev_domain_loss: np.ndarray | None = None
    domain_embedding: np.ndarray | None = None
    router_stats: np.ndarray | None = None
    example_loss: tuple[np.ndarray, np.ndarray] | None = None
    input_tokens: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def train_domain_loss(self) -> np.ndarray:
        """Mean train token loss per domain over the interval (NaN where no tokens)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.train_token_count > 0, self.train_loss_sum / np.maximum(self.train_token_count, 1), np.nan)


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


class SignalBus:
    """Accumulates per-micro-batch signals; :meth:`end_step` all-reduces them once per step.

    Two windows are kept: the current step (for metrics) and the interval since the last policy
    update (for the policy), reset by :meth:`pop_interval`.
    """

    def __init__(self, domain_names: list[str], required: Iterable[str] = (), hidden_size: int | None = None) -> None:
        self.names = list(domain_names)
        self.d = len(self.names)
        self.required = set(required)
        self.hidden_size = hidden_size
        self._reset_step()
        self.iv_loss = np.zeros(self.d)
        self.iv_count = np.zeros(self.d, dtype=np.int64)
        self.iv_samples = np.zeros(self.d, dtype=np.int64)
        self.iv_inputs = np.zeros(self.d, dtype=np.int64)
        self.iv_emb: np.ndarray | None = None
        self.iv_emb_n = np.zeros(self.d)
        self.iv_router: np.ndarray | None = None
        self.iv_examples: list[tuple[np.ndarray, np.ndarray]] = []

    @property
    def wants_token_loss(self) -> bool:
        """Whether micro-batches must return per-token losses."""
        return "example_loss" in self.required

    @property
    def wants_hidden(self) -> bool:
        """Whether the decoder's last hidden state must be captured."""
        return "domain_embedding" in self.required

    def _reset_step(self) -> None:
        self.s_loss = torch.zeros(self.d, dtype=torch.float64)
        self.s_count = torch.zeros(self.d, dtype=torch.int64)
        self.s_samples = torch.zeros(self.d, dtype=torch.int64)
        self.s_inputs = torch.zeros(self.d, dtype=torch.int64)
        self.s_emb: torch.Tensor | None = None
        self.s_emb_n = torch.zeros(self.d, dtype=torch.float64)
        self.s_router: torch.Tensor | None = None
        self.s_examples: list[tuple[torch.Tensor, torch.Tensor]] = []

    def add_micro(
        self,
        batch: dict[str, torch.Tensor],
        out: LossOutput,
        hidden: torch.Tensor | None = None,
        router: torch.Tensor | None = None,
    ) -> None:
        """Accumulate one micro-batch (``hidden`` [B, T, H] when embeddings are wanted;
        ``router`` [D, E] per-domain router counts when router stats are wanted)."""
        self.s_loss += out.group_loss.detach().to(torch.float64).cpu()
        self.s_count += out.group_count.detach().cpu()
        dom = batch["domain_ids"].cpu()
        self.s_samples += torch.bincount(dom, minlength=self.d)
        self.s_inputs.index_add_(0, dom, batch["attention_mask"].sum(1).cpu())
        if hidden is not None:
            m = batch["attention_mask"].to(hidden.dtype).unsqueeze(-1)
            pooled = ((hidden.detach() * m).sum(1) / m.sum(1).clamp_min(1)).to(torch.float64).cpu()
            if self.s_emb is None:
                self.s_emb = torch.zeros(self.d, pooled.shape[-1], dtype=torch.float64)
            self.s_emb.index_add_(0, dom, pooled)
            self.s_emb_n += torch.bincount(dom, minlength=self.d).to(torch.float64)
        if router is not None:
            r = router.detach().to(torch.float64).cpu()
            self.s_router = r if self.s_router is None else self.s_router + r
        if out.token_loss is not None and self.wants_token_loss:
            tl = out.token_loss.detach().float()
            valid = batch["labels"][:, 1:] != -100
            per_row = (tl * valid).sum(1) / valid.sum(1).clamp_min(1)
            self.s_examples.append((dom, per_row.cpu()))

    def end_step(self) -> dict[str, np.ndarray]:
        """All-reduce this step's sums (one collective for the dense part) and roll them into the
        interval. Returns this step's ``{"loss_sum", "count", "samples", "input_tokens"}``."""
        dense = torch.cat([self.s_loss, self.s_count.to(torch.float64), self.s_samples.to(torch.float64),
                           self.s_inputs.to(torch.float64)])
        if self.s_emb is not None:
            dense = torch.cat([dense, self.s_emb.reshape(-1), self.s_emb_n])
        if self.s_router is not None:
            dense = torch.cat([dense, self.s_router.reshape(-1)])
        dense = _all_reduce(dense)
        d = self.d
        loss, count, samples = dense[:d].numpy(), dense[d:2 * d].numpy().round().astype(np.int64), dense[2 * d:3 * d].numpy().round().astype(np.int64)
        inputs = dense[3 * d:4 * d].numpy().round().astype(np.int64)
        off = 4 * d
        if self.s_emb is not None:
            h = self.s_emb.shape[1]
            emb = dense[off:off + d * h].numpy().reshape(d, h)
            emb_n = dense[off + d * h:off + d * h + d].numpy()
            off += d * h + d
            self.iv_emb = emb.copy() if self.iv_emb is None else self.iv_emb + emb
            self.iv_emb_n += emb_n
        if self.s_router is not None:
            r = dense[off:].numpy().reshape(self.s_router.shape)
            self.iv_router = r.copy() if self.iv_router is None else self.iv_router + r
        if self.s_examples:
            doms = torch.cat([a for a, _ in self.s_examples])
            losses = torch.cat([b for _, b in self.s_examples])
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                gd = [torch.zeros_like(doms) for _ in range(dist.get_world_size())]
                gl = [torch.zeros_like(losses) for _ in range(dist.get_world_size())]
                dist.all_gather(gd, doms)
                dist.all_gather(gl, losses)
                doms, losses = torch.cat(gd), torch.cat(gl)
            self.iv_examples.append((doms.numpy(), losses.numpy()))
        self.iv_loss += loss
        self.iv_count += count
        self.iv_samples += samples
        self.iv_inputs += inputs
        self._reset_step()
        return {"loss_sum": loss, "count": count, "samples": samples, "input_tokens": inputs}

    def state_dict(self) -> dict[str, Any]:
        """The open policy interval (JSON-serialisable), so a resumed run's next update sees the
        same signals as an uninterrupted one."""
        return {
            "loss": self.iv_loss.tolist(),
            "count": self.iv_count.tolist(),
            "samples": self.iv_samples.tolist(),
            "inputs": self.iv_inputs.tolist(),
            "emb": None if self.iv_emb is None else self.iv_emb.tolist(),
            "emb_n": self.iv_emb_n.tolist(),
            "router": None if self.iv_router is None else self.iv_router.tolist(),
            "examples": [[a.tolist(), b.tolist()] for a, b in self.iv_examples],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.iv_loss = np.asarray(state["loss"], dtype=np.float64)
        self.iv_count = np.asarray(state["count"], dtype=np.int64)
        self.iv_samples = np.asarray(state["samples"], dtype=np.int64)
        self.iv_inputs = np.asarray(state["inputs"], dtype=np.int64)
        self.iv_emb = None if state["emb"] is None else np.asarray(state["emb"], dtype=np.float64)
        self.iv_emb_n = np.asarray(state["emb_n"], dtype=np.float64)
        self.iv_router = None if state["router"] is None else np.asarray(state["router"], dtype=np.float64)
        self.iv_examples = [(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.float32)) for a, b in state["examples"]]

    def pop_interval(self, step: int, weights: np.ndarray, dev_loss: np.ndarray | None = None) -> Signals:
        """Build :class:`Signals` for the interval since the last call, then reset it."""
        total = self.iv_samples.sum()
        emb = None
        if self.iv_emb is not None:
            emb = self.iv_emb / np.maximum(self.iv_emb_n, 1)[:, None]
            emb[self.iv_emb_n == 0] = np.nan
        ex = None
        if self.iv_examples:
            ex = (np.concatenate([a for a, _ in self.iv_examples]), np.concatenate([b for _, b in self.iv_examples]))
        sig = Signals(
            step=step,
            domain_names=list(self.names),
            weights=np.asarray(weights, dtype=np.float64).copy(),
            train_loss_sum=self.iv_loss.copy(),
            train_token_count=self.iv_count.copy(),
            fractions=self.iv_samples / total if total else np.zeros(self.d),
            dev_domain_loss=dev_loss,
            domain_embedding=emb if "domain_embedding" in self.required else None,
            router_stats=self.iv_router.copy() if self.iv_router is not None else None,
            example_loss=ex if "example_loss" in self.required else None,
            input_tokens=self.iv_inputs.copy(),
        )
        self.iv_loss[:] = 0
        self.iv_count[:] = 0
        self.iv_samples[:] = 0
        self.iv_inputs[:] = 0
        self.iv_emb, self.iv_emb_n[:] = None, 0
        self.iv_router = None
        self.iv_examples = []
        return sig


@torch.no_grad()
def dev_losses(
    loss_fn: Callable[[dict[str, torch.Tensor]], LossOutput],
    make_batch: Callable[[list[tuple[int, int]]], dict[str, torch.Tensor]],
    dev_sizes: list[int],
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    per_row: bool = False,
) -> np.ndarray | tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Mean token loss per domain over the dev rows (NaN for domains without dev data).

    Rows are dealt round-robin over ranks in fixed-size batches; every rank runs the same number
    of forwards (padding with repeats it then ignores), which ZeRO-3 requires.

    ``per_row``: also return, per domain, the sum of token losses ``[n_d]`` float64 and the label
    token count ``[n_d]`` float64 of every dev row (row ``j`` = the domain's dev row ``j``), from
    ``LossOutput.token_loss`` (``loss_fn`` must then return it) and the batch's ``labels``; the
    per-domain mean is then ``row_sum.sum() / row_count.sum()``, the same as the first output.

    Raises:
        ValueError: ``per_row`` but ``loss_fn`` returned no ``token_loss``.
    """
    d = len(dev_sizes)
    items = [(di, j) for di, n in enumerate(dev_sizes) for j in range(n)]
    mine = list(range(rank, len(items), world_size))
    n_batches = -(-len(items[0::world_size]) // batch_size) if items else 0
    loss = torch.zeros(d, dtype=torch.float64)
    count = torch.zeros(d, dtype=torch.float64)
    row = torch.zeros(2, len(items) if per_row else 0, dtype=torch.float64)
    for b in range(n_batches):
        pos = mine[b * batch_size:(b + 1) * batch_size]
        chunk = [items[i] for i in pos]
        real = len(chunk)
        if real == 0:
            chunk = items[:1]
        batch = make_batch(chunk)
        out = loss_fn(batch)
        if real:
            loss += out.group_loss.to(torch.float64).cpu()
            count += out.group_count.to(torch.float64).cpu()
            if per_row:
                if out.token_loss is None:
                    raise ValueError("dev_losses(per_row=True): the loss function returned no token_loss")
                valid = (batch["labels"][:, 1:] != -100).to(torch.float64).cpu()
                tl = out.token_loss.detach().to(torch.float64).cpu()
                row[0, pos] = (tl * valid).sum(1)
                row[1, pos] = valid.sum(1)
    both = _all_reduce(torch.cat([loss, count, row.reshape(-1)]))
    loss, count = both[:d].numpy(), both[d:2 * d].numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(count > 0, loss / np.maximum(count, 1), np.nan)
    if not per_row:
        return means
    rows = both[2 * d:].reshape(2, -1).numpy()
    bounds = np.cumsum([0, *dev_sizes])
    return (means, [rows[0, bounds[i]:bounds[i + 1]].copy() for i in range(d)],
            [rows[1, bounds[i]:bounds[i + 1]].copy() for i in range(d)])
