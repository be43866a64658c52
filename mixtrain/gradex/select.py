"""GradEx step 4: select tasks from subset estimates (SEEDS.md §3.5).

* :func:`random_ensemble` (``utils/select_random_ensemble.py``): task score
  ``T_i = Σ_k 1[i∈S_k] f̂(S_k) / Σ_k 1[i∈S_k]``; keep the top ``keep_fraction``.
* :func:`forward_selection` (``fast_estimate_forward_selection.py``, as released): one pass over the
  tasks **in index order**; add task i, re-estimate, keep it if the estimate is not worse than
  the best so far. Not classical stepwise selection.
* :func:`greedy`: classical forward stepwise selection: each round adds the remaining task with
  the best estimate, stopping when no addition improves it.
* :func:`similarity_scores` / :func:`top_k`: the gradient-similarity baseline (a task's
  mean projected gradient against the target's, by cosine; the selection LESS-style methods make),
  and :func:`random_subset`, the equal-size random baseline.
* :func:`cluster_examples` (``fast_estimate_cluster_gradients.py``): agglomerative clustering of
  examples' projected gradients (cosine, average linkage) into pseudo-tasks.

``score_fn`` maps a bool membership matrix ``[n, T]`` to scores ``[n]`` (higher is better), e.g.
``lambda m: estimator.score(m)[0]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

ScoreFn = Callable[[np.ndarray], np.ndarray]


def ensemble_scores(membership: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Mean subset score over the subsets containing each task ``[T]`` (NaN if never sampled)."""
    m = np.asarray(membership, dtype=np.float64)
    hits = m.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(hits > 0, (m.T @ np.asarray(scores, dtype=np.float64)) / np.maximum(hits, 1), np.nan)


def random_ensemble(membership: np.ndarray, scores: np.ndarray, keep_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """``(selected task indices sorted by score, task scores [T])``; keeps ``ceil(keep_fraction · T)``."""
    t = ensemble_scores(membership, scores)
    return top_fraction(t, keep_fraction), t


def similarity_scores(task_sums: np.ndarray, task_counts: np.ndarray, target_mean: np.ndarray) -> np.ndarray:
    """Cosine of each task's mean projected gradient ``task_sums[t] / task_counts[t]`` (``[T, K]``)
    with the target's mean projected gradient (``[K]``, or ``[n, K]`` averaged over the n target
    domains): ``[T]``; NaN for a task without examples or a zero gradient. The projection keeps
    inner products in expectation (Johnson-Lindenstrauss), so this estimates the full-gradient cosine."""
    mean = np.asarray(task_sums, dtype=np.float64) / np.maximum(np.asarray(task_counts, dtype=np.float64), 1)[:, None]
    tgt = np.asarray(target_mean, dtype=np.float64)
    if tgt.ndim == 2:
        tgt = tgt.mean(0)
    norms = np.linalg.norm(mean, axis=1) * np.linalg.norm(tgt)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((norms > 0) & (np.asarray(task_counts) > 0), mean @ tgt / norms, np.nan)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores, best first (NaN last, ties in index order)."""
    return np.argsort(-np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf), kind="stable")[:k]


def top_fraction(scores: np.ndarray, keep_fraction: float) -> np.ndarray:
    """Indices of the ``ceil(keep_fraction · T)`` highest scores, best first (NaN last)."""
    return top_k(scores, max(1, math.ceil(keep_fraction * len(scores))))


def random_subset(num_tasks: int, size: int, seed: int) -> np.ndarray:
    """``size`` distinct task indices drawn uniformly with ``seed``, sorted."""
    return np.sort(np.random.default_rng(seed).choice(num_tasks, size=size, replace=False))


def forward_selection(num_tasks: int, score_fn: ScoreFn) -> tuple[np.ndarray, list[float]]:
    """Released single ordered pass; returns ``(selected indices, best score after each task)``."""
    chosen = np.zeros(num_tasks, dtype=bool)
    best = -np.inf
    trace = []
    for i in range(num_tasks):
        trial = chosen.copy()
        trial[i] = True
        s = float(score_fn(trial[None])[0])
        if s >= best:
            chosen, best = trial, s
        trace.append(best)
    return np.nonzero(chosen)[0], trace


def greedy(num_tasks: int, score_fn: ScoreFn, max_tasks: int | None = None) -> tuple[np.ndarray, list[float]]:
    """Forward stepwise: each round evaluates every remaining task (one batched ``score_fn`` call)
    and adds the best, while the score improves; returns ``(selected indices in order, trace)``."""
    chosen = np.zeros(num_tasks, dtype=bool)
    order: list[int] = []
    best = -np.inf
    trace: list[float] = []
    limit = num_tasks if max_tasks is None else max_tasks
    while len(order) < limit:
        cand = np.nonzero(~chosen)[0]
        trials = np.repeat(chosen[None], len(cand), axis=0)
        trials[np.arange(len(cand)), cand] = True
        s = np.asarray(score_fn(trials), dtype=np.float64)
        j = int(np.argmax(s))
        if s[j] <= best:
            break
        best = float(s[j])
        chosen[cand[j]] = True
        order.append(int(cand[j]))
        trace.append(best)
    return np.asarray(order, dtype=np.int64), trace


def cluster_examples(grads: np.ndarray, num_clusters: int) -> np.ndarray:
    """Cluster label per example ``[N]``: ``AgglomerativeClustering(metric="cosine", linkage="average")``."""
    from sklearn.cluster import AgglomerativeClustering

    if num_clusters > grads.shape[0]:
        raise ValueError(f"gradex.num_clusters: {num_clusters} is more than the {grads.shape[0]} examples")
    x = np.asarray(grads, dtype=np.float64)
    zero = np.linalg.norm(x, axis=1) == 0
    if zero.any():  # cosine distance is undefined for zero rows; nudge them apart deterministically
        x[zero] = np.random.default_rng(0).normal(size=(int(zero.sum()), x.shape[1])) * 1e-12
    return AgglomerativeClustering(n_clusters=num_clusters, metric="cosine", linkage="average").fit_predict(x)
