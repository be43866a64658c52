"""mixkernels: kernels for dynamic data mixing, registered as ``torch.library`` ops.

``import mixkernels`` loads the compiled extension when it is built and matches this torch; it
never imports triton or deepspeed and never initialises CUDA.
"""

from __future__ import annotations

from . import (
    _extension,  # noqa: F401  (loads the compiled kernels)
    _library,  # noqa: F401  (defines the op schemas first)
)
from ._backend import backend
from .grad_projector import GradientProjector
from .grad_store import GradientStore
from .ops import (
    CrossEntropyOutput,
    RouterStats,
    cross_entropy,
    factored_sketch,
    lift,
    linear_cross_entropy,
    load_balancing_loss,
    project,
    projection_matrix,
    router_stats,
    segment_sum,
)

__version__ = "0.1.0"
__all__ = [
    "CrossEntropyOutput",
    "GradientProjector",
    "GradientStore",
    "RouterStats",
    "__version__",
    "backend",
    "cross_entropy",
    "factored_sketch",
    "lift",
    "linear_cross_entropy",
    "load_balancing_loss",
    "project",
    "projection_matrix",
    "router_stats",
    "segment_sum",
]


def __getattr__(name: str):
    # ``mixkernels.hf`` (transformers integration) is imported on first use, so that
    # ``import mixkernels`` stays light.
    if name == "hf":
        import importlib

        return importlib.import_module(".hf", __name__)
    raise AttributeError(f"module 'mixkernels' has no attribute {name!r}")
