"""Backward of the core op (torch.ops.torch_mha.attention_backward, through autograd): gradients
of query, key, value and float masks against autograd through the float64 reference, in float64
over every case of GRAD_CASES and in float32/bfloat16/float16 over a subset (upstream gradients
of the output and/or the per-head or head-averaged weights, masks, causal, scale, layouts);
upstream gradients with stride 0 or transposed; gradcheck; double backward raising; and the
autograd plumbing (requires_grad propagation, no_grad and inference_mode, gradients only for the
inputs that require them, no weights gradient without need_weights, unused weights reaching the
backward as no gradient).

Tests that take the `device` fixture (tests/conftest.py) run on the CPU and on CUDA; the CUDA
cases are reported as skipped where there is no GPU. Inputs, references, conventions and
tolerances: tests/attention_testing.py. CUDA-specific tests (CPU vs CUDA agreement, streams,
device indices, grid limits): tests/test_cuda.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import pytest
import torch
from attention_testing import (
    OPS,
    UNIT_ROUNDOFF,
    assert_close,
    dtype_id,
    expected_forward,
    forward,
    forward_tol,
    grad_tolerance,
    make_qkv,
    randn,
    reference_grads,
)
from torch import Tensor


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
