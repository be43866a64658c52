"""Hostile data files: every error names the file, the line and what was expected; fuzzed bytes
and records either load or raise DataError (never another exception); rows cut by max_length are
counted per domain."""

from __future__ import annotations

import json
import logging
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixtrain.data import ByteTokenizer, encode_domains, load_domains, read_jsonl
from mixtrain.data.sources import MAX_LINE_BYTES, DataError, Domain, Record

GOOD = b'{"prompt": "2+2?", "response": "4"}\n'


def _write(tmp_path: Path, data: bytes, name: str = "d.jsonl") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


@pytest.mark.parametrize("line, expect", [
    (b'{"prompt": "caf\xe9", "response": "x"}', r"byte 16 of the line \(0xe9\) is not UTF-8"),
    (b'{"messages": "hi"}', r"'messages' must be a list of \{role, content\} objects, got string"),
    (b'{"messages": []}', r"'messages' is empty"),
    (b'{"messages": [{"role": "bot", "content": "x"}]}',
     r"messages\[0\]\.role is 'bot'; expected one of system, user, assistant, tool"),
    (b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 5}]}',
     r"messages\[1\]\.content must be a string, got number 5"),
    (b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}',
     r"messages\[1\]\.content is empty; expected text to train on"),
    (b'{"messages": [{"role": "user", "content": "q"}]}', r"'messages' has no assistant turn to train on"),
    (b'{"messages": [{"content": "q"}]}', r"messages\[0\] must be an object with 'role' and 'content', got \['content'\]"),
    (b'{"prompt": "q", "response": "   "}', r"'response' is only whitespace"),
    (b'{"prompt": 3, "response": "a"}', r"'prompt' must be a string, got number 3"),
    (b'{"text": ""}', r"'text' is empty"),
    (b'{"text": "\\ud800x"}', r"'text' contains the unpaired surrogate \\ud800 at character 0"),
    (b'{"text": NaN}', r"malformed JSON: NaN is not valid JSON"),
    (b'["a"]', r"expected a JSON object with 'messages', 'prompt'\+'response' or 'text', got array"),
    (b'{"question": "q"}', r"record has keys \['question'\]"),
    (b'{"prompt": "q", "response": "a"', r"malformed JSON at column 32"),
])
def test_each_bad_record_names_file_line_and_expectation(tmp_path, line, expect):
    p = _write(tmp_path, GOOD + b"\n" + line + b"\n" + GOOD)  # line 2 is blank: line 3 is the bad one
    with pytest.raises(DataError, match=rf"^{p}:3: {expect}"):
        read_jsonl(p)


def test_truncated_last_line(tmp_path):
    p = _write(tmp_path, GOOD * 2 + b'{"prompt": "q", "respo')
    with pytest.raises(DataError, match=rf"^{p}:3: the last line is cut short .*the file looks truncated"):
        read_jsonl(p)
    assert len(read_jsonl(_write(tmp_path, GOOD * 2 + GOOD.rstrip(), "ok.jsonl"))) == 3  # no newline but whole


def test_undecodable_file_through_load_domains_names_the_file(tmp_path):
    p = _write(tmp_path, GOOD + b"\xbe\xef\n")
    with pytest.raises(DataError, match=rf"^{p}:2: byte 1 of the line \(0xbe\) is not UTF-8"):
        load_domains([], {"d": str(p)}, dev_fraction=0.0, builtin_size=2, builtin_seed=0)


def test_100mb_single_line_is_refused_with_bounded_memory(tmp_path):
    p = tmp_path / "huge.jsonl"
    with open(p, "wb") as f:
        f.write(GOOD)
        f.write(b'{"text": "')
        chunk = b"a" * (1 << 20)
        f.writelines(chunk for _ in range(100))
        f.write(b'"}\n')
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=rf"^{p}:2: line longer than 16 MiB; expected one JSON record per line"):
            read_jsonl(p)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MAX_LINE_BYTES + (4 << 20), peak  # one line's worth at most, never the 100 MB


def test_long_line_under_the_limit_reads_whole(tmp_path):
    text = "é" * (1 << 20)  # 2 MiB of UTF-8
    p = _write(tmp_path, GOOD + json.dumps({"text": text}, ensure_ascii=False).encode() + b"\n")
    recs = read_jsonl(p)
    assert recs[1] == Record((("text", text),), plain_text=True)


def test_rows_cut_by_max_length_are_counted_per_domain(caplog):
    def rec(prompt: str, response: str) -> Record:
        return Record((("user", prompt), ("assistant", response)))

    tok = ByteTokenizer()
    # "<|user|>\n" + prompt + "\n" + "<|assistant|>\n" + response + eos: 24 tokens + the texts
    ok = Domain("ok", [rec("q", "a")] * 9 + [rec("q", "y" * 60)])            # 1 cut, keeps its response
    most = Domain("most", [rec("x" * 70, "a")] * 6 + [rec("q", "y" * 60)] * 2 + [rec("q", "a")] * 2)
    with caplog.at_level(logging.INFO, logger="mixtrain"):
        enc = encode_domains([ok, most], tok, max_length=64)
    assert (enc[0].truncated, enc[0].prompt_too_long) == (1, 0)
    assert (enc[1].truncated, enc[1].prompt_too_long) == (8, 6)
    # oracle: the uncut encodings' lengths and first trained position
    for d, e in zip((ok, most), enc):
        full = [tok.encode(f"<|user|>\n{r.messages[0][1]}\n<|assistant|>\n") for r in d.train]
        n_prompt = [len(f) + (tok.bos_token_id is not None) for f in full]
        n_all = [n + len(tok.encode(r.messages[1][1])) + 1 for n, r in zip(n_prompt, d.train)]
        assert e.truncated == sum(n > 64 for n in n_all)
        assert e.prompt_too_long == sum(n >= 64 for n in n_prompt)
    by_domain = {r.getMessage().split("'")[1]: r for r in caplog.records if "max_length=64" in r.getMessage()}
    assert by_domain["ok"].levelno == logging.INFO and "1 of 10 rows reach max_length=64" in by_domain["ok"].getMessage()
    assert by_domain["most"].levelno == logging.WARNING
    assert "8 of 10 rows reach max_length=64 (truncated) and 6 have no trained token left" in \
        by_domain["most"].getMessage()


# ---- fuzzing -----------------------------------------------------------------------------------

ROLES = ("system", "user", "assistant", "tool")
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=8,
)
_content = st.text(max_size=6) | _json
_message = st.fixed_dictionaries({"role": st.sampled_from([*ROLES, "bot", 3, None]), "content": _content},
                                 optional={"name": st.text(max_size=3)})
_record = st.one_of(
    _json,
    st.fixed_dictionaries({"messages": st.lists(_message, max_size=4) | _json}),
    st.fixed_dictionaries({"prompt": _content, "response": _content}),
    st.fixed_dictionaries({"text": _content}),
    st.fixed_dictionaries({"messages": st.just([{"role": "user", "content": "q"}, {"role": "assistant",
                                                                                    "content": "a"}])}),
)


def _nonblank(s: object) -> bool:
    return isinstance(s, str) and s.strip() != ""


def _is_text(s: object) -> bool:
    return isinstance(s, str) and not any(0xD800 <= ord(c) <= 0xDFFF for c in s)


def _valid(obj: object) -> bool:
    """The reader's contract, written out independently."""
    if not isinstance(obj, dict):
        return False
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            return False
        for m in msgs:
            if not (isinstance(m, dict) and "role" in m and "content" in m and isinstance(m["role"], str)
                    and m["role"] in ROLES and _is_text(m["content"])):
                return False
            if m["role"] == "assistant" and not _nonblank(m["content"]):
                return False
        return any(m["role"] == "assistant" for m in msgs)
    if "prompt" in obj and "response" in obj:
        return _is_text(obj["prompt"]) and _is_text(obj["response"]) and _nonblank(obj["response"])
    if "text" in obj:
        return _is_text(obj["text"]) and _nonblank(obj["text"])
    return False


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(_record, min_size=1, max_size=6))
def test_fuzz_records_load_or_fail_at_the_first_bad_line(tmp_path, records):
    p = tmp_path / "fuzz.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    bad = [i for i, r in enumerate(records) if not _valid(r)]
    if not bad:
        assert len(read_jsonl(p)) == len(records)
        return
    with pytest.raises(DataError, match=rf"^{p}:{bad[0] + 1}: "):
        read_jsonl(p)


_fragments = st.sampled_from([b"\n", b"\r\n", b"{", b"}", b'"', b":", b",", b"[", b"]", b'"text"', b'"messages"',
                              b'"prompt"', b'"response"', b'"role"', b'"content"', b'"assistant"', b"\xbe", b"\xc3",
                              b"\xc3\xa9", b"\\u", b"\\ud800", b"NaN", b"1e999", b"9" * 5000, b"[" * 3000, b" "])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.lists(st.binary(max_size=12) | _fragments, max_size=40).map(b"".join))
def test_fuzz_bytes_load_or_raise_data_error_naming_file_and_line(tmp_path, data):
    p = tmp_path / "bytes.jsonl"
    p.write_bytes(data)
    n_lines = data.count(b"\n") + (not data.endswith(b"\n"))
    try:
        recs = read_jsonl(p)
    except DataError as e:
        where = str(e).split(": ", 1)[0]
        assert where.startswith(f"{p}:")
        assert 1 <= int(where.rsplit(":", 1)[1]) <= n_lines
    else:
        assert all(isinstance(r, Record) for r in recs)
