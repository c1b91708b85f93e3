"""The choice of CUDA kernel (csrc/backend_selection.cpp), asked through torch_mha.explain on CPU
tensors: it is a pure function of shapes, dtypes, flags and the compute capability, so every rule
is checked here without a GPU. Expectations come from what PyTorch's fused kernels accept and
from what torch_mha must keep (its dropout stream, the weights, its own modifiers)."""

from __future__ import annotations

import pytest
import torch

import torch_mha

H100, A100, T4 = (9, 0), (8, 0), (7, 5)


def qkv(dtype=torch.float16, n=2, h=4, hkv=4, l=64, s=64, d=64, dv=None):
    return (
        torch.zeros(n, h, l, d, dtype=dtype),
        torch.zeros(n, hkv, s, d, dtype=dtype),
        torch.zeros(n, hkv, s, dv or d, dtype=dtype),
    )


def explain(*args, capability=H100, **kwargs) -> torch_mha.BackendChoice:
    return torch_mha.explain(*args, device_capability=capability, **kwargs)


@pytest.fixture(autouse=True)
def _default_backend(monkeypatch):
    monkeypatch.delenv("TORCH_MHA_CUDA_BACKEND", raising=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_plain_half_precision_goes_to_flash(dtype):
    choice = explain(*qkv(dtype))
    assert choice.backend == "flash"
    assert choice.rejected["efficient"] == "eligible, but flash goes first"
    assert "TORCH_MHA_CUDA_BACKEND=cudnn" in choice.rejected["cudnn"]
    assert choice.device_capability == H100


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_precision_stays_with_torch_mha(dtype):
    choice = explain(*qkv(dtype))
    assert choice.backend == "torch_mha"
    assert set(choice.rejected) == {"flash", "efficient", "cudnn"}
    assert all("float16 and bfloat16 only" in reason for reason in choice.rejected.values())


@pytest.mark.parametrize("mask", ["attn_mask_bool", "attn_mask_float", "key_padding_mask"], ids=str)
def test_masks_go_to_the_memory_efficient_kernel(mask):
    q, k, v = qkv()
    kwargs = {
        "attn_mask_bool": {"attn_mask": torch.zeros(64, 64, dtype=torch.bool)},
        "attn_mask_float": {"attn_mask": torch.zeros(2, 4, 64, 64)},
        "key_padding_mask": {"key_padding_mask": torch.zeros(2, 64, dtype=torch.bool)},
    }[mask]
    choice = explain(q, k, v, **kwargs)
    assert choice.backend == "efficient"
    assert "no additive bias" in choice.rejected["flash"]


@pytest.mark.parametrize(
    "kwargs,reason",
    [
        ({"dropout_p": 0.1}, "Philox"),
        ({"need_weights": True}, "weights"),
        ({"alibi_slopes": torch.zeros(4)}, "ALiBi"),
        ({"softcap": 30.0}, "softcap"),
        ({"sinks": torch.zeros(4)}, "sinks"),
        ({"window_size": (16, 0)}, "sliding window"),
        ({"window_size": (-1, 3)}, "sliding window"),
    ],
    ids=["dropout", "weights", "alibi", "softcap", "sinks", "window", "window_right"],
)
def test_torch_mha_only_features_stay_with_torch_mha(kwargs, reason):
    choice = explain(*qkv(), **kwargs)
    assert choice.backend == "torch_mha"
    assert all(reason in text for text in choice.rejected.values()), choice.rejected


def test_causal_only_when_square():
    assert explain(*qkv(), is_causal=True).backend == "flash"
    # Bottom-right causal equals causal when L == S.
    assert explain(*qkv(), window_size=(-1, 0)).backend == "flash"
    rectangular = explain(*qkv(l=32, s=64), is_causal=True)
    assert rectangular.backend == "torch_mha"
    assert "query_len != key_len" in rectangular.rejected["flash"]
    assert explain(*qkv(l=32, s=64)).backend == "flash"  # not causal: any lengths


def test_grouped_query_heads_stay_with_torch_mha():
    choice = explain(*qkv(h=8, hkv=2))
    assert choice.backend == "torch_mha"
    assert "grouped-query" in choice.rejected["flash"]


@pytest.mark.parametrize("d,dv,ok", [(64, 64, True), (128, 128, True), (256, 256, True),
                                     (40, 40, True), (20, 20, False), (264, 264, False),
                                     (64, 32, False)])  # fmt: skip
def test_head_dims(d, dv, ok):
    choice = explain(*qkv(d=d, dv=dv))
    assert (choice.backend == "flash") == ok, choice


def test_empty_inputs_stay_with_torch_mha():
    for shape in ({"l": 0}, {"s": 0}, {"n": 0}):
        assert explain(*qkv(**shape)).backend == "torch_mha"


def test_compute_capability():
    assert explain(*qkv(), capability=A100).backend == "flash"
    older = explain(*qkv(), capability=T4)
    assert older.backend == "efficient"
    assert "8.0 or newer" in older.rejected["flash"]
    assert explain(*qkv(), capability=(4, 0)).backend == "torch_mha"


def test_deterministic_algorithms_keep_flash_out_of_the_backward():
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert explain(*qkv()).backend == "flash"  # forward: deterministic anyway
        backward = explain(*qkv(), backward=True)
        assert backward.backend == "efficient"
        assert "atomics" in backward.rejected["flash"]
    finally:
        torch.use_deterministic_algorithms(previous)
    assert explain(*qkv(), backward=True).backend == "flash"


def test_mask_gradient_needs_torch_mha_backward():
    mask = torch.zeros(64, 64, requires_grad=True)
    assert explain(*qkv(), attn_mask=mask).backend == "efficient"
    backward = explain(*qkv(), attn_mask=mask, backward=True)
    assert backward.backend == "torch_mha"
    assert "require grad" in backward.rejected["efficient"]


def test_requested_backend(monkeypatch):
    monkeypatch.setenv("TORCH_MHA_CUDA_BACKEND", "own")
    choice = explain(*qkv())
    assert choice.backend == "torch_mha"
    assert set(choice.rejected.values()) == {"TORCH_MHA_CUDA_BACKEND=own"}
    monkeypatch.setenv("TORCH_MHA_CUDA_BACKEND", "efficient")
    assert explain(*qkv()).backend == "efficient"
    monkeypatch.setenv("TORCH_MHA_CUDA_BACKEND", "cudnn")
    assert explain(*qkv()).backend == "cudnn"
    # cuDNN's backward is not used: the next eligible backward runs.
    assert explain(*qkv(), backward=True).backend == "flash"
    # A requested kernel that cannot run this call: the choice falls back.
    monkeypatch.setenv("TORCH_MHA_CUDA_BACKEND", "flash")
    assert explain(*qkv(), key_padding_mask=torch.zeros(2, 64, dtype=torch.bool)).backend == (
        "efficient"
    )
    monkeypatch.setenv("TORCH_MHA_CUDA_BACKEND", "auto")
    assert explain(*qkv()).backend == "flash"


def test_unknown_requested_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("TORCH_MHA_CUDA_BACKEND", "fastest")
    with pytest.raises(RuntimeError, match="TORCH_MHA_CUDA_BACKEND must be auto, own, flash"):
        explain(*qkv())
