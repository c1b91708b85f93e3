"""Benchmark suite for torch_mha's CPU attention kernels (issue #5).

Times torch_mha against its anchors in one process, interleaved, and reports speed-ups, GFLOP/s,
peak memory and the issue's targets:

* the full layer: torch_mha.MultiheadAttention vs nn.MultiheadAttention, both with
  need_weights=True (nn's default: explicit L x S matrices) and with need_weights=False (nn calls
  F.scaled_dot_product_attention, PyTorch's CPU flash kernel); same weights, batch_first=True;
* the core: torch_mha.attention vs F.scaled_dot_product_attention on the same (N, H, L, D) tensors;
* a small inference call (L=32, B=8, E=256, 8 heads) against nn's native fast path;
* a large torch.mm as the machine's ceiling.

    python benchmarks/bench_attention.py --quick    # about a minute or two: a subset
    python benchmarks/bench_attention.py --full     # everything (hours on 2 cores)
    python benchmarks/bench_attention.py --lengths 1024,2048 --dtypes bfloat16 --threads 2

Outputs: a table on stdout, a JSON file with every sample and the metadata (--out), a PNG plot
(--plot) and a Markdown report (--results). See the "Method" section of the report (METHOD below).
"""

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import torch_mha

HERE = os.path.dirname(os.path.abspath(__file__))
MIB = float(1 << 20)
GIB = float(1 << 30)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
ALL_LENGTHS = [128, 256, 512, 1024, 2048, 4096, 8192]

# Contenders. Layer: nn / torch_mha with need_weights True ("_w") or False ("_nw").
LAYER_CONTENDERS = ("nn_w", "ours_w", "nn_nw", "ours_nw")
CORE_CONTENDERS = ("sdpa", "ours")
# (anchor, ours, label) pairs a speed-up is reported for.
LAYER_PAIRS = (("nn_w", "ours_w", "need_weights=True"), ("nn_nw", "ours_nw", "need_weights=False"))
CORE_PAIRS = (("sdpa", "ours", "F.sdpa"),)
LABELS = {
    "nn_w": "nn (need_weights=True)",
    "ours_w": "torch_mha (need_weights=True)",
    "nn_nw": "nn (need_weights=False)",
    "ours_nw": "torch_mha (need_weights=False)",
    "sdpa": "F.scaled_dot_product_attention",
    "ours": "torch_mha.attention",
}
SHORT = {
    "nn_w": "nn w=T",
    "ours_w": "ours w=T",
    "nn_nw": "nn w=F",
    "ours_nw": "ours w=F",
    "sdpa": "SDPA",
    "ours": "ours",
}
# Phases a mode yields. A "train" sample times the forward and the backward of one training step
# separately (fwd+bwd is their sum); "infer" is eval + no_grad.
PHASES = {"train": ("fwd", "bwd", "fwdbwd"), "infer": ("infer",), "mm": ("mm",)}
PHASE_NAMES = {
    "fwd": "forward (training)",
    "bwd": "backward",
    "fwdbwd": "training step (fwd+bwd)",
    "infer": "inference (eval, no_grad)",
}
# Speed-up targets drawn on the plot: (group, phase, pair label) -> ratio.
PLOT_TARGETS = {
    ("layer", "fwdbwd", "need_weights=True"): 1.5,
    ("layer", "fwdbwd", "need_weights=False"): 1.3,
    ("core", "fwd", "F.sdpa"): 1.2,
    ("core", "bwd", "F.sdpa"): 1.5,
}
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5, "infer": 1.0}
MIN_ROUNDS = 3  # a case cut short by --max-case-seconds still gets this many rounds
MAX_NUMBER = 1000  # calls per sample for tiny cases
SMALL = dict(length=32, batch=8, embed=256, heads=8)
MM_FLOOR = 0.5  # target: core fwd+bwd GFLOP/s >= 50% of torch.mm's

METHOD = """\
* **Timing.** Every case builds its inputs once; then warm-up rounds, then measured rounds. Every
  round runs each contender once, in an order that rotates by one each round, so a load change on
  the (shared) machine hits all contenders alike; the reported figure is the median over rounds.
  Tiny calls are repeated within a sample (`number`, calibrated from the warm-up to >= 20 ms per
  sample) and the sample is the mean per call. A case whose rounds run past `--max-case-seconds`
  stops after at least 3 rounds (the JSON records the rounds each case got). Python's garbage
  collector is off while a case runs.
* **Forward, backward, training step.** One training sample runs `out = layer(x, x, x, ...)` (or
  the core op on q, k, v that require grad; layer parameters require grad too) and then
  `out.backward(grad_out)` with a fixed random `grad_out`; the clock is read before the forward,
  between forward and backward, and after the backward. So **backward is timed on its own**, on
  the graph the forward of the same call has just built (no retain_graph, no subtraction of two
  noisy medians), and fwd+bwd is their sum per sample. Gradients are reset to None before each
  sample (outside the clock), so the backward allocates them like a first training step. Only
  the attention output enters the loss (the returned weights do not). Forward here is the
  forward of a training step (autograd records the graph); layer inference is `eval()` +
  `torch.no_grad()`, where nn.MultiheadAttention takes its native fast path.
* **Causal.** Layer: `attn_mask` = the bool upper-triangular mask with `is_causal=True` on both
  sides (nn needs the mask; with need_weights=False it passes is_causal to SDPA). Core:
  `is_causal=True` on both.
* **FLOPs.** Forward `4*N*H*L*S*D`, backward 2.5x, fwd+bwd 3.5x, halved when causal (FA2's
  convention). For the layer the same **attention-only** count is used (the in/out projections'
  `8*N*L*E^2` forward FLOPs are not counted), so layer GFLOP/s understate the work done.
* **Ceiling.** `torch.mm` of two 2048 x 2048 matrices (`--mm-size`) per dtype and thread count,
  timed at the start and at the end of the run; the larger median is the ceiling.
* **Memory** is measured in a separate process after the timing (so it never disturbs it), one
  call per contender (fwd+bwd for training, the forward for inference), at the largest thread
  count. *ATen peak*: `torch.profiler.profile(profile_memory=True)`; the peak of the running total
  of live ATen CPU allocations made during the call (inputs and weights made before it are not
  counted; gradients are). torch_mha's per-thread scratch inside its kernels does not go through
  ATen and is invisible to it. *RSS growth*: the process's peak resident set during the call
  (`VmHWM`, reset through `/proc/self/clear_refs`) minus its resident set just before; the
  process runs with `MALLOC_MMAP_THRESHOLD_=131072` so freed large blocks go back to the system
  and earlier cases do not hide later growth, and one tiny call per contender runs first so
  one-off library set-up is not counted. RSS includes the kernels' scratch; it can undercount
  buffers that a library keeps cached from an earlier, larger call (lengths run in increasing
  order). The memory scan runs the training step at batch 1 for each length, float32, head dim
  64, not causal, so linear memory doubles and quadratic memory quadruples from one length to
  the next.
* **Skips.** A contender whose estimated memory (nn's L x S matrices: ~4.5 copies of N*H*L*S
  elements in training, ~3 in inference) exceeds `--memory-budget-gib` is skipped, with the
  reason printed and recorded."""


# --------------------------------------------------------------------------------------------
# Workloads and contenders


@dataclass(frozen=True)
class Workload:
    group: str  # "layer", "core" or "small"
    dtype: str
    embed: int
    heads: int
    length: int
    batch: int
    causal: bool
    threads: int

    @property
    def head_dim(self) -> int:
        return self.embed // self.heads

    @property
    def contenders(self) -> Tuple[str, ...]:
        return CORE_CONTENDERS if self.group == "core" else LAYER_CONTENDERS

    @property
    def pairs(self) -> Tuple[Tuple[str, str, str], ...]:
        return CORE_PAIRS if self.group == "core" else LAYER_PAIRS

    def key(self) -> str:
        return (
            f"{self.group}/{self.dtype}/E{self.embed}/H{self.heads}/L{self.length}/B{self.batch}"
            f"/{'causal' if self.causal else 'full'}/t{self.threads}"
        )

    def label(self) -> str:
        return (
            f"{self.group} {self.dtype} D={self.head_dim} L={self.length} B={self.batch}"
            f"{' causal' if self.causal else ''} {self.threads}t"
        )

    def attention_flops(self) -> float:
        """Forward attention FLOPs, 4*N*H*L*S*D, halved when causal."""
        flops = 4.0 * self.batch * self.heads * self.length * self.length * self.head_dim
        return flops / 2 if self.causal else flops

    def estimate_bytes(self, contender: str, mode: str) -> float:
        """Rough memory need of one call, for the --memory-budget-gib skip rule."""
        item = DTYPES[self.dtype].itemsize
        scores = self.batch * self.heads * self.length * self.length * item
        linear = 16.0 * self.batch * self.length * self.embed * 4  # measured: ~10x
        if contender == "nn_w" or (contender == "nn_nw" and mode == "infer"):
            # nn's math path / native fast path: scores, probabilities and their gradients.
            return (4.5 if mode == "train" else 3.0) * scores + linear
        if contender == "ours_w":  # the (N, L, S) averaged weights, float32 accumulation
            return 3.0 * self.batch * self.length * self.length * 4 + linear
        return linear


Fn = Callable[[], Tuple[float, ...]]
Setup = Optional[Callable[[], None]]


def causal_mask(length: int) -> Tensor:
    return torch.ones(length, length, dtype=torch.bool).triu(1)


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

        return _mode_callables(module, leaves, forward, g, mode)


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

        return _mode_callables(None, [q, k, v], forward, self.grad_out, mode)


def _mode_callables(
    module: Optional[nn.Module],
    leaves: List[Tensor],
    forward: Callable[[], Tuple[Tensor, Optional[Tensor]]],
    grad_out: Tensor,
    mode: str,
) -> Tuple[Setup, Fn]:
    """(setup, run): setup runs outside the clock; run returns its phases' durations."""
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


def build(w: Workload) -> Any:
    torch.set_num_threads(w.threads)
    return CoreBench(w) if w.group == "core" else LayerBench(w)


# --------------------------------------------------------------------------------------------
# Timing


def rotated(names: Sequence[str], r: int) -> List[str]:
    r %= max(1, len(names))
    return list(names[r:]) + list(names[:r])


def take_sample(setup: Setup, run: Fn, number: int) -> Tuple[float, ...]:
    total: Optional[List[float]] = None
    for _ in range(number):
        if setup is not None:
            setup()
        phases = run()
        total = list(phases) if total is None else [a + b for a, b in zip(total, phases)]
    assert total is not None
    return tuple(t / number for t in total)


def time_case(
    fns: Dict[str, Tuple[Setup, Fn]],
    warmup: int,
    repeats: int,
    max_seconds: float,
    min_sample_s: float,
    on_round: Callable[[], None],
) -> Dict[str, Dict[str, Any]]:
    """Interleaved rounds; returns per contender its samples (tuples of phase times)."""
    names = list(fns)
    start = time.perf_counter()
    last: Dict[str, float] = {}
    warm = 0
    gc.collect()
    gc.disable()
    try:
        for r in range(warmup):
            for name in rotated(names, r):
                last[name] = sum(take_sample(*fns[name], 1))
            warm += 1
            on_round()
            if time.perf_counter() - start > 0.25 * max_seconds:
                break  # a long case: one warm-up round has done the warming
        number = {
            n: (
                max(1, min(MAX_NUMBER, math.ceil(min_sample_s / max(last[n], 1e-9))))
                if n in last
                else 1
            )
            for n in names
        }
        samples: Dict[str, List[Tuple[float, ...]]] = {n: [] for n in names}
        measured_start = time.perf_counter()
        for r in range(repeats):
            for name in rotated(names, r):
                samples[name].append(take_sample(*fns[name], number[name]))
            on_round()
            done = r + 1
            per_round = (time.perf_counter() - measured_start) / done
            if (
                done >= min(MIN_ROUNDS, repeats)
                and time.perf_counter() - start + per_round > max_seconds
            ):
                break
    finally:
        gc.enable()
    return {n: {"samples": samples[n], "number": number[n], "warmup_rounds": warm} for n in names}


def summarize(raw: Dict[str, Any], mode: str) -> Dict[str, Any]:
    """Phase medians of one contender's samples."""
    phases: Dict[str, List[float]] = {}
    for sample in raw["samples"]:
        if mode == "train":
            fwd, bwd = sample
            values = {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}
        else:
            values = {PHASES[mode][0]: sample[0]}
        for phase, value in values.items():
            phases.setdefault(phase, []).append(value)
    return {
        "rounds": len(raw["samples"]),
        "number": raw["number"],
        "warmup_rounds": raw["warmup_rounds"],
        "phases": {
            p: {"median_s": statistics.median(v), "min_s": min(v), "samples_s": v}
            for p, v in phases.items()
        },
    }


# --------------------------------------------------------------------------------------------
# Memory (runs in a subprocess: python bench_attention.py --memory-worker ITEMS.json)


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def quiet_profiler_logs() -> Iterable[None]:
    """The profiler's C++ side writes USDT/STAGE lines to fd 2: hide those, keep the rest."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode(errors="replace").splitlines():
                if not re.match(r"^(USDT|STAGE|ERROR|WARNING):\d{4}-\d\d-\d\d ", line):
                    print(line, file=sys.stderr)


def profile_call(fn: Callable[[], Any]) -> Dict[str, Any]:
    """ATen peak (profiler) and RSS growth of one call of fn, and the ATen ops it ran."""
    from torch._C._profiler import _ExtraFields_Allocation
    from torch.profiler import ProfilerActivity, profile

    with quiet_profiler_logs():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            rss_before = _proc_status("VmRSS")
            can_reset = _reset_peak_rss()
            fn()
            rss_peak = _proc_status("VmHWM")
    events, names = [], set()
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        names.add(event.name)
        if isinstance(event.extra_fields, _ExtraFields_Allocation):
            events.append(event)
    aten_peak = 0
    if events:
        events.sort(key=lambda ev: ev.start_time_ns)
        first = events[0].extra_fields
        baseline = first.total_allocated - first.alloc_size
        aten_peak = max(ev.extra_fields.total_allocated for ev in events) - baseline
    return {
        "aten_peak_bytes": int(aten_peak),
        "rss_growth_bytes": int(rss_peak - rss_before) if can_reset else None,
        "native_fast_path": any("_native_multi_head_attention" in n for n in names),
        "flash_sdpa": any("flash_attention" in n for n in names),
    }


def memory_worker(items_path: str) -> None:
    with open(items_path) as f:
        items = json.load(f)
    workloads = {}
    for item in items:
        workloads.setdefault(item["workload_key"], Workload(**item["workload"]))
    # One tiny call per contender, mode, dtype and group first: one-off library set-up
    # (thread pools, oneDNN/MKL state) is not charged to the first measured item.
    seen = set()
    bench: Any = None
    for w in workloads.values():
        tiny = Workload(w.group, w.dtype, w.embed, w.heads, 64, 1, w.causal, w.threads)
        if tiny.key() in seen:
            continue
        seen.add(tiny.key())
        bench = build(tiny)
        for contender in tiny.contenders:
            for mode in ("train", "infer"):
                setup, run = bench.callables(contender, mode)
                if setup is not None:
                    setup()
                run()
    del bench
    current_key, bench = None, None
    for index, item in enumerate(items):
        if item["workload_key"] != current_key:
            bench = None
            gc.collect()
            _malloc_trim()
            current_key = item["workload_key"]
            bench = build(workloads[current_key])
        setup, run = bench.callables(item["contender"], item["mode"])
        if setup is not None:
            setup()
        gc.collect()
        _malloc_trim()
        result = profile_call(run)
        if setup is not None:
            setup()  # free the gradients
        result["index"] = index
        print("RESULT " + json.dumps(result), flush=True)


def measure_memory(
    items: List[Dict[str, Any]], out_dir: str, progress: "Progress"
) -> Dict[int, Dict[str, Any]]:
    """Runs the memory worker over items; restarts it past an item that kills it."""
    results: Dict[int, Dict[str, Any]] = {}
    pending = list(range(len(items)))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    while pending:
        path = os.path.join(out_dir, "memory_items.json")
        with open(path, "w") as f:
            json.dump([items[i] for i in pending], f)
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-worker", path]
        progress.set_label(f"memory: {items[pending[0]]['label']}")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
        done_here = 0
        assert proc.stdout is not None
        for line in proc.stdout:
            if not line.startswith("RESULT "):
                progress.note(line.rstrip())
                continue
            result = json.loads(line[len("RESULT ") :])
            index = pending[result.pop("index")]
            results[index] = result
            done_here += 1
            progress.advance(items[index]["work"])
            if done_here < len(pending):
                progress.set_label(f"memory: {items[pending[done_here]]['label']}")
        code = proc.wait()
        remaining = pending[done_here:]
        if code != 0 and remaining:
            failed = remaining[0]
            results[failed] = {"error": f"memory worker exited with code {code}"}
            progress.note(f"memory measurement failed (exit code {code}): {items[failed]['label']}")
            progress.advance(items[failed]["work"])
            remaining = remaining[1:]
        elif remaining:
            for i in remaining:
                results[i] = {"error": "memory worker ended early"}
            remaining = []
        pending = remaining
    return results


# --------------------------------------------------------------------------------------------
# Progress bar


class Progress:
    """A one-line progress bar on stderr (a line per step when stderr is not a terminal)."""

    def __init__(self, total: float, enabled: bool = True) -> None:
        self.total = max(total, 1e-9)
        self.done = 0.0
        self.start = time.perf_counter()
        self.label = ""
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.last_line = 0.0

    def _eta(self) -> str:
        if self.done <= 0:
            return "--:--"
        elapsed = time.perf_counter() - self.start
        return fmt_duration(elapsed / self.done * max(self.total - self.done, 0.0))

    def render(self, force: bool = False) -> None:
        if not self.enabled:
            return
        frac = min(self.done / self.total, 1.0)
        elapsed = fmt_duration(time.perf_counter() - self.start)
        if self.tty:
            width = 28
            bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
            line = f"[{bar}] {frac * 100:5.1f}% {elapsed} ETA {self._eta()} | {self.label}"
            cols = 160
            try:
                cols = os.get_terminal_size(2).columns
            except OSError:
                pass
            sys.stderr.write("\r\x1b[2K" + line[: cols - 1])
            sys.stderr.flush()
        elif force:
            sys.stderr.write(f"[{frac * 100:5.1f}% {elapsed} ETA {self._eta()}] {self.label}\n")
            sys.stderr.flush()

    def set_label(self, label: str) -> None:
        self.label = label
        self.render(force=True)

    def advance(self, work: float) -> None:
        self.done += work
        self.render()

    def note(self, message: str) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\r\x1b[2K")
            sys.stderr.flush()
        print(message, flush=True)
        self.render()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\r\x1b[2K")
            sys.stderr.flush()
        if self.enabled:
            print(
                f"finished in {fmt_duration(time.perf_counter() - self.start)}",
                file=sys.stderr,
            )


def fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def est_seconds(flops: float, calls: int) -> float:
    """Relative work estimate for the ETA (only ratios matter)."""
    return flops / 5e10 + 0.003 * calls


# --------------------------------------------------------------------------------------------
# Metadata


def metadata(args: argparse.Namespace) -> Dict[str, Any]:
    config = torch.__config__.show()

    def grab(pattern: str) -> Optional[str]:
        m = re.search(pattern, config)
        return m.group(1).strip() if m else None

    cpu_model, flags = None, []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu_model is None:
                    cpu_model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    interesting = ["avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile"]
    mem_total = None
    try:
        mem_total = _meminfo("MemTotal")
    except (OSError, KeyError):
        pass
    git = {}
    try:
        root = os.path.dirname(HERE)
        git["commit"] = subprocess.run(
            ["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        git["dirty"] = bool(
            subprocess.run(
                ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
        )
    except (OSError, subprocess.SubprocessError):
        pass
    ops = torch.ops.torch_mha
    return {
        "command": "python " + shlex.join(sys.argv),
        "cwd": os.getcwd(),
        "python_executable": sys.executable,
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_version": torch.__version__,
        "torch_config": {
            "blas": grab(r"BLAS_INFO=([^,]+)"),
            "cpu_capability": grab(r"CPU capability usage: (.+)"),
            "mkl": grab(r"(Intel\(R\) oneAPI Math Kernel Library[^\n]*)"),
            "onednn": grab(r"(Intel\(R\) MKL-DNN[^\n]*)"),
            "openmp": grab(r"(OpenMP [^\n]*)"),
            "parallel_backend": _grab(
                r"ATen parallel backend: ([^\n]*)", torch.__config__.parallel_info()
            ),
        },
        "torch_config_show": config,
        "torch_parallel_info": torch.__config__.parallel_info(),
        "torch_mha": {
            "version": torch_mha.__version__,
            "build_info": str(ops._build_info()),
            "cpu_capability": str(ops._cpu_capability()),
            "library": torch_mha.library_path,
        },
        "git": git,
        "cpu_model": cpu_model,
        "cpu_flags": [f for f in interesting if f in flags],
        "cpu_count": os.cpu_count(),
        "memory_total_gib": round(mem_total / GIB, 1) if mem_total else None,
        "default_threads": torch.get_num_threads(),
        "threads_benchmarked": args.threads,
        "loadavg_start": list(os.getloadavg()),
    }


def _grab(pattern: str, text: str) -> Optional[str]:
    m = re.search(pattern, text)
    return m.group(1).strip() if m else None


def _meminfo(field: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


# --------------------------------------------------------------------------------------------
# Arguments


def parse_list(text: str, kind: Callable[[str], Any]) -> List[Any]:
    values: List[Any] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if kind is int and "-" in part:  # "128-8192": the powers of two in between
            lo, hi = (int(p) for p in part.split("-"))
            v = lo
            while v <= hi:
                values.append(v)
                v *= 2
        else:
            values.append(kind(part))
    return values


def parse_causal(text: str) -> List[bool]:
    table = {"off": [False], "on": [True], "both": [False, True]}
    table.update({"false": [False], "true": [True], "0": [False], "1": [True]})
    out: List[bool] = []
    for part in text.split(","):
        for v in table[part.strip().lower()]:
            if v not in out:
                out.append(v)
    return out


PRESETS = {
    "quick": dict(
        dtypes="float32",
        head_dims="64",
        lengths="256,1024,2048",
        causal="off",
        threads="2",
        modes="train,infer",
        groups="layer,core,small",
        repeats=3,
        warmup=1,
        max_case_seconds=20.0,
        memory_lengths="1024,2048,4096,8192",
        memory_scan="ours",
    ),
    "full": dict(
        dtypes="float32,bfloat16",
        head_dims="64,128",
        lengths="128-8192",
        causal="off,on",
        threads="1,2",
        modes="train,infer",
        groups="layer,core,small",
        repeats=7,
        warmup=3,
        max_case_seconds=90.0,
        memory_lengths="128-8192",
        memory_scan="all",
    ),
}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Defaults are --full's; --quick changes them to a subset. Explicit options "
        "override either preset.",
    )
    preset = p.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help="a subset: " + _preset_help("quick"))
    preset.add_argument("--full", action="store_true", help="everything: " + _preset_help("full"))
    p.add_argument("--dtypes", help="comma list: float32,bfloat16")
    p.add_argument("--head-dims", help="comma list of head dims (8 heads each): 64,128")
    p.add_argument("--lengths", help="comma list, or A-B for the powers of two in [A, B]")
    p.add_argument("--causal", help="off, on, or off,on")
    p.add_argument("--threads", help="comma list of torch.set_num_threads values")
    p.add_argument("--modes", help="train (fwd, bwd and fwd+bwd of one step), infer (layer only)")
    p.add_argument("--groups", help="layer, core, small (the L=32 inference call)")
    p.add_argument("--repeats", type=int, help="measured rounds per case (median over them)")
    p.add_argument("--warmup", type=int, help="warm-up rounds per case")
    p.add_argument(
        "--max-case-seconds",
        type=float,
        help="a case that runs longer stops after at least 3 rounds",
    )
    p.add_argument("--tokens", type=int, default=4096, help="batch x length (default 4096)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument(
        "--memory-budget-gib",
        type=float,
        default=12.0,
        help="skip a contender whose estimated memory exceeds this (default 12)",
    )
    p.add_argument(
        "--memory-lengths", help="lengths of the batch-1 fwd+bwd memory scan (A-B allowed)"
    )
    p.add_argument(
        "--memory-scan",
        choices=("all", "linear", "ours", "none"),
        help="contenders of the memory scan: all; linear (torch_mha and the flash anchors); "
        "ours (torch_mha only); none",
    )
    p.add_argument("--no-memory", action="store_true", help="skip all memory measurements")
    p.add_argument("--mm-size", type=int, default=2048, help="torch.mm ceiling size (2048)")
    p.add_argument("--out", default=os.path.join(HERE, "out"), help="JSON directory")
    p.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"), help="Markdown report")
    p.add_argument("--plot", default=os.path.join(HERE, "results.png"), help="PNG plot")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_worker:
        return args
    preset_values = PRESETS["quick" if args.quick else "full"]
    args.preset = "quick" if args.quick else "full"
    for name, value in preset_values.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.dtypes = parse_list(args.dtypes, str)
    for d in args.dtypes:
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
    args.head_dims = parse_list(args.head_dims, int)
    args.lengths = parse_list(args.lengths, int)
    args.causal = parse_causal(args.causal)
    args.threads = parse_list(args.threads, int)
    modes = []
    for m in parse_list(args.modes, str):
        m = {"fwd": "train", "bwd": "train", "fwdbwd": "train"}.get(m, m)
        if m not in ("train", "infer"):
            p.error(f"unknown mode {m!r}: train or infer")
        if m not in modes:
            modes.append(m)
    args.modes = modes
    args.groups = parse_list(args.groups, str)
    for g in args.groups:
        if g not in ("layer", "core", "small"):
            p.error(f"unknown group {g!r}: layer, core or small")
    args.memory_lengths = parse_list(args.memory_lengths, int)
    if args.no_memory:
        args.memory_scan = "none"
    return args


def _preset_help(name: str) -> str:
    v = PRESETS[name]
    return (
        f"dtypes {v['dtypes']}, head dims {v['head_dims']}, lengths {v['lengths']}, causal "
        f"{v['causal']}, threads {v['threads']}, {v['repeats']} repeats, {v['warmup']} warm-up, "
        f"memory scan {v['memory_scan']} at {v['memory_lengths']}"
    )


# --------------------------------------------------------------------------------------------
# The run


def plan_workloads(args: argparse.Namespace) -> Tuple[List[Workload], List[Workload]]:
    timed: List[Workload] = []
    for threads in args.threads:
        for dtype in args.dtypes:
            for group in ("layer", "core"):
                if group not in args.groups:
                    continue
                for head_dim in args.head_dims:
                    for causal in args.causal:
                        for length in args.lengths:
                            batch = max(1, args.tokens // length)
                            timed.append(
                                Workload(
                                    group,
                                    dtype,
                                    head_dim * args.heads,
                                    args.heads,
                                    length,
                                    batch,
                                    causal,
                                    threads,
                                )
                            )
    small: List[Workload] = []
    if "small" in args.groups:
        for threads in args.threads:
            for dtype in args.dtypes:
                small.append(
                    Workload(
                        "small",
                        dtype,
                        SMALL["embed"],
                        SMALL["heads"],
                        SMALL["length"],
                        SMALL["batch"],
                        False,
                        threads,
                    )
                )
    return timed, small


def scan_workloads(args: argparse.Namespace) -> List[Workload]:
    if args.memory_scan == "none":
        return []
    threads = max(args.threads)
    out = []
    for group in ("layer", "core"):
        for length in args.memory_lengths:
            out.append(
                Workload(group, "float32", 64 * args.heads, args.heads, length, 1, False, threads)
            )
    return out


def scan_contenders(w: Workload, which: str) -> Tuple[str, ...]:
    if which == "all":
        return w.contenders
    if which == "linear":
        return ("nn_nw", "ours_nw") if w.group == "layer" else CORE_CONTENDERS
    return ("ours_nw",) if w.group == "layer" else ("ours",)


def modes_for(w: Workload, args: argparse.Namespace) -> List[str]:
    if w.group == "small":
        return ["infer"]
    if w.group == "core":
        return [m for m in args.modes if m == "train"]
    return list(args.modes)


def case_work(w: Workload, mode: str, contenders: Sequence[str], calls: int) -> float:
    flops = w.attention_flops() * (3.5 if mode == "train" else 1.0)
    if w.group != "core":  # projections
        flops += 8.0 * w.batch * w.length * w.embed**2 * (3.0 if mode == "train" else 1.0)
    return est_seconds(flops * len(contenders) * calls, len(contenders) * calls)


def measure_ceiling(
    args: argparse.Namespace, progress: Progress, when: str
) -> List[Dict[str, Any]]:
    out = []
    n = args.mm_size
    for threads in args.threads:
        for dtype in args.dtypes:
            torch.set_num_threads(threads)
            progress.set_label(f"ceiling ({when}): torch.mm {n}x{n} {dtype} {threads}t")
            a = torch.randn(n, n, dtype=DTYPES[dtype])
            b = torch.randn(n, n, dtype=DTYPES[dtype])
            c = torch.empty(n, n, dtype=DTYPES[dtype])

            def run() -> Tuple[float, ...]:
                t0 = time.perf_counter()
                torch.mm(a, b, out=c)
                return (time.perf_counter() - t0,)

            raw = time_case(
                {"mm": (None, run)},
                max(1, args.warmup),
                max(args.repeats, 3),
                args.max_case_seconds,
                0.02,
                lambda: None,
            )["mm"]
            times = [s[0] for s in raw["samples"]]
            median = statistics.median(times)
            out.append(
                {
                    "dtype": dtype,
                    "threads": threads,
                    "size": n,
                    "when": when,
                    "median_s": median,
                    "samples_s": times,
                    "number": raw["number"],
                    "gflops": 2.0 * n**3 / median / 1e9,
                }
            )
            progress.advance(est_seconds(2.0 * n**3 * 10, 10))
    return out


def run_benchmark(args: argparse.Namespace) -> Dict[str, Any]:
    os.makedirs(args.out, exist_ok=True)
    meta = metadata(args)
    timed, small = plan_workloads(args)
    scan = scan_workloads(args)
    budget = args.memory_budget_gib * GIB
    rounds = args.warmup + args.repeats
    mm_work = est_seconds(2.0 * args.mm_size**3 * 10, 10) * len(args.threads) * len(args.dtypes)

    # Memory items: (workload, contender, mode), measured later in the worker.
    mem_threads = max(args.threads)
    mem_items: List[Dict[str, Any]] = []
    mem_index: Dict[Tuple[str, str, str], int] = {}
    skipped: List[Dict[str, Any]] = []

    def add_mem_item(w: Workload, contender: str, mode: str) -> None:
        key = (w.key(), contender, mode)
        if key in mem_index or args.no_memory:
            return
        mem_index[key] = len(mem_items)
        mem_items.append(
            {
                "workload": asdict(w),
                "workload_key": w.key(),
                "contender": contender,
                "mode": mode,
                "label": f"{w.label()} {SHORT[contender]} {mode}",
                "work": case_work(w, mode, [contender], 1) * 1.5 + 0.4,
            }
        )

    total_work = 2 * mm_work
    for w in timed + small:
        for mode in modes_for(w, args):
            total_work += case_work(w, mode, w.contenders, rounds)
            if w.threads == mem_threads:
                for c in w.contenders:
                    if w.estimate_bytes(c, mode) <= budget:
                        add_mem_item(w, c, mode)
    for w in scan:
        for c in scan_contenders(w, args.memory_scan):
            if w.estimate_bytes(c, "train") <= budget:
                add_mem_item(w, c, "train")
    total_work += sum(item["work"] for item in mem_items)
    # The worker runs items in increasing size (see METHOD: cached buffers).
    order = sorted(
        range(len(mem_items)),
        key=lambda i: (
            mem_items[i]["workload"]["batch"]
            * mem_items[i]["workload"]["length"] ** 2
            * mem_items[i]["workload"]["embed"],
            mem_items[i]["workload_key"],
        ),
    )
    mem_items = [mem_items[i] for i in order]
    new_position = {old: new for new, old in enumerate(order)}
    mem_index = {k: new_position[v] for k, v in mem_index.items()}

    progress = Progress(total_work, enabled=not args.no_progress)
    print(
        f"torch {torch.__version__} | torch_mha {meta['torch_mha']['version']} "
        f"({meta['torch_mha']['build_info']}, kernels {meta['torch_mha']['cpu_capability']}) | "
        f"{meta['cpu_model']} | {meta['cpu_count']} CPUs | threads {args.threads}",
        flush=True,
    )
    print(
        f"{len(timed)} timed workloads, {len(small)} small, {len(scan)} memory-scan lengths "
        f"x groups; {args.repeats} repeats, {args.warmup} warm-up; memory budget "
        f"{args.memory_budget_gib:g} GiB",
        flush=True,
    )

    ceiling = measure_ceiling(args, progress, "start")
    cases: List[Dict[str, Any]] = []
    for w in timed + small:
        bench = None
        for mode in modes_for(w, args):
            contenders = []
            for c in w.contenders:
                need = w.estimate_bytes(c, mode)
                if need > budget:
                    reason = (
                        f"estimated {need / GIB:.2f} GiB > --memory-budget-gib "
                        f"{args.memory_budget_gib:g}"
                    )
                    skipped.append(
                        {
                            "case": w.label(),
                            "key": w.key(),
                            "mode": mode,
                            "contender": c,
                            "reason": reason,
                        }
                    )
                    progress.note(f"skip {w.label()} {mode} {LABELS[c]}: {reason}")
                else:
                    contenders.append(c)
            work = case_work(w, mode, w.contenders, rounds)
            progress.set_label(f"{w.label()} {mode}")
            if bench is None:
                bench = build(w)
            torch.set_num_threads(w.threads)
            fns = {c: bench.callables(c, mode) for c in contenders}
            step = work / max(rounds, 1)
            advanced = [0.0]

            def on_round() -> None:
                advanced[0] += step
                progress.advance(step)

            raw = time_case(fns, args.warmup, args.repeats, args.max_case_seconds, 0.02, on_round)
            progress.advance(max(work - advanced[0], 0.0))
            result = {c: summarize(raw[c], mode) for c in contenders}
            cases.append(case_record(w, mode, result, skipped))
        del bench
        gc.collect()
    ceiling += measure_ceiling(args, progress, "end")

    memory_results = measure_memory(mem_items, args.out, progress) if mem_items else {}
    progress.close()

    memory = []
    for key, index in sorted(mem_index.items(), key=lambda kv: kv[1]):
        item = mem_items[index]
        entry = {
            "workload": item["workload"],
            "workload_key": item["workload_key"],
            "contender": item["contender"],
            "mode": item["mode"],
        }
        entry.update(memory_results.get(index, {"error": "not run"}))
        memory.append(entry)
    # Budget skips of memory items (the timed cases' skips are recorded above).
    for w in scan:
        for c in scan_contenders(w, args.memory_scan):
            need = w.estimate_bytes(c, "train")
            if need > budget:
                skipped.append(
                    {
                        "case": w.label() + " (memory scan)",
                        "key": w.key(),
                        "mode": "train",
                        "contender": c,
                        "reason": f"estimated {need / GIB:.2f} GiB > --memory-budget-gib "
                        f"{args.memory_budget_gib:g}",
                    }
                )
    meta["loadavg_end"] = list(os.getloadavg())
    data = {
        "metadata": meta,
        "config": {
            k: v for k, v in vars(args).items() if k not in ("memory_worker",) and v is not None
        },
        "ceiling": ceiling,
        "cases": cases,
        "memory": memory,
        "memory_scan_keys": [w.key() for w in scan],
        "skipped": skipped,
    }
    data["targets"] = evaluate_targets(data)
    return data


def case_record(
    w: Workload, mode: str, result: Dict[str, Any], skipped: List[Dict[str, Any]]
) -> Dict[str, Any]:
    flops = w.attention_flops()
    for c, r in result.items():
        for phase, stats in r["phases"].items():
            stats["gflops"] = flops * FLOP_FACTOR[phase] / stats["median_s"] / 1e9
    speedups: Dict[str, Dict[str, Any]] = {}
    for anchor, ours, label in w.pairs:
        if anchor in result and ours in result:
            speedups[label] = {
                "anchor": anchor,
                "ours": ours,
                **{
                    phase: result[anchor]["phases"][phase]["median_s"]
                    / result[ours]["phases"][phase]["median_s"]
                    for phase in result[ours]["phases"]
                },
            }
    return {
        **asdict(w),
        "head_dim": w.head_dim,
        "key": w.key(),
        "mode": mode,
        "attention_flops_fwd": flops,
        "contenders": result,
        "speedups": speedups,
        "skipped": {
            s["contender"]: s["reason"]
            for s in skipped
            if s["key"] == w.key() and s["mode"] == mode
        },
    }


# --------------------------------------------------------------------------------------------
# Targets


def ceiling_gflops(data: Dict[str, Any], dtype: str, threads: int) -> Optional[float]:
    values = [
        c["gflops"] for c in data["ceiling"] if c["dtype"] == dtype and c["threads"] == threads
    ]
    return max(values) if values else None


def _ratio_target(
    data: Dict[str, Any],
    name: str,
    group: str,
    phase: str,
    pair: str,
    threshold: float,
    dtype: str,
    lengths: Tuple[int, int],
    threads: Optional[int] = 2,
) -> Dict[str, Any]:
    mode = "infer" if phase == "infer" else "train"
    rows = []
    for case in data["cases"]:
        if case["group"] != group or case["mode"] != mode or case["dtype"] != dtype:
            continue
        if threads is not None and case["threads"] != threads:
            continue
        if not lengths[0] <= case["length"] <= lengths[1]:
            continue
        s = case["speedups"].get(pair)
        if s is None or phase not in s:
            continue
        rows.append((s[phase], case))
    return _verdict(name, threshold, rows, "x")


def _verdict(
    name: str, threshold: float, rows: List[Tuple[float, Dict[str, Any]]], unit: str
) -> Dict[str, Any]:
    if not rows:
        return {
            "target": name,
            "threshold": threshold,
            "unit": unit,
            "status": "not measured",
            "cases": [],
        }
    worst = min(r for r, _ in rows)
    detail = [
        {
            "ratio": r,
            "length": c["length"],
            "head_dim": c["head_dim"],
            "causal": c["causal"],
            "threads": c["threads"],
            "dtype": c["dtype"],
        }
        for r, c in rows
    ]
    return {
        "target": name,
        "threshold": threshold,
        "unit": unit,
        "status": "PASS" if worst >= threshold else "MISS",
        "worst": worst,
        "geomean": math.exp(sum(math.log(r) for r, _ in rows) / len(rows)),
        "cases": detail,
    }


def evaluate_targets(data: Dict[str, Any]) -> List[Dict[str, Any]]:
    targets = []
    for dtype in ("float32", "bfloat16"):
        prefix = "" if dtype == "float32" else "bfloat16: "
        rng = (1024, 4096)
        targets.append(
            _ratio_target(
                data,
                prefix + "layer training step (fwd+bwd) vs nn need_weights=True, 2 threads, "
                "L 1024-4096",
                "layer",
                "fwdbwd",
                "need_weights=True",
                1.5,
                dtype,
                rng,
            )
        )
        targets.append(
            _ratio_target(
                data,
                prefix + "layer training step (fwd+bwd) vs nn need_weights=False, 2 threads, "
                "L 1024-4096",
                "layer",
                "fwdbwd",
                "need_weights=False",
                1.3,
                dtype,
                rng,
            )
        )
        targets.append(
            _ratio_target(
                data,
                prefix + "core forward vs F.sdpa, 2 threads, L 1024-4096",
                "core",
                "fwd",
                "F.sdpa",
                1.2,
                dtype,
                rng,
            )
        )
        targets.append(
            _ratio_target(
                data,
                prefix + "core backward vs F.sdpa, 2 threads, L 1024-4096",
                "core",
                "bwd",
                "F.sdpa",
                1.5,
                dtype,
                rng,
            )
        )
        rows = []
        for case in data["cases"]:
            if case["group"] != "core" or case["mode"] != "train" or case["dtype"] != dtype:
                continue
            if case["length"] < 2048 or "ours" not in case["contenders"]:
                continue
            mm = ceiling_gflops(data, dtype, case["threads"])
            if mm:
                gf = case["contenders"]["ours"]["phases"]["fwdbwd"]["gflops"]
                rows.append((gf / mm, case))
        targets.append(
            _verdict(
                prefix + "core fwd+bwd GFLOP/s / torch.mm GFLOP/s (same dtype and threads), "
                "L >= 2048",
                MM_FLOOR,
                rows,
                "of mm",
            )
        )
        targets.append(
            _ratio_target(
                data,
                prefix + "small inference (L=32, B=8, E=256) vs nn's fast path, any threads",
                "small",
                "infer",
                "need_weights=True",
                1.0,
                dtype,
                (0, 1 << 30),
                threads=None,
            )
        )
        targets[-1]["target"] += " [need_weights=True]"
        targets.append(
            _ratio_target(
                data,
                prefix + "small inference (L=32, B=8, E=256) vs nn's fast path, any threads "
                "[need_weights=False]",
                "small",
                "infer",
                "need_weights=False",
                1.0,
                dtype,
                (0, 1 << 30),
                threads=None,
            )
        )
    targets.append(memory_target(data))
    return targets


def memory_scan_series(data: Dict[str, Any], group: str, contender: str) -> List[Dict[str, Any]]:
    keys = set(data["memory_scan_keys"])
    rows = [
        m
        for m in data["memory"]
        if m["workload_key"] in keys
        and m["workload"]["group"] == group
        and m["contender"] == contender
        and m["mode"] == "train"
        and "aten_peak_bytes" in m
    ]
    return sorted(rows, key=lambda m: m["workload"]["length"])


def memory_target(data: Dict[str, Any]) -> Dict[str, Any]:
    name = (
        "torch_mha fwd+bwd peak memory linear in length (batch-1 scan, float32, D=64): "
        "successive-length ratio <= 2.5 (linear 2, quadratic 4)"
    )
    series = []
    for group, contender in (("layer", "ours_nw"), ("core", "ours")):
        rows = memory_scan_series(data, group, contender)
        if len(rows) < 2:
            continue
        ratios = []
        for a, b in zip(rows, rows[1:]):
            la, lb = a["workload"]["length"], b["workload"]["length"]
            if lb == 2 * la and a["aten_peak_bytes"] > 0:
                ratios.append(
                    {"from": la, "to": lb, "ratio": b["aten_peak_bytes"] / a["aten_peak_bytes"]}
                )
        last = rows[-1]
        series.append(
            {
                "group": group,
                "contender": contender,
                "ratios": ratios,
                "largest_length": last["workload"]["length"],
                "peak_at_largest_bytes": last["aten_peak_bytes"],
                "rss_growth_at_largest_bytes": last.get("rss_growth_bytes"),
                "peaks": {str(r["workload"]["length"]): r["aten_peak_bytes"] for r in rows},
            }
        )
    all_ratios = [r["ratio"] for s in series for r in s["ratios"]]
    if not all_ratios:
        return {"target": name, "threshold": 2.5, "status": "not measured", "series": series}
    worst = max(all_ratios)
    return {
        "target": name,
        "threshold": 2.5,
        "status": "PASS" if worst <= 2.5 else "MISS",
        "worst": worst,
        "series": series,
    }


# --------------------------------------------------------------------------------------------
# Reporting


def fmt_ms(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    if ms >= 1000:
        return f"{ms:.0f}"
    if ms >= 100:
        return f"{ms:.1f}"
    if ms >= 10:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def fmt_mib(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value / MIB:.1f}"


class Table:
    def __init__(self, title: str, columns: List[str], note: str = "") -> None:
        self.title, self.columns, self.note = title, columns, note
        self.rows: List[List[str]] = []

    def add(self, row: Sequence[Any]) -> None:
        self.rows.append([str(v) for v in row])

    def text(self) -> str:
        widths = [
            max(len(c), *(len(r[i]) for r in self.rows)) if self.rows else len(c)
            for i, c in enumerate(self.columns)
        ]
        lines = [self.title, "-" * len(self.title)]
        if self.note:
            lines.append(self.note)
        lines.append("  ".join(c.rjust(w) for c, w in zip(self.columns, widths)))
        for r in self.rows:
            lines.append("  ".join(v.rjust(w) for v, w in zip(r, widths)))
        if not self.rows:
            lines.append("(nothing measured)")
        return "\n".join(lines)

    def markdown(self) -> str:
        lines = [f"### {self.title}", ""]
        if self.note:
            lines += [self.note, ""]
        if not self.rows:
            return "\n".join(lines + ["(nothing measured)", ""])
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "|".join("---:" for _ in self.columns) + "|")
        for r in self.rows:
            lines.append("| " + " | ".join(v.replace("|", "/") for v in r) + " |")
        return "\n".join(lines + [""])


def _median(case: Dict[str, Any], contender: str, phase: str) -> Optional[float]:
    c = case["contenders"].get(contender)
    if c is None or phase not in c["phases"]:
        return None
    return c["phases"][phase]["median_s"]


def _speedup(case: Dict[str, Any], label: str, phase: str) -> str:
    s = case["speedups"].get(label)
    if s is None or phase not in s:
        return "-"
    return f"{s[phase]:.2f}x"


def _gflops(case: Dict[str, Any], contender: str, phase: str) -> str:
    c = case["contenders"].get(contender)
    if c is None or phase not in c["phases"]:
        return "-"
    return f"{c['phases'][phase]['gflops']:.1f}"


def _skip_or(case: Dict[str, Any], contender: str, phase: str) -> str:
    if contender in case["skipped"]:
        return "skip"
    return fmt_ms(_median(case, contender, phase))


def _config_cells(case: Dict[str, Any]) -> List[Any]:
    return [
        case["dtype"],
        case["head_dim"],
        "yes" if case["causal"] else "no",
        case["threads"],
        case["length"],
        case["batch"],
    ]


def build_tables(data: Dict[str, Any]) -> List[Table]:
    tables = []
    t = Table(
        "Machine ceiling: torch.mm",
        ["dtype", "threads", "size", "GFLOP/s start", "GFLOP/s end", "ceiling"],
    )
    seen = set()
    for c in data["ceiling"]:
        key = (c["dtype"], c["threads"])
        if key in seen:
            continue
        seen.add(key)
        start = [
            x["gflops"]
            for x in data["ceiling"]
            if (x["dtype"], x["threads"]) == key and x["when"] == "start"
        ]
        end = [
            x["gflops"]
            for x in data["ceiling"]
            if (x["dtype"], x["threads"]) == key and x["when"] == "end"
        ]
        t.add(
            [
                c["dtype"],
                c["threads"],
                c["size"],
                f"{start[0]:.1f}" if start else "-",
                f"{end[0]:.1f}" if end else "-",
                f"{ceiling_gflops(data, *key):.1f}",
            ]
        )
    tables.append(t)

    config_cols = ["dtype", "D", "causal", "thr", "L", "B"]
    layer_cases = [c for c in data["cases"] if c["group"] == "layer"]
    for phase in ("fwdbwd", "fwd", "bwd", "infer"):
        mode = "infer" if phase == "infer" else "train"
        rows = [c for c in layer_cases if c["mode"] == mode]
        if not rows:
            continue
        t = Table(
            f"Layer, {PHASE_NAMES[phase]}: median ms, speed-up = nn / torch_mha",
            config_cols
            + [
                "nn w=T",
                "ours w=T",
                "speed-up",
                "nn w=F",
                "ours w=F",
                "speed-up",
                "GFLOP/s ours w=F",
            ],
            "GFLOP/s count attention FLOPs only (projections excluded). w = need_weights.",
        )
        for c in rows:
            t.add(
                _config_cells(c)
                + [
                    _skip_or(c, "nn_w", phase),
                    _skip_or(c, "ours_w", phase),
                    _speedup(c, "need_weights=True", phase),
                    _skip_or(c, "nn_nw", phase),
                    _skip_or(c, "ours_nw", phase),
                    _speedup(c, "need_weights=False", phase),
                    _gflops(c, "ours_nw", phase),
                ]
            )
        tables.append(t)

    core_cases = [c for c in data["cases"] if c["group"] == "core"]
    for phase in ("fwdbwd", "fwd", "bwd"):
        if not core_cases:
            break
        t = Table(
            f"Core, {PHASE_NAMES[phase]}: median ms, speed-up = F.sdpa / torch_mha.attention",
            config_cols + ["SDPA", "ours", "speed-up", "GFLOP/s SDPA", "GFLOP/s ours", "ours / mm"],
        )
        for c in core_cases:
            mm = ceiling_gflops(data, c["dtype"], c["threads"])
            ours = c["contenders"].get("ours")
            frac = (
                f"{ours['phases'][phase]['gflops'] / mm * 100:.0f}%"
                if ours is not None and mm
                else "-"
            )
            t.add(
                _config_cells(c)
                + [
                    _skip_or(c, "sdpa", phase),
                    _skip_or(c, "ours", phase),
                    _speedup(c, "F.sdpa", phase),
                    _gflops(c, "sdpa", phase),
                    _gflops(c, "ours", phase),
                    frac,
                ]
            )
        tables.append(t)

    small = [c for c in data["cases"] if c["group"] == "small"]
    if small:
        fast = {
            (m["workload_key"], m["contender"]): m.get("native_fast_path") for m in data["memory"]
        }
        t = Table(
            f"Small inference: L={SMALL['length']}, B={SMALL['batch']}, E={SMALL['embed']}, "
            f"{SMALL['heads']} heads, eval + no_grad: median ms, speed-up = nn / torch_mha",
            ["dtype", "thr", "need_weights", "nn", "torch_mha", "speed-up", "nn fast path"],
            "nn.MultiheadAttention in eval + no_grad + batch_first takes its native fast path "
            "(torch._native_multi_head_attention); the last column is what the profiler saw.",
        )
        for c in small:
            for anchor, ours, label in LAYER_PAIRS:
                fp = fast.get((c["key"], anchor))
                t.add(
                    [
                        c["dtype"],
                        c["threads"],
                        label.split("=")[1],
                        _skip_or(c, anchor, "infer"),
                        _skip_or(c, ours, "infer"),
                        _speedup(c, label, "infer"),
                        "-" if fp is None else ("yes" if fp else "NO"),
                    ]
                )
        tables.append(t)

    tables += memory_tables(data)

    return tables


def targets_text(data: Dict[str, Any]) -> str:
    lines = ["Targets (issue #5)", "------------------"]
    for tg in data["targets"]:
        lines.append(f"{tg['status']:>12}  {tg['target']} ({_fmt_threshold(tg)})")
        if tg["status"] != "not measured":
            lines.append(" " * 14 + describe_target(tg))
    return "\n".join(lines)


def _fmt_threshold(tg: Dict[str, Any]) -> str:
    if "series" in tg:
        return f"<= {tg['threshold']}"
    if tg.get("unit") == "of mm":
        return f">= {tg['threshold'] * 100:.0f}%"
    return f">= {tg['threshold']}x"


def describe_target(tg: Dict[str, Any]) -> str:
    if tg["status"] == "not measured":
        return "not measured"
    if "series" in tg:
        parts = []
        for s in tg["series"]:
            ratios = ", ".join(f"{r['ratio']:.2f}" for r in s["ratios"])
            rss = s.get("rss_growth_at_largest_bytes")
            rss_text = f", RSS growth {rss / MIB:.0f} MiB" if rss is not None else ""
            parts.append(
                f"{'layer' if s['group'] == 'layer' else 'core'}: "
                f"{s['peak_at_largest_bytes'] / MIB:.1f} MiB at L={s['largest_length']}"
                f"{rss_text}; ratios {ratios}"
            )
        return "; ".join(parts)
    if tg.get("unit") == "of mm":
        cells = [
            f"{c['ratio'] * 100:.0f}%@{c['length']}"
            + (f"/D{c['head_dim']}" if c["head_dim"] != 64 else "")
            + ("/causal" if c["causal"] else "")
            + f"/{c['threads']}t"
            for c in tg["cases"]
        ]
        return f"worst {tg['worst'] * 100:.0f}% ({', '.join(cells)})"
    cells = [
        f"{c['ratio']:.2f}x@{c['length']}"
        + (f"/D{c['head_dim']}" if c["head_dim"] != 64 else "")
        + ("/causal" if c["causal"] else "")
        + (f"/{c['threads']}t" if "small" in tg["target"] else "")
        for c in tg["cases"]
    ]
    return f"worst {tg['worst']:.2f}x ({', '.join(cells)})"


def memory_tables(data: Dict[str, Any]) -> List[Table]:
    tables = []
    by_key: Dict[Tuple[str, str, str], Dict[str, Any]] = {
        (m["workload_key"], m["contender"], m["mode"]): m for m in data["memory"]
    }
    scan_keys = set(data["memory_scan_keys"])

    def cell(key: str, contender: str, mode: str) -> str:
        m = by_key.get((key, contender, mode))
        if m is None:
            return "skip" if _was_skipped(data, key, contender) else "-"
        if "error" in m:
            return "error"
        rss = m.get("rss_growth_bytes")
        return f"{fmt_mib(m['aten_peak_bytes'])} / {fmt_mib(rss)}"

    timed_keys = []
    for c in data["cases"]:
        if c["group"] in ("layer", "core") and c["key"] not in timed_keys:
            timed_keys.append(c["key"])
    workloads = {m["workload_key"]: m["workload"] for m in data["memory"]}
    note = (
        "Cells: ATen peak / RSS growth, MiB (see Method). Training = one fwd+bwd; "
        "inference = one forward in eval + no_grad. Measured at the largest thread count."
    )
    for group, contenders in (("layer", LAYER_CONTENDERS), ("core", CORE_CONTENDERS)):
        for mode in ("train", "infer"):
            keys = [
                k
                for k in timed_keys
                if k in workloads
                and workloads[k]["group"] == group
                and any((k, c, mode) in by_key for c in contenders)
            ]
            if not keys:
                continue
            t = Table(
                f"Peak memory, {group}, "
                + ("training step (fwd+bwd)" if mode == "train" else "inference"),
                ["dtype", "D", "causal", "L", "B"] + [SHORT[c] for c in contenders],
                note,
            )
            for k in keys:
                w = workloads[k]
                t.add(
                    [
                        w["dtype"],
                        w["embed"] // w["heads"],
                        "yes" if w["causal"] else "no",
                        w["length"],
                        w["batch"],
                    ]
                    + [cell(k, c, mode) for c in contenders]
                )
            tables.append(t)
    if scan_keys:
        lengths = sorted({workloads[k]["length"] for k in scan_keys if k in workloads})
        cols = [("layer", c) for c in LAYER_CONTENDERS] + [("core", c) for c in CORE_CONTENDERS]
        present = [
            (g, c)
            for g, c in cols
            if any(
                m["workload"]["group"] == g
                and m["contender"] == c
                and m["workload_key"] in scan_keys
                for m in data["memory"]
            )
        ]
        t = Table(
            "Memory scan: training step (fwd+bwd) at batch 1, float32, D=64, not causal",
            ["L"] + [f"{g} {SHORT[c]}" for g, c in present],
            note.replace(" Measured at the largest thread count.", "")
            + " Linear memory doubles from one row to the next; quadratic quadruples.",
        )
        for length in lengths:
            row: List[str] = [str(length)]
            for g, c in present:
                key = next(
                    (
                        k
                        for k in scan_keys
                        if k in workloads
                        and workloads[k]["group"] == g
                        and workloads[k]["length"] == length
                    ),
                    None,
                )
                row.append(cell(key, c, "train") if key else "-")
            t.add(row)
        tables.append(t)
    return tables


def _was_skipped(data: Dict[str, Any], key: str, contender: str) -> bool:
    return any(s["contender"] == contender and s["key"] == key for s in data["skipped"])


def make_plot(data: Dict[str, Any], path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"matplotlib is not installed ({exc}); no plot"

    panels: List[Tuple[str, str, str, str]] = []  # (group, phase, pair label, title)
    for phase in ("fwdbwd", "fwd", "bwd", "infer"):
        for _, _, label in LAYER_PAIRS:
            panels.append(("layer", phase, label, f"layer {PHASE_NAMES[phase]}\nvs nn {label}"))
    for phase in ("fwdbwd", "fwd", "bwd"):
        panels.append(("core", phase, "F.sdpa", f"core {PHASE_NAMES[phase]}\nvs F.sdpa"))
    panels = [
        p
        for p in panels
        if any(
            c["group"] == p[0] and p[2] in c["speedups"] and p[1] in c["speedups"][p[2]]
            for c in data["cases"]
        )
    ]
    n_panels = len(panels) + 2
    cols = 4
    rows = max(1, math.ceil(n_panels / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.0 * rows), squeeze=False)
    flat = list(axes.flat)
    combos = sorted(
        {
            (c["dtype"], c["head_dim"], c["causal"], c["threads"])
            for c in data["cases"]
            if c["group"] != "small"
        }
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    style: Dict[Tuple[Any, ...], Dict[str, Any]] = {}
    dd = sorted({(d, h) for d, h, _, _ in combos})
    for combo in combos:
        dtype, hd, causal, threads = combo
        style[combo] = dict(
            color=colors[dd.index((dtype, hd)) % len(colors)],
            linestyle="--" if causal else "-",
            marker="o" if threads == max(t for *_, t in combos) else "s",
            label=f"{dtype} D={hd}{' causal' if causal else ''} {threads}t",
        )
    handles = {}
    for ax, (group, phase, label, title) in zip(flat, panels):
        for combo in combos:
            pts = sorted(
                (c["length"], c["speedups"][label][phase])
                for c in data["cases"]
                if c["group"] == group
                and (c["dtype"], c["head_dim"], c["causal"], c["threads"]) == combo
                and label in c["speedups"]
                and phase in c["speedups"][label]
            )
            if pts:
                (line,) = ax.plot(*zip(*pts), **style[combo])
                handles[style[combo]["label"]] = line
        ax.axhline(1.0, color="black", linewidth=0.8)
        target = PLOT_TARGETS.get((group, phase, label))
        if target is not None:
            handles["issue #5 target"] = ax.axhline(
                target, color="red", linestyle=":", linewidth=1.2, label="issue #5 target"
            )
        _length_axis(ax)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("length")
        ax.set_ylabel("speed-up (anchor / torch_mha)")
        ax.grid(True, alpha=0.3)

    # Memory panels.
    mem_axes = flat[len(panels) : len(panels) + 2]
    scan_keys = set(data["memory_scan_keys"])
    timed_mem = [
        m
        for m in data["memory"]
        if m["workload_key"] not in scan_keys and m["mode"] == "train" and "aten_peak_bytes" in m
    ]
    if combos:
        first = combos[0]
        ax = mem_axes[0]
        for i, (group, contender) in enumerate(
            [("layer", c) for c in LAYER_CONTENDERS] + [("core", c) for c in CORE_CONTENDERS]
        ):
            pts = sorted(
                (m["workload"]["length"], m["aten_peak_bytes"] / MIB)
                for m in timed_mem
                if m["workload"]["group"] == group
                and m["contender"] == contender
                and (
                    m["workload"]["dtype"],
                    m["workload"]["embed"] // m["workload"]["heads"],
                    m["workload"]["causal"],
                )
                == first[:3]
            )
            if pts:
                ax.plot(
                    *zip(*pts),
                    marker="o",
                    color=colors[i % len(colors)],
                    label=f"{group} {SHORT[contender]}",
                )
        ax.set_title(
            f"ATen peak, training step, {first[0]} D={first[1]}"
            f"{' causal' if first[2] else ''}\nbatch x length = {data['config'].get('tokens')}",
            fontsize=9,
        )
        _memory_axes(ax)
    ax = mem_axes[1]
    for i, (group, contender) in enumerate(
        [("layer", c) for c in LAYER_CONTENDERS] + [("core", c) for c in CORE_CONTENDERS]
    ):
        rows_ = memory_scan_series(data, group, contender)
        if rows_:
            ax.plot(
                [r["workload"]["length"] for r in rows_],
                [r["aten_peak_bytes"] / MIB for r in rows_],
                marker="o",
                color=colors[i % len(colors)],
                label=f"{group} {SHORT[contender]}",
            )
    ax.set_title("ATen peak, training step, batch 1 (memory scan)\nfloat32 D=64", fontsize=9)
    _memory_axes(ax)
    for ax in flat[len(panels) + 2 :]:
        ax.axis("off")
    if handles:
        fig.legend(
            list(handles.values()),
            list(handles.keys()),
            loc="lower center",
            ncol=min(4, len(handles)),
            fontsize=8,
            bbox_to_anchor=(0.5, 0.0),
        )
    fig.suptitle(
        f"torch_mha vs anchors ({data['metadata']['date_utc']}, torch "
        f"{data['metadata']['torch_version']}, {data['metadata']['cpu_model']})",
        fontsize=11,
    )
    legend_rows = math.ceil(len(handles) / 4) if handles else 0
    fig.tight_layout(rect=(0, 0.03 * legend_rows + 0.01, 1, 0.97))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return None


def _length_axis(ax: Any) -> None:
    """log2 length axis, ticks at the plotted lengths."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ax.set_xscale("log", base=2)
    lengths = sorted(
        {
            int(x)
            for line in ax.get_lines()
            if line.get_marker() not in (None, "None", "")  # data, not the axhline guides
            for x in line.get_xdata()
        }
    )
    if lengths:
        ax.xaxis.set_major_locator(FixedLocator(lengths))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{int(round(v))}"))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.tick_params(axis="x", labelsize=7)


def _memory_axes(ax: Any) -> None:
    _length_axis(ax)
    ax.set_yscale("log")
    ax.set_xlabel("length")
    ax.set_ylabel("MiB")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def metadata_lines(meta: Dict[str, Any]) -> List[str]:
    tc = meta["torch_config"]
    return [
        f"date (UTC): {meta['date_utc']}",
        f"command: `{meta['command']}`",
        f"torch: {meta['torch_version']}; BLAS {tc['blas']}; "
        f"CPU capability {tc['cpu_capability']}; "
        f"{tc['mkl']}; {tc['onednn']}; {tc['openmp']}; parallel backend {tc['parallel_backend']}",
        f"torch_mha: {meta['torch_mha']['version']}; build {meta['torch_mha']['build_info']}; "
        f"kernels {meta['torch_mha']['cpu_capability']}",
        f"git: {meta['git'].get('commit', '?')}"
        + (" (with local changes)" if meta["git"].get("dirty") else ""),
        f"CPU: {meta['cpu_model']}; {meta['cpu_count']} CPUs; flags {' '.join(meta['cpu_flags'])}; "
        f"memory {meta['memory_total_gib']} GiB",
        f"threads benchmarked: {meta['threads_benchmarked']} (torch default "
        f"{meta['default_threads']}); load average at start {_fmt_load(meta['loadavg_start'])}, "
        f"at end {_fmt_load(meta.get('loadavg_end'))}",
        f"python {meta['python']} on {meta['platform']}",
    ]


def _fmt_load(load: Optional[List[float]]) -> str:
    return " ".join(f"{x:.2f}" for x in load) if load else "-"


def _display_path(path: str) -> str:
    """Repository-relative when inside the repository, else absolute."""
    root = os.path.dirname(HERE)
    path = os.path.abspath(path)
    return os.path.relpath(path, root) if path.startswith(root + os.sep) else path


def write_markdown(
    data: Dict[str, Any], tables: List[Table], path: str, plot: Optional[str]
) -> None:
    meta = data["metadata"]
    cfg = data["config"]
    lines = [
        "# torch_mha CPU attention benchmark",
        "",
        "Written by `benchmarks/bench_attention.py`; do not edit by hand. Produced by:",
        "",
        "```bash",
        meta["command"],
        "```",
        "",
        f"Preset `{cfg.get('preset')}`: dtypes {cfg['dtypes']}, head dims {cfg['head_dims']} "
        f"({cfg['heads']} heads), lengths {cfg['lengths']} at batch x length = {cfg['tokens']} "
        f"tokens (batch >= 1), causal {cfg['causal']}, threads {cfg['threads']}, modes "
        f"{cfg['modes']}, {cfg['repeats']} repeats after {cfg['warmup']} warm-up round(s), "
        f"memory budget {cfg['memory_budget_gib']:g} GiB, memory scan `{cfg['memory_scan']}` at "
        f"{cfg['memory_lengths']}.",
        "",
        "Timings come from a machine that may have been shared with other jobs: compare the "
        "ratios of contenders measured in the same round, not absolute times across runs.",
        "",
        "## Machine and software",
        "",
    ]
    lines += [f"* {line}" for line in metadata_lines(meta)]
    lines += ["", "## Targets", ""]
    for tg in data["targets"]:
        lines.append(
            f"* **{tg['status']}**: {tg['target']} ({_fmt_threshold(tg)}): {describe_target(tg)}"
        )
    mem = next((t for t in data["targets"] if "series" in t), None)
    if mem and mem.get("series"):
        lines += ["", "torch_mha's training-step (fwd+bwd) peak at the largest scanned length:"]
        for s in mem["series"]:
            rss = s.get("rss_growth_at_largest_bytes")
            lines.append(
                f"* {s['group']} ({LABELS[s['contender']]}): ATen peak "
                f"{s['peak_at_largest_bytes'] / MIB:.1f} MiB at L={s['largest_length']}, batch 1"
                + (f"; RSS growth {rss / MIB:.1f} MiB" if rss is not None else "")
            )
    if plot:
        rel = os.path.relpath(os.path.abspath(plot), os.path.dirname(os.path.abspath(path)))
        lines += ["", "## Plot", "", f"![speed-up and memory by length]({rel})", ""]
    lines += ["", "## Method", "", METHOD, "", "## Results", ""]
    for t in tables:
        lines.append(t.markdown())
    if data["skipped"]:
        lines += ["### Skipped", ""]
        for s in data["skipped"]:
            lines.append(f"* {s['case']} {s['mode']} {LABELS[s['contender']]}: {s['reason']}")
        lines.append("")
    lines += [
        "Every sample, the per-round times and the full `torch.__config__.show()` are in the "
        "JSON file written next to this run's outputs "
        f"(`{_display_path(os.path.join(cfg['out'], 'bench_attention.json'))}`).",
        "",
    ]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if args.memory_worker:
        memory_worker(args.memory_worker)
        return
    data = run_benchmark(args)
    tables = build_tables(data)
    print()
    print("\n\n".join(t.text() for t in tables))
    print()
    print(targets_text(data))
    if data["skipped"]:
        print("\nSkipped:")
        for s in data["skipped"]:
            print(f"  {s['case']} {s['mode']} {LABELS[s['contender']]}: {s['reason']}")
    json_path = os.path.join(args.out, "bench_attention.json")
    with open(json_path, "w") as f:
        json.dump(data, f, indent=1)
    problem = make_plot(data, args.plot)
    if problem:
        print(f"\nwarning: {problem}", file=sys.stderr)
    write_markdown(data, tables, args.results, None if problem else args.plot)
    print(f"\nwrote {json_path}")
    if not problem:
        print(f"wrote {args.plot}")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
