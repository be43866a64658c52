"""GradEx tests: objective oracle, gradient pass vs exact per-example gradients, resume, logreg vs
gradsum, first-order vs an actual forward, selection on planted tasks, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mixtrain.config import ConfigError
from mixtrain.gradex import (
    Lifter,
    SubsetEstimator,
    cluster_examples,
    forward_selection,
    gradex_config,
    gradient_pass,
    greedy,
    logreg_direction,
    per_example_objective,
    random_ensemble,
    random_subset,
    read_store,
    sample_subsets,
    similarity_scores,
    top_fraction,
    top_k,
)
from mixtrain.gradex.gradients import Examples, Stored, collate_rows
from mixtrain.gradex.model import add_to_weights, gradex_modules, trainable_vector

torch.set_num_threads(2)


# ---- objective ------------------------------------------------------------------------------

def _hand_log_odds(probs: list[float]) -> float:
    vals = []
    for p in probs:
        if p > 0.9:
            p -= 0.01
        if p < 0.001:
            p += 0.01
        vals.append(math.log(p / (1 - p)))
    return sum(vals) / len(vals)


def test_objective_matches_hand_computation_with_clamps():
    # 3 positions predict tokens 1..3; gold probabilities chosen to hit both clamps and neither
    target_p = [0.95, 0.0005, 0.4]
    v = 4
    logits = torch.zeros(1, 4, v, dtype=torch.float64)
    labels = torch.tensor([[-100, 1, 2, 3]])
    for t, (p, gold) in enumerate(zip(target_p, [1, 2, 3])):
        # gold logit log p, the other 3 tokens share 1-p
        row = torch.full((v,), math.log((1 - p) / (v - 1)), dtype=torch.float64)
        row[gold] = math.log(p)
        logits[0, t] = row
    f = per_example_objective(logits, labels, "log_odds")
    assert f.item() == pytest.approx(_hand_log_odds(target_p), rel=1e-5)
    nll = per_example_objective(logits, labels, "nll")
    assert nll.item() == pytest.approx(sum(math.log(p) for p in target_p) / 3, rel=1e-5)
    # ignored positions contribute nothing; the clamp is a shift, so dp'/dp = 1 (released in-place shift)
    labels2 = torch.tensor([[-100, 1, -100, 3]])
    assert per_example_objective(logits, labels2).item() == pytest.approx(_hand_log_odds([0.95, 0.4]), rel=1e-5)
    x = logits.clone().requires_grad_(True)
    per_example_objective(x, labels, "log_odds").sum().backward()
    p = 0.95
    # d/dlogit_gold of log(p'/(1-p')) with p' = p - 0.01: (1/p' + 1/(1-p')) * p(1-p), averaged over 3 tokens
    expected = (1 / (p - 0.01) + 1 / (1 - p + 0.01)) * p * (1 - p) / 3
    assert x.grad[0, 0, 1].item() == pytest.approx(expected, rel=1e-5)


def test_objective_bad_input():
    with pytest.raises(ValueError, match="objective must be one of"):
        per_example_objective(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), "mse")
    with pytest.raises(ValueError, match=r"logits must be \[B, T, V\]"):
        per_example_objective(torch.zeros(2, 3), torch.zeros(1, 2, dtype=torch.long))


# ---- a tiny LoRA model and its gradient store ---------------------------------------------------------

def _tiny_lora(seed: int = 0) -> torch.nn.Module:
    import peft
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                       lora_dropout=0.0)).get_base_model()
    with torch.no_grad():  # a non-zero B so every LoRA gradient is non-trivial (as after meta-training)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model.eval()


def _examples(n: int, tasks: list[str], seed: int = 0, id_base: int = 0) -> Examples:
    rng = np.random.default_rng(seed)
    ex = Examples([], [], [])
    for i in range(n):
        t = int(rng.integers(6, 12))
        ids = rng.integers(1, 48, size=t).tolist()
        labels = [-100, -100] + ids[2:]
        ex.ids.append(id_base + i)
        ex.tasks.append(tasks[i % len(tasks)])
        ex.rows.append((ids, labels))
    return ex


def _gcfg(**kw):
    return gradex_config({"target": ["t"], "project_dim": 16, "batch_size": 4, **kw})


def _exact_grads(model, ex: Examples, modules: list[str], objective: str = "log_odds") -> torch.Tensor:
    mods = dict(model.named_modules())
    ws = [mods[n].weight for n in modules]
    out = []
    for row in ex.rows:
        b = collate_rows([row], 0)
        with torch.enable_grad():
            f = per_example_objective(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                      b["labels"], objective)[0]
            gs = torch.autograd.grad(f, ws)
        out.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(out)


def test_gradient_pass_matches_exact_projected_gradients(tmp_path):
    import mixkernels

    model = _tiny_lora()
    modules = gradex_modules(model)
    assert all("lora_" in n for n in modules) and len(modules) == 4
    ex = _examples(10, ["a", "b"])
    g = _gcfg(store_dtype="float32")
    meta = gradient_pass(model, ex, tmp_path / "s", g, pad_token_id=0)
    st = read_store(tmp_path / "s", ex)
    exact = _exact_grads(model, ex, modules)
    R = mixkernels.projection_matrix(exact.shape[1], 16, seed=0)
    np.testing.assert_allclose(st.grads, (exact @ R).double().numpy(), rtol=1e-3, atol=1e-5)
    assert meta["num_params"] == exact.shape[1]
    assert meta["theta_norm"] == pytest.approx(float(trainable_vector(model, modules).norm()), rel=1e-6)
    # base outputs are f(x; θ*) (padding in a batch changes nothing)
    fs = [per_example_objective(model(input_ids=collate_rows([r], 0)["input_ids"]).logits,
                                collate_rows([r], 0)["labels"]).item() for r in ex.rows]
    np.testing.assert_allclose(st.outputs, fs, rtol=1e-4, atol=1e-5)


def test_store_resume_skips_stored_examples_and_refuses_other_seed(tmp_path, monkeypatch):
    model = _tiny_lora()
    ex = _examples(12, ["a", "b", "c"])
    g = _gcfg()
    first = Examples(ex.ids[:5], ex.tasks[:5], ex.rows[:5])  # a "crashed" pass that stored 5 examples
    gradient_pass(model, first, tmp_path / "s", g, 0)
    seen: list[int] = []
    orig = model.forward

    def counting(*a, **k):
        seen.append(int(k["input_ids"].shape[0]))
        return orig(*a, **k)

    monkeypatch.setattr(model, "forward", counting)
    gradient_pass(model, ex, tmp_path / "s", g, 0)
    assert sum(seen) == 7  # only the 7 missing examples were recomputed
    resumed = read_store(tmp_path / "s", ex)
    monkeypatch.setattr(model, "forward", orig)
    gradient_pass(model, ex, tmp_path / "fresh", g, 0)
    fresh = read_store(tmp_path / "fresh", ex)
    np.testing.assert_array_equal(resumed.grads, fresh.grads)
    assert resumed.tasks == fresh.tasks
    with pytest.raises(ConfigError, match="projection seed = 0"):
        gradient_pass(model, ex, tmp_path / "s", _gcfg(projection_seed=1), 0)
    with pytest.raises(ConfigError, match="project_dim: 100000 is larger than the parameter count"):
        gradient_pass(model, ex, tmp_path / "big", _gcfg(project_dim=100000), 0)


@pytest.fixture(scope="module")
def lora_store(tmp_path_factory):
    """A tiny LoRA model with stored train (4 tasks) and target gradients (float32 store)."""
    path = tmp_path_factory.mktemp("gx")
    model = _tiny_lora(1)
    g = _gcfg(project_dim=64, store_dtype="float32")
    train = _examples(48, ["a", "b", "c", "d"], seed=1)
    target = _examples(6, ["t"], seed=2, id_base=1000)
    gradient_pass(model, train, path / "train", g, 0)
    gradient_pass(model, target, path / "target", g, 0)
    return model, read_store(path / "train", train), read_store(path / "target", target), target


def test_logreg_points_along_gradient_sum_on_real_gradients(lora_store):
    _, train, _, _ = lora_store
    rng = np.random.default_rng(0)
    for s in range(5):
        rows = rng.random(len(train.ids)) < 0.5
        x = train.grads[rows]
        w_lr = logreg_direction(x, C=1e-4, seed=s)
        w_sum = x.sum(0)
        cos = w_lr @ w_sum / (np.linalg.norm(w_lr) * np.linalg.norm(w_sum))
        assert cos >= 0.999, cos


def test_subset_estimator_gradsum_equals_logreg_scores(lora_store):
    _, train, target, _ = lora_store
    m = sample_subsets(4, 6, 0.5, 0)
    a = SubsetEstimator(train, target, ["a", "b", "c", "d"], ["t"], estimator="gradsum").score(m)[0]
    b = SubsetEstimator(train, target, ["a", "b", "c", "d"], ["t"], estimator="logreg").score(m)[0]
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_first_order_matches_forward_and_error_shrinks_with_scale(lora_store):
    model, train, target, target_ex = lora_store
    modules = gradex_modules(model)
    m = np.array([[True, False, True, False]])
    errors = []
    for scale in (0.04, 0.01):
        est = SubsetEstimator(train, target, ["a", "b", "c", "d"], ["t"], scale=scale)
        predicted = est.score(m)[1][0, 0] - est.base[0]
        delta = est.deltas(m)[0]
        assert float(delta.norm()) == pytest.approx(scale * train.meta["theta_norm"], rel=1e-4)
        add_to_weights(model, modules, delta)
        try:
            with torch.no_grad():
                b = collate_rows(target_ex.rows, 0)
                actual_f = per_example_objective(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]
                                                       ).logits, b["labels"]).double().mean().item()
        finally:
            add_to_weights(model, modules, -delta)
        actual = actual_f - target.outputs.mean()
        errors.append(abs(predicted - actual) / abs(actual))
    assert errors[0] < 0.1, errors
    assert errors[1] < errors[0], errors


def test_lifter_gram_matches_materialised_projection():
    import mixkernels

    meta = {"projection": "sjlt", "dim": 12, "num_params": 300, "projection_seed": 3}
    lifter = Lifter(meta)
    R = mixkernels.projection_matrix(300, 12, seed=3, kind="sjlt").double().numpy()
    np.testing.assert_allclose(lifter.gram(), R.T @ R, rtol=1e-5, atol=1e-6)
    w = np.random.default_rng(0).normal(size=(3, 12))
    np.testing.assert_allclose(lifter.lift(w).double().numpy(), w @ R.T, rtol=1e-4, atol=1e-5)


# ---- selection on planted tasks -------------------------------------------------------------------

def _planted(k: int = 24, seed: int = 0):
    """Tasks 0..7; helpful = {1, 4, 6} (grads along the target gradient), harmful = {0, 3}
    (against it), the rest noise orthogonal-ish."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=k)
    u /= np.linalg.norm(u)
    kinds = {1: 1.0, 4: 1.0, 6: 1.0, 0: -1.0, 3: -1.0}
    grads, tasks = [], []
    for t in range(8):
        for _ in range(20):
            grads.append(kinds.get(t, 0.0) * u * 2 + rng.normal(size=k) * 1.0)
            tasks.append(f"task{t}")
    meta = {"projection": "rademacher", "dim": k, "num_params": 400, "projection_seed": 0, "theta_norm": 10.0}
    train = Stored(np.arange(160), tasks, np.array(grads), np.zeros(160), meta)
    tgt = u[None] + rng.normal(size=(5, k)) * 0.05
    target = Stored(np.arange(5), ["t"] * 5, tgt, np.full(5, -1.0), meta)
    return SubsetEstimator(train, target, [f"task{t}" for t in range(8)], ["t"])


def test_selection_picks_planted_helpful_tasks():
    est = _planted()
    m = sample_subsets(8, 400, 0.5, 0)
    r = est.run(m)
    chosen, scores = random_ensemble(r.membership, r.scores, 3 / 8)
    assert set(chosen.tolist()) == {1, 4, 6}
    assert scores[[1, 4, 6]].min() > scores[[0, 3]].max()
    g_sel, trace = greedy(8, lambda mm: est.score(mm)[0])
    assert {1, 4, 6} <= set(g_sel.tolist()) and not {0, 3} & set(g_sel.tolist())
    assert trace == sorted(trace)
    f_sel, _ = forward_selection(8, lambda mm: est.score(mm)[0])
    assert {1, 4, 6} <= set(f_sel.tolist()) and 3 not in f_sel.tolist()


def test_cluster_examples_recovers_gradient_directions():
    rng = np.random.default_rng(0)
    dirs = np.eye(6)[:3] * 5
    x = np.concatenate([d + rng.normal(size=(10, 6)) * 0.2 for d in dirs])
    labels = cluster_examples(x, 3)
    for k in range(3):
        assert len(set(labels[k * 10:(k + 1) * 10].tolist())) == 1
    assert len(set(labels.tolist())) == 3


def test_estimation_of_1000_subsets_is_fast():
    import time

    est = _planted()
    m = sample_subsets(8, 1000, 0.5, 1)
    est.lifter.gram()  # one-time setup (cached beside the store in the pipeline)
    t = time.perf_counter()
    est.run(m)
    assert time.perf_counter() - t < 0.5


# ---- config / bad input ---------------------------------------------------------------------------

def test_gradex_config_errors():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['projdim'\] in section 'gradex'"):
        gradex_config({"target": ["x"], "projdim": 3})
    with pytest.raises(ConfigError, match="gradex.target: no target"):
        gradex_config({})
    with pytest.raises(ConfigError, match="gradex.estimator: got 'ols'"):
        gradex_config({"target": ["x"], "estimator": "ols"})
    with pytest.raises(ConfigError, match="gradex.subset_size: got 1.5"):
        gradex_config({"target": ["x"], "subset_size": 1.5})


def test_task_data_errors():
    from mixtrain.config import from_dict
    from mixtrain.gradex import load_task_data

    base = {"model": {"config": {"model_type": "llama"}}, "data": {"builtin": ["lego_1", "addition_1"],
                                                                   "builtin_size": 12}}
    cfg = from_dict({**base, "data": {**base["data"], "dev_fraction": 0.0}})
    with pytest.raises(ConfigError, match="target 'addition_1' has no dev data"):
        load_task_data(cfg, gradex_config({"target": ["addition_1"]}))
    cfg = from_dict(base)
    with pytest.raises(ConfigError, match="'nope' is not a configured domain"):
        load_task_data(cfg, gradex_config({"target": ["nope"]}))
    cfg = from_dict({**base, "data": {**base["data"], "max_length": 4}})
    with pytest.raises(ConfigError, match="task 'lego_1' has no examples"):
        load_task_data(cfg, gradex_config({"target": ["addition_1"]}))
    with pytest.raises(ConfigError, match=r"task\(s\) \['z'\] have no examples"):
        from mixtrain.gradex import task_sums

        task_sums(Stored(np.arange(2), ["a", "a"], np.ones((2, 3)), np.zeros(2), {}), ["a", "z"])


def test_similarity_selection_by_hand() -> None:
    """Cosine of each task's mean projected gradient with the target's mean (two target domains
    averaged); an empty task is NaN and never selected before a real one."""
    sums = np.array([[2.0, 0.0], [0.0, 3.0], [3.0, 3.0], [0.0, 0.0]])
    counts = np.array([2, 3, 1, 0])
    target = np.array([[1.0, 0.0], [1.0, 2.0]])  # mean [1, 1]
    sim = similarity_scores(sums, counts, target)
    r = 1 / math.sqrt(2)
    assert sim[:3] == pytest.approx([r, r, 1.0]) and math.isnan(sim[3])
    assert top_fraction(sim, 0.5).tolist() == [2, 0]  # ties keep index order
    assert top_fraction(sim, 1.0).tolist()[-1] == 3
    assert top_k(np.arange(7.0), 3).tolist() == [6, 5, 4]  # exactly k (ceil(3 / 7 * 7) would be 4)
    pick = random_subset(8, 3, seed=5)
    assert len(set(pick.tolist())) == 3 and pick.tolist() == sorted(pick.tolist()) and pick.max() < 8
    assert random_subset(8, 3, seed=5).tolist() == pick.tolist()
