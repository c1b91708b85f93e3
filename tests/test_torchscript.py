"""TorchScript: torch.jit.script / torch.jit.trace / torch.jit.save / torch.jit.load.

What is checked (all in float64, so that "same result" can be asserted tightly):

* torch.jit.script of torch_mha.MultiheadAttention in many configurations, of
  torch_mha.functional.multi_head_attention_forward and of the core wrapper torch_mha.attention:
  outputs, attention weights and the gradients of every input (float masks included) and every
  parameter equal eager mode, and the inlined graph calls the torch_mha op.
* torch.jit.trace of the module and of a small model that uses both the module and the core op:
  the traced graph calls the torch_mha ops, and a trace taken at one batch size / sequence length
  runs correctly at others (the ops are single graph nodes whose shapes are not baked in).
* nn.TransformerEncoder whose layers' self_attn are torch_mha modules: scripted and traced, with
  a causal mask and a key padding mask, equal the eager model and the original torch.nn model.
* torch.jit.save, then torch.jit.load in a fresh Python process that has imported torch_mha:
  same outputs and gradients, and an SGD step on the loaded scripted model gives the parameters of
  the same step in eager mode. Without `import torch_mha`, torch.jit.load fails with PyTorch's
  "Unknown builtin op" error.
* gradcheck through the scripted module and the scripted functional (dropout included, with the
  seed fixed inside the checked function).

Tolerances: scripted / traced / loaded models run the very same C++ ops on the same inputs as
eager mode, and torch_mha's kernels are deterministic, so these agree to the last bit in
practice; SAME allows 1e-12 so that a harmless reassociation would not fail the suite. Against
torch.nn (a different algorithm), float64 agrees to ~1e-15 at these sizes; NN allows 1e-10.
"""

from __future__ import annotations

import concurrent.futures
import copy
import inspect
import math
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch
from torch import Tensor, nn

import torch_mha

pytestmark = [
    # torch 2.13 deprecates TorchScript (script, trace, save, ...) in favour of compile/export.
    pytest.mark.filterwarnings(r"ignore:`torch\.jit\.:DeprecationWarning"),
    # The argument checks in torch_mha/functional.py read sizes while tracing; they only raise
    # or pass, nothing of them enters the traced graph (the traces run at other shapes below).
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
]

DTYPE = torch.float64
SAME = dict(rtol=1e-12, atol=1e-12)  # same ops, same inputs: scripted/traced/loaded vs eager
NN = dict(rtol=1e-10, atol=1e-10)  # torch_mha vs torch.nn (different algorithm), float64

EMBED, HEADS, KDIM, VDIM = 8, 2, 6, 4
BATCH, Q_LEN, KV_LEN = 2, 5, 7

MHA_OP = "torch_mha::multi_head_attention"
CORE_OP = "torch_mha::attention_forward"


def randn(*shape: int) -> Tensor:
    return torch.randn(*shape, dtype=DTYPE)


def assert_same(actual: Any, expected: Any, what: str, tol: Dict[str, float] = SAME) -> None:
    """assert_close for tensors, None, and (nested) sequences / dicts of them."""
    if expected is None or actual is None:
        assert actual is None and expected is None, f"{what}: {actual!r} vs {expected!r}"
    elif isinstance(expected, dict):
        assert sorted(actual) == sorted(expected), f"{what}: keys {sorted(actual)}"
        for key in expected:
            assert_same(actual[key], expected[key], f"{what}[{key}]", tol)
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{what}: length {len(actual)} vs {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{what}[{i}]", tol)
    else:
        torch.testing.assert_close(actual, expected, msg=lambda m: f"{what}: {m}", **tol)


# ---------------------------------------------------------------------------------------------
# One forward + backward, shared by every comparison (and sent verbatim to the fresh process of
# the save/load tests, see run_case below): the loss contracts every tensor output with a fixed
# random cotangent, and the gradients of the differentiable inputs and of every parameter are
# returned by name.


@dataclass
class Result:
    outputs: List[Optional[Tensor]]
    input_grads: List[Tensor]
    param_grads: Dict[str, Tensor]

    def check_equal(self, expected: "Result", what: str, tol: Dict[str, float] = SAME) -> None:
        assert_same(self.outputs, expected.outputs, f"{what}: outputs", tol)
        assert_same(self.input_grads, expected.input_grads, f"{what}: input gradients", tol)
        assert_same(self.param_grads, expected.param_grads, f"{what}: parameter gradients", tol)


def forward_backward(
    fn: Callable[..., Any],
    args: Sequence[Any],
    grad_args: Sequence[int],
    params: Dict[str, Tensor],
    seed: int = 0,
) -> Result:
    """Runs fn(*args) from torch.manual_seed(seed) (dropout seeds come from the default
    generator), then the gradients of sum_i <output_i, cotangent_i> with respect to
    args[grad_args] and params. Cotangents are drawn after the forward from a fixed seed."""
    args = [
        a.detach().clone().requires_grad_(i in grad_args) if isinstance(a, Tensor) else a
        for i, a in enumerate(args)
    ]
    torch.manual_seed(seed)
    raw = fn(*args)
    outputs: List[Optional[Tensor]] = list(raw) if isinstance(raw, (tuple, list)) else [raw]
    generator = torch.Generator().manual_seed(1000 + seed)
    loss = torch.zeros((), dtype=DTYPE)
    for out in outputs:
        if out is not None:
            loss = loss + (out * torch.randn(out.shape, generator=generator, dtype=DTYPE)).sum()
    wrt = [args[i] for i in grad_args] + list(params.values())
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    assert all(g is not None for g in grads), "some input or parameter got no gradient"
    return Result(
        outputs=[None if o is None else o.detach() for o in outputs],
        input_grads=[g for g in grads[: len(grad_args)]],
        param_grads=dict(zip(params, grads[len(grad_args) :])),
    )


def module_params(module: nn.Module) -> Dict[str, Tensor]:
    return dict(module.named_parameters())


def run_module(module: nn.Module, args: Sequence[Any], grad_args: Sequence[int], seed: int = 0):
    return forward_backward(module, args, grad_args, module_params(module), seed)


def inlined_graph(scripted: Any) -> str:
    return str(scripted.inlined_graph)


# ---------------------------------------------------------------------------------------------
# 1. torch.jit.script of MultiheadAttention


@dataclass(frozen=True)
class MhaConfig:
    id: str
    batch_first: bool = False
    self_attention: bool = True  # query is key is value (the fused-projection path)
    kdim: Optional[int] = None
    vdim: Optional[int] = None
    bias: bool = True
    add_bias_kv: bool = False
    add_zero_attn: bool = False
    dropout: float = 0.0
    training: bool = False

    def make(self) -> torch_mha.MultiheadAttention:
        module = torch_mha.MultiheadAttention(
            EMBED,
            HEADS,
            dropout=self.dropout,
            bias=self.bias,
            add_bias_kv=self.add_bias_kv,
            add_zero_attn=self.add_zero_attn,
            kdim=self.kdim,
            vdim=self.vdim,
            batch_first=self.batch_first,
            dtype=DTYPE,
        )
        if self.bias:  # the default initialisation leaves the biases at zero
            with torch.no_grad():
                module.in_proj_bias.normal_()
                module.out_proj.bias.normal_()
        return module.train(self.training)


MHA_CONFIGS = [
    MhaConfig("seq_first_self"),
    MhaConfig("batch_first_self", batch_first=True),
    MhaConfig("batch_first_cross", batch_first=True, self_attention=False),
    MhaConfig("kdim_vdim", self_attention=False, kdim=KDIM, vdim=VDIM),
    MhaConfig("no_bias", batch_first=True, self_attention=False, bias=False),
    MhaConfig("bias_kv", add_bias_kv=True),
    MhaConfig("zero_attn", batch_first=True, add_zero_attn=True),
    MhaConfig(
        "bias_kv_zero_attn_cross", self_attention=False, add_bias_kv=True, add_zero_attn=True
    ),
    MhaConfig("dropout_train", batch_first=True, dropout=0.3, training=True),
    MhaConfig("dropout_train_cross", self_attention=False, dropout=0.3, training=True),
    MhaConfig("dropout_eval", dropout=0.3, training=False),
]


@dataclass(frozen=True)
class CallConfig:
    id: str
    masks: str  # "none", "bool" (padding + banded attn_mask), "float" (additive, 3-D), "causal"
    need_weights: bool
    average_attn_weights: bool = True


CALLS = [
    CallConfig("weights_avg_bool_masks", "bool", need_weights=True),
    CallConfig("weights_per_head_float_masks", "float", True, average_attn_weights=False),
    CallConfig("no_weights_causal", "causal", need_weights=False),
    CallConfig("weights_avg_no_mask", "none", need_weights=True),
]


def mha_inputs(
    cfg: MhaConfig, call: CallConfig, batch: int = BATCH, q_len: int = Q_LEN, kv_len: int = KV_LEN
) -> Tuple[List[Any], List[int]]:
    """Positional arguments of MultiheadAttention.forward and the indices that get gradients.

    Masks never hide every key of a query (key 0 is always visible), so no row is degenerate.
    """
    if cfg.self_attention:
        kv_len = q_len
    seq_first = not cfg.batch_first

    def seq(length: int, dim: int) -> Tensor:
        return randn(length, batch, dim) if seq_first else randn(batch, length, dim)

    query = seq(q_len, EMBED)
    if cfg.self_attention:
        key = value = query
    else:
        key, value = seq(kv_len, cfg.kdim or EMBED), seq(kv_len, cfg.vdim or EMBED)
    padding: Optional[Tensor] = None
    attn_mask: Optional[Tensor] = None
    is_causal = False
    if call.masks == "bool":
        padding = torch.zeros(batch, kv_len, dtype=torch.bool)
        padding[-1, kv_len - 2 :] = True
        rows = torch.arange(q_len).unsqueeze(1)
        attn_mask = torch.arange(kv_len).unsqueeze(0) > rows + 1  # banded
    elif call.masks == "float":
        padding = torch.zeros(batch, kv_len, dtype=DTYPE)
        padding[-1, kv_len - 2 :] = -math.inf
        attn_mask = randn(batch * HEADS, q_len, kv_len)  # a learned additive bias
    elif call.masks == "causal":
        attn_mask = torch.ones(q_len, kv_len, dtype=torch.bool).triu(1)
        is_causal = True
    args = [
        query,
        key,
        value,
        padding,
        call.need_weights,
        attn_mask,
        call.average_attn_weights,
        is_causal,
    ]
    grad_args = [0] if cfg.self_attention else [0, 1, 2]
    if attn_mask is not None and attn_mask.is_floating_point():
        grad_args.append(5)  # float masks get gradients
    return args, grad_args


def self_attention_fn(module: Callable[..., Any]) -> Callable[..., Any]:
    """For self-attention the same tensor must reach query, key and value (as in a model)."""

    def fn(query: Tensor, key: Tensor, value: Tensor, *rest: Any) -> Any:
        return module(query, query, query, *rest)

    return fn


@pytest.mark.parametrize("call", CALLS, ids=lambda c: c.id)
@pytest.mark.parametrize("cfg", MHA_CONFIGS, ids=lambda c: c.id)
def test_script_module_matches_eager(cfg: MhaConfig, call: CallConfig) -> None:
    torch.manual_seed(1)
    module = cfg.make()
    scripted = torch.jit.script(module)
    assert MHA_OP in inlined_graph(scripted)

    args, grad_args = mha_inputs(cfg, call)
    eager_fn, script_fn = module, scripted
    if cfg.self_attention:
        eager_fn, script_fn = self_attention_fn(module), self_attention_fn(scripted)
    params = module_params(module)
    assert list(module_params(scripted)) == list(params)
    expected = forward_backward(eager_fn, args, grad_args, params)
    actual = forward_backward(script_fn, args, grad_args, module_params(scripted))
    actual.check_equal(expected, f"scripted {cfg.id}/{call.id}")
    assert (actual.outputs[1] is None) == (not call.need_weights)

    if cfg.training and cfg.dropout > 0:
        # Dropout really is on (another seed gives another result), in both modes alike.
        other = forward_backward(script_fn, args, grad_args, module_params(scripted), seed=7)
        assert not torch.equal(other.outputs[0], actual.outputs[0])
        other.check_equal(forward_backward(eager_fn, args, grad_args, params, seed=7), "seed 7")


def test_script_module_unbatched_and_train_eval_switch() -> None:
    """Unbatched (L, E) input, and module.eval() on the scripted module turns dropout off."""
    module = MhaConfig("dropout", dropout=0.5, training=True).make()
    scripted = torch.jit.script(module)
    x = randn(Q_LEN, EMBED)
    args, grad_args = [x, x, x], [0, 1, 2]
    params, script_params = module_params(module), module_params(scripted)
    forward_backward(scripted, args, grad_args, script_params).check_equal(
        forward_backward(module, args, grad_args, params), "unbatched, train"
    )
    scripted.eval()
    module.eval()
    evaluated = forward_backward(scripted, args, grad_args, script_params, seed=3)
    evaluated.check_equal(forward_backward(module, args, grad_args, params, seed=3), "eval")
    # No dropout in eval: the default generator's state does not matter.
    other_seed = forward_backward(scripted, args, grad_args, script_params, seed=5)
    assert_same(other_seed.outputs, evaluated.outputs, "eval, another seed")
    assert evaluated.outputs[0].shape == (Q_LEN, EMBED)


# ---------------------------------------------------------------------------------------------
# 2. torch.jit.script of the functional interface and of the core op wrapper


def test_script_multi_head_attention_forward_matches_eager() -> None:
    scripted = torch.jit.script(torch_mha.functional.multi_head_attention_forward)
    assert MHA_OP in inlined_graph(scripted)
    torch.manual_seed(2)
    packed = MhaConfig("packed", batch_first=True).make()
    separate = MhaConfig("separate", self_attention=False, kdim=KDIM, vdim=VDIM).make()
    head_dim = EMBED // HEADS

    def packed_call(fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor, *p: Tensor):
            in_w, in_b, out_w, out_b = p
            return fn(
                query,
                key,
                value,
                EMBED,
                HEADS,
                in_w,
                in_b,
                None,
                None,
                False,
                0.2,
                out_w,
                out_b,
                training=True,
                need_weights=True,
                attn_mask=attn_mask,
                average_attn_weights=False,
                batch_first=True,
            )

        return call

    def separate_call(fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(query: Tensor, key: Tensor, value: Tensor, padding: Tensor, *p: Tensor):
            q_w, k_w, v_w, in_b, out_w, out_b = p
            return fn(
                query,
                key,
                value,
                EMBED,
                HEADS,
                None,
                in_b,
                None,
                None,
                True,
                0.0,
                out_w,
                out_b,
                training=False,
                key_padding_mask=padding,
                need_weights=True,
                use_separate_proj_weight=True,
                q_proj_weight=q_w,
                k_proj_weight=k_w,
                v_proj_weight=v_w,
            )

        return call

    def static_kv_call(fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(query: Tensor, static_k: Tensor, static_v: Tensor, *p: Tensor):
            in_w, in_b, out_w, out_b = p
            return fn(
                query,
                query,
                query,
                EMBED,
                HEADS,
                in_w,
                in_b,
                None,
                None,
                False,
                0.0,
                out_w,
                out_b,
                training=False,
                need_weights=False,
                static_k=static_k,
                static_v=static_v,
            )

        return call

    packed_params = [packed.in_proj_weight, packed.in_proj_bias] + list(
        packed.out_proj.parameters()
    )
    separate_params = [
        separate.q_proj_weight,
        separate.k_proj_weight,
        separate.v_proj_weight,
        separate.in_proj_bias,
    ] + list(separate.out_proj.parameters())
    padding = torch.zeros(BATCH, KV_LEN, dtype=torch.bool)
    padding[0, -3:] = True
    cases = [
        (  # packed cross-attention with dropout in training, per-head weights, float mask
            packed_call,
            [randn(BATCH, Q_LEN, EMBED), randn(BATCH, KV_LEN, EMBED), randn(BATCH, KV_LEN, EMBED)]
            + [randn(Q_LEN, KV_LEN)]
            + packed_params,
        ),
        (  # separate projections, add_zero_attn, key padding mask
            separate_call,
            [randn(Q_LEN, BATCH, EMBED), randn(KV_LEN, BATCH, KDIM), randn(KV_LEN, BATCH, VDIM)]
            + [padding]
            + separate_params,
        ),
        (  # static keys and values (per-head tensors given by the caller)
            static_kv_call,
            [randn(Q_LEN, BATCH, EMBED)]
            + [randn(BATCH * HEADS, KV_LEN, head_dim), randn(BATCH * HEADS, KV_LEN, head_dim)]
            + packed_params,
        ),
    ]
    for i, (wrap, args) in enumerate(cases):
        grad_args = [j for j, a in enumerate(args) if a.is_floating_point()]
        expected = forward_backward(
            wrap(torch_mha.multi_head_attention_forward), args, grad_args, {}
        )
        actual = forward_backward(wrap(scripted), args, grad_args, {})
        actual.check_equal(expected, f"scripted functional, case {i}")


@dataclass(frozen=True)
class CoreCall:
    id: str
    attn_mask: str = "none"  # "none", "float" (broadcast (1, H, L, S), differentiable), "bool"
    padding: bool = False
    is_causal: bool = False
    scale: Optional[float] = None
    dropout_p: float = 0.0
    need_weights: bool = False
    average_weights: bool = False


CORE_CALLS = [
    CoreCall("plain"),
    CoreCall("float_mask_padding_weights", "float", padding=True, need_weights=True),
    CoreCall("bool_mask_avg_weights", "bool", need_weights=True, average_weights=True),
    CoreCall("causal_scale", is_causal=True, scale=0.3),
    CoreCall("dropout_weights", "float", dropout_p=0.4, need_weights=True),
]


def core_inputs(call: CoreCall, q_len: int = Q_LEN, kv_len: int = KV_LEN) -> List[Any]:
    head_dim = EMBED // HEADS
    q = randn(BATCH, HEADS, q_len, head_dim)
    k = randn(BATCH, HEADS, kv_len, head_dim)
    v = randn(BATCH, HEADS, kv_len, head_dim + 1)
    attn_mask: Optional[Tensor] = None
    if call.attn_mask == "float":
        attn_mask = randn(1, HEADS, q_len, kv_len)
    elif call.attn_mask == "bool":
        attn_mask = torch.rand(q_len, kv_len) < 0.3
        attn_mask[:, 0] = False
    padding: Optional[Tensor] = None
    if call.padding:
        padding = torch.zeros(BATCH, kv_len, dtype=torch.bool)
        padding[1, 1:3] = True
    return [
        q,
        k,
        v,
        attn_mask,
        padding,
        call.is_causal,
        call.scale,
        call.dropout_p,
        call.need_weights,
        call.average_weights,
    ]


def core_grad_args(args: Sequence[Any]) -> List[int]:
    return [i for i in range(4) if isinstance(args[i], Tensor) and args[i].is_floating_point()]


def test_core_attention_is_the_functional_one() -> None:
    assert torch_mha.attention is torch_mha.functional.attention


@pytest.mark.parametrize("call", CORE_CALLS, ids=lambda c: c.id)
@pytest.mark.parametrize("target", ["torch_mha.attention", "torch_mha.functional.attention"])
def test_script_core_attention_matches_eager(target: str, call: CoreCall) -> None:
    fn = torch_mha.attention if target == "torch_mha.attention" else torch_mha.functional.attention
    scripted = torch.jit.script(fn)
    assert CORE_OP in inlined_graph(scripted)
    args = core_inputs(call)
    grad_args = core_grad_args(args)
    expected = forward_backward(fn, args, grad_args, {})
    actual = forward_backward(scripted, args, grad_args, {})
    actual.check_equal(expected, f"scripted {target} {call.id}")
    assert (actual.outputs[1] is None) == (not call.need_weights)


# ---------------------------------------------------------------------------------------------
# 3. torch.jit.trace


class MaskedAttention(nn.Module):
    """Cross-attention with masks and per-head weights, all positional (for tracing)."""

    def __init__(self, mha: nn.Module) -> None:
        super().__init__()
        self.mha = mha

    def forward(self, query: Tensor, key: Tensor, value: Tensor, padding: Tensor, mask: Tensor):
        return self.mha(
            query,
            key,
            value,
            key_padding_mask=padding,
            attn_mask=mask,
            need_weights=True,
            average_attn_weights=False,
        )


def masked_attention_inputs(batch: int, q_len: int, kv_len: int) -> List[Tensor]:
    padding = torch.zeros(batch, kv_len, dtype=torch.bool)
    padding[-1, -1] = True
    mask = torch.zeros(q_len, kv_len, dtype=torch.bool)
    mask[:, -2] = True
    return [
        randn(batch, q_len, EMBED),
        randn(batch, kv_len, KDIM),
        randn(batch, kv_len, VDIM),
        padding,
        mask,
    ]


def test_trace_module_runs_at_other_shapes() -> None:
    """A trace at (N, L, S) = (2, 5, 7) gives eager's results at (3, 9, 4) and (1, 3, 11):
    the op's shapes are not baked into the traced graph."""
    torch.manual_seed(3)
    module = MaskedAttention(
        MhaConfig("traced", batch_first=True, self_attention=False, kdim=KDIM, vdim=VDIM).make()
    )
    traced = torch.jit.trace(module, tuple(masked_attention_inputs(BATCH, Q_LEN, KV_LEN)))
    assert MHA_OP in inlined_graph(traced)
    for batch, q_len, kv_len in [(BATCH, Q_LEN, KV_LEN), (3, 9, 4), (1, 3, 11)]:
        args = masked_attention_inputs(batch, q_len, kv_len)
        params = module_params(module)
        actual = forward_backward(traced, args, [0, 1, 2], module_params(traced))
        actual.check_equal(forward_backward(module, args, [0, 1, 2], params), f"{q_len}x{kv_len}")
        assert actual.outputs[1].shape == (batch, HEADS, q_len, kv_len)


def test_trace_bare_module_with_default_arguments() -> None:
    """torch.jit.trace(mha, (q, k, v)) records need_weights=True (the default) as a constant."""
    torch.manual_seed(4)
    mha = MhaConfig("bare", self_attention=False).make()
    example = (randn(Q_LEN, BATCH, EMBED), randn(KV_LEN, BATCH, EMBED), randn(KV_LEN, BATCH, EMBED))
    traced = torch.jit.trace(mha, example)
    assert MHA_OP in inlined_graph(traced)
    args = [randn(8, 3, EMBED), randn(6, 3, EMBED), randn(6, 3, EMBED)]
    actual = forward_backward(traced, args, [0, 1, 2], module_params(traced))
    actual.check_equal(forward_backward(mha, args, [0, 1, 2], module_params(mha)), "bare trace")
    assert actual.outputs[1].shape == (3, 8, 6)


class SmallModel(nn.Module):
    """Embedding projection -> torch_mha self-attention (module) -> a per-head torch_mha.attention
    branch (core op) -> output projection. Head split and merge use the input's sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, EMBED, dtype=DTYPE)
        self.mha = torch_mha.MultiheadAttention(EMBED, HEADS, batch_first=True, dtype=DTYPE)
        self.out = nn.Linear(EMBED, 2, dtype=DTYPE)
        self.heads = HEADS
        self.head_dim = EMBED // HEADS

    def forward(self, x: Tensor, padding: Tensor) -> Tensor:
        h = self.inp(x)
        a, _ = self.mha(h, h, h, key_padding_mask=padding, need_weights=False)
        h = h + a
        batch, length = h.shape[0], h.shape[1]
        heads = h.view(batch, length, self.heads, self.head_dim).transpose(1, 2)
        core, _ = torch_mha.attention(heads, heads, heads, is_causal=True)
        h = h + core.transpose(1, 2).reshape(batch, length, self.heads * self.head_dim)
        return self.out(h)


def small_model_inputs(batch: int, length: int) -> List[Tensor]:
    padding = torch.zeros(batch, length, dtype=torch.bool)
    padding[0, -1] = True
    return [randn(batch, length, 3), padding]


def test_trace_small_model_runs_at_other_shapes() -> None:
    torch.manual_seed(5)
    model = SmallModel()
    traced = torch.jit.trace(model, tuple(small_model_inputs(BATCH, Q_LEN)))
    graph = inlined_graph(traced)
    assert MHA_OP in graph and CORE_OP in graph
    scripted = torch.jit.script(model)
    assert MHA_OP in inlined_graph(scripted) and CORE_OP in inlined_graph(scripted)
    for batch, length in [(BATCH, Q_LEN), (4, 11)]:
        args = small_model_inputs(batch, length)
        expected = run_module(model, args, [0])
        run_module(traced, args, [0]).check_equal(expected, f"traced at {batch}x{length}")
        run_module(scripted, args, [0]).check_equal(expected, f"scripted at {batch}x{length}")


# ---------------------------------------------------------------------------------------------
# 4. nn.TransformerEncoder with torch_mha self-attention


class MaskedEncoder(nn.Module):
    """nn.TransformerEncoder called with a causal mask and a key padding mask (positional)."""

    def __init__(self, encoder: nn.TransformerEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, src: Tensor, mask: Tensor, padding: Tensor) -> Tensor:
        return self.encoder(src, mask=mask, src_key_padding_mask=padding, is_causal=True)


def nn_encoder() -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        EMBED, HEADS, dim_feedforward=16, dropout=0.0, batch_first=True, dtype=DTYPE
    )
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    with torch.no_grad():  # non-zero attention biases, so that their gradients mean something
        for lyr in encoder.layers:
            lyr.self_attn.in_proj_bias.normal_()
            lyr.self_attn.out_proj.bias.normal_()
    return encoder


def with_torch_mha(encoder: nn.TransformerEncoder) -> nn.TransformerEncoder:
    """A copy of encoder whose layers' self_attn are torch_mha modules with the same weights."""
    ours = copy.deepcopy(encoder)
    for lyr in ours.layers:
        attn = torch_mha.MultiheadAttention(EMBED, HEADS, batch_first=True, dtype=DTYPE)
        attn.load_state_dict(lyr.self_attn.state_dict())
        lyr.self_attn = attn
    return ours


def encoder_inputs(batch: int, length: int) -> List[Tensor]:
    # Float padding mask, like the float causal mask (torch warns about mixed mask types).
    padding = torch.zeros(batch, length, dtype=DTYPE)
    padding[-1, length - 2 :] = -math.inf
    causal = nn.Transformer.generate_square_subsequent_mask(length, dtype=DTYPE)
    return [randn(batch, length, EMBED), causal, padding]


def test_transformer_encoder_script_and_trace() -> None:
    torch.manual_seed(6)
    reference = MaskedEncoder(nn_encoder())  # torch.nn.MultiheadAttention inside
    model = MaskedEncoder(with_torch_mha(reference.encoder))
    assert all(
        isinstance(lyr.self_attn, torch_mha.MultiheadAttention) for lyr in model.encoder.layers
    )

    scripted = torch.jit.script(model)
    assert inlined_graph(scripted).count(MHA_OP) >= 1
    scripted_encoder = torch.jit.script(model.encoder)  # the encoder itself, called with kwargs
    assert MHA_OP in inlined_graph(scripted_encoder)
    traced = torch.jit.trace(model, tuple(encoder_inputs(BATCH, Q_LEN)))
    assert inlined_graph(traced).count(MHA_OP) == 2  # one node per layer

    def call_scripted_encoder(src: Tensor, mask: Tensor, padding: Tensor) -> Tensor:
        return scripted_encoder(src, mask=mask, src_key_padding_mask=padding, is_causal=True)

    for batch, length in [(BATCH, Q_LEN), (3, 8)]:
        args = encoder_inputs(batch, length)
        expected = run_module(model, args, [0])
        run_module(reference, args, [0]).check_equal(expected, f"torch.nn at {length}", NN)
        run_module(scripted, args, [0]).check_equal(expected, f"scripted at {length}")
        run_module(traced, args, [0]).check_equal(expected, f"traced at {length}")
        encoder_params = {f"encoder.{k}": v for k, v in module_params(scripted_encoder).items()}
        kwargs_result = forward_backward(call_scripted_encoder, args, [0], encoder_params)
        kwargs_result.check_equal(expected, f"scripted encoder at {length}")


# ---------------------------------------------------------------------------------------------
# 5, 6. torch.jit.save, then torch.jit.load in a fresh process

# The fresh process runs this function's source (it only needs torch): the same procedure as
# forward_backward above, but self-contained, plus one SGD step for the training case.


def run_case(model: Any, case: Dict[str, Any]) -> Dict[str, Any]:
    args = [
        a.detach().clone().requires_grad_(i in case["grad_args"])
        if isinstance(a, torch.Tensor)
        else a
        for i, a in enumerate(case["args"])
    ]
    names = [name for name, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    optimizer = torch.optim.SGD(params, lr=0.1) if case["sgd_step"] else None
    torch.manual_seed(case["seed"])
    raw = model(*args)
    outputs = list(raw) if isinstance(raw, (tuple, list)) else [raw]
    loss = sum((o * c).sum() for o, c in zip(outputs, case["cotangents"]) if o is not None)
    wrt = [args[i] for i in case["grad_args"]] + params
    grads = torch.autograd.grad(loss, wrt)
    result: Dict[str, Any] = {
        "outputs": [None if o is None else o.detach() for o in outputs],
        "input_grads": list(grads[: len(case["grad_args"])]),
        "param_grads": dict(zip(names, grads[len(case["grad_args"]) :])),
    }
    if optimizer is not None:
        for p, g in zip(params, grads[len(case["grad_args"]) :]):
            p.grad = g
        optimizer.step()
        result["params_after_step"] = {n: p.detach().clone() for n, p in zip(names, params)}
    return result


_LOADER = (
    "import sys\n"
    "from typing import Any, Dict\n"
    "import torch\n"
    "import torch_mha  # registers the torch_mha ops (and their C++ autograd) with PyTorch\n"
    + inspect.getsource(run_case)
    + textwrap.dedent(
        """
        for case in torch.load(sys.argv[1]):
            model = torch.jit.load(case["path"])
            torch.save(run_case(model, case), case["result"])
        print("loaded and ran", flush=True)
        """
    )
)
_LOAD_WITHOUT_IMPORT = "import sys\nimport torch\ntorch.jit.load(sys.argv[1])\n"


def run_python(code: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300
    )


def describe(proc: subprocess.CompletedProcess) -> str:
    return f"rc={proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}"


@dataclass
class SavedCase:
    name: str
    eager: nn.Module  # the model that was saved, in eager mode
    case: Dict[str, Any]


@dataclass
class SaveLoadRun:
    cases: List[SavedCase]
    with_import: subprocess.CompletedProcess
    without_import: Dict[str, subprocess.CompletedProcess]


def cotangents_for(model: nn.Module, args: Sequence[Any], seed: int) -> List[Optional[Tensor]]:
    torch.manual_seed(seed)
    with torch.no_grad():
        raw = model(*args)
    outputs = list(raw) if isinstance(raw, (tuple, list)) else [raw]
    return [None if o is None else torch.randn_like(o) for o in outputs]


SAVED_MHA = MhaConfig(
    "saved",
    batch_first=True,
    self_attention=False,
    kdim=KDIM,
    vdim=VDIM,
    add_bias_kv=True,
    dropout=0.25,
    training=True,
)


@pytest.fixture(scope="module")
def save_load_run(tmp_path_factory: pytest.TempPathFactory) -> SaveLoadRun:
    """Saves a scripted module (cross-attention, kdim/vdim, bias_kv, dropout in training), a
    scripted TransformerEncoder model (with an SGD step) and a traced module; then runs the
    loader with `import torch_mha` and, for each file, a loader without it, all in parallel."""
    root = tmp_path_factory.mktemp("torchscript_save_load")
    torch.manual_seed(8)
    mha = SAVED_MHA.make()
    mha_args, mha_grad_args = mha_inputs(SAVED_MHA, CALLS[1])  # per-head weights, float masks
    encoder = MaskedEncoder(with_torch_mha(nn_encoder()))
    encoder_args = encoder_inputs(BATCH, Q_LEN)
    traced_module = MaskedAttention(
        MhaConfig("traced", batch_first=True, self_attention=False, kdim=KDIM, vdim=VDIM).make()
    )
    traced_args = masked_attention_inputs(BATCH, Q_LEN, KV_LEN)
    saved = [
        ("scripted_mha", mha, torch.jit.script(mha), mha_args, mha_grad_args, False),
        ("scripted_encoder", encoder, torch.jit.script(encoder), encoder_args, [0], True),
        (
            "traced_mha",
            traced_module,
            torch.jit.trace(traced_module, tuple(traced_args)),
            # another batch size and other lengths than the trace's
            masked_attention_inputs(3, 4, 9),
            [0, 1, 2],
            False,
        ),
    ]
    cases: List[SavedCase] = []
    for seed, (name, eager, jit_model, args, grad_args, sgd_step) in enumerate(saved, start=20):
        path = root / f"{name}.pt"
        torch.jit.save(jit_model, str(path))
        case = {
            "path": str(path),
            "result": str(root / f"{name}.result.pt"),
            "args": list(args),
            "grad_args": list(grad_args),
            "cotangents": cotangents_for(eager, args, seed),
            "seed": seed,
            "sgd_step": sgd_step,
        }
        cases.append(SavedCase(name, eager, case))
    spec = root / "cases.pt"
    torch.save([c.case for c in cases], spec)

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(cases) + 1) as pool:
        with_import = pool.submit(run_python, _LOADER, str(spec))
        without = {
            c.name: pool.submit(run_python, _LOAD_WITHOUT_IMPORT, c.case["path"]) for c in cases
        }
        return SaveLoadRun(cases, with_import.result(), {k: f.result() for k, f in without.items()})


SAVED_NAMES = ["scripted_mha", "scripted_encoder", "traced_mha"]


@pytest.mark.parametrize("name", SAVED_NAMES)
def test_load_in_fresh_process_matches_eager(save_load_run: SaveLoadRun, name: str) -> None:
    proc = save_load_run.with_import
    assert proc.returncode == 0, describe(proc)
    (saved,) = [c for c in save_load_run.cases if c.name == name]
    loaded = torch.load(saved.case["result"])
    eager = copy.deepcopy(saved.eager)  # run_case's SGD step must not move the fixture's model
    expected = run_case(eager, saved.case)
    assert_same(loaded["outputs"], expected["outputs"], f"{name}: outputs")
    assert_same(loaded["input_grads"], expected["input_grads"], f"{name}: input gradients")
    assert_same(loaded["param_grads"], expected["param_grads"], f"{name}: parameter gradients")
    assert len(loaded["param_grads"]) == len(list(saved.eager.parameters()))
    if saved.case["sgd_step"]:
        # The same SGD step in eager mode.
        assert_same(loaded["params_after_step"], expected["params_after_step"], f"{name}: SGD")
        before = dict(saved.eager.named_parameters())
        moved = [n for n, p in loaded["params_after_step"].items() if not torch.equal(p, before[n])]
        assert len(moved) == len(before), "every parameter should move in one SGD step"


@pytest.mark.parametrize("name", SAVED_NAMES)
def test_load_without_import_fails_with_unknown_builtin_op(
    save_load_run: SaveLoadRun, name: str
) -> None:
    proc = save_load_run.without_import[name]
    assert proc.returncode > 0, (
        f"expected a Python exception, not a signal or success\n{describe(proc)}"
    )
    assert "RuntimeError" in proc.stderr, describe(proc)
    assert "Unknown builtin op: torch_mha::" in proc.stderr, describe(proc)


# ---------------------------------------------------------------------------------------------
# 7. gradcheck through TorchScript


def test_gradcheck_scripted_functional() -> None:
    """Tiny float64 problem; queries, keys, values, a float mask and every weight; with dropout
    (the seed is fixed inside the checked function, so every evaluation draws the same mask)."""
    scripted = torch.jit.script(torch_mha.functional.multi_head_attention_forward)
    embed, heads, batch, q_len, kv_len = 4, 2, 2, 3, 4
    torch.manual_seed(9)
    inputs = (
        randn(q_len, batch, embed),
        randn(kv_len, batch, embed),
        randn(kv_len, batch, embed),
        randn(q_len, kv_len),  # additive attn_mask
        randn(3 * embed, embed),
        randn(3 * embed),
        randn(embed, embed),
        randn(embed),
    )
    inputs = tuple(t.requires_grad_() for t in inputs)

    for dropout_p in (0.0, 0.3):

        def fn(q, k, v, mask, in_w, in_b, out_w, out_b):
            torch.manual_seed(0)
            return scripted(
                q,
                k,
                v,
                embed,
                heads,
                in_w,
                in_b,
                None,
                None,
                False,
                dropout_p,
                out_w,
                out_b,
                training=True,
                need_weights=True,
                attn_mask=mask,
                average_attn_weights=False,
            )

        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradcheck_scripted_module() -> None:
    """The scripted module itself, with respect to its inputs, with bias_kv and zero_attn."""
    torch.manual_seed(10)
    module = torch_mha.MultiheadAttention(
        4, 2, add_bias_kv=True, add_zero_attn=True, kdim=3, vdim=5, dtype=DTYPE
    )
    scripted = torch.jit.script(module)
    padding = torch.tensor([[False, False, True, False], [False, True, False, False]])
    inputs = (randn(3, 2, 4), randn(4, 2, 3), randn(4, 2, 5))
    inputs = tuple(t.requires_grad_() for t in inputs)

    def fn(q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        return scripted(q, k, v, key_padding_mask=padding, average_attn_weights=False)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)
