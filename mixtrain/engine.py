"""DeepSpeed set-up: process group, model, DeepSpeed config, optimizer and LR schedule.

On a machine without a GPU the accelerator is DeepSpeed's ``cpu`` one, the backend ``gloo`` and
the precision fp32; with a CUDA device it is ``cuda``, ``nccl`` and (``train.precision: auto``)
bf16 where the GPU supports it (``DS_ACCELERATOR=cpu`` still forces the CPU path). One process
works without a launcher (we create a one-rank group on a free local port); ``torchrun`` /
``deepspeed`` launchers provide ``RANK``/``WORLD_SIZE``.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import socket
from typing import Any

import torch

from .config import Config, ConfigError

__all__ = [
    "DistInfo",
    "LossModel",
    "build_ds_config",
    "build_engine",
    "build_model",
    "default_accelerator",
    "init_distributed",
    "lr_lambda",
    "on_gpu",
]

log = logging.getLogger(__name__)


def default_accelerator() -> str:
    """DeepSpeed accelerator for this machine when ``DS_ACCELERATOR`` is unset: ``cuda`` if a CUDA
    device is usable, else ``cpu`` (so DeepSpeed never probes CUDA on a CPU-only machine)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def on_gpu() -> bool:
    """Whether training runs on CUDA: a device is usable and ``DS_ACCELERATOR`` is not ``cpu``."""
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"


class DistInfo:
    """Rank, world size and local rank of this process."""

    def __init__(self, rank: int, world_size: int, local_rank: int) -> None:
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank

    @property
    def is_main(self) -> bool:
        """Rank 0."""
        return self.rank == 0


# The variables a torch.distributed rendezvous reads from the environment.
RENDEZVOUS_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                   "MASTER_PORT")


def standalone_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``env`` (default ``os.environ``) without any rendezvous variables, for a child
    process that must start its own job: a process that trained in-process (see
    :func:`init_distributed`) still holds its one-rank store on ``MASTER_PORT``, and a child that
    inherited it would try to bind the same port."""
    return {k: v for k, v in (os.environ if env is None else env).items() if k not in RENDEZVOUS_VARS}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed(timeout: float | None = None) -> DistInfo:
    """Initialise ``torch.distributed`` through DeepSpeed (gloo on CPU, nccl on GPU).

    ``timeout``: seconds a collective may wait for the other ranks (``train.dist_timeout``);
    ``None`` keeps DeepSpeed's default (10 minutes).
    """
    if not on_gpu():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            os.environ.update(
                RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(_free_port()),
            )
        if on_gpu():
            # NCCL binds each rank's communicator to the current device: set it before any collective
            # (otherwise every rank of a node would talk through cuda:0).
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        kw: dict[str, Any] = {}
        if timeout is not None:
            from datetime import timedelta

            kw["timeout"] = timedelta(seconds=float(timeout))
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu() else "gloo", verbose=False, **kw)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def build_model(cfg: Config, vocab_size: int) -> torch.nn.Module:
    """A transformers causal LM from ``model.name_or_path`` (local) or ``model.config``.

    ``vocab_size`` (the tokenizer's) fills ``config.vocab_size`` when absent; a model whose
    vocabulary is smaller than the tokenizer's is refused.
    """
    import transformers

    m = cfg.model
    kw: dict[str, Any] = {}
    if m.attn_implementation:
        kw["attn_implementation"] = m.attn_implementation
    elif on_gpu():
        try:
            import flash_attn  # noqa: F401

            kw["attn_implementation"] = "flash_attention_2"
        except ImportError:
            pass
    if m.name_or_path is not None:
        from .models import ModelError, quiet_progress, resolve_model

        try:
            path = resolve_model(m.name_or_path)
        except ModelError as e:
            raise ConfigError(f"model.name_or_path: {e}") from None
        try:
            with quiet_progress():
                model = transformers.AutoModelForCausalLM.from_pretrained(
                    path, local_files_only=True, dtype=torch.float32, **kw
                )
        except Exception as e:
            raise ConfigError(f"model.name_or_path: cannot load {m.name_or_path!r}: {e}") from e
    else:
        raw = dict(m.config or {})
        model_type = raw.pop("model_type")
        raw.setdefault("vocab_size", vocab_size)
        try:
            hf_cfg = transformers.AutoConfig.for_model(model_type, **raw)
        except (ValueError, KeyError) as e:
            raise ConfigError(f"model.config: model_type {model_type!r} is not known to transformers: {e}") from e
        torch.manual_seed(m.init_seed)
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, **kw)
    emb = model.get_input_embeddings().weight.shape[0]
    if emb < vocab_size:
        raise ConfigError(
            f"model vocabulary ({emb}) is smaller than the tokenizer's ({vocab_size}); "
            "set model.config.vocab_size or use a matching tokenizer"
        )
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if m.lora:
        try:
            import peft
        except ImportError as e:
            raise ConfigError("model.lora is set but the 'peft' package is not installed") from e
        lora = dict(m.lora)
        lora.setdefault("task_type", "CAUSAL_LM")
        # seeded: otherwise a pretrained model's adapters start from whatever the global generator
        # holds (different in every process), and runs paired by seed would differ in their init
        torch.manual_seed(m.init_seed)
        try:
            model = peft.get_peft_model(model, peft.LoraConfig(**lora))
        except TypeError as e:
            raise ConfigError(f"model.lora: {e}") from e
    return model


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def build_ds_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """Our DeepSpeed config from ``train`` with the user's ``deepspeed`` dict merged over it."""
    t = cfg.train
    precision = t.precision
    if precision == "auto":
        precision = "bf16" if on_gpu() and torch.cuda.is_bf16_supported() else "fp32"
    if precision in ("bf16", "fp16") and not on_gpu():
        raise ConfigError(f"train.precision: {precision} needs a GPU here; use fp32 on CPU")
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
    }
    merged = _merge(ds, cfg.deepspeed)
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if merged[key] != ds[key]:
            raise ConfigError(f"deepspeed.{key} conflicts with train settings; set it in train")
    return merged


def lr_lambda(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """LR multiplier after ``step`` optimizer steps: linear warmup to 1, then cosine / linear
    decay to ``min_ratio`` at ``total`` (constant keeps 1)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class LossModel(torch.nn.Module):
    """The module DeepSpeed wraps: HF model + fused per-domain loss.

    ``forward(input_ids, attention_mask, labels, domain_ids)`` returns a dict with ``loss``,
    ``group_loss`` [D], ``group_count`` [D] and optionally ``token_loss`` / ``hidden``. Packed
    batches also pass ``position_ids`` (attention then stays within each example).
    ``router_aux_loss`` > 0 (an MoE model): training forwards with a ``loss_scale`` add that
    coefficient times the micro-batch's load-balancing loss (pads excluded; per layer or pooled
    over layers by ``router_aux_per_layer``, see ``mixkernels.hf.RouterAuxLoss``) to ``loss`` and
    report the unweighted term as ``router_aux_loss``; DeepSpeed's mean over micro-batches and
    ranks then makes it the mean over the global batch's micro-batches, as in transformers.
    Wrapping (instead of calling the engine on the HF model) keeps every parameter access inside
    a module forward, which ZeRO-3 needs to gather the LM head for the fused loss.
    """

    def __init__(self, model: torch.nn.Module, num_domains: int, zero_stage: int = 0,
                 router_aux_loss: float = 0.0, router_aux_per_layer: bool = True) -> None:
        super().__init__()
        self.model = model
        self.num_domains = num_domains
        self.router_aux_loss = router_aux_loss
        self._aux = None
        if router_aux_loss > 0:
            from mixkernels.hf import RouterAuxLoss

            try:
                self._aux = RouterAuxLoss(model, per_layer=router_aux_per_layer)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"train.router_aux_loss={router_aux_loss} needs an MoE model whose routers "
                                  f"mixkernels can hook: {e}") from e
        self.return_token_loss = False
        self.capture_hidden = False
        self._hidden: torch.Tensor | None = None
        if zero_stage == 3:
            import deepspeed

            head = model.get_output_embeddings()
            if head is not None:
                deepspeed.zero.register_external_parameter(self, head.weight)
        base = _decoder(model)
        if base is not None:
            base.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self.capture_hidden:
            h = output[0] if isinstance(output, tuple) else getattr(output, "last_hidden_state", None)
            self._hidden = h.detach() if h is not None else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                domain_ids: torch.Tensor, loss_scale: float | None = None,
                position_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``loss_scale`` given: ``loss = loss_scale * sum of token losses`` (the loop passes
        ``grad_accum * world / global label tokens`` so gradients are those of the global
        token-mean, whatever the split over ranks and micro-steps); else the batch mean."""
        from .signals import causal_lm_loss

        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "domain_ids": domain_ids}
        if position_ids is not None:
            batch["position_ids"] = position_ids
        self._hidden = None
        aux_on = self._aux is not None and loss_scale is not None and self.training and torch.is_grad_enabled()
        if self._aux is not None:
            self._aux.reset()
            self._aux.enabled = aux_on
        out = causal_lm_loss(self.model, batch, self.num_domains, return_token_loss=self.return_token_loss,
                             reduction="mean" if loss_scale is None else "sum")
        loss = out.loss if loss_scale is None else out.loss * loss_scale
        res = {"loss": loss, "group_loss": out.group_loss, "group_count": out.group_count}
        if aux_on:
            aux = self._aux.loss(attention_mask)
            res["loss"] = loss + self.router_aux_loss * aux.to(loss.dtype)
            res["router_aux_loss"] = aux.detach()
        if out.token_loss is not None:
            res["token_loss"] = out.token_loss
        if self._hidden is not None:
            res["hidden"] = self._hidden
        return res


def _decoder(model: torch.nn.Module) -> torch.nn.Module | None:
    """The base (decoder) module whose output is the last hidden state."""
    m = model
    if hasattr(m, "get_base_model"):  # peft
        m = m.get_base_model()
    get = getattr(m, "get_decoder", None)
    try:
        dec = get() if callable(get) else None
    except Exception:  # noqa: BLE001
        dec = None
    return dec if dec is not None else getattr(m, "model", None)


def adamw(params: list[torch.nn.Parameter], **kw: Any) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` with its fused kernel where the parameters' device has one (CPU and
    CUDA; what HF ``Trainer`` uses by default), else the multi-tensor one. Same update rule; the
    fused step makes no temporaries, where the per-tensor loop allocates (and, above glibc's mmap
    threshold, page-faults in) a parameter-sized buffer for every large tensor at every step."""
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(params, foreach=True, **kw)


def build_engine(cfg: Config, model: LossModel, world_size: int) -> tuple[Any, Any, Any, dict[str, Any]]:
    """``deepspeed.initialize`` with our config, an AdamW optimizer and a LambdaLR warmup+decay.

    Returns ``(engine, optimizer, lr_scheduler, ds_config)``.
    """
    import deepspeed

    t = cfg.train
    ds_cfg = build_ds_config(cfg, world_size)
    warmup = int(t.warmup) if t.warmup >= 1 or t.warmup == 0 else round(t.warmup * t.steps)
    optimizer = None
    scheduler = None
    params = [p for p in model.parameters() if p.requires_grad]
    if "optimizer" not in ds_cfg:
        optimizer = adamw(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    if "scheduler" not in ds_cfg:
        total = t.steps

        def fn(step: int) -> float:
            return lr_lambda(step, total, warmup, t.lr_schedule, t.min_lr_ratio)

        if optimizer is not None:
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
        else:
            scheduler = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, fn)
    engine, opt, _, sched = deepspeed.initialize(
        model=model, model_parameters=params if optimizer is None else None,
        optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg,
    )
    return engine, opt, sched, ds_cfg
