"""torch_mha.scaled_dot_product_attention against torch.nn.functional.scaled_dot_product_attention
itself: results and gradients over its shapes, broadcasting, masks, causal, scale, grouped-query
heads and dtypes; its errors (type and message, as the installed torch words them); and where
the two differ (dropout's random numbers)."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from attention_testing import assert_close, dtype_id, forward_tol, grad_tolerance, randn
from torch import Tensor

import torch_mha

sdpa = torch_mha.scaled_dot_product_attention


def inputs(
    q_shape: Tuple[int, ...],
    k_shape: Tuple[int, ...],
    v_shape: Tuple[int, ...],
    dtype: torch.dtype,
    device: str,
) -> List[Tensor]:
    return [
        randn(*shape, dtype=dtype, device=device, requires_grad=True)
        for shape in (q_shape, k_shape, v_shape)
    ]


def compare(
    args: List[Tensor],
    dtype: torch.dtype,
    attn_mask: Optional[Tensor] = None,
    **kwargs,
) -> None:
    """Ours vs F.sdpa on the same float64 copies: outputs and gradients of q, k, v (and of a
    float mask that requires grad)."""
    leaves = list(args) + ([attn_mask] if attn_mask is not None and attn_mask.requires_grad else [])
    out = sdpa(*args, attn_mask=attn_mask, **kwargs)
    ref_args = [a.detach().double().requires_grad_() for a in args]
    ref_mask = attn_mask
    if attn_mask is not None and attn_mask.is_floating_point():
        ref_mask = attn_mask.detach().double().requires_grad_(attn_mask.requires_grad)
    ref = F.scaled_dot_product_attention(*ref_args, attn_mask=ref_mask, **kwargs)
    assert out.shape == ref.shape and out.dtype == dtype
    assert_close(out, ref, forward_tol(dtype))
    go = randn(*out.shape, dtype=dtype, device=out.device)
    grads = torch.autograd.grad(out, leaves, go)
    ref_leaves = ref_args + ([ref_mask] if len(leaves) > len(args) else [])
    ref_grads = torch.autograd.grad(ref, ref_leaves, go.double())
    for a, b in zip(grads, ref_grads):
        assert a.shape == b.shape
        assert_close(a, b, grad_tolerance(dtype, b))


SHAPES = {
    "4d": ((2, 4, 33, 16), (2, 4, 65, 16), (2, 4, 65, 8)),
    "3d": ((3, 33, 16), (3, 40, 16), (3, 40, 12)),
    "2d": ((33, 16), (40, 16), (40, 8)),
    "5d": ((2, 3, 2, 17, 8), (2, 3, 2, 19, 8), (2, 3, 2, 19, 8)),
    "broadcast_batch": ((2, 4, 33, 16), (1, 4, 65, 16), (1, 4, 65, 8)),
    "broadcast_heads": ((2, 4, 33, 16), (2, 1, 65, 16), (2, 1, 65, 8)),
    "one_query": ((2, 4, 1, 16), (2, 4, 300, 16), (2, 4, 300, 16)),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_shapes(shape: str, dtype: torch.dtype, device: str) -> None:
    compare(inputs(*SHAPES[shape], dtype, device), dtype)


def _mask(kind: str, shape: Tuple[int, ...], dtype: torch.dtype, device: str) -> Tensor:
    if kind == "bool":
        mask = torch.rand(*shape) < 0.7
        mask[..., 0] = True  # every query keeps a key: SDPA's math path would give NaN rows
        return mask.to(device)
    return randn(*shape, dtype=dtype, device=device)


MASK_SHAPES = {"LS": (33, 65), "1LS": (1, 33, 65), "N1LS": (2, 1, 33, 65),
               "NHLS": (2, 4, 33, 65), "N11S": (2, 1, 1, 65), "H11": (4, 1, 1)}  # fmt: skip


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("mask_shape", list(MASK_SHAPES))
def test_masks(mask_shape: str, kind: str, device: str) -> None:
    dtype = torch.float64
    mask = _mask(kind, MASK_SHAPES[mask_shape], dtype, device)
    compare(inputs(*SHAPES["4d"], dtype, device), dtype, attn_mask=mask)


def test_float_mask_gradient(device: str) -> None:
    mask = randn(4, 33, 65, device=device, requires_grad=True)
    compare(inputs(*SHAPES["4d"], torch.float64, device), torch.float64, attn_mask=mask)


@pytest.mark.parametrize("ls", [(33, 33), (20, 50), (50, 20)], ids=str)
def test_causal_is_top_left(ls: Tuple[int, int], device: str) -> None:
    l, s = ls
    compare(inputs((2, 3, l, 8), (2, 3, s, 8), (2, 3, s, 8), torch.float64, device),
            torch.float64, is_causal=True)  # fmt: skip


@pytest.mark.parametrize("scale", [0.05, 1.0, None])
def test_scale(scale: Optional[float], device: str) -> None:
    compare(inputs(*SHAPES["4d"], torch.float64, device), torch.float64, scale=scale)


@pytest.mark.parametrize("heads", [(8, 2), (8, 1), (6, 3)], ids=str)
def test_enable_gqa(heads: Tuple[int, int], device: str) -> None:
    h, hkv = heads
    args = inputs((2, h, 33, 16), (2, hkv, 50, 16), (2, hkv, 50, 8), torch.float64, device)
    compare(args, torch.float64, enable_gqa=True)
    mask = _mask("bool", (33, 50), torch.float64, device)
    compare(args, torch.float64, attn_mask=mask, enable_gqa=True)


def test_fully_masked_rows_agree(device: str) -> None:
    """A query row with every key masked: what the installed torch gives is what we give
    (zeros on CPU since PyTorch's safe softmax)."""
    q, k, v = inputs(*SHAPES["4d"], torch.float64, device)
    mask = torch.ones(33, 65, dtype=torch.bool, device=device)
    mask[5] = False
    ours = sdpa(q, k, v, attn_mask=mask)
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(ours, theirs, equal_nan=True)


def test_dropout_uses_torch_mha_generator(device: str) -> None:
    """Dropout keeps about 1 - p of the probabilities and torch.manual_seed reproduces a call;
    the mask itself is torch_mha's (not SDPA's), so outputs differ from SDPA's."""
    q, k, v = (t.detach() for t in inputs(*SHAPES["4d"], torch.float64, device))
    torch.manual_seed(3)
    a = sdpa(q, k, v, dropout_p=0.4)
    torch.manual_seed(3)
    b = sdpa(q, k, v, dropout_p=0.4)
    assert torch.equal(a, b)
    assert not torch.equal(a, sdpa(q, k, v, dropout_p=0.4))


def test_scriptable() -> None:
    scripted = torch.jit.script(sdpa)
    q, k, v = (t.detach() for t in inputs(*SHAPES["4d"], torch.float32, "cpu"))
    torch.testing.assert_close(scripted(q, k, v, is_causal=True), sdpa(q, k, v, is_causal=True))


def _error_cases(device: str) -> Dict[str, Callable[[Callable], Tensor]]:
    def t(*shape, dtype=torch.float32):
        return torch.randn(*shape, dtype=dtype, device=device)

    def m(*shape, dtype=torch.bool):
        return torch.ones(*shape, dtype=dtype, device=device)

    return {
        "mask_and_causal": lambda f: f(t(2, 4, 5, 8), t(2, 4, 6, 8), t(2, 4, 6, 8),
                                       attn_mask=m(5, 6), is_causal=True),
        "mask_int": lambda f: f(t(2, 4, 5, 8), t(2, 4, 6, 8), t(2, 4, 6, 8),
                                attn_mask=m(5, 6, dtype=torch.int32)),
        "mask_float64": lambda f: f(t(2, 4, 5, 8), t(2, 4, 6, 8), t(2, 4, 6, 8),
                                    attn_mask=m(5, 6, dtype=torch.float64)),
        "mask_bad_shape": lambda f: f(t(2, 4, 5, 8), t(2, 4, 6, 8), t(2, 4, 6, 8),
                                      attn_mask=m(4, 6)),
        "dtype_mismatch": lambda f: f(t(2, 4, 5, 8), t(2, 4, 6, 8, dtype=torch.float64),
                                      t(2, 4, 6, 8)),
        "head_dim_mismatch": lambda f: f(t(2, 4, 5, 8), t(2, 4, 6, 7), t(2, 4, 6, 8)),
        "one_dimensional": lambda f: f(t(8), t(8), t(8)),
        "dropout_above_one": lambda f: f(t(2, 4, 5, 8), t(2, 4, 6, 8), t(2, 4, 6, 8),
                                         dropout_p=1.5),
        "gqa_without_flag": lambda f: f(t(2, 4, 5, 8), t(2, 2, 6, 8), t(2, 2, 6, 8)),
        "gqa_not_dividing": lambda f: f(t(2, 6, 5, 8), t(2, 4, 6, 8), t(2, 4, 6, 8),
                                        enable_gqa=True),
        "integer_inputs": lambda f: f(torch.ones(2, 4, 5, 8, dtype=torch.long),
                                      torch.ones(2, 4, 6, 8, dtype=torch.long),
                                      torch.ones(2, 4, 6, 8, dtype=torch.long)),
    }  # fmt: skip


@pytest.mark.parametrize("case", list(_error_cases("cpu")))
def test_invalid_input_does_what_sdpa_does(case: str, device: str) -> None:
    """Where F.sdpa raises, the same exception type and message; where the installed torch lets
    an input through (its CPU kernels do not check everything), the same result."""
    call = _error_cases(device)
    torch.manual_seed(0)
    try:
        expected = call[case](F.scaled_dot_product_attention)
    except Exception as error:  # noqa: BLE001 - whatever SDPA raises is the expectation
        with pytest.raises(type(error)) as ours:
            torch.manual_seed(0)
            call[case](sdpa)
        assert str(ours.value) == str(error)
        return
    torch.manual_seed(0)
    torch.testing.assert_close(call[case](sdpa), expected, equal_nan=True)


def test_key_value_length_mismatch_raises(device: str) -> None:
    """Deliberate difference: SDPA's CPU kernel lets key and value of different lengths through
    and reads past the end of key (its result changes between calls with the same values);
    torch_mha raises, naming both lengths, and writes nothing."""
    q, k = torch.randn(2, 4, 5, 8, device=device), torch.randn(2, 4, 6, 8, device=device)
    v = torch.randn(2, 4, 7, 8, device=device)
    with pytest.raises(RuntimeError, match="key length 6 and value length 7"):
        sdpa(q, k, v)
