"""Config parsing/validation and the static policies + registry."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mixtrain import policies
from mixtrain.config import ConfigError, apply_overrides, demo_config, from_dict, load_config
from mixtrain.engine import lr_lambda


def test_demo_config_roundtrip_and_overrides(tmp_path):
    raw = apply_overrides(demo_config(), ["train.steps=7", "train.lr=1e-4", "data.builtin=[math, lego_2]",
                                          "mixing.params={temperature: inf}"])
    cfg = from_dict(raw)
    assert cfg.train.steps == 7 and cfg.train.lr == 1e-4 and cfg.data.builtin == ["math", "lego_2"]
    p = tmp_path / "c.yaml"
    import yaml

    p.write_text(yaml.safe_dump(raw))
    assert load_config(p, ["train.seed=3"]).train.seed == 3


def test_unknown_key_lists_valid_keys():
    raw = demo_config()
    raw["train"]["stpes"] = 3
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['stpes'\] in section 'train'; valid keys: steps, "):
        from_dict(raw)
    with pytest.raises(ConfigError, match="valid keys: model, data, mixing, train, deepspeed, output_dir, gradex, eval"):
        from_dict({**demo_config(), "optim": {}})


@pytest.mark.parametrize("override, msg", [
    ("train.steps=0", "train.steps: got 0, expected an integer >= 1"),
    ("train.lr=-1", "train.lr: got -1.0"),
    ("train.steps=abc", "train.steps: got 'abc'"),
    ("train.zero_stage=4", "train.zero_stage: got 4"),
    ("data.dev_fraction=1.5", "data.dev_fraction: got 1.5"),
    ("data.exhaustion=forever", "data.exhaustion"),
    ("model.config={hidden_size: 8}", "missing 'model_type'"),
])
def test_bad_values(override, msg):
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        from_dict(apply_overrides(demo_config(tiny=True), [override]))


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_lr_schedule():
    assert lr_lambda(0, 100, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_lambda(9, 100, 10, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_lambda(55, 100, 10, "cosine", 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_lambda(100, 100, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_lambda(55, 100, 10, "linear", 0.0) == pytest.approx(0.5)
    assert lr_lambda(55, 100, 10, "constant", 0.0) == 1.0


SIZES = {"a": 100, "b": 400, "c": 25}


def test_temperature_matches_formula():
    n = np.array([100, 400, 25], float)
    for tau in (0.5, 1.0, 3.0):
        expect = (n / n.sum()) ** (1 / tau)
        expect /= expect.sum()
        np.testing.assert_allclose(policies.get("temperature", temperature=tau).initial_weights(SIZES), expect,
                                   rtol=1e-12)
    np.testing.assert_allclose(policies.get("temperature", temperature="inf").initial_weights(SIZES), [1 / 3] * 3)
    np.testing.assert_allclose(policies.get("proportional").initial_weights(SIZES), n / n.sum())
    np.testing.assert_allclose(policies.get("uniform").initial_weights(SIZES), [1 / 3] * 3)
    # huge sizes and tiny tau must not overflow
    w = policies.get("temperature", temperature=0.01).initial_weights({"x": 10**9, "y": 1})
    assert w.tolist() == [1.0, 0.0]


def test_fixed_and_errors():
    np.testing.assert_allclose(policies.get("fixed", weights={"b": 3, "a": 1}).initial_weights(SIZES), [0.25, 0.75, 0])
    with pytest.raises(ValueError, match=r"unknown domain\(s\) \['z'\]"):
        policies.get("fixed", weights={"z": 1}).initial_weights(SIZES)
    with pytest.raises(ValueError, match="expected >= 0"):
        policies.get("fixed", weights=[1, -1, 1]).initial_weights(SIZES)
    with pytest.raises(ValueError, match="temperature: got 0"):
        policies.get("temperature", temperature=0)
    with pytest.raises(ValueError, match="unknown mixing policy 'nope'; available: .*temperature"):
        policies.get("nope")
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['tau'\]; accepted: temperature, update_every"):
        policies.get("temperature", tau=2)


def test_schedule_replay(tmp_path):
    sched = {"domains": ["c", "a", "b"], "steps": [0, 2, 5], "weights": [[1, 1, 2], [0, 1, 0], [1, 0, 1]]}
    p = tmp_path / "s.json"
    p.write_text(json.dumps(sched))
    pol = policies.get("schedule", path=str(p))
    np.testing.assert_allclose(pol.initial_weights(SIZES), [0.25, 0.5, 0.25])  # reordered to a, b, c
    assert pol.update(1, None) is None
    np.testing.assert_allclose(pol.update(2, None), [1, 0, 0])
    np.testing.assert_allclose(pol.update(5, None), [0, 0.5, 0.5])
    with pytest.raises(ValueError, match="do not match"):
        policies.get("schedule", schedule={**sched, "domains": ["x", "a", "b"]}).initial_weights(SIZES)


def test_registry_lazy_import_and_signal_names():
    class P(policies.MixingPolicy):
        required_signals = frozenset({"nonsense"})

    with pytest.raises(ValueError, match="unknown signal"):
        policies.register("p")(P)

    @policies.register("dev_needing_test_policy")
    class Q(policies.MixingPolicy):
        required_signals = frozenset({"dev_domain_loss"})

    q = policies.get("dev_needing_test_policy")
    assert q.requires_dev and "dev_needing_test_policy" in policies.available()


def test_configs_parse_and_demo_file_matches_embedded():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs"
    for p in sorted(root.glob("*.yaml")):
        load_config(p)
    assert load_config(root / "demo.yaml") == from_dict(demo_config())
    assert load_config(root / "demo_tiny.yaml") == from_dict(demo_config(tiny=True))
