"""The CUDA kernels, run on the CPU: every kernel of csrc/cuda/attention_kernels.cuh compiled as
host C++ and run by the fiber runtime of tests/cuda_on_cpu/ (one fiber per CUDA thread, blocks
one after another, __syncthreads / __syncwarp / __shfl_xor_sync as fiber barriers, dynamic
shared memory of exactly the launch's size), built with AddressSanitizer and
UndefinedBehaviorSanitizer. `pytest -m cuda_on_cpu` selects these tests; docs/cuda.md ("The CPU
harness") describes the runtime.

The program (tests/cuda_on_cpu/main.cpp) runs the CUDA backend's own host code,
csrc/cuda/attention_launch.h, with a launcher that runs each kernel on fibers instead of a GPU:
the same argument checks, allocations, AttentionParams, dtype and head-dim dispatch, launch
sequence, grid sizes and shared-memory sizes as on a GPU. Python writes each problem's inputs,
the program runs the forward and then the backward on the forward's results, and every result
(output, softmax_stats, weights, grad_query, grad_key, grad_value, grad_mask, grad_sinks) is
compared with the CPU op on the same inputs. A few tests also compare with the float64 reference
(tests/reference.py). attention_with_kvcache runs through the op's own host code (kvcache.h) with
the CUDA forward; its output and the written caches are compared likewise.

The build goes to build/cuda-on-cpu and is incremental: the first build compiles the 72 kernel
instances (4 dtypes x 3 head dims x 6 kernels) with the sanitizers, about 100 CPU seconds (1 to
2 minutes on 2 cores, depending on the load); later sessions only rebuild what changed. The
self-tests of the runtime are a second, small program without LibTorch (cuda_on_cpu_selftest).
Skipped, with the reason, only where cmake, a C++ compiler or its sanitizer runtimes are
missing.

Schedules: every problem runs with the threads of a block in order (thread 0 first, each running
until it reaches a barrier). The test_schedules_* tests run problems that launch every kernel
again in reverse order and in three seeded random orders of the runnable threads (and of the
blocks):
the results must be bitwise identical to the in-order ones, since a race-free kernel computes
each value with the same operations whatever the interleaving, and shared memory starts as NaN
bytes, so a read before the write it should wait for shows up as NaN.

Tolerances (tolerance(), the same reasoning as tests/test_cuda.py):
* float64 against the CPU op: 1e-12 on outputs, weights and softmax_stats, 1e-10 x the largest
  gradient on gradients. Both accumulate in float64 and differ by summation order (~1e-15).
* float32 against the CPU op: 2e-5, and 2e-5 x the largest gradient. Each backend is within 1e-5
  of the exact result (tests/test_ops_*.py hold the CPU op to that against the float64
  reference); the CUDA kernels sum in another order (per-lane dot products, tiles of 32).
* float16 / bfloat16 against the CPU op run in float32 on the same (rounded) inputs upcast:
  the kernels compute in float32 and round each output once (2u relative, u the unit roundoff of
  the dtype, plus twice the float32 absolute error); gradients 8u x the largest gradient, as
  delta = sum(dO * O) uses the rounded output. softmax_stats and grad_mask stay float32.
"""

from __future__ import annotations

import math
import os
import re
import select
import shutil
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch
from attention_testing import UNIT_ROUNDOFF, dtype_id
from conftest import cuda_shared_memory_bytes
from reference import reference_attention_variants
from test_cuda import ATTN_MASK_SHAPES, LAYOUTS, _attn_mask_view, _layout_views
from test_sanitizers import missing_requirement, sanitizer_reports
from torch import Tensor

import torch_mha  # noqa: F401  (loads the operator library: the CPU op is the reference)

pytestmark = pytest.mark.cuda_on_cpu

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "tests" / "cuda_on_cpu"
# Persistent, so that later sessions rebuild only what changed; build/ is ignored by git.
BUILD = REPO / "build" / "cuda-on-cpu"
PROGRAM = BUILD / "cuda_on_cpu"
SELFTEST_PROGRAM = BUILD / "cuda_on_cpu_selftest"
BUILD_TIMEOUT_S = 3600  # a cold build on a slow machine; about 3 minutes on 2 cores
RUN_TIMEOUT_S = 600

OPS = torch.ops.torch_mha
LOW_PRECISION = (torch.float16, torch.bfloat16)
ALL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# The harness stops a faulty kernel with this status (kFailureExitCode in cuda_on_cpu.cpp) and
# AddressSanitizer / UndefinedBehaviorSanitizer with theirs (the options below).
HARNESS_FAILURE = 86
ASAN_FAILURE = 23
UBSAN_FAILURE = 24
# As scripts/sanitize.sh, except detect_stack_use_after_return: every fiber would get its own
# fake stack (twice the run time, +350 MB), and kernels never hand out addresses of locals.
SANITIZER_ENV = {
    "ASAN_OPTIONS": "halt_on_error=1:abort_on_error=0:exitcode=23:detect_leaks="
    + os.environ.get("SANITIZE_DETECT_LEAKS", "1")
    + ":strict_string_checks=1:detect_stack_use_after_return=0:check_initialization_order=1",
    "UBSAN_OPTIONS": "halt_on_error=1:abort_on_error=0:exitcode=24:print_stacktrace=1",
}
# The smallest opt-in shared memory per block of the architectures CI compiles for (sm_80,
# A100: 163 KiB; sm_90 has 227 KiB): no launch may need more.
SHARED_MEMORY_LIMIT = 163 * 1024


# ---------------------------------------------------------------------------------------------
# Building and running the harness


def _run(command: List[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited with {result.returncode}\n"
            f"stdout:\n{result.stdout[-6000:]}\nstderr:\n{result.stderr[-6000:]}"
        )
    return result


def build_harness() -> Path:
    """Configures and builds tests/cuda_on_cpu into build/cuda-on-cpu (incremental): the
    harness (PROGRAM) and its self-tests (SELFTEST_PROGRAM)."""
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run(
        [
            "cmake",
            "-S",
            str(SOURCE),
            "-B",
            str(BUILD),
            *generator,
            # Torch_DIR too: a cached one from another environment's torch would win otherwise.
            "-DCMAKE_PREFIX_PATH=" + torch.utils.cmake_prefix_path,
            "-DTorch_DIR=" + str(Path(torch.utils.cmake_prefix_path) / "Torch"),
        ],
        BUILD_TIMEOUT_S,
    )
    jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
    _run(["cmake", "--build", str(BUILD), "--parallel", jobs], BUILD_TIMEOUT_S)
    return PROGRAM


def run_program(program: Path, *args: str) -> subprocess.CompletedProcess:
    """Runs a program of the harness once, with the sanitizer options."""
    env = dict(os.environ, **SANITIZER_ENV)
    return subprocess.run(
        [str(program), *args], capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT_S
    )


class Harness:
    """The built program, and one `cuda_on_cpu serve` process that runs the problems of the
    session (LibTorch loads once: that saves about a second per test). A process stopped by the
    harness or a sanitizer is replaced for the next request; the session's last process is
    closed at the end, and what LeakSanitizer says then is checked."""

    def __init__(self, program: Path) -> None:
        self.program = program
        self._process: Optional[subprocess.Popen] = None
        self._stderr = tempfile.TemporaryFile(mode="w+")

    def request(self, *args: str) -> subprocess.CompletedProcess:
        """What `cuda_on_cpu ARGS...` would return, from the serving process."""
        if self._process is None:
            self._process = subprocess.Popen(
                [str(self.program), "serve"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                bufsize=0,
                env=dict(os.environ, **SANITIZER_ENV),
            )
        process = self._process
        errors_from = self._stderr.seek(0, os.SEEK_END)
        command = (" ".join(args) + "\n").encode()
        while command:
            command = command[process.stdin.write(command) :]
        stdout, status = self._read_until_status(process)
        if status is None:  # the process ended: a harness failure or a sanitizer report
            self._process = None
            status = process.wait()
        self._stderr.seek(errors_from)
        return subprocess.CompletedProcess(args, status, stdout, self._stderr.read())

    @staticmethod
    def _read_until_status(process: subprocess.Popen) -> Tuple[str, Optional[int]]:
        """The standard output up to the status line, and the status; None if the process
        ended first."""
        deadline = time.monotonic() + RUN_TIMEOUT_S
        output = b""
        fd = process.stdout.fileno()
        while True:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                process.kill()
                raise AssertionError(
                    f"the harness did not answer in {RUN_TIMEOUT_S} s:\n{output.decode()[-4000:]}"
                )
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return output.decode(), None
            output += chunk
            match = re.search(rb"^cuda_on_cpu: status (-?\d+)\n", output, re.MULTILINE)
            if match:
                return output[: match.start()].decode(), int(match.group(1))

    def close(self) -> str:
        """Ends the serving process; returns its output on the standard error after the last
        request (LeakSanitizer reports at exit)."""
        if self._process is None:
            return ""
        errors_from = self._stderr.seek(0, os.SEEK_END)
        self._process.stdin.close()
        status = self._process.wait(timeout=RUN_TIMEOUT_S)
        self._process = None
        self._stderr.seek(errors_from)
        errors = self._stderr.read()
        assert status == 0, f"the harness exited with {status} at the end:\n{errors[-8000:]}"
        return errors


@pytest.fixture(scope="session")
def harness():
    """The built harness (skipped where it cannot be built) and its serving process."""
    reason = missing_requirement()
    if reason is not None:
        pytest.skip(f"the CUDA-on-CPU harness needs cmake, a C++ compiler and ASan/UBSan: {reason}")
    served = Harness(build_harness())
    yield served
    errors = served.close()
    assert not sanitizer_reports(errors), errors[-8000:]


@dataclass
class Launch:
    kernel: str  # demangled, e.g. "void torch_mha::cuda::attention_forward_kernel<float, ...>"
    blocks: int
    threads: int
    shared_bytes: int


@dataclass
class Run:
    """One problem's results in the harness: schedule -> result name -> tensor."""

    results: Dict[str, Dict[str, Tensor]]
    launches: Dict[str, List[Launch]]  # schedule -> launches in order


LAUNCH_LINE = re.compile(
    r"^launch (\S+) \| (.+) \| blocks (\d+) \| threads (\d+) \| shared bytes (\d+)$"
)


@dataclass
class Problem:
    """The op's arguments: tensors under the names of AttentionForwardArgs (plus grad_output,
    grad_weights) and the other arguments in `options`."""

    tensors: Dict[str, Tensor]
    options: Dict[str, object] = field(default_factory=dict)
    name: str = ""

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors["query"].dtype

    @property
    def varlen(self) -> bool:
        return "cu_seqlens_q" in self.tensors

    @property
    def kvcache(self) -> bool:
        return "k_cache" in self.tensors

    def option(self, name: str, default=None):
        return self.options.get(name, default)


# Tensor bundles, the harness's file format (main.cpp): the magic line, int64 count, then per
# tensor name, c10::ScalarType code, dim, sizes, strides, storage offset, storage element count
# (int64 each, little endian) and the storage's bytes.
BUNDLE_MAGIC = b"CUDAONCPU-BUNDLE-1\n"
SCALAR_TYPE_CODES = {
    torch.uint8: 0,
    torch.int32: 3,
    torch.int64: 4,
    torch.float16: 5,
    torch.float32: 6,
    torch.float64: 7,
    torch.bool: 11,
    torch.bfloat16: 15,
}
DTYPES_BY_CODE = {code: dtype for dtype, code in SCALAR_TYPE_CODES.items()}


def write_bundle(tensors: Dict[str, Tensor], path: Path) -> None:
    """Each tensor as its whole storage plus (sizes, strides, offset), so that the harness sees
    the same strided views (main.cpp rebuilds them with as_strided)."""
    parts = [BUNDLE_MAGIC, struct.pack("<q", len(tensors))]
    for name, t in tensors.items():
        t = t.detach()
        storage = t.untyped_storage()
        raw = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (storage.nbytes(),), (1,))
        encoded = name.encode()
        parts += [struct.pack("<q", len(encoded)), encoded]
        header = [SCALAR_TYPE_CODES[t.dtype], t.dim(), *t.shape, *t.stride(), t.storage_offset()]
        header.append(storage.nbytes() // t.element_size())
        parts += [struct.pack(f"<{len(header)}q", *header), raw.numpy().tobytes()]
    path.write_bytes(b"".join(parts))


def read_bundle(path: Path) -> Dict[str, Tensor]:
    data = path.read_bytes()
    assert data.startswith(BUNDLE_MAGIC), path
    at = len(BUNDLE_MAGIC)

    def ints(count: int) -> Tuple[int, ...]:
        nonlocal at
        values = struct.unpack_from(f"<{count}q", data, at)
        at += 8 * count
        return values

    tensors = {}
    for _ in range(ints(1)[0]):
        (length,) = ints(1)
        name = data[at : at + length].decode()
        at += length
        code, dim = ints(2)
        geometry = ints(2 * dim + 2)
        dtype = DTYPES_BY_CODE[code]
        raw = bytearray(data[at : at + geometry[-1] * dtype.itemsize])
        at += len(raw)
        flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        tensors[name] = flat.as_strided(geometry[:dim], geometry[dim : 2 * dim], geometry[2 * dim])
    return tensors


def save_problem(problem: Problem, path: Path) -> None:
    """The problem's tensors, and its options as 0-d tensors."""
    bundle = dict(problem.tensors)
    for name, value in problem.options.items():
        if value is None:
            continue
        if isinstance(value, bool):
            bundle[name] = torch.tensor(value)
        elif isinstance(value, int):
            bundle[name] = torch.tensor(value, dtype=torch.long)
        else:
            bundle[name] = torch.tensor(float(value), dtype=torch.float64)
    write_bundle(bundle, path)


def run_harness(
    harness: Harness, problems: Sequence[Problem], schedules: Sequence[str] = ("inorder",)
) -> List[Run]:
    """Runs every problem under every schedule; fails on a non-zero status or any sanitizer
    report."""
    with tempfile.TemporaryDirectory() as tmp:
        pairs = []
        for index, problem in enumerate(problems):
            save_problem(problem, Path(tmp) / f"in{index}")
            pairs.append(f"{tmp}/in{index}={tmp}/out{index}")
        result = harness.request("run", ",".join(schedules), *pairs)
        output = result.stdout + result.stderr
        assert result.returncode == 0 and not sanitizer_reports(output), (
            f"the harness exited with {result.returncode}:\n{output[-8000:]}"
        )
        runs = []
        for index in range(len(problems)):
            results: Dict[str, Dict[str, Tensor]] = {s: {} for s in schedules}
            for key, value in read_bundle(Path(tmp) / f"out{index}").items():
                schedule, name = key.split("/")
                results[schedule][name] = value
            runs.append(Run(results, {s: [] for s in schedules}))
    index = -1
    for line in result.stdout.splitlines():
        if line.startswith("problem "):
            index += 1
        match = LAUNCH_LINE.match(line)
        if match:
            schedule, kernel, blocks, threads, shared = match.groups()
            runs[index].launches[schedule].append(
                Launch(kernel, int(blocks), int(threads), int(shared))
            )
    return runs


# ---------------------------------------------------------------------------------------------
# The CPU op on the same problem


def _upcast(t: Optional[Tensor]) -> Optional[Tensor]:
    return t.float() if t is not None and t.dtype in LOW_PRECISION else t


def run_cpu(problem: Problem, upcast: bool = False) -> Dict[str, Tensor]:
    """The CPU op's forward, then its backward on the forward's results (as the harness does);
    with `upcast`, float16/bfloat16 tensors are converted to float32 first."""
    t = {name: (_upcast(v) if upcast else v) for name, v in problem.tensors.items()}
    o = problem.option
    common = dict(
        scale=o("scale"),
        dropout_p=o("dropout_p", 0.0),
        dropout_seed=t.get("dropout_seed"),
        window_left=o("window_left", -1),
        window_right=o("window_right", -1),
        alibi_slopes=t.get("alibi_slopes"),
        softcap=o("softcap", 0.0),
        sinks=t.get("sinks"),
    )
    if problem.kvcache:
        # The op writes the new entries into the caches: give it copies, return them.
        k_cache, v_cache = t["k_cache"].clone(), t["v_cache"].clone()
        out = OPS.attention_with_kvcache(
            t["query"],
            k_cache,
            v_cache,
            t["cache_seqlens"],
            t.get("key"),
            t.get("value"),
            o("scale"),
            o("window_left", -1),
            o("window_right", 0),
            t.get("alibi_slopes"),
            o("softcap", 0.0),
            t.get("sinks"),
        )
        return {"output": out, "k_cache": k_cache, "v_cache": v_cache}
    q, k, v = t["query"], t["key"], t["value"]
    results: Dict[str, Tensor] = {}
    if problem.varlen:
        lengths = (t["cu_seqlens_q"], t["cu_seqlens_k"], o("max_seqlen_q"), o("max_seqlen_k"))
        out, stats = OPS.varlen_attention_forward(
            q, k, v, *lengths, is_causal=o("is_causal", False), **common
        )
        # What the harness returns for the outputs the varlen ops do not have.
        results.update(output=out, softmax_stats=stats, weights=torch.empty(0, dtype=q.dtype))
        if "grad_output" in t:
            c = common
            gq, gk, gv, gs = OPS.varlen_attention_backward(
                t["grad_output"],
                q,
                k,
                v,
                out,
                stats,
                *lengths,
                c["scale"],
                c["dropout_p"],
                c["dropout_seed"],
                o("is_causal", False),
                c["window_left"],
                c["window_right"],
                c["alibi_slopes"],
                c["softcap"],
                c["sinks"],
            )
            results.update(grad_query=gq, grad_key=gk, grad_value=gv)
            results["grad_mask"] = torch.empty(0, dtype=stats.dtype)
            results["grad_sinks"] = gs
        return results
    masks = (t.get("attn_mask"), t.get("key_padding_mask"), o("is_causal", False))
    average = o("average_weights", False)
    out, stats, weights = OPS.attention_forward(
        q,
        k,
        v,
        *masks,
        need_weights=o("need_weights", False),
        average_weights=average,
        **common,
    )
    results.update(output=out, softmax_stats=stats, weights=weights)
    if "grad_output" in t:
        c = common
        grads = OPS.attention_backward(
            t["grad_output"],
            q,
            k,
            v,
            out,
            stats,
            *masks,
            c["scale"],
            c["dropout_p"],
            c["dropout_seed"],
            t.get("grad_weights"),
            average,
            o("compute_mask_grad", False),
            c["window_left"],
            c["window_right"],
            c["alibi_slopes"],
            c["softcap"],
            c["sinks"],
        )
        names = ("grad_query", "grad_key", "grad_value", "grad_mask", "grad_sinks")
        results.update(zip(names, grads))
    return results


def gradient_scale(expected: Dict[str, Tensor]) -> float:
    """The largest finite gradient of the problem (at least 1e-3). Rounding errors of every
    gradient are relative to the terms that enter it, which are of that size: a gradient that is
    zero in exact arithmetic (a query that sees one key: dS = P (dP - delta) = 0) comes out as
    rounding noise of that size, on the CPU as here."""
    largest = 1e-3
    for name, value in expected.items():
        finite = value[torch.isfinite(value)] if name.startswith("grad_") else value[:0]
        if finite.numel():
            largest = max(largest, float(finite.abs().max()))
    return largest


def tolerance(name: str, dtype: torch.dtype, grad_scale: float = 1.0) -> Tuple[float, float]:
    """(atol, rtol) for result `name` of a `dtype` problem whose gradients are of size
    grad_scale (gradient_scale); see the module docstring."""
    if name in ("k_cache", "v_cache"):  # copies of the new entries
        return 0.0, 0.0
    grad = name.startswith("grad_")
    scale = grad_scale if grad else 1.0
    if dtype == torch.float64:
        return (1e-10 * scale, 1e-10) if grad else (1e-12, 1e-12)
    if dtype == torch.float32:
        return (2e-5 * scale, 2e-5) if grad else (2e-5, 2e-5)
    u = UNIT_ROUNDOFF[dtype]
    if grad:
        return 8 * u * scale, 4 * u
    if name == "softmax_stats":  # float32, never rounded to the input dtype
        return 2e-5, 2e-5
    return 4e-5, 2 * u


def assert_agree(actual: Dict[str, Tensor], problem: Problem, what: str = "") -> None:
    """The harness's results against the CPU op's: same dtype for float32/float64, float32 on
    the upcast inputs for float16/bfloat16 (the kernels compute in float32)."""
    low = problem.dtype in LOW_PRECISION
    expected = run_cpu(problem, upcast=low)
    same_dtype = run_cpu(problem) if low else expected
    assert actual.keys() == expected.keys(), (sorted(actual), sorted(expected))
    grad_scale = gradient_scale(expected)
    for name, exp in expected.items():
        act = actual[name]
        label = f"{problem.name}{what} {name}"
        assert act.shape == exp.shape, (label, act.shape, exp.shape)
        assert act.dtype == same_dtype[name].dtype, (label, act.dtype, same_dtype[name].dtype)
        assert act.stride() == same_dtype[name].stride() or act.numel() <= 1, label
        atol, rtol = tolerance(name, problem.dtype, grad_scale)
        torch.testing.assert_close(
            act.double(),
            exp.double(),
            atol=atol,
            rtol=rtol,
            equal_nan=name in ("k_cache", "v_cache"),  # entries past the sequences' ends
            msg=lambda m, label=label: f"{label}: {m}",
        )


def bitwise_equal(a: Tensor, b: Tensor) -> bool:
    """Same shape, dtype and bits (NaN included)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def check(
    harness: Harness, problems: Sequence[Problem], schedules: Sequence[str] = ("inorder",)
) -> List[Run]:
    """Runs the problems in the harness and compares every schedule's results with the CPU op;
    results of later schedules must equal the first's bit for bit."""
    runs = run_harness(harness, problems, schedules)
    for problem, run in zip(problems, runs):
        first = run.results[schedules[0]]
        assert_agree(first, problem)
        for schedule in schedules[1:]:
            for name, value in run.results[schedule].items():
                assert bitwise_equal(value, first[name]), (
                    f"{problem.name}: {name} under schedule {schedule} differs from "
                    f"{schedules[0]} by {(value.double() - first[name].double()).abs().max()}"
                )
    return runs


# ---------------------------------------------------------------------------------------------
# Problems


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dense_problem(
    shape: Tuple[int, int, int, int, int, int],
    dtype: torch.dtype = torch.float32,
    *,
    kv_heads: Optional[int] = None,
    layout: str = "contiguous",
    attn_mask: Optional[Tuple[str, str]] = None,
    kpm: Optional[str] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    seed: int = 0,
    need_weights: bool = True,
    average: bool = False,
    window: Tuple[int, int] = (-1, -1),
    alibi: Optional[str] = None,
    softcap: float = 0.0,
    sinks: Optional[torch.dtype] = None,
    backward: bool = True,
    grad_weights: bool = True,
    mask_grad: bool = False,
    values_seed: int = 20240611,
    name: str = "",
) -> Problem:
    """A dense problem (N, H, L, S, E, Ev). attn_mask = (kind, shape name of test_cuda's
    ATTN_MASK_SHAPES) with kind "bool", "float" (the query's dtype) or "float32"; kpm "bool",
    "bool_strided", "float" or "float_transposed"; alibi "heads" or "batch_heads"; sinks: their
    dtype. With backward, grad_output (and grad_weights if need_weights and grad_weights) are
    drawn too."""
    n, h, l, s, e, ev = shape
    gen = _generator(values_seed)

    def draw(*size: int, dtype: torch.dtype = dtype) -> Tensor:
        return torch.randn(*size, generator=gen, dtype=torch.float64).to(dtype)

    def bools(*size: int) -> Tensor:
        return torch.rand(*size, generator=gen) < 0.3

    if kv_heads is None:
        q, k, v = _layout_views(layout, shape, draw)
    else:
        assert layout == "contiguous"
        q, k, v = draw(n, h, l, e), draw(n, kv_heads, s, e), draw(n, kv_heads, s, ev)
    tensors = {"query": q, "key": k, "value": v}
    if attn_mask is not None:
        kind, shape_name = attn_mask
        if kind == "bool":
            make: Callable[..., Tensor] = bools
        else:
            mask_dtype = torch.float32 if kind == "float32" else dtype
            make = lambda *size: draw(*size, dtype=mask_dtype)  # noqa: E731
        tensors["attn_mask"] = _attn_mask_view(shape_name, n, h, l, s, make)
    if kpm == "bool":
        tensors["key_padding_mask"] = bools(n, s)
    elif kpm == "bool_strided":
        tensors["key_padding_mask"] = bools(n, 3 * s)[:, ::3]
    elif kpm == "float":
        tensors["key_padding_mask"] = draw(n, s)
    elif kpm == "float_transposed":
        tensors["key_padding_mask"] = draw(s, n).t()
    else:
        assert kpm is None, kpm
    if dropout_p > 0:
        tensors["dropout_seed"] = torch.tensor([seed], dtype=torch.long)
    if alibi == "heads":
        tensors["alibi_slopes"] = torch.tensor([2.0 ** -(i + 1) for i in range(h)])
    elif alibi == "batch_heads":
        tensors["alibi_slopes"] = torch.rand(n, h, generator=gen) * 0.5
    if sinks is not None:
        tensors["sinks"] = draw(h, dtype=sinks)
    if backward:
        tensors["grad_output"] = draw(n, h, l, ev)
        if need_weights and grad_weights:
            tensors["grad_weights"] = draw(n, l, s) if average else draw(n, h, l, s)
    options = dict(
        is_causal=is_causal,
        scale=scale,
        dropout_p=dropout_p,
        need_weights=need_weights,
        average_weights=average,
        window_left=window[0],
        window_right=window[1],
        softcap=softcap,
        compute_mask_grad=mask_grad,
    )
    if not name:
        name = f"N{n}H{h}-L{l}-S{s}-E{e}-Ev{ev}-{dtype_id(dtype)}"
    return Problem(tensors, options, name)


def varlen_problem(
    seqlens_q: Sequence[int],
    seqlens_k: Sequence[int],
    dtype: torch.dtype = torch.float32,
    *,
    heads: int = 2,
    kv_heads: Optional[int] = None,
    e: int = 16,
    ev: int = 16,
    extra_q: int = 0,
    extra_k: int = 0,
    is_causal: bool = False,
    window: Tuple[int, int] = (-1, -1),
    alibi: Optional[str] = None,
    softcap: float = 0.0,
    sinks: Optional[torch.dtype] = None,
    dropout_p: float = 0.0,
    seed: int = 0,
    scale: Optional[float] = None,
    values_seed: int = 7,
    name: str = "",
) -> Problem:
    """A packed batch: sequence b has seqlens_q[b] queries and seqlens_k[b] keys; max_seqlen_q/k
    are the longest plus extra_q/extra_k (the op takes any upper bound)."""
    gen = _generator(values_seed)
    kv_heads = heads if kv_heads is None else kv_heads

    def draw(*size: int, dtype: torch.dtype = dtype) -> Tensor:
        return torch.randn(*size, generator=gen, dtype=torch.float64).to(dtype)

    def offsets(lengths: Sequence[int]) -> Tensor:
        return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)

    total_q, total_k = sum(seqlens_q), sum(seqlens_k)
    tensors = {
        "query": draw(total_q, heads, e),
        "key": draw(total_k, kv_heads, e),
        "value": draw(total_k, kv_heads, ev),
        "cu_seqlens_q": offsets(seqlens_q),
        "cu_seqlens_k": offsets(seqlens_k),
        "grad_output": draw(total_q, heads, ev),
    }
    batch = len(seqlens_q)
    if dropout_p > 0:
        tensors["dropout_seed"] = torch.tensor([seed], dtype=torch.long)
    if alibi == "heads":
        tensors["alibi_slopes"] = torch.tensor([2.0 ** -(i + 1) for i in range(heads)])
    elif alibi == "batch_heads":
        tensors["alibi_slopes"] = torch.rand(batch, heads, generator=gen) * 0.5
    if sinks is not None:
        tensors["sinks"] = draw(heads, dtype=sinks)
    options = dict(
        max_seqlen_q=max(seqlens_q) + extra_q,
        max_seqlen_k=max(seqlens_k) + extra_k,
        is_causal=is_causal,
        scale=scale,
        dropout_p=dropout_p,
        window_left=window[0],
        window_right=window[1],
        softcap=softcap,
    )
    name = name or f"varlen-q{list(seqlens_q)}-k{list(seqlens_k)}-{dtype_id(dtype)}"
    return Problem(tensors, options, name)


def kvcache_problem(
    lengths: Sequence[int],
    new_len: int,
    dtype: torch.dtype = torch.float32,
    *,
    heads: int = 4,
    kv_heads: int = 2,
    max_len: int = 160,
    e: int = 16,
    ev: int = 24,
    new_entries: bool = True,
    window: Tuple[int, int] = (-1, 0),
    alibi: bool = False,
    softcap: float = 0.0,
    sinks: Optional[torch.dtype] = None,
    scale: Optional[float] = None,
    values_seed: int = 13,
    name: str = "",
) -> Problem:
    """A call of attention_with_kvcache: sequence b has lengths[b] cached entries and new_len
    new queries (and new keys/values with new_entries, written at lengths[b]; without them the
    cache already holds them). Cache entries past each sequence's end are NaN, as unwritten
    memory may be: the kernels must not read them (key_lengths bounds every key loop)."""
    gen = _generator(values_seed)
    n = len(lengths)

    def draw(*size: int, dtype: torch.dtype = dtype) -> Tensor:
        return torch.randn(*size, generator=gen, dtype=torch.float64).to(dtype)

    k_cache, v_cache = draw(n, kv_heads, max_len, e), draw(n, kv_heads, max_len, ev)
    for b, length in enumerate(lengths):
        end = length + (0 if new_entries else new_len)
        k_cache[b, :, end:] = math.nan
        v_cache[b, :, end:] = math.nan
    tensors = {
        "query": draw(n, heads, new_len, e),
        "k_cache": k_cache,
        "v_cache": v_cache,
        "cache_seqlens": torch.tensor(lengths, dtype=torch.int32),
    }
    if new_entries:
        tensors["key"] = draw(n, kv_heads, new_len, e)
        tensors["value"] = draw(n, kv_heads, new_len, ev)
    if alibi:
        tensors["alibi_slopes"] = torch.rand(heads, generator=gen) * 0.2
    if sinks is not None:
        tensors["sinks"] = draw(heads, dtype=sinks)
    options = dict(scale=scale, window_left=window[0], window_right=window[1], softcap=softcap)
    name = name or f"kvcache-{list(lengths)}+{new_len}-{dtype_id(dtype)}"
    return Problem(tensors, options, name)


CPP_TYPE = {
    torch.float32: "float",
    torch.float64: "double",
    torch.float16: "c10::Half",
    torch.bfloat16: "c10::BFloat16",
}


def kernel_names(dtype: torch.dtype, dim: int) -> List[str]:
    """The six kernel instances a forward with weights and a backward with grad_weights launch,
    in launch order."""
    s = CPP_TYPE[dtype]
    a = "double" if dtype == torch.float64 else "float"
    return [
        f"attention_forward_kernel<{s}, {a}, {dim}>",
        f"attention_weights_kernel<{s}, {a}, {dim}>",
        f"softmax_delta_kernel<{s}, {a}>",
        f"weights_delta_kernel<{s}, {a}, {dim}>",
        f"attention_backward_dkdv_kernel<{s}, {a}, {dim}>",
        f"attention_backward_dq_kernel<{s}, {a}, {dim}>",
    ]


def launched(run: Run, schedule: str = "inorder") -> List[str]:
    return [launch.kernel for launch in run.launches[schedule]]


# =============================================================================================
# 1. The harness itself


def selftest(harness: Harness, name: str, schedule: str = "inorder") -> subprocess.CompletedProcess:
    """A self-test in a process of its own (the faulty ones end it)."""
    return run_program(SELFTEST_PROGRAM, name, schedule)


@pytest.mark.parametrize("schedule", ["inorder", "reverse", "random:0"])
def test_selftest_builtins_shuffles_and_atomics(harness: Harness, schedule: str) -> None:
    """threadIdx / blockIdx / blockDim / gridDim, warp sums through __shfl_xor_sync, exchanges
    of 8-byte values, __syncwarp and atomicAdd give what CUDA gives, under each schedule."""
    result = selftest(harness, "builtins", schedule)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 error(s), atomic total 204480: ok" in result.stdout


@pytest.mark.parametrize("schedule", ["inorder", "reverse", "random:0", "random:1"])
def test_selftest_missing_barrier_gives_wrong_results(harness: Harness, schedule: str) -> None:
    """Each thread writes its shared-memory element and reads its neighbour's: without a
    __syncthreads between, the read comes before the neighbour's write under every schedule
    (the NaN fill shows it); with one, every read is right."""
    result = selftest(harness, "neighbours_without_barrier", schedule)
    assert result.returncode == 0, result.stdout + result.stderr
    wrong = int(re.search(r"neighbours: (\d+) of 384 reads wrong", result.stdout).group(1))
    assert wrong > 0
    result = selftest(harness, "neighbours_with_barrier", schedule)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "neighbours: 0 of 384 reads wrong" in result.stdout


def test_selftest_barrier_reached_by_some_threads_aborts(harness: Harness) -> None:
    result = selftest(harness, "partial_barrier")
    assert result.returncode == HARNESS_FAILURE, result.stdout + result.stderr
    assert "kernel partial_barrier_kernel, block 0 of 2" in result.stderr
    assert "deadlock" in result.stderr
    assert re.search(
        r"__syncthreads at selftest\.cpp:\d+ reached by 64 of 128 threads of block 0",
        result.stderr,
    ), result.stderr
    assert "64 threads returned" in result.stderr


def test_selftest_two_different_barriers_abort(harness: Harness) -> None:
    result = selftest(harness, "divergent_barriers", "random:3")
    assert result.returncode == HARNESS_FAILURE, result.stdout + result.stderr
    assert "threads wait at two different barriers" in result.stderr
    assert result.stderr.count("__syncthreads at selftest.cpp:") == 2, result.stderr


def test_selftest_shuffle_reached_by_some_lanes_aborts(harness: Harness) -> None:
    result = selftest(harness, "partial_shuffle")
    assert result.returncode == HARNESS_FAILURE, result.stdout + result.stderr
    for warp in range(4):
        assert re.search(
            rf"__shfl_xor_sync at selftest\.cpp:\d+ reached by 16 of 32 lanes of warp {warp} "
            r"of block 0",
            result.stderr,
        ), result.stderr


def test_selftest_partial_warp_mask_is_refused(harness: Harness) -> None:
    result = selftest(harness, "partial_mask")
    assert result.returncode == HARNESS_FAILURE, result.stdout + result.stderr
    assert "with mask 0x0000ffff: the harness supports the full-warp mask" in result.stderr


def test_selftest_shared_memory_overflow_is_stopped_by_asan(harness: Harness) -> None:
    """One float past the launch's dynamic shared memory: AddressSanitizer stops the kernel."""
    result = selftest(harness, "shared_overflow")
    assert result.returncode == ASAN_FAILURE, result.stdout + result.stderr
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in result.stderr
    assert "in shared_overflow_kernel" in result.stderr
    assert "0 bytes to the right of 512-byte region" in result.stderr


def test_selftest_local_array_overflow_after_a_switch_is_stopped_by_asan(harness: Harness) -> None:
    """A write past a local array after a __syncthreads, on a fiber stack that was switched out
    and back in: its redzones survive the switches (ucontext's swapcontext would clear them)."""
    result = selftest(harness, "local_overflow")
    assert result.returncode == ASAN_FAILURE, result.stdout + result.stderr
    assert "ERROR: AddressSanitizer: stack-buffer-overflow" in result.stderr
    assert "in local_overflow_kernel" in result.stderr


def test_selftest_signed_overflow_is_stopped_by_ubsan(harness: Harness) -> None:
    result = selftest(harness, "signed_overflow")
    assert result.returncode == UBSAN_FAILURE, result.stdout + result.stderr
    assert "runtime error: signed integer overflow" in result.stderr
    assert "in signed_overflow_kernel" in result.stderr


# =============================================================================================
# 2. Every kernel instance: 4 dtypes x 3 head-dim instantiations x 6 kernels

# Head dims that select each instantiation (kDim = the smallest of 32, 64, 128 holding both),
# with value_dim != head_dim and lengths that are not multiples of the 32-wide tiles.
INSTANCE_SHAPES = {
    32: (2, 2, 45, 70, 16, 24),
    64: (1, 3, 33, 100, 40, 64),
    128: (2, 1, 70, 47, 128, 100),
}


@pytest.mark.parametrize("dim", sorted(INSTANCE_SHAPES))
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_every_kernel_instance(harness: Harness, dtype: torch.dtype, dim: int) -> None:
    """Forward, weights (per head, or averaged at kDim 64), softmax delta, weights delta, dK/dV
    and dQ of this (dtype, kDim): launched in that order, with exactly the dynamic shared memory
    conftest.cuda_shared_memory_bytes expects for the largest kernel; results as the CPU op's,
    and the forward as the float64 reference's."""
    shape = INSTANCE_SHAPES[dim]
    problem = dense_problem(shape, dtype, kpm="bool", average=dim == 64)
    (run,) = check(harness, [problem])
    names = launched(run)
    expected = kernel_names(dtype, dim)
    assert len(names) == len(expected), names
    for name, want in zip(names, expected):
        assert want in name, (name, want)
    for launch in run.launches["inorder"]:
        assert launch.threads == 128
        assert launch.shared_bytes <= SHARED_MEMORY_LIMIT, launch
    e, ev = shape[4], shape[5]
    dkdv = run.launches["inorder"][4]
    assert dkdv.shared_bytes == cuda_shared_memory_bytes(dtype, e, ev)
    # The forward against the float64 reference.
    t = problem.tensors
    kpm = t["key_padding_mask"]
    out, probs = reference_attention_variants(t["query"], t["key"], t["value"], None, kpm)
    result = run.results["inorder"]
    atol, rtol = tolerance("output", dtype)
    torch.testing.assert_close(result["output"].double(), out, atol=atol, rtol=rtol)
    weights = probs.mean(1) if dim == 64 else probs
    torch.testing.assert_close(result["weights"].double(), weights, atol=atol, rtol=rtol)


# =============================================================================================
# 3. Masks


@pytest.mark.parametrize(
    "kind,dtype",
    [
        ("bool", torch.float32),
        ("float", torch.float64),
        ("float", torch.bfloat16),
        ("float", torch.float16),
        ("float32", torch.float16),
    ],
    ids=lambda x: x if isinstance(x, str) else dtype_id(x),
)
def test_attn_mask_every_broadcast_shape(harness: Harness, kind: str, dtype: torch.dtype) -> None:
    """Every attn_mask broadcast shape and layout (stride-0 expanded, transposed, sliced) of this
    kind, read in place through MaskView; float masks also return their gradient (dS). Every mask
    dtype the kernels read: bool, float64, bfloat16, float16 and float32 (with float16 inputs)."""
    problems = [
        dense_problem(
            (2, 3, 33, 40, 17, 17),
            dtype,
            attn_mask=(kind, shape_name),
            mask_grad=kind != "bool",
            name=shape_name,
        )
        for shape_name in ATTN_MASK_SHAPES
    ]
    check(harness, problems)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=dtype_id)
def test_key_padding_masks(harness: Harness, dtype: torch.dtype) -> None:
    """Every key_padding_mask kind, with a bool attn_mask, per-head and averaged weights."""
    problems = [
        dense_problem(
            (3, 2, 40, 65, 32, 17),
            dtype,
            kpm=kpm,
            attn_mask=("bool", "LS"),
            average=average,
            name=f"{kpm}-{'averaged' if average else 'per_head'}",
        )
        for kpm in ("bool", "bool_strided", "float", "float_transposed")
        for average in (False, True)
    ]
    check(harness, problems)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_causal(harness: Harness, dtype: torch.dtype) -> None:
    """Top-left causal with L < S, L == S and L > S (the forward and dQ skip key tiles past the
    diagonal, dK/dV the query tiles before it), with and without masks."""
    problems = [
        dense_problem(
            (2, 2, l, s, 16, 24),
            dtype,
            is_causal=True,
            name=f"L{l}-S{s}-{masks}",
            **(dict(attn_mask=("float", "LS"), kpm="float") if masks else {}),
        )
        for l, s in [(31, 65), (65, 65), (200, 33), (1, 200), (64, 96)]
        for masks in ("no_masks", "masks")
    ]
    check(harness, problems)


def _fully_masked_problem(case: str, dtype: torch.dtype) -> Tuple[Problem, Tensor]:
    """A problem whose bool attn_mask (N, H, L, S), with causal for causal_first_key, leaves some
    rows without a visible key; returns it with those rows (N, H, L)."""
    n, h, l, s = 2, 2, 65, 70
    problem = dense_problem((n, h, l, s, 16, 16), dtype, is_causal=case == "causal_first_key")
    mask = torch.rand(n, h, l, s, generator=_generator(5)) < 0.2
    if case == "rows_in_every_tile":  # rows in the first, second and last query tile
        mask[0, 1, [0, 31, 32, 33, l - 1]] = True
    elif case == "whole_batch":
        mask[1] = True
    elif case == "causal_first_key":  # with causal masking query 0 sees key 0 only
        mask[:, :, :, 0] = True
    hidden = mask.clone()
    if problem.option("is_causal"):
        hidden |= torch.ones(l, s, dtype=torch.bool).triu(1)
    problem.tensors["attn_mask"] = mask
    problem.name = case
    return problem, hidden.all(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("case", ["rows_in_every_tile", "whole_batch", "causal_first_key"])
def test_fully_masked_rows(harness: Harness, case: str, dtype: torch.dtype) -> None:
    """Rows without a visible key: zero output, softmax_stats exactly (+inf, 0), zero weights,
    zero dQ rows and finite gradients; everything else as on the CPU."""
    problem, fully = _fully_masked_problem(case, dtype)
    assert bool(fully.any())
    (run,) = check(harness, [problem])
    r = run.results["inorder"]
    assert torch.equal(r["output"][fully], torch.zeros_like(r["output"][fully]))
    assert torch.equal(r["weights"][fully], torch.zeros_like(r["weights"][fully]))
    inf_zero = torch.tensor([math.inf, 0.0]).expand(int(fully.sum()), 2)
    assert torch.equal(r["softmax_stats"][fully], inf_zero)
    assert bool(torch.isfinite(r["softmax_stats"][~fully]).all())
    for name in ("grad_query", "grad_key", "grad_value"):
        assert bool(torch.isfinite(r[name]).all()), name
    assert torch.equal(r["grad_query"][fully], torch.zeros_like(r["grad_query"][fully]))


def test_extreme_float_masks(harness: Harness) -> None:
    """Float masks holding -inf (single keys and whole rows), -1e9 and the dtype's lowest value
    (every score of such a row rounds to the same number: uniform probabilities, as in torch),
    in float32 and bfloat16, with their gradient."""
    problems = []
    for dtype in (torch.float32, torch.bfloat16):
        problem = dense_problem(
            (2, 2, 40, 70, 16, 16),
            dtype,
            attn_mask=("float", "NHLS"),
            mask_grad=True,
            name=f"extreme-{dtype_id(dtype)}",
        )
        mask = problem.tensors["attn_mask"]
        mask[0, 0, :, ::3] = -math.inf
        mask[0, 1, 5] = -math.inf
        mask[1, 0, 7] = -1e9
        mask[1, 1, 33] = torch.finfo(dtype).min
        mask[1, 1, 39, :20] = torch.finfo(dtype).min
        problems.append(problem)
    check(harness, problems)


def test_backward_input_layouts(harness: Harness) -> None:
    """The backward's own inputs as views: grad_output permuted, grad_weights expanded (stride 0,
    as autograd hands in the gradient of weights.sum()) and transposed; read through their
    strides (Strided4d, RowLayout)."""
    problems = []
    for average in (False, True):
        problem = dense_problem(
            (2, 3, 45, 50, 16, 24),
            kpm="bool",
            average=average,
            name="averaged" if average else "per_head",
        )
        t = problem.tensors
        n, h, l, ev = t["grad_output"].shape
        t["grad_output"] = torch.randn(l, n, h, ev, generator=_generator(8)).permute(1, 2, 0, 3)
        if average:
            t["grad_weights"] = torch.randn(50, 45, generator=_generator(9)).t().expand(n, 45, 50)
        else:
            t["grad_weights"] = torch.randn(1, h, 1, 50, generator=_generator(9)).expand(
                n, h, 45, 50
            )
        problems.append(problem)
    check(harness, problems)


# =============================================================================================
# 4. Dropout: the keep mask is bit-identical to the CPU op's


@pytest.mark.parametrize(
    "seed,dtype",
    [
        (0, torch.float32),
        (123456789, torch.float64),
        ((1 << 40) + 17, torch.bfloat16),
        (-3, torch.float32),
    ],
    ids=["seed0-float32", "seed_small-float64", "seed_above_2^32-bfloat16", "seed_negative"],
)
def test_dropout_keep_mask_matches_cpu(harness: Harness, seed: int, dtype: torch.dtype) -> None:
    """p = 0.1 and 0.9 per head (with masks and causal), 0.5 averaged: the zero pattern of
    the returned post-dropout weights is the CPU op's exactly, for the same seed; values and
    gradients (backward with grad_weights) agree within the tolerance. S = 131 is not a multiple
    of 4 (one Philox block per 4 columns) nor of the tiles."""
    problems = [
        dense_problem(
            (2, 3, 40, 131, 16, 8),
            dtype,
            dropout_p=p,
            seed=seed,
            average=average,
            name=f"p{p}-{'averaged' if average else 'per_head'}",
            **({} if average else dict(attn_mask=("float", "HLS"), kpm="bool", is_causal=True)),
        )
        for p, average in ((0.1, False), (0.5, True), (0.9, False))
    ]
    runs = check(harness, problems)
    for problem, run in zip(problems, runs):
        cpu_weights = run_cpu(problem)["weights"]
        weights = run.results["inorder"]["weights"]
        assert torch.equal(weights == 0, cpu_weights == 0), problem.name
        if not problem.option("average_weights"):
            visible = run_cpu(_without_dropout(problem))["weights"] > 0
            dropped = float((weights[visible] == 0).double().mean())
            assert abs(dropped - problem.option("dropout_p")) < 0.03, (problem.name, dropped)


def _without_dropout(problem: Problem) -> Problem:
    tensors = {k: v for k, v in problem.tensors.items() if k != "dropout_seed"}
    return Problem(tensors, dict(problem.options, dropout_p=0.0), problem.name)


# =============================================================================================
# 5. Weights, long rows, scale, layouts, empty problems, errors


def test_need_weights_only_adds_the_weights(harness: Harness) -> None:
    """With and without need_weights the output and softmax_stats come from the same forward
    kernel: bitwise equal; the weights kernel runs only when asked."""
    shape = (2, 2, 70, 90, 24, 24)
    problems = [
        dense_problem(shape, kpm="bool", need_weights=need, backward=False, name=str(need))
        for need in (False, True)
    ]
    without, with_weights = check(harness, problems)
    for name in ("output", "softmax_stats"):
        assert torch.equal(without.results["inorder"][name], with_weights.results["inorder"][name])
    assert [name.split("<")[0].split("::")[-1] for name in launched(without)] == [
        "attention_forward_kernel"
    ]
    assert len(launched(with_weights)) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_long_rows(harness: Harness, dtype: torch.dtype) -> None:
    """S = 300 and L = 150 (more than 4 tiles of 32 each way; not multiples of 32), with masks,
    per-head weights and their gradient; and causal with L > S."""
    problems = [
        dense_problem((1, 2, 150, 300, 32, 32), dtype, attn_mask=("float", "LS"), kpm="bool"),
        dense_problem((1, 2, 290, 170, 16, 16), dtype, is_causal=True, average=True),
    ]
    check(harness, problems)


def test_weights_gradient(harness: Harness) -> None:
    """grad_weights (per head and averaged, with dropout too): the weights-delta kernel adds
    sum_j dW W to delta, and dK/dV and dQ take dW into dP."""
    problems = [
        dense_problem(
            (2, 3, 40, 77, 16, 16),
            dtype,
            average=average,
            dropout_p=p,
            seed=11,
            name=f"{dtype_id(dtype)}-{'averaged' if average else 'per_head'}-p{p}",
        )
        for dtype in (torch.float32, torch.float64)
        for average in (False, True)
        for p in (0.0, 0.3)
    ]
    runs = check(harness, problems)
    for run in runs:
        assert any("weights_delta_kernel" in name for name in launched(run))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_mask_gradient(harness: Harness, dtype: torch.dtype) -> None:
    """compute_mask_grad: the dQ kernel writes dS (N, H, L, S), zero where a key is hidden;
    with softcap the masks are added after the cap, so their gradient is dS before the cap's
    slope; with causal and a window."""
    problems = [
        dense_problem(
            (2, 2, 45, 80, 16, 16),
            dtype,
            attn_mask=("float", "NHLS"),
            kpm="float",
            mask_grad=True,
            name="plain",
        ),
        dense_problem(
            (2, 2, 45, 80, 16, 16),
            dtype,
            attn_mask=("float", "HLS"),
            mask_grad=True,
            is_causal=True,
            window=(20, 3),
            softcap=3.0,
            dropout_p=0.2,
            seed=5,
            name="causal+window+softcap+dropout",
        ),
    ]
    check(harness, problems)


def test_custom_scale(harness: Harness) -> None:
    problems = [
        dense_problem((2, 2, 33, 65, 17, 17), attn_mask=("bool", "LS"), scale=x, name=str(x))
        for x in (0.0, 0.37, -1.5, 4.0)
    ]
    check(harness, problems)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_layouts(harness: Harness, dtype: torch.dtype) -> None:
    """Non-contiguous inputs (packed qkv slices, permuted, strided, stride 0): the host code
    reads rows through strides (and takes unit-stride copies where the last dimension is
    strided); the outputs have the CPU op's memory layout."""
    problems = [
        dense_problem((2, 3, 45, 45, 16, 16), dtype, layout=layout, kpm="bool", name=layout)
        for layout in LAYOUTS
    ]
    check(harness, problems)


def test_empty_problems(harness: Harness) -> None:
    """Empty batch, no heads, no queries, no keys (every row fully masked: zeros, stats (+inf, 0),
    zero dK/dV) and a packed batch of empty sequences: what the host code launches (or not) gives
    the CPU op's results."""
    problems = [
        dense_problem((0, 2, 5, 7, 8, 8), name="no_batch"),
        dense_problem((2, 0, 5, 7, 8, 8), name="no_heads"),
        dense_problem((2, 2, 0, 7, 8, 8), name="no_queries"),
        dense_problem((2, 2, 5, 0, 8, 8), average=True, name="no_keys"),
        dense_problem((2, 2, 5, 7, 0, 8), name="head_dim_0"),
        dense_problem((2, 2, 5, 7, 8, 0), name="value_dim_0"),
        dense_problem((1, 2, 32, 32, 8, 8), is_causal=True, name="one_full_tile"),
        varlen_problem([0, 0], [0, 3], name="varlen_empty_queries"),
        varlen_problem([4, 2], [0, 0], name="varlen_no_keys"),
    ]
    check(harness, problems)


def test_head_dim_above_128_is_refused_by_the_host_code(harness: Harness) -> None:
    problem = dense_problem((1, 2, 5, 6, 129, 64), need_weights=False)
    with tempfile.TemporaryDirectory() as tmp:
        save_problem(problem, Path(tmp) / "in")
        result = harness.request("run", "inorder", f"{tmp}/in={tmp}/out")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "torch_mha CUDA kernels support head_dim and value_dim up to 128" in result.stderr
    assert "launch " not in result.stdout


# =============================================================================================
# 6. Variants: grouped-query heads, windows, ALiBi, softcap, sinks, packed batches


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_grouped_query_heads(harness: Harness, dtype: torch.dtype) -> None:
    """H = 6 query heads on 1, 2, 3 and 6 key/value heads: dK/dV sum over the query heads of a
    group; with causal, key padding, averaged and per-head weights."""
    problems = [
        dense_problem(
            (2, 6, 37, 70, 16, 24),
            dtype,
            kv_heads=kv,
            is_causal=kv == 2,
            kpm="bool",
            average=kv == 3,
            name=f"Hkv{kv}",
        )
        for kv in (1, 2, 3, 6)
    ]
    check(harness, problems)


WINDOWS = [(16, 0), (5, 7), (-1, 0), (0, 0), (3, -1)]


@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"left{w[0]}_right{w[1]}")
def test_sliding_window(harness: Harness, window: Tuple[int, int]) -> None:
    """Windows aligned bottom-right ((-1, 0) is bottom-right causal), with L < S, L > S and
    causal on top; float32 and bfloat16. Key tiles (forward, dQ, weights delta) and query tiles
    (dK/dV) outside the window are skipped."""
    problems = [
        dense_problem(
            (1, 2, l, s, 16, 16),
            dtype,
            window=window,
            is_causal=causal,
            kpm="bool",
            name=f"L{l}-S{s}-causal{causal}-{dtype_id(dtype)}",
        )
        for (l, s, causal, dtype) in [
            (40, 110, False, torch.float32),
            (110, 40, False, torch.bfloat16),
            (70, 90, True, torch.float32),
        ]
    ]
    check(harness, problems)


@pytest.mark.parametrize("slopes", ["heads", "batch_heads"])
def test_alibi(harness: Harness, slopes: str) -> None:
    problems = [
        dense_problem(
            (2, 3, 50, 75, 16, 16),
            dtype,
            alibi=slopes,
            is_causal=causal,
            window=window,
            name=f"{dtype_id(dtype)}-causal{causal}-window{window}",
        )
        for dtype, causal, window in [
            (torch.float32, False, (-1, -1)),
            (torch.float64, True, (-1, -1)),
            (torch.bfloat16, False, (30, 10)),
        ]
    ]
    check(harness, problems)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_softcap(harness: Harness, dtype: torch.dtype) -> None:
    """softcap * tanh(s / softcap), differentiated through the cap's slope, with masks, ALiBi and
    averaged weights."""
    problems = [
        dense_problem((2, 2, 45, 66, 16, 16), dtype, softcap=2.0, name="plain"),
        dense_problem(
            (2, 2, 45, 66, 16, 16),
            dtype,
            softcap=0.5,
            attn_mask=("float", "LS"),
            kpm="bool",
            alibi="heads",
            average=True,
            name="masks+alibi",
        ),
    ]
    check(harness, problems)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_sinks(harness: Harness, dtype: torch.dtype) -> None:
    """Sink logits (of the query's dtype and float32) join each row's denominator; grad_sinks
    comes from delta. Rows without a visible key keep the sink alone: zero output."""
    problems = [
        dense_problem((2, 3, 40, 70, 16, 16), dtype, sinks=sinks, name=f"sinks_{dtype_id(sinks)}")
        for sinks in (dtype, torch.float32)
    ]
    masked, _ = _fully_masked_problem("rows_in_every_tile", dtype)
    masked.tensors["sinks"] = torch.randn(2, generator=_generator(3)).to(dtype)
    masked.name = "sinks+fully_masked_rows"
    problems.append(masked)
    runs = check(harness, problems)
    for run in runs:
        assert run.results["inorder"]["grad_sinks"].numel() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_varlen_packed_batches(harness: Harness, dtype: torch.dtype) -> None:
    """Packed variable-length batches: sequences of 0, 1, 31, 33 and 70 queries, key lengths
    that differ from the query lengths, max_seqlen above the longest; blocks past the end of a
    shorter sequence leave at once."""
    problems = [
        varlen_problem([1, 31, 70, 0, 33], [5, 40, 70, 3, 1], dtype, extra_q=7, name="plain"),
        varlen_problem(
            [33, 64, 2],
            [65, 20, 2],
            dtype,
            heads=4,
            kv_heads=2,
            e=40,
            ev=24,
            is_causal=True,
            name="gqa+causal",
        ),
    ]
    check(harness, problems)


def test_varlen_variants(harness: Harness) -> None:
    """Packed batches with a window, ALiBi, softcap, sinks and grouped-query heads, in bfloat16
    and float32; and with dropout (the keep mask indexes rows by max_seqlen_q, as on the CPU)."""
    problems = [
        varlen_problem(
            [50, 9, 70],
            [60, 9, 35],
            torch.bfloat16,
            heads=4,
            kv_heads=1,
            window=(10, 2),
            alibi="batch_heads",
            softcap=4.0,
            sinks=torch.float32,
            name="window+alibi+softcap+sinks+mqa",
        ),
        varlen_problem(
            [40, 17],
            [33, 50],
            torch.float32,
            is_causal=True,
            window=(-1, 0),
            sinks=torch.float32,
            alibi="heads",
            name="causal+bottom_right",
        ),
        varlen_problem(
            [45, 1, 66],
            [45, 80, 7],
            torch.float32,
            dropout_p=0.4,
            seed=99,
            extra_q=3,
            name="dropout",
        ),
    ]
    check(harness, problems)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_kvcache(harness: Harness, dtype: torch.dtype) -> None:
    """attention_with_kvcache, whose CUDA path is the op's host code (kvcache.h: checks, the
    in-place write) and the forward kernel with per-sequence key lengths: decoding (one new
    query; an empty cache, lengths across tile bounds, a sequence past 4 tiles), a prefill chunk
    longer than a tile (bottom-right causal), and a cache that already holds the new entries.
    Outputs as the CPU op's; the caches exactly so."""
    problems = [
        kvcache_problem([0, 31, 32, 150], 1, dtype, name="decode"),
        kvcache_problem([0, 33, 70], 40, dtype, kv_heads=1, name="prefill_chunk"),
        kvcache_problem([10, 64], 5, dtype, new_entries=False, name="without_new_entries"),
    ]
    runs = check(harness, problems)
    for run in runs:
        names = launched(run)
        assert len(names) == 1 and "attention_forward_kernel" in names[0], names


def test_kvcache_modifiers(harness: Harness) -> None:
    """The op's window (bottom-right), ALiBi, softcap, sinks and scale, and the largest head-dim
    instantiation, in float64."""
    problems = [
        kvcache_problem([20, 100], 3, torch.float64, window=(16, 0), name="window"),
        kvcache_problem(
            [45, 90],
            2,
            torch.float64,
            heads=2,
            kv_heads=2,
            e=100,
            ev=128,
            alibi=True,
            softcap=3.0,
            sinks=torch.float32,
            scale=0.2,
            name="alibi+softcap+sinks+scale-E100",
        ),
        kvcache_problem([7, 50], 9, torch.float64, window=(-1, -1), name="full_window"),
    ]
    check(harness, problems)


# =============================================================================================
# 7. Schedules: random and reverse orders give bitwise the in-order results

SCHEDULES = ("inorder", "reverse", "random:0", "random:1", "random:2")


def test_schedules_dense_every_kernel(harness: Harness) -> None:
    """All six kernels (weights and their gradient, masks, dropout, causal, sinks) under reverse
    and three random schedules: bitwise the in-order results."""
    problem = dense_problem(
        (2, 2, 70, 75, 40, 24),
        attn_mask=("float", "HLS"),
        kpm="bool",
        is_causal=True,
        dropout_p=0.2,
        seed=3,
        sinks=torch.float32,
        mask_grad=True,
    )
    (run,) = check(harness, [problem], SCHEDULES)
    for schedule in SCHEDULES:
        assert len(launched(run, schedule)) == 6, launched(run, schedule)


def test_schedules_averaged_weights_low_precision(harness: Harness) -> None:
    problem = dense_problem(
        (2, 3, 40, 100, 64, 64), torch.float16, average=True, kv_heads=1, window=(40, 5)
    )
    check(harness, [problem], SCHEDULES)


def test_schedules_varlen(harness: Harness) -> None:
    problem = varlen_problem(
        [33, 70, 5],
        [80, 31, 5],
        torch.float64,
        heads=4,
        kv_heads=2,
        e=100,
        ev=72,
        is_causal=True,
        alibi="heads",
        dropout_p=0.3,
        seed=4,
    )
    check(harness, [problem], SCHEDULES)


def test_schedules_kvcache(harness: Harness) -> None:
    problem = kvcache_problem([5, 40, 97], 6, torch.float32, window=(50, 0), sinks=torch.float32)
    check(harness, [problem], SCHEDULES)
