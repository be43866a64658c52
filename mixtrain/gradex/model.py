"""θ*: building the model, loading a mixtrain checkpoint, the trainable modules GradEx uses, and
running the real mixtrain loop from θ*.

Two choices live here:

* GradEx trains and differentiates the unwrapped ``get_base_model()`` of a PEFT model. PEFT
  injects its LoRA layers *into* the base model, so this is the same computation, and every
  weight is keyed as in the plain ``*ForCausalLM`` (``model.layers.0...lora_A.default.weight``)
  in θ*, the gradient store and the subset fits; :func:`run_loop` does that.
* the core loop has no "initialise from these weights" option (``train.resume`` restores the
  optimizer and sampler too, and refuses another config); :func:`run_loop` wraps the loop's
  ``build_model`` to load θ* after the model is built.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import latest_checkpoint
from ..config import Config, ConfigError
from ..export import unwrap_peft

# released parameter filter (SEEDS §3.3): names containing these are never GradEx parameters
EXCLUDED_NAME_PARTS = ("lm_head", "embed_tokens", "wte", "wpe", "word_embeddings", "shared")


def build(cfg: Config, vocab_size: int) -> nn.Module:
    """The configured model (randomly initialised / from ``model.name_or_path``), PEFT unwrapped."""
    from ..engine import build_model

    return unwrap_peft(build_model(cfg, vocab_size))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint dir, a ``checkpoints`` dir or a run dir.

    Raises:
        ConfigError: nothing loadable there.
    """
    p = Path(path)
    if (p / "mixtrain_state.json").is_file():
        return p
    for root in (p / "checkpoints", p):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise ConfigError(f"gradex.init_checkpoint: no complete mixtrain checkpoint at {str(p)!r}")


def checkpoint_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Model weights of a mixtrain (DeepSpeed ZeRO 0-2) checkpoint, keyed like :func:`build`'s model."""
    ckpt = resolve_checkpoint(path)
    files = sorted((ckpt / "ds").glob("mp_rank_*_model_states.pt"))
    if not files:
        raise ConfigError(f"gradex: {ckpt} has no ds/mp_rank_*_model_states.pt (ZeRO-3 checkpoints need "
                          "DeepSpeed's zero_to_fp32 first)")
    blob = torch.load(files[0], map_location="cpu", weights_only=True)  # untrusted file: tensors and plain containers only
    module = blob.get("module") or {}
    out = {}
    for k, v in module.items():
        k = k.removeprefix("module.").removeprefix("model.")  # LossModel.model
        k = k.replace("base_model.model.", "", 1) if k.startswith("base_model.model.") else k
        out[k] = v
    if not out:
        raise ConfigError(f"gradex: {files[0]} holds no model weights (ZeRO-3 partitioned?)")
    return out


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Strict load that names what is missing/unexpected."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"gradex: weights from {where} do not match the configured model: missing {list(missing)[:5]}, "
            f"unexpected {list(unexpected)[:5]} (is model.lora / model.config the one θ* was trained with?)"
        )


def gradex_modules(model: nn.Module) -> list[str]:
    """Names of the trainable linear layers GradEx differentiates, in model order.

    Every ``nn.Linear`` whose weight requires grad (PEFT LoRA: exactly the lora_A / lora_B layers)
    except names containing the released exclusions (``lm_head``, embeddings; norms are not
    linear layers)."""
    names = [
        n for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and m.weight.requires_grad and not any(x in n for x in EXCLUDED_NAME_PARTS)
    ]
    if not names:
        raise ConfigError("gradex: the model has no trainable linear layer (set model.lora or train all weights)")
    return names


def trainable_vector(model: nn.Module, names: list[str]) -> torch.Tensor:
    """θ_trainable: the concatenated flattened weights of ``names`` (float32 [D])."""
    mods = dict(model.named_modules())
    return torch.cat([mods[n].weight.detach().float().reshape(-1) for n in names])


@torch.no_grad()
def add_to_weights(model: nn.Module, names: list[str], delta: torch.Tensor) -> None:
    """θ_trainable += delta (flat [D], the layout of :func:`trainable_vector`)."""
    mods = dict(model.named_modules())
    off = 0
    for n in names:
        w = mods[n].weight
        w.add_(delta[off:off + w.numel()].view_as(w).to(w.dtype))
        off += w.numel()
    if off != delta.numel():
        raise ValueError(f"gradex: delta has {delta.numel()} entries, the trainable weights {off}")


def weights_fingerprint(vec: torch.Tensor) -> str:
    """Short hash of θ*_trainable (a store computed at another θ* is refused)."""
    return hashlib.sha256(vec.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]


@contextlib.contextmanager
def loop_from(init_state: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """Within the block, ``mixtrain.loop.train`` trains the PEFT-unwrapped model, starting from
    ``init_state`` when given (see the module docstring)."""
    from .. import loop as loop_mod

    original = loop_mod.build_model

    def patched(cfg: Config, vocab_size: int) -> nn.Module:
        model = unwrap_peft(original(cfg, vocab_size))
        if init_state is not None:
            load_weights(model, init_state, "θ*")
        return model

    loop_mod.build_model = patched
    try:
        yield
    finally:
        loop_mod.build_model = original


def run_loop(cfg: Config, init_state: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """The real mixtrain loop (DeepSpeed) on ``cfg``, from ``init_state`` when given."""
    from ..loop import train

    with loop_from(init_state):
        return train(cfg)
