"""GradEx (Li, Zhang, Wang, Zhang, EMNLP 2024 Findings): estimate fine-tuning on any subset of
tasks from projected per-example gradients at a meta-initialisation θ*, and select tasks.

``python -m mixtrain gradex CONFIG.yaml`` / :func:`run_gradex`; ``gradex-validate`` /
:func:`run_validate`. See docs/gradex.md and SEEDS.md §3.
"""

from .config import GradexConfig, gradex_config
from .estimate import Estimates, Lifter, SubsetEstimator, logreg_direction, sample_subsets, task_sums
from .gradients import gradient_pass, load_task_data, read_store
from .objective import per_example_nll, per_example_objective
from .pipeline import prepare, run_gradex
from .select import (
    cluster_examples,
    ensemble_scores,
    forward_selection,
    greedy,
    random_ensemble,
    random_subset,
    similarity_scores,
    top_fraction,
    top_k,
)
from .validate import format_validation, run_validate

__all__ = [
    "Estimates",
    "GradexConfig",
    "Lifter",
    "SubsetEstimator",
    "cluster_examples",
    "ensemble_scores",
    "format_validation",
    "forward_selection",
    "gradex_config",
    "gradient_pass",
    "greedy",
    "load_task_data",
    "logreg_direction",
    "per_example_nll",
    "per_example_objective",
    "prepare",
    "random_ensemble",
    "random_subset",
    "read_store",
    "run_gradex",
    "run_validate",
    "sample_subsets",
    "similarity_scores",
    "task_sums",
    "top_fraction",
    "top_k",
]
