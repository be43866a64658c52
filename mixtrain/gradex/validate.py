"""``python -m mixtrain gradex-validate CONFIG.yaml``: estimate vs truth on a few subsets.

For each of the first ``gradex.validate_subsets`` sampled subsets S, the real mixtrain loop
(DeepSpeed) fine-tunes from θ* on S's tasks for ``validate_steps`` steps (proportional mixing,
no warmup), giving θ_S. Reported per subset:

* ``true``: the target objective at θ_S (mean over target domains), and the target dev loss;
* ``taylor``: the first-order approximation with the *actual* update,
  ``f(θ*) + ⟨∇f(θ*), θ_S − θ*⟩`` (exact gradient of each target domain's mean objective), and its
  relative error ``|taylor − true| / max(|true|, |f(θ*)|)`` (the paper's approximation-error
  check; compared with the zeroth-order error ``|f(θ*) − true| / ...``);
* ``gradex``: the subset's score from the estimator, and across subsets the Spearman rank
  correlation of the GradEx scores with the true objective and with −(true loss).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import torch

from ..checkpoint import atomic_write_text
from ..config import ConfigError
from .estimate import sample_subsets
from .model import build, checkpoint_state_dict, load_weights, trainable_vector
from .objective import per_example_objective
from .pipeline import Prepared, collate_rows, derived_config, prepare, run_loop, target_eval

log = logging.getLogger("mixtrain.gradex")


def _target_grads(p: Prepared) -> np.ndarray:
    """Exact ∇ of each target domain's mean objective w.r.t. θ_trainable at θ*: ``[n, D]``."""
    model, names = p.model, p.data.target_names
    mods = dict(model.named_modules())
    weights = [mods[n].weight for n in p.modules]
    model.eval()
    out = []
    for t in names:
        rows = [r for r, task in zip(p.data.target.rows, p.data.target.tasks) if task == t]
        b = collate_rows(rows, p.data.pad_token_id)
        with torch.enable_grad():
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
            f = per_example_objective(logits, b["labels"], p.g.objective).mean()
            gs = torch.autograd.grad(f, weights)
        out.append(torch.cat([x.reshape(-1) for x in gs]).double().numpy())
    return np.stack(out)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (NaN for fewer than 2 points or constant input)."""
    from scipy.stats import spearmanr

    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def run_validate(cfg: Any) -> dict[str, Any]:
    """Fine-tune a few subsets for real and compare with the estimates; writes ``validation.json``."""
    p = prepare(cfg)
    g = p.g
    if p.cluster_of is not None:
        raise ConfigError("gradex-validate: tasks are example clusters (gradex.num_clusters); the training loop "
                          "mixes domains, so validation needs domain tasks (unset num_clusters)")
    membership = sample_subsets(len(p.task_names), g.number_of_subsets, g.subset_size, g.subset_seed)
    # the first distinct subsets: random draws repeat (8 of C(8, 4) = 70 subsets often do), and a
    # repeated subset would be fine-tuned and counted twice
    _, first = np.unique(membership, axis=0, return_index=True)
    subsets = membership[np.sort(first)[: g.validate_subsets]]
    est_scores, _ = p.estimator.score(subsets)
    base_loss, base_f = target_eval(p.model, p.data.target, p.data.target_names, g.objective, p.data.pad_token_id)
    grads = _target_grads(p)
    theta0 = trainable_vector(p.model, p.modules).double().numpy()
    builtin_tasks = set(p.data.task_names) - set(cfg.data.domains)
    rows = []
    for k, m in enumerate(subsets):
        tasks = [t for t, keep in zip(p.task_names, m) if keep]
        sub_raw = derived_config(cfg, p.out / "validate" / f"subset_{k}").to_dict()
        sub_raw["data"]["builtin"] = [t for t in tasks if t in builtin_tasks]
        sub_raw["data"]["domains"] = {t: v for t, v in cfg.data.domains.items() if t in tasks}
        sub_raw["mixing"] = {"policy": "proportional", "params": {}, "update_every": None}
        # the target is scored below, by the objective; the run's own accuracy may name domains
        # (the target among them) that this subset does not train on
        sub_raw["eval"].update(accuracy=False, accuracy_domains=None, at_start=False)
        sub_raw["train"].update(steps=g.validate_steps, lr=g.validate_lr or cfg.train.lr, warmup=0, save_every=0,
                                eval_every=0, resume="none", tensorboard=False, progress=False)
        from ..config import from_dict

        sub_cfg = from_dict(sub_raw)
        log.info("validate subset %d/%d: fine-tuning from θ* on %s for %d steps", k + 1, len(subsets), tasks,
                 g.validate_steps)
        run_loop(sub_cfg, init_state=p.state)
        model_s = build(cfg, p.data.vocab_size)
        load_weights(model_s, checkpoint_state_dict(sub_cfg.output_dir), f"subset {k}")
        true_loss, true_f = target_eval(model_s, p.data.target, p.data.target_names, g.objective,
                                        p.data.pad_token_id)
        delta = trainable_vector(model_s, p.modules).double().numpy() - theta0
        taylor = base_f + grads @ delta
        denom = np.maximum(np.abs(true_f), np.abs(base_f))
        rows.append({
            "subset": k, "tasks": tasks, "gradex_score": float(est_scores[k]),
            "true_objective": float(true_f.mean()), "true_loss": float(true_loss.mean()),
            "taylor": float(taylor.mean()),
            "rel_error": float(np.mean(np.abs(taylor - true_f) / denom)),
            "rel_error_no_gradient": float(np.mean(np.abs(base_f - true_f) / denom)),
            "delta_norm_ratio": float(np.linalg.norm(delta) / np.linalg.norm(theta0)),
        })
    gx = np.array([r["gradex_score"] for r in rows])
    result = {
        "base_objective": float(base_f.mean()), "base_loss": float(base_loss.mean()), "subsets": rows,
        "spearman_gradex_vs_true_objective": spearman(gx, np.array([r["true_objective"] for r in rows])),
        "spearman_gradex_vs_neg_true_loss": spearman(gx, -np.array([r["true_loss"] for r in rows])),
        "mean_rel_error": float(np.mean([r["rel_error"] for r in rows])),
    }
    atomic_write_text(p.out / "validation.json", json.dumps(result, indent=1))
    from .report import make_gradex_report, plot_validation

    try:
        plot_validation(p.out)
        make_gradex_report(p.out)
    except Exception as e:  # noqa: BLE001
        log.warning("could not write plots: %s", e)
    return result


def format_validation(result: dict[str, Any]) -> str:
    """The table ``gradex-validate`` prints."""
    lines = [f"θ*: target objective {result['base_objective']:.4f}, target loss {result['base_loss']:.4f}",
             (f"{'subset':>6} {'gradex':>9} {'true f':>9} {'taylor':>9} {'rel.err':>8} {'no-grad':>8} "
              f"{'true loss':>9}  tasks")]
    for r in result["subsets"]:
        lines.append(f"{r['subset']:>6} {r['gradex_score']:>9.4f} {r['true_objective']:>9.4f} {r['taylor']:>9.4f} "
                     f"{100 * r['rel_error']:>7.2f}% {100 * r['rel_error_no_gradient']:>7.2f}% "
                     f"{r['true_loss']:>9.4f}  {','.join(r['tasks'])}")
    lines.append(f"mean relative error of the first-order estimate: {100 * result['mean_rel_error']:.2f}%")
    lines.append(f"Spearman(gradex score, true objective) = {result['spearman_gradex_vs_true_objective']:.3f}; "
                 f"Spearman(gradex score, -true loss) = {result['spearman_gradex_vs_neg_true_loss']:.3f}")
    return "\n".join(lines)


__all__ = ["format_validation", "run_validate", "spearman"]
