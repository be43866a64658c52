"""The ``gradex:`` YAML section (typed, unknown keys rejected like every mixtrain section)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import Config, ConfigError, _section_from_dict

PROJECTIONS = ("rademacher", "gaussian", "sjlt", "factored")
ESTIMATORS = ("gradsum", "logreg")
EVALUATES = ("first_order", "forward")
SELECTIONS = ("random_ensemble", "forward_selection", "greedy")


@dataclass
class GradexConfig:
    """``gradex`` section (defaults follow the released code, SEEDS.md §3).

    Attributes:
        target: domain name(s) whose **dev** split is the target (scored per target domain).
        tasks: domains that are candidate tasks (default: every configured domain); the built-in
            ``lego`` / ``addition`` families are already split into skills (``lego_1`` ...).
        init_checkpoint: a mixtrain checkpoint dir (``.../checkpoints/step-N``) or run dir to use as
            θ*; ``None`` meta-trains on all tasks into ``output_dir/gradex/meta``.
        objective: ``log_odds`` (released: mean gold-token log-odds with clamps) or ``nll``.
        projection: ``rademacher`` (released), ``gaussian``, ``sjlt`` or ``factored`` (LoGra-style
            per-module sketch, ``factored_rank`` per module).
        project_dim: d for the projection kinds (released scripts: 100-400; default 200).
        projection_seed: seed of the projection (a store written with another seed is refused).
        batch_size: examples per gradient-pass batch.
        store_dtype: ``float16`` | ``bfloat16`` | ``float32`` for stored projected gradients.
        number_of_subsets / subset_size / subset_seed: random task subsets (released: 1000, 0.5).
        scale: ‖Δθ‖ = scale · ‖θ*_trainable‖ (alpaca script default 0.02).
        estimator: ``gradsum`` (Σ projected grads) or ``logreg`` (released sign-flip fit).
        logreg_C / label_prob: released LogisticRegression C (1e-4) and Bernoulli label prob (0.7).
        evaluate: ``first_order`` (projected Taylor term, no forward) or ``forward``.
        selection / keep_fraction: ``random_ensemble`` (top keep_fraction), ``forward_selection``
            (released single ordered pass) or ``greedy`` (forward stepwise).
        num_clusters: cluster examples into this many pseudo-tasks (agglomerative, cosine,
            average linkage on projected grads) instead of using domains as tasks.
        max_examples_per_task: cap per task for the gradient pass (``None`` = all).
        validate_subsets / validate_steps / validate_lr: ``gradex-validate`` fine-tunes this many
            subsets for this many steps (lr defaults to ``train.lr``).
    """

    target: list[str] = field(default_factory=list)
    tasks: list[str] | None = None
    init_checkpoint: str | None = None
    objective: str = "log_odds"
    projection: str = "rademacher"
    project_dim: int = 200
    factored_rank: list[int] = field(default_factory=lambda: [4, 4])
    projection_seed: int = 0
    batch_size: int = 8
    store_dtype: str = "float16"
    number_of_subsets: int = 1000
    subset_size: float = 0.5
    subset_seed: int = 0
    scale: float = 0.02
    estimator: str = "gradsum"
    logreg_C: float = 1e-4
    label_prob: float = 0.7
    evaluate: str = "first_order"
    selection: str = "random_ensemble"
    keep_fraction: float = 0.5
    num_clusters: int | None = None
    max_examples_per_task: int | None = None
    validate_subsets: int = 5
    validate_steps: int = 20
    validate_lr: float | None = None


def _one_of(key: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"gradex.{key}: got {value!r}, expected one of {', '.join(valid)}")


def gradex_config(raw: dict[str, Any] | Config | None) -> GradexConfig:
    """Parse and range-check the ``gradex`` section (a dict, or a :class:`Config` holding it)."""
    if isinstance(raw, Config):
        raw = raw.gradex
    g = _section_from_dict("gradex", GradexConfig, raw or {})
    if not g.target:
        raise ConfigError("gradex.target: no target; give the domain name(s) whose dev split is the target")
    _one_of("objective", g.objective, ("log_odds", "nll"))
    _one_of("projection", g.projection, PROJECTIONS)
    _one_of("estimator", g.estimator, ESTIMATORS)
    _one_of("evaluate", g.evaluate, EVALUATES)
    _one_of("selection", g.selection, SELECTIONS)
    _one_of("store_dtype", g.store_dtype, ("float16", "bfloat16", "float32"))
    for key in ("project_dim", "batch_size", "number_of_subsets", "validate_subsets", "validate_steps"):
        if getattr(g, key) < 1:
            raise ConfigError(f"gradex.{key}: got {getattr(g, key)}, expected an integer >= 1")
    if len(g.factored_rank) != 2 or min(g.factored_rank) < 1:
        raise ConfigError(f"gradex.factored_rank: got {g.factored_rank}, expected [k_out, k_in] with both >= 1")
    if not 0.0 < g.subset_size < 1.0:
        raise ConfigError(f"gradex.subset_size: got {g.subset_size}, expected a fraction in (0, 1)")
    if not 0.0 < g.keep_fraction <= 1.0:
        raise ConfigError(f"gradex.keep_fraction: got {g.keep_fraction}, expected a fraction in (0, 1]")
    if not g.scale > 0:
        raise ConfigError(f"gradex.scale: got {g.scale}, expected > 0")
    if not g.logreg_C > 0:
        raise ConfigError(f"gradex.logreg_C: got {g.logreg_C}, expected > 0")
    if not 0.0 < g.label_prob < 1.0:
        raise ConfigError(f"gradex.label_prob: got {g.label_prob}, expected a probability in (0, 1)")
    if g.num_clusters is not None and g.num_clusters < 2:
        raise ConfigError(f"gradex.num_clusters: got {g.num_clusters}, expected an integer >= 2 (or null)")
    if g.max_examples_per_task is not None and g.max_examples_per_task < 1:
        raise ConfigError(f"gradex.max_examples_per_task: got {g.max_examples_per_task}, expected >= 1 (or null)")
    if g.projection_seed < 0:
        raise ConfigError(f"gradex.projection_seed: got {g.projection_seed}, expected >= 0")
    return g
