"""``python -m mixtrain gradex CONFIG.yaml``: meta-train → gradient pass → subset estimation →
selection → outputs in ``output_dir/gradex/`` (SEEDS.md §3; Li, Zhang, Wang, Zhang, EMNLP 2024).

Outputs::

    gradex/meta/                 the meta-training run (θ*), unless gradex.init_checkpoint is set
    gradex/store_train/          projected gradients + f(x; θ*) of every training example (resumable)
    gradex/store_target/         the same for the target dev examples
    gradex/estimates.npz         membership [S, T], scores [S], per_target [S, n]
    gradex/task_scores.json      per-task random-ensemble score, example counts, gradient similarity
    gradex/selection.json        selected tasks + weights (``mixing: {policy: fixed, params: ...}``) and,
                                 under ``baselines``, the same for all tasks, a random subset of the
                                 same size and the top tasks by gradient similarity to the target
    gradex/report.png            task scores, subset-score histogram, estimate vs truth (if validated)
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import atomic_write_text, latest_checkpoint
from ..config import Config, from_dict
from .config import GradexConfig, gradex_config
from .estimate import Estimates, SubsetEstimator, sample_subsets
from .gradients import Examples, TaskData, collate_rows, gradient_pass, load_task_data, read_store
from .model import build, checkpoint_state_dict, gradex_modules, load_weights, run_loop
from .objective import per_example_nll, per_example_objective
from .select import (
    cluster_examples,
    forward_selection,
    greedy,
    random_ensemble,
    random_subset,
    similarity_scores,
    top_k,
)

log = logging.getLogger("mixtrain.gradex")


def _setup_logging() -> None:
    log.propagate = False  # the "mixtrain" logger has its own handler
    if not log.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("[gradex] %(message)s"))
        log.addHandler(h)
    log.setLevel(logging.INFO)


def derived_config(cfg: Config, output_dir: str | Path, **train: Any) -> Config:
    """A copy of ``cfg`` for a mixtrain run (no gradex section), with ``train`` overrides."""
    raw = copy.deepcopy(cfg.to_dict())
    raw.pop("gradex", None)
    raw["output_dir"] = str(output_dir)
    raw["train"].update(train)
    return from_dict(raw)


def theta_star(cfg: Config, g: GradexConfig, out: Path) -> dict[str, torch.Tensor]:
    """θ*: ``gradex.init_checkpoint``, or a meta-training run on all tasks (skipped when done)."""
    if g.init_checkpoint:
        return checkpoint_state_dict(g.init_checkpoint)
    meta_dir = out / "meta"
    done = latest_checkpoint(meta_dir / "checkpoints")
    if done is None or int(done.name.split("-")[1]) < cfg.train.steps:
        log.info("meta-training θ* on all tasks (%d steps) into %s", cfg.train.steps, meta_dir)
        run_loop(derived_config(cfg, meta_dir, resume="auto"))
    return checkpoint_state_dict(meta_dir)


@dataclass
class Prepared:
    """Model at θ*, data, stores and the estimator."""

    cfg: Config
    g: GradexConfig
    out: Path
    model: torch.nn.Module
    modules: list[str]
    data: TaskData
    state: dict[str, torch.Tensor]
    estimator: SubsetEstimator
    task_names: list[str]
    cluster_of: np.ndarray | None


@torch.no_grad()
def target_eval(model: torch.nn.Module, examples: Examples, target_names: list[str], objective: str, pad: int,
                batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Per target domain ``(mean token-NLL-per-example loss [n], mean objective f [n])`` at the current weights."""
    was = model.training
    model.eval()
    losses, fs = [], []
    for s in range(0, len(examples.rows), batch_size):
        b = collate_rows(examples.rows[s:s + batch_size], pad)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        losses.append(per_example_nll(logits, b["labels"]))
        fs.append(per_example_objective(logits, b["labels"], objective))
    model.train(was)
    loss, f = torch.cat(losses).double().numpy(), torch.cat(fs).double().numpy()
    codes = np.array([target_names.index(t) for t in examples.tasks])
    return (np.array([loss[codes == i].mean() for i in range(len(target_names))]),
            np.array([f[codes == i].mean() for i in range(len(target_names))]))


def prepare(cfg: Config) -> Prepared:
    """Steps 1-2 (θ*, gradient passes) and the estimator of step 3."""
    _setup_logging()
    g = gradex_config(cfg)
    out = Path(cfg.output_dir) / "gradex"
    out.mkdir(parents=True, exist_ok=True)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    data = load_task_data(cfg, g)  # bad task/target names fail before any training
    state = theta_star(cfg, g, out)
    model = build(cfg, data.vocab_size)
    load_weights(model, state, "θ*")
    modules = gradex_modules(model)
    t0 = time.perf_counter()
    gradient_pass(model, data.train, out / "store_train", g, data.pad_token_id, modules)
    gradient_pass(model, data.target, out / "store_target", g, data.pad_token_id, modules)
    log.info("gradient passes: %d train + %d target examples in %.1fs", len(data.train.ids), len(data.target.ids),
             time.perf_counter() - t0)
    train = read_store(out / "store_train", data.train)
    target = read_store(out / "store_target", data.target)
    task_names, cluster_of = data.task_names, None
    if g.num_clusters:
        cluster_of = cluster_examples(train.grads, g.num_clusters)
        task_names = [f"cluster_{k}" for k in range(g.num_clusters)]
        train.tasks = [task_names[c] for c in cluster_of]

    def forward_fn(delta: torch.Tensor | None) -> np.ndarray:
        from .model import add_to_weights

        if delta is None:
            return target_eval(model, data.target, data.target_names, g.objective, data.pad_token_id)[0]
        add_to_weights(model, modules, delta)
        try:
            return target_eval(model, data.target, data.target_names, g.objective, data.pad_token_id)[0]
        finally:
            add_to_weights(model, modules, -delta)

    est = SubsetEstimator(train, target, task_names, data.target_names, scale=g.scale, estimator=g.estimator,
                          evaluate=g.evaluate, logreg_C=g.logreg_C, label_prob=g.label_prob, seed=g.subset_seed,
                          forward_fn=forward_fn, cache_dir=out / "store_train")
    return Prepared(cfg, g, out, model, modules, data, state, est, task_names, cluster_of)


def _selection(p: Prepared, est: Estimates) -> dict[str, Any]:
    g = p.g
    n = len(p.task_names)
    ens = random_ensemble(est.membership, est.scores, g.keep_fraction)
    trace: list[float] = []
    if g.selection == "random_ensemble":
        chosen = ens[0]
    elif g.selection == "forward_selection":
        chosen, trace = forward_selection(n, lambda m: p.estimator.score(m)[0])
    else:
        chosen, trace = greedy(n, lambda m: p.estimator.score(m)[0])
    counts = p.estimator.counts
    selected = [p.task_names[i] for i in chosen]
    if p.cluster_of is None:
        domain_counts = {p.task_names[i]: int(counts[i]) for i in chosen}
    else:  # clusters: weight each domain by its number of selected examples
        domain_counts: dict[str, int] = {}
        keep = np.isin(p.cluster_of, chosen)
        for t in np.asarray(p.data.train.tasks)[keep]:
            domain_counts[t] = domain_counts.get(t, 0) + 1
    sel = {"method": g.selection, "tasks": selected, **_mixture(domain_counts, p.data.domain_order),
           "trace": trace, "estimated_score": _estimate(p, chosen),
           "all_tasks_score": float(p.estimator.score(np.ones((1, n), dtype=bool))[0][0])}
    sim = similarity_scores(p.estimator.sums, counts, p.estimator.target_grad_mean)
    if p.cluster_of is not None:
        keep = np.isin(p.cluster_of, chosen)
        sel["example_ids"] = [int(i) for i in np.asarray(p.data.train.ids)[keep]]
    else:
        # the baselines a selection is judged against, same size as the selection
        picks = {"similarity": top_k(sim, len(chosen)),
                 "random": random_subset(n, len(chosen), g.subset_seed),
                 "all": np.arange(n)}
        sel["baselines"] = {
            name: {"tasks": [p.task_names[i] for i in idx], "estimated_score": _estimate(p, idx),
                   **_mixture({p.task_names[i]: int(counts[i]) for i in idx}, p.data.domain_order)}
            for name, idx in picks.items()}
    return {"selection": sel, "ensemble_scores": ens[1], "similarity": sim}


def _estimate(p: Prepared, chosen: np.ndarray) -> float:
    return float(p.estimator.score(np.isin(np.arange(len(p.task_names)), chosen)[None])[0][0])


def _mixture(domain_counts: dict[str, int], domain_order: Any) -> dict[str, Any]:
    """Weights ∝ example counts, the ``fixed`` mixing block that trains on them, domains in order."""
    total = sum(domain_counts.values())
    weights = {d: c / total for d, c in domain_counts.items()}
    return {"weights": weights, "mixing": {"policy": "fixed", "params": {"weights": weights}},
            "domains": sorted(weights, key=list(domain_order).index)}


def run_gradex(cfg: Config) -> dict[str, Any]:
    """The whole pipeline (see the module docstring); returns the selection dict."""
    p = prepare(cfg)
    g = p.g
    membership = sample_subsets(len(p.task_names), g.number_of_subsets, g.subset_size, g.subset_seed)
    t0 = time.perf_counter()
    est = p.estimator.run(membership)
    log.info("estimated %d subsets (%s + %s) in %.3fs", len(membership), g.estimator, g.evaluate,
             time.perf_counter() - t0)
    np.savez(p.out / "estimates.npz", membership=est.membership, scores=est.scores, per_target=est.per_target,
             base_per_target=est.base_per_target, task_names=np.array(p.task_names),
             target_names=np.array(p.data.target_names))
    res = _selection(p, est)
    sel = res["selection"]
    scores = res["ensemble_scores"]
    task_scores = {
        "metric": "estimated target log-odds" if g.evaluate == "first_order" and g.objective == "log_odds"
        else ("estimated target log-likelihood" if g.evaluate == "first_order" else "-(target dev loss)"),
        "base_per_target": dict(zip(p.data.target_names, map(float, est.base_per_target))),
        "tasks": {t: {"score": None if np.isnan(s) else float(s), "examples": int(c),
                      "similarity": None if np.isnan(c_) else float(c_)}
                  for t, s, c, c_ in zip(p.task_names, scores, p.estimator.counts, res["similarity"])},
        "settings": {k: getattr(g, k) for k in ("objective", "projection", "project_dim", "estimator", "evaluate",
                                                 "scale", "number_of_subsets", "subset_size", "selection")},
    }
    atomic_write_text(p.out / "task_scores.json", json.dumps(task_scores, indent=1))
    atomic_write_text(p.out / "selection.json", json.dumps(sel, indent=1))
    from .report import make_gradex_report

    try:
        make_gradex_report(p.out)
    except Exception as e:  # noqa: BLE001 - plotting must not fail a finished run
        log.warning("could not write report.png: %s", e)
    log.info("selected %d of %d tasks (%s): %s", len(sel["tasks"]), len(p.task_names), g.selection, sel["tasks"])
    return sel
