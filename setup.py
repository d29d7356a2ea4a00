"""Build of ffn_kernels._C: CPU kernels always, CUDA kernels when possible or forced.

Knobs (environment): FFN_KERNELS_FORCE_CUDA=1 builds the CUDA sources even without a visible GPU
(needs a CUDA build of torch and a toolkit in CUDA_HOME); FFN_KERNELS_NO_CUDA=1 never builds them;
FFN_KERNELS_CUDA_ARCHS="8.0;9.0" picks the architectures; MAX_JOBS caps ninja's parallel jobs;
FFN_KERNELS_DEBUG=1 compiles with -O0 -g.

The extension links against one torch release's C++ ABI, so it is built against the torch already
installed (`pip install --no-build-isolation .`) and the wheel requires exactly that release, as
torchvision's wheels do. pyproject.toml therefore does not list torch as a build requirement: an
isolated build (plain `pip install .`) has no torch and stops at once with the line below, instead of
downloading another torch (a CUDA build, several GB) to compile against one the user does not run.
"""

import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit("ffn-kernels: no torch in this build environment. Install torch first, then build "
             "against it with `pip install --no-build-isolation .` (the compiled ops load only with "
             "the torch they were built against)")

ROOT = Path(__file__).parent
# the release this build links against ("2.13.0" of "2.13.0+cpu"): the wheel requires exactly it
TORCH_RELEASE = torch.__version__.split("+")[0]
DEBUG = os.environ.get("FFN_KERNELS_DEBUG") == "1"


def build_cuda() -> bool:
    if os.environ.get("FFN_KERNELS_NO_CUDA") == "1":
        return False
    has_toolkit = torch.version.cuda is not None and CUDA_HOME is not None
    if os.environ.get("FFN_KERNELS_FORCE_CUDA") == "1":
        if not has_toolkit:
            raise RuntimeError(
                "FFN_KERNELS_FORCE_CUDA=1 needs a CUDA build of torch and a CUDA toolkit "
                f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})"
            )
        return True
    return has_toolkit and torch.cuda.is_available()


def cuda_arch_flags() -> list[str]:
    """nvcc -gencode flags: SASS (code=sm_XX) for each architecture in FFN_KERNELS_CUDA_ARCHS
    (default "8.0;9.0"; "9.0a" or torch's "9.0+PTX" spellings are accepted), plus PTX
    (code=compute_XX) for the highest one, which the driver JIT-compiles on GPUs newer than the
    list (as PyTorch and flash-attention ship theirs). The PTX is the plain architecture's: an
    arch-specific "a"/"f" target's PTX would load on that exact GPU family only."""
    archs = []
    for arch in os.environ.get("FFN_KERNELS_CUDA_ARCHS", "8.0;9.0").replace(",", ";").split(";"):
        num = arch.strip().removesuffix("+PTX").replace(".", "")
        if num and num not in archs:
            archs.append(num)
    flags = []
    for num in archs:
        flags += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
    if archs:
        top = max(int(n.rstrip("abcdefghijklmnopqrstuvwxyz")) for n in archs)  # "90a" -> 90
        flags += ["-gencode", f"arch=compute_{top},code=compute_{top}"]
    return flags


def extension():
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    for folder in ("csrc/ops", "csrc/cpu"):
        sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / folder).glob("*.cpp"))
    # -g0: no debug info in a release build (Python's own CFLAGS add -g: a 33 MB extension)
    opt = ["-O0", "-g"] if DEBUG else ["-O3", "-g0"]
    # No -std flag: BuildExtension adds the standard torch's headers need (C++20 since torch 2.14).
    cxx = opt + ["-fopenmp"]
    kwargs = dict(
        name="ffn_kernels._C",
        include_dirs=[str(ROOT / "csrc")],
        # reported by `python -m ffn_kernels.info` (stringified in csrc/module.cpp)
        define_macros=[("FFN_TORCH_VERSION", torch.__version__)],
        extra_link_args=["-fopenmp"],
    )
    if build_cuda():
        sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc/cuda").glob("*.cu"))
        # nvcc has no -g0 (it stops with "Unknown option"); host code gets it through -Xcompiler
        nvcc_opt = opt if DEBUG else ["-O3", "-Xcompiler", "-g0"]
        nvcc = nvcc_opt + ["--use_fast_math", "-lineinfo"] + cuda_arch_flags()
        if os.environ.get("FFN_KERNELS_PTXAS_VERBOSE") == "1":
            nvcc.append("-Xptxas=-v")
        return CUDAExtension(
            sources=sources,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            **kwargs,
        )
    return CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)


setup(
    packages=find_packages(include=["ffn_kernels", "ffn_kernels.*", "ffn", "ffn.*"]),
    install_requires=[f"torch=={TORCH_RELEASE}", "numpy"],
    package_data={"ffn": ["configs/*.toml"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
