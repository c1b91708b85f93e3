"""Functional interface: thin, TorchScript-compatible wrappers around the torch_mha ops.

multi_head_attention_forward mirrors torch.nn.functional.multi_head_attention_forward (plus a
batch_first flag): it runs where nn runs, with nn's dtype promotion, and raises where nn raises.
The checks below run in Python, in nn's order: those that nn makes itself raise its exception
type with its message text; inputs that nn only fails on inside an ATen op (a view, a matmul)
raise the same exception type with a message that names the argument. The C++ op checks
everything again for C++ and TorchScript callers.
"""

import warnings
from typing import List, Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "attention",
    "attention_with_kvcache",
    "multi_head_attention_forward",
    "varlen_attention",
]


def _check_mask_dtype(mask: Optional[Tensor], name: str) -> None:
    # torch.nn.functional._canonical_mask
    if mask is not None:
        if mask.dtype != torch.bool and not torch.is_floating_point(mask):
            raise AssertionError(f"only bool and floating types of {name} are supported")


def _warn_mismatched_masks(
    key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor], query_dtype: torch.dtype
) -> None:
    """nn warns when the two masks have different dtypes. nn.MultiheadAttention compares the
    masks as given, then (having turned bool masks into float masks of the query's dtype) again
    in F.multi_head_attention_forward; this compares the dtypes the masks have at that point."""
    if key_padding_mask is not None and attn_mask is not None:
        if _canonical_dtype(key_padding_mask, query_dtype) != _canonical_dtype(
            attn_mask, query_dtype
        ):
            warnings.warn(
                "Support for mismatched key_padding_mask and attn_mask is deprecated. Use same "
                "type for both instead."
            )


def _canonical_dtype(mask: Tensor, query_dtype: torch.dtype) -> torch.dtype:
    """The dtype nn gives a mask: bool masks become float masks of the query's dtype."""
    if mask.dtype == torch.bool:
        return query_dtype
    return mask.dtype


def _shape_check(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Optional[Tensor],
    attn_mask: Optional[Tensor],
    num_heads: int,
) -> bool:
    """Validates ranks as torch.nn.functional._mha_shape_check does (same exceptions and
    messages); returns whether the input is batched."""
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
                expected = (num_heads, query.shape[0], key.shape[0])
                if list(attn_mask.shape) != [num_heads, query.shape[0], key.shape[0]]:
                    # Formatted like nn: a tuple, then torch.Size (a list under TorchScript).
                    raise AssertionError(
                        f"Expected `attn_mask` shape to be {expected} but got {attn_mask.shape}"
                    )
        return False
    raise AssertionError(
        f"query should be unbatched 2D or batched 3D tensor but received {query.dim()}-D query "
        "tensor"
    )


def _seq_first(x: Tensor, is_batched: bool, batch_first: bool) -> Tensor:
    """The (seq, batch, embed) view nn's checks see: nn.MultiheadAttention transposes batch-first
    input and F.multi_head_attention_forward unsqueezes unbatched input (views, no copies)."""
    if not is_batched:
        return x.unsqueeze(1)
    if batch_first:
        return x.transpose(0, 1)
    return x


def _bias_added_in_place(x: Tensor) -> bool:
    """Whether torch.nn.functional.linear(x, weight, bias) adds the bias in place, casting it to
    the output's dtype: for an input of more than 2 dims that is not contiguous it computes
    matmul then add_; otherwise it calls addmm, which needs the bias in the input's dtype."""
    return x.dim() > 2 and not x.is_contiguous()


def _cast_in_proj_bias(
    in_proj_bias: Optional[Tensor],
    inputs: List[Tensor],
    dtype: torch.dtype,
    is_batched: bool,
    batch_first: bool,
) -> Optional[Tensor]:
    """nn accepts an in_proj_bias of another dtype exactly where every linear that uses it (on
    the (seq, batch, embed) view of its input) adds it in place (item 1 of issue 17); the result
    then has the input's dtype. Elsewhere the bias is passed on unchanged and the op raises, as nn
    does (RuntimeError)."""
    if in_proj_bias is None or in_proj_bias.dtype == dtype:
        return in_proj_bias
    if not torch.can_cast(torch.promote_types(in_proj_bias.dtype, dtype), dtype):
        return in_proj_bias
    for x in inputs:
        if not _bias_added_in_place(_seq_first(x, is_batched, batch_first)):
            return in_proj_bias
    return in_proj_bias.to(dtype)


def _canonical_bias_kv(
    bias: Optional[Tensor], embed_dim: int, dtype: torch.dtype
) -> Optional[Tensor]:
    """nn appends bias.repeat(1, batch, 1) to the keys (values) with torch.cat: any bias of at
    most 3 dims whose shape, padded with leading ones, is (1, 1, embed_dim) (so (E,) and (1, E)
    too), of any dtype that promotes with the query's to the query's. Such a bias is given to the
    op as (1, 1, E) in the query's dtype; any other is passed on for the op to reject."""
    if bias is None:
        return bias
    if bias.dim() < 3:
        shape = [1, 1, 1]
        for i in range(bias.dim()):
            shape[3 - bias.dim() + i] = bias.shape[i]
        if shape == [1, 1, embed_dim]:
            bias = bias.reshape(1, 1, embed_dim)
    if bias.dtype != dtype and torch.promote_types(bias.dtype, dtype) == dtype:
        bias = bias.to(dtype)
    return bias


def _check_mask_dtypes(
    attn_mask: Optional[Tensor],
    key_padding_mask: Optional[Tensor],
    query_dtype: torch.dtype,
) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Float mask dtypes as nn accepts them. nn turns bool masks into float masks of the query's
    dtype and adds the two masks (type promotion); scaled_dot_product_attention (nn's
    need_weights=False path) takes the sum in the query's dtype or float32. Float masks are cast
    to that dtype where nn accepts them, and the same RuntimeError type as nn's is raised where it
    does not. (nn's need_weights=True path, baddbmm, also rejects a float32 sum for a query of
    another dtype; torch_mha takes it on both paths: a deliberate difference, see the README.)"""
    if attn_mask is None and key_padding_mask is None:
        return attn_mask, key_padding_mask
    merged = query_dtype
    if attn_mask is not None and key_padding_mask is not None:
        merged = torch.promote_types(
            _canonical_dtype(attn_mask, query_dtype),
            _canonical_dtype(key_padding_mask, query_dtype),
        )
    elif attn_mask is not None:
        merged = _canonical_dtype(attn_mask, query_dtype)
    elif key_padding_mask is not None:
        merged = _canonical_dtype(key_padding_mask, query_dtype)
    if merged != query_dtype and merged != torch.float32:
        what = f"key_padding_mask of dtype {merged}"
        if attn_mask is not None and key_padding_mask is not None:
            what = (
                f"attn_mask ({attn_mask.dtype}) and key_padding_mask ({key_padding_mask.dtype}) "
                f"add up to a mask of dtype {merged}, which"
            )
        elif attn_mask is not None:
            what = f"attn_mask of dtype {merged}"
        raise RuntimeError(
            f"{what} is not supported for a query of dtype {query_dtype}: float masks (bool "
            "masks count as the query's dtype) and their sum must have the query's dtype or "
            "float32, as in torch.nn.MultiheadAttention"
        )
    if attn_mask is not None and attn_mask.dtype != torch.bool and attn_mask.dtype != merged:
        attn_mask = attn_mask.to(merged)
    if (
        key_padding_mask is not None
        and key_padding_mask.dtype != torch.bool
        and key_padding_mask.dtype != merged
    ):
        key_padding_mask = key_padding_mask.to(merged)
    return attn_mask, key_padding_mask


def _check_dropout(dropout_p: float, training: bool, need_weights: bool) -> None:
    """torch_mha takes dropout probabilities in [0, 1) only. Where nn raises (training with
    dropout_p > 1: ValueError from F.dropout on the need_weights=True path, RuntimeError from
    scaled_dot_product_attention on the other, which also rejects negative and NaN values) the
    type and message are nn's; elsewhere (dropout_p == 1, or any value in evaluation) nn runs and
    torch_mha raises ValueError."""
    if 0.0 <= dropout_p < 1.0:
        return
    if training and (dropout_p > 1.0 or (not need_weights and dropout_p != 1.0)):
        message = f"dropout probability has to be between 0 and 1, but got {dropout_p}"
        if need_weights:
            raise ValueError(message)
        raise RuntimeError(message)
    raise ValueError(f"dropout probability has to be in [0, 1), but got {dropout_p}")


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
    return _multi_head_attention_forward(
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
        use_separate_proj_weight,
        q_proj_weight,
        k_proj_weight,
        v_proj_weight,
        static_k,
        static_v,
        average_attn_weights,
        is_causal,
        batch_first,
        False,
    )


def _multi_head_attention_forward(
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
    training: bool,
    key_padding_mask: Optional[Tensor],
    need_weights: bool,
    attn_mask: Optional[Tensor],
    use_separate_proj_weight: bool,
    q_proj_weight: Optional[Tensor],
    k_proj_weight: Optional[Tensor],
    v_proj_weight: Optional[Tensor],
    static_k: Optional[Tensor],
    static_v: Optional[Tensor],
    average_attn_weights: bool,
    is_causal: bool,
    batch_first: bool,
    masks_checked: bool,
) -> Tuple[Tensor, Optional[Tensor]]:
    """The checks of torch.nn.functional.multi_head_attention_forward, in its order, with its
    exception types and messages (explicit checks: the same text; failures that nn only meets
    inside an ATen op: the same type, a message that names the argument), then the op.
    masks_checked: called by torch_mha.MultiheadAttention, which has checked the mask dtypes (and
    warned about mismatched masks) as nn.MultiheadAttention does before calling the functional.
    """
    if query.is_nested or key.is_nested or value.is_nested:
        raise AssertionError("torch_mha.multi_head_attention_forward does not support NestedTensor")
    is_batched = _shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)
    # Sizes as nn's checks see them, (seq, batch, embed) (see _seq_first).
    seq_dim = 1 if is_batched and batch_first else 0
    tgt_len, src_len, embed_dim = query.shape[seq_dim], key.shape[seq_dim], query.shape[-1]
    bsz = 1
    if is_batched:
        bsz = query.shape[1 - seq_dim]

    _check_mask_dtype(key_padding_mask, "key_padding_mask")
    if masks_checked:
        _warn_mismatched_masks(key_padding_mask, attn_mask, query.dtype)
    elif (
        key_padding_mask is not None
        and attn_mask is not None
        and key_padding_mask.dtype != attn_mask.dtype
    ):
        warnings.warn(
            "Support for mismatched key_padding_mask and attn_mask is deprecated. Use same type "
            "for both instead."
        )
    if is_causal and attn_mask is None:
        raise RuntimeError(
            "Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
            "method `generate_square_subsequent_mask` to create this mask."
        )
    # is_causal with neither a key padding mask nor weights: nn hands is_causal to
    # scaled_dot_product_attention and ignores attn_mask (no dtype or shape check); the op does
    # the same (its causal rule: query i attends keys 0..i).
    mask_replaced_by_causal = is_causal and key_padding_mask is None and not need_weights
    if not mask_replaced_by_causal:
        _check_mask_dtype(attn_mask, "attn_mask")

    if embed_dim != embed_dim_to_check:
        raise AssertionError(
            f"was expecting embedding dimension of {embed_dim_to_check}, but got {embed_dim}"
        )
    if num_heads == 0:
        # nn: embed_dim // num_heads
        raise ZeroDivisionError(
            "integer division or modulo by zero: num_heads must be greater than 0, got num_heads=0"
        )
    head_dim = embed_dim // num_heads
    if head_dim * num_heads != embed_dim:
        raise AssertionError(f"embed_dim {embed_dim} not divisible by num_heads {num_heads}")
    # A negative num_heads that divides embed_dim is left to the op (RuntimeError, as in nn).

    if use_separate_proj_weight:
        if key.shape[:-1] != value.shape[:-1]:
            k_sf = _seq_first(key, is_batched, batch_first)
            v_sf = _seq_first(value, is_batched, batch_first)
            raise AssertionError(
                f"key's sequence and batch dims {k_sf.shape[:2]} do not match value's "
                f"{v_sf.shape[:2]}"
            )
    elif key.shape != value.shape:
        k_sf = _seq_first(key, is_batched, batch_first)
        v_sf = _seq_first(value, is_batched, batch_first)
        raise AssertionError(f"key shape {k_sf.shape} does not match value shape {v_sf.shape}")

    if not use_separate_proj_weight:
        if in_proj_weight is None:
            raise AssertionError("use_separate_proj_weight is False but in_proj_weight is None")
        if query is key and key is value:
            linear_inputs = [query]
        elif key is value:
            linear_inputs = [query, key]
        else:
            linear_inputs = [query, key, value]
        in_proj_bias = _cast_in_proj_bias(
            in_proj_bias, linear_inputs, query.dtype, is_batched, batch_first
        )
    else:
        if q_proj_weight is None:
            raise AssertionError("use_separate_proj_weight is True but q_proj_weight is None")
        if k_proj_weight is None:
            raise AssertionError("use_separate_proj_weight is True but k_proj_weight is None")
        if v_proj_weight is None:
            raise AssertionError("use_separate_proj_weight is True but v_proj_weight is None")
        _check_separate_projections(
            query, key, value, q_proj_weight, k_proj_weight, v_proj_weight, in_proj_bias
        )
        in_proj_bias = _cast_in_proj_bias(
            in_proj_bias, [query, key, value], query.dtype, is_batched, batch_first
        )
        in_proj_weight = None

    if attn_mask is not None and not mask_replaced_by_causal:
        if attn_mask.dim() == 2:
            if list(attn_mask.shape) != [tgt_len, src_len]:
                raise RuntimeError(
                    f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                    f"{(tgt_len, src_len)}."
                )
        elif list(attn_mask.shape) != [bsz * num_heads, tgt_len, src_len]:
            raise RuntimeError(
                f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                f"{(bsz * num_heads, tgt_len, src_len)}."
            )

    if bias_k is not None and bias_v is not None:
        if static_k is not None:
            raise AssertionError("bias cannot be added to static key.")
        if static_v is not None:
            raise AssertionError("bias cannot be added to static value.")
        bias_k = _canonical_bias_kv(bias_k, embed_dim, query.dtype)
        bias_v = _canonical_bias_kv(bias_v, embed_dim, query.dtype)
    elif bias_k is not None:
        raise AssertionError("bias_k is set but bias_v is None")
    elif bias_v is not None:
        raise AssertionError("bias_v is set but bias_k is None")

    key_len = src_len
    if bias_k is not None:
        key_len += 1
    if static_k is not None:
        _check_static(static_k, "static_k", bsz * num_heads, head_dim)
        key_len = static_k.shape[1]
    if static_v is not None:
        _check_static(static_v, "static_v", bsz * num_heads, head_dim)
    if add_zero_attn:
        key_len += 1
    if key_padding_mask is not None:
        # nn pads the mask by one column for bias_k and for add_zero_attn, then compares it with
        # the keys (torch.nn.functional._check_key_padding_mask).
        padded_len = key_padding_mask.shape[-1]
        if bias_k is not None:
            padded_len += 1
        if add_zero_attn:
            padded_len += 1
        mask_batch = key_padding_mask.shape[0] if is_batched else 1
        if mask_batch != bsz:
            raise AssertionError(
                f"Expected key_padded_mask.shape[0] to be {bsz}, but got {mask_batch}"
            )
        if padded_len != key_len:
            raise AssertionError(
                f"Expected key_padded_mask.shape[1] to be {key_len}, but got {padded_len}"
            )

    _check_dropout(dropout_p, training, need_weights)
    if not mask_replaced_by_causal:
        attn_mask, key_padding_mask = _check_mask_dtypes(attn_mask, key_padding_mask, query.dtype)

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


def _check_separate_projections(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    q_proj_weight: Tensor,
    k_proj_weight: Tensor,
    v_proj_weight: Tensor,
    in_proj_bias: Optional[Tensor],
) -> None:
    """The checks of torch.nn.functional._in_projection, with its messages."""
    b_q: Optional[Tensor] = None
    b_k: Optional[Tensor] = None
    b_v: Optional[Tensor] = None
    if in_proj_bias is not None:
        chunks = in_proj_bias.chunk(3)
        if len(chunks) != 3:
            # nn unpacks in_proj_bias.chunk(3) into three names
            raise ValueError(
                f"not enough values to unpack (expected 3, got {len(chunks)}): in_proj_bias of "
                f"shape {list(in_proj_bias.shape)} does not split into query, key and value biases"
            )
        b_q, b_k, b_v = chunks[0], chunks[1], chunks[2]
    e_q, e_k, e_v = query.shape[-1], key.shape[-1], value.shape[-1]
    if list(q_proj_weight.shape) != [e_q, e_q]:
        raise AssertionError(
            f"expecting query weights shape of {(e_q, e_q)}, but got {q_proj_weight.shape}"
        )
    if list(k_proj_weight.shape) != [e_q, e_k]:
        raise AssertionError(
            f"expecting key weights shape of {(e_q, e_k)}, but got {k_proj_weight.shape}"
        )
    if list(v_proj_weight.shape) != [e_q, e_v]:
        raise AssertionError(
            f"expecting value weights shape of {(e_q, e_v)}, but got {v_proj_weight.shape}"
        )
    if b_q is not None and list(b_q.shape) != [e_q]:
        raise AssertionError(f"expecting query bias shape of {(e_q,)}, but got {b_q.shape}")
    if b_k is not None and list(b_k.shape) != [e_q]:
        raise AssertionError(f"expecting key bias shape of {(e_q,)}, but got {b_k.shape}")
    if b_v is not None and list(b_v.shape) != [e_q]:
        raise AssertionError(f"expecting value bias shape of {(e_q,)}, but got {b_v.shape}")


def _check_static(static: Tensor, name: str, batch_heads: int, head_dim: int) -> None:
    """nn's checks of static_k / static_v: size(0), then size(2) (an IndexError for fewer than
    3 dims, as nn's static.size(2) raises; the message says which argument)."""
    if static.dim() == 0:
        raise IndexError(
            f"{name} must be 3-D (batch * num_heads, src_len, head_dim), but got a 0-D tensor"
        )
    if static.shape[0] != batch_heads:
        raise AssertionError(
            f"expecting {name}.size(0) of {batch_heads}, but got {static.shape[0]}"
        )
    if static.dim() < 3:
        raise IndexError(
            f"{name} must be 3-D (batch * num_heads, src_len, head_dim), but got a "
            f"{static.dim()}-D tensor"
        )
    if static.shape[2] != head_dim:
        raise AssertionError(f"expecting {name}.size(2) of {head_dim}, but got {static.shape[2]}")


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


def _attention_with_kvcache(
    query: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    key: Optional[Tensor] = None,
    value: Optional[Tensor] = None,
    scale: Optional[float] = None,
    window_size: Tuple[int, int] = (-1, 0),
    alibi_slopes: Optional[Tensor] = None,
    softcap: float = 0.0,
    sinks: Optional[Tensor] = None,
) -> Tensor:
    """attention_with_kvcache() as TorchScript compiles it (no keyword-only parameters)."""
    left, right = _window_sides(window_size)
    return torch.ops.torch_mha.attention_with_kvcache(
        query,
        k_cache,
        v_cache,
        cache_seqlens,
        key,
        value,
        scale,
        left,
        right,
        alibi_slopes,
        softcap,
        sinks,
    )


def attention_with_kvcache(
    query: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    key: Optional[Tensor] = None,
    value: Optional[Tensor] = None,
    *,
    scale: Optional[float] = None,
    window_size: Tuple[int, int] = (-1, 0),
    alibi_slopes: Optional[Tensor] = None,
    softcap: float = 0.0,
    sinks: Optional[Tensor] = None,
) -> Tensor:
    """Attention against a key/value cache, for decoding and chunked prefill (inference).

    query (N, H, L_new, D); k_cache, v_cache (N, Hkv, S_max, D / Dv); cache_seqlens int32 (N,):
    the valid entries of each sequence before this call (not modified). If key and value
    (N, Hkv, L_new, D / Dv) are given, they are written into the caches in place at
    [cache_seqlens[b], cache_seqlens[b] + L_new), after every check has passed. Each query then
    attends to the first cache_seqlens[b] + L_new keys of its sequence, with the window aligned
    to the bottom-right of that sequence: the default (-1, 0) is causal for a prefill chunk and
    full attention for one new token. Grouped-query heads, ALiBi, softcap and sinks as in
    attention(). Returns (N, H, L_new, Dv). Not differentiable.
    """
    return _attention_with_kvcache(
        query,
        k_cache,
        v_cache,
        cache_seqlens,
        key,
        value,
        scale,
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
attention_with_kvcache.__prepare_scriptable__ = (  # type: ignore[attr-defined]
    lambda: _attention_with_kvcache
)
