"""linear_cross_entropy / cross_entropy / hf.causal_lm_loss against an independent fp64 oracle:
eager ``hidden @ weight.T (+ bias)`` + ``F.cross_entropy(reduction="none")`` + ``index_add_``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mixkernels
from mixkernels import _backend
from tests._devices import DEVICES, device_backends, on, tree_to
from tests._tolerances import assert_error_within, tol

BACKENDS = [b for b in ("reference", "cxx") if not _backend.unavailable_reason("linear_ce", "cpu", b)]
# (device, backend): cpu-reference, cpu-cxx, cuda-reference, cuda-cxx, cuda-triton
DB = device_backends("linear_ce")


def oracle(hidden, weight, labels, bias=None, group_ids=None, num_groups=0, ignore_index=-100, smoothing=0.0,
           reduction="mean", upstream=None):
    """fp64 eager: (loss, token_loss, group_loss, group_count, grad_h, grad_w, grad_b)."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    b = bias.detach().double().requires_grad_() if bias is not None else None
    logits = h.reshape(-1, h.shape[-1]) @ w.T
    if b is not None:
        logits = logits + b
    y = labels.reshape(-1)
    tok = F.cross_entropy(logits, y, ignore_index=ignore_index, label_smoothing=smoothing, reduction="none")
    valid = y != ignore_index
    count = valid.sum()
    if reduction == "mean":
        loss = tok.sum() / count.clamp(min=1)
    elif reduction == "sum":
        loss = tok.sum()
    else:
        loss = tok.reshape(labels.shape)
    gl = gc = None
    if group_ids is not None:
        g = group_ids if group_ids.shape == labels.shape else group_ids[:, None].expand(labels.shape)
        g = torch.where(valid, g.reshape(-1), 0)
        gl = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, g, tok.detach())
        gc = torch.zeros(num_groups, dtype=torch.int64).index_add_(0, g, valid.long())
    up = torch.ones_like(loss) if upstream is None else upstream.double()
    grads = torch.autograd.grad(loss, [t for t in (h, w, b) if t is not None], up)
    return (loss.detach(), tok.detach().reshape(labels.shape), gl, gc, *grads, *(() if b is not None else (None,)))


def make(n=37, d=24, v=101, dtype=torch.float32, bias=False, seed=0, ignore_every=5, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) * scale).to(dtype).requires_grad_()
    b = (torch.randn(v, generator=g) * 0.5).to(dtype).requires_grad_() if bias else None
    y = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        y[::ignore_every] = -100
    return h, w, b, y


def run(target, h, w, y, b=None, upstream=None, **kw):
    """``target``: a backend name (CPU) or ``(device, backend)``; inputs are CPU tensors, moved to
    the device for the call; outputs and the gradients of h, w, b come back on CPU."""
    device, backend = target if isinstance(target, tuple) else ("cpu", target)
    for t in (h, w, b):
        if t is not None:
            t.grad = None
    with mixkernels.backend(backend):
        out = on(device, mixkernels.linear_cross_entropy)(h, w, y, bias=b, return_token_loss=True, **kw)
    out.loss.backward(torch.ones_like(out.loss) if upstream is None else upstream.to(out.loss.dtype))
    return out, h.grad, w.grad, (b.grad if b is not None else None)


def check_all(out, grads, ref, dtype=torch.float32, groups=True, device="cpu"):
    grad_tol = tol(dtype, device)
    fp32 = tol(torch.float32, device)
    loss, tok, gl, gc, gh, gw, gb = ref
    torch.testing.assert_close(out.loss.double(), loss, **fp32)
    torch.testing.assert_close(out.token_loss.double(), tok, **fp32)
    if groups:
        torch.testing.assert_close(out.group_loss.double(), gl, **fp32)
        assert out.group_loss.dtype == torch.float32
        assert torch.equal(out.group_count, gc)
    for got, exp in zip(grads, (gh, gw, gb)):
        if exp is None:
            assert got is None
            continue
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), exp, **grad_tol)


@pytest.mark.parametrize("device,backend", DB)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias,smoothing", [(False, 0.0), (True, 0.1)])
def test_parity_fp32(device, backend, reduction, bias, smoothing):
    # N = 37 is not a multiple of chunk_size = 8; V = 101 is not a multiple of any block size.
    h, w, b, y = make(bias=bias)
    groups = torch.randint(0, 4, (37,), generator=torch.Generator().manual_seed(1))
    up = torch.randn(37, generator=torch.Generator().manual_seed(2)) if reduction == "none" else None
    out, *grads = run((device, backend), h, w, y, b, upstream=up, group_ids=groups, num_groups=4, chunk_size=8,
                      reduction=reduction, label_smoothing=smoothing)
    ref = oracle(h, w, y, b, groups, 4, smoothing=smoothing, reduction=reduction, upstream=up)
    check_all(out, grads, ref, device=device)
    if reduction != "none":
        assert out.loss.shape == ()


@pytest.mark.parametrize("device,backend", DB)
def test_btd_per_sequence_groups_and_auto_chunk(device, backend):
    h, w, b, y = make(n=4 * 13, bias=True, ignore_every=3)
    h3 = h.detach().reshape(4, 13, 24).requires_grad_()
    y3 = y.reshape(4, 13)
    seq_groups = torch.tensor([2, 0, 2, 1])
    up = torch.randn(4, 13)
    out, *grads = run((device, backend), h3, w, y3, b, upstream=up, group_ids=seq_groups, num_groups=3, reduction="none")
    assert out.loss.shape == (4, 13) and out.token_loss.shape == (4, 13)
    check_all(out, grads, oracle(h3, w, y3, b, seq_groups, 3, reduction="none", upstream=up), device=device)
    # per-token [B, T] groups give the same as the broadcast per-sequence ids
    out2, *_ = run((device, backend), h3, w, y3, b, group_ids=seq_groups[:, None].expand(4, 13), num_groups=3)
    torch.testing.assert_close(out2.group_loss, out.group_loss)
    assert torch.equal(out2.group_count, out.group_count)


@pytest.mark.parametrize("device,backend", DB)
def test_non_contiguous_inputs(device, backend):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(24, 30, generator=g).T.requires_grad_()  # [30, 24], stride (1, 30)
    w_big = (torch.randn(101, 48, generator=g) * 0.3)
    w = w_big[:, ::2].detach().requires_grad_()  # [101, 24], strided
    y = torch.randint(0, 101, (30,), generator=g)
    out, *grads = run((device, backend), h, w, y, chunk_size=7, reduction="sum")
    check_all(out, grads, oracle(h, w, y, reduction="sum"), groups=False, device=device)


@pytest.mark.parametrize("device,backend", DB)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_is_zero_not_nan(device, backend, reduction):
    h, w, b, y = make(n=9, bias=True)
    y[:] = -100
    out, gh, gw, gb = run((device, backend), h, w, y, b, group_ids=torch.zeros(9, dtype=torch.long), num_groups=2,
                          reduction=reduction)
    assert torch.all(out.loss == 0) and not torch.isnan(out.loss).any()
    assert torch.equal(out.group_count, torch.zeros(2, dtype=torch.long))
    assert torch.all(out.group_loss == 0)
    for g in (gh, gw, gb):
        assert torch.all(g == 0)


@pytest.mark.parametrize("device,backend", DB)
def test_empty_input(device, backend):
    h, w, _b, y = make(n=0)
    out, gh, gw, _ = run((device, backend), h, w, y, group_ids=torch.zeros(0, dtype=torch.long), num_groups=3)
    assert out.loss.item() == 0.0
    assert out.group_count.tolist() == [0, 0, 0]
    assert gh.shape == (0, 24) and torch.all(gw == 0)


@pytest.mark.parametrize("device,backend", DB)
def test_huge_logits_stay_finite(device, backend):
    # logits of magnitude ~1e4 (fp32): log-sum-exp must subtract the row max
    h, w, _b, y = make(n=16, v=67, ignore_every=0)
    h = (h.detach() * 0 + torch.sign(h.detach())).requires_grad_()
    w = (torch.sign(w.detach()) * (1e4 / 24)).requires_grad_()
    up = torch.randn(16)
    out, *grads = run((device, backend), h, w, y, reduction="none", upstream=up, chunk_size=5)
    assert torch.isfinite(out.loss).all() and all(torch.isfinite(g).all() for g in grads[:2])
    ref = oracle(h, w, y, reduction="none", upstream=up)
    torch.testing.assert_close(out.loss.double(), ref[0], rtol=1e-5, atol=1e-2)
    # softmax of fp32 logits ~1e4 is sensitive to their last-bit rounding: compare at the scale of |W|
    torch.testing.assert_close(grads[0].double(), ref[4], rtol=1e-4, atol=1e-3 * ref[4].abs().max().item())


@pytest.mark.parametrize("device,backend", DB)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_within_2x_torch(device, backend, dtype):
    h32, w32, b32, y = make(n=45, d=32, v=203, bias=True)
    h, w, b = (t.detach().to(dtype).requires_grad_() for t in (h32, w32, b32))
    groups = torch.randint(0, 3, (45,), generator=torch.Generator().manual_seed(4))
    out, gh, gw, gb = run((device, backend), h, w, y, b, group_ids=groups, num_groups=3, chunk_size=16, label_smoothing=0.05)
    ref = oracle(h, w, y, b, groups, 3, smoothing=0.05)  # fp64 of the same (rounded) inputs
    # PyTorch in the same dtype: logits and their gradient in `dtype`, loss upcast like HF does
    # (on the same device: its GEMMs round like the kernel's would)
    ht, wt, bt = (t.detach().to(device).requires_grad_() for t in (h, w, b))
    logits = ht @ wt.T + bt
    tl = F.cross_entropy(logits.float(), y.to(device), label_smoothing=0.05, reduction="none")
    tl.sum().div((y != -100).sum().to(device)).backward()
    tl, tgh, tgw, tgb = tree_to((tl.detach(), ht.grad, wt.grad, bt.grad), "cpu")
    assert out.loss.dtype == torch.float32 and gh.dtype == dtype and gw.dtype == dtype
    assert_error_within(out.loss, ref[0], tl.sum() / (y != -100).sum(), floor=1e-5, name="loss")
    assert_error_within(out.token_loss, ref[1], tl, floor=1e-5, name="token_loss")
    for got, exp, tgrad, name in ((gh, ref[4], tgh, "grad_hidden"), (gw, ref[5], tgw, "grad_weight"),
                                  (gb, ref[6], tgb, "grad_bias")):
        assert_error_within(got, exp, tgrad, name=name, floor=float(torch.finfo(dtype).eps) * exp.abs().max().item())


@pytest.mark.parametrize("device,backend", DB)
def test_grad_only_for_requested_inputs_and_no_grad_mode(device, backend):
    h, w, b, y = make(bias=True)
    w.requires_grad_(False)
    out, gh, gw, gb = run((device, backend), h, w, y, b)
    assert gw is None and gh is not None and gb is not None
    ref = oracle(h, w, y, b)
    torch.testing.assert_close(gh.double(), ref[4], **tol(torch.float32, device))
    with torch.no_grad(), mixkernels.backend(backend):
        out2 = on(device, mixkernels.linear_cross_entropy)(h, w, y, bias=b)
    assert not out2.loss.requires_grad
    torch.testing.assert_close(out2.loss, out.loss.detach())


@pytest.mark.parametrize("device,backend", DB)
@pytest.mark.parametrize("bias", [False, True])
def test_frozen_head_skips_the_weight_gradient(device, backend, bias):
    """A frozen LM head (LoRA, frozen tied embeddings): the fused forward computes only the hidden
    gradient (no [V, d] accumulator, one GEMM less); that gradient equals the oracle's."""
    h, w, b, y = make(bias=bias)
    w.requires_grad_(False)
    if b is not None:
        b.requires_grad_(False)
    out, gh, gw, gb = run((device, backend), h, w, y, b)
    assert gw is None and gb is None
    ref = oracle(h, w, y, b)
    torch.testing.assert_close(out.loss.double().cpu(), ref[0], **tol(torch.float32, device))
    torch.testing.assert_close(gh.double(), ref[4], **tol(torch.float32, device))
    if backend in ("cxx", "triton"):  # the op itself returns empty weight/bias gradients
        op = getattr(torch.ops.mixkernels, "linear_ce_triton" if backend == "triton" else "linear_ce")
        hd, wd, yd, bd = (None if t is None else t.detach().to(device) for t in (h, w, y, b))
        outs = op(hd, wd, yd, bd, None, 0, -100, 0.0, 2, 64, True, False)
        assert outs[6].numel() == 0 and outs[7].numel() == 0 and outs[5].shape == h.shape
        full = op(hd, wd, yd, bd, None, 0, -100, 0.0, 2, 64, True, True)
        torch.testing.assert_close(outs[5], full[5], rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", DB)
def test_upstream_scalar_is_applied(device, backend):
    # grads computed in the forward (mean) must be scaled by the actual upstream gradient
    h, w, _b, y = make()
    _out, gh, gw, _ = run((device, backend), h, w, y, upstream=torch.tensor(-2.5))
    ref = oracle(h, w, y, upstream=torch.tensor(-2.5))
    torch.testing.assert_close(gh.double(), ref[4], **tol(torch.float32, device))
    torch.testing.assert_close(gw.double(), ref[5], **tol(torch.float32, device))


@pytest.mark.parametrize("device,backend", DB)
def test_backward_twice_with_retain_graph(device, backend):
    # the first backward hands the forward's gradients over in place; a second one through the same
    # graph recomputes them and must add the same amount again
    h, w, b, y = make(bias=True)
    with mixkernels.backend(backend):
        out = on(device, mixkernels.linear_cross_entropy)(h, w, y, bias=b)
    out.loss.backward(torch.tensor(0.5), retain_graph=True)
    first = [t.grad.clone() for t in (h, w, b)]
    out.loss.backward(torch.tensor(0.5))
    ref = oracle(h, w, y, bias=b, upstream=torch.tensor(0.5))
    for t, g1, exp in zip((h, w, b), first, ref[4:]):
        torch.testing.assert_close(g1.double(), exp, **tol(torch.float32, device))
        torch.testing.assert_close(t.grad.double(), 2 * exp, **tol(torch.float32, device))


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(5)
    h = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(0, 11, (7,), generator=g)
    y[2] = -100
    for backend in BACKENDS:
        for reduction in ("mean", "none"):
            def f(h, w, b, reduction=reduction, backend=backend):
                with mixkernels.backend(backend):
                    return mixkernels.linear_cross_entropy(h, w, y, bias=b, reduction=reduction, chunk_size=3,
                                                           label_smoothing=0.1).loss
            # "mean": the first backward hands over the forward's gradients, a repeat recomputes
            # them from the saved fp32 log-sum-exp: reentrant up to fp32 rounding
            assert torch.autograd.gradcheck(f, (h, w, b), nondet_tol=1e-6)
        z = torch.randn(7, 11, dtype=torch.float64, generator=g, requires_grad=True)
        with mixkernels.backend(backend):
            assert torch.autograd.gradcheck(
                lambda z: mixkernels.cross_entropy(z, y, reduction="none", label_smoothing=0.2).loss, (z,))


@pytest.mark.parametrize("device,backend", device_backends("linear_ce", ("cxx", "triton")))
def test_opcheck(device, backend):
    suffix = "_triton" if backend == "triton" else ""
    ops = torch.ops.mixkernels
    h, w, b, y = (t.detach().to(device).requires_grad_(t.requires_grad) for t in make(n=13, v=29, bias=True))
    groups = torch.randint(0, 3, (13,)).to(device)
    for reduction in (0, 1, 2):
        for compute_grad in (False, True):
            args = (h, w, y, b, groups, 3, -100, 0.1, reduction, 4, compute_grad)
            torch.library.opcheck(getattr(ops, f"linear_ce{suffix}").default, args)
    for reduction in (1, 2):  # a frozen head: no weight gradient
        torch.library.opcheck(getattr(ops, f"linear_ce{suffix}").default,
                              (h, w.detach(), y, b.detach(), groups, 3, -100, 0.1, reduction, 4, True, False))
    out = getattr(ops, f"linear_ce{suffix}")(h, w, y, b, groups, 3, -100, 0.1, 2, 4, True, False)[0]
    with pytest.raises(RuntimeError, match="weight_grad=False, but weight or bias requires grad"):
        out.backward()
    lse = torch.randn(13).to(device)
    torch.library.opcheck(getattr(ops, f"linear_ce_backward{suffix}").default,
                          (h.detach(), w.detach(), y, None, lse, torch.randn(13).to(device), -100, 0.0, 5))
    z = torch.randn(13, 29).to(device).requires_grad_()
    for reduction in (0, 2):
        torch.library.opcheck(getattr(ops, f"cross_entropy{suffix}").default, (z, y, groups, 3, -100, 0.0, reduction))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph(device, reduction):
    h, w, b, y = (t.detach().to(device).requires_grad_(t.requires_grad) for t in make(bias=True))
    groups = torch.randint(0, 4, (37,)).to(device)

    def f(h, w, b):
        out = mixkernels.linear_cross_entropy(h, w, y, bias=b, group_ids=groups, num_groups=4,
                                              reduction=reduction, chunk_size=16)
        return out.loss.sum(), out.group_loss

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss_c, gl_c = compiled(h, w, b)
    grads_c = torch.autograd.grad(loss_c, (h, w, b))
    loss_e, gl_e = f(h, w, b)
    grads_e = torch.autograd.grad(loss_e, (h, w, b))
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(gl_c, gl_e)
    for a, e in zip(grads_c, grads_e):
        torch.testing.assert_close(a, e)


# ---- cross_entropy from logits -----------------------------------------------------------------


@pytest.mark.parametrize("device,backend", DB)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_parity(device, backend, reduction):
    g = torch.Generator().manual_seed(6)
    z = (torch.randn(3, 11, 53, generator=g) * 4).requires_grad_()
    y = torch.randint(0, 53, (3, 11), generator=g)
    y[:, -1] = -100
    seq = torch.tensor([1, 0, 1])
    up = torch.randn(3, 11, generator=g) if reduction == "none" else None
    with mixkernels.backend(backend):
        out = on(device, mixkernels.cross_entropy)(z, y, group_ids=seq, num_groups=2, reduction=reduction,
                                       label_smoothing=0.1, return_token_loss=True)
    out.loss.backward(torch.ones_like(out.loss) if up is None else up)
    zd = z.detach().double().requires_grad_()
    tok = F.cross_entropy(zd.reshape(-1, 53), y.reshape(-1), label_smoothing=0.1, reduction="none").reshape(3, 11)
    ref = {"mean": tok.sum() / (y != -100).sum(), "sum": tok.sum(), "none": tok}[reduction]
    ref.backward(torch.ones_like(ref) if up is None else up.double())
    torch.testing.assert_close(out.loss.double(), ref.detach(), **tol(torch.float32, device))
    torch.testing.assert_close(out.token_loss.double(), tok.detach(), **tol(torch.float32, device))
    gid = seq[:, None].expand(3, 11).reshape(-1)
    valid = y.reshape(-1) != -100
    gl = torch.zeros(2, dtype=torch.float64).index_add_(0, gid[valid], tok.detach().reshape(-1)[valid])
    torch.testing.assert_close(out.group_loss.double(), gl, **tol(torch.float32, device))
    assert out.group_count.tolist() == [10, 20]
    torch.testing.assert_close(z.grad.double(), zd.grad, **tol(torch.float32, device))


@pytest.mark.parametrize("device,backend", DB)
def test_cross_entropy_bf16_and_all_ignored(device, backend):
    g = torch.Generator().manual_seed(7)
    z = (torch.randn(20, 77, generator=g) * 3).bfloat16().requires_grad_()
    y = torch.randint(0, 77, (20,), generator=g)
    with mixkernels.backend(backend):
        out = on(device, mixkernels.cross_entropy)(z, y)
        out.loss.backward()
        ignored = on(device, mixkernels.cross_entropy)(z.detach(), torch.full((20,), -100))
    ref = F.cross_entropy(z.detach().double(), y)
    torch.testing.assert_close(out.loss.double(), ref, atol=1e-5, rtol=1e-5)  # fp32 math on bf16 logits
    assert z.grad.dtype == torch.bfloat16
    assert ignored.loss.item() == 0.0


# ---- bad input ---------------------------------------------------------------------------------


def test_bad_inputs_name_argument_and_value():
    h, w, _b, y = make(n=6, v=10, ignore_every=0)
    lce = mixkernels.linear_cross_entropy
    bad = y.clone()
    bad[4] = 10
    with pytest.raises(ValueError, match=r"labels\[4\] = 10 is out of range \[0, 10\)"):
        lce(h, w, bad)
    bad2 = y.reshape(2, 3).clone()
    bad2[1, 2] = -7
    with pytest.raises(ValueError, match=r"labels\[1, 2\] = -7 .*ignore_index = -100"):
        lce(h.reshape(2, 3, 24), w, bad2)
    with pytest.raises(ValueError, match=r"group_ids\[3\] = 5 is out of range \[0, 4\)"):
        lce(h, w, y, group_ids=torch.tensor([0, 1, 2, 5, 0, 0]), num_groups=4)
    with pytest.raises(ValueError, match=r"weight has shape \(10, 23\) but hidden has shape \(6, 24\)"):
        lce(h, w[:, :23], y)
    with pytest.raises(ValueError, match=r"labels has shape \(5,\) but hidden has shape \(6, 24\)"):
        lce(h, w, y[:5])
    with pytest.raises(TypeError, match=r"weight is float16 but hidden is float32"):
        lce(h, w.half(), y)
    with pytest.raises(ValueError, match=r"bias has shape \(9,\) but weight has shape \(10, 24\)"):
        lce(h, w, y, bias=torch.zeros(9))
    with pytest.raises(ValueError, match=r"hidden is on cpu but weight is on meta"):
        lce(h, w.to("meta"), y)
    with pytest.raises(ValueError, match=r"num_groups must be an int >= 1 when group_ids is given, got None"):
        lce(h, w, y, group_ids=torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"group_ids has shape \(4,\) but labels has shape \(6,\)"):
        lce(h, w, y, group_ids=torch.zeros(4, dtype=torch.long), num_groups=2)
    with pytest.raises(ValueError, match=r"reduction must be 'mean', 'sum' or 'none', got 'avg'"):
        lce(h, w, y, reduction="avg")
    with pytest.raises(ValueError, match=r"chunk_size must be None or an int >= 1, got 0"):
        lce(h, w, y, chunk_size=0)
    with pytest.raises(TypeError, match=r"labels must be one of int32, int64, got float32"):
        lce(h, w, y.float())
    with pytest.raises(ValueError, match=r"labels\[0\] = 99 is out of range \[0, 10\)"):
        mixkernels.cross_entropy(torch.randn(2, 10), torch.tensor([99, 1]))
    # ignored tokens may carry any group id (e.g. padding with -1)
    y2 = y.clone()
    y2[0] = -100
    lce(h, w, y2, group_ids=torch.tensor([-1, 0, 1, 1, 0, 0]), num_groups=2)


@pytest.mark.parametrize("device", DEVICES[1:])
def test_bad_inputs_on_cuda(device):
    """The argument checks run before dispatch, on CUDA tensors too (out-of-range labels are a
    device-side assert there, covered by the segment_sum subprocess test's mechanism)."""
    h, w, _b, y = make(n=6, v=10, ignore_every=0)
    h, w, y = h.detach().to(device), w.detach().to(device), y.to(device)
    lce = mixkernels.linear_cross_entropy
    with pytest.raises(ValueError, match=r"weight has shape \(10, 23\) but hidden has shape \(6, 24\)"):
        lce(h, w[:, :23], y)
    with pytest.raises(TypeError, match=r"weight is float16 but hidden is float32"):
        lce(h, w.half(), y)
    with pytest.raises(ValueError, match=r"hidden is on cuda:0 but weight is on cpu"):
        lce(h, w.cpu(), y)
    with pytest.raises(TypeError, match=r"labels must be one of int32, int64, got float32"):
        lce(h, w, y.float())


# ---- transformers helper -----------------------------------------------------------------------


def _tiny(kind: str):
    transformers = pytest.importorskip("transformers")
    common = {"vocab_size": 151, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
    torch.manual_seed(0)
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)).eval()
    cfg = transformers.Qwen2MoeConfig(**common, moe_intermediate_size=16, shared_expert_intermediate_size=32,
                                      num_experts=4, num_experts_per_tok=2)
    return transformers.Qwen2MoeForCausalLM(cfg).eval()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["llama", "qwen2_moe"])
def test_hf_causal_lm_loss(device, kind):
    import mixkernels.hf as mkhf

    model = _tiny(kind).to(device)
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(0, 151, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[2, :4] = -100  # prompt tokens not trained on
    d_ids, d_mask, d_labels = (t.to(device) for t in (ids, mask, labels))
    hf_out = model(input_ids=d_ids, attention_mask=d_mask, labels=d_labels)
    out = tree_to(mkhf.causal_lm_loss(model, d_ids, d_mask, d_labels, group_ids=torch.arange(3, device=device),
                                      num_groups=3, return_token_loss=True), "cpu")
    close = {"atol": 1e-5, "rtol": 1e-5} if device == "cpu" else tol(torch.float32, device)
    torch.testing.assert_close(out.loss, hf_out.loss.cpu(), **close)
    # per-example mean losses from the model's own logits
    logits = hf_out.logits.detach().double().cpu()
    tok = F.cross_entropy(logits[:, :-1].reshape(-1, 151), labels[:, 1:].reshape(-1), reduction="none").reshape(3, 11)
    counted = (labels[:, 1:] != -100)
    per_example = tok.sum(1) / counted.sum(1)
    torch.testing.assert_close((out.group_loss / out.group_count).double(), per_example, **close)
    assert out.group_count.tolist() == counted.sum(1).tolist()
    torch.testing.assert_close(out.token_loss[:, :-1].double(), tok, **close)
    # gradients of the LM head and of the embeddings match HF's loss
    model.zero_grad()
    hf_out.loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    mkhf.causal_lm_loss(model, d_ids, d_mask, d_labels).loss.backward()
    for name, grad in ref.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad,
                                   **({"atol": 1e-5, "rtol": 1e-4} if device == "cpu" else close))


def test_hf_default_labels_and_per_token_groups():
    import mixkernels.hf as mkhf

    model = _tiny("llama")
    ids = torch.randint(0, 151, (2, 8), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    a = mkhf.causal_lm_loss(model, ids, mask)
    b = mkhf.causal_lm_loss(model, ids, mask, labels)
    torch.testing.assert_close(a.loss, b.loss)
    per_tok = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0, 0]])
    out = mkhf.causal_lm_loss(model, ids, mask, group_ids=per_tok, num_groups=2, reduction="none")
    # position t predicts token t+1, whose group counts: shift the group ids like the labels
    shifted = torch.nn.functional.pad(per_tok[:, 1:], (0, 1))
    valid = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100) != -100
    exp = torch.zeros(2).index_add_(0, shifted[valid], out.loss.detach()[valid])
    torch.testing.assert_close(out.group_loss, exp)
    torch.testing.assert_close(out.loss.sum() / valid.sum(), b.loss)


def test_causal_lm_loss_unwraps_peft_lora_model():
    """A PEFT LoRA model: the fused loss equals the model's own loss and trains the LoRA weights."""
    peft = pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    import mixkernels.hf

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = peft.get_peft_model(LlamaForCausalLM(cfg), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero B so LoRA changes the output
            torch.nn.init.normal_(p, std=0.1)
    ids = torch.randint(0, 61, (3, 9))
    out = mixkernels.hf.causal_lm_loss(model, ids)
    torch.testing.assert_close(out.loss, model(input_ids=ids, labels=ids).loss, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_" in n)
