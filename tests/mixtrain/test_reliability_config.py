"""Configs and CLI overrides: strict durations, ConfigError (never another exception) for fuzzed
YAML, overrides and dicts; the policy registry lists every policy."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_loop import REPO, _env

from mixtrain.__main__ import main as cli
from mixtrain.config import (
    ConfigError,
    apply_overrides,
    config_fingerprint,
    demo_config,
    from_dict,
    load_config,
)
from mixtrain.faults import parse_duration

ALL_POLICIES = ["doremi", "dynamic_moe", "fixed", "mos", "odm", "proportional", "schedule", "skillit",
                "temperature", "uniform"]


@pytest.mark.parametrize("text, seconds", [("3h50m", 13800), ("90s", 90), ("45m", 2700), ("1d2h", 93600),
                                           ("2m30s", 150), ("1.5s", 1.5), ("1d", 86400)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds
    assert from_dict(apply_overrides(demo_config(), [f"train.time_limit={text}"])).train.time_limit == text


@pytest.mark.parametrize("text", ["3h50", "h", "", "50m3h", "-5m", "0s", "0h0m", "1 h", "1H", "1.5h", "1e3s",
                                  "90", "inf", "3h 50m"])
def test_bad_durations_are_config_errors(text):
    with pytest.raises(ConfigError, match=r"^train\.time_limit: got .*expected a positive duration such as '3h50m'"):
        from_dict(apply_overrides(demo_config(), [f"train.time_limit='{text}'"]))


def test_time_limit_must_be_a_string_and_dist_timeout_positive():
    with pytest.raises(ConfigError, match=r"train\.time_limit: got 90 \(int\)"):
        from_dict(apply_overrides(demo_config(), ["train.time_limit=90"]))
    for v in ("0", "-1", ".nan", ".inf"):
        with pytest.raises(ConfigError, match=r"train\.dist_timeout: got .*expected a positive number of seconds"):
            from_dict(apply_overrides(demo_config(), [f"train.dist_timeout={v}"]))


def test_accuracy_every():
    assert from_dict(apply_overrides(demo_config(), ["eval.accuracy_every=12"])).eval.accuracy_every == 12
    assert from_dict(demo_config()).eval.accuracy_every is None
    for v in ("0", "-3", "1.5", "true", "'x'"):  # range check, or the type check of every field
        with pytest.raises(ConfigError, match=r"^eval\.accuracy_every: got .*expected (null or an integer >= 1|int \| None)"):
            from_dict(apply_overrides(demo_config(), [f"eval.accuracy_every={v}"]))


def test_resume_safe_fields_are_outside_the_fingerprint():
    base = from_dict(demo_config())
    other = from_dict(apply_overrides(demo_config(), ["train.time_limit=3h50m", "train.dist_timeout=20"]))
    assert config_fingerprint(base) == config_fingerprint(other)
    assert config_fingerprint(base) != config_fingerprint(from_dict(apply_overrides(demo_config(), ["train.lr=0.5"])))


@pytest.mark.parametrize("override, expect", [
    ("train.warmup=.inf", r"train\.warmup: got inf"),
    ("train.warmup=.nan", r"train\.warmup: got nan"),
    ("train.steps=[", r"override 'train.steps=\[': the value is not valid YAML"),
    ("output_dir=2020-01-01", r"output_dir: got the date/time datetime\.date\(2020, 1, 1\); quote it"),
    ("mixing.params={1: 2}", r"mixing\.params: key 1 \(int\) is not a string; quote it"),
    ("deepspeed=!!binary aGVsbG8=", r"deepspeed: got bytes"),
    ("train.lr={a: &x [*x]}", r"nested deeper than 64 levels"),
])
def test_former_crashes_are_config_errors(override, expect):
    with pytest.raises(ConfigError, match=expect):
        from_dict(apply_overrides(demo_config(), [override]))


def test_config_file_that_is_not_utf8(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes(b"train:\n  steps: 3 # caf\xe9\n")
    with pytest.raises(ConfigError, match=rf"config file '{p}': byte at offset 23 \(0xe9\) is not UTF-8"):
        load_config(p)


# ---- fuzzing -----------------------------------------------------------------------------------

_yaml_bits = st.sampled_from(["train:", "data:", "model:", "mixing:", "eval:", "deepspeed:", "output_dir:", "  ",
                              "\n", "- ", ": ", "steps: ", "policy: ", "builtin: [code]", "1e999", ".inf", ".nan",
                              "2020-01-01", "!!binary aGk=", "!!set {a}", "&a [*a]", "*a", "{", "[", "'", '"', "?",
                              "1: 2", "null", "true", "-5", "0x1f", "~", "\t", "\xe9", "%YAML 1.1", "---", "..."])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.lists(_yaml_bits | st.text(max_size=6), max_size=30).map("".join))
def test_fuzz_yaml_files_give_config_or_config_error(tmp_path, text):
    p = tmp_path / "fuzz.yaml"
    p.write_text(text, encoding="utf-8")
    try:
        load_config(p)
    except ConfigError:
        pass


_value = st.sampled_from(["1", "-1", "0", "1.5", ".inf", ".nan", "true", "null", "[]", "{}", "[1, a]", "{a: 1}",
                          "x", "2020-01-01", "!!binary aGk=", "&a [*a]", "[", "'", "1e999", "cosine", "3h", "''",
                          "{1: 2}", "[[[[]]]]"]) | st.text(max_size=6)
_key = st.sampled_from(["train.steps", "train.lr", "train.warmup", "train.zero_stage", "train.betas", "train.resume",
                        "train.time_limit", "train.dist_timeout", "train.precision", "data.builtin",
                        "data.builtin_size", "data.builtin_size.code", "data.exhaustion", "data.exhaustion.code",
                        "data.max_length", "data.dev_fraction", "data.domains", "mixing.policy", "mixing.params",
                        "mixing.update_every", "model.config", "model.config.model_type", "model.lora",
                        "model.name_or_path", "eval.max_examples", "deepspeed", "output_dir", "gradex", "train",
                        "nope", "train.nope", "a.b.c", ".", "", "train..steps"]) | st.text(max_size=5)


@settings(max_examples=400, deadline=None)
@given(overrides=st.lists(st.tuples(_key, _value).map("=".join) | st.text(max_size=8), max_size=5))
def test_fuzz_overrides_give_config_or_config_error(overrides):
    try:
        from_dict(apply_overrides(demo_config(), overrides))
    except ConfigError:
        pass


_raw = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6) | st.dates(),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6) | st.integers(), c, max_size=3),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(section=st.sampled_from(["model", "data", "mixing", "train", "eval", "deepspeed", "output_dir", "gradex"]),
       key=st.sampled_from(["steps", "lr", "warmup", "betas", "builtin", "builtin_size", "exhaustion", "config",
                            "policy", "params", "time_limit", "dist_timeout", "max_length", "x"]),
       value=_raw, whole=st.booleans())
def test_fuzz_from_dict_gives_config_or_config_error(section, key, value, whole):
    raw = demo_config()
    if whole or not isinstance(raw.get(section), dict):
        raw[section] = value
    else:
        raw[section][key] = value
    try:
        from_dict(raw)
    except ConfigError:
        pass


# ---- the policy registry -----------------------------------------------------------------------

def test_unknown_policy_lists_every_policy_in_a_fresh_process():
    code = ("from mixtrain import policies\n"
            "try:\n    policies.get('nope')\nexcept ValueError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=120, check=True)
    assert r.stdout.strip() == f"unknown mixing policy 'nope'; available: {', '.join(ALL_POLICIES)}"


def test_policies_command_prints_names_descriptions_and_defaults(capsys):
    assert cli(["policies"]) == 0
    out = capsys.readouterr().out
    heads = [line.split(":")[0] for line in out.splitlines() if not line.startswith(" ")]
    assert heads == sorted(heads) and set(ALL_POLICIES) <= set(heads)  # (+ any a test registered in-process)
    assert "odm: Online Data Mixing with EXP3\n" in out
    assert "uniform: p_i = 1 / N.\n" in out
    assert "    mode: str = 'smoothed_mean'\n    smoothing: float = 0.9\n" in out  # odm.py's __init__ defaults
    assert "    weights: Sequence[float] | Mapping[str, float] = (required)\n" in out  # fixed
    assert "    temperature: float | str = 'inf'\n" in out  # mos
    assert "    signals: dev_domain_loss\n" in out  # skillit
    assert all(line.strip() for line in out.splitlines())


def test_yaml_dump_of_config_round_trips():
    cfg = from_dict(apply_overrides(demo_config(), ["train.time_limit=90s"]))
    assert from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))).train.time_limit == "90s"
