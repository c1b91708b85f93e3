"""Independent reference implementations, written plainly with PyTorch ops in float64.

Nothing here calls torch_mha: tests compare torch_mha against these (and against
torch.nn.MultiheadAttention itself).
"""

import math
from typing import Optional, Tuple

import torch
from torch import Tensor


def additive_mask(mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """nn.MultiheadAttention polarity: bool True -> -inf (masked out), floats added as they are."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf")
        )
    return mask.to(dtype)


def reference_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    dropout_factors: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Attention in float64: q (N,H,L,E), k (N,H,S,E), v (N,H,S,Ev).

    attn_mask broadcasts to (N,H,L,S); key_padding_mask is (N,S); is_causal is top-left aligned.
    dropout_factors, if given, multiplies the probabilities (0 or 1/(1-p) per element).
    A query whose keys are all masked gets zero probabilities ("safe softmax").
    Returns (output (N,H,L,Ev), probabilities after dropout (N,H,L,S)), both float64.
    """
    q, k, v = query.double(), key.double(), value.double()
    L, S = q.shape[-2], k.shape[-2]
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] > 0 else 1.0
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    bias = additive_mask(attn_mask, torch.float64)
    if bias is not None:
        scores = scores + bias
    kpm = additive_mask(key_padding_mask, torch.float64)
    if kpm is not None:
        scores = scores + kpm[:, None, None, :]
    if is_causal:
        hidden = torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(hidden, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True) if S > 0 else scores.sum(-1, keepdim=True)
    fully_masked = torch.isneginf(row_max)
    shifted = scores - torch.where(fully_masked, torch.zeros_like(row_max), row_max)
    exp = shifted.exp()
    denom = exp.sum(dim=-1, keepdim=True)
    probs = torch.where(fully_masked, torch.zeros_like(exp), exp / denom)
    if dropout_factors is not None:
        probs = probs * dropout_factors.double()
    return torch.matmul(probs, v), probs
