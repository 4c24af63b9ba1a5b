"""Builds pyseg._C, the native ops (C++ CPU kernels always, CUDA kernels when available).

Environment (read here, at the top):
  FORCE_CUDA=1            build the CUDA kernels even without a visible GPU (needs nvcc and a CUDA torch)
  FORCE_CPU=1             never build the CUDA kernels
  TORCH_CUDA_ARCH_LIST    CUDA architectures, left to torch (e.g. "8.0;9.0")
  MAX_JOBS                parallel compile jobs, left to torch
  PYSEG_DEBUG=1           -O0 -g instead of -O3
Install: pip install --no-build-isolation -e .   (after torch)
"""

import glob
import os
import site
import sys
from pathlib import Path

import torch
from setuptools import setup
from torch.utils import cpp_extension

FORCE_CUDA = os.environ.get("FORCE_CUDA", "0") == "1"
FORCE_CPU = os.environ.get("FORCE_CPU", "0") == "1"
DEBUG = os.environ.get("PYSEG_DEBUG", "0") == "1"

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def pip_cuda_include_dirs() -> list[str]:
    """Header folders of pip's `nvidia` packages (e.g. site-packages/nvidia/cu13/include).

    A CUDA build of torch includes cuBLAS/cuSPARSE headers that a bare toolkit (only nvcc and
    the runtime) may lack; the pip wheels torch depends on carry them.
    """
    roots = [*site.getsitepackages(), site.getusersitepackages(), *sys.path]
    found = []
    for root in roots:
        for include in sorted(glob.glob(os.path.join(root, "nvidia", "*", "include"))):
            if include not in found:
                found.append(include)
    return found


def want_cuda() -> bool:
    if FORCE_CPU:
        return False
    if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
        if FORCE_CUDA:
            sys.exit(
                "FORCE_CUDA=1 but "
                + ("torch is a CPU build" if torch.version.cuda is None else "no CUDA toolkit was found")
                + ": install a CUDA build of torch and set CUDA_HOME to the toolkit (folder with bin/nvcc)."
            )
        return False
    return FORCE_CUDA or torch.cuda.is_available()


def relative(paths) -> list[str]:
    return sorted(str(Path(p).relative_to(ROOT)) for p in paths)


def extension():
    with_cuda = want_cuda()
    sources = relative([CSRC / "module.cpp", *CSRC.glob("ops/*.cpp"), *CSRC.glob("cpu/*.cpp")])
    opt = ["-O0", "-g"] if DEBUG else ["-O3"]
    cxx_flags = [*opt, "-fopenmp", f'-DPYSEG_TORCH_VERSION="{torch.__version__}"']
    extra = {"cxx": cxx_flags}
    include_dirs = [str(CSRC)]
    builder = cpp_extension.CppExtension
    if with_cuda:
        sources += relative(CSRC.glob("cuda/*.cu"))
        cxx_flags.append("-DPYSEG_WITH_CUDA")
        extra["nvcc"] = [*opt, "-DPYSEG_WITH_CUDA", "--expt-relaxed-constexpr", "-lineinfo"]
        include_dirs += pip_cuda_include_dirs()
        builder = cpp_extension.CUDAExtension
    print(
        "pyseg setup: building pyseg._C with "
        + (
            f"CPU + CUDA kernels (CUDA_HOME={cpp_extension.CUDA_HOME}, torch CUDA {torch.version.cuda}, "
            f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '<torch default>')})"
            if with_cuda
            else "CPU kernels only"
            + ("" if FORCE_CPU else " (set FORCE_CUDA=1 with nvcc and a CUDA torch to add CUDA)")
        )
        + f", torch {torch.__version__}, {'debug' if DEBUG else 'release'}",
        flush=True,
    )
    if with_cuda:
        print(f"pyseg setup: extra CUDA include dirs: {include_dirs[1:] or 'none'}", flush=True)
    return builder(
        name="pyseg._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
