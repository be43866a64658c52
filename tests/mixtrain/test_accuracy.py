"""Task accuracy: answer extraction, exact match, the evaluator with stub decoders, and the
batched KV-cached greedy decoder against a plain per-prompt argmax loop."""

from __future__ import annotations

import pytest
import torch

from mixtrain.accuracy import (
    AccuracyEvaluator,
    answer_rule,
    build_examples,
    extract_answer,
    hf_greedy_generate,
    score_predictions,
    split_prompt_response,
)
from mixtrain.config import ConfigError, from_dict
from mixtrain.data import encode_domains, load_domains
from mixtrain.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


@pytest.mark.parametrize(
    "rule,text,expected",
    [
        ("lego", "a = -1, q = +1, z = -1", "z=-1"),
        ("lego", "z = -1, s = +1, d = -1, h = -1, f = -1<eos>junk", "f=-1"),
        ("lego", "w=+1", "w=+1"),
        ("lego", "no assignment here", None),
        ("lego", "a = +12", None),  # not ±1
        ("addition", "7+8+0=15; 6+3+1=10 -> 0", "0"),
        ("addition", "3+4+0=7 -> 7 -> 2", "2"),  # the last arrow wins
        ("addition", "7+8+0=15", None),
        ("math", "35 / 5 = 7\n7 + 5 = 12\nAnswer: 12", "12"),
        ("math", "Answer: 3\nAnswer: 007", "7"),
        ("math", "Answer: -4", "-4"),
        ("math", "the answer is 12", None),
        ("exact", "  hello world \n", "hello world"),
        ("exact", "   ", None),
    ],
)
def test_extract_answer(rule: str, text: str, expected: str | None) -> None:
    assert extract_answer(rule, text) == expected


def test_extract_answer_bad_rule() -> None:
    with pytest.raises(ValueError, match="answer rule 'regex' is unknown; valid: lego, addition, math, exact"):
        extract_answer("regex", "x")


def test_answer_rule_by_domain() -> None:
    assert [answer_rule(n) for n in ("lego_3", "addition_1", "math", "code", "docs", "legos", "lego_x")] == [
        "lego", "addition", "math", None, None, None, None]


def test_split_prompt_response() -> None:
    ids = [257, 10, 11, 12, 20, 21, 258]
    labels = [-100, -100, -100, -100, 20, 21, 258]
    assert split_prompt_response(ids, labels, 258) == ([257, 10, 11, 12], [20, 21])
    assert split_prompt_response(ids, [-100] * 7, 258) is None
    assert split_prompt_response(ids[:-1], labels[:-1], 258) is None  # truncated: no eos


def test_truncated_rows_are_skipped() -> None:
    doms = load_domains(["lego_5"], {}, dev_fraction=0.5, builtin_size=20, builtin_seed=0)
    exs, skipped = build_examples(encode_domains(doms, TOK, max_length=96), TOK)
    assert exs == [] and skipped == {"lego_5": 10}  # every lego_5 answer is cut at 96 bytes
    exs, skipped = build_examples(encode_domains(doms, TOK, max_length=128), TOK)
    assert len(exs) == 10 and skipped == {}


def _lego_domains(n: int = 40):
    doms = load_domains(["lego_2", "addition_3", "code"], {}, dev_fraction=0.25, builtin_size=n, builtin_seed=0)
    return encode_domains(doms, TOK, max_length=128)


def test_build_examples_gold_answers_match_records() -> None:
    enc = _lego_domains()
    exs, skipped = build_examples(enc, TOK)
    assert skipped == {}
    assert {e.domain for e in exs} == {"lego_2", "addition_3"}  # code has no answer rule
    for e in exs:
        prompt = TOK.decode(e.prompt_ids)
        assert prompt.endswith("<|assistant|>\n")
        if e.rule == "addition":  # independent check of the gold answer from the prompt itself
            a, b = (int(x) for x in prompt.split("<|user|>\n")[1].split(".")[0].split(" + "))
            assert e.gold_answer == str((a + b) // 100 % 10)
        else:
            assert e.gold_text.count("=") == 2 and e.gold_answer == e.gold_text.split(", ")[-1].replace(" ", "")
    with pytest.raises(ValueError, match=r"eval.accuracy_domains: unknown domain\(s\) \['lego_9'\]"):
        build_examples(enc, TOK, only=["lego_9"])
    code_only, skipped = build_examples(enc, TOK, only=["code"], max_examples=3)
    # code rows cut by max_length keep no response: skipped, and counted
    assert len(code_only) + skipped.get("code", 0) == 3 and all(e.rule == "exact" for e in code_only)


def test_evaluator_with_stub_decoder_hand_checked() -> None:
    enc = _lego_domains()
    ev = AccuracyEvaluator(enc, TOK, max_examples=4, batch_size=3)
    by_prompt = {e.prompt_ids: e for e in ev.examples}
    lego = [e for e in ev.examples if e.domain == "lego_2"]
    add = [e for e in ev.examples if e.domain == "addition_3"]
    assert len(lego) == 4 and len(add) == 4
    # hand-chosen decodes: lego: 0 right, 1 wrong sign, 2 right + junk after eos, 3 wrong variable
    #                      addition: the first three right, the last without its "->"
    eos = [TOK.eos_token_id]
    plan: dict[tuple[int, ...], list[int]] = {}
    for i, e in enumerate(lego):
        var, val = e.gold_answer.split("=")
        flipped = "-1" if val == "+1" else "+1"
        other = "q" if var != "q" else "r"
        plan[e.prompt_ids] = [TOK.encode(e.gold_text) + eos, TOK.encode(e.gold_text[:-2] + flipped) + eos,
                              TOK.encode(e.gold_text) + eos + TOK.encode(", a = -1"),
                              TOK.encode(f"{other} = {val}") + eos][i]
    for i, e in enumerate(add):
        plan[e.prompt_ids] = TOK.encode(e.gold_text if i < 3 else e.gold_text.replace("->", "=")) + eos
    seen_budgets = []

    def stub(prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        seen_budgets.append(max_new_tokens)
        return [plan[tuple(p)] for p in prompts]

    acc = ev(stub)
    assert acc == {"lego_2": 0.5, "addition_3": 0.75}
    assert set(by_prompt) == set(plan)
    # default budget: longest gold response + 8, per domain; the 8 rows of both domains are decoded
    # in batches of 3 ordered by budget (lego's is the smaller), each batch with its largest budget
    b_lego, b_add = max(e.gold_len for e in lego) + 8, max(e.gold_len for e in add) + 8
    assert b_lego < b_add
    assert seen_budgets == [b_lego, b_add, b_add]


def test_score_predictions_counts() -> None:
    enc = _lego_domains()
    exs, _ = build_examples(enc, TOK, max_examples=2)
    preds = [e.gold_text for e in exs]
    preds[0] = "garbage"
    got = score_predictions(exs, preds)
    assert sum(c for c, _ in got.values()) == len(exs) - 1
    assert sum(n for _, n in got.values()) == len(exs)
    with pytest.raises(ValueError, match="2 examples but 1 predictions"):
        score_predictions(exs[:2], preds[:1])


def _tiny_llama(vocab: int = 259):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


@torch.no_grad()
def _argmax_loop(model, prompt: list[int], n: int, eos: int) -> list[int]:
    """Oracle: full forward of the growing unpadded sequence at every step, no cache."""
    seq = list(prompt)
    out = []
    for _ in range(n):
        nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
        out.append(nxt)
        seq.append(nxt)
        if nxt == eos:
            break
    return out


def test_hf_greedy_generate_matches_uncached_argmax() -> None:
    model = _tiny_llama()
    # make the eos token likely somewhere so the eos-cut path is exercised on some rows
    model.lm_head.weight.data[TOK.eos_token_id] *= 3.0
    prompts = [[257, 5, 6, 7, 8, 9, 10], [257, 40], [257, 1, 2, 3], [257, 99, 98, 97, 96, 95, 94, 93, 92]]
    gen = hf_greedy_generate(model, pad_token_id=TOK.pad_token_id, eos_token_id=TOK.eos_token_id)
    got = gen(prompts, 12)
    for p, g in zip(prompts, got):
        assert g == _argmax_loop(model, p, 12, TOK.eos_token_id), p
    assert len(got) == 4 and all(1 <= len(g) <= 12 for g in got)


def test_forced_model_scores_hand_checked() -> None:
    """A tiny model whose LM head is forced (zero weight, one-hot bias) to emit "7" forever: its
    greedy decode of 3 tokens is "777", so exact-match scores are known by hand."""
    from mixtrain.data.collate import EncodedDomain
    from mixtrain.data.sources import Record
    from mixtrain.data.tokenizer import encode_messages

    model = _tiny_llama()
    head = torch.nn.Linear(32, 259, bias=True)
    head.weight.data.zero_()
    head.bias.data.zero_()
    head.bias.data[ord("7")] = 5.0
    model.lm_head = head
    model.train()
    golds = ["777", "777", "77", "7 7 7"]  # exact match with a 3-token budget: yes, yes, no, no
    rows = [encode_messages(TOK, Record((("user", f"q{i}"), ("assistant", g))).as_messages(), max_length=64)
            for i, g in enumerate(golds)]
    dom = EncodedDomain("sevens", train=rows, dev=rows, records=[])
    ev = AccuracyEvaluator([dom], TOK, only=["sevens"], batch_size=3, max_new_tokens=3)
    assert ev.evaluate_model(model) == {"sevens": 0.5}
    assert model.training  # mode restored
    gen = hf_greedy_generate(model, pad_token_id=TOK.pad_token_id, eos_token_id=TOK.eos_token_id)
    assert [TOK.decode(o) for o in gen([list(e.prompt_ids) for e in ev.examples], 3)] == ["777"] * 4
    with pytest.raises(ValueError, match="eval.accuracy: no dev example can be scored"):
        AccuracyEvaluator([dom], TOK)  # no answer rule for "sevens" unless named


def test_eval_config_section_validation() -> None:
    base = {"model": {"config": {"model_type": "llama"}}, "data": {"builtin": ["lego"]}}
    cfg = from_dict({**base, "eval": {"accuracy": True, "max_examples": 5}})
    assert cfg.eval.accuracy and cfg.eval.max_examples == 5 and cfg.eval.batch_size == 32
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['accuracyy'\] in section 'eval'; valid keys: accuracy"):
        from_dict({**base, "eval": {"accuracyy": True}})
    with pytest.raises(ConfigError, match="eval.batch_size: got 0, expected an integer >= 1"):
        from_dict({**base, "eval": {"batch_size": 0}})
    from mixtrain.config import config_fingerprint

    assert config_fingerprint(cfg) == config_fingerprint(from_dict(base))  # eval never blocks resume
