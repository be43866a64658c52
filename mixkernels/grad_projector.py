"""GradientProjector: per-example projected gradients of a model's linear layers, through hooks.

Two families, chosen by ``kind``:

* ``"factored"`` (LoGra's trick): for module ``m`` with weight ``[d_out, d_in]``, the exact
  per-example gradient is ``G_b = sum_t g_t x_t^T`` (``x`` the layer input, ``g`` the gradient of
  the layer output). Projecting the two factors separately,
  ``P_out^T G_b P_in = sum_t (g_t P_out)^T (x_t P_in)``, gives a ``[k_out, k_in]`` sketch per
  example at a cost of ``2 N (d_in k_in + d_out k_out)`` FLOPs, without ever forming ``G_b``.
  The forward hook projects ``x`` (so only ``[N, k_in]`` is kept); a tensor hook on the layer's
  output receives ``g`` and calls :func:`mixkernels.factored_sketch`, which projects it and sums
  the outer products per example. Columns ``slices[m]`` of :meth:`grads` hold
  ``(P_out^T G_b P_in).flatten()`` (row-major ``[k_out, k_in]``). ``P_in``/``P_out`` are Rademacher
  matrices (``projection_matrix``) seeded from ``(seed, module name)``, so they do not depend on
  the module order or on which other modules are projected.
* ``"rademacher" | "gaussian" | "sjlt"`` (TRAK / LESS / GradEx semantics): with ``v_b`` the
  concatenation, in ``module_names`` order, of the flattened per-example weight gradients
  (length ``P``; each flattened in the parameter's own storage layout, so ``lift`` gives a
  ``Delta theta`` in parameter layout), ``grads()[b] = v_b @ projection_matrix(P, proj_dim, ...)``.
  The backward hook forms one module's ``[B, *weight.shape]`` per-example gradient at a time and
  projects it with :func:`mixkernels.project` at its ``row_offset``; ``R`` is never stored.

transformers' ``Conv1D`` stores its weight as ``[d_in, d_out]``; its factored sketch is still
``P_out^T G_b P_in`` with ``G_b`` in ``[d_out, d_in]`` orientation. Only weights are projected,
never biases.

``capture(weight_grads=False)`` sets ``requires_grad=False`` on the projected weights for the
duration of the block, so autograd skips their weight-gradient GEMMs (the part of the backward the
projector does not need) while the activation-gradient chain (what the hooks consume) is kept;
where nothing upstream of a projected module requires grad (e.g. a frozen base model under LoRA),
a forward pre-hook makes its input require grad so its output gradient still exists.

Requirements: every projected module sees inputs ``[B, ..., d_in]`` with the batch dimension first
(true of transformers' decoder layers), and example ``b``'s loss depends only on row ``b``.
Activation checkpointing (forward re-run in backward) is not supported.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .ops.factored_sketch import factored_sketch
from .ops.project import KINDS, project, projection_matrix

FACTORED = "factored"
_INT63 = (1 << 63) - 1

ModuleSelector = None | Sequence[str] | Callable[[str, nn.Module], bool]


def module_seed(seed: int, name: str, role: str) -> int:
    """A 63-bit seed derived from ``(seed, module name, role)``, independent of module order."""
    digest = hashlib.blake2b(f"{seed}/{name}/{role}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _INT63


def _is_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D, matched by name so transformers is never imported here.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def is_projectable(module: nn.Module) -> bool:
    """nn.Linear (PEFT's LoRA A/B layers are nn.Linear) or transformers' Conv1D."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


@dataclass
class _Target:
    name: str
    module: nn.Module
    d_in: int
    d_out: int
    conv1d: bool
    param_offset: int  # row offset of this weight in the concatenated P-vector


class GradientProjector:
    """Per-example projected weight gradients of selected linear layers (see the module docstring).

    Args:
        model: any ``nn.Module``.
        kind: ``"factored"`` or a projection kind ``"rademacher" | "gaussian" | "sjlt"``.
        rank: factored only: ``(k_out, k_in)`` per module; the module's sketch has ``k_out * k_in``
            columns.
        proj_dim: projection kinds only: total output dimension ``K``.
        seed: seed of every projection.
        modules: ``None`` = every ``nn.Linear`` / ``Conv1D`` (incl. PEFT LoRA A/B) whose weight
            requires grad; or a list of qualified names (that order is the output order); or a
            callable ``(name, module) -> bool`` applied to supported modules.
        nnz: non-zeros per row for ``kind="sjlt"``.

    Usage::

        gp = GradientProjector(model, kind="factored", rank=(16, 16))
        with gp.capture():
            per_example_loss(model(**batch), batch).sum().backward()
        G = gp.grads()          # float32 [B, K]
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        kind: str = FACTORED,
        rank: tuple[int, int] = (16, 16),
        proj_dim: int | None = None,
        seed: int = 0,
        modules: ModuleSelector = None,
        nnz: int = 4,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"GradientProjector: model must be an nn.Module, got {type(model).__name__}")
        if kind not in (FACTORED, *KINDS):
            raise ValueError(f"GradientProjector: kind must be one of {FACTORED}, {', '.join(KINDS)}, got {kind!r}")
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= _INT63:
            raise ValueError(f"GradientProjector: seed must be an int in [0, 2^63), got {seed!r}")
        if kind == FACTORED:
            if (
                not isinstance(rank, (tuple, list)) or len(rank) != 2
                or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in rank)
            ):
                raise ValueError(f"GradientProjector: rank must be a pair of ints >= 1 (k_out, k_in), got {rank!r}")
            if proj_dim is not None:
                raise ValueError(
                    f"GradientProjector: proj_dim is only used by projection kinds ({', '.join(KINDS)}); "
                    f"kind='factored' takes rank=(k_out, k_in), got proj_dim={proj_dim!r}"
                )
        else:
            if not isinstance(proj_dim, int) or isinstance(proj_dim, bool) or proj_dim < 1:
                raise ValueError(f"GradientProjector: kind={kind!r} needs proj_dim, an int >= 1, got {proj_dim!r}")
            if kind == "sjlt" and not 1 <= nnz <= proj_dim:
                raise ValueError(f"GradientProjector: nnz must be in [1, proj_dim = {proj_dim}], got {nnz!r}")
        self.model = model
        self.kind = kind
        self.rank = (int(rank[0]), int(rank[1]))
        self.proj_dim = proj_dim
        self.seed = seed
        self.nnz = nnz
        self._targets = self._select(model, modules)
        self._by_name = {t.name: t for t in self._targets}
        self._proj_cache: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        self._offsets_cache: dict[tuple[int, int, torch.device], torch.Tensor] = {}
        self._generation = 0
        self._capturing = False
        self._reset()

    # ---- selection ---------------------------------------------------------------------------

    @staticmethod
    def _select(model: nn.Module, modules: ModuleSelector) -> list[_Target]:
        named = dict(model.named_modules())
        if modules is None:
            picked = [(n, m) for n, m in named.items() if is_projectable(m) and m.weight.requires_grad]
        elif callable(modules):
            picked = [(n, m) for n, m in named.items() if is_projectable(m) and modules(n, m)]
        elif isinstance(modules, (list, tuple)):
            picked = []
            for n in modules:
                if n not in named:
                    close = [k for k in named if k.endswith(str(n).split(".")[-1])][:5]
                    raise ValueError(f"GradientProjector: modules has {n!r}, which is not a module of the model "
                                     f"(similar names: {close})")
                if not is_projectable(named[n]):
                    raise ValueError(
                        f"GradientProjector: module {n!r} is a {type(named[n]).__name__}; expected nn.Linear or "
                        f"transformers Conv1D (for PEFT LoRA select its lora_A / lora_B layers)"
                    )
                picked.append((n, named[n]))
            if len({n for n, _ in picked}) != len(picked):
                raise ValueError("GradientProjector: modules lists a name more than once")
        else:
            raise TypeError(
                f"GradientProjector: modules must be None, a list of names or a callable, got {type(modules).__name__}"
            )
        if not picked:
            raise ValueError("GradientProjector: no module selected (no nn.Linear / Conv1D whose weight requires grad)")
        targets, offset = [], 0
        for name, m in picked:
            conv = _is_conv1d(m)
            d_in, d_out = (m.weight.shape[0], m.weight.shape[1]) if conv else (m.weight.shape[1], m.weight.shape[0])
            targets.append(_Target(name, m, int(d_in), int(d_out), conv, offset))
            offset += m.weight.numel()
        return targets

    # ---- public metadata ---------------------------------------------------------------------

    @property
    def module_names(self) -> list[str]:
        """Projected modules, in output order."""
        return [t.name for t in self._targets]

    @property
    def dim(self) -> int:
        """K, the number of columns of :meth:`grads`."""
        if self.kind == FACTORED:
            return len(self._targets) * self.rank[0] * self.rank[1]
        return int(self.proj_dim)

    @property
    def num_params(self) -> int:
        """P, the length of the concatenated flattened weights ``v_b``."""
        return sum(t.module.weight.numel() for t in self._targets)

    @property
    def slices(self) -> dict[str, slice]:
        """factored: ``{name: slice of grads()'s columns}`` holding that module's ``[k_out, k_in]``."""
        if self.kind != FACTORED:
            raise ValueError(
                f"GradientProjector.slices is defined for kind='factored' (kind is {self.kind!r}: every column "
                "mixes every module); see param_slices for each module's rows of the projected vector"
            )
        size = self.rank[0] * self.rank[1]
        return {t.name: slice(i * size, (i + 1) * size) for i, t in enumerate(self._targets)}

    @property
    def param_slices(self) -> dict[str, slice]:
        """``{name: slice of the concatenated P-vector v_b}`` (rows of R for projection kinds)."""
        return {t.name: slice(t.param_offset, t.param_offset + t.module.weight.numel()) for t in self._targets}

    def projections(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """factored: ``(P_in [d_in, k_in], P_out [d_out, k_out])`` float32 used for module ``name``."""
        if self.kind != FACTORED:
            raise ValueError(
                f"GradientProjector.projections is defined for kind='factored'; kind {self.kind!r} uses "
                f"projection_matrix(num_params, proj_dim, seed=seed, kind=kind) rows param_slices[name]"
            )
        if name not in self._by_name:
            raise KeyError(f"GradientProjector.projections: {name!r} is not projected; module_names = {self.module_names}")
        return self._projections(self._by_name[name], self._by_name[name].module.weight.device)

    def _projections(self, t: _Target, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (t.name, device)
        if key not in self._proj_cache:
            k_out, k_in = self.rank
            p_in = projection_matrix(t.d_in, k_in, seed=module_seed(self.seed, t.name, "in"), device=device)
            p_out = projection_matrix(t.d_out, k_out, seed=module_seed(self.seed, t.name, "out"), device=device)
            self._proj_cache[key] = (p_in, p_out)
        return self._proj_cache[key]

    # ---- capture -----------------------------------------------------------------------------

    def _reset(self) -> None:
        self._batch: int | None = None
        self._device: torch.device | None = None
        self._acc: dict[str, torch.Tensor] = {}
        self._total: torch.Tensor | None = None
        self._backward_calls = 0

    @contextlib.contextmanager
    def capture(self, weight_grads: bool = True) -> Iterator[GradientProjector]:
        """Hook the selected modules for one or more forward + backward passes.

        Results of a previous capture are discarded. ``weight_grads=False`` skips computing
        ``.grad`` of the projected weights (their ``requires_grad`` is restored on exit)."""
        if self._capturing:
            raise RuntimeError("GradientProjector.capture is already active (captures do not nest)")
        self._reset()
        self._generation += 1
        generation = self._generation
        handles, frozen = [], []
        try:
            self._capturing = True
            for t in self._targets:
                if not weight_grads:
                    if t.module.weight.requires_grad:
                        t.module.weight.requires_grad_(False)
                        frozen.append(t.module.weight)
                    handles.append(t.module.register_forward_pre_hook(_keep_grad_chain))
                handles.append(t.module.register_forward_hook(self._make_forward_hook(t, generation)))
            yield self
        finally:
            self._capturing = False
            for h in handles:
                h.remove()
            for w in frozen:
                w.requires_grad_(True)

    def _offsets(self, b: int, tokens: int, device: torch.device) -> torch.Tensor:
        key = (b, tokens, device)
        if key not in self._offsets_cache:
            self._offsets_cache[key] = torch.arange(b + 1, dtype=torch.int64, device=device) * tokens
        return self._offsets_cache[key]

    def _note_batch(self, t: _Target, b: int, device: torch.device) -> None:
        if self._batch is None:
            self._batch, self._device = b, device
        elif b != self._batch:
            raise RuntimeError(
                f"GradientProjector: module {t.name!r} saw batch size {b}, but this capture already saw {self._batch}; "
                "every projected module must see inputs [B, ..., d_in] with the same B"
            )

    def _make_forward_hook(self, t: _Target, generation: int):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if generation != self._generation or not torch.is_grad_enabled():
                return
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                return
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or x.dim() < 2:
                raise RuntimeError(
                    f"GradientProjector: module {t.name!r} got an input of shape "
                    f"{None if x is None else tuple(x.shape)}; expected [B, ..., d_in] with the batch first"
                )
            b = x.shape[0]
            self._note_batch(t, b, x.device)
            x = x.detach().reshape(b, -1, t.d_in)
            if self.kind == FACTORED:
                p_in, _p_out = self._projections(t, x.device)
                saved = x.float() @ p_in  # [B, T, k_in]: only the projected input is kept
            else:
                saved = x

            def grad_hook(g: torch.Tensor) -> None:
                if generation == self._generation:
                    self._consume(t, saved, g)

            output.register_hook(grad_hook)

        return hook

    def _consume(self, t: _Target, saved: torch.Tensor, g: torch.Tensor) -> None:
        b = saved.shape[0]
        g = g.detach().reshape(b, -1, t.d_out)
        self._backward_calls += 1
        if self.kind == FACTORED:
            _, p_out = self._projections(t, g.device)
            tokens = saved.shape[1]
            s = factored_sketch(
                saved.reshape(b * tokens, -1), g.reshape(b * tokens, t.d_out),
                self._offsets(b, tokens, g.device), None, p_out,
            )
            if t.name in self._acc:
                self._acc[t.name] += s
            else:
                self._acc[t.name] = s
            return
        xf, gf = saved.float(), g.float()
        per_example = torch.bmm(xf.transpose(1, 2), gf) if t.conv1d else torch.bmm(gf.transpose(1, 2), xf)
        y = project(per_example.reshape(b, -1), int(self.proj_dim), seed=self.seed, kind=self.kind,
                    nnz=self.nnz, row_offset=t.param_offset)
        del per_example
        self._total = y if self._total is None else self._total + y

    # ---- results -----------------------------------------------------------------------------

    def grads(self) -> torch.Tensor:
        """float32 ``[B, K]`` per-example projected gradients of the last capture."""
        if self._batch is None or self._backward_calls == 0:
            raise RuntimeError(
                "GradientProjector.grads: nothing captured; run forward and backward inside `with gp.capture():`"
            )
        b, device = self._batch, self._device
        if self.kind != FACTORED:
            return self._total.clone()
        k = self.rank[0] * self.rank[1]
        cols = [
            self._acc[t.name].reshape(b, k) if t.name in self._acc else torch.zeros(b, k, device=device)
            for t in self._targets
        ]
        return torch.cat(cols, dim=1)


def _keep_grad_chain(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook for weight_grads=False: when nothing upstream requires grad, make the
    input a grad-requiring leaf so the module's output gradient (what the hooks consume) exists."""
    if not torch.is_grad_enabled() or not args or not isinstance(args[0], torch.Tensor):
        return None
    x = args[0]
    if x.requires_grad or not x.is_floating_point():
        return None
    return (x.detach().requires_grad_(True), *args[1:])
