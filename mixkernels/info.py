"""``python -m mixkernels.info [--selftest [--device cpu|cuda]]``: what this installation can do.

Prints torch / triton / CUDA versions, the extension's build info, whether ``_C`` loaded (and
why not), the CUDA device when there is one, and for every op which backend serves it on CPU and
on CUDA. ``--selftest`` runs every op on small random inputs through every backend available here
against the reference and prints a pass/fail table; exit code 1 on any failure. On CPU, Triton
runs through its interpreter in a subprocess; with ``--device cuda`` the inputs are moved to the
GPU and Triton is compiled for real, in this process.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.metadata
import os
import subprocess
import sys
from typing import Any

import torch

from . import _backend, _extension
from ._library import OPS


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_isa() -> str:
    """Which build of the dispatching C++ CPU kernels runs here (``MIXKERNELS_NO_AVX2`` forces baseline)."""
    if not _extension.LOADED:
        return "n/a (_C not loaded)"
    from . import _C

    return _C.cpu_isa() if hasattr(_C, "cpu_isa") else "unknown"


def _cuda_device() -> str:
    if not torch.cuda.is_available():
        return "none (torch.cuda.is_available() is False)"
    major, minor = torch.cuda.get_device_capability()
    return f"{torch.cuda.get_device_name()} (sm_{major}{minor}, {torch.cuda.device_count()} visible)"


def describe() -> str:
    lines = [
        f"python        {sys.version.split()[0]}",
        (f"torch         {torch.__version__} (CUDA {torch.version.cuda or 'none'}, "
         f"C++11 ABI {torch._C._GLIBCXX_USE_CXX11_ABI})"),
        f"triton        {_version('triton')}"
        + ("  [TRITON_INTERPRET=1]" if os.environ.get("TRITON_INTERPRET") == "1" else ""),
        f"deepspeed     {_version('deepspeed')}",
        f"transformers  {_version('transformers')}",
        f"build info    {_extension.read_build_info()}",
        f"_C loaded     {_extension.LOADED}" + ("" if _extension.LOADED else f"  ({_extension.REASON})"),
        f"CPU kernels   {_cpu_isa()}",
        f"CUDA device   {_cuda_device()}",
        "",
        f"{'op':<24} {'device':<6} {'auto':<10} available backends (reason when not)",
    ]
    for op, info in OPS.items():
        for device in ("cpu", "cuda"):
            with _backend.backend("auto"):
                auto = _backend.select(op, torch.device(device))
            parts = []
            for name in info.backends:
                reason = _backend.unavailable_reason(op, device, name)
                parts.append(name if not reason else f"-{name} ({reason})")
            lines.append(f"{op:<24} {device:<6} {auto:<10} {'; '.join(parts)}")
    return "\n".join(lines)


def _flatten(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if dataclasses.is_dataclass(obj):
        return [t for f in dataclasses.fields(obj) for t in _flatten(getattr(obj, f.name))]
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in _flatten(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _flatten(item)]
    return []


def _to(obj: Any, device: str) -> Any:
    """Every tensor in ``obj`` (tensors, lists, tuples, dicts) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _run_case(fn, args, kwargs, name: str) -> tuple[bool, str]:
    try:
        with _backend.backend("reference"):
            expected = _flatten(fn(*args, **kwargs))
        with _backend.backend(name):
            got = _flatten(fn(*args, **kwargs))
        assert len(got) == len(expected), f"{len(got)} outputs vs {len(expected)}"
        for g, e in zip(got, expected):
            # Backends sum in different orders: the absolute error scales with the output's size.
            scale = max(1.0, e.detach().abs().max().item()) if e.numel() and e.dtype.is_floating_point else 1.0
            tol = {"atol": 1e-5 * scale, "rtol": 1e-5} if e.dtype.is_floating_point else {"atol": 0, "rtol": 0}
            if e.dtype in (torch.float16, torch.bfloat16):
                tol = {"atol": 2e-2 * scale, "rtol": 2e-2}
            torch.testing.assert_close(g.detach(), e.detach(), **tol)
        return True, ""
    except Exception as exc:  # noqa: BLE001 - the table reports any failure
        return False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"


def selftest(backends: list[str], device: str = "cpu") -> list[tuple[str, str, str, bool, str]]:
    """Rows (op, backend, case, passed, message) for every op x available backend x case, with the
    inputs on ``device`` (``cpu`` or ``cuda``)."""
    torch.manual_seed(0)
    rows = []
    for op in OPS:
        module = importlib.import_module(f"mixkernels.ops.{op}")
        fn = getattr(module, op)
        for name in backends:
            reason = _backend.unavailable_reason(op, device, name)
            if reason:
                rows.append((op, name, "-", None, f"skipped: {reason}"))
                continue
            for case, args, kwargs in module.selftest_cases():
                ok, message = _run_case(fn, _to(args, device), _to(kwargs, device), name)
                if device != "cpu" and ok:
                    torch.cuda.synchronize()  # a device-side assert belongs to this case
                rows.append((op, name, case, ok, message))
    return rows


def _triton_rows() -> list[tuple[str, str, str, bool, str]]:
    """Runs the triton selftest in a subprocess with TRITON_INTERPRET=1 (set before triton loads)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "mixkernels.info", "--selftest", "--backends", "triton", "--rows"],
        env=env, capture_output=True, text=True, check=False,
    )
    rows = []
    for line in proc.stdout.splitlines():
        if line.startswith("ROW\t"):
            _, op, name, case, ok, message = line.split("\t", 5)
            rows.append((op, name, case, None if ok == "None" else ok == "True", message))
    if proc.returncode not in (0, 1) or not rows:
        rows.append(("*", "triton", "subprocess", False, (proc.stderr.strip().splitlines() or ["no output"])[-1]))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mixkernels.info", description=__doc__.splitlines()[0])
    parser.add_argument("--selftest", action="store_true", help="run every op through every backend here")
    parser.add_argument("--backends", default="reference,cxx,triton", help="comma-separated backends to test")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the selftest inputs live")
    parser.add_argument("--rows", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not args.selftest:
        print(describe())
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("selftest --device cuda: no CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 1
    on_cpu = args.device == "cpu"
    in_process = [b for b in backends if b != "triton" or not on_cpu or os.environ.get("TRITON_INTERPRET") == "1"]
    rows = selftest(in_process, args.device)
    if args.rows:
        for row in rows:
            print("ROW\t" + "\t".join(str(x) for x in row))
        return 0 if all(r[3] is not False for r in rows) else 1
    if "triton" in backends and "triton" not in in_process:
        rows += _triton_rows()
    print(describe())
    print()
    print(f"selftest on {args.device}")
    print(f"{'op':<24} {'backend':<10} {'case':<28} result")
    for op, name, case, ok, message in rows:
        result = "PASS" if ok else ("SKIP" if ok is None else "FAIL")
        print(f"{op:<24} {name:<10} {case:<28} {result}{'  ' + message if message else ''}")
    failed = sum(1 for r in rows if r[3] is False)
    passed = sum(1 for r in rows if r[3] is True)
    print(f"\nselftest: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
