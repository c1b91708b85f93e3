"""Packed variable-length batches: torch_mha.varlen_attention and the varlen core ops, against
the float64 reference applied to each sequence on its own, against the same batch padded (with a
key padding mask) for dropout, gradcheck, opcheck and bad input."""

from __future__ import annotations

from typing import List, Sequence, Tuple

import pytest
import torch
from attention_testing import (
    OPS,
    assert_close,
    dtype_id,
    forward_tol,
    grad_tolerance,
    opcheck,
    randn,
)
from reference import reference_attention_variants
from torch import Tensor

import torch_mha


def cu_seqlens(lengths: Sequence[int], device: str) -> Tensor:
    offsets = [0]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    return torch.tensor(offsets, dtype=torch.int32, device=device)


def packed(lengths_q, lengths_k, h, hkv, e, ev, dtype, device, requires_grad=False):
    q = randn(sum(lengths_q), h, e, dtype=dtype, device=device, requires_grad=requires_grad)
    k = randn(sum(lengths_k), hkv, e, dtype=dtype, device=device, requires_grad=requires_grad)
    v = randn(sum(lengths_k), hkv, ev, dtype=dtype, device=device, requires_grad=requires_grad)
    return q, k, v


def per_sequence_reference(q, k, v, lengths_q, lengths_k, **kw) -> Tensor:
    """The reference run on every sequence alone, repacked: (total_q, H, Ev) float64."""
    outs: List[Tensor] = []
    cq = cu_seqlens(lengths_q, "cpu").tolist()
    ck = cu_seqlens(lengths_k, "cpu").tolist()
    alibi = kw.pop("alibi_slopes", None)
    for b in range(len(lengths_q)):
        qs = q[cq[b] : cq[b + 1]].transpose(0, 1)[None]
        ks = k[ck[b] : ck[b + 1]].transpose(0, 1)[None]
        vs = v[ck[b] : ck[b + 1]].transpose(0, 1)[None]
        slopes = None if alibi is None else (alibi[b] if alibi.dim() == 2 else alibi)
        out, _ = reference_attention_variants(
            qs,
            ks,
            vs,
            None,
            None,
            kw.get("is_causal", False),
            kw.get("scale"),
            window=kw.get("window_size", (-1, -1)),
            alibi_slopes=slopes,
            softcap=kw.get("softcap", 0.0),
            sinks=kw.get("sinks"),
        )
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs, 0)


LENGTHS = {
    "mixed": ([5, 70, 130, 1, 64], [9, 70, 200, 3, 64]),
    "with_empty": ([0, 33, 0, 129], [4, 0, 7, 129]),
    "one_each": ([1, 1, 1], [1, 1, 1]),
    "tile_edges": ([63, 64, 65, 127, 128, 129], [128, 129, 127, 64, 65, 63]),
}

CASES = {
    "plain": {},
    "causal": {"is_causal": True},
    "bottom_right_causal": {"window_size": (-1, 0)},
    "sliding_window": {"window_size": (17, 0)},
    "everything": {"window_size": (25, 3), "softcap": 2.5, "alibi": True, "sinks": True},
}


def _modifiers(case: str, batch: int, h: int, device: str, dtype=torch.float64) -> dict:
    kw = dict(CASES[case])
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = (torch.rand(batch, h) * 0.3).to(device)
    if kw.pop("sinks", False):
        # float64 sinks for float64 queries, float32 (what the op accepts besides the query's
        # dtype) otherwise
        sinks_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        kw["sinks"] = randn(h, dtype=sinks_dtype, device=device, requires_grad=True)
    return kw


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("lengths", list(LENGTHS))
def test_forward_and_backward_vs_each_sequence(
    lengths: str, case: str, dtype: torch.dtype, device: str
) -> None:
    lq, lk = LENGTHS[lengths]
    h, hkv = 4, 2
    kw = _modifiers(case, len(lq), h, device, dtype)
    q, k, v = packed(lq, lk, h, hkv, 16, 8, dtype, device, requires_grad=True)
    cq, ck = cu_seqlens(lq, device), cu_seqlens(lk, device)
    out = torch_mha.varlen_attention(q, k, v, cq, ck, max(lq), max(lk), **kw)
    assert out.shape == (sum(lq), h, 8) and out.dtype == dtype
    ref = per_sequence_reference(q, k, v, lq, lk, **dict(kw))
    assert_close(out, ref, forward_tol(dtype))
    inputs = [q, k, v] + ([kw["sinks"]] if "sinks" in kw else [])
    go = randn(*out.shape, dtype=dtype, device=device)
    grads = torch.autograd.grad(out, inputs, go)
    ref_grads = torch.autograd.grad(ref, inputs, go)
    # Rounding errors scale with the problem's gradients, not with one tensor's: with one key
    # per sequence the query gradient is exactly 0 and float32 leaves ~1e-7 there.
    scale = torch.stack([g.abs().max() for g in ref_grads if g.numel()]).max()
    for name, a, b in zip(("query", "key", "value", "sinks"), grads, ref_grads):
        tol = grad_tolerance(dtype, scale if name != "sinks" else b)
        if name == "sinks" and dtype != torch.float64:
            tol = type(tol)(tol.atol * 4, tol.rtol * 4)
        assert_close(a, b, tol, f"grad {name}")


def test_max_seqlen_larger_than_needed(device: str) -> None:
    """max_seqlen is an upper bound: a looser one gives the same result."""
    lq, lk = [5, 30], [7, 40]
    q, k, v = packed(lq, lk, 2, 2, 8, 8, torch.float64, device)
    cq, ck = cu_seqlens(lq, device), cu_seqlens(lk, device)
    tight = torch_mha.varlen_attention(q, k, v, cq, ck, 30, 40, is_causal=True)
    loose = torch_mha.varlen_attention(q, k, v, cq, ck, 300, 100, is_causal=True)
    assert_close(loose, tight, forward_tol(torch.float64))


@pytest.mark.parametrize("case", ["plain", "everything"])
def test_dropout_mask_is_that_of_the_padded_batch(case: str, device: str) -> None:
    """Dropout draws the mask of the dense (B, H, max_seqlen_q, max_seqlen_k) call: the packed
    batch and the same batch padded, with a key padding mask, give the same outputs and
    gradients for the same seed (sequences of equal length, so positions agree)."""
    lengths = [40, 40, 40]
    b, h, length = len(lengths), 4, 40
    kw = _modifiers(case, b, h, device)
    q, k, v = packed(lengths, lengths, h, 2, 8, 8, torch.float64, device, requires_grad=True)
    cu = cu_seqlens(lengths, device)
    seed = torch.tensor([77], device=device)
    left, right = kw.get("window_size", (-1, -1))
    out, _ = OPS.varlen_attention_forward(
        q,
        k,
        v,
        cu,
        cu,
        length,
        length,
        None,
        0.4,
        seed,
        False,
        left,
        right,
        kw.get("alibi_slopes"),
        kw.get("softcap", 0.0),
        kw.get("sinks"),
    )
    dense = lambda t: t.view(b, length, t.shape[1], t.shape[2]).transpose(1, 2)  # noqa: E731
    dense_out, _, _ = OPS.attention_forward(
        dense(q),
        dense(k),
        dense(v),
        None,
        None,
        False,
        None,
        0.4,
        seed,
        False,
        False,
        left,
        right,
        kw.get("alibi_slopes"),
        kw.get("softcap", 0.0),
        kw.get("sinks"),
    )
    assert_close(out, dense_out.transpose(1, 2).reshape(out.shape), forward_tol(torch.float64))
    go = torch.randn_like(out)
    inputs = [q, k, v] + ([kw["sinks"]] if "sinks" in kw else [])
    grads = torch.autograd.grad(out, inputs, go)
    dense_grads = torch.autograd.grad(dense_out, inputs, dense(go))
    for a, b_ in zip(grads, dense_grads):
        assert_close(a, b_, grad_tolerance(torch.float64, b_))


def test_padded_batch_with_key_padding_mask_agrees(device: str) -> None:
    """Unequal lengths with dropout: the packed batch equals the padded batch (queries past a
    sequence's end dropped, keys past it masked) for the same seed."""
    lq = [13, 40, 7]
    b, h, lmax = len(lq), 2, max(lq)
    q, k, v = packed(lq, lq, h, h, 8, 8, torch.float64, device)
    cu = cu_seqlens(lq, device)
    seed = torch.tensor([5], device=device)
    out, _ = OPS.varlen_attention_forward(q, k, v, cu, cu, lmax, lmax, None, 0.5, seed)

    def pad(t: Tensor) -> Tensor:
        padded_t = torch.zeros(b, lmax, t.shape[1], t.shape[2], dtype=t.dtype, device=device)
        for i, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            padded_t[i, : end - start] = t[start:end]
        return padded_t.transpose(1, 2)

    kpm = torch.arange(lmax, device=device)[None, :] >= torch.tensor(lq, device=device)[:, None]
    dense_out, _, _ = OPS.attention_forward(
        pad(q), pad(k), pad(v), None, kpm, False, None, 0.5, seed
    )
    for i, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        assert_close(
            out[start:end],
            dense_out[i, :, : end - start].transpose(0, 1),
            forward_tol(torch.float64),
        )


def test_gradcheck(device: str) -> None:
    lq, lk = [3, 0, 5], [4, 2, 6]
    q, k, v = packed(lq, lk, 4, 2, 4, 3, torch.float64, device, requires_grad=True)
    sinks = randn(4, device=device, requires_grad=True)
    cq, ck = cu_seqlens(lq, device), cu_seqlens(lk, device)

    def fn(q_, k_, v_, s_):
        return torch_mha.varlen_attention(
            q_, k_, v_, cq, ck, 5, 6, window_size=(3, 0), softcap=1.1, sinks=s_
        )

    assert torch.autograd.gradcheck(fn, (q, k, v, sinks), atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "no_grad"])
def test_opcheck(requires_grad: bool, device: str) -> None:
    lq, lk = [3, 9, 1], [4, 2, 6]
    q, k, v = packed(lq, lk, 4, 2, 8, 6, torch.float32, device, requires_grad=requires_grad)
    cq, ck = cu_seqlens(lq, device), cu_seqlens(lk, device)
    sinks = torch.randn(4, device=device, requires_grad=requires_grad)
    seed = torch.tensor([3], device=device)
    opcheck(
        OPS.varlen_attention_forward.default,
        (q, k, v, cq, ck, 9, 6, None, 0.25, seed, True, 2, 0, None, 1.5, sinks),
    )
    if not requires_grad:
        out, stats = OPS.varlen_attention_forward(q, k, v, cq, ck, 9, 6)
        opcheck(
            OPS.varlen_attention_backward.default,
            (
                torch.randn_like(out),
                q,
                k,
                v,
                out,
                stats,
                cq,
                ck,
                9,
                6,
                None,
                0.0,
                None,
                False,
                -1,
                -1,
                None,
                0.0,
                sinks,
            ),
        )


def _bad_cases(device: str) -> List[Tuple[str, dict, str]]:
    return [
        (
            "cu_seqlens_int64",
            {"cu_seqlens_q": torch.tensor([0, 3, 8], device=device)},
            r"cu_seqlens_q of dtype int32.*Long",
        ),
        (
            "cu_seqlens_2d",
            {"cu_seqlens_k": torch.zeros(1, 3, dtype=torch.int32, device=device)},
            r"cu_seqlens_k of shape \(batch \+ 1,\)",
        ),
        ("not_starting_at_zero", {"cu_seqlens_q": [1, 3, 8]}, r"cu_seqlens_q to start at 0.*1"),
        (
            "decreasing",
            {"cu_seqlens_k": [0, 7, 6], "max_seqlen_k": 10},
            r"cu_seqlens_k to be non-decreasing, but cu_seqlens_k\[2\] = 6 < cu_seqlens_k\[1\] = 7",
        ),
        (
            "not_ending_at_total",
            {"cu_seqlens_q": [0, 3, 7]},
            r"cu_seqlens_q to end at the total length 8, but it ends at 7",
        ),
        (
            "different_batch",
            {"cu_seqlens_k": [0, 4]},
            r"cu_seqlens_q and cu_seqlens_k to describe the same number of sequences",
        ),
        (
            "max_seqlen_q_too_small",
            {"max_seqlen_q": 4},
            r"max_seqlen_q = 4 is smaller than sequence 1, of length 5",
        ),
        (
            "max_seqlen_k_too_small",
            {"max_seqlen_k": 1},
            r"max_seqlen_k = 1 is smaller than sequence 0, of length 2",
        ),
        ("query_4d", {"query": "4d"}, r"query of shape \(total_q, heads, head_dim\).*4-D"),
        ("heads_not_multiple", {"key": "3heads"}, r"number of heads \(dim 1\) of key and value"),
    ]


@pytest.mark.parametrize("case", [c[0] for c in _bad_cases("cpu")])
def test_bad_input(case: str, device: str) -> None:
    name, overrides, match = next(c for c in _bad_cases(device) if c[0] == case)
    args = dict(
        query=randn(8, 4, 8, device=device),
        key=randn(6, 2, 8, device=device),
        value=randn(6, 2, 8, device=device),
        cu_seqlens_q=cu_seqlens([3, 5], device),
        cu_seqlens_k=cu_seqlens([2, 4], device),
        max_seqlen_q=5,
        max_seqlen_k=4,
    )
    for key, value in overrides.items():
        if value == "4d":
            value = randn(1, 8, 4, 8, device=device)
        elif value == "3heads":
            value = randn(6, 3, 8, device=device)
            args["value"] = randn(6, 3, 8, device=device)
        elif isinstance(value, list):
            value = torch.tensor(value, dtype=torch.int32, device=device)
        args[key] = value
    with pytest.raises(RuntimeError, match=match):
        torch_mha.varlen_attention(**args)
