"""The operator registrations of torch_mha: argument checks (the same in the Meta kernel) and
errors for arguments on another device; torch.library.opcheck of attention_forward,
attention_backward (whose result is also checked against the reference gradients) and
multi_head_attention; the composite op multi_head_attention against
torch.nn.functional.multi_head_attention_forward, and its training dropout; and the Meta
(FakeTensor) kernels, whose outputs have the shapes, dtypes and strides of the real ones.

Tests that take the `device` fixture (tests/conftest.py) run on the CPU and on CUDA; the CUDA
cases are reported as skipped where there is no GPU. Inputs, references, conventions and
tolerances: tests/attention_testing.py. CUDA-specific tests (CPU vs CUDA agreement, streams,
device indices, grid limits): tests/test_cuda.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import pytest
import torch
from attention_testing import (
    ALL_DTYPES,
    OPS,
    Tol,
    assert_close,
    assert_same_metadata,
    dtype_id,
    grad_tolerance,
    make_qkv,
    meta_copy,
    opcheck,
    randn,
    reference_grads,
)
from torch import Tensor


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
    gq, gk, gv, gmask, gsinks = OPS.attention_backward(*args)
    assert gsinks.numel() == 0  # no sinks, no sink gradient
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
