"""torch_mha.scaled_dot_product_attention: F.scaled_dot_product_attention's interface and
semantics on torch_mha's fused kernels.

Same arguments, broadcasting, mask polarity (a bool attn_mask is True where attention is
allowed), top-left is_causal, enable_gqa and errors as torch.nn.functional.
scaled_dot_product_attention; grouped-query heads are never repeated in memory, nothing of size
L x S is allocated, and gradients flow as through SDPA. Differences: dropout draws its mask from
torch_mha's own generator (seeded from PyTorch's default one: torch.manual_seed reproduces
runs), and a query whose keys are all masked gets zeros (as SDPA does on CPU in recent torch).

Inputs torch_mha does not take (integer dtypes, mismatched shapes, bad masks, ...) are handed to
F.scaled_dot_product_attention itself, so the caller gets exactly its error. One exception: key
and value of different lengths raise here, where SDPA's CPU kernel returns numbers read past the
end of key.
"""

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["scaled_dot_product_attention"]


def _is_floating(dtype: torch.dtype) -> bool:
    return (
        dtype == torch.float64
        or dtype == torch.float32
        or dtype == torch.bfloat16
        or dtype == torch.float16
    )


def _broadcast(a: List[int], b: List[int]) -> Optional[List[int]]:
    """numpy broadcasting of two shapes, or None when they do not broadcast."""
    n = max(len(a), len(b))
    a = [1] * (n - len(a)) + a
    b = [1] * (n - len(b)) + b
    out: List[int] = []
    for x, y in zip(a, b):
        if x != y and x != 1 and y != 1:
            return None
        out.append(y if x == 1 else x)
    return out


def _batch_shape(
    query: Tensor, key: Tensor, value: Tensor, mask: Optional[Tensor], enable_gqa: bool
) -> Optional[List[int]]:
    """The broadcast batch shape (everything but the last two dims) of the call, heads last,
    or None when torch_mha cannot run it as SDPA would."""
    q_batch = list(query.shape[:-2])
    k_batch = list(key.shape[:-2])
    v_batch = list(value.shape[:-2])
    if k_batch != v_batch:
        return None
    if enable_gqa and len(q_batch) >= 1 and len(k_batch) >= 1:
        q_heads, kv_heads = q_batch[-1], k_batch[-1]
        if kv_heads == 0 or q_heads % kv_heads != 0:
            return None
        k_batch = k_batch[:-1] + [q_heads]  # grouped heads: the key side counts as H
    shape = _broadcast(q_batch, k_batch)
    if shape is None or shape != q_batch:
        # SDPA's output has the query's batch shape; key/value may broadcast into it, but not
        # the other way round.
        return None
    if mask is not None:
        full = shape + [query.shape[-2], key.shape[-2]]
        mask_into_full = _broadcast(list(mask.shape), full)
        if mask_into_full is None or mask_into_full != full:
            return None
    return shape


def _supported(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor],
    dropout_p: float,
    is_causal: bool,
) -> bool:
    if query.dim() < 2 or key.dim() < 2 or value.dim() < 2:
        return False
    if query.dim() != key.dim() or key.dim() != value.dim():
        return False
    if not _is_floating(query.dtype) or key.dtype != query.dtype or value.dtype != query.dtype:
        return False
    if key.device != query.device or value.device != query.device:
        return False
    if query.is_nested or key.is_nested or value.is_nested:
        return False
    if query.shape[-1] != key.shape[-1] or key.shape[-2] != value.shape[-2]:
        return False
    if not 0.0 <= dropout_p <= 1.0 or dropout_p == 1.0:
        return False
    if attn_mask is not None:
        if is_causal or attn_mask.device != query.device:
            return False
        if attn_mask.dtype != torch.bool and attn_mask.dtype not in (torch.float32, query.dtype):
            return False
        if attn_mask.dim() > query.dim():
            return False
    return True


def _as_4d(t: Tensor, batch: List[int], heads_of_t: int) -> Tensor:
    """t (*batch_t, rows, cols) as (N, heads, rows, cols), N the product of the leading batch
    dims (broadcast by strides), heads its own head count."""
    rows, cols = t.shape[-2], t.shape[-1]
    if len(batch) == 0:
        return t.reshape(1, 1, rows, cols)
    lead = batch[:-1]
    t = t.expand(lead + [heads_of_t, rows, cols]) if t.dim() - 2 == len(batch) else t
    n = 1
    for d in lead:
        n *= d
    return t.reshape(n, heads_of_t, rows, cols)


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> Tensor:
    """F.scaled_dot_product_attention on torch_mha's kernels (see the module docstring).

    query (..., L, E), key (..., S, E), value (..., S, Ev) -> (..., L, Ev). attn_mask: bool
    (True = attend) or float (added), broadcastable to (..., L, S). is_causal: query i attends
    keys 0..i (top-left). enable_gqa: key/value may have fewer heads (dim -3) than the query.
    """
    if key.dim() >= 2 and value.dim() >= 2 and key.shape[-2] != value.shape[-2]:
        # F.sdpa's CPU kernel (torch 2.13) lets this through and reads past the end of key: its
        # result changes from call to call for the same values.
        raise RuntimeError(
            "torch_mha.scaled_dot_product_attention: key and value must have the same length "
            "(dim -2), but got key length "
            + str(key.shape[-2])
            + " and value length "
            + str(value.shape[-2])
        )
    batch: Optional[List[int]] = None
    if _supported(query, key, value, attn_mask, dropout_p, is_causal):
        batch = _batch_shape(query, key, value, attn_mask, enable_gqa)
    if batch is None:
        return F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=enable_gqa,
        )
    L, S = query.shape[-2], key.shape[-2]
    heads = batch[-1] if len(batch) > 0 else 1
    kv_heads = key.shape[-3] if enable_gqa and len(batch) > 0 else heads
    lead_batch: List[int] = batch[:-1] if len(batch) > 0 else []
    q = _as_4d(query, batch, heads)
    k = _as_4d(key.expand(lead_batch + [kv_heads, S, key.shape[-1]]), batch, kv_heads)
    v = _as_4d(value.expand(lead_batch + [kv_heads, S, value.shape[-1]]), batch, kv_heads)
    mask: Optional[Tensor] = None
    if attn_mask is not None:
        full = attn_mask.expand(batch + [L, S])
        mask = _as_4d(full, batch, heads)
        if mask.dtype == torch.bool:
            mask = mask.logical_not()  # torch_mha's polarity: True = masked out
    seed: Optional[Tensor] = None
    if dropout_p > 0.0:
        seed = torch.randint(0, 9223372036854775807, (1,), dtype=torch.long, device=query.device)
    output, _, _ = torch.ops.torch_mha.attention_forward(
        q, k, v, mask, None, is_causal, scale, dropout_p, seed, False, False
    )
    return output.reshape(batch + [L, value.shape[-1]])
