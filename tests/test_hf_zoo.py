"""Every causal-LM architecture transformers registers, built tiny from its config: the fused loss
(``mixkernels.hf.apply``) equals the model's own ``labels=`` loss and its gradients, or is refused
with one clear error; never a silently different loss.

For each ``model_type`` in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` the outcome is one of
  equal          apply()'d loss and every parameter gradient equal the unpatched model's;
  refused        apply() raises NotImplementedError / TypeError naming the reason (config
                 attribute, head type or loss), and the model's own loss is checked to be one the
                 fused op would not have reproduced or that cannot be checked;
  cannot build   the tiny model cannot be constructed here (reason recorded: a hub file, a missing
                 package, a config this generic builder cannot shrink).
A representative set also checks GradientProjector (per-example projected gradients of the fused
loss vs autograd's per-example gradients projected by the same matrix) and, for MoE families,
RouterStatsCollector / RouterAuxLoss against ``output_router_logits=True``.

docs/hf_zoo.md is generated from the same checks:
    .venv/bin/python -m tests.test_hf_zoo --write docs/hf_zoo.md
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import mixkernels
import mixkernels.grad_projector
import mixkernels.hf as mkhf

transformers = pytest.importorskip("transformers")
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

VOCAB = 128
B, T = 2, 8
CLOSE = {"atol": 2e-5, "rtol": 2e-5}
GRAD = {"atol": 2e-5, "rtol": 2e-4}

# Sizes every config gets (where it has the attribute, directly or via its attribute_map).
SMALL = {
    # logit transforms at values that matter at random init (where the config has them)
    "logits_scaling": 4.0, "logit_scale": 0.25, "final_logit_softcapping": 2.0, "lm_head_multiplier": 0.5,
    "output_multiplier": 0.5,
    "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 64,
    "n_positions": 64, "n_ctx": 64, "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4,
    "num_experts_per_tok": 2, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16,
    "ffn_hidden_size": 48, "n_inner": 48, "d_ff": 48, "kv_lora_rank": 16, "q_lora_rank": 16,
    "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8, "first_k_dense_replace": 1,
    "n_shared_experts": 1, "topk_group": 1, "n_group": 1, "attention_dropout": 0.0, "hidden_dropout": 0.0,
    "dropout": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
    "use_cache": False, "tie_word_embeddings": False,
    # encoder-decoder families whose decoder is registered as a causal LM
    "d_model": 32, "encoder_layers": 1, "decoder_layers": 2, "encoder_ffn_dim": 48, "decoder_ffn_dim": 48,
    "encoder_attention_heads": 4, "decoder_attention_heads": 4,
}
# Per-architecture settings the generic sizes get wrong.
OVERRIDES: dict[str, dict] = {
    "bailing_hybrid": {"linear_head_dim": 8},  # default 128: 40 s per run on the reference linear attention
    "gptj": {"rotary_dim": 4},
    "codegen": {"rotary_dim": 4},
}
MAX_PARAMS = 3_000_000
MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


@dataclass
class Outcome:
    model_type: str
    class_name: str
    status: str  # "equal" | "refused" | "cannot build"
    detail: str = ""


def _shrink(config, extra: dict) -> None:
    values = {**SMALL, **extra}
    attr_map = getattr(config, "attribute_map", {}) or {}
    for key, value in values.items():
        if key in config.__dict__ or key in attr_map:
            with contextlib.suppress(Exception):
                setattr(config, key, value)
    # lists sized by the number of layers
    n = getattr(config, "num_hidden_layers", 2)
    for key in ("layer_types", "layers_block_type", "block_types", "attn_layer_indices", "mlp_only_layers"):
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)) and key in ("layer_types", "layers_block_type", "block_types"):
            with contextlib.suppress(Exception):  # a read-only property derives it from the sizes
                setattr(config, key, list(value[:n]) if len(value) >= n else list(value) * n)
    subs = set(getattr(config, "sub_configs", {}) or {}) | {"text_config", "decoder", "language_config"}
    for sub in sorted(subs):
        sub_config = getattr(config, sub, None)
        if isinstance(sub_config, transformers.PretrainedConfig) and sub_config is not config:
            _shrink(sub_config, extra)
    config._attn_implementation = "eager"


def build(model_type: str):
    """(model, None) or (None, reason it cannot be built)."""
    class_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    try:
        model_cls = getattr(transformers, class_name)
    except Exception as e:  # noqa: BLE001  (a missing optional package raises ImportError on access)
        return None, f"cannot import {class_name}: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    try:
        config = CONFIG_MAPPING[model_type]()
        _shrink(config, OVERRIDES.get(model_type, {}))
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            with torch.device("meta"):  # size check first: a config this builder failed to shrink stays huge
                numel = sum(p.numel() for p in model_cls(config).parameters())
            if numel > MAX_PARAMS:
                return None, f"the generic tiny config still has {numel / 1e6:.1f} M parameters (sizes not shrunk)"
            torch.manual_seed(0)
            model = model_cls(config)
    except Exception as e:  # noqa: BLE001
        return None, f"tiny config does not build: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return model.float().eval(), None


def _batch(model) -> dict[str, torch.Tensor]:
    vocab = model.get_output_embeddings().weight.shape[0] if isinstance(
        model.get_output_embeddings(), torch.nn.Linear) else VOCAB
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, min(vocab, VOCAB), (B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, T - 2:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :2] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_grads(model, data):
    model.zero_grad(set_to_none=True)
    out = model(**data)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def check(model_type: str) -> Outcome:
    class_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    model, reason = build(model_type)
    if model is None:
        return Outcome(model_type, class_name, "cannot build", reason)
    data = _batch(model)
    try:
        ref_loss, ref_grads = _loss_grads(model, data)
    except Exception as e:  # noqa: BLE001
        return Outcome(model_type, class_name, "cannot build",
                       f"its own labels= loss fails on a text batch: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
    try:
        mkhf.apply(model)
    except (NotImplementedError, TypeError) as e:
        return Outcome(model_type, class_name, "refused", str(e).split(": ", 1)[-1])
    try:
        loss, grads = _loss_grads(model, data)
    except NotImplementedError as e:
        return Outcome(model_type, class_name, "refused", str(e).split(": ", 1)[-1])
    finally:
        mkhf.remove(model)
    torch.testing.assert_close(loss, ref_loss, **CLOSE, msg=f"{model_type}: fused loss differs")
    assert grads.keys() == ref_grads.keys(), model_type
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, **GRAD, msg=f"{model_type}: gradient of {name}")
    fused = mkhf.causal_lm_loss(model, data["input_ids"], data["attention_mask"], data["labels"]).loss
    torch.testing.assert_close(fused, ref_loss, **CLOSE, msg=f"{model_type}: causal_lm_loss differs")
    return Outcome(model_type, class_name, "equal", f"loss {float(ref_loss):.6f}")


ZOO = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


@pytest.mark.parametrize("model_type", ZOO)
def test_zoo_fused_loss_equal_or_refused(model_type):
    outcome = check(model_type)
    if outcome.status == "refused":
        assert outcome.detail and ("config." in outcome.detail or "LM head" in outcome.detail
                                   or "loss" in outcome.detail), outcome
    if outcome.status == "cannot build":
        pytest.skip(f"{model_type}: {outcome.detail}")


def write_table(path: Path, outcomes: list[Outcome]) -> None:
    counts = {s: sum(o.status == s for o in outcomes) for s in ("equal", "refused", "cannot build")}
    lines = [
        "# transformers causal-LM zoo: fused loss exact, refused, or cannot build",
        "",
        "Generated by `.venv/bin/python -m tests.test_hf_zoo --write docs/hf_zoo.md` from the checks of",
        "`tests/test_hf_zoo.py` (transformers " + transformers.__version__ + ", torch " + torch.__version__ + ").",
        "Each architecture in `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` is built from a tiny random config; *equal*",
        "means `mixkernels.hf.apply` and `causal_lm_loss` give the model's own `labels=` loss and the same",
        "gradient for every parameter; *refused* means `apply` raises with the reason shown (never a",
        "silently different loss); *cannot build* means the tiny model could not be constructed here.",
        "",
        f"Totals: {counts['equal']} equal, {counts['refused']} refused, {counts['cannot build']} cannot build.",
        "",
        "| model_type | class | outcome | detail |",
        "|---|---|---|---|",
    ]
    for o in outcomes:
        detail = o.detail.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {o.model_type} | {o.class_name} | {o.status} | {detail} |")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", type=Path, help="write the markdown table here")
    parser.add_argument("model_types", nargs="*", help="only these (default: all)")
    args = parser.parse_args(argv)
    outcomes = []
    for model_type in args.model_types or ZOO:
        try:
            outcome = check(model_type)
        except AssertionError as e:
            outcome = Outcome(model_type, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type], "DIFFERS",
                              str(e).splitlines()[0])
        print(f"{outcome.model_type:28s} {outcome.status:13s} {outcome.detail}", flush=True)
        outcomes.append(outcome)
    if args.write:
        write_table(args.write, outcomes)
    return int(any(o.status == "DIFFERS" for o in outcomes))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


# ---- per-example projected gradients (a representative set) -------------------------------------

PROJECTOR_SET = ["llama", "gpt2", "gemma2", "granite", "cohere", "qwen2_moe"]


def _decoder_linears(model) -> list[str]:
    """Attention projections (MoE experts see flattened tokens, which the projector does not take)."""
    head = model.get_output_embeddings()
    return [n for n, m in model.named_modules()
            if mixkernels.grad_projector.is_projectable(m) and m is not head and m.weight.requires_grad
            and "attn" in n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1]][:12]


@pytest.mark.parametrize("model_type", PROJECTOR_SET)
def test_zoo_grad_projector_per_example(model_type):
    """GradientProjector over the fused per-example losses == autograd's per-example gradients of
    the model's own logits, projected by the same matrix."""
    model, reason = build(model_type)
    if model is None:
        pytest.skip(reason)
    data = _batch(model)
    names = _decoder_linears(model)
    assert names
    ids, mask, labels = data["input_ids"], data["attention_mask"], data["labels"]
    counted = (labels[:, 1:] != -100).sum(1)
    # oracle: one backward per example through the model's own logits
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    weights = [model.get_submodule(n).weight for n in names]
    rows = []
    for b in range(B):
        loss_b = torch.nn.functional.cross_entropy(logits[b, :-1], labels[b, 1:], ignore_index=-100, reduction="sum")
        grads = torch.autograd.grad(loss_b / counted[b], weights, retain_graph=b < B - 1)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    v = torch.stack(rows)
    gp = mixkernels.GradientProjector(model, kind="rademacher", proj_dim=24, seed=3, modules=names)
    with gp.capture():
        out = mkhf.causal_lm_loss(model, ids, mask, labels, reduction="none")
        (out.loss.sum(1) / counted).sum().backward()
    r = mixkernels.projection_matrix(v.shape[1], 24, seed=3, kind="rademacher")
    torch.testing.assert_close(gp.grads(), v @ r, atol=1e-4, rtol=1e-4)


# ---- MoE families: router statistics and the router auxiliary loss --------------------------------


def _is_moe(model_type: str) -> bool:
    try:
        config = CONFIG_MAPPING[model_type]()
    except Exception:  # noqa: BLE001  (a default config that does not validate: cannot build anyway)
        return False
    text = config
    with contextlib.suppress(ValueError):
        text = config.get_text_config()
    return any(isinstance(getattr(text, k, None), int) and getattr(text, k) > 1 for k in MOE_KEYS)


MOE_ZOO = [t for t in ZOO if _is_moe(t)]


@pytest.mark.parametrize("model_type", MOE_ZOO)
def test_zoo_moe_router_stats_and_aux_loss(model_type):
    """RouterStatsCollector counts == those from output_router_logits=True; RouterAuxLoss (pooled,
    transformers' formula) == the model's aux_loss; the apply'd loss adds it as the model does."""
    from tests.ops.test_router_stats import assert_matches
    from tests.test_hf_router import _oracle_from_outputs

    model, reason = build(model_type)
    if model is None:
        pytest.skip(reason)
    data = _batch(model)
    ids, mask = data["input_ids"], data["attention_mask"]
    try:
        collector = mkhf.RouterStatsCollector(model)
        aux = mkhf.RouterAuxLoss(model, per_layer=False)
    except (ValueError, TypeError) as e:
        pytest.skip(f"{model_type}: routers not hooked: {e}")
    try:
        with torch.no_grad(), collector:
            out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    except Exception as e:  # noqa: BLE001  (the zoo test records it as cannot build)
        pytest.skip(f"{model_type}: its own forward fails on the tiny config: {type(e).__name__}")
    router_logits = getattr(out, "router_logits", None)
    if not router_logits:
        pytest.skip(f"{model_type}: the model returns no router_logits")
    domains = torch.tensor([1, 0])
    stats = collector.stats(group_ids=domains, num_groups=2, attention_mask=mask)
    expected = _oracle_from_outputs([(out, mask)], collector.top_k, range(len(router_logits)), [domains], 2)
    assert_matches(stats, expected, what=model_type)
    if getattr(out, "aux_loss", None) is not None:
        aux.reset()
        model(input_ids=ids, attention_mask=mask, output_router_logits=True)
        torch.testing.assert_close(aux.loss(attention_mask=mask), out.aux_loss, atol=1e-6, rtol=1e-5)
    aux.remove()
    ref = model(**data, output_router_logits=True).loss
    mkhf.apply(model)
    torch.testing.assert_close(model(**data, output_router_logits=True).loss, ref, **CLOSE)
    mkhf.remove(model)
