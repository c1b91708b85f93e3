"""Timing: interleaved rounds over contenders, calls per sample, phase medians, thread control.

`time_case` runs warm-up rounds, then measured rounds; every round runs each contender once, in
an order that rotates by one each round, with Python's garbage collector off. Tiny calls are
repeated within a sample (`number`, calibrated from the warm-up). `summarize` turns one
contender's samples into per-phase medians. The callables come from workloads.py.
"""

import gc
import math
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

MIN_ROUNDS = 3  # a case cut short by --max-case-seconds still gets this many rounds
MAX_NUMBER = 1000  # calls per sample for tiny cases

# Phases a mode yields. A "train" sample times the forward and the backward of one training step
# separately (fwd+bwd is their sum); "infer" is eval + no_grad.
PHASES = {"train": ("fwd", "bwd", "fwdbwd"), "infer": ("infer",), "mm": ("mm",)}

Fn = Callable[[], Tuple[float, ...]]
Setup = Optional[Callable[[], None]]


def use_threads(threads: int) -> None:
    """The intra-op thread count every timed call runs with (torch.set_num_threads)."""
    torch.set_num_threads(threads)


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
