"""``mixtrain compare``: the policy syntax, the aggregation against hand-computed numbers, and a
real two-policy × two-seed comparison that is killed after its first run and resumed."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mixtrain.compare import (
    PolicySpec,
    parse_policies,
    parse_seeds,
    read_run,
    summarize,
    with_baselines,
    write_comparison,
)
from mixtrain.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]


# ---- syntax ------------------------------------------------------------------------------------


def test_parse_policies_syntax() -> None:
    specs = parse_policies("mos:reward=diff:use_ema=false,temperature:temperature=10@tau10")
    assert specs == [
        PolicySpec("mos+reward=diff+use_ema=false", "mos", {"reward": "diff", "use_ema": False}),
        PolicySpec("tau10", "temperature", {"temperature": 10}),
    ]
    (sk,) = parse_policies("skillit:graph=[[1, 0.5], [0, 1]]:update_every=20:eta=0.5")
    assert sk.policy == "skillit" and sk.params == {"graph": [[1, 0.5], [0, 1]], "eta": 0.5}
    assert sk.update_every == 20
    (t,) = parse_policies("temperature:temperature=.inf")
    assert t.params == {"temperature": "inf"}


def test_aliases_and_baselines() -> None:
    (s,) = parse_policies("stratified")
    assert (s.label, s.policy) == ("uniform", "uniform") and "stratified" in s.note
    (r,) = parse_policies("random")
    assert (r.label, r.policy, r.params) == ("random", "proportional", {})
    assert [x.label for x in parse_policies("uniform,stratified")] == ["uniform"]  # one run
    specs = with_baselines(parse_policies("mos,stratified"))
    assert [x.label for x in specs] == ["uniform", "random", "mos"]


@pytest.mark.parametrize(
    "text,msg",
    [
        ("", "--policies: empty"),
        ("mos,,uniform", "empty entry"),
        ("mos:reward", "parameter 'reward' must be key=value"),
        ("mos@", "label '' must be non-empty"),
        ("mos@a b", "label 'a b' must be non-empty and use only"),
        ("mos:reward=diff@x,mos:reward=cossim@x", "label 'x' used twice"),
        ("mos:update_every=0", "update_every='0', expected an integer >= 1"),
        ("9mos", "policy name '9mos' is not a valid name"),
    ],
)
def test_parse_policies_errors(text: str, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        parse_policies(text)


def test_parse_seeds() -> None:
    assert parse_seeds("0,1, 2") == [0, 1, 2]
    for bad in ("a", "0,0", "-1", ""):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad)


# ---- aggregation on fabricated runs (numbers checked by hand) --------------------------------------


def _fake_run(d: Path, dev5: dict[str, float], dev10: dict[str, float], weights: dict[str, float],
              wall: float, acc10: dict[str, float] | None = None) -> None:
    d.mkdir(parents=True)
    recs = [
        {"step": 5, "loss": 1.0, "weights": weights, "step_time": 0.1, "policy_time": 0.01, "dev_loss": dev5},
        {"step": 10, "loss": 1.0, "weights": weights, "step_time": 0.1, "policy_time": 0.01, "dev_loss": dev10},
    ]
    if acc10 is not None:
        recs[1]["dev_accuracy"] = acc10
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (d / "compare_run.json").write_text(json.dumps({"status": "done", "wall_time": wall}))


def test_summary_and_table_hand_computed(tmp_path: Path) -> None:
    w = {"x": 0.5, "y": 0.5}
    # avg dev loss at steps 5 / 10 per seed:   uniform 2.5/1.5, 2.7/1.7   random .../1.9, .../2.1
    #                                          good 1.55/1.0, 1.45/1.2    meh 2.0/1.55, 2.0/1.75
    spec = {
        "uniform": [({"x": 2.0, "y": 3.0}, {"x": 1.0, "y": 2.0}), ({"x": 2.2, "y": 3.2}, {"x": 1.2, "y": 2.2})],
        "random": [({"x": 3.0, "y": 3.0}, {"x": 1.9, "y": 1.9}), ({"x": 3.0, "y": 3.0}, {"x": 2.1, "y": 2.1})],
        "good": [({"x": 1.55, "y": 1.55}, {"x": 0.5, "y": 1.5}), ({"x": 1.45, "y": 1.45}, {"x": 1.2, "y": 1.2})],
        "meh": [({"x": 2.0, "y": 2.0}, {"x": 1.55, "y": 1.55}), ({"x": 2.0, "y": 2.0}, {"x": 1.75, "y": 1.75})],
    }
    results = {}
    for label, seeds in spec.items():
        for seed, (d5, d10) in enumerate(seeds):
            rd = tmp_path / "runs" / label / f"seed{seed}"
            _fake_run(rd, d5, d10, w if label != "good" else {"x": 0.8, "y": 0.2}, 30.0 + seed,
                      {"x": 0.25 * (seed + 1)} if label == "good" else None)
            results.setdefault(label, []).append(read_run(rd, label, seed))
    s = summarize(results)
    sd = math.sqrt(2 * 0.1**2)  # sample std of two values 0.2 apart
    assert s["target"] == {"baseline": "uniform", "dev_avg": pytest.approx(1.6)}
    rows = s["rows"]
    assert rows["uniform"]["dev_avg"] == (pytest.approx(1.6), pytest.approx(sd))
    assert rows["good"]["dev_avg"] == (pytest.approx(1.1), pytest.approx(sd))
    assert rows["good"]["dev_domain"]["x"] == (pytest.approx(0.85), pytest.approx(math.sqrt(2 * 0.35**2)))
    assert rows["good"]["reach"]["mean"] == 5 and rows["good"]["reach"]["reached"] == 2
    assert rows["meh"]["reach"]["per_seed"] == [10, None]  # 1.55 <= 1.6 at step 10; 1.75 never
    assert rows["random"]["reach"]["reached"] == 0
    assert rows["uniform"]["reach"]["per_seed"] == [10, None]  # seed 0: 1.5 <= 1.6 at step 10; seed 1 ends at 1.7
    assert rows["good"]["overhead_pct"][0] == pytest.approx(10.0)
    assert rows["good"]["wall_time"] == (pytest.approx(30.5), pytest.approx(math.sqrt(0.5)))
    assert rows["good"]["acc_avg"] == (pytest.approx(0.375), pytest.approx(math.sqrt(2 * 0.125**2)))
    # paired differences per seed: good − uniform = −0.5, −0.5 (no spread: t undefined, not significant);
    # meh − uniform = +0.05, +0.05; meh − random = −0.35, −0.35 (statistics: test_compare_stats.py)
    g = rows["good"]["vs"]["uniform"]["dev_avg"]
    assert g["diff"] == pytest.approx(-0.5) and g["n"] == 2 and g["per_seed"] == [pytest.approx(-0.5)] * 2
    assert math.isnan(g["p_ttest"]) and g["significant"] is False
    assert rows["meh"]["vs"]["uniform"]["dev_avg"]["diff"] == pytest.approx(0.05)
    assert rows["meh"]["vs"]["random"]["dev_avg"]["diff"] == pytest.approx(-0.35)
    assert rows["good"]["vs"]["uniform"]["acc_avg"] is None  # uniform has no accuracy
    specs = with_baselines([PolicySpec("good", "good"), PolicySpec("meh", "meh")])
    md, png = write_comparison(tmp_path, specs, results, header={"config": "fake"})
    text = md.read_text()
    good = next(line for line in text.splitlines() if line.startswith("| `good`"))
    meh = next(line for line in text.splitlines() if line.startswith("| `meh`"))
    ci = 12.706204736174696 * 0.1414213562373095 / math.sqrt(2)  # t_{0.975, 1} · s / √2
    assert f"1.1000 [{1.1 - ci:.4f}, {1.1 + ci:.4f}]" in good and "| -0.5000 |" in good
    assert "5 (2/2)" in good and "10.00" in good
    assert "+0.0500 |" in meh and "10 (1/2)" in meh
    assert "not reached (0/2)" in next(line for line in text.splitlines() if line.startswith("| `random`"))
    assert "| `good` | 0.850 ± 0.495 | 1.350 ± 0.212 |" in text  # per-domain table
    assert "| `good` | 0.800 | 0.200 |" in text  # final weights
    assert "`uniform` (= stratified" in text and "`random` (= proportional" in text
    assert png.stat().st_size > 10_000
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert saved["summary"]["rows"]["good"]["dev_avg"][0] == pytest.approx(1.1)


def test_single_seed_has_no_spread_mark(tmp_path: Path) -> None:
    results = {}
    for label, v in (("uniform", 2.0), ("random", 2.5), ("p", 1.0)):
        rd = tmp_path / label
        _fake_run(rd, {"x": 3.0}, {"x": v}, {"x": 1.0}, 1.0)
        results[label] = [read_run(rd, label, 0)]
    s = summarize(results)
    v = s["rows"]["p"]["vs"]["uniform"]["dev_avg"]  # one pair: no t-test, no mark
    assert v["diff"] == pytest.approx(-1.0) and math.isnan(v["p_ttest"]) and v["significant"] is False
    assert v["p_signflip"] == 1.0  # the smallest two-sided p of one pair is 2/2


def test_start_record_is_shared_by_every_run(tmp_path: Path) -> None:
    from mixtrain.compare import share_start

    w = {"x": 0.5, "y": 0.5}
    _fake_run(tmp_path / "a", {"x": 2.0, "y": 1.0}, {"x": 1.0, "y": 0.5}, w, 1.0, acc10={"x": 0.5, "y": 0.25})
    _fake_run(tmp_path / "b", {"x": 2.5, "y": 1.5}, {"x": 1.5, "y": 0.5}, w, 1.0, acc10={"x": 0.0, "y": 0.5})
    path = tmp_path / "a" / "metrics.jsonl"
    start = {"step": 0, "dev_loss": {"x": 3.0, "y": 2.0}, "dev_accuracy": {"x": 0.0, "y": 0.5}}
    path.write_text(json.dumps(start) + "\n" + path.read_text())
    results = {"a": [read_run(tmp_path / "a", "a")], "b": [read_run(tmp_path / "b", "b")]}
    assert results["b"][0].start is None
    assert share_start(results) == start
    for runs in results.values():  # every curve starts at the shared step-0 point, once
        assert runs[0].dev_curve[0] == (0, 2.5) and [s for s, _ in runs[0].dev_curve] == [0, 5, 10]
        assert runs[0].acc_curve[0] == (0, 0.25) and [s for s, _ in runs[0].acc_curve] == [0, 10]
    assert share_start({"b": [read_run(tmp_path / "b", "b")]}) is None


def test_read_run_without_dev_loss(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "weights": {"x": 1.0}}) + "\n")
    with pytest.raises(ValueError, match="no dev_loss records; set train.eval_every > 0"):
        read_run(tmp_path)


# ---- the real thing: 2 policies × 2 seeds, killed after the first run, resumed ------------------


def _config(tmp_path: Path) -> Path:
    cfg = {
        "model": {"config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                             "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                             "max_position_embeddings": 128}, "tokenizer": "byte"},
        "data": {"builtin": ["addition"], "builtin_size": {"addition_1": 40, "addition_2": 40, "addition_3": 120},
                 "dev_fraction": 0.1, "max_length": 128, "max_dev_examples": 8},
        "mixing": {"policy": "uniform"},
        "train": {"steps": 4, "micro_batch_size": 4, "lr": 1e-3, "eval_every": 2, "save_every": 2, "log_every": 1,
                  "threads": 1, "tensorboard": False},
        "eval": {"accuracy": True, "max_examples": 4, "max_new_tokens": 4, "at_start": True, "accuracy_every": 4},
        "output_dir": str(tmp_path / "unused"),
    }
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _compare_cmd(cfg: Path, out: Path, jobs: int) -> list[str]:
    return [sys.executable, "-m", "mixtrain", "compare", str(cfg), "--policies", "uniform,random",
            "--seeds", "0,1", "--output", str(out), "--jobs", str(jobs)]


def test_compare_end_to_end_with_resume(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    out = tmp_path / "cmp"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    first = out / "runs" / "uniform" / "seed0"
    proc = subprocess.Popen(_compare_cmd(cfg, out, 1), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 400
    try:
        while time.time() < deadline:
            m = first / "compare_run.json"
            if m.is_file() and json.loads(m.read_text()).get("status") == "done":
                break
            log = first / "train.log"
            assert proc.poll() is None, "compare exited early: " + (log.read_text()[-2000:] if log.is_file() else "")
            time.sleep(0.5)
        else:
            pytest.fail("first run did not finish in time")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the comparison (its runs have their own sessions)
        proc.wait()
    before = (first / "metrics.jsonl").read_bytes()
    mtime = (first / "metrics.jsonl").stat().st_mtime_ns
    assert not (out / "comparison.md").exists()

    res = subprocess.run(_compare_cmd(cfg, out, 2), check=False, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "1 finished already, 3 to run" in res.stderr
    # the finished run was not redone
    marker = json.loads((first / "compare_run.json").read_text())
    assert marker["attempts"] == 1 and marker["status"] == "done"
    assert (first / "metrics.jsonl").read_bytes() == before
    assert (first / "metrics.jsonl").stat().st_mtime_ns == mtime
    for label in ("uniform", "random"):
        for seed in (0, 1):
            rd = out / "runs" / label / f"seed{seed}"
            assert json.loads((rd / "compare_run.json").read_text())["status"] == "done"
            recs = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
            # the starting model is evaluated once, in the first run only; dev loss every 2 steps,
            # accuracy every 4 (eval.accuracy_every) and at the start
            first_run = (label, seed) == ("uniform", 0)
            assert [r["step"] for r in recs] == ([0] if first_run else []) + [1, 2, 3, 4]
            assert [r["step"] for r in recs if "dev_loss" in r] == ([0] if first_run else []) + [2, 4]
            assert [r["step"] for r in recs if "dev_accuracy" in r] == ([0] if first_run else []) + [4]
            assert set(recs[-1]["dev_accuracy"]) == {"addition_1", "addition_2", "addition_3"}
    rec0 = json.loads((first / "metrics.jsonl").read_text().splitlines()[0])
    start_loss = sum(rec0["dev_loss"].values()) / 3
    weights = json.loads((out / "runs" / "random" / "seed0" / "metrics.jsonl").read_text().splitlines()[-1])["weights"]
    assert weights["addition_3"] == pytest.approx(120 * 0.9 / (200 * 0.9), abs=0.01)  # proportional
    text = (out / "comparison.md").read_text()
    assert "| `uniform` (= stratified" in text and "| `random` (= proportional" in text
    assert "accuracy %" in text
    assert f"avg dev loss {start_loss:.4f}" in text.split("**starting model (step 0)**")[1].splitlines()[0]
    assert "- **compute**: 4 runs, " in text
    assert (out / "comparison.png").stat().st_size > 10_000
    # a third invocation runs nothing and rebuilds the same table
    res = subprocess.run(_compare_cmd(cfg, out, 1), check=False, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "4 finished already, 0 to run" in res.stderr


def test_compare_bad_policy_fails_before_running(tmp_path: Path) -> None:
    from mixtrain.__main__ import main

    cfg = _config(tmp_path)
    rc = main(["compare", str(cfg), "--policies", "nosuch", "--output", str(tmp_path / "o")])
    assert rc == 2
    assert not (tmp_path / "o" / "runs").exists()
    rc = main(["compare", str(cfg), "--policies", "temperature:tau=3", "--output", str(tmp_path / "o")])
    assert rc == 2
    rc = main(["compare", str(cfg), "--policies", "temperature:temperature=3@t3", "--baselines", "t4",
               "--output", str(tmp_path / "o")])
    assert rc == 2  # a baseline that is no row
    assert not (tmp_path / "o" / "runs").exists()
    rc = main(["compare", str(cfg), "--policies", "temperature:temperature=3", "--domains", "nope",
               "--output", str(tmp_path / "o")])
    assert rc == 2  # a scored domain that is not configured
    assert not (tmp_path / "o" / "runs").exists()
