"""Public op functions; importing a module registers its fake kernel, autograd and fallbacks."""

from .cross_entropy import cross_entropy
from .factored_sketch import factored_sketch
from .linear_ce import CrossEntropyOutput, linear_cross_entropy
from .project import lift, project, projection_matrix
from .router_stats import RouterStats, load_balancing_loss, router_stats
from .segment_sum import segment_sum

__all__ = [
    "CrossEntropyOutput",
    "RouterStats",
    "cross_entropy",
    "linear_cross_entropy",
    "load_balancing_loss",
    "router_stats",
    "segment_sum",
]
__all__ += ["factored_sketch", "lift", "project", "projection_matrix"]
