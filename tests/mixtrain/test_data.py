"""Data: built-in corpus correctness/determinism, JSONL/HF sources, tokenisation, bad input."""

from __future__ import annotations

import ast
import itertools
import json
import re

import pytest

from mixtrain.data import (
    ByteTokenizer,
    DataError,
    collate,
    encode_messages,
    generate,
    load_domains,
    load_path,
)
from mixtrain.data.sources import split_dev


def test_builtin_is_deterministic_and_seeded():
    for name in ("code", "docs", "math", "lego_3", "addition_2"):
        a, b = generate(name, 40, 1), generate(name, 40, 1)
        assert a == b
        assert generate(name, 40, 2) != a
        assert len(set(a)) >= 35  # non-trivial: (almost) all distinct


def _resolve_lego(prompt: str) -> dict[str, int]:
    clauses, _question = prompt.split(". What is ")
    env: dict[str, int] = {}
    rules = [c.split(" = ") for c in clauses.split("; ")]
    while len(env) < len(rules):
        for var, rhs in rules:
            sign = 1 if rhs[0] == "+" else -1
            if rhs[1:] == "1":
                env[var] = sign
            elif rhs[1:] in env:
                env[var] = sign * env[rhs[1:]]
    return env


@pytest.mark.parametrize("skill", [1, 3, 5])
def test_lego_answers_are_correct(skill):
    for r in generate(f"lego_{skill}", 50, 0):
        prompt, answer = r.messages[0][1], r.messages[1][1]
        env = _resolve_lego(prompt)
        target = prompt.split("What is ")[1].rstrip("?")
        steps = answer.split(", ")
        assert len(steps) == skill  # skill k = k hops of resolution
        var, val = steps[-1].split(" = ")
        assert var == target and int(val.replace("+", "")) == env[target]


@pytest.mark.parametrize("skill", [1, 2, 3])
def test_addition_digits_are_correct(skill):
    for r in generate(f"addition_{skill}", 50, 0):
        a, b = map(int, re.match(r"(\d+) \+ (\d+)", r.messages[0][1]).groups())
        digit = int(r.messages[1][1].rsplit("-> ", 1)[1])
        assert digit == ((a + b) // 10 ** (skill - 1)) % 10


def test_math_worked_answers_are_correct():
    for r in generate("math", 60, 0):
        lines = r.messages[1][1].splitlines()
        for line in lines[:-1]:
            expr, res = line.replace(" per day", "").split(" = ")
            assert eval(expr, {}) == int(res)
        assert lines[-1] == f"Answer: {lines[-2].split(' = ')[1].split()[0]}"


def test_code_and_docs_come_from_stdlib_source():
    for r in generate("code", 30, 0):
        prompt, body = r.messages[0][1], r.messages[1][1]
        src = prompt.split("\n", 1)[1] + body
        tree = ast.parse(src)  # header + body is valid Python
        assert isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef))
        assert ast.get_docstring(tree.body[0])
    import importlib
    import inspect

    checked = 0
    for r in generate("docs", 30, 0):
        m = re.search(r"`([\w.]+)`", r.messages[0][1]).group(1)
        parts = m.split(".")
        for i in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:i]))
                break
            except ImportError:
                continue
        try:
            for p in parts[i:]:
                obj = getattr(obj, p)
        except AttributeError:
            continue  # e.g. a def inside an `if` branch not taken on this platform
        assert inspect.cleandoc(obj.__doc__).startswith(r.messages[1][1][:40])
        checked += 1
    assert checked >= 20


def test_jsonl_formats_and_dev_split(tmp_path):
    f = tmp_path / "a.jsonl"
    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(20)]
    rows += [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
             {"text": "plain document"}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    recs = load_path(f)
    assert len(recs) == 22 and recs[-1].plain_text
    tr, dev = split_dev("a", recs, 0.1)
    assert len(dev) == 2 and len(tr) == 20 and set(tr).isdisjoint(dev)
    assert split_dev("a", recs, 0.1) == (tr, dev)
    folder = tmp_path / "dom"
    folder.mkdir()
    (folder / "1.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    (folder / "2.jsonl").write_text(json.dumps({"text": "y"}) + "\n")
    doms = load_domains(["math"], {"mine": str(folder), "a": {"train": str(f), "dev": str(folder)}},
                        dev_fraction=0.0, builtin_size=5, builtin_seed=0)
    assert [d.name for d in doms] == ["math", "mine", "a"]
    assert len(doms[1].train) == 2 and len(doms[2].dev) == 2


def test_hf_dataset_from_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"prompt": f"q{i}", "response": f"a{i}"} for i in range(5)])
    ds.save_to_disk(str(tmp_path / "hf"))
    recs = load_path(tmp_path / "hf")
    assert [r.messages[1][1] for r in recs] == [f"a{i}" for i in range(5)]


def test_malformed_jsonl_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{"text": broken}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON"):
        load_path(f)
    f.write_text('{"text": "ok"}\n{"question": "no"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: record has keys \['question'\]"):
        load_path(f)


def test_empty_domain_and_unknown_builtin(tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text("\n")
    with pytest.raises(DataError, match="domain 'e' is empty"):
        load_domains([], {"e": str(f)}, dev_fraction=0.0, builtin_size=5, builtin_seed=0)
    with pytest.raises(DataError, match="unknown built-in domain 'poetry'"):
        load_domains(["poetry"], {}, dev_fraction=0.0, builtin_size=5, builtin_seed=0)
    with pytest.raises(DataError, match="does not exist"):
        load_domains([], {"x": str(tmp_path / "nope.jsonl")}, dev_fraction=0.0, builtin_size=5, builtin_seed=0)


def test_byte_tokenizer_masks_prompt_and_truncates():
    tok = ByteTokenizer()
    msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    ids, labels = encode_messages(tok, msgs, max_length=100)
    assert tok.decode(ids) == "<bos><|user|>\n2+2?\n<|assistant|>\n4<eos>"
    assert [x for x in labels if x != -100] == [ord("4"), tok.eos_token_id]
    ids2, labels2 = encode_messages(tok, msgs, max_length=100, train_on_prompt=True)
    assert labels2 == ids2
    ids3, labels3 = encode_messages(tok, msgs, max_length=5)
    assert ids3 == ids[:5] and all(x == -100 for x in labels3)
    ids4, labels4 = encode_messages(tok, [{"role": "text", "content": "ab"}], max_length=9, plain_text=True)
    assert labels4[1:] == ids4[1:] == [97, 98, tok.eos_token_id]


def test_collate_pads_and_keeps_domains():
    b = collate([([1, 2, 3], [-100, 2, 3]), ([4], [4])], [2, 0], pad_token_id=9)
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert b["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["domain_ids"].tolist() == [2, 0]


def test_packing_keeps_every_example_whole():
    from mixtrain.data import encode_domains, encode_records
    from mixtrain.data.sources import Domain

    tok = ByteTokenizer()
    recs = generate("lego_2", 10, 0) + generate("math", 6, 0)
    full = [encode_messages(tok, r.as_messages(), max_length=120) for r in recs]
    packed = encode_records(tok, recs, max_length=120, train_on_prompt=False, packing=True)
    enc = encode_domains([Domain("mix", recs)], tok, max_length=120, packing=True)[0]
    assert [(list(a), list(b)) for a, b in enc.train] == [(list(a), list(b)) for a, b in packed]
    # every example appears exactly once, whole, inside one row; its first label is not a target
    # (it would be predicted from the previous example's last token), the others are unchanged
    pieces = []
    for (ids, lab), pos in zip(enc.train, enc.train_positions):
        assert len(ids) <= 120 and len(pos) == len(ids)
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(ids)]
        assert list(pos) == [i for a, b in itertools.pairwise(starts) for i in range(b - a)]
        for a, b in itertools.pairwise(starts):
            pieces.append((tuple(ids[a:b]), tuple(lab[a:b])))
    expect = sorted((tuple(i), (-100, *l[1:])) for i, l in full)
    assert sorted(pieces) == expect
    # best fit decreasing: no two rows could be merged
    lengths = sorted(len(ids) for ids, _ in enc.train)
    assert lengths[0] + lengths[1] > 120


def test_truncation_warning_names_the_domain(caplog):
    from mixtrain.data import encode_domains
    from mixtrain.data.sources import Domain, Record

    def rec(prompt, response):
        return Record((("user", prompt), ("assistant", response)))

    tok = ByteTokenizer()
    short = Domain("short", [rec("q", "a") for _ in range(10)])
    long = Domain("long", [rec("x" * 200, "y" * 50) for _ in range(8)] + [rec("q", "a") for _ in range(2)])
    with caplog.at_level("WARNING", logger="mixtrain"):
        enc = encode_domains([short, long], tok, max_length=64)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1, msgs
    assert "'long'" in msgs[0] and "8 of 10 rows reach max_length=64" in msgs[0] and "8 have no trained token" in msgs[0]
    assert enc[1].size == 10  # a warning, not a filter: the rows stay
