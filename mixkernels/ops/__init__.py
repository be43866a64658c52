"""Public op functions; importing a module registers its fake kernel, autograd and fallbacks."""

from .cross_entropy import cross_entropy
from .linear_ce import CrossEntropyOutput, linear_cross_entropy
from .segment_sum import segment_sum

__all__ = ["CrossEntropyOutput", "cross_entropy", "linear_cross_entropy", "segment_sum"]
