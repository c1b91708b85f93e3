"""A Hugging Face transformers attention backend: `import torch_mha.hf` registers "torch_mha".

    import torch_mha.hf  # noqa: F401
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="torch_mha")
    model = AutoModelForCausalLM.from_config(config, attn_implementation="torch_mha")
    model.set_attn_implementation("torch_mha")

Every attention layer then runs torch_mha.attention, with everything transformers passes:
grouped-query heads (K and V are not repeated), padding, causal attention, scaling, dropout in
training, sliding windows, logit softcapping, attention sinks (s_aux), output_attentions=True
(the weights are returned, as with "eager"), and the caches of generate(). Masks are not
materialised where transformers' own pattern is causal, a sliding window, bidirectional and/or
padding: the mask interface hands the layers a small description (TorchMhaMask) that becomes
is_causal / window_size / key_padding_mask, so hidden tiles are skipped. Any other pattern (custom
mask functions, packed sequences, a 4-D mask given by the caller) is built by transformers' sdpa
mask code and passed on as a boolean mask.

transformers is an optional dependency: `import torch_mha` never imports it.
"""

from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple, Union

import torch
from torch import Tensor

from .functional import attention

try:
    from transformers import AttentionInterface
    from transformers.masking_utils import (
        AttentionMaskInterface,
        bidirectional_mask_function,
        causal_mask_function,
        prepare_padding_mask,
        sdpa_mask,
    )
except ImportError as error:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "torch_mha.hf needs Hugging Face transformers (pip install transformers); "
        "torch_mha itself works without it"
    ) from error

__all__ = ["NAME", "TorchMhaMask", "torch_mha_attention", "torch_mha_mask"]

NAME = "torch_mha"


@dataclass(frozen=True)
class TorchMhaMask:
    """What the "torch_mha" mask interface hands to the attention layers instead of a dense mask.

    Either a recognised pattern (causal or bidirectional, an optional sliding window, optional
    padding, and where the queries and keys sit in the sequence) or, for any other pattern,
    `dense`: transformers' boolean mask (batch, 1, q_length, kv_length), True = attend.
    """

    causal: bool
    window: Optional[int]  # transformers' sliding window: key j is seen when j > i - window
    padding: Optional[Tensor]  # (batch, kv_length) bool, True = a real token; None: none
    q_offset: int  # position of the first query in the sequence
    kv_offset: int  # position of the first key
    dense: Optional[Tensor] = None

    # generate() treats prepared masks as 4-D tensors: it makes them contiguous and checks their
    # rank before handing them back to the model.
    ndim = 4

    def contiguous(self) -> "TorchMhaMask":
        return self

    def dim(self) -> int:
        return self.ndim


def _as_int(value: Union[int, Tensor]) -> int:
    return int(value.item()) if isinstance(value, Tensor) else int(value)


def _is_sliding_window(mask_function: Callable, local_size: Optional[int]) -> bool:
    """Whether mask_function is transformers' causal sliding window of size local_size: checked
    on the indices around the window's edge, not guessed from its name."""
    if local_size is None or local_size <= 0:
        return False
    q = torch.arange(3 * local_size + 2).view(-1, 1)
    kv = torch.arange(3 * local_size + 2).view(1, -1)
    zero = torch.zeros((), dtype=torch.long)
    try:
        got = mask_function(zero, zero, q, kv)
    except Exception:
        return False
    expected = (kv <= q) & (kv > q - local_size)
    return isinstance(got, Tensor) and bool(torch.equal(got.expand_as(expected), expected))


def torch_mha_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: Union[int, Tensor] = 0,
    kv_offset: int = 0,
    mask_function: Callable = causal_mask_function,
    attention_mask: Optional[Tensor] = None,
    local_size: Optional[int] = None,
    allow_is_causal_skip: bool = True,
    allow_is_bidirectional_skip: bool = False,
    use_vmap: bool = False,
    device: Union[torch.device, str] = "cpu",
    **kwargs: Any,
) -> TorchMhaMask:
    """The "torch_mha" entry of transformers' AttentionMaskInterface (the arguments of its
    sdpa_mask)."""
    if isinstance(attention_mask, TorchMhaMask):
        # generate() built this step's masks already (compileable caches) and hands them back.
        return attention_mask
    offsets = dict(q_offset=_as_int(q_offset), kv_offset=_as_int(kv_offset))
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is not None:
        # The 2-D mask covers every position; the keys are positions [kv_offset, + kv_length).
        padding = padding[:, offsets["kv_offset"] : offsets["kv_offset"] + kv_length]
        if bool(padding.all()):
            padding = None
    if mask_function is causal_mask_function:
        return TorchMhaMask(causal=True, window=None, padding=padding, **offsets)
    if mask_function is bidirectional_mask_function:
        return TorchMhaMask(causal=False, window=None, padding=padding, **offsets)
    if _is_sliding_window(mask_function, local_size):
        return TorchMhaMask(causal=True, window=local_size, padding=padding, **offsets)
    dense = sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        local_size=local_size,
        allow_is_causal_skip=False,
        use_vmap=use_vmap,
        device=device,
    )
    return TorchMhaMask(causal=False, window=None, padding=None, dense=dense, **offsets)


def _wants_weights(module: torch.nn.Module, kwargs: dict) -> bool:
    requested = kwargs.get("output_attentions")
    if requested is None:
        requested = getattr(getattr(module, "config", None), "output_attentions", False)
    return bool(requested)


def torch_mha_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Union[Tensor, TorchMhaMask]],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    sliding_window: Optional[int] = None,
    softcap: Optional[float] = None,
    s_aux: Optional[Tensor] = None,
    **kwargs: Any,
) -> Tuple[Tensor, Optional[Tensor]]:
    """The "torch_mha" entry of transformers' AttentionInterface.

    query (batch, heads, q_length, dim), key/value (batch, kv_heads, kv_length, dim) ->
    (attn_output (batch, q_length, heads, dim), attn_weights or None).
    """
    q_length = query.shape[2]
    attn_mask: Optional[Tensor] = None
    key_padding_mask: Optional[Tensor] = None
    window = (-1, -1)
    if isinstance(attention_mask, TorchMhaMask):
        described = attention_mask
        if described.dense is not None:
            attn_mask = described.dense[..., : key.shape[2]].logical_not()
        else:
            padding = described.padding
            if described.causal:
                # Keys after the last query are hidden (a static cache holds them unfilled):
                # keep the first ones, so that the queries are the last q_length of what is
                # left, and causal attention is the bottom-right window (-1, 0).
                keys = min(key.shape[2], described.q_offset + q_length - described.kv_offset)
                key, value = key[:, :, :keys], value[:, :, :keys]
                padding = None if padding is None else padding[:, :keys]
                left = -1 if described.window is None else described.window - 1
                window = (left, 0)
            if padding is not None:
                key_padding_mask = padding[:, : key.shape[2]].logical_not()
    elif attention_mask is not None:
        # A 4-D mask from the caller: bool True = attend (transformers' polarity), or additive.
        mask = attention_mask[..., : key.shape[2]]
        attn_mask = mask.logical_not() if mask.dtype == torch.bool else mask
    else:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if causal:
            window = (-1 if sliding_window is None else sliding_window - 1, 0)

    output, weights = attention(
        query,
        key,
        value,
        attn_mask=attn_mask,
        key_padding_mask=key_padding_mask,
        scale=scaling,
        dropout_p=dropout,
        need_weights=_wants_weights(module, kwargs),
        window_size=window,
        softcap=0.0 if softcap is None else float(softcap),
        sinks=s_aux,
    )
    return output.transpose(1, 2).contiguous(), weights


AttentionInterface.register(NAME, torch_mha_attention)
AttentionMaskInterface.register(NAME, torch_mha_mask)
