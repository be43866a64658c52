"""Varlen ("padding-free") packing: a packed row must give, token for token, the losses of its
examples run one at a time through the plain transformers model (the oracle)."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mixtrain.data import IGNORE_INDEX, collate, encode_messages, generate, load_tokenizer, pack_rows
from mixtrain.data.collate import encode_domains, encode_records, packed_attention_inputs
from mixtrain.data.sources import Domain, Record
from mixtrain.signals import causal_lm_loss

REPO = Path(__file__).resolve().parents[2]
MAX_LEN = 96


def _records() -> list[Record]:
    """Chat records of varied lengths (one longer than MAX_LEN, so it is split over rows) and
    plain-text records (trained from their first token on)."""
    chat = [
        Record((("user", "hi"), ("assistant", "hello there"))),
        Record((("user", "2+2?"), ("assistant", "4"))),
        Record((("system", "be brief"), ("user", "name a colour"), ("assistant", "teal"))),
        Record((("user", "x" * 70), ("assistant", "y" * 60))),  # 140+ tokens > MAX_LEN
        Record((("user", "ok"), ("assistant", "sure"))),
    ]
    text = [Record((("user", t),), plain_text=True) for t in ("abc def", "the quick brown fox", "zz")]
    return [chat[0], text[0], chat[1], chat[2], text[1], chat[3], text[2], chat[4]]


def _full(tok, recs, train_on_prompt=True) -> list[tuple[list[int], list[int]]]:
    """Each record tokenised alone, untruncated (what the oracle runs)."""
    return [encode_messages(tok, r.as_messages(), max_length=10**6, train_on_prompt=train_on_prompt,
                            plain_text=r.plain_text) for r in recs]


def _model(impl: str, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      attn_implementation=impl)
    return LlamaForCausalLM(cfg).eval()


def _packed(tok, train_on_prompt=True):
    """train_on_prompt: every example's first token (<bos>) has a label, so the boundary rule matters."""
    recs = _records()
    d = encode_domains([Domain("d", recs)], tok, max_length=MAX_LEN, train_on_prompt=train_on_prompt,
                       packing=True)[0]
    return recs, d


def _segments(pos: list[int]) -> list[tuple[int, int]]:
    """[start, end) of the example pieces of a packed row, from its position ids."""
    starts = [i for i in range(len(pos)) if i == 0 or pos[i] != pos[i - 1] + 1] + [len(pos)]
    return list(itertools.pairwise(starts))


@torch.no_grad()
def _oracle_token_loss(model, tok, recs, d) -> list[torch.Tensor]:
    """Per packed row, [T - 1] losses (position t predicts token t + 1) from running every
    example piece alone through the plain HF model with the *unpacked* labels. Pieces and their
    positions come from the examples' own spans in the stream, not from the packer's positions."""
    full = _full(tok, recs)
    spans, off = [], 0  # (stream start, stream end) of every example
    for ids, _ in full:
        spans.append((off, off + len(ids)))
        off += len(ids)
    stream_ids = [x for ids, _ in full for x in ids]
    stream_lab = [x for _, lab in full for x in lab]
    out, r0 = [], 0
    for ids, _ in d.train:
        r1 = r0 + len(ids)
        assert ids == stream_ids[r0:r1]
        want = torch.zeros(len(ids) - 1)
        for a, b in spans:
            s, e = max(a, r0), min(b, r1)
            if s >= e:
                continue
            # a piece continuing an example from the previous row runs with its positions in the
            # example: there is no earlier context in the row, so that is all the row can show
            piece = torch.tensor([stream_ids[s:e]])
            logits = model(input_ids=piece, position_ids=torch.arange(s - a, e - a)[None]).logits[0].float()
            lab = torch.tensor(stream_lab[s + 1:e])
            tl = torch.nn.functional.cross_entropy(logits[:-1], lab, ignore_index=IGNORE_INDEX, reduction="none")
            want[s - r0:e - r0 - 1] = tl
        out.append(want)
        r0 = r1
    return out


def _loss(model, batch) -> torch.Tensor:
    return causal_lm_loss(model, batch, 1, return_token_loss=True, reduction="sum").token_loss


# ---- data: positions and labels ---------------------------------------------------------------


def test_pack_rows_positions_labels_and_split():
    rows = [([1, 2, 3], [1, 2, 3]), ([4, 5, 6, 7, 8, 9], [4, 5, 6, 7, 8, 9]), ([10, 11], [10, 11])]
    packed, pos = pack_rows(rows, 4)
    assert [ids for ids, _ in packed] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11]]
    # the second example (6 tokens) starts at the end of row 0 and continues: positions continue
    assert pos == [[0, 1, 2, 0], [1, 2, 3, 4], [5, 0, 1]]
    # every example's first token is not a target (it would be predicted from the previous example)
    assert [lab for _, lab in packed] == [[-100, 2, 3, -100], [5, 6, 7, 8], [9, -100, 11]]
    # a trailing single-token row (nothing to predict) is dropped, positions stay parallel
    packed, pos = pack_rows([([1, 2, 3], [1, 2, 3]), ([4, 5], [4, 5])], 4)
    assert [ids for ids, _ in packed] == [[1, 2, 3, 4]] and pos == [[0, 1, 2, 0]]
    with pytest.raises(ValueError, match="max_length must be an int >= 2, got 1"):
        pack_rows(rows, 1)
    with pytest.raises(ValueError, match=r"rows\[0\] has 2 input ids but 1 labels"):
        pack_rows([([1, 2], [1])], 4)


def test_encoded_domain_positions_and_trained_token_count():
    """(b) labels at example starts are -100, and the trained-token count is the unpacked one
    minus what the boundary rule removes (checked against an independent count)."""
    tok = load_tokenizer("byte")
    recs = _records() * 3
    d = encode_domains([Domain("d", recs, dev=recs[:4])], tok, max_length=MAX_LEN, train_on_prompt=True,
                       packing=True)[0]
    assert d.train_positions is not None and len(d.train_positions) == len(d.train)
    full = _full(tok, recs, train_on_prompt=True)
    stream_lab = [x for _, lab in full for x in lab]
    first = set()  # stream offsets of example starts
    off = 0
    for ids, _ in full:
        first.add(off)
        off += len(ids)

    def trained(rows):
        return sum(1 for _, lab in rows for x in lab[1:] if x != IGNORE_INDEX)

    off, mid_row_starts, cut_losses = 0, 0, 0
    for (ids, lab), pos in zip(d.train, d.train_positions):
        for t in range(len(ids)):
            assert (pos[t] == 0) == (off + t in first)  # positions restart exactly at example starts
            if off + t in first:
                assert lab[t] == IGNORE_INDEX
                if t > 0 and stream_lab[off + t] != IGNORE_INDEX:
                    mid_row_starts += 1
            else:
                assert lab[t] == stream_lab[off + t]
        if off not in first and stream_lab[off] != IGNORE_INDEX:
            cut_losses += 1  # a row cut inside an example: its first token predicts from nothing
        off += len(ids)
    # the boundary rule really removes targets here (train_on_prompt: <bos> is trained), and some
    # example is split over rows
    assert mid_row_starts > 0 and cut_losses > 0
    # vs the previous (non-varlen) packing of the same stream: exactly the example-start targets fewer
    old = [(None, stream_lab[i:i + MAX_LEN]) for i in range(0, len(stream_lab), MAX_LEN) if len(stream_lab) - i > 1]
    assert trained(d.train) == trained(old) - mid_row_starts
    # vs each example trained alone (untruncated): only the targets at row cuts inside an example are lost
    assert trained(d.train) == trained(full) - cut_losses
    # dev is never packed
    assert d.dev == encode_records(tok, recs[:4], max_length=MAX_LEN, train_on_prompt=True)


def test_packing_warns_about_split_examples(caplog):
    tok = load_tokenizer("byte")
    with caplog.at_level("WARNING", logger="mixtrain"):
        encode_domains([Domain("d", _records())], tok, max_length=MAX_LEN, packing=True)
        encode_domains([Domain("short", _records()[:3])], tok, max_length=MAX_LEN, packing=True)
    msgs = [r.getMessage() for r in caplog.records]
    n = len(_full(tok, _records()[5:6])[0][0])
    want = (f"domain 'd': packing splits 1 example(s) longer than max_length={MAX_LEN} over rows "
            f"(longest {n} tokens: position ids up to {n - 1}); raise data.max_length to keep them whole")
    assert msgs == [want]


def test_collate_position_ids_only_when_given():
    rows = [([1, 2, 3], [1, 2, 3]), ([4, 5], [-100, 5])]
    plain = collate(rows, [0, 1], 0, pad_to_multiple_of=4)
    assert "position_ids" not in plain
    b = collate(rows, [0, 1], 0, pad_to_multiple_of=4, position_ids=[[0, 1, 0], [3, 4]])
    assert b["position_ids"].tolist() == [[0, 1, 0, 0], [3, 4, 0, 0]]
    for k in plain:
        assert torch.equal(plain[k], b[k])
    with pytest.raises(ValueError, match="2 rows but 1 position_ids rows"):
        collate(rows, [0, 1], 0, position_ids=[[0, 1, 2]])
    with pytest.raises(ValueError, match=r"position_ids\[1\] has 3 ids but row 1 has 2 tokens"):
        collate(rows, [0, 1], 0, position_ids=[[0, 1, 2], [0, 1, 2]])


def test_packed_attention_inputs_segments():
    model = _model("sdpa", 16)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    pos = torch.tensor([[3, 4, 0, 1, 0], [0, 1, 2, 0, 0]])
    m = packed_attention_inputs(model, mask, pos)["attention_mask"]
    assert m.dtype == torch.bool and m.shape == (2, 1, 5, 5)
    want0 = [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]]
    want1 = [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    assert m[0, 0].int().tolist() == want0 and m[1, 0].int().tolist() == want1
    model.config._attn_implementation = "eager"
    e = packed_attention_inputs(model, mask, pos)["attention_mask"]
    assert e.dtype == torch.float32 and torch.equal(e == 0, m)
    model.config._attn_implementation = "flash_attention_2"
    f = packed_attention_inputs(model, mask, pos)
    assert f["attention_mask"] is None and f["position_ids"] is pos
    assert f["cu_seq_lens_q"].tolist() == [0, 2, 4, 5, 8, 10] and f["max_length_q"] == 3
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="attn_implementation='flex_attention' is not supported"):
        packed_attention_inputs(model, mask, pos)
    with pytest.raises(ValueError, match=r"attention_mask \(2, 5\) and position_ids \(2, 4\) must both be"):
        packed_attention_inputs(model, mask, pos[:, :4])


# ---- the oracle ---------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_rows_match_examples_run_alone(impl):
    """(a) every packed row (one at a time, no padding) gives the per-token losses of its
    examples run alone through the plain HF model; without position ids it does not."""
    tok = load_tokenizer("byte")
    recs, d = _packed(tok)
    model = _model(impl, tok.vocab_size)
    want = _oracle_token_loss(model, tok, recs, d)
    assert len(d.train) >= 3 and any(len(_segments(p)) >= 3 for p in d.train_positions)
    with torch.no_grad():
        for i, (row, pos) in enumerate(zip(d.train, d.train_positions)):
            b = collate([row], [0], tok.pad_token_id, position_ids=[pos])
            got = _loss(model, b)[0]
            torch.testing.assert_close(got, want[i], rtol=1e-5, atol=1e-6)
            if len(_segments(pos)) > 1:
                b.pop("position_ids")  # the old packing: attention spans the examples
                assert (_loss(model, b)[0] - want[i]).abs().max() > 1e-3


def test_loss_model_threads_position_ids():
    """``LossModel.forward(..., position_ids=...)`` (what DeepSpeed calls in the loop) gives the
    oracle's token losses; without them it does not."""
    from mixtrain.engine import LossModel

    tok = load_tokenizer("byte")
    recs, d = _packed(tok)
    model = _model("sdpa", tok.vocab_size)
    want = _oracle_token_loss(model, tok, recs, d)
    wrapper = LossModel(model, 1)
    wrapper.return_token_loss = True
    b = collate(d.train[:1], [0], tok.pad_token_id, position_ids=d.train_positions[:1])
    with torch.no_grad():
        torch.testing.assert_close(wrapper(**b)["token_loss"][0], want[0], rtol=1e-5, atol=1e-6)
        b.pop("position_ids")
        assert (wrapper(**b)["token_loss"][0] - want[0]).abs().max() > 1e-3


def test_hf_logits_path_matches_oracle():
    """The inputs the HF-Trainer collator hands the model (``model(**batch)``, default
    ``use_cache``) give the oracle's losses too; transformers' own detection would not here."""
    tok = load_tokenizer("byte")
    recs, d = _packed(tok)
    model = _model("sdpa", tok.vocab_size)
    want = _oracle_token_loss(model, tok, recs, d)
    row, pos = d.train[0], d.train_positions[0]
    b = collate([row], [0], tok.pad_token_id, position_ids=[pos])
    with torch.no_grad():
        for kw in (packed_attention_inputs(model, b["attention_mask"], b["position_ids"]),
                   {"position_ids": b["position_ids"]}):  # attention_mask=None: transformers' detection
            logits = model(input_ids=b["input_ids"], **kw).logits[0]
            got = torch.nn.functional.cross_entropy(logits[:-1], b["labels"][0, 1:], reduction="none")
            ok = torch.allclose(got, want[0], rtol=1e-5, atol=1e-6)
            assert ok == ("attention_mask" in kw)


def test_padded_batch_of_packed_rows_matches_rows_alone():
    """(c) two packed rows of different lengths, right-padded into one batch, give the losses of
    each row alone; pads add nothing."""
    tok = load_tokenizer("byte")
    _recs, d = _packed(tok)
    model = _model("sdpa", tok.vocab_size)
    rows, pos = d.train, d.train_positions
    i, j = 0, len(rows) - 1
    assert len(rows[j][0]) < len(rows[i][0]) - 10
    with torch.no_grad():
        both = _loss(model, collate([rows[i], rows[j]], [0, 0], tok.pad_token_id, pad_to_multiple_of=8,
                                    position_ids=[pos[i], pos[j]]))
        for k, r in enumerate((i, j)):
            alone = _loss(model, collate([rows[r]], [0], tok.pad_token_id, position_ids=[pos[r]]))[0]
            n = len(alone)
            torch.testing.assert_close(both[k, :n], alone, rtol=1e-5, atol=1e-6)
            assert both[k, n:].abs().sum() == 0
        for impl in ("eager", "sdpa"):
            model.config._attn_implementation = impl
            b = collate([rows[i], rows[j]], [0, 0], tok.pad_token_id, position_ids=[pos[i], pos[j]])
            kw = packed_attention_inputs(model, b["attention_mask"], b["position_ids"])
            assert torch.isfinite(model(input_ids=b["input_ids"], **kw).logits).all()  # no all-masked pad row


def test_flash_varlen_boundaries_match_oracle():
    """The flash-attention route (attention_mask=None + cu_seq_lens over the flattened batch)
    through a registered pure-torch varlen attention: a padded batch with a row that continues
    an example gives the oracle's losses (the GPU kernel itself is not run here)."""
    from transformers import AttentionInterface

    seen = {}

    def varlen(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        assert attention_mask is None
        cu = kw["cu_seq_lens_q"]
        seen["cu"] = cu
        b, h, t, dim = query.shape
        rep = h // key.shape[1]
        q = query.transpose(1, 2).reshape(b * t, h, dim)
        k = key.repeat_interleave(rep, 1).transpose(1, 2).reshape(b * t, h, dim)
        v = value.repeat_interleave(rep, 1).transpose(1, 2).reshape(b * t, h, dim)
        out = torch.empty_like(q)
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
            out[s:e] = torch.nn.functional.scaled_dot_product_attention(
                q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1), is_causal=True,
                scale=scaling).transpose(0, 1)
        return out.view(b, t, h, dim), None

    AttentionInterface.register("flash_varlen_probe", varlen)
    tok = load_tokenizer("byte")
    recs, d = _packed(tok)
    model = _model("sdpa", tok.vocab_size)
    want = _oracle_token_loss(model, tok, recs, d)
    model.config._attn_implementation = "flash_varlen_probe"
    cont = next(r for r, p in enumerate(d.train_positions) if p[0] != 0)  # a row continuing an example
    last = len(d.train) - 1
    assert cont != last
    with torch.no_grad():
        got = _loss(model, collate([d.train[cont], d.train[last]], [0, 0], tok.pad_token_id,
                                   position_ids=[d.train_positions[cont], d.train_positions[last]]))
    assert len(seen["cu"]) > 3
    for k, r in enumerate((cont, last)):
        torch.testing.assert_close(got[k, :len(want[r])], want[r], rtol=1e-5, atol=1e-6)


def test_hf_collator_packs_for_the_model():
    """MixtureDataset(packing=True) items carry position ids; MixtureCallback.collator turns
    them into the model's packed inputs (what ``Trainer`` passes as ``model(**batch)``)."""
    from mixtrain import policies
    from mixtrain.hf import MixtureCallback, MixtureDataset

    tok = load_tokenizer("byte")
    recs = _records()
    ds = MixtureDataset([Domain("d", recs)], tok, global_batch_size=2, seed=0, max_length=MAX_LEN,
                        train_on_prompt=True, packing=True)
    items = [x for _, x in zip(range(2), iter(ds))]
    assert all(len(x["position_ids"]) == len(x["input_ids"]) for x in items)
    cb = MixtureCallback(policies.get("uniform"), ds)
    with pytest.raises(ValueError, match="packed items .* need the model's attention implementation"):
        cb.collator(items)
    model = _model("eager", tok.vocab_size)
    cb.on_train_begin(None, None, None, model=model)
    b = cb.collator(items)
    assert b["attention_mask"].dim() == 4 and "domain_ids" not in b
    want = _oracle_token_loss(model, tok, recs, ds.domains[0])
    rows = {tuple(ids): i for i, (ids, _) in enumerate(ds.domains[0].train)}
    with torch.no_grad():
        logits = model(**{k: v for k, v in b.items() if k != "labels"}).logits
    for k, x in enumerate(items):
        n = len(x["input_ids"])
        got = torch.nn.functional.cross_entropy(logits[k, :n - 1], b["labels"][k, 1:n], reduction="none")
        torch.testing.assert_close(got, want[rows[tuple(x["input_ids"])]], rtol=1e-5, atol=1e-6)


# ---- end to end ---------------------------------------------------------------------------------


def test_existing_packing_data_path_stays_row_compatible():
    """Consumers unpack rows as ``(ids, labels)`` pairs; packed domains keep that shape."""
    tok = load_tokenizer("byte")
    d = encode_domains([Domain("lego", generate("lego_2", 12, 0))], tok, max_length=64, packing=True)[0]
    for ids, lab in d.train:
        assert len(ids) == len(lab) <= 64
    assert d.train_positions[0][0] == 0 and sum(p.count(0) for p in d.train_positions) == 12
    assert encode_domains([Domain("lego", generate("lego_2", 12, 0))], tok, max_length=64)[0].train_positions is None


@pytest.mark.slow
def test_train_cli_with_packing(tmp_path):
    """(d) ``python -m mixtrain train`` with ``data.packing=true`` runs (packed train batches
    with position ids through DeepSpeed, unpacked dev batches)."""
    cfg = {
        "model": {"config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                             "max_position_embeddings": 1024}, "tokenizer": "byte"},
        "data": {"builtin": ["math", "lego_1", "addition_1"], "builtin_size": 40, "max_length": 128,
                 "packing": True},
        "mixing": {"policy": "uniform"},
        "train": {"steps": 2, "micro_batch_size": 2, "grad_accum": 1, "lr": 3e-3, "warmup": 0,
                  "eval_every": 2, "log_every": 1, "seed": 0, "progress": False, "threads": 1},
        "output_dir": str(tmp_path / "run"),
    }
    p = tmp_path / "packed.yaml"
    p.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "mixtrain", "train", str(p)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs] == [1, 2]
    assert all(math.isfinite(x["loss"]) and x["tokens"] > 0 for x in recs)
    assert "dev_loss" in recs[1]


def test_collate_examples_mixes_packed_and_unpacked_domains():
    """(domain, row) pairs → a batch: packed rows keep their position ids, an unpacked row counts
    as one example (0..n-1), dev rows never get position ids."""
    from mixtrain.data import EncodedDomain, collate_examples

    packed = EncodedDomain("p", [([1, 2, 3, 4], [-100, 2, -100, 4])], [([5, 6], [5, 6])], [], [[0, 1, 0, 1]])
    plain = EncodedDomain("u", [([7, 8, 9], [7, 8, 9])], [], [])
    b = collate_examples([packed, plain], [(1, 0), (0, 0)], pad_token_id=0)
    assert b["position_ids"].tolist() == [[0, 1, 2, 0], [0, 1, 0, 1]]
    assert b["domain_ids"].tolist() == [1, 0] and b["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert "position_ids" not in collate_examples([plain], [(0, 0)], pad_token_id=0)
    assert "position_ids" not in collate_examples([packed], [(0, 0)], pad_token_id=0, split="dev")
