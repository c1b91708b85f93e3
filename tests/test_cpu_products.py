"""bfloat16 / float16 tile products on the CPU: the choice between torch_mha's float32 FMA tiles
and PyTorch's cpublas::brgemm (csrc/cpu/reduced_products.h), and the forward through brgemm.

The choice is a pure function of the CPU's flags, the kernel build and the environment, tested
here for machines this one is not (AMX, AVX512-BF16, AVX512-FP16). The brgemm forward is forced
with TORCH_MHA_CPU_REDUCED_PRODUCTS=brgemm, which runs on any x86 machine (without bfloat16
instructions PyTorch's library emulates them), and checked against the float64 reference of
tests/reference.py with every modifier and mask.
"""

from __future__ import annotations

import pytest
import torch
from attention_testing import OPS, UNIT_ROUNDOFF, Tol, assert_close, forward_tol, randn
from reference import reference_attention_variants

import torch_mha

ENV = "TORCH_MHA_CPU_REDUCED_PRODUCTS"
REDUCED = [torch.bfloat16, torch.float16]


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def choose(dtype: torch.dtype, requested: str = "", **machine: bool):
    """The engine for a described machine: flags default to absent."""
    names = ["amx_bf16", "avx512_bf16", "amx_fp16", "avx512_fp16", "avx512_build", "library_exact"]
    flags = [int(machine.pop(name, False)) for name in names]
    assert not machine, machine
    return OPS._explain_cpu_products(dtype, requested, flags)


# ---------------------------------------------------------------------------------------------
# The choice


@pytest.mark.parametrize(
    "dtype, machine, engine",
    [
        # Without the dtype's dot-product instructions: FMAs.
        (torch.bfloat16, {"avx512_build": True, "library_exact": True}, "fma"),
        (torch.float16, {"avx512_build": True, "library_exact": True}, "fma"),
        # bfloat16 instructions do not make float16 products native, nor the reverse.
        (
            torch.float16,
            {"amx_bf16": True, "avx512_bf16": True, "avx512_build": True, "library_exact": True},
            "fma",
        ),
        (torch.bfloat16, {"avx512_fp16": True, "avx512_build": True, "library_exact": True}, "fma"),
        # AMX or AVX512-BF16, the AVX512 build, a library that keeps float32 sums: brgemm.
        (torch.bfloat16, {"amx_bf16": True, "avx512_build": True, "library_exact": True}, "brgemm"),
        (
            torch.bfloat16,
            {"avx512_bf16": True, "avx512_build": True, "library_exact": True},
            "brgemm",
        ),
        (torch.float16, {"amx_fp16": True, "avx512_build": True, "library_exact": True}, "brgemm"),
        (
            torch.float16,
            {"avx512_fp16": True, "avx512_build": True, "library_exact": True},
            "brgemm",
        ),
        # ATEN_CPU_CAPABILITY=avx2 on an AMX machine stands for an AVX2 machine.
        (torch.bfloat16, {"amx_bf16": True, "library_exact": True}, "fma"),
        # A library that would round the products to bfloat16 is never chosen.
        (torch.bfloat16, {"amx_bf16": True, "avx512_build": True}, "fma"),
        # float32 and float64 tiles never go to the library.
        (torch.float32, {"amx_bf16": True, "avx512_build": True, "library_exact": True}, "fma"),
        (torch.float64, {"amx_bf16": True, "avx512_build": True, "library_exact": True}, "fma"),
    ],
)
def test_choice_follows_the_machine(dtype: torch.dtype, machine: dict, engine: str) -> None:
    chosen, reason = choose(dtype, **machine)
    assert chosen == engine, reason
    assert reason


def test_forcing_either_engine() -> None:
    amx = {"amx_bf16": True, "avx512_build": True, "library_exact": True}
    assert choose(torch.bfloat16, "fma", **amx)[0] == "fma"
    assert choose(torch.bfloat16, "auto", **amx)[0] == "brgemm"
    assert choose(torch.bfloat16, "brgemm", library_exact=True)[0] == "brgemm"
    with pytest.raises(RuntimeError, match="cannot be honoured.*rounds bfloat16"):
        choose(torch.bfloat16, "brgemm", amx_bf16=True, avx512_build=True)
    with pytest.raises(RuntimeError, match="must be auto, fma or brgemm, but is 'amx'"):
        choose(torch.bfloat16, "amx", **amx)


def test_this_machine_is_described_by_its_flags(monkeypatch) -> None:
    """explain_cpu answers for this CPU: brgemm by default exactly where /proc/cpuinfo lists
    bfloat16 dot-product instructions and the kernels run their AVX512 build."""
    flags = _cpu_flags()
    if not flags:
        pytest.skip("/proc/cpuinfo has no flags line on this machine")
    monkeypatch.delenv(ENV, raising=False)
    choice = torch_mha.explain_cpu(torch.bfloat16)
    native = bool({"amx_bf16", "avx512_bf16"} & flags)
    avx512 = OPS._cpu_capability() == "AVX512"
    if native and avx512 and "rounds" not in choice.reason:
        assert choice.engine == "brgemm", choice.reason
    else:
        assert choice.engine == "fma", choice.reason
    assert torch_mha.explain_cpu(torch.float32).engine == "fma"
    monkeypatch.setenv(ENV, "fma")
    assert torch_mha.explain_cpu(torch.bfloat16) == ("fma", f"{ENV}=fma")


def test_unknown_setting_fails_the_call(monkeypatch) -> None:
    q = torch.randn(1, 1, 40, 8, dtype=torch.bfloat16)
    monkeypatch.setenv(ENV, "amx")
    with pytest.raises(RuntimeError, match=f"{ENV} must be auto, fma or brgemm, but is 'amx'"):
        OPS.attention_forward(q, q, q)
    # float32 never consults it.
    OPS.attention_forward(q.float(), q.float(), q.float())


# ---------------------------------------------------------------------------------------------
# The forward through brgemm


def brgemm_tol(dtype: torch.dtype, value: torch.Tensor) -> Tol:
    """forward_tol plus the rounding of the probabilities to the input type before P V: each
    term p_j v_j moves by at most u p_j |v_j|, so the output by at most u max |v| (the p_j of a
    row sum to at most 1)."""
    base = forward_tol(dtype)
    u = UNIT_ROUNDOFF[dtype]
    return Tol(base.atol + u * float(value.abs().max()), base.rtol)


def _run(q, k, v, monkeypatch, engine: str, **kw):
    monkeypatch.setenv(ENV, engine)
    left, right = kw.pop("window_size", (-1, -1))
    return OPS.attention_forward(
        q,
        k,
        v,
        kw.pop("attn_mask", None),
        kw.pop("key_padding_mask", None),
        kw.pop("is_causal", False),
        None,
        kw.pop("dropout_p", 0.0),
        kw.pop("dropout_seed", None),
        kw.pop("need_weights", False),
        False,
        left,
        right,
        kw.pop("alibi_slopes", None),
        kw.pop("softcap", 0.0),
        kw.pop("sinks", None),
    )


CASES = {
    "plain": {},
    "causal": {"is_causal": True},
    "window": {"window_size": (70, 3)},
    "modifiers": {"softcap": 5.0, "alibi": True, "sinks": True},
    "masks": {"masks": True},
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(
    "shape",
    [
        (2, 4, 2, 100, 300, 64, 64),
        (1, 2, 1, 200, 129, 40, 24),
        (1, 3, 3, 17, 1000, 128, 128),
        (2, 2, 1, 64, 64, 16, 8),
    ],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("dtype", REDUCED, ids=str)
def test_brgemm_forward_matches_reference(dtype, shape, case, monkeypatch) -> None:
    """Blocks of 17 to 200 query rows (the brgemm path), grouped heads, head dims that are not
    multiples of a vector, a value dim other than the head dim, key lengths off the tile size."""
    n, h, hkv, l, s, e, ev = shape
    torch.manual_seed(sum(shape))
    q = randn(n, h, l, e, dtype=dtype)
    k = randn(n, hkv, s, e, dtype=dtype)
    v = randn(n, hkv, s, ev, dtype=dtype)
    spec = dict(CASES[case])
    kw = {key: spec[key] for key in ("is_causal", "window_size", "softcap") if key in spec}
    if spec.get("alibi"):
        kw["alibi_slopes"] = torch.rand(n, h) * 0.2
    if spec.get("sinks"):
        kw["sinks"] = torch.randn(h).to(dtype)
    if spec.get("masks"):
        kw["attn_mask"] = randn(h, l, s, dtype=dtype)
        kw["key_padding_mask"] = torch.rand(n, s) < 0.3
    out, stats, _ = _run(q, k, v, monkeypatch, "brgemm", **dict(kw))
    ref, _ = reference_attention_variants(
        q,
        k,
        v,
        kw.get("attn_mask"),
        kw.get("key_padding_mask"),
        kw.get("is_causal", False),
        None,
        window=kw.get("window_size", (-1, -1)),
        alibi_slopes=kw.get("alibi_slopes"),
        softcap=kw.get("softcap", 0.0),
        sinks=kw.get("sinks"),
    )
    assert_close(out, ref, brgemm_tol(dtype, v), f"{dtype} {shape} {case}")
    # The statistics come from the float32 scores, which brgemm sums exactly like the FMA tiles
    # up to float32 rounding.
    _, fma_stats, _ = _run(q, k, v, monkeypatch, "fma", **dict(kw))
    finite = torch.isfinite(fma_stats)
    assert torch.equal(finite, torch.isfinite(stats))
    assert_close(stats[finite], fma_stats[finite], Tol(1e-4, 1e-5))


@pytest.mark.parametrize("dtype", REDUCED, ids=str)
def test_brgemm_forward_layouts_and_dropout(dtype, monkeypatch) -> None:
    """Per-head views of packed projections (rows far apart), broadcast key/value rows of stride
    0 (the library cannot read those: the FMA tiles take the call), packed variable-length
    batches, and dropout (the same keep mask on both engines)."""
    torch.manual_seed(3)
    n, h, l, e = 2, 4, 96, 32
    packed = randn(n, l, 3 * h * e, dtype=dtype)
    q, k, v = (t.view(n, l, h, e).transpose(1, 2) for t in packed.split(h * e, -1))
    out, _, _ = _run(q, k, v, monkeypatch, "brgemm")
    ref, _ = reference_attention_variants(q, k, v)
    assert_close(out, ref, brgemm_tol(dtype, v))

    row = randn(n, h, 1, e, dtype=dtype)
    kb, vb = row.expand(n, h, 150, e), (row * 2).expand(n, h, 150, e)
    out, _, _ = _run(q, kb, vb, monkeypatch, "brgemm")
    ref, _ = reference_attention_variants(q, kb, vb)
    assert_close(out, ref, forward_tol(dtype))

    seqlens = torch.tensor([0, 70, 70 + 130], dtype=torch.int32)
    qv, kv_, vv = (randn(200, h, e, dtype=dtype) for _ in range(3))
    monkeypatch.setenv(ENV, "brgemm")
    out, _ = OPS.varlen_attention_forward(qv, kv_, vv, seqlens, seqlens, 130, 130, is_causal=True)
    for b in range(2):
        lo, hi = int(seqlens[b]), int(seqlens[b + 1])
        ref, _ = reference_attention_variants(
            *(t[lo:hi].transpose(0, 1)[None] for t in (qv, kv_, vv)), is_causal=True
        )
        assert_close(out[lo:hi].transpose(0, 1)[None], ref, brgemm_tol(dtype, vv))

    seed = torch.tensor([11])
    kw = {"dropout_p": 0.25, "dropout_seed": seed, "need_weights": True}
    out_b, _, w_b = _run(q, k, v, monkeypatch, "brgemm", **dict(kw))
    out_f, _, w_f = _run(q, k, v, monkeypatch, "fma", **dict(kw))
    assert torch.equal(w_b != 0, w_f != 0)  # the weights pass is the same on both engines
    factors = (w_f != 0).double() / 0.75
    ref, _ = reference_attention_variants(q, k, v, dropout_factors=factors)
    assert_close(out_b, ref, brgemm_tol(dtype, v / 0.75))


def test_brgemm_forward_then_backward(monkeypatch) -> None:
    """Training through the layer with the library forward: gradients match the float64
    reference's within the bfloat16 gradient tolerance used everywhere else."""
    from attention_testing import grad_tolerance

    torch.manual_seed(5)
    monkeypatch.setenv(ENV, "brgemm")
    q, k, v = (randn(2, 4, 80, 32, dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    out, _ = torch_mha.attention(q, k, v, is_causal=True)
    grad = randn(*out.shape, dtype=torch.bfloat16)
    got = torch.autograd.grad(out, (q, k, v), grad)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = reference_attention_variants(q64, k64, v64, is_causal=True)
    expected = torch.autograd.grad(ref, (q64, k64, v64), grad.double())
    for name, a, b in zip("qkv", got, expected):
        tol = grad_tolerance(torch.bfloat16, b)
        # The forward output feeds delta = sum(dO * O): the probability rounding shows there too.
        assert_close(a, b, Tol(2 * tol.atol, tol.rtol), name)
