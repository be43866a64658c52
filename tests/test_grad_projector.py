"""GradientProjector against exact per-example gradients from torch.func ``vmap(grad)``.

Models are tiny Llama / Qwen2 / GPT-2 (Conv1D) built from configs, and a PEFT LoRA wrapper; batches
are right-padded (padding positions carry label -100 and attention mask 0).
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, vmap
from torch.utils._python_dispatch import TorchDispatchMode

import mixkernels
from mixkernels import GradientProjector, projection_matrix
from tests._devices import DEVICES
from tests._tolerances import tol

transformers = pytest.importorskip("transformers")

VOCAB = 64


def _llama(dtype=torch.float32):
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def _qwen2():
    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(1)
    return transformers.Qwen2ForCausalLM(cfg).eval()


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    cfg._attn_implementation = "eager"
    torch.manual_seed(2)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _batch(b=3, t=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    for i in range(1, b):  # different lengths, right padding
        mask[i, max(2, t - 2 * i):] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each example: [B, T, V], [B, T] -> [B]."""
    lp = torch.log_softmax(logits[:, :-1].float(), -1)
    tgt = labels[:, 1:]
    keep = tgt != -100
    nll = -lp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0] * keep
    return nll.sum(1) / keep.sum(1).clamp(min=1)


def _decoder_linears(name: str, module: torch.nn.Module) -> bool:
    return ".layers." in name or ".h." in name


def _on_model(model, batch):
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


def _oracle(model, batch, names):
    """Exact per-example gradients {name: [B, *weight.shape]} via torch.func vmap(grad), on the
    model's device; returned on CPU."""
    batch = _on_model(model, batch)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss_one(p, ids, mask, labels):
        out = functional_call(model, (p, buffers), (), {"input_ids": ids[None], "attention_mask": mask[None]})
        return _example_loss(out.logits, labels[None])[0]

    wanted = {n + ".weight" for n in names}
    g = vmap(grad(loss_one), in_dims=(None, 0, 0, 0))(params, batch["input_ids"], batch["attention_mask"], batch["labels"])
    return {n: g[n + ".weight"].float().cpu() for n in names if n + ".weight" in wanted}


def _capture(gp, model, batch, **kw):
    """Projected gradients of ``batch`` (moved to the model's device), returned on CPU."""
    batch = _on_model(model, batch)
    with gp.capture(**kw):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        _example_loss(out.logits, batch["labels"]).sum().backward()
    return gp.grads().cpu()


def _check_factored(gp, G, oracle, rtol=1e-4, atol=1e-5):
    assert G.dtype == torch.float32 and G.shape[1] == gp.dim
    for name in gp.module_names:
        p_in, p_out = (p.cpu() for p in gp.projections(name))
        gb = oracle[name]
        if gp._by_name[name].conv1d:
            gb = gb.transpose(1, 2)  # Conv1D stores [d_in, d_out]; sketches use [d_out, d_in]
        expected = (p_out.T @ gb @ p_in).reshape(gb.shape[0], -1)
        torch.testing.assert_close(G[:, gp.slices[name]], expected, rtol=rtol, atol=atol, msg=name)


def _check_projected(gp, G, oracle, rtol=1e-4, atol=1e-4):
    v = torch.cat([oracle[n].reshape(oracle[n].shape[0], -1) for n in gp.module_names], 1)
    r = projection_matrix(v.shape[1], gp.proj_dim, seed=gp.seed, kind=gp.kind, nnz=gp.nnz)
    torch.testing.assert_close(G, v @ r, rtol=rtol, atol=atol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make", [_llama, _qwen2, _gpt2], ids=["llama", "qwen2", "gpt2-conv1d"])
@pytest.mark.parametrize("weight_grads", [True, False])
def test_factored_matches_vmap_grad(device, make, weight_grads):
    model = make().to(device)
    batch = _batch()
    gp = GradientProjector(model, kind="factored", rank=(4, 6), seed=3, modules=_decoder_linears)
    assert len(gp.module_names) == 14 if make is not _gpt2 else 8
    G = _capture(gp, model, batch, weight_grads=weight_grads)
    _check_factored(gp, G, _oracle(model, batch, gp.module_names),
                    **({} if device == "cpu" else tol(torch.float32, device)))
    projected = [gp._by_name[n].module.weight for n in gp.module_names]
    assert all(w.requires_grad for w in projected)  # restored after capture(weight_grads=False)
    assert all((w.grad is not None) == weight_grads for w in projected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["rademacher", "gaussian", "sjlt"])
def test_projection_kinds_match_vmap_grad(device, kind):
    model = _llama().to(device)
    batch = _batch()
    gp = GradientProjector(model, kind=kind, proj_dim=48, seed=5, modules=_decoder_linears)
    G = _capture(gp, model, batch, weight_grads=kind != "gaussian")
    assert G.shape == (3, 48)
    _check_projected(gp, G, _oracle(model, batch, gp.module_names))


def test_projection_kind_conv1d_uses_parameter_layout():
    model = _gpt2()
    batch = _batch(b=2, t=6)
    gp = GradientProjector(model, kind="rademacher", proj_dim=32, seed=1, modules=_decoder_linears)
    _check_projected(gp, _capture(gp, model, batch), _oracle(model, batch, gp.module_names))


def test_batch_of_one_and_list_selection_order():
    model = _llama()
    batch = _batch(b=1, t=5)
    names = ["model.layers.1.mlp.down_proj", "model.layers.0.self_attn.q_proj"]
    gp = GradientProjector(model, rank=(3, 5), modules=names)
    assert gp.module_names == names
    G = _capture(gp, model, batch)
    assert G.shape == (1, 2 * 15)
    _check_factored(gp, G, _oracle(model, batch, names))


@pytest.mark.parametrize("device", DEVICES)
def test_padding_positions_contribute_nothing(device):
    model = _llama().to(device)
    batch = _batch(b=2, t=8)
    gp = GradientProjector(model, rank=(4, 4), modules=_decoder_linears)
    G = _capture(gp, model, batch)
    n = int(batch["attention_mask"][1].sum())
    assert n < 8
    short = {k: v[1:, :n] for k, v in batch.items()}  # example 1 alone, without its padding
    G1 = _capture(gp, model, short)
    # (on CUDA the two batch shapes take different GEMM tilings: their fp32 sums differ in the last bits)
    torch.testing.assert_close(G[1:], G1, rtol=1e-4, atol=1e-6 if device == "cpu" else 1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_model_fp32_accumulation(device):
    model = _llama(torch.bfloat16).to(device)
    batch = _batch()
    gp = GradientProjector(model, rank=(4, 4), modules=_decoder_linears)
    G = _capture(gp, model, batch)
    assert G.dtype == torch.float32
    oracle = _oracle(model, batch, gp.module_names)  # bf16 per-example grads, upcast
    for name in gp.module_names:
        p_in, p_out = (p.cpu() for p in gp.projections(name))
        expected = (p_out.T @ oracle[name] @ p_in).reshape(3, -1)
        err = (G[:, gp.slices[name]] - expected).norm() / expected.norm()
        assert err < 3e-2, (name, float(err))


def test_peft_lora_only_a_b_layers():
    peft = pytest.importorskip("peft")
    base = _llama()
    for p in base.parameters():
        p.requires_grad_(False)
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    ).eval()
    torch.manual_seed(7)
    for n, p in model.named_parameters():  # lora_B starts at zero: make both factors non-trivial
        if "lora_" in n:
            p.data.normal_(0, 0.2)
    batch = _batch()
    gp = GradientProjector(model, rank=(4, 4))
    assert gp.module_names and all(".lora_A." in n or ".lora_B." in n for n in gp.module_names)
    assert len(gp.module_names) == 8
    oracle = _oracle(model, batch, gp.module_names)
    _check_factored(gp, _capture(gp, model, batch), oracle)
    # Base model and embeddings frozen: weight_grads=False must keep the gradient chain alive.
    G = _capture(gp, model, batch, weight_grads=False)
    _check_factored(gp, G, oracle)
    gpr = GradientProjector(model, kind="sjlt", proj_dim=40, nnz=2)
    _check_projected(gpr, _capture(gpr, model, batch, weight_grads=False), oracle)


class _ShapeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.add(tuple(t.shape))
        return out


def test_factored_never_forms_per_example_weight_gradients():
    model = _llama()
    batch = _batch(b=3, t=9)
    gp = GradientProjector(model, rank=(4, 4), modules=_decoder_linears)
    rec = _ShapeRecorder()
    with rec:
        G = _capture(gp, model, batch, weight_grads=False)
    assert G.shape == (3, 14 * 16)
    for name in gp.module_names:
        t = gp._by_name[name]
        for bad in ((3, t.d_out, t.d_in), (3, 9, t.d_out, t.d_in), (27, t.d_out, t.d_in)):
            assert bad not in rec.shapes, (name, bad)


@pytest.mark.parametrize("device", DEVICES)
def test_backends_agree_through_the_projector(device):
    model = _llama().to(device)
    batch = _batch()
    results = {}
    backends = ("reference", "auto") if device == "cpu" else ("reference", "auto", "cxx", "triton")
    for backend in backends:
        with mixkernels.backend(backend):
            gp = GradientProjector(model, rank=(4, 4), modules=_decoder_linears)
            gpr = GradientProjector(model, kind="rademacher", proj_dim=64, modules=_decoder_linears)
            results[backend] = (_capture(gp, model, batch), _capture(gpr, model, batch))
    for backend in backends[1:]:
        for a, b in zip(results["reference"], results[backend]):
            torch.testing.assert_close(a, b, **({"rtol": 1e-4, "atol": 1e-5} if device == "cpu" else tol(torch.float32, device)),
                                       msg=lambda m, backend=backend: f"{backend}: {m}")


def test_projections_are_stable_and_seeded_by_name():
    model = _llama()
    a = GradientProjector(model, rank=(4, 4), seed=9, modules=_decoder_linears)
    b = GradientProjector(model, rank=(4, 4), seed=9, modules=["model.layers.1.mlp.up_proj"])
    for pa, pb in zip(a.projections("model.layers.1.mlp.up_proj"), b.projections("model.layers.1.mlp.up_proj")):
        assert torch.equal(pa, pb)
    c = GradientProjector(model, rank=(4, 4), seed=10, modules=_decoder_linears)
    assert not torch.equal(a.projections("model.layers.1.mlp.up_proj")[0], c.projections("model.layers.1.mlp.up_proj")[0])


def test_bad_arguments_have_clear_messages():
    model = _llama()
    with pytest.raises(ValueError, match="kind must be one of"):
        GradientProjector(model, kind="dense")
    with pytest.raises(ValueError, match="rank must be a pair"):
        GradientProjector(model, rank=(0, 4))
    with pytest.raises(ValueError, match="needs proj_dim"):
        GradientProjector(model, kind="rademacher")
    with pytest.raises(ValueError, match="proj_dim is only used"):
        GradientProjector(model, proj_dim=8)
    with pytest.raises(ValueError, match="not a module of the model"):
        GradientProjector(model, modules=["model.layers.9.q_proj"])
    with pytest.raises(ValueError, match="is a LlamaDecoderLayer"):
        GradientProjector(model, modules=["model.layers.0"])
    gp = GradientProjector(model, rank=(2, 2))
    with pytest.raises(RuntimeError, match="nothing captured"):
        gp.grads()
    with pytest.raises(KeyError, match="not projected"):
        gp.projections("nope")
    gpr = GradientProjector(model, kind="sjlt", proj_dim=8)
    with pytest.raises(ValueError, match="slices is defined for kind='factored'"):
        _ = gpr.slices
