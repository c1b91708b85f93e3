"""torch_mha.MultiheadAttention: a drop-in replacement for torch.nn.MultiheadAttention."""

import warnings
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.init import constant_, xavier_normal_, xavier_uniform_
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear
from torch.nn.parameter import Parameter

from .functional import _check_mask_dtype, _multi_head_attention_forward

__all__ = ["MultiheadAttention"]


def _privateuse1_backend_name() -> str:
    if not torch.jit.is_scripting():
        return torch._C._get_privateuse1_backend_name()
    return "privateuseone"


def _is_make_fx_tracing() -> bool:
    # nn.modules.activation._is_make_fx_tracing
    if not torch.jit.is_scripting():
        modes = torch.utils._python_dispatch._get_current_dispatch_mode_stack()
        return (
            any(type(m) is torch.fx.experimental.proxy_tensor.ProxyTorchDispatchMode for m in modes)
            or torch.compiler.is_exporting()
        )
    return False


def _has_torch_function(tensors: List[Optional[Tensor]]) -> bool:
    if not torch.jit.is_scripting():
        return torch.overrides.has_torch_function(tensors)
    return False


def _why_not_fast_path_for_tensors(tensors: List[Optional[Tensor]]) -> str:
    """The remaining fast-path conditions of nn.MultiheadAttention.forward (on query and the
    projection weights and biases), with nn's words; "" when none fails."""
    backend = _privateuse1_backend_name()
    if _has_torch_function(tensors):
        return "some Tensor argument has_torch_function"
    for t in tensors:
        if t is not None and t.device.type not in ["cpu", "cuda", backend]:
            return f"some Tensor argument's device is neither one of cpu, cuda or {backend}"
    if torch.is_grad_enabled():
        for t in tensors:
            if t is not None and t.requires_grad:
                return (
                    "grad is enabled and at least one of query or the input/output projection "
                    "weights or biases requires_grad"
                )
    if _is_make_fx_tracing():
        return "we are running make_fx tracing"
    return ""


def _nested_fast_path(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Optional[Tensor],
    need_weights: bool,
    attn_mask: Optional[Tensor],
    average_attn_weights: bool,
    embed_dim: int,
    num_heads: int,
    in_proj_weight: Optional[Tensor],
    in_proj_bias: Optional[Tensor],
    out_proj_weight: Tensor,
    out_proj_bias: Optional[Tensor],
    training: bool,
    batch_first: bool,
    has_bias_k: bool,
    has_bias_v: bool,
    add_zero_attn: bool,
    qkv_same_embed_dim: bool,
) -> Tuple[Tensor, Optional[Tensor]]:
    """nn.MultiheadAttention.forward for NestedTensor inputs: its fast-path conditions, in its
    order, with its words; the native kernel where they all hold, else nn's AssertionError.
    (A function of Optional arguments rather than a method, so that TorchScript compiles it for
    modules whose biases or packed weight are None.)"""
    why_not_fast_path = ""
    if (attn_mask is not None and torch.is_floating_point(attn_mask)) or (
        key_padding_mask is not None and torch.is_floating_point(key_padding_mask)
    ):
        why_not_fast_path = "floating-point masks are not supported for fast path."
    if not torch.backends.mha.get_fastpath_enabled():
        why_not_fast_path = "torch.backends.mha.get_fastpath_enabled() was not True"
    elif query.dim() != 3:
        why_not_fast_path = f"input not batched; expected query.dim() of 3 but got {query.dim()}"
    elif query is not key or key is not value:
        why_not_fast_path = (
            "non-self attention was used (query, key, and value are not the same Tensor)"
        )
    elif in_proj_bias is not None and query.dtype != in_proj_bias.dtype:
        why_not_fast_path = (
            f"dtypes of query ({query.dtype}) and self.in_proj_bias ({in_proj_bias.dtype}) "
            "don't match"
        )
    elif in_proj_weight is None:
        why_not_fast_path = "in_proj_weight was None"
    elif query.dtype != in_proj_weight.dtype:
        why_not_fast_path = (
            f"dtypes of query ({query.dtype}) and self.in_proj_weight ({in_proj_weight.dtype}) "
            "don't match"
        )
    elif training:
        why_not_fast_path = "training is enabled"
    elif (num_heads % 2) != 0:
        why_not_fast_path = "self.num_heads is not even"
    elif not batch_first:
        why_not_fast_path = "batch_first was not True"
    elif has_bias_k:
        why_not_fast_path = "self.bias_k was not None"
    elif has_bias_v:
        why_not_fast_path = "self.bias_v was not None"
    elif add_zero_attn:
        why_not_fast_path = "add_zero_attn was enabled"
    elif not qkv_same_embed_dim:
        why_not_fast_path = "_qkv_same_embed_dim was not True"
    elif key_padding_mask is not None or attn_mask is not None:
        why_not_fast_path = (
            "supplying both src_key_padding_mask and src_mask at the same time"
            "                                  "  # 34 spaces: a continued line in nn
            "is not supported with NestedTensor input"
        )
    elif torch.is_autocast_enabled():
        why_not_fast_path = "autocast is enabled"
    if why_not_fast_path == "":
        tensor_args: List[Optional[Tensor]] = [
            query,
            in_proj_weight,
            in_proj_bias,
            out_proj_weight,
            out_proj_bias,
        ]
        why_not_fast_path = _why_not_fast_path_for_tensors(tensor_args)
        if why_not_fast_path == "" and in_proj_bias is not None and in_proj_weight is not None:
            assert out_proj_bias is not None  # nn's module has both biases or neither
            output, weights = torch._native_multi_head_attention(
                query,
                key,
                value,
                embed_dim,
                num_heads,
                in_proj_weight,
                in_proj_bias,
                out_proj_weight,
                out_proj_bias,
                None,
                need_weights,
                average_attn_weights,
                None,
            )
            return output, (weights if need_weights else None)
    # Where the fast path's conditions hold but the module has no biases, nn falls through to
    # this error with an empty reason.
    raise AssertionError(
        "MultiheadAttention does not support NestedTensor outside of its fast path. "
        + f"The fast path was not hit because {why_not_fast_path}"
    )


class MultiheadAttention(nn.Module):
    r"""Multi-head attention computed by torch_mha's fused kernels.

    Same constructor, parameters (names, shapes, registration order, initialisation),
    attributes, ``state_dict`` and ``forward`` as :class:`torch.nn.MultiheadAttention`, so
    weights load both ways and the module can replace it in any model. Differences:

    * the attention matrix is never built unless ``need_weights=True`` (forward and backward
      memory grow linearly with the sequence length);
    * a query whose keys are all masked gets a zero attention output (torch gives NaN when
      ``need_weights=True``), and its gradients are zero;
    * ``dropout`` must lie in [0, 1).

    NestedTensor inputs (which nn.TransformerEncoder builds for padded batches in inference) are
    handled as nn.MultiheadAttention handles them: by PyTorch's native fast-path kernel, under the
    same conditions, and with the same error otherwise.
    """

    __constants__ = ["batch_first"]
    bias_k: Optional[Tensor]
    bias_v: Optional[Tensor]

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: Optional[int] = None,
        vdim: Optional[int] = None,
        batch_first: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(
                f"embed_dim and num_heads must be greater than 0, got embed_dim={embed_dim} "
                f"and num_heads={num_heads} instead"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), but got {dropout}")
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        if self.head_dim * num_heads != self.embed_dim:
            raise AssertionError("embed_dim must be divisible by num_heads")

        # Registration order matches torch.nn.MultiheadAttention, so parameters() (and an
        # optimizer's state_dict) line up with it.
        if self._qkv_same_embed_dim:
            self.in_proj_weight = Parameter(
                torch.empty((3 * embed_dim, embed_dim), **factory_kwargs)
            )
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = Parameter(torch.empty((embed_dim, embed_dim), **factory_kwargs))
            self.k_proj_weight = Parameter(torch.empty((embed_dim, self.kdim), **factory_kwargs))
            self.v_proj_weight = Parameter(torch.empty((embed_dim, self.vdim), **factory_kwargs))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = Parameter(torch.empty(3 * embed_dim, **factory_kwargs))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = NonDynamicallyQuantizableLinear(
            embed_dim, embed_dim, bias=bias, **factory_kwargs
        )
        if add_bias_kv:
            self.bias_k = Parameter(torch.empty((1, 1, embed_dim), **factory_kwargs))
            self.bias_v = Parameter(torch.empty((1, 1, embed_dim), **factory_kwargs))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Same distributions and the same order of random draws as torch.nn.MultiheadAttention,
        # so torch.manual_seed gives identical initial weights.
        if self._qkv_same_embed_dim:
            xavier_uniform_(self.in_proj_weight)
        else:
            xavier_uniform_(self.q_proj_weight)
            xavier_uniform_(self.k_proj_weight)
            xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            constant_(self.in_proj_bias, 0.0)
            constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            xavier_normal_(self.bias_k)
        if self.bias_v is not None:
            xavier_normal_(self.bias_v)

    def __setstate__(self, state):
        # Checkpoints pickled before _qkv_same_embed_dim existed used packed weights.
        if "_qkv_same_embed_dim" not in state:
            state["_qkv_same_embed_dim"] = True
        super().__setstate__(state)

    def _nested_forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor],
        need_weights: bool,
        attn_mask: Optional[Tensor],
        average_attn_weights: bool,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """NestedTensor inputs: PyTorch's native multi-head attention kernel, exactly where
        nn.MultiheadAttention uses it (its fast path), else nn's AssertionError with nn's reason."""
        return _nested_fast_path(
            query,
            key,
            value,
            key_padding_mask,
            need_weights,
            attn_mask,
            average_attn_weights,
            self.embed_dim,
            self.num_heads,
            self.in_proj_weight,
            self.in_proj_bias,
            self.out_proj.weight,
            self.out_proj.bias,
            self.training,
            self.batch_first,
            self.bias_k is not None,
            self.bias_v is not None,
            self.add_zero_attn,
            self._qkv_same_embed_dim,
        )

    def merge_masks(
        self,
        attn_mask: Optional[Tensor],
        key_padding_mask: Optional[Tensor],
        query: Tensor,
    ) -> Tuple[Optional[Tensor], Optional[int]]:
        r"""Combines the masks as nn.MultiheadAttention.merge_masks does, for callers such as
        nn.TransformerEncoderLayer's fast path. torch_mha itself never merges masks.

        Returns (mask, mask_type): mask_type 1 is the key padding mask alone, (N, S); mask_type 2
        is attn_mask broadcast to (N, num_heads, L, L), plus the key padding mask if given.
        Masks are expected in float form (bool masks already turned into 0 / -inf).
        """
        if attn_mask is None:
            if key_padding_mask is None:
                return None, None
            return key_padding_mask, 1
        batch, length = query.shape[0], query.shape[1]
        if attn_mask.dim() == 3:
            merged = attn_mask.view(batch, -1, length, length)
        else:
            merged = attn_mask.view(1, 1, length, length).expand(batch, self.num_heads, -1, -1)
        if key_padding_mask is not None:
            padding = key_padding_mask.view(batch, 1, 1, length).expand(-1, self.num_heads, -1, -1)
            merged = merged + padding
        return merged, 2

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        r"""Same arguments and returns as :meth:`torch.nn.MultiheadAttention.forward`.

        query (L, N, E), key (S, N, kdim), value (S, N, vdim) (or batch first, or unbatched
        (L, E)); key_padding_mask (N, S); attn_mask (L, S) or (N * num_heads, L, S). Bool masks
        are True where attention is not allowed; float masks are added to the scores.
        Returns (attn_output, attn_weights), attn_weights averaged over heads when
        average_attn_weights is True, None when need_weights is False.
        """
        # nn.MultiheadAttention turns both masks into float masks first: their dtype checks (and
        # the warning about mismatched masks) come before any other check.
        _check_mask_dtype(key_padding_mask, "key_padding_mask")
        if (
            key_padding_mask is not None
            and attn_mask is not None
            and key_padding_mask.dtype != attn_mask.dtype
        ):
            warnings.warn(
                "Support for mismatched key_padding_mask and attn_mask is deprecated. Use same "
                "type for both instead."
            )
        _check_mask_dtype(attn_mask, "attn_mask")
        if query.is_nested or key.is_nested or value.is_nested:
            return self._nested_forward(
                query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights
            )
        return _multi_head_attention_forward(
            query,
            key,
            value,
            self.embed_dim,
            self.num_heads,
            self.in_proj_weight,
            self.in_proj_bias,
            self.bias_k,
            self.bias_v,
            self.add_zero_attn,
            self.dropout,
            self.out_proj.weight,
            self.out_proj.bias,
            self.training,
            key_padding_mask,
            need_weights,
            attn_mask,
            not self._qkv_same_embed_dim,
            self.q_proj_weight,
            self.k_proj_weight,
            self.v_proj_weight,
            None,
            None,
            average_attn_weights,
            is_causal,
            self.batch_first,
            True,
        )
