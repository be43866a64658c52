"""End-to-end: ``python -m mixtrain gradex`` and ``gradex-validate`` on CPU (tiny Llama + LoRA,
built-in corpus, real DeepSpeed loop), then the selection fed back to mixtrain's ``fixed`` policy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from mixtrain.engine import standalone_env

REPO = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = standalone_env()  # a child run makes its own rendezvous
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["DS_ACCELERATOR"] = "cpu"
    env["OMP_NUM_THREADS"] = "2"
    return env


def test_gradex_cli_end_to_end(tmp_path):
    cfg = {
        "model": {"config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                             "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                             "max_position_embeddings": 128},
                  "tokenizer": "byte", "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
        "data": {"builtin": ["lego_1", "lego_2", "addition_1"], "builtin_size": 16, "dev_fraction": 0.25,
                 "max_length": 96},
        # the target is held out: never trained on (weight 0), scored for accuracy after meta-training
        "mixing": {"policy": "fixed", "params": {"weights": {"lego_1": 1, "lego_2": 1}}},
        "eval": {"accuracy": True, "accuracy_domains": ["addition_1"], "max_examples": 4},
        "train": {"steps": 3, "micro_batch_size": 4, "lr": 3e-3, "progress": False, "threads": 2,
                  "tensorboard": False},
        "gradex": {"target": ["addition_1"], "tasks": ["lego_1", "lego_2"], "project_dim": 32, "number_of_subsets": 50, "validate_subsets": 2,
                   "validate_steps": 2, "selection": "greedy"},
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "gx.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "mixtrain", "gradex", str(path)], check=False, env=_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "run" / "gradex"
    for f in ("task_scores.json", "selection.json", "estimates.npz", "report.png"):
        assert (out / f).exists(), f
    sel = json.loads((out / "selection.json").read_text())
    assert sel["tasks"] and set(sel["tasks"]) <= {"lego_1", "lego_2"}
    assert abs(sum(sel["weights"].values()) - 1) < 1e-9
    base = sel["baselines"]  # all tasks, and a random and a similarity subset of the selection's size
    assert base["all"]["tasks"] == ["lego_1", "lego_2"]
    assert len(base["random"]["tasks"]) == len(base["similarity"]["tasks"]) == len(sel["tasks"])
    sims = {t: v["similarity"] for t, v in json.loads((out / "task_scores.json").read_text())["tasks"].items()}
    assert base["similarity"]["tasks"] == sorted(sims, key=lambda t: -sims[t])[: len(sel["tasks"])]
    assert all(-1 <= v <= 1 for v in sims.values())

    from mixtrain import policies

    w = policies.get("fixed", **sel["mixing"]["params"]).initial_weights(
        {"lego_1": 12, "lego_2": 12, "addition_1": 12})
    assert w.sum() > 0.999 and all(w[i] > 0 for i, n in enumerate(["lego_1", "lego_2", "addition_1"])
                                   if n in sel["tasks"])

    r = subprocess.run([sys.executable, "-m", "mixtrain", "gradex-validate", str(path)], check=False, env=_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Spearman" in r.stdout and "relative error" in r.stdout
    v = json.loads((out / "validation.json").read_text())
    assert len(v["subsets"]) == 2
    assert sorted(tuple(r["tasks"]) for r in v["subsets"]) == [("lego_1",), ("lego_2",)]  # distinct subsets
    for row in v["subsets"]:
        assert row["delta_norm_ratio"] > 0  # the loop really trained from θ*
        assert row["rel_error"] < 0.5
    assert (out / "estimated_vs_true.png").exists()

    bad = dict(cfg, gradex={**cfg["gradex"], "target": ["nope"]})
    path.write_text(yaml.safe_dump(bad))
    r = subprocess.run([sys.executable, "-m", "mixtrain", "gradex", str(path)], check=False, env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "'nope' is not a configured domain" in r.stderr
