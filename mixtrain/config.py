"""Run configuration: YAML in, typed dataclasses out, unknown keys rejected.

A config file has the sections ``model``, ``data``, ``mixing``, ``train``, ``deepspeed`` (a raw
DeepSpeed JSON dict merged over the one built from ``train``) and the scalar ``output_dir``.
Every section is a dataclass; :func:`from_dict` refuses keys a section does not define and lists
the valid ones, so a typo never silently falls back to a default.

Command-line overrides use dotted paths (``train.steps=20``); values are parsed with
``yaml.safe_load`` so ``1e-3``, ``true``, ``[a, b]`` and ``{x: 1}`` work as expected.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "MixingConfig",
    "ModelConfig",
    "TrainConfig",
    "apply_overrides",
    "config_fingerprint",
    "demo_config",
    "from_dict",
    "load_config",
]


class ConfigError(ValueError):
    """A config value or key is invalid; the message names the key, the value and what is valid."""


@dataclass
class ModelConfig:
    """``model`` section.

    Attributes:
        name_or_path: local HF checkpoint directory; mutually exclusive with ``config``.
        config: a transformers config dict (must contain ``model_type``) for training from
            scratch; ``vocab_size`` is taken from the tokenizer when absent.
        tokenizer: ``"byte"`` (built-in byte-level tokenizer) or a local tokenizer path; ``None``
            means ``name_or_path`` when given, else ``"byte"``.
        lora: PEFT LoRA settings (``r``, ``alpha``, ``dropout``, ``target_modules``) or ``None``.
        gradient_checkpointing: enable activation checkpointing in the HF model.
        attn_implementation: passed to transformers (``eager``, ``sdpa``, ``flash_attention_2``);
            ``None`` lets transformers choose (flash_attention_2 when flash-attn is installed and a
            GPU is used).
        init_seed: seed for random initialisation when training from ``config``, and of the LoRA
            adapters (with ``name_or_path`` too), so every run of a comparison starts identically.
    """

    name_or_path: str | None = None
    config: dict[str, Any] | None = None
    tokenizer: str | None = None
    lora: dict[str, Any] | None = None
    gradient_checkpointing: bool = False
    attn_implementation: str | None = None
    init_seed: int = 0


@dataclass
class DataConfig:
    """``data`` section.

    Attributes:
        builtin: names of built-in domains (``code``, ``docs``, ``math``, ``lego``, ``addition``);
            ``lego`` / ``addition`` expand to one sub-domain per skill (``lego_1`` …), and a single
            skill can be named directly.
        domains: ``{name: path}`` (``.jsonl``, ``.jsonl.gz``, ``.parquet`` or ``.arrow`` file, a folder
            of them, or a Hugging Face ``save_to_disk`` folder); a value may also be ``{train: path,
            dev: path, fields: {messages|prompt|response|text|role|content: your field name}}``.
        dev_fraction: held-out fraction per domain when no dev path is given (deterministic).
        max_length: truncate tokenised examples to this many tokens.
        train_on_prompt: also train on prompt tokens (default: response tokens only).
        packing: varlen packing: concatenate examples of the same domain into ``max_length`` rows
            with per-example position ids and block-diagonal attention (see
            :mod:`mixtrain.data.collate`).
        builtin_size: examples per generated built-in (sub-)domain; an int, or a mapping
            ``{name: n}`` where ``name`` is a domain, a skill family (``lego``) or ``"*"``.
        builtin_seed: seed of the built-in corpus generator.
        with_replacement: sample examples with replacement instead of epoch permutations.
        exhaustion: ``cycle`` | ``stop`` | ``max_epochs``; a dict ``{domain: policy}`` sets it
            per domain.
        max_epochs: epochs per domain under ``exhaustion: max_epochs``.
        max_dev_examples: cap of dev examples per domain used for dev losses.
        cache_dir: where the token cache lives (default ``$MIXTRAIN_HOME/data``; see
            :mod:`mixtrain.data.cache`).
        num_workers: processes that build the token cache (default: every core).
    """

    builtin: list[str] = field(default_factory=list)
    domains: dict[str, Any] = field(default_factory=dict)
    dev_fraction: float = 0.05
    max_length: int = 128
    train_on_prompt: bool = False
    packing: bool = False
    builtin_size: int | dict[str, int] = 400
    builtin_seed: int = 0
    with_replacement: bool = False
    exhaustion: str | dict[str, str] = "cycle"
    max_epochs: int = 1
    max_dev_examples: int = 64
    cache_dir: str | None = None
    num_workers: int | None = None


@dataclass
class MixingConfig:
    """``mixing`` section: policy name, its parameters, and how often it updates (steps)."""

    policy: str = "temperature"
    params: dict[str, Any] = field(default_factory=dict)
    update_every: int | None = None


@dataclass
class TrainConfig:
    """``train`` section.

    ``micro_batch_size`` is per rank; the global batch is ``micro_batch_size * grad_accum *
    world_size``. ``warmup`` is a step count (int) or a fraction of ``steps`` (float < 1).
    ``resume`` is ``auto`` (latest complete checkpoint in ``output_dir/checkpoints``), ``none``,
    or a checkpoint directory. ``eval_every`` 0 disables dev evaluation (unless the policy needs
    it). ``save_every`` 0 saves only at the end. ``save_model`` writes the final model as a
    Hugging Face directory ``output_dir/model`` (merged LoRA; the adapter alone in
    ``output_dir/adapter``), see :mod:`mixtrain.export`. ``sort_by_length``: within each
    optimizer step the micro-batches take the global batch's rows longest first, so rows of
    similar length are padded together (less padding with ``grad_accum`` or world size > 1); the
    step's rows, its gradient and the per-domain signals are unchanged up to float summation order.
    ``time_limit`` (``"3h50m"``, ``"45m"``, ``"90s"``; ``None``: none) stops the run, after a
    checkpoint, once the next step and a checkpoint might not fit in that wall-clock time since
    the start (exit code 75, as for SIGTERM; run the same command to continue). ``dist_timeout``:
    seconds a collective waits for the other ranks; a rank silent for half of it is named and
    the others exit (see :mod:`mixtrain.faults`). ``router_aux_loss``: coefficient of the MoE
    load-balancing loss (Switch / Mixtral, ``mixkernels.hf.RouterAuxLoss``) added to every
    training micro-batch's loss; 0 (default) trains on the token loss alone; an MoE model needs
    routers to be found. ``router_aux_per_layer`` (default true): the mean of every MoE layer's
    own loss (Switch, Megatron-LM); false: transformers' loss, pooled over layers (Mixtral's
    coefficient 0.02), under which each layer may still collapse. Both are on transformers'
    scale (about top-k when balanced), so Switch's 0.01 per layer is 0.01 x the MoE layer count.
    """

    steps: int = 100
    micro_batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup: float = 0
    lr_schedule: str = "cosine"
    grad_clip: float = 1.0
    zero_stage: int = 0
    precision: str = "auto"
    eval_every: int = 0
    log_every: int = 1
    save_every: int = 0
    keep_checkpoints: int = 2
    save_model: bool = True
    sort_by_length: bool = True
    resume: str = "auto"
    seed: int = 0
    progress: bool = True
    tensorboard: bool = True
    threads: int | None = None
    time_limit: str | None = None
    dist_timeout: float = 300.0
    router_aux_loss: float = 0.0
    router_aux_per_layer: bool = True


@dataclass
class EvalConfig:
    """``eval`` section: exact-match task accuracy by greedy decoding (:mod:`mixtrain.accuracy`).

    Attributes:
        accuracy: decode the dev splits and log ``dev_accuracy`` {domain: accuracy} at every dev
            evaluation (``train.eval_every``) and at the last step.
        accuracy_domains: domains to score; default every domain with an answer rule
            (``lego_k``, ``addition_k``, ``math``); others listed here use exact match.
        max_examples: dev rows decoded per domain (the first ones).
        batch_size: prompts decoded together.
        max_new_tokens: decoding budget; default the longest gold response of the domain + 8.
        accuracy_every: decode every this many steps instead (dev losses keep
            ``train.eval_every``; the last step is always scored); ``None``: at every dev evaluation.
        at_start: also evaluate before the first step (a ``step: 0`` record with ``dev_loss``
            and, with ``accuracy``, ``dev_accuracy``): the starting model's scores.
    """

    accuracy: bool = False
    accuracy_domains: list[str] | None = None
    max_examples: int = 64
    batch_size: int = 32
    max_new_tokens: int | None = None
    accuracy_every: int | None = None
    at_start: bool = False


@dataclass
class Config:
    """Whole run config (see module docstring)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mixing: MixingConfig = field(default_factory=MixingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: dict[str, Any] = field(default_factory=dict)
    output_dir: str = "runs/mixtrain"
    gradex: dict[str, Any] = field(default_factory=dict)  # parsed by mixtrain.gradex.config

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (YAML/JSON serialisable)."""
        return dataclasses.asdict(self)


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "mixing": MixingConfig, "train": TrainConfig,
             "eval": EvalConfig}


def _check_type(where: str, value: Any, tp: Any) -> Any:
    """Validate (and lightly coerce int→float) ``value`` against annotation ``tp``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        errors = []
        for arg in get_args(tp):
            try:
                return _check_type(where, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: got {value!r} ({type(value).__name__}), expected {tp}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if origin in (list, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: got {value!r}, expected a list")
        (arg,) = get_args(tp) or (Any,)
        return [_check_type(f"{where}[{i}]", v, arg) for i, v in enumerate(value)]
    if origin in (dict, Mapping):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: got {value!r}, expected a mapping")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: got {value!r}, expected true/false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: got {value!r}, expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: got {value!r}, expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: got {value!r}, expected a string")
    return value


_MAX_DEPTH = 64


def _check_plain(where: str, value: Any, depth: int = 0) -> None:
    """Config values are what JSON can hold: mappings with string keys, lists, strings, numbers,
    booleans, null (YAML dates, binary, sets or recursive anchors are refused)."""
    if depth > _MAX_DEPTH:
        raise ConfigError(f"{where}: nested deeper than {_MAX_DEPTH} levels (recursive YAML anchor?)")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{where}: key {k!r} ({type(k).__name__}) is not a string; quote it")
            _check_plain(f"{where}.{k}" if where else k, v, depth + 1)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(f"{where}[{i}]", v, depth + 1)
    elif isinstance(value, (datetime.date, datetime.time)):
        raise ConfigError(f"{where}: got the date/time {value!r}; quote it to make it a string")
    elif value is not None and not isinstance(value, (str, int, float, bool)):
        raise ConfigError(f"{where}: got {type(value).__name__} {value!r:.60}, expected a string, number, "
                          "boolean, null, list or mapping")


def _section_from_dict(name: str, cls: type, raw: Any) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ConfigError(f"section '{name}' must be a mapping, got {raw!r:.200}")
    hints = get_type_hints(cls)
    valid = [f.name for f in fields(cls)]
    unknown = sorted(set(raw) - set(valid))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} in section '{name}'; valid keys: {', '.join(valid)}"
        )
    kwargs = {k: _check_type(f"{name}.{k}", v, hints[k]) for k, v in raw.items()}
    return cls(**kwargs)


def from_dict(raw: Mapping[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a plain dict (e.g. parsed YAML).

    Raises:
        ConfigError: unknown section/key (listing the valid ones) or a value of the wrong type
            or out of range.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config must be a mapping at top level, got {type(raw).__name__}")
    _check_plain("", dict(raw))
    valid_top = ["model", "data", "mixing", "train", "deepspeed", "output_dir", "gradex", "eval"]
    unknown = sorted(set(raw) - set(valid_top))
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {unknown}; valid keys: {', '.join(valid_top)}")
    cfg = Config(
        **{name: _section_from_dict(name, cls, raw.get(name)) for name, cls in _SECTIONS.items()},
        deepspeed=_check_type("deepspeed", raw.get("deepspeed") or {}, dict[str, Any]),
        output_dir=_check_type("output_dir", raw.get("output_dir", "runs/mixtrain"), str),
        gradex=_check_type("gradex", raw.get("gradex") or {}, dict[str, Any]),
    )
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Range checks that do not need data or a model; raises :class:`ConfigError`."""
    t, d, m = cfg.train, cfg.data, cfg.mixing
    for key in ("steps", "micro_batch_size", "grad_accum", "log_every"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key}: got {getattr(t, key)}, expected an integer >= 1")
    ae = cfg.eval.accuracy_every
    if ae is not None and (isinstance(ae, bool) or not isinstance(ae, int) or ae < 1):
        raise ConfigError(f"eval.accuracy_every: got {ae!r}, expected null or an integer >= 1")
    for key in ("eval_every", "save_every"):
        if getattr(t, key) < 0:
            raise ConfigError(f"train.{key}: got {getattr(t, key)}, expected an integer >= 0")
    if not (t.lr > 0 and math.isfinite(t.lr)):
        raise ConfigError(f"train.lr: got {t.lr}, expected a positive finite number")
    if t.lr_schedule not in ("cosine", "linear", "constant"):
        raise ConfigError(
            f"train.lr_schedule: got {t.lr_schedule!r}, expected one of cosine, linear, constant"
        )
    if t.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage: got {t.zero_stage}, expected 0, 1, 2 or 3")
    if t.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(
            f"train.precision: got {t.precision!r}, expected one of auto, fp32, bf16, fp16"
        )
    if not math.isfinite(t.warmup) or t.warmup < 0 or (t.warmup != int(t.warmup) and t.warmup >= 1):
        raise ConfigError(
            f"train.warmup: got {t.warmup}, expected a step count >= 0 or a fraction in [0, 1)"
        )
    if t.time_limit is not None:
        from .faults import parse_duration

        try:
            parse_duration(t.time_limit, "train.time_limit")
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if not (math.isfinite(t.dist_timeout) and t.dist_timeout > 0):
        raise ConfigError(f"train.dist_timeout: got {t.dist_timeout}, expected a positive number of seconds")
    if not (math.isfinite(t.router_aux_loss) and t.router_aux_loss >= 0):
        raise ConfigError(f"train.router_aux_loss: got {t.router_aux_loss}, expected a finite coefficient >= 0")
    if t.keep_checkpoints < 1:
        raise ConfigError(f"train.keep_checkpoints: got {t.keep_checkpoints}, expected >= 1")
    if not (0.0 <= d.dev_fraction < 1.0):
        raise ConfigError(f"data.dev_fraction: got {d.dev_fraction}, expected a value in [0, 1)")
    if d.max_length < 4:
        raise ConfigError(f"data.max_length: got {d.max_length}, expected >= 4")
    bs = d.builtin_size if isinstance(d.builtin_size, dict) else {"*": d.builtin_size}
    for k, v in bs.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 2:
            raise ConfigError(f"data.builtin_size[{k}]: got {v!r}, expected an integer >= 2")
    if d.max_epochs < 1:
        raise ConfigError(f"data.max_epochs: got {d.max_epochs}, expected >= 1")
    ex = d.exhaustion if isinstance(d.exhaustion, dict) else {"*": d.exhaustion}
    for k, v in ex.items():
        if v not in ("cycle", "stop", "max_epochs"):
            raise ConfigError(
                f"data.exhaustion[{k}]: got {v!r}, expected one of cycle, stop, max_epochs"
            )
    if not d.builtin and not d.domains:
        raise ConfigError("data: no domains; set data.builtin and/or data.domains")
    if m.update_every is not None and m.update_every < 1:
        raise ConfigError(f"mixing.update_every: got {m.update_every}, expected >= 1")
    e = cfg.eval
    for key in ("max_examples", "batch_size"):
        if getattr(e, key) < 1:
            raise ConfigError(f"eval.{key}: got {getattr(e, key)}, expected an integer >= 1")
    if e.max_new_tokens is not None and e.max_new_tokens < 1:
        raise ConfigError(f"eval.max_new_tokens: got {e.max_new_tokens}, expected an integer >= 1 or null")
    if cfg.model.name_or_path is None and cfg.model.config is None:
        raise ConfigError("model: set either model.name_or_path or model.config")
    if cfg.model.name_or_path is not None and cfg.model.config is not None:
        raise ConfigError("model: set only one of model.name_or_path and model.config")
    if cfg.model.config is not None and "model_type" not in cfg.model.config:
        raise ConfigError(
            "model.config: missing 'model_type' (e.g. llama, qwen2, qwen2_moe, mixtral)"
        )


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected section.key=value")
    key, value = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {item!r}: empty key")
    if value == "":
        return path, ""
    try:
        return path, yaml.safe_load(value)
    except (yaml.YAMLError, RecursionError) as e:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({type(e).__name__}: {e}); "
                          "quote it to pass a string") from None


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a raw config dict (in a copy) and return it.

    Raises:
        ConfigError: an override that is not ``key=value``, whose value is not YAML, or whose path
            runs through a non-mapping.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"config must be a mapping at top level, got {type(raw).__name__}")
    try:
        out = copy.deepcopy(raw)
    except (TypeError, RecursionError) as e:
        raise ConfigError(f"config cannot be copied ({type(e).__name__}: {e}); use plain YAML values") from None
    for item in overrides:
        if not isinstance(item, str):
            raise ConfigError(f"override {item!r}: expected a 'section.key=value' string")
        path, value = _parse_override(item)
        node = out
        for p in path[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: '{p}' is not a section")
            node = nxt
        node[path[-1]] = value
    return out


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (``yaml.safe_load``), apply overrides, validate.

    Raises:
        ConfigError: file missing, not a mapping, or invalid content.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {str(p)!r}: byte at offset {e.start} (0x{e.object[e.start]:02x}) is not "
                          f"UTF-8 ({e.reason}); save it as UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"config file {str(p)!r} cannot be read: {e.strerror or e}") from None
    try:
        raw = yaml.safe_load(text) or {}
    except (yaml.YAMLError, RecursionError) as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(p)!r}: top level must be a mapping")
    return from_dict(apply_overrides(raw, overrides))


TINY_LLAMA: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


DEMO_MODEL = "smollm2-135m-instruct"
LORA_ALL_LINEARS: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def demo_config(output_dir: str = "runs/demo", *, tiny: bool = False) -> dict[str, Any]:
    """Raw dict of the embedded demo.

    Default: SmolLM2-135M-Instruct (pretrained, its chat template) fine-tuned with LoRA on the
    built-in short-answer skills (``addition_1..3``, ``lego_1..5``, ``math``) with the
    Mixture-of-Skills policy, dev loss and exact-match accuracy at step 0 and at the end. ``tiny``: the
    20-second variant, a tiny Llama from random weights with the byte tokenizer on the whole
    built-in corpus.
    """
    if tiny:
        return _tiny_demo_config(output_dir)
    return {
        "model": {"name_or_path": DEMO_MODEL,
                  "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": list(LORA_ALL_LINEARS)}},
        "data": {
            "builtin": ["addition", "lego", "math"],
            "max_length": 256,
            "builtin_size": 200,
            "dev_fraction": 0.1,
            "max_dev_examples": 12,
        },
        # the released scorer (lr 1e-4, updates every 100 steps) barely moves in 48 steps: a
        # larger scorer lr makes the demo's mixture visibly follow the rewards
        "mixing": {"policy": "mos", "update_every": 12,
                   "params": {"reward": "diff", "use_ema": True, "temperature": 10.0, "diff_pool_size": 8,
                              "diff_examples": 4, "scorer_lr": 3e-3}},
        "train": {"steps": 48, "micro_batch_size": 8, "grad_accum": 1, "lr": 2e-3, "warmup": 4,
                  "eval_every": 48, "log_every": 4, "save_every": 24, "seed": 0},
        "eval": {"accuracy": True, "max_examples": 12, "batch_size": 64, "at_start": True},
        "output_dir": output_dir,
    }


def _tiny_demo_config(output_dir: str) -> dict[str, Any]:
    return {
        "model": {"config": dict(TINY_LLAMA), "tokenizer": "byte"},
        "data": {
            "builtin": ["code", "docs", "math", "lego", "addition"],
            "max_length": 448,  # the longest built-in code record (407 tokens) fits whole
            "builtin_size": {"code": 600, "docs": 400, "math": 300, "lego": 120, "addition": 160},
            "dev_fraction": 0.05,
        },
        "mixing": {"policy": "mos", "update_every": 20, "params": {"reward": "diff", "use_ema": True, "temperature": 10.0, "diff_pool_size": 32}},
        "train": {
            "steps": 120,
            "micro_batch_size": 8,
            "grad_accum": 1,
            "lr": 3e-3,
            "warmup": 10,
            "eval_every": 20,
            "log_every": 5,
            "save_every": 60,
            "seed": 0,
        },
        "output_dir": output_dir,
    }


def config_fingerprint(cfg: Config) -> str:
    """Hash of everything that must match for a checkpoint to be resumable by this config.

    Excludes fields that may legitimately change on resume (``steps``, logging/saving cadence,
    ``resume``, ``progress``, ``output_dir``, ``threads``, ``keep_checkpoints``, ``time_limit``,
    ``dist_timeout``, and the split of
    the global batch into ``micro_batch_size`` x ``grad_accum``, so a run can resume at another
    world size; the loop checks the global batch size itself).
    """
    d = cfg.to_dict()
    d.pop("output_dir", None)
    d.pop("eval", None)  # evaluation settings never affect training
    d.pop("gradex", None)  # GradEx settings never change what a training checkpoint holds
    d["data"].pop("cache_dir", None)  # where and how the token cache is built never changes the tokens
    d["data"].pop("num_workers", None)
    for k in ("steps", "log_every", "save_every", "resume", "progress", "tensorboard", "threads",
              "keep_checkpoints", "save_model", "sort_by_length", "eval_every", "micro_batch_size", "grad_accum",
              "time_limit", "dist_timeout"):
        d["train"].pop(k, None)
    if not d["train"].get("router_aux_loss"):  # off: checkpoints written before the option stay resumable
        d["train"].pop("router_aux_loss", None)
        d["train"].pop("router_aux_per_layer", None)
    blob = json.dumps(d, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
