"""mixkernels: kernels for dynamic data mixing, registered as ``torch.library`` ops.

``import mixkernels`` loads the compiled extension when it is built and matches this torch; it
never imports triton or deepspeed and never initialises CUDA.
"""

from __future__ import annotations

from . import _library  # noqa: F401  (defines the op schemas first)
from . import _extension
from ._backend import backend
from .grad_projector import GradientProjector
from .grad_store import GradientStore
from .ops import (
    factored_sketch,
    lift,
    project,
    projection_matrix,
    CrossEntropyOutput,
    RouterStats,
    cross_entropy,
    linear_cross_entropy,
    load_balancing_loss,
    router_stats,
    segment_sum,
)

__version__ = "0.1.0"
__all__ = [
    "CrossEntropyOutput",
    "RouterStats",
    "backend",
    "cross_entropy",
    "linear_cross_entropy",
    "load_balancing_loss",
    "router_stats",
    "segment_sum",
    "__version__",
]
__all__ += ["project", "lift", "projection_matrix", "factored_sketch", "GradientProjector", "GradientStore"]
