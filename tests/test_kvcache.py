"""torch_mha.attention_with_kvcache (decoding and chunked prefill against a cache that the op
extends in place) and the split-key forward that short queries take, against the float64
reference of tests/reference.py."""

from __future__ import annotations

from typing import List, Optional, Tuple

import pytest
import torch
from attention_testing import OPS, assert_close, dtype_id, forward_tol, grad_tolerance, randn
from reference import reference_attention_variants
from torch import Tensor

import torch_mha

N, H, HKV, S_MAX, D, DV = 3, 8, 2, 700, 16, 12


def make_cache(
    lengths: List[int],
    new_len: int,
    dtype: torch.dtype,
    device: str,
    h: int = H,
    hkv: int = HKV,
    s_max: int = S_MAX,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    n = len(lengths)
    k_cache = randn(n, hkv, s_max, D, dtype=dtype, device=device)
    v_cache = randn(n, hkv, s_max, DV, dtype=dtype, device=device)
    query = randn(n, h, new_len, D, dtype=dtype, device=device)
    key = randn(n, hkv, new_len, D, dtype=dtype, device=device)
    value = randn(n, hkv, new_len, DV, dtype=dtype, device=device)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    return query, k_cache, v_cache, seqlens, key, value


def reference_step(
    query: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    lengths: List[int],
    key: Optional[Tensor],
    value: Optional[Tensor],
    window: Tuple[int, int] = (-1, 0),
    **kw,
) -> Tensor:
    """Each sequence alone: its cached keys, then the new ones, bottom-right aligned."""
    outs = []
    for b, length in enumerate(lengths):
        k = k_cache[b : b + 1, :, :length]
        v = v_cache[b : b + 1, :, :length]
        if key is not None:
            k = torch.cat([k, key[b : b + 1]], 2)
            v = torch.cat([v, value[b : b + 1]], 2)
        else:
            k = k_cache[b : b + 1, :, : length + query.shape[2]]
            v = v_cache[b : b + 1, :, : length + query.shape[2]]
        slopes = kw.get("alibi_slopes")
        out, _ = reference_attention_variants(
            query[b : b + 1], k, v, window=window, softcap=kw.get("softcap", 0.0),
            alibi_slopes=None if slopes is None else slopes,
            sinks=kw.get("sinks"), scale=kw.get("scale"),
        )  # fmt: skip
        outs.append(out)
    return torch.cat(outs, 0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=dtype_id)  # fmt: skip
@pytest.mark.parametrize("new_len", [1, 7, 64])
def test_decode_and_prefill_chunks(new_len: int, dtype: torch.dtype, device: str) -> None:
    lengths = [0, 333, 636 - new_len]
    query, k_cache, v_cache, seqlens, key, value = make_cache(lengths, new_len, dtype, device)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    expected = reference_step(query, before_k, before_v, lengths, key, value)
    out = torch_mha.attention_with_kvcache(query, k_cache, v_cache, seqlens, key, value)
    assert out.shape == (len(lengths), H, new_len, DV) and out.dtype == dtype
    assert_close(out, expected, forward_tol(dtype))
    # The new entries are written in place at [length, length + new_len); the rest is intact.
    for b, length in enumerate(lengths):
        assert torch.equal(k_cache[b, :, length : length + new_len], key[b])
        assert torch.equal(v_cache[b, :, length : length + new_len], value[b])
        assert torch.equal(k_cache[b, :, :length], before_k[b, :, :length])
        assert torch.equal(k_cache[b, :, length + new_len :], before_k[b, :, length + new_len :])
    assert seqlens.tolist() == lengths  # not modified


MODIFIERS = {
    "sliding_window": {"window_size": (50, 0)},
    "full_window": {"window_size": (-1, -1)},
    "softcap": {"softcap": 2.0},
    "alibi": {"alibi_slopes": torch.rand(H) * 0.1},
    "sinks": {"sinks": torch.randn(H, dtype=torch.float64)},
    "scale": {"scale": 0.3},
}


@pytest.mark.parametrize("case", list(MODIFIERS))
def test_modifiers(case: str, device: str) -> None:
    kw = dict(MODIFIERS[case])
    for name in ("alibi_slopes", "sinks"):
        if name in kw:
            kw[name] = kw[name].to(device)
    lengths = [100, 517]
    query, k_cache, v_cache, seqlens, key, value = make_cache(lengths, 3, torch.float64, device)
    expected = reference_step(
        query, k_cache.clone(), v_cache.clone(), lengths, key, value,
        window=kw.get("window_size", (-1, 0)), **kw,
    )  # fmt: skip
    out = torch_mha.attention_with_kvcache(query, k_cache, v_cache, seqlens, key, value, **kw)
    assert_close(out, expected, forward_tol(torch.float64))


def test_without_new_entries_reads_the_cache_as_is(device: str) -> None:
    lengths = [10, 200]
    query, k_cache, v_cache, seqlens, _, _ = make_cache(lengths, 4, torch.float64, device)
    before = k_cache.clone()
    out = torch_mha.attention_with_kvcache(query, k_cache, v_cache, seqlens)
    expected = reference_step(query, k_cache, v_cache, lengths, None, None)
    assert_close(out, expected, forward_tol(torch.float64))
    assert torch.equal(k_cache, before)


def test_token_by_token_decoding_equals_causal_attention(device: str) -> None:
    """Prefill a prompt, then decode one token at a time: every step equals causal attention
    over the whole sequence so far (the op's bottom-right causal default)."""
    total, prompt = 40, 12
    q_all = randn(1, H, total, D, device=device)
    k_all = randn(1, HKV, total, D, device=device)
    v_all = randn(1, HKV, total, DV, device=device)
    full, _ = torch_mha.attention(q_all, k_all, v_all, is_causal=True)
    k_cache = torch.zeros(1, HKV, total, D, dtype=torch.float64, device=device)
    v_cache = torch.zeros(1, HKV, total, DV, dtype=torch.float64, device=device)
    seqlens = torch.zeros(1, dtype=torch.int32, device=device)
    out = torch_mha.attention_with_kvcache(
        q_all[:, :, :prompt], k_cache, v_cache, seqlens,
        k_all[:, :, :prompt], v_all[:, :, :prompt],
    )  # fmt: skip
    outs = [out]
    seqlens += prompt
    for t in range(prompt, total):
        step = slice(t, t + 1)
        outs.append(
            torch_mha.attention_with_kvcache(
                q_all[:, :, step],
                k_cache,
                v_cache,
                seqlens,
                k_all[:, :, step],
                v_all[:, :, step],
            )  # fmt: skip
        )
        seqlens += 1
    assert_close(torch.cat(outs, 2), full, forward_tol(torch.float64))


def _bad(device: str):
    query, k_cache, v_cache, seqlens, key, value = make_cache([5, 9], 2, torch.float32, device,
                                                              s_max=10)  # fmt: skip
    return dict(query=query, k_cache=k_cache, v_cache=v_cache, cache_seqlens=seqlens, key=key,
                value=value)  # fmt: skip


BAD = {
    "past_the_end": (
        lambda a: a.update(cache_seqlens=torch.tensor([5, 9], dtype=torch.int32)),
        r"cache_seqlens\[1\] \+ new_len = 9 \+ 2 exceeds the cache's 10 entries",
    ),
    "negative_length": (
        lambda a: a.update(cache_seqlens=torch.tensor([-1, 3], dtype=torch.int32)),
        r"cache_seqlens\[0\] = -1 is negative",
    ),
    "int64_lengths": (
        lambda a: a.update(cache_seqlens=torch.tensor([1, 3])),
        r"cache_seqlens of dtype int32.*Long",
    ),
    "lengths_wrong_shape": (
        lambda a: a.update(cache_seqlens=torch.tensor([1, 3, 4], dtype=torch.int32)),
        r"cache_seqlens of shape \(batch,\) = \(2,\)",
    ),
    "key_without_value": (lambda a: a.update(value=None), r"key and value must both be given"),
    "key_wrong_shape": (
        lambda a: a.update(key=a["key"][:, :, :1]),
        r"key of shape \(batch, kv_heads, new_len, dim\) = \(2, 2, 2, 16\)",
    ),
    "key_wrong_dtype": (
        lambda a: a.update(key=a["key"].double()),
        r"key of the cache's dtype Float.*Double",
    ),
    "cache_3d": (
        lambda a: a.update(k_cache=a["k_cache"][0]),
        r"k_cache and v_cache of shape \(batch, kv_heads, max_len, dim\)",
    ),
    "heads_not_multiple": (
        lambda a: a.update(query=randn(2, 3, 2, D, dtype=torch.float32)),
        r"number of heads \(dim 1\) of key and value",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_leaves_the_cache_untouched(case: str) -> None:
    args = _bad("cpu")
    k_before, v_before = args["k_cache"].clone(), args["v_cache"].clone()
    update, match = BAD[case]
    update(args)
    with pytest.raises((RuntimeError, ValueError), match=match):
        torch_mha.attention_with_kvcache(**args)
    if case != "cache_3d":
        assert torch.equal(args["k_cache"], k_before)
        assert torch.equal(args["v_cache"], v_before)


def test_meta_and_opcheck() -> None:
    query, k_cache, v_cache, seqlens, key, value = make_cache([3, 200], 2, torch.float32, "cpu")
    meta = OPS.attention_with_kvcache(
        query.to("meta"), k_cache.to("meta"), v_cache.to("meta"), seqlens.to("meta"),
        key.to("meta"), value.to("meta"),
    )  # fmt: skip
    assert meta.shape == (2, H, 2, DV) and meta.device.type == "meta"
    torch.library.opcheck(
        OPS.attention_with_kvcache.default,
        (query, k_cache, v_cache, seqlens, key, value),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_not_differentiable() -> None:
    query, k_cache, v_cache, seqlens, key, value = make_cache([3, 20], 1, torch.float32, "cpu")
    query.requires_grad_()
    out = torch_mha.attention_with_kvcache(query, k_cache, v_cache, seqlens, key, value)
    with pytest.raises(RuntimeError, match="attention_with_kvcache"):
        out.sum().backward()


def test_torchscript_and_compile() -> None:
    def step(q: Tensor, kc: Tensor, vc: Tensor, lens: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return torch_mha.attention_with_kvcache(q, kc, vc, lens, k, v, window_size=(30, 0))

    query, k_cache, v_cache, seqlens, key, value = make_cache([3, 200], 2, torch.float32, "cpu")
    caches = [(k_cache.clone(), v_cache.clone()) for _ in range(3)]
    eager = step(query, *caches[0], seqlens, key, value)
    scripted = torch.jit.script(step)(query, *caches[1], seqlens, key, value)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(
        query, *caches[2], seqlens, key, value
    )
    for result, (kc, vc) in zip((scripted, compiled), caches[1:]):
        torch.testing.assert_close(result, eager)
        torch.testing.assert_close(kc, caches[0][0])
        torch.testing.assert_close(vc, caches[0][1])


# ---------------------------------------------------------------------------------------------
# The split-key forward (few work items, one query block): attention_forward itself


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("shape", [(1, 1, 900), (5, 2, 2000), (64, 1, 700)],
                         ids=lambda s: f"L{s[0]}_N{s[1]}_S{s[2]}")  # fmt: skip
def test_split_keys_forward_and_backward(
    shape: Tuple[int, int, int], dtype: torch.dtype, device: str
) -> None:
    l, n, s = shape
    kw = {
        "window_size": (700, 3),
        "softcap": 5.0,
        "alibi_slopes": (torch.rand(H) * 0.01).to(device),
        "sinks": randn(H, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                       device=device, requires_grad=True),
    }  # fmt: skip
    q = randn(n, H, l, D, dtype=dtype, device=device, requires_grad=True)
    k = randn(n, HKV, s, D, dtype=dtype, device=device, requires_grad=True)
    v = randn(n, HKV, s, DV, dtype=dtype, device=device, requires_grad=True)
    mask = (torch.rand(n, 1, l, s) < 0.1).to(device)
    out, w = torch_mha.attention(q, k, v, mask, need_weights=True, **kw)
    ref_out, ref_w = reference_attention_variants(
        q, k, v, mask, window=kw["window_size"], softcap=kw["softcap"],
        alibi_slopes=kw["alibi_slopes"], sinks=kw["sinks"],
    )  # fmt: skip
    assert_close(out, ref_out, forward_tol(dtype))
    assert_close(w, ref_w, forward_tol(dtype))
    go = randn(*out.shape, dtype=dtype, device=device)
    grads = torch.autograd.grad(out, [q, k, v, kw["sinks"]], go)
    ref_grads = torch.autograd.grad(ref_out, [q, k, v, kw["sinks"]], go)
    for a, b in zip(grads, ref_grads):
        tol = grad_tolerance(dtype, b)
        assert_close(a, b, type(tol)(tol.atol * 4, tol.rtol * 4))


def test_split_keys_with_dropout_keeps_the_mask(device: str) -> None:
    """The split forward draws the same dropout mask as the unsplit one: read it off the weights
    and compare with the reference."""
    q = randn(1, H, 3, D, device=device)
    k = randn(1, HKV, 1500, D, device=device)
    v = randn(1, HKV, 1500, DV, device=device)
    seed = torch.tensor([9], device=device)
    out, _, w = OPS.attention_forward(q, k, v, None, None, False, None, 0.3, seed, True)
    factors = (w != 0).double() / 0.7
    ref_out, _ = reference_attention_variants(q, k, v, dropout_factors=factors)
    assert_close(out, ref_out, forward_tol(torch.float64))
