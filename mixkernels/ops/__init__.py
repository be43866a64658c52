"""Public op functions; importing a module registers its fake kernel, autograd and fallbacks."""

from .segment_sum import segment_sum
from .project import lift, project, projection_matrix  # noqa: E402  (issue 5)
from .factored_sketch import factored_sketch  # noqa: E402  (issue 5)

__all__ = ["segment_sum"]
__all__ += ["project", "lift", "projection_matrix", "factored_sketch"]
