"""Dropout in the core op torch.ops.torch_mha.attention_forward: the same seed gives the same
results and another seed others; torch_mha.attention draws its seed from the default generator;
the dropped fraction; output = dropped-out weights @ V; forward and backward use the same mask
(gradients vs the reference with the mask read off the weights); and the keep mask is, bit for
bit, an independent pure-Python Philox4x32-10 (pinned by Random123's known answers).

Tests that take the `device` fixture (tests/conftest.py) run on the CPU and on CUDA; the CUDA
cases are reported as skipped where there is no GPU. Inputs, references, conventions and
tolerances: tests/attention_testing.py. CUDA-specific tests (CPU vs CUDA agreement, streams,
device indices, grid limits): tests/test_cuda.py.
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import pytest
import torch
from attention_testing import (
    Tol,
    assert_close,
    dtype_id,
    expected_forward,
    forward,
    forward_tol,
    grad_tolerance,
    make_mask,
    make_qkv,
    randn,
    reference_grads,
)
from torch import Tensor

import torch_mha


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
