"""router_stats / load_balancing_loss against independent oracles.

* a naive per-group PyTorch oracle (fp64 softmax, ``torch.topk`` -- or a stable sort where the
  test has exact ties -- ``one_hot`` and ``index_add``) for every field;
* transformers' own ``load_balancing_loss_func`` (Mixtral and Qwen2-MoE modules), with and
  without an attention mask, for ``load_balancing_loss`` and for the per-layer ``aux_loss``;
* gradcheck in float64, opcheck, torch.compile(fullgraph=True) parity, bad-input messages.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import mixkernels
from mixkernels import _backend
from tests._devices import DEVICES, device_backends, on, tree_to
from tests._tolerances import TOL, tol

BACKENDS = [b for b in ("reference", "cxx") if not _backend.unavailable_reason("router_stats", "cpu", b)]
# (device, backend): cpu-reference, cpu-cxx, cuda-reference, cuda-cxx, cuda-triton
DB = device_backends("router_stats")
FIELDS = ("expert_counts", "prob_sum", "token_count", "entropy_sum", "aux_loss")


def naive_oracle(layers, top_k, group_ids=None, num_groups=1, mask=None, stable=False):
    """Per-layer, per-group loop: softmax, top-k, one_hot, index_add. Selection on fp32 softmax
    (the op's math dtype); sums in float64."""
    n, e = layers[0].shape
    gids = torch.zeros(n, dtype=torch.long) if group_ids is None else group_ids.long()
    keep = torch.ones(n, dtype=torch.bool) if mask is None else mask
    counts = torch.zeros(len(layers), num_groups, e, dtype=torch.long)
    probs = torch.zeros(len(layers), num_groups, e, dtype=torch.float64)
    ent = torch.zeros(len(layers), num_groups, dtype=torch.float64)
    tokens = torch.zeros(num_groups, dtype=torch.long)
    for g in range(num_groups):
        rows = keep & (gids == g)
        tokens[g] = rows.sum()
        for layer, z in enumerate(layers):
            z = z[rows]
            p32 = torch.softmax(z.float(), dim=-1)
            if stable:
                chosen = torch.sort(p32, dim=-1, descending=True, stable=True).indices[:, :top_k]
            else:
                chosen = torch.topk(p32, top_k, dim=-1).indices
            counts[layer, g] = F.one_hot(chosen, e).sum((0, 1))
            p = torch.softmax(z.double(), dim=-1)
            probs[layer, g] = torch.zeros(e, dtype=torch.float64).index_add_(0, torch.arange(e).repeat(len(p)), p.reshape(-1))
            ent[layer, g] = -(torch.special.xlogy(p, p)).sum()
    total = max(int(tokens.sum()), 1)
    aux = e * ((counts.sum(1).double() / total) * (probs.sum(1) / total)).sum(-1)
    return counts, probs, tokens, ent, aux


def assert_matches(stats, expected, *, what="", device="cpu"):
    counts, probs, tokens, ent, aux = expected
    assert stats.expert_counts.dtype == torch.int64 and stats.token_count.dtype == torch.int64
    torch.testing.assert_close(stats.expert_counts, counts, atol=0, rtol=0, msg=f"{what} expert_counts")
    torch.testing.assert_close(stats.token_count, tokens, atol=0, rtol=0, msg=f"{what} token_count")
    n_tol = max(1, int(tokens.max()) if tokens.numel() else 1)
    fp32 = tol(torch.float32, device)
    kw = {"atol": fp32["atol"] * n_tol, "rtol": fp32["rtol"]}
    for name, got, want in (("prob_sum", stats.prob_sum, probs), ("entropy_sum", stats.entropy_sum, ent),
                            ("aux_loss", stats.aux_loss, aux)):
        assert got.dtype == torch.float32, f"{name} dtype {got.dtype}"
        torch.testing.assert_close(got.double(), want, **kw, msg=f"{what} {name}")


def _inputs(num_layers, n, e, num_groups, *, dtype=torch.float32, masked=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(num_layers, n, e, generator=gen) * 2).to(dtype)
    groups = torch.randint(0, num_groups, (n,), generator=gen)
    mask = torch.rand(n, generator=gen) > 0.3 if masked else None
    return z, groups, mask


SHAPES = [  # L, N, E, k, G
    (1, 1, 1, 1, 1),
    (2, 37, 7, 3, 4),
    (3, 100, 60, 8, 5),
    (1, 64, 8, 8, 2),
    (4, 129, 33, 1, 3),
    (2, 300, 128, 6, 8),
]


@pytest.mark.parametrize("device,backend", DB)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "L{}N{}E{}k{}G{}".format(*s))
def test_fields_vs_naive_oracle(device, backend, shape):
    num_layers, n, e, k, num_groups = shape
    z, groups, mask = _inputs(num_layers, n, e, num_groups)
    with mixkernels.backend(backend):
        stats = on(device, mixkernels.router_stats)(z, k, group_ids=groups, num_groups=num_groups, mask=mask)
    assert_matches(stats, naive_oracle(list(z), k, groups, num_groups, mask), device=device, what=f"{backend} {shape}")


@pytest.mark.parametrize("device,backend", DB)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_ties_and_zero_probabilities_at_many_experts(device, backend, dtype):
    """E = 64, k = 8 (several vector passes): rows of repeated values and of -inf logits, so ties
    at equal probabilities and at exactly 0 (fewer than k positive experts) go to the lower index."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton backend takes float32/float16/bfloat16 logits (documented)")
    gen = torch.Generator().manual_seed(3)
    z = torch.randint(-3, 1, (2, 300, 64), generator=gen).to(dtype)
    z[:, ::3] = torch.where(torch.rand(2, 100, 64, generator=gen) < 0.95, float("-inf"), z[:, ::3].double()).to(dtype)
    z[:, 1::7, 5:] = float("-inf")  # exactly 5 positive experts: 3 of the chosen have p = 0
    with mixkernels.backend(backend):
        stats = on(device, mixkernels.router_stats)(z, 8)
    p = torch.softmax(z, dim=-1)  # the op's math dtype (fp64 for fp64 logits)
    chosen = torch.sort(p, dim=-1, descending=True, stable=True).indices[..., :8]
    want = F.one_hot(chosen, 64).sum((1, 2))
    torch.testing.assert_close(stats.expert_counts[:, 0], want, atol=0, rtol=0)


@pytest.mark.parametrize("device,backend", DB)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_logits_use_fp32_math(device, backend, dtype):
    z, groups, mask = _inputs(3, 200, 40, 4, dtype=dtype)
    with mixkernels.backend(backend):
        stats = on(device, mixkernels.router_stats)(list(z), 4, group_ids=groups.int(), num_groups=4, mask=mask)
    # bf16 logits have many exact ties inside a row: the lower-index rule decides them
    assert_matches(stats, naive_oracle(list(z), 4, groups, 4, mask, stable=True), device=device, what=str(dtype))


@pytest.mark.parametrize("device,backend", DB)
def test_exact_ties_go_to_lower_index(device, backend):
    gen = torch.Generator().manual_seed(1)
    z = torch.randint(-2, 2, (2, 90, 11), generator=gen).float()
    z[:, 0] = 0.0  # a row of all-equal logits: experts 0..k-1 are chosen
    with mixkernels.backend(backend):
        stats = on(device, mixkernels.router_stats)(z, 3, group_ids=torch.arange(90) % 2, num_groups=2)
        single = on(device, mixkernels.router_stats)(z[:, :1], 3)
    assert_matches(stats, naive_oracle(list(z), 3, torch.arange(90) % 2, 2, stable=True), device=device, what="ties")
    assert single.expert_counts[:, 0].tolist() == [[1, 1, 1] + [0] * 8] * 2


@pytest.mark.parametrize("device,backend", DB)
def test_input_forms_and_layouts(device, backend):
    z, groups, mask = _inputs(3, 50, 9, 3)
    expected = naive_oracle(list(z), 2, groups, 3, mask)
    # non-contiguous: each layer a transposed view, and every second row of a larger tensor
    wide = torch.zeros(3, 100, 9)
    wide[:, ::2] = z
    forms = {
        "stacked": z,
        "list": list(z),
        "tuple": tuple(z.unbind(0)),
        "transposed": [t.t().contiguous().t() for t in z],
        "strided_rows": wide[:, ::2],
    }
    with mixkernels.backend(backend):
        for name, logits in forms.items():
            stats = on(device, mixkernels.router_stats)(logits, 2, group_ids=groups, num_groups=3, mask=mask)
            assert_matches(stats, expected, device=device, what=name)
        one = on(device, mixkernels.router_stats)(z[1], 2, group_ids=groups, num_groups=3, mask=mask)  # [N, E]: L = 1
    assert one.prob_sum.shape == (1, 3, 9)
    assert_matches(one, naive_oracle([z[1]], 2, groups, 3, mask), device=device, what="L=1")


@pytest.mark.parametrize("device,backend", DB)
def test_empty_and_all_masked(device, backend):
    with mixkernels.backend(backend):
        empty = on(device, mixkernels.router_stats)(torch.randn(2, 0, 5), 2)
        masked = on(device, mixkernels.router_stats)(torch.randn(2, 7, 5), 2, mask=torch.zeros(7, dtype=torch.bool))
    for stats in (empty, masked):
        assert stats.expert_counts.shape == (2, 1, 5) and int(stats.expert_counts.sum()) == 0
        assert float(stats.prob_sum.abs().sum()) == 0 and float(stats.aux_loss.abs().sum()) == 0
        assert stats.token_count.tolist() == [0]


@pytest.mark.parametrize("device,backend", DB)
def test_masked_rows_may_hold_garbage(device, backend):
    """Padding rows may contain NaN logits and invalid group ids: they must not leak."""
    z, groups, mask = _inputs(2, 40, 6, 3)
    z_bad, g_bad = z.clone(), groups.clone()
    z_bad[:, ~mask] = float("nan")
    g_bad[~mask] = -7
    with mixkernels.backend(backend):
        stats = on(device, mixkernels.router_stats)(z_bad, 2, group_ids=g_bad, num_groups=3, mask=mask)
    assert_matches(stats, naive_oracle(list(z), 2, groups, 3, mask), device=device, what="garbage padding")


def test_identities_and_helpers():
    z, groups, mask = _inputs(3, 80, 10, 4)
    stats = mixkernels.router_stats(z, 3, group_ids=groups, num_groups=4, mask=mask)
    total = int(mask.sum())
    assert stats.expert_counts.sum((1, 2)).tolist() == [3 * total] * 3
    torch.testing.assert_close(stats.prob_sum.sum((1, 2)), torch.full((3,), float(total)))
    torch.testing.assert_close(stats.expert_load().sum(-1), torch.ones(3, 4))
    assert torch.all(stats.mean_entropy() <= torch.log(torch.tensor(10.0)) + 1e-6)
    # merge of two disjoint halves == stats of the whole
    first, second = torch.arange(80) < 30, torch.arange(80) >= 30
    a = mixkernels.router_stats(z, 3, group_ids=groups, num_groups=4, mask=mask & first)
    b = mixkernels.router_stats(z, 3, group_ids=groups, num_groups=4, mask=mask & second)
    merged = a.merge(b)
    for name in FIELDS:
        torch.testing.assert_close(getattr(merged, name), getattr(stats, name), msg=name)


@pytest.mark.skipif("cxx" not in BACKENDS, reason="cxx backend not built")
def test_cxx_bitwise_deterministic_across_thread_counts():
    z, groups, mask = _inputs(3, 5000, 24, 6, seed=3)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            with mixkernels.backend("cxx"):
                results.append(mixkernels.router_stats(z, 4, group_ids=groups, num_groups=6, mask=mask))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for name in FIELDS:
            assert torch.equal(getattr(other, name), getattr(results[0], name)), name


@pytest.mark.skipif("cxx" not in BACKENDS, reason="C++ extension not loaded")
def test_cxx_baseline_isa_build():
    """The C++ kernels' baseline x86-64 build (what a CPU without AVX2 runs), forced with
    MIXKERNELS_NO_AVX2=1 in a fresh process: every cxx test of this file must pass on it too."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "MIXKERNELS_NO_AVX2": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
                        "-k", "(cxx or property) and not baseline_isa"], env=env, capture_output=True, text=True, check=False,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout


def test_cxx_isa_reported():
    from mixkernels import _extension, env

    if not _extension.LOADED:
        pytest.skip("C++ extension not loaded")
    from mixkernels import _C

    expected = {"baseline"} if env.no_avx2() else {"avx2", "baseline"}
    assert _C.cpu_isa() in expected


# ---- transformers' load_balancing_loss_func ------------------------------------------------


def _hf_functions():
    from transformers.models.mixtral import modeling_mixtral
    from transformers.models.qwen2_moe import modeling_qwen2_moe

    return [modeling_mixtral.load_balancing_loss_func, modeling_qwen2_moe.load_balancing_loss_func]


@pytest.mark.parametrize("device,backend", DB)
@pytest.mark.parametrize("case", [(1, 2, 5, 8, 2), (4, 3, 7, 6, 1), (3, 2, 9, 60, 8), (2, 1, 13, 5, 5)],
                         ids=lambda c: "L{}B{}S{}E{}k{}".format(*c))
def test_load_balancing_loss_matches_transformers(device, backend, case):
    num_layers, batch, seq, e, k = case
    gen = torch.Generator().manual_seed(sum(case))
    logits = tuple(torch.randn(batch * seq, e, generator=gen) for _ in range(num_layers))
    am = torch.ones(batch, seq, dtype=torch.long)
    am[0, : seq // 2] = 0  # left padding
    if batch > 1:
        am[-1, -2:] = 0  # right padding
    with mixkernels.backend(backend):
        ours = on(device, mixkernels.load_balancing_loss)(logits, e, k)
        ours_masked = on(device, mixkernels.load_balancing_loss)(logits, e, k, attention_mask=am)
        per_layer = [on(device, mixkernels.router_stats)(z, k, mask=am.reshape(-1) != 0).aux_loss for z in logits]
    for hf in _hf_functions():
        torch.testing.assert_close(ours, hf(logits, e, k), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ours_masked, hf(logits, e, k, am), atol=1e-6, rtol=1e-5)
        for z, aux in zip(logits, per_layer):  # aux_loss of one layer == transformers on that layer alone
            torch.testing.assert_close(aux[0], hf((z,), e, k, am), atol=1e-6, rtol=1e-5)
    assert on(device, mixkernels.load_balancing_loss)(None, e, k) == 0  # transformers returns 0 for None


def test_load_balancing_loss_from_stats_and_mask_dtypes():
    logits = torch.randn(3, 12, 6)
    am = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1]])
    hf = _hf_functions()[0]
    want = hf(tuple(logits), 6, 2, am)
    torch.testing.assert_close(mixkernels.load_balancing_loss(logits, 6, 2, am.bool()), want)
    torch.testing.assert_close(mixkernels.load_balancing_loss(list(logits), None, 2, am.float()), want)
    stats = mixkernels.router_stats(logits, 2, group_ids=torch.arange(12) % 3, num_groups=3, mask=am.reshape(-1) == 1)
    torch.testing.assert_close(stats.load_balancing_loss(), want)


# ---- autograd ------------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", DB)
def test_gradcheck_float64(device, backend):
    if backend == "triton":
        pytest.skip("the triton backend takes float32/float16/bfloat16 logits (documented); its backward is "
                    "the shared router_stats_backward op, gradchecked through cxx")
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(2, 11, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    groups = torch.randint(0, 3, (11,), generator=gen)
    mask = torch.rand(11, generator=gen) > 0.2
    w_prob = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64)
    w_ent = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    w_aux = torch.randn(2, generator=gen, dtype=torch.float64)

    def all_outputs(x):
        with mixkernels.backend(backend):
            s = on(device, mixkernels.router_stats)(x, 2, group_ids=groups, num_groups=3, mask=mask)
        return (s.prob_sum * w_prob).sum() + (s.entropy_sum * w_ent).sum() + (s.aux_loss * w_aux).sum()

    def lbl(x):
        with mixkernels.backend(backend):
            return on(device, mixkernels.load_balancing_loss)(list(x.unbind(0)), 5, 2, mask.view(1, -1))

    assert torch.autograd.gradcheck(all_outputs, (z,), eps=1e-6, atol=1e-7, fast_mode=True)
    assert torch.autograd.gradcheck(lbl, (z,), eps=1e-6, atol=1e-7, fast_mode=True)


@pytest.mark.parametrize("device,backend", DB)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_load_balancing_loss_grad_matches_transformers_autograd(device, backend, dtype):
    gen = torch.Generator().manual_seed(2)
    logits = [torch.randn(24, 10, generator=gen).to(dtype).requires_grad_() for _ in range(3)]
    am = (torch.rand(4, 6, generator=gen) > 0.25).long()
    with mixkernels.backend(backend):
        on(device, mixkernels.load_balancing_loss)(logits, 10, 3, am).backward()
    ours = [t.grad for t in logits]
    # transformers on fp32 copies: its autograd is the independent reference (fp32 math as ours)
    ref_in = tuple(t.detach().float().requires_grad_() for t in logits)
    _hf_functions()[0](ref_in, 10, 3, am).backward()
    for got, want in zip(ours, ref_in):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want.grad, **({"atol": 1e-7, "rtol": 1e-4} if dtype == torch.float32 else TOL[dtype]))


# ---- opcheck, compile ----------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", device_backends("router_stats", ("cxx", "triton")))
def test_opcheck(device, backend):
    op = torch.ops.mixkernels.router_stats_triton if backend == "triton" else torch.ops.mixkernels.router_stats
    z, groups, mask = tree_to(_inputs(2, 30, 7, 3), device)
    layers = [t.clone().requires_grad_() for t in z]
    for args in ((layers, 2, groups, 3, mask), (layers, 7, None, 1, None), ([layers[0].detach()], 1, groups.int(), 3, None)):
        torch.library.opcheck(op.default, args)
    grads = (torch.randn(2, 3, 7).to(device), torch.randn(2, 3).to(device))
    torch.library.opcheck(torch.ops.mixkernels.router_stats_backward.default, (list(z), groups, 3, mask, *grads))


@pytest.mark.parametrize("device,backend", DB)
def test_torch_compile_fullgraph_parity(device, backend):
    z, groups, mask = tree_to(_inputs(3, 40, 8, 4), device)
    am = mask.view(5, 8).long()

    def fn(x):
        with mixkernels.backend(backend):
            stats = mixkernels.router_stats(x, 3, group_ids=groups, num_groups=4, mask=mask)
            return stats, mixkernels.load_balancing_loss(tuple(x.unbind(0)), 8, 3, am)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    x_eager = z.clone().requires_grad_()
    x_comp = z.clone().requires_grad_()
    stats_e, loss_e = fn(x_eager)
    stats_c, loss_c = compiled(x_comp)
    assert isinstance(stats_c, mixkernels.RouterStats)
    for name in FIELDS:
        torch.testing.assert_close(getattr(stats_c, name), getattr(stats_e, name), msg=name)
    torch.testing.assert_close(loss_c, loss_e)
    (loss_e + stats_e.entropy_sum.sum()).backward()
    (loss_c + stats_c.entropy_sum.sum()).backward()
    torch.testing.assert_close(x_comp.grad, x_eager.grad)


# ---- bad input -----------------------------------------------------------------------------


BAD = [
    (lambda z: mixkernels.router_stats(z, 0), ValueError, r"top_k must be an int in \[1, E = 6\], got 0"),
    (lambda z: mixkernels.router_stats(z, 7), ValueError, r"top_k must be an int in \[1, E = 6\], got 7"),
    (lambda z: mixkernels.router_stats(z, 2, group_ids=torch.tensor([0, 1, 5, 0, 1]), num_groups=3),
     ValueError, r"group_ids\[2\] = 5 is out of range \[0, 3\)"),
    (lambda z: mixkernels.router_stats(z, 2, group_ids=torch.tensor([0, -1, 0, 0, 1]), num_groups=2),
     ValueError, r"group_ids\[1\] = -1 is out of range"),
    (lambda z: mixkernels.router_stats([z[0], z[1, :4]], 2), ValueError,
     r"router_logits\[1\] has shape \(4, 6\) but router_logits\[0\] has \(5, 6\)"),
    (lambda z: mixkernels.router_stats([z[0], z[1, :, :5]], 2), ValueError, r"router_logits\[1\] has shape \(5, 5\)"),
    (lambda z: mixkernels.router_stats([z[0], z[1].half()], 2), TypeError, r"router_logits\[1\] is float16"),
    (lambda z: mixkernels.router_stats(z, 2, mask=torch.ones(4, dtype=torch.bool)), ValueError,
     r"mask must be bool \[N\] with N = 5 .*got bool \(4,\)"),
    (lambda z: mixkernels.router_stats(z, 2, mask=torch.ones(5)), ValueError, r"mask must be bool .*got float32"),
    (lambda z: mixkernels.router_stats(z, 2, group_ids=torch.zeros(4, dtype=torch.long), num_groups=2), ValueError,
     r"group_ids must be \[N\] with N = 5.*\(4,\)"),
    (lambda z: mixkernels.router_stats(z, 2, group_ids=torch.zeros(5), num_groups=2), TypeError, r"group_ids must be one of int32, int64"),
    (lambda z: mixkernels.router_stats(z, 2, num_groups=3), ValueError, r"num_groups = 3 but group_ids is None"),
    (lambda z: mixkernels.router_stats(z, 2, group_ids=torch.zeros(5, dtype=torch.long), num_groups=0), ValueError,
     r"num_groups must be an int >= 1, got 0"),
    (lambda z: mixkernels.router_stats([], 2), ValueError, r"router_logits is an empty list"),
    (lambda z: mixkernels.router_stats(z[0, 0], 1), ValueError, r"router_logits must be \[N, E\], \[L, N, E\]"),
    (lambda z: mixkernels.router_stats(z.long(), 1), TypeError, r"router_logits\[0\] must be one of float32"),
    (lambda z: mixkernels.load_balancing_loss(tuple(z), 8, 2), ValueError, r"num_experts = 8 but router_logits have E = 6"),
    (lambda z: mixkernels.load_balancing_loss(tuple(z), 6, 9), ValueError, r"top_k must be an int in \[1, E = 6\], got 9"),
    (lambda z: mixkernels.load_balancing_loss(tuple(z), 6, 2, torch.ones(2, 3)), ValueError,
     r"attention_mask has shape \(2, 3\) \(6 tokens\) but router_logits have N = 5 rows"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_input_messages(backend, case):
    fn, error, pattern = BAD[case]
    with mixkernels.backend(backend), pytest.raises(error, match=pattern):
        fn(torch.randn(2, 5, 6))


@pytest.mark.skipif("cxx" not in BACKENDS, reason="cxx backend not built")
def test_cxx_op_checks_arguments_itself():
    """Direct callers of torch.ops.mixkernels.router_stats get TORCH_CHECK messages too."""
    z = [torch.randn(5, 6)]
    with pytest.raises(RuntimeError, match=r"top_k must be in \[1, E = 6\], got 9"):
        torch.ops.mixkernels.router_stats(z, 9, None, 1, None)
    with pytest.raises(RuntimeError, match=r"group_ids\[3\] = 4 is out of range \[0, 2\)"):
        torch.ops.mixkernels.router_stats(z, 2, torch.tensor([0, 1, 0, 4, 1]), 2, None)


# ---- property test -------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=25, deadline=None)
@given(
    num_layers=st.integers(1, 3), n=st.integers(0, 70), e=st.integers(1, 20), k_frac=st.floats(0, 1),
    num_groups=st.integers(1, 5), seed=st.integers(0, 2**16), masked=st.booleans(),
)
def test_property_backends_agree_with_oracle(device, num_layers, n, e, k_frac, num_groups, seed, masked):
    k = 1 + int(k_frac * (min(e, 8) - 1))
    z, groups, mask = _inputs(num_layers, n, e, num_groups, masked=masked, seed=seed)
    expected = naive_oracle(list(z), k, groups, num_groups, mask, stable=True)
    for backend in BACKENDS if device == "cpu" else ("reference", "cxx", "triton"):
        with mixkernels.backend(backend):
            stats = on(device, mixkernels.router_stats)(z, k, group_ids=groups, num_groups=num_groups, mask=mask)
        assert_matches(stats, expected, what=backend, device=device)
