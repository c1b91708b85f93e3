"""Invalid inputs, edge cases and non-finite values for torch_mha.

Rules checked here (see the project brief):

* every invalid call raises a clear exception that names the offending argument (or the shapes)
  and says what was expected;
* where torch.nn.MultiheadAttention (or torch.nn.functional.multi_head_attention_forward) raises
  for the same call, torch_mha raises the SAME exception type: each such test runs nn with
  identical weights on the identical input and compares ``type(exc)``; where the failure is one of
  nn's own checks, the message must also be the text nn produces in the installed torch
  (``same_message``); where nn only fails inside an ATen op (a view, a matmul: see the README's
  Behaviour table), only the type is compared and our message must name the argument; where nn
  does NOT raise, the test's docstring (or the case's ``note``) says so and only our message is
  checked;
* nothing the caller passed in is modified (inputs and module parameters are compared bitwise
  after failing and after successful calls);
* NaN/Inf propagate as through nn.MultiheadAttention;
* the process never crashes: the crash-prone cases (huge sizes that overflow, negative sizes,
  meta/empty tensors, zero-size dims, mismatched strides, expanded overlapping inputs) run in
  subprocesses and must end in a clean Python exception (return code 1, the exception's name on
  stderr) or a clean success, never a signal.
"""

import concurrent.futures
import functools
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import torch_mha

# Small problem used throughout: query (L, N, E), key/value (S, N, E), H heads.
L, N, S, E, H = 3, 2, 5, 8, 2

fw = torch.ops.torch_mha.attention_forward
bw = torch.ops.torch_mha.attention_backward


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _tensors_of(objs) -> List[torch.Tensor]:
    out = []
    for obj in objs:
        if obj is None:
            continue
        if isinstance(obj, nn.Module):
            out.extend(obj.parameters())
            out.extend(obj.buffers())
        elif isinstance(obj, torch.Tensor):
            out.append(obj)
        elif isinstance(obj, dict):
            out.extend(_tensors_of(obj.values()))
        elif isinstance(obj, (list, tuple)):
            out.extend(_tensors_of(obj))
    return out


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    t = t.contiguous().reshape(-1)
    return t if t.dtype == torch.bool else t.view(torch.uint8)


class Snapshot:
    """Bitwise copy of every tensor (and every module parameter/buffer) passed in."""

    def __init__(self, *objs):
        self.items = []
        for t in _tensors_of(objs):
            meta = (tuple(t.shape), t.dtype, t.device, t.layout, t.requires_grad)
            if t.layout == torch.strided:
                meta += (t.stride(), t.storage_offset(), t.data_ptr())
            data = None if t.device.type == "meta" else _bytes_of(t).clone()
            self.items.append((t, meta, data))

    def assert_unchanged(self):
        for i, (t, meta, data) in enumerate(self.items):
            now = (tuple(t.shape), t.dtype, t.device, t.layout, t.requires_grad)
            if t.layout == torch.strided:
                now += (t.stride(), t.storage_offset(), t.data_ptr())
            assert now == meta, f"input #{i} changed its metadata: {meta} -> {now}"
            if data is not None:
                assert torch.equal(_bytes_of(t), data), f"input #{i} was modified in place"


def _mha_pair(**ctor) -> Tuple[nn.MultiheadAttention, torch_mha.MultiheadAttention]:
    """nn.MultiheadAttention and torch_mha.MultiheadAttention with identical weights."""
    embed_dim = ctor.pop("embed_dim", E)
    num_heads = ctor.pop("num_heads", H)
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(embed_dim, num_heads, **ctor)
    with torch.no_grad():  # non-zero biases, so that they matter in the comparisons
        for name, p in ref.named_parameters():
            if "bias" in name and p.dim() == 1:
                p.uniform_(-0.5, 0.5)
    ours = torch_mha.MultiheadAttention(embed_dim, num_heads, **ctor)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _raise_info(fn) -> Optional[BaseException]:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001
        return exc
    return None


def _check_error(
    ours_fn, ref_fn, match: str, inputs, expected_type=None, ref_raises=True, same_message=False
):
    """Runs ours (inputs must stay unchanged), then nn; compares exception types and, with
    same_message, the message with the one nn raises (exactly); match is checked on ours."""
    snap = Snapshot(*inputs)
    ours_exc = _raise_info(ours_fn)
    snap.assert_unchanged()
    assert ours_exc is not None, "torch_mha accepted an invalid input"
    msg = str(ours_exc)
    if ref_fn is not None:
        ref_exc = _raise_info(ref_fn)
        if ref_raises:
            assert ref_exc is not None, "precondition: nn was expected to raise for this input"
            assert type(ours_exc) is type(ref_exc), (
                f"torch_mha raised {type(ours_exc).__name__}({msg!r}) but nn raises "
                f"{type(ref_exc).__name__}({str(ref_exc)!r})"
            )
            if same_message:
                assert msg == str(ref_exc), f"message {msg!r}, nn's is {str(ref_exc)!r}"
        else:
            assert ref_exc is None, f"precondition: nn was expected to accept, got {ref_exc!r}"
    if expected_type is not None:
        assert isinstance(ours_exc, expected_type), f"{type(ours_exc).__name__}: {msg}"
    assert re.search(match, msg, re.S), f"message {msg!r} does not match {match!r}"


def r(*shape, dtype=torch.float32, **kw):
    return torch.randn(*shape, dtype=dtype, **kw)


def _bool(*shape):
    return torch.zeros(*shape, dtype=torch.bool)


# --------------------------------------------------------------------------------------------
# nn.MultiheadAttention forward: bad inputs (same exception type as nn)
# --------------------------------------------------------------------------------------------


@dataclass
class ModuleCase:
    id: str
    build: Callable[[], Tuple[tuple, dict]]  # -> (args, forward kwargs)
    match: str
    ctor: dict = field(default_factory=dict)
    ref_raises: bool = True  # False: nn.MultiheadAttention accepts this call (see note)
    expected_type: Optional[type] = None
    note: str = ""


def _qkv(Lq=L, Sk=S, Nq=N, Nk=N, Eq=E, Ek=E, Ev=E, batched=True, batch_first=False):
    def shape(seq, n, e):
        if not batched:
            return (seq, e)
        return (n, seq, e) if batch_first else (seq, n, e)

    return r(*shape(Lq, Nq, Eq)), r(*shape(Sk, Nk, Ek)), r(*shape(Sk, Nk, Ev))


def _with(kwargs=None, **qkv):
    return lambda: (_qkv(**qkv), dict(kwargs or {}))


MODULE_CASES = [
    # ---- ranks of query/key/value
    ModuleCase("query_1d", lambda: ((r(E), r(E), r(E)), {}), r"query.*1-D"),
    ModuleCase(
        "query_4d", lambda: ((r(2, L, N, E), r(2, S, N, E), r(2, S, N, E)), {}), r"query.*4-D"
    ),
    ModuleCase(
        "key_2d_with_batched_query",
        lambda: ((r(L, N, E), r(S, E), r(S, N, E)), {}),
        r"key.*value.*3-D.*2-D and 3-D",
    ),
    ModuleCase(
        "value_2d_with_batched_query",
        lambda: ((r(L, N, E), r(S, N, E), r(S, E)), {}),
        r"key.*value.*3-D.*3-D and 2-D",
    ),
    ModuleCase(
        "key_value_3d_with_unbatched_query",
        lambda: ((r(L, E), r(S, N, E), r(S, N, E)), {}),
        r"key.*value.*2-D.*3-D",
    ),
    # ---- key_padding_mask rank / shape
    ModuleCase(
        "kpm_3d_batched", _with({"key_padding_mask": _bool(N, S, 1)}), r"key_padding_mask.*2-D.*3-D"
    ),
    ModuleCase(
        "kpm_2d_unbatched",
        _with({"key_padding_mask": _bool(1, S)}, batched=False),
        r"key_padding_mask.*1-D.*2-D",
    ),
    ModuleCase(
        "kpm_wrong_key_len_batched",
        _with({"key_padding_mask": _bool(N, S - 1)}),
        r"key_padded_mask\.shape\[1\] to be 5, but got 4",
    ),
    ModuleCase(
        "kpm_transposed_batched",
        _with({"key_padding_mask": _bool(S, N)}),
        r"key_padded_mask\.shape\[0\] to be 2, but got 5",
    ),
    ModuleCase(
        "kpm_wrong_key_len_unbatched",
        _with({"key_padding_mask": _bool(S - 1)}, batched=False),
        r"key_padded_mask\.shape\[1\] to be 5, but got 4",
    ),
    # ---- attn_mask rank / shape
    ModuleCase("attn_mask_1d", _with({"attn_mask": _bool(S)}), r"attn_mask.*2-D or 3-D.*1-D"),
    ModuleCase(
        "attn_mask_4d", _with({"attn_mask": _bool(N, H, L, S)}), r"attn_mask.*2-D or 3-D.*4-D"
    ),
    ModuleCase(
        "attn_mask_1d_unbatched",
        _with({"attn_mask": _bool(S)}, batched=False),
        r"attn_mask.*2-D or 3-D.*1-D",
    ),
    ModuleCase(
        "attn_mask_2d_wrong_L",
        _with({"attn_mask": _bool(L + 1, S)}),
        r"2D attn_mask.*\[4, 5\].*\(3, 5\)",
    ),
    ModuleCase(
        "attn_mask_2d_wrong_S",
        _with({"attn_mask": _bool(L, S - 1)}),
        r"2D attn_mask.*\[3, 4\].*\(3, 5\)",
    ),
    ModuleCase(
        "attn_mask_2d_wrong_S_no_weights",
        _with({"attn_mask": _bool(L, S - 1), "need_weights": False}),
        r"2D attn_mask.*\[3, 4\].*\(3, 5\)",
    ),
    ModuleCase(
        "attn_mask_3d_wrong_first_dim",
        _with({"attn_mask": _bool(N * H - 1, L, S)}),
        r"3D attn_mask.*\[3, 3, 5\].*\(4, 3, 5\)",
    ),
    ModuleCase(
        "attn_mask_3d_first_dim_1_no_broadcast",
        _with({"attn_mask": _bool(1, L, S)}),
        r"3D attn_mask.*\[1, 3, 5\].*\(4, 3, 5\)",
    ),
    ModuleCase(
        "attn_mask_3d_unbatched_wrong_heads",
        _with({"attn_mask": _bool(H + 1, L, S)}, batched=False),
        r"attn_mask.*\(2, 3, 5\).*\[3, 3, 5\]",
    ),
    ModuleCase(
        "attn_mask_3d_unbatched_wrong_L",
        _with({"attn_mask": _bool(H, L + 1, S)}, batched=False),
        r"attn_mask.*\(2, 3, 5\).*\[2, 4, 5\]",
    ),
    # ---- batch size mismatch
    ModuleCase(
        "batch_mismatch_seq_first",
        _with(Nk=N + 1),
        r"same batch size.*query \[3, 2, 8\].*key \[5, 3, 8\]",
    ),
    ModuleCase(
        "batch_mismatch_batch_first",
        _with(Nk=N + 1, batch_first=True),
        r"same batch size.*query \[2, 3, 8\].*key \[3, 5, 8\].*batch_first=True",
        ctor={"batch_first": True},
    ),
    ModuleCase(
        "batch_mismatch_batch_first_key_batch_1",
        _with(Nk=1, batch_first=True),
        r"same batch size.*key \[1, 5, 8\]",
        ctor={"batch_first": True},
    ),
    # ---- embedding sizes
    ModuleCase(
        "query_last_dim_ne_embed_dim", _with(Eq=E - 1), r"embedding dimension of 8, but got 7"
    ),
    ModuleCase(
        "key_value_last_dim_ne_embed_dim_packed",
        _with(Ek=6, Ev=6),
        r"key and value.*embedding dimension 8.*got 6",
    ),
    ModuleCase(
        "key_shape_ne_value_shape_packed",
        _with(Ev=6),
        r"key shape.*\[5, 2, 8\].*value shape.*\[5, 2, 6\]",
    ),
    ModuleCase(
        "key_value_seq_len_mismatch_packed",
        lambda: ((r(L, N, E), r(S, N, E), r(S - 1, N, E)), {}),
        r"key shape.*\[5, 2, 8\].*value shape.*\[4, 2, 8\]",
    ),
    ModuleCase(
        "key_value_seq_len_mismatch_kdim",
        lambda: ((r(L, N, E), r(S, N, 6), r(S - 1, N, 4)), {}),
        r"key.*\[5, 2\].*value.*\[4, 2\]",
        ctor={"kdim": 6, "vdim": 4},
    ),
    ModuleCase(
        "key_last_dim_ne_kdim",
        _with(Ek=5, Ev=4),
        r"expecting key weights shape of \(8, 5\), but got .*\[8, 6\]",
        ctor={"kdim": 6, "vdim": 4},
    ),
    ModuleCase(
        "value_last_dim_ne_vdim",
        _with(Ek=6, Ev=5),
        r"expecting value weights shape of \(8, 5\), but got .*\[8, 4\]",
        ctor={"kdim": 6, "vdim": 4},
    ),
    # ---- mask dtypes
    ModuleCase(
        "kpm_int64",
        _with({"key_padding_mask": torch.zeros(N, S, dtype=torch.int64)}),
        r"only bool and floating types of key_padding_mask",
    ),
    ModuleCase(
        "attn_mask_uint8",
        _with({"attn_mask": torch.zeros(L, S, dtype=torch.uint8)}),
        r"only bool and floating types of attn_mask",
    ),
    ModuleCase(
        "attn_mask_int32",
        _with({"attn_mask": torch.zeros(L, S, dtype=torch.int32)}),
        r"only bool and floating types of attn_mask",
    ),
    ModuleCase(
        "attn_mask_float64_with_float32_query",
        _with({"attn_mask": torch.zeros(L, S, dtype=torch.float64)}),
        r"attn_mask.*(Double|float64)",
    ),
    ModuleCase(
        "attn_mask_float64_with_float32_query_no_weights",
        _with({"attn_mask": torch.zeros(L, S, dtype=torch.float64), "need_weights": False}),
        r"attn_mask.*(Double|float64)",
    ),
    ModuleCase(
        "kpm_float64_with_float32_query",
        _with({"key_padding_mask": torch.zeros(N, S, dtype=torch.float64)}),
        r"key_padding_mask.*(Double|float64)",
    ),
    ModuleCase(
        "attn_mask_float16_with_float32_query",
        _with({"attn_mask": torch.zeros(L, S, dtype=torch.float16)}),
        r"attn_mask.*(Half|float16)",
    ),
    ModuleCase("attn_mask_sparse", _with({"attn_mask": r(L, S).to_sparse()}), r"SparseCPU"),
    # ---- dtypes of query/key/value and of the module
    ModuleCase(
        "key_float64_query_float32",
        lambda: ((r(L, N, E), r(S, N, E).double(), r(S, N, E)), {}),
        r"key.*same dtype as query.*Double",
    ),
    ModuleCase(
        "value_float16_query_float32",
        lambda: ((r(L, N, E), r(S, N, E), r(S, N, E).half()), {}),
        r"value.*same dtype as query.*Half",
    ),
    ModuleCase(
        "module_float64_input_float32",
        _with(),
        r"in_proj_weight.*dtype.*Float.*Double",
        ctor={"dtype": torch.float64},
    ),
    ModuleCase(
        "input_int64",
        lambda: (tuple(torch.ones(s, N, E, dtype=torch.int64) for s in (L, S, S)), {}),
        r"floating point query.*Long",
    ),
    ModuleCase(
        "input_complex",
        lambda: (tuple(r(s, N, E, dtype=torch.complex64) for s in (L, S, S)), {}),
        r"floating point query.*ComplexFloat",
    ),
    # ---- is_causal
    ModuleCase("is_causal_without_attn_mask", _with({"is_causal": True}), r"attn_mask.*is_causal"),
    ModuleCase(
        "is_causal_without_attn_mask_no_weights",
        _with({"is_causal": True, "need_weights": False}),
        r"attn_mask.*is_causal",
    ),
    # ---- masks on another device (nn does NOT raise: it silently ignores a meta mask)
    ModuleCase(
        "attn_mask_on_meta_device",
        _with({"attn_mask": torch.ones(L, S, dtype=torch.bool, device="meta")}),
        r"attn_mask.*same device as query \(cpu\).*meta",
        ref_raises=False,
        expected_type=RuntimeError,
        note="nn.MultiheadAttention does not raise: it returns a CPU output computed as "
        "if the (all-True) meta mask were absent, and meta weights",
    ),
    ModuleCase(
        "float_attn_mask_on_meta_device_no_weights",
        _with({"attn_mask": torch.zeros(L, S, device="meta"), "need_weights": False}),
        r"attn_mask.*same device as query \(cpu\).*meta",
        ref_raises=False,
        expected_type=RuntimeError,
        note="nn.MultiheadAttention does not raise",
    ),
    ModuleCase(
        "kpm_on_meta_device",
        _with({"key_padding_mask": torch.ones(N, S, dtype=torch.bool, device="meta")}),
        r"key_padding_mask.*same device as query \(cpu\).*meta",
        ref_raises=False,
        expected_type=RuntimeError,
        note="nn.MultiheadAttention does not raise",
    ),
]


# Cases where nn fails inside an ATen op (a view, a matmul, the kernels' dtype checks) rather
# than in a check of its own: the exception type is compared, and our message names the argument
# instead of repeating the op's text (a deliberate difference, in the README's Behaviour table).
# Every other case where nn raises must give nn's message, character for character.
INCIDENTAL_MODULE_CASES = {
    "batch_mismatch_seq_first",
    "batch_mismatch_batch_first",
    "batch_mismatch_batch_first_key_batch_1",
    "key_value_last_dim_ne_embed_dim_packed",
    "attn_mask_float64_with_float32_query",
    "attn_mask_float64_with_float32_query_no_weights",
    "kpm_float64_with_float32_query",
    "attn_mask_float16_with_float32_query",
    "attn_mask_sparse",
    "key_float64_query_float32",
    "value_float16_query_float32",
    "module_float64_input_float32",
    "input_int64",
    "input_complex",
}


def test_incidental_module_cases_name_real_cases():
    assert INCIDENTAL_MODULE_CASES <= {c.id for c in MODULE_CASES}


@pytest.mark.parametrize("case", MODULE_CASES, ids=[c.id for c in MODULE_CASES])
def test_module_bad_input(case: ModuleCase):
    """Each case: torch_mha raises (type of nn's exception where nn raises), names the argument,
    and leaves inputs and module parameters untouched; the message is nn's (as the installed
    torch words it) except for INCIDENTAL_MODULE_CASES. Cases with ref_raises=False are accepted
    by nn.MultiheadAttention (see the case's note)."""
    ref, ours = _mha_pair(**case.ctor)
    args, kwargs = case.build()
    _check_error(
        lambda: ours(*args, **kwargs),
        lambda: ref(*args, **kwargs),
        case.match,
        (args, kwargs, ours),
        expected_type=case.expected_type,
        ref_raises=case.ref_raises,
        same_message=case.ref_raises and case.id not in INCIDENTAL_MODULE_CASES,
    )


# --------------------------------------------------------------------------------------------
# Constructor
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "embed_dim,num_heads",
    [(8, 3), (6, 4)],
    ids=["embed_8_heads_3", "embed_6_heads_4"],
)
def test_ctor_embed_dim_not_divisible_by_num_heads(embed_dim, num_heads):
    _check_error(
        lambda: torch_mha.MultiheadAttention(embed_dim, num_heads),
        lambda: nn.MultiheadAttention(embed_dim, num_heads),
        r"embed_dim must be divisible by num_heads",
        (),
        expected_type=AssertionError,
        same_message=True,
    )


@pytest.mark.parametrize(
    "embed_dim,num_heads",
    [(0, 2), (-8, 2), (8, 0), (8, -2)],
    ids=["embed_dim_0", "embed_dim_negative", "num_heads_0", "num_heads_negative"],
)
def test_ctor_nonpositive_sizes(embed_dim, num_heads):
    _check_error(
        lambda: torch_mha.MultiheadAttention(embed_dim, num_heads),
        lambda: nn.MultiheadAttention(embed_dim, num_heads),
        rf"embed_dim and num_heads must be greater than 0.*embed_dim={embed_dim}"
        rf".*num_heads={num_heads}",
        (),
        expected_type=ValueError,
        same_message=True,
    )


@pytest.mark.parametrize(
    "dropout", [1.0, 1.5, -0.1, float("nan")], ids=["1.0", "1.5", "-0.1", "nan"]
)
def test_ctor_dropout_outside_unit_interval(dropout):
    """Deliberate difference: nn.MultiheadAttention accepts these at construction."""
    _check_error(
        lambda: torch_mha.MultiheadAttention(E, H, dropout=dropout),
        lambda: nn.MultiheadAttention(E, H, dropout=dropout),
        r"dropout must be in \[0, 1\)",
        (),
        expected_type=ValueError,
        ref_raises=False,
    )


def test_ctor_negative_kdim_like_nn():
    _check_error(
        lambda: torch_mha.MultiheadAttention(E, H, kdim=-1),
        lambda: nn.MultiheadAttention(E, H, kdim=-1),
        r"negative dimension -1",
        (),
        same_message=True,
    )


# --------------------------------------------------------------------------------------------
# Functional interface vs torch.nn.functional.multi_head_attention_forward
# --------------------------------------------------------------------------------------------


def _functional_args(ref: nn.MultiheadAttention, **overrides):
    q, k, v = _qkv()
    args = dict(
        query=q,
        key=k,
        value=v,
        embed_dim_to_check=E,
        num_heads=H,
        in_proj_weight=ref.in_proj_weight,
        in_proj_bias=ref.in_proj_bias,
        bias_k=None,
        bias_v=None,
        add_zero_attn=False,
        dropout_p=0.0,
        out_proj_weight=ref.out_proj.weight,
        out_proj_bias=ref.out_proj.bias,
    )
    args.update(overrides)
    return args


FUNCTIONAL_CASES = [
    # (id, overrides builder, match, nn raises?)
    ("bias_k_without_bias_v", lambda: {"bias_k": r(1, 1, E)}, r"bias_k.*bias_v", True),
    ("bias_v_without_bias_k", lambda: {"bias_v": r(1, 1, E)}, r"bias_v.*bias_k", True),
    (
        "bias_k_wrong_shape",
        lambda: {"bias_k": r(1, 1, E - 1), "bias_v": r(1, 1, E - 1)},
        r"bias_k.*\[1, 1, 8\].*\[1, 1, 7\]",
        True,
    ),
    (
        "static_k_wrong_batch_heads",
        lambda: {"static_k": r(N * H - 1, S, E // H)},
        r"static_k.*4.*3",
        True,
    ),
    (
        "static_k_wrong_head_dim",
        lambda: {"static_k": r(N * H, S, E // H - 1)},
        r"static_k.*4.*3",
        True,
    ),
    (
        "static_v_wrong_batch_heads",
        lambda: {"static_v": r(N * H - 1, S, E // H)},
        r"static_v.*4.*3",
        True,
    ),
    ("static_k_2d", lambda: {"static_k": r(N * H, S)}, r"static_k must be 3-D.*2-D", True),
    ("static_v_2d", lambda: {"static_v": r(N * H, S)}, r"static_v must be 3-D.*2-D", True),
    (
        "static_k_with_bias_k",
        lambda: {"static_k": r(N * H, S, E // H), "bias_k": r(1, 1, E), "bias_v": r(1, 1, E)},
        r"bias cannot be added to static key",
        True,
    ),
    (
        "static_k_and_static_v_lengths_differ",
        lambda: {"static_k": r(N * H, S, E // H), "static_v": r(N * H, S + 1, E // H)},
        r"static_k.*static_v.*5.*6",
        True,
    ),
    (
        "in_proj_weight_wrong_shape",
        lambda: {"in_proj_weight": r(3 * E, E - 2)},
        r"in_proj_weight.*\[24, 8\].*\[24, 6\]",
        True,
    ),
    (
        "in_proj_bias_wrong_shape",
        lambda: {"in_proj_bias": r(3 * E - 1)},
        r"in_proj_bias.*\[24\].*\[23\]",
        True,
    ),
    (
        "out_proj_weight_wrong_shape",
        lambda: {"out_proj_weight": r(E, E - 1)},
        r"out_proj_weight.*\[8, 8\].*\[8, 7\]",
        True,
    ),
    (
        "kpm_length_must_match_static_k",
        lambda: {
            "static_k": r(N * H, S + 1, E // H),
            "static_v": r(N * H, S + 1, E // H),
            "key_padding_mask": _bool(N, S),
        },
        r"key_padded_mask\.shape\[1\] to be 6, but got 5",
        True,
    ),
    (
        "separate_proj_weights_missing",
        lambda: {"use_separate_proj_weight": True, "q_proj_weight": r(E, E)},
        r"use_separate_proj_weight.*k_proj_weight",
        True,
    ),
    (
        "embed_dim_to_check_mismatch",
        lambda: {"embed_dim_to_check": E - 2},
        r"embedding dimension of 6, but got 8",
        True,
    ),
    (
        "num_heads_negative",
        lambda: {"num_heads": -2},
        r"num_heads.*(greater than 0|positive|> ?0).*-2",
        True,
    ),
    # Separate projection weights: key / value whose last dim is not the weight's kdim / vdim
    # (nn's check of the weight's shape).
    (
        "key_last_dim_ne_kdim",
        lambda: {
            "use_separate_proj_weight": True,
            "in_proj_weight": None,
            "q_proj_weight": r(E, E),
            "k_proj_weight": r(E, E - 2),
            "v_proj_weight": r(E, E),
        },
        r"^expecting key weights shape of \(8, 8\), but got .*\[8, 6\]",
        True,
    ),
    (
        "value_last_dim_ne_vdim",
        lambda: {
            "use_separate_proj_weight": True,
            "in_proj_weight": None,
            "q_proj_weight": r(E, E),
            "k_proj_weight": r(E, E),
            "v_proj_weight": r(E, E - 2),
        },
        r"^expecting value weights shape of \(8, 8\), but got .*\[8, 6\]",
        True,
    ),
    ("dropout_p_1.5_training", lambda: {"dropout_p": 1.5}, r"dropout probability.*1\.5", True),
    # nn does NOT raise for these: dropout_p=1.0 and -0.1 go through its need_weights path.
    ("dropout_p_1.0_training", lambda: {"dropout_p": 1.0}, r"dropout.*\[0, 1\).*1\.0", False),
    (
        "dropout_p_negative_training",
        lambda: {"dropout_p": -0.1},
        r"dropout.*\[0, 1\).*-0\.1",
        False,
    ),
    (
        "dropout_p_1.5_eval",
        lambda: {"dropout_p": 1.5, "training": False},
        r"dropout.*\[0, 1\).*1\.5",
        False,
    ),
]


# Exception types pinned explicitly (besides being compared with nn's): the checks made in
# torch_mha/functional.py and the ones left to the C++ op.
FUNCTIONAL_EXPECTED_TYPES: Dict[str, type] = {
    "bias_k_without_bias_v": AssertionError,  # functional.py, like nn's assert
    "bias_v_without_bias_k": AssertionError,
    "in_proj_bias_wrong_shape": RuntimeError,  # left to the C++ op, like nn (a shape error)
    "static_k_2d": IndexError,  # nn reads size(2) of a 2-D tensor; ours says why
    "static_v_2d": IndexError,
    "num_heads_negative": RuntimeError,  # from the C++ op
    "key_last_dim_ne_kdim": AssertionError,
    "value_last_dim_ne_vdim": AssertionError,
}


@pytest.mark.parametrize(
    "case_id,overrides,match,ref_raises", FUNCTIONAL_CASES, ids=[c[0] for c in FUNCTIONAL_CASES]
)
def test_functional_bad_input(case_id, overrides, match, ref_raises):
    """torch_mha.multi_head_attention_forward vs F.multi_head_attention_forward with the same
    arguments: same exception type as nn (and the type in FUNCTIONAL_EXPECTED_TYPES where
    listed), and nn's message except for INCIDENTAL_FUNCTIONAL_CASES. ref_raises=False:
    F.multi_head_attention_forward accepts it (dropout_p=1.0 or -0.1 with need_weights=True, or
    any dropout_p with training=False); torch_mha rejects dropout_p outside [0, 1) with
    ValueError (deliberate)."""
    ref, _ = _mha_pair()
    args = _functional_args(ref, **overrides())
    _check_error(
        lambda: torch_mha.multi_head_attention_forward(**args),
        lambda: F.multi_head_attention_forward(**args),
        match,
        (args,),
        expected_type=FUNCTIONAL_EXPECTED_TYPES.get(case_id) if ref_raises else ValueError,
        ref_raises=ref_raises,
        same_message=case_id not in INCIDENTAL_FUNCTIONAL_CASES,
    )


# As INCIDENTAL_MODULE_CASES: nn fails inside an ATen op (cat, matmul, bmm, a view) or reads a
# size that is not there (IndexError); the type is compared, our message names the argument.
INCIDENTAL_FUNCTIONAL_CASES = {
    "bias_k_wrong_shape",
    "static_k_2d",
    "static_v_2d",
    "static_k_and_static_v_lengths_differ",
    "in_proj_weight_wrong_shape",
    "in_proj_bias_wrong_shape",
    "out_proj_weight_wrong_shape",
    "num_heads_negative",
}


def test_functional_expected_types_name_real_cases():
    assert set(FUNCTIONAL_EXPECTED_TYPES) <= {c[0] for c in FUNCTIONAL_CASES}
    assert INCIDENTAL_FUNCTIONAL_CASES <= {c[0] for c in FUNCTIONAL_CASES}


def test_functional_zero_num_heads_like_nn():
    """num_heads=0: nn fails computing embed_dim // num_heads (ZeroDivisionError). torch_mha
    raises the same type (this test asserted RuntimeError before issue 17) with a message that
    names num_heads."""
    ref, _ = _mha_pair()
    args = _functional_args(ref, num_heads=0)
    _check_error(
        lambda: torch_mha.multi_head_attention_forward(**args),
        lambda: F.multi_head_attention_forward(**args),
        r"num_heads must be greater than 0.*num_heads=0",
        (args,),
        expected_type=ZeroDivisionError,
    )


def test_module_wrong_in_proj_bias_like_nn():
    """The same in_proj_bias shape error through the module (a checkpoint with a wrong bias
    assigned to both modules)."""
    ref, ours = _mha_pair()
    bias = nn.Parameter(r(3 * E - 1))
    ref.in_proj_bias = bias
    ours.in_proj_bias = bias
    q, k, v = _qkv()
    _check_error(
        lambda: ours(q, k, v),
        lambda: ref(q, k, v),
        r"in_proj_bias.*\[24\].*\[23\]",
        (q, k, v, ours),
    )


# --------------------------------------------------------------------------------------------
# Core ops: torch.ops.torch_mha.attention_forward / attention_backward / multi_head_attention
# (no nn counterpart: type and message checked)
# --------------------------------------------------------------------------------------------

B4, H4, L4, S4, D4, DV4 = 2, 3, 4, 5, 8, 6


def _core_qkv():
    return r(B4, H4, L4, D4), r(B4, H4, S4, D4), r(B4, H4, S4, DV4)


CORE_FORWARD_CASES = [
    # (id, builder -> (q, k, v, kwargs), exception type, match)
    (
        "query_3d",
        lambda q, k, v: (q[0], k, v, {}),
        RuntimeError,
        r"expected query of shape \(batch, heads, query_len, head_dim\).*3-D",
    ),
    ("query_5d", lambda q, k, v: (q[None], k, v, {}), RuntimeError, r"expected query.*5-D"),
    ("key_3d", lambda q, k, v: (q, k[0], v, {}), RuntimeError, r"expected key.*3-D"),
    ("value_2d", lambda q, k, v: (q, k, v[0, 0], {}), RuntimeError, r"expected value.*2-D"),
    (
        "head_dim_mismatch",
        lambda q, k, v: (q, r(B4, H4, S4, D4 - 1), v, {}),
        RuntimeError,
        r"query and key.*same head_dim.*\[2, 3, 4, 8\].*\[2, 3, 5, 7\]",
    ),
    (
        "key_value_len_mismatch",
        lambda q, k, v: (q, k, r(B4, H4, S4 + 1, DV4), {}),
        RuntimeError,
        r"key and value.*same length.*\[2, 3, 5, 8\].*\[2, 3, 6, 6\]",
    ),
    (
        "heads_mismatch",
        lambda q, k, v: (q, r(B4, H4 - 1, S4, D4), r(B4, H4 - 1, S4, DV4), {}),
        RuntimeError,
        r"number of heads.*query \[2, 3, 4, 8\].*key \[2, 2, 5, 8\]",
    ),
    (
        "batch_mismatch",
        lambda q, k, v: (q, r(1, H4, S4, D4), r(1, H4, S4, DV4), {}),
        RuntimeError,
        r"batch size.*query \[2, 3, 4, 8\].*key \[1, 3, 5, 8\]",
    ),
    (
        "attn_mask_not_broadcastable",
        lambda q, k, v: (q, k, v, {"attn_mask": _bool(L4, L4)}),
        RuntimeError,
        r"attn_mask broadcastable to .*\(2, 3, 4, 5\).*\[4, 4\]",
    ),
    (
        "attn_mask_5d",
        lambda q, k, v: (q, k, v, {"attn_mask": _bool(1, B4, H4, L4, S4)}),
        RuntimeError,
        r"attn_mask broadcastable.*\[1, 2, 3, 4, 5\]",
    ),
    (
        "attn_mask_batch_times_heads_3d",
        lambda q, k, v: (q, k, v, {"attn_mask": _bool(B4 * H4, L4, S4)}),
        RuntimeError,
        r"attn_mask broadcastable.*\[6, 4, 5\]",
    ),
    (
        "kpm_wrong_shape",
        lambda q, k, v: (q, k, v, {"key_padding_mask": _bool(B4, S4 - 1)}),
        RuntimeError,
        r"key_padding_mask of shape \(batch, key_len\) = \(2, 5\).*\[2, 4\]",
    ),
    (
        "kpm_1d",
        lambda q, k, v: (q, k, v, {"key_padding_mask": _bool(S4)}),
        RuntimeError,
        r"key_padding_mask of shape \(batch, key_len\).*\[5\]",
    ),
    (
        "kpm_0d",
        lambda q, k, v: (q, k, v, {"key_padding_mask": torch.tensor(True)}),
        RuntimeError,
        r"key_padding_mask of shape \(batch, key_len\).*\[\]",
    ),
    (
        "dropout_without_seed",
        lambda q, k, v: (q, k, v, {"dropout_p": 0.5}),
        RuntimeError,
        r"dropout_p > 0 needs a dropout_seed",
    ),
    (
        "dropout_seed_int32",
        lambda q, k, v: (
            q,
            k,
            v,
            {"dropout_p": 0.5, "dropout_seed": torch.tensor([1], dtype=torch.int32)},
        ),
        RuntimeError,
        r"dropout_seed.*int64.*Int",
    ),
    (
        "dropout_seed_two_elements",
        lambda q, k, v: (q, k, v, {"dropout_p": 0.5, "dropout_seed": torch.tensor([1, 2])}),
        RuntimeError,
        r"dropout_seed.*one element.*\[2\]",
    ),
    (
        "dropout_seed_empty",
        lambda q, k, v: (
            q,
            k,
            v,
            {"dropout_p": 0.5, "dropout_seed": torch.zeros(0, dtype=torch.long)},
        ),
        RuntimeError,
        r"dropout_seed.*one element.*\[0\]",
    ),
    (
        "dropout_seed_meta",
        lambda q, k, v: (
            q,
            k,
            v,
            {"dropout_p": 0.5, "dropout_seed": torch.tensor([1], device="meta")},
        ),
        RuntimeError,
        r"dropout_seed on cpu.*meta",
    ),
    (
        "dropout_p_1.0",
        lambda q, k, v: (q, k, v, {"dropout_p": 1.0}),
        ValueError,
        r"dropout_p must be in \[0, 1\)",
    ),
    (
        "dropout_p_negative",
        lambda q, k, v: (q, k, v, {"dropout_p": -0.1}),
        ValueError,
        r"dropout_p must be in \[0, 1\).*-0\.1",
    ),
    (
        "dropout_p_nan",
        lambda q, k, v: (q, k, v, {"dropout_p": float("nan")}),
        ValueError,
        r"dropout_p must be in \[0, 1\).*nan",
    ),
    (
        "attn_mask_int32",
        lambda q, k, v: (q, k, v, {"attn_mask": torch.zeros(L4, S4, dtype=torch.int32)}),
        RuntimeError,
        r"attn_mask must be a bool tensor.*Int",
    ),
    (
        "attn_mask_uint8",
        lambda q, k, v: (q, k, v, {"attn_mask": torch.zeros(L4, S4, dtype=torch.uint8)}),
        RuntimeError,
        r"attn_mask must be a bool tensor.*Byte",
    ),
    (
        "kpm_int64",
        lambda q, k, v: (q, k, v, {"key_padding_mask": torch.zeros(B4, S4, dtype=torch.long)}),
        RuntimeError,
        r"key_padding_mask must be a bool tensor.*Long",
    ),
    (
        "attn_mask_float64_query_float32",
        lambda q, k, v: (q, k, v, {"attn_mask": torch.zeros(L4, S4, dtype=torch.float64)}),
        RuntimeError,
        r"attn_mask must be a bool tensor.*Double",
    ),
    (
        "attn_mask_meta",
        lambda q, k, v: (q, k, v, {"attn_mask": torch.zeros(L4, S4, device="meta")}),
        RuntimeError,
        r"attn_mask on the same device as query \(cpu\).*meta",
    ),
    (
        "kpm_meta",
        lambda q, k, v: (q, k, v, {"key_padding_mask": _bool(B4, S4).to("meta")}),
        RuntimeError,
        r"key_padding_mask on the same device as query \(cpu\).*meta",
    ),
    (
        "query_int64",
        lambda q, k, v: (q.long(), k.long(), v.long(), {}),
        RuntimeError,
        r"query of dtype float64, float32, bfloat16 or float16.*Long",
    ),
    (
        "query_complex",
        lambda q, k, v: (q.cfloat(), k.cfloat(), v.cfloat(), {}),
        RuntimeError,
        r"query of dtype float64.*ComplexFloat",
    ),
    (
        "key_dtype_differs",
        lambda q, k, v: (q, k.double(), v, {}),
        RuntimeError,
        r"same dtype.*query Float, key Double, value Float",
    ),
    (
        "query_0d",
        lambda q, k, v: (torch.tensor(1.0), k, v, {}),
        RuntimeError,
        r"expected query of shape.*0-D",
    ),
    (
        "attn_mask_sparse",
        lambda q, k, v: (q, k, v, {"attn_mask": r(L4, S4).to_sparse()}),
        NotImplementedError,
        r"attention_forward.*SparseCPU",
    ),
    (
        "query_meta_key_value_cpu",
        lambda q, k, v: (q.to("meta"), k, v, {}),
        RuntimeError,
        r"same device.*query on meta, key on cpu",
    ),
]


@pytest.mark.parametrize(
    "case_id,build,exc_type,match", CORE_FORWARD_CASES, ids=[c[0] for c in CORE_FORWARD_CASES]
)
def test_core_forward_bad_input(case_id, build, exc_type, match):
    q, k, v, kwargs = build(*_core_qkv())
    _check_error(
        lambda: fw(q, k, v, **kwargs), None, match, (q, k, v, kwargs), expected_type=exc_type
    )


def _backward_args(**overrides):
    """Valid attention_backward arguments (per-head weights' gradient absent), then overrides:
    name -> fn(args) giving the new value (applied in order, so a later override sees the
    earlier ones)."""
    q, k, v = _core_qkv()
    out, softmax_stats, _ = fw(q, k, v)
    args = dict(
        grad_output=torch.ones_like(out),
        query=q,
        key=k,
        value=v,
        output=out,
        softmax_stats=softmax_stats,
        attn_mask=None,
        key_padding_mask=None,
        is_causal=False,
        scale=None,
        dropout_p=0.0,
        dropout_seed=None,
        grad_weights=None,
        average_weights=False,
        compute_mask_grad=False,
    )
    for name, fn in overrides.items():
        args[name] = fn(args)
    return args


def test_core_backward_args_are_valid():
    """The baseline of CORE_BACKWARD_CASES runs, with per-head and averaged grad_weights."""
    for overrides in (
        {},
        {"grad_weights": lambda a: torch.ones(B4, H4, L4, S4)},
        {"average_weights": lambda a: True, "grad_weights": lambda a: torch.ones(B4, L4, S4)},
    ):
        args = _backward_args(**overrides)
        grads = bw(**args)
        assert [g.shape for g in grads[:3]] == [
            args["query"].shape,
            args["key"].shape,
            args["value"].shape,
        ]


CORE_BACKWARD_CASES = [
    (
        "grad_output_wrong_seq",
        {"grad_output": lambda a: a["grad_output"][:, :, :-1]},
        r"grad_output of shape \[2, 3, 4, 6\].*\[2, 3, 3, 6\]",
    ),
    (
        "grad_output_wrong_value_dim",
        {"grad_output": lambda a: r(B4, H4, L4, D4)},
        r"grad_output of shape \[2, 3, 4, 6\].*\[2, 3, 4, 8\]",
    ),
    (
        "grad_output_float64",
        {"grad_output": lambda a: a["grad_output"].double()},
        r"grad_output and output of dtype Float.*Double and Float",
    ),
    (
        "output_wrong_shape",
        {"output": lambda a: a["output"][..., :3]},
        r"output of shape \[2, 3, 4, 6\].*\[2, 3, 4, 3\]",
    ),
    # softmax_stats: (N, H, L, 2) in the accumulate dtype (float32 for float32 inputs).
    (
        "softmax_stats_float64",
        {"softmax_stats": lambda a: a["softmax_stats"].double()},
        r"softmax_stats of dtype Float.*Double",
    ),
    (
        "softmax_stats_float16",
        {"softmax_stats": lambda a: a["softmax_stats"].half()},
        r"softmax_stats of dtype Float.*Half",
    ),
    (
        "softmax_stats_old_logsumexp_shape",  # the former (N, H, L) logsumexp
        {"softmax_stats": lambda a: a["softmax_stats"].sum(-1)},
        r"softmax_stats of shape \[2, 3, 4, 2\].*\[2, 3, 4\]",
    ),
    (
        "softmax_stats_one_component",
        {"softmax_stats": lambda a: a["softmax_stats"][..., :1]},
        r"softmax_stats of shape \[2, 3, 4, 2\].*\[2, 3, 4, 1\]",
    ),
    (
        "softmax_stats_wrong_query_len",
        {"softmax_stats": lambda a: a["softmax_stats"][:, :, :-1]},
        r"softmax_stats of shape \[2, 3, 4, 2\].*\[2, 3, 3, 2\]",
    ),
    (
        "softmax_stats_on_meta",
        {"softmax_stats": lambda a: a["softmax_stats"].to("meta")},
        r"softmax_stats on cpu.*meta",
    ),
    # grad_weights: (N, H, L, S) per head, or (N, L, S) with average_weights=True.
    (
        "grad_weights_wrong_key_len",
        {"grad_weights": lambda a: torch.ones(B4, H4, L4, L4)},
        r"grad_weights of shape \[2, 3, 4, 5\].*\[2, 3, 4, 4\]",
    ),
    (
        "grad_weights_averaged_shape_without_average",
        {"grad_weights": lambda a: torch.ones(B4, L4, S4)},
        r"grad_weights of shape \[2, 3, 4, 5\].*\[2, 4, 5\]",
    ),
    (
        "grad_weights_per_head_shape_with_average",
        {"average_weights": lambda a: True, "grad_weights": lambda a: torch.ones(B4, H4, L4, S4)},
        r"grad_weights of shape \[2, 4, 5\].*\[2, 3, 4, 5\]",
    ),
    (
        "grad_weights_averaged_wrong_query_len",
        {"average_weights": lambda a: True, "grad_weights": lambda a: torch.ones(B4, L4 - 1, S4)},
        r"grad_weights of shape \[2, 4, 5\].*\[2, 3, 5\]",
    ),
    (
        "grad_weights_float64",
        {"grad_weights": lambda a: torch.ones(B4, H4, L4, S4).double()},
        r"grad_weights of dtype Float.*Double",
    ),
    (
        "grad_weights_on_meta",
        {"grad_weights": lambda a: torch.ones(B4, H4, L4, S4, device="meta")},
        r"grad_weights on cpu.*meta",
    ),
    (
        "backward_dropout_without_seed",
        {"dropout_p": lambda a: 0.5},
        r"attention_backward.*dropout_seed",
    ),
]


@pytest.mark.parametrize(
    "case_id,overrides,match", CORE_BACKWARD_CASES, ids=[c[0] for c in CORE_BACKWARD_CASES]
)
def test_core_backward_bad_input(case_id, overrides, match):
    args = _backward_args(**overrides)
    _check_error(lambda: bw(**args), None, match, (args,), expected_type=RuntimeError)


def test_core_multi_head_attention_op_dropout_out_of_range():
    q = r(L, N, E)
    w, ow = r(3 * E, E), r(E, E)
    _check_error(
        lambda: torch.ops.torch_mha.multi_head_attention(
            q, q, q, E, H, w, None, None, None, False, 1.5, ow, None
        ),
        None,
        r"dropout probability must be in \[0, 1\).*1\.5",
        (q, w, ow),
        expected_type=ValueError,
    )


def test_core_multi_head_attention_op_query_4d():
    q = r(2, L, N, E)
    w, ow = r(3 * E, E), r(E, E)
    _check_error(
        lambda: torch.ops.torch_mha.multi_head_attention(
            q, q, q, E, H, w, None, None, None, False, 0.0, ow, None
        ),
        None,
        r"query should be unbatched 2D or batched 3D.*4-D",
        (q, w, ow),
        expected_type=RuntimeError,
    )


# --------------------------------------------------------------------------------------------
# Supported edge cases (positive tests): requires_grad float masks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("need_weights", [False, True], ids=["no_weights", "weights"])
@pytest.mark.parametrize(
    "mask_kind,shape",
    [("attn_mask", (L, S)), ("attn_mask", (N * H, L, S)), ("key_padding_mask", (N, S))],
    ids=["attn_mask_2d", "attn_mask_3d", "key_padding_mask"],
)
def test_requires_grad_float_mask_matches_nn(mask_kind, shape, need_weights):
    """A float mask with requires_grad=True is supported: same output and mask gradient as nn."""
    ref, ours = _mha_pair()
    q, k, v = _qkv()
    grads, outs = [], []
    for module in (ours, ref):
        torch.manual_seed(1)
        mask = r(*shape).requires_grad_(True)
        snap = Snapshot(q, k, v, mask, module)
        out, _ = module(q, k, v, need_weights=need_weights, **{mask_kind: mask})
        out.pow(2).sum().backward()
        if module is ours:
            snap.assert_unchanged()
        assert mask.grad is not None and mask.grad.shape == mask.shape
        outs.append(out.detach())
        grads.append(mask.grad)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "ctor,kind",
    [
        ({"add_bias_kv": True, "add_zero_attn": True}, "bool_masks"),
        ({"kdim": 6, "vdim": 4, "batch_first": True}, "float_masks_requiring_grad"),
        ({}, "causal"),
        ({}, "self_attention_float_masks_requiring_grad"),
    ],
    ids=[
        "bias_kv_zero_attn_bool_masks",
        "kdim_vdim_batch_first_float_masks",
        "is_causal",
        "self_attention_float_masks",
    ],
)
def test_successful_calls_leave_inputs_unchanged(ctor, kind):
    """Forward (both need_weights) and backward leave every input and parameter bitwise equal."""
    _, ours = _mha_pair(**ctor)
    bf = ctor.get("batch_first", False)
    q, k, v = _qkv(Ek=ctor.get("kdim", E), Ev=ctor.get("vdim", E), batch_first=bf)
    for t in (q, k, v):
        t.requires_grad_(True)
    kwargs = {}
    if kind == "bool_masks":
        kwargs = {
            "attn_mask": torch.rand(L, S) > 0.7,
            "key_padding_mask": torch.tensor([[False, True, False, False, True]] * N),
        }
    elif kind == "causal":
        q, k, v = q[:, :, :], q[:, :, :], q[:, :, :]
        kwargs = {"attn_mask": torch.ones(L, L, dtype=torch.bool).triu(1), "is_causal": True}
    elif kind in ("float_masks_requiring_grad", "self_attention_float_masks_requiring_grad"):
        if kind.startswith("self"):
            k = v = q
        s_len = k.shape[1] if bf else k.shape[0]
        kwargs = {
            "attn_mask": r(N * H, L, s_len).requires_grad_(True),
            "key_padding_mask": r(N, s_len).requires_grad_(True),
        }
    snap = Snapshot(q, k, v, kwargs, ours)
    for need_weights in (True, False):
        out, weights = ours(q, k, v, need_weights=need_weights, **kwargs)
        loss = out.sum() + (weights.sum() if weights is not None else 0)
        loss.backward()
        snap.assert_unchanged()


# --------------------------------------------------------------------------------------------
# NaN / Inf propagation, compared with nn.MultiheadAttention (need_weights=False on nn's side)
# --------------------------------------------------------------------------------------------


def _nan_inf_inputs(kind):
    torch.manual_seed(2)
    q, k, v = _qkv()
    kwargs = {}
    if kind == "nan_in_query":
        q[1, 0, 3] = float("nan")
    elif kind == "inf_in_key":
        k[2, 1, 4] = float("inf")
    elif kind == "inf_in_value":
        v[2, 1, 4] = float("inf")
    elif kind == "neg_inf_in_float_mask_row_partial":
        m = torch.zeros(L, S)
        m[1, 2:] = float("-inf")
        kwargs["attn_mask"] = m
    elif kind == "nan_in_float_mask":
        m = torch.zeros(L, S)
        m[1, 2] = float("nan")
        kwargs["attn_mask"] = m
    elif kind == "nan_in_float_key_padding_mask":
        m = torch.zeros(N, S)
        m[0, 1] = float("nan")
        kwargs["key_padding_mask"] = m
    elif kind == "pos_inf_in_float_mask":
        m = torch.zeros(L, S)
        m[1, 2] = float("inf")
        kwargs["attn_mask"] = m
    return q, k, v, kwargs


NAN_INF_KINDS = [
    "nan_in_query",
    "inf_in_key",
    "inf_in_value",
    "neg_inf_in_float_mask_row_partial",
    "nan_in_float_mask",
    "nan_in_float_key_padding_mask",
    "pos_inf_in_float_mask",
]


@pytest.mark.parametrize("kind", NAN_INF_KINDS)
def test_nan_inf_propagate_like_nn(kind):
    """Same NaN/Inf positions and same finite values as nn (need_weights=False on nn's side),
    for both need_weights settings on ours. nan_in_query: nn's default need_weights=False path
    (the CPU flash SDPA kernel) turns a query row of NaN into zeros, while nn's need_weights=True
    path and the SDPA math backend give NaN; we compare with nn need_weights=False under the
    math backend (and with nn need_weights=True)."""
    ref, ours = _mha_pair()
    q, k, v, kwargs = _nan_inf_inputs(kind)
    snap = Snapshot(q, k, v, kwargs, ours)
    with torch.no_grad():
        if kind == "nan_in_query":
            with sdpa_kernel(SDPBackend.MATH):
                expected, _ = ref(q, k, v, need_weights=False, **kwargs)
            expected_w, _ = ref(q, k, v, need_weights=True, **kwargs)
            assert torch.equal(expected.isnan(), expected_w.isnan())
        else:
            expected, _ = ref(q, k, v, need_weights=False, **kwargs)
        if kind != "neg_inf_in_float_mask_row_partial":
            assert expected.isnan().any() or expected.isinf().any(), "precondition: non-finite"
        for need_weights in (False, True):
            got, _ = ours(q, k, v, need_weights=need_weights, **kwargs)
            snap.assert_unchanged()
            assert torch.equal(got.isnan(), expected.isnan()), (
                f"NaN positions differ (need_weights={need_weights}): ours "
                f"{got.isnan().nonzero().tolist()} vs nn {expected.isnan().nonzero().tolist()}"
            )
            assert torch.equal(got.isinf(), expected.isinf())
            finite = expected.isfinite()
            torch.testing.assert_close(got[finite], expected[finite], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Crash-prone cases, each in its own Python process (a signal would fail the test, not pytest)
# --------------------------------------------------------------------------------------------

_PRELUDE = """
import torch, torch_mha
from torch import nn
fw = torch.ops.torch_mha.attention_forward
bw = torch.ops.torch_mha.attention_backward
def snap(*ts):
    return [(t, t.detach().clone(), t.stride()) for t in ts]
def unchanged(s):
    for t, c, st in s:
        assert t.stride() == st
        a = t.detach().contiguous().reshape(-1); b = c.contiguous().reshape(-1)
        assert torch.equal(a.view(torch.uint8) if a.dtype != torch.bool else a,
                           b.view(torch.uint8) if b.dtype != torch.bool else b), "modified"
"""


@dataclass
class ProcCase:
    id: str
    code: str
    exc: Optional[str] = None  # expected exception name; None: must succeed and print CASE ok
    match: str = ""
    sub_ids: Tuple[str, ...] = ()  # success groups: several checks reported separately


ERROR_PROCS = [
    # The weights' numel L * S overflows int64 (2 * 2**62 = 2**63) while every other output is
    # tiny. (This case used L = S = 2**32: the output and the softmax_stats, (1, 1, 2**32, 2)
    # float32 = 32 GiB since logsumexp became softmax_stats, are allocated before the weights,
    # so on a machine with less memory the allocator failed before the overflow was reached.)
    ProcCase(
        "core_weights_numel_overflow_2_x_2e62",
        """
        q = torch.zeros(1, 1, 1, 1).expand(1, 1, 2, 1)
        k = torch.zeros(1, 1, 1, 1).expand(1, 1, 2**62, 1)
        fw(q, k, k, need_weights=True)
        """,
        "RuntimeError",
        r"overflow",
    ),
    ProcCase(
        "core_averaged_weights_numel_overflow_2_x_2e62",
        """
        q = torch.zeros(1, 1, 1, 1).expand(1, 1, 2, 1)
        k = torch.zeros(1, 1, 1, 1).expand(1, 1, 2**62, 1)
        fw(q, k, k, need_weights=True, average_weights=True)
        """,
        "RuntimeError",
        r"overflow",
    ),
    ProcCase(
        "core_output_numel_overflow",
        """
        q = torch.zeros(1, 1, 1, 1).expand(2**30, 1, 2**30, 1)
        v = torch.zeros(1, 1, 1, 1).expand(2**30, 1, 1, 2**30)
        fw(q, q[:, :, :1], v)
        """,
        "RuntimeError",
        r"overflow",
    ),
    ProcCase(
        "core_value_dim_2e60_allocation_fails",
        """
        q = torch.zeros(1, 1, 1, 1)
        v = torch.zeros(1, 1, 1, 1).expand(1, 1, 1, 2**60)
        fw(q, q, v)
        """,
        "RuntimeError",
        r"allocate",
    ),
    ProcCase(
        "module_huge_expanded_input",
        """
        m = torch_mha.MultiheadAttention(8, 2)
        q = torch.zeros(1, 1, 8).expand(2**28, 2**28, 8)
        m(q, q, q, need_weights=False)
        """,
        "RuntimeError",
        r"allocate|overflow",
    ),
    ProcCase(
        "op_negative_embed_dim",
        """
        q = torch.zeros(3, 2, 8); w = torch.zeros(24, 8); ow = torch.zeros(8, 8)
        torch.ops.torch_mha.multi_head_attention(q, q, q, -8, 2, w, None, None, None, False,
                                                 0.0, ow, None)
        """,
        "RuntimeError",
        r"embed_dim and num_heads must be greater than 0.*embed_dim=-8",
    ),
    ProcCase(
        "op_negative_num_heads",
        """
        q = torch.zeros(3, 2, 8); w = torch.zeros(24, 8); ow = torch.zeros(8, 8)
        torch.ops.torch_mha.multi_head_attention(q, q, q, 8, -2, w, None, None, None, False,
                                                 0.0, ow, None)
        """,
        "RuntimeError",
        r"embed_dim and num_heads must be greater than 0.*num_heads=-2",
    ),
    ProcCase(
        "op_zero_num_heads",
        """
        q = torch.zeros(3, 2, 8); w = torch.zeros(24, 8); ow = torch.zeros(8, 8)
        torch.ops.torch_mha.multi_head_attention(q, q, q, 8, 0, w, None, None, None, False,
                                                 0.0, ow, None)
        """,
        "RuntimeError",
        r"num_heads=0",
    ),
    ProcCase(
        "module_meta_weights_cpu_input",
        """
        q = torch.zeros(3, 2, 8)
        try:
            nn.MultiheadAttention(8, 2, device="meta")(q, q, q)
        except Exception as e:
            print("NN_RAISES", type(e).__name__)
        torch_mha.MultiheadAttention(8, 2, device="meta")(q, q, q)
        """,
        "RuntimeError",
        r"in_proj_weight on the same device as query \(cpu\).*meta",
    ),
]

# Averaging over zero heads in float32 / bfloat16 / float16 (float64 is in zero_size_dims_core):
# one process each, as the forward has died of SIGFPE there (an integer division by the number
# of heads averaged per work item, 0, in the CPU weights kernel).
ZERO_HEADS_AVERAGED_PROCS = [
    ProcCase(
        f"zero_heads_averaged_weights_{dtype}",
        f"""
        try:
            q = torch.randn(2, 0, 4, 8, dtype=torch.{dtype}, requires_grad=True)
            k = torch.randn(2, 0, 5, 8, dtype=torch.{dtype})
            v = torch.randn(2, 0, 5, 6, dtype=torch.{dtype})
            o, stats, w = fw(q, k, v, need_weights=True, average_weights=True)
            assert o.shape == (2, 0, 4, 6) and stats.shape == (2, 0, 4, 2)
            assert w.shape == (2, 4, 5) and torch.equal(w, torch.zeros_like(w))
            (o.sum() + w.sum()).backward()
            assert q.grad.shape == q.shape
            print("CASE forward_backward ok")
        except BaseException as e:
            print("CASE forward_backward FAIL", repr(e)[:300])
        """,
        sub_ids=("forward_backward",),
    )
    for dtype in ("float32", "bfloat16", "float16")
]

SUCCESS_PROCS = ZERO_HEADS_AVERAGED_PROCS + [
    ProcCase(
        "zero_size_dims_core",
        """
        def case(name, fn):
            try:
                fn(); print("CASE", name, "ok")
            except BaseException as e:
                print("CASE", name, "FAIL", repr(e)[:300])
        def head_dim_0():
            q = torch.zeros(2, 3, 4, 0); k = torch.zeros(2, 3, 5, 0); v = torch.randn(2, 3, 5, 6)
            s = snap(q, k, v)
            o, stats, w = fw(q, k, v, need_weights=True)
            unchanged(s)
            assert o.shape == (2, 3, 4, 6) and w.shape == (2, 3, 4, 5)
            torch.testing.assert_close(o, v.mean(2, keepdim=True).expand_as(o))
        def value_dim_0():
            q = torch.randn(2, 3, 4, 8); k = torch.randn(2, 3, 5, 8); v = torch.zeros(2, 3, 5, 0)
            o, stats, w = fw(q, k, v, need_weights=True)
            assert o.shape == (2, 3, 4, 0) and w.shape == (2, 3, 4, 5)
            assert torch.isfinite(w).all()
        def key_len_0():
            q = torch.randn(2, 3, 4, 8, requires_grad=True)
            k = torch.randn(2, 3, 0, 8, requires_grad=True)
            v = torch.randn(2, 3, 0, 6, requires_grad=True)
            o, stats, w = fw(q, k, v, need_weights=True)
            assert o.shape == (2, 3, 4, 6) and w.shape == (2, 3, 4, 0)
            assert torch.equal(o, torch.zeros_like(o))
            o.sum().backward()
            assert torch.equal(q.grad, torch.zeros_like(q)) and k.grad.shape == k.shape
        def query_len_0():
            q = torch.randn(2, 3, 0, 8, requires_grad=True); k = torch.randn(2, 3, 5, 8)
            v = torch.randn(2, 3, 5, 6, requires_grad=True)
            o, stats, w = fw(q, k, v, need_weights=True)
            assert o.shape == (2, 3, 0, 6) and stats.shape == (2, 3, 0, 2)
            o.sum().backward()
            assert torch.equal(v.grad, torch.zeros_like(v))
        def averaged_weights_empty():
            for shape_q, shape_kv in (((2, 3, 0, 8), (2, 3, 5, 8)), ((2, 3, 4, 8), (2, 3, 0, 8)),
                                      ((0, 3, 4, 8), (0, 3, 5, 8))):
                q = torch.randn(shape_q, requires_grad=True)
                k = torch.randn(shape_kv, requires_grad=True)
                o, stats, w = fw(q, k, k, need_weights=True, average_weights=True)
                assert w.shape == (shape_q[0], shape_q[2], shape_kv[2]), w.shape
                (o.sum() + w.sum()).backward()
                assert q.grad.shape == q.shape and k.grad.shape == k.shape
        def heads_0():
            q = torch.randn(2, 0, 4, 8); k = torch.randn(2, 0, 5, 8); v = torch.randn(2, 0, 5, 6)
            o, stats, w = fw(q, k, v, need_weights=True)
            assert o.shape == (2, 0, 4, 6) and w.shape == (2, 0, 4, 5)
            # Averaged over no heads: zeros (see zero_heads_averaged_weights_* for float32 etc.)
            o, stats, w = fw(q.double(), k.double(), v.double(), need_weights=True,
                             average_weights=True)
            assert w.shape == (2, 4, 5) and torch.equal(w, torch.zeros_like(w))
        def batch_0():
            q = torch.randn(0, 3, 4, 8, requires_grad=True); k = torch.randn(0, 3, 5, 8)
            v = torch.randn(0, 3, 5, 6)
            o, stats, w = fw(q, k, v, attn_mask=torch.zeros(4, 5), need_weights=True)
            assert o.shape == (0, 3, 4, 6)
            o.sum().backward()
            assert q.grad.shape == q.shape
        for fn in (head_dim_0, value_dim_0, key_len_0, query_len_0, heads_0, batch_0,
                   averaged_weights_empty):
            case(fn.__name__, fn)
        """,
        sub_ids=(
            "head_dim_0",
            "value_dim_0",
            "key_len_0",
            "query_len_0",
            "heads_0",
            "batch_0",
            "averaged_weights_empty",
        ),
    ),
    ProcCase(
        "empty_module_inputs",
        """
        torch.manual_seed(0)
        ref = nn.MultiheadAttention(8, 2)
        with torch.no_grad():
            ref.in_proj_bias.uniform_(-1, 1); ref.out_proj.bias.uniform_(-1, 1)
        ours = torch_mha.MultiheadAttention(8, 2); ours.load_state_dict(ref.state_dict())
        def check(name, lq, n, sk):
            try:
                for bf in (False, True):
                    ref.batch_first = ours.batch_first = bf
                    def mk(s):
                        if n is None:
                            return torch.randn(s, 8, requires_grad=True)
                        return torch.randn(*((n, s, 8) if bf else (s, n, 8)), requires_grad=True)
                    q, k, v = mk(lq), mk(sk), mk(sk)
                    for nw in (True, False):
                        s = snap(q, k, v)
                        o1, w1 = ours(q, k, v, need_weights=nw)
                        unchanged(s)
                        o2, w2 = ref(q, k, v, need_weights=nw)
                        assert o1.shape == o2.shape, (o1.shape, o2.shape)
                        assert (w1 is None) == (w2 is None)
                        if w1 is not None:
                            assert w1.shape == w2.shape, (w1.shape, w2.shape)
                        torch.testing.assert_close(o1, o2, atol=1e-5, rtol=1e-5)
                        g1 = torch.autograd.grad(o1.sum(), (q, k, v), allow_unused=True)
                        g2 = torch.autograd.grad(o2.sum(), (q, k, v), allow_unused=True)
                        for a, b in zip(g1, g2):
                            if a is not None and b is not None:
                                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
                print("CASE", name, "ok")
            except BaseException as e:
                print("CASE", name, "FAIL", repr(e)[:300])
        check("batch_0", 3, 0, 5)
        check("query_len_0", 0, 2, 5)
        check("key_len_0", 3, 2, 0)
        check("unbatched_query_len_0", 0, None, 5)
        check("unbatched_key_len_0", 3, None, 0)
        """,
        sub_ids=(
            "batch_0",
            "query_len_0",
            "key_len_0",
            "unbatched_query_len_0",
            "unbatched_key_len_0",
        ),
    ),
    ProcCase(
        "strides_meta_expanded",
        """
        def case(name, fn):
            try:
                fn(); print("CASE", name, "ok")
            except BaseException as e:
                print("CASE", name, "FAIL", repr(e)[:300])
        def core_noncontiguous_qkv():
            q = torch.randn(2, 3, 8, 4).transpose(-1, -2)
            k = torch.randn(2, 5, 3, 8).transpose(1, 2)
            v = torch.randn(6, 2, 3, 5)[::2].permute(1, 2, 3, 0)
            s = snap(q, k, v)
            a = fw(q, k, v, need_weights=True)
            unchanged(s)
            b = fw(q.contiguous(), k.contiguous(), v.contiguous(), need_weights=True)
            assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
        def core_noncontiguous_masks():
            q = torch.randn(2, 3, 4, 8); k = torch.randn(2, 3, 5, 8)
            m = torch.randn(5, 4).t(); m4 = torch.randn(3, 5, 2, 4).permute(2, 0, 3, 1)
            kpm = torch.zeros(5, 2, dtype=torch.bool).t(); kpm[:, 0] = True
            for kw in ({"attn_mask": m}, {"attn_mask": m4}, {"key_padding_mask": kpm},
                       {"attn_mask": torch.randn(5).expand(2, 3, 4, 5)}):
                s = snap(q, k, *kw.values())
                a = fw(q, k, k, need_weights=True, **kw)
                unchanged(s)
                b = fw(q, k, k, need_weights=True, **{n: t.contiguous() for n, t in kw.items()})
                assert torch.equal(a[0], b[0])
        def core_expanded_qkv_forward_backward():
            q0 = torch.randn(1, 1, 4, 8, requires_grad=True)
            k0 = torch.randn(1, 3, 1, 8, requires_grad=True)
            v0 = torch.randn(8, requires_grad=True)
            q, k, v = q0.expand(2, 3, 4, 8), k0.expand(2, 3, 5, 8), v0.expand(2, 3, 5, 8)
            s = snap(q, k, v)
            o, _, w = fw(q, k, v, need_weights=True)
            unchanged(s)
            qc, kc, vc = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
            oc, _, wc = fw(qc, kc, vc, need_weights=True)
            assert torch.equal(o, oc) and torch.equal(w, wc)
            go = torch.randn(1, 1, 1, 8).expand_as(o)
            o.backward(go); oc.backward(go.contiguous())
            torch.testing.assert_close(q0.grad, qc.grad.sum((0, 1), keepdim=True))
            torch.testing.assert_close(k0.grad, kc.grad.sum((0, 2), keepdim=True))
            torch.testing.assert_close(v0.grad, vc.grad.sum((0, 1, 2)))
        def module_expanded_inputs():
            torch.manual_seed(0)
            ref = nn.MultiheadAttention(8, 2)
            ours = torch_mha.MultiheadAttention(8, 2); ours.load_state_dict(ref.state_dict())
            x = torch.randn(1, 1, 8).expand(3, 2, 8)
            y = torch.randn(8).expand(5, 2, 8)
            z = torch.randn(5, 1, 8).expand(5, 2, 8)
            for q, k, v in ((x, x, x), (x, y, z), (x, y, y)):
                s = snap(q, k, v)
                o1, w1 = ours(q, k, v)
                unchanged(s)
                qc = q.contiguous(); kc = qc if k is q else k.contiguous()
                vc = kc if v is k else v.contiguous()
                o2, w2 = ours(qc, kc, vc)
                assert torch.equal(o1, o2) and torch.equal(w1, w2)
                o3, w3 = ref(q, k, v)
                torch.testing.assert_close(o1, o3, atol=1e-5, rtol=1e-5)
        def module_noncontiguous_inputs():
            torch.manual_seed(0)
            ours = torch_mha.MultiheadAttention(8, 2)
            q = torch.randn(2, 3, 8).transpose(0, 1)
            k = torch.randn(8, 5, 2).permute(1, 2, 0)
            v = torch.randn(5, 2, 16)[..., ::2]
            s = snap(q, k, v)
            o1, w1 = ours(q, k, v)
            unchanged(s)
            o2, w2 = ours(q.contiguous(), k.contiguous(), v.contiguous())
            torch.testing.assert_close(o1, o2, atol=1e-6, rtol=1e-6)
        def module_meta_device():
            torch.manual_seed(0)
            ref = nn.MultiheadAttention(8, 2, device="meta")
            ours = torch_mha.MultiheadAttention(8, 2, device="meta")
            q = torch.empty(3, 2, 8, device="meta", requires_grad=True)
            k = torch.empty(5, 2, 8, device="meta")
            for nw in (True, False):
                o1, w1 = ours(q, k, k, need_weights=nw)
                o2, w2 = ref(q, k, k, need_weights=nw)
                assert o1.device.type == "meta" and o1.shape == o2.shape
                assert (w1 is None) == (w2 is None)
                assert w1 is None or w1.shape == w2.shape
            o1.sum().backward()
            assert q.grad.shape == q.shape
        for fn in (core_noncontiguous_qkv, core_noncontiguous_masks,
                   core_expanded_qkv_forward_backward, module_expanded_inputs,
                   module_noncontiguous_inputs, module_meta_device):
            case(fn.__name__, fn)
        """,
        sub_ids=(
            "core_noncontiguous_qkv",
            "core_noncontiguous_masks",
            "core_expanded_qkv_forward_backward",
            "module_expanded_inputs",
            "module_noncontiguous_inputs",
            "module_meta_device",
        ),
    ),
]


def _run_proc(case: ProcCase):
    code = _PRELUDE + textwrap.dedent(case.code)
    env = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=240, env=env
    )


@functools.lru_cache(maxsize=None)
def _proc_results() -> Dict[str, subprocess.CompletedProcess]:
    """Starts every subprocess case at once (the first test that needs one pays for all)."""
    cases = ERROR_PROCS + SUCCESS_PROCS
    workers = max(2, min(len(cases), (os.cpu_count() or 2) + 1))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {c.id: pool.submit(_run_proc, c) for c in cases}
        return {name: f.result() for name, f in futures.items()}


def _describe(p: subprocess.CompletedProcess) -> str:
    return f"rc={p.returncode}\nstdout:\n{p.stdout[-2000:]}\nstderr:\n{p.stderr[-3000:]}"


@pytest.mark.parametrize("case", ERROR_PROCS, ids=[c.id for c in ERROR_PROCS])
def test_crash_prone_bad_input_raises_cleanly(case: ProcCase):
    p = _proc_results()[case.id]
    assert p.returncode >= 0, f"killed by signal {-p.returncode}\n{_describe(p)}"
    assert p.returncode == 1, f"expected a Python exception exit\n{_describe(p)}"
    # The final "ExceptionName: message" line of the traceback (the message may span lines).
    raised = list(re.finditer(r"^(\w+(?:Error|Exception|Interrupt|Exit)): (.*)$", p.stderr, re.M))
    assert raised, f"no exception on stderr\n{_describe(p)}"
    name, message = raised[-1].group(1), p.stderr[raised[-1].start(2) :]
    assert name == case.exc, f"expected {case.exc}, got {name}\n{_describe(p)}"
    assert re.search(case.match, message), f"message does not match {case.match!r}\n{message}"
    nn_raised = re.search(r"NN_RAISES (\w+)", p.stdout)
    if nn_raised:  # the case also ran nn.MultiheadAttention: same exception type
        assert nn_raised.group(1) == case.exc, f"nn raises {nn_raised.group(1)}"


_SUCCESS_SUB = [(c.id, s) for c in SUCCESS_PROCS for s in c.sub_ids]


@pytest.mark.parametrize("group,sub", _SUCCESS_SUB, ids=[f"{g}-{s}" for g, s in _SUCCESS_SUB])
def test_crash_prone_valid_input_runs_cleanly(group, sub):
    """Zero-size dims, empty module inputs (nn's shapes and values), non-contiguous and
    expanded (stride-0, overlapping) inputs equal to their contiguous copies, meta tensors.
    Several checks share one process; each is reported by its own test."""
    p = _proc_results()[group]
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(f"CASE {sub} ")]
    assert p.returncode >= 0, f"process killed by signal {-p.returncode}\n{_describe(p)}"
    assert lines, f"check {sub} did not run (the process died earlier?)\n{_describe(p)}"
    assert lines[0] == f"CASE {sub} ok", lines[0]
    assert p.returncode == 0, _describe(p)
