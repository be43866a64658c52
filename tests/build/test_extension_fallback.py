"""A compiled ``_C`` that cannot be used here (built for another torch / C++ ABI, missing build info,
not a loadable library): ``import mixkernels`` warns once, naming what it was built for, what is
running and the command that rebuilds, and the ops still run, on the reference backend.

Each case copies the built package (``_C`` included) into a temp folder, breaks the copy, and
imports it in a fresh interpreter from another folder; the checkout itself is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixkernels import _extension

REPO = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("probe_install.py")

pytestmark = pytest.mark.skipif(
    not _extension.LOADED, reason=f"needs the built extension: {_extension.REASON}"
)


def _package_copy(root: Path) -> Path:
    """A copy of the imported mixkernels package (with its built ``_C`` and build info) under ``root``."""
    site = root / "site"
    shutil.copytree(_extension.PACKAGE_DIR, site / "mixkernels", ignore=shutil.ignore_patterns("__pycache__"))
    return site / "mixkernels"


def _probe(site: Path, cwd: Path) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIXKERNELS_", "TRITON_"))}
    env["PYTHONPATH"] = str(site)
    proc = subprocess.run(
        [sys.executable, str(PROBE)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PROBE ")]
    assert proc.returncode == 0 and lines, f"probe failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    result = json.loads(lines[-1][len("PROBE ") :])
    assert Path(result["file"]).resolve().is_relative_to(site.resolve()), result["file"]
    return result, proc.stderr


def _assert_fell_back(result: dict, stderr: str, *fragments: str) -> None:
    assert stderr.count("ExtensionWarning") == 1, stderr
    warning = next(line for line in stderr.splitlines() if "ExtensionWarning" in line)
    for fragment in fragments:
        assert fragment in warning, (fragment, warning)
    assert "reference (CPU) / Triton (CUDA)" in warning
    assert not result["loaded"]
    assert result["backend"] == {"segment_sum": "reference", "linear_ce": "reference"}
    assert result["segment_sum_ok"] and result["linear_ce_ok"], result
    assert "backend 'cxx' is unavailable on cpu" in result["cxx_error"]
    assert fragments[0] in result["cxx_error"]


def test_intact_copy_loads_without_warning(tmp_path):
    """The control: the same copy, unbroken, loads ``_C`` and serves the ops with it."""
    pkg = _package_copy(tmp_path)
    result, stderr = _probe(pkg.parent, tmp_path)
    assert "ExtensionWarning" not in stderr, stderr
    assert result["loaded"], result["reason"]
    assert result["backend"] == {"segment_sum": "cxx", "linear_ce": "cxx"}
    assert result["segment_sum_ok"] and result["linear_ce_ok"], result


@pytest.mark.parametrize(
    ("key", "value", "what", "now"),
    [
        ("torch_version", "2.4.0+other", "torch", torch.__version__),
        ("cxx11_abi", not torch._C._GLIBCXX_USE_CXX11_ABI, "C++11 ABI", str(torch._C._GLIBCXX_USE_CXX11_ABI)),
    ],
)
def test_build_for_another_torch_warns_once_and_falls_back(tmp_path, key, value, what, now):
    pkg = _package_copy(tmp_path)
    info_path = pkg / "_build_info.json"
    info = json.loads(info_path.read_text())
    info[key] = value
    info_path.write_text(json.dumps(info))
    result, stderr = _probe(pkg.parent, tmp_path)
    _assert_fell_back(
        result,
        stderr,
        f"mixkernels._C was built for {what} {value} but this process runs {what} {now}",
        "--no-build-isolation",
    )


def test_missing_build_info_warns_and_falls_back(tmp_path):
    pkg = _package_copy(tmp_path)
    (pkg / "_build_info.json").unlink()
    result, stderr = _probe(pkg.parent, tmp_path)
    _assert_fell_back(result, stderr, "_build_info.json is missing or unreadable", "--no-build-isolation")


def test_unloadable_library_warns_and_falls_back(tmp_path):
    """Build info that matches, but a ``_C`` the dynamic loader rejects (what an undefined symbol
    after an in-place torch upgrade looks like to Python: an ImportError)."""
    pkg = _package_copy(tmp_path)
    (so,) = pkg.glob("_C*.so")
    so.write_bytes(b"not a shared library")
    result, stderr = _probe(pkg.parent, tmp_path)
    _assert_fell_back(result, stderr, "importing mixkernels._C failed", "--no-build-isolation")


def test_rebuild_command_names_make_setup_in_a_checkout(tmp_path):
    """In a source checkout the rebuild command is ``make setup``; in an installed copy it is a
    reinstall from source without build isolation (the cases above)."""
    assert (REPO / "setup.py").is_file()
    if _extension.PACKAGE_DIR.parent == REPO:
        assert "make setup" in _extension.rebuild_command()
    pkg = _package_copy(tmp_path)
    (pkg / "_build_info.json").unlink()
    (pkg.parent / "setup.py").write_text("")
    (pkg.parent / "csrc").mkdir()
    _, stderr = _probe(pkg.parent, tmp_path)
    assert f"rebuild it with `make setup` in {pkg.parent.resolve()}" in stderr, stderr
