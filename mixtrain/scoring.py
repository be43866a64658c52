"""Benchmark-style scoring of a causal LM on :class:`mixtrain.data.tasks.TaskItem` lists.

Multiple choice (``kind="mc"``), the OLMES "rank classification" form: each option's text is scored
as a continuation of the context, ``loglik = Σ log p(option tokens | context)``. The context is the
item's prompt rendered by the tokenizer's chat template up to and including the assistant header
(``render_chat([user], add_generation_prompt=True)``), i.e. exactly the tokens the model is trained
to answer after. Metrics (the predicted option is the arg-max, first on ties):

* ``acc_raw``: arg-max of ``loglik``;
* ``acc_per_char``: arg-max of ``loglik / len(option text)`` (OLMES ``acc_per_char``);
* ``acc_letter`` (tasks that show options as ``A. ...``): arg-max of ``log p(letter | context)``
  with the letter alone as continuation (``"A"``, no leading space): the training answer is
  ``"A. <option>"`` right after the assistant header, so the letter is its first token.

GSM8K (``kind="number"``): greedy generation (``do_sample=False``, batched, left padding) and the
final number of the output (the number after the last "answer is", else the last number; commas
stripped) compared as a number with the gold (``exact_match``).

TriviaQA / NQ (``kind="aliases"``): greedy generation; the first non-empty line of the output is
compared with every alias after SQuAD normalisation (lower case, punctuation and the articles
a/an/the removed, whitespace collapsed): ``exact_match``; ``contains`` (lenient, not a benchmark
number) is whether a normalised alias occurs as a whole-word span of the normalised output.

Log-likelihoods are computed in batches that share each item's context: one forward over the
contexts (right padding) keeps their key/value cache and the log-probabilities at the last context
position (the first token of every continuation, and the whole of a one-token letter); the cache is
then repeated per option and one forward over the continuations gives the rest. Log-softmax is
taken only at the positions that are scored (the LM head is applied to those hidden states only),
never over a [batch, time, vocab] tensor. :func:`loglikelihoods` with ``share_prefix=False`` scores
whole ``context + continuation`` sequences instead (models whose cache cannot be re-indexed).
"""

from __future__ import annotations

import inspect
import re
import string
import time
from collections.abc import Sequence
from typing import Any

import torch

from .data.tasks import TaskItem

__all__ = [
    "contains_answer",
    "extract_number",
    "loglikelihoods",
    "normalize_answer",
    "numbers_equal",
    "primary_metric",
    "score_items",
]

MC_METRICS = ("acc_raw", "acc_per_char", "acc_letter")
DEFAULT_MAX_NEW_TOKENS = {"number": 256, "aliases": 32}
_ROW_CHUNK = 512  # hidden rows sent through the LM head at once (bounds the [rows, vocab] buffer)


def primary_metric(kind: str) -> str:
    """The headline metric of an answer kind: ``acc_per_char`` for ``mc``, ``exact_match`` otherwise."""
    table = {"mc": "acc_per_char", "number": "exact_match", "aliases": "exact_match"}
    if kind not in table:
        raise ValueError(f"kind={kind!r}, expected one of {tuple(table)}")
    return table[kind]


# --------------------------------------------------------------------------------------------
# Answer normalisation
# --------------------------------------------------------------------------------------------

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_ANSWER_IS = re.compile(r"answer is", re.IGNORECASE)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, punctuation removed, articles a/an/the removed, whitespace
    collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def contains_answer(prediction: str, aliases: Sequence[str]) -> bool:
    """Whether some normalised alias is a whole-word span of the normalised prediction."""
    pred = f" {normalize_answer(prediction)} "
    return any(f" {a} " in pred for a in (normalize_answer(x) for x in aliases) if a)


def extract_number(text: str) -> str | None:
    """The final number of a worked answer: the first number after the last "answer is" if there is
    one, else the last number in ``text``; commas removed, a trailing ``.`` dropped. ``None`` if none."""
    found = list(_ANSWER_IS.finditer(text))
    m = _NUMBER.search(text, found[-1].end()) if found else None
    if m is None:
        nums = list(_NUMBER.finditer(text))
        m = nums[-1] if nums else None
    return None if m is None else m.group(0).replace(",", "").rstrip(".")


def numbers_equal(pred: str | None, gold: str) -> bool:
    """``pred`` and ``gold`` parse to the same number (commas ignored)."""
    if pred is None:
        return False
    try:
        return float(pred.replace(",", "")) == float(gold.replace(",", ""))
    except ValueError:
        return False


# --------------------------------------------------------------------------------------------
# Log-likelihoods
# --------------------------------------------------------------------------------------------


def _lm_parts(model: Any) -> tuple[Any, Any, float | None]:
    """(decoder returning hidden states, LM head, final logit soft-cap or None)."""
    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if dec is None or head is None or dec is model:
        raise TypeError(f"model {type(model).__name__}: expected a Hugging Face causal LM with get_decoder() "
                        "and get_output_embeddings()")
    return dec, head, getattr(model.config, "final_logit_softcapping", None)


def _token_logprobs(head: Any, softcap: float | None, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[i]) under the LM head at hidden[i]; hidden [N, H], targets [N] -> [N] float32."""
    out = []
    for s in range(0, hidden.shape[0], _ROW_CHUNK):
        logits = head(hidden[s:s + _ROW_CHUNK]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        out.append(logits.log_softmax(-1).gather(-1, targets[s:s + _ROW_CHUNK, None])[:, 0])
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def _select_cache(cache: Any, index: torch.Tensor) -> Any:
    """Re-index the batch dimension of a key/value cache (rows may repeat)."""
    if hasattr(cache, "batch_select_indices"):
        cache.batch_select_indices(index)
        return cache
    if isinstance(cache, tuple):  # legacy ((k, v), ...) per layer
        return tuple(tuple(t.index_select(0, index) for t in layer) for layer in cache)
    raise TypeError(f"cannot re-index a {type(cache).__name__} cache; use share_prefix=False")


def _cache_kwarg(dec: Any) -> str:
    """The decoder's key/value-cache argument: ``cache`` (transformers ≥ 5.2x) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(dec.forward).parameters else "past_key_values"


def _returned_cache(res: Any) -> Any:
    cache = getattr(res, "cache", None)
    return cache if cache is not None else res.past_key_values


def _check_requests(requests: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]]) -> None:
    for i, (ctx, conts) in enumerate(requests):
        if len(ctx) == 0:
            raise ValueError(f"requests[{i}]: empty context (expected at least one token, e.g. BOS)")
        for k, c in enumerate(conts):
            if len(c) == 0:
                raise ValueError(f"requests[{i}] continuation {k}: no tokens (expected ≥ 1)")


def _batches(order: list[int], batch_size: int) -> list[list[int]]:
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def _shared_prefix(model: Any, requests: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
                   batch_size: int, pad_id: int) -> list[list[float]]:
    dec, head, softcap = _lm_parts(model)
    device = next(model.parameters()).device
    out: list[list[float]] = [[0.0] * len(c) for _, c in requests]
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))
    for items in _batches(order, batch_size):
        ctx_len = [len(requests[i][0]) for i in items]
        lc = max(ctx_len)
        ids = torch.full((len(items), lc), pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), lc), dtype=torch.long)
        for b, i in enumerate(items):
            ids[b, : ctx_len[b]] = torch.tensor(list(requests[i][0]), dtype=torch.long)
            mask[b, : ctx_len[b]] = 1
        ids, mask = ids.to(device), mask.to(device)
        pos = torch.arange(lc, device=device).expand(len(items), lc)
        res = dec(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        last = res.last_hidden_state[torch.arange(len(items), device=device),
                                     torch.tensor(ctx_len, device=device) - 1]  # [B, H]
        # first token of every continuation, from the last context position
        rows_b, first = [], []
        for b, i in enumerate(items):
            for c in requests[i][1]:
                rows_b.append(b)
                first.append(int(c[0]))
        lp0 = _token_logprobs(head, softcap, last[torch.tensor(rows_b, device=device)],
                              torch.tensor(first, device=device))
        r = 0
        for i in items:
            for k in range(len(requests[i][1])):
                out[i][k] = float(lp0[r])
                r += 1
        # the rest of every continuation of more than one token, on the repeated context cache
        rows = [(b, i, k) for b, i in enumerate(items) for k, c in enumerate(requests[i][1]) if len(c) > 1]
        if not rows:
            continue
        cache = _returned_cache(res)
        lo = max(len(requests[i][1][k]) - 1 for _, i, k in rows)
        oids = torch.full((len(rows), lo), pad_id, dtype=torch.long)
        omask = torch.zeros((len(rows), lo), dtype=torch.long)
        for r, (_, i, k) in enumerate(rows):
            c = requests[i][1][k]
            oids[r, : len(c) - 1] = torch.tensor(list(c[:-1]), dtype=torch.long)
            omask[r, : len(c) - 1] = 1
        index = torch.tensor([b for b, _, _ in rows], device=device)
        cache = _select_cache(cache, index)
        full_mask = torch.cat([mask.index_select(0, index), omask.to(device)], dim=1)
        opos = torch.tensor([ctx_len[b] for b, _, _ in rows], device=device)[:, None] + torch.arange(lo, device=device)
        ores = dec(input_ids=oids.to(device), attention_mask=full_mask, position_ids=opos,
                   use_cache=True, **{_cache_kwarg(dec): cache})
        sel_r, sel_t, tgt = [], [], []
        for r, (_, i, k) in enumerate(rows):
            c = requests[i][1][k]
            for t in range(len(c) - 1):
                sel_r.append(r)
                sel_t.append(t)
                tgt.append(int(c[t + 1]))
        h = ores.last_hidden_state[torch.tensor(sel_r, device=device), torch.tensor(sel_t, device=device)]
        lp = _token_logprobs(head, softcap, h, torch.tensor(tgt, device=device))
        sums = torch.zeros(len(rows), dtype=torch.float64).index_add_(
            0, torch.tensor(sel_r), lp.double().cpu())
        for r, (_, i, k) in enumerate(rows):
            out[i][k] += float(sums[r])
        del res, ores, cache
    return out


def _whole_sequences(model: Any, requests: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
                     batch_size: int, pad_id: int) -> list[list[float]]:
    dec, head, softcap = _lm_parts(model)
    device = next(model.parameters()).device
    seqs = [(i, k, list(ctx), list(c)) for i, (ctx, conts) in enumerate(requests) for k, c in enumerate(conts)]
    out: list[list[float]] = [[0.0] * len(c) for _, c in requests]
    order = sorted(range(len(seqs)), key=lambda s: -(len(seqs[s][2]) + len(seqs[s][3])))
    for batch in _batches(order, batch_size):
        lens = [len(seqs[s][2]) + len(seqs[s][3]) for s in batch]
        t_max = max(lens)
        ids = torch.full((len(batch), t_max), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), t_max), dtype=torch.long)
        sel_r, sel_t, tgt = [], [], []
        for r, s in enumerate(batch):
            _, _, ctx, c = seqs[s]
            ids[r, : lens[r]] = torch.tensor(ctx + c, dtype=torch.long)
            mask[r, : lens[r]] = 1
            for j, tok in enumerate(c):
                sel_r.append(r)
                sel_t.append(len(ctx) - 1 + j)
                tgt.append(int(tok))
        res = dec(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        h = res.last_hidden_state[torch.tensor(sel_r, device=device), torch.tensor(sel_t, device=device)]
        lp = _token_logprobs(head, softcap, h, torch.tensor(tgt, device=device))
        sums = torch.zeros(len(batch), dtype=torch.float64).index_add_(0, torch.tensor(sel_r), lp.double().cpu())
        for r, s in enumerate(batch):
            out[seqs[s][0]][seqs[s][1]] = float(sums[r])
    return out


class _EvalMode:
    """``torch.no_grad`` + ``model.eval()``, the training flag restored on exit."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.was_training = bool(getattr(model, "training", False))
        self.grad = torch.no_grad()

    def __enter__(self) -> None:
        self.grad.__enter__()
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)
        self.grad.__exit__(*exc)


def loglikelihoods(model: Any, requests: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]], *,
                   batch_size: int = 16, pad_id: int = 0, share_prefix: bool = True) -> list[list[float]]:
    """Summed log-probabilities of token continuations given token contexts.

    Args:
        model: a Hugging Face causal LM.
        requests: ``(context ids, [continuation ids, ...])`` per item; every sequence non-empty.
        batch_size: items per forward (``share_prefix``) or sequences per forward (otherwise).
        pad_id: the id written into padding (masked out; any valid id).
        share_prefix: score every continuation of an item on one shared context forward.

    Returns:
        ``out[i][k] = Σ_t log p(cont_k[t] | context_i + cont_k[:t])`` (float, natural log).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}, expected ≥ 1")
    _check_requests(requests)
    with _EvalMode(model):
        fn = _shared_prefix if share_prefix else _whole_sequences
        return fn(model, requests, batch_size, pad_id)


# --------------------------------------------------------------------------------------------
# Items
# --------------------------------------------------------------------------------------------


def _context_ids(tokenizer: Any, item: TaskItem) -> list[int]:
    return tokenizer.render_chat([{"role": "user", "content": item.prompt}], add_generation_prompt=True)


def _score_mc(model: Any, tokenizer: Any, items: list[TaskItem], batch_size: int) -> list[dict[str, Any]]:
    requests = []
    for it in items:
        if len(it.choices) < 2 or not 0 <= it.gold < len(it.choices):
            raise ValueError(f"item {it.id!r}: {len(it.choices)} choices and gold={it.gold}; expected ≥ 2 choices "
                             "and a gold index among them")
        conts = [tokenizer.encode(c) for c in it.choices] + [tokenizer.encode(x) for x in it.letters]
        for k, c in enumerate(conts):
            if not c:
                raise ValueError(f"item {it.id!r}: option {k} ({(list(it.choices) + list(it.letters))[k]!r}) "
                                 "encodes to no tokens")
        requests.append((_context_ids(tokenizer, it), conts))
    ll = loglikelihoods(model, requests, batch_size=batch_size, pad_id=int(tokenizer.pad_token_id))
    results = []
    for it, scores in zip(items, ll):
        n = len(it.choices)
        raw = scores[:n]
        per_char = [s / max(1, len(c)) for s, c in zip(raw, it.choices)]
        pick_raw = max(range(n), key=lambda k: (raw[k], -k))
        pick_char = max(range(n), key=lambda k: (per_char[k], -k))
        res: dict[str, Any] = {"id": it.id, "kind": "mc", "gold": it.gold, "logliks": raw,
                               "chosen": {"acc_raw": pick_raw, "acc_per_char": pick_char},
                               "correct": {"acc_raw": pick_raw == it.gold, "acc_per_char": pick_char == it.gold}}
        if it.has_letters:
            letter = scores[n:]
            pick_letter = max(range(n), key=lambda k: (letter[k], -k))
            res["letter_logliks"] = letter
            res["chosen"]["acc_letter"] = pick_letter
            res["correct"]["acc_letter"] = pick_letter == it.gold
        results.append(res)
    return results


def _generate(model: Any, tokenizer: Any, items: list[TaskItem], batch_size: int,
              max_new_tokens: int) -> list[str]:
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    prompts = [_context_ids(tokenizer, it) for it in items]
    stop = sorted({int(tokenizer.eos_token_id), int(getattr(tokenizer, "end_of_turn_id", tokenizer.eos_token_id))})
    cfg = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stop,
                           pad_token_id=int(tokenizer.pad_token_id))
    texts = [""] * len(items)
    order = sorted(range(len(items)), key=lambda i: -len(prompts[i]))
    with _EvalMode(model):
        for batch in _batches(order, batch_size):
            width = max(len(prompts[i]) for i in batch)
            ids = torch.full((len(batch), width), int(tokenizer.pad_token_id), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, i in enumerate(batch):  # left padding: every prompt ends where generation starts
                ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i], dtype=torch.long)
                mask[r, width - len(prompts[i]):] = 1
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=cfg)
            for r, i in enumerate(batch):
                texts[i] = tokenizer.tok.decode(gen[r, width:].tolist(), skip_special_tokens=True)
    return texts


def _first_line(text: str) -> str:
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), "")


def score_items(model: Any, tokenizer: Any, items: Sequence[TaskItem], *, batch_size: int = 16,
                max_new_tokens: int | None = None) -> dict[str, Any]:
    """Score ``items`` the way their benchmarks do (see the module docstring).

    Args:
        model: a Hugging Face causal LM (left in the train/eval mode it came in).
        tokenizer: a :class:`mixtrain.data.HFTokenizer` (its chat template renders the prompts).
        items: task items of any kinds.
        batch_size: items per forward (multiple choice) or prompts per ``generate`` call.
        max_new_tokens: generation budget; default 256 for ``number``, 32 for ``aliases``.

    Returns:
        ``{"n", "metrics": {name: mean over the items it applies to}, "counts": {name: items},
        "items": [per-item dict: id, kind, correct {metric: bool}, chosen / logliks or output / pred],
        "seconds"}``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}, expected ≥ 1")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}, expected ≥ 1 or None")
    if not hasattr(tokenizer, "render_chat"):
        raise TypeError(f"tokenizer: expected a mixtrain HFTokenizer (with render_chat), got {type(tokenizer).__name__}")
    t0 = time.perf_counter()
    items = list(items)
    by_kind: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        if it.kind not in ("mc", "number", "aliases"):
            raise ValueError(f"item {it.id!r}: kind={it.kind!r}, expected 'mc', 'number' or 'aliases'")
        by_kind.setdefault(it.kind, []).append(i)
    results: list[dict[str, Any]] = [{} for _ in items]
    if "mc" in by_kind:
        idx = by_kind["mc"]
        for i, r in zip(idx, _score_mc(model, tokenizer, [items[i] for i in idx], batch_size)):
            results[i] = r
    for kind in ("number", "aliases"):
        if kind not in by_kind:
            continue
        idx = by_kind[kind]
        budget = max_new_tokens or DEFAULT_MAX_NEW_TOKENS[kind]
        outs = _generate(model, tokenizer, [items[i] for i in idx], batch_size, budget)
        for i, text in zip(idx, outs):
            it = items[i]
            if kind == "number":
                pred = extract_number(text)
                correct = {"exact_match": numbers_equal(pred, it.answers[0])}
            else:
                pred = _first_line(text)
                gold = {normalize_answer(a) for a in it.answers}
                correct = {"exact_match": normalize_answer(pred) in gold,
                           "contains": contains_answer(text, it.answers)}
            results[i] = {"id": it.id, "kind": kind, "output": text, "pred": pred, "answers": list(it.answers),
                          "correct": correct}
    sums: dict[str, int] = {}
    counts: dict[str, int] = {}
    for r in results:
        for m, ok in r["correct"].items():
            sums[m] = sums.get(m, 0) + int(ok)
            counts[m] = counts.get(m, 0) + 1
    metrics = {m: sums[m] / counts[m] for m in counts}
    return {"n": len(items), "metrics": metrics, "counts": counts, "items": results,
            "seconds": time.perf_counter() - t0}
