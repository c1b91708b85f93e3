"""Parity of torch_mha.MultiheadAttention with torch.nn.MultiheadAttention.

Every comparison runs a real ``torch.nn.MultiheadAttention`` and a ``torch_mha.MultiheadAttention``
holding the same weights (nn is built first, then ``ours.load_state_dict(ref.state_dict())``) on
the same inputs, and compares outputs, returned weights and the gradients of every input and every
parameter (random upstream gradients on the output and, when returned, on the weights).

Tolerances
----------
* float64: ``atol = rtol = 1e-10``. Both sides compute in float64 and differ only in summation
  order (online softmax and tiled GEMMs against nn's materialised softmax), so errors are a few
  ulp (~1e-15) at these sizes; 1e-10 leaves five orders of magnitude of slack and still catches
  any semantic difference (a wrong mask, scale, bias or head layout changes values at 1e-2).
* float32: outputs and weights ``atol = rtol = 1e-5``; gradients ``atol = 2e-5, rtol = 1e-5``.
  float32 has eps ~1.2e-7; the outputs pass through two projections and an attention sum, so
  both sides carry a few 1e-7 of rounding error (measured: max |ours - nn| on outputs ~2e-7).
  The backward pass adds the softmax backward ``dS = P * (dP - rowsum(dO * O))``, a difference
  of nearly equal numbers, and parameter gradients (magnitudes up to ~15 here) sum over every
  (batch, position) pair, so absolute differences of ~1e-6 are expected from reordering alone
  (measured: at most 1.5e-6 beyond the rtol term over 156 runs); atol 2e-5 leaves >10x headroom
  for other CPUs' vector ISAs. ``test_parity_float32`` additionally checks that torch_mha's
  float32 error against a float64 run is of the order of nn's own float32 error (measured
  ratio <= 2.6, asserted <= 8).

Deliberate differences from nn that are tested as such: fully masked query rows give zeros
(nn: NaN on its need_weights=True path), dropout uses torch_mha's own RNG (checked statistically
and by reconstruction), batch_first outputs are contiguous.

The parity matrix (section 1) is pruned: a deterministic pairwise (all-pairs) selection over every
axis (55 of the 15,840 combinations), plus full cartesian products over the axes whose
interactions matter most (mask kind x weights mode x layout; mask kind x bias_kv/zero_attn
padding x weights on/off x cross/self; layout x projection branch x bias x bias_kv x zero_attn x
weights on/off).

Sections: 1 parity matrix, is_causal, float-mask gradients / huge negative masks / large logits;
2 non-contiguous inputs; 3 empty inputs; 4 module surface; 5 inside nn.Transformer*Layer;
6 fully masked rows; 7 dropout; 8 functional interface.

Devices: every comparison that computes takes the `device` fixture (tests/conftest.py) and runs
nn and torch_mha on the same device, the CPU and CUDA (reported as skipped without a GPU). The
module-surface tests of section 4 (parameter names, state_dict, pickling, attributes) do not
depend on the device and run on the CPU only. On CUDA, float32 tolerances get
conftest.tolerance_factor (2x): torch_mha's CUDA kernels and nn's CUDA paths sum in other orders
than the CPU measurements above; float64 keeps its tolerances.
"""

from __future__ import annotations

import copy
import io
import itertools
import math
import pickle
import random
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F
from conftest import tolerance_factor
from reference import reference_attention
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import torch_mha

F64_TOL: Dict[str, float] = {"atol": 1e-10, "rtol": 1e-10}
F32_OUT_TOL: Dict[str, float] = {"atol": 1e-5, "rtol": 1e-5}
F32_GRAD_TOL: Dict[str, float] = {"atol": 2e-5, "rtol": 1e-5}

MISMATCH_WARNING = "Support for mismatched key_padding_mask and attn_mask is deprecated"

OursMHA = torch_mha.MultiheadAttention
Pair = Tuple[nn.MultiheadAttention, torch_mha.MultiheadAttention]


def tol_for(dtype: torch.dtype, *, grad: bool = False, device: str = "cpu") -> Dict[str, float]:
    if dtype == torch.float64:
        return F64_TOL
    tol = F32_GRAD_TOL if grad else F32_OUT_TOL
    factor = tolerance_factor(device, dtype)  # 2x for float32 on CUDA (see conftest.py)
    return {name: value * factor for name, value in tol.items()}


# ---------------------------------------------------------------------------------------------
# Helpers: module pairs, inputs, masks, running a module, comparing results
# ---------------------------------------------------------------------------------------------


def make_pair(
    embed_dim: int,
    num_heads: int,
    *,
    dropout: float = 0.0,
    bias: bool = True,
    add_bias_kv: bool = False,
    add_zero_attn: bool = False,
    kdim: Optional[int] = None,
    vdim: Optional[int] = None,
    batch_first: bool = False,
    dtype: torch.dtype = torch.float64,
    randomize_biases: bool = True,
    device: str = "cpu",
) -> Pair:
    """(nn module, torch_mha module) with identical weights, on `device`.

    nn initialises every bias to zero, which would hide bias bugs, so biases are randomised first.
    The modules are initialised on the CPU (the same weights for every device) and moved.
    """
    kwargs = dict(
        dropout=dropout,
        bias=bias,
        add_bias_kv=add_bias_kv,
        add_zero_attn=add_zero_attn,
        kdim=kdim,
        vdim=vdim,
        batch_first=batch_first,
        dtype=dtype,
    )
    ref = nn.MultiheadAttention(embed_dim, num_heads, **kwargs)
    if randomize_biases:
        with torch.no_grad():
            for name, param in ref.named_parameters():
                if "bias" in name:
                    param.copy_(0.5 * torch.randn_like(param))
    ours = OursMHA(embed_dim, num_heads, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref.to(device), ours.to(device)


@dataclass
class Inputs:
    """What forward receives, plus the leaf tensors gradients are taken for.

    The same Inputs object is run through both modules: torch.autograd.grad never accumulates
    into ``.grad``, so sharing leaves is safe and keeps ``query is key is value`` identities.
    """

    query: Tensor
    key: Tensor
    value: Tensor
    leaves: Dict[str, Tensor]
    key_padding_mask: Optional[Tensor] = None
    attn_mask: Optional[Tensor] = None


@dataclass
class Result:
    out: Tensor
    weights: Optional[Tensor]
    grads: Dict[str, Tensor]


def run(
    module: nn.Module,
    inp: Inputs,
    *,
    need_weights: bool = True,
    average_attn_weights: bool = True,
    is_causal: bool = False,
    grad_weights: bool = True,
    upstream_seed: int = 1234,
) -> Result:
    """Forward + backward with random upstream gradients.

    Returns the output, the weights, and the gradient of every input leaf ("input:<name>") and of
    every parameter (by its name). Gradients that autograd reports as unused become zeros.
    """
    out, weights = module(
        inp.query,
        inp.key,
        inp.value,
        key_padding_mask=inp.key_padding_mask,
        need_weights=need_weights,
        attn_mask=inp.attn_mask,
        average_attn_weights=average_attn_weights,
        is_causal=is_causal,
    )
    return Result(
        out, weights, backward(module, inp.leaves, out, weights, grad_weights, upstream_seed)
    )


def backward(
    module: Optional[nn.Module],
    leaves: Dict[str, Tensor],
    out: Tensor,
    weights: Optional[Tensor],
    grad_weights: bool = True,
    upstream_seed: int = 1234,
    extra: Optional[Dict[str, Tensor]] = None,
) -> Dict[str, Tensor]:
    # Upstream gradients are drawn in float64 and cast, so float32 and float64 runs of the same
    # problem get the same upstream values.
    # They are drawn on the CPU (the same values on every device) and moved to the output's.
    gen = torch.Generator().manual_seed(upstream_seed)
    up_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    loss = (out * up_out.to(device=out.device, dtype=out.dtype)).sum()
    if weights is not None and grad_weights:
        up_w = torch.randn(weights.shape, generator=gen, dtype=torch.float64)
        loss = loss + (weights * up_w.to(device=weights.device, dtype=weights.dtype)).sum()
    targets: Dict[str, Tensor] = {f"input:{k}": v for k, v in leaves.items()}
    if module is not None:
        targets.update({k: p for k, p in module.named_parameters() if p.requires_grad})
    if extra:
        targets.update(extra)
    grads = torch.autograd.grad(loss, list(targets.values()), allow_unused=True)
    return {
        name: (torch.zeros_like(t) if g is None else g)
        for (name, t), g in zip(targets.items(), grads)
    }


def assert_results_close(
    ours: Result,
    ref: Result,
    *,
    out_tol: Dict[str, float],
    grad_tol: Dict[str, float],
    check_grads: bool = True,
) -> None:
    assert ours.out.shape == ref.out.shape, (ours.out.shape, ref.out.shape)
    assert ours.out.dtype == ref.out.dtype
    torch.testing.assert_close(ours.out, ref.out, **out_tol, msg=lambda m: f"output: {m}")
    if ref.weights is None:
        assert ours.weights is None
    else:
        assert ours.weights is not None
        assert ours.weights.shape == ref.weights.shape, (ours.weights.shape, ref.weights.shape)
        torch.testing.assert_close(
            ours.weights, ref.weights, **out_tol, msg=lambda m: f"weights: {m}"
        )
    if check_grads:
        assert ours.grads.keys() == ref.grads.keys()
        for name, g_ref in ref.grads.items():
            g = ours.grads[name]
            assert torch.isfinite(g).all(), name
            torch.testing.assert_close(g, g_ref, **grad_tol, msg=lambda m, n=name: f"grad {n}: {m}")


def seq_shape(batch: Optional[int], length: int, dim: int, batch_first: bool) -> Tuple[int, ...]:
    if batch is None:
        return (length, dim)
    return (batch, length, dim) if batch_first else (length, batch, dim)


def float_mask_from(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive mask: -inf where ``mask`` is True, random finite values elsewhere (drawn on the
    CPU, on ``mask``'s device)."""
    values = torch.randn(mask.shape, dtype=dtype).to(mask.device)
    return values.masked_fill(mask, float("-inf"))


def to_device(t: Optional[Tensor], device: str) -> Optional[Tensor]:
    """t on device (None stays None); a tensor that requires grad becomes a leaf there."""
    if t is None:
        return None
    return t.detach().to(device).requires_grad_(t.requires_grad)


def make_masks(
    kind: str, *, batch: Optional[int], heads: int, L: int, S: int, dtype: torch.dtype
) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """(key_padding_mask, attn_mask) for a mask kind of the parity matrix.

    Each batch element n keeps one randomly chosen key ``visible[n]`` unmasked by every mask, so
    no query row is ever fully masked (nn gives NaN there on its need_weights path).
    """
    n = 1 if batch is None else batch
    visible = torch.randint(0, S, (n,))

    def kpm_bool() -> Tensor:
        m = torch.rand(n, S) < 0.35
        m[torch.arange(n), visible] = False
        return m if batch is not None else m[0]

    def am_bool(dim: int) -> Tensor:
        if dim == 2:
            m = torch.rand(L, S) < 0.35
            m[:, visible] = False
            return m
        m = torch.rand(n, heads, L, S) < 0.35
        for b in range(n):
            m[b, :, :, visible[b]] = False
        return m.reshape(n * heads, L, S)  # row n * H + h (batch-major), (H, L, S) unbatched

    def fl(m: Tensor) -> Tensor:
        return float_mask_from(m, dtype)

    table: Dict[str, Callable[[], Tuple[Optional[Tensor], Optional[Tensor]]]] = {
        "none": lambda: (None, None),
        "kpm_bool": lambda: (kpm_bool(), None),
        "kpm_float": lambda: (fl(kpm_bool()), None),
        "am2_bool": lambda: (None, am_bool(2)),
        "am2_float": lambda: (None, fl(am_bool(2))),
        "am3_bool": lambda: (None, am_bool(3)),
        "am3_float": lambda: (None, fl(am_bool(3))),
        "both_bool": lambda: (kpm_bool(), am_bool(3)),
        "both_float": lambda: (fl(kpm_bool()), fl(am_bool(2))),
        "mixed_kpm_bool": lambda: (kpm_bool(), fl(am_bool(2))),
        "mixed_kpm_float": lambda: (fl(kpm_bool()), am_bool(3)),
    }
    return table[kind]()


# ---------------------------------------------------------------------------------------------
# 1. The parity matrix
# ---------------------------------------------------------------------------------------------

LAYOUTS = ["seq_first", "batch_first", "unbatched", "unbatched_bf"]
# Projection kind x how q, k, v are passed:
#   cross: packed weights, three distinct tensors, L != S
#   self: packed weights, the SAME tensor object for q, k, v (single-GEMM branch), L == S
#   kv_same: packed weights, key is value (encoder-decoder branch), L != S
#   sep_cross / sep_kv_same: kdim/vdim != embed_dim (separate projection weights)
KINDS = ["cross", "self", "kv_same", "sep_cross", "sep_kv_same"]
WEIGHT_MODES = ["avg", "per_head", "none"]  # need_weights x average_attn_weights
MASKS = [
    "none",
    "kpm_bool",
    "kpm_float",
    "am2_bool",
    "am2_float",
    "am3_bool",
    "am3_float",
    "both_bool",
    "both_float",
    "mixed_kpm_bool",
    "mixed_kpm_float",
]
DIMS = [(16, 4), (24, 3), (16, 2)]


@dataclass(frozen=True)
class Case:
    layout: str = "seq_first"
    kind: str = "cross"
    bias: bool = True
    add_bias_kv: bool = False
    add_zero_attn: bool = False
    weights: str = "avg"
    mask: str = "none"
    dims: Tuple[int, int] = (16, 4)
    dtype: torch.dtype = torch.float64

    @property
    def batch(self) -> Optional[int]:
        return None if self.layout.startswith("unbatched") else 3

    @property
    def batch_first(self) -> bool:
        return self.layout in ("batch_first", "unbatched_bf")

    @property
    def lengths(self) -> Tuple[int, int]:
        return {"self": (6, 6), "kv_same": (7, 4), "sep_kv_same": (7, 4)}.get(self.kind, (5, 7))

    @property
    def kv_dims(self) -> Tuple[Optional[int], Optional[int]]:
        return {"sep_cross": (10, 6), "sep_kv_same": (10, 10)}.get(self.kind, (None, None))

    @property
    def id(self) -> str:
        parts = [
            self.layout,
            self.kind,
            "bias" if self.bias else "nobias",
            "biaskv" if self.add_bias_kv else "",
            "zeroattn" if self.add_zero_attn else "",
            f"w_{self.weights}",
            self.mask,
            f"E{self.dims[0]}H{self.dims[1]}",
            "f32" if self.dtype == torch.float32 else "",
        ]
        return "-".join(p for p in parts if p)


def make_case_inputs(case: Case, device: str = "cpu") -> Inputs:
    """Inputs drawn on the CPU (the same values for every device) as leaves on ``device``."""
    E, H = case.dims
    L, S = case.lengths
    kdim, vdim = case.kv_dims
    kdim, vdim = kdim or E, vdim or E
    N, bf, dt = case.batch, case.batch_first, case.dtype

    def leaf(length: int, dim: int) -> Tensor:
        return torch.randn(seq_shape(N, length, dim, bf), dtype=dt).to(device).requires_grad_()

    if case.kind == "self":
        x = leaf(L, E)
        q = k = v = x
        leaves = {"qkv": x}
    elif case.kind in ("kv_same", "sep_kv_same"):
        q, k = leaf(L, E), leaf(S, kdim)
        v = k
        leaves = {"query": q, "kv": k}
    else:
        q, k, v = leaf(L, E), leaf(S, kdim), leaf(S, vdim)
        leaves = {"query": q, "key": k, "value": v}
    kpm, am = make_masks(case.mask, batch=N, heads=H, L=L, S=S, dtype=dt)
    return Inputs(q, k, v, leaves, to_device(kpm, device), to_device(am, device))


def check_parity(case: Case, device: str = "cpu") -> None:
    E, H = case.dims
    kdim, vdim = case.kv_dims
    ref, ours = make_pair(
        E,
        H,
        bias=case.bias,
        add_bias_kv=case.add_bias_kv,
        add_zero_attn=case.add_zero_attn,
        kdim=kdim,
        vdim=vdim,
        batch_first=case.batch_first,
        dtype=case.dtype,
        device=device,
    )
    inp = make_case_inputs(case, device)
    if case.kind == "self":
        assert inp.query is inp.key is inp.value
    if "kv_same" in case.kind:
        assert inp.key is inp.value and inp.query is not inp.key
    kwargs = dict(
        need_weights=case.weights != "none",
        average_attn_weights=case.weights == "avg",
    )

    with warnings.catch_warnings(record=True) as ref_warnings:
        warnings.simplefilter("always")
        ref_res = run(ref, inp, **kwargs)
    if case.mask.startswith("mixed"):
        assert any(MISMATCH_WARNING in str(w.message) for w in ref_warnings)  # premise
        with pytest.warns(UserWarning, match=MISMATCH_WARNING):
            ours_res = run(ours, inp, **kwargs)
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*mismatched.*")
            ours_res = run(ours, inp, **kwargs)

    assert_results_close(
        ours_res,
        ref_res,
        out_tol=tol_for(case.dtype, device=device),
        grad_tol=tol_for(case.dtype, grad=True, device=device),
    )
    assert ours_res.out.device == inp.query.device
    # Expected shapes spelled out (not only "same as nn").
    L, S = case.lengths
    S_total = S + int(case.add_bias_kv) + int(case.add_zero_attn)
    assert ours_res.out.shape == seq_shape(case.batch, L, E, case.batch_first)
    if case.weights != "none":
        heads = () if case.weights == "avg" else (H,)
        batch = () if case.batch is None else (case.batch,)
        assert ours_res.weights.shape == batch + heads + (L, S_total)
    # Deliberate difference: batch_first outputs are contiguous.
    assert ours_res.out.is_contiguous()


def pairwise(axes: Dict[str, Sequence], seed: int = 0, candidates: int = 30) -> List[Dict]:
    """Deterministic greedy all-pairs covering array: every pair of values of every two axes
    appears in at least one returned row (AETG-style construction)."""
    names = list(axes)
    sizes = [len(axes[n]) for n in names]
    uncovered = {
        (i, a, j, b)
        for i, j in itertools.combinations(range(len(names)), 2)
        for a in range(sizes[i])
        for b in range(sizes[j])
    }
    rng = random.Random(seed)

    def gain(row: Dict[int, int], axis: int, value: int) -> int:
        return sum(
            (
                (
                    min(axis, o),
                    row[o] if o < axis else value,
                    max(axis, o),
                    value if o < axis else row[o],
                )
                in uncovered
            )
            for o in row
        )

    rows: List[List[int]] = []
    while uncovered:
        i, a, j, b = min(uncovered)
        best: Optional[List[int]] = None
        best_cover = -1
        for _ in range(candidates):
            row = {i: a, j: b}
            order = [k for k in range(len(names)) if k not in row]
            rng.shuffle(order)
            for axis in order:
                gains = [gain(row, axis, v) for v in range(sizes[axis])]
                top = max(gains)
                row[axis] = rng.choice([v for v, g in enumerate(gains) if g == top])
            full = [row[k] for k in range(len(names))]
            cover = sum(
                (x, full[x], y, full[y]) in uncovered
                for x, y in itertools.combinations(range(len(names)), 2)
            )
            if cover > best_cover:
                best, best_cover = full, cover
        assert best is not None
        rows.append(best)
        uncovered -= {
            (x, best[x], y, best[y]) for x, y in itertools.combinations(range(len(names)), 2)
        }
    return [{n: axes[n][v] for n, v in zip(names, row)} for row in rows]


PAIRWISE_AXES: Dict[str, Sequence] = {
    "layout": LAYOUTS,
    "kind": KINDS,
    "bias": [True, False],
    "add_bias_kv": [False, True],
    "add_zero_attn": [False, True],
    "weights": WEIGHT_MODES,
    "mask": MASKS,
    "dims": DIMS,
}
PAIRWISE_CASES = [Case(**row) for row in pairwise(PAIRWISE_AXES)]

# Every mask kind with every weights mode and every layout (the mask plumbing: broadcasting,
# batch-major 3-D masks, unbatched (S,)/(H, L, S) masks, batch_first).
MASK_CASES = [
    Case(layout=layout, weights=weights, mask=mask)
    for mask, weights, layout in itertools.product(MASKS, WEIGHT_MODES, LAYOUTS)
]

# Every mask kind with the extra bias_kv / zero_attn key columns (masks are padded with a
# never-masked column), with and without weights.
PADDING_CASES = [
    Case(kind=kind, add_bias_kv=bkv, add_zero_attn=za, weights=weights, mask=mask)
    for mask, (bkv, za), weights, kind in itertools.product(
        MASKS, [(True, False), (False, True), (True, True)], ["per_head", "none"], ["cross", "self"]
    )
]

# Projection branches x layouts x bias x extra key columns x weights on/off, with both masks
# (head averaging is a plain mean, covered by MASK_CASES and the pairwise selection).
STRUCTURE_CASES = [
    Case(
        layout=layout,
        kind=kind,
        bias=bias,
        add_bias_kv=bkv,
        add_zero_attn=za,
        weights=weights,
        mask="both_bool",
        dims=(24, 3),
    )
    for layout, kind, bias, (bkv, za), weights in itertools.product(
        LAYOUTS,
        KINDS,
        [True, False],
        itertools.product([False, True], repeat=2),
        ["per_head", "none"],
    )
]


@pytest.mark.parametrize("case", PAIRWISE_CASES, ids=lambda c: c.id)
def test_parity_pairwise(case: Case, device: str) -> None:
    """All-pairs selection over every axis of the matrix (float64)."""
    check_parity(case, device)


@pytest.mark.parametrize("case", MASK_CASES, ids=lambda c: c.id)
def test_parity_masks(case: Case, device: str) -> None:
    """mask kind x need_weights/average x layout, full product (float64)."""
    check_parity(case, device)


@pytest.mark.parametrize("case", PADDING_CASES, ids=lambda c: c.id)
def test_parity_masks_with_bias_kv_and_zero_attn(case: Case, device: str) -> None:
    """mask kind x (add_bias_kv, add_zero_attn) x weights x cross/self, full product (float64)."""
    check_parity(case, device)


@pytest.mark.parametrize("case", STRUCTURE_CASES, ids=lambda c: c.id)
def test_parity_projection_branches(case: Case, device: str) -> None:
    """layout x projection kind (packed self / kv / cross, separate) x bias x bias_kv x zero_attn
    x weights on/off, full product (float64)."""
    check_parity(case, device)


def test_pairwise_selection_covers_all_pairs() -> None:
    """The pruned matrix really covers every pair of axis values (guards the generator)."""
    for x, y in itertools.combinations(PAIRWISE_AXES, 2):
        seen = {(getattr(c, x), getattr(c, y)) for c in PAIRWISE_CASES}
        assert seen == set(itertools.product(PAIRWISE_AXES[x], PAIRWISE_AXES[y])), (x, y)
    assert len(PAIRWISE_CASES) < 100  # pruned: the full product has 15,840 cases


F32_CASES = [
    Case(dtype=torch.float32),
    Case(
        layout="batch_first", kind="self", mask="both_bool", weights="per_head", dtype=torch.float32
    ),
    Case(
        layout="unbatched", kind="sep_cross", mask="am3_float", weights="none", dtype=torch.float32
    ),
    Case(
        kind="kv_same", add_bias_kv=True, add_zero_attn=True, mask="kpm_float", dtype=torch.float32
    ),
    Case(
        layout="batch_first",
        kind="sep_kv_same",
        bias=False,
        mask="am2_bool",
        weights="none",
        dims=(24, 3),
        dtype=torch.float32,
    ),
    Case(kind="self", mask="both_float", weights="avg", dims=(16, 2), dtype=torch.float32),
]


@pytest.mark.parametrize("case", F32_CASES, ids=lambda c: c.id)
def test_parity_float32(case: Case, device: str) -> None:
    """float32 parity with nn, and torch_mha's float32 error is of the order of nn's own."""
    check_parity(case, device)

    # Accuracy relative to a float64 run of the same computation.
    E, H = case.dims
    kdim, vdim = case.kv_dims
    ref32, ours32 = make_pair(
        E,
        H,
        bias=case.bias,
        add_bias_kv=case.add_bias_kv,
        add_zero_attn=case.add_zero_attn,
        kdim=kdim,
        vdim=vdim,
        batch_first=case.batch_first,
        dtype=torch.float32,
        device=device,
    )
    ref64 = copy.deepcopy(ref32).double()
    inp32 = make_case_inputs(case, device)
    inp64 = _cast_inputs(inp32, torch.float64)
    kwargs = dict(need_weights=case.weights != "none", average_attn_weights=case.weights == "avg")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exact = run(ref64, inp64, **kwargs)
        theirs = run(ref32, inp32, **kwargs)
        mine = run(ours32, inp32, **kwargs)

    def err(res: Result, name: str) -> float:
        a = res.out if name == "out" else res.grads[name]
        b = exact.out if name == "out" else exact.grads[name]
        return (a.double() - b).abs().max().item()

    for name in ["out", *exact.grads]:
        # 1e-6 floor: below that both are at float32 rounding level of O(1) values.
        assert err(mine, name) <= 8 * err(theirs, name) + 1e-6, (
            name,
            err(mine, name),
            err(theirs, name),
        )


def _cast_inputs(inp: Inputs, dtype: torch.dtype) -> Inputs:
    """Same values in another dtype, preserving q/k/v identities."""
    mapping: Dict[int, Tensor] = {}
    leaves = {}
    for name, t in inp.leaves.items():
        c = t.detach().to(dtype).requires_grad_()
        mapping[id(t)] = c
        leaves[name] = c

    def cast_mask(m: Optional[Tensor]) -> Optional[Tensor]:
        return m if m is None or m.dtype == torch.bool else m.to(dtype)

    kpm, am = cast_mask(inp.key_padding_mask), cast_mask(inp.attn_mask)
    return Inputs(
        mapping[id(inp.query)], mapping[id(inp.key)], mapping[id(inp.value)], leaves, kpm, am
    )


# ---------------------------------------------------------------------------------------------
# 1b. is_causal
# ---------------------------------------------------------------------------------------------


def causal_bool(L: int, S: int, device: str = "cpu") -> Tensor:
    """Top-left aligned causal mask (True = masked), what SDPA's is_causal means."""
    return torch.ones(L, S, dtype=torch.bool, device=device).triu(1)


@pytest.mark.parametrize("shape", ["square_self", "L<S", "L>S"])
@pytest.mark.parametrize("mask_dtype", ["bool", "float"])
@pytest.mark.parametrize("with_kpm", [False, True], ids=["no_kpm", "kpm"])
@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "no_weights"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
def test_is_causal_with_tril_mask(
    batch_first: bool, need_weights: bool, with_kpm: bool, mask_dtype: str, shape: str, device: str
) -> None:
    """is_causal=True with the matching causal attn_mask: same results as nn in every branch
    (need_weights=False without kpm: the kernel's own causal rule; otherwise the mask)."""
    E, H, N = 16, 4, 3
    L, S = {"square_self": (6, 6), "L<S": (4, 7), "L>S": (8, 5)}[shape]
    ref, ours = make_pair(E, H, batch_first=batch_first, device=device)
    mask = causal_bool(L, S, device)
    attn_mask = mask
    if mask_dtype == "float":  # exactly the causal mask: 0 / -inf
        attn_mask = torch.zeros(L, S, dtype=torch.float64, device=device).masked_fill(
            mask, float("-inf")
        )
    kpm = None
    if with_kpm:
        kpm = torch.rand(N, S) < 0.4
        kpm[:, 0] = False  # query 0 sees only key 0 under the causal mask
        if mask_dtype == "float":
            kpm = float_mask_from(kpm, torch.float64)
        kpm = kpm.to(device)
    dt = torch.float64
    if shape == "square_self":
        x = torch.randn(
            seq_shape(N, L, E, batch_first), dtype=dt, device=device, requires_grad=True
        )
        inp = Inputs(x, x, x, {"x": x}, kpm, attn_mask)
    else:
        q = torch.randn(
            seq_shape(N, L, E, batch_first), dtype=dt, device=device, requires_grad=True
        )
        k = torch.randn(
            seq_shape(N, S, E, batch_first), dtype=dt, device=device, requires_grad=True
        )
        v = torch.randn(
            seq_shape(N, S, E, batch_first), dtype=dt, device=device, requires_grad=True
        )
        inp = Inputs(q, k, v, {"q": q, "k": k, "v": v}, kpm, attn_mask)
    for avg in [True, False] if need_weights else [True]:
        kw = dict(need_weights=need_weights, average_attn_weights=avg, is_causal=True)
        assert_results_close(
            run(ours, inp, **kw), run(ref, inp, **kw), out_tol=F64_TOL, grad_tol=F64_TOL
        )
        # The hint is consistent with the mask here, so is_causal=False gives the same result.
        assert_results_close(
            run(ours, inp, **{**kw, "is_causal": False}),
            run(ref, inp, **kw),
            out_tol=F64_TOL,
            grad_tol=F64_TOL,
        )


@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "no_weights"])
@pytest.mark.parametrize("with_kpm", [False, True], ids=["no_kpm", "kpm"])
def test_is_causal_hint_follows_nn_with_wrong_mask(
    need_weights: bool, with_kpm: bool, device: str
) -> None:
    """A wrong hint (is_causal=True with a non-causal mask) behaves exactly as in nn: the causal
    rule replaces the mask only with need_weights=False and no kpm; otherwise the mask is used."""
    E, H, N, L = 16, 2, 2, 6
    ref, ours = make_pair(E, H, device=device)
    x = torch.randn(L, N, E, dtype=torch.float64, device=device, requires_grad=True)
    mask = torch.rand(L, L) < 0.4
    mask[:, L - 1] = False  # the last key stays visible: not causal, never fully masked
    mask = mask.to(device)
    kpm = None
    if with_kpm:
        kpm = torch.zeros(N, L, dtype=torch.bool, device=device)
        kpm[1, 2] = True
    inp = Inputs(x, x, x, {"x": x}, kpm, mask)
    kw = dict(need_weights=need_weights, is_causal=True)
    ours_res = run(ours, inp, **kw)
    assert_results_close(ours_res, run(ref, inp, **kw), out_tol=F64_TOL, grad_tol=F64_TOL)
    masked_res = run(ours, inp, need_weights=need_weights, is_causal=False)
    if need_weights or with_kpm:
        torch.testing.assert_close(ours_res.out, masked_res.out, **F64_TOL)
    else:
        assert not torch.allclose(ours_res.out, masked_res.out)  # the mask was really replaced


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("with_kpm", [False, True], ids=["no_kpm", "kpm"])
@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "no_weights"])
def test_is_causal_without_mask_raises_like_nn(
    batched: bool, with_kpm: bool, need_weights: bool
) -> None:
    E, H, N, L = 16, 4, 2, 5
    ref, ours = make_pair(E, H)
    x = torch.randn((L, N, E) if batched else (L, E), dtype=torch.float64)
    kpm = None
    if with_kpm:
        kpm = torch.zeros((N, L) if batched else (L,), dtype=torch.bool)
    errors = []
    for module in (ref, ours):
        with pytest.raises(Exception) as info:
            module(x, x, x, key_padding_mask=kpm, need_weights=need_weights, is_causal=True)
        errors.append(info.value)
    assert type(errors[1]) is type(errors[0]) is RuntimeError
    assert "Need attn_mask if specifying the is_causal hint" in str(errors[1])


# ---------------------------------------------------------------------------------------------
# 1c. Float masks: gradients, huge negative values, large logits
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra_key", ["plain", "bias_kv", "zero_attn"])
@pytest.mark.parametrize("mask_shape", ["2d", "3d", "unbatched_3d"])
@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "no_weights"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
def test_float_mask_gradients(
    batch_first: bool, need_weights: bool, mask_shape: str, extra_key: str, device: str
) -> None:
    """Float masks are differentiable in nn (e.g. a learned relative-position bias passed as
    attn_mask): gradients w.r.t. attn_mask and key_padding_mask match nn, through the
    bias_kv / zero_attn padding too."""
    E, H, N, L, S = 16, 4, 2, 5, 6
    ref, ours = make_pair(
        E,
        H,
        batch_first=batch_first,
        add_bias_kv=extra_key == "bias_kv",
        add_zero_attn=extra_key == "zero_attn",
        device=device,
    )
    batch: Optional[int] = None if mask_shape == "unbatched_3d" else N
    f64 = dict(dtype=torch.float64, device=device, requires_grad=True)
    q = torch.randn(seq_shape(batch, L, E, batch_first), **f64)
    kv = torch.randn(seq_shape(batch, S, E, batch_first), **f64)
    am_shape = (L, S) if mask_shape == "2d" else ((N if batch else 1) * H, L, S)
    am = torch.randn(am_shape, **f64)
    kpm = torch.randn((N, S) if batch else (S,), **f64)
    inp = Inputs(
        q, kv, kv, {"query": q, "kv": kv, "attn_mask": am, "key_padding_mask": kpm}, kpm, am
    )
    kw = dict(need_weights=need_weights, average_attn_weights=False)
    assert_results_close(
        run(ours, inp, **kw), run(ref, inp, **kw), out_tol=F64_TOL, grad_tol=F64_TOL
    )


HUGE_NEGATIVE = [
    (torch.float64, -1e4),
    (torch.float64, -1e20),
    (torch.float64, torch.finfo(torch.float64).min),
    (torch.float32, -1e9),
    (torch.float32, torch.finfo(torch.float32).min),
]


@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "no_weights"])
@pytest.mark.parametrize("via", ["kpm", "attn_mask"])
@pytest.mark.parametrize(
    "dtype,value", HUGE_NEGATIVE, ids=[f"{str(d)[6:]}_{v:.0e}" for d, v in HUGE_NEGATIVE]
)
def test_huge_negative_float_masks(
    dtype: torch.dtype, value: float, via: str, need_weights: bool, device: str
) -> None:
    """Masks that use a large finite negative number instead of -inf (``masked_fill(m, -1e9)``,
    ``torch.finfo(dtype).min`` as in Hugging Face models). A row whose every key carries that
    value is NOT fully masked for nn: its scores all round to the same value and nn's softmax
    (which subtracts the row max) gives exactly uniform weights 1/S. The values are chosen so
    that this absorption is exact in the dtype (|score| << ulp(value)), which makes nn's result
    exact and comparable at the usual tolerances.

    The reference is nn's exact-math path: need_weights=True does the softmax itself, and
    need_weights=False runs under ``sdpa_kernel(SDPBackend.MATH)``. nn's default
    need_weights=False path on the CPU is the flash SDPA kernel, whose BACKWARD is wrong for
    such rows: it keeps one log-sum-exp per row, lse = max + log(S), where log(S) rounds away
    next to |value|, so it recomputes the probabilities as exp(s - lse) = 1 instead of 1/S and
    returns gradients S times too large for those rows (its forward output is right; torch
    2.13, measured: gradient norms exactly 6x the math path's for S = 6). torch_mha keeps the
    row statistics as (offset, log_sum) and matches the exact math, in both need_weights
    modes."""
    E, H, N, L, S = 16, 4, 2, 5, 6
    ref, ours = make_pair(E, H, dtype=dtype, device=device)
    q = torch.randn(L, N, E, dtype=dtype, device=device, requires_grad=True)
    kv = torch.randn(S, N, E, dtype=dtype, device=device, requires_grad=True)
    kpm = am = None
    if via == "kpm":
        kpm = torch.zeros(N, S, dtype=dtype, device=device)
        kpm[0, :] = value  # every key of batch 0
        kpm[1, 2:4] = value
    else:
        am = torch.zeros(L, S, dtype=dtype, device=device)
        am[1, :] = value  # every key of query 1
        am[3, ::2] = value
    inp = Inputs(q, kv, kv, {"query": q, "kv": kv}, kpm, am)
    kw = dict(need_weights=need_weights, average_attn_weights=False)
    with sdpa_kernel(SDPBackend.MATH):  # nn's exact-math path (not the CPU flash backward)
        ref_res = run(ref, inp, **kw)
    assert torch.isfinite(ref_res.out).all()  # the premise: no NaN on nn's side
    ours_res = run(ours, inp, **kw)
    if need_weights:
        # Weights are probabilities: every row sums to one.
        sums = ours_res.weights.sum(-1)
        torch.testing.assert_close(sums, torch.ones_like(sums), **tol_for(dtype, device=device))
    assert_results_close(
        ours_res,
        ref_res,
        out_tol=tol_for(dtype, device=device),
        grad_tol=tol_for(dtype, grad=True, device=device),
    )


@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "no_weights"])
@pytest.mark.parametrize("scale", [10.0, 40.0])
def test_large_logits(scale: float, need_weights: bool, device: str) -> None:
    """Inputs scaled up so that the scores reach hundreds (near one-hot softmax, exp overflow
    without max subtraction): same results as nn in float64."""
    E, H, N, L, S = 16, 2, 2, 6, 9
    ref, ours = make_pair(E, H, device=device)
    q = (scale * torch.randn(L, N, E, dtype=torch.float64, device=device)).requires_grad_()
    k = (scale * torch.randn(S, N, E, dtype=torch.float64, device=device)).requires_grad_()
    v = torch.randn(S, N, E, dtype=torch.float64, device=device, requires_grad=True)
    kpm = torch.rand(N, S) < 0.3
    kpm[:, 0] = False
    kpm = kpm.to(device)
    inp = Inputs(q, k, v, {"q": q, "k": k, "v": v}, kpm)
    kw = dict(need_weights=need_weights, average_attn_weights=False)
    ours_res = run(ours, inp, **kw)
    ref_res = run(ref, inp, **kw)
    if need_weights:
        assert ref_res.weights.max() > 0.999  # the premise: nearly one-hot rows
    # Gradients of near-saturated softmax are products of large scores and tiny probabilities;
    # compare them relative to their scale.
    assert_results_close(ours_res, ref_res, out_tol=F64_TOL, grad_tol=F64_TOL)


# ---------------------------------------------------------------------------------------------
# 2. Non-contiguous inputs
# ---------------------------------------------------------------------------------------------

NONCONTIG_VARIANTS = [
    "transposed",
    "strided_embed",
    "expanded_batch",
    "self_transposed",
    "batch_first_transposed",
    "masks_noncontig",
    "sep_kv_permuted",
]


def _noncontig_inputs(
    variant: str, E: int, H: int, N: int, L: int, S: int, kdim: int, device: str = "cpu"
) -> Tuple[Inputs, bool]:
    """Inputs built as non-contiguous views of leaf tensors; returns (inputs, batch_first)."""
    dt = torch.float64

    def leaf(*shape: int) -> Tensor:
        return torch.randn(*shape, dtype=dt, device=device, requires_grad=True)

    if variant == "transposed":  # (L, N, E) views of batch-major storage
        a, b, c = leaf(N, L, E), leaf(N, S, E), leaf(N, S, E)
        return Inputs(
            a.transpose(0, 1), b.transpose(0, 1), c.transpose(0, 1), {"a": a, "b": b, "c": c}
        ), False
    if variant == "strided_embed":  # last-dim stride 2
        a, b, c = leaf(L, N, 2 * E), leaf(S, N, 2 * E), leaf(S, N, 2 * E)
        return Inputs(a[..., ::2], b[..., 1::2], c[..., ::2], {"a": a, "b": b, "c": c}), False
    if variant == "expanded_batch":  # stride-0 batch dimension (gradients accumulate over it)
        a, b, c = leaf(L, 1, E), leaf(S, 1, E), leaf(S, N, E)
        return Inputs(a.expand(L, N, E), b.expand(S, N, E), c, {"a": a, "b": b, "c": c}), False
    if variant == "self_transposed":  # the same non-contiguous object for q, k, v
        a = leaf(N, L, E)
        x = a.transpose(0, 1)
        return Inputs(x, x, x, {"a": a}), False
    if (
        variant == "batch_first_transposed"
    ):  # batch_first inputs that are views of seq-first storage
        a, b = leaf(L, N, E), leaf(S, N, E)
        kv = b.transpose(0, 1)
        return Inputs(a.transpose(0, 1), kv, kv, {"a": a, "b": b}), True
    if variant == "masks_noncontig":
        a, b, c = leaf(L, N, E), leaf(S, N, E), leaf(S, N, E)
        kpm_storage = torch.zeros(S, N, dtype=dt).masked_fill(torch.rand(S, N) < 0.3, float("-inf"))
        kpm = kpm_storage.to(device).t()  # (N, S) float mask, non-contiguous
        kpm[:, 0] = 0.0
        am_storage = torch.randn(N * H, S, L, dtype=dt, device=device)
        am = am_storage.transpose(1, 2)  # (N*H, L, S) float mask, non-contiguous
        assert not kpm.is_contiguous() and not am.is_contiguous()
        return Inputs(a, b, c, {"a": a, "b": b, "c": c}, kpm, am), False
    if variant == "sep_kv_permuted":  # kdim != E, batch_first, inputs permuted from (E, N, L)
        a, b, c = leaf(E, N, L), leaf(kdim, S, N), leaf(S, kdim, N)
        return (
            Inputs(
                a.permute(1, 2, 0), b.permute(2, 1, 0), c.permute(2, 0, 1), {"a": a, "b": b, "c": c}
            ),
            True,
        )
    raise AssertionError(variant)


@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "no_weights"])
@pytest.mark.parametrize("variant", NONCONTIG_VARIANTS)
def test_noncontiguous_inputs(variant: str, need_weights: bool, device: str) -> None:
    """Non-contiguous views give the same results as contiguous copies and as nn."""
    E, H, N, L, S, kdim = 16, 4, 3, 5, 7, 12
    if variant == "self_transposed":
        S = L
    inp, batch_first = _noncontig_inputs(variant, E, H, N, L, S, kdim, device)
    sep = variant == "sep_kv_permuted"
    ref, ours = make_pair(
        E,
        H,
        batch_first=batch_first,
        kdim=kdim if sep else None,
        vdim=kdim if sep else None,
        device=device,
    )
    if variant != "masks_noncontig":
        assert not inp.query.is_contiguous()

    def contiguous_copy(x: Inputs) -> Inputs:
        cache: Dict[int, Tensor] = {}
        for t in (x.query, x.key, x.value):
            cache.setdefault(id(t), t.contiguous())
        masks = [None if m is None else m.contiguous() for m in (x.key_padding_mask, x.attn_mask)]
        return Inputs(cache[id(x.query)], cache[id(x.key)], cache[id(x.value)], x.leaves, *masks)

    kw = dict(need_weights=need_weights, average_attn_weights=False)
    ours_res = run(ours, inp, **kw)
    assert_results_close(ours_res, run(ref, inp, **kw), out_tol=F64_TOL, grad_tol=F64_TOL)
    assert_results_close(
        ours_res, run(ours, contiguous_copy(inp), **kw), out_tol=F64_TOL, grad_tol=F64_TOL
    )
    assert ours_res.out.is_contiguous()


# ---------------------------------------------------------------------------------------------
# 3. Empty inputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra_key", ["plain", "zero_attn", "bias_kv"])
@pytest.mark.parametrize("with_kpm", [False, True], ids=["no_kpm", "kpm"])
@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "no_weights"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
@pytest.mark.parametrize("empty", ["N=0", "L=0", "S=0"])
def test_empty_inputs(
    empty: str, batch_first: bool, need_weights: bool, with_kpm: bool, extra_key: str, device: str
) -> None:
    """Zero batch, zero queries, zero keys: shapes, values and gradients as nn.

    Observed nn behaviour (torch 2.13, CPU), documented here: no NaN anywhere. With S=0 its
    weights are (N, L, 0) (empty, so nothing can be NaN) and its output is out_proj.bias, which
    torch_mha's "zero attention output for rows without visible keys" rule also gives. With
    add_zero_attn/bias_kv, S=0 still leaves one key. nn raises with a key_padding_mask and
    need_weights=False when N=0 or S=0 (a reshape of an empty tensor with -1); there torch_mha
    must work and is compared with nn's need_weights=True path.
    """
    N, L, S = {"N=0": (0, 4, 5), "L=0": (3, 0, 5), "S=0": (3, 4, 0)}[empty]
    E, H = 16, 4
    ref, ours = make_pair(
        E,
        H,
        batch_first=batch_first,
        add_zero_attn=extra_key == "zero_attn",
        add_bias_kv=extra_key == "bias_kv",
        device=device,
    )
    f64 = dict(dtype=torch.float64, device=device, requires_grad=True)
    q = torch.randn(seq_shape(N, L, E, batch_first), **f64)
    k = torch.randn(seq_shape(N, S, E, batch_first), **f64)
    v = torch.randn(seq_shape(N, S, E, batch_first), **f64)
    kpm = torch.zeros(N, S, dtype=torch.bool, device=device) if with_kpm else None
    inp = Inputs(q, k, v, {"q": q, "k": k, "v": v}, kpm)
    kw = dict(need_weights=need_weights, average_attn_weights=False)
    ours_res = run(ours, inp, **kw)
    try:
        ref_res = run(ref, inp, **kw)
    except RuntimeError as e:
        # nn (2.13) fails with a key_padding_mask and need_weights=False when N=0 or S=0
        # ("cannot reshape tensor of 0 elements into shape [N, H, -1, S]"). Compare with its
        # need_weights=True path instead (same output; no upstream gradient on the weights).
        assert "cannot reshape tensor of 0 elements" in str(e) and with_kpm and not need_weights
        nn_res = run(ref, inp, need_weights=True, average_attn_weights=False, grad_weights=False)
        ref_res = Result(nn_res.out, None, nn_res.grads)
    assert_results_close(ours_res, ref_res, out_tol=F64_TOL, grad_tol=F64_TOL)
    if empty == "S=0" and extra_key == "plain":
        torch.testing.assert_close(
            ours_res.out, ours.out_proj.bias.detach().expand_as(ours_res.out), **F64_TOL
        )


# ---------------------------------------------------------------------------------------------
# 4. Module surface
#
# CPU-only: parameter names, state_dict, initialisation, attributes and pickling do not depend on
# the device the module computes on.
# ---------------------------------------------------------------------------------------------

SURFACE_CONFIGS = [
    dict(),
    dict(bias=False),
    dict(add_bias_kv=True),
    dict(add_bias_kv=True, add_zero_attn=True, bias=False),
    dict(kdim=10, vdim=6),
    dict(kdim=10, vdim=6, bias=False, add_bias_kv=True),
    dict(kdim=16, vdim=16),  # explicit kdim == embed_dim is still packed
    dict(kdim=10),
    dict(batch_first=True, dropout=0.25),
]


def _cfg_id(cfg: Dict) -> str:
    return ",".join(f"{k}={v}" for k, v in cfg.items()) or "default"


@pytest.mark.parametrize("cfg", SURFACE_CONFIGS, ids=_cfg_id)
def test_parameter_names_shapes_and_order(cfg: Dict) -> None:
    ref = nn.MultiheadAttention(16, 4, **cfg)
    ours = OursMHA(16, 4, **cfg)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert [p.shape for p in ours.parameters()] == [p.shape for p in ref.parameters()]
    assert list(ours.state_dict().keys()) == list(ref.state_dict().keys())
    assert [b for b, _ in ours.named_buffers()] == [b for b, _ in ref.named_buffers()]
    assert [(n, type(m).__name__) for n, m in ours.named_modules()][1:] == [
        (n, type(m).__name__) for n, m in ref.named_modules()
    ][1:]
    assert isinstance(ours.out_proj, type(ref.out_proj))


@pytest.mark.parametrize("cfg", SURFACE_CONFIGS, ids=_cfg_id)
def test_state_dict_round_trip(cfg: Dict) -> None:
    """nn -> ours -> nn, strict, values preserved exactly; both directions."""
    ref = nn.MultiheadAttention(16, 4, **cfg)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_()
    ours = OursMHA(16, 4, **cfg)
    ours.load_state_dict(ref.state_dict(), strict=True)
    back = nn.MultiheadAttention(16, 4, **cfg)
    back.load_state_dict(ours.state_dict(), strict=True)
    for (n1, t1), (n2, t2), (n3, t3) in zip(
        ref.state_dict().items(), ours.state_dict().items(), back.state_dict().items()
    ):
        assert n1 == n2 == n3
        assert torch.equal(t1, t2) and torch.equal(t1, t3)
    # Through a serialized checkpoint as well.
    buf = io.BytesIO()
    torch.save(ours.state_dict(), buf)
    buf.seek(0)
    again = OursMHA(16, 4, **cfg)
    again.load_state_dict(torch.load(buf), strict=True)
    for t1, t2 in zip(again.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(t1, t2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cfg", SURFACE_CONFIGS, ids=_cfg_id)
def test_init_parity(cfg: Dict, dtype: torch.dtype) -> None:
    """Same seed -> bitwise-identical initial parameters (same distributions, same draw order)."""
    torch.manual_seed(1234)
    ref = nn.MultiheadAttention(24, 4, dtype=dtype, **cfg)
    torch.manual_seed(1234)
    ours = OursMHA(24, 4, dtype=dtype, **cfg)
    for (n1, p1), (n2, p2) in zip(ref.named_parameters(), ours.named_parameters()):
        assert n1 == n2
        assert p1.dtype == p2.dtype == dtype
        assert torch.equal(p1, p2), n1
    # And the RNG is left in the same state (nothing extra drawn).
    torch.manual_seed(1234)
    nn.MultiheadAttention(24, 4, dtype=dtype, **cfg)
    after_ref = torch.rand(4)
    torch.manual_seed(1234)
    OursMHA(24, 4, dtype=dtype, **cfg)
    assert torch.equal(torch.rand(4), after_ref)


ATTRIBUTES = [
    "embed_dim",
    "kdim",
    "vdim",
    "_qkv_same_embed_dim",
    "num_heads",
    "dropout",
    "batch_first",
    "head_dim",
    "add_zero_attn",
    "training",
]
TENSOR_ATTRIBUTES = [
    "bias_k",
    "bias_v",
    "in_proj_weight",
    "in_proj_bias",
    "q_proj_weight",
    "k_proj_weight",
    "v_proj_weight",
]


@pytest.mark.parametrize("cfg", SURFACE_CONFIGS, ids=_cfg_id)
def test_attributes_match(cfg: Dict) -> None:
    ref = nn.MultiheadAttention(16, 4, **cfg)
    ours = OursMHA(16, 4, **cfg)
    ours.load_state_dict(ref.state_dict())
    for name in ATTRIBUTES:
        assert getattr(ours, name) == getattr(ref, name), name
        assert type(getattr(ours, name)) is type(getattr(ref, name)), name
    for name in TENSOR_ATTRIBUTES:
        a, b = getattr(ours, name), getattr(ref, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert isinstance(a, nn.Parameter) and a.shape == b.shape and torch.equal(a, b), name
    assert isinstance(ours.out_proj, nn.Linear)
    assert ours.out_proj.in_features == ref.out_proj.in_features
    assert ours.out_proj.out_features == ref.out_proj.out_features
    assert (ours.out_proj.bias is None) == (ref.out_proj.bias is None)
    assert "batch_first" in OursMHA.__constants__
    assert repr(ours) == repr(ref)


def test_constructor_errors_like_nn() -> None:
    for args, exc in [
        ((0, 4), ValueError),
        ((16, 0), ValueError),
        ((-16, 4), ValueError),
        ((16, 3), AssertionError),
    ]:
        with pytest.raises(exc):
            nn.MultiheadAttention(*args)
        with pytest.raises(exc):
            OursMHA(*args)
    # Deliberate difference: dropout must be in [0, 1) (nn only fails, if at all, at forward).
    for p in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError):
            OursMHA(16, 4, dropout=p)


@pytest.mark.parametrize(
    "cfg",
    [dict(), dict(kdim=10, vdim=6, add_bias_kv=True), dict(batch_first=True, dropout=0.1)],
    ids=_cfg_id,
)
def test_deepcopy_and_pickle_round_trip(cfg: Dict) -> None:
    ref, ours = make_pair(16, 4, **cfg)
    ours.eval()
    kdim, vdim = cfg.get("kdim", 16), cfg.get("vdim", 16)
    bf = cfg.get("batch_first", False)
    inp = Inputs(
        torch.randn(seq_shape(2, 5, 16, bf), dtype=torch.float64),
        torch.randn(seq_shape(2, 6, kdim, bf), dtype=torch.float64),
        torch.randn(seq_shape(2, 6, vdim, bf), dtype=torch.float64),
        {},
    )
    expected = ours(inp.query, inp.key, inp.value)
    for clone in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        assert type(clone) is OursMHA
        assert clone is not ours and clone.in_proj_bias is not ours.in_proj_bias
        assert not clone.training
        for name in ATTRIBUTES:
            assert getattr(clone, name) == getattr(ours, name)
        for (n1, p1), (n2, p2) in zip(clone.named_parameters(), ours.named_parameters()):
            assert n1 == n2 and torch.equal(p1, p2)
        got = clone(inp.query, inp.key, inp.value)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    # torch.save of the whole module as well.
    buf = io.BytesIO()
    torch.save(ours, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(loaded(inp.query, inp.key, inp.value)[0], expected[0])


def test_setstate_of_old_checkpoint_like_nn() -> None:
    """Pickles made before _qkv_same_embed_dim existed load as packed (as in nn)."""
    for cls in (nn.MultiheadAttention, OursMHA):
        m = cls(16, 4)
        del m._qkv_same_embed_dim
        clone = pickle.loads(pickle.dumps(m))
        assert clone._qkv_same_embed_dim is True


def test_to_dtype_and_train_eval() -> None:
    torch.manual_seed(7)
    ref = nn.MultiheadAttention(16, 4, dropout=0.5)
    ours = OursMHA(16, 4, dropout=0.5)
    ours.load_state_dict(ref.state_dict())
    assert ours.to(torch.float64) is ours
    ref.to(torch.float64)
    for p in ours.parameters():
        assert p.dtype == torch.float64
    assert ours.out_proj.weight.dtype == torch.float64

    x = torch.randn(5, 2, 16, dtype=torch.float64)
    assert ours.training
    assert ours.eval() is ours and not ours.training and not ours.out_proj.training
    ref.eval()
    o1, w1 = ours(x, x, x)
    o2, _ = ours(x, x, x)
    assert torch.equal(o1, o2)  # eval: no dropout, deterministic
    with torch.no_grad():  # nn may take its fast path here
        r, rw = ref(x, x, x)
    torch.testing.assert_close(o1, r, **F64_TOL)
    torch.testing.assert_close(w1, rw, **F64_TOL)

    assert ours.train() is ours and ours.training and ours.out_proj.training
    t1, _ = ours(x, x, x)
    t2, _ = ours(x, x, x)
    assert not torch.allclose(t1, o1)  # dropout active in training
    assert not torch.equal(t1, t2)  # and a fresh mask per call
    ours.train(False)
    assert torch.equal(ours(x, x, x)[0], o1)

    # float32 inputs to a float64 module fail in both (dtype mismatch), not silently.
    for module in (ref, ours):
        with pytest.raises(RuntimeError):
            module(x.float(), x.float(), x.float())


# ---------------------------------------------------------------------------------------------
# 5. Inside nn.TransformerEncoderLayer / nn.TransformerDecoderLayer
# ---------------------------------------------------------------------------------------------


def swap_attention(layer: nn.Module, names: Sequence[str]) -> List[OursMHA]:
    """Replace the named nn.MultiheadAttention children with torch_mha modules, same weights."""
    swapped = []
    for name in names:
        old: nn.MultiheadAttention = getattr(layer, name)
        new = OursMHA(
            old.embed_dim,
            old.num_heads,
            dropout=old.dropout,
            bias=old.in_proj_bias is not None,
            add_bias_kv=old.bias_k is not None,
            add_zero_attn=old.add_zero_attn,
            kdim=old.kdim,
            vdim=old.vdim,
            batch_first=old.batch_first,
            dtype=old.out_proj.weight.dtype,
        )
        new.load_state_dict(old.state_dict())
        setattr(layer, name, new)
        swapped.append(new)
    return swapped


def make_layers(
    kind: str, batch_first: bool, norm_first: bool, device: str = "cpu"
) -> Tuple[nn.Module, nn.Module, List[OursMHA]]:
    """(original layer, copy with torch_mha attention, the torch_mha modules), on `device`
    (built on the CPU, then moved)."""
    E, H = 16, 4
    cls = nn.TransformerEncoderLayer if kind == "encoder" else nn.TransformerDecoderLayer
    original = cls(
        E,
        H,
        dim_feedforward=32,
        dropout=0.0,
        batch_first=batch_first,
        norm_first=norm_first,
        dtype=torch.float64,
    )
    with torch.no_grad():
        for name, p in original.named_parameters():
            if "bias" in name:
                p.copy_(0.3 * torch.randn_like(p))
    swapped = copy.deepcopy(original)
    names = ["self_attn"] if kind == "encoder" else ["self_attn", "multihead_attn"]
    mods = swap_attention(swapped, names)
    assert [n for n, _ in swapped.named_parameters()] == [n for n, _ in original.named_parameters()]
    return original.to(device), swapped.to(device), mods


def layer_inputs(
    kind: str, batch_first: bool, masks: str, device: str = "cpu"
) -> Tuple[Tuple[Tensor, ...], Dict[str, object]]:
    N, L, S, E = 3, 6, 7, 16
    f64 = dict(dtype=torch.float64, device=device)
    x = torch.randn(seq_shape(N, L, E, batch_first), **f64, requires_grad=True)
    kpm = None
    if "kpm" in masks:
        kpm = torch.rand(N, L) < 0.35
        kpm[:, 0] = False  # with a causal mask query 0 sees only key 0
        kpm = kpm.to(device)
    causal = "causal" in masks
    attn_mask = nn.Transformer.generate_square_subsequent_mask(L, **f64) if causal else None
    if kpm is not None and attn_mask is not None:
        # Same mask dtypes (no deprecation warning). Exactly 0 / -inf: nn's fast path turns float
        # masks back into bool (non-zero = masked out).
        kpm = torch.zeros(kpm.shape, **f64).masked_fill(kpm, float("-inf"))
    if kind == "encoder":
        return (x,), dict(src_mask=attn_mask, src_key_padding_mask=kpm, is_causal=causal)
    mem = torch.randn(seq_shape(N, S, E, batch_first), **f64, requires_grad=True)
    mem_kpm = None
    if "kpm" in masks:
        mem_kpm = torch.rand(N, S) < 0.35
        mem_kpm[:, 3] = False
        mem_kpm = mem_kpm.to(device)
    return (x, mem), dict(
        tgt_mask=attn_mask,
        tgt_key_padding_mask=kpm,
        tgt_is_causal=causal,
        memory_key_padding_mask=mem_kpm,
    )


@pytest.mark.parametrize("masks", ["none", "kpm", "causal", "kpm+causal"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_transformer_layer_swap(
    kind: str, batch_first: bool, norm_first: bool, masks: str, device: str
) -> None:
    """The swapped layer matches the original in train mode, eval mode (with gradients) and
    eval + no_grad (where the ORIGINAL encoder layer may take nn's fast path).

    A forward hook on the torch_mha modules counts their calls; a hook also disables nn's
    encoder-layer fast path, so in eval + no_grad torch_mha really computes the attention.
    (test_swapped_layer_plain_inference covers inference without hooks.)"""
    original, swapped, mods = make_layers(kind, batch_first, norm_first, device)
    calls = [0]
    for m in mods:
        m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    args, kwargs = layer_inputs(kind, batch_first, masks, device)
    leaves = {f"arg{i}": a for i, a in enumerate(args)}
    for mode in ["train", "eval", "eval_no_grad"]:
        original.train(mode == "train")
        swapped.train(mode == "train")
        calls[0] = 0
        if mode == "eval_no_grad":
            with torch.no_grad():
                ref_out = original(*args, **kwargs)
                ours_out = swapped(*args, **kwargs)
            torch.testing.assert_close(ours_out, ref_out, **F64_TOL)
        else:
            ref_out = original(*args, **kwargs)
            ours_out = swapped(*args, **kwargs)
            torch.testing.assert_close(ours_out, ref_out, **F64_TOL)
            g_ref = backward(original, leaves, ref_out, None)
            g_ours = backward(swapped, leaves, ours_out, None)
            assert g_ref.keys() == g_ours.keys()
            for name in g_ref:
                torch.testing.assert_close(
                    g_ours[name], g_ref[name], **F64_TOL, msg=lambda m, n=name: f"{n}: {m}"
                )
        assert calls[0] == len(mods), mode


@pytest.mark.parametrize("masks", ["none", "kpm+causal"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_swapped_layer_plain_inference(
    kind: str, batch_first: bool, norm_first: bool, masks: str, device: str
) -> None:
    """Plain inference (eval + no_grad, no hooks), as a user runs it. With batch_first=True,
    nn.TransformerEncoderLayer's own fast path reads the attention module's weights and calls
    ``self_attn.merge_masks(...)`` (a torch.nn.MultiheadAttention method), so the drop-in
    replacement must provide that surface too."""
    original, swapped, _ = make_layers(kind, batch_first, norm_first, device)
    original.eval()
    swapped.eval()
    args, kwargs = layer_inputs(kind, batch_first, masks, device)
    with torch.no_grad():
        ref_out = original(*args, **kwargs)
        ours_out = swapped(*args, **kwargs)
    torch.testing.assert_close(ours_out, ref_out, **F64_TOL)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("mode", ["train", "eval", "eval_no_grad"])
def test_swapped_transformer_encoder_stack(mode: str, device: str) -> None:
    """nn.TransformerEncoder (2 layers, nested-tensor fast path enabled) with every layer's
    self_attn swapped: same output as the original stack, with a key padding mask."""
    E, H, N, L = 16, 4, 3, 6
    layer = nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=True, dtype=torch.float64)
    original = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True)
    swapped = copy.deepcopy(original)
    for enc_layer in swapped.layers:
        swap_attention(enc_layer, ["self_attn"])
    original.to(device)
    swapped.to(device)
    x = torch.randn(N, L, E, dtype=torch.float64, device=device, requires_grad=True)
    kpm = torch.zeros(N, L, dtype=torch.bool, device=device)
    kpm[1, 4:] = True
    kpm[2, 5:] = True  # left-aligned padding, as the nested-tensor path wants
    original.train(mode == "train")
    swapped.train(mode == "train")
    if mode == "eval_no_grad":
        with torch.no_grad():
            ref_out = original(x, src_key_padding_mask=kpm)
            ours_out = swapped(x, src_key_padding_mask=kpm)
        torch.testing.assert_close(ours_out, ref_out, **F64_TOL)
        return
    ref_out = original(x, src_key_padding_mask=kpm)
    ours_out = swapped(x, src_key_padding_mask=kpm)
    torch.testing.assert_close(ours_out, ref_out, **F64_TOL)
    g_ref = backward(original, {"x": x}, ref_out, None)
    g_ours = backward(swapped, {"x": x}, ours_out, None)
    for name in g_ref:
        torch.testing.assert_close(
            g_ours[name], g_ref[name], **F64_TOL, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_transformer_layer_one_sgd_step(
    kind: str, batch_first: bool, norm_first: bool, device: str
) -> None:
    """One SGD step (lr=0.1) on identical copies gives the same parameters."""
    original, swapped, _ = make_layers(kind, batch_first, norm_first, device)
    args, kwargs = layer_inputs(kind, batch_first, "kpm+causal", device)
    target = torch.randn_like(args[0])
    before = {n: p.detach().clone() for n, p in swapped.named_parameters()}
    for layer in (original, swapped):
        layer.train()
        opt = torch.optim.SGD(layer.parameters(), lr=0.1)
        opt.zero_grad()
        loss = ((layer(*args, **kwargs) - target) ** 2).mean()
        loss.backward()
        opt.step()
    for (n1, p1), (n2, p2) in zip(original.named_parameters(), swapped.named_parameters()):
        assert n1 == n2
        torch.testing.assert_close(p2, p1, **F64_TOL, msg=lambda m, n=n1: f"{n}: {m}")
    # The step actually changed every attention parameter.
    for n, p in swapped.named_parameters():
        if "attn" in n:
            assert not torch.equal(p, before[n]), n


# ---------------------------------------------------------------------------------------------
# 6. Fully masked rows
# ---------------------------------------------------------------------------------------------

FULLY_MASKED_CASES = ["kpm_whole_batch", "attn_row", "kpm_and_attn", "float_row", "one_head_3d"]


def _fully_masked_inputs(
    case: str, N: int, H: int, L: int, S: int
) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    kpm: Optional[Tensor] = None
    am: Optional[Tensor] = None
    if case == "kpm_whole_batch":  # every key of batch 1 padded
        kpm = torch.zeros(N, S, dtype=torch.bool)
        kpm[1] = True
        kpm[0, 2] = True
    elif case == "attn_row":  # query 2 may see no key
        am = torch.rand(L, S) < 0.3
        am[:, 0] = False
        am[2] = True
    elif case == "kpm_and_attn":  # neither mask alone hides every key of (batch 0, query 3)
        kpm = torch.zeros(N, S, dtype=torch.bool)
        kpm[0, :3] = True
        am = torch.zeros(L, S, dtype=torch.bool)
        am[3, 3:] = True
    elif case == "float_row":  # additive float masks with -inf
        am = torch.randn(L, S, dtype=torch.float64)
        am[4] = float("-inf")
        kpm = torch.zeros(N, S, dtype=torch.float64)
        kpm[2, 1:] = float("-inf")
        am[0, 0] = float("-inf")  # (batch 2, query 0): key 0 by attn_mask, the rest by kpm
    elif case == "one_head_3d":  # only head 0 of batch 2 loses every key for query 1
        m = torch.zeros(N, H, L, S, dtype=torch.bool)
        m[2, 0, 1] = True
        m[0, 1, 3, 1:] = True  # partially masked row, for contrast
        am = m.reshape(N * H, L, S)
    else:
        raise AssertionError(case)
    return kpm, am


def _hidden(kpm: Optional[Tensor], am: Optional[Tensor], N: int, H: int, L: int, S: int) -> Tensor:
    """(N, H, L) True where the query row has no visible key."""
    hidden = torch.zeros(N, H, L, S, dtype=torch.bool)

    def blocked(m: Tensor) -> Tensor:
        return m if m.dtype == torch.bool else torch.isneginf(m)

    if kpm is not None:
        hidden |= blocked(kpm)[:, None, None, :]
    if am is not None:
        a = blocked(am)
        hidden |= a if a.dim() == 2 else a.reshape(N, H, L, S)
    return hidden.all(-1)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "no_weights"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
@pytest.mark.parametrize("case", FULLY_MASKED_CASES)
def test_fully_masked_rows(
    case: str, batch_first: bool, need_weights: bool, bias: bool, device: str
) -> None:
    """Rows with no visible key: zero attention output (layer output = out_proj.bias), zero
    weights, finite gradients, zero query gradient; the whole output and every gradient equal
    nn's need_weights=False path (whose safe softmax also gives zeros)."""
    E, H, N, L, S = 16, 2, 3, 5, 6
    ref, ours = make_pair(E, H, batch_first=batch_first, bias=bias, device=device)
    kpm, am = _fully_masked_inputs(case, N, H, L, S)
    hidden = _hidden(kpm, am, N, H, L, S).to(device)
    kpm, am = to_device(kpm, device), to_device(am, device)
    assert hidden.any()
    rows = hidden.all(1)  # (N, L): no visible key in any head
    f64 = dict(dtype=torch.float64, device=device, requires_grad=True)
    q = torch.randn(seq_shape(N, L, E, batch_first), **f64)
    k = torch.randn(seq_shape(N, S, E, batch_first), **f64)
    v = torch.randn(seq_shape(N, S, E, batch_first), **f64)
    inp = Inputs(q, k, v, {"query": q, "key": k, "value": v}, kpm, am)

    # nn side: need_weights=False (safe softmax -> zeros); only the output gets an upstream grad.
    ref_res = run(ref, inp, need_weights=False)
    ours_res = run(
        ours, inp, need_weights=need_weights, average_attn_weights=False, grad_weights=False
    )
    assert torch.isfinite(ours_res.out).all()
    assert_results_close(
        Result(ours_res.out, None, ours_res.grads), ref_res, out_tol=F64_TOL, grad_tol=F64_TOL
    )

    out_nlE = ours_res.out if batch_first else ours_res.out.transpose(0, 1)  # (N, L, E)
    expected_row = (
        ours.out_proj.bias.detach() if bias else torch.zeros(E, dtype=torch.float64, device=device)
    )
    if rows.any():
        torch.testing.assert_close(
            out_nlE[rows], expected_row.expand(int(rows.sum()), E), **F64_TOL
        )
        g_q = ours_res.grads["input:query"]
        g_q = g_q if batch_first else g_q.transpose(0, 1)
        assert torch.equal(g_q[rows], torch.zeros_like(g_q[rows]))
        # ... while other rows do get gradient.
        assert g_q[~rows].abs().sum() > 0
    if need_weights:
        w = ours_res.weights  # (N, H, L, S)
        assert torch.equal(w[hidden], torch.zeros_like(w[hidden]))
        torch.testing.assert_close(
            w[~hidden].sum(-1), torch.ones_like(w[~hidden].sum(-1)), **F64_TOL
        )
        # With an upstream gradient on the weights too, every gradient stays finite.
        res_w = run(ours, inp, need_weights=True, average_attn_weights=True)
        assert torch.equal(res_w.weights[rows], torch.zeros_like(res_w.weights[rows]))
        for name, g in res_w.grads.items():
            assert torch.isfinite(g).all(), name


def test_fully_masked_head_keeps_other_rows_finite_unlike_nn_weights_path(device: str) -> None:
    """pytorch#160064: one fully masked head makes nn's need_weights=True output NaN everywhere;
    torch_mha stays finite and equal to nn's need_weights=False output."""
    E, H, N, L = 16, 2, 2, 4
    S = L  # self-attention
    ref, ours = make_pair(E, H, device=device)
    m = torch.zeros(N * H, L, S, dtype=torch.bool, device=device)
    m[1, 0] = True  # batch 0, head 1, query 0
    x = torch.randn(L, N, E, dtype=torch.float64, device=device)
    with torch.no_grad():
        nan_out, _ = ref(x, x, x, attn_mask=m, need_weights=True)
        safe_out, _ = ref(x, x, x, attn_mask=m, need_weights=False)
        ours_out, ours_w = ours(x, x, x, attn_mask=m, need_weights=True, average_attn_weights=False)
    assert torch.isnan(nan_out).any()  # the premise (nn's known behaviour)
    torch.testing.assert_close(ours_out, safe_out, **F64_TOL)
    assert torch.equal(ours_w[0, 1, 0], torch.zeros(S, dtype=torch.float64, device=device))


# ---------------------------------------------------------------------------------------------
# 7. Dropout
# ---------------------------------------------------------------------------------------------


def _dropout_inputs(
    N: int, L: int, S: int, E: int, batch_first: bool = False, device: str = "cpu"
) -> Inputs:
    f64 = dict(dtype=torch.float64, device=device, requires_grad=True)
    q = torch.randn(seq_shape(N, L, E, batch_first), **f64)
    k = torch.randn(seq_shape(N, S, E, batch_first), **f64)
    v = torch.randn(seq_shape(N, S, E, batch_first), **f64)
    return Inputs(q, k, v, {"query": q, "key": k, "value": v})


@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "no_weights"])
def test_dropout_reproducible_with_seed(need_weights: bool, device: str) -> None:
    """torch.manual_seed reproduces a training run (the seed comes from the default generator
    of the input's device, the CUDA generator for CUDA inputs)."""
    _, ours = make_pair(16, 4, dropout=0.4, device=device)
    ours.train()
    inp = _dropout_inputs(3, 6, 7, 16, device=device)
    kpm = torch.zeros(3, 7, dtype=torch.bool, device=device)
    kpm[:, 5] = True
    inp.key_padding_mask = kpm
    kw = dict(need_weights=need_weights, average_attn_weights=False)

    def seeded(seed: int) -> Result:
        torch.manual_seed(seed)
        return run(ours, inp, **kw)

    a, b, c = seeded(11), seeded(11), seeded(12)
    assert torch.equal(a.out, b.out)
    if need_weights:
        assert torch.equal(a.weights, b.weights)
    for name in a.grads:
        assert torch.equal(a.grads[name], b.grads[name]), name
    assert not torch.allclose(a.out, c.out)
    for name in a.grads:
        assert torch.isfinite(a.grads[name]).all()


@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
def test_dropout_ignored_in_eval(batch_first: bool, device: str) -> None:
    ref, ours = make_pair(
        16, 4, dropout=0.5, batch_first=batch_first, add_bias_kv=True, device=device
    )
    ref.eval()
    ours.eval()
    inp = _dropout_inputs(3, 5, 7, 16, batch_first, device)
    inp.key_padding_mask = torch.rand(3, 7, device=device) < 0.3
    inp.key_padding_mask[:, 0] = False
    for nw, avg in [(True, True), (True, False), (False, True)]:
        kw = dict(need_weights=nw, average_attn_weights=avg)
        assert_results_close(
            run(ours, inp, **kw), run(ref, inp, **kw), out_tol=F64_TOL, grad_tol=F64_TOL
        )


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_dropout_weights_statistics(p: float, device: str) -> None:
    """Returned training weights: zeros among positive probabilities ~ p; kept entries are the
    eval probabilities scaled by 1/(1-p); masked entries stay zero; averaged weights are the head
    mean of the same dropout pattern; patterns differ between heads, rows and batches."""
    N, H, L, S, E = 4, 4, 24, 24, 16
    _, ours = make_pair(E, H, dropout=p, device=device)
    inp = _dropout_inputs(N, L, S, E, device=device)
    kpm = torch.zeros(N, S, dtype=torch.bool, device=device)
    kpm[:, -3:] = True
    inp.key_padding_mask = kpm
    args = (inp.query, inp.key, inp.value)
    ours.eval()
    with torch.no_grad():
        _, probs = ours(*args, key_padding_mask=kpm, average_attn_weights=False)
        ours.train()
        torch.manual_seed(5)
        _, w = ours(*args, key_padding_mask=kpm, average_attn_weights=False)
        torch.manual_seed(5)
        _, w_avg = ours(*args, key_padding_mask=kpm, average_attn_weights=True)
    positive = probs > 0
    assert positive.sum() == N * H * L * (S - 3)
    assert torch.equal(w[~positive], torch.zeros_like(w[~positive]))
    dropped = (w == 0) & positive
    n = int(positive.sum())
    frac = dropped.sum().item() / n
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(frac - p) < 5 * sigma, (frac, p, sigma)
    kept = positive & ~dropped
    torch.testing.assert_close(w[kept], probs[kept] / (1 - p), **F64_TOL)
    torch.testing.assert_close(w_avg, w.mean(1), **F64_TOL)
    # The pattern is not repeated across heads or batch elements.
    assert not torch.equal(dropped[:, 0], dropped[:, 1])
    assert not torch.equal(dropped[0], dropped[1])
    rows = dropped.reshape(-1, S)
    assert len({tuple(r.tolist()) for r in rows}) > 0.9 * rows.shape[0]


def _manual_layer_from_heads(
    module: OursMHA, weights_per_head: Tensor, value: Tensor, batch_first: bool
) -> Tensor:
    """out_proj(merge(weights @ V_proj)) from the module's parameters (packed, bias=True)."""
    E, H = module.embed_dim, module.num_heads
    v_bnse = value if batch_first else value.transpose(0, 1)  # (N, S, E)
    w_v = module.in_proj_weight[2 * E :]
    b_v = module.in_proj_bias[2 * E :]
    vp = F.linear(v_bnse, w_v, b_v)  # (N, S, E)
    N, S, _ = vp.shape
    vh = vp.view(N, S, H, E // H).transpose(1, 2)  # (N, H, S, D)
    ctx = weights_per_head @ vh  # (N, H, L, D)
    merged = ctx.transpose(1, 2).reshape(N, -1, E)  # (N, L, E)
    out = F.linear(merged, module.out_proj.weight, module.out_proj.bias)
    return out if batch_first else out.transpose(0, 1)


@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
def test_dropout_output_uses_returned_weights(batch_first: bool, device: str) -> None:
    """The output equals the returned post-dropout per-head weights @ V-projection, merged and
    out-projected; need_weights=False with the same seed drops the same entries."""
    p = 0.35
    _, ours = make_pair(16, 4, dropout=p, batch_first=batch_first, device=device)
    ours.train()
    inp = _dropout_inputs(3, 6, 8, 16, batch_first, device)
    inp.key_padding_mask = torch.zeros(3, 8, dtype=torch.bool, device=device)
    inp.key_padding_mask[1, 2:4] = True
    with torch.no_grad():
        torch.manual_seed(21)
        out, w = ours(
            inp.query,
            inp.key,
            inp.value,
            key_padding_mask=inp.key_padding_mask,
            average_attn_weights=False,
        )
        torch.manual_seed(21)
        out_nw, none = ours(
            inp.query, inp.key, inp.value, key_padding_mask=inp.key_padding_mask, need_weights=False
        )
        manual = _manual_layer_from_heads(ours, w, inp.value, batch_first)
    assert none is None
    assert (w == 0).any()  # dropout did drop something
    torch.testing.assert_close(out, manual, **F64_TOL)
    torch.testing.assert_close(out_nw, out, **F64_TOL)


@pytest.mark.parametrize("average", [False, True], ids=["per_head", "avg"])
def test_dropout_backward_matches_hand_built_reference(average: bool, device: str) -> None:
    """Gradients with dropout equal plain autograd through a float64 reference attention that
    applies the dropout pattern read from the returned per-head weights."""
    p = 0.3
    E, H, N, L, S = 16, 2, 2, 5, 6
    D = E // H
    _, ours = make_pair(E, H, dropout=p, device=device)
    ours.train()
    inp = _dropout_inputs(N, L, S, E, device=device)
    torch.manual_seed(99)
    out, w = ours(inp.query, inp.key, inp.value, average_attn_weights=False)
    ours_grads = backward(ours, inp.leaves, out, w)
    if average:
        torch.manual_seed(99)
        out_a, w_a = ours(inp.query, inp.key, inp.value, average_attn_weights=True)
        ours_grads_avg = backward(ours, inp.leaves, out_a, w_a)

    # Reference: the same maths written with plain ops on copies of the parameters.
    params = {n: t.detach().clone().requires_grad_() for n, t in ours.named_parameters()}
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inp.leaves.items()}
    with torch.no_grad():
        ours.eval()
        _, probs = ours(inp.query, inp.key, inp.value, average_attn_weights=False)
    assert (probs > 0).all()
    factors = (w != 0).double() / (1 - p)
    assert (factors == 0).any()

    def reference(avg: bool) -> Tuple[Tensor, Tensor]:
        W, b = params["in_proj_weight"], params["in_proj_bias"]

        def heads(x: Tensor, i: int) -> Tensor:  # (L, N, E) -> (N, H, L, D)
            y = F.linear(x, W[i * E : (i + 1) * E], b[i * E : (i + 1) * E])
            return y.view(y.shape[0], N, H, D).permute(1, 2, 0, 3)

        ctx, pw = reference_attention(
            heads(leaves["query"], 0),
            heads(leaves["key"], 1),
            heads(leaves["value"], 2),
            dropout_factors=factors,
        )
        merged = ctx.permute(2, 0, 1, 3).reshape(L, N, E)
        o = F.linear(merged, params["out_proj.weight"], params["out_proj.bias"])
        return o, (pw.mean(1) if avg else pw)

    ref_out, ref_w = reference(False)
    torch.testing.assert_close(out, ref_out, **F64_TOL)
    torch.testing.assert_close(w, ref_w, **F64_TOL)
    ref_grads = backward(
        None, {}, ref_out, ref_w, extra={**{f"input:{k}": v for k, v in leaves.items()}, **params}
    )
    for name, g in ref_grads.items():
        torch.testing.assert_close(
            ours_grads[name], g, **F64_TOL, msg=lambda m, n=name: f"{n}: {m}"
        )
    if average:
        ref_out, ref_w = reference(True)
        torch.testing.assert_close(out_a, ref_out, **F64_TOL)
        torch.testing.assert_close(w_a, ref_w, **F64_TOL)
        ref_grads = backward(
            None,
            {},
            ref_out,
            ref_w,
            extra={**{f"input:{k}": v for k, v in leaves.items()}, **params},
        )
        for name, g in ref_grads.items():
            torch.testing.assert_close(
                ours_grads_avg[name], g, **F64_TOL, msg=lambda m, n=name: f"{n}: {m}"
            )


# ---------------------------------------------------------------------------------------------
# 8. Functional interface
# ---------------------------------------------------------------------------------------------

FUNCTIONAL_CONFIGS = [
    "packed_kpm",
    "separate_float_mask",
    "static_kv_zero_attn",
    "static_k_only",
    "batch_first",
    "unbatched_bias_kv",
    "training_p0",
]


@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "no_weights"])
@pytest.mark.parametrize("config", FUNCTIONAL_CONFIGS)
def test_functional_matches_nn(config: str, need_weights: bool, device: str) -> None:
    E, H, N, L, S = 16, 4, 3, 5, 7
    D = E // H
    dt = torch.float64
    kdim = vdim = E
    if config == "separate_float_mask":
        kdim, vdim = 10, 6

    def p(*shape: int) -> Tensor:
        return (0.3 * torch.randn(*shape, dtype=dt, device=device)).requires_grad_()

    tensors: Dict[str, Tensor] = {
        "query": p(L, N, E),
        "key": p(S, N, kdim),
        "value": p(S, N, vdim),
        "in_proj_bias": p(3 * E),
        "out_proj_weight": p(E, E),
        "out_proj_bias": p(E),
    }
    kw: Dict[str, object] = dict(
        training=False, need_weights=need_weights, average_attn_weights=False
    )
    bias_k = bias_v = None
    add_zero_attn = False
    dropout_p = 0.0
    if config in ("separate_float_mask",):
        tensors.update(q_proj_weight=p(E, E), k_proj_weight=p(E, kdim), v_proj_weight=p(E, vdim))
        in_proj_weight = None
        kw.update(
            use_separate_proj_weight=True,
            q_proj_weight=tensors["q_proj_weight"],
            k_proj_weight=tensors["k_proj_weight"],
            v_proj_weight=tensors["v_proj_weight"],
        )
        kw["attn_mask"] = torch.randn(L, S, dtype=dt, device=device)
    else:
        tensors["in_proj_weight"] = p(3 * E, E)
        in_proj_weight = tensors["in_proj_weight"]
    if config == "packed_kpm":
        kpm = torch.rand(N, S, device=device) < 0.4
        kpm[:, 1] = False
        kw["key_padding_mask"] = kpm
        kw["average_attn_weights"] = True
    if config in ("static_kv_zero_attn", "static_k_only"):
        S_static = 4
        tensors["static_k"] = p(N * H, S_static, D)
        kw["static_k"] = tensors["static_k"]
        if config == "static_kv_zero_attn":
            tensors["static_v"] = p(N * H, S_static, D)
            kw["static_v"] = tensors["static_v"]
            add_zero_attn = True
            kpm = torch.zeros(N, S_static, dtype=torch.bool, device=device)
            kpm[0, 1:] = True
            kw["key_padding_mask"] = kpm
        else:
            # static_k replaces the keys (length 4): values must have the same length.
            tensors["value"] = p(S_static, N, vdim)
            tensors["key"] = p(S_static, N, kdim)
    if config == "unbatched_bias_kv":
        for name, t in list(tensors.items()):
            if name in ("query", "key", "value"):
                tensors[name] = t.detach()[:, 0].clone().requires_grad_()
        tensors["bias_k"], tensors["bias_v"] = p(1, 1, E), p(1, 1, E)
        bias_k, bias_v = tensors["bias_k"], tensors["bias_v"]
        kw["attn_mask"] = torch.rand(H, L, S, device=device) < 0.3
        kw["attn_mask"][..., 0] = False
    if config == "training_p0":
        kw["training"] = True
        kw["attn_mask"] = causal_bool(L, S, device)
    positional = [E, H]

    def call(
        fn: Callable, q: Tensor, k: Tensor, v: Tensor, extra: Dict
    ) -> Tuple[Tensor, Optional[Tensor]]:
        return fn(
            q,
            k,
            v,
            *positional,
            in_proj_weight,
            tensors["in_proj_bias"],
            bias_k,
            bias_v,
            add_zero_attn,
            dropout_p,
            tensors["out_proj_weight"],
            tensors["out_proj_bias"],
            **kw,
            **extra,
        )

    q, k, v = tensors["query"], tensors["key"], tensors["value"]
    ref_out, ref_w = call(F.multi_head_attention_forward, q, k, v, {})
    if config == "batch_first":
        out, w = call(
            torch_mha.functional.multi_head_attention_forward,
            q.transpose(0, 1),
            k.transpose(0, 1),
            v.transpose(0, 1),
            {"batch_first": True},
        )
        out = out.transpose(0, 1)
    else:
        out, w = call(torch_mha.multi_head_attention_forward, q, k, v, {})
    assert (
        torch_mha.multi_head_attention_forward is torch_mha.functional.multi_head_attention_forward
    )
    leaves = {n: t for n, t in tensors.items()}
    ref_grads = backward(None, {}, ref_out, ref_w, extra=leaves)
    ours_grads = backward(None, {}, out, w, extra=leaves)
    assert_results_close(
        Result(out, w, ours_grads),
        Result(ref_out, ref_w, ref_grads),
        out_tol=F64_TOL,
        grad_tol=F64_TOL,
    )
