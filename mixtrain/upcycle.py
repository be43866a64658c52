"""``python -m mixtrain upcycle MODEL --experts E --top-k K --out DIR``: a Mixtral-layout MoE built
from a dense Llama-family causal LM by splitting its MLP neurons, as LLaMA-MoE did.

Construction (LLaMA-MoE, Zhu et al. 2024, "random" neuron-independent split, its default):
    Every dense MLP ``y = W_d (silu(W_g x) ⊙ W_u x)`` with ``I`` intermediate neurons is split
    into ``E`` experts of ``m = I / E`` neurons each: a random permutation of ``0..I-1`` (one per
    layer, seeded with ``(seed, layer)``) is cut into ``E`` consecutive blocks ``S_1..S_E`` (each
    block sorted), and expert ``e`` keeps rows ``S_e`` of ``W_g`` and ``W_u`` and columns ``S_e``
    of ``W_d``. The expert outputs ``f_e(x) = W_d[:, S_e] (silu(W_g[S_e] x) ⊙ W_u[S_e] x)`` then
    sum exactly to the dense output: ``y = Σ_e f_e(x)``. Attention, norms, embeddings and the LM
    head are copied unchanged.

Router and the output scale:
    The new router is a fresh ``[E, hidden]`` linear layer per layer, drawn from
    ``N(0, router_std²)`` with a generator seeded by ``(seed, layer)`` (``router_std = 0``: all
    logits 0, a uniform router). The layout written is transformers' Mixtral, whose gate is
    ``softmax`` over all ``E`` logits, the top ``K`` kept and **renormalised to sum to 1**. With a
    uniform router every chosen expert gets weight ``1/K``, so the block computes
    ``(s/K) Σ_{e ∈ T} f_e(x)`` for the chosen set ``T`` if each expert's output is multiplied by
    ``s``. We take ``s = E`` (folded into ``W_d``): the block then computes
    ``(E/K) Σ_{e ∈ T} f_e(x)``, which is the dense output exactly when ``K = E`` and, for ``K < E``,
    its unbiased estimate when ``T`` is a uniformly random ``K``-subset (each ``f_e`` is in ``T``
    with probability ``K/E``). Because the gate renormalises, the factor does not depend on ``K``;
    without the renormalisation (softmax weights ``1/E`` each) it would be ``E²/K``. A small
    random router only moves the gate weights away from ``1/K`` slightly. How close the start is
    for ``K < E`` is measured, not assumed: the mean token loss of the dense and the upcycled
    model on dev rows of the built-in corpus goes to ``DIR/upcycle.json`` (the "loss gap at step
    0"), together with the arguments, the scale and the seed.

Output: ``DIR`` holds ``config.json`` (``model_type: mixtral``), ``model.safetensors`` and the
tokenizer of ``MODEL`` (its HF files, or the byte-tokenizer marker of a mixtrain export) and
``upcycle.json``. In memory the installed transformers (5.x) keeps the experts fused,
``mlp.experts.gate_up_proj [E, 2m, hidden]`` (gate rows first) and ``mlp.experts.down_proj
[E, hidden, m]``, which is what :func:`split_mlp` produces; ``save_pretrained`` converts them to
the standard Mixtral checkpoint names (``block_sparse_moe.experts.<e>.w1/w2/w3``,
``block_sparse_moe.gate``), so the directory also loads in other Mixtral implementations. It is written to a temporary sibling directory, reloaded
and checked against the in-memory model, then renamed into place. ``model.name_or_path: DIR``
trains it (``configs/dynamic_moe.yaml``; ``mixkernels.hf.RouterStatsCollector`` hooks its
``MixtralTopKRouter`` modules).

Supported sources: ``model_type`` ``llama`` or ``mistral`` with bias-free gated-SiLU-style MLPs
(``gate_proj``/``up_proj``/``down_proj``) and bias-free attention, i.e. what Mixtral can express.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .models import ModelError, quiet_progress, resolve_model

__all__ = ["SUPPORTED_MODEL_TYPES", "UpcycleError", "loss_gap", "split_mlp", "upcycle"]

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral")
_GAP_DOMAINS = ("math", "docs", "code", "lego_3", "addition_2")


class UpcycleError(ValueError):
    """Bad arguments or an unsupported source model (the message names what and why)."""


def _resolve(model: str) -> Path:
    try:
        path = resolve_model(model)  # known names (smollm2-135m-instruct) are prepared and cached
    except ModelError as e:
        raise UpcycleError(f"upcycle: MODEL {model!r}: {e}") from None
    p = Path(path)
    if not (p / "config.json").is_file():
        raise UpcycleError(f"upcycle: MODEL {model!r} is not a local transformers model directory "
                           f"(no {p / 'config.json'}); expected a directory written by save_pretrained")
    return p


def _check_args(experts: int, top_k: int, router_std: float, scale: float | None) -> None:
    if not isinstance(experts, int) or isinstance(experts, bool) or experts < 2:
        raise UpcycleError(f"upcycle: --experts {experts!r}, expected an integer >= 2")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= experts:
        raise UpcycleError(f"upcycle: --top-k {top_k!r}, expected an integer in [1, --experts = {experts}]")
    if not (math.isfinite(router_std) and router_std >= 0):
        raise UpcycleError(f"upcycle: --router-std {router_std!r}, expected a finite number >= 0")
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise UpcycleError(f"upcycle: --scale {scale!r}, expected a finite number > 0")


def _check_source(config: Any, experts: int) -> None:
    mt = getattr(config, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise UpcycleError(
            f"upcycle: model_type {mt!r} is not supported; expected one of {', '.join(SUPPORTED_MODEL_TYPES)} "
            "(a Llama-style gated MLP gate_proj/up_proj/down_proj and bias-free attention, as Mixtral has)")
    for key in ("mlp_bias", "attention_bias"):
        if getattr(config, key, False):
            raise UpcycleError(f"upcycle: the source config has {key}=True; the Mixtral layout has no biases there")
    inter = int(config.intermediate_size)
    if inter % experts:
        raise UpcycleError(f"upcycle: intermediate_size {inter} is not divisible by --experts {experts}; "
                           f"choose a divisor of {inter}")


def _moe_config(dense: Any, experts: int, top_k: int) -> Any:
    from transformers import MixtralConfig

    kw = {k: getattr(dense, k) for k in (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "pad_token_id",
        "bos_token_id", "eos_token_id", "tie_word_embeddings", "attention_dropout") if hasattr(dense, k)}
    head_dim = getattr(dense, "head_dim", None)
    kw["head_dim"] = head_dim or dense.hidden_size // dense.num_attention_heads
    rope = getattr(dense, "rope_parameters", None)
    if rope is not None:
        kw["rope_parameters"] = dict(rope)
    kw["sliding_window"] = getattr(dense, "sliding_window", None) if dense.model_type == "mistral" else None
    return MixtralConfig(**kw, intermediate_size=dense.intermediate_size // experts, num_local_experts=experts,
                         num_experts_per_tok=top_k, router_jitter_noise=0.0, output_router_logits=False)


def _generator(seed: int, layer: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + layer) % (2**63))
    return g


def split_mlp(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, experts: int, *, scale: float,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split one dense gated MLP into ``experts`` experts (random neuron partition).

    Args:
        gate, up: ``[I, H]`` weights of ``gate_proj`` / ``up_proj``; down: ``[H, I]`` of ``down_proj``.
        experts: ``E``, dividing ``I``.
        scale: multiplies every expert's output (folded into its down projection).
        generator: draws the permutation of the ``I`` neurons.

    Returns:
        ``(gate_up [E, 2m, H], down [E, H, m], partition [E, m])`` with ``m = I / E``: Mixtral's
        fused expert weights (gate rows first) and the neuron ids of each expert (sorted).

    Raises:
        UpcycleError: shapes do not match or ``I`` is not divisible by ``experts``.
    """
    i, h = gate.shape
    if up.shape != (i, h) or down.shape != (h, i):
        raise UpcycleError(f"split_mlp: gate {tuple(gate.shape)}, up {tuple(up.shape)}, down {tuple(down.shape)}; "
                           "expected [I, H], [I, H], [H, I]")
    if i % experts:
        raise UpcycleError(f"split_mlp: intermediate size {i} is not divisible by {experts} experts")
    m = i // experts
    part = torch.randperm(i, generator=generator).reshape(experts, m).sort(dim=1).values
    gate_up = torch.cat([gate[part], up[part]], dim=1)  # [E, 2m, H]
    down_e = down[:, part].permute(1, 0, 2) * scale  # [H, E, m] -> [E, H, m]
    return gate_up.contiguous(), down_e.contiguous(), part


def _dense_mlps(model: torch.nn.Module) -> list[Any]:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise UpcycleError(f"upcycle: {type(model).__name__} has no model.layers; expected a Llama-style decoder")
    mlps = []
    for i, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        parts = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if not all(isinstance(p, torch.nn.Linear) and p.bias is None for p in parts):
            raise UpcycleError(f"upcycle: layer {i}'s MLP ({type(mlp).__name__}) is not a bias-free "
                               "gate_proj/up_proj/down_proj gated MLP; only Llama-style MLPs can be split")
        mlps.append(mlp)
    return mlps


def _gap_rows(tokenizer: Any, rows_per_domain: int, max_length: int) -> dict[str, list[tuple[list[int], list[int]]]]:
    from .data import encode_domains, load_domains

    doms = load_domains(list(_GAP_DOMAINS), {}, dev_fraction=0.5, builtin_size=2 * rows_per_domain, builtin_seed=0)
    enc = encode_domains(doms, tokenizer, max_length=max_length)
    return {d.name: [r for r in d.dev if any(x != -100 for x in r[1][1:])][:rows_per_domain] for d in enc}


@torch.no_grad()
def _token_losses(model: torch.nn.Module, rows: list[tuple[list[int], list[int]]], pad: int,
                  batch_size: int = 8) -> tuple[float, int]:
    """``(sum of token losses, label tokens)`` of ``model`` over ``rows`` (HF label shift)."""
    total, count = 0.0, 0
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        t = max(len(r[0]) for r in chunk)
        ids = torch.full((len(chunk), t), pad, dtype=torch.long)
        lab = torch.full((len(chunk), t), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), t), dtype=torch.long)
        for j, (x, y) in enumerate(chunk):
            ids[j, :len(x)] = torch.tensor(x)
            lab[j, :len(y)] = torch.tensor(y)
            mask[j, :len(x)] = 1
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
        tgt = lab[:, 1:]
        keep = tgt != -100  # the LM head only where a label is predicted (most of a row is prompt)
        logits = model.lm_head(hidden[keep]).float()
        total += float(torch.nn.functional.cross_entropy(logits, tgt[keep], reduction="sum"))
        count += int(keep.sum())
    return total, count


@torch.no_grad()
def loss_gap(dense: torch.nn.Module, moe: torch.nn.Module, tokenizer: Any, *, rows_per_domain: int = 8,
             max_length: int = 256) -> dict[str, Any]:
    """Mean token loss (trained tokens, as in training) of ``dense`` and ``moe`` on the first
    ``rows_per_domain`` dev rows of each built-in gap domain (math, docs, code, lego_3, addition_2).

    Returns:
        ``{"dense", "upcycled", "gap" (upcycled − dense), "relative_gap" (gap / dense), "tokens",
        "rows", "per_domain": {domain: {"dense", "upcycled", "tokens"}}}``; losses in nats/token.
    """
    was = dense.training, moe.training
    dense.eval()
    moe.eval()
    try:
        per: dict[str, Any] = {}
        tot_d = tot_m = 0.0
        n_tok = n_rows = 0
        for name, rows in _gap_rows(tokenizer, rows_per_domain, max_length).items():
            if not rows:
                continue
            sd, c = _token_losses(dense, rows, tokenizer.pad_token_id)
            sm, _ = _token_losses(moe, rows, tokenizer.pad_token_id)
            per[name] = {"dense": sd / c, "upcycled": sm / c, "tokens": c, "rows": len(rows)}
            tot_d, tot_m, n_tok, n_rows = tot_d + sd, tot_m + sm, n_tok + c, n_rows + len(rows)
    finally:
        dense.train(was[0])
        moe.train(was[1])
    d, m = tot_d / max(n_tok, 1), tot_m / max(n_tok, 1)
    return {"dense": d, "upcycled": m, "gap": m - d, "relative_gap": (m - d) / d if d else math.nan,
            "tokens": n_tok, "rows": n_rows, "per_domain": per}


def _save_tokenizer_files(src: Path, dst: Path) -> str:
    from .data.tokenizer import BYTE_TOKENIZER_FILE

    if (src / BYTE_TOKENIZER_FILE).is_file():
        shutil.copy2(src / BYTE_TOKENIZER_FILE, dst / BYTE_TOKENIZER_FILE)
        return "byte"
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any loading failure means: no tokenizer to copy
        raise UpcycleError(f"upcycle: MODEL {str(src)!r} has no loadable tokenizer ({e}); the MoE directory "
                           "needs one (an HF tokenizer or mixtrain's byte-tokenizer marker)") from None
    tok.save_pretrained(str(dst))
    return "hf"


def upcycle(model: str, *, experts: int, top_k: int, out: str | Path, seed: int = 0, router_std: float = 0.02,
            scale: float | None = None, overwrite: bool = False, gap_rows: int = 8,
            gap_max_length: int = 256) -> dict[str, Any]:
    """Build and write the MoE (module docstring); returns the ``upcycle.json`` record.

    Args:
        model: a local HF model directory, or a name ``mixtrain.models.resolve_model`` knows.
        experts: ``E`` experts per layer (divides the intermediate size).
        top_k: ``K`` experts per token, ``1 ≤ K ≤ E``.
        out: the output directory ``DIR``.
        seed: seeds the neuron partitions and the routers.
        router_std: standard deviation of the router weights (0: uniform router).
        scale: expert output scale; default ``E`` (see the module docstring).
        overwrite: replace an existing ``DIR``.
        gap_rows: dev rows per built-in domain for the step-0 loss gap (0: skip the measurement).
        gap_max_length: token limit of those rows.

    Raises:
        UpcycleError: bad arguments, an existing ``DIR`` without ``overwrite``, an unsupported or
            missing source model or tokenizer.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, MixtralForCausalLM

    from .data import load_tokenizer

    _check_args(experts, top_k, router_std, scale)
    if not isinstance(gap_rows, int) or gap_rows < 0:
        raise UpcycleError(f"upcycle: gap_rows {gap_rows!r}, expected an integer >= 0")
    out = Path(out)
    if out.exists() and not overwrite:
        raise UpcycleError(f"upcycle: --out {str(out)!r} exists; pass --overwrite to replace it")
    src = _resolve(model)
    dense_cfg = AutoConfig.from_pretrained(str(src), local_files_only=True)
    _check_source(dense_cfg, experts)
    s = float(experts) if scale is None else float(scale)
    with quiet_progress():
        dense = AutoModelForCausalLM.from_pretrained(str(src), local_files_only=True, dtype=torch.float32)
    mlps = _dense_mlps(dense)
    moe_cfg = _moe_config(dense_cfg, experts, top_k)
    sd = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    for li, mlp in enumerate(mlps):
        g = _generator(seed, li)
        gate_up, down, _ = split_mlp(mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(),
                                     mlp.down_proj.weight.detach(), experts, scale=s, generator=g)
        pre = f"model.layers.{li}.mlp."
        sd[pre + "experts.gate_up_proj"] = gate_up
        sd[pre + "experts.down_proj"] = down
        sd[pre + "gate.weight"] = torch.randn(experts, dense_cfg.hidden_size, generator=g) * router_std
    moe = MixtralForCausalLM(moe_cfg).to(torch.float32)
    missing, unexpected = moe.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and moe_cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise UpcycleError(f"upcycle: the Mixtral layout of this transformers does not match the converted "
                           f"weights (missing {missing[:5]}, unexpected {unexpected[:5]})")
    if moe_cfg.tie_word_embeddings:
        moe.tie_weights()
    moe.eval()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with quiet_progress():
            moe.save_pretrained(str(tmp), safe_serialization=True)
        kind = _save_tokenizer_files(src, tmp)
        _check_reload(tmp, moe)
        gap = None
        if gap_rows:
            gap = loss_gap(dense, moe, load_tokenizer(str(tmp)), rows_per_domain=gap_rows, max_length=gap_max_length)
        record = {
            "version": 1, "source": model, "source_path": str(src), "source_model_type": dense_cfg.model_type,
            "layout": "mixtral", "experts": experts, "top_k": top_k, "expert_intermediate_size": moe_cfg.intermediate_size,
            "dense_intermediate_size": int(dense_cfg.intermediate_size), "partition": "random (seeded per layer)",
            "seed": seed, "router_std": router_std, "scale": s, "tokenizer": kind,
            "parameters_dense": sum(p.numel() for p in dense.parameters()),
            "parameters_moe": sum(p.numel() for p in moe.parameters()),
            "loss_gap": gap,
        }
        (tmp / "upcycle.json").write_text(json.dumps(record, indent=1) + "\n")
        from .checkpoint import replace_dir

        out.parent.mkdir(parents=True, exist_ok=True)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record


@torch.no_grad()
def _check_reload(path: Path, moe: torch.nn.Module) -> None:
    """The written directory loads with ``AutoModelForCausalLM`` and computes what ``moe`` does."""
    from transformers import AutoModelForCausalLM

    with quiet_progress():
        back = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32).eval()
    ids = torch.arange(16).reshape(2, 8) % moe.config.vocab_size
    a, b = moe(input_ids=ids).logits, back(input_ids=ids).logits
    if not torch.allclose(a, b, atol=1e-5, rtol=1e-5):
        raise UpcycleError(f"upcycle: the reloaded model differs from the built one (max |Δlogit| "
                           f"{float((a - b).abs().max()):.3g}); the installed transformers saves this layout differently")
