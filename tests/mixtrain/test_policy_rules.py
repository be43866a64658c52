"""The update rules of the dynamic policies against hand computations from their equations.

Every oracle below is written out in plain Python ``math`` from the published equations /
SEEDS.md (never by calling the code under test), including the edge cases: one domain, equal
rewards, a zero-count domain, NaN guarded with a clear error.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml

from mixtrain import policies
from mixtrain.policies import doremi, dynamic_moe, mos, odm, skillit
from mixtrain.policies.base import PolicyContext


def _norm(v):
    s = sum(v)
    return [x / s for x in v]


def _softmax(v):
    m = max(v)
    e = [math.exp(x - m) for x in v]
    return _norm(e)


def close(a, b, tol=1e-12):
    a = [float(x) for x in a]
    assert len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b)), (a, b)


# ---------------------------------------------------------------------------------------------
# dynamic_moe
# ---------------------------------------------------------------------------------------------
COUNTS = [[2, 2, 0], [2, 2, 0], [0, 0, 4]]  # Ô = [.5,.5,0], [.5,.5,0], [0,0,1]
R15 = math.sqrt(0.25 + 0.25 + 1.0)  # ‖Ô0 − Ô2‖₂


def _moe_oracle(prev, delta, eta, c):
    a = _norm([w * math.exp(eta * d) for w, d in zip(prev, delta)])
    n = len(prev)
    return _norm([(1 - c) * x + c / n for x in a])


@pytest.mark.parametrize("distance, criterion, delta", [
    ("l2", "mean", [R15 / 3, R15 / 3, 2 * R15 / 3]),   # mean over j including i (δii = 0)
    ("cos", "mean", [1 / 3, 1 / 3, 2 / 3]),             # 1 − cos: cos(Ô0,Ô1)=1, cos(·,Ô2)=0
    ("l2", "min", [0.0, 0.0, R15]),                     # min over j ≠ i
    ("l2", "max", [R15, R15, R15]),
])
def test_dynamic_moe_rule(distance, criterion, delta):
    prev = [0.5, 0.3, 0.2]
    got = dynamic_moe.update_weights(prev, COUNTS, eta=10.0, c=0.05, distance=distance, criterion=criterion)
    close(got, _moe_oracle(prev, delta, 10.0, 0.05))


def test_dynamic_moe_literal_and_cumulative():
    # by hand: Δ = [.408248, .408248, .816497]; a ∝ [.5, .3, .2·e^4.08248 = 11.857] → a₂ = .93679; .95·a₂ + .05/3 = .906628
    w1 = dynamic_moe.update_weights([0.5, 0.3, 0.2], COUNTS)
    assert abs(float(w1[2]) - 0.906628) < 1e-6 and abs(float(w1.sum()) - 1) < 1e-15
    # cumulative: the second update starts from w1, not from the first weights
    w2 = dynamic_moe.update_weights(w1, COUNTS)
    close(w2, _moe_oracle([float(x) for x in w1], [R15 / 3, R15 / 3, 2 * R15 / 3], 10.0, 0.05))
    # every weight stays >= c/|D| after smoothing
    assert float(w2.min()) >= 0.05 / 3 - 1e-15


def test_dynamic_moe_edges():
    close(dynamic_moe.update_weights([1.0], [[5, 3]]), [1.0])                      # one domain
    close(dynamic_moe.update_weights([0.2, 0.8], [[1, 3], [2, 6]]), [0.2 * 0.95 + 0.025, 0.8 * 0.95 + 0.025])  # equal Ô
    close(dynamic_moe.update_weights([0.5, 0.5], [[0, 4], [0, 4]]), [0.5, 0.5])   # zero-count expert is fine
    with pytest.raises(ValueError, match=r"expert_counts: row 1 \(domain 1\) sums to 0"):
        dynamic_moe.update_weights([0.5, 0.5], [[1, 2], [0, 0]])                   # zero-count domain
    with pytest.raises(ValueError, match=r"expert_counts: entry \(0, 1\) is nan"):
        dynamic_moe.update_weights([0.5, 0.5], [[1, float("nan")], [1, 1]])
    with pytest.raises(ValueError, match="prev_weights: got 3 values, expected 2"):
        dynamic_moe.update_weights([0.3, 0.3, 0.4], [[1, 2], [2, 1]])
    with pytest.raises(ValueError, match="distance: got 'manhattan', expected one of l2, cos"):
        dynamic_moe.update_weights([0.5, 0.5], [[1, 2], [2, 1]], distance="manhattan")
    with pytest.raises(ValueError, match="c: got 2"):
        dynamic_moe.update_weights([0.5, 0.5], [[1, 2], [2, 1]], c=2)


def test_freeze_router_vs_faithful():
    import transformers

    cfg = transformers.AutoConfig.for_model(
        "qwen2_moe", vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        num_experts=4, num_experts_per_tok=2)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    assert dynamic_moe.router_parameters(model) == ["model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight"]
    faithful = dynamic_moe.gate_parameters(model)
    assert "model.layers.0.mlp.experts.gate_up_proj" in faithful and "model.layers.0.mlp.shared_expert_gate.weight" in faithful
    pol = policies.get("dynamic_moe", freeze_router=True)
    pol.prepare_model(model)
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    assert frozen == dynamic_moe.router_parameters(model)
    with pytest.raises(ValueError, match="exclusive"):
        policies.get("dynamic_moe", freeze_router=True, freeze_gate_faithful=True)


# ---------------------------------------------------------------------------------------------
# skillit
# ---------------------------------------------------------------------------------------------
G = [[1, 1, 0], [0, 1, 1], [0, 0, 1]]  # chain; off-diagonal 1 → 0.5
H = [[1.0, 2.0, 3.0], [2.0, 2.0, 2.0], [3.0, 1.0, 1.0], [1.0, 1.0, 1.0]]


def test_skillit_initial_mixture_not_uniform():
    # A = [[1,.5,0],[0,1,.5],[0,0,1]], A·1 = [1.5, 1.5, 1]; p0 ∝ w_init ⊙ exp(η A 1)
    close(skillit.mixture([1, 1, 1], G, [], eta=0.5), _softmax([0.75, 0.75, 0.5]))
    close(skillit.mixture([1, 2, 1], G, [], eta=0.5), _norm([math.exp(0.75), 2 * math.exp(0.75), math.exp(0.5)]))


def test_skillit_window_sum_not_cumulative():
    # Λ = H[1] + H[2] + H[3] = [6, 4, 4]; AΛ = [6 + 2, 4 + 2, 4] = [8, 6, 4]
    close(skillit.mixture([1, 1, 1], G, H, eta=0.5), _softmax([4.0, 3.0, 2.0]))
    # windowed: the oldest evaluation does not matter; recomputed from w_init each time
    close(skillit.mixture([1, 1, 1], G, H[1:], eta=0.5), _softmax([4.0, 3.0, 2.0]))
    close(skillit.mixture([1, 1, 1], G, H, eta=0.5, window=1), _softmax([0.5 * 1.5, 0.5 * 1.5, 0.5]))


def test_skillit_target_mask_mean_and_options():
    # target cols 1,2: A' = [[.5,0],[1,.5],[0,1]]; Λ = mean of last 3 of cols 1,2 = [4/3, 4/3]
    lam = [4 / 3, 4 / 3]
    a = [[0.5, 0.0], [1.0, 0.5], [0.0, 1.0]]
    al = [sum(r[j] * lam[j] for j in range(2)) for r in a]
    close(skillit.mixture([1, 1, 1], G, H, eta=0.5, target_mask=[0, 1, 1]), _softmax([0.5 * x for x in al]))
    # initial mixture with a mask: 1 has one entry per target
    close(skillit.mixture([1, 1, 1], G, [], eta=0.5, target_mask=[0, 1, 1]), _softmax([0.25, 0.75, 0.5]))
    # normalize_loss: L0 = the SECOND evaluation H[1] = [2,2,2] → Λ/L0 = [3,2,2] → AΛ = [4,3,2]
    close(skillit.mixture([1, 1, 1], G, H, eta=0.5, normalize_loss=True), _softmax([2.0, 1.5, 1.0]))
    # eta_schedule: η_t = η / (ΣL_last / ΣL0) = 0.5 / (3/6) = 1
    close(skillit.mixture([1, 1, 1], G, H, eta=0.5, eta_schedule=True), _softmax([8.0, 6.0, 4.0]))


def test_skillit_graph_rule_and_lone_nodes():
    a = skillit.prepare_graph([[1, 1, 0.999], [1, 1, -0.4]])  # rectangular; only exact off-diagonal 1s
    assert a.tolist() == [[1.0, 0.5, 0.999], [0.5, 1.0, -0.4]]
    g = [[1, 1, 0], [0, 1, 0], [0, 0, 1]]  # node 2 is lone; prepared A = [[1,.5,0],[0,1,0],[0,0,1]]
    # lone node pinned at 1/3; others share 2/3 by MW on the sub-graph [[1,.5],[0,1]] with Λ = H[1..3][:2]
    lam = [6.0, 4.0]
    sub = [1 * lam[0] + 0.5 * lam[1], lam[1]]
    p = _softmax([0.5 * x for x in sub])
    close(skillit.mixture([1, 1, 1], g, H, eta=0.5, ignore_lone_nodes=True), [2 / 3 * p[0], 2 / 3 * p[1], 1 / 3])
    close(skillit.mixture([1, 1, 1], g, [], eta=0.5, ignore_lone_nodes=True),
          [2 / 3 * x for x in _softmax([0.75, 0.5])] + [1 / 3])


def test_skillit_edges_and_errors():
    close(skillit.mixture([1], [[1]], [[2.0]], eta=0.5), [1.0])                      # one skill
    close(skillit.mixture([1, 1], [[1, 1], [1, 1]], [[1.0, 1.0]], eta=0.5), [0.5, 0.5])  # equal
    with pytest.raises(ValueError, match=r"loss_history\[1\]: entry 0 is nan"):
        skillit.mixture([1, 1, 1], G, [H[0], [float("nan"), 1, 1]], eta=0.5)
    with pytest.raises(ValueError, match="loss_history\\[0\\]: got 2 values, expected 3"):
        skillit.mixture([1, 1, 1], G, [[1.0, 2.0]], eta=0.5)
    with pytest.raises(ValueError, match="target_mask: selects no eval skill"):
        skillit.mixture([1, 1, 1], G, [], eta=0.5, target_mask=[0, 0, 0])
    with pytest.raises(ValueError, match="w_init: got 2 values, expected 3"):
        skillit.mixture([1, 1], G, [], eta=0.5)


def test_skillit_graph_files(tmp_path):
    g = np.array([[1.0, 0.2], [0.7, 1.0]])
    np.save(tmp_path / "g.npy", g)
    (tmp_path / "g.json").write_text(json.dumps({"skills": ["b", "a"], "graph": [[1.0, 0.7], [0.2, 1.0]]}))
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(g.tolist()))
    assert skillit.load_graph(tmp_path / "g.npy").tolist() == g.tolist()
    assert skillit.load_graph(tmp_path / "g.yaml").tolist() == g.tolist()
    assert skillit.load_graph(str(tmp_path / "g.json"), ["a", "b"]).tolist() == g.tolist()  # reordered
    with pytest.raises(ValueError, match="does not exist"):
        skillit.load_graph(tmp_path / "nope.npy")
    with pytest.raises(ValueError, match=r"skills \['c'\] of this run are not in the graph's skills"):
        skillit.load_graph(str(tmp_path / "g.json"), ["a", "c"])


def test_skillit_policy_cadence_and_l0():
    pol = policies.get("skillit", graph=G, eta=0.5, update_every=4, eval_every=2)
    assert pol.update_every == 2 and pol.mixture_every == 4           # the loop calls every evaluation
    pol.update_every = 6                                              # config override → mixture cadence
    assert pol.mixture_every == 6 and pol.update_every == 2
    w0 = pol.initial_weights({"a": 10, "b": 10, "c": 10})
    close(w0, _softmax([0.75, 0.75, 0.5]))

    class S:
        domain_names = ("a", "b", "c")

        def __init__(self, v):
            self.dev_domain_loss = np.array(v)

    assert pol.update(2, S(H[0])) is None and pol.update(4, S(H[1])) is None
    got = pol.update(6, S(H[2]))
    close(got, skillit.mixture([1, 1, 1], G, H[:3], eta=0.5).tolist())
    assert pol.loss_0 == H[1]                                          # L0 from the 2nd evaluation
    with pytest.raises(ValueError, match=r"dev loss of domain\(s\) \['b'\] is not finite"):
        pol.update(8, S([1.0, float("nan"), 1.0]))
    with pytest.raises(ValueError, match="must be a multiple of eval_every"):
        policies.get("skillit", update_every=5, eval_every=2).initial_weights([1, 1])


# ---------------------------------------------------------------------------------------------
# doremi
# ---------------------------------------------------------------------------------------------
def test_doremi_rule():
    # λ = max(ℓ − ℓref, 0) = [0.5, 0, 2]; log w += η λ; w ← (1 − c) w/Σw + c/|D|
    a = _norm([0.5 * math.exp(0.5), 0.3, 0.2 * math.exp(2.0)])
    c = 1e-3
    close(doremi.update_weights([0.5, 0.3, 0.2], [2.0, 1.0, 3.0], [1.5, 1.5, 1.0]), [(1 - c) * x + c / 3 for x in a])
    a = _norm([0.5 * math.exp(2 * 0.5), 0.3, 0.2 * math.exp(2 * 2.0)])
    close(doremi.update_weights([0.5, 0.3, 0.2], [2.0, 1.0, 3.0], [1.5, 1.5, 1.0], eta=2.0, c=0.1),
          [0.9 * x + 0.1 / 3 for x in a])


def test_doremi_edges():
    close(doremi.update_weights([1.0], [3.0], [1.0]), [1.0])
    close(doremi.update_weights([0.25, 0.75], [1.0, 1.0], [2.0, 2.0]), [0.999 * 0.25 + 0.0005, 0.999 * 0.75 + 0.0005])
    # zero-count domain (NaN loss: not sampled in the interval) gets no excess
    a = _norm([0.5 * math.exp(1.0), 0.5])
    close(doremi.update_weights([0.5, 0.5], [2.0, float("nan")], [1.0, 0.0]), [0.999 * x + 0.0005 for x in a])
    with pytest.raises(ValueError, match="ref_loss: entry 1 is nan"):
        doremi.update_weights([0.5, 0.5], [1.0, 1.0], [1.0, float("nan")])
    with pytest.raises(ValueError, match="domain_loss: entry 0 is inf"):
        doremi.update_weights([0.5, 0.5], [float("inf"), 1.0], [1.0, 1.0])


def test_doremi_average_weights_and_state(tmp_path):
    pol = policies.get("doremi", ref_losses={"a": 1.0, "b": 2.0}, update_every=2)
    pol.setup(PolicyContext(domain_names=["a", "b"], domain_sizes=[5, 5]))
    w0 = pol.initial_weights({"a": 5, "b": 5})

    class S:
        train_domain_loss = np.array([3.0, 2.0])

    w1 = pol.update(2, S())
    state = json.loads(json.dumps(pol.state_dict()))
    # steps 1-2 used w0, steps 3-5 used w1 → step-weighted average over 5 steps
    close(pol.average_weights(5), [(2 * w0[i] + 3 * w1[i]) / 5 for i in range(2)])
    pol2 = policies.get("doremi", ref_losses={"a": 1.0, "b": 2.0}, update_every=2)
    pol2.load_state_dict(state)
    assert pol2.average_weights(5).tolist() == pol.average_weights(5).tolist()
    pol.on_train_end(tmp_path, 5)
    out = json.loads((tmp_path / "average_weights.json").read_text())
    assert out["average_weights"] == dict(zip(["a", "b"], pol.average_weights(5).tolist()))


# ---------------------------------------------------------------------------------------------
# odm
# ---------------------------------------------------------------------------------------------
def _odm_pi(r, eps_prev, eps):
    k = len(r)
    return [(1 - k * eps) * x + eps for x in _softmax([eps_prev * v for v in r])]


def test_odm_epsilon_and_first_steps_uniform():
    k = 3
    assert odm.epsilon(k, 1) == 1 / 3 and odm.epsilon(k, 3) == 1 / 3      # √(ln3/9) > 1/3
    assert odm.epsilon(k, 4) == math.sqrt(math.log(3) / 12)
    s = odm.init_state(3)
    s, w = odm.update(s, [2.0, 1.0, 3.0], [True, True, True], 1)
    close(w, [1 / 3] * 3)                                                    # 1 − Kε₁ = 0
    close(s.rewards, [0.1 * 2.0 * 3, 0.1 * 1.0 * 3, 0.1 * 3.0 * 3])        # (1 − α) L/π, π = 1/3


@pytest.mark.parametrize("mode, scale, r_expect", [
    ("smoothed_mean", 1.0, [0.9 * 1 + 0.1 * 2.0 / 0.2, 2.0, 0.9 * 3 + 0.1 * 1.0 / 0.5]),
    ("exp3", 1.0, [1 + 2.0 / 0.2, 2.0, 3 + 1.0 / 0.5]),
    ("exp3", 0.1, [1 + 0.2 / 0.2, 2.0, 3 + 0.1 / 0.5]),                   # released loss/10
])
def test_odm_rule(mode, scale, r_expect):
    st = odm.ODMState(rewards=[1.0, 2.0, 3.0], weights=[0.2, 0.3, 0.5], eps=0.1, mode=mode, smoothing=0.9,
                      reward_scale=scale)
    # domain 1 unseen (zero count): its loss is NaN and its R̂ is unchanged
    new, w = odm.update(st, [2.0, float("nan"), 1.0], [True, False, True], 10)
    close(new.rewards, r_expect)
    eps = math.sqrt(math.log(3) / 30)
    close(w, _odm_pi(r_expect, 0.1, eps))
    assert new.eps == eps and st.rewards == [1.0, 2.0, 3.0]                # input state untouched


def test_odm_edges():
    s, w = odm.update(odm.init_state(1), [2.0], [True], 5)
    close(w, [1.0])                                                          # ln 1 = 0 → ε = 0
    s = odm.init_state(2, warmup_steps=3)
    s2, w = odm.update(s, [5.0, 1.0], [True, True], 3)
    assert s2 is s and w.tolist() == [0.5, 0.5]                              # warm-up: bandit untouched
    with pytest.raises(ValueError, match="domain_loss: entry 0 is nan for a seen domain"):
        odm.update(odm.init_state(2), [float("nan"), 1.0], [True, True], 4)
    with pytest.raises(ValueError, match="seen_mask: got 1 values, expected 2"):
        odm.update(odm.init_state(2), [1.0, 1.0], [True], 4)
    with pytest.raises(ValueError, match="mode: got 'ucb'"):
        policies.get("odm", mode="ucb")
    # equal losses and equal R̂ keep uniform weights
    st = odm.ODMState([0.5, 0.5], [0.5, 0.5], 0.2)
    close(odm.update(st, [1.0, 1.0], [True, True], 50)[1], [0.5, 0.5])


# ---------------------------------------------------------------------------------------------
# mos
# ---------------------------------------------------------------------------------------------
class NumpyAdam:
    """Adam from its equations (Kingma & Ba), torch's defaults: β = (0.9, 0.999), ε = 1e-8."""

    def __init__(self, x, lr):
        self.x, self.lr, self.m, self.v, self.t = list(x), lr, [0.0] * len(x), [0.0] * len(x), 0

    def step(self, g):
        self.t += 1
        for i, gi in enumerate(g):
            self.m[i] = 0.9 * self.m[i] + 0.1 * gi
            self.v[i] = 0.999 * self.v[i] + 0.001 * gi * gi
            mh = self.m[i] / (1 - 0.9 ** self.t)
            vh = self.v[i] / (1 - 0.999 ** self.t)
            self.x[i] -= self.lr * mh / (math.sqrt(vh) + 1e-8)


def test_mos_prior_and_prefit():
    close(mos.temperature_prior([100, 400, 25], 2.0), _norm([(n / 525) ** 0.5 for n in (100, 400, 25)]))
    close(mos.temperature_prior([1, 3], float("inf")), [0.5, 0.5])
    pol = policies.get("mos", temperature=1.0)
    w = pol.initial_weights({"a": 9, "b": 11})
    assert np.mean((w - np.array([0.45, 0.55])) ** 2) < 1e-10 and pol.fit_steps > 100
    uni = policies.get("mos")
    close(uni.initial_weights([5, 7, 9]), [1 / 3] * 3)
    assert uni.fit_steps == 1 and uni.scorer.opt.state[uni.scorer.params[0]]["step"] == 1  # one no-op step


def test_mos_apply_rewards_matches_adam_oracle():
    pol = policies.get("mos", use_ema=True, ema_alpha=0.9)
    pol.initial_weights([4, 4, 4])
    oracle = NumpyAdam([1.0, 1.0, 1.0], 1e-4)
    oracle.step([0.0, 0.0, 0.0])                      # the pre-fit's no-op step counts for Adam
    rbar = [1.0, 1.0, 1.0]
    for rewards in ([0.95, 0.85, 0.80], [0.5, 1.2, 0.7]):  # no component at the gradient's zero
        rbar = [0.9 * r + 0.1 * b for r, b in zip(rewards, rbar)]   # EMA init 1, α on the new reward
        for _ in range(200):                           # 200 persistent-Adam steps on −Σ R log softmax(w)
            p = _softmax(oracle.x)
            oracle.step([-(r - pi * sum(rbar)) for r, pi in zip(rbar, p)])
        got = pol.apply_rewards(torch.tensor(rewards, dtype=torch.float64))
        close(got, _softmax(oracle.x), tol=1e-12)
        close(pol.last_rewards, rbar, tol=1e-15)


def test_mos_converges_to_normalised_reward_at_a_limited_rate():
    pol = policies.get("mos", use_ema=False)
    pol.initial_weights([1, 1, 1, 1])
    r = [0.95, 0.85, 0.90, 0.80]
    w = pol.apply_rewards(r)
    assert float((w - 0.25).abs().max()) < 0.25 * 0.021          # ≤ ~lr·200 nats per logit per update
    for _ in range(14):
        w = pol.apply_rewards(r)
    close(w, _norm(r), tol=5e-5)                                   # minimiser p = R / ΣR


def test_mos_edges_and_reinforce():
    one = policies.get("mos")
    one.initial_weights([3])
    close(one.apply_rewards([0.7]), [1.0])                         # one domain
    eq = policies.get("mos")
    eq.initial_weights([3, 3, 3])
    assert eq.apply_rewards([0.9, 0.9, 0.9]).tolist() == [1 / 3] * 3   # equal rewards: gradient 0 exactly
    with pytest.raises(ValueError, match="rewards: entry 1 is nan"):
        eq.apply_rewards([0.9, float("nan"), 0.9])
    with pytest.raises(ValueError, match="rewards: got 2 values, expected 3"):
        eq.apply_rewards([0.9, 0.9])
    # one REINFORCE step: w ← w + γ (R − p ΣR) for the logit scorer (p uniform here)
    rf = policies.get("mos", update_rule="reinforce", reinforce_lr=0.5, use_ema=False)
    rf.initial_weights([2, 2])
    r = [1.0, 0.2]
    w = [1 + 0.5 * (r[0] - 0.5 * 1.2), 1 + 0.5 * (r[1] - 0.5 * 1.2)]
    close(rf.apply_rewards(r), _softmax(w))
    with pytest.raises(ValueError, match="reward: got 'learn', expected 'cossim' or 'diff'"):
        policies.get("mos", reward="learn")


@pytest.mark.parametrize("scorer", ["logits", "mlp"])
def test_mos_state_roundtrip_bit_exact(scorer):
    a = policies.get("mos", scorer=scorer, use_ema=True)
    a.initial_weights([2, 3, 4])
    a.apply_rewards([0.9, 0.7, 0.8])
    state = json.loads(json.dumps(a.state_dict()))
    b = policies.get("mos", scorer=scorer, use_ema=True)
    b.initial_weights([2, 3, 4])
    b.load_state_dict(state)
    for r in ([0.6, 0.9, 0.8], [1.0, 0.5, 0.7]):
        assert a.apply_rewards(r).tolist() == b.apply_rewards(r).tolist()
    wa = a.scorer.probs()
    assert abs(float(wa.sum()) - 1) < 1e-15 and (scorer == "logits" or float(wa[0]) != 1 / 3)


def _fake_ctx(sizes, emb=None, losses=None):
    """A context whose 'model' returns fixed embeddings / losses per domain (row 0 of each domain
    may be made NaN), so rewards can be computed by hand."""
    names = [f"d{i}" for i in range(len(sizes))]

    def batches(d, idx, split="train"):
        b = len(idx)
        ids = torch.tensor([[d * 1000 + int(i), 7, 8, 9] for i in idx])
        return {"input_ids": ids, "attention_mask": torch.ones(b, 4, dtype=torch.long),
                "labels": torch.tensor([[-100, -100, 8, 9]] * b), "domain_ids": torch.full((b,), d)}

    def forward_hidden(batch):
        d, i = divmod(int(batch["input_ids"][0, 0]), 1000)
        e = torch.tensor(emb[d], dtype=torch.float64)
        if i == 0:
            e = e * float("nan")
        return e.expand(1, 4, -1)

    def forward_losses(batch):
        assert bool((batch["labels"] != -100).all())           # whole-sequence PPL by default
        return torch.tensor([losses["now"][int(x) // 1000] for x in batch["input_ids"][:, 0]])

    return PolicyContext(domain_names=names, domain_sizes=list(sizes), model=object(), batches=batches,
                         forward_hidden=forward_hidden, forward_losses=forward_losses, seed=3)


def test_mos_cossim_rewards_by_hand():
    emb = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    c = 1 / math.sqrt(2)
    pol = policies.get("mos", cossim_examples=8)
    pol.setup(_fake_ctx([3, 3, 3], emb=emb))
    # R_i = (1/N) Σ_j cos(z_i, z_j) including j = i; NaN embeddings (row 0) are skipped
    close(pol.cossim_rewards(5), [(1 + 0 + c) / 3, (0 + 1 + c) / 3, (c + c + 1) / 3], tol=1e-12)
    spec = policies.get("mos", cossim_examples=8, specialist="d2")
    spec.setup(_fake_ctx([3, 3, 3], emb=emb))
    close(spec.cossim_rewards(5), [c, c, 1.0], tol=1e-12)           # MoSpec: cos(z_i, z_s)
    nan = policies.get("mos", cossim_examples=4)
    nan.setup(_fake_ctx([1, 3], emb=[[1.0, 0.0], [0.0, 1.0]]))     # domain 0 has only the NaN row
    with pytest.raises(ValueError, match="every embedding of domain 'd0' was NaN"):
        nan.cossim_rewards(1)
    with pytest.raises(ValueError, match="specialist: got 'zz', expected one of the domains"):
        policies.get("mos", specialist="zz").setup(_fake_ctx([1, 1], emb=emb))


def test_mos_diff_rewards_by_hand():
    losses = {"now": [1.0, 2.0]}
    ctx = _fake_ctx([5, 300], losses=losses)
    pol = policies.get("mos", reward="diff", diff_pool_size=256, diff_examples=16)
    pol.setup(ctx)                                                  # PPL_θ0 measured once, here
    assert [len(p) for p in pol.pool] == [5, 256]
    close(pol.pool_ppl[0], [math.e] * 5)
    losses["now"] = [1.5, 1.0]
    close(pol.diff_rewards(10), [math.exp(0.5), math.exp(-1.0)])   # mean PPL_θ / PPL_θ0
    spec = policies.get("mos", reward="diff", specialist="d1")
    losses["now"] = [1.0, 2.0]
    spec.setup(_fake_ctx([5, 300], losses=losses))
    losses["now"] = [1.5, 1.0]
    close(spec.diff_rewards(10), [math.exp(0.5), 2 * math.exp(-1.0)])  # specialist doubled


def test_all_policies_registered():
    for name in ("mos", "dynamic_moe", "skillit", "doremi", "odm"):
        assert policies.get(name).name == name
        assert name in policies.available()
    assert policies.get("odm").required_signals == frozenset({"train_domain_loss"})
    assert policies.get("mos").required_signals == frozenset()
    assert policies.get("skillit").required_signals == frozenset({"dev_domain_loss"})


def test_doremi_reference_losses_start_and_checkpoint(tmp_path):
    import transformers

    # "start": token-weighted mean over the fixed pool of the per-example losses forward_losses gives
    lab = {0: torch.tensor([[-100, 5, 6, -100]]), 1: torch.tensor([[-100, 5, 6, 7]])}  # 2 and 3 label tokens

    def batches(d, idx, split="train"):
        b = len(idx)
        return {"input_ids": torch.full((b, 4), 3), "attention_mask": torch.ones(b, 4, dtype=torch.long),
                "labels": lab[d].expand(b, 4).clone(), "domain_ids": torch.full((b,), d)}

    per_row = {0: 1.5, 1: 0.5}
    ctx = PolicyContext(domain_names=["a", "b"], domain_sizes=[3, 5], model=object(), batches=batches,
                        forward_losses=lambda b: torch.full((b["input_ids"].shape[0],), per_row[int(b["domain_ids"][0])]))
    pol = policies.get("doremi", ref_pool_size=4, ref_batch_size=3)
    pol.setup(ctx)
    close(pol.ref_loss, [1.5, 0.5])
    # a reference checkpoint: the losses are that model's mean token NLL on the same pool
    cfg = transformers.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg)
    ref.save_pretrained(tmp_path / "ref")
    ctx.model = ref
    pol = policies.get("doremi", reference=str(tmp_path / "ref"), ref_pool_size=2)
    pol.setup(ctx)
    with torch.no_grad():
        logits = ref(input_ids=torch.full((1, 4), 3)).logits[0, :-1]
    nll = -torch.log_softmax(logits.double(), -1)
    close(pol.ref_loss, [float(nll[1, 6] + nll[0, 5]) / 2, float(nll[0, 5] + nll[1, 6] + nll[2, 7]) / 3], tol=1e-5)
    with pytest.raises(ValueError, match="neither 'start' nor an existing checkpoint directory"):
        policies.get("doremi", reference=str(tmp_path / "missing"))


@pytest.mark.parametrize("name", ["mos", "skillit", "dynamic_moe", "doremi", "odm"])
def test_shipped_configs_parse_and_build_their_policy(name):
    from pathlib import Path

    from mixtrain.config import demo_config, from_dict, load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / f"{name}.yaml")
    assert cfg.mixing.policy == name
    pol = policies.get(cfg.mixing.policy, **cfg.mixing.params)
    pol.update_every = cfg.mixing.update_every
    assert pol.name == name
    demo = from_dict(demo_config())
    assert demo.mixing.policy == "mos" and demo.mixing.params["reward"] == "diff" and demo.mixing.params["use_ema"]


@pytest.mark.parametrize("include_padding", [False, True])
@pytest.mark.parametrize("layers, n_layers", [("last", 1), ("all", 2)])
def test_dynamic_moe_probe_counts_tokens(include_padding, layers, n_layers):
    """The probe counts top_k assignments per real token (pads only with include_padding) of the
    chosen layers over the first probe_batches × probe_batch_size dev rows of every domain."""
    import transformers

    from mixtrain.data.collate import collate

    cfg = transformers.AutoConfig.for_model(
        "qwen2_moe", vocab_size=32, hidden_size=16, intermediate_size=32, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        num_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)

    class Dom:
        def __init__(self, lengths):
            self.dev = [([1 + (i % 20) for i in range(n)], [-100] * n) for n in lengths]

    doms = [Dom([3, 5, 7, 2, 9]), Dom([4, 4, 6])]
    ctx = PolicyContext(domain_names=["a", "b"], domain_sizes=[5, 3], model=model, domains=doms,
                        batches=lambda d, idx, split="dev": collate([doms[d].dev[i] for i in idx], [d] * len(idx), 0))
    pol = policies.get("dynamic_moe", probe_batches=2, probe_batch_size=2, layers=layers,
                       include_padding=include_padding)
    pol.setup(ctx)
    counts = pol.probe_counts()
    # domain a: batches [3,5] and [7,2] (row 9 is beyond the probe); domain b: [4,4] and [6]
    real = [3 + 5 + 7 + 2, 4 + 4 + 6]
    padded = [2 * 5 + 2 * 7, 2 * 4 + 1 * 6]
    tokens = padded if include_padding else real
    assert counts.sum(1).tolist() == [2 * n_layers * t for t in tokens]
    assert model.training  # train mode restored
