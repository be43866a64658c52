"""``skillit``: Skill-It online data selection (Chen et al., NeurIPS 2023; released code
``HazyResearch/skill-it``, ``trainer/mw_trainer.py::MWTrainer.train``).

Rules, as released:

* Graph A (k train skills × m eval skills) from ``.npy`` / JSON / YAML (or inline). Every
  **off-diagonal entry exactly equal to 1 becomes 0.5**; real-valued entries are kept (they may be
  negative). ``target_mask`` (eval skills of interest) keeps only those columns: A ← A[:, targets].
* Initial mixture p₀ ∝ w_init ⊙ exp(η A 1) — not uniform: skills with large row sums start higher.
  (1 has one entry per kept eval skill.)
* The loss history holds the per-skill dev-loss vectors of every **evaluation** (the window counts
  evaluations, not rounds). Every ``update_every`` steps: Λ = Σ of the last T = ``window`` vectors
  (their **mean** when ``target_mask`` is set), and p ∝ w_init ⊙ exp(η A Λ), recomputed from w_init
  each round (windowed, not cumulative multiplicative weights).
* ``normalize_loss``: Λ ← Λ / L₀ elementwise, with L₀ the loss vector of the **second** evaluation
  (the released code overwrites its first-evaluation L₀ at ``counter == ckpt_steps``).
* ``eta_schedule``: η_t = η / (Σ L_last / Σ L₀).
* ``ignore_lone_nodes`` (square graph, no target mask): skills with A[i,i] = 1 and no other edge
  in row or column are pinned at 1/k; the others share 1 − (#lone)/k by the MW rule on the
  sub-graph.

Cadence in the mixtrain loop: the policy is called every ``eval_every`` steps (default
``update_every``: one evaluation per round), receives that evaluation's dev losses, and changes
the mixture every ``update_every`` steps. The released loop evaluates at ``counter % ckpt == 0``
with a 0-based counter (after steps 1, ckpt + 1, …); ours evaluates after steps ckpt, 2·ckpt, …,
so the last evaluation of a round is the one right at the update.

Released-code behaviours deliberately *not* reproduced (documented deviations):

* with ``--mw_prior`` the released p₀ uses A·w_init instead of A·1 (it passes the prior as the
  "initial loss"); we use A·1 as in the paper. Identical for the default w_init = 1.
* with ``--ignore_lone_nodes`` the released code aliases ``weights = weights_init`` and then
  writes the new weights into it, so later rounds use the previous mixture as prior (silently
  cumulative). We keep w_init fixed.
* ``--dynamic_lambda`` and ``--initialize_loss`` are not provided.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import register
from ._util import as_matrix, as_vector, as_weights, check_int, check_nonneg_float
from .base import MixingPolicy, sizes_and_names

__all__ = ["SkillIt", "load_graph", "lone_nodes", "mixture", "prepare_graph"]


def load_graph(source: Any, skills: Sequence[str] | None = None) -> np.ndarray:
    """Read a skills graph.

    Args:
        source: a path to ``.npy`` (a 2-D array), ``.json`` / ``.yaml`` / ``.yml`` (a nested
            list, or ``{"graph": [[...]], "skills": [...]}``), or the nested list itself.
        skills: domain names in the run's order; when the file names its skills, rows and
            columns are reordered to match (an error lists any missing skill).

    Returns:
        The graph as loaded (``float64`` [k, m]; the 1 → 0.5 rule is **not** applied here).
    """
    file_skills: list[str] | None = None
    if isinstance(source, (str, Path)):
        p = Path(source)
        if not p.is_file():
            raise ValueError(f"graph: file {str(p)!r} does not exist")
        suffix = p.suffix.lower()
        if suffix == ".npy":
            raw: Any = np.load(p, allow_pickle=False)
        elif suffix in (".json", ".yaml", ".yml"):
            text = p.read_text()
            try:
                if suffix == ".json":
                    raw = json.loads(text)
                else:
                    import yaml

                    raw = yaml.safe_load(text)
            except Exception as e:  # noqa: BLE001 - JSON and YAML raise different types
                raise ValueError(f"graph: {str(p)!r} is not valid {suffix[1:].upper()}: {e}") from None
        else:
            raise ValueError(f"graph: {str(p)!r} has suffix {suffix!r}, expected .npy, .json, .yaml or .yml")
    else:
        raw = source
    if isinstance(raw, Mapping):
        if "graph" not in raw:
            raise ValueError(f"graph: mapping has keys {sorted(raw)}, expected 'graph' (and optionally 'skills')")
        file_skills = [str(s) for s in raw["skills"]] if raw.get("skills") is not None else None
        raw = raw["graph"]
    g = as_matrix("graph", raw).numpy()
    if file_skills is not None and skills is not None:
        if len(file_skills) != g.shape[0]:
            raise ValueError(f"graph: 'skills' names {len(file_skills)} skills but the graph has {g.shape[0]} rows")
        missing = [s for s in skills if s not in file_skills]
        if missing:
            raise ValueError(f"graph: skills {missing} of this run are not in the graph's skills {file_skills}")
        order = [file_skills.index(s) for s in skills]
        if g.shape[0] != g.shape[1]:
            raise ValueError("graph: reordering by 'skills' needs a square graph")
        g = g[np.ix_(order, order)]
    return g


def prepare_graph(graph: Any) -> torch.Tensor:
    """Apply the released preprocessing: every off-diagonal entry exactly 1 becomes 0.5."""
    a = as_matrix("graph", graph).clone()
    k, m = a.shape
    off = torch.ones(k, m, dtype=torch.bool)
    idx = torch.arange(min(k, m))
    off[idx, idx] = False
    a[off & (a == 1.0)] = 0.5
    return a


def lone_nodes(graph: torch.Tensor) -> torch.Tensor:
    """Boolean mask of skills with A[i,i] = 1 and no other edge in their row or column
    (released ``--ignore_lone_nodes`` rule, evaluated after the 1 → 0.5 preprocessing)."""
    diag = torch.diagonal(graph)
    return (diag == 1.0) & (graph.sum(1) == 1.0) & (graph.sum(0) == 1.0)


def _target_index(target_mask: Any, m: int) -> torch.Tensor:
    t = as_vector("target_mask", target_mask, m)
    if not bool(((t == 0) | (t == 1)).all()):
        raise ValueError(f"target_mask: got {t.tolist()}, expected 0/1 (or true/false) per eval skill")
    idx = (t == 1).nonzero().view(-1)
    if idx.numel() == 0:
        raise ValueError("target_mask: selects no eval skill; mark at least one target with 1")
    return idx


def mixture(
    w_init: Any,
    graph: Any,
    loss_history: Sequence[Any],
    *,
    eta: float,
    window: int = 3,
    target_mask: Any = None,
    normalize_loss: bool = False,
    eta_schedule: bool = False,
    ignore_lone_nodes: bool = False,
    loss_0: Any = None,
) -> torch.Tensor:
    """Skill-It mixture from the graph and the windowed loss history (see module docstring).

    Args:
        w_init: ``[k]`` prior weights (≥ 0; ones in the released default).
        graph: ``[k, m]`` graph **as loaded** (the 1 → 0.5 rule is applied here).
        loss_history: per-skill dev-loss vectors (each ``[m]``, all eval skills), oldest first;
            empty → the initial mixture p₀ ∝ w_init ⊙ exp(η A 1).
        eta: η ≥ 0.
        window: T, the number of most recent evaluations summed.
        target_mask: ``[m]`` 0/1 over eval skills; A ← A[:, targets] and Λ is the window *mean*.
        normalize_loss: divide Λ by L₀ (see ``loss_0``).
        eta_schedule: η_t = η / (Σ L_last / Σ L₀).
        ignore_lone_nodes: pin lone skills at 1/k (square graph, no target mask).
        loss_0: ``[m]`` normaliser; default: the history's 2nd vector (its 1st if only one).

    Returns:
        ``[k]`` float64 probabilities.
    """
    a = prepare_graph(graph)
    k, m = a.shape
    eta = check_nonneg_float("eta", eta)
    window = check_int("window", window)
    w0 = as_vector("w_init", w_init, k)
    if bool((w0 < 0).any()) or not float(w0.sum()) > 0:
        raise ValueError(f"w_init: got {w0.tolist()}, expected non-negative values with a positive sum")
    hist = [as_vector(f"loss_history[{i}]", v, m) for i, v in enumerate(loss_history)]
    cols = torch.arange(m) if target_mask is None else _target_index(target_mask, m)
    if ignore_lone_nodes and (k != m or target_mask is not None):
        raise ValueError("ignore_lone_nodes: needs a square graph and no target_mask (as released)")
    a_t = a[:, cols]
    if not hist:
        lam = torch.ones(len(cols), dtype=torch.float64)
        eta_t = eta
    else:
        recent = torch.stack([h[cols] for h in hist[-window:]])
        lam = recent.mean(0) if target_mask is not None else recent.sum(0)
        if normalize_loss or eta_schedule:
            l0 = (hist[1] if len(hist) > 1 else hist[0]) if loss_0 is None else as_vector("loss_0", loss_0, m)
            l0 = l0[cols]
            if bool((l0 <= 0).any()):
                raise ValueError(f"loss_0: got {l0.tolist()}, expected positive losses to normalise by")
        eta_t = eta
        if eta_schedule:
            eta_t = eta / (float(hist[-1][cols].sum()) / float(l0.sum()))
        if normalize_loss:
            lam = lam / l0
    if not ignore_lone_nodes:
        logits = torch.log(w0) + eta_t * (a_t @ lam)
        return torch.softmax(logits, 0)
    lone = lone_nodes(a)
    mw = (~lone).nonzero().view(-1)
    p = torch.full((k,), 1.0 / k, dtype=torch.float64)
    if mw.numel():
        sub = a[mw][:, mw]
        lam_mw = lam[mw] if hist else torch.ones(len(mw), dtype=torch.float64)
        logits = torch.log(w0[mw]) + eta_t * (sub @ lam_mw)
        p[mw] = torch.softmax(logits, 0) * (1.0 - float(lone.sum()) / k)
    return p


@register("skillit")
class SkillIt(MixingPolicy):
    """Skill-It online mixing (see module docstring).

    Args:
        graph: path (``.npy`` / ``.json`` / ``.yaml``) or inline nested list, ``[D, D]`` in domain
            order (or reordered by the file's ``skills`` list). ``None`` = identity (no edges).
        eta: η (default 0.5, the LEGO setting).
        window: T evaluations (default 3).
        target_mask: eval skills of interest: a 0/1 list in domain order or a list of domain names.
        w_init: prior weights (list or ``{domain: w}``); ones by default.
        normalize_loss, eta_schedule, ignore_lone_nodes: released options.
        update_every: steps between mixture updates (released ``update_steps``).
        eval_every: steps between dev evaluations (released ``ckpt_steps``); must divide
            ``update_every``; default = ``update_every``.

    The loop reads :attr:`update_every` as *how often to call* :meth:`update`, which for this
    policy is the evaluation cadence; assigning ``update_every`` (e.g. ``mixing.update_every`` in
    the config) sets the mixture cadence.
    """

    name = "skillit"
    required_signals = frozenset({"dev_domain_loss"})

    def __init__(
        self,
        graph: str | list[list[float]] | None = None,
        eta: float = 0.5,
        window: int = 3,
        target_mask: Sequence[Any] | None = None,
        w_init: Sequence[float] | Mapping[str, float] | None = None,
        normalize_loss: bool = False,
        eta_schedule: bool = False,
        ignore_lone_nodes: bool = False,
        update_every: int | None = 100,
        eval_every: int | None = None,
    ) -> None:
        self.eval_every = None if eval_every is None else check_int("eval_every", eval_every)
        super().__init__(update_every)
        self.graph_source = graph
        self.eta = check_nonneg_float("eta", eta)
        self.window = check_int("window", window)
        self.target_mask_raw = target_mask
        self.w_init_raw = w_init
        self.normalize_loss = bool(normalize_loss)
        self.eta_schedule = bool(eta_schedule)
        self.ignore_lone_nodes = bool(ignore_lone_nodes)
        self.graph: np.ndarray | None = None
        self.target_mask: list[int] | None = None
        self.w_init: np.ndarray | None = None
        self.names: list[str] = []
        # state
        self.recent: list[list[float]] = []
        self.first: list[float] | None = None
        self.loss_0: list[float] | None = None
        self.n_evals = 0

    # the loop's call cadence is the evaluation cadence -------------------------------------------
    @property
    def update_every(self) -> int | None:  # type: ignore[override]
        return self.eval_every or self.mixture_every

    @update_every.setter
    def update_every(self, value: int | None) -> None:
        self.mixture_every = None if value is None else check_int("update_every", value)

    def _resolve(self, names: list[str]) -> None:
        if self.names == names and self.graph is not None:
            return
        d = len(names)
        self.names = names
        if self.mixture_every is None:
            raise ValueError("skillit: update_every must be set")
        if self.eval_every and self.mixture_every % self.eval_every:
            raise ValueError(
                f"skillit: update_every ({self.mixture_every}) must be a multiple of eval_every ({self.eval_every})"
            )
        g = np.eye(d) if self.graph_source is None else load_graph(self.graph_source, names)
        if g.shape != (d, d):
            raise ValueError(f"graph: got shape {g.shape}, expected ({d}, {d}) for domains {names}")
        self.graph = g
        tm = self.target_mask_raw
        if tm is not None:
            if all(isinstance(x, str) for x in tm):
                unknown = [x for x in tm if x not in names]
                if unknown:
                    raise ValueError(f"target_mask: unknown domain(s) {unknown}; domains: {names}")
                self.target_mask = [1 if n in tm else 0 for n in names]
            else:
                self.target_mask = [int(x) for x in _target_index(tm, d).tolist()]
                self.target_mask = [1 if i in self.target_mask else 0 for i in range(d)]
        if self.w_init_raw is None:
            self.w_init = np.ones(d)
        elif isinstance(self.w_init_raw, Mapping):
            unknown = sorted(set(self.w_init_raw) - set(names))
            if unknown:
                raise ValueError(f"w_init: unknown domain(s) {unknown}; domains: {names}")
            self.w_init = np.array([float(self.w_init_raw.get(n, 0.0)) for n in names])
        else:
            self.w_init = as_vector("w_init", list(self.w_init_raw), d).numpy()
        as_weights("w_init", self.w_init, d)

    def _mixture(self) -> np.ndarray:
        hist = list(self.recent)
        p = mixture(self.w_init, self.graph, hist, eta=self.eta, window=self.window, target_mask=self.target_mask,
                    normalize_loss=self.normalize_loss, eta_schedule=self.eta_schedule,
                    ignore_lone_nodes=self.ignore_lone_nodes, loss_0=self.loss_0 if hist else None)
        return p.numpy()

    def initial_weights(self, domain_sizes: Mapping[str, int] | Sequence[int]) -> np.ndarray:
        _, names = sizes_and_names(domain_sizes)
        self._resolve(names)
        return self._mixture()

    def update(self, step: int, signals: Any) -> np.ndarray | None:
        if not self.names:
            self._resolve(list(signals.domain_names))
        loss = signals.dev_domain_loss
        if loss is None:
            raise ValueError("skillit: update() needs signals.dev_domain_loss (the loop computes it when required)")
        v = np.asarray(loss, dtype=np.float64)
        bad = [self.names[i] for i in range(len(v)) if not np.isfinite(v[i])]
        if bad:
            raise ValueError(f"skillit: dev loss of domain(s) {bad} is not finite ({v.tolist()}); every skill needs dev rows")
        vec = v.tolist()
        self.n_evals += 1
        if self.n_evals == 1:
            self.first = vec
            self.loss_0 = vec
        elif self.n_evals == 2:
            self.loss_0 = vec  # released: L0 overwritten at the second evaluation
        self.recent = (self.recent + [vec])[-self.window:]
        if step % self.mixture_every != 0:
            return None
        return self._mixture()

    def state_dict(self) -> dict[str, Any]:
        return {"recent": self.recent, "first": self.first, "loss_0": self.loss_0, "n_evals": self.n_evals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent = [list(map(float, v)) for v in state["recent"]]
        self.first = state.get("first")
        self.loss_0 = state.get("loss_0")
        self.n_evals = int(state["n_evals"])

    def describe(self) -> str:
        return (f"skillit(η={self.eta}, T={self.window}, update_every={self.mixture_every}, "
                f"eval_every={self.update_every})")
