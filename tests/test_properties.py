"""Property-based tests (hypothesis): torch_mha against an independent float64 reference.

Two properties, each drawn over every axis at once rather than one axis per test:

* ``test_core_op_matches_reference``: ``torch.ops.torch_mha.attention_forward`` and its backward
  on random problems. Axes: dtype (float64, float32, bfloat16); batch and heads (including 0 and
  1); query and key lengths (0, 1, small, the tile edges 63/64/65/127/128/129 of kBlockQ = 64 and
  kBlockK = 128, up to 200); head dim and value dim drawn independently (0, 1, 3, 17, 16/32/64/80,
  any up to 24); the memory layout of query, key and value (any dimension order, stride-0
  expanded dimensions, a non-unit innermost stride, a storage offset); attn_mask of 0 to 4
  dimensions, each dimension full or broadcast, bool / query-dtype float / float32, in any
  layout; key_padding_mask bool / float in any layout; random patterns with a drawn density,
  fully masked rows and -inf entries in float masks; is_causal; scale (default or drawn);
  need_weights x average_weights; gradients of query, key, value, of float masks that require
  grad, and through the returned weights.
* ``test_layer_matches_reference``: ``torch_mha.MultiheadAttention`` (the drop-in module) on
  random configurations. Axes: dtype (float64, float32); batched or unbatched; batch_first;
  batch (0 to 3); lengths as above; heads (1 to 4) and head dim; kdim / vdim (packed or separate
  projection weights); bias; add_bias_kv; add_zero_attn; self-attention by identity (one
  projection GEMM), key is value, or three distinct tensors; input layouts (transposed,
  expanded, strided, offset); attn_mask 2-D (L, S) or 3-D (N*H, L, S), bool / float / float32,
  in any layout, random or the causal mask with is_causal (which nn requires); key_padding_mask
  bool / float; need_weights x average_attn_weights; train or eval, with dropout > 0 only in
  eval (where it must be ignored); gradients of the inputs, of every parameter and of float
  masks that require grad, and through the returned weights.

The reference is written here, plainly, in float64 PyTorch ops, from the semantics of
torch.nn.MultiheadAttention (see /work/shared/reference/nn_mha_semantics.md, sections 4, 5 and 7)
with a "safe softmax": a query whose keys are all masked gets zero probabilities, a zero
attention output and zero gradients. nn.MultiheadAttention itself is not the reference because
it returns NaN for such rows. The reference runs on the same values as torch_mha (inputs,
parameters and masks are drawn in float64 and rounded to the tested dtype first, then upcast
again), so only torch_mha's arithmetic is measured. Tensors come from a torch.Generator seeded
with a drawn integer, so each example is fully determined by what hypothesis prints.

Dropout is not drawn for the core op (its Philox mask is tested bit for bit in
test_ops_dropout.py); the layer draws dropout > 0 only in eval mode, where nn and torch_mha
ignore it.

Tolerances (TOLERANCES, check_all_gradients): an absolute part, a per-dtype factor times
max(1, max|reference|) of each compared tensor, plus a relative part:

* float64: everything accumulates in float64; errors are ~1e-15, we allow 1e-10.
* float32: float32 accumulation and PyTorch's fast exp (~2e-6 relative); the layer adds float32
  projection GEMMs: 2e-5.
* bfloat16 (core op only): the kernel computes in float32 and rounds once to bfloat16 (unit
  roundoff u = 2^-8), so outputs and weights get 2u relative; gradients also use the rounded
  output in delta = sum(dO * O): 8u of the scale.
* Gradients add 8 times propagated_rounding: where a gradient cancels to (almost) nothing, what
  remains is rounding noise of the size of the terms that cancelled, not of the result.
  Mask gradients add the rounding to the mask's dtype.

Over a long-profile run (6,400 examples) the largest error was 0.3 of its tolerance for
gradients, 0.5 for bfloat16 outputs and weights (one rounding against two allowed) and 0.13 for
float32 outputs.

Profiles (TORCH_MHA_HYPOTHESIS_PROFILE):

* ``ci`` (default): 800 examples per property, 1,600 in total, derandomized: every run draws the
  same examples, so a CI failure reproduces by rerunning the test. About 16 s on 2 idle cores.
* ``long``: 20,000 examples per property, from a random seed that every failure report prints;
  ``TORCH_MHA_HYPOTHESIS_SEED=<seed>`` repeats a run. ``TORCH_MHA_HYPOTHESIS_EXAMPLES=<n>``
  sets the number of examples per property in either profile.

Replaying a failure: hypothesis prints the falsifying example (a dataclass with every drawn
parameter, including the tensor seed), a note with the profile and run seed, and a
``@reproduce_failure(...)`` decorator: add that decorator to the test to rerun exactly that
example, or rerun with the printed environment variables, e.g.

    TORCH_MHA_HYPOTHESIS_PROFILE=long TORCH_MHA_HYPOTHESIS_SEED=123 \\
        python -m pytest tests/test_properties.py -k layer

``--hypothesis-show-statistics`` lists how often each axis value was drawn (hypothesis events).
"""

from __future__ import annotations

import math
import os
import random
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, note, seed, settings
from hypothesis import strategies as st
from torch import Tensor

import torch_mha

OPS = torch.ops.torch_mha
BLOCK_Q = 64  # kBlockQ in csrc/cpu/attention_kernel.h
BLOCK_K = 128  # kBlockK

# ---------------------------------------------------------------------------------------------
# Hypothesis profiles

PROFILE_ENV = "TORCH_MHA_HYPOTHESIS_PROFILE"
SEED_ENV = "TORCH_MHA_HYPOTHESIS_SEED"
_COMMON_SETTINGS = dict(
    deadline=None,
    print_blob=True,
    database=None,  # replay comes from the printed example, blob and seed, not a local cache
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("torch_mha-ci", derandomize=True, **_COMMON_SETTINGS)
settings.register_profile("torch_mha-long", derandomize=False, **_COMMON_SETTINGS)

PROFILE = os.environ.get(PROFILE_ENV, "ci")
if PROFILE not in ("ci", "long"):
    raise ValueError(f"{PROFILE_ENV} must be 'ci' or 'long', not {PROFILE!r}")
RUN_SEED: Optional[int] = None
if PROFILE == "long":
    RUN_SEED = int(os.environ.get(SEED_ENV, random.SystemRandom().randrange(2**32)))
EXAMPLES_ENV = "TORCH_MHA_HYPOTHESIS_EXAMPLES"
EXAMPLES = {"ci": 800, "long": 20000}  # per property test
if EXAMPLES_ENV in os.environ:
    EXAMPLES[PROFILE] = int(os.environ[EXAMPLES_ENV])

TestFunction = TypeVar("TestFunction", bound=Callable[..., None])


def property_test(test: TestFunction) -> TestFunction:
    """The selected profile (and in `long`, the run seed) with its number of examples."""
    profile = settings.get_profile(f"torch_mha-{PROFILE}")
    test = settings(profile, max_examples=EXAMPLES[PROFILE])(test)
    if RUN_SEED is not None:
        test = seed(RUN_SEED)(test)
    return test


def note_replay() -> None:
    if RUN_SEED is None:
        note(f"profile {PROFILE} (derandomized): rerun the test to replay")
    else:
        note(f"replay the run with {PROFILE_ENV}={PROFILE} {SEED_ENV}={RUN_SEED}")


# ---------------------------------------------------------------------------------------------
# Layouts: any strided view of a tensor's values


@dataclass(frozen=True)
class Layout:
    """How a tensor of a given logical shape sits in memory.

    order: the logical dimensions from outermost to innermost in memory (a permutation);
    expanded: dimensions read with stride 0 from a size-1 base (torch.expand);
    step: stride of the innermost memory dimension (2 leaves a gap between elements);
    offset: storage offset of the first element.
    """

    order: Tuple[int, ...]
    expanded: Tuple[int, ...] = ()
    step: int = 1
    offset: int = 0

    def base_shape(self, shape: Sequence[int]) -> List[int]:
        return [1 if d in self.expanded else size for d, size in enumerate(shape)]

    def stored_shape(self, shape: Sequence[int]) -> List[int]:
        base = self.base_shape(shape)
        stored = [base[d] for d in self.order]
        if stored:
            stored[-1] *= self.step
        return stored

    def storage_size(self, shape: Sequence[int]) -> int:
        return math.prod(self.stored_shape(shape)) + self.offset

    def view(self, storage: Tensor, shape: Sequence[int], expand: bool = True) -> Tensor:
        """The tensor of logical `shape` that this layout reads from the 1-D `storage`."""
        stored = self.stored_shape(shape)
        t = storage[self.offset :].view(stored)
        if stored:
            t = t[..., :: self.step]
        inverse = sorted(range(len(self.order)), key=lambda i: self.order[i])
        t = t.permute(inverse)
        return t.expand(list(shape)) if expand else t


def place(values: Tensor, layout: Layout, shape: Sequence[int], requires_grad: bool) -> Tensor:
    """A 1-D storage leaf holding `values` (the base shape of `layout`) where `layout` reads it."""
    storage = torch.zeros(layout.storage_size(shape), dtype=values.dtype)
    layout.view(storage, shape, expand=False).copy_(values)
    return storage.requires_grad_(requires_grad)


@st.composite
def layouts(draw: st.DrawFn, ndim: int, expandable: Optional[Sequence[int]] = None) -> Layout:
    """Any dimension order (half the time the natural one), at most one stride-0 dimension
    (among `expandable`, default all), innermost stride 1 or 2, storage offset 0 or 1."""
    identity = tuple(range(ndim))
    if ndim == 0:
        return Layout(order=(), offset=draw(st.sampled_from([0, 1])))
    order = draw(st.one_of(st.just(identity), st.permutations(identity).map(tuple)))
    candidates = tuple(identity if expandable is None else expandable)
    expanded: Tuple[int, ...] = ()
    if candidates:
        expanded = draw(st.one_of(st.just(()), st.sampled_from(candidates).map(lambda d: (d,))))
    step = draw(st.sampled_from([1, 2]))
    offset = draw(st.sampled_from([0, 1]))
    return Layout(order, expanded, step, offset)


# ---------------------------------------------------------------------------------------------
# Masks


@dataclass(frozen=True)
class MaskSpec:
    """A mask of its own `shape` (broadcast dimensions are 1).

    pattern "random": each element is masked out with probability `density`, and a further
    `full_rows` fraction of the rows (every key) is masked out; "causal": key j > query i masked.
    Bool masks are True where masked out; float masks hold randn * spread, -inf where masked out.
    """

    dtype: torch.dtype
    shape: Tuple[int, ...]
    layout: Layout
    pattern: str = "random"
    density: float = 0.0
    full_rows: float = 0.0
    spread: float = 1.0
    requires_grad: bool = False


def mask_values(spec: MaskSpec, gen: torch.Generator) -> Tensor:
    """The mask's values in its base shape (the expanded dimensions of its layout are 1)."""
    base = spec.layout.base_shape(spec.shape)
    if spec.pattern == "causal":
        l, s = spec.shape[-2:]
        masked = torch.ones(l, s, dtype=torch.bool).triu(1).expand(*base)
    else:
        masked = torch.rand(base, generator=gen, dtype=torch.float64) < spec.density
        rows = torch.rand(base[:-1], generator=gen, dtype=torch.float64) < spec.full_rows
        masked = (masked | rows[..., None]) if base else masked
    if spec.dtype == torch.bool:
        return masked.clone()
    if spec.pattern == "causal":
        values = torch.zeros(base, dtype=torch.float64)
    else:
        values = torch.randn(base, generator=gen, dtype=torch.float64) * spec.spread
    return values.masked_fill(masked, -math.inf).to(spec.dtype)


@dataclass
class MaskTensors:
    """A mask as passed to torch_mha, and the same mask for the float64 reference."""

    storage: Tensor  # leaf (float masks may require grad)
    tested: Tensor
    storage64: Tensor  # float64 leaf for the reference (or the same bool storage)
    reference: Tensor


def build_mask(spec: Optional[MaskSpec], gen: torch.Generator) -> Optional[MaskTensors]:
    if spec is None:
        return None
    storage = place(mask_values(spec, gen), spec.layout, spec.shape, spec.requires_grad)
    if spec.dtype == torch.bool:
        storage64 = storage
    else:
        storage64 = storage.detach().double().requires_grad_(spec.requires_grad)
    return MaskTensors(
        storage,
        spec.layout.view(storage, spec.shape),
        storage64,
        spec.layout.view(storage64, spec.shape),
    )


MASK_DENSITIES = st.sampled_from([0.0, 0.2, 0.5, 0.9, 1.0])
FULL_ROWS = st.sampled_from([0.0, 0.1, 0.5])
SPREADS = st.sampled_from([1.0, 4.0])


def mask_dtypes(dtype: torch.dtype) -> st.SearchStrategy[torch.dtype]:
    """Float masks may have the query's dtype or float32 (csrc/attention_utils.cpp)."""
    floats = [dtype] if dtype == torch.float32 else [dtype, torch.float32]
    return st.sampled_from([torch.bool, *floats])


@st.composite
def mask_specs(
    draw: st.DrawFn,
    dtype: torch.dtype,
    shape: Tuple[int, ...],
    pattern: str = "random",
    allow_grad: bool = True,
) -> MaskSpec:
    mask_dtype = draw(mask_dtypes(dtype))
    floating = mask_dtype != torch.bool
    return MaskSpec(
        dtype=mask_dtype,
        shape=shape,
        # The causal pattern needs its (L, S) dimensions in full.
        layout=draw(layouts(len(shape), range(len(shape) - 2) if pattern == "causal" else None)),
        pattern=pattern,
        density=draw(MASK_DENSITIES),
        full_rows=draw(FULL_ROWS),
        spread=draw(SPREADS) if floating else 1.0,
        requires_grad=floating and allow_grad and draw(st.booleans()),
    )


def additive(mask: Optional[Tensor]) -> Optional[Tensor]:
    """nn.MultiheadAttention's polarity: bool True -> -inf, float masks are added as they are."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float64).masked_fill(mask, -math.inf)
    return mask.double()


# ---------------------------------------------------------------------------------------------
# The reference


def safe_softmax(scores: Tensor) -> Tensor:
    """Softmax over the keys; a row whose scores are all -inf gets zeros and zero gradients."""
    fully_masked = torch.isneginf(scores).all(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(fully_masked, 0.0), dim=-1)
    return probs.masked_fill(fully_masked, 0.0)


def reference_scores(
    q: Tensor,
    k: Tensor,
    attn_mask: Optional[Tensor],
    key_padding_mask: Optional[Tensor],
    is_causal: bool,
    scale: Optional[float],
) -> Tensor:
    """Masked, scaled scores (N, H, L, S) in float64; masks broadcast as the core op documents."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] > 0 else 1.0
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    bias = additive(attn_mask)
    if bias is not None:
        scores = scores + bias
    padding = additive(key_padding_mask)
    if padding is not None:
        scores = scores + padding[:, None, None, :]
    if is_causal:
        l, s = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(l, s, dtype=torch.bool).triu(1), -math.inf)
    return scores


# ---------------------------------------------------------------------------------------------
# Comparisons

UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}


@dataclass(frozen=True)
class Tolerance:
    atol: float  # times max(1, max|reference|)
    rtol: float


# (values: outputs and weights, gradients) per dtype; see the module docstring.
TOLERANCES: Dict[torch.dtype, Tuple[Tolerance, Tolerance]] = {
    torch.float64: (Tolerance(1e-10, 1e-10), Tolerance(1e-10, 1e-10)),
    torch.float32: (Tolerance(2e-5, 2e-5), Tolerance(2e-5, 2e-5)),
    torch.bfloat16: (
        Tolerance(2e-5, 2 * UNIT_ROUNDOFF[torch.bfloat16]),
        Tolerance(8 * UNIT_ROUNDOFF[torch.bfloat16], 4 * UNIT_ROUNDOFF[torch.bfloat16]),
    ),
}


def widened(tolerance: Tolerance, slack: float) -> Tolerance:
    """`tolerance` plus an absolute slack (the atol factor multiplies max(1, max|reference|) >= 1,
    so adding the slack to it allows at least that much)."""
    return Tolerance(tolerance.atol + slack, tolerance.rtol)


def assert_matches(actual: Tensor, expected: Tensor, tolerance: Tolerance, what: str) -> None:
    """|actual - expected| <= atol * max(1, max|expected|) + rtol * |expected| everywhere
    (infinities must match exactly; NaN never matches)."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if expected.numel() == 0:
        return
    with torch.no_grad():
        a, e = actual.detach().double(), expected.detach().double()
        finite = torch.isfinite(e)
        scale = max(1.0, float(e[finite].abs().max())) if bool(finite.any()) else 1.0
        error = torch.where(finite, (a - e).abs(), torch.zeros_like(e))
        allowed = tolerance.atol * scale + tolerance.rtol * e.abs()
        bad = ~(error <= allowed) | (~finite & (a != e)) | torch.isnan(a)
        if bool(bad.any()):
            index = tuple(int(i) for i in bad.nonzero()[0])
            raise AssertionError(
                f"{what}: {int(bad.sum())} of {e.numel()} elements differ; largest error "
                f"{float(error.max()):.3e} (allowed here {tolerance.atol * scale:.3e} + "
                f"{tolerance.rtol:.1e} * |expected|); first at {index}: {float(a[index])!r} vs "
                f"{float(e[index])!r}"
            )


def gradients(
    outputs: Sequence[Tensor],
    grad_outputs: Sequence[Tensor],
    inputs: Sequence[Tensor],
    retain_graph: bool = False,
) -> List[Tensor]:
    """d(sum outputs * grad_outputs)/d inputs; an input nothing depends on gets zeros."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o.requires_grad]
    if not pairs or not inputs:
        return [torch.zeros_like(t) for t in inputs]
    grads = torch.autograd.grad(
        [o for o, _ in pairs],
        list(inputs),
        [g for _, g in pairs],
        retain_graph=retain_graph,
        allow_unused=True,
    )
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]


@dataclass
class ReferenceAttention:
    """Intermediate tensors of a reference computation (float64, in the autograd graph), per
    head: scores (N, H, L, S) after masking, probs = safe_softmax(scores), value (N, H, S, Ev),
    context = probs @ value; and score_magnitude = |scale| (|q| @ |k|^T) + |scores| (detached,
    finite), the size of the terms each score is computed from."""

    scores: Tensor
    probs: Tensor
    value: Tensor
    context: Tensor
    score_magnitude: Tensor


def score_magnitude(q: Tensor, k: Tensor, scale: float, scores: Tensor) -> Tensor:
    with torch.no_grad():
        terms = abs(scale) * (q.detach().abs() @ k.detach().abs().transpose(-1, -2))
        finite = scores.detach().abs().nan_to_num(posinf=0.0)
        return terms + finite


# Rounding of the kernels' arithmetic. COMPUTATION: one step relative to the magnitudes
# involved (float64: a few ulps; float32: PyTorch's fast exp, about 20 ulps; bfloat16: the
# rounded output fed back into the backward, delta = dO . O). ACCUMULATION: the unit roundoff
# of the accumulate type, which an absolute error of the scores carries into exp().
COMPUTATION_ROUNDOFF = {torch.float64: 2.0**-51, torch.float32: 2.0**-19, torch.bfloat16: 2.0**-8}
ACCUMULATION_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-24}


def probability_error(attention: ReferenceAttention, dtype: torch.dtype) -> Tensor:
    """Relative error of each probability: exp() turns an absolute error of the score (a few
    roundings of the terms it is computed from) into a relative one."""
    return COMPUTATION_ROUNDOFF[dtype] + ACCUMULATION_ROUNDOFF[dtype] * attention.score_magnitude


def forward_slack(attention: ReferenceAttention, dtype: torch.dtype) -> Tuple[float, float]:
    """Absolute error allowances (output, weights) from probability_error: an output row moves
    by at most 2 sum_j |dP_ij| max|v|, a probability by its relative error."""
    with torch.no_grad():
        relative = probability_error(attention, dtype) * attention.probs.detach()
        if relative.numel() == 0:
            return 0.0, 0.0
        value_size = float(attention.value.detach().abs().max()) if attention.value.numel() else 0
        return 2 * float(relative.sum(-1).max()) * value_size, float(relative.max())


def propagated_rounding(
    attention: ReferenceAttention,
    grad_probs: Tensor,
    grad_context: Tensor,
    inputs64: Sequence[Tensor],
    dtype: torch.dtype,
    gen: torch.Generator,
) -> List[float]:
    """How much rounding inside the kernels can move each gradient, however much the gradient
    itself cancels.

    The kernels' backward computes the score gradients dS_ij = P_ij (dP_ij - delta_i), with
    dP_ij = dO_i . v_j + dW_ij and delta_i = sum_k P_ik dP_ik, and dV_j = sum_i P_ij dO_i. With
    r_ij the relative error of P_ij (probability_error), each dS_ij is off by about
    r_ij P_ij (A_ij + sum_k P_ik A_ik), A_ij = |dO_i| . |v_j| + |dW_ij| being the size of the
    terms of dP_ij, whatever the size of the result: where the terms cancel (keys repeated along
    the sequence, a single key, a mask that is constant along the keys) the result is that
    rounding noise.

    Error patterns of that size are pushed through the reference's own backward (autograd of
    the scores and the per-head values, so through projections, head splits, expansions and
    mask broadcasts alike): independent signs, and signs shared along the queries, along the
    keys, or by all (identical inputs round identically, so their errors add up coherently).
    Returns, per input, the largest change any pattern makes."""
    with torch.no_grad():
        probs, value = attention.probs.detach(), attention.value.detach()
        through_weights = grad_probs - grad_context @ value.transpose(-1, -2)
        a = grad_context.abs() @ value.abs().transpose(-1, -2) + through_weights.abs()
        prob_error = probability_error(attention, dtype) * probs
        score_error = prob_error * (a + (probs * a).sum(-1, keepdim=True))

        def sign(*shape: int) -> Tensor:
            return torch.randint(0, 2, shape, generator=gen, dtype=torch.float64) * 2 - 1

        *batch, queries, keys = probs.shape
        patterns = [
            torch.randn(probs.shape, generator=gen, dtype=torch.float64),
            sign(*batch, queries, 1).expand(probs.shape),
            sign(*batch, 1, keys).expand(probs.shape),
            torch.ones(probs.shape, dtype=torch.float64),
        ]
    largest = [0.0] * len(inputs64)
    for pattern in patterns:
        value_noise = (prob_error * pattern).transpose(-1, -2) @ grad_context
        changes = torch.autograd.grad(
            [attention.scores, attention.value],
            list(inputs64),
            [score_error * pattern, value_noise],
            retain_graph=True,
            allow_unused=True,
        )
        for index, change in enumerate(changes):
            if change is not None and change.numel() > 0:
                largest[index] = max(largest[index], float(change.abs().max()))
    return largest


def rounded_sum_bound(view: Tensor, storage: Tensor, view_grad: Tensor) -> float:
    """The largest sum of |view_grad| over the elements of `view` that read one element of
    `storage` (several do along stride-0 dimensions)."""
    (collected,) = torch.autograd.grad(
        view, storage, view_grad.abs(), retain_graph=True, allow_unused=True
    )
    if collected is None or collected.numel() == 0:
        return 0.0
    return float(collected.max())


def check_all_gradients(
    names: List[str],
    inputs: List[Tensor],
    inputs64: List[Tensor],
    masks: Dict[str, Optional[MaskTensors]],
    outputs: List[Tensor],
    expected_outputs: List[Tensor],
    upstream: List[Tensor],
    tolerance: Tolerance,
    attention: ReferenceAttention,
    dtype: torch.dtype,
    gen: torch.Generator,
) -> None:
    """Gradients of sum(outputs * upstream) with respect to `inputs` and to the float masks that
    require grad, against autograd through the float64 reference.

    Each tolerance adds 8 times propagated_rounding to the dtype's (a gradient that cancels to
    nothing keeps the rounding noise of its terms). A mask's gradient is moreover rounded to the
    mask's dtype, element by element of the mask as passed, before autograd sums the elements
    that share storage (stride-0 dimensions): 2 roundings relative, plus 4 roundings of that
    sum of magnitudes (rounded_sum_bound)."""
    names, inputs, inputs64 = list(names), list(inputs), list(inputs64)
    mask_names: List[str] = []
    for name, mask in masks.items():
        if mask is not None and mask.storage.requires_grad:
            event("mask requires grad")
            mask_names.append(name)
            names.append(name)
            inputs.append(mask.storage)
            inputs64.append(mask.storage64)
    mask_views = [m.reference for m in (masks[name] for name in mask_names) if m is not None]
    grads = gradients(outputs, upstream, inputs)
    expected = gradients(
        expected_outputs,
        [g.double() for g in upstream],
        inputs64 + mask_views + [attention.probs, attention.context],
        retain_graph=True,
    )
    grad_probs, grad_context = expected[-2:]
    view_grads = dict(zip(mask_names, expected[len(inputs) : len(inputs) + len(mask_names)]))
    noise = propagated_rounding(attention, grad_probs, grad_context, inputs64, dtype, gen)
    for index, name in enumerate(names):
        atol, rtol = tolerance.atol + 8 * noise[index], tolerance.rtol
        mask = masks.get(name)
        if mask is not None and name in view_grads:
            rounding = UNIT_ROUNDOFF[mask.storage.dtype]
            rtol = max(rtol, 2 * rounding)
            bound = rounded_sum_bound(mask.reference, mask.storage64, view_grads[name])
            atol += 4 * rounding * bound
        # The atol factor multiplies max(1, max|reference|) >= 1, so the bounds are covered.
        assert_matches(grads[index], expected[index], Tolerance(atol, rtol), f"gradient of {name}")


# ---------------------------------------------------------------------------------------------
# Drawn sizes

# Lengths: a third small (0 to 9), a third at the tile edges, a third anywhere up to 200.
LENGTHS = st.one_of(
    st.integers(0, 9),
    st.sampled_from([BLOCK_Q - 1, BLOCK_Q, BLOCK_Q + 1, BLOCK_K - 1, BLOCK_K, BLOCK_K + 1]),
    st.integers(10, 200),
)
HEAD_DIMS = st.one_of(
    st.sampled_from([1, 3, 17]), st.integers(0, 24), st.sampled_from([16, 32, 64, 80])
)
# Batch and heads: 1 to 3, and 0 (an empty problem) one time in seven.
BATCHES = st.sampled_from([1, 2, 3, 1, 2, 3, 0])
SEEDS = st.integers(0, 2**31 - 1)


def length_event(name: str, length: int) -> None:
    crosses = length > BLOCK_Q if name == "L" else length > BLOCK_K
    event(f"{name}: {'0' if length == 0 else 'crosses a tile' if crosses else 'one tile'}")


# =============================================================================================
# 1. The core op


@dataclass(frozen=True)
class CoreProblem:
    dtype: torch.dtype
    batch: int
    heads: int
    query_len: int
    key_len: int
    head_dim: int
    value_dim: int
    query_layout: Layout
    key_layout: Layout
    value_layout: Layout
    attn_mask: Optional[MaskSpec]
    key_padding_mask: Optional[MaskSpec]
    is_causal: bool
    scale: Optional[float]
    need_weights: bool
    average_weights: bool
    grad_weights: bool  # differentiate through the returned weights too
    seed: int


@st.composite
def attn_mask_shapes(draw: st.DrawFn, full: Tuple[int, int, int, int]) -> Tuple[int, ...]:
    """0 to 4 trailing dimensions of (N, H, L, S), each either full or broadcast (1)."""
    ndim = draw(st.integers(0, 4))
    return tuple(size if draw(st.booleans()) else 1 for size in full[4 - ndim :])


@st.composite
def core_problems(draw: st.DrawFn) -> CoreProblem:
    dtype = draw(st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
    n = draw(BATCHES)
    h = draw(BATCHES)
    l, s = draw(LENGTHS), draw(LENGTHS)
    if l * s > BLOCK_Q * BLOCK_K:  # long problems: one batch of at most 2 heads, for speed
        n, h = min(n, 1), min(h, 2)
    e, ev = draw(HEAD_DIMS), draw(HEAD_DIMS)
    mask_shape = draw(attn_mask_shapes((n, h, l, s)))
    need_weights = draw(st.booleans())
    return CoreProblem(
        dtype=dtype,
        batch=n,
        heads=h,
        query_len=l,
        key_len=s,
        head_dim=e,
        value_dim=ev,
        query_layout=draw(layouts(4)),
        key_layout=draw(layouts(4)),
        value_layout=draw(layouts(4)),
        attn_mask=draw(st.none() | mask_specs(dtype, mask_shape)),
        key_padding_mask=draw(st.none() | mask_specs(dtype, (n, s))),
        is_causal=draw(st.booleans()),
        scale=draw(st.none() | st.floats(-1.5, 1.5, allow_nan=False, width=32)),
        need_weights=need_weights,
        average_weights=draw(st.booleans()),
        grad_weights=need_weights and draw(st.booleans()),
        seed=draw(SEEDS),
    )


def random_values(shape: Sequence[int], dtype: torch.dtype, gen: torch.Generator) -> Tensor:
    """Standard normal values, exactly representable in `dtype`."""
    return torch.randn(list(shape), generator=gen, dtype=torch.float64).to(dtype)


@property_test
@given(problem=core_problems())
def test_core_op_matches_reference(problem: CoreProblem) -> None:
    note_replay()
    p = problem
    dtype = p.dtype
    event(f"dtype: {dtype}")
    length_event("L", p.query_len)
    length_event("S", p.key_len)
    gen = torch.Generator().manual_seed(p.seed)
    shapes = {
        "query": (p.batch, p.heads, p.query_len, p.head_dim),
        "key": (p.batch, p.heads, p.key_len, p.head_dim),
        "value": (p.batch, p.heads, p.key_len, p.value_dim),
    }
    layouts_ = {"query": p.query_layout, "key": p.key_layout, "value": p.value_layout}
    storages: Dict[str, Tensor] = {}
    storages64: Dict[str, Tensor] = {}
    tested: Dict[str, Tensor] = {}
    reference: Dict[str, Tensor] = {}
    for name, shape in shapes.items():
        layout = layouts_[name]
        storages[name] = place(
            random_values(layout.base_shape(shape), dtype, gen), layout, shape, True
        )
        storages64[name] = storages[name].detach().double().requires_grad_(True)
        tested[name] = layout.view(storages[name], shape)
        reference[name] = layout.view(storages64[name], shape)
    attn_mask = build_mask(p.attn_mask, gen)
    padding = build_mask(p.key_padding_mask, gen)
    for mask in (attn_mask, padding):
        if mask is not None and mask.storage.requires_grad:
            event("mask requires grad")

    output, stats, weights = OPS.attention_forward(
        tested["query"],
        tested["key"],
        tested["value"],
        None if attn_mask is None else attn_mask.tested,
        None if padding is None else padding.tested,
        p.is_causal,
        p.scale,
        0.0,
        None,
        p.need_weights,
        p.average_weights,
    )

    scores = reference_scores(
        reference["query"],
        reference["key"],
        None if attn_mask is None else attn_mask.reference,
        None if padding is None else padding.reference,
        p.is_causal,
        p.scale,
    )
    probs = safe_softmax(scores)
    expected_output = torch.matmul(probs, reference["value"])
    fully_masked = torch.isneginf(scores).all(dim=-1)
    if bool(fully_masked.any()):
        event("some rows fully masked")

    scale = p.scale
    if scale is None:
        scale = 1.0 / math.sqrt(p.head_dim) if p.head_dim > 0 else 1.0
    attention = ReferenceAttention(
        scores,
        probs,
        reference["value"],
        expected_output,
        score_magnitude(reference["query"], reference["key"], scale, scores),
    )
    values_tol, grads_tol = TOLERANCES[dtype]
    output_slack, weights_slack = forward_slack(attention, dtype)
    assert output.dtype == dtype
    assert_matches(output, expected_output, widened(values_tol, output_slack), "output")

    # softmax_stats: [row max, log(sum exp(s - max))], (+inf, 0) on fully masked rows.
    accumulate = torch.float64 if dtype == torch.float64 else torch.float32
    assert stats.dtype == accumulate and stats.shape == (p.batch, p.heads, p.query_len, 2)
    with torch.no_grad():
        visible = ~fully_masked
        lse = torch.logsumexp(scores[visible], dim=-1)
        row_max = scores[visible].amax(dim=-1) if p.key_len else lse
        stats_tol = values_tol if dtype == torch.float64 else Tolerance(1e-5, 1e-5)
        assert_matches(stats[visible][:, 0], row_max, stats_tol, "softmax_stats offset")
        assert_matches(stats[visible][:, 1], lse - row_max, stats_tol, "softmax_stats log_sum")
        assert bool(torch.isposinf(stats[fully_masked][:, 0]).all()), "fully masked: offset"
        assert bool((stats[fully_masked][:, 1] == 0).all()), "fully masked: log_sum"

    outputs, expected_outputs = [output], [expected_output]
    if p.need_weights:
        if p.average_weights:
            event("weights: averaged")
            # The mean over no heads is taken as 0 (torch's mean would give NaN).
            expected_weights = probs.mean(1) if p.heads else probs.sum(1)
        else:
            event("weights: per head")
            expected_weights = probs
        assert weights.dtype == dtype
        assert_matches(weights, expected_weights, widened(values_tol, weights_slack), "weights")
        if p.grad_weights:
            outputs.append(weights)
            expected_outputs.append(expected_weights)
    else:
        assert weights.numel() == 0

    upstream = [random_values(o.shape, dtype, gen) for o in outputs]
    names = list(storages)
    inputs, inputs64 = [storages[n] for n in names], [storages64[n] for n in names]
    check_all_gradients(
        names,
        inputs,
        inputs64,
        {"attn_mask": attn_mask, "key_padding_mask": padding},
        outputs,
        expected_outputs,
        upstream,
        grads_tol,
        attention,
        dtype,
        gen,
    )


# =============================================================================================
# 2. The layer: torch_mha.MultiheadAttention


@dataclass(frozen=True)
class LayerProblem:
    dtype: torch.dtype
    batched: bool
    batch_first: bool
    batch: int
    query_len: int
    key_len: int
    num_heads: int
    head_dim: int
    kdim: Optional[int]
    vdim: Optional[int]
    bias: bool
    add_bias_kv: bool
    add_zero_attn: bool
    identity: str  # "self" (query is key is value), "kv" (key is value) or "none"
    query_layout: Layout
    key_layout: Layout
    value_layout: Layout
    attn_mask: Optional[MaskSpec]
    key_padding_mask: Optional[MaskSpec]
    is_causal: bool
    need_weights: bool
    average_attn_weights: bool
    training: bool
    dropout: float
    grad_weights: bool
    seed: int

    @property
    def embed_dim(self) -> int:
        return self.num_heads * self.head_dim

    def input_shape(self, length: int, features: int) -> Tuple[int, ...]:
        if not self.batched:
            return (length, features)
        if self.batch_first:
            return (self.batch, length, features)
        return (length, self.batch, features)


@st.composite
def layer_problems(draw: st.DrawFn) -> LayerProblem:
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    batched = draw(st.booleans())
    n = draw(BATCHES) if batched else 1
    heads = draw(st.integers(1, 4))
    head_dim = draw(st.one_of(st.integers(1, 8), st.sampled_from([3, 16, 17])))
    identity = draw(st.sampled_from(["none", "self", "kv"]))
    kdim = vdim = None
    if identity != "self":
        kdim = draw(st.none() | st.integers(1, 12))
        vdim = kdim if identity == "kv" else draw(st.none() | st.integers(1, 12))
    l = draw(LENGTHS)
    s = l if identity == "self" else draw(LENGTHS)
    if l * s > BLOCK_Q * BLOCK_K:  # long problems: a batch of at most 2, for speed
        n = min(n, 2)
    ndim = 3 if batched else 2
    batch_first = draw(st.booleans())
    query_layout = draw(layouts(ndim))
    key_layout = query_layout if identity == "self" else draw(layouts(ndim))
    value_layout = key_layout if identity != "none" else draw(layouts(ndim))

    is_causal = draw(st.booleans())
    mask_heads = n * heads if batched else heads
    mask_shape = draw(st.sampled_from([(l, s), (mask_heads, l, s)]))
    if is_causal:  # nn requires the mask with the hint; it must be the causal mask
        attn_mask = draw(mask_specs(dtype, mask_shape, pattern="causal", allow_grad=False))
    else:
        attn_mask = draw(st.none() | mask_specs(dtype, mask_shape))
    padding_shape = (n, s) if batched else (s,)
    need_weights = draw(st.booleans())
    dropout = draw(st.sampled_from([0.0, 0.0, 0.5]))
    return LayerProblem(
        dtype=dtype,
        batched=batched,
        batch_first=batch_first,
        batch=n,
        query_len=l,
        key_len=s,
        num_heads=heads,
        head_dim=head_dim,
        kdim=kdim,
        vdim=vdim,
        bias=draw(st.booleans()),
        add_bias_kv=draw(st.booleans()),
        add_zero_attn=draw(st.booleans()),
        identity=identity,
        query_layout=query_layout,
        key_layout=key_layout,
        value_layout=value_layout,
        attn_mask=attn_mask,
        key_padding_mask=draw(st.none() | mask_specs(dtype, padding_shape)),
        is_causal=is_causal,
        need_weights=need_weights,
        average_attn_weights=draw(st.booleans()),
        training=dropout == 0.0 and draw(st.booleans()),  # dropout > 0 only in eval
        dropout=dropout,
        grad_weights=need_weights and draw(st.booleans()),
        seed=draw(SEEDS),
    )


def reference_layer(
    p: LayerProblem,
    params: Dict[str, Tensor],
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor],
    key_padding_mask: Optional[Tensor],
) -> Tuple[Tensor, Optional[Tensor], ReferenceAttention]:
    """nn.MultiheadAttention's computation (semantics sections 4, 5, 7) with a safe softmax.

    Returns (attn_output, attn_weights or None, the per-head intermediates)."""
    e, heads, head_dim = p.embed_dim, p.num_heads, p.head_dim

    def seq_first(x: Tensor) -> Tensor:  # (length, batch, features)
        if not p.batched:
            return x.unsqueeze(1)
        return x.transpose(0, 1) if p.batch_first else x

    q_in, k_in, v_in = seq_first(query), seq_first(key), seq_first(value)
    l, n = q_in.shape[0], q_in.shape[1]

    def project(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        y = torch.matmul(x, weight.t())
        return y if bias is None else y + bias

    if "in_proj_weight" in params:
        w_q, w_k, w_v = params["in_proj_weight"].chunk(3)
    else:
        w_q, w_k, w_v = (params[f"{c}_proj_weight"] for c in "qkv")
    b_q = b_k = b_v = None
    if "in_proj_bias" in params:
        b_q, b_k, b_v = params["in_proj_bias"].chunk(3)
    q, k, v = project(q_in, w_q, b_q), project(k_in, w_k, b_k), project(v_in, w_v, b_v)

    extra_keys = 0  # appended by add_bias_kv / add_zero_attn, never masked
    if p.add_bias_kv:
        k = torch.cat([k, params["bias_k"].expand(1, n, e)])
        v = torch.cat([v, params["bias_v"].expand(1, n, e)])
        extra_keys += 1

    def split_heads(x: Tensor) -> Tensor:  # (length, N, E) -> (N, H, length, head_dim)
        return x.reshape(x.shape[0], n, heads, head_dim).permute(1, 2, 0, 3)

    q, k, v = split_heads(q), split_heads(k), split_heads(v)
    if p.add_zero_attn:
        zeros = torch.zeros(n, heads, 1, head_dim, dtype=torch.float64)
        k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
        extra_keys += 1
    s = k.shape[2]

    bias = torch.zeros(n, heads, l, s, dtype=torch.float64)
    padding = additive(key_padding_mask)
    if padding is not None and not p.batched:
        padding = padding.unsqueeze(0)
    if p.is_causal and padding is None and not p.need_weights:
        # nn drops the mask and runs scaled_dot_product_attention(is_causal=True): top-left
        # causal over every key, the appended ones included.
        bias = bias.masked_fill(torch.ones(l, s, dtype=torch.bool).triu(1), -math.inf)
    else:
        mask = additive(attn_mask)
        if mask is not None:
            mask = F.pad(mask, (0, extra_keys))
            bias = bias + (mask if mask.dim() == 2 else mask.reshape(n, heads, l, s))
        if padding is not None:
            bias = bias + F.pad(padding, (0, extra_keys))[:, None, None, :]
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(head_dim) + bias
    probs = safe_softmax(scores)
    context = torch.matmul(probs, v)
    merged = context.permute(2, 0, 1, 3).reshape(l, n, e)
    output = project(merged, params["out_proj.weight"], params.get("out_proj.bias"))
    if not p.batched:
        output = output.squeeze(1)
    elif p.batch_first:
        output = output.transpose(0, 1)
    magnitude = score_magnitude(q, k, 1.0 / math.sqrt(head_dim), scores)
    attention = ReferenceAttention(scores, probs, v, context, magnitude)
    if not p.need_weights:
        return output, None, attention
    weights = probs.mean(1) if p.average_attn_weights else probs
    return output, (weights if p.batched else weights.squeeze(0)), attention


@property_test
@given(problem=layer_problems())
def test_layer_matches_reference(problem: LayerProblem) -> None:
    note_replay()
    p = problem
    event(f"dtype: {p.dtype}")
    event(f"inputs: {'self-attention' if p.identity == 'self' else p.identity}")
    length_event("L", p.query_len)
    length_event("S", p.key_len)
    gen = torch.Generator().manual_seed(p.seed)
    e = p.embed_dim
    mha = torch_mha.MultiheadAttention(
        e,
        p.num_heads,
        dropout=p.dropout,
        bias=p.bias,
        add_bias_kv=p.add_bias_kv,
        add_zero_attn=p.add_zero_attn,
        kdim=p.kdim,
        vdim=p.vdim,
        batch_first=p.batch_first,
        dtype=p.dtype,
    )
    mha.train(p.training)
    with torch.no_grad():
        for name, parameter in mha.named_parameters():
            fan_in = parameter.shape[-1] if parameter.dim() == 2 else 4
            values = torch.randn(parameter.shape, generator=gen, dtype=torch.float64)
            parameter.copy_(values / math.sqrt(fan_in))
    params = dict(mha.named_parameters())
    params64 = {name: t.detach().double().requires_grad_(True) for name, t in params.items()}

    # Inputs: one storage per distinct tensor; identity (q is k is v) is kept.
    features = {"query": e, "key": p.kdim or e, "value": p.vdim or e}
    lengths = {"query": p.query_len, "key": p.key_len, "value": p.key_len}
    layouts_ = {"query": p.query_layout, "key": p.key_layout, "value": p.value_layout}
    aliases = {"query": "query", "key": "key", "value": "value"}
    if p.identity == "self":
        aliases.update(key="query", value="query")
    elif p.identity == "kv":
        aliases.update(value="key")
    storages: Dict[str, Tensor] = {}
    storages64: Dict[str, Tensor] = {}
    tested: Dict[str, Tensor] = {}
    reference: Dict[str, Tensor] = {}
    for name in ("query", "key", "value"):
        if aliases[name] != name:
            tested[name], reference[name] = tested[aliases[name]], reference[aliases[name]]
            continue
        shape = p.input_shape(lengths[name], features[name])
        layout = layouts_[name]
        storages[name] = place(
            random_values(layout.base_shape(shape), p.dtype, gen), layout, shape, True
        )
        storages64[name] = storages[name].detach().double().requires_grad_(True)
        tested[name] = layout.view(storages[name], shape)
        reference[name] = layout.view(storages64[name], shape)
    assert (tested["query"] is tested["key"]) == (p.identity == "self")
    attn_mask = build_mask(p.attn_mask, gen)
    padding = build_mask(p.key_padding_mask, gen)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mismatched mask dtypes warn, as in nn
        output, weights = mha(
            tested["query"],
            tested["key"],
            tested["value"],
            key_padding_mask=None if padding is None else padding.tested,
            need_weights=p.need_weights,
            attn_mask=None if attn_mask is None else attn_mask.tested,
            average_attn_weights=p.average_attn_weights,
            is_causal=p.is_causal,
        )
    expected_output, expected_weights, attention = reference_layer(
        p,
        params64,
        reference["query"],
        reference["key"],
        reference["value"],
        None if attn_mask is None else attn_mask.reference,
        None if padding is None else padding.reference,
    )
    if bool((attention.probs.sum(-1) == 0).any()):
        event("some rows fully masked")

    values_tol, grads_tol = TOLERANCES[p.dtype]
    output_slack, weights_slack = forward_slack(attention, p.dtype)
    # The output projection adds up to (largest row sum of |out_proj.weight|) of those errors.
    projection = float(params64["out_proj.weight"].detach().abs().sum(-1).max())
    assert output.dtype == p.dtype
    output_tol = widened(values_tol, output_slack * projection)
    assert_matches(output, expected_output, output_tol, "output")
    outputs, expected_outputs = [output], [expected_output]
    if p.need_weights:
        assert weights is not None and expected_weights is not None and weights.dtype == p.dtype
        assert_matches(weights, expected_weights, widened(values_tol, weights_slack), "weights")
        if p.grad_weights:
            outputs.append(weights)
            expected_outputs.append(expected_weights)
    else:
        assert weights is None

    upstream = [random_values(o.shape, p.dtype, gen) for o in outputs]
    check_all_gradients(
        list(params) + list(storages),
        list(params.values()) + list(storages.values()),
        list(params64.values()) + list(storages64.values()),
        {"attn_mask": attn_mask, "key_padding_mask": padding},
        outputs,
        expected_outputs,
        upstream,
        grads_tol,
        attention,
        p.dtype,
        gen,
    )
