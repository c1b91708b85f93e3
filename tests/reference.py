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


def reference_attention_variants(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    window: Tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None,
    softcap: float = 0.0,
    sinks: Optional[Tensor] = None,
    dropout_factors: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Attention in float64 with every modifier of torch_mha.attention, written out plainly.

    q (N,H,L,E); k (N,Hkv,S,E), v (N,Hkv,S,Ev) with H a multiple of Hkv: query head h uses
    key/value head h // (H // Hkv) (the key/value heads are repeated here; the op never does).
    Scores: scale * q.k, then softcap * tanh(score / softcap) when softcap > 0, then ALiBi
    (-slope * |i + S - L - j|, slopes (H,) or (N,H)), attn_mask and key_padding_mask added; then
    -inf where the key is hidden: is_causal hides j > i, window (left, right) hides j outside
    [i + S - L - left, i + S - L + right] (-1: no limit on that side). sinks (H,) join each row's
    denominator as one more logit that multiplies no value. A row with nothing to attend to (no
    visible key and no sink) gets zero probabilities. Returns (output (N,H,L,Ev), probabilities
    after dropout (N,H,L,S)), float64; autograd flows to every floating input.
    """
    q, k, v = query.double(), key.double(), value.double()
    n, h, L, e = q.shape
    S = k.shape[-2]
    group = h // k.shape[1] if k.shape[1] > 0 else 1
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    if scale is None:
        scale = 1.0 / math.sqrt(e) if e > 0 else 1.0
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    i = torch.arange(L, device=q.device).view(L, 1)
    j = torch.arange(S, device=q.device).view(1, S)
    position = i + S - L  # where query i sits among the keys
    if alibi_slopes is not None:
        slopes = alibi_slopes.double()
        slopes = slopes.view(1, h, 1, 1) if slopes.dim() == 1 else slopes.view(n, h, 1, 1)
        scores = scores - slopes * (position - j).abs().double()
    bias = additive_mask(attn_mask, torch.float64)
    if bias is not None:
        scores = scores + bias
    kpm = additive_mask(key_padding_mask, torch.float64)
    if kpm is not None:
        scores = scores + kpm[:, None, None, :]
    visible = torch.ones(L, S, dtype=torch.bool, device=q.device)
    if is_causal:
        visible &= j <= i
    left, right = window
    if left >= 0:
        visible &= j >= position - left
    if right >= 0:
        visible &= j <= position + right
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        sink_column = sinks.double().view(1, h, 1, 1).expand(n, h, L, 1)
        scores = torch.cat([scores, sink_column], dim=-1)
    if scores.shape[-1] > 0:
        row_max = scores.amax(dim=-1, keepdim=True).detach()
    else:
        row_max = scores.sum(-1, keepdim=True)
    nothing = torch.isneginf(row_max)
    exp = (scores - torch.where(nothing, torch.zeros_like(row_max), row_max)).exp()
    denominator = exp.sum(dim=-1, keepdim=True)
    safe_denominator = torch.where(nothing, torch.ones_like(denominator), denominator)
    probs = torch.where(nothing, torch.zeros_like(exp), exp / safe_denominator)
    if sinks is not None:
        probs = probs[..., :S]
    if dropout_factors is not None:
        probs = probs * dropout_factors.double()
    return torch.matmul(probs, v), probs
