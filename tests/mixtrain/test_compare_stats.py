"""Statistics of ``mixtrain compare``: intervals, paired tests, bootstrap and Holm against
closed forms, enumeration and scipy; the comparison on fabricated 3-seed run directories with
per-example results; steps-to-baseline with an evaluation every 10 steps; and a real 3-seed
comparison whose report is rebuilt with another test without rerunning anything."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml

from mixtrain.compare import (
    PolicySpec,
    parse_baselines,
    read_run,
    summarize,
    with_baselines,
    write_comparison,
)
from mixtrain.config import ConfigError
from mixtrain.engine import standalone_env
from mixtrain.stats import RatioData, holm, paired_bootstrap, paired_t, sign_flip, t_interval

ROOT = Path(__file__).resolve().parents[2]
T975_DF2 = 4.302652729911275  # Student t quantile 0.975 with 2 degrees of freedom (tables)


# ---- the statistics --------------------------------------------------------------------------------


def test_t_interval_closed_form() -> None:
    x = [0.2, 0.5, 0.35]
    m, lo, hi = t_interval(x)
    half = T975_DF2 * np.std(x, ddof=1) / math.sqrt(3)
    assert (m, lo, hi) == (pytest.approx(0.35), pytest.approx(0.35 - half), pytest.approx(0.35 + half))
    assert t_interval([1.0])[0] == 1.0 and math.isnan(t_interval([1.0])[1])
    assert t_interval([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)
    assert all(math.isnan(v) for v in t_interval([]))
    with pytest.raises(ValueError, match="confidence 1.5"):
        t_interval(x, 1.5)


def test_paired_t_closed_form_df2() -> None:
    a, b = [3.0, 5.0, 8.0], [2.0, 3.0, 5.0]  # differences 1, 2, 3: mean 2, sd 1
    t = 2 / (1 / math.sqrt(3))
    # Student t with 2 df: two-sided p = 1 - |t| / sqrt(2 + t^2)
    assert paired_t(a, b) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-10)
    assert paired_t(b, a) == pytest.approx(paired_t(a, b))
    assert paired_t([1.0, 2.0], [1.0, 2.0]) == 1.0  # no difference at all
    assert math.isnan(paired_t([1.5, 2.5], [1.0, 2.0]))  # equal differences: t undefined
    assert math.isnan(paired_t([1.0], [0.0]))
    assert paired_t([3.0, 5.0, 8.0, math.nan], [2.0, 3.0, 5.0, 1.0]) == pytest.approx(paired_t(a, b))
    with pytest.raises(ValueError, match="one pair per seed"):
        paired_t([1.0, 2.0], [1.0])


def _enumerated_sign_flip(d: np.ndarray) -> float:
    obs = abs(d.mean())
    hits = [abs((d * np.array(s)).mean()) >= obs - 1e-12 for s in itertools.product([1, -1], repeat=len(d))]
    return float(np.mean(hits))


def test_sign_flip_exact_against_enumeration() -> None:
    assert sign_flip([1.0, 2.0, 3.0], [0.0, 0.0, 0.0]) == pytest.approx(0.25)  # 3 seeds: never below 2/8
    assert sign_flip([0.0] * 6, [-1.0, -2.0, -0.5, -3.0, -1.0, -2.0]) == pytest.approx(2 / 64)
    rng = np.random.default_rng(3)
    for n in (3, 5, 8):
        a, b = rng.normal(size=n), rng.normal(size=n)
        assert sign_flip(a, b) == pytest.approx(_enumerated_sign_flip(a - b))
    assert sign_flip([1.0, 2.0], [1.0, 2.0]) == 1.0
    assert sign_flip([1.0], [0.0]) == 1.0


def test_holm_hand_computed() -> None:
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.02, 0.03, 0.06, 0.06
    got = holm([0.01, 0.04, 0.03, 0.005, math.nan])
    assert got[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02]) and math.isnan(got[4])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([]) == []


def _exact_bootstrap(num_a: np.ndarray, num_b: np.ndarray) -> np.ndarray:
    """Every one of the n^n equally likely index tuples: the exact bootstrap distribution."""
    n = len(num_a)
    return np.array([num_a[list(t)].mean() - num_b[list(t)].mean() for t in itertools.product(range(n), repeat=n)])


def test_bootstrap_matches_exact_enumeration() -> None:
    a = np.array([[1.0, 1.0, 0.0, 1.0, 0.0]])  # one seed, 5 examples: accuracy 0.6 vs 0.2
    b = np.array([[1.0, 0.0, 0.0, 0.0, 0.0]])
    exact = _exact_bootstrap(a[0], b[0])
    res = paired_bootstrap([RatioData(a, np.ones_like(a))], [RatioData(b, np.ones_like(b))], n_boot=40000, seed=1)
    assert res.diff == pytest.approx(0.4) and res.n_boot == 40000
    p_exact = min(1.0, 2 * min((exact <= 0).mean(), (exact >= 0).mean()))
    assert res.p == pytest.approx(p_exact, abs=0.006)
    lo, hi = np.quantile(exact, [0.025, 0.975])
    assert (res.lo, res.hi) == (pytest.approx(lo, abs=1e-9), pytest.approx(hi, abs=1e-9))  # discrete: same atoms


def test_bootstrap_against_scipy_and_pairing() -> None:
    from scipy import stats

    rng = np.random.default_rng(0)
    n = 200
    base = rng.normal(2.0, 1.0, size=n)
    a, b = base + rng.normal(0.1, 0.2, size=n), base  # strongly paired
    ra, rb = RatioData(a[None], np.ones((1, n))), RatioData(b[None], np.ones((1, n)))
    res = paired_bootstrap([ra], [rb], n_boot=20000, seed=2)
    ref = stats.bootstrap((a - b,), np.mean, method="percentile", n_resamples=20000, rng=np.random.default_rng(5))
    assert res.lo == pytest.approx(ref.confidence_interval.low, abs=0.01)
    assert res.hi == pytest.approx(ref.confidence_interval.high, abs=0.01)
    assert res.p < 0.001
    # unpaired resampling would be ~5x wider; the paired interval is about 2 * 1.96 * sd(a - b) / sqrt(n)
    assert res.hi - res.lo == pytest.approx(2 * 1.96 * np.std(a - b) / math.sqrt(n), rel=0.08)


def test_bootstrap_ratio_domains_and_shared_ids_across_seeds() -> None:
    # dev loss: per-domain token-weighted ratio, then the mean over domains, then over seeds
    num_a = np.array([[2.0, 6.0, 3.0]])
    den = np.array([[1.0, 3.0, 2.0]])
    num_b = np.array([[1.0, 3.0, 3.0]])
    d2a, d2b, d2den = np.array([[4.0, 4.0]]), np.array([[2.0, 6.0]]), np.array([[2.0, 2.0]])
    res = paired_bootstrap([RatioData(num_a, den), RatioData(d2a, d2den)],
                           [RatioData(num_b, den), RatioData(d2b, d2den)], n_boot=500, seed=0)
    assert res.diff == pytest.approx(((11 / 6 - 7 / 6) + (2.0 - 2.0)) / 2)
    # two seeds with identical results give exactly the one-seed answer: the resampled ids are shared
    one = paired_bootstrap([RatioData(num_a, den)], [RatioData(num_b, den)], n_boot=300, seed=4)
    two = paired_bootstrap([RatioData(np.repeat(num_a, 2, 0), np.repeat(den, 2, 0))],
                           [RatioData(np.repeat(num_b, 2, 0), np.repeat(den, 2, 0))], n_boot=300, seed=4)
    assert (one.diff, one.lo, one.hi, one.p) == (two.diff, two.lo, two.hi, two.p)
    same = paired_bootstrap([RatioData(num_a, den)], [RatioData(num_a, den)], n_boot=100)
    assert (same.diff, same.lo, same.hi, same.p) == (0.0, 0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="expected one non-empty"):
        paired_bootstrap([RatioData(num_a, den)], [RatioData(num_b[:, :2], den[:, :2])])
    with pytest.raises(ValueError, match="n_boot 0"):
        paired_bootstrap([RatioData(num_a, den)], [RatioData(num_b, den)], n_boot=0)


# ---- the comparison on fabricated run directories ---------------------------------------------------

DOMS = ("x", "y")
N_EX = 20


def _fake_run(d: Path, seed: int, acc_rate: dict[str, float], loss_shift: float, *, evals: int = 10,
              every: int = 10, curve: list[float] | None = None, examples_step: int | None = None) -> None:
    """A finished run whose metrics.jsonl and dev_examples.json agree. Dev example ``j`` has a
    difficulty and a length shared by every run (the same dev rows); a run gets it right when
    difficulty + small run noise < ``acc_rate``, and its loss is length × (2 + shift + difficulty
    noise + small run noise)."""
    shared = np.random.default_rng(123)
    hard = {k: shared.random(N_EX) for k in DOMS}
    tokens = {k: shared.integers(3, 9, size=N_EX).astype(float) for k in DOMS}
    level = {k: shared.normal(0, 0.3, N_EX) for k in DOMS}
    rng = np.random.default_rng([seed, zlib.crc32(d.parent.name.encode() if d.name.startswith("seed") else b"")])
    d.mkdir(parents=True)
    correct = {k: (hard[k] + rng.normal(0, 0.05, N_EX) < acc_rate[k]).astype(int) for k in DOMS}
    loss_sum = {k: tokens[k] * (2.0 + loss_shift + level[k] + rng.normal(0, 0.05, N_EX)) for k in DOMS}
    final_dev = {k: float(loss_sum[k].sum() / tokens[k].sum()) for k in DOMS}
    final_acc = {k: float(correct[k].mean()) for k in DOMS}
    recs = []
    for i in range(1, evals + 1):
        step = i * every
        avg = curve[i - 1] if curve is not None else None
        dev = final_dev if i == evals else {k: (avg if avg is not None else 3.0) for k in DOMS}
        r = {"step": step, "loss": 1.0, "weights": {"x": 0.5, "y": 0.5}, "step_time": 0.1, "policy_time": 0.0,
             "dev_loss": dev}
        if i == evals:
            r["dev_accuracy"] = final_acc
        recs.append(r)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (d / "compare_run.json").write_text(json.dumps({"status": "done", "wall_time": 10.0}))
    (d / "dev_examples.json").write_text(json.dumps({
        "version": 1, "step": examples_step if examples_step is not None else evals * every,
        "dev_loss": {k: {"loss_sum": loss_sum[k].tolist(), "tokens": tokens[k].tolist()} for k in DOMS},
        "dev_accuracy": {k: {"index": list(range(N_EX)), "correct": correct[k].tolist()} for k in DOMS}}))


ARMS = {"uniform": ({"x": 0.3, "y": 0.3}, 0.0), "random": ({"x": 0.35, "y": 0.3}, 0.0),
        "strong": ({"x": 0.9, "y": 0.8}, -0.5), "weak": ({"x": 0.3, "y": 0.3}, 0.0)}  # like the baselines up to run noise


def _fabricate(root: Path, seeds: tuple[int, ...] = (0, 1, 2)) -> dict[str, list]:
    results: dict[str, list] = {}
    for label, (rate, shift) in ARMS.items():
        for s in seeds:
            rd = root / "runs" / label / f"seed{s}"
            _fake_run(rd, s, rate, shift)
            results.setdefault(label, []).append(read_run(rd, label, s))
    return results


def test_three_seed_statistics_against_scipy(tmp_path: Path) -> None:
    from scipy import stats

    results = _fabricate(tmp_path)
    s = summarize(results, n_boot=2000)
    rows = s["rows"]
    for label, runs in results.items():  # per-arm 95 % t interval
        for key, attr in (("acc_ci", "acc_avg"), ("dev_ci", "dev_avg")):
            v = [getattr(r, attr) for r in runs]
            half = T975_DF2 * np.std(v, ddof=1) / math.sqrt(3)
            assert rows[label][key] == pytest.approx([np.mean(v), np.mean(v) - half, np.mean(v) + half])
    comps = s["comparisons"]
    assert len(comps) == 2 * 5  # random vs uniform (once), strong and weak vs both; per metric
    for c in comps:
        a = [getattr(r, c["metric"]) for r in results[c["policy"]]]
        b = [getattr(r, c["metric"]) for r in results[c["baseline"]]]
        assert c["p_ttest"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
        assert c["p"] == c["p_ttest"]  # default test
        assert c["p_signflip"] >= 0.25 - 1e-12  # 3 seeds: the exact sign-flip test cannot go lower
        assert c["diff"] == pytest.approx(np.mean(a) - np.mean(b))
        assert c["bootstrap"]["diff"] == pytest.approx(c["diff"])  # examples and metrics agree
    for metric in ("acc_avg", "dev_avg"):  # Holm within each metric, by hand
        fam = [c for c in comps if c["metric"] == metric]
        p = np.array([c["p"] for c in fam])
        order = np.argsort(p)
        adj = np.maximum.accumulate(np.minimum(1, (len(p) - np.arange(len(p))) * p[order]))
        want = np.empty_like(adj)
        want[order] = adj
        assert [c["p_holm"] for c in fam] == pytest.approx(want.tolist())
        assert [c["significant"] for c in fam] == [bool(x <= 0.05) for x in want]
    u_r, r_u = rows["uniform"]["vs"]["random"]["acc_avg"], rows["random"]["vs"]["uniform"]["acc_avg"]
    assert u_r["diff"] == -r_u["diff"] and u_r["p_holm"] == r_u["p_holm"]  # one test, shown from both sides
    assert u_r["bootstrap"]["lo"] == -r_u["bootstrap"]["hi"]
    strong = rows["strong"]["vs"]["uniform"]
    assert strong["acc_avg"]["diff"] > 0.4 and strong["dev_avg"]["diff"] < -0.4
    assert strong["dev_avg"]["significant"]  # a 0.5 nat gap with ~0.05 seed noise
    assert strong["acc_avg"]["bootstrap"]["p"] < 0.01


def test_table_marks_only_the_chosen_test_and_writes_summary(tmp_path: Path) -> None:
    results = _fabricate(tmp_path)
    specs = with_baselines([PolicySpec("strong", "strong"), PolicySpec("weak", "weak")])
    write_comparison(tmp_path, specs, results, test="bootstrap", n_boot=2000)
    text = (tmp_path / "comparison.md").read_text()
    summ = json.loads((tmp_path / "summary.json").read_text())
    assert summ["test"] == "bootstrap" and summ["correction"] == "holm" and summ["primary_metric"] == "accuracy"
    assert "paired bootstrap over dev examples" in text and "α = 0.05, Holm-corrected" in text
    assert "= 0.25 with 3 seed(s)" in text and "can never reach α here" in text
    head = next(line for line in text.splitlines() if line.startswith("| policy | accuracy %"))
    assert head.index("accuracy %") < head.index("avg dev loss")  # accuracy is the primary metric
    for c in summ["comparisons"]:
        assert c["p"] == c["bootstrap"]["p"]
        metric = "acc_avg" if c["metric"] == "accuracy" else "dev_avg"
        row = next(line for line in text.splitlines()
                   if line.startswith(f"| `{c['policy']}` | `{c['baseline']}` | {'accuracy' if metric == 'acc_avg' else 'dev loss'}"))
        assert row.endswith("**yes** |") == c["significant"]
    arm = summ["arms"]["strong"]
    assert arm["n"] == 3 and arm["seeds"] == [0, 1, 2] and len(arm["accuracy"]["per_seed"]) == 3
    assert arm["accuracy"]["lo"] < arm["accuracy"]["mean"] < arm["accuracy"]["hi"]
    strong_row = next(line for line in text.splitlines() if line.startswith("| `strong`"))
    assert " *" in strong_row  # significant vs both baselines by the bootstrap
    assert " *" not in next(line for line in text.splitlines() if line.startswith("| `weak`"))


def test_own_rows_as_baselines(tmp_path: Path) -> None:
    """``--baselines weak``: every other row is tested against ``weak`` alone; uniform / random are
    not added; the pairs are the same t-tests as against the built-in baselines."""
    from scipy import stats

    results = _fabricate(tmp_path)
    specs = with_baselines([PolicySpec("strong", "strong"), PolicySpec("weak", "weak")], parse_baselines("weak"))
    assert [s.label for s in specs] == ["weak", "strong"]  # the baseline first, nothing added
    only = {k: results[k] for k in ("weak", "strong")}
    write_comparison(tmp_path, specs, only, baselines=["weak"], n_boot=500)
    summ = json.loads((tmp_path / "summary.json").read_text())
    assert {(c["policy"], c["baseline"]) for c in summ["comparisons"]} == {("strong", "weak")}
    for c in summ["comparisons"]:
        key = "acc_avg" if c["metric"] == "accuracy" else "dev_avg"
        a, b = ([getattr(r, key) for r in only[x]] for x in ("strong", "weak"))
        assert c["p_ttest"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    text = (tmp_path / "comparison.md").read_text()
    assert "- **baselines**: `weak` (`--baselines`)." in text
    assert "Δacc vs weak (pts)" in text and "vs uniform" not in text
    # a built-in baseline named next to an own row is added; stratified is uniform
    both = with_baselines([PolicySpec("strong", "strong")], parse_baselines("stratified,strong"))
    assert [s.label for s in both] == ["uniform", "strong"]


def test_scored_domains_only(tmp_path: Path) -> None:
    """``--domains x``: dev loss, accuracy, curves and the bootstrap see domain ``x`` alone."""
    full = _fabricate(tmp_path)
    only = {lab: [read_run(tmp_path / "runs" / lab / f"seed{r.seed}", lab, r.seed, domains=["x"]) for r in runs]
            for lab, runs in full.items()}
    for lab, runs in only.items():
        for r, f in zip(runs, full[lab]):
            assert list(r.dev_final) == ["x"] and r.dev_avg == f.dev_final["x"]
            assert r.acc_avg == f.acc_final["x"] and r.dev_curve[-1][1] == f.dev_final["x"]
            assert list(r.examples["dev_loss"]) == ["x"] and list(r.examples["dev_accuracy"]) == ["x"]
    c = summarize(only, n_boot=500)["rows"]["strong"]["vs"]["uniform"]["dev_avg"]
    assert c["bootstrap"]["diff"] == pytest.approx(c["diff"])  # the examples agree with the restricted metric
    with pytest.raises(ValueError, match=r"--domains nope: none is a dev domain"):
        read_run(tmp_path / "runs" / "strong" / "seed0", domains=["nope"])


@pytest.mark.parametrize("text,msg", [("", "expected distinct"), ("weak,weak", "expected distinct")])
def test_parse_baselines_errors(text: str, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        parse_baselines(text)


def test_unknown_baseline_names_the_labels() -> None:
    with pytest.raises(ConfigError, match=r"--baselines: 'nope' is neither uniform, random nor the @label.*'strong'"):
        with_baselines([PolicySpec("strong", "strong")], ["nope"])


def test_stale_or_missing_examples_give_no_bootstrap(tmp_path: Path) -> None:
    for label in ("uniform", "p"):
        _fake_run(tmp_path / label, 0, {"x": 0.5, "y": 0.5}, 0.0, examples_step=50)  # not the final step (100)
    r = read_run(tmp_path / "p", "p", 0)
    assert r.examples is None
    (tmp_path / "uniform" / "dev_examples.json").write_text("{not json")
    s = summarize({"uniform": [read_run(tmp_path / "uniform", "uniform", 0)], "p": [r]}, n_boot=10)
    assert s["rows"]["p"]["vs"]["uniform"]["acc_avg"]["bootstrap"] is None
    s = summarize({"uniform": [read_run(tmp_path / "uniform", "uniform", 0)], "p": [r]}, test="bootstrap", n_boot=10)
    assert s["rows"]["p"]["vs"]["uniform"]["dev_avg"]["significant"] is False  # no data: never significant
    with pytest.raises(ValueError, match="--test 'z'"):
        summarize({"p": [r]}, test="z")
    with pytest.raises(ValueError, match="--alpha 0"):
        summarize({"p": [r]}, alpha=0)


def test_steps_to_baseline_with_eval_every_10(tmp_path: Path) -> None:
    # 10 evaluations at steps 10..100; the last value is the run's real final dev loss (~2.0 for
    # both baselines, 1.5 for `fast`); earlier ones follow the given curves
    slow = [3.0, 2.9, 2.8, 2.7, 2.6, 2.5, 2.4, 2.3, 2.2, None]
    fast = [2.6, 2.3, 2.1, 1.99, 1.9, 1.8, 1.7, 1.6, 1.55, None]
    results: dict[str, list] = {}
    for label, curve, shift in (("uniform", slow, 0.0), ("random", slow, 0.3), ("fast", fast, -0.5)):
        for s in (0, 1, 2):
            rd = tmp_path / label / f"seed{s}"
            _fake_run(rd, s, {"x": 0.5, "y": 0.5}, shift, curve=curve)
            results.setdefault(label, []).append(read_run(rd, label, s))
    s = summarize(results, n_boot=10)
    target = s["target"]
    assert target["baseline"] == "uniform"
    assert target["dev_avg"] == pytest.approx(np.mean([r.dev_avg for r in results["uniform"]]))
    assert 1.99 < target["dev_avg"] < 2.1  # so `fast` first gets there at its 4th evaluation
    assert s["rows"]["fast"]["reach"] == {"mean": 40.0, "reached": 3, "n": 3, "per_seed": [40, 40, 40]}
    own = [100 if r.dev_avg <= target["dev_avg"] else None for r in results["uniform"]]
    assert s["rows"]["uniform"]["reach"]["per_seed"] == own  # only at the final evaluation, where below the mean
    assert s["rows"]["random"]["reach"]["reached"] == 0


# ---- a real comparison: 2 policies × 3 seeds, then the report redone with another test ----------------


def _config(tmp_path: Path) -> Path:
    cfg = {
        "model": {"config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                             "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                             "max_position_embeddings": 128}, "tokenizer": "byte"},
        "data": {"builtin": ["addition"], "builtin_size": {"addition_1": 40, "addition_2": 40, "addition_3": 120},
                 "dev_fraction": 0.1, "max_length": 128, "max_dev_examples": 8},
        "mixing": {"policy": "uniform"},
        "train": {"steps": 3, "micro_batch_size": 4, "lr": 1e-3, "eval_every": 3, "save_every": 0, "log_every": 1,
                  "threads": 1, "tensorboard": False, "save_model": False},
        "eval": {"accuracy": True, "max_examples": 4, "max_new_tokens": 4},
        "output_dir": str(tmp_path / "unused"),
    }
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_compare_three_seeds_end_to_end(tmp_path: Path) -> None:
    cfg, out = _config(tmp_path), tmp_path / "cmp"
    env = {**standalone_env(), "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "mixtrain", "compare", str(cfg), "--policies", "uniform,random",
           "--seeds", "0,1,2", "--output", str(out), "--jobs", "2", "--bootstrap", "500"]
    res = subprocess.run(cmd, check=False, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    for label in ("uniform", "random"):
        for seed in (0, 1, 2):
            rd = out / "runs" / label / f"seed{seed}"
            ex = json.loads((rd / "dev_examples.json").read_text())
            last = json.loads((rd / "metrics.jsonl").read_text().splitlines()[-1])
            assert ex["step"] == last["step"] == 3
            for dom, v in ex["dev_loss"].items():  # per-row sums reproduce the logged per-domain mean
                assert sum(v["loss_sum"]) / sum(v["tokens"]) == pytest.approx(last["dev_loss"][dom], rel=1e-6)
                assert len(v["tokens"]) == {"addition_1": 4, "addition_2": 4, "addition_3": 8}[dom]
            for dom, v in ex["dev_accuracy"].items():
                assert np.mean(v["correct"]) == pytest.approx(last["dev_accuracy"][dom])
                assert v["index"] == [0, 1, 2, 3]
    summ = json.loads((out / "summary.json").read_text())
    (c_acc,) = [c for c in summ["comparisons"] if c["metric"] == "accuracy"]
    (c_dev,) = [c for c in summ["comparisons"] if c["metric"] == "dev_loss"]
    assert (c_dev["policy"], c_dev["baseline"], c_dev["n"]) == ("random", "uniform", 3)
    assert c_dev["bootstrap"] is not None and c_dev["bootstrap"]["n_boot"] == 500
    assert c_acc["p_signflip"] >= 0.25 - 1e-12
    assert summ["arms"]["uniform"]["dev_loss"]["lo"] <= summ["arms"]["uniform"]["dev_loss"]["mean"]
    text = (out / "comparison.md").read_text()
    assert "## Tests (policy − baseline)" in text and "paired t-test over seeds" in text
    # the report again, with another test: nothing reruns, the tests change
    res = subprocess.run(cmd[:-2] + ["--bootstrap", "300", "--test", "signflip", "--report-only"], check=False,
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "6 finished already, 0 to run" in res.stderr, res.stderr[-2000:]
    summ2 = json.loads((out / "summary.json").read_text())
    assert summ2["test"] == "signflip" and all(not c["significant"] for c in summ2["comparisons"])
    assert summ2["arms"] == summ["arms"]


# ---- what a seed pairs (docs/compare.md, "What a seed pairs") ----------------------------------------


def test_same_seed_shares_the_data_order() -> None:
    from mixtrain.sampler import MixtureSampler

    def draws(weights: list[float], seed: int, steps: int = 30) -> tuple[list[int], dict[int, list[int]]]:
        s = MixtureSampler([7, 11, 5], weights, global_batch_size=4, seed=seed)
        doms, per = [], {0: [], 1: [], 2: []}
        for _ in range(steps):
            gb = s.next_global_batch()
            for d, e in zip(gb.domains.tolist(), gb.examples.tolist()):
                doms.append(d)
                per[d].append(e)
        return doms, per

    a_dom, a_ex = draws([1, 1, 1], 0)
    b_dom, b_ex = draws([1, 1, 1], 0)
    c_dom, c_ex = draws([0.2, 0.5, 0.3], 0)
    assert (a_dom, a_ex) == (b_dom, b_ex)  # same weights and seed: identical batches
    for d in range(3):  # other weights, same seed: each domain's examples come in the same order
        n = min(len(a_ex[d]), len(c_ex[d]))
        assert n > 10 and a_ex[d][:n] == c_ex[d][:n]
    # the domain draws are coupled (one uniform per sample, inverse CDF): with CDFs (1/3, 2/3, 1) and
    # (0.2, 0.7, 1) a sample keeps its domain with probability 0.2 + 1/3 + 0.3 = 0.83 (independent: 0.33)
    assert np.mean(np.array(a_dom) == np.array(c_dom)) > 0.7
    assert draws([1, 1, 1], 1)[0] != a_dom  # another seed: another order


def test_lora_adapters_start_the_same_in_every_run(tmp_path: Path) -> None:
    import torch
    import transformers

    from mixtrain.config import from_dict
    from mixtrain.engine import build_model

    src = tmp_path / "dense"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1)).save_pretrained(src)

    def lora(init_seed: int) -> dict[str, torch.Tensor]:
        torch.rand(17)  # whatever the process did before must not matter
        cfg = from_dict({"model": {"name_or_path": str(src), "tokenizer": "byte", "init_seed": init_seed,
                                   "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}},
                         "data": {"builtin": ["math"]}})
        return {k: v.detach().clone() for k, v in build_model(cfg, 259).state_dict().items() if "lora_A" in k}

    first, again, other = lora(0), lora(0), lora(1)
    assert first and all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
