"""Every environment variable mixkernels reads, in one place.

This module imports nothing but the standard library, so ``setup.py`` can load it by path
before torch or the package is importable.

Variables
---------
MIXKERNELS_BACKEND      default backend for every op: ``auto`` (default), ``reference``, ``cxx``
                        or ``triton`` (see :func:`mixkernels.backend`).
MIXKERNELS_DISABLE_EXT  ``1`` skips loading the compiled extension ``mixkernels._C`` (the
                        reference fallbacks then serve every op).
MIXKERNELS_NO_AVX2      ``1`` makes the router_stats CPU kernels run their baseline x86-64
                        build instead of the AVX2+FMA one (read once, at the first call;
                        ``mixkernels._C.cpu_isa()`` reports which). For testing the fallback path.
MIXKERNELS_BUILD_CUDA   build time: ``0`` skips the CUDA sources even when torch is a CUDA build
                        and nvcc is found (fast local rebuilds); ``1`` is the same as ``FORCE_CUDA=1``.
FORCE_CUDA              build time: compile the CUDA sources even if nvcc detection fails.
TORCH_CUDA_ARCH_LIST    build time: CUDA architectures (default ``8.0;9.0``).
MAX_JOBS                build time: parallel compile jobs (honoured by torch's ninja build).
TRITON_INTERPRET        ``1`` runs Triton kernels under Triton's interpreter on CPU tensors; it
                        must be set before triton is imported.
"""

from __future__ import annotations

import os

_BACKENDS = ("auto", "reference", "cxx", "triton")


def _flag(name: str, default: str = "0") -> bool:
    return os.environ.get(name, default).strip().lower() in ("1", "true", "yes", "on")


def default_backend() -> str:
    """The backend named by ``MIXKERNELS_BACKEND`` (``auto`` when unset)."""
    value = os.environ.get("MIXKERNELS_BACKEND", "auto").strip().lower() or "auto"
    if value not in _BACKENDS:
        raise ValueError(
            f"MIXKERNELS_BACKEND={value!r} is not a backend; expected one of {', '.join(_BACKENDS)}"
        )
    return value


def no_avx2() -> bool:
    """``MIXKERNELS_NO_AVX2``: the router_stats CPU kernels run their baseline build (read by C++)."""
    return _flag("MIXKERNELS_NO_AVX2")


def disable_extension() -> bool:
    return _flag("MIXKERNELS_DISABLE_EXT")


def triton_interpret() -> bool:
    return _flag("TRITON_INTERPRET")


def build_cuda_override() -> bool | None:
    """``True``/``False`` if the build was told to (not) compile CUDA, ``None`` to auto-detect."""
    if _flag("FORCE_CUDA"):
        return True
    value = os.environ.get("MIXKERNELS_BUILD_CUDA")
    if value is None or value.strip() == "":
        return None
    return _flag("MIXKERNELS_BUILD_CUDA")


def cuda_arch_list() -> str:
    return os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or "8.0;9.0"
