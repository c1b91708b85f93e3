"""Attention weights of the core op torch.ops.torch_mha.attention_forward: need_weights=False
returns an empty weights tensor and the same output; head-averaged weights (average_weights=True,
(N, L, S)) equal the mean over heads of the per-head weights of the same call and of the
reference probabilities, in every dtype and with dropout; gradients through averaged
dropped-out weights; and torch_mha.attention's average_weights.

Tests that take the `device` fixture (tests/conftest.py) run on the CPU and on CUDA; the CUDA
cases are reported as skipped where there is no GPU. Inputs, references, conventions and
tolerances: tests/attention_testing.py. CUDA-specific tests (CPU vs CUDA agreement, streams,
device indices, grid limits): tests/test_cuda.py.
"""

from __future__ import annotations

import pytest
import torch
from attention_testing import (
    ALL_DTYPES,
    UNIT_ROUNDOFF,
    Tol,
    assert_close,
    averaged_tol,
    check_forward,
    dtype_id,
    expected_forward,
    forward,
    grad_tolerance,
    make_mask,
    make_qkv,
    reference_grads,
)

import torch_mha


@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "no_weights"])
def test_forward_need_weights_flag(need_weights: bool, device: str) -> None:
    """need_weights=False returns an empty weights tensor and the same output."""
    q, k, v = make_qkv(2, 2, 70, 130, 16, 8, torch.float64, device=device)
    result = forward(q, k, v, need_weights=need_weights)
    check_forward(result, expected_forward(q, k, v), torch.float64, need_weights)


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
