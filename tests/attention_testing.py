"""Shared helpers of the tests of the core torch_mha operators (torch.ops.torch_mha.*).

A plain module, not a test file: tests/test_ops_*.py and tests/test_cuda.py import from it, and
later test files (new attention variants) are meant to as well. tests/conftest.py puts tests/ on
sys.path and registers this module for pytest's assertion rewriting, so a failed assert in a
check_* helper reports its operands as it would in a test. What it holds:

* constants: OPS (torch.ops.torch_mha), the CPU tile sizes BLOCK_Q / BLOCK_K, LOW_PRECISION and
  ALL_DTYPES, UNIT_ROUNDOFF of each dtype;
* test ids: dtype_id, shape_id (an (N, H, L, S, E, Ev) tuple);
* tolerances: Tol, forward_tol, stats_tol, averaged_tol, grad_tolerance, and assert_close, which
  applies conftest.tolerance_factor to float32 results computed on CUDA;
* inputs: randn (drawn on the CPU in float64, rounded and moved to the device), make_qkv
  (query/key/value in a named memory layout), make_mask;
* the op and its expectations: forward (attention_forward with a Python seed), reference_scores,
  Expected / expected_forward (the float64 reference of tests/reference.py, with the softmax
  statistics), check_softmax_stats, check_forward, reference_grads (float64 gradients by autograd
  through the reference);
* opcheck and meta: opcheck (torch.library.opcheck, every check must succeed), meta_copy and
  assert_same_metadata (meta tensors mirroring real ones, and their comparison).

Inputs are drawn on the CPU (so every device sees the same values) and moved to the device;
references are computed in float64 on the device of the inputs. Every numerical expectation
comes from tests/reference.py (an independent float64 implementation), from torch's own
functions, or from an independent pure-Python Philox (in the dropout tests), never from
numbers torch_mha produced itself. The CPU kernels work on tiles of kBlockQ = 64 queries by
kBlockK = 128 keys (csrc/cpu/attention_kernel.h), so the lengths the tests use straddle 64 and
128.

The second output of attention_forward is softmax_stats (N, H, L, 2) in the accumulate dtype:
per query row [offset, log_sum], the row max of the masked scaled scores and
log(sum_j exp(s_j - offset)); softmax_stats.sum(-1) is the row's log-sum-exp, and a fully masked
row has (+inf, 0). check_forward compares the sum with torch.logsumexp of the float64 reference
scores and each component with the reference row max and logsumexp - max.

Tolerances (see forward_tol, stats_tol and grad_tolerance):
* float64: the kernel accumulates in float64 and uses a 1-ulp exp, so it agrees with the
  reference to ~1e-15; we allow 1e-12.
* float32: the inputs are exact in float64, so the only error is float32 accumulation (relative
  ~1e-7 per operation, a few hundred terms) and PyTorch's fast float32 exp (about 20 ulp, ~2e-6
  relative). The largest error measured is ~6e-7; we allow 1e-5.
* bfloat16 / float16: the reference runs on the SAME rounded inputs upcast to float64, so input
  rounding cancels. The kernel computes in float32 and rounds each output once to the input dtype,
  which costs at most one unit roundoff u (2^-8 for bfloat16, 2^-11 for float16) relative; we
  allow 2u relative plus the float32 absolute error. Gradients additionally use the *rounded*
  forward output in delta = sum(dO * O), an O(u) error relative to the gradient scale, so their
  absolute tolerance is a small multiple of u times the largest reference gradient.
* On CUDA, float32 results get conftest.tolerance_factor (2x) on top: the CUDA kernels sum in
  another order than the CPU ones (see conftest.py); float64 and the rounding-dominated
  bfloat16/float16 tolerances are the same on both devices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
from conftest import require_shared_memory, tolerance_factor
from reference import additive_mask, reference_attention
from torch import Tensor

import torch_mha  # noqa: F401  (loads the operator library)

OPS = torch.ops.torch_mha
BLOCK_Q = 64  # kBlockQ in csrc/cpu/attention_kernel.h
BLOCK_K = 128  # kBlockK

LOW_PRECISION = (torch.bfloat16, torch.float16)
ALL_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)

# Unit roundoff (half an ulp at 1.0) of the storage dtypes.
UNIT_ROUNDOFF: Dict[torch.dtype, float] = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def shape_id(shape: Tuple[int, ...]) -> str:
    n, h, l, s, e, ev = shape
    return f"N{n}H{h}-L{l}-S{s}-E{e}-Ev{ev}"


# ---------------------------------------------------------------------------------------------
# Tolerances


@dataclass(frozen=True)
class Tol:
    atol: float
    rtol: float


def forward_tol(dtype: torch.dtype) -> Tol:
    """Tolerance for output / weights in the input dtype (see the module docstring)."""
    if dtype == torch.float64:
        return Tol(1e-12, 1e-12)
    if dtype == torch.float32:
        return Tol(1e-5, 1e-5)
    # One rounding to the storage dtype (<= u relative) on top of float32 accumulation.
    return Tol(2e-5, 2 * UNIT_ROUNDOFF[dtype])


def stats_tol(dtype: torch.dtype) -> Tol:
    """softmax_stats are returned in float32 (float64 for float64 inputs), never rounded to
    bf16/fp16; the offset (a score) and log_sum carry the float32 score error."""
    return Tol(1e-12, 1e-12) if dtype == torch.float64 else Tol(1e-5, 1e-5)


def averaged_tol(dtype: torch.dtype) -> Tol:
    """Kernel-averaged weights vs torch's mean over heads of the per-head weights of the same
    call. Both are means of the same float32 (float64) probabilities, summed in another order;
    for bf16/fp16 the per-head weights are rounded before torch averages them and the averaged
    ones once after, so they differ by up to one rounding of each."""
    if dtype == torch.float64:
        return Tol(1e-15, 1e-13)
    if dtype == torch.float32:
        return Tol(1e-7, 1e-6)
    return Tol(1e-6, 2 * UNIT_ROUNDOFF[dtype])


def grad_tolerance(dtype: torch.dtype, reference: Tensor) -> Tol:
    """Gradient tolerance, scaled by the largest reference gradient for the rounding terms."""
    scale = max(float(reference.abs().max()), 1e-3) if reference.numel() else 1.0
    if dtype == torch.float64:
        return Tol(1e-10 * scale, 1e-10)
    if dtype == torch.float32:
        return Tol(1e-5 * scale, 1e-5)
    u = UNIT_ROUNDOFF[dtype]
    # Rounded output in delta (O(u) of the gradient scale) + one final rounding (u relative).
    return Tol(8 * u * scale, 4 * u)


def assert_close(actual: Tensor, expected: Tensor, tol: Tol, msg: str = "") -> None:
    # float32 results computed on CUDA get the device factor (conftest.tolerance_factor).
    factor = tolerance_factor(actual.device, actual.dtype)
    torch.testing.assert_close(
        actual.double(),
        expected.double().to(actual.device),
        atol=tol.atol * factor,
        rtol=tol.rtol * factor,
        equal_nan=False,
        msg=(lambda m: f"{msg}: {m}") if msg else None,
    )


# ---------------------------------------------------------------------------------------------
# Inputs


def randn(
    *shape: int,
    dtype: torch.dtype = torch.float64,
    requires_grad: bool = False,
    device: str = "cpu",
) -> Tensor:
    """Standard normal values drawn in float64 on the CPU (the same values for every device),
    rounded to `dtype` and moved to `device`."""
    t = torch.randn(*shape, dtype=torch.float64).to(dtype)
    return t.to(device).requires_grad_(requires_grad)


def make_qkv(
    n: int,
    h: int,
    l: int,
    s: int,
    e: int,
    ev: int,
    dtype: torch.dtype,
    layout: str = "contiguous",
    device: str = "cpu",
) -> Tuple[Tensor, Tensor, Tensor]:
    """query (n,h,l,e), key (n,h,s,e), value (n,h,s,ev) on `device`, laid out as `layout` says."""
    require_shared_memory(device, dtype, e, ev)

    def contiguous(length: int, dim: int) -> Tensor:
        return randn(n, h, length, dim, dtype=dtype, device=device)

    def seq_major(length: int, dim: int) -> Tensor:  # (N, L, H, D) viewed as (N, H, L, D)
        return randn(n, length, h, dim, dtype=dtype, device=device).permute(0, 2, 1, 3)

    def time_major(length: int, dim: int) -> Tensor:  # (L, N, H, D) viewed as (N, H, L, D)
        return randn(length, n, h, dim, dtype=dtype, device=device).permute(1, 2, 0, 3)

    def strided_last(length: int, dim: int) -> Tensor:  # last dimension with stride 2
        return randn(n, h, length, 2 * dim, dtype=dtype, device=device)[..., ::2]

    def transposed_last(length: int, dim: int) -> Tensor:  # last dimension with stride `length`
        return randn(n, h, dim, length, dtype=dtype, device=device).transpose(-1, -2)

    if layout == "contiguous":
        return contiguous(l, e), contiguous(s, e), contiguous(s, ev)
    if layout == "seq_major":
        return seq_major(l, e), seq_major(s, e), seq_major(s, ev)
    if layout == "time_major":
        return time_major(l, e), time_major(s, e), time_major(s, ev)
    if layout == "packed_qkv":
        # Self-attention heads read straight out of an (L, N, 3*H*E) projection.
        assert l == s and e == ev
        proj = randn(l, n, 3 * h * e, dtype=dtype, device=device)
        q, k, v = proj.chunk(3, dim=-1)
        split = lambda x: x.unflatten(-1, (h, e)).permute(1, 2, 0, 3)  # noqa: E731
        return split(q), split(k), split(v)
    if layout == "strided_last":
        return strided_last(l, e), strided_last(s, e), strided_last(s, ev)
    if layout == "transposed_last":
        return transposed_last(l, e), transposed_last(s, e), transposed_last(s, ev)
    if layout == "broadcast_heads":  # key/value shared by every head and batch (stride 0)
        return (
            contiguous(l, e),
            randn(1, 1, s, e, dtype=dtype, device=device).expand(n, h, s, e),
            randn(n, 1, s, ev, dtype=dtype, device=device).expand(n, h, s, ev),
        )
    if layout == "broadcast_rows":  # one key row repeated along the sequence (stride 0)
        return (
            contiguous(l, e),
            randn(n, h, 1, e, dtype=dtype, device=device).expand(n, h, s, e),
            contiguous(s, ev),
        )
    if layout == "mixed":
        return seq_major(l, e), transposed_last(s, e), strided_last(s, ev)
    raise ValueError(layout)


def make_mask(
    shape: Sequence[int], kind: str, dtype: torch.dtype = torch.float64, device: str = "cpu"
) -> Tensor:
    """A random mask: `bool` (about 30% True = masked out) or `float` (finite biases)."""
    if kind == "bool":
        return (torch.rand(*shape) < 0.3).to(device)
    return randn(*shape, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------
# The op and the reference


def forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    seed: Optional[int] = None,
    need_weights: bool = True,
    average_weights: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    # The seed lives on the query's device (the CUDA kernels read it there).
    seed_tensor = None if seed is None else torch.tensor([seed], dtype=torch.long, device=q.device)
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
    )


def reference_scores(
    q: Tensor,
    k: Tensor,
    attn_mask: Optional[Tensor],
    key_padding_mask: Optional[Tensor],
    is_causal: bool,
    scale: Optional[float],
) -> Tensor:
    """Masked, scaled scores (N, H, L, S) in float64, the same way reference.py builds them."""
    q64, k64 = q.detach().double(), k.detach().double()
    if scale is None:  # reference.py's default, including head_dim 0
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] > 0 else 1.0
    scores = q64 @ k64.transpose(-1, -2) * scale
    bias = additive_mask(None if attn_mask is None else attn_mask.detach(), torch.float64)
    if bias is not None:
        scores = scores + bias
    kpm = additive_mask(
        None if key_padding_mask is None else key_padding_mask.detach(), torch.float64
    )
    if kpm is not None:
        scores = scores + kpm[:, None, None, :]
    if is_causal:
        hidden = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(hidden, float("-inf"))
    return scores


@dataclass
class Expected:
    output: Tensor  # float64
    weights: Tensor  # float64 (N, H, L, S)
    logsumexp: Tensor  # float64 (N, H, L), +inf on fully masked rows
    row_max: Tensor  # float64 (N, H, L), the expected offset: +inf on fully masked rows
    log_sum: Tensor  # float64 (N, H, L), logsumexp - row_max: 0 on fully masked rows
    fully_masked: Tensor  # (N, H, L) bool

    @property
    def averaged_weights(self) -> Tensor:
        """(N, L, S): the mean over heads of the reference probabilities. With no heads
        (H = 0) torch's mean is 0/0 = NaN; the kernel returns zeros there (no NaN out of an
        empty input), which is what we expect."""
        if self.weights.shape[1] == 0:
            return self.weights.sum(1)
        return self.weights.mean(1)


def expected_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    dropout_factors: Optional[Tensor] = None,
) -> Expected:
    detach = lambda t: None if t is None else t.detach()  # noqa: E731
    with torch.no_grad():
        out, probs = reference_attention(
            q.detach(),
            k.detach(),
            v.detach(),
            detach(attn_mask),
            detach(key_padding_mask),
            is_causal,
            scale,
            dropout_factors,
        )
        scores = reference_scores(q, k, attn_mask, key_padding_mask, is_causal, scale)
        lse = torch.logsumexp(scores, dim=-1)
        if scores.shape[-1] > 0:
            row_max = scores.amax(dim=-1)
        else:  # no keys: every row is fully masked
            row_max = torch.full(
                scores.shape[:-1], -math.inf, dtype=torch.float64, device=scores.device
            )
    fully = torch.isneginf(lse)
    inf = torch.full_like(lse, math.inf)
    lse = torch.where(fully, inf, lse)
    row_max = torch.where(fully, inf, row_max)
    log_sum = torch.where(fully, torch.zeros_like(lse), lse - row_max)
    return Expected(out, probs, lse, row_max, log_sum, fully)


def check_softmax_stats(stats: Tensor, expected: Expected, dtype: torch.dtype) -> None:
    """softmax_stats (N, H, L, 2) = [offset, log_sum]: shape, dtype, sum = logsumexp,
    offset = row max, log_sum = logsumexp - max, and exactly (+inf, 0) on fully masked rows."""
    n, h, l, _ = expected.output.shape
    assert stats.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert stats.shape == (n, h, l, 2), stats.shape
    assert not stats.requires_grad
    offset, log_sum = stats[..., 0], stats[..., 1]
    # +inf == +inf passes assert_close; finite values compare with the tolerance.
    assert_close(stats.sum(-1), expected.logsumexp, stats_tol(dtype), "logsumexp")
    assert_close(offset, expected.row_max, stats_tol(dtype), "offset (row max)")
    assert_close(log_sum, expected.log_sum, stats_tol(dtype), "log_sum")
    rows = expected.fully_masked
    assert bool(torch.isposinf(offset[rows]).all()), "fully masked rows: offset +inf"
    assert bool((log_sum[rows] == 0).all()), "fully masked rows: log_sum 0"
    assert bool(torch.isfinite(stats[~rows]).all())
    # A row with at least one key has sum_j exp(s_j - max) in [1, S]: log_sum in [0, log S].
    s = expected.weights.shape[-1]
    if s > 0:
        slack = 1e-6 * max(1.0, math.log(s))
        assert bool((log_sum[~rows] >= -slack).all())
        assert bool((log_sum[~rows] <= math.log(s) + slack).all())


def check_forward(
    result: Tuple[Tensor, Tensor, Tensor],
    expected: Expected,
    dtype: torch.dtype,
    need_weights: bool = True,
    average_weights: bool = False,
) -> None:
    out, stats, weights = result
    assert out.dtype == dtype and out.shape == expected.output.shape
    assert_close(out, expected.output, forward_tol(dtype), "output")
    check_softmax_stats(stats, expected, dtype)
    if need_weights:
        ref = expected.averaged_weights if average_weights else expected.weights
        assert weights.dtype == dtype and weights.shape == ref.shape, (weights.shape, ref.shape)
        assert_close(weights, ref, forward_tol(dtype), "weights")
    else:
        assert weights.numel() == 0


def reference_grads(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    grad_output: Tensor,
    attn_mask: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    grad_weights: Optional[Tensor] = None,
    dropout_factors: Optional[Tensor] = None,
    average_weights: bool = False,
) -> Dict[str, Optional[Tensor]]:
    """Float64 gradients by autograd through reference.py of
    loss = sum(output * grad_output) + sum(weights * grad_weights), where weights are the
    reference probabilities (N, H, L, S), or their mean over heads (N, L, S) when
    average_weights (grad_weights then has that shape).

    Masks that require grad get gradients. A fully masked query row contributes nothing (its
    output and weights are constant zeros); reference.py's safe softmax differentiates to NaN
    there (0/0), so such rows are unmasked and their upstream gradients zeroed instead, which
    yields the exact gradients of the safe softmax.
    """
    leaf = lambda t: t.detach().double().requires_grad_(True)  # noqa: E731
    q64, k64, v64 = leaf(q), leaf(k), leaf(v)
    mask64 = None
    if attn_mask is not None:
        mask64 = leaf(attn_mask) if attn_mask.requires_grad else attn_mask.detach()
    kpm64 = None
    if key_padding_mask is not None:
        kpm64 = key_padding_mask.detach()
        if key_padding_mask.requires_grad:
            kpm64 = leaf(key_padding_mask)
    go = grad_output.detach().double()
    gw = None if grad_weights is None else grad_weights.detach().double()

    scores = reference_scores(q, k, attn_mask, key_padding_mask, is_causal, scale)
    fully = torch.isneginf(scores).all(dim=-1) if scores.shape[-1] > 0 else None
    if fully is not None and bool(fully.any()):
        n, h, l, s = scores.shape
        bias = torch.zeros(n, h, l, s, dtype=torch.float64, device=scores.device)
        if mask64 is not None:
            bias = bias + additive_mask(mask64, torch.float64)
        if kpm64 is not None:
            bias = bias + additive_mask(kpm64, torch.float64)[:, None, None, :]
        if is_causal:
            causal = torch.ones(l, s, dtype=torch.bool, device=scores.device).triu(1)
            bias = bias.masked_fill(causal, float("-inf"))
        bias = torch.where(fully[..., None], torch.zeros_like(bias), bias)
        out, probs = reference_attention(q64, k64, v64, bias, None, False, scale, dropout_factors)
        keep = (~fully)[..., None].double()
        go = go * keep
        # The fully masked rows' weights are constant zeros (per head, before any averaging).
        probs = probs * keep
    else:
        out, probs = reference_attention(
            q64, k64, v64, mask64, kpm64, is_causal, scale, dropout_factors
        )
    loss = (out * go).sum()
    if gw is not None:
        weights = probs.mean(1) if average_weights else probs
        assert gw.shape == weights.shape, (gw.shape, weights.shape)
        loss = loss + (weights * gw).sum()
    inputs = {"query": q64, "key": k64, "value": v64}
    if mask64 is not None and mask64.requires_grad:
        inputs["attn_mask"] = mask64
    if kpm64 is not None and kpm64.requires_grad:
        inputs["key_padding_mask"] = kpm64
    grads = torch.autograd.grad(loss, list(inputs.values()))
    return dict(zip(inputs.keys(), grads))


# ---------------------------------------------------------------------------------------------
# opcheck and meta


def opcheck(op, args: tuple, kwargs: Optional[dict] = None) -> None:
    result = torch.library.opcheck(op, args, kwargs or {})
    failures = {name: status for name, status in result.items() if status != "SUCCESS"}
    assert not failures, failures


def meta_copy(x, memo: Optional[Dict[int, Tensor]] = None):
    """Meta tensors with the sizes, strides and dtypes of x's tensors (nested in tuples, lists,
    dicts); the same tensor twice maps to the same meta tensor, so identity checks such as
    self-attention's query-is-key still see one tensor."""
    memo = {} if memo is None else memo
    if isinstance(x, (list, tuple)):
        return type(x)(meta_copy(t, memo) for t in x)
    if isinstance(x, dict):
        return {key: meta_copy(t, memo) for key, t in x.items()}
    if not torch.is_tensor(x):
        return x
    if id(x) not in memo:
        memo[id(x)] = torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, device="meta")
    return memo[id(x)]


def assert_same_metadata(meta: Tensor, real: Tensor, what: str) -> None:
    assert meta.device.type == "meta", what
    assert meta.shape == real.shape, (what, meta.shape, real.shape)
    assert meta.dtype == real.dtype, (what, meta.dtype, real.dtype)
    if real.numel() > 1:
        assert meta.stride() == real.stride(), (what, meta.stride(), real.stride())
