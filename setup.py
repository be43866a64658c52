"""Build of the compiled extension ``mixkernels._C``.

torch must already be installed (it is not a build requirement: that would download a second
multi-GB torch into an isolated build environment). Install with
``pip install --no-build-isolation -e .`` -- ``make test`` / ``make demo`` do this for you.

C++ CPU kernels are always built. CUDA kernels are built when torch is a CUDA build and nvcc is
found (``FORCE_CUDA=1`` forces, ``MIXKERNELS_BUILD_CUDA=0`` skips); never decided by
``torch.cuda.is_available()``, so a machine with no GPU still compiles them.

Making an sdist needs no torch (``python -m build --sdist`` runs in an isolated environment
without it): torch is imported only to build the extension, and a build without it stops with
the command to run instead. MANIFEST.in puts every source and header into the sdist, whatever
this machine would compile. See docs/install.md.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_env():
    spec = importlib.util.spec_from_file_location("_mk_env", os.path.join(ROOT, "mixkernels", "env.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


env = _load_env()


def _guess_cuda_home() -> None:
    """torch guesses CUDA_HOME from nvcc's folder, which for a wrapper or link in /usr/local/bin is
    /usr/local (no lib64/libcudart): prefer a folder that really holds the toolkit."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = home
            return


_guess_cuda_home()

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # an sdist (or metadata) build in an isolated environment: no compile needed
    torch = None

_NO_TORCH = (
    "mixkernels: building the compiled extension needs torch, which this build environment cannot "
    "import. Install torch first, then build without isolation so the extension is compiled for that "
    "torch: `pip install --no-build-isolation <this sdist or source folder>` (from a clone: `make setup`). "
    "See docs/install.md."
)


def _want_cuda() -> bool:
    override = env.build_cuda_override()
    if override is not None:
        return override
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    return torch.version.cuda is not None and bool(nvcc)


def _cuda_wheel_includes() -> list[str]:
    """Headers (cuBLAS, cuSPARSE...) that ATen/cuda/CUDAContext.h needs and a bare nvcc toolkit
    may lack: the nvidia-* wheels torch depends on ship them under site-packages/nvidia/cu*/include."""
    found = []
    for base in sys.path:
        found += sorted(glob.glob(os.path.join(base, "nvidia", "cu*", "include")))
    return found[:1]


cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
all_cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))

if torch is None:
    from setuptools import Extension
    from setuptools.command.build_ext import build_ext

    class NeedsTorch(build_ext):
        """Stands in for torch's BuildExtension when torch is missing: metadata and sdist commands
        never run it; a wheel or install build stops here with the command to run instead."""

        def run(self) -> None:
            sys.exit(_NO_TORCH)

    # The same extension name, so the metadata and the wheel tag do not depend on torch being here.
    ext = Extension(name="mixkernels._C", sources=cpp_sources + all_cuda_sources)
    cmdclass = {"build_ext": NeedsTorch}
else:
    WITH_CUDA = _want_cuda()
    if WITH_CUDA:
        os.environ["TORCH_CUDA_ARCH_LIST"] = env.cuda_arch_list()
    include_dirs = [os.path.join(ROOT, "csrc")]
    extra_compile_args = {"cxx": ["-O3", "-fopenmp"]}
    define_macros: list[tuple[str, str]] = []
    if WITH_CUDA:
        include_dirs += _cuda_wheel_includes()
        extra_compile_args["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        define_macros.append(("MIXKERNELS_WITH_CUDA", "1"))
    ext = (CUDAExtension if WITH_CUDA else CppExtension)(
        name="mixkernels._C",
        sources=cpp_sources + (all_cuda_sources if WITH_CUDA else []),
        include_dirs=include_dirs,
        extra_compile_args=extra_compile_args,
        extra_link_args=["-fopenmp"],
        define_macros=define_macros,
    )

    def build_info() -> dict:
        return {
            "torch_version": torch.__version__,
            "cuda_version": torch.version.cuda,
            "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
            "cuda_archs": env.cuda_arch_list() if WITH_CUDA else None,
            "with_cuda": WITH_CUDA,
            "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        }

    class BuildWithInfo(BuildExtension):
        """Writes ``mixkernels/_build_info.json`` beside the extension (atomically): into the build
        tree (what a wheel ships) and, for in-place builds, into the source tree."""

        def run(self) -> None:
            super().run()
            info = json.dumps(build_info(), indent=2, sort_keys=True)
            targets = {os.path.join(self.build_lib, "mixkernels")}
            if self.inplace:
                targets.add(os.path.join(ROOT, "mixkernels"))
            for folder in targets:
                os.makedirs(folder, exist_ok=True)
                tmp = os.path.join(folder, "_build_info.json.tmp")
                with open(tmp, "w") as f:
                    f.write(info + "\n")
                os.replace(tmp, os.path.join(folder, "_build_info.json"))

    cmdclass = {"build_ext": BuildWithInfo.with_options(use_ninja=True)}


setup(ext_modules=[ext], cmdclass=cmdclass)
