"""Which kernel runs a call, and why: torch_mha.explain() (CUDA) and torch_mha.explain_cpu().

On a GPU, a call goes to PyTorch's fused tensor-core kernels (flash, memory-efficient, cuDNN)
when one of them computes exactly what was asked (float16/bfloat16, no dropout, no weights, no
torch_mha-only modifiers), and to torch_mha's own kernels otherwise. The choice is a pure
function of shapes, dtypes, flags and the GPU's compute capability (csrc/backend_selection.cpp),
so it can be asked about anywhere, including on a machine without a GPU.

Environment: TORCH_MHA_CUDA_BACKEND=own forces torch_mha's kernels; flash, efficient or cudnn
put that kernel first where it can run; auto (or unset) chooses.

On the CPU, bfloat16 and float16 forward tiles are multiplied either by torch_mha's float32 FMA
register tiles or by PyTorch's exported batch-reduce GEMM (at::native::cpublas::brgemm, which
reaches AMX and AVX512-BF16/FP16 through oneDNN and MKL); explain_cpu() says which, and why.
TORCH_MHA_CPU_REDUCED_PRODUCTS=fma or brgemm forces one; auto (or unset) chooses.
"""

import os
from typing import Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["BackendChoice", "CpuProductsChoice", "explain", "explain_cpu"]


class BackendChoice(NamedTuple):
    backend: str  # "flash", "efficient", "cudnn" or "torch_mha"
    rejected: Dict[str, str]  # each fused kernel not chosen -> why
    device_capability: Tuple[int, int]  # the GPU the answer is for


def _requires_grad(mask: Optional[Tensor]) -> bool:
    return mask is not None and mask.requires_grad


def explain(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    *,
    window_size: Tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None,
    softcap: float = 0.0,
    sinks: Optional[Tensor] = None,
    backward: bool = False,
    device_capability: Optional[Tuple[int, int]] = None,
) -> BackendChoice:
    """The kernel torch_mha.attention(...) with these arguments runs on a CUDA GPU, and for each
    fused kernel not chosen, the reason. Arguments are those of torch_mha.attention; backward
    asks about the backward call. device_capability defaults to the query's GPU, or (9, 0) (an
    H100) for tensors on another device. Honours TORCH_MHA_CUDA_BACKEND and
    torch.use_deterministic_algorithms like the real call."""
    if device_capability is None:
        device_capability = (
            torch.cuda.get_device_capability(query.device) if query.is_cuda else (9, 0)
        )
    backend, candidates, reasons = torch.ops.torch_mha._explain_cuda_backend(
        query,
        key,
        value,
        attn_mask,
        key_padding_mask,
        is_causal,
        dropout_p,
        need_weights,
        window_size[0],
        window_size[1],
        alibi_slopes,
        softcap,
        sinks,
        backward,
        _requires_grad(attn_mask) or _requires_grad(key_padding_mask),
        device_capability[0],
        device_capability[1],
        torch.are_deterministic_algorithms_enabled(),
        os.environ.get("TORCH_MHA_CUDA_BACKEND", ""),
    )
    return BackendChoice(backend, dict(zip(candidates, reasons)), tuple(device_capability))


class CpuProductsChoice(NamedTuple):
    engine: str  # "brgemm" (cpublas::brgemm) or "fma" (torch_mha's float32 FMA tiles)
    reason: str


def explain_cpu(dtype: torch.dtype) -> CpuProductsChoice:
    """How a CPU forward in this dtype multiplies its tiles on this machine, and why. The library
    engine is chosen only for bfloat16 (float16) on CPUs with amx_bf16 or avx512_bf16 (amx_fp16
    or avx512_fp16) while the kernels run their AVX512 build; it covers the blocks of more than
    16 query rows (prefill, training). Honours TORCH_MHA_CPU_REDUCED_PRODUCTS like the call."""
    engine, reason = torch.ops.torch_mha._explain_cpu_products(
        dtype, os.environ.get("TORCH_MHA_CPU_REDUCED_PRODUCTS", ""), None
    )
    return CpuProductsChoice(engine, reason)
