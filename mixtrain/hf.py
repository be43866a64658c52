"""Mixing for ``transformers.Trainer`` users: :class:`MixtureDataset` + :class:`MixtureCallback`.

::

    ds = MixtureDataset(domains, tokenizer, global_batch_size=bs * grad_accum * world, seed=0)
    cb = MixtureCallback(mixtrain.policies.get("temperature", temperature=2.0), ds)
    args = TrainingArguments(..., remove_unused_columns=False, dataloader_num_workers=0)
    trainer = Trainer(model, args, train_dataset=ds, data_collator=cb.collator, callbacks=[cb])

The dataset is driven by the same :class:`mixtrain.sampler.MixtureSampler` (global stream,
weights constant within a global batch). The callback asks the policy for initial weights at
``on_train_begin`` and calls ``policy.update`` every ``update_every`` optimizer steps with the
signals it declared: ``train_domain_loss`` (from the model's logits of each training batch via a
forward hook), ``dev_domain_loss`` (a no-grad pass over the dev rows); other signals are only
available in the mixtrain loop. New weights apply from the next global batch the dataset draws
(the Trainer's data loader may already have prefetched one batch; use
``dataloader_num_workers=0`` so updates reach the dataset at all).

``MixtureDataset(..., packing=True)`` (or packed ``EncodedDomain`` s) packs examples per domain
(see :mod:`mixtrain.data.collate`): items then carry ``position_ids`` and the collator turns them
into the model inputs that keep attention within each example
(:func:`~mixtrain.data.collate.packed_attention_inputs`, for the model the callback got at
``on_train_begin``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from .data import EncodedDomain, collate, encode_domains, packed_attention_inputs
from .data.sources import Domain
from .policies import MixingPolicy, PolicyContext
from .sampler import MixtureSampler, validate_weights
from .signals import Signals

__all__ = ["MixtureCallback", "MixtureDataset"]


class MixtureDataset(torch.utils.data.IterableDataset):
    """Endless (or until exhaustion) stream of tokenised rows drawn by the mixture sampler.

    Args:
        domains: :class:`~mixtrain.data.Domain` (raw records, tokenised here with ``tokenizer``)
            or already-encoded :class:`~mixtrain.data.EncodedDomain`.
        tokenizer: a mixtrain tokenizer (``load_tokenizer("byte")`` or a local HF path).
        global_batch_size: samples per optimizer step over all ranks.
        weights: initial weights (uniform when ``None``; the callback replaces them).
        packing: pack the raw ``domains``' training examples (ignored for encoded domains, which
            are used as they are).
        Remaining arguments as in :class:`~mixtrain.sampler.MixtureSampler` / ``encode_domains``.

    Yields dicts with ``input_ids``, ``labels`` (lists) and ``domain_id`` (int), plus
    ``position_ids`` (list) for packed domains. :meth:`from_config` reads a mixtrain config's
    domains through the token cache instead.
    """

    def __init__(self, domains: Sequence[Domain | EncodedDomain], tokenizer: Any, *, global_batch_size: int,
                 seed: int = 0, weights: Any = None, max_length: int = 128, train_on_prompt: bool = False,
                 with_replacement: bool = False, exhaustion: str | Sequence[str] = "cycle", max_epochs: int = 1,
                 packing: bool = False) -> None:
        super().__init__()
        if all(isinstance(d, EncodedDomain) for d in domains):
            self.domains = list(domains)  # type: ignore[arg-type]
        else:
            self.domains = encode_domains(list(domains), tokenizer, max_length=max_length,  # type: ignore[arg-type]
                                          train_on_prompt=train_on_prompt, packing=packing)
        self.tokenizer = tokenizer
        self.names = [d.name for d in self.domains]
        sizes = [d.size for d in self.domains]
        w = weights if weights is not None else np.ones(len(sizes))
        self.sampler = MixtureSampler(sizes, w, global_batch_size=global_batch_size, seed=seed,
                                      with_replacement=with_replacement, exhaustion=exhaustion,
                                      max_epochs=max_epochs, domain_names=self.names)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            try:
                gb = self.sampler.next_global_batch()
            except StopIteration:
                return
            for d, e in zip(gb.domains.tolist(), gb.examples.tolist()):
                ids, labels = self.domains[d].train[e]
                item: dict[str, Any] = {"input_ids": list(map(int, ids)), "labels": list(map(int, labels)),
                                        "domain_id": d}
                if self.domains[d].train_positions is not None:
                    item["position_ids"] = list(map(int, self.domains[d].train_positions[e]))
                yield item

    @classmethod
    def from_config(cls, config: Any, overrides: Sequence[str] = (), *, global_batch_size: int | None = None,
                    weights: Any = None) -> MixtureDataset:
        """The domains of a mixtrain config (a :class:`~mixtrain.config.Config` or a YAML path, with
        ``k=v`` overrides) read through the token cache (built once, shared with ``mixtrain train``),
        with its sampler settings. ``global_batch_size`` defaults to the config's micro batch ×
        grad accum (× the world size when ``torch.distributed`` is initialised)."""
        from .config import Config, load_config
        from .data import encode_config_domains

        cfg = config if isinstance(config, Config) else load_config(config, overrides)
        tok, enc = encode_config_domains(cfg)
        t, d = cfg.train, cfg.data
        if global_batch_size is None:
            world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
            global_batch_size = t.micro_batch_size * t.grad_accum * world
        ex = d.exhaustion if isinstance(d.exhaustion, str) else [d.exhaustion.get(e.name, d.exhaustion.get("*", "cycle"))
                                                                 for e in enc]
        return cls(enc, tok, global_batch_size=global_batch_size, seed=t.seed, weights=weights,
                   with_replacement=d.with_replacement, exhaustion=ex, max_epochs=d.max_epochs)


class MixtureCallback(TrainerCallback):
    """Runs a mixing policy inside ``transformers.Trainer`` (see module docstring).

    Use :attr:`collator` as the Trainer's ``data_collator``: it pads, and records each batch's
    domain ids for the train-loss signal.
    """

    def __init__(self, policy: MixingPolicy, dataset: MixtureDataset, *, update_every: int | None = None,
                 dev_batch_size: int = 8) -> None:
        self.policy = policy
        self.dataset = dataset
        if update_every is not None:
            policy.update_every = update_every
        unsupported = set(policy.required_signals) - {"train_domain_loss", "dev_domain_loss"}
        if unsupported:
            raise ValueError(
                f"MixtureCallback: policy {policy.name!r} needs {sorted(unsupported)}, which only the "
                "mixtrain loop provides (python -m mixtrain train)"
            )
        if policy.requires_dev and any(not d.dev for d in dataset.domains):
            raise ValueError(f"MixtureCallback: policy {policy.name!r} needs dev splits for every domain")
        self.dev_batch_size = dev_batch_size
        self.d = len(dataset.names)
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._loss = np.zeros(self.d)
        self._count = np.zeros(self.d, dtype=np.int64)
        self._samples = np.zeros(self.d, dtype=np.int64)
        self._hook: Any = None
        self._model: torch.nn.Module | None = None
        self.history: list[list[Any]] = []

    def collator(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad a list of dataset items into a model batch (``domain_ids`` are kept aside).

        Packed items (with ``position_ids``) get the model's packed attention inputs in place of
        the 2D ``attention_mask``; that needs the model, known from ``on_train_begin``.
        """
        if features and "domain_id" not in features[0]:
            raise ValueError(
                "MixtureCallback.collator: items lack 'domain_id'; the Trainer removed it: set "
                "TrainingArguments(remove_unused_columns=False)"
            )
        packed = any("position_ids" in f for f in features)
        if packed and self._model is None:
            raise ValueError(
                "MixtureCallback.collator: packed items (with 'position_ids') need the model's attention "
                "implementation, known only after on_train_begin (the Trainer calls it before the first batch)"
            )
        b: dict[str, Any] = collate(
            [(f["input_ids"], f["labels"]) for f in features], [f["domain_id"] for f in features],
            self.dataset.tokenizer.pad_token_id,
            # an unpacked item among packed ones (mixed encoded domains) is one example
            position_ids=[f.get("position_ids", range(len(f["input_ids"]))) for f in features] if packed else None,
        )
        self._pending.append((b.pop("domain_ids"), b["labels"]))
        if packed:
            b.update(packed_attention_inputs(self._model, b["attention_mask"], b.pop("position_ids")))
        return b

    def _capture(self, module: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if not module.training or not self._pending:
            return
        dom, labels = self._pending.pop(0)
        logits = getattr(output, "logits", None)
        if logits is None:
            return
        with torch.no_grad():
            lg = logits[:, :-1].float()
            tgt = labels[:, 1:].to(lg.device)
            tok = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1),
                                                    ignore_index=-100, reduction="none").view_as(tgt)
            valid = tgt != -100
            np.add.at(self._loss, dom.numpy(), tok.sum(1).double().cpu().numpy())
            np.add.at(self._count, dom.numpy(), valid.sum(1).cpu().numpy())
            np.add.at(self._samples, dom.numpy(), 1)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        """Set up the policy and the initial weights."""
        ds = self.dataset
        self.policy.setup(PolicyContext(domain_names=ds.names, domain_sizes=list(ds.sampler.sizes), model=model,
                                        tokenizer=ds.tokenizer, domains=ds.domains, seed=ds.sampler.seed,
                                        sampler=ds.sampler))
        w = validate_weights(self.policy.initial_weights(dict(zip(ds.names, ds.sampler.sizes))), self.d, ds.names)
        ds.sampler.set_weights(w)
        self.history = [[0, w.tolist()]]
        self._model = model
        if model is not None and "train_domain_loss" in self.policy.required_signals:
            self._hook = model.register_forward_hook(self._capture, with_kwargs=True)

    @torch.no_grad()
    def _dev_loss(self, model: torch.nn.Module) -> np.ndarray:
        was = model.training
        model.eval()
        loss, count = np.zeros(self.d), np.zeros(self.d)
        dev = next(model.parameters()).device
        try:
            for di, dom in enumerate(self.dataset.domains):
                for i in range(0, len(dom.dev), self.dev_batch_size):
                    rows = dom.dev[i:i + self.dev_batch_size]
                    b = collate(rows, [di] * len(rows), self.dataset.tokenizer.pad_token_id)
                    out = model(input_ids=b["input_ids"].to(dev), attention_mask=b["attention_mask"].to(dev))
                    lg = out.logits[:, :-1].float()
                    tgt = b["labels"][:, 1:].to(dev)
                    tok = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1),
                                                            ignore_index=-100, reduction="sum")
                    loss[di] += float(tok)
                    count[di] += int((tgt != -100).sum())
        finally:
            model.train(was)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, loss / np.maximum(count, 1), np.nan)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        """Every ``update_every`` optimizer steps: signals → ``policy.update`` → sampler weights."""
        every = self.policy.update_every
        step = int(state.global_step)
        if not every or step % every:
            return
        ds = self.dataset
        dev = self._dev_loss(model) if "dev_domain_loss" in self.policy.required_signals and model is not None else None
        total = self._samples.sum()
        sig = Signals(step=step, domain_names=list(ds.names), weights=ds.sampler.weights.copy(),
                      train_loss_sum=self._loss.copy(), train_token_count=self._count.copy(),
                      fractions=self._samples / total if total else np.zeros(self.d), dev_domain_loss=dev)
        self._loss[:], self._count[:], self._samples[:] = 0, 0, 0
        new = self.policy.update(step, sig)
        if new is not None:
            new = validate_weights(new, self.d, ds.names)
            ds.sampler.set_weights(new)
            self.history.append([step, new.tolist()])

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        """Remove the forward hook."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
