"""What is timed: workload groups, their shapes, contenders and the callables that run them.

A group ("layer", "core", "small", ...) is registered once with `register(GroupSpec(...))` at
the end of this file. Its spec holds everything the rest of the suite needs to know about it:

* `contenders`: names of torch_mha and of its anchors, with `labels` (long) and `short` names;
* `pairs`: (anchor, ours, label) triples a speed-up (anchor time / ours time) is reported for;
* `bench`: a class built once per `Workload` (inputs made there, outside the clock) whose
  `callables(contender, mode)` returns `(setup, run)`: `setup` runs outside the clock before
  each call, `run` makes one call and returns its phase durations. Write the call as a
  `forward()` returning `(output, weights_or_None)` and let `mode_callables` do the timing of
  forward / backward ("train") or of the eval + no_grad call ("infer");
* `plan(args, threads, dtype)`: the workloads to time. `sweep=True` groups follow --lengths,
  --head-dims and --causal (the length sweep the plot shows); `sweep=False` groups have a fixed
  shape of their own and run after the sweep;
* `modes`: the modes it is timed in (`cli_modes`: whether --modes narrows them);
* `targets`: its performance targets (`targets.RatioTarget`: a pair's speed-up in a phase);
* optional: `estimate_bytes` (for the --memory-budget-gib skip rule), `flops` (GFLOP/s and the
  ETA), `projections` (layer-level work for the ETA), `memory_table` (a peak-memory table in
  the report), `scan` (contenders of the batch-1 memory scan), `presets`, `cli_help`, `note`
  (printed under the group's tables), `max_repeats` (a cap on --repeats for a slow group),
  `dtypes` (the only dtypes of --dtypes it runs at).

"layer_autocast" (issue 16) is the layer group's need_weights=False pair again, as a mixed
precision training step: float32 modules and input, the forward under torch.autocast("cpu",
dtype=torch.bfloat16). It runs at bfloat16 only and is in no preset: --groups names it.

The variant groups (issue 14) are fixed-shape: "window" (a causal sliding window vs full causal
and vs SDPA with the same mask), "gqa" (grouped-query heads vs SDPA with enable_gqa=True and
with K/V repeated) and "varlen" (a packed batch vs the same batch padded with a key padding
mask). Their shapes come from --window-length/--window, --gqa-length/--gqa-causal and
--varlen-lengths (defaults: the issue's shapes; the tests pass tiny ones).

See the package docstring (attention_bench/__init__.py) for the workloads planned next.
"""

import argparse
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import torch_mha

from .targets import CeilingTarget, RatioTarget
from .timing import Fn, Setup, use_threads

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
ALL_LENGTHS = [128, 256, 512, 1024, 2048, 4096, 8192]

PHASE_NAMES = {
    "fwd": "forward (training)",
    "bwd": "backward",
    "fwdbwd": "training step (fwd+bwd)",
    "infer": "inference (eval, no_grad)",
}
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5, "infer": 1.0}
SMALL = dict(length=32, batch=8, embed=256, heads=8)
MM_FLOOR = 0.5  # target: core fwd+bwd GFLOP/s >= 50% of torch.mm's
MM_CEILING_TARGET = 0.8  # issue 16's: >= 80%

# Contender names -> labels; filled by register() from the groups' specs.
LABELS: Dict[str, str] = {}
SHORT: Dict[str, str] = {}

Option = Tuple[str, Any]


# --------------------------------------------------------------------------------------------
# Workloads


@dataclass(frozen=True)
class Workload:
    """One shape of one group at one dtype and thread count (a "case" per mode it runs in)."""

    group: str  # a registered group: "layer", "core", "small", ...
    dtype: str
    embed: int
    heads: int
    length: int
    batch: int
    causal: bool
    threads: int
    # Group-specific parameters as (name, value) pairs, e.g. (("window", (256, 0)),).
    # Empty for the groups so far; they enter key(), label() and to_dict() only when set.
    options: Tuple[Option, ...] = ()

    @property
    def spec(self) -> "GroupSpec":
        return GROUPS[self.group]

    @property
    def head_dim(self) -> int:
        return self.embed // self.heads

    @property
    def contenders(self) -> Tuple[str, ...]:
        return self.spec.contenders

    @property
    def pairs(self) -> Tuple[Tuple[str, str, str], ...]:
        return self.spec.pairs

    def option(self, name: str, default: Any = None) -> Any:
        return dict(self.options).get(name, default)

    def _options_text(self, sep: str) -> str:
        return "".join(f"{sep}{k}={str(v).replace(' ', '')}" for k, v in self.options)

    def key(self) -> str:
        return (
            f"{self.group}/{self.dtype}/E{self.embed}/H{self.heads}/L{self.length}/B{self.batch}"
            f"/{'causal' if self.causal else 'full'}/t{self.threads}"
        ) + self._options_text("/")

    def label(self) -> str:
        return (
            f"{self.group} {self.dtype} D={self.head_dim} L={self.length} B={self.batch}"
            f"{' causal' if self.causal else ''}{self._options_text(' ')} {self.threads}t"
        )

    def to_dict(self) -> Dict[str, Any]:
        """The JSON form (as in the case records and memory items); `options` only when set."""
        d = asdict(self)
        if not self.options:
            del d["options"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Workload":
        d = dict(d)
        d["options"] = tuple(
            (k, tuple(v) if isinstance(v, list) else v) for k, v in d.get("options", ())
        )
        return cls(**d)

    def attention_flops(self) -> float:
        """Forward attention FLOPs (the group's `flops`; by default 4*N*H*L*S*D, halved when
        causal)."""
        return self.spec.flops(self)

    def estimate_bytes(self, contender: str, mode: str) -> float:
        """Rough memory need of one call, for the --memory-budget-gib skip rule."""
        return self.spec.estimate_bytes(self, contender, mode)


def attention_flops(w: Workload) -> float:
    """Forward attention FLOPs, 4*N*H*L*S*D, halved when causal."""
    flops = 4.0 * w.batch * w.heads * w.length * w.length * w.head_dim
    return flops / 2 if w.causal else flops


def layer_estimate_bytes(w: Workload, contender: str, mode: str) -> float:
    """Rough memory need of one call of the layer, core and small contenders."""
    item = DTYPES[w.dtype].itemsize
    scores = w.batch * w.heads * w.length * w.length * item
    linear = 16.0 * w.batch * w.length * w.embed * 4  # measured: ~10x
    if contender == "nn_w" or (contender == "nn_nw" and mode == "infer"):
        # nn's math path / native fast path: scores, probabilities and their gradients.
        return (4.5 if mode == "train" else 3.0) * scores + linear
    if contender == "ours_w":  # the (N, L, S) averaged weights, float32 accumulation
        return 3.0 * w.batch * w.length * w.length * 4 + linear
    return linear


# --------------------------------------------------------------------------------------------
# Group registry


@dataclass(frozen=True)
class GroupSpec:
    """A workload group: see the module docstring."""

    name: str
    contenders: Tuple[str, ...]
    labels: Mapping[str, str]  # contender -> long label (tables, skips)
    short: Mapping[str, str]  # contender -> short label (table columns)
    pairs: Tuple[Tuple[str, str, str], ...]  # (anchor, ours, label)
    bench: Callable[["Workload"], Any]  # .callables(contender, mode) -> (setup, run)
    plan: Callable[[argparse.Namespace, int, str], List["Workload"]]  # (args, threads, dtype)
    modes: Tuple[str, ...]  # modes it is timed in, of "train", "infer"
    title: str  # table titles: "<title>, <phase>: median ms, ..."
    sweep: bool = False  # a length sweep (--lengths, --head-dims, --causal) or a fixed shape
    cli_modes: bool = True  # whether --modes narrows `modes`
    cli_help: str = ""  # its entry in the --groups help (default: the name)
    presets: Tuple[str, ...] = ("quick", "full")  # presets that run it
    targets: Tuple[Union[RatioTarget, CeilingTarget], ...] = ()
    flops: Callable[["Workload"], float] = attention_flops
    estimate_bytes: Callable[["Workload", str, str], float] = layer_estimate_bytes
    projections: bool = False  # in/out projections (8*N*L*E^2 per forward) add to the ETA work
    memory_table: bool = False  # a peak-memory table per mode in the report
    # The batch-1 memory scan: contenders per --memory-scan value ("all" is every contender;
    # "ours" names the series of the linear-memory target). None: not scanned.
    scan: Optional[Mapping[str, Tuple[str, ...]]] = None
    # Modes the memory worker's warm-up calls run in (one tiny call each).
    warm_modes: Tuple[str, ...] = ("train", "infer")
    note: str = ""  # printed under each of the group's tables (generic layout)
    max_repeats: Optional[int] = None  # at most this many measured rounds (a slow group)
    # Whether the memory worker measures its calls (off for whole-model calls such as
    # generate(), where the profiler's per-op bookkeeping costs more than the call).
    memory: bool = True
    # The dtypes of --dtypes it runs at (None: all). An autocast group has one compute dtype;
    # a plan at another would time the same float32 modules under a second label.
    dtypes: Optional[Tuple[str, ...]] = None

    def repeats(self, cli: int) -> int:
        """The measured rounds per case, given --repeats."""
        return cli if self.max_repeats is None else min(cli, self.max_repeats)

    def timed_modes(self, cli: Sequence[str]) -> List[str]:
        """The modes this group's workloads run in, given --modes."""
        if not self.cli_modes:
            return list(self.modes)
        return [m for m in cli if m in self.modes]

    def runs_at(self, dtype: str) -> bool:
        """Whether it runs at `dtype`, one of --dtypes."""
        return self.dtypes is None or dtype in self.dtypes

    def scan_contenders(self, which: str) -> Tuple[str, ...]:
        assert self.scan is not None
        return self.contenders if which == "all" else self.scan[which]


GROUPS: Dict[str, GroupSpec] = {}


def register(spec: GroupSpec) -> GroupSpec:
    """Adds a group to the registry; groups run, print and report in registration order."""
    if spec.name in GROUPS:
        raise ValueError(f"group {spec.name!r} is already registered")
    for table, names in ((LABELS, spec.labels), (SHORT, spec.short)):
        for contender in spec.contenders:
            if table.get(contender, names[contender]) != names[contender]:
                raise ValueError(f"contender {contender!r} has two labels")
            table[contender] = names[contender]
    GROUPS[spec.name] = spec
    return spec


def plan_workloads(args: argparse.Namespace) -> Tuple[List[Workload], List[Workload]]:
    """(length-sweep workloads, fixed-shape workloads) of the groups in --groups."""
    out: Tuple[List[Workload], List[Workload]] = ([], [])
    for index, sweep in enumerate((True, False)):
        for threads in args.threads:
            for dtype in args.dtypes:
                for spec in GROUPS.values():
                    if spec.sweep == sweep and spec.name in args.groups and spec.runs_at(dtype):
                        out[index].extend(spec.plan(args, threads, dtype))
    return out


def build(w: Workload) -> Any:
    """The group's bench for w (inputs made), with w's thread count set."""
    use_threads(w.threads)
    return w.spec.bench(w)


# --------------------------------------------------------------------------------------------
# Callables


def causal_mask(length: int) -> Tensor:
    return torch.ones(length, length, dtype=torch.bool).triu(1)


def mode_callables(
    module: Optional[nn.Module],
    leaves: List[Tensor],
    forward: Callable[[], Tuple[Tensor, Optional[Tensor]]],
    grad_out: Tensor,
    mode: str,
) -> Tuple[Setup, Fn]:
    """(setup, run): setup runs outside the clock; run returns its phases' durations.

    "infer": (forward,) in eval + no_grad. "train": (forward, backward) of one step,
    `forward()[0].backward(grad_out)`, with the gradients of `leaves` reset by setup.
    """
    clock = time.perf_counter

    def clear_grads() -> None:
        for t in leaves:
            t.grad = None

    if mode == "infer":

        def infer() -> Tuple[float, ...]:
            if module is not None:
                module.eval()
            with torch.no_grad():
                t0 = clock()
                result = forward()
                t1 = clock()
            del result
            return (t1 - t0,)

        return None, infer

    def train() -> Tuple[float, ...]:
        if module is not None:
            module.train()
        t0 = clock()
        out = forward()[0]
        t1 = clock()
        out.backward(grad_out)
        t2 = clock()
        return (t1 - t0, t2 - t1)

    return clear_grads, train


class LayerBench:
    """nn.MultiheadAttention and torch_mha.MultiheadAttention with the same weights.

    With the workload option ("autocast", True) (the layer_autocast group) the modules and the
    input are float32 and the forward runs under torch.autocast("cpu", dtype=w.dtype): mixed
    precision training as a model does it, so the casts of the weights and of the input are
    part of the timed call. The backward runs outside autocast, as torch.autocast's docs
    prescribe (its ops run in the dtypes the forward chose); grad_out has the output's dtype,
    w.dtype, either way. Without the option no autocast context is entered at all, so the
    layer and small groups time the bare calls.
    """

    def __init__(self, w: Workload) -> None:
        torch.manual_seed(0)
        self.autocast: Optional[torch.dtype] = DTYPES[w.dtype] if w.option("autocast") else None
        dtype = DTYPES[w.dtype] if self.autocast is None else torch.float32
        kw = dict(dropout=0.0, batch_first=True, dtype=dtype)
        self.nn = nn.MultiheadAttention(w.embed, w.heads, **kw)
        self.ours = torch_mha.MultiheadAttention(w.embed, w.heads, **kw)
        self.ours.load_state_dict(self.nn.state_dict())
        self.x = torch.randn(w.batch, w.length, w.embed, dtype=dtype, requires_grad=True)
        self.grad_out = torch.randn(w.batch, w.length, w.embed, dtype=DTYPES[w.dtype])
        self.mask = causal_mask(w.length) if w.causal else None
        self.causal = w.causal

    def module(self, contender: str) -> nn.Module:
        return self.nn if contender.startswith("nn") else self.ours

    def forward(self, contender: str) -> Callable[[], Tuple[Tensor, Optional[Tensor]]]:
        """One call of the contender's module on x (self-attention), under autocast when the
        workload asks for it."""
        module, need_weights = self.module(contender), contender.endswith("_w")
        x, mask, causal, autocast = self.x, self.mask, self.causal, self.autocast
        if autocast is None:

            def forward() -> Tuple[Tensor, Optional[Tensor]]:
                return module(x, x, x, need_weights=need_weights, attn_mask=mask, is_causal=causal)

        else:

            def forward() -> Tuple[Tensor, Optional[Tensor]]:
                with torch.autocast("cpu", dtype=autocast):
                    return module(
                        x, x, x, need_weights=need_weights, attn_mask=mask, is_causal=causal
                    )

        return forward

    def callables(self, contender: str, mode: str) -> Tuple[Setup, Fn]:
        module = self.module(contender)
        leaves = [self.x] + list(module.parameters())
        return mode_callables(module, leaves, self.forward(contender), self.grad_out, mode)


class CoreBench:
    """torch_mha.attention and F.scaled_dot_product_attention on the same (N, H, L, D) tensors."""

    def __init__(self, w: Workload) -> None:
        torch.manual_seed(0)
        dtype = DTYPES[w.dtype]
        shape = (w.batch, w.heads, w.length, w.head_dim)
        self.q, self.k, self.v = (
            torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3)
        )
        self.grad_out = torch.randn(shape, dtype=dtype)
        self.causal = w.causal

    def callables(self, contender: str, mode: str) -> Tuple[Setup, Fn]:
        q, k, v, causal = self.q, self.k, self.v, self.causal
        if contender == "sdpa":

            def forward() -> Tuple[Tensor, None]:
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal), None

        else:

            def forward() -> Tuple[Tensor, Optional[Tensor]]:
                return torch_mha.attention(q, k, v, is_causal=causal)

        return mode_callables(None, [q, k, v], forward, self.grad_out, mode)


# The variant groups (issue 14). Each builds its inputs and masks once, outside the clock.

WINDOW = dict(length=8192, window=(256, 0), heads=8, head_dim=64, batch=1)
GQA = dict(length=2048, heads=32, kv_heads=8, head_dim=128, batch=1)
VARLEN = dict(seqlens=(64, 128, 256, 512, 768, 1024, 1536, 2048), heads=8, head_dim=64)


def window_bounds(i: int, length: int, keys: int, window: Tuple[int, int]) -> Tuple[int, int]:
    """The keys [lo, hi] query i sees under torch_mha's window_size=(left, right) (-1: open):
    i + S - L - left <= j <= i + S - L + right."""
    left, right = window
    shift = i + keys - length
    lo = max(0, shift - left) if left >= 0 else 0
    hi = min(keys - 1, shift + right) if right >= 0 else keys - 1
    return lo, hi


def window_area(length: int, keys: int, window: Tuple[int, int]) -> int:
    """The number of visible (query, key) pairs of the window."""
    total = 0
    for i in range(length):
        lo, hi = window_bounds(i, length, keys, window)
        total += max(0, hi - lo + 1)
    return total


def window_sdpa_mask(length: int, keys: int, window: Tuple[int, int]) -> Tensor:
    """The window as an (L, S) bool mask in SDPA's polarity: True = take part."""
    left, right = window
    i = torch.arange(length).unsqueeze(1) + (keys - length)
    j = torch.arange(keys).unsqueeze(0)
    mask = torch.ones(length, keys, dtype=torch.bool)
    if left >= 0:
        mask &= j >= i - left
    if right >= 0:
        mask &= j <= i + right
    return mask


class WindowBench:
    """A causal sliding window: torch_mha.attention with window_size, the same call fully
    causal, and F.sdpa with the window as an explicit bool mask, on the same (N, H, L, D)."""

    def __init__(self, w: Workload) -> None:
        torch.manual_seed(0)
        dtype = DTYPES[w.dtype]
        shape = (w.batch, w.heads, w.length, w.head_dim)
        self.q, self.k, self.v = (
            torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3)
        )
        self.grad_out = torch.randn(shape, dtype=dtype)
        self.window: Tuple[int, int] = tuple(w.option("window", WINDOW["window"]))  # type: ignore
        self.mask = window_sdpa_mask(w.length, w.length, self.window)

    def callables(self, contender: str, mode: str) -> Tuple[Setup, Fn]:
        q, k, v, window, mask = self.q, self.k, self.v, self.window, self.mask
        if contender == "win_ours":

            def forward() -> Tuple[Tensor, Optional[Tensor]]:
                return torch_mha.attention(q, k, v, window_size=window)

        elif contender == "win_causal":

            def forward() -> Tuple[Tensor, Optional[Tensor]]:
                return torch_mha.attention(q, k, v, is_causal=True)

        else:  # win_sdpa

            def forward() -> Tuple[Tensor, Optional[Tensor]]:
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), None

        return mode_callables(None, [q, k, v], forward, self.grad_out, mode)


class GQABench:
    """Grouped-query attention: q (N, H, L, D), k/v (N, Hkv, L, D). torch_mha reads the shared
    K/V heads in place; F.sdpa runs with enable_gqa=True, and on K/V repeat_interleave'd to H
    heads inside the timed call (so the backward sums the repeated gradients back), as a model
    without enable_gqa does."""

    def __init__(self, w: Workload) -> None:
        torch.manual_seed(0)
        dtype = DTYPES[w.dtype]
        kv_heads = int(w.option("kv_heads", GQA["kv_heads"]))
        self.q = torch.randn(w.batch, w.heads, w.length, w.head_dim, dtype=dtype)
        self.k, self.v = (
            torch.randn(w.batch, kv_heads, w.length, w.head_dim, dtype=dtype) for _ in range(2)
        )
        for t in (self.q, self.k, self.v):
            t.requires_grad_()
        self.grad_out = torch.randn(w.batch, w.heads, w.length, w.head_dim, dtype=dtype)
        self.repeat = w.heads // kv_heads
        self.causal = w.causal

    def callables(self, contender: str, mode: str) -> Tuple[Setup, Fn]:
        q, k, v, causal, rep = self.q, self.k, self.v, self.causal, self.repeat
        if contender == "gqa_ours":

            def forward() -> Tuple[Tensor, Optional[Tensor]]:
                return torch_mha.attention(q, k, v, is_causal=causal)

        elif contender == "gqa_sdpa":

            def forward() -> Tuple[Tensor, Optional[Tensor]]:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
                return out, None

        else:  # gqa_sdpa_rep

            def forward() -> Tuple[Tensor, Optional[Tensor]]:
                kr, vr = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
                return F.scaled_dot_product_attention(q, kr, vr, is_causal=causal), None

        return mode_callables(None, [q, k, v], forward, self.grad_out, mode)


def varlen_seqlens(w: Workload) -> List[int]:
    """The sequence lengths of a varlen workload: its `seqlens` option, cut to w.length and
    w.batch (the memory worker's tiny warm-up call shrinks those two)."""
    lengths = w.option("seqlens", VARLEN["seqlens"])
    return [min(int(n), w.length) for n in lengths][: w.batch]


class VarlenBench:
    """A packed batch of sequences (torch_mha.varlen_attention on (total, H, D), cu_seqlens)
    against the same batch padded to the longest length: torch_mha.attention with a
    key_padding_mask (True = padding) and F.sdpa with the equivalent bool mask, both on
    (B, H, L, D). Causal when the workload is. The padded tensors hold the packed values
    (zeros in the padding) and are the leaves; the padded grad_out is zero on padding rows."""

    def __init__(self, w: Workload) -> None:
        torch.manual_seed(0)
        dtype = DTYPES[w.dtype]
        lengths = varlen_seqlens(w)
        total, longest, batch = sum(lengths), max(lengths), len(lengths)
        starts = [sum(lengths[:b]) for b in range(batch)]
        self.cu = torch.tensor(starts + [total], dtype=torch.int32)
        self.max_len = longest
        self.causal = w.causal
        packed = [torch.randn(total, w.heads, w.head_dim, dtype=dtype) for _ in range(4)]
        padded = [torch.zeros(batch, w.heads, longest, w.head_dim, dtype=dtype) for _ in range(4)]
        for src, dst in zip(packed, padded):
            for b, (start, n) in enumerate(zip(starts, lengths)):
                dst[b, :, :n] = src[start : start + n].transpose(0, 1)
        self.packed = [t.requires_grad_() for t in packed[:3]]
        self.grad_packed = packed[3]
        self.padded = [t.requires_grad_() for t in padded[:3]]
        self.grad_padded = padded[3]
        position = torch.arange(longest)
        # nn's polarity for torch_mha (True = padding), SDPA's for F.sdpa (True = take part).
        self.key_padding_mask = position.unsqueeze(0) >= torch.tensor(lengths).unsqueeze(1)
        keep = ~self.key_padding_mask[:, None, None, :]  # (B, 1, 1, S)
        if self.causal:
            keep = keep & (position.unsqueeze(0) <= position.unsqueeze(1))  # (B, 1, L, S)
        self.sdpa_mask = keep.expand(batch, 1, longest, longest).contiguous()

    def callables(self, contender: str, mode: str) -> Tuple[Setup, Fn]:
        causal = self.causal
        if contender == "vl_packed":
            q, k, v = self.packed
            cu, n = self.cu, self.max_len

            def forward() -> Tuple[Tensor, Optional[Tensor]]:
                out = torch_mha.varlen_attention(q, k, v, cu, cu, n, n, is_causal=causal)
                return out, None

            return mode_callables(None, [q, k, v], forward, self.grad_packed, mode)
        q, k, v = self.padded
        if contender == "vl_padded":
            kpm = self.key_padding_mask

            def forward() -> Tuple[Tensor, Optional[Tensor]]:
                return torch_mha.attention(q, k, v, key_padding_mask=kpm, is_causal=causal)

        else:  # vl_sdpa
            mask = self.sdpa_mask

            def forward() -> Tuple[Tensor, Optional[Tensor]]:
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), None

        return mode_callables(None, [q, k, v], forward, self.grad_padded, mode)


# --------------------------------------------------------------------------------------------
# Planners


def plan_sweep(
    group: str, options: Tuple[Option, ...] = ()
) -> Callable[[argparse.Namespace, int, str], List[Workload]]:
    """--head-dims x --causal x --lengths at batch = max(1, --tokens // length), --heads heads;
    every workload with `options`."""

    def plan(args: argparse.Namespace, threads: int, dtype: str) -> List[Workload]:
        return [
            Workload(
                group,
                dtype,
                head_dim * args.heads,
                args.heads,
                length,
                max(1, args.tokens // length),
                causal,
                threads,
                options,
            )
            for head_dim in args.head_dims
            for causal in args.causal
            for length in args.lengths
        ]

    return plan


def plan_small(args: argparse.Namespace, threads: int, dtype: str) -> List[Workload]:
    s = SMALL
    return [
        Workload("small", dtype, s["embed"], s["heads"], s["length"], s["batch"], False, threads)
    ]


def plan_window(args: argparse.Namespace, threads: int, dtype: str) -> List[Workload]:
    """One case: --window-length (8192), --window (256,0), batch 1, 8 heads of 64."""
    length = getattr(args, "window_length", None) or WINDOW["length"]
    window = tuple(getattr(args, "window", None) or WINDOW["window"])
    h, d = WINDOW["heads"], WINDOW["head_dim"]
    causal = window[1] == 0  # (left, 0): a causal sliding window
    return [
        Workload(
            "window", dtype, h * d, h, length, WINDOW["batch"], causal, threads,
            (("window", window),),
        )
    ]  # fmt: skip


def plan_gqa(args: argparse.Namespace, threads: int, dtype: str) -> List[Workload]:
    """--gqa-length (2048) at 32 query heads, 8 key/value heads, D=128, batch 1, per
    --gqa-causal value (off, then on)."""
    length = getattr(args, "gqa_length", None) or GQA["length"]
    h, d = GQA["heads"], GQA["head_dim"]
    return [
        Workload(
            "gqa", dtype, h * d, h, length, GQA["batch"], causal, threads,
            (("kv_heads", GQA["kv_heads"]),),
        )
        for causal in getattr(args, "gqa_causal", None) or [False]
    ]  # fmt: skip


def plan_varlen(args: argparse.Namespace, threads: int, dtype: str) -> List[Workload]:
    """One causal batch of the --varlen-lengths sequences (8, 64 to 2048), 8 heads of 64; the
    workload's length is the padded length (the longest) and its batch the number of them."""
    lengths = tuple(getattr(args, "varlen_lengths", None) or VARLEN["seqlens"])
    h, d = VARLEN["heads"], VARLEN["head_dim"]
    return [
        Workload(
            "varlen", dtype, h * d, h, max(lengths), len(lengths), True, threads,
            (("seqlens", lengths),),
        )
    ]  # fmt: skip


def window_flops(w: Workload) -> float:
    """4*N*H*D per visible (query, key) pair of the window: the window problem's work (the full
    causal and SDPA contenders compute more; their GFLOP/s in the JSON are on this count)."""
    window = tuple(w.option("window", WINDOW["window"]))
    return 4.0 * w.batch * w.heads * w.head_dim * window_area(w.length, w.length, window)


def varlen_flops(w: Workload) -> float:
    """4*H*D*sum(L_b^2) over the real sequences, halved when causal: the packed batch's work
    (the padded contenders compute more; their GFLOP/s in the JSON are on this count)."""
    flops = 4.0 * w.heads * w.head_dim * sum(n * n for n in varlen_seqlens(w))
    return flops / 2 if w.causal else flops


def variant_estimate_bytes(w: Workload, contender: str, mode: str) -> float:
    """Rough memory need of one call of a variant group's contender: inputs, outputs and
    gradients, plus an SDPA mask's float copy (and its bool source) per (L, S) per batch."""
    item = DTYPES[w.dtype].itemsize
    linear = 12.0 * w.batch * w.length * w.embed * max(item, 4)
    if contender in ("win_sdpa", "vl_sdpa"):
        batch = w.batch if contender == "vl_sdpa" else 1
        return linear + 2.0 * batch * w.length * w.length * (item + 1)
    return linear


# --------------------------------------------------------------------------------------------
# The groups. A new workload is one more register(GroupSpec(...)) here.

LAYER_CONTENDERS = ("nn_w", "ours_w", "nn_nw", "ours_nw")
LAYER_PAIRS = (("nn_w", "ours_w", "need_weights=True"), ("nn_nw", "ours_nw", "need_weights=False"))
LAYER_LABELS = {
    "nn_w": "nn (need_weights=True)",
    "ours_w": "torch_mha (need_weights=True)",
    "nn_nw": "nn (need_weights=False)",
    "ours_nw": "torch_mha (need_weights=False)",
}
LAYER_SHORT = {"nn_w": "nn w=T", "ours_w": "ours w=T", "nn_nw": "nn w=F", "ours_nw": "ours w=F"}
CORE_CONTENDERS = ("sdpa", "ours")
CORE_PAIRS = (("sdpa", "ours", "F.sdpa"),)
L_1024_4096 = "2 threads, L 1024-4096"
SMALL_NAME = "small inference (L=32, B=8, E=256) vs nn's fast path, any threads"

# The full layer, nn.MultiheadAttention vs torch_mha.MultiheadAttention, need_weights True and
# False (nn then calls SDPA), same weights, batch_first=True.
register(
    GroupSpec(
        name="layer",
        title="Layer",
        contenders=LAYER_CONTENDERS,
        labels=LAYER_LABELS,
        short=LAYER_SHORT,
        pairs=LAYER_PAIRS,
        bench=LayerBench,
        plan=plan_sweep("layer"),
        modes=("train", "infer"),
        sweep=True,
        projections=True,
        memory_table=True,
        scan={"linear": ("nn_nw", "ours_nw"), "ours": ("ours_nw",)},
        targets=(
            RatioTarget(
                "layer training step (fwd+bwd) vs nn need_weights=True, " + L_1024_4096,
                "fwdbwd",
                "need_weights=True",
                1.5,
            ),
            RatioTarget(
                "layer training step (fwd+bwd) vs nn need_weights=False, " + L_1024_4096,
                "fwdbwd",
                "need_weights=False",
                1.3,
            ),
        ),
    )
)

# Issue 16: the layer's need_weights=False training step as mixed precision training runs it:
# float32 modules (the same weights) and input, the forward under torch.autocast("cpu",
# dtype=torch.bfloat16) (LayerBench's "autocast" option). It runs at bfloat16 only (the
# autocast dtype is the workload's dtype) and in no preset: --groups layer_autocast.
register(
    GroupSpec(
        name="layer_autocast",
        title="Layer under autocast (float32 modules, bfloat16 compute)",
        contenders=("nn_nw", "ours_nw"),
        labels={c: LAYER_LABELS[c] for c in ("nn_nw", "ours_nw")},
        short={c: LAYER_SHORT[c] for c in ("nn_nw", "ours_nw")},
        pairs=(LAYER_PAIRS[1],),
        bench=LayerBench,
        plan=plan_sweep("layer_autocast", (("autocast", True),)),
        modes=("train",),
        sweep=True,
        cli_help="layer_autocast (the layer training step of float32 modules under "
        "torch.autocast bfloat16 vs nn need_weights=False; runs at bfloat16 only, in no preset)",
        presets=(),
        projections=True,
        memory_table=True,
        warm_modes=("train",),
        dtypes=("bfloat16",),
        note=(
            "torch_mha.MultiheadAttention and nn.MultiheadAttention(need_weights=False) in "
            "float32 with the same weights, on a float32 input; the training step's forward runs "
            'under torch.autocast("cpu", dtype=torch.bfloat16) (the casts of weights and input '
            "are timed), its backward outside it, as autocast's docs prescribe; grad_out is "
            "bfloat16, the output's dtype, and the gradients are float32, the parameters'. "
            "GFLOP/s count attention FLOPs only (projections excluded)."
        ),
        targets=(
            RatioTarget(
                "layer training step (fwd+bwd), float32 layer under autocast, vs nn "
                "need_weights=False (issue 16: >= 1.3x with AMX or AVX512-BF16, >= 1.0x "
                "without), " + L_1024_4096,
                "fwdbwd",
                "need_weights=False",
                1.0,
                dtypes=("bfloat16",),
                native_bf16_threshold=1.3,
            ),
        ),
    )
)

# The core op: torch_mha.attention vs F.scaled_dot_product_attention on (N, H, L, D) tensors.
register(
    GroupSpec(
        name="core",
        title="Core",
        contenders=CORE_CONTENDERS,
        labels={"sdpa": "F.scaled_dot_product_attention", "ours": "torch_mha.attention"},
        short={"sdpa": "SDPA", "ours": "ours"},
        pairs=CORE_PAIRS,
        bench=CoreBench,
        plan=plan_sweep("core"),
        modes=("train",),
        sweep=True,
        memory_table=True,
        scan={"linear": CORE_CONTENDERS, "ours": ("ours",)},
        targets=(
            RatioTarget("core forward vs F.sdpa, " + L_1024_4096, "fwd", "F.sdpa", 1.2),
            RatioTarget("core backward vs F.sdpa, " + L_1024_4096, "bwd", "F.sdpa", 1.5),
            CeilingTarget(
                "core fwd+bwd GFLOP/s / torch.mm GFLOP/s (same dtype and threads), L >= 2048",
                "ours",
                "fwdbwd",
                MM_FLOOR,
                min_length=2048,
            ),
            # Issue 16: the CPU at its limit. The bfloat16 thresholds depend on the machine:
            # 1.5x where the CPU has bfloat16 instructions (AMX or AVX512-BF16), else 1.0x.
            RatioTarget(
                "core forward vs F.sdpa (issue 16: >= 1.5x with AMX or AVX512-BF16, >= 1.0x "
                "without), " + L_1024_4096,
                "fwd",
                "F.sdpa",
                1.0,
                dtypes=("bfloat16",),
                native_bf16_threshold=1.5,
            ),
            RatioTarget(
                "core fwd+bwd vs F.sdpa (issue 16: >= 1.5x with AMX or AVX512-BF16, >= 1.0x "
                "without), " + L_1024_4096,
                "fwdbwd",
                "F.sdpa",
                1.0,
                dtypes=("bfloat16",),
                native_bf16_threshold=1.5,
            ),
            RatioTarget(
                "core fwd+bwd vs F.sdpa (issue 16), " + L_1024_4096,
                "fwdbwd",
                "F.sdpa",
                1.2,
                dtypes=("float32",),
            ),
            CeilingTarget(
                "core fwd+bwd GFLOP/s / torch.mm GFLOP/s (issue 16), L >= 2048",
                "ours",
                "fwdbwd",
                MM_CEILING_TARGET,
                min_length=2048,
                dtypes=("float32",),
            ),
        ),
    )
)

# A small inference call (L=32, B=8, E=256, 8 heads) against nn's native fast path.
register(
    GroupSpec(
        name="small",
        title="Small inference",
        contenders=LAYER_CONTENDERS,
        labels=LAYER_LABELS,
        short=LAYER_SHORT,
        pairs=LAYER_PAIRS,
        bench=LayerBench,
        plan=plan_small,
        modes=("infer",),
        cli_modes=False,
        cli_help="small (the L=32 inference call)",
        projections=True,
        targets=(
            RatioTarget(
                SMALL_NAME + " [need_weights=True]",
                "infer",
                "need_weights=True",
                1.0,
                lengths=(0, 1 << 30),
                threads=None,
            ),
            RatioTarget(
                SMALL_NAME + " [need_weights=False]",
                "infer",
                "need_weights=False",
                1.0,
                lengths=(0, 1 << 30),
                threads=None,
            ),
        ),
    )
)

# --- The variants of the core op (issue 14): fixed shapes, training step, targets at 2 threads
# at the issue's shapes only (a run at other shapes, like the tests' tiny ones, reports "not
# measured"). `python benchmarks/bench_attention.py --variants` runs the three of them.

WINDOW_SHAPE = (("heads", WINDOW["heads"]), ("head_dim", WINDOW["head_dim"]), ("batch", 1))
WINDOW_TARGET = "window (256, 0) at L=8192, B=1, H=8, D=64, training step (fwd+bwd), 2 threads, "

# A causal sliding window: torch_mha.attention(window_size=(256, 0)) against the same call over
# all keys (is_causal=True) and against F.sdpa given the window as an explicit bool mask.
register(
    GroupSpec(
        name="window",
        title="Sliding window",
        contenders=("win_ours", "win_causal", "win_sdpa"),
        labels={
            "win_ours": "torch_mha.attention, window_size",
            "win_causal": "torch_mha.attention, is_causal=True (full causal)",
            "win_sdpa": "F.scaled_dot_product_attention, the window as a bool attn_mask",
        },
        short={"win_ours": "window", "win_causal": "full causal", "win_sdpa": "SDPA+mask"},
        pairs=(
            ("win_causal", "win_ours", "full causal"),
            ("win_sdpa", "win_ours", "F.sdpa + mask"),
        ),
        bench=WindowBench,
        plan=plan_window,
        modes=("train",),
        cli_modes=False,
        cli_help="window (sliding window (256, 0) at L=8192 vs full causal and vs F.sdpa with "
        "the same mask; --window-length, --window)",
        presets=("variants",),
        flops=window_flops,
        estimate_bytes=variant_estimate_bytes,
        memory_table=True,
        warm_modes=("train",),
        max_repeats=3,  # F.sdpa with a mask at L=8192 takes seconds (bfloat16: about a minute)
        note=(
            "torch_mha's window_size=(left, right): query i sees keys i-left .. i+right (S = L), "
            "so (256, 0) is a causal window of 257 keys; its hidden tiles are skipped. causal = "
            "the same call with is_causal=True over all keys. SDPA+mask = F.sdpa with the window "
            "as an (L, S) bool attn_mask (True = take part) built once outside the clock (SDPA "
            "turns it into an additive mask inside each call). GFLOP/s: 4*N*H*D per visible "
            "(query, key) pair of the window, for torch_mha's window call. At most 3 rounds."
        ),
        targets=(
            RatioTarget(
                WINDOW_TARGET + "vs full causal torch_mha (issue 14)",
                "fwdbwd",
                "full causal",
                10.0,
                lengths=(8192, 8192),
                where=(("window", (256, 0)),) + WINDOW_SHAPE,
            ),
            RatioTarget(
                WINDOW_TARGET + "vs F.sdpa with the same mask (issue 14)",
                "fwdbwd",
                "F.sdpa + mask",
                20.0,
                lengths=(8192, 8192),
                where=(("window", (256, 0)),) + WINDOW_SHAPE,
            ),
        ),
    )
)

GQA_SHAPE = (("heads", 32), ("kv_heads", 8), ("head_dim", 128), ("batch", 1))
GQA_TARGET = "GQA H=32, Hkv=8, L=2048, D=128, not causal, training step (fwd+bwd), 2 threads, "

# Grouped-query attention: torch_mha.attention on 8 shared K/V heads against F.sdpa with
# enable_gqa=True (the anchor) and with K/V repeated to 32 heads in the timed call.
register(
    GroupSpec(
        name="gqa",
        title="Grouped-query attention",
        contenders=("gqa_ours", "gqa_sdpa", "gqa_sdpa_rep"),
        labels={
            "gqa_ours": "torch_mha.attention, K/V heads shared (not repeated)",
            "gqa_sdpa": "F.scaled_dot_product_attention, enable_gqa=True",
            "gqa_sdpa_rep": "F.scaled_dot_product_attention, K/V repeat_interleave'd to H heads",
        },
        short={"gqa_ours": "ours", "gqa_sdpa": "SDPA gqa", "gqa_sdpa_rep": "SDPA rep"},
        pairs=(
            ("gqa_sdpa", "gqa_ours", "F.sdpa enable_gqa"),
            ("gqa_sdpa_rep", "gqa_ours", "F.sdpa K/V repeated"),
        ),
        bench=GQABench,
        plan=plan_gqa,
        modes=("train",),
        cli_modes=False,
        cli_help="gqa (H=32, Hkv=8, L=2048, D=128 vs F.sdpa enable_gqa=True and with K/V "
        "repeated; --gqa-length, --gqa-causal)",
        presets=("variants",),
        estimate_bytes=variant_estimate_bytes,
        memory_table=True,
        warm_modes=("train",),
        note=(
            "q (1, 32, L, 128), k/v (1, 8, L, 128). SDPA gqa = F.sdpa(enable_gqa=True): on CPU "
            "(torch 2.13) it runs the flash kernel, aten::_scaled_dot_product_flash_attention_"
            "for_cpu and its backward, on the 8 K/V heads as given (no repeat_interleave; dK/dV "
            "come out with 8 heads), not the math path. SDPA rep = F.sdpa on K/V "
            "repeat_interleave'd to 32 heads inside the timed call (its backward sums them "
            "back), the same flash kernel on 32 heads. The issue's anchor is enable_gqa=True; "
            "ours >= 1.2x the faster of the two SDPA calls = both targets pass. GFLOP/s: "
            "4*N*H*L*S*D, halved when causal."
        ),
        targets=(
            RatioTarget(
                GQA_TARGET + "vs F.sdpa enable_gqa=True (issue 14's anchor)",
                "fwdbwd",
                "F.sdpa enable_gqa",
                1.2,
                lengths=(2048, 2048),
                causal=False,
                where=GQA_SHAPE,
            ),
            RatioTarget(
                GQA_TARGET + "vs F.sdpa with K/V repeated (issue 14; with the one above: "
                ">= 1.2x the faster SDPA)",
                "fwdbwd",
                "F.sdpa K/V repeated",
                1.2,
                lengths=(2048, 2048),
                causal=False,
                where=GQA_SHAPE,
            ),
        ),
    )
)

# Packed variable-length batches: torch_mha.varlen_attention against the same batch padded to the
# longest sequence with a key padding mask (torch_mha.attention; F.sdpa as a reference).
register(
    GroupSpec(
        name="varlen",
        title="Packed varlen batch",
        contenders=("vl_packed", "vl_padded", "vl_sdpa"),
        labels={
            "vl_packed": "torch_mha.varlen_attention, packed",
            "vl_padded": "torch_mha.attention, padded, key_padding_mask",
            "vl_sdpa": "F.scaled_dot_product_attention, padded, bool attn_mask",
        },
        short={"vl_packed": "packed", "vl_padded": "padded", "vl_sdpa": "SDPA pad"},
        pairs=(
            ("vl_padded", "vl_packed", "padded + key_padding_mask"),
            ("vl_sdpa", "vl_packed", "F.sdpa padded"),
        ),
        bench=VarlenBench,
        plan=plan_varlen,
        modes=("train",),
        cli_modes=False,
        cli_help="varlen (8 causal sequences of 64 to 2048 packed vs padded with a key padding "
        "mask; --varlen-lengths)",
        presets=("variants",),
        flops=varlen_flops,
        estimate_bytes=variant_estimate_bytes,
        memory_table=True,
        warm_modes=("train",),
        note=(
            "B sequences (lengths in `seqlens`), 8 heads, D=64, causal (as in LM training). "
            "packed = torch_mha.varlen_attention on (total, H, D) with int32 cu_seqlens. padded "
            "= torch_mha.attention on the batch padded to L = the longest, (B, H, L, D), with "
            "key_padding_mask (True = padding) and is_causal=True; its time is the whole padded "
            "batch's. SDPA pad = F.sdpa on the padded batch with the equivalent (B, 1, L, S) bool "
            "mask (a reference, no target). The padded tensors are the leaves; grad_out is zero "
            "on padding rows. GFLOP/s: 4*H*D*sum(L_b^2), halved (causal): the packed batch's "
            "work, for the packed call."
        ),
        targets=(
            RatioTarget(
                "varlen: 8 causal sequences of 64-2048 packed, H=8, D=64, training step "
                "(fwd+bwd), 2 threads, vs the padded batch with key_padding_mask, torch_mha "
                "(issue 14)",
                "fwdbwd",
                "padded + key_padding_mask",
                2.0,
                lengths=(2048, 2048),
                causal=True,
                where=(("seqlens", VARLEN["seqlens"]), ("heads", 8), ("head_dim", 64)),
            ),
        ),
    )
)

# The serving groups of issue 15 (decode, generate, prefill) live in serving.py; importing it
# registers them after the groups above.
from . import serving  # noqa: E402, F401
