"""``python -m mixtrain router-stats``: per-domain routing of an MoE model, against transformers'
own ``output_router_logits`` counted by hand (softmax, ``torch.topk``, pads dropped)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mixtrain.engine import standalone_env

os.environ.setdefault("DS_ACCELERATOR", "cpu")
REPO = Path(__file__).resolve().parents[2]

MOE = {"model_type": "qwen2_moe", "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16,
       "shared_expert_intermediate_size": 32, "num_experts": 6, "num_experts_per_tok": 2, "num_hidden_layers": 3,
       "num_attention_heads": 4, "num_key_value_heads": 2, "mlp_only_layers": [1], "max_position_embeddings": 256}


def _raw(out: Path, model: dict | None = None) -> dict:
    return {
        "model": {"config": dict(model or MOE), "tokenizer": "byte"},
        "data": {"builtin": ["math", "lego_1", "addition_1"], "builtin_size": 40, "max_length": 208,
                 "dev_fraction": 0.2},
        "train": {"micro_batch_size": 3, "threads": 1},
        "output_dir": str(out),
    }


def _oracle(cfg, rows: int) -> tuple[np.ndarray, list[int]]:
    """[L_moe, D, E] expert loads from ``output_router_logits`` of the same padded batches."""
    from mixtrain.data import collate_examples, encode_domains, load_domains, load_tokenizer
    from mixtrain.engine import build_model

    tok = load_tokenizer("byte")
    enc = encode_domains(load_domains(cfg.data.builtin, {}, dev_fraction=cfg.data.dev_fraction,
                                      builtin_size=cfg.data.builtin_size, builtin_seed=cfg.data.builtin_seed),
                         tok, max_length=cfg.data.max_length)
    model = build_model(cfg, tok.vocab_size).eval()
    k, e = MOE["num_experts_per_tok"], MOE["num_experts"]
    counts = np.zeros((2, len(enc), e))
    tokens = [0] * len(enc)
    with torch.no_grad():
        for d in range(len(enc)):
            picked = list(range(min(rows, len(enc[d].dev))))
            for s in range(0, len(picked), 3):
                b = collate_examples(enc, [(d, r) for r in picked[s:s + 3]], tok.pad_token_id, "dev")
                out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_router_logits=True)
                real = b["attention_mask"].reshape(-1) != 0
                tokens[d] += int(real.sum())
                for li, logits in enumerate(out.router_logits):
                    top = torch.topk(torch.softmax(logits.float(), -1), k, dim=-1).indices[real]
                    counts[li, d] += np.bincount(top.reshape(-1).numpy(), minlength=e)
    return counts / counts.sum(-1, keepdims=True), tokens


def test_routing_report_matches_output_router_logits(tmp_path):
    from mixtrain.config import from_dict
    from mixtrain.router_stats import format_routing, routing_report

    cfg = from_dict(_raw(tmp_path / "run"))
    rep = routing_report(cfg, rows=5)
    want, tokens = _oracle(cfg, rows=5)
    assert rep["layers"] == [0, 1] and rep["top_k"] == 2 and rep["experts"] == 6  # the dense layer has no router
    assert rep["tokens"] == tokens and rep["rows"] == [5, 5, 5]
    np.testing.assert_allclose(rep["expert_load"], want, atol=1e-12)
    for li in range(2):
        load = want[li]
        dist = np.linalg.norm(load[:, None] - load[None], axis=-1)
        np.testing.assert_allclose(rep["distance"][li], dist, atol=1e-12)
        np.testing.assert_allclose(rep["mean_distance"][li], dist.sum() / 6, atol=1e-12)
        pooled = (load * np.array(tokens)[:, None]).sum(0)
        pooled /= pooled.sum()
        np.testing.assert_allclose(rep["effective_experts"][li], np.exp(-(pooled * np.log(pooled)).sum()), rtol=1e-9)
        assert 2 <= rep["effective_experts"][li] <= 6
    assert json.loads((tmp_path / "run" / "router_stats.json").read_text())["expert_load"] == rep["expert_load"]
    text = format_routing(rep)
    assert "6 experts, top-2; 3 domains" in text and "lego_1" in text


def test_router_stats_cli_last_layer_and_errors(tmp_path):
    cfg = tmp_path / "moe.yaml"
    cfg.write_text(yaml.safe_dump(_raw(tmp_path / "run")))
    env = {**standalone_env(), "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mixtrain", "router-stats", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300, check=False)

    r = cli(str(cfg), "--rows", "2", "--layers", "last", "--out", str(tmp_path / "r.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["layers"] == [1] and rep["rows"] == [2, 2, 2]
    assert "busiest expert" in r.stdout
    r = cli(str(cfg), "--layers", "0,x")
    assert r.returncode == 2 and "--layers: got '0,x', expected all, last or comma-separated integers" in r.stderr
    r = cli(str(cfg), "--rows", "0")
    assert r.returncode == 2 and "router-stats --rows: got 0, expected an integer >= 1" in r.stderr
    dense = tmp_path / "dense.yaml"
    dense.write_text(yaml.safe_dump(_raw(tmp_path / "d", model={
        "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2})))
    r = cli(str(dense))
    assert r.returncode == 2 and "router-stats: model 'llama' has no MoE routers mixkernels can hook" in r.stderr


def test_routing_report_needs_dev_rows(tmp_path):
    from mixtrain.config import ConfigError, from_dict
    from mixtrain.router_stats import routing_report

    raw = _raw(tmp_path / "run")
    raw["data"]["dev_fraction"] = 0.0
    with pytest.raises(ConfigError, match=r"router-stats: domain\(s\) \['math', 'lego_1', 'addition_1'\] have no dev "
                                          r"rows; set data.dev_fraction > 0"):
        routing_report(from_dict(raw))
