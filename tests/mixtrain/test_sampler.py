"""MixtureSampler: world-size invariance, resume, fractions, per-step weights, exhaustion."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from scipy import stats

from mixtrain.sampler import MixtureSampler, SamplerExhausted, counter_uniform, shard, validate_weights

SIZES = [7, 30, 200, 3]


def _run_world(world: int, steps: int, mbs_total: int = 8, schedule=None) -> list[tuple[int, int]]:
    """Global stream as reconstructed from `world` simulated ranks, each with its own sampler."""
    ga = 2
    mbs = mbs_total // (world * ga)
    samplers = [MixtureSampler(SIZES, [1, 2, 3, 1], global_batch_size=mbs_total, seed=5) for _ in range(world)]
    stream: list[tuple[int, int]] = []
    for s in range(steps):
        if schedule and s in schedule:
            for sp in samplers:
                sp.set_weights(schedule[s])
        per_rank = [shard(sp.next_global_batch(), r, world, mbs, ga) for r, sp in enumerate(samplers)]
        # reassemble in global order: micro-step m, then rank r
        for m in range(ga):
            for r in range(world):
                stream.extend(per_rank[r][m])
    return stream


def test_stream_identical_for_world_sizes_1_2_4():
    sched = {3: [0, 1, 0, 1], 7: [5, 1, 1, 1]}
    s1 = _run_world(1, 20, schedule=sched)
    assert s1 == _run_world(2, 20, schedule=sched) == _run_world(4, 20, schedule=sched)
    assert len(set(s1)) > 50  # not degenerate


def test_shard_by_length_groups_similar_rows_and_keeps_the_step():
    """With lengths, micro-step m holds a contiguous block of the longest-first order (stable),
    the same block for every world size; the step's rows are exactly the global batch's."""
    sp = MixtureSampler(SIZES, [1, 2, 3, 1], global_batch_size=16, seed=5)
    gb = sp.next_global_batch()
    rows = [(int(d), int(e)) for d, e in zip(gb.domains, gb.examples)]
    lengths = [(7 * d + 3 * e) % 11 for d, e in rows]  # many ties
    order = sorted(range(16), key=lambda j: (-lengths[j], j))  # independent oracle: explicit tie key
    for world, ga in ((1, 2), (2, 2), (4, 2), (2, 4), (1, 1)):
        mbs = 16 // (world * ga)
        per_rank = [shard(gb, r, world, mbs, ga, lengths) for r in range(world)]
        for m in range(ga):
            block = [x for r in range(world) for x in per_rank[r][m]]
            assert block == [rows[j] for j in order[m * mbs * world:(m + 1) * mbs * world]]
        assert Counter(x for pr in per_rank for mb in pr for x in mb) == Counter(rows)
    with pytest.raises(ValueError, match="lengths has 3 entries, the global batch 16 samples"):
        shard(gb, 0, 1, 8, 2, [1, 2, 3])


def test_resume_continues_identically_also_at_other_world_size():
    full = MixtureSampler(SIZES, [1, 2, 3, 1], global_batch_size=8, seed=5)
    ref = [full.next_global_batch() for _ in range(30)]
    a = MixtureSampler(SIZES, [1, 2, 3, 1], global_batch_size=8, seed=5)
    for _ in range(13):
        a.next_global_batch()
    state = json.loads(json.dumps(a.state_dict()))  # through JSON like a checkpoint
    b = MixtureSampler(SIZES, [9, 9, 9, 9], global_batch_size=8, seed=5)
    b.load_state_dict(state)
    for k in range(13, 30):
        got = b.next_global_batch()
        assert np.array_equal(got.domains, ref[k].domains) and np.array_equal(got.examples, ref[k].examples)
        # a resumed rank of a 2-rank job gets its share of the same batch
        assert shard(got, 1, 2, 2, 2) == shard(ref[k], 1, 2, 2, 2)


def test_state_mismatch_is_refused():
    a = MixtureSampler(SIZES, [1, 1, 1, 1], global_batch_size=8, seed=5)
    b = MixtureSampler(SIZES, [1, 1, 1, 1], global_batch_size=16, seed=5)
    with pytest.raises(ValueError, match="global_batch_size"):
        b.load_state_dict(a.state_dict())


def _oracle_domains(seed: int, start: int, n: int, weights: list[float]) -> list[int]:
    """Independent inverse-CDF on the documented counter uniforms (all domains active)."""
    u = counter_uniform(seed, 0x243F6A8885A308D3, list(range(start, start + n)))
    w = np.asarray(weights, float) / sum(weights)
    out = []
    for x in u:
        acc = 0.0
        for d, wd in enumerate(w):
            acc += wd
            if x < acc:
                out.append(d)
                break
        else:
            out.append(len(w) - 1)
    return out


def test_each_step_uses_exactly_its_weights():
    """Weights only change between global batches: every draw of step s matches the oracle
    inverse-CDF under the weights set before step s, for all micro-steps and ranks."""
    sp = MixtureSampler([10**6] * 3, [1, 1, 1], global_batch_size=12, seed=3)
    rng = np.random.default_rng(0)
    for s in range(40):
        if s % 4 == 0:
            sp.set_weights(rng.dirichlet([1, 1, 1]))
        w = sp.weights.copy()
        gb = sp.next_global_batch()
        assert np.array_equal(gb.weights, w)
        # boundary mismatches of ±1 ulp would be astronomically rare; require exact agreement
        assert gb.domains.tolist() == _oracle_domains(3, s * 12, 12, list(w))


def test_realised_fractions_chi_square():
    w = np.array([0.5, 0.3, 0.15, 0.05])
    sp = MixtureSampler([50, 40, 30, 20], w, global_batch_size=64, seed=11)
    for _ in range(300):
        sp.next_global_batch()
    counts = np.array(sp.drawn)
    _chi2, p = stats.chisquare(counts, counts.sum() * w)
    assert p > 1e-3, (counts, p)
    fr = sp.fractions()
    assert abs(fr["0"] - 0.5) < 0.02


def test_counter_uniform_is_uniform_and_pure():
    u = counter_uniform(1, 2, np.arange(100_000))
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    assert np.array_equal(counter_uniform(1, 2, [5, 99_999]), u[[5, 99_999]])
    assert not np.array_equal(counter_uniform(2, 2, [5]), u[[5]])


def test_epochs_are_permutations_and_reshuffled():
    sp = MixtureSampler([13], [1], global_batch_size=13, seed=0)
    e0 = sp.next_global_batch().examples.tolist()
    e1 = sp.next_global_batch().examples.tolist()
    assert sorted(e0) == sorted(e1) == list(range(13))
    assert e0 != e1


def test_with_replacement_draws_uniform_examples():
    sp = MixtureSampler([5], [1], global_batch_size=500, seed=0, with_replacement=True)
    c = Counter(sp.next_global_batch().examples.tolist())
    assert set(c) == set(range(5))
    assert stats.chisquare([c[i] for i in range(5)]).pvalue > 1e-3


def test_exhaustion_stop_and_max_epochs():
    sp = MixtureSampler([3, 100], [0.5, 0.5], global_batch_size=10, seed=0, exhaustion=["stop", "cycle"])
    for _ in range(5):
        sp.next_global_batch()
    assert sp.drawn[0] == 3 and sp.exhausted() == [True, False]
    assert sp.effective_weights().tolist() == [0.0, 1.0]

    sp = MixtureSampler([4, 6], [1, 1], global_batch_size=5, seed=0, exhaustion="max_epochs", max_epochs=2)
    sp.next_global_batch(), sp.next_global_batch(), sp.next_global_batch(), sp.next_global_batch()
    assert sp.drawn == [8, 12]
    with pytest.raises(SamplerExhausted):
        sp.next_global_batch()


@pytest.mark.parametrize(
    "w, msg",
    [([1, -1, 1], "expected >= 0"), ([1, float("nan"), 1], "expected a finite"), ([0, 0, 0], "positive sum"),
     ([1, 1], "expected 3")],
)
def test_bad_weights(w, msg):
    with pytest.raises(ValueError, match=msg):
        validate_weights(w, 3, ["a", "b", "c"])
    sp = MixtureSampler([1, 2, 3], [1, 1, 1], global_batch_size=2)
    with pytest.raises(ValueError, match=msg):
        sp.set_weights(w)


def test_empty_domain_is_named():
    with pytest.raises(ValueError, match="'math' is empty"):
        MixtureSampler([3, 0], [1, 1], global_batch_size=2, domain_names=["code", "math"])
