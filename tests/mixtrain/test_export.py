"""mixtrain.export: the final model as a plain HF directory (oracle: PEFT's own merge)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from mixtrain.data import ByteTokenizer, load_tokenizer
from mixtrain.export import export_model, merged_state_dict

peft = pytest.importorskip("peft")


def _tiny(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _lora(model: torch.nn.Module, **kw) -> torch.nn.Module:
    lm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                    target_modules=["q_proj", "v_proj", "down_proj"], **kw))
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if "lora_B" in n:  # B starts at zero: make the adapter change the function
                p.normal_(std=0.1)
    return lm


@pytest.mark.parametrize("kw", [{}, {"use_rslora": True}])
def test_merged_state_dict_equals_peft_merge_and_leaves_the_model_alone(kw):
    lm = _lora(_tiny(), **kw)
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    got = merged_state_dict(lm)
    want = copy.deepcopy(lm).merge_and_unload().state_dict()
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6, msg=k)
    for v in got.values():  # copies, not views of the live weights
        v.zero_()
    assert all(torch.equal(v, lm.state_dict()[k]) for k, v in before.items())  # untouched


def test_export_writes_loadable_dirs_and_replaces_an_old_export(tmp_path):
    lm = _lora(_tiny(1))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "stale.txt").write_text("old export")
    (tmp_path / ".tmp-model").mkdir()  # left by a crash mid-export
    assert export_model(lm, ByteTokenizer(), tmp_path, rank=0) == tmp_path / "model"
    assert not (tmp_path / "model" / "stale.txt").exists() and not (tmp_path / ".tmp-model").exists()
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = lm(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model")).eval()
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        again = peft.PeftModel.from_pretrained(_tiny(1), str(tmp_path / "adapter")).eval()
        torch.testing.assert_close(again(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    assert isinstance(load_tokenizer(str(tmp_path / "model")), ByteTokenizer)


def test_plain_model_export_has_no_adapter(tmp_path):
    m = _tiny(2)
    export_model(m, ByteTokenizer(), tmp_path, rank=0)
    assert not (tmp_path / "adapter").exists()
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model"))
    for (k, v), (k2, v2) in zip(m.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_tokenizer_marker_bad_input(tmp_path):
    (tmp_path / "mixtrain_tokenizer.json").write_text(json.dumps({"type": "sentencepiece"}))
    with pytest.raises(ValueError, match=r"names tokenizer type 'sentencepiece'; expected 'byte'"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "mixtrain_tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid mixtrain tokenizer file"):
        load_tokenizer(str(tmp_path))
