"""The attention variants of torch_mha.attention against a float64 reference written in the
tests (reference.reference_attention_variants): grouped-query heads, sliding windows and
bottom-right causal, ALiBi, softcapping, attention sinks; each alone, together, with the masks,
dropout, the weights, strides, every dtype and lengths at the tile edges; gradients (including
sinks and float masks) and gradcheck; opcheck of the ops involved; bad input.

Packed variable-length batches are in test_varlen.py.
"""

from __future__ import annotations

import math
from typing import Dict, Tuple

import pytest
import torch
from attention_testing import (
    ALL_DTYPES,
    OPS,
    assert_close,
    dtype_id,
    forward_tol,
    grad_tolerance,
    opcheck,
    randn,
    stats_tol,
)
from reference import reference_attention_variants
from torch import Tensor

import torch_mha

# ---------------------------------------------------------------------------------------------
# Problems


def make_problem(
    n: int,
    h: int,
    hkv: int,
    l: int,
    s: int,
    e: int,
    ev: int,
    dtype: torch.dtype,
    device: str,
    layout: str = "contiguous",
) -> Tuple[Tensor, Tensor, Tensor]:
    """query (n, h, l, e), key (n, hkv, s, e), value (n, hkv, s, ev) in a named memory layout."""
    if layout == "contiguous":
        return (
            randn(n, h, l, e, dtype=dtype, device=device),
            randn(n, hkv, s, e, dtype=dtype, device=device),
            randn(n, hkv, s, ev, dtype=dtype, device=device),
        )
    if layout == "seq_major":  # (N, L, H, D) viewed as (N, H, L, D)
        return (
            randn(n, l, h, e, dtype=dtype, device=device).transpose(1, 2),
            randn(n, s, hkv, e, dtype=dtype, device=device).transpose(1, 2),
            randn(n, s, hkv, ev, dtype=dtype, device=device).transpose(1, 2),
        )
    if layout == "strided":  # last dimension with stride 2, key rows from a wider tensor
        return (
            randn(n, h, l, 2 * e, dtype=dtype, device=device)[..., ::2],
            randn(n, hkv, 2 * s, e, dtype=dtype, device=device)[:, :, ::2],
            randn(n, s, hkv, ev, dtype=dtype, device=device).transpose(1, 2),
        )
    raise ValueError(layout)


def reference(
    q,
    k,
    v,
    attn_mask=None,
    key_padding_mask=None,
    is_causal=False,
    scale=None,
    dropout_factors=None,
    **kw,
) -> Tuple[Tensor, Tensor]:
    return reference_attention_variants(
        q,
        k,
        v,
        attn_mask,
        key_padding_mask,
        is_causal,
        scale,
        window=kw.get("window_size", (-1, -1)),
        alibi_slopes=kw.get("alibi_slopes"),
        softcap=kw.get("softcap", 0.0),
        sinks=kw.get("sinks"),
        dropout_factors=dropout_factors,
    )


def core_forward(
    q,
    k,
    v,
    attn_mask=None,
    key_padding_mask=None,
    is_causal=False,
    scale=None,
    need_weights=True,
    average_weights=False,
    dropout_p=0.0,
    seed=None,
    **kw,
):
    """attention_forward with the modifiers given as attention()'s keywords."""
    left, right = kw.get("window_size", (-1, -1))
    seed_tensor = None if seed is None else torch.tensor([seed], device=q.device)
    return OPS.attention_forward(
        q,
        k,
        v,
        attn_mask,
        key_padding_mask,
        is_causal,
        scale,
        dropout_p,
        seed_tensor,
        need_weights,
        average_weights,
        left,
        right,
        kw.get("alibi_slopes"),
        kw.get("softcap", 0.0),
        kw.get("sinks"),
    )


def modifier_cases(h: int, n: int) -> Dict[str, dict]:
    """Each modifier alone, a few settings each (the name is the test id)."""
    return {
        "plain": {},
        "window_left": {"window_size": (7, -1)},
        "window_right": {"window_size": (-1, 5)},
        "window_both": {"window_size": (20, 3)},
        "window_zero": {"window_size": (0, 0)},
        "bottom_right_causal": {"window_size": (-1, 0)},
        "sliding_causal": {"window_size": (33, 0)},
        "causal_and_window": {"is_causal": True, "window_size": (40, 2)},
        "softcap": {"softcap": 1.5},
        "softcap_large": {"softcap": 50.0},
        "alibi_heads": {"alibi_slopes": torch.rand(h) * 0.5},
        "alibi_batch_heads": {"alibi_slopes": torch.rand(n, h) * 0.5},
        "sinks": {"sinks": torch.randn(h, dtype=torch.float64)},
        "sinks_large": {"sinks": torch.full((h,), 8.0, dtype=torch.float64)},
        "everything": {
            "window_size": (30, 4),
            "alibi_slopes": torch.rand(h) * 0.3,
            "softcap": 2.0,
            "sinks": torch.randn(h, dtype=torch.float64),
        },
    }


def _to(kw: dict, device: str, dtype: torch.dtype) -> dict:
    """Modifier tensors on the device; sinks in the query's dtype (what a model would pass)."""
    out = dict(kw)
    if "alibi_slopes" in out:
        out["alibi_slopes"] = out["alibi_slopes"].float().to(device)
    if "sinks" in out:
        out["sinks"] = out["sinks"].to(dtype).to(device)
    return out


# ---------------------------------------------------------------------------------------------
# Forward: every modifier alone and together, GQA ratios, dtypes, weights


N, H, HKV, L, S, E, EV = 2, 4, 2, 70, 150, 16, 12


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", list(modifier_cases(H, N)))
def test_forward_each_modifier(case: str, dtype: torch.dtype, device: str) -> None:
    torch.manual_seed(1)
    kw = _to(modifier_cases(H, N)[case], device, dtype)
    q, k, v = make_problem(N, H, HKV, L, S, E, EV, dtype, device)
    for average in (False, True):
        out, stats, weights = core_forward(q, k, v, average_weights=average, **kw)
        ref_out, ref_probs = reference(q, k, v, **kw)
        assert out.shape == (N, H, L, EV) and out.dtype == dtype
        assert_close(out, ref_out, forward_tol(dtype), f"{case} output")
        ref_w = ref_probs.mean(1) if average else ref_probs
        assert_close(weights, ref_w, forward_tol(dtype), f"{case} weights")
        assert stats.shape == (N, H, L, 2)
    # The user-facing function agrees with the core op.
    out2, w2 = torch_mha.attention(q, k, v, need_weights=True, **kw)
    assert torch.equal(out2, out) and w2 is not None


@pytest.mark.parametrize("ratio", [1, 2, 3, 6])
def test_grouped_query_heads(ratio: int, device: str) -> None:
    """H = 6 query heads over 6 / ratio key/value heads (ratio 6: multi-query); the result is
    that of plain attention with K and V repeated to 6 heads, which the op never does."""
    q, k, v = make_problem(2, 6, 6 // ratio, 65, 129, 16, 8, torch.float32, device)
    out, _ = torch_mha.attention(q, k, v, is_causal=True)
    kr, vr = k.repeat_interleave(ratio, 1), v.repeat_interleave(ratio, 1)
    plain, _ = torch_mha.attention(q, kr, vr, is_causal=True)
    assert_close(out, plain, forward_tol(torch.float32))
    ref, _ = reference(q, k, v, is_causal=True)
    assert_close(out, ref, forward_tol(torch.float32))


SHORT_BLOCKS = [(1, 1), (1, 300), (1, 1000), (3, 200), (16, 129), (17, 64)]


@pytest.mark.parametrize("dtype", ALL_DTYPES[:3], ids=dtype_id)
@pytest.mark.parametrize("ratio", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("ls", SHORT_BLOCKS, ids=lambda x: f"L{x[0]}_S{x[1]}")
def test_short_query_blocks_with_grouped_heads(
    ls: Tuple[int, int], ratio: int, dtype: torch.dtype, device: str
) -> None:
    """Decoding and short chunks (L <= 16) put the query heads of a group side by side in one
    score tile (and long S also splits the keys): every modifier and mask must still reach each
    head's own columns and no other. ALiBi slopes per batch and head and per-head float masks
    make every column different. Without groups (ratio 1), a lone query is scored by dot
    products instead."""
    l, s = ls
    h = 2 * ratio
    torch.manual_seed(100 * ratio + l)
    q, k, v = make_problem(2, h, 2, l, s, 16, 12, dtype, device)
    modifiers = {
        "window_size": (s // 2, 0),
        "alibi_slopes": torch.rand(2, h) * 0.3,
        "softcap": 2.0,
        "sinks": torch.randn(h, dtype=torch.float64),
    }
    masks = (randn(h, l, s, dtype=dtype, device=device), (torch.rand(2, s) < 0.2).to(device))
    kr, vr = k.repeat_interleave(ratio, 1), v.repeat_interleave(ratio, 1)
    for kw in ({}, _to(modifiers, device, dtype)):
        for attn_mask, kpm in ((None, None), masks):
            out, stats, _ = core_forward(q, k, v, attn_mask, kpm, need_weights=False, **kw)
            ref_out, _ = reference(q, k, v, attn_mask, kpm, **kw)
            assert_close(out, ref_out, forward_tol(dtype), f"{sorted(kw)} masks={kpm is not None}")
            # The heads of a group, one at a time: the same rows.
            alone, alone_stats, _ = core_forward(
                q, kr, vr, attn_mask, kpm, need_weights=False, **kw
            )
            assert_close(out, alone, forward_tol(dtype))
            assert_close(stats, alone_stats, stats_tol(dtype))


@pytest.mark.parametrize("ratio", [1, 4])
@pytest.mark.parametrize("l", [1, 5])
def test_short_query_blocks_dropout(l: int, ratio: int, device: str) -> None:
    """Dropout on stacked heads and on lone queries scored as a row: each head's keep mask is
    its own (read off the per-head weights, which the kernel computes one head at a time)."""
    p, s = 0.3, 300
    q, k, v = make_problem(2, 2 * ratio, 2, l, s, 8, 8, torch.float64, device)
    kw = _to(modifier_cases(2 * ratio, 2)["everything"], device, torch.float64)
    out, _, w = core_forward(q, k, v, dropout_p=p, seed=5, **kw)
    factors = (w != 0).double() / (1 - p)
    ref_out, _ = reference(q, k, v, dropout_factors=factors, **kw)
    assert_close(out, ref_out, forward_tol(torch.float64))
    assert not torch.equal(w[:, 0], w[:, 1])  # heads of one group draw different masks


def test_softmax_stats_include_the_sink(device: str) -> None:
    """softmax_stats.sum(-1) is the row's log-sum-exp over the visible scores and the sink."""
    q, k, v = make_problem(1, 2, 1, 40, 90, 8, 8, torch.float64, device)
    sinks = torch.tensor([0.5, 3.0], dtype=torch.float64, device=device)
    window = (10, 0)
    _, stats, _ = core_forward(q, k, v, window_size=window, sinks=sinks)
    scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) / math.sqrt(8)
    i = torch.arange(40, device=device)[:, None]
    j = torch.arange(90, device=device)[None, :]
    hidden = (j < i + 50 - 10) | (j > i + 50)
    scores = scores.masked_fill(hidden, -math.inf)
    with_sink = torch.cat([scores, sinks.view(1, 2, 1, 1).expand(1, 2, 40, 1)], -1)
    assert_close(stats.sum(-1), torch.logsumexp(with_sink, -1), stats_tol(torch.float64))


@pytest.mark.parametrize(
    "ls",
    [(1, 1), (1, 300), (300, 1), (63, 64), (64, 65), (65, 63), (127, 129), (129, 127), (200, 40)],
    ids=lambda x: f"L{x[0]}_S{x[1]}",
)
@pytest.mark.parametrize("window", [(-1, 0), (16, 0), (5, 5), (0, -1)], ids=str)
def test_lengths_at_tile_edges(ls: Tuple[int, int], window: Tuple[int, int], device: str) -> None:
    l, s = ls
    q, k, v = make_problem(1, 2, 1, l, s, 16, 16, torch.float64, device)
    kw = {"window_size": window, "sinks": torch.randn(2, dtype=torch.float64, device=device)}
    out, _, weights = core_forward(q, k, v, **kw)
    ref_out, ref_probs = reference(q, k, v, **kw)
    assert_close(out, ref_out, forward_tol(torch.float64))
    assert_close(weights, ref_probs, forward_tol(torch.float64))


def test_empty_lengths(device: str) -> None:
    for l, s in ((0, 5), (5, 0), (0, 0)):
        q, k, v = make_problem(2, 4, 2, l, s, 8, 8, torch.float32, device)
        out, w = torch_mha.attention(q, k, v, need_weights=True, window_size=(3, 0), softcap=2.0)
        assert out.shape == (2, 4, l, 8) and w is not None and w.shape == (2, 4, l, s)
        assert bool((out == 0).all())


@pytest.mark.parametrize("layout", ["seq_major", "strided"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
def test_strided_inputs(layout: str, dtype: torch.dtype, device: str) -> None:
    kw = _to(modifier_cases(H, N)["everything"], device, dtype)
    q, k, v = make_problem(N, H, HKV, L, S, E, EV, dtype, device, layout=layout)
    out, _, _ = core_forward(q, k, v, **kw)
    ref_out, _ = reference(q, k, v, **kw)
    assert_close(out, ref_out, forward_tol(dtype))
    dense, _, _ = core_forward(q.contiguous(), k.contiguous(), v.contiguous(), **kw)
    assert_close(out, dense, forward_tol(dtype))


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_modifiers_with_masks(mask_kind: str, device: str) -> None:
    """attn_mask (per head) and key_padding_mask on top of every modifier; float masks are
    added after the softcap."""
    dtype = torch.float64
    kw = _to(modifier_cases(H, N)["everything"], device, dtype)
    q, k, v = make_problem(N, H, HKV, L, S, E, EV, dtype, device)
    if mask_kind == "bool":
        attn_mask = (torch.rand(H, L, S) < 0.2).to(device)
        kpm = (torch.rand(N, S) < 0.2).to(device)
    else:
        attn_mask = randn(H, L, S, device=device)
        kpm = randn(N, S, device=device)
    out, _, weights = core_forward(q, k, v, attn_mask, kpm, **kw)
    ref_out, ref_probs = reference(q, k, v, attn_mask, kpm, **kw)
    assert_close(out, ref_out, forward_tol(dtype))
    assert_close(weights, ref_probs, forward_tol(dtype))


def test_rows_with_no_visible_key(device: str) -> None:
    """Bottom-right causal with L > S hides every key from the first L - S queries: zeros out,
    zero gradients; with a sink the row is all sink (zero output) and the sink's gradient from
    those rows is zero."""
    l, s = 100, 30
    q, k, v = make_problem(1, 2, 2, l, s, 8, 8, torch.float64, device)
    for q_, k_, v_ in ((q, k, v),):
        q_.requires_grad_()
        k_.requires_grad_()
        v_.requires_grad_()
    sinks = torch.randn(2, dtype=torch.float64, device=device, requires_grad=True)
    for extra in ({}, {"sinks": sinks}):
        out, _ = torch_mha.attention(q, k, v, window_size=(-1, 0), **extra)
        assert bool((out[:, :, : l - s] == 0).all())
        go = torch.randn_like(out)
        grads = torch.autograd.grad(out, [q, k, v] + list(extra.values()), go)
        assert bool((grads[0][:, :, : l - s] == 0).all())
        ref_out, _ = reference(q, k, v, window_size=(-1, 0), **extra)
        ref_grads = torch.autograd.grad(ref_out, [q, k, v] + list(extra.values()), go)
        for a, b in zip(grads, ref_grads):
            assert_close(a, b, grad_tolerance(torch.float64, b))


# ---------------------------------------------------------------------------------------------
# Gradients


GRAD_CASES = [
    "plain",
    "sliding_causal",
    "window_both",
    "causal_and_window",
    "softcap",
    "alibi_batch_heads",
    "sinks",
    "everything",
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("case", GRAD_CASES)
def test_gradients_vs_reference(case: str, dtype: torch.dtype, device: str) -> None:
    torch.manual_seed(2)
    kw = _to(modifier_cases(H, N)[case], device, dtype)
    q, k, v = (t.requires_grad_() for t in make_problem(N, H, HKV, L, S, E, EV, dtype, device))
    inputs = [q, k, v]
    if "sinks" in kw:
        kw["sinks"] = kw["sinks"].float().requires_grad_()
        inputs.append(kw["sinks"])
    attn_mask = randn(1, H, L, S, device=device).to(dtype).requires_grad_()
    inputs.append(attn_mask)
    out, _ = torch_mha.attention(q, k, v, attn_mask, **kw)
    go = randn(*out.shape, dtype=dtype, device=device)
    grads = torch.autograd.grad(out, inputs, go)
    ref_out, _ = reference(q, k, v, attn_mask, **kw)
    ref_grads = torch.autograd.grad(ref_out, inputs, go)
    names = ["query", "key", "value"] + (["sinks"] if "sinks" in kw else []) + ["attn_mask"]
    for name, a, b in zip(names, grads, ref_grads):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        tol = grad_tolerance(dtype, b)
        if name in ("sinks", "attn_mask") and dtype != torch.float64:
            # Sums over every row of the batch: float32 accumulation of many terms.
            tol = type(tol)(tol.atol * 4, tol.rtol * 4)
        assert_close(a, b, tol, f"{case} grad {name}")


@pytest.mark.parametrize("average", [False, True], ids=["per_head", "averaged"])
def test_weights_gradient_with_modifiers(average: bool, device: str) -> None:
    """The returned weights are differentiable with every modifier (their gradient joins dP)."""
    kw = _to(modifier_cases(H, N)["everything"], device, torch.float64)
    kw["sinks"].requires_grad_()
    problem = make_problem(N, H, HKV, 40, 70, 8, 8, torch.float64, device)
    q, k, v = (t.requires_grad_() for t in problem)
    out, w = torch_mha.attention(q, k, v, need_weights=True, average_weights=average, **kw)
    gw = torch.randn_like(w)
    go = torch.randn_like(out)
    grads = torch.autograd.grad([out, w], [q, k, v, kw["sinks"]], [go, gw])
    ref_out, ref_probs = reference(q, k, v, **kw)
    ref_w = ref_probs.mean(1) if average else ref_probs
    ref_grads = torch.autograd.grad([ref_out, ref_w], [q, k, v, kw["sinks"]], [go, gw])
    for a, b in zip(grads, ref_grads):
        assert_close(a, b, grad_tolerance(torch.float64, b))


GRADCHECK_CASES = {
    "gqa_window_softcap_alibi_sinks": dict(window_size=(6, 1), softcap=1.3, alibi=True, sinks=True),
    "bottom_right_causal_sinks": dict(window_size=(-1, 0), sinks=True),
    "causal_float_mask_softcap": dict(is_causal=True, softcap=0.7, mask=True),
}


@pytest.mark.parametrize("name", list(GRADCHECK_CASES))
def test_gradcheck(name: str, device: str) -> None:
    cfg = GRADCHECK_CASES[name]
    problem = make_problem(1, 4, 2, 9, 13, 4, 3, torch.float64, device)
    q, k, v = (t.requires_grad_() for t in problem)
    inputs = [q, k, v]
    sinks = randn(4, device=device, requires_grad=True) if cfg.get("sinks") else None
    mask = randn(4, 9, 13, device=device, requires_grad=True) if cfg.get("mask") else None
    if sinks is not None:
        inputs.append(sinks)
    if mask is not None:
        inputs.append(mask)
    alibi = (torch.rand(4) * 0.5).float().to(device) if cfg.get("alibi") else None

    def fn(*args):
        q_, k_, v_ = args[:3]
        rest = list(args[3:])
        s_ = rest.pop(0) if sinks is not None else None
        m_ = rest.pop(0) if mask is not None else None
        out, w = torch_mha.attention(
            q_,
            k_,
            v_,
            m_,
            None,
            cfg.get("is_causal", False),
            need_weights=True,
            window_size=cfg.get("window_size", (-1, -1)),
            alibi_slopes=alibi,
            softcap=cfg.get("softcap", 0.0),
            sinks=s_,
        )
        return out, w

    assert torch.autograd.gradcheck(fn, tuple(inputs), atol=1e-8, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Dropout with the modifiers


def test_dropout_with_modifiers_matches_reference(device: str) -> None:
    """The dropout mask is the one the kernel defines for (seed, b, h, i, j), whatever the
    modifiers; read it off the returned per-head weights and check output and gradients
    against the reference with those factors."""
    p = 0.3
    kw = _to(modifier_cases(H, N)["everything"], device, torch.float64)
    kw["sinks"].requires_grad_()
    problem = make_problem(N, H, HKV, 50, 90, 8, 8, torch.float64, device)
    q, k, v = (t.requires_grad_() for t in problem)
    out, _, w = core_forward(q, k, v, dropout_p=p, seed=11, **kw)
    _, probs = reference(q, k, v, **kw)
    factors = (w.detach() != 0).double() / (1 - p)
    # Where the probability itself is 0 (hidden keys), the factor does not matter.
    ref_out, ref_w = reference(q, k, v, dropout_factors=factors, **kw)
    assert_close(out, ref_out, forward_tol(torch.float64))
    assert_close(w, ref_w, forward_tol(torch.float64))
    kept = (w != 0) | (probs == 0)
    assert 0.55 < kept[probs != 0].double().mean().item() < 0.85
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, [q, k, v, kw["sinks"]], go)
    ref_grads = torch.autograd.grad(ref_out, [q, k, v, kw["sinks"]], go)
    for a, b in zip(grads, ref_grads):
        assert_close(a, b, grad_tolerance(torch.float64, b))


# ---------------------------------------------------------------------------------------------
# opcheck


def _opcheck_inputs(device: str, requires_grad: bool):
    q, k, v = make_problem(2, 4, 2, 9, 13, 8, 6, torch.float32, device)
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    sinks = torch.randn(4, device=device, requires_grad=requires_grad)
    slopes = torch.rand(2, 4, device=device)
    return q, k, v, sinks, slopes


@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "no_grad"])
def test_opcheck_attention_forward_with_modifiers(requires_grad: bool, device: str) -> None:
    q, k, v, sinks, slopes = _opcheck_inputs(device, requires_grad)
    seed = torch.tensor([3], device=device)
    opcheck(
        OPS.attention_forward.default,
        (q, k, v, None, None, False, None, 0.2, seed, True, False, 4, 1, slopes, 1.5, sinks),
    )


def test_opcheck_attention_backward_with_modifiers(device: str) -> None:
    q, k, v, sinks, slopes = _opcheck_inputs(device, False)
    out, stats, w = OPS.attention_forward(
        q, k, v, None, None, True, None, 0.0, None, True, True, 3, 0, slopes, 2.0, sinks
    )
    go = torch.randn_like(out)
    args = (
        go,
        q,
        k,
        v,
        out,
        stats,
        None,
        None,
        True,
        None,
        0.0,
        None,
        torch.randn_like(w),
        True,
        False,
        3,
        0,
        slopes,
        2.0,
        sinks,
    )
    opcheck(OPS.attention_backward.default, args)


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument


def _bad_cases(device: str) -> Dict[str, Tuple[dict, type, str]]:
    q, k, v = make_problem(2, 4, 2, 5, 7, 8, 8, torch.float32, device)
    return {
        "heads_not_multiple": (
            dict(key=k[:, :1].expand(2, 3, 7, 8), value=v[:, :1].expand(2, 3, 7, 8)),
            RuntimeError,
            r"number of heads \(dim 1\) of key and value to be equal and to divide that of query",
        ),
        "key_value_heads_differ": (
            dict(value=v[:, :1]),
            RuntimeError,
            r"number of heads \(dim 1\) of key and value",
        ),
        "window_left_below_minus_one": (
            dict(window_size=(-2, 0)),
            ValueError,
            r"window_size must be \(left, right\).*\(-2, 0\)",
        ),
        "window_right_below_minus_one": (
            dict(window_size=(3, -5)),
            ValueError,
            r"window_size.*\(3, -5\)",
        ),
        "window_three_values": (
            dict(window_size=(1, 2, 3)),
            ValueError,
            r"window_size must be a pair \(left, right\), but got 3 values",
        ),
        "softcap_negative": (dict(softcap=-1.0), ValueError, r"softcap must be.*>= 0.*-1"),
        "softcap_nan": (dict(softcap=float("nan")), ValueError, r"softcap must be.*nan"),
        "softcap_inf": (dict(softcap=float("inf")), ValueError, r"softcap must be.*inf"),
        "alibi_wrong_shape": (
            dict(alibi_slopes=torch.rand(3, device=device)),
            RuntimeError,
            r"alibi_slopes of shape \(heads,\) = \(4,\) or \(batch, heads\) = \(2, 4\).*\[3\]",
        ),
        "alibi_wrong_dtype": (
            dict(alibi_slopes=torch.rand(4, device=device, dtype=torch.float64)),
            RuntimeError,
            r"alibi_slopes of dtype float32.*Double",
        ),
        "alibi_wrong_device": (
            dict(alibi_slopes=torch.rand(4, device="meta")),
            RuntimeError,
            r"alibi_slopes on",
        ),
        "sinks_wrong_shape": (
            dict(sinks=torch.randn(2, 4, device=device)),
            RuntimeError,
            r"sinks of shape \(heads,\) = \(4,\).*\[2, 4\]",
        ),
        "sinks_wrong_dtype": (
            dict(sinks=torch.zeros(4, device=device, dtype=torch.int64)),
            RuntimeError,
            r"sinks of the query's dtype.*Long",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "heads_not_multiple",
        "key_value_heads_differ",
        "window_left_below_minus_one",
        "window_right_below_minus_one",
        "window_three_values",
        "softcap_negative",
        "softcap_nan",
        "softcap_inf",
        "alibi_wrong_shape",
        "alibi_wrong_dtype",
        "alibi_wrong_device",
        "sinks_wrong_shape",
        "sinks_wrong_dtype",
    ],
)
def test_bad_input(case: str, device: str) -> None:
    overrides, exc, match = _bad_cases(device)[case]
    q, k, v = make_problem(2, 4, 2, 5, 7, 8, 8, torch.float32, device)
    args = dict(query=q, key=k, value=v)
    args.update({name: overrides.pop(name) for name in ("key", "value") if name in overrides})
    with pytest.raises(exc, match=match):
        torch_mha.attention(args["query"], args["key"], args["value"], **overrides)


def test_alibi_slopes_requiring_grad_is_refused(device: str) -> None:
    q, k, v = make_problem(1, 2, 2, 5, 7, 8, 8, torch.float32, device)
    slopes = torch.rand(2, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="alibi_slopes do not support gradients"):
        torch_mha.attention(q, k, v, alibi_slopes=slopes)
    out, _ = torch_mha.attention(q, k, v, alibi_slopes=slopes.detach())
    assert out.shape == (1, 2, 5, 8)


def test_inputs_are_not_modified(device: str) -> None:
    kw = _to(modifier_cases(H, N)["everything"], device, torch.float32)
    q, k, v = make_problem(N, H, HKV, 20, 30, 8, 8, torch.float32, device)
    before = [t.clone() for t in (q, k, v, kw["sinks"], kw["alibi_slopes"])]
    out, _ = torch_mha.attention(q, k, v, dropout_p=0.2, **kw)
    for a, b in zip(before, (q, k, v, kw["sinks"], kw["alibi_slopes"])):
        assert torch.equal(a, b)
