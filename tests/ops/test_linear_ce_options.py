"""softcap / logit_scale / z_loss of linear_cross_entropy and cross_entropy, every backend, against
an independent fp64 oracle: the plain eager formula on materialised logits
(``z = softcap * tanh(logit_scale * (h W^T + b) / softcap)``, ``F.cross_entropy`` +
``z_loss * logsumexp(z)**2``), its gradients from ``torch.func.vjp``, and a hand-computed case."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mixkernels
from mixkernels import _backend
from tests._devices import device_backends, on
from tests._tolerances import assert_error_within, tol
from tests.ops.test_linear_ce import make

BACKENDS = [b for b in ("reference", "cxx") if not _backend.unavailable_reason("linear_ce", "cpu", b)]
DB = device_backends("linear_ce")

# (softcap, logit_scale, z_loss): each option alone, then all three together (Gemma 2 caps at 30 with
# logits of a few units; the caps here are small so the tanh is far from linear on these logits)
OPTIONS = [(2.0, 1.0, 0.0), (None, 0.4, 0.0), (None, 1.0, 0.05), (1.5, 2.5, 0.02)]
OPTION_IDS = ["softcap", "logit_scale", "z_loss", "all"]


def final_logits(raw: torch.Tensor, softcap, logit_scale) -> torch.Tensor:
    z = raw * logit_scale
    return softcap * torch.tanh(z / softcap) if softcap else z


def eager_loss(z, y, softcap=None, logit_scale=1.0, z_loss=0.0, smoothing=0.0, reduction="mean", ignore_index=-100):
    """(loss, token CE, per-token z-loss, reduced z-loss) of raw logits z [N, V] (fp64, differentiable)."""
    zf = final_logits(z, softcap, logit_scale)
    tok = F.cross_entropy(zf, y, ignore_index=ignore_index, label_smoothing=smoothing, reduction="none")
    valid = y != ignore_index
    zl = torch.where(valid, z_loss * torch.logsumexp(zf, dim=-1).square(), 0.0)
    total = tok + zl
    if reduction == "none":
        return total, tok, zl, zl
    denom = valid.sum().clamp(min=1) if reduction == "mean" else 1
    return total.sum() / denom, tok, zl, zl.sum() / denom


def oracle(h, w, y, b=None, groups=None, num_groups=0, upstream=None, **opts):
    """fp64: (loss, token CE, z_loss output, group CE sums, grads of h, w, b via torch.func.vjp)."""
    shape = y.shape
    y = y.reshape(-1)
    reduction = opts.get("reduction", "mean")

    def f(h, w, *b):
        logits = h.reshape(-1, h.shape[-1]) @ w.T
        if b:
            logits = logits + b[0]
        loss = eager_loss(logits, y, **opts)[0]
        return loss.reshape(shape) if reduction == "none" else loss

    args = (h.detach().double(), w.detach().double(), b.detach().double() if b is not None else None)
    loss, vjp = torch.func.vjp(f, *(a for a in args if a is not None))
    up = torch.ones_like(loss) if upstream is None else upstream.double().reshape(loss.shape)
    grads = vjp(up)
    grads = grads if b is not None else (*grads, None)
    with torch.no_grad():
        logits = args[0].reshape(-1, h.shape[-1]) @ args[1].T + (args[2] if b is not None else 0)
        _, tok, _zl_tok, zl_out = eager_loss(logits, y, **opts)
    gl = None
    if groups is not None:
        valid = y != opts.get("ignore_index", -100)
        gid = torch.where(valid, groups.reshape(-1), 0)
        gl = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, gid, torch.where(valid, tok, 0.0))
    zl_out = zl_out.reshape(shape) if reduction == "none" else zl_out
    return loss, tok.reshape(shape), zl_out, gl, grads


def run(target, h, w, y, b=None, upstream=None, **kw):
    device, backend = target
    for t in (h, w, b):
        if t is not None:
            t.grad = None
    with mixkernels.backend(backend):
        out = on(device, mixkernels.linear_cross_entropy)(h, w, y, bias=b, return_token_loss=True, **kw)
    out.loss.backward(torch.ones_like(out.loss) if upstream is None else upstream.to(out.loss.dtype))
    return out, (h.grad, w.grad, b.grad if b is not None else None)


def check(out, grads, ref, *, z_loss, device="cpu", dtype=torch.float32, groups=True):
    loss, tok, zl, gl, ref_grads = ref
    fp32 = tol(torch.float32, device)
    torch.testing.assert_close(out.loss.double(), loss, **fp32)
    torch.testing.assert_close(out.token_loss.double(), tok, **fp32)  # pure cross-entropy
    if z_loss:
        assert out.z_loss is not None and out.z_loss.shape == out.loss.shape and not out.z_loss.requires_grad
        torch.testing.assert_close(out.z_loss.double(), zl, **fp32)
    else:
        assert out.z_loss is None
    if groups:
        torch.testing.assert_close(out.group_loss.double(), gl, **fp32)
    for got, exp in zip(grads, ref_grads):
        if exp is None:
            assert got is None
            continue
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), exp, **tol(dtype, device))


@pytest.mark.parametrize("device,backend", DB)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("softcap,logit_scale,z_loss", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("bias,smoothing", [(False, 0.0), (True, 0.1)])
def test_options_parity(device, backend, reduction, softcap, logit_scale, z_loss, bias, smoothing):
    # N = 37 (not a multiple of chunk_size = 8), V = 101 (odd), every 5th token ignored, 4 groups
    h, w, b, y = make(bias=bias, scale=0.6)
    groups = torch.randint(0, 4, (37,), generator=torch.Generator().manual_seed(1))
    up = torch.randn(37, generator=torch.Generator().manual_seed(2)) if reduction == "none" else None
    opts = {"softcap": softcap, "logit_scale": logit_scale, "z_loss": z_loss}
    out, grads = run((device, backend), h, w, y, b, upstream=up, group_ids=groups, num_groups=4, chunk_size=8,
                     reduction=reduction, label_smoothing=smoothing, **opts)
    ref = oracle(h, w, y, b, groups, 4, upstream=up, reduction=reduction, smoothing=smoothing, **opts)
    check(out, grads, ref, z_loss=z_loss, device=device)


@pytest.mark.parametrize("device,backend", DB)
def test_options_btd_frozen_head_upstream_scalar(device, backend):
    """[B, T, d] input with per-sequence groups, a frozen head (no weight gradient: the LoRA path)
    and an upstream scalar != 1 applied to gradients the forward computed."""
    h, w, b, y = make(n=4 * 9, bias=True, ignore_every=4, scale=0.6)
    h3 = h.detach().reshape(4, 9, 24).requires_grad_()
    w.requires_grad_(False)
    b.requires_grad_(False)
    opts = {"softcap": 2.0, "logit_scale": 1.7, "z_loss": 0.03}
    out, grads = run((device, backend), h3, w, y.reshape(4, 9), b, upstream=torch.tensor(-1.5),
                     group_ids=torch.tensor([1, 0, 2, 1]), num_groups=3, reduction="sum", **opts)
    ref = oracle(h3, w, y.reshape(4, 9), b, torch.tensor([1, 0, 2, 1])[:, None].expand(4, 9), 3,
                 upstream=torch.tensor(-1.5), reduction="sum", **opts)
    assert grads[1] is None and grads[2] is None
    check(out, (grads[0], None, None), (*ref[:4], (ref[4][0], None, None)), z_loss=0.03, device=device)


@pytest.mark.parametrize("device,backend", DB)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("softcap,logit_scale,z_loss", OPTIONS, ids=OPTION_IDS)
def test_cross_entropy_options(device, backend, reduction, softcap, logit_scale, z_loss):
    g = torch.Generator().manual_seed(6)
    z = (torch.randn(3, 11, 53, generator=g) * 3).requires_grad_()
    y = torch.randint(0, 53, (3, 11), generator=g)
    y[:, -1] = -100
    seq = torch.tensor([1, 0, 1])
    up = torch.randn(3, 11, generator=g) if reduction == "none" else None
    opts = {"softcap": softcap, "logit_scale": logit_scale, "z_loss": z_loss}
    with mixkernels.backend(backend):
        out = on(device, mixkernels.cross_entropy)(z, y, group_ids=seq, num_groups=2, reduction=reduction,
                                                   label_smoothing=0.1, return_token_loss=True, **opts)
    out.loss.backward(torch.ones_like(out.loss) if up is None else up)
    zd = z.detach().double().reshape(-1, 53)

    def f(zd):
        loss = eager_loss(zd, y.reshape(-1), smoothing=0.1, reduction=reduction, **opts)[0]
        return loss.reshape(3, 11) if reduction == "none" else loss

    loss, vjp = torch.func.vjp(f, zd)
    (gz,) = vjp(torch.ones_like(loss) if up is None else up.double())
    _, tok, _, zl = eager_loss(zd, y.reshape(-1), smoothing=0.1, reduction=reduction, **opts)
    fp32 = tol(torch.float32, device)
    torch.testing.assert_close(out.loss.double(), loss, **fp32)
    torch.testing.assert_close(out.token_loss.double(), tok.reshape(3, 11), **fp32)
    if z_loss:
        torch.testing.assert_close(out.z_loss.double(), zl.reshape(3, 11) if reduction == "none" else zl, **fp32)
    else:
        assert out.z_loss is None
    gid = seq[:, None].expand(3, 11).reshape(-1)
    valid = y.reshape(-1) != -100
    gl = torch.zeros(2, dtype=torch.float64).index_add_(0, gid[valid], tok[valid])
    torch.testing.assert_close(out.group_loss.double(), gl, **fp32)
    torch.testing.assert_close(z.grad.double().reshape(-1, 53), gz, **fp32)


@pytest.mark.parametrize("device,backend", DB)
@pytest.mark.parametrize("softcap", [30.0, 50.0])  # Gemma 2's final and attention caps
@pytest.mark.parametrize("offset", [0.0, -1e4, 1e4])
def test_softcap_at_realistic_caps_and_saturated_logits(device, backend, softcap, offset):
    # logits spread over hundreds of units around 0 or pushed to -1e4 / +1e4 (every final logit
    # then sits at -C or +C): loss and gradient stay those of the fp64 formula
    g = torch.Generator().manual_seed(9)
    z = (torch.randn(6, 301, generator=g) * 200 + offset).requires_grad_()
    y = torch.randint(0, 301, (6,), generator=g)
    y[2] = -100
    with mixkernels.backend(backend):
        out = on(device, mixkernels.cross_entropy)(z, y, softcap=softcap, z_loss=1e-4, label_smoothing=0.1,
                                                   return_token_loss=True)
    out.loss.backward()
    loss, vjp = torch.func.vjp(lambda zd: eager_loss(zd, y, softcap=softcap, z_loss=1e-4, smoothing=0.1)[0],
                               z.detach().double())
    (gz,) = vjp(torch.ones_like(loss))
    fp32 = tol(torch.float32, device)
    torch.testing.assert_close(out.loss.double(), loss, **fp32)
    torch.testing.assert_close(z.grad.double(), gz, **fp32)


@pytest.mark.parametrize("device,backend", DB)
def test_hand_computed(device, backend):
    """Two tokens, V = 2, logits (0, 0) and (a, -a): lse = log 2 and log(2 cosh a') with a' the
    capped, scaled a; every number below is worked out by hand."""
    a, s, c, lam = 3.0, 0.5, 1.0, 0.1
    z = torch.tensor([[0.0, 0.0], [a, -a]])
    y = torch.tensor([0, 1])
    with mixkernels.backend(backend):
        out = on(device, mixkernels.cross_entropy)(z, y, reduction="none", softcap=c, logit_scale=s, z_loss=lam,
                                                   return_token_loss=True)
    ap = c * math.tanh(s * a / c)
    lse = [math.log(2.0), math.log(math.exp(ap) + math.exp(-ap))]
    ce = [lse[0], lse[1] + ap]
    zl = [lam * lse[0] ** 2, lam * lse[1] ** 2]
    torch.testing.assert_close(out.token_loss.double(), torch.tensor(ce, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.z_loss.double(), torch.tensor(zl, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.loss.double(), torch.tensor(ce, dtype=torch.float64) + torch.tensor(zl),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device,backend", DB)
def test_defaults_unchanged_and_zero_means_off(device, backend):
    h, w, b, y = make(bias=True)
    with mixkernels.backend(backend):
        base = on(device, mixkernels.linear_cross_entropy)(h, w, y, bias=b, reduction="none", chunk_size=8)
        off = on(device, mixkernels.linear_cross_entropy)(h, w, y, bias=b, reduction="none", chunk_size=8,
                                                          softcap=0, logit_scale=1.0, z_loss=0.0)
    assert base.z_loss is None and off.z_loss is None
    torch.testing.assert_close(off.loss, base.loss, rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", DB)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_with_options(device, backend, dtype):
    """fp16/bf16 inputs with all three options: error <= 2x PyTorch's own same-dtype error (logits
    in `dtype`, transform and loss in fp32 as transformers does) against the fp64 oracle."""
    h32, w32, b32, y = make(n=45, d=32, v=203, bias=True, scale=0.5)
    h, w, b = (t.detach().to(dtype).requires_grad_() for t in (h32, w32, b32))
    opts = {"softcap": 3.0, "logit_scale": 0.8, "z_loss": 1e-2}
    out, (gh, gw, gb) = run((device, backend), h, w, y, b, chunk_size=16, **opts)
    ref = oracle(h, w, y, b, **opts)
    ht, wt, bt = (t.detach().to(device).requires_grad_() for t in (h, w, b))
    yd = y.to(device)
    tl, _, _, _ = eager_loss((ht @ wt.T + bt).float(), yd, **opts)
    tl.backward()
    assert out.loss.dtype == torch.float32 and gh.dtype == dtype
    assert_error_within(out.loss, ref[0], tl.detach().cpu(), floor=1e-5, name="loss")
    for got, exp, tgrad, name in ((gh, ref[4][0], ht.grad, "grad_hidden"), (gw, ref[4][1], wt.grad, "grad_weight"),
                                  (gb, ref[4][2], bt.grad, "grad_bias")):
        assert_error_within(got, exp, tgrad.cpu(), name=name, floor=float(torch.finfo(dtype).eps) * exp.abs().max().item())


def test_gradcheck_float64_options():
    g = torch.Generator().manual_seed(5)
    h = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, generator=g, requires_grad=True)
    z = (torch.randn(7, 11, dtype=torch.float64, generator=g) * 3).requires_grad_()
    y = torch.randint(0, 11, (7,), generator=g)
    y[2] = -100
    opts = {"softcap": 1.5, "logit_scale": 1.3, "z_loss": 0.1}
    for backend in BACKENDS:
        for reduction in ("mean", "sum", "none"):
            def f(h, w, b, reduction=reduction, backend=backend):
                with mixkernels.backend(backend):
                    return mixkernels.linear_cross_entropy(h, w, y, bias=b, reduction=reduction, chunk_size=3,
                                                           label_smoothing=0.1, **opts).loss
            # a repeated backward recomputes from the fp32 log-sum-exp (see test_linear_ce)
            assert torch.autograd.gradcheck(f, (h, w, b), nondet_tol=1e-6)

            def fz(z, reduction=reduction, backend=backend):
                with mixkernels.backend(backend):
                    return mixkernels.cross_entropy(z, y, reduction=reduction, label_smoothing=0.2, **opts).loss
            assert torch.autograd.gradcheck(fz, (z,))


@pytest.mark.parametrize("device,backend", device_backends("linear_ce", ("cxx", "triton")))
def test_opcheck_options(device, backend):
    suffix = "_triton" if backend == "triton" else ""
    ops = torch.ops.mixkernels
    h, w, b, y = (t.detach().to(device).requires_grad_(t.requires_grad) for t in make(n=13, v=29, bias=True))
    groups = torch.randint(0, 3, (13,)).to(device)
    for reduction in (0, 1, 2):
        for compute_grad in (False, True):
            for opts in ((2.0, 0.5, 0.01), (0.0, 1.0, 0.1), (3.0, 1.0, 0.0)):
                args = (h, w, y, b, groups, 3, -100, 0.1, reduction, 4, compute_grad, True, *opts)
                torch.library.opcheck(getattr(ops, f"linear_ce{suffix}").default, args)
    lse = torch.randn(13).to(device)
    torch.library.opcheck(getattr(ops, f"linear_ce_backward{suffix}").default,
                          (h.detach(), w.detach(), y, None, lse, torch.randn(13).to(device), -100, 0.0, 5,
                           2.0, 0.5, 0.01))
    z = torch.randn(13, 29).to(device).requires_grad_()
    for reduction in (0, 2):
        torch.library.opcheck(getattr(ops, f"cross_entropy{suffix}").default,
                              (z, y, groups, 3, -100, 0.0, reduction, 2.0, 0.5, 0.01))


def test_torch_compile_fullgraph_options():
    h, w, b, y = make(bias=True)

    def f(h, w, b):
        out = mixkernels.linear_cross_entropy(h, w, y, bias=b, chunk_size=16, softcap=2.0, logit_scale=0.7,
                                              z_loss=1e-2)
        return out.loss, out.z_loss

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss_c, zl_c = compiled(h, w, b)
    grads_c = torch.autograd.grad(loss_c, (h, w, b))
    loss_e, zl_e = f(h, w, b)
    grads_e = torch.autograd.grad(loss_e, (h, w, b))
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(zl_c, zl_e)
    for a, e in zip(grads_c, grads_e):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("op", ["linear_cross_entropy", "cross_entropy"])
@pytest.mark.parametrize("kw,message", [
    ({"softcap": -1.0}, r"softcap must be None, 0 \(off\) or a finite float > 0, got -1.0"),
    ({"softcap": float("nan")}, r"softcap must be .* got nan"),
    ({"softcap": float("inf")}, r"softcap must be .* got inf"),
    ({"softcap": "30"}, r"softcap must be .* got '30'"),
    ({"logit_scale": 0.0}, r"logit_scale must be a finite float > 0, got 0.0"),
    ({"logit_scale": -0.5}, r"logit_scale must be a finite float > 0, got -0.5"),
    ({"logit_scale": float("inf")}, r"logit_scale must be a finite float > 0, got inf"),
    ({"z_loss": -1e-4}, r"z_loss must be a finite float >= 0, got -0.0001"),
    ({"z_loss": float("nan")}, r"z_loss must be a finite float >= 0, got nan"),
    ({"z_loss": True}, r"z_loss must be a finite float >= 0, got True"),
])
def test_bad_option_values(op, kw, message):
    h, w, _b, y = make(n=6, v=10, ignore_every=0)
    with pytest.raises(ValueError, match=rf"mixkernels.{op}: {message}"):
        if op == "linear_cross_entropy":
            mixkernels.linear_cross_entropy(h, w, y, **kw)
        else:
            mixkernels.cross_entropy(torch.randn(6, 10), y, **kw)


@pytest.mark.skipif("cxx" not in BACKENDS, reason="needs the compiled extension")
def test_cxx_op_checks_option_values():
    """The C++ ops validate the options too (callers may use torch.ops directly)."""
    h, w, _b, y = make(n=6, v=10, ignore_every=0)
    with pytest.raises(RuntimeError, match=r"softcap must be 0 \(off\) or a finite float > 0, got -2"):
        torch.ops.mixkernels.linear_ce(h, w, y, None, None, 0, -100, 0.0, 2, 4, False, True, -2.0, 1.0, 0.0)
    with pytest.raises(RuntimeError, match=r"z_loss must be a finite float >= 0, got -1"):
        torch.ops.mixkernels.cross_entropy(torch.randn(6, 10), y, None, 0, -100, 0.0, 2, 0.0, 1.0, -1.0)
