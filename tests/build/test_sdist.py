"""The sdist builds where torch cannot be imported (as in ``python -m build --sdist``'s isolated
environment), carries every C++/CUDA source and header and leaves local build products out; a
wheel or install build without torch stops with the command to run instead.

Runs ``setup.py`` in a copy of the tracked files (plus planted build products) with ``import torch``
made to fail, so the checkout is never written to. ``make check-dist`` builds the real sdist in an
isolated environment and installs a wheel built from it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.build import check_dist

REPO = Path(__file__).resolve().parents[2]
# Build products and local state a developer's tree holds; none may reach the sdist.
PLANTED = (
    "mixkernels/_C.cpython-311-x86_64-linux-gnu.so",
    "mixkernels/_build_info.json",
    "mixkernels/__pycache__/env.cpython-311.pyc",
    "build/temp.linux-x86_64-cpython-311/csrc/segment_sum.o",
    "csrc/build.ninja",
    "bench/results/bench_segment_sum.csv",
    ".venv/bin/python",
    "dist/mixkernels-0.0.1.tar.gz",
)
NO_TORCH = (
    "import runpy, sys; sys.modules['torch'] = None; sys.argv = ['setup.py', *sys.argv[1:]]; "
    "runpy.run_path('setup.py', run_name='__main__')"
)


def _tracked_copy(dest: Path) -> Path:
    try:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"needs a git checkout: {exc}")
    for name in files.decode().split("\0"):
        if name and (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    for name in ("MANIFEST.in", "docs/install.md"):  # present in the checkout before they are tracked
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, dest / name)
    for name in PLANTED:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_bytes(b"local build product")
    return dest


def _setup_without_torch(tree: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", NO_TORCH, *args],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_sdist_without_torch_carries_every_source_and_no_build_products(tmp_path):
    tree = _tracked_copy(tmp_path / "tree")
    proc = _setup_without_torch(tree, "sdist", "--dist-dir", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (sdist,) = (tmp_path / "out").glob("mixkernels-*.tar.gz")
    check_dist.check_sdist(sdist, root=tree)  # raises CheckFailed naming what is missing or junk
    with tarfile.open(sdist) as tar:
        names = {m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name}
    assert "csrc/common.h" in names and "csrc/cuda/segment_sum_cuda.cu" in names
    assert not names & set(PLANTED)


def test_sdist_check_names_a_missing_header(tmp_path):
    """The content check itself fails when a header is left out (as before MANIFEST.in existed)."""
    tree = _tracked_copy(tmp_path / "tree")
    (tree / "MANIFEST.in").write_text("")
    proc = _setup_without_torch(tree, "sdist", "--dist-dir", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sdist,) = (tmp_path / "out").glob("mixkernels-*.tar.gz")
    with pytest.raises(check_dist.CheckFailed, match=r"lacks \[.*'csrc/common\.h'"):
        check_dist.check_sdist(sdist, root=tree)


def test_extension_build_without_torch_says_what_to_run(tmp_path):
    tree = _tracked_copy(tmp_path / "tree")
    proc = _setup_without_torch(tree, "build_ext")
    assert proc.returncode != 0
    assert "building the compiled extension needs torch" in proc.stderr, proc.stderr[-3000:]
    assert "pip install --no-build-isolation" in proc.stderr
