"""Masking in the core op torch.ops.torch_mha.attention_forward (and its gradients where masks
make the difference): attn_mask of every broadcast shape, stride and kind (bool, float of the
query's dtype, float32), key_padding_mask (bool/float, three layouts), both together, float masks
in bf16/fp16; top-left aligned causal masking with L < S, L == S and L > S; fully masked rows
(zero output and weights, softmax_stats (+inf, 0), zero finite gradients) and nothing visible
at all; masks of huge finite negative numbers (-1e9, finfo.min: exactly uniform rows, a
regression); and empty dimensions (zero batch, heads, lengths or head dims: S = 0 leaves every
query without keys).

Tests that take the `device` fixture (tests/conftest.py) run on the CPU and on CUDA; the CUDA
cases are reported as skipped where there is no GPU. Inputs, references, conventions and
tolerances: tests/attention_testing.py. CUDA-specific tests (CPU vs CUDA agreement, streams,
device indices, grid limits): tests/test_cuda.py.
"""

from __future__ import annotations

import math
from typing import Dict, Tuple

import pytest
import torch
from attention_testing import (
    ALL_DTYPES,
    assert_close,
    check_forward,
    dtype_id,
    expected_forward,
    forward,
    forward_tol,
    grad_tolerance,
    make_mask,
    make_qkv,
    randn,
    reference_grads,
    reference_scores,
    shape_id,
    stats_tol,
)
from torch import Tensor


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
