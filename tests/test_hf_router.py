"""mixkernels.hf.RouterStatsCollector on tiny random transformers MoE models built from configs,
compared with the naive oracle applied to ``output_router_logits=True`` outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mixkernels
import mixkernels.hf
from tests._devices import DEVICES, tree_to
from tests.ops.test_router_stats import FIELDS, assert_matches, naive_oracle

transformers = pytest.importorskip("transformers")

VOCAB = 97


def tiny_qwen2_moe():
    config = transformers.Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        num_experts=7, num_experts_per_tok=3, decoder_sparse_step=1, mlp_only_layers=[2],
    )
    return transformers.Qwen2MoeForCausalLM(config).eval()


def tiny_mixtral():
    config = transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=5, num_experts_per_tok=2,
    )
    return transformers.MixtralForCausalLM(config).eval()


def tiny_qwen3_moe():
    config = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=6, num_experts_per_tok=2,
    )
    return transformers.Qwen3MoeForCausalLM(config).eval()


def tiny_olmoe():
    config = transformers.OlmoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_experts=9, num_experts_per_tok=4,
    )
    return transformers.OlmoeForCausalLM(config).eval()


MODELS = {"qwen2_moe": tiny_qwen2_moe, "mixtral": tiny_mixtral, "qwen3_moe": tiny_qwen3_moe, "olmoe": tiny_olmoe}


def _batch(batch, seq, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=gen)
    am = torch.ones(batch, seq, dtype=torch.long)
    am[0, :3] = 0  # left padding
    am[-1, -2:] = 0  # right padding
    return ids, am


def _oracle_from_outputs(outputs_and_batches, top_k, layers, domains, num_groups):
    """Oracle stats over several forwards from their output_router_logits."""
    logits = [torch.cat([out.router_logits[i].cpu() for out, _ in outputs_and_batches]) for i in layers]
    masks = torch.cat([am.reshape(-1).cpu() for _, am in outputs_and_batches]) != 0
    seq = [am.shape[1] for _, am in outputs_and_batches]
    token_groups = torch.cat([d.repeat_interleave(s) for d, s in zip(domains, seq)])
    return naive_oracle([z.detach() for z in logits], top_k, token_groups, num_groups, masks)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["qwen2_moe", "mixtral"])
def test_collector_matches_output_router_logits_oracle(device, name):
    torch.manual_seed(0)
    model = MODELS[name]().to(device)
    top_k = model.config.num_experts_per_tok
    batches = tree_to([_batch(3, 9, 1), _batch(2, 6, 2)], device)  # two forwards, different shapes
    domains = tree_to([torch.tensor([2, 0, 2]), torch.tensor([1, 2])], device)
    outputs = []
    with torch.no_grad(), mixkernels.hf.RouterStatsCollector(model, layers="all") as collector:
        for ids, am in batches:
            outputs.append((model(input_ids=ids, attention_mask=am, output_router_logits=True), am))
    num_routers = len(outputs[0][0].router_logits)
    assert len(collector.router_names) == num_routers
    if name == "qwen2_moe":
        assert num_routers == 3  # layer 2 is dense (mlp_only_layers)
        assert all("shared_expert_gate" not in n for n in collector.router_names)
    expected = _oracle_from_outputs(outputs, top_k, range(num_routers), tree_to(domains, "cpu"), 3)
    # explicit masks (a list, one per forward) ...
    stats = collector.stats(group_ids=torch.cat(domains), num_groups=3, attention_mask=[am for _, am in batches])
    assert_matches(tree_to(stats, "cpu"), expected, what=name, device=device)
    assert collector.num_forwards == 0  # reset

    # ... and the masks recorded from the forwards' kwargs; the model's own aux loss agrees
    with torch.no_grad(), mixkernels.hf.RouterStatsCollector(model) as collector:
        out = model(input_ids=batches[0][0], attention_mask=batches[0][1], output_router_logits=True)
    stats = collector.stats(group_ids=domains[0], num_groups=3, attention_mask="forward")
    assert_matches(tree_to(stats, "cpu"), _oracle_from_outputs([(out, batches[0][1])], top_k, range(num_routers),
                                                            tree_to(domains[:1], "cpu"), 3), device=device)
    torch.testing.assert_close(stats.load_balancing_loss(), out.aux_loss, atol=1e-6 if device == "cpu" else 1e-5,
                               rtol=1e-5)


@pytest.mark.parametrize("name", ["qwen2_moe", "mixtral"])
@pytest.mark.parametrize("layers", ["last", [0], [-1, 0]], ids=str)
def test_collector_layer_selection(name, layers):
    torch.manual_seed(1)
    model = MODELS[name]()
    ids, am = _batch(2, 7, 3)
    with torch.no_grad(), mixkernels.hf.RouterStatsCollector(model, layers=layers) as collector:
        out = model(input_ids=ids, attention_mask=am, output_router_logits=True)
    count = len(out.router_logits)
    wanted = [count - 1] if layers == "last" else sorted({i % count for i in layers})
    assert collector.layer_indices == wanted
    stats = collector.stats(group_ids=torch.tensor([0, 1]), num_groups=2, attention_mask=am)
    assert_matches(stats, _oracle_from_outputs([(out, am)], model.config.num_experts_per_tok, wanted,
                                               [torch.tensor([0, 1])], 2))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["qwen3_moe", "olmoe"])
def test_collector_finds_routers_and_top_k_from_config(device, name):
    torch.manual_seed(2)
    model = MODELS[name]().to(device)
    ids, am = tree_to(_batch(2, 5, 4), device)
    with torch.no_grad(), mixkernels.hf.RouterStatsCollector(model) as collector:
        out = model(input_ids=ids, attention_mask=am, output_router_logits=True)
    assert collector.top_k == model.config.num_experts_per_tok
    assert len(collector.router_names) == model.config.num_hidden_layers
    stats = collector.stats(attention_mask="forward")
    expected = _oracle_from_outputs([(out, am)], collector.top_k, range(len(out.router_logits)),
                                    [torch.zeros(2, dtype=torch.long)], 1)
    assert_matches(tree_to(stats, "cpu"), expected, what=name, device=device)
    torch.testing.assert_close(stats.load_balancing_loss(), out.aux_loss, atol=1e-6 if device == "cpu" else 1e-5,
                               rtol=1e-5)


def test_collector_attention_mask_none_counts_padding():
    """attention_mask=None counts every token (padding included), as router_stats(mask=None)."""
    torch.manual_seed(5)
    model = tiny_mixtral()
    ids, am = _batch(2, 6, 7)
    with torch.no_grad(), mixkernels.hf.RouterStatsCollector(model) as collector:
        out = model(input_ids=ids, attention_mask=am, output_router_logits=True)
        model(input_ids=ids, attention_mask=am)
    stats = collector.stats(group_ids=[torch.tensor([1, 0]), torch.tensor([1, 1])], num_groups=2)
    assert stats.token_count.tolist() == [6, 18]  # all 24 tokens, padding included
    once = _oracle_from_outputs([(out, torch.ones_like(am))], 2, range(3), [torch.tensor([1, 0])], 2)
    torch.testing.assert_close(stats.prob_sum[:, 0], once[1][:, 0].float(), atol=1e-5, rtol=1e-5)
    with torch.no_grad(), mixkernels.hf.RouterStatsCollector(model) as collector:
        model(input_ids=ids, attention_mask=am)
    with pytest.raises(ValueError, match="attention_mask must be a tensor, a list of tensors, None or 'forward'"):
        collector.stats(attention_mask="padding")


def test_collector_ignores_checkpoint_recompute():
    torch.manual_seed(3)
    model = tiny_qwen2_moe().train()
    ids, am = _batch(2, 6, 5)
    with mixkernels.hf.RouterStatsCollector(model) as plain:
        model(input_ids=ids, attention_mask=am).logits.sum().backward()
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with mixkernels.hf.RouterStatsCollector(model) as checkpointed:
        model(input_ids=ids, attention_mask=am).logits.sum().backward()
    a, b = plain.stats(attention_mask=am), checkpointed.stats(attention_mask=am)
    for field in FIELDS:
        torch.testing.assert_close(getattr(b, field), getattr(a, field), msg=field)


class _UserMoE(nn.Module):
    """A non-transformers MoE whose router is a plain nn.Linear named 'router'."""

    def __init__(self, hidden=8, experts=5):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"router": nn.Linear(hidden, experts)}) for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            flat = x.reshape(-1, x.shape[-1])
            x = x + 0.1 * torch.tanh(block["router"](flat)).sum(-1, keepdim=True).view(*x.shape[:-1], 1)
        return x


def test_collector_user_named_linear_router():
    torch.manual_seed(4)
    model = _UserMoE()
    x = torch.randn(3, 4, 8)
    with pytest.raises(ValueError, match="found no MoE router"):
        mixkernels.hf.RouterStatsCollector(model, top_k=2)
    with pytest.raises(ValueError, match="pass top_k"):
        mixkernels.hf.RouterStatsCollector(model, router_names=["blocks.0.router"])
    names = ["blocks.0.router", "blocks.1.router"]
    logits = []
    handles = [model.get_submodule(n).register_forward_hook(lambda m, a, o: logits.append(o.detach())) for n in names]
    with torch.no_grad(), mixkernels.hf.RouterStatsCollector(model, top_k=2, router_names=names) as collector:
        model(x)
    for h in handles:
        h.remove()
    groups = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 1]])  # per-token groups [B, S]
    # the model was called with a positional tensor [B, S, H]: per-token groups map to its rows
    stats = collector.stats(group_ids=groups, num_groups=2)
    assert_matches(stats, naive_oracle(logits, 2, groups.reshape(-1), 2))
    with pytest.raises(ValueError, match="router_names entry 'nope'"):
        mixkernels.hf.RouterStatsCollector(model, top_k=2, router_names=["nope"])


def test_collector_errors():
    model = tiny_mixtral()
    with pytest.raises(ValueError, match=r"layers entry 3 is out of range for 3 MoE router layers"):
        mixkernels.hf.RouterStatsCollector(model, layers=[3])
    with pytest.raises(ValueError, match=r"layers must be 'all', 'last'"):
        mixkernels.hf.RouterStatsCollector(model, layers="first")
    collector = mixkernels.hf.RouterStatsCollector(model)
    with pytest.raises(RuntimeError, match="no router call recorded"):
        collector.stats()
    ids, am = _batch(2, 5, 6)
    with torch.no_grad(), collector:
        model(input_ids=ids, attention_mask=am)
        model(input_ids=ids, attention_mask=am)
    with pytest.raises(ValueError, match=r"group_ids has 3 rows but the 2 recorded forwards had batch sizes \[2, 2\]"):
        collector.stats(group_ids=torch.zeros(3, dtype=torch.long), num_groups=1)
    with pytest.raises(ValueError, match=r"group_ids\[\d+\] = 4 is out of range \[0, 2\)"):
        collector.stats(group_ids=torch.tensor([0, 4, 1, 1]), num_groups=2)
    # hooks are gone after the with-block: a further forward is not recorded
    collector.reset()
    with torch.no_grad():
        model(input_ids=ids)
    assert collector.num_forwards == 0


def test_bench_router_stats_smoke(monkeypatch, capsys):
    """bench/bench_router_stats.py at its tiniest size, so it never rots (prints only, no CSV)."""
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / "bench_router_stats.py"
    threads = torch.get_num_threads()
    monkeypatch.setattr(sys, "argv", [str(script), "--tiny"])
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "router_stats [cxx]" in out or "router_stats [reference]" in out
    assert "forward + collector hooks" in out


# ==== RouterAuxLoss (load-balancing loss with gradients) ================================


def _router_params(model):
    return [p for n, p in model.named_parameters() if n.endswith("gate.weight") and "shared_expert" not in n]


def _hf_per_layer(model, router_logits, am):
    """Mean over layers of transformers' load_balancing_loss_func applied to each layer alone."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    k, e = model.config.num_experts_per_tok, router_logits[0].shape[-1]
    return torch.stack([load_balancing_loss_func((z,), e, k, am) for z in router_logits]).mean()


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_aux_loss_matches_transformers_aux_loss_and_its_gradient(name, per_layer):
    """Pooled: value and router gradients equal transformers' ``outputs.aux_loss`` of the same
    forward (``output_router_logits=True`` with the padded attention mask); per layer: the mean of
    transformers' function applied to each layer's logits alone."""
    torch.manual_seed(4)
    model = MODELS[name]().train()
    ids, am = _batch(3, 7, 8)
    aux = mixkernels.hf.RouterAuxLoss(model, per_layer=per_layer)
    assert aux.top_k == model.config.num_experts_per_tok
    out = model(input_ids=ids, attention_mask=am, output_router_logits=True)
    got = aux.loss(attention_mask=am)
    want = _hf_per_layer(model, out.router_logits, am) if per_layer else out.aux_loss
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6)
    params = _router_params(model)
    assert len(params) == len(aux.router_names)
    want_grad = torch.autograd.grad(want, params, retain_graph=True)
    got_grad = torch.autograd.grad(got, params)
    assert any(g.abs().sum() > 0 for g in got_grad)
    for g, w in zip(got_grad, want_grad):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)
    aux.remove()


class _TwoRouterMoE(nn.Module):
    """Two bias-only routers (E = 4): r0 always prefers experts {0, 1}, r1 always {2, 3}."""

    def __init__(self, big: float = 30.0):
        super().__init__()
        self.r0, self.r1 = nn.Linear(4, 4), nn.Linear(4, 4)
        with torch.no_grad():
            for r, bias in ((self.r0, [big, big, -big, -big]), (self.r1, [-big, -big, big, big])):
                r.weight.zero_()
                r.bias.copy_(torch.tensor(bias))

    def forward(self, x):
        return self.r0(x).sum() + self.r1(x).sum()


@pytest.mark.parametrize(("per_layer", "want"), [(True, 4.0), (False, 2.0)])
def test_aux_loss_per_layer_sees_a_collapse_that_pooling_hides(per_layer, want):
    """Hand case: layer 0 sends every token to experts {0, 1}, layer 1 to {2, 3} (E = 4, k = 2,
    probability 1/2 on each of the pair). Pooled over layers every expert has f = 1/2 and
    P = 1/4: E * sum f P = 4 * 4 * 1/8 = 2 = k, the balanced minimum. Per layer f = (1, 1, 0, 0),
    P = (1/2, 1/2, 0, 0): 4 * (1/2 + 1/2) = 4 for each layer, and their mean is 4."""
    model = _TwoRouterMoE()
    aux = mixkernels.hf.RouterAuxLoss(model, top_k=2, router_names=["r0", "r1"], per_layer=per_layer)
    model(torch.zeros(5, 4))
    torch.testing.assert_close(aux.loss(), torch.tensor(want))


def test_aux_loss_pools_forwards_and_skips_paused_and_recomputed_calls():
    torch.manual_seed(5)
    model = tiny_mixtral().train()
    (ids1, am1), (ids2, am2) = _batch(2, 6, 9), _batch(3, 6, 10)
    # two forwards pooled = one forward over the concatenated batch
    aux = mixkernels.hf.RouterAuxLoss(model)
    model(input_ids=ids1, attention_mask=am1)
    model(input_ids=ids2, attention_mask=am2)
    pooled = aux.loss(attention_mask=torch.cat([am1, am2]))
    model(input_ids=torch.cat([ids1, ids2]), attention_mask=torch.cat([am1, am2]))
    torch.testing.assert_close(pooled, aux.loss(attention_mask=torch.cat([am1, am2])), rtol=1e-5, atol=1e-6)
    # enabled=False: nothing recorded
    aux.enabled = False
    model(input_ids=ids1, attention_mask=am1)
    with pytest.raises(RuntimeError, match=r"RouterAuxLoss.loss\(\): no router call recorded"):
        aux.loss()
    aux.enabled = True
    # activation-checkpoint recomputation during backward is not recorded twice
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    out = model(input_ids=ids1, attention_mask=am1, output_router_logits=True)
    (out.logits.sum() + aux.loss(attention_mask=am1)).backward()
    assert not any(aux._logits)
    torch.testing.assert_close(
        mixkernels.load_balancing_loss(out.router_logits, top_k=2, attention_mask=am1), out.aux_loss.float())
    aux.remove()
    model(input_ids=ids1)
    assert not any(aux._logits)  # hooks removed


def test_aux_loss_errors():
    model = tiny_mixtral().train()
    aux = mixkernels.hf.RouterAuxLoss(model)
    ids, am = _batch(2, 5, 11)
    model(input_ids=ids, attention_mask=am)
    with pytest.raises(ValueError, match=r"RouterAuxLoss.loss\(\): attention_mask has shape \(3, 5\) but the routers "
                                         r"saw N = 10 tokens"):
        aux.loss(attention_mask=torch.ones(3, 5))
    with pytest.raises(ValueError, match="found no MoE router"):
        mixkernels.hf.RouterAuxLoss(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="top_k must be an int >= 1, got 0"):
        mixkernels.hf.RouterAuxLoss(model, top_k=0)
