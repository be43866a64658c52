"""mixtrain: dynamic data mixing for LLM fine-tuning on DeepSpeed.

Entry points: ``python -m mixtrain train CONFIG.yaml``, ``python -m mixtrain demo``,
``python -m mixtrain report DIR``; Python: :func:`mixtrain.loop.train`,
:class:`mixtrain.sampler.MixtureSampler`, :mod:`mixtrain.policies`, :mod:`mixtrain.hf`.
"""

from .config import Config, ConfigError, load_config
from .sampler import MixtureSampler

__all__ = ["Config", "ConfigError", "MixtureSampler", "load_config"]
__version__ = "0.1.0"
