"""Functional interface: thin, TorchScript-compatible wrappers around the torch_mha ops.

multi_head_attention_forward mirrors torch.nn.functional.multi_head_attention_forward (plus a
batch_first flag) and raises the same exception types for the same invalid inputs. The checks
below run in Python so that the exception types match nn.MultiheadAttention (AssertionError where
torch asserts); the C++ op checks everything again for C++ and TorchScript callers.
"""

import warnings
from typing import List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["attention", "multi_head_attention_forward", "varlen_attention"]


def _check_mask_dtype(mask: Optional[Tensor], name: str) -> None:
    if mask is not None:
        if mask.dtype != torch.bool and not torch.is_floating_point(mask):
            raise AssertionError(f"only bool and floating types of {name} are supported")


def _shape_check(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Optional[Tensor],
    attn_mask: Optional[Tensor],
    num_heads: int,
) -> bool:
    """Validates ranks like torch.nn.functional._mha_shape_check; returns whether batched."""
    if query.dim() == 3:
        if key.dim() != 3 or value.dim() != 3:
            raise AssertionError(
                "For batched (3-D) `query`, expected `key` and `value` to be 3-D but found "
                f"{key.dim()}-D and {value.dim()}-D tensors respectively"
            )
        if key_padding_mask is not None and key_padding_mask.dim() != 2:
            raise AssertionError(
                "For batched (3-D) `query`, expected `key_padding_mask` to be `None` or 2-D "
                f"but found {key_padding_mask.dim()}-D tensor instead"
            )
        if attn_mask is not None and attn_mask.dim() not in (2, 3):
            raise AssertionError(
                "For batched (3-D) `query`, expected `attn_mask` to be `None`, 2-D or 3-D but "
                f"found {attn_mask.dim()}-D tensor instead"
            )
        return True
    if query.dim() == 2:
        if key.dim() != 2 or value.dim() != 2:
            raise AssertionError(
                "For unbatched (2-D) `query`, expected `key` and `value` to be 2-D but found "
                f"{key.dim()}-D and {value.dim()}-D tensors respectively"
            )
        if key_padding_mask is not None and key_padding_mask.dim() != 1:
            raise AssertionError(
                "For unbatched (2-D) `query`, expected `key_padding_mask` to be `None` or 1-D "
                f"but found {key_padding_mask.dim()}-D tensor instead"
            )
        if attn_mask is not None:
            if attn_mask.dim() not in (2, 3):
                raise AssertionError(
                    "For unbatched (2-D) `query`, expected `attn_mask` to be `None`, 2-D or 3-D "
                    f"but found {attn_mask.dim()}-D tensor instead"
                )
            if attn_mask.dim() == 3:
                expected = [num_heads, query.shape[0], key.shape[0]]
                if list(attn_mask.shape) != expected:
                    raise AssertionError(
                        f"Expected `attn_mask` shape to be {expected} but got "
                        f"{list(attn_mask.shape)}"
                    )
        return False
    raise AssertionError(
        f"query should be unbatched 2D or batched 3D tensor but received {query.dim()}-D query "
        "tensor"
    )


def multi_head_attention_forward(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    embed_dim_to_check: int,
    num_heads: int,
    in_proj_weight: Optional[Tensor],
    in_proj_bias: Optional[Tensor],
    bias_k: Optional[Tensor],
    bias_v: Optional[Tensor],
    add_zero_attn: bool,
    dropout_p: float,
    out_proj_weight: Tensor,
    out_proj_bias: Optional[Tensor],
    training: bool = True,
    key_padding_mask: Optional[Tensor] = None,
    need_weights: bool = True,
    attn_mask: Optional[Tensor] = None,
    use_separate_proj_weight: bool = False,
    q_proj_weight: Optional[Tensor] = None,
    k_proj_weight: Optional[Tensor] = None,
    v_proj_weight: Optional[Tensor] = None,
    static_k: Optional[Tensor] = None,
    static_v: Optional[Tensor] = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
    batch_first: bool = False,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Multi-head attention with the arguments of torch.nn.functional.multi_head_attention_forward.

    Inputs are (L, N, E) / (S, N, E), or (N, L, E) / (N, S, E) with batch_first=True, or
    unbatched (L, E) / (S, E). Returns (attn_output, attn_weights), attn_weights being None when
    need_weights is False. A query row whose keys are all masked yields zeros (torch gives NaN on
    its need_weights path).
    """
    if query.is_nested or key.is_nested or value.is_nested:
        raise AssertionError("torch_mha.multi_head_attention_forward does not support NestedTensor")
    is_batched = _shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)
    _check_mask_dtype(key_padding_mask, "key_padding_mask")
    _check_mask_dtype(attn_mask, "attn_mask")
    if (
        key_padding_mask is not None
        and attn_mask is not None
        and key_padding_mask.dtype != attn_mask.dtype
    ):
        warnings.warn(
            "Support for mismatched key_padding_mask and attn_mask is deprecated. Use same type "
            "for both instead."
        )

    embed_dim = query.shape[-1]
    if embed_dim != embed_dim_to_check:
        raise AssertionError(
            f"was expecting embedding dimension of {embed_dim_to_check}, but got {embed_dim}"
        )
    # num_heads <= 0 is left to the C++ op, which raises RuntimeError as torch ends up doing.
    head_dim = embed_dim // num_heads if num_heads > 0 else 0
    if num_heads > 0 and head_dim * num_heads != embed_dim:
        raise AssertionError(f"embed_dim {embed_dim} not divisible by num_heads {num_heads}")
    if use_separate_proj_weight:
        if key.shape[:-1] != value.shape[:-1]:
            raise AssertionError(
                f"key's sequence and batch dims {key.shape[:-1]} do not match value's "
                f"{value.shape[:-1]}"
            )
        if q_proj_weight is None or k_proj_weight is None or v_proj_weight is None:
            raise AssertionError(
                "use_separate_proj_weight is True but q_proj_weight, k_proj_weight or "
                "v_proj_weight is None"
            )
        _check_weight_shape(q_proj_weight, [embed_dim, embed_dim], "q_proj_weight")
        if k_proj_weight.shape[-1] != key.shape[-1]:
            raise AssertionError(
                f"key has embedding dimension {key.shape[-1]}, but k_proj_weight expects "
                f"kdim={k_proj_weight.shape[-1]}"
            )
        if v_proj_weight.shape[-1] != value.shape[-1]:
            raise AssertionError(
                f"value has embedding dimension {value.shape[-1]}, but v_proj_weight expects "
                f"vdim={v_proj_weight.shape[-1]}"
            )
        _check_weight_shape(k_proj_weight, [embed_dim, key.shape[-1]], "k_proj_weight")
        _check_weight_shape(v_proj_weight, [embed_dim, value.shape[-1]], "v_proj_weight")
        in_proj_weight = None
    else:
        if key.shape != value.shape:
            raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
        if in_proj_weight is None:
            raise AssertionError("use_separate_proj_weight is False but in_proj_weight is None")
    if (bias_k is None) != (bias_v is None):
        raise AssertionError(
            "bias_k and bias_v must both be given or both be None, but "
            + ("bias_v is None" if bias_v is None else "bias_k is None")
        )
    if bias_k is not None and (static_k is not None or static_v is not None):
        raise AssertionError("bias cannot be added to static key or value.")
    if static_k is not None or static_v is not None:
        batch = 1
        if is_batched:
            batch = query.shape[0] if batch_first else query.shape[1]
        for static, name in ((static_k, "static_k"), (static_v, "static_v")):
            if static is not None:
                if static.dim() != 3:
                    # torch fails with IndexError here (it reads size(2)); say why.
                    raise IndexError(
                        f"{name} must be 3-D (batch * num_heads, src_len, head_dim), but got a "
                        f"{static.dim()}-D tensor"
                    )
                if static.shape[0] != batch * num_heads:
                    raise AssertionError(
                        f"expecting {name}.size(0) of {batch * num_heads}, but got "
                        f"{static.shape[0]}"
                    )
                if static.shape[2] != head_dim:
                    raise AssertionError(
                        f"expecting {name}.size(2) of {head_dim}, but got {static.shape[2]}"
                    )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout probability has to be in [0, 1), but got {dropout_p}")
    if key_padding_mask is not None:
        _check_key_padding_mask_shape(
            query,
            key,
            key_padding_mask,
            is_batched,
            batch_first,
            bias_k is not None,
            add_zero_attn,
            static_k,
        )

    attn_output, attn_weights = torch.ops.torch_mha.multi_head_attention(
        query,
        key,
        value,
        embed_dim_to_check,
        num_heads,
        in_proj_weight,
        in_proj_bias,
        bias_k,
        bias_v,
        add_zero_attn,
        dropout_p,
        out_proj_weight,
        out_proj_bias,
        training,
        key_padding_mask,
        need_weights,
        attn_mask,
        q_proj_weight,
        k_proj_weight,
        v_proj_weight,
        static_k,
        static_v,
        average_attn_weights,
        is_causal,
        batch_first,
    )
    if need_weights:
        return attn_output, attn_weights
    return attn_output, None


def _check_weight_shape(weight: Tensor, expected: List[int], name: str) -> None:
    if list(weight.shape) != expected:
        raise AssertionError(f"expecting {name} shape of {expected}, but got {list(weight.shape)}")


def _check_key_padding_mask_shape(
    query: Tensor,
    key: Tensor,
    key_padding_mask: Tensor,
    is_batched: bool,
    batch_first: bool,
    has_bias_kv: bool,
    add_zero_attn: bool,
    static_k: Optional[Tensor],
) -> None:
    """key_padding_mask must be (N, S) (or (S,) unbatched), S counted before bias_kv/zero_attn."""
    if is_batched:
        batch = query.shape[0] if batch_first else query.shape[1]
        src_len = key.shape[1] if batch_first else key.shape[0]
        expected = [batch, src_len]
    else:
        src_len = key.shape[0]
        expected = [src_len]
    if static_k is not None:
        expected[-1] = static_k.shape[1]
    if list(key_padding_mask.shape) != expected:
        raise AssertionError(
            f"expected key_padding_mask of shape {expected}, but got {list(key_padding_mask.shape)}"
        )


def _dropout_seed(dropout_p: float, query: Tensor) -> Optional[Tensor]:
    """One int64 seed per call from the default generator of the query's device, so that
    torch.manual_seed reproduces a run and the core op stays a pure function of its inputs."""
    if dropout_p > 0.0:
        return torch.randint(0, 9223372036854775807, (1,), dtype=torch.long, device=query.device)
    return None


def _window_sides(window_size: Tuple[int, int]) -> Tuple[int, int]:
    if len(window_size) != 2:
        raise ValueError(
            f"window_size must be a pair (left, right), but got {len(window_size)} values"
        )
    return window_size[0], window_size[1]


def _attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    average_weights: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None,
    softcap: float = 0.0,
    sinks: Optional[Tensor] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """attention() as TorchScript compiles it: TorchScript has no keyword-only parameters, so
    this twin takes the same parameters, in the same order, without the `*`."""
    left, right = _window_sides(window_size)
    output, _, weights = torch.ops.torch_mha.attention_forward(
        query,
        key,
        value,
        attn_mask,
        key_padding_mask,
        is_causal,
        scale,
        dropout_p,
        _dropout_seed(dropout_p, query),
        need_weights,
        average_weights,
        left,
        right,
        alibi_slopes,
        softcap,
        sinks,
    )
    if need_weights:
        return output, weights
    return output, None


def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    average_weights: bool = False,
    *,
    window_size: Tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None,
    softcap: float = 0.0,
    sinks: Optional[Tensor] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Fused scaled dot-product attention on per-head tensors, with autograd.

    query (N, H, L, E), key (N, Hkv, S, E), value (N, Hkv, S, Ev), H a multiple of Hkv
    (grouped-query attention: query head h reads key/value head h // (H // Hkv); K and V are
    never repeated in memory). Returns (output (N, H, L, Ev), weights): the attention
    probabilities after dropout when need_weights is True, (N, H, L, S) or (N, L, S) averaged
    over heads when average_weights is True; else None.

    Masks use nn.MultiheadAttention's polarity: a bool True means "do not attend" (the opposite
    of F.scaled_dot_product_attention); a floating mask is added to the scores. attn_mask
    broadcasts to (N, H, L, S); key_padding_mask is (N, S). is_causal lets query i attend keys
    0..i (top-left). dropout_p draws its seed from PyTorch's default generator (pass 0.0 in
    evaluation).

    Keyword-only modifiers (all combine with each other and with the masks):
    * window_size=(left, right): query i sees key j only if i + S - L - left <= j (left >= 0)
      and j <= i + S - L + right (right >= 0); -1 leaves a side open. (-1, 0) is causal aligned
      to the bottom-right, (w, 0) a causal sliding window. Hidden tiles are skipped.
    * alibi_slopes: float32 (H,) or (N, H); adds -slope * |i + S - L - j| to the scores.
    * softcap > 0: score = softcap * tanh(score / softcap), on the scaled q.k before any bias.
    * sinks: (H,) logits that join each row's softmax denominator only (gradients flow to them);
      the returned weights leave the sink out.
    A query with nothing to attend to gets a zero output and zero gradients.
    """
    return _attention(
        query,
        key,
        value,
        attn_mask,
        key_padding_mask,
        is_causal,
        scale,
        dropout_p,
        need_weights,
        average_weights,
        window_size,
        alibi_slopes,
        softcap,
        sinks,
    )


def _varlen_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None,
    softcap: float = 0.0,
    sinks: Optional[Tensor] = None,
) -> Tensor:
    """varlen_attention() as TorchScript compiles it (no keyword-only parameters)."""
    left, right = _window_sides(window_size)
    output, _ = torch.ops.torch_mha.varlen_attention_forward(
        query,
        key,
        value,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        scale,
        dropout_p,
        _dropout_seed(dropout_p, query),
        is_causal,
        left,
        right,
        alibi_slopes,
        softcap,
        sinks,
    )
    return output


def varlen_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None,
    softcap: float = 0.0,
    sinks: Optional[Tensor] = None,
) -> Tensor:
    """Attention over a packed batch of sequences of different lengths, with autograd.

    query (total_q, H, E), key (total_k, Hkv, E), value (total_k, Hkv, Ev); cu_seqlens_q and
    cu_seqlens_k are int32 (B + 1,) prefix sums of the sequence lengths, starting at 0 and
    ending at the totals; max_seqlen_q / max_seqlen_k bound the longest sequence. Sequence b
    attends only within itself, and causal, window and ALiBi positions are relative to its own
    lengths (L_b, S_b). The modifiers are those of attention(). Dropout draws the mask of the
    padded (B, H, max_seqlen_q, max_seqlen_k) call, so the packed and the padded batch agree for
    a seed. No work is done on padding. Returns (total_q, H, Ev).
    """
    return _varlen_attention(
        query,
        key,
        value,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        scale,
        dropout_p,
        is_causal,
        window_size,
        alibi_slopes,
        softcap,
        sinks,
    )


# TorchScript compiles the twins (torch.jit.script calls __prepare_scriptable__ on what it is
# given, and so does recursive scripting of a function a module calls): same parameters and
# results, minus the keyword-only marker it cannot compile.
attention.__prepare_scriptable__ = lambda: _attention  # type: ignore[attr-defined]
varlen_attention.__prepare_scriptable__ = lambda: _varlen_attention  # type: ignore[attr-defined]
