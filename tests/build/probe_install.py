"""Run as a script by the install checks (``check_dist.py``, ``test_extension_fallback.py``) in a
fresh interpreter: imports ``mixkernels`` wherever that interpreter finds it, runs two ops on CPU
under the ``auto`` backend, checks them against independent oracles and prints one JSON line.

Oracles: a hand-computed ``segment_sum`` case, and ``torch.nn.functional.cross_entropy`` of the
float64 logits for ``linear_cross_entropy``. Exit code 0 iff both ops match.
"""

from __future__ import annotations

import json
import sys

import torch


def main() -> int:
    import mixkernels
    from mixkernels import _backend, _extension

    result = {
        "file": mixkernels.__file__,
        "loaded": _extension.LOADED,
        "reason": _extension.REASON,
        "torch": torch.__version__,
        "backend": {op: _backend.select(op, torch.device("cpu")) for op in ("segment_sum", "linear_ce")},
    }

    values = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    ids = torch.tensor([0, 2, 0, 2])
    sums, counts = mixkernels.segment_sum(values, ids, 3)
    result["segment_sum_ok"] = bool(
        torch.equal(sums, torch.tensor([[6.0, 8.0], [0.0, 0.0], [10.0, 12.0]]))
        and torch.equal(counts, torch.tensor([2, 0, 2]))
    )

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 16, generator=gen)
    weight = torch.randn(37, 16, generator=gen)
    labels = torch.randint(0, 37, (7,), generator=gen)
    labels[3] = -100
    got = mixkernels.linear_cross_entropy(hidden, weight, labels).loss
    want = torch.nn.functional.cross_entropy(hidden.double() @ weight.double().T, labels)
    result["linear_ce_ok"] = bool(torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5))
    result["linear_ce"] = [got.item(), want.item()]

    try:
        with mixkernels.backend("cxx"):
            mixkernels.segment_sum(values, ids, 3)
        result["cxx_error"] = ""
    except RuntimeError as exc:
        result["cxx_error"] = str(exc)

    print("PROBE " + json.dumps(result))
    return 0 if result["segment_sum_ok"] and result["linear_ce_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
