"""Each dynamic policy in the real loop (DeepSpeed on CPU, tiny models, built-in corpus): the
weights move and stay valid, ``policy_time`` is logged, and a run stopped and resumed from its
checkpoint is identical to an uninterrupted one (weights, losses, schedule, policy state).

Runs happen in-process (one DeepSpeed import for the whole module) to keep the suite fast.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mixtrain.engine import standalone_env

os.environ.setdefault("DS_ACCELERATOR", "cpu")

LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
MOE = {"model_type": "qwen2_moe", "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 32,
       "shared_expert_intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
       "num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 256}
DOMAINS = ["math", "lego_1", "addition_1"]

CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "mos_diff": (LLAMA, {"policy": "mos", "update_every": 2,
                         "params": {"reward": "diff", "use_ema": True, "diff_pool_size": 8, "diff_examples": 4}}),
    "mos_cossim_mlp": (LLAMA, {"policy": "mos", "update_every": 3,
                               "params": {"reward": "cossim", "cossim_examples": 3, "scorer": "mlp", "specialist": "math"}}),
    "dynamic_moe": (MOE, {"policy": "dynamic_moe", "update_every": 2,
                          "params": {"probe_batches": 2, "probe_batch_size": 2, "freeze_router": True}}),
    "skillit": (LLAMA, {"policy": "skillit", "update_every": 3,
                        "params": {"graph": [[1, 1, 0], [0, 1, 1], [0, 0, 1]], "eta": 2.0, "eval_every": 1,
                                   "normalize_loss": True}}),
    "doremi": (LLAMA, {"policy": "doremi", "update_every": 1, "params": {"ref_pool_size": 8, "eta": 5.0}}),
    "odm": (LLAMA, {"policy": "odm", "update_every": 1, "params": {"mode": "smoothed_mean"}}),
}
RESUME_CASES = ["mos_diff", "dynamic_moe", "skillit", "doremi", "odm"]


def _cfg(case: str, out: Path, steps: int) -> dict[str, Any]:
    model, mixing = CASES[case]
    return {
        "model": {"config": dict(model), "tokenizer": "byte"},
        "data": {"builtin": DOMAINS, "builtin_size": 24, "max_length": 208, "dev_fraction": 0.1,
                 "max_dev_examples": 4},
        "mixing": copy.deepcopy(mixing),
        "train": {"steps": steps, "micro_batch_size": 4, "grad_accum": 1, "lr": 3e-3, "lr_schedule": "constant",
                  "warmup": 0, "log_every": 1, "save_every": 0, "seed": 0, "progress": False,
                  "tensorboard": False, "threads": 1},
        "output_dir": str(out),
    }


def _run(case: str, out: Path, steps: int) -> dict[str, Any]:
    from mixtrain.config import from_dict
    from mixtrain.loop import train

    return train(from_dict(_cfg(case, out, steps)))


def _metrics(out: Path, drop_times: bool = True) -> list[dict[str, Any]]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    if drop_times:
        for r in recs:
            r.pop("step_time", None)
            r.pop("policy_time", None)
            r.pop("policy_time_pct", None)
    return recs


def _policy_state(out: Path) -> dict[str, Any]:
    last = max((out / "checkpoints").glob("step-*"))
    return json.loads((last / "mixtrain_state.json").read_text())["policy"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("policy_e2e")
    done = {}
    for case in CASES:
        out = root / case
        _run(case, out, 6)
        done[case] = out
    return done


@pytest.mark.parametrize("case", list(CASES))
def test_weights_move_and_stay_valid(runs, case):
    recs = _metrics(runs[case], drop_times=False)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    ws = [np.array(list(r["weights"].values())) for r in recs]
    for w in ws:
        assert np.isfinite(w).all() and (w >= 0).all() and abs(w.sum() - 1) < 1e-9
    first = np.array(list(recs[0]["step_weights"].values()))
    assert np.abs(ws[-1] - first).max() > 1e-6, f"{case}: weights never moved: {ws}"
    every = CASES[case][1]["update_every"]
    assert all(r["policy_time"] >= 0 for r in recs)
    upd = [r for r in recs if r["step"] % every == 0]
    assert all(r["policy_time"] > 0 for r in upd) and "policy_time_pct" in upd[0]
    sched = json.loads((runs[case] / "schedule.json").read_text())
    assert sched["domains"] == DOMAINS and len(sched["steps"]) >= 2


def test_doremi_writes_average_weights(runs):
    out = json.loads((runs["doremi"] / "average_weights.json").read_text())
    avg = np.array(list(out["average_weights"].values()))
    recs = _metrics(runs["doremi"])
    used = np.mean([list(r["step_weights"].values()) for r in recs], axis=0)  # weights of steps 1..6
    np.testing.assert_allclose(avg, used, rtol=0, atol=1e-12)


def test_dynamic_moe_froze_only_routers(runs):
    # the routers' weights are identical in the final checkpoint and at initialisation
    import torch

    from mixtrain.config import from_dict
    from mixtrain.engine import build_model

    st = _policy_state(runs["dynamic_moe"])
    assert st["last_counts"] is not None and len(st["last_counts"]) == 3
    model = build_model(from_dict(_cfg("dynamic_moe", runs["dynamic_moe"], 6)), 259)
    ckpt = max((runs["dynamic_moe"] / "checkpoints").glob("step-*")) / "ds"
    files = list(ckpt.glob("*model_states.pt"))
    sd = torch.load(files[0], map_location="cpu", weights_only=True)["module"]
    init = dict(model.named_parameters())
    assert torch.equal(sd["model.model.layers.1.mlp.gate.weight"], init["model.layers.1.mlp.gate.weight"])
    assert not torch.equal(sd["model.model.layers.1.mlp.experts.gate_up_proj"],
                           init["model.layers.1.mlp.experts.gate_up_proj"])


@pytest.mark.parametrize("case", RESUME_CASES)
def test_resume_equals_uninterrupted(runs, case, tmp_path):
    out = tmp_path / case
    _run(case, out, 4)                       # stops (and checkpoints) at step 4, mid update interval
    summary = _run(case, out, 6)             # resume=auto picks step 4 up
    assert _metrics(out) == _metrics(runs[case])
    assert json.loads((out / "schedule.json").read_text()) == json.loads((runs[case] / "schedule.json").read_text())
    assert _policy_state(out) == _policy_state(runs[case])
    assert summary["weights"] == [*_metrics(runs[case])[-1]["weights"].values()]


@pytest.mark.slow
def test_dynamic_moe_two_ranks_zero3_probe_is_sharded_not_duplicated(runs, tmp_path):
    """2 ranks under torchrun, ZeRO-3: the dev probe is split across ranks and all-reduced, so
    every domain's routed-assignment total (top_k × probe tokens × layers) equals the 1-rank run's,
    and the weights stay valid and identical on both ranks (rank 0's are broadcast)."""
    import socket
    import subprocess
    import sys

    cfg = _cfg("dynamic_moe", tmp_path / "r2", 2)
    cfg["train"]["zero_stage"] = 3
    cfg["train"]["micro_batch_size"] = 2                      # same global batch (2 × 2 ranks = 4)
    p = tmp_path / "r2.yaml"
    p.write_text(json.dumps(cfg))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = Path(__file__).resolve().parents[2]
    env = {**standalone_env(), "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(port), "-m", "mixtrain", "train", str(p)], check=False, cwd=repo, env=env,
                       capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    two = np.array(_policy_state(tmp_path / "r2")["last_counts"])
    one = np.array(_policy_state(runs["dynamic_moe"])["last_counts"])
    np.testing.assert_array_equal(two.sum(1), one.sum(1))
    w = np.array(list(_metrics(tmp_path / "r2")[-1]["weights"].values()))
    assert abs(w.sum() - 1) < 1e-12 and (w > 0.05 / 3 - 1e-12).all()
