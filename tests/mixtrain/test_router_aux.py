"""``train.router_aux_loss``: the MoE load-balancing loss in the training loop.

Oracle: transformers' own ``MixtralForCausalLM(labels=..., output_router_logits=True).loss``,
which is the token-mean cross-entropy plus ``router_aux_loss_coef * aux_loss``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
transformers = pytest.importorskip("transformers")

MIXTRAL = {"model_type": "mixtral", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
           "max_position_embeddings": 256}
COEF = 0.05


def _batch(vocab: int):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (3, 9), generator=gen)
    am = torch.ones_like(ids)
    am[0, -3:] = 0
    labels = ids.clone()
    labels[am == 0] = -100
    labels[:, :2] = -100  # a prompt
    return {"input_ids": ids, "attention_mask": am, "labels": labels, "domain_ids": torch.tensor([0, 1, 1])}


@pytest.mark.parametrize("per_layer", [False, True])
def test_loss_model_adds_the_weighted_aux_loss_like_transformers(per_layer):
    """Pooled: transformers' own loss; per layer: its token loss plus the coefficient times the
    mean over layers of ``load_balancing_loss_func`` applied to each layer alone."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from mixtrain.engine import LossModel

    torch.manual_seed(0)
    cfg = dict(MIXTRAL)
    cfg.pop("model_type")
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(vocab_size=61, router_aux_loss_coef=COEF, **cfg))
    wrapper = LossModel(model, 2, router_aux_loss=COEF, router_aux_per_layer=per_layer).train()
    b = _batch(61)
    n = int((b["labels"][:, 1:] != -100).sum())

    res = wrapper(**b, loss_scale=1.0 / n)
    got_grads = torch.autograd.grad(res["loss"], list(model.parameters()), allow_unused=True)
    hf = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"],
               output_router_logits=True)
    want, want_aux = hf.loss, hf.aux_loss
    if per_layer:
        want_aux = torch.stack([load_balancing_loss_func((z,), 4, 2, b["attention_mask"]) for z in hf.router_logits]).mean()
        want = hf.loss - COEF * hf.aux_loss + COEF * want_aux
    want_grads = torch.autograd.grad(want, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(res["loss"], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res["router_aux_loss"], want_aux.float().detach(), rtol=1e-5, atol=1e-6)
    for g, w in zip(got_grads, want_grads):
        if w is None:
            assert g is None or g.abs().sum() == 0
        else:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)

    # evaluation forwards (no loss_scale, or eval mode) carry the token loss only
    lm_mean = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
    plain = wrapper(**b)
    assert "router_aux_loss" not in plain
    torch.testing.assert_close(plain["loss"], lm_mean, rtol=1e-5, atol=1e-6)
    wrapper.eval()
    assert "router_aux_loss" not in wrapper(**b, loss_scale=1.0 / n)
    with torch.no_grad():
        assert "router_aux_loss" not in wrapper.train()(**b, loss_scale=1.0 / n)


def _run(out: Path, coef: float, model: dict | None = None):
    from mixtrain.config import from_dict
    from mixtrain.loop import train

    return train(from_dict({
        "model": {"config": dict(model or MIXTRAL), "tokenizer": "byte"},
        "data": {"builtin": ["math", "lego_1"], "builtin_size": 16, "max_length": 160, "dev_fraction": 0.1,
                 "max_dev_examples": 2},
        "mixing": {"policy": "uniform"},
        "train": {"steps": 2, "micro_batch_size": 2, "grad_accum": 2, "lr": 1e-2, "warmup": 0, "log_every": 1,
                  "save_every": 0, "save_model": False, "seed": 0, "progress": False, "tensorboard": False,
                  "threads": 1, "router_aux_loss": coef},
        "output_dir": str(out),
    }))


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loop_trains_with_the_aux_loss_and_logs_it(tmp_path):
    _run(tmp_path / "off", 0.0)
    _run(tmp_path / "on", 1.0)
    off, on = _metrics(tmp_path / "off"), _metrics(tmp_path / "on")
    assert "router_aux_loss" not in off[0]
    for rec in on:
        # E * sum_e f_e P_e >= top_k by Cauchy-Schwarz when f and P agree; a loose, finite check
        assert 0.5 < rec["router_aux_loss"] < 4 * 2
    # the logged loss is the token loss: equal at step 1 (same model, same batch), then the
    # aux term has changed the update
    assert on[0]["loss"] == pytest.approx(off[0]["loss"], rel=1e-6)
    assert on[1]["loss"] != pytest.approx(off[1]["loss"], rel=1e-6)


def test_router_aux_loss_errors(tmp_path):
    from mixtrain.config import ConfigError, from_dict

    llama = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
    with pytest.raises(ConfigError, match=r"train.router_aux_loss=0.02 needs an MoE model whose routers"):
        _run(tmp_path / "dense", 0.02, model=llama)
    with pytest.raises(ConfigError, match=r"train.router_aux_loss: got -0.1, expected a finite coefficient >= 0"):
        from_dict({"model": {"config": llama}, "data": {"builtin": ["math"]}, "train": {"router_aux_loss": -0.1}})


def test_fingerprint_unchanged_while_the_option_is_off():
    """Checkpoints written before the option existed stay resumable: with the option off the
    fingerprint is the one the config had then (computed before ``router_aux_loss`` was added)."""
    from mixtrain.config import config_fingerprint, from_dict

    raw = {"model": {"config": dict(MIXTRAL)}, "data": {"builtin": ["math"]}}
    assert config_fingerprint(from_dict(raw)) == "484ad8cee12b07ab"
    off = {"router_aux_loss": 0.0, "router_aux_per_layer": False}
    assert config_fingerprint(from_dict({**raw, "train": off})) == "484ad8cee12b07ab"
    on = config_fingerprint(from_dict({**raw, "train": {"router_aux_loss": 0.02}}))
    assert on != "484ad8cee12b07ab"
    assert config_fingerprint(from_dict({**raw, "train": {"router_aux_loss": 0.02, "router_aux_per_layer": False}})) != on
