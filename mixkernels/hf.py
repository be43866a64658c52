"""transformers integration: hooks and loss helpers for Hugging Face models."""

from ._hf_router import RouterStatsCollector  # noqa: F401  (router statistics, issue 4)
