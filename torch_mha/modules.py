"""torch_mha.MultiheadAttention: a drop-in replacement for torch.nn.MultiheadAttention."""

from typing import Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.init import constant_, xavier_normal_, xavier_uniform_
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear
from torch.nn.parameter import Parameter

from .functional import multi_head_attention_forward

__all__ = ["MultiheadAttention"]


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
        nn.MultiheadAttention would use it (self-attention in inference with packed weights and
        biases, batch_first, no extra key/value positions, no masks), else nn's error."""
        why_not = ""
        if not (query is key and key is value):
            why_not = "query, key and value are not the same tensor"
        elif self.training:
            why_not = "the module is in training mode"
        elif not self.batch_first:
            why_not = "batch_first is False"
        elif not self._qkv_same_embed_dim or self.in_proj_weight is None:
            why_not = "kdim or vdim differs from embed_dim"
        elif self.in_proj_bias is None or self.out_proj.bias is None:
            why_not = "the module has no biases (bias=False)"
        elif self.bias_k is not None or self.add_zero_attn:
            why_not = "add_bias_kv or add_zero_attn is set"
        elif self.num_heads % 2 != 0:
            why_not = "num_heads is odd"
        elif attn_mask is not None or key_padding_mask is not None:
            why_not = "masks are not supported together with NestedTensor"
        elif torch.is_grad_enabled() and any(
            p is not None and p.requires_grad
            for p in [self.in_proj_weight, self.in_proj_bias, self.out_proj.weight, query]
        ):
            why_not = "autograd is enabled and an input or parameter requires grad"
        if why_not != "":
            raise AssertionError(
                "MultiheadAttention does not support NestedTensor outside of its fast path: "
                + why_not
            )
        in_proj_weight = self.in_proj_weight
        in_proj_bias = self.in_proj_bias
        out_bias = self.out_proj.bias
        assert in_proj_weight is not None and in_proj_bias is not None and out_bias is not None
        output, weights = torch._native_multi_head_attention(
            query,
            key,
            value,
            self.embed_dim,
            self.num_heads,
            in_proj_weight,
            in_proj_bias,
            self.out_proj.weight,
            out_bias,
            None,
            need_weights,
            average_attn_weights,
            None,
        )
        return output, (weights if need_weights else None)

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
        if query.is_nested or key.is_nested or value.is_nested:
            return self._nested_forward(
                query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights
            )
        return multi_head_attention_forward(
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
            training=self.training,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            use_separate_proj_weight=not self._qkv_same_embed_dim,
            q_proj_weight=self.q_proj_weight,
            k_proj_weight=self.k_proj_weight,
            v_proj_weight=self.v_proj_weight,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
            batch_first=self.batch_first,
        )
