"""Skill-It graph learning: the edge rule by hand, and ``python -m mixtrain skillit-graph`` end to
end on three LEGO skills with a tiny Llama (2 steps per run), feeding the learned graph back into
the ``skillit`` policy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from mixtrain.skillit_graph import graph_from_losses


def test_graph_from_losses_by_hand():
    start = [4.0, 4.0, 4.0]
    alone = [2.0, 3.0, 2.5]                      # L_j after training on {j}
    pair = np.array([[np.nan, 2.9, 2.6],         # pair[i, j] = L_j after training on {i, j}
                     [1.9, np.nan, 2.4],
                     [2.1, 3.2, np.nan]])
    assert graph_from_losses(start, alone, pair).tolist() == [[1, 1, 0], [1, 1, 1], [0, 0, 1]]
    real = graph_from_losses(start, alone, pair, "real")
    np.testing.assert_allclose(np.diag(real), [0.5, 0.25, 0.375])      # (L0 − L_alone) / L0
    np.testing.assert_allclose(real[0, 1], (3.0 - 2.9) / 3.0)          # (L_alone − L_pair) / L_alone
    np.testing.assert_allclose(real[2, 1], (3.0 - 3.2) / 3.0)          # negative: i hurts j
    with pytest.raises(ValueError, match="non-finite dev loss"):
        graph_from_losses(start, [2.0, np.nan, 2.0], pair)
    with pytest.raises(ValueError, match="mode: got 'soft'"):
        graph_from_losses(start, alone, pair, "soft")


def test_skillit_graph_cli(tmp_path):
    from mixtrain import policies
    from mixtrain.__main__ import main

    cfg = {
        "model": {"config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                             "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                             "max_position_embeddings": 128}, "tokenizer": "byte"},
        "data": {"builtin": ["lego_1", "lego_2", "lego_3"], "builtin_size": 24, "max_length": 96,
                 "dev_fraction": 0.2, "max_dev_examples": 4},
        "mixing": {"policy": "skillit"},
        "train": {"micro_batch_size": 4, "lr": 3e-3, "seed": 0, "threads": 1},
        "output_dir": str(tmp_path / "run"),
    }
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    assert main(["skillit-graph", str(p), "--steps", "2", "--mode", "binary"]) == 0
    out = tmp_path / "run_graph"
    res = json.loads((out / "skillit_graph.json").read_text())
    g = np.array(res["graph"])
    assert res["skills"] == ["lego_1", "lego_2", "lego_3"] and g.shape == (3, 3)
    assert np.diag(g).tolist() == [1, 1, 1] and set(g.ravel().tolist()) <= {0.0, 1.0}
    assert np.load(out / "skillit_graph.npy").tolist() == res["graph"]
    assert (out / "skillit_graph.png").stat().st_size > 1000
    # the edges follow the measured losses
    alone, pair = np.array(res["dev_loss_alone"]), res["dev_loss_pair"]
    for i in range(3):
        for j in range(3):
            if i != j:
                assert g[i, j] == float(pair[i][j] < alone[j])
    # the policy reads the written graph by skill name
    pol = policies.get("skillit", graph=str(out / "skillit_graph.json"))
    w = pol.initial_weights({"lego_1": 10, "lego_2": 10, "lego_3": 10})
    assert abs(w.sum() - 1) < 1e-12
    assert main(["skillit-graph", str(p), "--steps", "0"]) == 2
