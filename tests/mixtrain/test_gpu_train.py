"""``mixtrain train`` on CUDA: one GPU (nccl, bf16) and two ranks when two GPUs are present.

The GPU runs are collected everywhere and skipped without a GPU. The CPU-side tests below check
the device decisions a GPU machine depends on (accelerator, precision) with ``torch.cuda``
patched, so a CPU machine verifies that a GPU machine would not silently train on CPU.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixtrain import engine
from mixtrain.config import ConfigError, demo_config, from_dict
from tests._devices import HAS_CUDA, cuda_marks
from tests.mixtrain.test_loop import EXPECTED_FIRST_LOSSES, REPO, _config, _free_port, _metrics

TWO_GPUS = torch.cuda.is_available() and torch.cuda.device_count() >= 2


def _gpu_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("DS_ACCELERATOR", None)  # the CLI must pick cuda by itself
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(cmd: list[str], env: dict[str, str]) -> None:
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"


def _check_learns(run: Path) -> list[dict]:
    recs = _metrics(run)
    assert [r["step"] for r in recs] == list(range(1, 9))
    losses = [r["loss"] for r in recs]
    assert all(isinstance(x, float) and math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0], losses  # it learns
    return recs


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_marks())])
def test_train_one_gpu_bf16_nccl(tmp_path, device):
    """One process without a launcher: nccl group, bf16 (train.precision: bf16 is refused unless the
    run is on a GPU, so finishing proves the CUDA path). Same seed and data as the pinned CPU fp32
    reference: the first loss (before any update) agrees to bf16 accuracy."""
    cfg = _config(tmp_path, "gpu", precision="bf16")
    env = _gpu_env()
    env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    _run([sys.executable, "-m", "mixtrain", "train", str(cfg)], env)
    recs = _check_learns(tmp_path / "gpu")
    assert abs(recs[0]["loss"] - EXPECTED_FIRST_LOSSES[0]) <= 0.03 * EXPECTED_FIRST_LOSSES[0]
    assert "dev_loss" in recs[3]


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=[
    *cuda_marks(), *([pytest.mark.skipif(not TWO_GPUS, reason="needs 2 CUDA devices")] if HAS_CUDA else [])])])
def test_train_two_gpus_zero2(tmp_path, device):
    """Two ranks under torchrun, one GPU each, ZeRO-2, bf16."""
    cfg = _config(tmp_path, "gpu2", precision="bf16", zero_stage=2, micro_batch_size=2)
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
          "-m", "mixtrain", "train", str(cfg)], _gpu_env())
    _check_learns(tmp_path / "gpu2")


# ---- the device decisions, checked on CPU --------------------------------------------------


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)


def test_gpu_machine_defaults_to_cuda_and_bf16(fake_gpu, monkeypatch):
    assert engine.default_accelerator() == "cuda"
    assert engine.on_gpu()
    ds = engine.build_ds_config(from_dict(demo_config()), 1)
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    # an explicit DS_ACCELERATOR=cpu keeps a GPU machine on the CPU path (fp32)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert not engine.on_gpu()
    assert not engine.build_ds_config(from_dict(demo_config()), 1)["bf16"]["enabled"]


def test_gpu_without_bf16_trains_fp32_by_default(fake_gpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    ds = engine.build_ds_config(from_dict(demo_config()), 1)
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]


def test_cpu_machine_keeps_cpu_and_refuses_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    assert engine.default_accelerator() == "cpu"
    assert not engine.on_gpu()
    cfg = demo_config()
    cfg["train"]["precision"] = "bf16"
    with pytest.raises(ConfigError, match="train.precision: bf16 needs a GPU here"):
        engine.build_ds_config(from_dict(cfg), 1)
