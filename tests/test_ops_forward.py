"""Forward of the core op torch.ops.torch_mha.attention_forward: output, softmax_stats and
weights against the float64 reference in every dtype, over (L, S) pairs that straddle the CPU
tiles (64 queries x 128 keys) and head/value dims from 1 to 128; non-contiguous, transposed and
broadcast (stride 0) input layouts, the output keeping the query's memory order; per-head views
of a packed projection (bitwise the results of dense inputs, forward and backward); custom
scales; and random problems (hypothesis: shapes, masks, causal, layouts; forward and gradients
in float64).

Tests that take the `device` fixture (tests/conftest.py) run on the CPU and on CUDA; the CUDA
cases are reported as skipped where there is no GPU. Inputs, references, conventions and
tolerances: tests/attention_testing.py. CUDA-specific tests (CPU vs CUDA agreement, streams,
device indices, grid limits): tests/test_cuda.py.
"""

from __future__ import annotations

from typing import Tuple

import pytest
import torch
from attention_testing import (
    ALL_DTYPES,
    assert_close,
    check_forward,
    dtype_id,
    expected_forward,
    forward,
    grad_tolerance,
    make_mask,
    make_qkv,
    reference_grads,
    shape_id,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

import torch_mha

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
