"""Public op functions; importing a module registers its fake kernel, autograd and fallbacks."""

from .router_stats import RouterStats, load_balancing_loss, router_stats
from .segment_sum import segment_sum

__all__ = ["RouterStats", "load_balancing_loss", "router_stats", "segment_sum"]
