"""Public op functions; importing a module registers its fake kernel, autograd and fallbacks."""

from .segment_sum import segment_sum

__all__ = ["segment_sum"]
