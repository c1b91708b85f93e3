"""The performance targets (issues #5, #14, #15, #16) and their PASS/MISS rules.

A group declares its targets in its registration (workloads.py) with the rules here:

* `RatioTarget`: every matching case's speed-up (anchor time / torch_mha time) of one pair in
  one phase must reach the threshold; the verdict is on the worst case, the geometric mean is
  reported too. A case matches by length range and thread count, and optionally by causal and
  by exact values of case fields or `Workload.options` (`where`, e.g. a fixed-shape group's
  target holds at the issue's shape only, so a run at other shapes reports "not measured");
* `CeilingTarget`: torch_mha's GFLOP/s in a phase, as a fraction of torch.mm's at the same dtype
  and thread count (the ceiling measured in the same run), must reach the threshold.

`evaluate_targets` checks the targets of the run's groups (--groups) for float32 and for
bfloat16 (with a "bfloat16: " prefix; a target may name the dtypes it holds for, and a higher
bfloat16 threshold for CPUs with bfloat16 instructions), in registration order, then the
linear-memory target of the memory scan and, when the layer group was scanned, issue 16's
layer peak at L = 8192 against nn.MultiheadAttention(need_weights=False).
A target no case matches is "not measured".
"""

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Tuple

if TYPE_CHECKING:
    from .workloads import GroupSpec

TARGET_DTYPES = ("float32", "bfloat16")
MEMORY_RATIO = 2.5  # successive-length peak ratio of the memory scan: linear 2, quadratic 4
# Issue 16: a layer training step's peak at this length, torch_mha over nn(need_weights=False).
LAYER_MEMORY_LENGTH = 8192
LAYER_MEMORY_RATIO = 1.0
# CPU flags (as machine.py records them) that give bfloat16 products their own instructions;
# issue 16's bfloat16 targets are higher on such CPUs.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def has_native_bf16(data: Dict[str, Any]) -> bool:
    flags = data.get("metadata", {}).get("cpu_flags", [])
    return any(f in flags for f in NATIVE_BF16_FLAGS)


def threshold_for(target: "RatioTarget", data: Dict[str, Any]) -> float:
    """The target's threshold on the machine the run's data comes from."""
    if target.native_bf16_threshold is not None and has_native_bf16(data):
        return target.native_bf16_threshold
    return target.threshold


@dataclass(frozen=True)
class RatioTarget:
    """Speed-up of `pair` (its label) in `phase` >= threshold at lengths in [lo, hi], at
    `threads` threads (None: any); only cases with `causal` (None: either) whose fields or
    options have the values in `where` ((name, value) pairs; none: every case)."""

    name: str
    phase: str
    pair: str
    threshold: float
    lengths: Tuple[int, int] = (1024, 4096)
    threads: Optional[int] = 2
    causal: Optional[bool] = None
    where: Tuple[Tuple[str, Any], ...] = ()
    dtypes: Tuple[str, ...] = TARGET_DTYPES  # the dtypes it is checked for
    # The threshold on CPUs with bfloat16 instructions (NATIVE_BF16_FLAGS), if different.
    native_bf16_threshold: Optional[float] = None


_MISSING = object()


def _frozen(value: Any) -> Any:
    """Lists (as read back from JSON) as tuples, recursively, for comparisons."""
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


def case_matches(case: Mapping[str, Any], where: Iterable[Tuple[str, Any]]) -> bool:
    """Whether each (name, value) of `where` is a field of the case record or one of its
    `options` with that value."""
    options = {k: v for k, v in case.get("options", ())}
    for name, value in where:
        have = case[name] if name in case else options.get(name, _MISSING)
        if _frozen(have) != _frozen(value):
            return False
    return True


@dataclass(frozen=True)
class CeilingTarget:
    """GFLOP/s of `contender` in `phase` (a training phase) >= threshold x torch.mm's, at
    lengths >= min_length."""

    name: str
    contender: str
    phase: str
    threshold: float
    min_length: int = 0
    dtypes: Tuple[str, ...] = TARGET_DTYPES


def ceiling_gflops(data: Dict[str, Any], dtype: str, threads: int) -> Optional[float]:
    values = [
        c["gflops"] for c in data["ceiling"] if c["dtype"] == dtype and c["threads"] == threads
    ]
    return max(values) if values else None


def _ratio_target(
    data: Dict[str, Any], name: str, group: str, target: RatioTarget, dtype: str
) -> Dict[str, Any]:
    phase = target.phase
    mode = "infer" if phase == "infer" else "train"
    rows = []
    for case in data["cases"]:
        if case["group"] != group or case["mode"] != mode or case["dtype"] != dtype:
            continue
        if target.threads is not None and case["threads"] != target.threads:
            continue
        if not target.lengths[0] <= case["length"] <= target.lengths[1]:
            continue
        if target.causal is not None and case["causal"] != target.causal:
            continue
        if not case_matches(case, target.where):
            continue
        s = case["speedups"].get(target.pair)
        if s is None or phase not in s:
            continue
        rows.append((s[phase], case))
    return _verdict(name, threshold_for(target, data), rows, "x")


def _ceiling_target(
    data: Dict[str, Any], name: str, group: str, target: CeilingTarget, dtype: str
) -> Dict[str, Any]:
    rows = []
    for case in data["cases"]:
        if case["group"] != group or case["mode"] != "train" or case["dtype"] != dtype:
            continue
        if case["length"] < target.min_length or target.contender not in case["contenders"]:
            continue
        mm = ceiling_gflops(data, dtype, case["threads"])
        if mm:
            gf = case["contenders"][target.contender]["phases"][target.phase]["gflops"]
            rows.append((gf / mm, case))
    return _verdict(name, target.threshold, rows, "of mm")


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


def evaluate_targets(data: Dict[str, Any], groups: Iterable["GroupSpec"]) -> List[Dict[str, Any]]:
    """The targets of `groups` (those of the run) per dtype, then the memory target when one
    of them has a memory scan; `data` is the run's dict."""
    groups = list(groups)
    targets = []
    for dtype in TARGET_DTYPES:
        prefix = "" if dtype == "float32" else "bfloat16: "
        for spec in groups:
            for tg in spec.targets:
                if dtype not in tg.dtypes:
                    continue
                if isinstance(tg, CeilingTarget):
                    targets.append(_ceiling_target(data, prefix + tg.name, spec.name, tg, dtype))
                else:
                    targets.append(_ratio_target(data, prefix + tg.name, spec.name, tg, dtype))
    series = [(spec.name, spec.scan["ours"][0]) for spec in groups if spec.scan is not None]
    if series:
        targets.append(memory_target(data, series))
    if any(spec.name == "layer" and spec.scan is not None for spec in groups):
        targets.append(layer_memory_target(data))
    return targets


def plot_targets(groups: Iterable["GroupSpec"]) -> Dict[Tuple[str, str, str], float]:
    """(group, phase, pair label) -> speed-up threshold, for the guides drawn on the plot: the
    first float32 target of each."""
    guides: Dict[Tuple[str, str, str], float] = {}
    for spec in groups:
        for tg in spec.targets:
            if isinstance(tg, RatioTarget) and "float32" in tg.dtypes:
                guides.setdefault((spec.name, tg.phase, tg.pair), tg.threshold)
    return guides


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


def memory_target(data: Dict[str, Any], groups: Iterable[Tuple[str, str]]) -> Dict[str, Any]:
    """torch_mha's peak in the memory scan grows linearly: `groups` are (group, contender)."""
    name = (
        "torch_mha fwd+bwd peak memory linear in length (batch-1 scan, float32, D=64): "
        "successive-length ratio <= 2.5 (linear 2, quadratic 4)"
    )
    series = []
    for group, contender in groups:
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
        return {
            "target": name,
            "threshold": MEMORY_RATIO,
            "status": "not measured",
            "series": series,
        }
    worst = max(all_ratios)
    return {
        "target": name,
        "threshold": MEMORY_RATIO,
        "status": "PASS" if worst <= MEMORY_RATIO else "MISS",
        "worst": worst,
        "series": series,
    }


def layer_memory_target(data: Dict[str, Any]) -> Dict[str, Any]:
    """Issue 16: the layer training step's peak at L = LAYER_MEMORY_LENGTH, torch_mha over
    nn.MultiheadAttention(need_weights=False), from the memory scan (--memory-scan linear or
    all, with that length in --memory-lengths)."""
    name = (
        f"layer training step peak memory at L={LAYER_MEMORY_LENGTH}, torch_mha / nn "
        "need_weights=False (issue 16, batch-1 scan, float32)"
    )
    peaks = {}
    for contender in ("ours_nw", "nn_nw"):
        for m in memory_scan_series(data, "layer", contender):
            if m["workload"]["length"] == LAYER_MEMORY_LENGTH and m["workload"]["dtype"] == (
                "float32"
            ):
                peaks[contender] = m["aten_peak_bytes"]
    if len(peaks) < 2 or peaks["nn_nw"] <= 0:
        return {
            "target": name,
            "threshold": LAYER_MEMORY_RATIO,
            "unit": "peak ratio",
            "status": "not measured",
        }
    ratio = peaks["ours_nw"] / peaks["nn_nw"]
    return {
        "target": name,
        "threshold": LAYER_MEMORY_RATIO,
        "unit": "peak ratio",
        "status": "PASS" if ratio <= LAYER_MEMORY_RATIO else "MISS",
        "worst": ratio,
        "peaks_bytes": peaks,
    }
