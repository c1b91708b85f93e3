"""Tests of the core torch_mha operators (torch.ops.torch_mha.*) on every device.

Tests that take the `device` fixture (tests/conftest.py) run on the CPU and on CUDA; the CUDA
cases are reported as skipped where there is no GPU. A few tests are CPU-only by nature and say
why. CUDA-specific tests (CPU vs CUDA agreement, streams, device indices, grid limits) are in
tests/test_cuda.py. Inputs, references, conventions and tolerances: tests/attention_testing.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch
from attention_testing import (
    ALL_DTYPES,
    OPS,
    UNIT_ROUNDOFF,
    Tol,
    assert_close,
    assert_same_metadata,
    averaged_tol,
    check_forward,
    dtype_id,
    expected_forward,
    forward,
    forward_tol,
    grad_tolerance,
    make_mask,
    make_qkv,
    meta_copy,
    opcheck,
    randn,
    reference_grads,
    reference_scores,
    shape_id,
    stats_tol,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

import torch_mha

# =============================================================================================
# 1. Forward


# (L, S) pairs: every length in {1, 63, 64, 65, 127, 128, 129, 200} appears as L and as S, with
# L < S, L > S and L == S, each paired with head/value dims from {1, 3, 16, 17, 64, 80, 128}.
FORWARD_SHAPES = [
    # (N, H, L, S, E, Ev)
    (1, 2, 1, 200, 16, 16),
    (2, 1, 200, 1, 17, 3),
    (1, 2, 63, 129, 3, 17),
    (2, 1, 129, 63, 64, 80),
    (1, 2, 64, 128, 80, 64),
    (1, 2, 128, 64, 128, 128),
    (2, 1, 65, 127, 1, 1),
    (1, 2, 127, 65, 64, 1),
    (1, 2, 64, 64, 16, 17),
    (1, 1, 129, 129, 128, 64),
    (2, 1, 200, 200, 17, 17),
]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", FORWARD_SHAPES, ids=shape_id)
def test_forward_shapes_and_dtypes(shape: Tuple[int, ...], dtype: torch.dtype, device: str) -> None:
    n, h, l, s, e, ev = shape
    q, k, v = make_qkv(n, h, l, s, e, ev, dtype, device=device)
    check_forward(forward(q, k, v), expected_forward(q, k, v), dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(2, 2, 65, 129, 16, 17), (1, 2, 200, 63, 64, 64)], ids=shape_id)
def test_forward_masks_and_causal_every_dtype(
    shape: Tuple[int, ...], dtype: torch.dtype, device: str
) -> None:
    """Float masks of the query's dtype (bf16/fp16 included), key padding, causal masking."""
    n, h, l, s, e, ev = shape
    q, k, v = make_qkv(n, h, l, s, e, ev, dtype, device=device)
    attn_mask = make_mask((h, l, s), "float", dtype, device)
    kpm = make_mask((n, s), "bool" if l < s else "float", dtype, device)
    result = forward(q, k, v, attn_mask, kpm, is_causal=True)
    check_forward(result, expected_forward(q, k, v, attn_mask, kpm, True), dtype)


@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "no_weights"])
def test_forward_need_weights_flag(need_weights: bool, device: str) -> None:
    """need_weights=False returns an empty weights tensor and the same output."""
    q, k, v = make_qkv(2, 2, 70, 130, 16, 8, torch.float64, device=device)
    result = forward(q, k, v, need_weights=need_weights)
    check_forward(result, expected_forward(q, k, v), torch.float64, need_weights)


LAYOUTS = [
    "seq_major",
    "time_major",
    "packed_qkv",
    "strided_last",
    "transposed_last",
    "broadcast_heads",
    "broadcast_rows",
    "mixed",
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_non_contiguous_inputs(layout: str, dtype: torch.dtype, device: str) -> None:
    n, h, l, s, e, ev = (2, 2, 129, 129, 16, 16)
    q, k, v = make_qkv(n, h, l, s, e, ev, dtype, layout, device)
    assert not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous())
    kpm = make_mask((n, s), "bool", device=device)
    check_forward(forward(q, k, v, None, kpm), expected_forward(q, k, v, None, kpm), dtype)
    # The output keeps the query's memory order (heads merge back into the projection layout).
    out = forward(q, k, v)[0]
    order = lambda t: sorted(range(3), key=lambda d: -t.stride(d))  # noqa: E731
    if len(set(q.stride()[:3])) == 3:
        assert order(out) == order(q), (out.stride(), q.stride())


@pytest.mark.parametrize("ls", [(64, 128), (65, 129), (200, 300)], ids=lambda x: f"L{x[0]}_S{x[1]}")
def test_layer_shaped_views_give_the_bits_of_dense_inputs(ls: Tuple[int, int], device: str) -> None:
    """Per-head views of a packed projection (rows 3 * embed apart) are read through a dense copy
    when they are read more than once (CPU); either way the results are bitwise those of the same
    values in dense tensors, forward and backward, and outputs and gradients keep the layout of
    the inputs."""
    l, s = ls
    n, h, d = 2, 3, 16
    torch.manual_seed(0)
    packed_q = torch.randn(n, l, 3 * h * d, device=device)
    packed_kv = torch.randn(n, s, 3 * h * d, device=device)
    packed_grad = torch.randn(n, l, h * d, device=device)

    def heads(t: Tensor, part: int) -> Tensor:
        return t[..., part * h * d : (part + 1) * h * d].unflatten(-1, (h, d)).permute(0, 2, 1, 3)

    grad = packed_grad.unflatten(-1, (h, d)).permute(0, 2, 1, 3)
    views = [heads(packed_q, 0), heads(packed_kv, 1), heads(packed_kv, 2)]
    dense = [t.contiguous() for t in views]
    kpm = make_mask((n, s), "bool", device=device)
    results = []
    for inputs in (views, dense):
        q, k, v = (t.detach().requires_grad_() for t in inputs)
        out, _ = torch_mha.attention(q, k, v, key_padding_mask=kpm)
        # autograd.grad, not .grad: AccumulateGrad may re-lay a leaf's gradient out.
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
    out, grad_q, grad_k, grad_v = results[0]
    # Heads stay interleaved within a row, as in the inputs: a free head merge.
    for t in (out, grad_q, grad_k, grad_v):
        assert t.stride(1) == d and t.stride(3) == 1, t.stride()
    for a, b in zip(*results):
        assert torch.equal(a, b)


MASK_SHAPES = [
    "LS",
    "11LS",
    "N1LS",
    "NHLS",
    "HLS",
    "S",
    "1S",
    "L1",
    "N1L1",
    "expanded_S",
    "expanded_L1",
    "transposed_SL",
    "sliced_NHLS",
]


def attn_mask_of(
    shape_name: str,
    n: int,
    h: int,
    l: int,
    s: int,
    kind: str,
    dtype: torch.dtype,
    device: str = "cpu",
) -> Tensor:
    shapes = {
        "LS": (l, s),
        "11LS": (1, 1, l, s),
        "N1LS": (n, 1, l, s),
        "NHLS": (n, h, l, s),
        "HLS": (h, l, s),
        "S": (s,),
        "1S": (1, s),
        "L1": (l, 1),  # size-1 key dimension, not expanded
        "N1L1": (n, 1, l, 1),
    }
    if shape_name in shapes:
        return make_mask(shapes[shape_name], kind, dtype, device)
    if shape_name == "expanded_S":  # stride 0 in every dimension but the last
        return make_mask((s,), kind, dtype, device).expand(n, h, l, s)
    if shape_name == "expanded_L1":  # one value per query row, broadcast over keys (stride 0)
        return make_mask((n, 1, l, 1), kind, dtype, device).expand(n, h, l, s)
    if shape_name == "transposed_SL":  # key stride L, query stride 1
        return make_mask((s, l), kind, dtype, device).t()
    if shape_name == "sliced_NHLS":  # every stride odd
        return make_mask((n, h + 1, 2 * l, 2 * s + 1), kind, dtype, device)[:, 1:, ::2, 1::2]
    raise ValueError(shape_name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("kind", ["bool", "float_query_dtype", "float32"])
@pytest.mark.parametrize("shape_name", MASK_SHAPES)
def test_forward_attn_mask_shapes(
    shape_name: str, kind: str, dtype: torch.dtype, device: str
) -> None:
    n, h, l, s, e = 2, 3, 65, 130, 8
    q, k, v = make_qkv(n, h, l, s, e, e, dtype, device=device)
    m_dtype = dtype if kind == "float_query_dtype" else torch.float32
    m_kind = "bool" if kind == "bool" else "float"
    attn_mask = attn_mask_of(shape_name, n, h, l, s, m_kind, m_dtype, device)
    check_forward(forward(q, k, v, attn_mask), expected_forward(q, k, v, attn_mask), dtype)


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
def test_forward_key_padding_mask(kind: str, dtype: torch.dtype, layout: str, device: str) -> None:
    n, h, l, s = 3, 2, 64, 129
    q, k, v = make_qkv(n, h, l, s, 17, 9, dtype, device=device)
    if layout == "contiguous":
        kpm = make_mask((n, s), kind, dtype, device)
    elif layout == "transposed":
        kpm = make_mask((s, n), kind, dtype, device).t()
    else:
        kpm = make_mask((n, 3 * s), kind, dtype, device)[:, ::3]
    check_forward(forward(q, k, v, None, kpm), expected_forward(q, k, v, None, kpm), dtype)


@pytest.mark.parametrize(
    "kinds",
    [("bool", "bool"), ("float", "float"), ("bool", "float"), ("float", "bool")],
    ids=lambda k: f"attn_{k[0]}-kpm_{k[1]}",
)
def test_forward_attn_and_key_padding_masks(kinds: Tuple[str, str], device: str) -> None:
    n, h, l, s = 2, 2, 127, 65
    q, k, v = make_qkv(n, h, l, s, 16, 16, torch.float64, device=device)
    attn_mask = make_mask((n, 1, l, s), kinds[0], device=device)
    kpm = make_mask((n, s), kinds[1], torch.float32, device)
    expected = expected_forward(q, k, v, attn_mask, kpm)
    check_forward(forward(q, k, v, attn_mask, kpm), expected, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize(
    "ls",
    [(1, 1), (5, 200), (65, 129), (129, 129), (200, 200), (200, 63), (129, 1)],
    ids=lambda ls: f"L{ls[0]}-S{ls[1]}",
)
def test_forward_causal(ls: Tuple[int, int], dtype: torch.dtype, device: str) -> None:
    """Top-left aligned causal masking with L < S, L == S and L > S, with and without masks."""
    l, s = ls
    q, k, v = make_qkv(1, 2, l, s, 16, 8, dtype, device=device)
    expected = expected_forward(q, k, v, is_causal=True)
    check_forward(forward(q, k, v, is_causal=True), expected, dtype)
    attn_mask = make_mask((l, s), "float", dtype, device)
    kpm = make_mask((1, s), "bool", device=device)
    kpm[:, 0] = False  # keep every row attendable through key 0
    check_forward(
        forward(q, k, v, attn_mask, kpm, is_causal=True),
        expected_forward(q, k, v, attn_mask, kpm, True),
        dtype,
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("scale", [0.0, 0.1, 1.0, 2.5, -0.7])
def test_forward_custom_scale(scale: float, dtype: torch.dtype, device: str) -> None:
    q, k, v = make_qkv(2, 1, 65, 129, 17, 17, dtype, device=device)
    attn_mask = make_mask((65, 129), "bool", device=device)
    check_forward(
        forward(q, k, v, attn_mask, scale=scale),
        expected_forward(q, k, v, attn_mask, scale=scale),
        dtype,
    )


def _fully_masked_cases(n: int, h: int, l: int, s: int) -> Dict[str, dict]:
    """Masks making some query rows fully masked (each a dict of forward kwargs)."""
    kpm = torch.zeros(n, s, dtype=torch.bool)
    kpm[1] = True  # every query of batch 1 sees nothing
    bool_mask = torch.rand(n, h, l, s) < 0.2
    bool_mask[0, 1, 3] = True
    bool_mask[1, 0, [0, 64, l - 1]] = True  # rows in different query tiles
    float_mask = torch.randn(l, s, dtype=torch.float64)
    float_mask[[2, 70]] = -math.inf
    causal_mask = torch.zeros(h, l, s, dtype=torch.float64)
    causal_mask[1, :, 0] = -math.inf  # causal leaves key 0 only for query 0: now nothing
    causal_mask[0, 5, :6] = -math.inf  # query 5 of head 0 sees keys 0..5: all -inf
    return {
        "kpm": dict(key_padding_mask=kpm),
        "bool_attn_mask": dict(attn_mask=bool_mask),
        "float_attn_mask_-inf": dict(attn_mask=float_mask),
        "causal+float_-inf": dict(attn_mask=causal_mask, is_causal=True),
        "float_kpm+zero_mask": dict(
            attn_mask=torch.zeros(1, s, dtype=torch.float64),
            key_padding_mask=torch.where(kpm, -math.inf, 0.0).double(),
        ),
    }


@pytest.mark.parametrize("average", [False, True], ids=["per_head", "averaged"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize(
    "case",
    ["kpm", "bool_attn_mask", "float_attn_mask_-inf", "causal+float_-inf", "float_kpm+zero_mask"],
)
def test_fully_masked_rows(case: str, dtype: torch.dtype, average: bool, device: str) -> None:
    """Fully masked rows: zero output, zero weights, softmax_stats (+inf, 0), zero and finite
    gradients; with average_weights, a row masked in some heads only averages their zeros."""
    n, h, l, s = 2, 2, 130, 129
    kwargs = _fully_masked_cases(n, h, l, s)[case]
    # Float masks take the query's dtype and require grad (their gradients are checked too).
    kwargs = {
        key: (
            val.to(device=device, dtype=dtype).requires_grad_()
            if torch.is_tensor(val) and val.is_floating_point()
            else val.to(device)
            if torch.is_tensor(val)
            else val
        )
        for key, val in kwargs.items()
    }
    masks = {key: val for key, val in kwargs.items() if torch.is_tensor(val) and val.requires_grad}
    q, k, v = make_qkv(n, h, l, s, 16, 16, dtype, device=device)
    for t in (q, k, v):
        t.requires_grad_(True)
    exp = expected_forward(q, k, v, **kwargs)
    assert bool(exp.fully_masked.any())
    out, stats, weights = forward(q, k, v, need_weights=True, average_weights=average, **kwargs)
    check_forward((out.detach(), stats, weights.detach()), exp, dtype, average_weights=average)
    rows = exp.fully_masked
    assert torch.equal(out.detach()[rows], torch.zeros_like(out[rows]))
    # Weights are zero where the row is masked in every head they cover.
    weight_rows = rows.all(1) if average else rows
    assert torch.equal(weights.detach()[weight_rows], torch.zeros_like(weights[weight_rows]))
    if average:
        assert bool((weights.detach()[rows.any(1) & ~rows.all(1)].sum(-1) > 0).all())
    fully_masked_stats = torch.tensor([math.inf, 0.0], dtype=stats.dtype, device=stats.device)
    assert torch.equal(stats[rows], fully_masked_stats.expand(int(rows.sum()), 2))
    assert bool(torch.isfinite(stats[~rows]).all())

    go = randn(*out.shape, dtype=dtype, device=device)
    gw = randn(*weights.shape, dtype=dtype, device=device)
    names = ["query", "key", "value", *masks]
    grads = torch.autograd.grad((out * go).sum() + (weights * gw).sum(), [q, k, v, *masks.values()])
    for g in grads:
        assert bool(torch.isfinite(g).all())
    assert torch.equal(grads[0][rows], torch.zeros_like(grads[0][rows]))
    ref = reference_grads(q, k, v, go, grad_weights=gw, average_weights=average, **kwargs)
    assert set(ref) == set(names)
    for name, g in zip(names, grads):
        assert_close(g, ref[name], grad_tolerance(dtype, ref[name]), name)


def test_no_keys_visible_anywhere(device: str) -> None:
    """Everything masked: the whole output is zero, every gradient zero."""
    q, k, v = make_qkv(1, 2, 70, 130, 8, 8, torch.float32, device=device)
    q.requires_grad_(True)
    k.requires_grad_(True)
    v.requires_grad_(True)
    kpm = torch.ones(1, 130, dtype=torch.bool, device=device)
    for average in (False, True):
        out, stats, w = forward(q, k, v, None, kpm, average_weights=average)
        assert w.shape == ((1, 70, 130) if average else (1, 2, 70, 130))
        assert torch.equal(out, torch.zeros_like(out)) and torch.equal(w, torch.zeros_like(w))
        assert bool(torch.isposinf(stats[..., 0]).all()) and bool((stats[..., 1] == 0).all())
        grads = torch.autograd.grad((out * torch.randn_like(out)).sum() + w.sum(), (q, k, v))
        for g in grads:
            assert torch.equal(g, torch.zeros_like(g))


HUGE_NEGATIVE_MASKS = [
    (torch.float32, -1e9),
    (torch.float32, torch.finfo(torch.float32).min),
    (torch.float64, -1e20),
    (torch.float64, torch.finfo(torch.float64).min),
    (torch.bfloat16, torch.finfo(torch.bfloat16).min),
]


@pytest.mark.parametrize("average", [False, True], ids=["per_head", "averaged"])
@pytest.mark.parametrize("via", ["attn_mask", "key_padding_mask"])
@pytest.mark.parametrize(
    "dtype,value",
    HUGE_NEGATIVE_MASKS,
    ids=[f"{dtype_id(d)}_{v:.0e}" for d, v in HUGE_NEGATIVE_MASKS],
)
def test_huge_finite_negative_masks(
    dtype: torch.dtype, value: float, via: str, average: bool, device: str
) -> None:
    """Regression: masks of a huge finite negative number (masked_fill(m, -1e9), finfo.min).

    A row whose every key carries that value is not fully masked: its scores s_j + value all
    round to `value` in the accumulate dtype, so the row is exactly uniform (weights 1/S, output
    the mean of V), and the softmax gradient dS = P (dP - delta) with P = 1/S is NOT zero. With
    a single log-sum-exp lse = max + log(S), log(S) is rounded away next to |value|, and
    exp(s - lse) = 1 instead of 1/S: weights and gradients S times too large (PyTorch's CPU
    flash SDPA backward has exactly this bug). softmax_stats keeps (offset, log_sum) apart.

    Expectations, derived independently of the kernel:
    * float64 reference.py with every `value` replaced by -1e300, which the float64 scores are
      absorbed into as well (|s| << ulp(1e300)): the same exactly-uniform rows, zero weight on
      the partially masked keys, and autograd's gradients of that math;
    * for float32/float64, autograd through torch.softmax(scores + mask) in the same dtype,
      the exact-math path of nn.MultiheadAttention(need_weights=True).
    """
    n, h, l, s, e = 2, 2, 70, 130, 16  # crosses a query tile (64) and a key tile (128)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    q, k, v = (t.requires_grad_() for t in make_qkv(n, h, l, s, e, e, dtype, device=device))
    if via == "attn_mask":
        mask = torch.zeros(l, s, dtype=dtype, device=device)
        mask[[1, 65]] = value  # every key of queries 1 and 65: uniform rows in two query tiles
        mask[3, ::2] = value  # half the keys
        mask[66, 100:] = value  # the keys across the key-tile boundary
        uniform = torch.zeros(n, h, l, dtype=torch.bool, device=device)
        uniform[:, :, [1, 65]] = True
    else:
        mask = torch.zeros(n, s, dtype=dtype, device=device)
        mask[0] = value  # every query of batch 0 sees only huge negative keys
        mask[1, ::3] = value
        uniform = torch.zeros(n, h, l, dtype=torch.bool, device=device)
        uniform[0] = True
    assert float(mask.min()) == value  # the value is exact in the dtype
    mask.requires_grad_()
    masks = {via: mask}
    # The premise: in the kernel's accumulate dtype every score of a uniform row is absorbed.
    scores = reference_scores(q, k, None, None, False, None).to(acc)
    assert bool((scores + torch.tensor(value, dtype=acc, device=device) == value).all())

    out, stats, w = forward(q, k, v, need_weights=True, average_weights=average, **masks)
    assert w.shape == ((n, l, s) if average else (n, h, l, s))

    # softmax_stats: offset = value exactly, log_sum = log(S) on the uniform rows (a single
    # float32 lse would have lost the log(S)); the other rows as the float64 reference says.
    offset, log_sum = stats[..., 0], stats[..., 1]
    assert bool((offset[uniform] == value).all())
    log_s = torch.full((int(uniform.sum()),), math.log(s), dtype=torch.float64, device=device)
    assert_close(log_sum[uniform], log_s, stats_tol(dtype), "log_sum of the uniform rows")
    exp_true = expected_forward(q, k, v, **masks)
    assert_close(offset[~uniform], exp_true.row_max[~uniform], stats_tol(dtype), "offset")
    assert_close(log_sum[~uniform], exp_true.log_sum[~uniform], stats_tol(dtype), "log_sum")

    # Forward against the float64 reference with the absorbed replacement value.
    mask64 = torch.where(mask.detach() == value, -1e300, mask.detach().double()).requires_grad_()
    exp = expected_forward(q, k, v, **{via: mask64})
    assert bool((exp.weights[uniform] == 1.0 / s).all())  # the reference's rows are uniform
    assert_close(out, exp.output, forward_tol(dtype), "output")
    ref_w = exp.averaged_weights if average else exp.weights
    assert_close(w, ref_w, forward_tol(dtype), "weights")
    rows = uniform.all(1) if average else uniform
    uniform_w = w.detach()[rows]
    assert torch.equal(uniform_w, uniform_w[:, :1].expand_as(uniform_w))  # all keys alike
    assert_close(
        uniform_w,
        torch.full_like(uniform_w, 1.0 / s, dtype=torch.float64),
        forward_tol(dtype),
        "uniform weights 1/S",
    )

    go = randn(*out.shape, dtype=dtype, device=device)
    gw = randn(*w.shape, dtype=dtype, device=device)
    inputs = [q, k, v, mask]
    grads = torch.autograd.grad((out * go).sum() + (w * gw).sum(), inputs)
    names = ("query", "key", "value", via)
    ref = reference_grads(q, k, v, go, grad_weights=gw, average_weights=average, **{via: mask64})
    for name, g in zip(names, grads):
        assert_close(g, ref[name], grad_tolerance(dtype, ref[name]), name)
    # The uniform rows do get gradients (a single-lse backward gives S times these).
    q_rows = grads[0][uniform]
    assert float(q_rows.abs().max()) > 1e-3

    if dtype in (torch.float32, torch.float64):
        # The exact-math path in the same dtype (nn.MultiheadAttention's need_weights=True).
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        qq, kk, vv, mm = leaves
        sc = qq @ kk.transpose(-1, -2) * (1.0 / math.sqrt(e))
        sc = sc + (mm if via == "attn_mask" else mm[:, None, None, :])
        probs = torch.softmax(sc, dim=-1)
        math_out = probs @ vv
        math_w = probs.mean(1) if average else probs
        assert_close(out, math_out, forward_tol(dtype), "output vs torch.softmax path")
        assert_close(w, math_w, forward_tol(dtype), "weights vs torch.softmax path")
        math_grads = torch.autograd.grad((math_out * go).sum() + (math_w * gw).sum(), leaves)
        for name, g, g_math in zip(names, grads, math_grads):
            assert_close(g, g_math, grad_tolerance(dtype, g_math), f"{name} vs torch.softmax")


EMPTY_SHAPES = [
    (1, 2, 0, 5, 4, 4),
    (1, 2, 5, 0, 4, 4),
    (0, 2, 5, 5, 4, 4),
    (1, 0, 5, 5, 4, 4),
    (1, 2, 5, 6, 0, 4),
    (1, 2, 5, 6, 4, 0),
    (1, 1, 70, 130, 0, 3),
]


def _assert_runs_in_subprocess(code: str) -> None:
    """Runs `code` (after importing torch and torch_mha) in a fresh interpreter and fails,
    with the code as a repro, if it dies by a signal or raises."""
    import subprocess
    import sys

    program = "import torch, torch_mha\n" + code
    proc = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=120
    )
    how = f"was killed by signal {-proc.returncode}" if proc.returncode < 0 else "failed"
    assert proc.returncode == 0, (
        f"the process {how} running:\n{program}\nstderr:\n{proc.stderr[-2000:]}"
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=shape_id)
def test_empty_dimensions(shape: Tuple[int, ...], dtype: torch.dtype, device: str) -> None:
    """Zero-sized batch, heads, lengths or head dims: forward and backward vs the reference.

    S = 0 leaves every query without keys (zero output, softmax_stats (+inf, 0)); E = 0 gives
    equal scores (uniform weights, default scale 1). Per-head and head-averaged weights.
    """
    n, h, l, s, e, ev = shape
    q, k, v = (t.requires_grad_() for t in make_qkv(n, h, l, s, e, ev, dtype, device=device))
    if h == 0:
        # Averaging over zero heads has crashed the process (integer division by zero in the
        # CPU weights kernel, SIGFPE): try it in a child process first, so that a crash fails
        # this test instead of killing the test run.
        where = f"dtype=torch.{dtype_id(dtype)}, device='{device}'"
        _assert_runs_in_subprocess(
            f"q = torch.randn({n}, 0, {l}, {e}, {where})\n"
            f"v = torch.randn({n}, 0, {s}, {ev}, {where})\n"
            f"k = torch.randn({n}, 0, {s}, {e}, {where})\n"
            "torch.ops.torch_mha.attention_forward(q, k, v, need_weights=True, "
            "average_weights=True)\n"
        )
    for average in (False, True):
        out, stats, w = forward(q, k, v, average_weights=average)
        check_forward(
            (out.detach(), stats, w.detach()),
            expected_forward(q, k, v),
            dtype,
            average_weights=average,
        )
        go, gw = torch.randn_like(out), torch.randn_like(w)
        grads = torch.autograd.grad((out * go).sum() + (w * gw).sum(), (q, k, v), allow_unused=True)
        ref = reference_grads(q, k, v, go, grad_weights=gw, average_weights=average)
        for name, g, t in zip(("query", "key", "value"), grads, (q, k, v)):
            assert g is not None and g.shape == t.shape, name
            assert_close(g, ref[name], grad_tolerance(dtype, ref[name]), name)


@pytest.mark.parametrize("upstream", ["sum", "transposed", "weights_sum", "weights_transposed"])
def test_backward_strided_upstream_gradients(upstream: str, device: str) -> None:
    """Gradients arriving with stride 0 or transposed layouts (grad_output and grad_weights)."""
    n, h, l, s, e, ev = 2, 2, 70, 130, 16, 8
    q, k, v = (
        t.requires_grad_() for t in make_qkv(n, h, l, s, e, ev, torch.float64, device=device)
    )
    out, _, w = forward(q, k, v, need_weights=True)
    go = torch.zeros(n, h, l, ev, dtype=torch.float64, device=device)
    gw = torch.zeros(n, h, l, s, dtype=torch.float64, device=device)
    if upstream == "sum":  # grad_output is an expanded scalar
        loss = out.sum()
        go += 1
    elif upstream == "transposed":
        x = randn(n, l, h, ev, device=device)
        loss = (out.transpose(1, 2) * x).sum()
        go += x.transpose(1, 2)
    elif upstream == "weights_sum":  # grad_weights is an expanded scalar
        loss = out.sum() + w.sum()
        go += 1
        gw += 1
    else:
        x = randn(n, h, s, l, device=device)
        loss = (w.transpose(-1, -2) * x).sum()
        gw += x.transpose(-1, -2)
    grads = torch.autograd.grad(loss, (q, k, v))
    ref = reference_grads(q, k, v, go, grad_weights=gw)
    for name, g in zip(("query", "key", "value"), grads):
        assert_close(g, ref[name], grad_tolerance(torch.float64, ref[name]), name)


def _qkv_small(
    dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> Tuple[Tensor, Tensor, Tensor]:
    return make_qkv(1, 2, 5, 6, 4, 4, dtype, device=device)


ARGUMENT_ERRORS: Dict[str, Tuple[Callable[[Tensor, Tensor, Tensor], object], type, str]] = {
    "mask_float64_for_float32": (
        lambda q, k, v: OPS.attention_forward(
            q, k, v, torch.zeros(5, 6, dtype=torch.float64, device=q.device)
        ),
        RuntimeError,
        "attn_mask must be a bool tensor",
    ),
    "mask_int": (
        lambda q, k, v: OPS.attention_forward(
            q, k, v, torch.zeros(5, 6, dtype=torch.int32, device=q.device)
        ),
        RuntimeError,
        "attn_mask must be a bool tensor",
    ),
    "mask_not_broadcastable": (
        lambda q, k, v: OPS.attention_forward(q, k, v, torch.zeros(5, 7, device=q.device)),
        RuntimeError,
        "broadcastable",
    ),
    "kpm_shape": (
        lambda q, k, v: OPS.attention_forward(
            q, k, v, None, torch.zeros(6, dtype=torch.bool, device=q.device)
        ),
        RuntimeError,
        "key_padding_mask of shape",
    ),
    "dropout_without_seed": (
        lambda q, k, v: OPS.attention_forward(q, k, v, dropout_p=0.5),
        RuntimeError,
        "dropout_seed",
    ),
    "dropout_p_one": (
        lambda q, k, v: OPS.attention_forward(
            q, k, v, dropout_p=1.0, dropout_seed=torch.tensor([1], device=q.device)
        ),
        ValueError,
        "dropout_p must be in",
    ),
    "seed_float": (
        lambda q, k, v: OPS.attention_forward(
            q, k, v, dropout_p=0.5, dropout_seed=torch.tensor([1.0], device=q.device)
        ),
        RuntimeError,
        "int64 tensor with one element",
    ),
    "mixed_dtypes": (
        lambda q, k, v: OPS.attention_forward(q, k.double(), v),
        RuntimeError,
        "same dtype",
    ),
    "three_dims": (
        lambda q, k, v: OPS.attention_forward(q[0], k[0], v[0]),
        RuntimeError,
        "3-D tensor",
    ),
    "head_dim_mismatch": (
        lambda q, k, v: OPS.attention_forward(q, k[..., :3], v),
        RuntimeError,
        "same head_dim",
    ),
    "integer_inputs": (
        lambda q, k, v: OPS.attention_forward(q.int(), k.int(), v.int()),
        RuntimeError,
        "expected query of dtype",
    ),
}


@pytest.mark.parametrize("case", list(ARGUMENT_ERRORS))
def test_argument_errors(case: str, device: str) -> None:
    fn, error, message = ARGUMENT_ERRORS[case]
    q, k, v = _qkv_small(device=device)
    with pytest.raises(error, match=message):
        fn(q, k, v)
    # The Meta kernel runs the same checks.
    with pytest.raises(error, match=message):
        fn(*(t.to("meta") for t in (q, k, v)))


# Arguments on another device than the query. With a CUDA query the other device is the CPU
# (the case users hit: a mask or seed left on the host); with a CPU query it is "meta", the
# only other device a CPU-only machine has. Each error names the argument.
DEVICE_MISMATCH_ERRORS: Dict[str, Tuple[Callable[..., object], str]] = {
    "attn_mask": (
        lambda q, k, v, other: OPS.attention_forward(q, k, v, torch.zeros(5, 6, device=other)),
        "expected attn_mask on the same device as query",
    ),
    "bool_attn_mask": (
        lambda q, k, v, other: OPS.attention_forward(
            q, k, v, torch.zeros(5, 6, dtype=torch.bool, device=other)
        ),
        "expected attn_mask on the same device as query",
    ),
    "key_padding_mask": (
        lambda q, k, v, other: OPS.attention_forward(
            q, k, v, None, torch.zeros(1, 6, dtype=torch.bool, device=other)
        ),
        "expected key_padding_mask on the same device as query",
    ),
    "key": (
        lambda q, k, v, other: OPS.attention_forward(q, k.to(other), v),
        "expected query, key and value on the same device",
    ),
    "value": (
        lambda q, k, v, other: OPS.attention_forward(q, k, v.to(other)),
        "expected query, key and value on the same device",
    ),
    "dropout_seed": (
        lambda q, k, v, other: OPS.attention_forward(
            q, k, v, dropout_p=0.5, dropout_seed=torch.tensor([1], device=other)
        ),
        "expected dropout_seed on",
    ),
    "backward_grad_output": (
        lambda q, k, v, other: OPS.attention_backward(
            *_backward_args_with_grad_output_on(q, k, v, other)
        ),
        "expected grad_output on",
    ),
}


def _backward_args_with_grad_output_on(q: Tensor, k: Tensor, v: Tensor, other: str) -> tuple:
    out, stats, _ = OPS.attention_forward(q, k, v)
    go = torch.ones(out.shape, dtype=out.dtype, device=other)
    return (go, q, k, v, out, stats, None, None, False, None, 0.0, None, None, False, False)


@pytest.mark.parametrize("case", list(DEVICE_MISMATCH_ERRORS))
def test_device_mismatch_errors(case: str, device: str) -> None:
    fn, message = DEVICE_MISMATCH_ERRORS[case]
    q, k, v = _qkv_small(device=device)
    other = "cpu" if torch.device(device).type == "cuda" else "meta"
    with pytest.raises(RuntimeError, match=message):
        fn(q, k, v, other)


# The device fixture is a constant string, so sharing it across examples is safe.
@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    l=st.integers(1, 140),
    s=st.integers(1, 140),
    e=st.integers(1, 20),
    ev=st.integers(1, 20),
    causal=st.booleans(),
    mask_kind=st.sampled_from(["none", "bool", "float"]),
    kpm_kind=st.sampled_from(["none", "bool", "float"]),
    layout=st.sampled_from(["contiguous", "seq_major", "strided_last", "mixed"]),
)
def test_forward_backward_random_problems(
    device: str,
    l: int,
    s: int,
    e: int,
    ev: int,
    causal: bool,
    mask_kind: str,
    kpm_kind: str,
    layout: str,
) -> None:
    """Random shapes, masks and layouts in float64: forward and gradients vs the reference."""
    torch.manual_seed(l * 1000 + s)
    n, h = 1, 2
    q, k, v = make_qkv(n, h, l, s, e, ev, torch.float64, layout, device)
    mask_shape = (h, 1, s) if l % 2 else (l, s)
    attn_mask = None if mask_kind == "none" else make_mask(mask_shape, mask_kind, device=device)
    kpm = None if kpm_kind == "none" else make_mask((n, s), kpm_kind, device=device)
    check_forward(
        forward(q, k, v, attn_mask, kpm, causal),
        expected_forward(q, k, v, attn_mask, kpm, causal),
        torch.float64,
    )
    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = forward(qg, kg, vg, attn_mask, kpm, causal, need_weights=False)[0]
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (qg, kg, vg), go)
    ref = reference_grads(q, k, v, go, attn_mask, kpm, causal)
    for name, g in zip(("query", "key", "value"), grads):
        assert_close(g, ref[name], grad_tolerance(torch.float64, ref[name]), name)


# =============================================================================================
# 2. Backward


@dataclass
class GradCase:
    name: str
    shape: Tuple[int, int, int, int, int, int]
    attn_mask: Optional[Callable[[int, int, int, int], Tensor]] = None
    kpm: Optional[Callable[[int, int], Tensor]] = None
    is_causal: bool = False
    scale: Optional[float] = None
    weights_grad: bool = False
    output_grad: bool = True
    layout: str = "contiguous"
    expand_mask: bool = False
    average_weights: bool = False  # weights (and their gradient) averaged over heads


GRAD_CASES = [
    GradCase("plain", (2, 2, 65, 129, 16, 17)),
    GradCase("long_keys", (1, 1, 63, 300, 64, 64)),
    # N*H = 2 -> 8 dQ chunks over 10 key blocks: chunks of unequal size.
    GradCase("uneven_dq_chunks", (1, 2, 65, 1200, 16, 16)),
    GradCase("causal_L>S", (1, 2, 200, 129, 17, 3), is_causal=True),
    GradCase("causal_L<S", (1, 2, 64, 200, 16, 16), is_causal=True),
    GradCase(
        "float_mask_LS+float_kpm",
        (2, 2, 65, 127, 16, 16),
        attn_mask=lambda n, h, l, s: randn(l, s).requires_grad_(),
        kpm=lambda n, s: randn(n, s).requires_grad_(),
    ),
    GradCase(
        "float_mask_1H1S",
        (2, 3, 64, 129, 8, 8),
        attn_mask=lambda n, h, l, s: randn(1, h, 1, s).requires_grad_(),
    ),
    GradCase(
        "float_mask_HLS_f32+bool_kpm",
        (2, 2, 70, 70, 8, 8),
        attn_mask=lambda n, h, l, s: randn(h, l, s, dtype=torch.float32).requires_grad_(),
        kpm=lambda n, s: torch.rand(n, s) < 0.3,
    ),
    GradCase(
        "float_mask_S+causal",
        (1, 2, 129, 129, 8, 8),
        attn_mask=lambda n, h, l, s: randn(s).requires_grad_(),
        is_causal=True,
    ),
    GradCase(
        "float_mask_expanded",
        (2, 2, 65, 65, 8, 8),
        # A non-leaf stride-0 view: the gradient reaches the (L, 1) leaf through expand.
        attn_mask=lambda n, h, l, s: randn(l, 1).requires_grad_(),
        expand_mask=True,
    ),
    GradCase("weights_and_output", (2, 2, 65, 129, 16, 16), weights_grad=True),
    GradCase("weights_only", (1, 2, 64, 130, 16, 8), weights_grad=True, output_grad=False),
    GradCase(
        "weights+masks+causal+scale",
        (2, 1, 129, 200, 16, 16),
        attn_mask=lambda n, h, l, s: randn(n, 1, l, s).requires_grad_(),
        kpm=lambda n, s: randn(n, s).requires_grad_(),
        is_causal=True,
        scale=-0.3,
        weights_grad=True,
    ),
    GradCase("packed_qkv_layout", (2, 2, 129, 129, 16, 16), layout="packed_qkv", weights_grad=True),
    # Gradients through head-averaged weights (N, L, S): the kernel recomputes the weights term
    # with each head's share 1/H of the averaged gradient.
    GradCase(
        "averaged_weights_and_output",
        (2, 3, 65, 129, 16, 16),
        weights_grad=True,
        average_weights=True,
    ),
    GradCase(
        "averaged_weights_only",
        (1, 4, 64, 130, 16, 8),
        weights_grad=True,
        output_grad=False,
        average_weights=True,
    ),
    GradCase(
        "averaged_weights+masks+causal+scale",
        (2, 3, 129, 200, 16, 16),
        attn_mask=lambda n, h, l, s: randn(1, h, l, s).requires_grad_(),
        kpm=lambda n, s: randn(n, s).requires_grad_(),
        is_causal=True,
        scale=0.7,
        weights_grad=True,
        average_weights=True,
    ),
    GradCase(
        "averaged_weights_mixed_layout",
        (2, 2, 65, 130, 16, 16),
        layout="mixed",
        weights_grad=True,
        average_weights=True,
    ),
    GradCase("mixed_layout", (2, 2, 65, 130, 16, 16), layout="mixed"),
    GradCase("broadcast_kv", (2, 2, 65, 130, 16, 16), layout="broadcast_heads"),
]


def _run_grad_case(case: GradCase, dtype: torch.dtype, device: str = "cpu") -> None:
    n, h, l, s, e, ev = case.shape
    q, k, v = make_qkv(n, h, l, s, e, ev, dtype, case.layout, device)
    # Leaves (views of a base where the layout says so) that require grad.
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))

    def in_dtype(t: Optional[Tensor]) -> Optional[Tensor]:
        # Masks move to the device as leaves; float64 masks take the query's dtype, the
        # float32 mask case stays float32.
        if t is None:
            return t
        to_dtype = dtype if t.dtype == torch.float64 else t.dtype
        return t.detach().to(device=device, dtype=to_dtype).requires_grad_(t.requires_grad)

    mask_leaf = in_dtype(case.attn_mask(n, h, l, s)) if case.attn_mask else None
    attn_mask = mask_leaf
    if mask_leaf is not None and case.expand_mask:
        attn_mask = mask_leaf.expand(n, h, l, s)  # stride-0 view of the leaf
    kpm = in_dtype(case.kpm(n, s)) if case.kpm else None

    out, _, weights = forward(
        q,
        k,
        v,
        attn_mask,
        kpm,
        case.is_causal,
        case.scale,
        need_weights=case.weights_grad,
        average_weights=case.average_weights,
    )
    if case.weights_grad:
        assert weights.shape == ((n, l, s) if case.average_weights else (n, h, l, s))
    go = (
        randn(*out.shape, dtype=dtype, device=device) if case.output_grad else torch.zeros_like(out)
    )
    gw = randn(*weights.shape, dtype=dtype, device=device) if case.weights_grad else None
    loss = (out * go).sum()
    if gw is not None:
        loss = (weights * gw).sum() + (loss if case.output_grad else 0)
    inputs: Dict[str, Tensor] = {"query": q, "key": k, "value": v}
    if mask_leaf is not None and mask_leaf.requires_grad:
        inputs["attn_mask"] = mask_leaf
    if kpm is not None and kpm.requires_grad:
        inputs["key_padding_mask"] = kpm
    grads = dict(zip(inputs, torch.autograd.grad(loss, list(inputs.values()))))

    ref = reference_grads(
        q,
        k,
        v,
        go,
        attn_mask,
        kpm,
        case.is_causal,
        case.scale,
        gw,
        average_weights=case.average_weights,
    )
    if "attn_mask" in ref:
        ref["attn_mask"] = ref["attn_mask"].sum_to_size(mask_leaf.shape)
    assert set(grads) == set(ref), (set(grads), set(ref))
    for name, g in grads.items():
        assert g.shape == inputs[name].shape and g.dtype == inputs[name].dtype, name
        # A float32 mask of a float64 query gets its float64 gradient rounded to float32.
        tol_dtype = max(dtype, g.dtype, key=lambda d: UNIT_ROUNDOFF[d])
        assert_close(g, ref[name], grad_tolerance(tol_dtype, ref[name]), name)


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: c.name)
def test_backward_float64_vs_reference(case: GradCase, device: str) -> None:
    _run_grad_case(case, torch.float64, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize(
    "case",
    [
        c
        for c in GRAD_CASES
        if c.name
        in (
            "plain",
            "causal_L>S",
            "weights+masks+causal+scale",
            "float_mask_LS+float_kpm",
            "mixed_layout",
            "averaged_weights+masks+causal+scale",
        )
    ],
    ids=lambda c: c.name,
)
def test_backward_low_precision_vs_reference(
    case: GradCase, dtype: torch.dtype, device: str
) -> None:
    _run_grad_case(case, dtype, device)


def _gradcheck_inputs(
    l: int = 5, s: int = 7, e: int = 4, ev: int = 3, n: int = 2, h: int = 2, device: str = "cpu"
) -> Tuple[Tensor, Tensor, Tensor]:
    q, k, v = make_qkv(n, h, l, s, e, ev, torch.float64, device=device)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_()


GRADCHECK_CASES: Dict[str, dict] = {
    "plain": dict(),
    "scale": dict(scale=-1.3),
    "causal": dict(is_causal=True),
    "causal_L>S": dict(is_causal=True, l=9, s=4),
    "bool_masks": dict(attn_mask="bool", kpm="bool"),
    "fully_masked_row": dict(attn_mask="bool_full_row"),
    "mask_grads": dict(attn_mask="float_grad", kpm="float_grad"),
    "mask_grad_broadcast": dict(attn_mask="float_grad_H1S"),
    "dropout": dict(dropout_p=0.4),
    "weights": dict(need_weights=True),
    "weights+dropout+masks+causal": dict(
        need_weights=True, dropout_p=0.3, attn_mask="float_grad", kpm="float_grad", is_causal=True
    ),
    "tile_crossing": dict(l=66, s=130, e=2, ev=1, n=1, h=1, attn_mask="float_grad", fast=True),
    "averaged_weights": dict(need_weights=True, average_weights=True, h=3),
    "averaged_weights+masks+causal": dict(
        need_weights=True,
        average_weights=True,
        attn_mask="float_grad",
        kpm="float_grad",
        is_causal=True,
        h=3,
    ),
    "averaged_weights+dropout+masks+causal": dict(
        need_weights=True,
        average_weights=True,
        dropout_p=0.3,
        attn_mask="float_grad_H1S",
        kpm="bool",
        is_causal=True,
        h=3,
    ),
    "averaged_weights+fully_masked_row": dict(
        need_weights=True, average_weights=True, attn_mask="bool_full_row"
    ),
}


@pytest.mark.parametrize("name", list(GRADCHECK_CASES))
def test_gradcheck(name: str, device: str) -> None:
    """float64 gradcheck (float64 runs on CUDA too, with float64 accumulation)."""
    cfg = dict(GRADCHECK_CASES[name])
    dims = {key: cfg.pop(key) for key in ("l", "s", "e", "ev", "n", "h") if key in cfg}
    fast = cfg.pop("fast", False)
    q, k, v = _gradcheck_inputs(**dims, device=device)
    n, h, l, s = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    attn_kind, kpm_kind = cfg.pop("attn_mask", None), cfg.pop("kpm", None)
    attn_mask = {
        None: None,
        "bool": (torch.rand(l, s) < 0.3).to(device),
        "bool_full_row": torch.zeros(n, 1, l, s, dtype=torch.bool)
        .index_fill_(2, torch.tensor([1]), True)
        .to(device),
        "float_grad": randn(n, h, l, s, requires_grad=True, device=device),
        "float_grad_H1S": randn(h, 1, s, requires_grad=True, device=device),
    }[attn_kind]
    kpm = {
        None: None,
        "bool": (torch.rand(n, s) < 0.3).to(device),
        "float_grad": randn(n, s, requires_grad=True, device=device),
    }[kpm_kind]
    is_causal = cfg.pop("is_causal", False)
    scale = cfg.pop("scale", None)
    dropout_p = cfg.pop("dropout_p", 0.0)
    need_weights = cfg.pop("need_weights", False)
    average_weights = cfg.pop("average_weights", False)
    assert not cfg
    seed = torch.tensor([987654321], dtype=torch.long, device=device) if dropout_p > 0 else None

    inputs: List[Tensor] = [q, k, v]
    if attn_mask is not None and attn_mask.requires_grad:
        inputs.append(attn_mask)
    if kpm is not None and kpm.requires_grad:
        inputs.append(kpm)

    def fn(*args: Tensor) -> Tuple[Tensor, ...]:
        qq, kk, vv = args[:3]
        rest = list(args[3:])
        am = rest.pop(0) if attn_mask is not None and attn_mask.requires_grad else attn_mask
        kp = rest.pop(0) if kpm is not None and kpm.requires_grad else kpm
        out, _, w = OPS.attention_forward(
            qq, kk, vv, am, kp, is_causal, scale, dropout_p, seed, need_weights, average_weights
        )
        if need_weights:
            assert w.dim() == (3 if average_weights else 4)
        return (out, w) if need_weights else (out,)

    assert torch.autograd.gradcheck(fn, tuple(inputs), fast_mode=fast)


@pytest.mark.parametrize("how", ["gradgradcheck", "create_graph"])
def test_double_backward_raises(how: str, device: str) -> None:
    q, k, v = _gradcheck_inputs(device=device)

    def fn(qq: Tensor, kk: Tensor, vv: Tensor) -> Tensor:
        return OPS.attention_forward(qq, kk, vv)[0]

    with pytest.raises(RuntimeError, match="double backward"):
        if how == "gradgradcheck":
            torch.autograd.gradgradcheck(fn, (q, k, v))
        else:
            out = fn(q, k, v)
            (gq,) = torch.autograd.grad(out.pow(2).sum(), (q,), create_graph=True)
            torch.autograd.grad(gq.sum(), (q, k, v))


# =============================================================================================
# 3. Dropout


def _dropout_run(
    seed: int, p: float, dtype: torch.dtype, device: str = "cpu"
) -> Tuple[Tensor, Tensor, Tuple[Tensor, ...]]:
    torch.manual_seed(1)  # same q, k, v for every seed
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 2, 70, 130, 8, 8, dtype, device=device))
    out, _, w = forward(q, k, v, dropout_p=p, seed=seed, need_weights=True)
    go = torch.ones_like(out)
    grads = torch.autograd.grad((out * go).sum() + w.sum(), (q, k, v))
    return out.detach(), w.detach(), grads


def test_dropout_same_seed_identical_different_seed_different(device: str) -> None:
    out1, w1, g1 = _dropout_run(1234, 0.3, torch.float32, device)
    out2, w2, g2 = _dropout_run(1234, 0.3, torch.float32, device)
    out3, w3, g3 = _dropout_run(1235, 0.3, torch.float32, device)
    assert torch.equal(out1, out2) and torch.equal(w1, w2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
    assert not torch.equal(w1 == 0, w3 == 0)
    assert not torch.equal(out1, out3)
    for a, b in zip(g1, g3):
        assert not torch.equal(a, b)


def test_dropout_python_wrapper_uses_default_generator(device: str) -> None:
    """The seed is drawn on the query's device from its default generator (the CUDA generator
    for CUDA inputs), which torch.manual_seed seeds on every device."""
    q, k, v = make_qkv(1, 2, 65, 129, 8, 8, torch.float32, device=device)
    torch.manual_seed(7)
    out1, w1 = torch_mha.attention(q, k, v, dropout_p=0.5, need_weights=True)
    torch.manual_seed(7)
    out2, w2 = torch_mha.attention(q, k, v, dropout_p=0.5, need_weights=True)
    out3, w3 = torch_mha.attention(q, k, v, dropout_p=0.5, need_weights=True)
    assert torch.equal(out1, out2) and torch.equal(w1, w2)
    assert not torch.equal(w1 == 0, w3 == 0)
    out4, w4 = torch_mha.attention(q, k, v)
    assert w4 is None
    assert_close(out4, expected_forward(q, k, v).output, forward_tol(torch.float32))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_rate(p: float, device: str) -> None:
    n, h, l, s = 2, 2, 128, 256
    q, k, v = make_qkv(n, h, l, s, 8, 8, torch.float32, device=device)
    _, _, w = forward(q, k, v, dropout_p=p, seed=20240611 + int(p * 10), need_weights=True)
    # Without masks every probability is > 0, so a zero weight is exactly a dropped element.
    total = w.numel()
    dropped = int((w == 0).sum())
    rate = dropped / total
    sigma = math.sqrt(p * (1 - p) / total)
    assert abs(rate - p) < 6 * sigma, (rate, p, sigma)
    # Kept weights are the probabilities scaled by 1 / (1 - p).
    exp = expected_forward(q, k, v)
    kept = w != 0
    assert_close(w[kept], exp.weights[kept] / (1 - p), Tol(1e-5 / (1 - p), 1e-5))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("p", [0.2, 0.6])
def test_dropout_output_is_weights_times_value(p: float, dtype: torch.dtype, device: str) -> None:
    n, h, l, s = 2, 2, 129, 200
    q, k, v = make_qkv(n, h, l, s, 16, 24, dtype, device=device)
    kpm = make_mask((n, s), "bool", device=device)
    out, _, w = forward(q, k, v, None, kpm, True, dropout_p=p, seed=99, need_weights=True)
    assert bool((w == 0).any())
    assert_close(out, w.double() @ v.double(), forward_tol(dtype))


@pytest.mark.parametrize(
    "config",
    [
        dict(),
        dict(is_causal=True),
        dict(masks=True),
        dict(masks=True, is_causal=True, scale=0.8),
    ],
    ids=["plain", "causal", "masks", "masks+causal+scale"],
)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_forward_and_backward_use_the_same_mask(
    config: dict, p: float, device: str
) -> None:
    """Gradients equal autograd through the reference with the mask the forward returned."""
    n, h, l, s = 2, 2, 129, 130
    q, k, v = (
        t.requires_grad_() for t in make_qkv(n, h, l, s, 16, 8, torch.float64, device=device)
    )
    attn_mask = randn(h, l, s, requires_grad=True, device=device) if config.get("masks") else None
    kpm = make_mask((n, s), "bool", device=device) if config.get("masks") else None
    is_causal = config.get("is_causal", False)
    scale = config.get("scale")
    out, _, w = forward(q, k, v, attn_mask, kpm, is_causal, scale, p, seed=4242, need_weights=True)
    probs = expected_forward(q, k, v, attn_mask, kpm, is_causal, scale).weights
    visible = probs > 0
    # The forward's dropout mask, read off the returned weights: a visible probability is
    # never 0 here, so a zero weight means dropped. Factors: 0 or 1 / (1 - p).
    factors = (w.detach() != 0).double() / (1.0 - p)
    exp = expected_forward(q, k, v, attn_mask, kpm, is_causal, scale, factors)
    assert_close(out, exp.output, forward_tol(torch.float64), "output")
    assert_close(w, exp.weights, forward_tol(torch.float64), "weights")
    dropped_fraction = float((w[visible] == 0).double().mean())
    assert abs(dropped_fraction - p) < 0.05

    go = torch.randn_like(out)
    gw = torch.randn_like(w)
    inputs = [q, k, v] + ([attn_mask] if attn_mask is not None else [])
    grads = torch.autograd.grad((out * go).sum() + (w * gw).sum(), inputs)
    ref = reference_grads(q, k, v, go, attn_mask, kpm, is_causal, scale, gw, factors)
    for name, g in zip(("query", "key", "value", "attn_mask"), grads):
        assert_close(g, ref[name], grad_tolerance(torch.float64, ref[name]), name)


# ---- Independent Philox4x32-10 (Salmon et al., SC'11; same layout as ATen's philox_engine).

_M32 = 0xFFFFFFFF


def philox4x32_10(counter: Sequence[int], key: Sequence[int]) -> Tuple[int, int, int, int]:
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for round_index in range(10):
        if round_index > 0:
            k0 = (k0 + 0x9E3779B9) & _M32
            k1 = (k1 + 0xBB67AE85) & _M32
        p0 = 0xD2511F53 * c0
        p1 = 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & _M32, (p0 >> 32) ^ c3 ^ k1, p0 & _M32
    return c0, c1, c2, c3


def test_python_philox_known_answers() -> None:
    """Known-answer vectors of Random123 (kat_vectors: philox4x32 10) pin the Python Philox."""
    assert philox4x32_10((0, 0, 0, 0), (0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    assert philox4x32_10((_M32,) * 4, (_M32, _M32)) == (
        0x408F276D,
        0x41C83B0E,
        0xA20BC7C6,
        0x6D5451FD,
    )
    assert philox4x32_10(
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)
    ) == (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)


def python_keep_mask(seed: int, n: int, h: int, l: int, s: int, p: float) -> Tensor:
    """keep[b,h,i,j] = Philox(key=seed, subsequence=(b*H+h)*L+i, offset=j//4)[j%4] >= p*2^32."""
    seed &= (1 << 64) - 1  # the int64 seed tensor read as uint64
    key = (seed & _M32, seed >> 32)
    threshold = min(int(p * 4294967296.0), 4294967295)
    keep = torch.zeros(n, h, l, s, dtype=torch.bool)
    for b in range(n):
        for hh in range(h):
            for i in range(l):
                row = (b * h + hh) * l + i
                draws: List[int] = []
                for offset in range((s + 3) // 4):
                    draws.extend(
                        philox4x32_10((offset & _M32, offset >> 32, row & _M32, row >> 32), key)
                    )
                keep[b, hh, i] = torch.tensor([d >= threshold for d in draws[:s]])
    return keep


@pytest.mark.parametrize(
    "seed,p",
    [(0, 0.5), (123456789, 0.1), ((1 << 40) + 17, 0.9), (-3, 1.0 / 3.0)],
    ids=["seed0", "seed_small", "seed_above_2^32", "seed_negative"],
)
def test_dropout_mask_is_philox(seed: int, p: float, device: str) -> None:
    """The keep mask is common/dropout.h's Philox on every device (so CPU and CUDA agree)."""
    n, h, l, s = 2, 2, 67, 133  # crosses a query tile (64) and a key tile (128), s % 4 != 0
    q, k, v = make_qkv(n, h, l, s, 4, 4, torch.float32, device=device)
    _, _, w = forward(q, k, v, dropout_p=p, seed=seed, need_weights=True)
    expected_keep = python_keep_mask(seed, n, h, l, s, p)
    assert torch.equal((w != 0).cpu(), expected_keep)


# =============================================================================================
# 3b. Head-averaged weights (average_weights=True)

AVERAGE_CONFIGS = {
    "plain": dict(),
    "masks+causal+scale": dict(masks=True, is_causal=True, scale=0.6),
    "dropout": dict(dropout_p=0.3),
    "dropout+masks+causal": dict(masks=True, is_causal=True, dropout_p=0.5),
}


def _average_inputs(
    config: dict, dtype: torch.dtype, n: int, h: int, l: int, s: int, device: str = "cpu"
) -> dict:
    kwargs: dict = dict(is_causal=config.get("is_causal", False), scale=config.get("scale"))
    if config.get("masks"):
        kwargs["attn_mask"] = make_mask((h, l, s), "float", dtype, device)
        kwargs["key_padding_mask"] = make_mask((n, s), "bool", device=device)
        kwargs["key_padding_mask"][:, 0] = False
    if config.get("dropout_p"):
        kwargs.update(dropout_p=config["dropout_p"], seed=2024)
    return kwargs


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("config", list(AVERAGE_CONFIGS))
def test_averaged_weights_forward(config: str, dtype: torch.dtype, device: str) -> None:
    """average_weights=True returns (N, L, S) weights equal to the mean over heads of the
    per-head weights of the same call (same seed: same dropout mask), and to the mean over heads
    of the float64 reference probabilities (bf16/fp16 included: averaged in float32, rounded
    once). Output and softmax_stats do not depend on the flag."""
    cfg = AVERAGE_CONFIGS[config]
    n, h, l, s, e, ev = 2, 3, 129, 130, 16, 8  # three heads; crosses query and key tiles
    q, k, v = make_qkv(n, h, l, s, e, ev, dtype, device=device)
    kwargs = _average_inputs(cfg, dtype, n, h, l, s, device)
    out_h, stats_h, w_h = forward(q, k, v, need_weights=True, **kwargs)
    out_a, stats_a, w_a = forward(q, k, v, need_weights=True, average_weights=True, **kwargs)
    assert w_h.shape == (n, h, l, s) and w_a.shape == (n, l, s) and w_a.dtype == dtype
    assert w_a.is_contiguous()
    assert torch.equal(out_a, out_h) and torch.equal(stats_a, stats_h)
    assert_close(w_a, w_h.double().mean(1), averaged_tol(dtype), "averaged vs per-head mean")

    # The reference, with the dropout mask read off the per-head weights (a visible
    # probability is never 0 here, so a zero weight means dropped).
    p = cfg.get("dropout_p", 0.0)
    factors = (w_h != 0).double() / (1.0 - p) if p else None
    ref_kwargs = {key: val for key, val in kwargs.items() if key not in ("dropout_p", "seed")}
    exp = expected_forward(q, k, v, dropout_factors=factors, **ref_kwargs)
    check_forward((out_a, stats_a, w_a), exp, dtype, average_weights=True)
    if p:
        visible = expected_forward(q, k, v, **ref_kwargs).weights > 0
        assert abs(float((w_h[visible] == 0).double().mean()) - p) < 0.02
    else:
        # Without dropout every averaged row is a probability distribution: the weights of a
        # row carry at most one rounding to the dtype (u relative each, u on the sum) on top
        # of the float32 exp error (~2e-6 relative).
        sums = w_a.double().sum(-1)
        tol = 1e-12 if dtype == torch.float64 else 2 * UNIT_ROUNDOFF[dtype] + 4e-6
        assert_close(sums, torch.ones_like(sums), Tol(tol, 0), "row sums")


@pytest.mark.parametrize("average", [False, True], ids=["per_head", "averaged"])
def test_weights_flags_without_need_weights(average: bool, device: str) -> None:
    """average_weights without need_weights returns an empty weights tensor and the same
    output and softmax_stats."""
    q, k, v = make_qkv(2, 2, 70, 130, 16, 8, torch.float64, device=device)
    result = forward(q, k, v, need_weights=False, average_weights=average)
    check_forward(result, expected_forward(q, k, v), torch.float64, need_weights=False)


@pytest.mark.parametrize("config", ["dropout", "dropout+masks+causal"])
def test_dropout_averaged_weights_gradients(config: str, device: str) -> None:
    """Gradients through head-averaged dropped-out weights equal autograd through reference.py
    (mean over heads of the reference probabilities times the forward's dropout factors)."""
    cfg = AVERAGE_CONFIGS[config]
    n, h, l, s, e, ev = 2, 3, 129, 130, 16, 8
    q, k, v = (
        t.requires_grad_() for t in make_qkv(n, h, l, s, e, ev, torch.float64, device=device)
    )
    kwargs = _average_inputs(cfg, torch.float64, n, h, l, s, device)
    mask = kwargs.get("attn_mask")
    if mask is not None:
        mask.requires_grad_()
    _, _, w_h = forward(q, k, v, need_weights=True, **kwargs)
    factors = (w_h.detach() != 0).double() / (1.0 - cfg["dropout_p"])
    out, _, w = forward(q, k, v, need_weights=True, average_weights=True, **kwargs)
    go, gw = torch.randn_like(out), torch.randn_like(w)
    inputs = [q, k, v] + ([mask] if mask is not None else [])
    grads = torch.autograd.grad((out * go).sum() + (w * gw).sum(), inputs)
    ref_kwargs = {key: val for key, val in kwargs.items() if key not in ("dropout_p", "seed")}
    ref = reference_grads(
        q, k, v, go, grad_weights=gw, dropout_factors=factors, average_weights=True, **ref_kwargs
    )
    for name, g in zip(("query", "key", "value", "attn_mask"), grads):
        assert_close(g, ref[name], grad_tolerance(torch.float64, ref[name]), name)


def test_python_wrapper_average_weights(device: str) -> None:
    """torch_mha.attention(..., need_weights=True, average_weights=True): (N, L, S) weights,
    the mean of the per-head ones; the same seed gives the same dropout mask."""
    q, k, v = make_qkv(2, 3, 65, 129, 8, 8, torch.float32, device=device)
    out_h, w_h = torch_mha.attention(q, k, v, need_weights=True)
    out_a, w_a = torch_mha.attention(q, k, v, need_weights=True, average_weights=True)
    assert w_a.shape == (2, 65, 129) and torch.equal(out_a, out_h)
    assert_close(w_a, w_h.double().mean(1), averaged_tol(torch.float32))
    assert torch_mha.attention(q, k, v, average_weights=True)[1] is None
    torch.manual_seed(5)
    _, w_h = torch_mha.attention(q, k, v, dropout_p=0.4, need_weights=True)
    torch.manual_seed(5)
    _, w_a = torch_mha.attention(q, k, v, dropout_p=0.4, need_weights=True, average_weights=True)
    assert_close(w_a, w_h.double().mean(1), averaged_tol(torch.float32))


# =============================================================================================
# 4. Threads and determinism


def _fwd_bwd(
    q: Tensor, k: Tensor, v: Tensor, go: Tensor, gw: Optional[Tensor], **kwargs
) -> List[Tensor]:
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    mask = kwargs.pop("attn_mask", None)
    inputs = list(leaves)
    if mask is not None and mask.is_floating_point():
        mask = mask.detach().clone().requires_grad_()
        inputs.append(mask)
    out, stats, w = forward(*leaves, attn_mask=mask, need_weights=gw is not None, **kwargs)
    loss = (out * go).sum() + ((w * gw).sum() if gw is not None else 0)
    grads = torch.autograd.grad(loss, inputs)
    return [out.detach(), stats, w.detach(), *grads]


DETERMINISM_CASES = {
    "small_batch": dict(shape=(2, 3, 130, 200, 16, 16)),
    "long_keys_chunked": dict(shape=(1, 1, 200, 640, 64, 64)),  # S = 5 key blocks: 5 dQ chunks
    "uneven_chunks": dict(shape=(1, 2, 65, 1200, 16, 16)),  # 10 key blocks in 8 dQ chunks
    "long_keys_chunked_masks_dropout": dict(
        shape=(1, 1, 129, 513, 17, 33), masks=True, is_causal=True, dropout_p=0.2, weights=True
    ),
    # Heads of a query block summed in a fixed order, whatever the thread count.
    "averaged_weights_masks_dropout": dict(
        shape=(2, 3, 129, 200, 16, 16), masks=True, dropout_p=0.2, weights=True, average=True
    ),
}


# CPU-only: the point is the OpenMP thread count (torch.set_num_threads), which the CUDA
# kernels do not depend on. tests/test_cuda.py checks that CUDA runs are bitwise reproducible.
@pytest.mark.parametrize("case", list(DETERMINISM_CASES))
def test_bitwise_deterministic_across_runs_and_threads(case: str) -> None:
    cfg = DETERMINISM_CASES[case]
    n, h, l, s, e, ev = cfg["shape"]
    q, k, v = make_qkv(n, h, l, s, e, ev, torch.float32)
    go = torch.randn(n, h, l, ev)
    gw = None
    if cfg.get("weights"):
        gw = torch.randn(n, l, s) if cfg.get("average") else torch.randn(n, h, l, s)
    kwargs = dict(is_causal=cfg.get("is_causal", False), average_weights=cfg.get("average", False))
    if cfg.get("masks"):
        kwargs["attn_mask"] = torch.randn(1, h, l, s)
        kwargs["key_padding_mask"] = torch.rand(n, s) < 0.2
    if cfg.get("dropout_p"):
        kwargs.update(dropout_p=cfg["dropout_p"], seed=31337)

    results = {}
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        results[threads] = _fwd_bwd(q, k, v, go, gw, **dict(kwargs))
    torch.set_num_threads(2)
    again = _fwd_bwd(q, k, v, go, gw, **dict(kwargs))
    for threads, result in results.items():
        for index, (a, b) in enumerate(zip(result, results[1])):
            assert torch.equal(a, b), f"threads={threads} differs from threads=1 (tensor {index})"
    for index, (a, b) in enumerate(zip(again, results[2])):
        assert torch.equal(a, b), f"second run differs (tensor {index})"
    # ...and the deterministic result is also the right one.
    mask = kwargs.get("attn_mask")
    if not cfg.get("dropout_p"):
        exp = expected_forward(q, k, v, mask, kwargs.get("key_padding_mask"), kwargs["is_causal"])
        assert_close(results[1][0], exp.output, forward_tol(torch.float32))


# =============================================================================================
# 5. opcheck and meta


def _forward_opcheck_args(
    name: str, requires_grad: bool, device: str = "cpu"
) -> Tuple[tuple, dict]:
    n, h, l, s, e, ev = 2, 2, 5, 7, 4, 3
    q, k, v = make_qkv(n, h, l, s, e, ev, torch.float32, "seq_major", device)
    q, k, v = (t.requires_grad_(requires_grad) for t in (q, k, v))

    def float_mask(*shape: int) -> Tensor:
        return torch.randn(*shape).to(device).requires_grad_(requires_grad)

    def seed(value: int) -> Tensor:
        return torch.tensor([value], device=device)

    kwargs: dict = {}
    if name == "masks":
        kwargs["attn_mask"] = (torch.rand(l, s) < 0.3).to(device)
        kwargs["key_padding_mask"] = float_mask(n, s)
    elif name == "float_mask_broadcast":
        kwargs["attn_mask"] = float_mask(h, 1, s)
    elif name == "causal":
        kwargs["is_causal"] = True
        kwargs["scale"] = 0.5
    elif name == "dropout_weights":
        kwargs.update(dropout_p=0.3, dropout_seed=seed(77), need_weights=True)
    elif name == "weights_masks_causal":
        kwargs.update(
            attn_mask=float_mask(n, h, l, s),
            is_causal=True,
            need_weights=True,
        )
    elif name == "averaged_weights":
        kwargs.update(need_weights=True, average_weights=True)
    elif name == "averaged_weights_dropout_masks":
        kwargs.update(
            attn_mask=float_mask(h, 1, s),
            key_padding_mask=(torch.rand(n, s) < 0.3).to(device),
            dropout_p=0.3,
            dropout_seed=seed(78),
            need_weights=True,
            average_weights=True,
        )
    elif name == "average_flag_without_weights":  # average_weights alone changes nothing
        kwargs.update(average_weights=True)
    return (q, k, v), kwargs


@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize(
    "name",
    [
        "plain",
        "masks",
        "float_mask_broadcast",
        "causal",
        "dropout_weights",
        "weights_masks_causal",
        "averaged_weights",
        "averaged_weights_dropout_masks",
        "average_flag_without_weights",
    ],
)
def test_opcheck_attention_forward(name: str, requires_grad: bool, device: str) -> None:
    args, kwargs = _forward_opcheck_args(name, requires_grad, device)
    opcheck(OPS.attention_forward.default, args, kwargs)


@pytest.mark.parametrize("grad_weights", ["none", "per_head", "averaged"])
def test_opcheck_attention_backward(grad_weights: str, device: str) -> None:
    n, h, l, s, e, ev = 2, 3, 5, 7, 4, 3
    q, k, v = make_qkv(n, h, l, s, e, ev, torch.float32, device=device)
    attn_mask = torch.randn(h, l, s).to(device)
    kpm = torch.randn(n, s).to(device)
    seed = torch.tensor([5], device=device)
    # Per-head weights of the same call (same seed): the dropout mask, read off the zeros.
    out, stats, w = OPS.attention_forward(
        q, k, v, attn_mask, kpm, True, None, 0.25, seed, True, False
    )
    average = grad_weights == "averaged"
    go = torch.randn(out.shape).to(device)
    gw = None
    if grad_weights != "none":
        gw = (torch.randn(n, l, s) if average else torch.randn(n, h, l, s)).to(device)
    args = (go, q, k, v, out, stats, attn_mask, kpm, True, None, 0.25, seed, gw, average, True)
    opcheck(OPS.attention_backward.default, args)
    # And the result is the reference's gradient (dropout factors from the returned weights).
    gq, gk, gv, gmask = OPS.attention_backward(*args)
    factors = (w != 0).double() / 0.75
    ref = reference_grads(
        q,
        k,
        v,
        go,
        attn_mask.requires_grad_(),
        kpm.requires_grad_(),
        True,
        None,
        gw,
        factors,
        average_weights=average,
    )
    tol = lambda r: grad_tolerance(torch.float32, r)  # noqa: E731
    assert_close(gq, ref["query"], tol(ref["query"]))
    assert_close(gk, ref["key"], tol(ref["key"]))
    assert_close(gv, ref["value"], tol(ref["value"]))
    assert gmask.shape == (n, h, l, s) and gmask.dtype == torch.float32
    assert_close(gmask.sum(0), ref["attn_mask"], tol(ref["attn_mask"]))
    assert_close(gmask.sum((1, 2)), ref["key_padding_mask"], tol(ref["key_padding_mask"]))


@dataclass
class MhaCase:
    name: str
    e: int = 8
    heads: int = 2
    l: int = 5
    s: int = 6
    n: int = 3
    kind: str = "self"  # self | kv_same | cross | separate (kdim/vdim)
    attn_mask: Optional[str] = None  # bool2d | float3d
    kpm: Optional[str] = None  # bool | float
    need_weights: bool = True
    average: bool = True
    batch_first: bool = False
    dropout_p: float = 0.0
    training: bool = True
    is_causal: bool = False
    bias_kv: bool = False
    add_zero_attn: bool = False
    unbatched: bool = False
    extra: dict = field(default_factory=dict)


MHA_CASES = [
    MhaCase("self_same_tensor", s=5),
    MhaCase("self_batch_first_no_weights", s=5, batch_first=True, need_weights=False),
    MhaCase("kv_same_cross", kind="kv_same"),
    MhaCase("cross_all_different", kind="cross", average=False),
    MhaCase("kdim_vdim_separate_weights", kind="separate", batch_first=True),
    MhaCase("masks_bool", kind="kv_same", attn_mask="bool2d", kpm="bool"),
    MhaCase("masks_float3d", kind="cross", attn_mask="float3d", kpm="float", need_weights=False),
    MhaCase("causal_hint", s=5, attn_mask="causal", is_causal=True, need_weights=False),
    MhaCase("bias_kv_zero_attn", kind="cross", bias_kv=True, add_zero_attn=True, kpm="bool"),
    MhaCase("unbatched", s=5, unbatched=True),
    MhaCase("dropout_eval", s=5, dropout_p=0.5, training=False),
    MhaCase("dropout_training", s=5, dropout_p=0.5, training=True),
    MhaCase(
        "dropout_training_batch_first_no_weights",
        kind="cross",
        dropout_p=0.3,
        batch_first=True,
        need_weights=False,
    ),
]


def _mha_args(
    case: MhaCase,
    dtype: torch.dtype = torch.float32,
    requires_grad: bool = True,
    device: str = "cpu",
):
    e, heads, l, s, n = case.e, case.heads, case.l, case.s, case.n
    kdim, vdim = (5, 7) if case.kind == "separate" else (e, e)

    def seq(length: int, dim: int) -> Tensor:
        if case.unbatched:
            shape = (length, dim)
        else:
            shape = (n, length, dim) if case.batch_first else (length, n, dim)
        return randn(*shape, dtype=dtype, requires_grad=requires_grad, device=device)

    def param(*shape: int) -> Tensor:
        return (randn(*shape, dtype=dtype, device=device) * 0.3).requires_grad_(requires_grad)

    query = seq(l, e)
    if case.kind == "self":
        key = value = query
    elif case.kind == "kv_same":
        key = value = seq(s, e)
    else:
        key, value = seq(s, kdim), seq(s, vdim)
    in_proj_weight = None if case.kind == "separate" else param(3 * e, e)
    q_w, k_w, v_w = (
        (param(e, e), param(e, kdim), param(e, vdim)) if case.kind == "separate" else (None,) * 3
    )
    in_proj_bias = param(3 * e)
    bias_k = param(1, 1, e) if case.bias_kv else None
    bias_v = param(1, 1, e) if case.bias_kv else None
    out_w, out_b = param(e, e), param(e)
    attn_mask = None
    if case.attn_mask == "bool2d":
        attn_mask = torch.rand(l, s) < 0.3
        attn_mask[:, 0] = False
        attn_mask = attn_mask.to(device)
    elif case.attn_mask == "float3d":
        attn_mask = randn(n * heads, l, s, dtype=dtype, device=device)
    elif case.attn_mask == "causal":
        attn_mask = torch.ones(l, s, dtype=torch.bool, device=device).triu(1)
    kpm = None
    if case.kpm == "bool":
        kpm = torch.rand(n, s) < 0.3
        kpm[:, 0] = False
        kpm = kpm.to(device)
    elif case.kpm == "float":
        kpm = randn(n, s, dtype=dtype, device=device)
    args = (
        query,
        key,
        value,
        e,
        heads,
        in_proj_weight,
        in_proj_bias,
        bias_k,
        bias_v,
        case.add_zero_attn,
        case.dropout_p,
        out_w,
        out_b,
    )
    kwargs = dict(
        training=case.training,
        key_padding_mask=kpm,
        need_weights=case.need_weights,
        attn_mask=attn_mask,
        q_proj_weight=q_w,
        k_proj_weight=k_w,
        v_proj_weight=v_w,
        average_attn_weights=case.average,
        is_causal=case.is_causal,
        batch_first=case.batch_first,
    )
    return args, kwargs


@pytest.mark.parametrize("case", MHA_CASES, ids=lambda c: c.name)
def test_opcheck_multi_head_attention(case: MhaCase, device: str) -> None:
    args, kwargs = _mha_args(case, device=device)
    opcheck(OPS.multi_head_attention.default, args, kwargs)


@pytest.mark.parametrize(
    "case", [c for c in MHA_CASES if c.dropout_p == 0.0 or not c.training], ids=lambda c: c.name
)
def test_multi_head_attention_matches_torch(case: MhaCase, device: str) -> None:
    """The composite op against torch.nn.functional.multi_head_attention_forward (float64)."""
    args, kwargs = _mha_args(case, torch.float64, device=device)
    out, weights = OPS.multi_head_attention(*args, **kwargs)
    (query, key, value, e, heads, in_w, in_b, bias_k, bias_v, zero_attn, p, out_w, out_b) = args
    tq, tk, tv = query, key, value
    if case.batch_first and not case.unbatched:
        tq, tk, tv = (t.transpose(0, 1) for t in (query, key, value))
    ref_out, ref_w = torch.nn.functional.multi_head_attention_forward(
        tq,
        tk,
        tv,
        e,
        heads,
        in_w,
        in_b,
        bias_k,
        bias_v,
        zero_attn,
        p,
        out_w,
        out_b,
        training=kwargs["training"],
        key_padding_mask=kwargs["key_padding_mask"],
        need_weights=kwargs["need_weights"],
        attn_mask=kwargs["attn_mask"],
        use_separate_proj_weight=case.kind == "separate",
        q_proj_weight=kwargs["q_proj_weight"],
        k_proj_weight=kwargs["k_proj_weight"],
        v_proj_weight=kwargs["v_proj_weight"],
        average_attn_weights=kwargs["average_attn_weights"],
        is_causal=kwargs["is_causal"],
    )
    if case.batch_first and not case.unbatched:
        ref_out = ref_out.transpose(0, 1)
    assert_close(out, ref_out, Tol(1e-12, 1e-12), "attn_output")
    if case.need_weights:
        assert_close(weights, ref_w, Tol(1e-12, 1e-12), "attn_weights")
    else:
        assert weights.numel() == 0


@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
def test_multi_head_attention_dropout(batch_first: bool, device: str) -> None:
    """Training dropout in the composite op: reproducible under torch.manual_seed, absent in
    eval, and the output is out_proj(heads(weights @ V)) for the post-dropout weights."""
    case = MhaCase(
        "dropout",
        kind="cross",
        l=70,
        s=130,
        n=2,
        e=8,
        heads=2,
        dropout_p=0.4,
        average=False,
        batch_first=batch_first,
    )
    args, kwargs = _mha_args(case, torch.float64, requires_grad=False, device=device)
    torch.manual_seed(11)
    out1, w1 = OPS.multi_head_attention(*args, **kwargs)
    torch.manual_seed(11)
    out2, w2 = OPS.multi_head_attention(*args, **kwargs)
    out3, w3 = OPS.multi_head_attention(*args, **kwargs)
    assert torch.equal(out1, out2) and torch.equal(w1, w2)
    assert not torch.equal(w1 == 0, w3 == 0)
    rate = float((w1 == 0).double().mean())
    assert abs(rate - 0.4) < 0.02, rate  # 2*2*70*130 = 36400 draws, sigma = 0.0026
    out_eval, w_eval = OPS.multi_head_attention(*args, **dict(kwargs, training=False))
    assert not bool((w_eval == 0).any())

    query, key, value, e, heads = args[:5]
    in_w, in_b, out_w, out_b = args[5], args[6], args[11], args[12]
    if batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    v_proj = torch.nn.functional.linear(value, in_w[2 * e :], in_b[2 * e :])  # (S, N, E)
    v_heads = v_proj.unflatten(-1, (heads, e // heads)).permute(1, 2, 0, 3)  # (N, H, S, D)
    merged = (w1 @ v_heads).permute(2, 0, 1, 3).flatten(2)  # (L, N, E)
    expected = torch.nn.functional.linear(merged, out_w, out_b)
    if batch_first:
        expected = expected.transpose(0, 1)
    assert_close(out1, expected, Tol(1e-12, 1e-12), "attn_output")
    # Kept weights are the eval-mode probabilities scaled by 1 / (1 - p).
    kept = w1 != 0
    assert_close(w1[kept], w_eval[kept] / 0.6, Tol(1e-12, 1e-12), "weights")


META_LAYOUTS = ["contiguous", "seq_major", "time_major", "packed_qkv", "transposed_last"]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", META_LAYOUTS)
def test_meta_matches_cpu_metadata(layout: str, dtype: torch.dtype, device: str) -> None:
    """Meta (FakeTensor) outputs have the shapes, dtypes and strides of the real outputs on
    every device (CUDA allocates its outputs with the same shared function)."""
    n, h, l, s, e, ev = 2, 3, 9, 9, 4, 4
    q, k, v = make_qkv(n, h, l, s, e, ev, dtype, layout, device)
    mask = torch.randn(h, l, s, dtype=dtype).to(device)
    kpm = (torch.rand(n, s) < 0.2).to(device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    weight_shapes = {
        (False, False): (0,),
        (False, True): (0,),
        (True, False): (n, h, l, s),
        (True, True): (n, l, s),
    }
    for (need_weights, average), weight_shape in weight_shapes.items():
        real = OPS.attention_forward(
            q, k, v, mask, kpm, True, None, 0.0, None, need_weights, average
        )
        meta = OPS.attention_forward(
            *meta_copy((q, k, v, mask, kpm)), True, None, 0.0, None, need_weights, average
        )
        for name, a, b in zip(("output", "softmax_stats", "weights"), meta, real):
            assert_same_metadata(a, b, name)
        out, stats, w = real
        assert out.shape == (n, h, l, ev) and stats.shape == (n, h, l, 2)
        assert stats.dtype == acc and w.shape == weight_shape and w.dtype == dtype
        if not need_weights:
            continue
        bargs = (
            torch.randn_like(out),
            q,
            k,
            v,
            out,
            stats,
            mask,
            kpm,
            True,
            None,
            0.0,
            None,
            torch.randn_like(w),
            average,
            True,
        )
        real_b = OPS.attention_backward(*bargs)
        meta_b = OPS.attention_backward(*meta_copy(bargs))
        for name, a, b in zip(
            ("grad_query", "grad_key", "grad_value", "grad_mask"), meta_b, real_b
        ):
            assert_same_metadata(a, b, name)
        assert real_b[3].dtype == acc and real_b[3].shape == (n, h, l, s)


def test_meta_output_follows_projection_layout() -> None:
    """Heads viewed out of an (L, N, 3E) projection give an output laid out as (L, N, H, D)."""
    l, n, h, d = 7, 3, 4, 5
    proj = torch.empty(l, n, 3 * h * d, device="meta")
    q, k, v = (x.unflatten(-1, (h, d)).permute(1, 2, 0, 3) for x in proj.chunk(3, dim=-1))
    out, stats, w = OPS.attention_forward(q, k, v)
    assert out.device.type == "meta" and out.shape == (n, h, l, d)
    assert out.stride() == (h * d, d, n * h * d, 1)
    assert out.permute(2, 0, 1, 3).is_contiguous()
    assert stats.shape == (n, h, l, 2) and stats.dtype == torch.float32
    assert w.shape == (0,)
    # Head-averaged weights are (N, L, S); per-head (N, H, L, S).
    assert OPS.attention_forward(q, k, v, need_weights=True, average_weights=True)[2].shape == (
        n,
        l,
        l,
    )
    assert OPS.attention_forward(q, k, v, need_weights=True)[2].shape == (n, h, l, l)
    # The (L, N, H, D) layout merges back into (L, N, E) as a view.
    assert out.permute(2, 0, 1, 3).flatten(2).shape == (l, n, h * d)


@pytest.mark.parametrize("case", MHA_CASES, ids=lambda c: c.name)
def test_meta_multi_head_attention(case: MhaCase, device: str) -> None:
    args, kwargs = _mha_args(case, requires_grad=False, device=device)
    real = OPS.multi_head_attention(*args, **kwargs)
    memo: Dict[int, Tensor] = {}
    meta = OPS.multi_head_attention(*meta_copy(args, memo), **meta_copy(kwargs, memo))
    for name, a, b in zip(("attn_output", "attn_weights"), meta, real):
        assert_same_metadata(a, b, name)


# =============================================================================================
# 6. Autograd wiring


@pytest.mark.parametrize(
    "which", ["query", "key", "value", "attn_mask", "key_padding_mask", "none"]
)
def test_requires_grad_propagation(which: str, device: str) -> None:
    q, k, v = make_qkv(1, 2, 5, 7, 4, 4, torch.float32, device=device)
    mask = torch.randn(5, 7).to(device)
    kpm = torch.randn(1, 7).to(device)
    tensors = {"query": q, "key": k, "value": v, "attn_mask": mask, "key_padding_mask": kpm}
    if which != "none":
        tensors[which].requires_grad_()
    out, stats, w = OPS.attention_forward(q, k, v, mask, kpm, need_weights=True)
    assert out.requires_grad == (which != "none")
    assert w.requires_grad == (which != "none")
    assert not stats.requires_grad  # softmax_stats are not differentiable
    _, stats_avg, w_avg = OPS.attention_forward(
        q, k, v, mask, kpm, need_weights=True, average_weights=True
    )
    assert w_avg.requires_grad == (which != "none") and not stats_avg.requires_grad
    if which == "none":
        return
    grads = torch.autograd.grad(out.sum() + w.sum(), [tensors[which]])
    assert grads[0].shape == tensors[which].shape
    # Only the input that required grad has a gradient.
    out, _, _ = OPS.attention_forward(q, k, v, mask, kpm)
    out.sum().backward()
    for name, t in tensors.items():
        assert (t.grad is not None) == (name == which), name


def test_no_grad_and_inference_mode_build_no_graph(device: str) -> None:
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 5, 7, 4, 4, torch.float32, device=device))
    mask = torch.randn(5, 7).to(device).requires_grad_()
    expected = expected_forward(q, k, v, mask).output
    with torch.no_grad():
        out, _, w = OPS.attention_forward(q, k, v, mask, need_weights=True)
    assert not out.requires_grad and out.grad_fn is None and w.grad_fn is None
    assert_close(out, expected, forward_tol(torch.float32))
    with torch.inference_mode():
        out, _, w = OPS.attention_forward(q, k, v, mask, need_weights=True)
        assert out.is_inference() and out.grad_fn is None and not out.requires_grad
    assert_close(out, expected, forward_tol(torch.float32))


def test_grads_only_for_inputs_that_require_them(device: str) -> None:
    q, k, v = make_qkv(2, 2, 9, 11, 4, 6, torch.float64, device=device)
    q.requires_grad_()
    v.requires_grad_()
    float_mask = randn(2, 1, 9, 11, device=device)  # does not require grad
    kpm = randn(2, 11, requires_grad=True, device=device)
    out, _, w = OPS.attention_forward(q, k, v, float_mask, kpm, need_weights=True)
    (out.sum() + w.pow(2).sum()).backward()
    assert k.grad is None and float_mask.grad is None
    assert q.grad is not None and v.grad is not None and kpm.grad is not None
    ref = reference_grads(
        q, k, v, torch.ones_like(out), float_mask, kpm, False, None, 2 * w.detach()
    )
    for name, t in (("query", q), ("value", v), ("key_padding_mask", kpm)):
        assert_close(t.grad, ref[name], grad_tolerance(torch.float64, ref[name]), name)
    assert "attn_mask" not in ref


def test_weights_not_differentiable_without_need_weights(device: str) -> None:
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 1, 4, 4, 4, 4, torch.float32, device=device))
    for average in (False, True):
        out, _, w = OPS.attention_forward(q, k, v, average_weights=average)
        assert out.requires_grad and not w.requires_grad and w.numel() == 0


@pytest.mark.parametrize("average", [False, True], ids=["per_head", "averaged"])
def test_unused_weights_reach_backward_as_no_gradient(average: bool, device: str) -> None:
    """Weights that the loss does not use must not become a zero-filled L x S gradient: the
    backward op gets grad_weights=None (no weights-gradient pass) and the same gradients as a
    call without weights. Weights that the loss does use arrive as a tensor."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class RecordGradWeights(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: List[Optional[Tensor]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is OPS.attention_backward.default:
                self.seen.append(kwargs.get("grad_weights", args[12] if len(args) > 12 else None))
            return func(*args, **kwargs)

    def grads(need_weights: bool, use_weights: bool) -> Tuple[List[Tensor], List[Optional[Tensor]]]:
        torch.manual_seed(0)
        q, k, v = (
            t.requires_grad_()
            for t in make_qkv(2, 3, 70, 130, 16, 16, torch.float64, device=device)
        )
        out, _, w = OPS.attention_forward(
            q, k, v, need_weights=need_weights, average_weights=average
        )
        loss = out.sum() + (w.square().sum() if use_weights else 0.0)
        with RecordGradWeights() as mode:
            loss.backward()
        assert len(mode.seen) == 1
        return [q.grad, k.grad, v.grad], mode.seen

    plain, seen = grads(need_weights=False, use_weights=False)
    assert seen == [None]
    unused, seen = grads(need_weights=True, use_weights=False)
    assert seen == [None]
    for a, b in zip(unused, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    used, seen = grads(need_weights=True, use_weights=True)
    assert isinstance(seen[0], Tensor) and seen[0].dim() == (3 if average else 4)
    assert any(not torch.equal(a, b) for a, b in zip(used, plain))


# =============================================================================================
# 7. Memory is O(L)


def _peak_aten_cpu_bytes(fn: Callable[[], None]) -> int:
    """Peak of ATen CPU allocations made while fn runs, above what was live before.

    With profile_memory=True every CPU allocation and free goes through c10's profiled CPU
    memory reporter, which records the running total of live allocations made under the
    profiler; the peak of that total is the peak allocation of fn.
    """
    from torch._C._profiler import _ExtraFields_Allocation
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if isinstance(event.extra_fields, _ExtraFields_Allocation):
            events.append(event)
    assert events, "the profiler recorded no allocation"
    events.sort(key=lambda ev: ev.start_time_ns)
    first = events[0].extra_fields
    baseline = first.total_allocated - first.alloc_size
    return max(ev.extra_fields.total_allocated for ev in events) - baseline


# CPU-only: the measurement is the ATen CPU allocator as seen by the CPU profiler
# (profile_memory=True). CUDA memory would need torch.cuda.max_memory_allocated and other bounds.
def test_memory_is_linear_in_length() -> None:
    n, h, e = 1, 4, 64
    mib = 1 << 20

    def inputs(length: int) -> Tuple[Tensor, Tensor, Tensor]:
        return tuple(torch.randn(n, h, length, e, requires_grad=True) for _ in range(3))

    def fused(q: Tensor, k: Tensor, v: Tensor, need_weights: bool) -> Callable[[], None]:
        def run() -> None:
            out, _, w = OPS.attention_forward(q, k, v, need_weights=need_weights)
            loss = out.sum() + (w.sum() if need_weights else 0)
            loss.backward()

        return run

    l = 4096
    q, k, v = inputs(l)
    score_matrix_bytes = n * h * l * l * 4  # 256 MiB of float32 scores for all heads
    one_head_bytes = l * l * 4  # 64 MiB

    # Positive control: materialising the scores is seen by the measurement.
    naive = _peak_aten_cpu_bytes(lambda: (q @ k.transpose(-1, -2)).softmax(-1))
    assert naive >= score_matrix_bytes

    peak = _peak_aten_cpu_bytes(fused(q, k, v, need_weights=False))
    # The O(L) tensors of fwd+bwd: output, softmax_stats, dO copy, dQ/dK/dV, delta, and the float32
    # dQ partial sums (4 chunks here) -- 9 tensors of N*H*L*E float32 = 36 MiB at L = 4096.
    linear_bytes = 9 * n * h * l * e * 4
    assert peak < one_head_bytes, peak
    assert peak <= linear_bytes * 1.1, peak

    # Linear growth: halving L roughly halves the peak (a quadratic term would quarter it).
    q2, k2, v2 = inputs(l // 2)
    peak_half = _peak_aten_cpu_bytes(fused(q2, k2, v2, need_weights=False))
    assert peak / peak_half < 2.5, (peak, peak_half)

    # Positive control: need_weights=True does allocate the (N, H, L, S) weights.
    peak_weights = _peak_aten_cpu_bytes(fused(q, k, v, need_weights=True))
    assert peak_weights >= score_matrix_bytes, peak_weights
    print(
        f"\nATen CPU peak, fwd+bwd, N={n} H={h} E={e}: L=S={l}: {peak / mib:.1f} MiB "
        f"(O(L) budget {linear_bytes / mib:.0f} MiB); L=S={l // 2}: {peak_half / mib:.1f} MiB; "
        f"need_weights=True: {peak_weights / mib:.1f} MiB; q@k^T+softmax: {naive / mib:.0f} MiB; "
        f"one L x S float32 matrix: {one_head_bytes / mib:.0f} MiB per head, "
        f"{score_matrix_bytes / mib:.0f} MiB for all heads"
    )
