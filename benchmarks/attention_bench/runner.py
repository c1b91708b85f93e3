"""One benchmark run: plan, torch.mm ceiling, timed cases, memory items; the result dict.

`run_benchmark(args)` plans the workloads of the registered groups (workloads.py), times the
torch.mm ceiling at the start, every case (a workload in one mode, its contenders interleaved,
timing.py), the ceiling again at the end, then measures the memory items in a worker process
(memory.py), and returns the dict that is written as JSON: metadata, config, ceiling, cases,
memory, memory-scan keys, skips and the evaluated targets (targets.py).
"""

import argparse
import gc
import os
import statistics
import time
from typing import Any, Dict, List, Sequence, Tuple

import torch

from . import GIB
from .machine import banner, metadata
from .memory import measure_memory, scan_contenders, scan_workloads
from .progress import Progress, est_seconds
from .targets import evaluate_targets
from .timing import summarize, time_case, use_threads
from .workloads import (
    DTYPES,
    FLOP_FACTOR,
    GROUPS,
    LABELS,
    SHORT,
    Workload,
    build,
    plan_workloads,
)


def modes_for(w: Workload, args: argparse.Namespace) -> List[str]:
    return w.spec.timed_modes(args.modes)


def case_work(w: Workload, mode: str, contenders: Sequence[str], calls: int) -> float:
    flops = w.attention_flops() * (3.5 if mode == "train" else 1.0)
    if w.spec.projections:  # in/out projections
        flops += 8.0 * w.batch * w.length * w.embed**2 * (3.0 if mode == "train" else 1.0)
    return est_seconds(flops * len(contenders) * calls, len(contenders) * calls)


def measure_ceiling(
    args: argparse.Namespace, progress: Progress, when: str
) -> List[Dict[str, Any]]:
    out = []
    n = args.mm_size
    for threads in args.threads:
        for dtype in args.dtypes:
            use_threads(threads)
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

    def rounds(w: Workload) -> int:
        return args.warmup + w.spec.repeats(args.repeats)

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
                "workload": w.to_dict(),
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
            total_work += case_work(w, mode, w.contenders, rounds(w))
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
    print(banner(meta, args.threads), flush=True)
    print(
        f"{len(timed)} length-sweep workloads, {len(small)} fixed-shape, {len(scan)} memory-scan "
        f"lengths "
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
            work = case_work(w, mode, w.contenders, rounds(w))
            progress.set_label(f"{w.label()} {mode}")
            if bench is None:
                bench = build(w)
            use_threads(w.threads)
            fns = {c: bench.callables(c, mode) for c in contenders}
            step = work / max(rounds(w), 1)
            advanced = [0.0]

            def on_round() -> None:
                advanced[0] += step
                progress.advance(step)

            repeats = w.spec.repeats(args.repeats)
            raw = time_case(fns, args.warmup, repeats, args.max_case_seconds, 0.02, on_round)
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
    data["targets"] = evaluate_targets(
        data, [spec for spec in GROUPS.values() if spec.name in args.groups]
    )
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
        **w.to_dict(),
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
