"""The attention variants in every mode: TorchScript (script, trace, save and load),
torch.compile(fullgraph=True) with static and dynamic shapes, torch.export; each against the same
call in eager mode, forward and backward. (The C++ API is exercised by tests/cpp/test_api.cpp.)"""

from __future__ import annotations

import io
from typing import List, Optional, Tuple

import pytest
import torch
from attention_testing import randn
from torch import Tensor, nn

import torch_mha


class GroupedWindowedAttention(nn.Module):
    """Grouped-query heads, a causal sliding window, ALiBi, softcap and learnable sinks."""

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.sinks = nn.Parameter(torch.randn(heads))
        self.register_buffer("slopes", torch.rand(heads) * 0.2)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out, _ = torch_mha.attention(
            q, k, v, window_size=(9, 0), alibi_slopes=self.slopes, softcap=4.0, sinks=self.sinks
        )
        return out


class PackedAttention(nn.Module):
    def forward(self, q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor) -> Tensor:
        return torch_mha.varlen_attention(q, k, v, cu_q, cu_k, 20, 24, is_causal=True, softcap=3.0)


def dense_inputs(length: int = 33) -> List[Tensor]:
    """Fresh leaves with the same values on every call (for a given length)."""
    torch.manual_seed(length)
    return [
        randn(2, 4, length, 8, dtype=torch.float32, requires_grad=True),
        randn(2, 2, length + 5, 8, dtype=torch.float32, requires_grad=True),
        randn(2, 2, length + 5, 8, dtype=torch.float32, requires_grad=True),
    ]


def packed_inputs() -> List[Tensor]:
    torch.manual_seed(7)
    lq, lk = [7, 20, 3], [9, 24, 1]
    return [
        randn(sum(lq), 4, 8, dtype=torch.float32, requires_grad=True),
        randn(sum(lk), 2, 8, dtype=torch.float32, requires_grad=True),
        randn(sum(lk), 2, 8, dtype=torch.float32, requires_grad=True),
        torch.tensor([0, 7, 27, 30], dtype=torch.int32),
        torch.tensor([0, 9, 33, 34], dtype=torch.int32),
    ]


def run(module: nn.Module, inputs: List[Tensor]) -> Tuple[Tensor, List[Optional[Tensor]]]:
    """Output and the gradients of every floating input and parameter."""
    out = module(*inputs)
    leaves = [t for t in inputs if t.is_floating_point()] + list(module.parameters())
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    return out.detach(), list(grads)


def check_same(actual, expected, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual[0], expected[0], atol=atol, rtol=1e-5)
    for a, b in zip(actual[1], expected[1]):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)


CASES = {
    "grouped_windowed": (lambda: GroupedWindowedAttention(4), dense_inputs),
    "packed": (PackedAttention, packed_inputs),
}


@pytest.mark.parametrize("name", list(CASES))
def test_torchscript_script_save_load(name: str) -> None:
    make, inputs = CASES[name]
    torch.manual_seed(0)
    module = make()
    expected = run(module, inputs())
    scripted = torch.jit.script(module)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    check_same(run(scripted, inputs()), expected)
    check_same(run(loaded, inputs()), expected)
    op = "varlen_attention_forward" if name == "packed" else "attention_forward"
    assert f"torch_mha::{op}" in str(scripted.inlined_graph)


def test_torchscript_trace() -> None:
    torch.manual_seed(0)
    module = GroupedWindowedAttention(4)
    expected = run(module, dense_inputs())
    traced = torch.jit.trace(module, tuple(t.detach() for t in dense_inputs()))
    check_same(run(traced, dense_inputs()), expected)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("name", list(CASES))
def test_compile_fullgraph(name: str, dynamic: bool) -> None:
    make, inputs = CASES[name]
    torch.manual_seed(0)
    module = make()
    compiled = torch.compile(module, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    check_same(run(compiled, inputs()), run(module, inputs()))
    if name == "grouped_windowed" and dynamic:
        for length in (17, 40):
            check_same(run(compiled, dense_inputs(length)), run(module, dense_inputs(length)))


def test_compile_inductor() -> None:
    torch.manual_seed(0)
    module = GroupedWindowedAttention(4)
    compiled = torch.compile(module, fullgraph=True)
    check_same(run(compiled, dense_inputs()), run(module, dense_inputs()))


@pytest.mark.parametrize("name", list(CASES))
def test_export(name: str) -> None:
    make, inputs = CASES[name]
    torch.manual_seed(0)
    module = make()
    args = tuple(t.detach() for t in inputs())
    if name == "grouped_windowed":
        length = torch.export.Dim("length", min=2, max=64)
        dynamic = ({2: length}, {2: length + 5}, {2: length + 5})
        ep = torch.export.export(module, args, dynamic_shapes=dynamic)
    else:
        ep = torch.export.export(module, args)
    exported = ep.module()
    with torch.no_grad():
        torch.testing.assert_close(exported(*inputs()), module(*inputs()), atol=1e-6, rtol=1e-5)
    if name == "grouped_windowed":
        with torch.no_grad():
            torch.testing.assert_close(
                exported(*dense_inputs(20)), module(*dense_inputs(20)), atol=1e-6, rtol=1e-5
            )
