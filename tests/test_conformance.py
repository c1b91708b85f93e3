"""Drop-in conformance with torch.nn.MultiheadAttention (issue 17).

Every test here runs torch.nn.MultiheadAttention / torch.nn.functional.multi_head_attention_forward
of the INSTALLED torch on the same input, with the same weights, and compares:

* nn runs   -> torch_mha runs: same output dtype and shape, values (and attention weights, and
  gradients where a test takes them) close to nn's;
* nn raises -> torch_mha raises the same exception type, and, for nn's own checks, the same
  message text (character for character, as the installed torch words it).

Sections: the five differences of issue 17 (1. a bias of another dtype, 2. nn's message
formatting, 3. is_causal replacing an attn_mask of another shape, 4. NestedTensor errors,
5. 1-D bias_k / bias_v), then sweeps over the argument checks (mask dtypes, parameter dtypes,
dropout, the functional's checks, warnings), then the deliberate differences listed in the README's
Behaviour table, each pinned to what both sides do.
"""

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_mha

E, H = 8, 2  # embed_dim, num_heads
L, S, N = 3, 5, 2  # query length, key length, batch

TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-2, atol=2e-2),
    torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
}


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    value: Any = None
    exc: Optional[BaseException] = None
    warnings: Tuple[str, ...] = ()


def _run(fn: Callable[[], Any]) -> Outcome:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001
            return Outcome(exc=exc, warnings=_texts(caught))
    return Outcome(value=value, warnings=_texts(caught))


def _texts(caught) -> Tuple[str, ...]:
    # Only torch_mha's and nn's own warnings; not e.g. the NestedTensor prototype warning.
    return tuple(str(w.message) for w in caught if "mismatched" in str(w.message))


def _close(actual, expected, what: str, computed_in: Optional[torch.dtype] = None) -> None:
    """computed_in: the dtype the result was computed in, when looser than its own (the
    gradient of a float64 bias of a float32 module)."""
    if expected is None:
        assert actual is None, f"{what}: nn gives None, torch_mha {type(actual).__name__}"
        return
    assert actual is not None, f"{what}: torch_mha gives None"
    if expected.is_nested:
        assert actual.is_nested, f"{what}: nn gives a NestedTensor"
        expected, actual = expected.to_padded_tensor(0.0), actual.to_padded_tensor(0.0)
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype}, nn {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape}, nn {expected.shape}"
    tol = TOL[expected.dtype]
    if computed_in is not None and TOL[computed_in]["rtol"] > tol["rtol"]:
        tol = TOL[computed_in]
    torch.testing.assert_close(
        actual.detach(), expected.detach(), msg=lambda m: f"{what}: {m}", **tol
    )


def assert_like_nn(ours_fn, ref_fn, *, same_message: bool = True, grads_of=()) -> Outcome:
    """Runs nn, then torch_mha, on the same input; see the module docstring. grads_of: tensors
    (or (ours, nn) pairs of tensors) whose gradients of sum(output**2) are compared."""
    ref = _run(ref_fn)
    ours = _run(ours_fn)
    if ref.exc is not None:
        assert ours.exc is not None, (
            f"nn raises {type(ref.exc).__name__}({str(ref.exc)!r}), torch_mha runs"
        )
        assert type(ours.exc) is type(ref.exc), (
            f"torch_mha raises {type(ours.exc).__name__}({str(ours.exc)!r}), nn raises "
            f"{type(ref.exc).__name__}({str(ref.exc)!r})"
        )
        if same_message:
            assert str(ours.exc) == str(ref.exc)
        return ours
    assert ours.exc is None, (
        f"nn runs, torch_mha raises {type(ours.exc).__name__}({str(ours.exc)!r})"
    )
    _close(ours.value[0], ref.value[0], "attn_output")
    _close(ours.value[1], ref.value[1], "attn_weights")
    pairs = [g if isinstance(g, tuple) else (g, g) for g in grads_of]
    if pairs:
        grads = []
        for side, (out, _) in enumerate((ours.value, ref.value)):
            tensors = [pair[side] for pair in pairs]
            grads.append(torch.autograd.grad(out.float().pow(2).sum(), tensors))
        for i, (g_ours, g_ref) in enumerate(zip(*grads)):
            _close(g_ours, g_ref, f"gradient #{i}", computed_in=ref.value[0].dtype)
    return ours


def mha_pair(dtype=torch.float32, **ctor) -> Tuple[nn.MultiheadAttention, Any]:
    """nn.MultiheadAttention and torch_mha.MultiheadAttention with the same (non-zero) weights."""
    torch.manual_seed(0)
    embed_dim = ctor.pop("embed_dim", E)
    num_heads = ctor.pop("num_heads", H)
    ref = nn.MultiheadAttention(embed_dim, num_heads, dtype=dtype, **ctor)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "bias" in name:
                p.uniform_(-0.5, 0.5)
    ours = torch_mha.MultiheadAttention(embed_dim, num_heads, dtype=dtype, **ctor)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def set_param(modules, name: str, value: torch.Tensor) -> None:
    """Replaces parameter `name` (e.g. "out_proj.bias") of each module by a copy of value."""
    for module in modules:
        owner = module
        *path, attr = name.split(".")
        for part in path:
            owner = getattr(owner, part)
        copy = value.detach().clone()
        setattr(owner, attr, nn.Parameter(copy, requires_grad=copy.is_floating_point()))


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def padding_mask(*shape, dtype=torch.bool):
    """A key padding mask that masks some keys but never a whole row (no NaN rows in nn)."""
    mask = torch.zeros(*shape, dtype=torch.bool)
    mask[..., -2:] = True
    mask[..., 0] = False
    if dtype == torch.bool:
        return mask
    return torch.zeros(*shape, dtype=dtype).masked_fill(mask, -math.inf)


def functional_args(ref: nn.MultiheadAttention, q, k, v, **overrides):
    args = dict(
        query=q,
        key=k,
        value=v,
        embed_dim_to_check=ref.embed_dim,
        num_heads=ref.num_heads,
        in_proj_weight=ref.in_proj_weight,
        in_proj_bias=ref.in_proj_bias,
        bias_k=ref.bias_k,
        bias_v=ref.bias_v,
        add_zero_attn=ref.add_zero_attn,
        dropout_p=0.0,
        out_proj_weight=ref.out_proj.weight,
        out_proj_bias=ref.out_proj.bias,
    )
    if not ref._qkv_same_embed_dim:
        args.update(
            use_separate_proj_weight=True,
            q_proj_weight=ref.q_proj_weight,
            k_proj_weight=ref.k_proj_weight,
            v_proj_weight=ref.v_proj_weight,
        )
    args.update(overrides)
    return args


def both_functionals(args):
    return (
        lambda: torch_mha.multi_head_attention_forward(**args),
        lambda: F.multi_head_attention_forward(**args),
    )


# ---------------------------------------------------------------------------------------------
# Issue 17, item 1: a bias whose dtype differs from the query's
# ---------------------------------------------------------------------------------------------


def test_item1_issue_example():
    """The issue's example: double module, half in_proj_bias, eval and no_grad; nn runs."""
    ref, ours = mha_pair(torch.double, embed_dim=4, num_heads=4, batch_first=True)
    ref.eval(), ours.eval()
    set_param((ref, ours), "in_proj_bias", ref.in_proj_bias.half())
    q = torch.randn(4, 4, 4, dtype=torch.double)
    with torch.no_grad():
        out = assert_like_nn(lambda: ours(q, q, q), lambda: ref(q, q, q))
    assert out.value[0].dtype == torch.double


# Where nn.MultiheadAttention passes the bias to torch.nn.functional.linear, which adds a bias of
# another dtype in place (casting it) for a non-contiguous input of more than 2 dims and calls
# addmm (an error) otherwise: each layout below lands on one side or the other in nn.
BIAS_LAYOUTS = {
    # id: (ctor, builder of (query, key, value))
    "self_batch_first": (
        dict(batch_first=True),
        lambda d: (lambda x: (x, x, x))(randn(N, L, E, dtype=d)),
    ),
    "self_seq_first": (dict(), lambda d: (lambda x: (x, x, x))(randn(L, N, E, dtype=d))),
    "self_batch_first_batch_1": (
        dict(batch_first=True),
        lambda d: (lambda x: (x, x, x))(randn(1, L, E, dtype=d)),
    ),
    "self_seq_first_transposed_input": (
        dict(),
        lambda d: (lambda x: (x, x, x))(randn(N, L, E, dtype=d).transpose(0, 1)),
    ),
    "kv_same_batch_first": (
        dict(batch_first=True),
        lambda d: (lambda kv: (randn(N, L, E, dtype=d), kv, kv))(randn(N, S, E, dtype=d)),
    ),
    "cross_batch_first": (
        dict(batch_first=True),
        lambda d: tuple(randn(N, n, E, dtype=d) for n in (L, S, S)),
    ),
    "cross_seq_first": (dict(), lambda d: tuple(randn(n, N, E, dtype=d) for n in (L, S, S))),
    "unbatched": (dict(), lambda d: (lambda x: (x, x, x))(randn(L, E, dtype=d))),
    "kdim_vdim_batch_first": (
        dict(batch_first=True, kdim=6, vdim=4),
        lambda d: (randn(N, L, E, dtype=d), randn(N, S, 6, dtype=d), randn(N, S, 4, dtype=d)),
    ),
    "kdim_vdim_seq_first": (
        dict(kdim=6, vdim=4),
        lambda d: (randn(L, N, E, dtype=d), randn(S, N, 6, dtype=d), randn(S, N, 4, dtype=d)),
    ),
}
BIAS_DTYPES = [
    (torch.float64, torch.float16),
    (torch.float32, torch.float64),
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.int64),
]


@pytest.mark.parametrize("mode", ["eval_no_grad", "train"])
@pytest.mark.parametrize(
    "dtype,bias_dtype", BIAS_DTYPES, ids=[f"{str(a)[6:]}-{str(b)[6:]}" for a, b in BIAS_DTYPES]
)
@pytest.mark.parametrize("layout", list(BIAS_LAYOUTS))
def test_item1_in_proj_bias_of_another_dtype(layout, dtype, bias_dtype, mode):
    """Runs where nn runs (the result in the query's dtype; in training, the gradients of the
    query and of the bias, in the bias's dtype, match nn's), raises RuntimeError where nn does."""
    ctor, build = BIAS_LAYOUTS[layout]
    ref, ours = mha_pair(dtype, **ctor)
    set_param((ref, ours), "in_proj_bias", ref.in_proj_bias.to(bias_dtype))
    q, k, v = build(dtype)
    if mode == "train":
        q.requires_grad_(True)
        grads = [q] + (
            [(ours.in_proj_bias, ref.in_proj_bias)] if bias_dtype.is_floating_point else []
        )
        assert_like_nn(
            lambda: ours(q, k, v), lambda: ref(q, k, v), same_message=False, grads_of=grads
        )
        assert_like_nn(
            lambda: ours(q, k, v, need_weights=False),
            lambda: ref(q, k, v, need_weights=False),
            same_message=False,
        )
    else:
        ref.eval(), ours.eval()
        with torch.no_grad():
            assert_like_nn(lambda: ours(q, k, v), lambda: ref(q, k, v), same_message=False)


def test_item1_layouts_cover_both_outcomes():
    """Precondition of the test above: nn runs for some layouts and raises for others."""
    outcomes = set()
    for layout, (ctor, build) in BIAS_LAYOUTS.items():
        ref, _ = mha_pair(torch.float64, **ctor)
        set_param((ref,), "in_proj_bias", ref.in_proj_bias.half())
        q, k, v = build(torch.float64)
        outcomes.add(_run(lambda: ref(q, k, v)).exc is None)
    assert outcomes == {True, False}


@pytest.mark.parametrize(
    "name,dtype,param_dtype",
    [
        ("bias_k", torch.float32, torch.float16),
        ("bias_k", torch.float32, torch.float64),
        ("bias_v", torch.float32, torch.bfloat16),
        ("bias_v", torch.float64, torch.float32),
        ("out_proj.bias", torch.float32, torch.float64),
        ("out_proj.bias", torch.float64, torch.float16),
        ("in_proj_weight", torch.float32, torch.float64),
        ("out_proj.weight", torch.float64, torch.float32),
    ],
)
@pytest.mark.parametrize("need_weights", [True, False])
def test_item1_other_parameters_of_another_dtype(name, dtype, param_dtype, need_weights):
    """bias_k / bias_v are concatenated to the keys / values (type promotion: nn runs when the
    promoted dtype is the query's); out_proj.bias goes to addmm and weights to matmul (nn
    raises RuntimeError)."""
    ref, ours = mha_pair(dtype, add_bias_kv=True, batch_first=True)
    param = ref
    for part in name.split("."):
        param = getattr(param, part)
    set_param((ref, ours), name, param.to(param_dtype))
    q, k, v = randn(N, L, E, dtype=dtype), randn(N, S, E, dtype=dtype), randn(N, S, E, dtype=dtype)
    assert_like_nn(
        lambda: ours(q, k, v, need_weights=need_weights),
        lambda: ref(q, k, v, need_weights=need_weights),
        same_message=False,
    )


# ---------------------------------------------------------------------------------------------
# Issue 17, item 2: nn's message formatting (a tuple, then torch.Size)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 4, 4), (4, 5, 4), (4, 4, 3), (1, 4, 4)])
def test_item2_unbatched_3d_attn_mask_message(shape):
    """The issue's example: an unbatched query with a 3-D attn_mask of the wrong shape."""
    ref, ours = mha_pair(embed_dim=4, num_heads=4)
    q = torch.randn(4, 4)
    mask = torch.zeros(*shape, dtype=torch.bool)
    out = assert_like_nn(
        lambda: ours(q, q, q, attn_mask=mask), lambda: ref(q, q, q, attn_mask=mask)
    )
    assert "torch.Size([" in str(out.exc)


@pytest.mark.filterwarnings(r"ignore:`torch\.jit\.:DeprecationWarning")
def test_item2_scripted_message_like_scripted_nn():
    """Under TorchScript, shapes are lists: the message reads as scripted nn's does."""
    ref, ours = mha_pair(embed_dim=4, num_heads=4)
    q = torch.randn(4, 4)
    mask = torch.zeros(5, 4, 4, dtype=torch.bool)
    got = []
    for module in (torch.jit.script(ours), torch.jit.script(ref)):
        exc = _run(lambda: module(q, q, q, attn_mask=mask)).exc
        assert exc is not None
        got.append(str(exc).strip().splitlines()[-1])
    assert got[0] == got[1]
    assert got[0].endswith("Expected `attn_mask` shape to be (4, 4, 4) but got [5, 4, 4]")


# ---------------------------------------------------------------------------------------------
# Issue 17, item 3: is_causal replaces attn_mask (no key padding mask, need_weights=False)
# ---------------------------------------------------------------------------------------------


def test_item3_issue_example():
    """x is (1, 2, 4) with batch_first=False: L = S = 1, N = 2; the causal mask is 2 x 2. nn
    ignores attn_mask (is_causal goes to scaled_dot_product_attention) and runs."""
    ref, ours = mha_pair(embed_dim=4, num_heads=1)
    x = torch.ones(1, 2, 4)
    mask = nn.Transformer.generate_square_subsequent_mask(2)
    kw = dict(attn_mask=mask, need_weights=False, is_causal=True)
    out = assert_like_nn(lambda: ours(x, x, x, **kw), lambda: ref(x, x, x, **kw))
    assert out.value[0].shape == (1, 2, 4)


CAUSAL_CASES = {
    # id: (ctor, L, S, mask builder)
    "self_wrong_2d_float": (
        dict(),
        4,
        4,
        lambda: nn.Transformer.generate_square_subsequent_mask(7),
    ),
    "self_wrong_2d_bool": (dict(), 4, 4, lambda: torch.ones(2, 3, dtype=torch.bool).triu(1)),
    "self_wrong_3d": (dict(), 4, 4, lambda: torch.zeros(3, 2, 2)),
    "cross_L_lt_S": (dict(), 3, 5, lambda: torch.zeros(3, 3)),
    "cross_L_gt_S": (dict(), 5, 3, lambda: torch.zeros(9, 9, dtype=torch.bool)),
    "batch_first": (dict(batch_first=True), 4, 6, lambda: torch.zeros(1, 1)),
    "add_bias_kv": (dict(add_bias_kv=True), 4, 4, lambda: torch.zeros(2, 2)),
    "add_zero_attn": (dict(add_zero_attn=True), 3, 3, lambda: torch.zeros(2, 2)),
    "kdim_vdim": (dict(kdim=6, vdim=4), 4, 5, lambda: torch.zeros(1, 1, 1)),
    "correct_causal_mask": (
        dict(),
        4,
        4,
        lambda: nn.Transformer.generate_square_subsequent_mask(4),
    ),
}


def _causal_inputs(ctor, Lq, Sk, dtype=torch.float32):
    kd, vd = ctor.get("kdim", E), ctor.get("vdim", E)
    if ctor.get("batch_first"):
        return (
            randn(N, Lq, E, dtype=dtype),
            randn(N, Sk, kd, dtype=dtype),
            randn(N, Sk, vd, dtype=dtype),
        )
    if Lq == Sk and kd == E and vd == E:
        x = randn(Lq, N, E, dtype=dtype)
        return x, x, x
    return (
        randn(Lq, N, E, dtype=dtype),
        randn(Sk, N, kd, dtype=dtype),
        randn(Sk, N, vd, dtype=dtype),
    )


@pytest.mark.parametrize("case", list(CAUSAL_CASES))
def test_item3_causal_replaces_attn_mask_like_nn(case):
    """nn (and torch_mha) skip attn_mask's shape check and apply the causal rule of
    scaled_dot_product_attention (query i attends keys 0..i) instead; same outputs and gradients
    as nn, for L < S, L > S, add_bias_kv / add_zero_attn (the extra keys count in the rule)."""
    ctor, Lq, Sk, build = CAUSAL_CASES[case]
    ref, ours = mha_pair(**ctor)
    q, k, v = _causal_inputs(ctor, Lq, Sk)
    q.requires_grad_(True)
    mask = build()
    kw = dict(attn_mask=mask, need_weights=False, is_causal=True)
    assert_like_nn(
        lambda: ours(q, k, v, **kw),
        lambda: ref(q, k, v, **kw),
        grads_of=[q, (ours.out_proj.weight, ref.out_proj.weight)],
    )


@pytest.mark.parametrize(
    "variant",
    ["need_weights", "key_padding_mask", "unbatched_3d_mask", "int_mask", "unbatched_2d_mask"],
)
def test_item3_where_nn_checks_the_mask(variant):
    """Where nn does check the mask even with is_causal=True, torch_mha raises as nn does (or,
    for an unbatched 2-D mask, runs as nn does)."""
    ref, ours = mha_pair()
    x = randn(L, N, E)
    kw = dict(attn_mask=torch.zeros(7, 7), need_weights=False, is_causal=True)
    if variant == "need_weights":
        kw["need_weights"] = True
    elif variant == "key_padding_mask":
        kw["key_padding_mask"] = padding_mask(N, L)
    elif variant == "unbatched_3d_mask":
        x = randn(L, E)
        kw["attn_mask"] = torch.zeros(H + 1, L, L)
    elif variant == "int_mask":
        kw["attn_mask"] = torch.zeros(7, 7, dtype=torch.int32)
    elif variant == "unbatched_2d_mask":
        x = randn(L, E)
    assert_like_nn(lambda: ours(x, x, x, **kw), lambda: ref(x, x, x, **kw))


def test_item3_functional_skips_the_mask_dtype_check_like_nn():
    """F.multi_head_attention_forward does not look at the replaced mask at all (an integer mask
    passes; the module checks mask dtypes before calling it, see the test above)."""
    ref, _ = mha_pair()
    x = randn(L, N, E)
    args = functional_args(
        ref,
        x,
        x,
        x,
        attn_mask=torch.zeros(2, 2, dtype=torch.int64),
        need_weights=False,
        is_causal=True,
    )
    assert_like_nn(*both_functionals(args))


def test_item3_replaced_mask_on_meta_device_like_nn():
    ref, ours = mha_pair()
    x = randn(L, N, E)
    kw = dict(attn_mask=torch.zeros(L, L, device="meta"), need_weights=False, is_causal=True)
    assert_like_nn(lambda: ours(x, x, x, **kw), lambda: ref(x, x, x, **kw))


# ---------------------------------------------------------------------------------------------
# Issue 17, item 4: NestedTensor inputs
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def quiet_nested():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*nested tensors is in prototype stage.*")
        yield


@pytest.mark.usefixtures("quiet_nested")
def test_item4_empty_nested_tensor_issue_example():
    ref, ours = mha_pair(embed_dim=512, num_heads=8, batch_first=True)
    ref.eval(), ours.eval()
    nt = torch.nested.nested_tensor([])
    with torch.no_grad():
        out = assert_like_nn(lambda: ours(nt, nt, nt), lambda: ref(nt, nt, nt))
    assert isinstance(out.exc, AssertionError)


@pytest.mark.usefixtures("quiet_nested")
def test_item4_empty_nested_tensor_through_transformer_encoder_layer():
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(512, 8, batch_first=True).eval()
    ours = nn.TransformerEncoderLayer(512, 8, batch_first=True).eval()
    ours.load_state_dict(ref.state_dict())
    ours.self_attn = torch_mha.MultiheadAttention(512, 8, batch_first=True).eval()
    ours.self_attn.load_state_dict(ref.self_attn.state_dict())
    nt = torch.nested.nested_tensor([])
    with torch.no_grad():
        ref_exc = _run(lambda: ref(nt)).exc
        ours_exc = _run(lambda: ours(nt)).exc
    assert ref_exc is not None and ours_exc is not None
    assert type(ours_exc) is type(ref_exc) and str(ours_exc) == str(ref_exc)


def _nested(*lengths, dim=E, dtype=torch.float32):
    return torch.nested.nested_tensor([randn(n, dim, dtype=dtype) for n in lengths])


# Each case trips one of nn's fast-path conditions (in nn's order), or none ("ok").
NESTED_CASES = {
    # id: (ctor, module setup, forward kwargs, grad enabled)
    "ok": (dict(batch_first=True), None, {}, False),
    "ok_need_weights_false": (dict(batch_first=True), None, {"need_weights": False}, False),
    "training": (dict(batch_first=True), "train", {}, False),
    "batch_first_false": (dict(), None, {}, False),
    "odd_heads": (dict(batch_first=True, num_heads=1), None, {}, False),
    "kdim_vdim": (dict(batch_first=True, kdim=6, vdim=4), None, {}, False),
    "add_bias_kv": (dict(batch_first=True, add_bias_kv=True), None, {}, False),
    "add_zero_attn": (dict(batch_first=True, add_zero_attn=True), None, {}, False),
    "no_bias": (dict(batch_first=True, bias=False), None, {}, False),
    "bool_key_padding_mask": (
        dict(batch_first=True),
        None,
        {"key_padding_mask": torch.zeros(2, 3, dtype=torch.bool)},
        False,
    ),
    "float_attn_mask": (dict(batch_first=True), None, {"attn_mask": torch.zeros(3, 3)}, False),
    "grad_enabled": (dict(batch_first=True), None, {}, True),
    "fastpath_disabled": (dict(batch_first=True), "no_fastpath", {}, False),
    "autocast": (dict(batch_first=True), "autocast", {}, False),
    "bias_dtype": (dict(batch_first=True), "half_bias", {}, False),
    "int_mask": (
        dict(batch_first=True),
        None,
        {"attn_mask": torch.zeros(3, 3, dtype=torch.int32)},
        False,
    ),
}


@pytest.mark.usefixtures("quiet_nested")
@pytest.mark.parametrize("case", list(NESTED_CASES))
@pytest.mark.parametrize("inputs", ["self", "cross"])
def test_item4_nested_tensor_like_nn(case, inputs):
    """NestedTensor input runs PyTorch's native kernel exactly where nn does (same output), and
    raises nn's AssertionError (same reason text) everywhere else."""
    ctor, setup, kwargs, grad = NESTED_CASES[case]
    ref, ours = mha_pair(**ctor)
    ref.eval(), ours.eval()
    if setup == "train":
        ref.train(), ours.train()
    if setup == "half_bias":
        set_param((ref, ours), "in_proj_bias", ref.in_proj_bias.half())
    kd = ctor.get("kdim", E)
    q = _nested(3, 2)
    k = v = q if inputs == "self" and kd == E else _nested(4, 1, dim=kd)
    if inputs == "cross" and ctor.get("vdim") is not None:
        v = _nested(4, 1, dim=ctor["vdim"])

    def call(module):
        def fn():
            with torch.set_grad_enabled(grad), torch.autocast("cpu", enabled=setup == "autocast"):
                previous = torch.backends.mha.get_fastpath_enabled()
                torch.backends.mha.set_fastpath_enabled(setup != "no_fastpath")
                try:
                    return module(q, k, v, **kwargs)
                finally:
                    torch.backends.mha.set_fastpath_enabled(previous)

        return fn

    out = assert_like_nn(call(ours), call(ref))
    if case.startswith("ok") and inputs == "self":
        assert out.exc is None and out.value[0].is_nested


# ---------------------------------------------------------------------------------------------
# Issue 17, item 5: bias_k / bias_v of shape (E,) (or (1, E)) in the functional
# ---------------------------------------------------------------------------------------------


def test_item5_issue_example():
    Ed = 4
    torch.manual_seed(0)
    q = torch.randn(3, 2, Ed)
    args = (
        q,
        q,
        q,
        Ed,
        2,
        torch.randn(3 * Ed, Ed),
        torch.randn(3 * Ed),
        torch.randn(Ed),
        torch.randn(Ed),
        False,
        0.0,
        torch.randn(Ed, Ed),
        torch.randn(Ed),
    )
    assert_like_nn(
        lambda: torch_mha.functional.multi_head_attention_forward(*args),
        lambda: F.multi_head_attention_forward(*args),
    )


@pytest.mark.parametrize("shape", [(E,), (1, E), (1, 1, E), (E - 1,), (1, N, E), (1, 1, 1, E)])
@pytest.mark.parametrize("masks", [False, True])
@pytest.mark.parametrize("add_zero_attn", [False, True])
@pytest.mark.parametrize("batched", [True, False])
def test_item5_bias_kv_shapes_like_nn(shape, masks, add_zero_attn, batched):
    """nn appends bias.repeat(1, batch, 1): (E,), (1, E) and (1, 1, E) all work (masks are
    padded by one key); other shapes fail in torch.cat or repeat (RuntimeError) in both."""
    ref, _ = mha_pair()
    q, k, v = (randn(n, N, E) for n in (L, S, S)) if batched else (randn(n, E) for n in (L, S, S))
    bias_k, bias_v = randn(*shape), randn(*shape)
    extra = {}
    if masks:
        extra = dict(
            attn_mask=torch.zeros(L, S).masked_fill(torch.ones(L, S, dtype=torch.bool).triu(1), -1),
            key_padding_mask=padding_mask(N, S) if batched else padding_mask(S),
        )
    args = functional_args(
        ref, q, k, v, bias_k=bias_k, bias_v=bias_v, add_zero_attn=add_zero_attn, **extra
    )
    incidental = shape not in [(E,), (1, E), (1, 1, E)]
    assert_like_nn(*both_functionals(args), same_message=not incidental)


@pytest.mark.parametrize("bias_dtype", [torch.float16, torch.float64, torch.bool])
def test_item5_bias_kv_dtype_in_the_functional_like_nn(bias_dtype):
    ref, _ = mha_pair()
    q = randn(L, N, E)
    args = functional_args(
        ref, q, q, q, bias_k=randn(E).to(bias_dtype), bias_v=randn(1, E).to(bias_dtype)
    )
    assert_like_nn(*both_functionals(args), same_message=False)


# ---------------------------------------------------------------------------------------------
# Sweeps over the argument checks
# ---------------------------------------------------------------------------------------------

MASK_DTYPES = [None, torch.bool, torch.float16, torch.float32, torch.float64]


def _dtype_id(d):
    return "none" if d is None else str(d)[6:]


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("kpm_dtype", MASK_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("mask_dtype", MASK_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=_dtype_id)
def test_mask_dtypes_like_nn(dtype, mask_dtype, kpm_dtype, need_weights):
    """nn turns bool masks into float masks of the query's dtype and adds the two masks: the sum
    must have the query's dtype or float32 (need_weights=False; with need_weights=True nn's
    baddbmm also rejects float32 for another query dtype, which torch_mha takes: a deliberate
    difference, README Behaviour table). Elsewhere torch_mha runs and raises (RuntimeError)
    exactly where nn does, with the same results and the same deprecation warnings."""
    ref, ours = mha_pair(dtype)
    q, k = randn(L, N, E, dtype=dtype), randn(S, N, E, dtype=dtype)
    kw: dict = dict(need_weights=need_weights)
    if mask_dtype is not None:
        causal = torch.ones(L, S, dtype=torch.bool).triu(1)
        kw["attn_mask"] = (
            causal
            if mask_dtype == torch.bool
            else torch.zeros(L, S).masked_fill(causal, -1e4).to(mask_dtype)
        )
    if kpm_dtype is not None:
        kw["key_padding_mask"] = padding_mask(N, S, dtype=kpm_dtype)
    ref_out = _run(lambda: ref(q, k, k, **kw))
    float32_sum = (
        need_weights
        and ref_out.exc is not None
        and _run(lambda: ref(q, k, k, **{**kw, "need_weights": False})).exc is None
    )
    if float32_sum:
        # Deliberate: nn's standard path with need_weights=False gives the output; the weights
        # are nn's with the float masks in the query's dtype.
        ours_out = _run(lambda: ours(q, k, k, **kw))
        assert ours_out.exc is None, ours_out.exc
        as_query = {
            name: m.to(dtype) if m.is_floating_point() else m
            for name, m in kw.items()
            if isinstance(m, torch.Tensor)
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # compared above
            out, _ = ref(q, k, k, **{**kw, "need_weights": False})
            _, weights = ref(q, k, k, **as_query)
        _close(ours_out.value[0], out, "attn_output")
        _close(ours_out.value[1], weights, "attn_weights")
    else:
        ours_out = assert_like_nn(
            lambda: ours(q, k, k, **kw), lambda: ref(q, k, k, **kw), same_message=False
        )
    assert ours_out.warnings == ref_out.warnings


@pytest.mark.parametrize("masks", ["bool_kpm_float_mask", "float_kpm_bool_mask", "both_float"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mismatched_mask_warnings_in_the_functional_like_nn(masks, dtype):
    ref, _ = mha_pair(dtype)
    q = randn(L, N, E, dtype=dtype)
    mask = torch.zeros(L, L, dtype=torch.bool if masks == "float_kpm_bool_mask" else torch.float32)
    kpm = padding_mask(N, L, dtype=torch.bool if masks == "bool_kpm_float_mask" else torch.float64)
    args = functional_args(ref, q, q, q, attn_mask=mask, key_padding_mask=kpm)
    ours_fn, ref_fn = both_functionals(args)
    ours, theirs = _run(ours_fn), _run(ref_fn)
    assert type(ours.exc) is type(theirs.exc)
    assert ours.warnings == theirs.warnings


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.5, 1.0, 1.5, -0.1, float("inf"), float("nan")])
def test_dropout_like_nn_where_nn_raises(p, training, need_weights):
    """Where nn raises (training with dropout_p > 1, and on the need_weights=False path also
    negative or NaN values), the same type (and for p > 1 nn's message); where nn runs with a
    probability outside [0, 1), torch_mha raises ValueError (deliberate, README Behaviour
    table)."""
    ref, _ = mha_pair()
    q = randn(L, N, E)
    args = functional_args(ref, q, q, q, dropout_p=p, training=training, need_weights=need_weights)
    ours_fn, ref_fn = both_functionals(args)
    theirs = _run(ref_fn)
    if theirs.exc is not None or 0.0 <= p < 1.0:
        if 0.0 < p < 1.0 and training:  # different dropout masks: only check that both run
            assert theirs.exc is None and _run(ours_fn).exc is None
        else:
            # nn's own check (p > 1) gives its message; a negative or NaN p on the
            # need_weights=False path fails in an SDPA kernel (same type, our message).
            assert_like_nn(ours_fn, ref_fn, same_message=not (p < 0 or math.isnan(p)))
    else:
        ours = _run(ours_fn)
        assert isinstance(ours.exc, ValueError)
        assert str(ours.exc) == f"dropout probability has to be in [0, 1), but got {p}"


def _ref_functional():
    ref, _ = mha_pair()
    q, k, v = randn(L, N, E), randn(S, N, E), randn(S, N, E)
    return ref, q, k, v


def _separate():
    ref, _ = mha_pair(kdim=6, vdim=4)
    q, k, v = randn(L, N, E), randn(S, N, 6), randn(S, N, 4)
    return ref, q, k, v


# Every check of F.multi_head_attention_forward that tests/test_errors.py does not already
# compare: (id, setup -> (ref module, q, k, v), overrides). Where nn raises, the type and the
# message must be nn's.
FUNCTIONAL_CHECKS = [
    ("in_proj_weight_none", _ref_functional, lambda r: {"in_proj_weight": None}),
    (
        "q_proj_weight_none",
        _separate,
        lambda r: {"q_proj_weight": None},
    ),
    ("v_proj_weight_none", _separate, lambda r: {"v_proj_weight": None}),
    ("q_proj_weight_shape", _separate, lambda r: {"q_proj_weight": randn(E, E - 1)}),
    ("separate_bias_short", _separate, lambda r: {"in_proj_bias": randn(3 * E - 1)}),
    ("separate_bias_long", _separate, lambda r: {"in_proj_bias": randn(3 * E + 2)}),
    ("separate_bias_2d", _separate, lambda r: {"in_proj_bias": randn(3, E)}),
    (
        "separate_key_value_lengths",
        _separate,
        lambda r: {"value": randn(S + 1, N, 4)},
    ),
    ("heads_not_dividing", _ref_functional, lambda r: {"num_heads": 3}),
    ("heads_negative_not_dividing", _ref_functional, lambda r: {"num_heads": -3}),
    ("embed_dim_to_check", _ref_functional, lambda r: {"embed_dim_to_check": 4}),
    (
        "static_v_with_bias",
        _ref_functional,
        lambda r: {
            "static_v": randn(N * H, S, E // H),
            "bias_k": randn(1, 1, E),
            "bias_v": randn(1, 1, E),
        },
    ),
    # nn reads static_k.size(2) of a 1-D tensor: IndexError (our message names static_k)
    ("static_k_1d", _ref_functional, lambda r: {"static_k": randn(N * H)}),
    ("static_k_1d_wrong_size", _ref_functional, lambda r: {"static_k": randn(N * H + 1)}),
    (
        "static_kv_ok",
        _ref_functional,
        lambda r: {
            "static_k": randn(N * H, S + 2, E // H),
            "static_v": randn(N * H, S + 2, E // H),
        },
    ),
    (
        "kpm_with_bias_kv_short",
        _ref_functional,
        lambda r: {
            "bias_k": randn(1, 1, E),
            "bias_v": randn(1, 1, E),
            "key_padding_mask": padding_mask(N, S - 1),
        },
    ),
    (
        "kpm_with_zero_attn_long",
        _ref_functional,
        lambda r: {"add_zero_attn": True, "key_padding_mask": padding_mask(N, S + 1)},
    ),
    ("kpm_batch", _ref_functional, lambda r: {"key_padding_mask": padding_mask(N + 1, S)}),
    ("attn_mask_3d", _ref_functional, lambda r: {"attn_mask": torch.zeros(N * H, L, S + 1)}),
    ("is_causal_no_mask", _ref_functional, lambda r: {"is_causal": True}),
    (
        "kpm_int",
        _ref_functional,
        lambda r: {"key_padding_mask": torch.zeros(N, S, dtype=torch.int8)},
    ),
    (
        "attn_mask_int",
        _ref_functional,
        lambda r: {"attn_mask": torch.zeros(L, S, dtype=torch.int8)},
    ),
    ("query_1d", _ref_functional, lambda r: {"query": randn(E)}),
    ("key_2d", _ref_functional, lambda r: {"key": randn(S, E)}),
    ("kpm_1d_batched", _ref_functional, lambda r: {"key_padding_mask": padding_mask(S)}),
]


@pytest.mark.parametrize(
    "case_id,setup,overrides", FUNCTIONAL_CHECKS, ids=[c[0] for c in FUNCTIONAL_CHECKS]
)
def test_functional_checks_like_nn(case_id, setup, overrides):
    ref, q, k, v = setup()
    args = functional_args(ref, q, k, v, **overrides(ref))
    out = assert_like_nn(*both_functionals(args), same_message=case_id != "static_k_1d")
    if case_id != "static_kv_ok":
        assert out.exc is not None, "precondition: nn raises for this input"


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize(
    "case",
    ["key_value_shapes", "kdim_key_value_lengths", "kdim_weight", "kpm_shape", "unbatched_kpm"],
)
def test_module_messages_are_in_nn_terms(case, batch_first):
    """nn's module checks batch-first input after transposing it to (seq, batch, embed) and
    unbatched input after unsqueezing it: its messages show those shapes, and so do ours."""
    ctor = dict(batch_first=batch_first)
    if case.startswith("kdim"):
        ctor.update(kdim=6, vdim=4)
    ref, ours = mha_pair(**ctor)

    def shaped(seq, e):
        return randn(N, seq, e) if batch_first else randn(seq, N, e)

    q, k, v = shaped(L, E), shaped(S, E), shaped(S, E)
    kw = {}
    if case == "key_value_shapes":
        v = shaped(S + 1, E)
    elif case == "kdim_key_value_lengths":
        k, v = shaped(S, 6), shaped(S + 1, 4)
    elif case == "kdim_weight":
        k, v = shaped(S, 5), shaped(S, 4)
    elif case == "kpm_shape":
        kw["key_padding_mask"] = padding_mask(N, S + 1)
    elif case == "unbatched_kpm":
        q, k, v = randn(L, E), randn(S, E), randn(S + 1, E)
    out = assert_like_nn(lambda: ours(q, k, v, **kw), lambda: ref(q, k, v, **kw))
    assert out.exc is not None


# ---------------------------------------------------------------------------------------------
# Deliberate differences (README, "Behaviour"): what each side does
# ---------------------------------------------------------------------------------------------


def test_deliberate_fully_masked_rows_give_zeros():
    ref, ours = mha_pair()
    q, k = randn(L, N, E), randn(S, N, E)
    kpm = torch.zeros(N, S, dtype=torch.bool)
    kpm[0] = True
    ref_out, _ = ref(q, k, k, key_padding_mask=kpm)
    ours_out, _ = ours(q, k, k, key_padding_mask=kpm)
    assert ref_out[:, 0].isnan().all()
    torch.testing.assert_close(ours_out[:, 0], ours.out_proj.bias.expand(L, E).detach())
    torch.testing.assert_close(ours_out[:, 1], ref_out[:, 1])


def test_deliberate_no_double_backward():
    ref, ours = mha_pair(torch.float64)
    q = randn(L, N, E, dtype=torch.float64).requires_grad_(True)
    for module, raises in ((ref, False), (ours, True)):
        out, _ = module(q, q, q)
        (g,) = torch.autograd.grad(out.sum(), q, create_graph=True)
        exc = _run(lambda: torch.autograd.grad(g.sum(), q)).exc
        assert (exc is not None) == raises, exc


def test_deliberate_dropout_rng_differs_seed_reproduces():
    ref, ours = mha_pair(dropout=0.5)
    q = randn(L, N, E)
    torch.manual_seed(3)
    a = ours(q, q, q)[0]
    torch.manual_seed(3)
    b = ours(q, q, q)[0]
    torch.manual_seed(3)
    c = ref(q, q, q)[0]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("dropout", [1.0, 1.5, -0.1])
def test_deliberate_dropout_outside_unit_interval_rejected_at_construction(dropout):
    nn.MultiheadAttention(E, H, dropout=dropout)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        torch_mha.MultiheadAttention(E, H, dropout=dropout)


def test_deliberate_fast_path_is_causal_without_attn_mask():
    """nn's native fast path (eval, no autograd, batch_first self-attention) skips its checks:
    is_causal=True without attn_mask runs there, without a causal mask. torch_mha raises nn's
    standard-path RuntimeError on every path."""
    ref, ours = mha_pair(batch_first=True)
    ref.eval(), ours.eval()
    x = randn(N, L, E)
    with torch.no_grad():
        assert _run(lambda: ref(x, x, x, is_causal=True)).exc is None
        ours_exc = _run(lambda: ours(x, x, x, is_causal=True)).exc
    ref.train()
    ref_exc = _run(lambda: ref(x, x, x, is_causal=True)).exc
    assert type(ours_exc) is type(ref_exc) is RuntimeError
    assert str(ours_exc) == str(ref_exc)


def test_deliberate_fast_path_mask_errors():
    """A wrong key_padding_mask in nn's fast path fails in the native kernel (RuntimeError); its
    standard path (and torch_mha, on every path) raise the AssertionError of nn's check."""
    ref, ours = mha_pair(batch_first=True)
    ref.eval(), ours.eval()
    x = randn(N, L, E)
    kpm = torch.zeros(N, L + 1, dtype=torch.bool)
    with torch.no_grad():
        assert isinstance(_run(lambda: ref(x, x, x, key_padding_mask=kpm)).exc, RuntimeError)
        ours_exc = _run(lambda: ours(x, x, x, key_padding_mask=kpm)).exc
    ref.train()
    ref_exc = _run(lambda: ref(x, x, x, key_padding_mask=kpm)).exc
    assert type(ours_exc) is type(ref_exc) is AssertionError
    assert str(ours_exc) == str(ref_exc)


def test_deliberate_multi_position_bias_k():
    """bias_k / bias_v of shape (k, 1, E), k > 1: nn appends k key positions (and runs when no
    mask needs padding); torch_mha takes one learned position only (RuntimeError naming bias_k)."""
    ref, _ = mha_pair()
    q = randn(L, N, E)
    args = functional_args(ref, q, q, q, bias_k=randn(2, 1, E), bias_v=randn(2, 1, E))
    ours_fn, ref_fn = both_functionals(args)
    assert _run(ref_fn).exc is None
    exc = _run(ours_fn).exc
    assert isinstance(exc, RuntimeError) and "bias_k" in str(exc)


@pytest.mark.parametrize("mask", ["attn_mask", "key_padding_mask"])
def test_deliberate_masks_on_another_device(mask):
    """A mask on the meta device: nn does not notice; torch_mha raises a RuntimeError."""
    ref, ours = mha_pair()
    q = randn(L, N, E)
    shape = (L, L) if mask == "attn_mask" else (N, L)
    kw = {mask: torch.zeros(*shape, dtype=torch.bool, device="meta")}
    assert _run(lambda: ref(q, q, q, **kw)).exc is None
    exc = _run(lambda: ours(q, q, q, **kw)).exc
    assert isinstance(exc, RuntimeError) and "same device as query" in str(exc)


@pytest.mark.parametrize(
    "case",
    ["batch_size", "packed_key_embed_dim", "in_proj_weight_shape", "key_dtype", "float_mask_dtype"],
)
def test_deliberate_errors_inside_aten_ops_name_the_argument(case):
    """Where nn fails inside an ATen op (view, matmul, baddbmm), torch_mha raises the same type
    with a message that names the argument."""
    ref, ours = mha_pair()
    q, k = randn(L, N, E), randn(S, N, E)
    kw: dict = {}
    name = ""
    if case == "batch_size":
        k = randn(S, N + 1, E)
        name = "batch size"
    elif case == "packed_key_embed_dim":
        k = randn(S, N, E - 2)
        name = "embedding dimension"
    elif case == "in_proj_weight_shape":
        set_param((ref, ours), "in_proj_weight", randn(3 * E, E - 1))
        name = "in_proj_weight"
    elif case == "key_dtype":
        k = k.double()
        name = "key"
    elif case == "float_mask_dtype":
        kw["attn_mask"] = torch.zeros(L, S, dtype=torch.float64)
        name = "attn_mask"
    out = assert_like_nn(
        lambda: ours(q, k, k, **kw), lambda: ref(q, k, k, **kw), same_message=False
    )
    assert out.exc is not None and name in str(out.exc)
    assert str(out.exc) != str(_run(lambda: ref(q, k, k, **kw)).exc)


def test_issue_examples_all_behave_like_nn(quiet_nested):
    """The five snippets of issue 17, verbatim in spirit, in one place."""
    M, Fn = torch_mha.MultiheadAttention, torch_mha.functional.multi_head_attention_forward
    results: List[Optional[BaseException]] = []
    m = M(4, 4, batch_first=True, dtype=torch.double).eval()
    m.in_proj_bias = nn.Parameter(m.in_proj_bias.half())
    q = torch.randn(4, 4, 4, dtype=torch.double)
    with torch.no_grad():
        results.append(_run(lambda: m(q, q, q)).exc)
    q2 = torch.randn(4, 4)
    exc2 = _run(lambda: M(4, 4)(q2, q2, q2, attn_mask=torch.zeros(5, 4, 4, dtype=torch.bool))).exc
    ref2 = _run(
        lambda: nn.MultiheadAttention(4, 4)(
            q2, q2, q2, attn_mask=torch.zeros(5, 4, 4, dtype=torch.bool)
        )
    ).exc
    assert type(exc2) is type(ref2) and str(exc2) == str(ref2)
    x = torch.ones(1, 2, 4)
    mask = nn.Transformer.generate_square_subsequent_mask(2)
    results.append(
        _run(lambda: M(4, 1)(x, x, x, attn_mask=mask, need_weights=False, is_causal=True)).exc
    )
    nt = torch.nested.nested_tensor([])
    with torch.no_grad():
        exc4 = _run(lambda: M(512, 8, batch_first=True).eval()(nt, nt, nt)).exc
        ref4 = _run(lambda: nn.MultiheadAttention(512, 8, batch_first=True).eval()(nt, nt, nt)).exc
    assert type(exc4) is type(ref4) and str(exc4) == str(ref4)
    Ed, q5 = 4, torch.randn(3, 2, 4)
    results.append(
        _run(
            lambda: Fn(
                q5,
                q5,
                q5,
                Ed,
                2,
                torch.randn(3 * Ed, Ed),
                torch.randn(3 * Ed),
                torch.randn(Ed),
                torch.randn(Ed),
                False,
                0.0,
                torch.randn(Ed, Ed),
                torch.randn(Ed),
            )
        ).exc
    )
    assert results == [None, None, None]
