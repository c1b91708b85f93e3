"""Builds torch_mha._C, the operator library, from csrc/.

Install torch first, then build against it without build isolation:

    pip install --no-build-isolation -e .

Environment switches:
    FORCE_CUDA=1            build the CUDA kernels even without a visible GPU (needs nvcc and a
                            CUDA build of torch)
    USE_CUDA=0              never build the CUDA kernels
    TORCH_CUDA_ARCH_LIST    GPU architectures (default "8.0;9.0+PTX" when building CUDA)
    NVCC_FLAGS              extra nvcc flags
    MAX_JOBS                parallel compile jobs (ninja)
    DEBUG=1                 -O0 -g instead of -O3
"""

import glob
import json
import os
import re
import shlex
import shutil
import subprocess

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
DEBUG = os.environ.get("DEBUG", "0") == "1"


def nvcc_version():
    """CUDA version of the nvcc that would be used, as 'major.minor', or None."""
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return None
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def build_cuda():
    """Whether to compile the CUDA kernels, and why (printed)."""
    if os.environ.get("USE_CUDA", "1") == "0":
        return False, "USE_CUDA=0"
    forced = os.environ.get("FORCE_CUDA", "0") == "1"
    if torch.version.cuda is None:
        if forced:
            raise RuntimeError(
                "FORCE_CUDA=1 but the installed torch is a CPU-only build; install a CUDA build "
                "of torch to compile the CUDA kernels"
            )
        return False, "torch is a CPU-only build"
    found = nvcc_version()
    if found is None:
        if forced:
            raise RuntimeError("FORCE_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        return False, "nvcc not found"
    if found.split(".")[0] != torch.version.cuda.split(".")[0]:
        raise RuntimeError(
            f"nvcc is CUDA {found} but torch was built with CUDA {torch.version.cuda}; "
            "use a matching CUDA toolkit (set CUDA_HOME) or USE_CUDA=0"
        )
    return True, f"torch CUDA {torch.version.cuda}, nvcc {found}" + (" (forced)" if forced else "")


def sources(with_cuda):
    patterns = ["*.cpp", "cpu/*.cpp", "meta/*.cpp", "autograd/*.cpp"]
    if with_cuda:
        patterns += ["cuda/*.cpp", "cuda/*.cu"]
    files = []
    for pattern in patterns:
        files += sorted(glob.glob(os.path.join(CSRC, pattern)))
    return [os.path.relpath(f, ROOT) for f in files]


def write_build_info(with_cuda):
    """Recorded next to the library; torch_mha checks it at import."""
    info = {
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
        "with_cuda": with_cuda,
    }
    with open(os.path.join(ROOT, "torch_mha", "_build_info.json"), "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")


def make_extension():
    with_cuda, reason = build_cuda()
    print(f"torch_mha: CUDA kernels {'ON' if with_cuda else 'OFF'} ({reason})")
    write_build_info(with_cuda)

    optimize = ["-O0", "-g"] if DEBUG else ["-O3"]
    cxx_flags = optimize + ["-std=c++17", "-Wall", "-Wextra", "-DTORCH_MHA_BUILD_LIBRARY"]
    define_macros = []
    extra_compile_args = {"cxx": cxx_flags}
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        define_macros.append(("WITH_CUDA", None))
        extra_compile_args["nvcc"] = optimize + [
            "-std=c++17",
            "--expt-relaxed-constexpr",
            "-DTORCH_MHA_BUILD_LIBRARY",
            "--threads",
            "2",
        ] + shlex.split(os.environ.get("NVCC_FLAGS", ""))
        extension = CUDAExtension
    else:
        extension = CppExtension
    return extension(
        name="torch_mha._C",
        sources=sources(with_cuda),
        include_dirs=[CSRC],
        define_macros=define_macros,
        extra_compile_args=extra_compile_args,
    )


setup(
    name="torch_mha",
    version="0.1.0",
    description="Fused multi-head attention for PyTorch: a drop-in torch.nn.MultiheadAttention",
    packages=find_packages(exclude=("tests*", "benchmarks*")),
    package_data={"torch_mha": ["_build_info.json"]},
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.9",
    zip_safe=False,
)
