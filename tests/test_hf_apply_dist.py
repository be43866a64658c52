"""mixkernels.hf.apply and causal_lm_loss under DeepSpeed ZeRO-3 and FSDP2 (fully_shard), 2 CPU
ranks on gloo: 3 SGD steps give the same losses and the same final parameters as the model's own
loss under the same framework. The head weight is tied to the embedding and, under ZeRO-3,
partitioned (the worker asserts it): the fused loss gets it gathered by the framework's hooks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from mixtrain.engine import standalone_env

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(framework: str, out: Path) -> dict[str, dict[str, torch.Tensor]]:
    env = standalone_env()
    env.update(PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "tests._hf_apply_dist_worker", framework, str(out)]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, f"{cmd} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return {mode: torch.load(out / f"{framework}-{mode}.pt", weights_only=True)
            for mode in ("plain", "apply", "causal_lm_loss")}


def _has_fsdp2() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["zero3", pytest.param("fsdp2", marks=pytest.mark.skipif(
    not _has_fsdp2(), reason="torch without FSDP2 fully_shard"))])
def test_apply_and_causal_lm_loss_two_ranks(framework, tmp_path):
    if framework == "zero3":
        pytest.importorskip("deepspeed")
    from tests._hf_apply_dist_worker import tiny_model

    runs = _run(framework, tmp_path)
    plain = runs["plain"]
    initial = dict(tiny_model().named_parameters())
    moved = [k for k, v in plain.items() if k.startswith("param/") and not torch.equal(v, initial[k[6:]])]
    assert moved, "training did not change the parameters"
    for mode in ("apply", "causal_lm_loss"):
        got = runs[mode]
        assert got.keys() == plain.keys()
        torch.testing.assert_close(got["losses"], plain["losses"], atol=1e-5, rtol=1e-5, msg=mode)
        for key, ref in plain.items():
            torch.testing.assert_close(got[key], ref, atol=1e-5, rtol=1e-4, msg=f"{mode}: {key}")
