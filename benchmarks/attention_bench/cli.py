"""The command line of benchmarks/bench_attention.py: options, presets, and main.

`main` parses the options (a preset, --quick or --full, fills what is not given), runs the
benchmark (runner.py), prints the tables and the targets, and writes the JSON file, the PNG and
RESULTS.md (report.py, plot.py). `--memory-worker ITEMS.json` (internal) turns the process into
the memory worker instead (memory.py).
"""

import argparse
import os
import sys
from typing import Any, Callable, List, Optional, Sequence

from . import BENCH_DIR
from .machine import machine_line
from .memory import memory_worker
from .plot import make_plot
from .report import build_tables, targets_text, write_json, write_markdown
from .runner import run_benchmark
from .workloads import DTYPES, GROUPS, LABELS

DESCRIPTION = "Benchmark suite for torch_mha's CPU attention kernels (issue #5)."


def _preset_groups(preset: str) -> str:
    return ",".join(spec.name for spec in GROUPS.values() if preset in spec.presets)


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
        groups=_preset_groups("quick"),
        repeats=3,
        warmup=1,
        max_case_seconds=20.0,
        memory_lengths="1024,2048,4096,8192",
        memory_scan="ours",
        mm_size=2048,
    ),
    "full": dict(
        dtypes="float32,bfloat16",
        head_dims="64,128",
        lengths="128-8192",
        causal="off,on",
        threads="1,2",
        modes="train,infer",
        groups=_preset_groups("full"),
        repeats=7,
        warmup=3,
        max_case_seconds=90.0,
        memory_lengths="128-8192",
        memory_scan="all",
        mm_size=2048,
    ),
    # The variants of issue 14 (window, gqa, varlen) at their fixed shapes: the sweep options
    # (head dims, lengths, causal) do not apply to them; no memory scan (no sweep group).
    "variants": dict(
        dtypes="float32,bfloat16",
        head_dims="64",
        lengths="1024",
        causal="off",
        threads="2",
        modes="train",
        groups=_preset_groups("variants"),
        repeats=5,
        warmup=1,
        max_case_seconds=150.0,
        memory_lengths="",
        memory_scan="none",
        mm_size=2048,
    ),
    # The serving groups of issue 15 (decode, generate, prefill): inference at fixed shapes.
    "serving": dict(
        dtypes="float32,bfloat16",
        head_dims="64",
        lengths="1024",
        causal="off",
        threads="2",
        modes="infer",
        groups=_preset_groups("serving"),
        repeats=5,
        warmup=1,
        max_case_seconds=120.0,
        memory_lengths="",
        memory_scan="none",
        # No target of these groups reads the torch.mm ceiling, and a 2048 bfloat16 torch.mm
        # takes about 20 s on a CPU without AVX512-BF16: a small one keeps the table cheap.
        mm_size=256,
    ),
}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Defaults are --full's; --quick changes them to a subset, --variants to the "
        "variant groups of issue 14, --serving to the serving groups of issue 15. Explicit "
        "options override any preset. The variant and serving groups run on their own with, "
        "e.g., --groups window,gqa,varlen (or --variants), --groups decode,generate,prefill (or "
        "--serving). layer_autocast (issue 16: float32 modules under autocast bfloat16) is in "
        "no preset either: add it to --groups, with bfloat16 in --dtypes.",
    )
    preset = p.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help="a subset: " + _preset_help("quick"))
    preset.add_argument(
        "--full", action="store_true", help="the length sweeps: " + _preset_help("full")
    )
    preset.add_argument(
        "--variants",
        action="store_true",
        help="the fixed-shape variants of issue 14 (groups "
        + PRESETS["variants"]["groups"]
        + "): dtypes float32,bfloat16, threads 2, training step, "
        f"{PRESETS['variants']['repeats']} repeats (window: 3), "
        f"{PRESETS['variants']['warmup']} warm-up, no memory scan",
    )
    preset.add_argument(
        "--serving",
        action="store_true",
        help="the serving groups of issue 15 (groups "
        + PRESETS["serving"]["groups"]
        + "): dtypes float32,bfloat16, threads 2, inference, "
        f"{PRESETS['serving']['repeats']} repeats, {PRESETS['serving']['warmup']} warm-up, "
        "memory of the decode step only",
    )
    p.add_argument("--dtypes", help="comma list: float32,bfloat16")
    p.add_argument("--head-dims", help="comma list of head dims (8 heads each): 64,128")
    p.add_argument("--lengths", help="comma list, or A-B for the powers of two in [A, B]")
    p.add_argument("--causal", help="off, on, or off,on")
    p.add_argument("--threads", help="comma list of torch.set_num_threads values")
    p.add_argument("--modes", help="train (fwd, bwd and fwd+bwd of one step), infer (layer only)")
    p.add_argument("--groups", help=", ".join(s.cli_help or s.name for s in GROUPS.values()))
    p.add_argument("--repeats", type=int, help="measured rounds per case (median over them)")
    p.add_argument("--warmup", type=int, help="warm-up rounds per case")
    p.add_argument(
        "--max-case-seconds",
        type=float,
        help="a case that runs longer stops after at least 3 rounds",
    )
    p.add_argument("--tokens", type=int, default=4096, help="batch x length (default 4096)")
    p.add_argument("--heads", type=int, default=8)
    variants = p.add_argument_group(
        "variant groups (window, gqa, varlen)",
        "their fixed shapes; the defaults are issue 14's, and its targets hold there only",
    )
    variants.add_argument(
        "--window-length", type=int, default=8192, help="window: L (default 8192)"
    )
    variants.add_argument(
        "--window", default="256,0", help="window: window_size LEFT,RIGHT (default 256,0)"
    )
    variants.add_argument("--gqa-length", type=int, default=2048, help="gqa: L (default 2048)")
    variants.add_argument(
        "--gqa-causal", default="off,on", help="gqa: off, on, or off,on (default off,on)"
    )
    variants.add_argument(
        "--varlen-lengths",
        default="64,128,256,512,768,1024,1536,2048",
        help="varlen: the packed sequences' lengths (default 64,128,256,512,768,1024,1536,2048)",
    )
    serving = p.add_argument_group(
        "serving groups (decode, generate, prefill)",
        "their fixed shapes; the defaults are issue 15's, and its targets hold there only",
    )
    serving.add_argument(
        "--decode-lengths",
        default="1024,4096,16384",
        help="decode: cache lengths S, keys after the append (default 1024,4096,16384)",
    )
    serving.add_argument("--decode-batches", default="1,4", help="decode: batches (default 1,4)")
    serving.add_argument(
        "--decode-kv-heads",
        type=int,
        default=None,
        help="decode: key/value heads under the 32 query heads (default 8; 32: no grouping; "
        "the target holds at 8)",
    )
    serving.add_argument(
        "--hf-model",
        default="demo",
        choices=("demo", "tiny"),
        help="generate, prefill: the model of examples/llama_demo.py (default demo)",
    )
    serving.add_argument(
        "--generate-prompt", type=int, default=512, help="generate: prompt tokens (512)"
    )
    serving.add_argument(
        "--generate-tokens", type=int, default=128, help="generate: new tokens (128)"
    )
    serving.add_argument("--generate-batch", type=int, default=1, help="generate: batch (1)")
    serving.add_argument(
        "--prefill-lengths",
        default="1024,768,512,256",
        help="prefill: the padded batch's prompt lengths (default 1024,768,512,256)",
    )
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
    p.add_argument("--mm-size", type=int, help="torch.mm ceiling size (2048; --serving: 256)")
    p.add_argument(
        "--out",
        help="JSON directory (default benchmarks/out; benchmarks/out/variants for a run without "
        "a length-sweep group)",
    )
    p.add_argument(
        "--results",
        help="Markdown report (default benchmarks/RESULTS.md, the main run's; OUT/RESULTS.md for "
        "a run without a length-sweep group, so it never replaces the main run's)",
    )
    p.add_argument("--plot", default=os.path.join(BENCH_DIR, "results.png"), help="PNG plot")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_worker:
        return args
    args.preset = (
        "quick"
        if args.quick
        else "variants"
        if args.variants
        else "serving"
        if args.serving
        else "full"
    )
    preset_values = PRESETS[args.preset]
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
        if g not in GROUPS:
            names = list(GROUPS)
            p.error(f"unknown group {g!r}: {', '.join(names[:-1])} or {names[-1]}")
        only = GROUPS[g].dtypes
        if only is not None and not any(d in args.dtypes for d in only):
            # It would plan nothing: say so instead of reporting its targets "not measured".
            p.error(f"group {g!r} runs at {', '.join(only)} only: add it to --dtypes")
    sweep = any(GROUPS[g].sweep for g in args.groups)
    # A run without a sweep group writes under out/serving (only serving groups) or
    # out/variants, never over the main run's files.
    serving = all("serving" in GROUPS[g].presets for g in args.groups)
    if args.out is None:
        args.out = (
            os.path.join(BENCH_DIR, "out")
            if sweep
            else os.path.join(BENCH_DIR, "out", "serving" if serving else "variants")
        )
    if args.results is None:
        args.results = (
            os.path.join(BENCH_DIR, "RESULTS.md") if sweep else os.path.join(args.out, "RESULTS.md")
        )
    args.memory_lengths = parse_list(args.memory_lengths, int)
    try:
        args.window = tuple(int(x) for x in args.window.split(","))
    except ValueError:
        args.window = ()
    if len(args.window) != 2:
        p.error("--window takes LEFT,RIGHT (-1: unbounded), e.g. 256,0")
    args.gqa_causal = parse_causal(args.gqa_causal)
    args.varlen_lengths = parse_list(args.varlen_lengths, int)
    args.decode_lengths = parse_list(args.decode_lengths, int)
    args.decode_batches = parse_list(args.decode_batches, int)
    args.prefill_lengths = parse_list(args.prefill_lengths, int)
    for name in ("decode_lengths", "decode_batches", "prefill_lengths"):
        values = getattr(args, name)
        if not values or min(values) <= 0:
            p.error(f"--{name.replace('_', '-')} takes positive integers")
    for name in ("generate_prompt", "generate_tokens", "generate_batch"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
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


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if args.memory_worker:
        memory_worker(args.memory_worker)
        return
    data = run_benchmark(args)
    tables = build_tables(data)
    print()
    print(machine_line(data["metadata"]))
    print()
    print("\n\n".join(t.text() for t in tables))
    print()
    print(targets_text(data))
    if data["skipped"]:
        print("\nSkipped:")
        for s in data["skipped"]:
            print(f"  {s['case']} {s['mode']} {LABELS[s['contender']]}: {s['reason']}")
    json_path = os.path.join(args.out, "bench_attention.json")
    write_json(data, json_path)
    problem = make_plot(data, args.plot)
    if problem:
        print(f"\nwarning: {problem}", file=sys.stderr)
    write_markdown(data, tables, args.results, None if problem else args.plot)
    print(f"\nwrote {json_path}")
    if not problem:
        print(f"wrote {args.plot}")
    print(f"wrote {args.results}")
