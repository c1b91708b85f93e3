"""Reporting: the text tables on stdout, the targets list, RESULTS.md and the JSON file.

`build_tables` makes the tables of a run's result dict: the torch.mm ceiling, then each
registered group's tables in registration order (layer, core and small have their own layouts,
`GROUP_TABLES`; any other group gets `pair_tables`: one table per phase with each pair's anchor,
torch_mha and speed-up), then peak memory. A `Table` renders as aligned text or as Markdown.
`write_markdown` writes RESULTS.md (command, machine, targets, plot, METHOD, tables, skips).
"""

import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from . import MIB, REPO_ROOT
from .machine import machine_line, metadata_lines
from .targets import ceiling_gflops
from .workloads import GROUPS, LABELS, PHASE_NAMES, SHORT, SMALL, GroupSpec

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
* **Autocast** (layer_autocast; issue 16): the layer's need_weights=False pair in float32 (same
  weights, float32 input), the forward of the training step under `torch.autocast("cpu",
  dtype=torch.bfloat16)` (the casts of weights and input are in its time), the backward outside
  it (as autocast's docs prescribe), with a bfloat16 `grad_out`. Its rows read dtype bfloat16,
  option `autocast=True`; it runs at bfloat16 only.
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
* **Variant groups** (window, gqa, varlen; issue 14) are fixed shapes timed as training steps
  like the core op; each table's note says what every contender runs, how its masks are built
  (once, outside the clock) and which FLOP count its GFLOP/s use.
* **Serving groups** (decode, generate, prefill; issue 15) are inference calls (`eval()` +
  `torch.no_grad()`) at fixed shapes; generate and prefill time whole transformers model calls
  (the demo model of `examples/llama_demo.py`, the same weights under both backends) and are
  not run under the memory profiler. Each table's note says what every contender runs.
* **Skips.** A contender whose estimated memory (nn's L x S matrices: ~4.5 copies of N*H*L*S
  elements in training, ~3 in inference) exceeds `--memory-budget-gib` is skipped, with the
  reason printed and recorded."""


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


CONFIG_COLS = ["dtype", "D", "causal", "thr", "L", "B"]
# Phases shown per mode, one table each, in this order.
TABLE_PHASES = {"train": ("fwdbwd", "fwd", "bwd"), "infer": ("infer",)}

TableBuilder = Callable[[Dict[str, Any], GroupSpec], List["Table"]]


def build_tables(data: Dict[str, Any]) -> List[Table]:
    """The ceiling table, each registered group's tables, then the peak-memory tables."""
    tables = [ceiling_table(data)]
    for spec in GROUPS.values():
        tables += GROUP_TABLES.get(spec.name, pair_tables)(data, spec)
    tables += memory_tables(data)
    return tables


def _group_cases(data: Dict[str, Any], spec: GroupSpec) -> List[Dict[str, Any]]:
    return [c for c in data["cases"] if c["group"] == spec.name]


def ceiling_table(data: Dict[str, Any]) -> Table:
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
    return t


def layer_tables(data: Dict[str, Any], spec: GroupSpec) -> List[Table]:
    tables = []
    layer_cases = _group_cases(data, spec)
    for phase in ("fwdbwd", "fwd", "bwd", "infer"):
        mode = "infer" if phase == "infer" else "train"
        rows = [c for c in layer_cases if c["mode"] == mode]
        if not rows:
            continue
        t = Table(
            f"Layer, {PHASE_NAMES[phase]}: median ms, speed-up = nn / torch_mha",
            CONFIG_COLS
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
    return tables


def core_tables(data: Dict[str, Any], spec: GroupSpec) -> List[Table]:
    tables = []
    core_cases = _group_cases(data, spec)
    for phase in ("fwdbwd", "fwd", "bwd"):
        if not core_cases:
            break
        t = Table(
            f"Core, {PHASE_NAMES[phase]}: median ms, speed-up = F.sdpa / torch_mha.attention",
            CONFIG_COLS + ["SDPA", "ours", "speed-up", "GFLOP/s SDPA", "GFLOP/s ours", "ours / mm"],
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
    return tables


def small_tables(data: Dict[str, Any], spec: GroupSpec) -> List[Table]:
    small = _group_cases(data, spec)
    if not small:
        return []
    fast = {(m["workload_key"], m["contender"]): m.get("native_fast_path") for m in data["memory"]}
    t = Table(
        f"Small inference: L={SMALL['length']}, B={SMALL['batch']}, E={SMALL['embed']}, "
        f"{SMALL['heads']} heads, eval + no_grad: median ms, speed-up = nn / torch_mha",
        ["dtype", "thr", "need_weights", "nn", "torch_mha", "speed-up", "nn fast path"],
        "nn.MultiheadAttention in eval + no_grad + batch_first takes its native fast path "
        "(torch._native_multi_head_attention); the last column is what the profiler saw.",
    )
    for c in small:
        for anchor, ours, label in spec.pairs:
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
    return [t]


def pair_tables(data: Dict[str, Any], spec: GroupSpec) -> List[Table]:
    """The generic layout of a group without its own: per mode and phase, the config (heads
    and head dim included, and the options), each contender's median, each pair's speed-up and
    torch_mha's GFLOP/s; the group's note (and the SDPA kernels the profiler saw) under the
    first table's title."""
    cases = _group_cases(data, spec)
    with_options = any(c.get("options") for c in cases)
    ours = list(dict.fromkeys(o for _, o, _ in spec.pairs))
    note = " ".join(p for p in (spec.note, sdpa_kernels_note(data, spec)) if p)
    tables = []
    for mode in spec.modes:
        rows = [c for c in cases if c["mode"] == mode]
        if not rows:
            continue
        for phase in TABLE_PHASES[mode]:
            columns = ["dtype", "H"] + CONFIG_COLS[1:] + (["options"] if with_options else [])
            columns += [SHORT[c] for c in spec.contenders]
            columns += [f"{SHORT[a]} / {SHORT[o]}" for a, o, _ in spec.pairs]
            columns += [f"GFLOP/s {SHORT[o]}" for o in ours]
            t = Table(
                f"{spec.title}, {PHASE_NAMES[phase]}: median ms, speed-up = anchor / torch_mha",
                columns,
                "" if tables else note,  # under the group's first table
            )
            for c in rows:
                cells = _config_cells(c)
                cells.insert(1, c["heads"])
                if with_options:
                    cells.append(
                        " ".join(
                            f"{k}={str(_tuple(v)).replace(' ', '')}"
                            for k, v in c.get("options", ())
                        )
                        or "-"
                    )
                cells += [_skip_or(c, contender, phase) for contender in spec.contenders]
                cells += [_speedup(c, label, phase) for _, _, label in spec.pairs]
                t.add(cells + [_gflops(c, o, phase) for o in ours])
            tables.append(t)
    return tables


def _tuple(value: Any) -> Any:
    """A list read back from JSON as the tuple it was written from (for display)."""
    return tuple(_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def sdpa_kernels_note(data: Dict[str, Any], spec: GroupSpec) -> str:
    """The SDPA kernels each contender ran, as the memory worker's profiler saw them in its one
    call per contender; empty without memory measurements."""
    seen: Dict[str, List[str]] = {}
    for m in data["memory"]:
        if m["workload"]["group"] == spec.name and m.get("sdpa_kernels"):
            names = seen.setdefault(m["contender"], [])
            names += [n for n in m["sdpa_kernels"] if n not in names]
    if not seen:
        return ""
    parts = [f"{SHORT[c]}: {', '.join(names)}" for c, names in seen.items()]
    return "F.sdpa kernels in this run (profiler, one call each): " + "; ".join(parts) + "."


def generate_tables(data: Dict[str, Any], spec: GroupSpec) -> List[Table]:
    """pair_tables, then the same calls as tokens/s (batch x new tokens / median)."""
    tables = pair_tables(data, spec)
    cases = _group_cases(data, spec)
    if not cases:
        return tables
    t = Table(
        f"{spec.title}: tokens/s (batch x new tokens / median), speed-up = torch_mha / sdpa",
        ["dtype", "thr", "model", "prompt", "B", "new tokens"]
        + [SHORT[c] for c in spec.contenders]
        + ["speed-up"],
    )
    for c in cases:
        options = dict(c.get("options", ()))
        tokens = c["batch"] * int(options.get("new_tokens", 0))
        rates = []
        for contender in spec.contenders:
            median = _median(c, contender, "infer")
            rates.append("-" if median is None else f"{tokens / median:.1f}")
        label = spec.pairs[0][2]
        t.add(
            [c["dtype"], c["threads"], options.get("model", "-"), c["length"], c["batch"]]
            + [options.get("new_tokens", "-")]
            + rates
            + [_speedup(c, label, "infer")]
        )
    return tables + [t]


# Groups with their own table layout; the others get pair_tables.
GROUP_TABLES: Dict[str, TableBuilder] = {
    "layer": layer_tables,
    "core": core_tables,
    "small": small_tables,
    "generate": generate_tables,
}


def targets_text(data: Dict[str, Any]) -> str:
    lines = ["Targets (issues #5, #14, #15 and #16)", "------------------------------------"]
    for tg in data["targets"]:
        lines.append(f"{tg['status']:>12}  {tg['target']} ({_fmt_threshold(tg)})")
        if tg["status"] != "not measured":
            lines.append(" " * 14 + describe_target(tg))
    return "\n".join(lines)


def _fmt_threshold(tg: Dict[str, Any]) -> str:
    if "series" in tg or tg.get("unit") == "peak ratio":
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
    if tg.get("unit") == "peak ratio":
        peaks = tg["peaks_bytes"]
        return (
            f"{tg['worst']:.3f}x (torch_mha {peaks['ours_nw'] / MIB:.1f} MiB, "
            f"nn {peaks['nn_nw'] / MIB:.1f} MiB)"
        )
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
    """Peak memory per mode of the groups with `memory_table`, then the memory scan."""
    tables = []
    table_groups = {s.name: s.contenders for s in GROUPS.values() if s.memory_table}
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
        if c["group"] in table_groups and c["key"] not in timed_keys:
            timed_keys.append(c["key"])
    workloads = {m["workload_key"]: m["workload"] for m in data["memory"]}
    note = (
        "Cells: ATen peak / RSS growth, MiB (see Method). Training = one fwd+bwd; "
        "inference = one forward in eval + no_grad. Measured at the largest thread count."
    )
    for group, contenders in table_groups.items():
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
        cols = [(s.name, c) for s in GROUPS.values() if s.scan is not None for c in s.contenders]
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


def _display_path(path: str) -> str:
    """Repository-relative when inside the repository, else absolute."""
    root = REPO_ROOT
    path = os.path.abspath(path)
    return os.path.relpath(path, root) if path.startswith(root + os.sep) else path


def config_line(cfg: Dict[str, Any]) -> str:
    """The run's configuration: the length sweep's only when a sweep group ran, the variant
    groups' shapes when they ran."""
    groups = [GROUPS[g] for g in cfg["groups"] if g in GROUPS]
    parts = [
        f"Preset `{cfg.get('preset')}`: groups {cfg['groups']}, dtypes {cfg['dtypes']}, threads "
        f"{cfg['threads']}, {cfg['repeats']} repeats after {cfg['warmup']} warm-up round(s), "
        f"memory budget {cfg['memory_budget_gib']:g} GiB"
    ]
    if any(spec.sweep for spec in groups):
        parts.append(
            f"length sweep: head dims {cfg['head_dims']} ({cfg['heads']} heads), lengths "
            f"{cfg['lengths']} at batch x length = {cfg['tokens']} tokens (batch >= 1), causal "
            f"{cfg['causal']}, modes {cfg['modes']}, memory scan `{cfg['memory_scan']}` at "
            f"{cfg['memory_lengths']}"
        )
    shapes = {
        "window": f"window: L={cfg.get('window_length')}, window_size={_tuple(cfg.get('window'))}",
        "gqa": f"gqa: L={cfg.get('gqa_length')}, causal {cfg.get('gqa_causal')}",
        "varlen": f"varlen: lengths {cfg.get('varlen_lengths')}, causal",
        "decode": f"decode: cache lengths {cfg.get('decode_lengths')}, batches "
        f"{cfg.get('decode_batches')}",
        "generate": f"generate: model {cfg.get('hf_model')}, prompt {cfg.get('generate_prompt')}"
        f", {cfg.get('generate_tokens')} new tokens, batch {cfg.get('generate_batch')}",
        "prefill": f"prefill: model {cfg.get('hf_model')}, lengths {cfg.get('prefill_lengths')}",
    }
    parts += [shapes[spec.name] for spec in groups if spec.name in shapes]
    return "; ".join(parts) + "."


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
        machine_line(meta) + ".",
        "",
        config_line(cfg),
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


def write_json(data: Dict[str, Any], path: str) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
