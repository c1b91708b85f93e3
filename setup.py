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
import platform
import re
import shlex
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor


def _resolve_cuda_home():
    """CUDA toolkit root. torch guesses the parent of `which nvcc`, which is wrong when `nvcc` on
    the PATH is a wrapper or link (e.g. /usr/local/bin/nvcc running /usr/local/cuda-13.0/bin/nvcc):
    ask nvcc where it lives instead."""
    if "CUDA_HOME" in os.environ or "CUDA_PATH" in os.environ or not shutil.which("nvcc"):
        return
    dryrun = subprocess.run(
        ["nvcc", "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True
    )
    for line in (dryrun.stdout + dryrun.stderr).splitlines():
        if line.startswith("#$ TOP="):
            os.environ["CUDA_HOME"] = os.path.realpath(line.split("=", 1)[1].strip())
            return


_resolve_cuda_home()  # before torch.utils.cpp_extension reads it

import torch  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
    include_paths,
)

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
DEBUG = os.environ.get("DEBUG", "0") == "1"
OPTIMIZE = ["-O0", "-g"] if DEBUG else ["-O3"]
# torch's headers are included as system headers (an -isystem directory overrides the same -I
# directory), so -Wall -Wextra report on our code only.
# The code is C++17; torch 2.14 and newer headers require C++20, so follow torch's minimum.
TORCH_VERSION = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
CXX_STANDARD = "c++20" if TORCH_VERSION >= (2, 14) else "c++17"
CXX_FLAGS = (
    OPTIMIZE
    + [f"-std={CXX_STANDARD}", "-Wall", "-Wextra", "-DTORCH_MHA_BUILD_LIBRARY"]
    + [f"-isystem{path}" for path in include_paths()]
)
# at::parallel_for is a header template: with PyTorch's OpenMP backend it expands to an
# `omp parallel` region in our own code, which runs on one thread unless compiled with OpenMP.
# Linking -fopenmp resolves to the libgomp.so.1 that torch itself loads.
OPENMP_FLAGS = ["-fopenmp"] if torch.backends.openmp.is_available() else []
CXX_FLAGS += OPENMP_FLAGS

# CPU kernels compiled once per vector ISA: the sources and each build's flags are listed in
# csrc/cpu/isa_builds.json, which CMakeLists.txt reads too (see csrc/cpu/attention_kernels.h).
with open(os.path.join(CSRC, "cpu", "isa_builds.json")) as _isa_file:
    ISA_BUILDS = json.load(_isa_file)
CPU_ISA_KERNELS = ISA_BUILDS["sources"]


def cpu_isa_flags():
    """{ISA name: compiler flags} for the builds this machine's architecture gets, DEFAULT first
    (objects are linked in this order)."""
    x86_64 = platform.machine().lower() in ("x86_64", "amd64")
    return {isa["name"]: isa["flags"] for isa in ISA_BUILDS["isas"] if x86_64 or not isa["x86_64"]}


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
    patterns = ["*.cpp", "cpu/*.cpp", "meta/*.cpp", "autograd/*.cpp", "autocast/*.cpp"]
    if with_cuda:
        patterns += ["cuda/*.cpp", "cuda/*.cu"]
    files = []
    for pattern in patterns:
        files += sorted(glob.glob(os.path.join(CSRC, pattern)))
    files = [os.path.relpath(f, ROOT) for f in files]
    return [f for f in files if f not in CPU_ISA_KERNELS]


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

    define_macros = [(f"TORCH_MHA_CPU_{isa}", None) for isa in cpu_isa_flags() if isa != "DEFAULT"]
    extra_compile_args = {"cxx": CXX_FLAGS}
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        major, minor = nvcc_version().split(".")
        define_macros += [
            ("WITH_CUDA", None),
            ("TORCH_MHA_CUDA_VERSION", str(int(major) * 1000 + int(minor) * 10)),
        ]
        extra_compile_args["nvcc"] = (
            OPTIMIZE
            + [
                f"-std={CXX_STANDARD}",
                "--expt-relaxed-constexpr",
                "-DTORCH_MHA_BUILD_LIBRARY",
                "--threads",
                "2",
            ]
            + shlex.split(os.environ.get("NVCC_FLAGS", ""))
        )
        extension = CUDAExtension
    else:
        extension = CppExtension
    return extension(
        name="torch_mha._C",
        sources=sources(with_cuda),
        include_dirs=[CSRC],
        define_macros=define_macros,
        extra_compile_args=extra_compile_args,
        extra_link_args=OPENMP_FLAGS,
    )


class BuildExtensionWithIsaKernels(BuildExtension):
    """BuildExtension plus the per-ISA CPU kernel objects, which need per-file flags.

    The ISA objects compile in a thread pool while BuildExtension compiles the other sources
    (ninja), and the link waits for them: on a machine with many cores the two stages overlap
    instead of the slowest ISA object and the slowest other source (the CUDA file) adding up."""

    def build_extensions(self):
        workers = max(1, int(os.environ.get("MAX_JOBS", os.cpu_count() or 1)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            isa_objects = self.compile_cpu_isa_kernels(pool)  # [(object path, future)]
            for ext in self.extensions:
                ext.extra_objects = [obj for obj, _ in isa_objects] + list(ext.extra_objects)
            link = self.compiler.link_shared_object

            def link_after_isa_kernels(*args, **kwargs):
                for _, future in isa_objects:
                    future.result()  # raises if that compile failed
                return link(*args, **kwargs)

            self.compiler.link_shared_object = link_after_isa_kernels
            try:
                super().build_extensions()
            finally:
                self.compiler.link_shared_object = link
            for _, future in isa_objects:  # an up-to-date library skips the link
                future.result()

    def compile_cpu_isa_kernels(self, pool):
        """Submits the stale per-ISA objects to `pool`; returns [(object path, future)] in link
        order (DEFAULT first)."""
        cxx = os.environ.get("CXX", "c++")
        abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
        includes = [f"-I{CSRC}"]
        headers = glob.glob(os.path.join(CSRC, "**", "*.h"), recursive=True)
        headers.append(os.path.join(CSRC, "cpu", "isa_builds.json"))
        out_dir = os.path.join(os.path.abspath(self.build_temp), "cpu_isa")
        os.makedirs(out_dir, exist_ok=True)
        jobs = []
        for source in CPU_ISA_KERNELS:
            newest_input = max(os.path.getmtime(f) for f in headers + [os.path.join(ROOT, source)])
            stem = os.path.splitext(os.path.basename(source))[0]
            for isa, flags in cpu_isa_flags().items():
                obj = os.path.join(out_dir, f"{stem}.{isa}.o")
                command = (
                    [cxx, "-fPIC", "-c", os.path.join(ROOT, source), "-o", obj]
                    + CXX_FLAGS
                    + [f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-DCPU_CAPABILITY={isa}"]
                    + ([f"-DCPU_CAPABILITY_{isa}"] if isa != "DEFAULT" else [])
                    + flags
                    + includes
                )
                # Rebuild when a source or header is newer, or when the flags changed.
                recorded = obj + ".cmd"
                same_command = os.path.exists(recorded) and open(recorded).read() == str(command)
                stale = (
                    not same_command
                    or not os.path.exists(obj)
                    or os.path.getmtime(obj) < newest_input
                )
                jobs.append((obj, command, stale))

        def run(job):
            obj, command, stale = job
            if stale:
                print(" ".join(command), flush=True)
                subprocess.run(command, check=True)
                with open(obj + ".cmd", "w") as f:
                    f.write(str(command))
            return obj

        return [(job[0], pool.submit(run, job)) for job in jobs]


setup(
    name="torch_mha",
    version="0.1.0",
    description="Fused multi-head attention for PyTorch: a drop-in torch.nn.MultiheadAttention",
    packages=find_packages(exclude=("tests*", "benchmarks*")),
    package_data={"torch_mha": ["_build_info.json"]},
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtensionWithIsaKernels},
    python_requires=">=3.9",
    zip_safe=False,
)
