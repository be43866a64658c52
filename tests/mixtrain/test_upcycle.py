"""``mixtrain upcycle``: a dense tiny Llama/Mistral split into a Mixtral MoE. With top-k = E and a
uniform router the MoE is the dense model (logits equal); the expert weights are an exact neuron
partition recovered from the files; one MoE block equals a hand-written top-k oracle built from
the dense weights; the reported step-0 gap matches HF's own loss; the directory loads, is hooked
by RouterStatsCollector and trains under the dynamic_moe policy; bad arguments fail clearly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from mixtrain.engine import standalone_env
from mixtrain.upcycle import UpcycleError, upcycle

os.environ.setdefault("DS_ACCELERATOR", "cpu")
ROOT = Path(__file__).resolve().parents[2]
SMALL = {"vocab_size": 259, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}


def _dense(path: Path, model_type: str = "llama", **over) -> Path:
    cfg = transformers.AutoConfig.for_model(model_type, **{**SMALL, **over})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # larger than the default init, so the MLPs matter for the logits
        for layer in model.model.layers:
            for lin in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                lin.weight.normal_(0, 0.3)
    model.save_pretrained(path)
    (path / "mixtrain_tokenizer.json").write_text(json.dumps({"type": "byte"}))
    return path


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _dense(tmp_path_factory.mktemp("dense") / "llama")


def _load(path: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


IDS = torch.randint(0, 259, (3, 17), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("model_type,over", [("llama", {"tie_word_embeddings": True}),
                                             ("llama", {"tie_word_embeddings": False}),
                                             ("mistral", {"sliding_window": 8})])
def test_top_k_equal_experts_with_uniform_router_is_the_dense_model(tmp_path: Path, model_type: str,
                                                                    over: dict) -> None:
    src = _dense(tmp_path / "dense", model_type, **over)
    rec = upcycle(str(src), experts=4, top_k=4, out=tmp_path / "moe", router_std=0.0, gap_rows=2)
    moe, dense = _load(tmp_path / "moe"), _load(src)
    assert type(moe).__name__ == "MixtralForCausalLM" and moe.config.num_local_experts == 4
    with torch.no_grad():
        a, b = moe(input_ids=IDS).logits, dense(input_ids=IDS).logits
    assert (a - b).abs().max() < 1e-4 * b.abs().max()
    assert rec["scale"] == 4.0 and abs(rec["loss_gap"]["gap"]) < 1e-5
    saved = json.loads((tmp_path / "moe" / "upcycle.json").read_text())
    assert saved["loss_gap"]["dense"] == pytest.approx(rec["loss_gap"]["dense"])
    assert (tmp_path / "moe" / "mixtrain_tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".moe")]  # no temp dir left


def _expert_weights(moe: torch.nn.Module, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    ex = moe.model.layers[layer].mlp.experts
    return ex.gate_up_proj.detach(), ex.down_proj.detach()


def test_experts_are_a_scaled_neuron_partition_and_a_block_matches_a_topk_oracle(dense_dir: Path,
                                                                                  tmp_path: Path) -> None:
    e, k = 4, 2
    upcycle(str(dense_dir), experts=e, top_k=k, out=tmp_path / "moe", router_std=0.5, seed=3, gap_rows=0)
    moe, dense = _load(tmp_path / "moe"), _load(dense_dir)
    for li in range(2):
        mlp = dense.model.layers[li].mlp
        g, u, d = mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(), mlp.down_proj.weight.detach()
        gate_up, down = _expert_weights(moe, li)
        m = g.shape[0] // e
        # recover each expert's neurons by matching its gate rows to the dense rows
        part = [[int((g == row).all(1).nonzero()[0]) for row in gate_up[x, :m]] for x in range(e)]
        assert sorted(i for p in part for i in p) == list(range(g.shape[0]))  # every neuron exactly once
        assert part != [list(range(x * m, (x + 1) * m)) for x in range(e)]  # shuffled, not contiguous
        for x in range(e):
            torch.testing.assert_close(gate_up[x, m:], u[part[x]], rtol=0, atol=0)
            torch.testing.assert_close(down[x], e * d[:, part[x]], rtol=0, atol=1e-6)  # output scale E
        # the block on random hidden states vs softmax → top-k → renormalise → Σ g·E·f_e
        h = torch.randn(11, 32, generator=torch.Generator().manual_seed(li))
        router = moe.model.layers[li].mlp.gate.weight.detach()
        probs = torch.softmax(h @ router.T, -1)
        w, idx = probs.topk(k, -1)
        w = w / w.sum(-1, keepdim=True)
        want = torch.zeros_like(h)
        for t in range(h.shape[0]):
            for j in range(k):
                p = part[int(idx[t, j])]
                f = d[:, p] @ (torch.nn.functional.silu(g[p] @ h[t]) * (u[p] @ h[t]))
                want[t] += w[t, j] * e * f
        with torch.no_grad():
            got = moe.model.layers[li].mlp(h[None])[0]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # the seed fixes everything: a second build is byte-identical in its weights
    upcycle(str(dense_dir), experts=e, top_k=k, out=tmp_path / "again", router_std=0.5, seed=3, gap_rows=0)
    again = _load(tmp_path / "again")
    for (n1, p1), (_, p2) in zip(moe.named_parameters(), again.named_parameters()):
        assert torch.equal(p1, p2), n1


def test_top_k_below_experts_reports_the_gap_hf_measures(dense_dir: Path, tmp_path: Path) -> None:
    from mixtrain.data import load_tokenizer
    from mixtrain.upcycle import _gap_rows

    rec = upcycle(str(dense_dir), experts=4, top_k=1, out=tmp_path / "moe", gap_rows=3)
    gap = rec["loss_gap"]
    assert gap["rows"] == 15 and gap["tokens"] > 0
    assert 0 < abs(gap["gap"]) < 5 and gap["upcycled"] == pytest.approx(gap["dense"] + gap["gap"])
    # independent measurement: HF's own shifted cross-entropy (labels=) per row, token-weighted
    rows = [r for rs in _gap_rows(load_tokenizer(str(dense_dir)), 3, 256).values() for r in rs]
    for name, path in (("dense", dense_dir), ("upcycled", tmp_path / "moe")):
        model = _load(path)
        tot = n = 0.0
        with torch.no_grad():
            for ids, labels in rows:
                cnt = sum(1 for x in labels[1:] if x != -100)
                out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
                tot, n = tot + float(out.loss) * cnt, n + cnt
        assert gap[name] == pytest.approx(tot / n, rel=1e-5), name
    assert json.loads((tmp_path / "moe" / "upcycle.json").read_text())["loss_gap"]["gap"] == pytest.approx(gap["gap"])


def test_router_stats_and_dynamic_moe_training(dense_dir: Path, tmp_path: Path) -> None:
    import numpy as np

    from mixkernels.hf import RouterStatsCollector
    from mixtrain.config import from_dict
    from mixtrain.loop import train

    moe_dir = tmp_path / "moe"
    upcycle(str(dense_dir), experts=4, top_k=2, out=moe_dir, gap_rows=0)
    moe = _load(moe_dir)
    with RouterStatsCollector(moe, layers="all") as col:
        with torch.no_grad():
            moe(input_ids=IDS)
        st = col.stats(group_ids=torch.tensor([0, 1, 1]).repeat_interleave(IDS.shape[1]), num_groups=2)
    counts = st.expert_counts
    assert counts.shape == (2, 2, 4) and int(counts.sum()) == 2 * 2 * IDS.numel()  # layers × top-k × tokens
    cfg = {
        "model": {"name_or_path": str(moe_dir)},
        "data": {"builtin": ["math", "lego_1", "addition_1"], "builtin_size": 24, "max_length": 208,
                 "dev_fraction": 0.1, "max_dev_examples": 4},
        "mixing": {"policy": "dynamic_moe", "update_every": 1,
                   "params": {"probe_batches": 1, "probe_batch_size": 2, "freeze_router": False}},
        "train": {"steps": 2, "micro_batch_size": 4, "lr": 3e-3, "lr_schedule": "constant", "warmup": 0,
                  "log_every": 1, "save_every": 0, "progress": False, "tensorboard": False, "threads": 1,
                  "save_model": False},
        "output_dir": str(tmp_path / "run"),
    }
    summary = train(from_dict(cfg))
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2] and all(np.isfinite(r["loss"]) for r in recs)
    w = np.array(summary["weights"])
    assert abs(w.sum() - 1) < 1e-9 and np.abs(w - 1 / 3).max() > 1e-6  # the router signal moved the weights


@pytest.mark.parametrize("kwargs,msg", [
    ({"experts": 4, "top_k": 5}, r"--top-k 5, expected an integer in \[1, --experts = 4\]"),
    ({"experts": 4, "top_k": 0}, r"--top-k 0"),
    ({"experts": 1, "top_k": 1}, r"--experts 1, expected an integer >= 2"),
    ({"experts": 5, "top_k": 2}, r"intermediate_size 48 is not divisible by --experts 5"),
    ({"experts": 4, "top_k": 2, "router_std": -1.0}, r"--router-std -1.0"),
    ({"experts": 4, "top_k": 2, "scale": 0.0}, r"--scale 0.0"),
])
def test_bad_arguments(dense_dir: Path, tmp_path: Path, kwargs: dict, msg: str) -> None:
    with pytest.raises(UpcycleError, match=msg):
        upcycle(str(dense_dir), out=tmp_path / "moe", **kwargs)
    assert not (tmp_path / "moe").exists()


def test_unsupported_sources_and_existing_output(tmp_path: Path) -> None:
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=259))
    gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UpcycleError, match=r"model_type 'gpt2' is not supported; expected one of llama, mistral"):
        upcycle(str(tmp_path / "gpt2"), experts=2, top_k=1, out=tmp_path / "o")
    _dense(tmp_path / "biased", mlp_bias=True)
    with pytest.raises(UpcycleError, match="mlp_bias=True; the Mixtral layout has no biases"):
        upcycle(str(tmp_path / "biased"), experts=2, top_k=1, out=tmp_path / "o")
    with pytest.raises(UpcycleError, match="is not a local transformers model directory"):
        upcycle(str(tmp_path / "nothing"), experts=2, top_k=1, out=tmp_path / "o")
    (tmp_path / "o").mkdir()
    with pytest.raises(UpcycleError, match="exists; pass --overwrite"):
        upcycle(str(tmp_path / "biased"), experts=2, top_k=1, out=tmp_path / "o")


def test_cli(dense_dir: Path, tmp_path: Path) -> None:
    env = {**standalone_env(), "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "mixtrain", "upcycle", str(dense_dir), "--experts", "4", "--top-k", "2",
           "--out", str(tmp_path / "moe"), "--gap-rows", "2"]
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    gap = json.loads((tmp_path / "moe" / "upcycle.json").read_text())["loss_gap"]
    assert f"gap {gap['gap']:+.4f} nats/token" in res.stdout
    res = subprocess.run(cmd[:-4] + ["--top-k", "9", "--out", str(tmp_path / "x")], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 2 and "--top-k 9, expected an integer in [1, --experts = 4]" in res.stderr
