"""Readable pure-PyTorch references: the oracle for every backend and the fallback without ``_C``."""
