"""torch_mha: fused multi-head attention for PyTorch.

A drop-in replacement for torch.nn.MultiheadAttention whose forward and backward run in fused,
flash-style C++/CUDA kernels registered with the PyTorch dispatcher (namespace torch_mha), so the
same op works in eager mode, TorchScript, torch.compile/export and LibTorch C++.
"""

from ._library import load_library as _load_library

library_path: str = _load_library()

from . import functional  # noqa: E402
from .backends import BackendChoice, CpuProductsChoice, explain, explain_cpu  # noqa: E402
from .functional import (  # noqa: E402
    attention,
    attention_with_kvcache,
    multi_head_attention_forward,
    varlen_attention,
)
from .modules import MultiheadAttention  # noqa: E402
from .sdpa import scaled_dot_product_attention  # noqa: E402
from .swap import (  # noqa: E402
    AttentionConfig,
    SwappedAttention,
    SwapReport,
    restore_attention,
    swap_attention,
)

__version__ = "0.1.0"


def cuda_version() -> int:
    """CUDA version torch_mha was compiled with (e.g. 13000), or -1 for a CPU-only build."""
    import torch

    return int(torch.ops.torch_mha._cuda_version())


__all__ = [
    "AttentionConfig",
    "BackendChoice",
    "CpuProductsChoice",
    "MultiheadAttention",
    "SwapReport",
    "SwappedAttention",
    "attention",
    "attention_with_kvcache",
    "cuda_version",
    "explain",
    "explain_cpu",
    "functional",
    "library_path",
    "multi_head_attention_forward",
    "restore_attention",
    "scaled_dot_product_attention",
    "swap_attention",
    "varlen_attention",
]
