"""CUDA-only tests: the CUDA kernels against the CPU kernels and the float64 reference, and what
only a GPU has (device indices, streams, grid limits, autocast and torch.compile on CUDA).

The device-parametrized suite (tests/test_ops_*.py, tests/test_parity.py) already runs every
operator and layer test on CUDA against the float64 reference and nn.MultiheadAttention. This
file compares the two backends directly on random problems sized around the CUDA tiles (32
queries x 32 keys, csrc/cuda/attention_kernels.cuh; the CPU tiles are 64 x 128): lengths 1, 31,
32, 33, 63, 65 and 200 as L and as S, head dims 1 to 128 with value_dim != head_dim, every mask
kind and layout, and checks what the CUDA launch code is responsible for.

Every test here is skipped, with the reason, where there is no GPU or torch_mha was built
without its CUDA kernels; `pytest -m cuda` selects them.

Problems are drawn on the CPU from a fixed generator (materialize), so both devices see the same
values. Tolerances (tolerance()):
* CPU vs CUDA, float64: 1e-12 on outputs, weights and softmax_stats, 1e-10 x the largest
  gradient on gradients. Both accumulate in float64; they differ by summation order (~1e-15).
* CPU vs CUDA, float32: 2e-5, and 2e-5 x the largest gradient. Each backend is within 1e-5 of
  the exact result (tests/test_ops_*.py check the CPU against the float64 reference), so the two
  are within 2e-5 of each other.
* bfloat16/float16, CUDA vs the float64 reference on the same rounded inputs: one rounding of
  each output (2u relative, u the unit roundoff of the dtype) plus twice attention_testing.py's
  float32 absolute error; gradients 8u x the largest gradient (delta = sum(dO * O) uses the
  rounded output), as in attention_testing.py.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Tuple

import pytest
import torch
from attention_testing import UNIT_ROUNDOFF, dtype_id, expected_forward, reference_grads
from conftest import HAS_CUDA, cuda_shared_memory_bytes, require_shared_memory, requires_cuda
from torch import Tensor, nn

import torch_mha

pytestmark = [pytest.mark.cuda, requires_cuda]

OPS = torch.ops.torch_mha
OursMHA = torch_mha.MultiheadAttention
TILE = 32  # kTile in csrc/cuda/attention_kernels.cuh: queries per block and keys per tile
LOW_PRECISION = (torch.float16, torch.bfloat16)
ALL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# torch.cuda._sleep cycles: a few hundred milliseconds on current GPUs (1-2 GHz).
SLEEP_CYCLES = 1 << 29


# ---------------------------------------------------------------------------------------------
# Problems


@dataclass(frozen=True)
class Case:
    """One attention problem. Masks: attn_mask = (kind, shape) with kind "bool", "float" (the
    query's dtype) or "float32" and a shape name of ATTN_MASK_SHAPES; kpm = "bool",
    "bool_strided", "float" or "float_transposed"."""

    shape: Tuple[int, int, int, int, int, int]  # N, H, L, S, E, Ev
    dtype: torch.dtype = torch.float32
    attn_mask: Optional[Tuple[str, str]] = None
    kpm: Optional[str] = None
    is_causal: bool = False
    scale: Optional[float] = None
    layout: str = "contiguous"
    dropout_p: float = 0.0
    seed: int = 0


ATTN_MASK_SHAPES = [
    "LS",
    "11LS",
    "N1LS",
    "NHLS",
    "HLS",
    "S",
    "1S",
    "L1",
    "N1L1",
    "expanded_S",  # (S,) expanded to (N, H, L, S): stride 0 in every dimension but the last
    "expanded_L1",  # (N, 1, L, 1) expanded: one value per query row, stride-0 keys
    "transposed_SL",  # key stride L, query stride 1
    "sliced_NHLS",  # every stride odd
]

LAYOUTS = [
    "contiguous",
    "seq_major",  # (N, L, H, D) viewed as (N, H, L, D)
    "time_major",  # (L, N, H, D) viewed as (N, H, L, D)
    "packed_qkv",  # heads sliced straight out of an (L, N, 3 * H * E) projection
    "strided_last",  # last dimension with stride 2 (the kernels take a unit-stride copy)
    "transposed_last",
    "broadcast_heads",  # key/value expanded over batch and heads (stride 0)
    "mixed",
]


def materialize(case: Case, device: str) -> Dict[str, Tensor]:
    """The op's inputs on `device`, laid out as the case says: query, key, value and the masks.

    Floating inputs are views of leaves that require grad, so their gradients (as passed to the
    op) can be taken. Values are drawn on the CPU from a fixed generator: every device gets the
    same problem."""
    n, h, l, s, e, ev = case.shape
    require_shared_memory(device, case.dtype, e, ev)
    gen = torch.Generator().manual_seed(20240611)

    def draw(*shape: int, dtype: torch.dtype = case.dtype) -> Tensor:
        values = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
        return values.to(device).requires_grad_()

    def bools(*shape: int) -> Tensor:
        return (torch.rand(*shape, generator=gen) < 0.3).to(device)

    inputs = dict(zip(("query", "key", "value"), _layout_views(case.layout, case.shape, draw)))
    if case.attn_mask is not None:
        kind, name = case.attn_mask
        if kind == "bool":
            make: Callable[..., Tensor] = bools
        else:
            mask_dtype = torch.float32 if kind == "float32" else case.dtype
            make = lambda *shape: draw(*shape, dtype=mask_dtype)  # noqa: E731
        inputs["attn_mask"] = _attn_mask_view(name, n, h, l, s, make)
    if case.kpm == "bool":
        inputs["key_padding_mask"] = bools(n, s)
    elif case.kpm == "bool_strided":
        inputs["key_padding_mask"] = bools(n, 3 * s)[:, ::3]
    elif case.kpm == "float":
        inputs["key_padding_mask"] = draw(n, s)
    elif case.kpm == "float_transposed":
        inputs["key_padding_mask"] = draw(s, n).t()
    else:
        assert case.kpm is None, case.kpm
    return inputs


def _layout_views(
    layout: str, shape: Tuple[int, ...], draw: Callable[..., Tensor]
) -> Tuple[Tensor, Tensor, Tensor]:
    n, h, l, s, e, ev = shape

    def contiguous(length: int, dim: int) -> Tensor:
        return draw(n, h, length, dim)

    def seq_major(length: int, dim: int) -> Tensor:
        return draw(n, length, h, dim).permute(0, 2, 1, 3)

    def time_major(length: int, dim: int) -> Tensor:
        return draw(length, n, h, dim).permute(1, 2, 0, 3)

    def strided_last(length: int, dim: int) -> Tensor:
        return draw(n, h, length, 2 * dim)[..., ::2]

    def transposed_last(length: int, dim: int) -> Tensor:
        return draw(n, h, dim, length).transpose(-1, -2)

    if layout == "contiguous":
        return contiguous(l, e), contiguous(s, e), contiguous(s, ev)
    if layout == "seq_major":
        return seq_major(l, e), seq_major(s, e), seq_major(s, ev)
    if layout == "time_major":
        return time_major(l, e), time_major(s, e), time_major(s, ev)
    if layout == "packed_qkv":
        assert l == s and e == ev
        q, k, v = draw(l, n, 3 * h * e).chunk(3, dim=-1)
        return tuple(x.unflatten(-1, (h, e)).permute(1, 2, 0, 3) for x in (q, k, v))
    if layout == "strided_last":
        return strided_last(l, e), strided_last(s, e), strided_last(s, ev)
    if layout == "transposed_last":
        return transposed_last(l, e), transposed_last(s, e), transposed_last(s, ev)
    if layout == "broadcast_heads":
        return (
            contiguous(l, e),
            draw(1, 1, s, e).expand(n, h, s, e),
            draw(n, 1, s, ev).expand(n, h, s, ev),
        )
    if layout == "mixed":
        return seq_major(l, e), transposed_last(s, e), strided_last(s, ev)
    raise ValueError(layout)


def _attn_mask_view(
    name: str, n: int, h: int, l: int, s: int, make: Callable[..., Tensor]
) -> Tensor:
    shapes = {
        "LS": (l, s),
        "11LS": (1, 1, l, s),
        "N1LS": (n, 1, l, s),
        "NHLS": (n, h, l, s),
        "HLS": (h, l, s),
        "S": (s,),
        "1S": (1, s),
        "L1": (l, 1),
        "N1L1": (n, 1, l, 1),
    }
    if name in shapes:
        return make(*shapes[name])
    if name == "expanded_S":
        return make(s).expand(n, h, l, s)
    if name == "expanded_L1":
        return make(n, 1, l, 1).expand(n, h, l, s)
    if name == "transposed_SL":
        return make(s, l).t()
    if name == "sliced_NHLS":
        return make(n, h + 1, 2 * l, 2 * s + 1)[:, 1:, ::2, 1::2]
    raise ValueError(name)


def _upstream(shape: torch.Size, dtype: torch.dtype, device, gen: torch.Generator) -> Tensor:
    """Upstream gradient values, drawn on the CPU (the same on every device)."""
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(device)


def run(
    case: Case, device: str, need_weights: bool = True, average: bool = False
) -> Dict[str, Tensor]:
    """torch_mha forward and backward of `case` on `device`.

    Returns output, softmax_stats, weights (with need_weights) and grad_<input> for query, key,
    value and the float masks (gradients of loss = sum(output * dO) + sum(weights * dW), with
    dO, dW drawn on the CPU), all on the device they were computed on."""
    inputs = materialize(case, device)
    seed = None
    if case.dropout_p > 0:
        seed = torch.tensor([case.seed], dtype=torch.long, device=device)
    out, stats, weights = OPS.attention_forward(
        inputs["query"],
        inputs["key"],
        inputs["value"],
        inputs.get("attn_mask"),
        inputs.get("key_padding_mask"),
        case.is_causal,
        case.scale,
        case.dropout_p,
        seed,
        need_weights,
        average,
    )
    gen = torch.Generator().manual_seed(7)
    loss = (out * _upstream(out.shape, out.dtype, out.device, gen)).sum()
    values = {"output": out.detach(), "softmax_stats": stats}
    if need_weights:
        loss = loss + (weights * _upstream(weights.shape, weights.dtype, out.device, gen)).sum()
        values["weights"] = weights.detach()
    targets = {name: t for name, t in inputs.items() if t.requires_grad}
    grads = torch.autograd.grad(loss, list(targets.values()))
    values.update({f"grad_{name}": g for name, g in zip(targets, grads)})
    return values


def reference(case: Case, need_weights: bool = True, average: bool = False) -> Dict[str, Tensor]:
    """What run() returns, from the float64 reference (tests/reference.py, through
    attention_testing.py's expected_forward and reference_grads) on the CPU, on the same
    (rounded) inputs and upstream gradients. No dropout."""
    assert case.dropout_p == 0.0
    inputs = materialize(case, "cpu")
    q, k, v = inputs["query"], inputs["key"], inputs["value"]
    masks = dict(attn_mask=inputs.get("attn_mask"), key_padding_mask=inputs.get("key_padding_mask"))
    exp = expected_forward(q, k, v, **masks, is_causal=case.is_causal, scale=case.scale)
    values = {
        "output": exp.output,
        "softmax_stats": torch.stack([exp.row_max, exp.log_sum], dim=-1),
    }
    gen = torch.Generator().manual_seed(7)
    go = _upstream(exp.output.shape, case.dtype, "cpu", gen)
    gw = None
    if need_weights:
        values["weights"] = exp.averaged_weights if average else exp.weights
        gw = _upstream(values["weights"].shape, case.dtype, "cpu", gen)
    grads = reference_grads(
        q,
        k,
        v,
        go,
        **masks,
        is_causal=case.is_causal,
        scale=case.scale,
        grad_weights=gw,
        average_weights=average,
    )
    values.update({f"grad_{name}": g for name, g in grads.items()})
    return values


def _less_precise(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return max(a, b, key=lambda d: UNIT_ROUNDOFF.get(d, 0.0))


def tolerance(name: str, dtype: torch.dtype, expected: Tensor) -> Tuple[float, float]:
    """(atol, rtol) for result `name` of a `dtype` problem (see the module docstring): CPU vs
    CUDA for float64/float32, CUDA vs the float64 reference for float16/bfloat16."""
    grad = name.startswith("grad_")
    scale = 1.0
    if grad and expected.numel():
        scale = max(float(expected.abs().max()), 1e-3)
    if dtype == torch.float64:
        return (1e-10 * scale, 1e-10) if grad else (1e-12, 1e-12)
    if dtype == torch.float32:
        return (2e-5 * scale, 2e-5) if grad else (2e-5, 2e-5)
    u = UNIT_ROUNDOFF[dtype]
    if grad:
        return 8 * u * scale, 4 * u
    if name == "softmax_stats":  # float32, never rounded to the input dtype
        return 2e-5, 2e-5
    return 4e-5, 2 * u


def assert_agree(actual: Dict[str, Tensor], expected: Dict[str, Tensor], dtype: torch.dtype):
    """Every result of `actual` (CUDA) against `expected` (CPU kernels or the reference)."""
    assert actual.keys() == expected.keys(), (sorted(actual), sorted(expected))
    for name, exp in expected.items():
        act = actual[name]
        assert act.shape == exp.shape, (name, act.shape, exp.shape)
        # A float32 mask of a float64 query gets its gradient rounded to float32.
        atol, rtol = tolerance(name, _less_precise(dtype, act.dtype), exp)
        torch.testing.assert_close(
            act.detach().cpu().double(),
            exp.detach().cpu().double(),
            atol=atol,
            rtol=rtol,
            msg=lambda m, name=name: f"{name}: {m}",
        )


def check_against_cpu(case: Case, need_weights: bool = True, average: bool = False):
    """CUDA vs the CPU kernels (float32/float64) or vs the float64 reference (float16/bfloat16,
    which the CPU kernels also support, but the reference is the better yardstick)."""
    cuda = run(case, "cuda", need_weights, average)
    for name, value in cuda.items():
        assert value.device.type == "cuda", name
    assert cuda["output"].dtype == case.dtype
    if case.dtype in LOW_PRECISION:
        expected = reference(case, need_weights, average)
    else:
        expected = run(case, "cpu", need_weights, average)
    assert_agree(cuda, expected, case.dtype)
    return cuda


def case_id(case: Case) -> str:
    n, h, l, s, e, ev = case.shape
    return f"N{n}H{h}-L{l}-S{s}-E{e}-Ev{ev}"


# =============================================================================================
# 1. CPU vs CUDA on random problems

# Every length of {1, 31, 32, 33, 63, 65, 200} appears as L and as S (around the 32-wide CUDA
# tiles), every head dim of {1, 17, 32, 64, 80, 128}, and value_dim != head_dim both ways.
AGREEMENT_SHAPES = [
    (2, 3, 1, 33, 1, 1),
    (1, 2, 31, 1, 17, 17),
    (2, 2, 32, 65, 32, 16),
    (1, 3, 33, 32, 64, 64),
    (1, 2, 63, 200, 80, 80),
    (2, 1, 65, 31, 128, 128),
    (1, 2, 200, 63, 17, 80),
    (1, 1, 200, 200, 128, 64),
    (2, 2, 65, 65, 64, 128),
    (1, 2, 1, 1, 32, 17),
]
AGREEMENT_CONFIGS = {
    "plain": dict(),
    "masks+causal+scale": dict(attn_mask=("float", "HLS"), kpm="bool", is_causal=True, scale=0.37),
}


@pytest.mark.parametrize("config", list(AGREEMENT_CONFIGS))
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", AGREEMENT_SHAPES, ids=lambda s: case_id(Case(s)))
def test_forward_backward_match_cpu(shape, dtype: torch.dtype, config: str) -> None:
    """Output, softmax_stats, weights (per head and averaged) and every gradient."""
    case = Case(shape, dtype, **AGREEMENT_CONFIGS[config])
    per_head = check_against_cpu(case, need_weights=True, average=False)
    check_against_cpu(case, need_weights=True, average=True)
    # need_weights only adds the weights: the output is the same kernel's, bit for bit.
    without = run(case, "cuda", need_weights=False)
    assert torch.equal(without["output"], per_head["output"])
    assert torch.equal(without["softmax_stats"], per_head["softmax_stats"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("kind", ["bool", "float", "float32"])
@pytest.mark.parametrize("shape_name", ATTN_MASK_SHAPES)
def test_attn_mask_kinds_match_cpu(shape_name: str, kind: str, dtype: torch.dtype) -> None:
    """Every attn_mask kind and broadcast shape (stride-0 expanded ones included), with their
    gradients for float masks."""
    check_against_cpu(Case((2, 3, 33, 65, 17, 17), dtype, attn_mask=(kind, shape_name)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("kpm", ["bool", "bool_strided", "float", "float_transposed"])
def test_key_padding_masks_match_cpu(kpm: str, dtype: torch.dtype) -> None:
    case = Case((3, 2, 63, 65, 32, 17), dtype, kpm=kpm, attn_mask=("bool", "LS"))
    check_against_cpu(case)
    check_against_cpu(case, average=True)


@pytest.mark.parametrize("masks", [False, True], ids=["no_masks", "masks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize(
    "ls",
    [(31, 65), (65, 65), (200, 33), (1, 200), (33, 1), (32, 32), (64, 96)],
    ids=lambda ls: f"L{ls[0]}-S{ls[1]}",
)
def test_causal_matches_cpu(ls: Tuple[int, int], dtype: torch.dtype, masks: bool) -> None:
    """Top-left aligned causal masking with L < S, L == S and L > S; the kernels skip key tiles
    past the diagonal (forward, dQ) and query tiles before it (dK/dV)."""
    l, s = ls
    extra = dict(attn_mask=("float", "LS"), kpm="float") if masks else {}
    check_against_cpu(Case((2, 2, l, s, 16, 24), dtype, is_causal=True, **extra))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("scale", [0.0, 0.37, -1.5, 4.0])
def test_custom_scale_matches_cpu(scale: float, dtype: torch.dtype) -> None:
    check_against_cpu(Case((2, 2, 33, 65, 17, 17), dtype, attn_mask=("bool", "LS"), scale=scale))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_match_cpu(layout: str, dtype: torch.dtype) -> None:
    """Non-contiguous inputs (packed qkv slices, permuted, strided, stride-0); the output has the
    query's memory order on both devices and under the Meta kernel."""
    case = Case((2, 3, 65, 65, 16, 16), dtype, layout=layout, kpm="bool")
    cuda = check_against_cpu(case)
    inputs = materialize(case, "cpu")
    args = [inputs[name].detach() for name in ("query", "key", "value", "key_padding_mask")]
    cpu_out = OPS.attention_forward(*args[:3], None, args[3])[0]
    meta = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta") for t in args]
    meta_out = OPS.attention_forward(*meta[:3], None, meta[3])[0]
    assert cuda["output"].stride() == cpu_out.stride() == meta_out.stride()


# =============================================================================================
# 2. Fully masked rows


def _fully_masked_inputs(
    case: str, n: int, h: int, l: int, s: int, causal: bool
) -> Tuple[Tensor, Tensor]:
    """(attn_mask (N, H, L, S) bool, fully masked rows (N, H, L) under that mask + causal)."""
    mask = torch.rand(n, h, l, s) < 0.2
    if case == "rows_in_every_tile":  # rows in the first, second and last query tile
        mask[0, 1, [0, 31, 32, 33, l - 1]] = True
    elif case == "whole_batch":
        mask[1] = True
    elif case == "causal_first_key":  # with causal masking query 0 sees key 0 only
        mask[:, :, :, 0] = True
    hidden = mask.clone()
    if causal:
        hidden |= torch.ones(l, s, dtype=torch.bool).triu(1)
    return mask, hidden.all(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("case", ["rows_in_every_tile", "whole_batch", "causal_first_key"])
def test_fully_masked_rows(case: str, dtype: torch.dtype) -> None:
    """Rows without a visible key: zero output, softmax_stats (+inf, 0), zero weights, zero and
    finite gradients, exactly, on CUDA; and everything as on the CPU."""
    n, h, l, s, e = 2, 2, 65, 70, 16
    causal = case == "causal_first_key"
    mask, fully = _fully_masked_inputs(case, n, h, l, s, causal)
    assert bool(fully.any())
    q, k, v = (
        torch.randn(n, h, length, e, dtype=dtype, device="cuda", requires_grad=True)
        for length in (l, s, s)
    )
    cuda_mask, fully = mask.cuda(), fully.cuda()
    out, stats, w = OPS.attention_forward(q, k, v, cuda_mask, None, causal, None, 0.0, None, True)
    assert torch.equal(out[fully], torch.zeros_like(out[fully]))
    assert torch.equal(w[fully], torch.zeros_like(w[fully]))
    inf_zero = torch.tensor([math.inf, 0.0], device="cuda").expand(int(fully.sum()), 2)
    assert torch.equal(stats[fully], inf_zero)
    assert bool(torch.isfinite(stats[~fully]).all())
    gq, gk, gv = torch.autograd.grad(
        (out * torch.randn_like(out)).sum() + (w * torch.randn_like(w)).sum(), (q, k, v)
    )
    for g in (gq, gk, gv):
        assert bool(torch.isfinite(g).all())
    assert torch.equal(gq[fully], torch.zeros_like(gq[fully]))
    _compare_with_mask_on_cpu(q, k, v, mask, causal)


def _compare_with_mask_on_cpu(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, causal: bool):
    dtype = q.dtype
    results = {}
    for device in ("cuda", "cpu"):
        leaves = [t.detach().to(device).requires_grad_() for t in (q, k, v)]
        out, stats, w = OPS.attention_forward(
            *leaves, mask.to(device), None, causal, None, 0.0, None, True, True
        )
        gen = torch.Generator().manual_seed(3)
        go = _upstream(out.shape, dtype, device, gen)
        gw = _upstream(w.shape, dtype, device, gen)
        grads = torch.autograd.grad((out * go).sum() + (w * gw).sum(), leaves)
        results[device] = dict(
            output=out.detach(),
            softmax_stats=stats,
            weights=w.detach(),
            grad_query=grads[0],
            grad_key=grads[1],
            grad_value=grads[2],
        )
    if dtype in LOW_PRECISION:
        # Both backends round float32 results once: twice the one-sided tolerance.
        for name, exp in results["cpu"].items():
            atol, rtol = tolerance(name, dtype, exp)
            torch.testing.assert_close(
                results["cuda"][name].cpu().double(),
                exp.double(),
                atol=2 * atol,
                rtol=2 * rtol,
                msg=lambda m, name=name: f"{name}: {m}",
            )
    else:
        assert_agree(results["cuda"], results["cpu"], dtype)


# =============================================================================================
# 3. Dropout: the same seed draws the same mask on both devices


@pytest.mark.parametrize("config", ["plain", "masks+causal"])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize(
    "seed",
    [0, 123456789, (1 << 40) + 17, -3],
    ids=["seed0", "seed_small", "seed_above_2^32", "seed_negative"],
)
def test_dropout_mask_bit_identical_on_cpu_and_cuda(seed: int, p: float, config: str) -> None:
    """common/dropout.h defines the keep mask as a function of (seed, b, h, i, j), so a seed
    tensor with the same value on the CPU and on the GPU (read there by the kernels) drops
    exactly the same elements: the zero patterns of the returned post-dropout weights are
    identical; values and gradients agree within the float32 tolerance."""
    extra = (
        dict(attn_mask=("float", "HLS"), kpm="bool", is_causal=True) if config != "plain" else {}
    )
    # S = 131: not a multiple of 4 (one Philox block per 4 columns) nor of the tiles.
    case = Case((2, 3, 65, 131, 16, 8), torch.float32, dropout_p=p, seed=seed, **extra)
    cuda = run(case, "cuda")
    cpu = run(case, "cpu")
    assert torch.equal((cuda["weights"] == 0).cpu(), cpu["weights"] == 0)
    visible = reference(replace(case, dropout_p=0.0))["weights"] > 0
    dropped = float((cpu["weights"][visible] == 0).double().mean())
    assert abs(dropped - p) < 0.03, (dropped, p)
    assert_agree(cuda, cpu, torch.float32)
    # Head-averaged weights: the mean of the same dropped-out per-head weights.
    assert_agree(run(case, "cuda", average=True), run(case, "cpu", average=True), torch.float32)


def test_dropout_seed_read_on_device_in_layer() -> None:
    """The layer draws its seed on the query's device (CUDA generator): torch.manual_seed
    reproduces a training step on the GPU, a new draw gives another mask."""
    mha = OursMHA(32, 4, dropout=0.5, batch_first=True).cuda().train()
    x = torch.randn(2, 40, 32, device="cuda")
    torch.manual_seed(3)
    out1, w1 = mha(x, x, x, average_attn_weights=False)
    torch.manual_seed(3)
    out2, w2 = mha(x, x, x, average_attn_weights=False)
    out3, w3 = mha(x, x, x, average_attn_weights=False)
    assert torch.equal(out1, out2) and torch.equal(w1, w2)
    assert not torch.equal(w1 == 0, w3 == 0)
    assert abs(float((w1 == 0).double().mean()) - 0.5) < 0.02


# =============================================================================================
# 4. Limits: head dims above 128, shared memory, grids beyond 65535 blocks


@pytest.mark.parametrize("e,ev", [(129, 64), (64, 129), (256, 256)], ids=lambda d: str(d))
def test_head_dim_above_128_raises(e, ev) -> None:
    q = torch.randn(1, 2, 5, e, device="cuda")
    k = torch.randn(1, 2, 6, e, device="cuda")
    v = torch.randn(1, 2, 6, ev, device="cuda")
    with pytest.raises(RuntimeError, match="up to 128"):
        OPS.attention_forward(q, k, v)
    # The backward checks too (forward outputs computed on the CPU, which has no limit).
    out, stats, _ = OPS.attention_forward(q.cpu(), k.cpu(), v.cpu())
    with pytest.raises(RuntimeError, match="up to 128"):
        OPS.attention_backward(
            torch.ones_like(out).cuda(),
            q,
            k,
            v,
            out.cuda(),
            stats.cuda(),
            None,
            None,
            False,
            None,
            0.0,
            None,
            None,
            False,
            False,
        )


def test_layer_head_dim_above_128_raises() -> None:
    mha = OursMHA(2 * 160, 2).cuda()  # head_dim 160
    x = torch.randn(4, 2, 320, device="cuda")
    with pytest.raises(RuntimeError, match="up to 128"):
        mha(x, x, x)


def test_shared_memory_limit_error_is_clear() -> None:
    """On a GPU whose opt-in shared memory per block is below what float64 with head_dim 128
    needs, the kernels raise a RuntimeError that says so (instead of a launch failure)."""
    props = torch.cuda.get_device_properties(0)
    limit = getattr(props, "shared_memory_per_block_optin", None)
    needed = cuda_shared_memory_bytes(torch.float64, 128, 128)
    if limit is None or limit >= needed:
        pytest.skip(f"{props.name} has enough shared memory ({limit} bytes) for every case")
    q = torch.randn(1, 1, 40, 128, dtype=torch.float64, device="cuda", requires_grad=True)
    with pytest.raises(RuntimeError, match="shared memory"):
        OPS.attention_forward(q, q, q)[0].sum().backward()


@pytest.mark.parametrize(
    "n,h", [(700, 100), (70000, 1), (1, 70000)], ids=["N700xH100", "N70000", "H70000"]
)
def test_batch_times_heads_beyond_65535(n: int, h: int) -> None:
    """N * H = 70000 (x 2 query tiles): more thread blocks than the 65535 allowed in the y and z
    grid dimensions; the kernels use one-dimensional grids. Forward, per-head and averaged
    weights and the backward agree with the CPU."""
    case = Case((n, h, 33, 5, 4, 4), torch.float32, kpm="bool")
    check_against_cpu(case)
    check_against_cpu(case, average=True)


# =============================================================================================
# 5. Devices and streams


@pytest.mark.skipif(HAS_CUDA and torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_non_default_device_index() -> None:
    """Inputs on cuda:1 while cuda:0 is current: outputs and gradients land on cuda:1 (the
    kernels launch under a device guard, on cuda:1's current stream), match cuda:0, and the
    current device is left alone."""
    case = Case((2, 3, 65, 33, 32, 16), attn_mask=("float", "HLS"), kpm="bool", dropout_p=0.3)
    torch.cuda.set_device(0)
    on_1 = run(case, "cuda:1", average=True)
    assert torch.cuda.current_device() == 0
    for name, value in on_1.items():
        assert value.device == torch.device("cuda:1"), name
    on_0 = run(case, "cuda:0", average=True)
    assert_agree({k: t.to("cuda:0") for k, t in on_1.items()}, on_0, torch.float32)
    # The layer too.
    mha = OursMHA(32, 4).to("cuda:1")
    x = torch.randn(7, 2, 32, device="cuda:1", requires_grad=True)
    out, w = mha(x, x, x)
    out.sum().backward()
    assert out.device == w.device == x.grad.device == torch.device("cuda:1")
    assert torch.cuda.current_device() == 0


def _fwd_bwd_ops(q, k, v, go, gw, mask, kpm, seed):
    """Forward and backward through the ops themselves (no autograd engine threads)."""
    out, stats, w = OPS.attention_forward(q, k, v, mask, kpm, True, None, 0.25, seed, True, True)
    grads = OPS.attention_backward(
        go, q, k, v, out, stats, mask, kpm, True, None, 0.25, seed, gw, True, True
    )
    return (out, stats, w, *grads)


def _stream_problem():
    n, h, l, s, e = 2, 3, 65, 70, 32
    q, k, v = (torch.randn(n, h, length, e, device="cuda") for length in (l, s, s))
    mask = torch.randn(h, l, s, device="cuda")
    kpm = torch.rand(n, s, device="cuda") < 0.2
    seed = torch.tensor([1234], device="cuda")
    go = torch.randn(n, h, l, e, device="cuda")
    gw = torch.randn(n, l, s, device="cuda")
    return q, k, v, go, gw, mask, kpm, seed


def test_non_default_stream_matches_default_stream() -> None:
    """The same work on a fresh stream gives bitwise the default stream's results."""
    args = _stream_problem()
    expected = _fwd_bwd_ops(*args)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = _fwd_bwd_ops(*args)
    side.synchronize()
    for index, (a, b) in enumerate(zip(got, expected)):
        assert torch.equal(a, b), index


def test_kernels_run_on_the_current_stream() -> None:
    """Inputs are written on a side stream, behind a long sleep, right before the op is called
    on that stream. Kernels launched on the current (side) stream see them; a launch on any
    other stream would run first and read the NaN the buffers held before."""
    args = _stream_problem()
    expected = _fwd_bwd_ops(*args)
    buffers = [torch.full_like(t, math.nan) if t.is_floating_point() else t for t in args]
    buffers[-1] = torch.full_like(args[-1], -1)  # the seed
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(SLEEP_CYCLES)
        for buffer, value in zip(buffers, args):
            if buffer is not value:
                buffer.copy_(value)
        got = _fwd_bwd_ops(*buffers)
    side.synchronize()
    for index, (a, b) in enumerate(zip(got, expected)):
        assert torch.equal(a, b), index


def test_no_host_synchronisation() -> None:
    """Forward and backward (with the dropout seed, masks and averaged weights) only enqueue
    work: the host returns while the GPU is still busy with an earlier sleep. (A .item() on the
    seed, a blocking copy or a device synchronisation would wait for the sleep.)"""
    args = _stream_problem()
    _fwd_bwd_ops(*args)  # warm-up: allocator blocks, kernel attributes
    torch.cuda.synchronize()
    start = time.perf_counter()
    torch.cuda._sleep(SLEEP_CYCLES)
    torch.cuda.synchronize()
    slept = time.perf_counter() - start

    torch.cuda._sleep(SLEEP_CYCLES)
    start = time.perf_counter()
    _fwd_bwd_ops(*args)
    launched = time.perf_counter() - start
    pending = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    assert pending, "the GPU finished the sleep before the op returned: it synchronised"
    assert launched < slept / 2, (launched, slept)


# =============================================================================================
# 6. The layer, autocast, torch.compile


def _layer_pair(dtype: torch.dtype, batch_first: bool, e: int = 64, h: int = 4):
    ref = nn.MultiheadAttention(e, h, batch_first=batch_first, dtype=dtype)
    with torch.no_grad():
        for name, param in ref.named_parameters():
            if "bias" in name:
                param.copy_(0.5 * torch.randn_like(param))
    ours = OursMHA(e, h, batch_first=batch_first, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


QKV = ("query", "key", "value")


def _run_layer(module, inputs: Dict[str, Tensor], device: str, **kwargs) -> Dict[str, Tensor]:
    """Forward + backward of a layer on copies of `inputs` on `device`: output, weights, the
    gradients of query/key/value and of every parameter, on the CPU."""
    module = copy.deepcopy(module).to(device)
    leaves = {
        name: None if t is None else t.detach().to(device).requires_grad_(name in QKV)
        for name, t in inputs.items()
    }
    out, w = module(
        leaves["query"],
        leaves["key"],
        leaves["value"],
        key_padding_mask=leaves["key_padding_mask"],
        attn_mask=leaves["attn_mask"],
        **kwargs,
    )
    gen = torch.Generator().manual_seed(11)
    loss = (out * _upstream(out.shape, out.dtype, device, gen)).sum()
    values = {"output": out.detach()}
    if w is not None:
        loss = loss + (w * _upstream(w.shape, w.dtype, device, gen)).sum()
        values["weights"] = w.detach()
    targets = {f"input:{n}": leaves[n] for n in QKV}
    targets.update(dict(module.named_parameters()))
    grads = torch.autograd.grad(loss, list(targets.values()))
    values.update(dict(zip(targets, grads)))
    return {name: t.cpu() for name, t in values.items()}


@pytest.mark.parametrize(
    "weights", ["avg", "per_head", "none"], ids=["avg_weights", "weights", "no_weights"]
)
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_layer_matches_nn_on_cuda_and_itself_on_cpu(
    dtype: torch.dtype, batch_first: bool, weights: str
) -> None:
    """torch_mha.MultiheadAttention on CUDA against nn.MultiheadAttention on CUDA and against
    itself on the CPU: output, weights, input and parameter gradients, with float masks."""
    e, h, n, l, s = 64, 4, 3, 33, 65
    ref, ours = _layer_pair(dtype, batch_first, e, h)

    def seq(length: int) -> Tensor:
        return torch.randn((n, length, e) if batch_first else (length, n, e), dtype=dtype)

    kpm = torch.zeros(n, s, dtype=dtype).masked_fill(torch.rand(n, s) < 0.3, -math.inf)
    kpm[:, 0] = 0.0  # no fully masked rows (nn gives NaN there with need_weights=True)
    attn_mask = torch.randn(n * h, l, s, dtype=dtype)
    inputs = dict(query=seq(l), key=seq(s), value=seq(s), key_padding_mask=kpm, attn_mask=attn_mask)
    kwargs = dict(need_weights=weights != "none", average_attn_weights=weights == "avg")
    ours_cuda = _run_layer(ours, inputs, "cuda", **kwargs)
    nn_cuda = _run_layer(ref, inputs, "cuda", **kwargs)
    ours_cpu = _run_layer(ours, inputs, "cpu", **kwargs)
    f64 = dtype == torch.float64
    for other in (nn_cuda, ours_cpu):
        assert ours_cuda.keys() == other.keys()
        for name, expected in other.items():
            grad = name not in ("output", "weights")
            atol = 1e-10 if f64 else (4e-5 if grad else 2e-5)
            rtol = 1e-10 if f64 else 2e-5
            torch.testing.assert_close(
                ours_cuda[name],
                expected,
                atol=atol,
                rtol=rtol,
                msg=lambda m, name=name: f"{name}: {m}",
            )


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=dtype_id)
def test_autocast_runs_the_kernel_in_low_precision(dtype: torch.dtype) -> None:
    """Under torch.autocast("cuda", dtype) the op casts query/key/value and runs the kernel in
    `dtype` (bitwise the explicit cast's result), float32 masks stay float32, softmax_stats stay
    float32, and the result is close to the float32 one (input rounding: a few u)."""
    n, h, l, s, e = 2, 4, 65, 33, 64
    q, k, v = (
        torch.randn(n, h, length, e, device="cuda", requires_grad=True) for length in (l, s, s)
    )
    mask = torch.randn(h, l, s, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        out, stats, w = OPS.attention_forward(q, k, v, mask, None, False, None, 0.0, None, True)
    assert out.dtype == w.dtype == dtype and stats.dtype == torch.float32
    low = [t.detach().to(dtype) for t in (q, k, v)]
    direct = OPS.attention_forward(*low, mask, None, False, None, 0.0, None, True)
    for a, b in zip((out, stats, w), direct):
        assert torch.equal(a, b)
    full = OPS.attention_forward(q, k, v, mask, None, False, None, 0.0, None, True)
    u = UNIT_ROUNDOFF[dtype]
    torch.testing.assert_close(out.float(), full[0], atol=16 * u, rtol=16 * u)
    torch.testing.assert_close(w.float(), full[2], atol=16 * u, rtol=16 * u)
    # The backward returns float32 gradients for the float32 inputs.
    grads = torch.autograd.grad(out.float().sum() + w.float().sum(), (q, k, v))
    full_grads = torch.autograd.grad(full[0].sum() + full[2].sum(), (q, k, v))
    for g, g32 in zip(grads, full_grads):
        assert g.dtype == torch.float32
        scale = float(g32.abs().max())
        torch.testing.assert_close(g, g32, atol=32 * u * scale, rtol=32 * u)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=dtype_id)
def test_autocast_layer(dtype: torch.dtype) -> None:
    """The layer under autocast: projections and attention in `dtype`, close to float32,
    float32 parameter gradients."""
    _, ours = _layer_pair(torch.float32, True)
    ours = ours.cuda()
    x = torch.randn(2, 40, 64, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=dtype):
        out, w = ours(x, x, x)
    assert out.dtype == w.dtype == dtype
    out32, w32 = ours(x, x, x)
    u = UNIT_ROUNDOFF[dtype]
    scale = float(out32.abs().max())
    torch.testing.assert_close(out.float(), out32, atol=32 * u * scale, rtol=32 * u)
    torch.testing.assert_close(w.float(), w32, atol=16 * u, rtol=16 * u)
    (out.float().sum() + w.float().sum()).backward()
    for name, p in ours.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert bool(torch.isfinite(p.grad).all()), name


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(backend: str) -> None:
    """torch.compile(fullgraph=True) of the layer on CUDA: no graph break, same output, weights
    and gradients as eager."""
    if backend == "inductor":
        pytest.importorskip("triton")
    torch._dynamo.reset()
    _, ours = _layer_pair(torch.float32, True)
    ours = ours.cuda()
    x = torch.randn(2, 40, 64, device="cuda", requires_grad=True)
    kpm = torch.rand(2, 40, device="cuda") < 0.3
    kpm[:, 0] = False
    compiled = torch.compile(ours, fullgraph=True, backend=backend)
    results = []
    for module in (compiled, ours):
        out, w = module(x, x, x, key_padding_mask=kpm, need_weights=True)
        gen = torch.Generator().manual_seed(5)
        go = _upstream(out.shape, out.dtype, "cuda", gen)
        gw = _upstream(w.shape, w.dtype, "cuda", gen)
        params = [p for _, p in ours.named_parameters()]
        grads = torch.autograd.grad((out * go).sum() + (w * gw).sum(), [x, *params])
        results.append([out, w, *grads])
    for index, (a, b) in enumerate(zip(*results)):
        tol = 2e-5 if index < 2 else 1e-4
        torch.testing.assert_close(a, b, atol=tol, rtol=2e-5, msg=lambda m, i=index: f"{i}: {m}")


# =============================================================================================
# 7. Determinism and opcheck


@pytest.mark.parametrize("average", [False, True], ids=["per_head", "averaged"])
def test_backward_is_bitwise_deterministic(average: bool) -> None:
    """No atomics: dK/dV per key tile and dQ per query tile are each computed by one thread
    block in a fixed order, so two runs give bitwise identical results."""
    case = Case(
        (2, 3, 200, 333, 64, 48),
        attn_mask=("float", "HLS"),
        kpm="bool",
        is_causal=True,
        dropout_p=0.2,
        seed=5,
    )
    first = run(case, "cuda", average=average)
    second = run(case, "cuda", average=average)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def _opcheck(op, args: tuple, kwargs: Optional[dict] = None) -> None:
    result = torch.library.opcheck(op, args, kwargs or {})
    failures = {name: status for name, status in result.items() if status != "SUCCESS"}
    assert not failures, failures


@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "no_grad"])
def test_opcheck_on_cuda(requires_grad: bool) -> None:
    """opcheck (schema, autograd registration, FakeTensor, AOT dispatch) of the three ops with
    CUDA tensors, lengths across a tile, masks, dropout and weights."""
    n, h, l, s, e, ev = 2, 3, 33, 40, 80, 17
    q, k, v = (
        torch.randn(n, h, length, dim, device="cuda", requires_grad=requires_grad)
        for length, dim in ((l, e), (s, e), (s, ev))
    )
    mask = torch.randn(h, 1, s, device="cuda", requires_grad=requires_grad)
    kpm = torch.rand(n, s, device="cuda") < 0.3
    seed = torch.tensor([77], device="cuda")
    for average in (False, True):
        _opcheck(
            OPS.attention_forward.default,
            (q, k, v, mask, kpm, True, 0.3, 0.25, seed, True, average),
        )
    with torch.no_grad():
        out, stats, w = OPS.attention_forward(q, k, v, mask, kpm, True, 0.3, 0.25, seed, True)
    q, k, v, mask = (t.detach() for t in (q, k, v, mask))
    args = (torch.randn_like(out), q, k, v, out, stats, mask, kpm, True, 0.3, 0.25, seed)
    _opcheck(OPS.attention_backward.default, (*args, torch.randn_like(w), False, True))
    embed, heads = 32, 4
    x = torch.randn(l, n, embed, device="cuda", requires_grad=requires_grad)
    weights: List[Tensor] = [
        torch.randn(shape, device="cuda", requires_grad=requires_grad) * 0.3
        for shape in ((3 * embed, embed), (3 * embed,), (embed, embed), (embed,))
    ]
    in_w, in_b, out_w, out_b = weights
    _opcheck(
        OPS.multi_head_attention.default,
        (x, x, x, embed, heads, in_w, in_b, None, None, False, 0.0, out_w, out_b),
        dict(key_padding_mask=(torch.rand(n, l, device="cuda") < 0.2), need_weights=True),
    )
