"""``make check-dist``: the sdist and wheel in ``dist/`` install and work outside the source tree.

1. The sdist holds every C++/CUDA source and header, README.md, pyproject.toml, setup.py and
   MANIFEST.in, and nothing built or local (.so, .o, caches, build info, venvs, results).
2. The wheel holds ``mixkernels/_C`` and a build-info file for the torch installed here.
3. The wheel is installed (``--no-deps``) into a fresh venv in a temp folder. That venv gets torch,
   numpy, triton, pytest... from this environment through a ``.pth`` path line naming its
   site-packages: a plain path, so this environment's own ``.pth`` files -- the editable install of
   the checkout among them -- are not processed, and the checkout is not importable there.
4. From a temp folder: ``mixkernels`` imports from that venv and loads ``_C``;
   ``python -m mixkernels.info --selftest`` passes; copies of a few op test files pass against it.
5. The installed build-info file is edited to name another torch: the import warns once, naming
   both versions and a rebuild command, and the ops still run (reference backend).

Usage: ``python tests/build/check_dist.py [--dist dist] [--tests ops/test_segment_sum.py,...] [--keep]``
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
DEFAULT_TESTS = "ops/test_segment_sum.py,ops/test_router_stats.py,ops/test_factored_sketch.py"
# test_cxx_baseline_isa_build re-runs its whole file in a subprocess (~2-3 min here): `make test`
# covers it; the rest of each file runs against the wheel.
SKIP = "not test_cxx_baseline_isa_build"
# Test-tree files every copied test module imports.
TEST_SUPPORT = ("__init__.py", "conftest.py", "_devices.py", "_tolerances.py", "ops/__init__.py")
SDIST_REQUIRED = ("README.md", "pyproject.toml", "setup.py", "MANIFEST.in")
SDIST_JUNK = (
    "*.so",
    "*.o",
    "*.pyc",
    "*/__pycache__/*",
    "*/.venv/*",
    "*/build/*",
    "*/dist/*",
    "*/bench/results/*",
    "*/_build_info.json",
    "*/.git/*",
    "*/runs/*",
    "*/outputs/*",
    "*/tests/*",
)


# Appended to the copied tests' conftest.py.
GUARD = """

def pytest_sessionstart(session):
    from pathlib import Path

    import mixkernels

    if not Path(mixkernels.__file__).resolve().is_relative_to({site!r}):
        raise RuntimeError(f"mixkernels under test is {{mixkernels.__file__}}, not the installed wheel")


def pytest_report_header(config):
    import mixkernels

    return f"mixkernels under test: {{mixkernels.__file__}}"
"""


class CheckFailed(Exception):
    pass


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def _one(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    _check(
        len(found) == 1,
        f"expected exactly one {pattern} in {folder}, found {[p.name for p in found]}: run `make dist` first",
    )
    return found[0]


def check_sdist(sdist: Path, root: Path = REPO) -> None:
    """``sdist`` (built from the tree ``root``) holds every source and header of ``root/csrc``."""
    with tarfile.open(sdist) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
    top = names[0].split("/", 1)[0]
    inside = {n.split("/", 1)[1] for n in names if "/" in n}
    sources = sorted(
        p.relative_to(root).as_posix()
        for ext in ("cpp", "h", "cu", "cuh")
        for p in (root / "csrc").rglob(f"*.{ext}")
    )
    _check(bool(sources), f"no C++/CUDA sources found under {root / 'csrc'}")
    missing = [name for name in (*SDIST_REQUIRED, *sources) if name not in inside]
    _check(not missing, f"{sdist.name} lacks {missing}")
    junk = sorted(n for n in names if any(fnmatch.fnmatch(n, pattern) for pattern in SDIST_JUNK))
    _check(not junk, f"{sdist.name} carries files that are built or local: {junk[:20]}")
    print(
        f"  {sdist.name}: {len(names)} files under {top}/, all {len(sources)} csrc sources and headers, no junk"
    )


def check_wheel(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        info = (
            json.loads(zf.read("mixkernels/_build_info.json"))
            if "mixkernels/_build_info.json" in names
            else None
        )
    _check(
        any(fnmatch.fnmatch(n, "mixkernels/_C*.so") for n in names), f"{wheel.name} has no mixkernels/_C*.so"
    )
    _check(info is not None, f"{wheel.name} has no mixkernels/_build_info.json")
    _check(
        info["torch_version"] == torch.__version__,
        f"{wheel.name} was built for torch {info['torch_version']}, this environment has {torch.__version__}",
    )
    _check("none-any" not in wheel.name, f"{wheel.name} is tagged as a pure-Python wheel")
    print(f"  {wheel.name}: _C for torch {info['torch_version']}, with_cuda={info['with_cuda']}")


def _run(
    cmd: list[str], *, cwd: Path, env: dict[str, str], timeout: int = 900
) -> subprocess.CompletedProcess:
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    print(
        f"  $ {' '.join(cmd[1:]) if cmd[0] == sys.executable else ' '.join(cmd)}  "
        f"[{proc.returncode}, {time.monotonic() - start:.0f}s]"
    )
    return proc


def _purelib(python: Path) -> Path:
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip())


def make_venv(root: Path, wheel: Path) -> tuple[Path, Path]:
    """A venv under ``root`` with ``wheel`` installed and this environment's packages on its path."""
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = _purelib(python)
    deps = {_purelib(Path(sys.executable)), Path(torch.__file__).resolve().parents[1]}
    (site / "_mixkernels_check_deps.pth").write_text("".join(f"{p}\n" for p in sorted(deps)))
    proc = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            "--disable-pip-version-check",
            "-q",
            str(wheel),
        ],
        cwd=root,
        env=dict(os.environ),
    )
    _check(proc.returncode == 0, f"installing {wheel.name} failed:\n{proc.stdout}\n{proc.stderr}")
    return python, site


def _clean_env() -> dict[str, str]:
    drop = ("PYTHONPATH", "PYTHONHOME", "TRITON_INTERPRET", "MIXKERNELS_DISABLE_EXT", "MIXKERNELS_BACKEND")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _probe(python: Path, cwd: Path, env: dict[str, str]) -> tuple[dict, str]:
    probe = cwd / "probe_install.py"
    shutil.copy(HERE / "probe_install.py", probe)
    proc = _run([str(python), str(probe)], cwd=cwd, env=env, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PROBE ")]
    _check(proc.returncode == 0 and bool(lines), f"the probe failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(lines[-1][len("PROBE ") :]), proc.stderr


def check_installed(python: Path, site: Path, run: Path, tests: list[str]) -> None:
    env = _clean_env()
    result, stderr = _probe(python, run, env)
    _check(
        Path(result["file"]).resolve().is_relative_to(site.resolve()),
        f"mixkernels was imported from {result['file']}, not from the fresh venv's {site}",
    )
    _check(result["loaded"], f"the installed mixkernels._C did not load: {result['reason']}")
    _check(
        result["backend"] == {"segment_sum": "cxx", "linear_ce": "cxx"}, f"auto backends: {result['backend']}"
    )
    _check("ExtensionWarning" not in stderr, f"unexpected warning on import:\n{stderr}")
    print(f"  imports from {Path(result['file']).parent}, _C loaded, ops match their oracles")

    proc = _run([str(python), "-m", "mixkernels.info", "--selftest"], cwd=run, env=env)
    summary = [line for line in proc.stdout.splitlines() if line.startswith("selftest:")]
    _check(proc.returncode == 0, f"selftest failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}")
    _check(bool(summary) and " 0 failed" in summary[-1], f"selftest summary: {summary}")
    _check("_C loaded     True" in proc.stdout, "selftest ran without _C")
    print(f"  {summary[-1]}")

    tree = run / "tests"
    for name in (*TEST_SUPPORT, *tests):
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "tests" / name, tree / name)
    (run / "pyproject.toml").write_text(  # rootdir + markers; the installed package is what gets tested
        '[tool.pytest.ini_options]\nmarkers = ["triton", "slow", "cuda"]\n'
        'filterwarnings = ["ignore::DeprecationWarning"]\n'
    )
    with open(tree / "conftest.py", "a") as f:  # the run stops unless the installed package is under test
        f.write(GUARD.format(site=str(site.resolve())))
    proc = _run(
        [
            str(python),
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-m",
            "not triton and not slow",
            "-k",
            SKIP,
            *[f"tests/{t}" for t in tests],
        ],
        cwd=run,
        env=env,
    )
    header = [line for line in proc.stdout.splitlines() if line.startswith("mixkernels under test:")]
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    _check(
        proc.returncode == 0,
        f"op tests failed against the installed wheel:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}",
    )
    _check(bool(header), f"pytest did not report which mixkernels it tested:\n{proc.stdout[:3000]}")
    print(f"  {header[0]}")
    print(f"  copied tests {', '.join(tests)}: {tail}")


def check_mismatch(python: Path, site: Path, run: Path) -> None:
    info_path = site / "mixkernels" / "_build_info.json"
    info = json.loads(info_path.read_text())
    info["torch_version"] = "2.4.0+elsewhere"
    info_path.write_text(json.dumps(info))
    result, stderr = _probe(python, run, _clean_env())
    warnings = [line for line in stderr.splitlines() if "ExtensionWarning" in line]
    _check(len(warnings) == 1, f"expected one ExtensionWarning, got:\n{stderr}")
    for fragment in (
        f"built for torch 2.4.0+elsewhere but this process runs torch {torch.__version__}",
        "pip install --no-build-isolation",
        "reference (CPU) / Triton (CUDA)",
    ):
        _check(fragment in warnings[0], f"the warning lacks {fragment!r}: {warnings[0]}")
    _check(
        not result["loaded"] and result["backend"] == {"segment_sum": "reference", "linear_ce": "reference"},
        f"no fallback after a mismatch: {result}",
    )
    print(f"  mismatched build info: one warning, ops on {result['backend']['segment_sum']}, results match")
    print(f"    {warnings[0].strip()[:300]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dist", type=Path, default=REPO / "dist", help="folder holding the sdist and the wheel"
    )
    parser.add_argument(
        "--tests", default=DEFAULT_TESTS, help="comma-separated test files (under tests/) to run"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp venv and print its path")
    args = parser.parse_args(argv)
    tests = [t.strip() for t in args.tests.split(",") if t.strip()]
    dist = args.dist.resolve()  # the steps below run in other folders
    start = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="mixkernels-check-dist-"))
    try:
        print("sdist / wheel contents")
        check_sdist(_one(dist, "mixkernels-*.tar.gz"))
        wheel = _one(dist, "mixkernels-*.whl")
        check_wheel(wheel)
        print(f"installed into a fresh venv in {root}")
        python, site = make_venv(root, wheel)
        run = root / "run"
        run.mkdir()
        check_installed(python, site, run, tests)
        check_mismatch(python, site, run)
    except CheckFailed as exc:
        print(f"check-dist: FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(f"check-dist: ok ({time.monotonic() - start:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
