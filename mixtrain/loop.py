"""The training loop, top to bottom: data → policy → model/engine → resume → steps → outputs.

One optimizer step =
  1. draw the global batch from the sampler (weights fixed for the whole step) and split it
     into this rank's micro-batches (longest rows first with ``train.sort_by_length``),
  2. for each of this rank's ``grad_accum`` micro-batches: forward (fused per-domain loss),
     ``engine.backward``, ``engine.step`` (DeepSpeed applies the optimizer at the boundary),
  3. all-reduce the step's per-domain sums once (:class:`mixtrain.signals.SignalBus`),
  4. every ``update_every`` steps: collect the signals the policy asked for, ``policy.update``,
     broadcast rank 0's weights, give them to the sampler (they apply from the next step),
  5. dev evaluation / metrics / checkpoint as configured,
  6. stop early, after a checkpoint, when a SIGTERM/SIGINT arrived on any rank or
     ``train.time_limit`` is near (all ranks agree through one all-reduce per step); the run
     then returns ``interrupted`` and the CLI exits with :data:`mixtrain.faults.EXIT_PREEMPTED`.

Resume picks the newest checkpoint that verifies against its manifest (see
:mod:`mixtrain.checkpoint`); with several ranks, a rank that stops responding is named and the
others exit (:class:`mixtrain.faults.RankWatchdog`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml

from . import policies
from .checkpoint import (
    CheckpointError,
    atomic_write_text,
    check_checkpoint,
    find_resumable,
    load_checkpoint,
    read_state,
    save_checkpoint,
)
from .config import Config, ConfigError, config_fingerprint
from .data import collate_examples, encode_config_domains
from .engine import LossModel, build_engine, build_model, init_distributed
from .faults import RankWatchdog, StopRequest, parse_duration
from .policies import PolicyContext
from .report import DEV_EXAMPLES_FILE
from .sampler import MixtureSampler, SamplerExhausted, shard, validate_weights
from .signals import LossOutput, SignalBus, dev_losses

__all__ = ["MetricsWriter", "train"]

log = logging.getLogger("mixtrain")


def _setup_logging(is_main: bool) -> None:
    if is_main:
        if not log.handlers:
            h = logging.StreamHandler()
            h.setFormatter(logging.Formatter("[mixtrain] %(message)s"))
            log.addHandler(h)
        log.setLevel(logging.INFO)
    else:
        log.setLevel(logging.WARNING)
    for noisy in ("DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return _jsonable(x.item())
    return x


class MetricsWriter:
    """``metrics.jsonl`` (flushed per record) + TensorBoard scalars, rank 0 only.

    On resume from step ``k``, records after ``k`` (written by the killed run after its last
    checkpoint) are dropped so the file reads as one consistent run; a run starting from step 0
    starts the file afresh.
    """

    def __init__(self, out: Path, enabled: bool, resume_step: int, tensorboard: bool) -> None:
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if self.path.exists():
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    # a fresh start (no checkpoint) keeps nothing: not even a killed run's step-0 record
                    if resume_step > 0 and json.loads(line).get("step", 0) <= resume_step:
                        keep.append(line)
                except json.JSONDecodeError:
                    break  # a torn last line from a kill
            atomic_write_text(self.path, "".join(k + "\n" for k in keep))
        self.f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115  (open for the whole run; close())
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"), purge_step=resume_step + 1 if resume_step else None)
            except ImportError:  # tensorboard missing: metrics.jsonl still has everything
                log.warning("tensorboard not installed; writing metrics.jsonl only")

    def write(self, rec: dict[str, Any]) -> None:
        """Append one record and mirror its scalars to TensorBoard."""
        if not self.enabled:
            return
        self.f.write(json.dumps(_jsonable(rec)) + "\n")
        self.f.flush()
        if self.tb is not None:
            step = rec["step"]
            for k, v in rec.items():
                if isinstance(v, dict):
                    for dk, dv in v.items():
                        if isinstance(dv, (int, float)) and math.isfinite(dv):
                            self.tb.add_scalar(f"{k}/{dk}", dv, step)
                elif isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        """Flush and close."""
        if self.enabled:
            self.f.close()
            if self.tb is not None:
                self.tb.close()


def _broadcast_weights(w: np.ndarray) -> np.ndarray:
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor(w, dtype=torch.float64)
        dist.broadcast(t, src=0)
        return t.numpy()
    return w


def _check_start(cfg: Config, policy: policies.MixingPolicy, enc: list[Any]) -> None:
    """Refuse at start-up what would otherwise fail mid-run."""
    if policy.requires_dev:
        missing = [d.name for d in enc if not d.dev]
        if missing:
            raise ConfigError(
                f"policy {cfg.mixing.policy!r} needs dev losses but domain(s) {missing} have no dev "
                "split; set data.dev_fraction > 0 or give {train, dev} paths"
            )
    for d in enc:
        if not d.train_label_counts().any():
            raise ConfigError(
                f"domain {d.name!r}: no trainable tokens after tokenisation (max_length "
                f"{cfg.data.max_length} cuts every response?)"
            )


def describe_changes(old: Any, new: Any, where: str = "") -> list[str]:
    """Human-readable differences between two JSON-like values (``a.b[2]: x -> y``), at most 5."""
    out: list[str] = []
    if isinstance(old, dict) and isinstance(new, dict) and "path" in old and old.get("path") == new.get("path"):
        # a file's entry: name the file in each of its changes
        rest = describe_changes({k: v for k, v in old.items() if k != "path"},
                                {k: v for k, v in new.items() if k != "path"}, where)
        out += [f"{c} (file {old['path']})" for c in rest]
    elif isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new), key=str):
            key = f"{where}.{k}" if where else str(k)
            if k not in old:
                out.append(f"{key}: added")
            elif k not in new:
                out.append(f"{key}: removed")
            else:
                out += describe_changes(old[k], new[k], key)
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            out += describe_changes(a, b, f"{where}[{i}]")
    elif old != new:
        def short(v: Any) -> str:
            r = json.dumps(v, default=str)
            return r if len(r) <= 120 else r[:117] + "..."
        out.append(f"{where}: {short(old)} -> {short(new)}")
    return out[:5]


def _start_watchdog(info: Any, timeout: float) -> RankWatchdog | None:
    if info.world_size < 2:
        return None
    try:
        store = dist.distributed_c10d._get_default_store()
    except (RuntimeError, AttributeError) as e:  # no store to heartbeat through: collectives still time out
        log.warning("no rendezvous store for the rank watchdog (%s); relying on train.dist_timeout alone", e)
        return None
    return RankWatchdog(store, info.rank, info.world_size, timeout).start()


def _choose_resume(cfg: Config, ckpt_root: Path, is_main: bool) -> Path | None:
    """The checkpoint to resume from (``None``: start fresh); rank 0 verifies, every rank agrees."""
    t = cfg.train
    if t.resume in ("none", "", "false"):
        return None
    if t.resume != "auto":
        path = Path(t.resume)
        if not path.is_dir():
            raise ConfigError(f"train.resume: checkpoint directory {t.resume!r} does not exist")
    pick: list[Any] = [None, None]
    if is_main:
        try:
            if t.resume == "auto":
                found, _ = find_resumable(ckpt_root)
                pick = [None if found is None else str(found), None]
            else:
                v = check_checkpoint(path)
                if not v.ok:
                    raise CheckpointError(f"train.resume: {v.problem}")
                if not v.verified:
                    log.warning("checkpoint %s: %s; resuming from it unverified", path, v.problem)
                pick = [str(path), None]
        except CheckpointError as e:
            pick = [None, str(e)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(pick, src=0)
    if pick[1] is not None:
        raise CheckpointError(pick[1])
    return None if pick[0] is None else Path(pick[0])


def _looks_distributed(e: BaseException) -> bool:
    """A failed collective (gloo reports a dead peer as a plain RuntimeError from its transport)."""
    if isinstance(e, CheckpointError) or type(e).__name__ == "ExportError":
        return False
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(e, dist_error):
        return True
    text = str(e)
    return any(k in text for k in ("gloo", "Gloo", "NCCL", "Connection reset", "Connection closed", "timed out"))


def _agree_stop(code: int) -> int:
    """The largest stop code of all ranks (0: continue), so every rank stops at the same step."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([code], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())
    return code


_STOP_REASONS = {1: "signal", 2: "time_limit"}


def train(cfg: Config) -> dict[str, Any]:
    """Run (or resume) training as configured; returns a summary dict (rank-local).

    ``summary["interrupted"]`` is ``"signal"`` or ``"time_limit"`` when the run stopped early
    after writing a checkpoint (run the same command to continue), else ``None``.
    """
    started = time.monotonic()
    t = cfg.train
    deadline = None if t.time_limit is None else started + parse_duration(t.time_limit, "train.time_limit")
    info = init_distributed(timeout=t.dist_timeout)
    _setup_logging(info.is_main)
    watchdog = _start_watchdog(info, t.dist_timeout)
    try:
        with StopRequest() as stopper:
            return _train(cfg, info, stopper, deadline)
    except RuntimeError as e:
        if watchdog is not None and _looks_distributed(e):  # a peer died mid-collective: let the watchdog name it
            watchdog.join_verdict()
        raise
    finally:
        if watchdog is not None:
            watchdog.stop()


def _train(cfg: Config, info: Any, stopper: StopRequest, deadline: float | None) -> dict[str, Any]:
    # ---- output dir -------------------------------------------------------------------------
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    out = Path(cfg.output_dir)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    t = cfg.train

    # ---- data -----------------------------------------------------------------------------
    tok, enc = encode_config_domains(cfg, progress=info.is_main and t.progress)
    names = [d.name for d in enc]
    sizes = [d.size for d in enc]
    # label tokens per training row (after the causal shift): lets every rank compute the global
    # batch's token count locally, since every rank knows the whole global batch
    label_counts = [d.train_label_counts() for d in enc]
    row_lengths = [d.train_lengths() for d in enc]
    data_inputs = {d.name: d.cache.manifest.get("inputs") for d in enc if d.cache is not None}
    log.info("domains: %s", ", ".join(f"{n}={s}" for n, s in zip(names, sizes)))

    # ---- policy (validated before the model is built: errors come fast) -----------------------
    policy = policies.get(cfg.mixing.policy, **cfg.mixing.params)
    if cfg.mixing.update_every is not None:
        policy.update_every = cfg.mixing.update_every
    _check_start(cfg, policy, enc)
    bus = SignalBus(names, policy.required_signals)

    # ---- model + DeepSpeed ------------------------------------------------------------------
    model = build_model(cfg, tok.vocab_size)
    policy.prepare_model(model)  # before the optimizer sees requires_grad (e.g. frozen routers)
    wrapper = LossModel(model, len(names), zero_stage=t.zero_stage, router_aux_loss=t.router_aux_loss,
                        router_aux_per_layer=t.router_aux_per_layer)
    wrapper.return_token_loss = bus.wants_token_loss
    wrapper.capture_hidden = bus.wants_hidden
    collector = None
    if "router_stats" in policy.required_signals:
        from mixkernels.hf import RouterStatsCollector

        try:
            collector = RouterStatsCollector(model, layers=policy.router_layers)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"policy {cfg.mixing.policy!r} needs router_stats but the model has no "
                              f"MoE routers mixkernels can hook: {e}") from e
        collector.__enter__()
    engine, _, sched, _ = build_engine(cfg, wrapper, info.world_size)
    device = engine.device

    def router_counts(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        assert collector is not None
        # per-token ids/mask [B*S]: the fused loss calls the decoder directly, so the collector's
        # model-level pre-hook does not see the batch shape
        s_len = batch["input_ids"].shape[1]
        st = collector.stats(group_ids=batch["domain_ids"].repeat_interleave(s_len), num_groups=len(names),
                             attention_mask=batch["attention_mask"].reshape(-1))
        return st.expert_counts.to(torch.float64).cpu()

    # ---- task accuracy by greedy decoding (eval.accuracy) ---------------------------------------
    acc_eval = None
    if cfg.eval.accuracy:
        from .accuracy import AccuracyEvaluator

        try:
            acc_eval = AccuracyEvaluator(enc, tok, only=cfg.eval.accuracy_domains, max_examples=cfg.eval.max_examples,
                                         batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens,
                                         rank=info.rank, world_size=info.world_size)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def to_dev(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in b.items()}

    def make_batch(rows: list[tuple[int, int]], split: str = "train") -> dict[str, torch.Tensor]:
        # packed train rows carry position ids (attention within each example); dev is never packed
        return to_dev(collate_examples(enc, rows, tok.pad_token_id, split))

    def eval_loss(batch: dict[str, torch.Tensor]) -> LossOutput:
        res = engine(**batch)
        return LossOutput(res["loss"], res["group_loss"], res["group_count"], res.get("token_loss"))

    def run_dev(per_row: bool = False) -> Any:
        engine.eval()
        old = wrapper.return_token_loss
        wrapper.return_token_loss = old or per_row
        try:
            return dev_losses(eval_loss, lambda rows: make_batch(rows, "dev"), [len(d.dev) for d in enc],
                              batch_size=t.micro_batch_size, rank=info.rank, world_size=info.world_size,
                              per_row=per_row)
        finally:
            wrapper.return_token_loss = old
            engine.train()

    @torch.no_grad()
    def forward_hidden(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        engine.eval()
        old = wrapper.capture_hidden
        wrapper.capture_hidden = True
        try:
            return engine(**batch)["hidden"]
        finally:
            wrapper.capture_hidden = old
            engine.train()

    @torch.no_grad()
    def forward_losses(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        engine.eval()
        old = wrapper.return_token_loss
        wrapper.return_token_loss = True
        try:
            tl = engine(**batch)["token_loss"]
            valid = batch["labels"][:, 1:] != -100
            return (tl * valid).sum(1) / valid.sum(1).clamp_min(1)
        finally:
            wrapper.return_token_loss = old
            engine.train()

    @torch.no_grad()
    def forward_router_stats(batch: dict[str, torch.Tensor]) -> np.ndarray:
        if collector is None:
            raise RuntimeError("forward_router_stats: the policy did not declare 'router_stats'")
        engine.eval()
        try:
            collector.reset()
            engine(**batch)
            return router_counts(batch).numpy()
        finally:
            engine.train()

    def all_reduce(x: torch.Tensor) -> torch.Tensor:
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(x)
        return x

    # ---- sampler, policy context, initial weights -------------------------------------------------
    global_batch = t.micro_batch_size * t.grad_accum * info.world_size
    ex = cfg.data.exhaustion
    exhaustion = [ex.get(n, ex.get("*", "cycle")) for n in names] if isinstance(ex, dict) else ex
    ctx = PolicyContext(
        domain_names=names, domain_sizes=sizes, model=model, tokenizer=tok, domains=enc, device=device,
        rank=info.rank, world_size=info.world_size, seed=t.seed,
        batches=lambda d, idx, split="train": make_batch([(d, int(i)) for i in idx], split),
        forward_hidden=forward_hidden, forward_losses=forward_losses, all_reduce=all_reduce,
        forward_router_stats=forward_router_stats,
    )
    policy.setup(ctx)
    w0 = _broadcast_weights(validate_weights(policy.initial_weights(dict(zip(names, sizes))), len(names), names))
    sampler = MixtureSampler(sizes, w0, global_batch_size=global_batch, seed=t.seed,
                             with_replacement=cfg.data.with_replacement, exhaustion=exhaustion,
                             max_epochs=cfg.data.max_epochs, domain_names=names)
    ctx.sampler = sampler
    history: list[list[Any]] = [[0, w0.tolist()]]
    step, tokens, input_tokens = 0, 0, 0
    fingerprint = config_fingerprint(cfg)

    # ---- resume -------------------------------------------------------------------------------
    ckpt_root = out / "checkpoints"
    resume_from = _choose_resume(cfg, ckpt_root, info.is_main)
    if resume_from is not None:
        state = read_state(resume_from)
        changed = describe_changes({"data": state.get("data")}, {"data": data_inputs}) if "data" in state else []
        if changed:
            raise CheckpointError(
                f"checkpoint {resume_from} was trained on other data; refusing to resume. What changed: "
                f"{'; '.join(changed)}. Use another output_dir or train.resume=none"
            )
        if state.get("fingerprint") != fingerprint:
            raise CheckpointError(
                f"checkpoint {resume_from} was written by a different config (fingerprint "
                f"{state.get('fingerprint')} vs {fingerprint}: model, data, mixing or optimisation "
                "settings differ); refusing to resume. Use another output_dir or train.resume=none"
            )
        if state.get("global_batch_size") != global_batch:
            raise CheckpointError(
                f"checkpoint {resume_from} used global batch {state['global_batch_size']}, this run "
                f"{global_batch} (micro_batch_size x grad_accum x world_size); keep it equal to resume"
            )
        state = load_checkpoint(engine, resume_from, rank=info.rank)
        sampler.load_state_dict(state["sampler"])
        policy.load_state_dict(state["policy"])
        bus.load_state_dict(state["bus"])
        history = state["history"]
        step, tokens, input_tokens = state["step"], state["tokens"], state["input_tokens"]
        log.info("resumed from %s at step %d", resume_from, step)

    save_seconds = 0.0
    saved_at = -1

    def save() -> None:
        nonlocal save_seconds, saved_at
        t_save = time.perf_counter()
        state = {
            "version": 1, "step": step, "tokens": tokens, "input_tokens": input_tokens,
            "fingerprint": fingerprint, "global_batch_size": global_batch, "world_size": info.world_size,
            "domains": names, "data": data_inputs, "sampler": sampler.state_dict(), "policy": policy.state_dict(),
            "bus": bus.state_dict(), "history": history,
        }
        save_checkpoint(engine, ckpt_root, step, state, rank=info.rank, keep=t.keep_checkpoints)
        save_seconds, saved_at = time.perf_counter() - t_save, step

    # ---- steps --------------------------------------------------------------------------------
    metrics = MetricsWriter(out, info.is_main, step, t.tensorboard)
    bar = None
    if info.is_main and t.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=t.steps, initial=step, desc="mixtrain", dynamic_ncols=True)
    log.info("policy %s, global batch %d, %d rank(s), ZeRO-%d", policy.describe(), global_batch,
             info.world_size, t.zero_stage)
    win_loss = np.zeros(len(names))
    win_count = np.zeros(len(names), dtype=np.int64)
    win_time, win_policy_time, win_steps = 0.0, 0.0, 0
    win_aux, win_micro = 0.0, 0  # load-balancing loss of this rank's micro-batches (router_aux_loss > 0)
    last_dev: np.ndarray | None = None
    stopped = False
    if step == 0 and cfg.eval.at_start:  # the starting model's scores, as a step-0 record
        rec0: dict[str, Any] = {"step": 0, "dev_loss": dict(zip(names, map(float, run_dev())))}
        if acc_eval is not None:
            rec0["dev_accuracy"] = acc_eval.evaluate_model(model, device=device, gather_zero3=t.zero_stage == 3)
            if acc_eval.task_metrics:
                rec0["dev_task_metrics"] = acc_eval.task_metrics
        metrics.write(rec0)
    interrupted: str | None = None
    slowest_step = 0.0
    while step < t.steps:
        t0 = time.perf_counter()
        try:
            gb = sampler.next_global_batch()
        except SamplerExhausted as e:
            log.info("stopping at step %d: %s", step, e)
            stopped = True
            break
        pairs = list(zip(gb.domains.tolist(), gb.examples.tolist()))
        n_global = sum(int(label_counts[d][e]) for d, e in pairs)
        # DeepSpeed divides by grad_accum and averages over ranks; this scale undoes both so the
        # gradient is that of the mean over all label tokens of the global batch
        scale = t.grad_accum * info.world_size / max(1, n_global)
        lengths = [int(row_lengths[d][e]) for d, e in pairs] if t.sort_by_length else None
        for rows in shard(gb, info.rank, info.world_size, t.micro_batch_size, t.grad_accum, lengths):
            batch = make_batch(rows)
            if collector is not None:
                collector.reset()  # drop router calls of evals / policy probes since the last step
            res = engine(**batch, loss_scale=scale)
            router = router_counts(batch) if collector is not None else None
            engine.backward(res["loss"])
            engine.step()
            if "router_aux_loss" in res:
                win_aux, win_micro = win_aux + float(res["router_aux_loss"]), win_micro + 1
            bus.add_micro(batch, LossOutput(res["loss"], res["group_loss"], res["group_count"],
                                            res.get("token_loss")), hidden=res.get("hidden"), router=router)
        step += 1
        st = bus.end_step()
        tokens += int(st["count"].sum())
        input_tokens += int(st["input_tokens"].sum())
        win_loss += st["loss_sum"]
        win_count += st["count"]
        step_time = time.perf_counter() - t0

        # policy update (weights apply from the next step on)
        t1 = time.perf_counter()
        dev_now: np.ndarray | None = None
        if policy.update_every and step % policy.update_every == 0:
            if "dev_domain_loss" in policy.required_signals:
                dev_now = run_dev()
            signals = bus.pop_interval(step, sampler.weights, dev_now)
            new = policy.update(step, signals)
            if new is not None:
                new = _broadcast_weights(validate_weights(new, len(names), names))
                sampler.set_weights(new)
                history.append([step, new.tolist()])
        policy_time = time.perf_counter() - t1
        win_time += step_time
        win_policy_time += policy_time
        win_steps += 1

        is_last = step == t.steps
        do_eval = t.eval_every and (step % t.eval_every == 0 or is_last)
        dev_rows = None
        if do_eval and is_last:  # per-row losses too, for paired statistics across runs (compare)
            means, row_sum, row_tokens = run_dev(per_row=True)
            dev_now = means if dev_now is None else dev_now
            dev_rows = {n: {"loss_sum": a.tolist(), "tokens": b.tolist()} for n, a, b in zip(names, row_sum, row_tokens)}
        elif do_eval and dev_now is None:
            dev_now = run_dev()
        if dev_now is not None:
            last_dev = dev_now
        every = cfg.eval.accuracy_every
        do_acc = acc_eval is not None and (is_last or (do_eval if every is None else step % every == 0))
        if step % t.log_every == 0 or is_last or do_eval or do_acc:
            with np.errstate(invalid="ignore", divide="ignore"):
                dl = np.where(win_count > 0, win_loss / np.maximum(win_count, 1), np.nan)
            rec: dict[str, Any] = {
                "step": step,
                "loss": float(win_loss.sum() / max(1, win_count.sum())),
                "lr": float(sched.get_last_lr()[0]) if sched is not None else t.lr,
                "tokens": tokens,
                "input_tokens": input_tokens,
                "samples": sampler.index,
                "weights": dict(zip(names, map(float, sampler.weights))),
                "step_weights": dict(zip(names, map(float, gb.weights))),
                "domain_loss": dict(zip(names, map(float, dl))),
                "domain_fraction": sampler.fractions(),
                "step_time": win_time / win_steps,
                "policy_time": win_policy_time / win_steps,
                "policy_time_pct": 100.0 * win_policy_time / max(win_time, 1e-12),
            }
            if win_micro:
                rec["router_aux_loss"] = win_aux / win_micro
            if do_eval and dev_now is not None:
                rec["dev_loss"] = dict(zip(names, map(float, dev_now)))
            if do_acc:
                rec["dev_accuracy"] = acc_eval.evaluate_model(model, device=device, gather_zero3=t.zero_stage == 3)
                if acc_eval.task_metrics:
                    rec["dev_task_metrics"] = acc_eval.task_metrics
            if is_last and info.is_main and (dev_rows is not None or acc_eval is not None):
                # before metrics/checkpoint: a run whose last checkpoint exists also has this file
                atomic_write_text(out / DEV_EXAMPLES_FILE, json.dumps({
                    "version": 1, "step": step, "dev_loss": dev_rows,
                    "dev_accuracy": acc_eval.per_example() if acc_eval is not None else None}))
            metrics.write(rec)
            if bar is not None:
                top = sorted(zip(names, sampler.weights), key=lambda x: -x[1])[:3]
                bar.set_postfix_str(f"loss={rec['loss']:.3f} " + " ".join(f"{n}={w:.2f}" for n, w in top))
            win_loss[:] = 0
            win_count[:] = 0
            win_time, win_policy_time, win_steps = 0.0, 0.0, 0
            win_aux, win_micro = 0.0, 0
        if bar is not None:
            bar.update(1)
        if (t.save_every and step % t.save_every == 0) or is_last:
            save()
        slowest_step = max(slowest_step, time.perf_counter() - t0)
        if not is_last:
            # the next step and a checkpoint must fit before the deadline (twice the slowest seen)
            late = deadline is not None and time.monotonic() + 2 * (slowest_step + max(save_seconds, 1.0)) > deadline
            code = _agree_stop(1 if stopper.requested else 2 if late else 0)
            if code:
                interrupted = _STOP_REASONS.get(code, "signal")
                if saved_at != step:
                    save()
                break
    if stopped and step > 0 and saved_at != step:
        save()
    if interrupted is not None:
        if bar is not None:
            bar.close()
        if collector is not None:
            collector.remove()
        metrics.close()
        why = "a stop signal" if interrupted == "signal" else f"train.time_limit={t.time_limit}"
        if info.is_main:
            log.warning("stopped at step %d; run the same command to resume (%s)", step, why)
        if dist.is_initialized():
            dist.barrier()
        return {"step": step, "tokens": tokens, "input_tokens": input_tokens, "weights": sampler.weights.tolist(),
                "fractions": sampler.fractions(), "dev_loss": None if last_dev is None else last_dev.tolist(),
                "output_dir": str(out), "model_dir": None, "interrupted": interrupted}
    if bar is not None:
        bar.close()
    if collector is not None:
        collector.remove()
    metrics.close()
    model_dir = None
    if t.save_model and step > 0:
        from .export import export_model

        model_dir = export_model(model, tok, out, rank=info.rank, zero_stage=t.zero_stage)

    # ---- outputs ------------------------------------------------------------------------------
    if info.is_main:
        from .report import export_schedule, make_report

        export_schedule(out, names, history)
        policy.on_train_end(out, step)
        try:
            make_report(out)
        except Exception as e:  # noqa: BLE001 - a plotting problem must not fail a finished run
            log.warning("could not write report.png: %s", e)
        log.info("done: %d steps, %d trained tokens; outputs in %s", step, tokens, out)
    if dist.is_initialized():
        dist.barrier()
    return {"step": step, "tokens": tokens, "input_tokens": input_tokens, "weights": sampler.weights.tolist(),
            "fractions": sampler.fractions(), "dev_loss": None if last_dev is None else last_dev.tolist(),
            "output_dir": str(out), "model_dir": None if model_dir is None else str(model_dir),
            "interrupted": None}
