"""The trained model as a plain Hugging Face directory, written once at the end of a run.

``output_dir/model/`` holds ``config.json`` + ``model.safetensors`` (``save_pretrained``, so
``AutoModelForCausalLM.from_pretrained(dir)`` or ``model.name_or_path: dir`` loads it) and the
tokenizer: an HF tokenizer's own files, or ``mixtrain_tokenizer.json`` naming the built-in byte
tokenizer (``mixtrain.data.load_tokenizer(dir)`` understands both). With LoRA the weights there
are merged (``W + ΔW`` of every active adapter), and ``output_dir/adapter/`` holds the PEFT
adapter alone (``PeftModel.from_pretrained(base, dir)``).

Every rank calls :func:`export_model`; under ZeRO-3 the parameters are gathered (read-only) for
the duration of the save. The model is never modified. Each directory is written under a
temporary name, gets a ``manifest.json`` (size + sha256 of every file, written last;
``python -m mixtrain verify`` checks it) and is renamed into place, so a crash leaves the previous
export or none, never half of one. A failed write (a full disk) removes the partial directory and
raises :class:`ExportError` naming the file and the reason; the previous export stays intact.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .checkpoint import _describe, replace_dir, write_manifest
from .data.tokenizer import BYTE_TOKENIZER_FILE
from .models import quiet_progress

__all__ = ["ExportError", "export_model", "merged_state_dict", "unwrap_peft"]


class ExportError(RuntimeError):
    """The model could not be exported (message names the file and the reason)."""

_LORA_PARTS = (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.", ".lora_magnitude_vector.")


def unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    """The ``*ForCausalLM`` holding PEFT's injected LoRA layers (the model itself when not PEFT)."""
    if type(model).__module__.startswith("peft") and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU copy of the weights of ``model`` as the plain transformers model would name them.

    For a PEFT LoRA model, every LoRA layer's weight is ``base_layer.weight`` plus the
    ``get_delta_weight`` of each active adapter (PEFT's own merge arithmetic, fan-in/fan-out and
    scaling included), and the adapter tensors are dropped; the model itself is untouched.
    """
    base = unwrap_peft(model)
    out: dict[str, torch.Tensor] = {}
    for k, v in base.state_dict().items():
        if any(p in k for p in _LORA_PARTS):
            continue
        out[k.replace(".base_layer.", ".")] = v.detach().to("cpu", copy=True)
    if base is model:
        return out
    with torch.no_grad():
        for name, mod in base.named_modules():
            if not (hasattr(mod, "base_layer") and hasattr(mod, "get_delta_weight")):
                continue
            w = mod.base_layer.weight.detach().clone()
            for adapter in getattr(mod, "active_adapters", []):
                if adapter in getattr(mod, "lora_A", {}) or adapter in getattr(mod, "lora_embedding_A", {}):
                    w += mod.get_delta_weight(adapter).to(w.dtype)
            out[f"{name}.weight"] = w.cpu()
    return out


def _save_tokenizer(tokenizer: Any, path: Path) -> None:
    inner = getattr(tokenizer, "tok", None)  # mixtrain.data.tokenizer.HFTokenizer
    if inner is not None and hasattr(inner, "save_pretrained"):
        inner.save_pretrained(str(path))
    else:
        (path / BYTE_TOKENIZER_FILE).write_text(json.dumps({"type": getattr(tokenizer, "name", "byte")}) + "\n")


def export_model(model: torch.nn.Module, tokenizer: Any, out: str | Path, *, rank: int,
                 zero_stage: int = 0) -> Path | None:
    """Write ``out/model`` (and ``out/adapter`` for PEFT) from rank 0; collective under ZeRO-3.

    Returns the model directory on rank 0, ``None`` elsewhere.
    """
    out = Path(out)
    gather: Any = contextlib.nullcontext()
    if zero_stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
    result = None
    err: list[Any] = [None]
    with gather, quiet_progress():
        if rank == 0:
            try:
                result = _write(model, tokenizer, out)
            except (OSError, RuntimeError, _safetensors_error()) as e:  # a full disk, in any of its forms
                err[0] = f"could not export the model: {_describe(e, out)}; its partial files were removed" + (
                    ", the previous export is intact" if (out / "model").is_dir() else "")
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.broadcast_object_list(err, src=0)
        dist.barrier()
    if err[0] is not None:
        raise ExportError(err[0])
    return result


def _safetensors_error() -> type[BaseException]:
    try:
        from safetensors import SafetensorError

        return SafetensorError
    except ImportError:
        return OSError


def _write(model: torch.nn.Module, tokenizer: Any, out: Path) -> Path:
    """Rank 0's part: both directories are written and verified-complete before either is renamed."""
    base = unwrap_peft(model)
    staged = [(out / ".tmp-model", out / "model")]
    if base is not model:
        staged.append((out / ".tmp-adapter", out / "adapter"))
    try:
        for tmp, _ in staged:
            shutil.rmtree(tmp, ignore_errors=True)
        base.save_pretrained(str(staged[0][0]), state_dict=merged_state_dict(model), safe_serialization=True)
        _save_tokenizer(tokenizer, staged[0][0])
        write_manifest(staged[0][0], "model")
        if len(staged) > 1:
            model.save_pretrained(str(staged[1][0]), safe_serialization=True)
            write_manifest(staged[1][0], "adapter")
        for tmp, final in staged:
            replace_dir(tmp, final)
    except BaseException:
        for tmp, _ in staged:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "model"
