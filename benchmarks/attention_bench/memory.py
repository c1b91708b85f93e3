"""Peak memory of one call per contender, measured in a worker process after the timing.

The parent (`measure_memory`) writes the items (workload, contender, mode) to a JSON file and
runs `python bench_attention.py --memory-worker ITEMS.json` with small malloc thresholds; the
worker (`memory_worker`) builds each workload, runs one call per item under the profiler and
prints one `RESULT {...}` line per item. An item that kills the worker is recorded as an error
and the worker restarts past it. Per call: the ATen peak (torch.profiler, profile_memory=True)
and the RSS growth (VmHWM after a reset through /proc/self/clear_refs, minus VmRSS before), and
which SDPA kernels ran (the tables of the variant groups name them).
`scan_workloads` plans the batch-1 memory scan over the lengths of --memory-lengths, for the
groups of --groups that have one.
"""

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Tuple

from . import SCRIPT
from .workloads import GROUPS, Workload, build

if TYPE_CHECKING:
    from .progress import Progress


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
        # The ATen kernels F.scaled_dot_product_attention dispatched to (forward and backward),
        # e.g. aten::_scaled_dot_product_flash_attention_for_cpu or ..._attention_math.
        "sdpa_kernels": sorted(n for n in names if "::_scaled_dot_product" in n),
    }


def memory_worker(items_path: str) -> None:
    """The worker process: one RESULT line per item of the JSON file at items_path."""
    with open(items_path) as f:
        items = json.load(f)
    workloads = {}
    for item in items:
        workloads.setdefault(item["workload_key"], Workload.from_dict(item["workload"]))
    # One tiny call per contender, mode, dtype and group first: one-off library set-up
    # (thread pools, oneDNN/MKL state) is not charged to the first measured item.
    seen = set()
    bench: Any = None
    for w in workloads.values():
        tiny = dataclasses.replace(w, length=64, batch=1)
        if tiny.key() in seen:
            continue
        seen.add(tiny.key())
        bench = build(tiny)
        for contender in tiny.contenders:
            for mode in tiny.spec.warm_modes:
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
        cmd = [sys.executable, SCRIPT, "--memory-worker", path]
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
# The memory scan: the training step at batch 1, float32, head dim 64, not causal, per length


def scan_workloads(args: argparse.Namespace) -> List[Workload]:
    if args.memory_scan == "none":
        return []
    threads = max(args.threads)
    out = []
    for spec in GROUPS.values():
        if spec.scan is None or spec.name not in args.groups:
            continue
        for length in args.memory_lengths:
            out.append(
                Workload(
                    spec.name, "float32", 64 * args.heads, args.heads, length, 1, False, threads
                )
            )
    return out


def scan_contenders(w: Workload, which: str) -> Tuple[str, ...]:
    """The contenders --memory-scan `which` (all, linear, ours) names for w's group."""
    return w.spec.scan_contenders(which)
