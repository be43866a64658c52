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

import numpy as np
import pytest
import torch
import yaml

from mixtrain.data import (
    IGNORE_INDEX,
    collate,
    encode_domains,
    encode_messages,
    encode_records,
    generate,
    load_tokenizer,
    pack_rows,
    packed_attention_inputs,
)
from mixtrain.data.packing import pack_bfd
from mixtrain.data.sources import Domain, Record
from mixtrain.engine import standalone_env
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
    """Per packed row, [T - 1] losses (position t predicts token t + 1) from running every example
    alone through the plain HF model with its own labels. Which examples a row holds is found by
    matching their tokens (each record tokenised alone, cut at MAX_LEN), not from the packer's
    position ids; the position where one example ends and the next begins predicts nothing."""
    full = [(ids[:MAX_LEN], lab[:MAX_LEN]) for ids, lab in _full(tok, recs)]
    unused = set(range(len(full)))
    out = []
    for ids, _ in d.train:
        ids = [int(x) for x in ids]
        want = torch.zeros(len(ids) - 1)
        off = 0
        while off < len(ids):
            fits = [e for e in unused if full[e][0] == ids[off:off + len(full[e][0])]]
            assert fits, f"no example starts at token {off} of a packed row"
            e = max(fits, key=lambda k: len(full[k][0]))
            unused.discard(e)
            ex_ids, ex_lab = full[e]
            logits = model(input_ids=torch.tensor([ex_ids])).logits[0].float()
            tl = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ex_lab[1:]), ignore_index=IGNORE_INDEX,
                                                   reduction="none")
            want[off:off + len(ex_ids) - 1] = tl
            off += len(ex_ids)
        out.append(want)
    assert not unused, "every example is packed exactly once"
    return out


def _multi(d) -> int:
    """The packed row holding the most examples."""
    return max(range(len(d.train)), key=lambda r: len(_segments(list(d.train_positions[r]))))


def _loss(model, batch) -> torch.Tensor:
    return causal_lm_loss(model, batch, 1, return_token_loss=True, reduction="sum").token_loss


# ---- data: positions and labels ---------------------------------------------------------------


def test_pack_bfd_hand_cases():
    # classic instance, capacity 10: 5 and 4 open row 0, the 3s, 2s go to row 1, the 1 fills row 0
    offsets, items = pack_bfd(np.array([5, 4, 3, 3, 2, 2, 1]), 10, seed=0)
    rows = [sorted(items[a:b].tolist()) for a, b in itertools.pairwise(offsets)]
    assert rows == [[0, 1, 6], [2, 3, 4, 5]]
    # deterministic in the seed; ties are broken by it, never the packing quality
    assert [x.tolist() for x in pack_bfd(np.array([2, 2, 2, 2]), 4, seed=3)] == \
        [x.tolist() for x in pack_bfd(np.array([2, 2, 2, 2]), 4, seed=3)]
    with pytest.raises(ValueError, match="an example has 5 tokens, more than max_length=4"):
        pack_bfd(np.array([5]), 4)


def test_pack_rows_whole_examples_positions_labels():
    rows = [([1, 2, 3], [1, 2, 3]), ([4, 5, 6, 7, 8, 9], [4, 5, 6, 7, 8, 9]), ([10, 11], [10, 11])]
    packed, pos = pack_rows(rows, 5)
    # the 6-token example is cut at max_length (like unpacked rows); best fit decreasing puts it
    # alone, then the 3- and 2-token examples together; nothing is split
    assert [ids for ids, _ in packed] == [[4, 5, 6, 7, 8], [1, 2, 3, 10, 11]]
    assert pos == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1]]
    # every example's first token is not a target (it would be predicted from the previous example)
    assert [lab for _, lab in packed] == [[-100, 5, 6, 7, 8], [-100, 2, 3, -100, 11]]
    with pytest.raises(ValueError, match="max_length must be an int >= 2, got 1"):
        pack_rows(rows, 1)
    with pytest.raises(ValueError, match=r"rows\[0\] has 2 input ids but 1 labels"):
        pack_rows([([1, 2], [1])], 4)


def test_encoded_domain_positions_and_trained_token_count():
    """Labels at example starts are -100, positions restart there, and the trained-token count is
    each example's own (cut at max_length, as unpacked): packing loses no target."""
    tok = load_tokenizer("byte")
    recs = _records() * 3
    d = encode_domains([Domain("d", recs, dev=recs[:4])], tok, max_length=MAX_LEN, train_on_prompt=True,
                       packing=True)[0]
    u = encode_domains([Domain("d", recs, dev=recs[:4])], tok, max_length=MAX_LEN, train_on_prompt=True)[0]
    assert d.train_positions is not None and len(d.train_positions) == len(d.train) < len(recs)
    for (ids, lab), pos in zip(d.train, d.train_positions):
        assert len(ids) <= MAX_LEN
        assert all(lab[t] == IGNORE_INDEX for t in range(len(ids)) if pos[t] == 0)
    assert int(d.train_label_counts().sum()) == int(u.train_label_counts().sum())
    assert d.train_label_counts().tolist() == [int((np.asarray(lab[1:]) != IGNORE_INDEX).sum()) for _, lab in d.train]
    assert d.truncated == u.truncated == 3  # the long chat record, once per copy
    # dev is never packed
    assert [(list(a), list(b)) for a, b in d.dev] == encode_records(tok, recs[:4], max_length=MAX_LEN,
                                                                     train_on_prompt=True)


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
    assert len(d.train) >= 3 and any(len(_segments(list(p))) >= 3 for p in d.train_positions)
    with torch.no_grad():
        for i, (row, pos) in enumerate(zip(d.train, d.train_positions)):
            b = collate([row], [0], tok.pad_token_id, position_ids=[pos])
            got = _loss(model, b)[0]
            torch.testing.assert_close(got, want[i], rtol=1e-5, atol=1e-6)
            if len(_segments(list(pos))) > 1:
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
    r = _multi(d)
    b = collate([d.train[r]], [0], tok.pad_token_id, position_ids=[d.train_positions[r]])
    with torch.no_grad():
        torch.testing.assert_close(wrapper(**b)["token_loss"][0], want[r], rtol=1e-5, atol=1e-6)
        b.pop("position_ids")
        assert (wrapper(**b)["token_loss"][0] - want[r]).abs().max() > 1e-3


def test_hf_logits_path_matches_oracle():
    """The inputs the HF-Trainer collator hands the model (``model(**batch)``, default
    ``use_cache``) give the oracle's losses too; transformers' own detection would not here."""
    tok = load_tokenizer("byte")
    recs, d = _packed(tok)
    model = _model("sdpa", tok.vocab_size)
    want = _oracle_token_loss(model, tok, recs, d)
    r = _multi(d)
    row, pos = d.train[r], d.train_positions[r]
    b = collate([row], [0], tok.pad_token_id, position_ids=[pos])
    with torch.no_grad():
        for kw in (packed_attention_inputs(model, b["attention_mask"], b["position_ids"]),
                   {"position_ids": b["position_ids"]}):  # attention_mask=None: transformers' detection
            logits = model(input_ids=b["input_ids"], **kw).logits[0]
            got = torch.nn.functional.cross_entropy(logits[:-1], b["labels"][0, 1:], reduction="none")
            ok = torch.allclose(got, want[r], rtol=1e-5, atol=1e-6)
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
    through a registered pure-torch varlen attention: a padded batch with a row of three or more
    examples gives the oracle's losses (the GPU kernel itself is not run here)."""
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
    cont = next(r for r, p in enumerate(d.train_positions) if len(_segments(list(p))) >= 3)  # 3+ examples
    last = len(d.train) - 1
    assert cont != last and len(d.train[last][0]) < len(d.train[cont][0])  # padded in the batch
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
    rows = {tuple(int(t) for t in ids): i for i, (ids, _) in enumerate(ds.domains[0].train)}
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
    assert d.train_positions[0][0] == 0 and sum(int((p == 0).sum()) for p in d.train_positions) == 12
    assert encode_domains([Domain("lego", generate("lego_2", 12, 0))], tok, max_length=64)[0].train_positions is None


@pytest.mark.slow
def test_train_cli_with_packing(tmp_path):
    """(d) ``python -m mixtrain train`` with ``data.packing=true`` runs (packed train batches
    with position ids through DeepSpeed, unpacked dev batches)."""
    cfg = {
        "model": {"config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                             "max_position_embeddings": 1024}, "tokenizer": "byte"},
        "data": {"builtin": ["math", "lego_1", "addition_1"], "builtin_size": 40, "max_length": 320,
                 "packing": True, "cache_dir": str(tmp_path / "cache")},
        "mixing": {"policy": "uniform"},
        "train": {"steps": 2, "micro_batch_size": 2, "grad_accum": 1, "lr": 3e-3, "warmup": 0,
                  "eval_every": 2, "log_every": 1, "seed": 0, "progress": False, "threads": 1},
        "output_dir": str(tmp_path / "run"),
    }
    p = tmp_path / "packed.yaml"
    p.write_text(yaml.safe_dump(cfg))
    env = dict(standalone_env(), PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
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
