"""One tolerance table per dtype, shared by every op test.

``TOL[dtype]`` are ``torch.testing.assert_close`` kwargs for comparing a kernel against the
reference in that dtype. For low precision the criterion of DESIGN.md applies where it matters:
the kernel's error against an fp64 oracle may be at most ~2x the error of PyTorch itself in the
same dtype (see ``assert_error_at_most``).
"""

from __future__ import annotations

import torch

TOL: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-10},
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 1.6e-2, "rtol": 1.6e-2},
}


def tol(dtype: torch.dtype) -> dict[str, float]:
    return TOL[dtype]


def assert_error_at_most(got: torch.Tensor, torch_same_dtype: torch.Tensor, oracle: torch.Tensor,
                         factor: float = 2.0, floor: float = 1e-6) -> None:
    """Error of ``got`` vs ``oracle`` is at most ``factor`` x that of PyTorch in the same dtype."""
    ours = (got.double() - oracle.double()).abs().max().item()
    theirs = (torch_same_dtype.double() - oracle.double()).abs().max().item()
    assert ours <= factor * theirs + floor, f"error {ours:.3e} > {factor} x PyTorch's {theirs:.3e}"
