import os
import sys
from typing import Union

import pytest
import torch

# Make tests/ importable as a plain directory (reference.py lives here).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The shared helpers of the core-op tests assert like tests do: have pytest rewrite their asserts
# (it does so for test_*.py and conftest.py only), so a failure reports its operands.
pytest.register_assert_rewrite("attention_testing")

import torch_mha  # noqa: E402  (loads the operator library)

# ---------------------------------------------------------------------------------------------
# Devices
#
# Tests that take the `device` fixture run once per device: "cpu" always, "cuda" only where a
# GPU is present and torch_mha was built with its CUDA kernels. Without them the CUDA cases are
# still collected and reported as skipped with the reason, so a CPU-only run shows what it did
# not cover; on a GPU machine the same tests run unchanged. Every CUDA case carries the `cuda`
# marker (pyproject.toml), so `pytest -m cuda` selects the CUDA-only tests (tests/test_cuda.py)
# and `pytest -k cuda` the device-parametrized CUDA cases as well.

CUDA_AVAILABLE = torch.cuda.is_available()
CUDA_BUILT = torch_mha.cuda_version() >= 0
if not CUDA_AVAILABLE:
    CUDA_SKIP_REASON = "no CUDA GPU"
elif not CUDA_BUILT:
    CUDA_SKIP_REASON = (
        "torch_mha was built without its CUDA kernels (CPU-only build): rebuild with a CUDA "
        "toolkit (pip install --no-build-isolation -e .)"
    )
else:
    CUDA_SKIP_REASON = ""
HAS_CUDA = CUDA_AVAILABLE and CUDA_BUILT

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason=CUDA_SKIP_REASON or "no CUDA GPU")
CUDA_MARKS = [pytest.mark.cuda, requires_cuda]

# The devices the device fixture runs over.
DEVICE_PARAMS = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=CUDA_MARKS),
]

# Devices available to this process (older spelling; prefer the `device` fixture, which also
# reports the CUDA cases as skipped where there is no GPU).
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


@pytest.fixture(params=DEVICE_PARAMS)
def device(request) -> str:
    """The device a test runs on: "cpu", or "cuda" (skipped without a GPU)."""
    return request.param


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Every test starts from the same seed; thread-count changes never leak between tests."""
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Device-aware tolerances and limits

DeviceLike = Union[str, torch.device]

# The CPU float32 tolerances of the suite were set from CPU measurements (largest error about
# 6e-7 against an allowed 1e-5). The CUDA kernels compute in float32 too, with the same
# algorithm, but sum in another order: sequential per-lane dot products over the head dim, key
# tiles of 32 instead of the CPU's vectorised 64 x 128 blocks, and the device's correctly
# rounded expf instead of PyTorch's 20-ulp CPU exp. The error has the same order of magnitude,
# but its distribution has not been measured on a GPU from this project yet, so float32
# comparisons on CUDA get twice the CPU tolerance (still two orders of magnitude below what a
# wrong mask, scale or index produces). float64 accumulates in float64 on both devices and keeps
# the CPU tolerances; bfloat16/float16 tolerances are dominated by the final rounding to the
# storage dtype, which is the same on both devices, and are not widened.
CUDA_FLOAT32_TOLERANCE_FACTOR = 2.0


def tolerance_factor(device: DeviceLike, dtype: torch.dtype) -> float:
    """Factor applied to a float32 tolerance for results computed on `device`."""
    if torch.device(device).type == "cuda" and dtype == torch.float32:
        return CUDA_FLOAT32_TOLERANCE_FACTOR
    return 1.0


def cuda_shared_memory_bytes(dtype: torch.dtype, head_dim: int, value_dim: int) -> int:
    """Dynamic shared memory per thread block of the largest torch_mha CUDA kernel (the dK/dV
    kernel, csrc/cuda/attention_cuda.cu): 32 * (2 (E + 1) + 2 (Ev + 1) + 2 * 33 + 3) values of
    the accumulate type (float64 for float64 inputs, else float32)."""
    acc_bytes = 8 if dtype == torch.float64 else 4
    return 32 * (2 * (head_dim + 1) + 2 * (value_dim + 1) + 2 * 33 + 3) * acc_bytes


def require_shared_memory(
    device: DeviceLike, dtype: torch.dtype, head_dim: int, value_dim: int
) -> None:
    """Skips the test on a GPU whose opt-in shared memory per block is too small for these head
    dims (e.g. float64 with head_dim 128 needs ~150 KB: A100/H100 have 163/227 KB, consumer
    GPUs ~100 KB). There the kernels raise a clear RuntimeError instead, which test_cuda.py
    checks. No-op on the CPU."""
    device = torch.device(device)
    if device.type != "cuda" or not HAS_CUDA:
        return
    props = torch.cuda.get_device_properties(device)
    limit = getattr(props, "shared_memory_per_block_optin", None)
    needed = cuda_shared_memory_bytes(dtype, head_dim, value_dim)
    if limit is not None and needed > limit:
        pytest.skip(
            f"{props.name} allows {limit} bytes of shared memory per block; "
            f"{dtype} with head_dim {head_dim} / value_dim {value_dim} needs {needed}"
        )
