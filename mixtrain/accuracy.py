"""Exact-match task accuracy by greedy decoding on the dev splits (``eval.accuracy: true``).

Which domains are scored
    By default every domain whose name has an *answer rule*: the built-in short-answer tasks
    ``lego_k`` (family ``lego``), ``addition_k`` (family ``addition``) and ``math``. A domain
    named explicitly in ``eval.accuracy_domains`` but without a rule is scored with the ``exact``
    rule (the whole stripped response must match).

How an example is scored
    1. The dev row ``(input_ids, labels)`` is split at the first trained label: everything before
       it is the prompt (including the chat template up to the assistant header), the trained
       tokens without the final end-of-turn token (the chat template's, e.g. ``<|im_end|>``; else end-of-sequence) are the gold response.
    2. The model continues the prompt by greedy decoding (argmax, KV cache, batched with left
       padding; HF ``generate(do_sample=False)``) for at most ``max_new_tokens`` tokens
       (default: the longest gold response of the domain + 8), stopping at that end-of-turn token.
    3. The same answer rule is applied to the decoded continuation and to the gold response;
       the example is correct iff the rule finds an answer in both and they are equal.
       Rows whose gold response yields no answer (e.g. cut by ``data.max_length``) are skipped
       and counted in the log; so are rows whose response has no end-of-sequence (truncated).

Answer rules (:func:`extract_answer`), applied to the text before the first end-of-sequence:
    * ``lego``: the **last** ``<var> = ±1`` in the text, as ``"<var>=±1"`` (the variable asked
      for is the last one of the chain the response resolves, and both name and sign must match);
    * ``addition``: the digit after the **last** ``->``;
    * ``math``: the integer after the **last** ``Answer:`` (as an int, so ``007`` = ``7``);
    * ``exact``: the whole stripped text.

Per-rank sharding: rank ``r`` of ``W`` decodes dev rows ``r, r + W, …``; the per-example
results are all-reduced, so every rank returns the same numbers for any world size.

Per-example results (for paired statistics across runs): after a call,
:meth:`AccuracyEvaluator.per_example` gives ``{domain: {"index": [...], "correct": [...]}}``,
``index`` being the row's position in the domain's dev split (the same row in every run with the
same data settings, whatever the seed).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "ANSWER_RULES",
    "AccuracyEvaluator",
    "AccuracyExample",
    "accuracy_change",
    "answer_rule",
    "build_examples",
    "extract_answer",
    "hf_greedy_generate",
    "plot_accuracy_change",
    "score_predictions",
]

log = logging.getLogger("mixtrain")

IGNORE_INDEX = -100
ANSWER_RULES: tuple[str, ...] = ("lego", "addition", "math", "exact")

_LEGO = re.compile(r"([A-Za-z_]\w*)\s*=\s*([+-])\s*1\b")
_ADD = re.compile(r"->\s*(\d)")
_MATH = re.compile(r"Answer:\s*(-?\d+)")

GenerateFn = Callable[[list[list[int]], int], list[list[int]]]
"""``generate(prompts, max_new_tokens) -> continuations``: token ids in, new token ids out."""


def answer_rule(domain: str) -> str | None:
    """The answer rule of a domain name: ``lego_3`` → ``lego``, ``addition_1`` → ``addition``,
    ``math`` → ``math``; ``None`` for domains without a rule (``code``, ``docs``, user data)."""
    family, _, k = domain.partition("_")
    if family in ("lego", "addition") and (k == "" or k.isdigit()):
        return family
    if domain == "math":
        return "math"
    return None


def extract_answer(rule: str, text: str) -> str | None:
    """Apply answer rule ``rule`` (one of :data:`ANSWER_RULES`) to ``text``; ``None`` = no answer.

    Raises:
        ValueError: unknown rule (lists the valid ones).
    """
    if rule == "lego":
        found = _LEGO.findall(text)
        return f"{found[-1][0]}={found[-1][1]}1" if found else None
    if rule == "addition":
        found = _ADD.findall(text)
        return found[-1] if found else None
    if rule == "math":
        found = _MATH.findall(text)
        return str(int(found[-1])) if found else None
    if rule == "exact":
        s = text.strip()
        return s if s else None
    raise ValueError(f"answer rule {rule!r} is unknown; valid: {', '.join(ANSWER_RULES)}")


@dataclass(frozen=True)
class AccuracyExample:
    """One dev row prepared for decoding; ``index`` = its row number in the domain's dev split."""

    domain: str
    rule: str
    prompt_ids: tuple[int, ...]
    gold_text: str
    gold_answer: str
    gold_len: int
    index: int = -1


def _end_of_turn(tokenizer: Any) -> int:
    """The token that ends a reply: the chat template's end-of-turn (``<|im_end|>`` for ChatML),
    else end-of-sequence."""
    return int(getattr(tokenizer, "end_of_turn_id", tokenizer.eos_token_id))


def split_prompt_response(ids: Sequence[int], labels: Sequence[int], eos_token_id: int
                          ) -> tuple[list[int], list[int]] | None:
    """``(prompt, response)`` of a tokenised row: prompt = tokens before the first trained label,
    response = the trained tokens up to (not including) the first end-of-sequence; ``None`` when
    the row has no trained token, no prompt, or a response cut by ``max_length`` (no
    end-of-sequence among its trained tokens)."""
    first = next((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), None)
    if first is None or first == 0:
        return None
    resp = [int(t) for t, lab in zip(ids[first:], labels[first:]) if lab != IGNORE_INDEX]
    if eos_token_id not in resp:
        return None  # cut by max_length: the gold answer may be missing or wrong
    return [int(t) for t in ids[:first]], resp[: resp.index(eos_token_id)]


def build_examples(domains: Sequence[Any], tokenizer: Any, *, only: Sequence[str] | None = None,
                   max_examples: int = 64) -> tuple[list[AccuracyExample], dict[str, int]]:
    """Decodable dev examples of the scored domains.

    Args:
        domains: encoded domains (``name`` and ``dev`` rows of ``(input_ids, labels)``).
        tokenizer: has ``decode`` and ``eos_token_id``.
        only: domain names to score (default: every domain with an answer rule).
        max_examples: at most this many dev rows per domain (the first ones).

    Returns:
        ``(examples, skipped)``: skipped = ``{domain: rows whose gold response has no answer}``.

    Raises:
        ValueError: ``only`` names an unknown domain (the message lists the valid ones).
    """
    names = [d.name for d in domains]
    if only is not None:
        unknown = [n for n in only if n not in names]
        if unknown:
            raise ValueError(f"eval.accuracy_domains: unknown domain(s) {unknown}; domains: {names}")
    out: list[AccuracyExample] = []
    skipped: dict[str, int] = {}
    for d in domains:
        if only is not None and d.name not in only:
            continue
        rule = answer_rule(d.name) or ("exact" if only is not None else None)
        if rule is None:
            continue
        for row, (ids, labels) in enumerate(d.dev[:max_examples]):
            pr = split_prompt_response(ids, labels, _end_of_turn(tokenizer))
            gold = None if pr is None else tokenizer.decode(pr[1])
            ans = None if gold is None else extract_answer(rule, gold)
            if ans is None:
                skipped[d.name] = skipped.get(d.name, 0) + 1
                continue
            out.append(AccuracyExample(d.name, rule, tuple(pr[0]), gold, ans, len(pr[1]), row))
    return out, skipped


def score_predictions(examples: Sequence[AccuracyExample], predictions: Sequence[str]
                      ) -> dict[str, tuple[int, int]]:
    """``{domain: (correct, total)}`` for decoded ``predictions`` (one string per example)."""
    if len(examples) != len(predictions):
        raise ValueError(f"score_predictions: {len(examples)} examples but {len(predictions)} predictions")
    counts: dict[str, list[int]] = {}
    for ex, pred in zip(examples, predictions):
        c = counts.setdefault(ex.domain, [0, 0])
        c[1] += 1
        c[0] += int(extract_answer(ex.rule, pred) == ex.gold_answer)
    return {k: (v[0], v[1]) for k, v in counts.items()}


def hf_greedy_generate(model: torch.nn.Module, *, pad_token_id: int, eos_token_id: int,
                       device: torch.device | str = "cpu") -> GenerateFn:
    """A :data:`GenerateFn` over a transformers causal LM: batched greedy decoding with left
    padding and the KV cache (``model.generate(do_sample=False)``); continuations are cut after
    the first end-of-sequence (which is kept)."""

    @torch.no_grad()
    def generate(prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        t = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), t), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), t), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, t - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, t - len(p):] = 1
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
            min_new_tokens=0, do_sample=False, num_beams=1, pad_token_id=pad_token_id,
            eos_token_id=eos_token_id, use_cache=True, temperature=None, top_p=None, top_k=None,
        )
        res = []
        for row in out[:, t:].tolist():
            if eos_token_id in row:
                row = row[: row.index(eos_token_id) + 1]
            res.append(row)
        return res

    return generate


def task_items(domain: Any, max_examples: int) -> list[Any] | None:
    """The benchmark items of a real-task domain's first ``max_examples`` dev rows (read back from
    the token cache; the whole dev split, not the dev-loss rows ``data.max_dev_examples`` keeps);
    ``None`` for other domains."""
    rows = getattr(domain, "dev", None)
    cache = getattr(domain, "cache", None)
    if cache is not None:
        from .data.packing import Rows

        rows = Rows(*cache.dev)
    record = getattr(rows, "record", None)
    if record is None or not len(rows):
        return None
    first = record(0)
    if first.meta is None:
        return None
    import json

    from .data.tasks import item_from_json

    return [item_from_json(json.loads(record(i).meta)) for i in range(min(len(rows), max_examples))]


class AccuracyEvaluator:
    """Scores the configured domains; call with a :data:`GenerateFn` (or a model) at eval steps.

    Args:
        domains: encoded domains (see :func:`build_examples`).
        tokenizer: the run's tokenizer.
        only, max_examples: see :func:`build_examples`.
        batch_size: prompts decoded together.
        max_new_tokens: decoding budget; ``None`` = longest gold response of the domain + 8.
        rank, world_size: this process's share of the rows (counts are all-reduced).

    Raises:
        ValueError: no domain can be scored (the message names the domains and the rule).
    """

    def __init__(self, domains: Sequence[Any], tokenizer: Any, *, only: Sequence[str] | None = None,
                 max_examples: int = 64, batch_size: int = 32, max_new_tokens: int | None = None,
                 rank: int = 0, world_size: int = 1) -> None:
        self.tokenizer = tokenizer
        # real benchmark tasks are scored as their benchmarks score them (mixtrain.scoring)
        self.tasks: dict[str, list[Any]] = {}
        for d in domains:
            if only is None or d.name in only:
                items = task_items(d, max_examples)
                if items:
                    self.tasks[d.name] = items
        if self.tasks and not hasattr(tokenizer, "render_chat"):
            raise ValueError(
                f"eval.accuracy: benchmark task domains {sorted(self.tasks)} are scored through the model's chat "
                f"template, but the tokenizer is {type(tokenizer).__name__}; use a model with an HF tokenizer, or "
                "leave these domains out of eval.accuracy_domains"
            )
        rest = [d for d in domains if d.name not in self.tasks]
        rest_only = None if only is None else [n for n in only if n not in self.tasks]
        self.examples, self.skipped = build_examples(rest, tokenizer, only=rest_only, max_examples=max_examples)
        self.task_metrics: dict[str, dict[str, float]] = {}
        self._task_correct: dict[str, list[int]] = {}
        if not self.examples and not self.tasks:
            names = [d.name for d in domains]
            raise ValueError(
                f"eval.accuracy: no dev example can be scored in domains {names} (answer rules exist for "
                "lego_k, addition_k and math; name others in eval.accuracy_domains to use exact match, "
                "and make sure they have dev rows)"
            )
        if self.skipped:
            log.warning("accuracy: skipped dev rows whose gold response has no answer: %s", self.skipped)
        self.domains = sorted({e.domain for e in self.examples} | set(self.tasks), key=[d.name for d in domains].index)
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.rank, self.world_size = rank, world_size
        self.mine = [e for i, e in enumerate(self.examples) if i % world_size == rank]
        self._mine_pos = [i for i in range(len(self.examples)) if i % world_size == rank]
        self.last_correct: list[bool] | None = None

    def budget(self, domain: str) -> int:
        """Decoding budget of ``domain`` in tokens."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        return max(e.gold_len for e in self.examples if e.domain == domain) + 8

    def __call__(self, generate: GenerateFn) -> dict[str, float]:
        """``{domain: exact-match accuracy}`` over all ranks' rows (per example: :meth:`per_example`).

        Rows of all domains are decoded together, ordered by decoding budget then prompt length
        (fewer batches, little padding); each continuation is cut to its own domain's budget, so
        the result is that of decoding every domain on its own."""
        correct = torch.zeros(len(self.examples), dtype=torch.float64)  # each row decoded by one rank
        order = sorted(self._mine_pos, key=lambda i: (self.budget(self.examples[i].domain),
                                                      len(self.examples[i].prompt_ids)))
        for s in range(0, len(order), self.batch_size):
            pos = order[s: s + self.batch_size]
            chunk = [self.examples[i] for i in pos]
            budgets = [self.budget(e.domain) for e in chunk]
            conts = generate([list(e.prompt_ids) for e in chunk], max(budgets))
            for i, e, c, b in zip(pos, chunk, conts, budgets):
                correct[i] = float(extract_answer(e.rule, self._text(c[:b])) == e.gold_answer)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(correct)
        self.last_correct = [bool(x) for x in correct.tolist()]
        out = {}
        for dom in self.domains:
            if dom in self.tasks:
                continue
            hits = [c for c, e in zip(self.last_correct, self.examples) if e.domain == dom]
            out[dom] = sum(hits) / len(hits)
        return out

    def score_tasks(self, model: torch.nn.Module) -> dict[str, float]:
        """``{task domain: its primary metric}`` (every metric in :attr:`task_metrics`); each rank
        scores all items, so every rank returns the same numbers."""
        from .scoring import primary_metric, score_items

        out = {}
        for dom, items in self.tasks.items():
            res = score_items(model, self.tokenizer, items, batch_size=self.batch_size)
            self.task_metrics[dom] = {k: float(v) for k, v in res["metrics"].items()}
            metric = primary_metric(items[0].kind)
            out[dom] = float(res["metrics"][metric])
            self._task_correct[dom] = [int(r["correct"][metric]) for r in res["items"]]
        return out

    def per_example(self) -> dict[str, dict[str, list[int]]]:
        """Results of the last call: ``{domain: {"index": dev row numbers, "correct": 0/1}}``.

        Raises:
            RuntimeError: the evaluator has not been called yet.
        """
        if self.last_correct is None:
            raise RuntimeError("AccuracyEvaluator.per_example: call the evaluator first")
        out: dict[str, dict[str, list[int]]] = {}
        for e, c in zip(self.examples, self.last_correct):
            d = out.setdefault(e.domain, {"index": [], "correct": []})
            d["index"].append(e.index)
            d["correct"].append(int(c))
        for dom, correct in self._task_correct.items():
            out[dom] = {"index": list(range(len(correct))), "correct": correct}
        return out

    def _text(self, ids: Sequence[int]) -> str:
        ids = list(ids)
        eos = _end_of_turn(self.tokenizer)
        if eos in ids:
            ids = ids[: ids.index(eos)]
        return self.tokenizer.decode(ids)

    def evaluate_model(self, model: torch.nn.Module, *, device: torch.device | str = "cpu",
                       gather_zero3: bool = False) -> dict[str, float]:
        """Greedy-decode with ``model`` (eval mode, restored afterwards) and score.

        ``gather_zero3``: gather ZeRO-3 partitioned parameters for the duration (tiny models)."""
        was_training = model.training
        model.eval()
        gen = hf_greedy_generate(model, pad_token_id=self.tokenizer.pad_token_id,
                                 eos_token_id=_end_of_turn(self.tokenizer), device=device)
        def run() -> dict[str, float]:
            out = self(gen) if self.examples else {}
            if not self.examples:
                self.last_correct = []
            out.update(self.score_tasks(model) if self.tasks else {})
            return {d: out[d] for d in self.domains}

        try:
            if gather_zero3:
                import deepspeed

                with deepspeed.zero.GatheredParameters(list(model.parameters())):
                    return run()
            return run()
        finally:
            model.train(was_training)


def plot_accuracy(ax: Any, records: Sequence[dict[str, Any]]) -> bool:
    """Draw ``dev_accuracy`` per domain vs step on matplotlib axes ``ax``; ``False`` if none."""
    rows = [r for r in records if isinstance(r.get("dev_accuracy"), dict)]
    if not rows:
        return False
    names: list[str] = []
    for r in rows:
        names += [n for n in r["dev_accuracy"] if n not in names]
    for n in names:
        pts = [(r["step"], r["dev_accuracy"][n]) for r in rows if r["dev_accuracy"].get(n) is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, lw=1.2, label=n)
    ax.set(title="dev exact-match accuracy (greedy)", xlabel="step", ylabel="accuracy", ylim=(-0.02, 1.02))
    ax.legend(fontsize=7, loc="best")
    return True


def accuracy_change(records: Sequence[dict[str, Any]]) -> tuple[int, int, dict[str, tuple[float, float]]] | None:
    """``(first_step, last_step, {domain: (first, last)})`` of the first and last ``dev_accuracy``
    records (the first is step 0 with ``eval.at_start``); ``None`` with fewer than two."""
    rows = [r for r in records if isinstance(r.get("dev_accuracy"), dict)]
    if len(rows) < 2:
        return None
    a, b = rows[0], rows[-1]
    both = {n: (float(a["dev_accuracy"][n]), float(b["dev_accuracy"][n])) for n in b["dev_accuracy"]
            if a["dev_accuracy"].get(n) is not None and b["dev_accuracy"].get(n) is not None}
    return int(a["step"]), int(b["step"]), both


def plot_accuracy_change(ax: Any, records: Sequence[dict[str, Any]]) -> bool:
    """Bars of dev accuracy per domain at the first and the last evaluation; ``False`` if fewer
    than two evaluations."""
    change = accuracy_change(records)
    if change is None:
        return False
    first, last, acc = change
    names = list(acc)
    x = list(range(len(names)))
    ax.bar([i - 0.2 for i in x], [acc[n][0] for n in names], 0.4, color="0.65", label=f"step {first}")
    ax.bar([i + 0.2 for i in x], [acc[n][1] for n in names], 0.4, color="tab:green", label=f"step {last}")
    ax.set_xticks(x, names, rotation=45, ha="right")
    ax.set(title="dev accuracy: first vs last evaluation", ylabel="accuracy", ylim=(0, 1.02))
    ax.legend(fontsize=8, loc="upper left")
    return True
