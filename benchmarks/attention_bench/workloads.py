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
  the report), `scan` (contenders of the batch-1 memory scan), `presets`, `cli_help`.

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

    def repeats(self, cli: int) -> int:
        """The measured rounds per case, given --repeats."""
        return cli if self.max_repeats is None else min(cli, self.max_repeats)

    def timed_modes(self, cli: Sequence[str]) -> List[str]:
        """The modes this group's workloads run in, given --modes."""
        if not self.cli_modes:
            return list(self.modes)
        return [m for m in cli if m in self.modes]

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
                    if spec.sweep == sweep and spec.name in args.groups:
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
    """nn.MultiheadAttention and torch_mha.MultiheadAttention with the same weights."""

    def __init__(self, w: Workload) -> None:
        torch.manual_seed(0)
        dtype = DTYPES[w.dtype]
        kw = dict(dropout=0.0, batch_first=True, dtype=dtype)
        self.nn = nn.MultiheadAttention(w.embed, w.heads, **kw)
        self.ours = torch_mha.MultiheadAttention(w.embed, w.heads, **kw)
        self.ours.load_state_dict(self.nn.state_dict())
        self.x = torch.randn(w.batch, w.length, w.embed, dtype=dtype, requires_grad=True)
        self.grad_out = torch.randn(w.batch, w.length, w.embed, dtype=dtype)
        self.mask = causal_mask(w.length) if w.causal else None
        self.causal = w.causal

    def callables(self, contender: str, mode: str) -> Tuple[Setup, Fn]:
        module = self.nn if contender.startswith("nn") else self.ours
        need_weights = contender.endswith("_w")
        x, g, mask, causal = self.x, self.grad_out, self.mask, self.causal
        leaves = [x] + list(module.parameters())

        def forward() -> Tuple[Tensor, Optional[Tensor]]:
            return module(x, x, x, need_weights=need_weights, attn_mask=mask, is_causal=causal)

        return mode_callables(module, leaves, forward, g, mode)


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


# --------------------------------------------------------------------------------------------
# Planners


def plan_sweep(group: str) -> Callable[[argparse.Namespace, int, str], List[Workload]]:
    """--head-dims x --causal x --lengths at batch = max(1, --tokens // length), --heads heads."""

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
