"""Smoke tests of benchmarks/bench_attention.py: the smallest runs produce well-formed outputs.

Runs the script in a subprocess (one length, one dtype, one repeat, no warm-up) and checks the
JSON, PNG and Markdown it writes: once for the length-sweep groups, once for the variant groups
of issue 14 (window, gqa, varlen) at tiny shapes of their own. They never look at timing values:
they mean nothing at this size. The variants' targets are checked on made-up case records at
the issue's shapes instead (PASS/MISS rules, and that the planned shapes are the ones they hold
at).
"""

import json
import os
import struct
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.path.join(ROOT, "benchmarks")
SCRIPT = os.path.join(BENCH_DIR, "bench_attention.py")


def test_bench_attention_smallest_run(tmp_path) -> None:
    out = tmp_path / "out"
    results = tmp_path / "report" / "RESULTS.md"
    plot = tmp_path / "report" / "results.png"
    args = [
        "--lengths", "64",
        "--tokens", "64",
        "--dtypes", "float32",
        "--head-dims", "64",
        "--causal", "off",
        "--threads", "1",
        "--repeats", "1",
        "--warmup", "0",
        "--memory-lengths", "64,128",
        "--memory-scan", "ours",
        "--mm-size", "128",
        "--no-progress",
        "--out", str(out),
        "--results", str(results),
        "--plot", str(plot),
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, SCRIPT, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Targets (issues #5 and #14)" in proc.stdout
    assert "Machine: " in proc.stdout

    # JSON: metadata, every group measured, medians and memory present, targets evaluated.
    data = json.loads((out / "bench_attention.json").read_text())
    meta = data["metadata"]
    assert "--lengths 64" in meta["command"]
    for key in ("torch_version", "torch_config", "torch_mha", "cpu_model", "date_utc"):
        assert key in meta, key
    assert meta["torch_mha"]["build_info"]
    assert {c["group"] for c in data["cases"]} == {"layer", "core", "small"}
    for case in data["cases"]:
        assert case["contenders"], case["key"]
        for result in case["contenders"].values():
            assert result["rounds"] == 1
            for phase in result["phases"].values():
                assert phase["median_s"] > 0 and len(phase["samples_s"]) == 1
        assert case["speedups"]
    modes = {(c["group"], c["mode"]) for c in data["cases"]}
    assert modes == {("layer", "train"), ("layer", "infer"), ("core", "train"), ("small", "infer")}
    train = next(c for c in data["cases"] if c["group"] == "core")
    assert set(train["contenders"]["ours"]["phases"]) == {"fwd", "bwd", "fwdbwd"}
    assert {c["dtype"] for c in data["ceiling"]} == {"float32"}
    assert data["memory"] and all("error" not in m for m in data["memory"])
    assert all(m["aten_peak_bytes"] > 0 for m in data["memory"])
    statuses = {t["status"] for t in data["targets"]}
    assert statuses <= {"PASS", "MISS", "not measured"}
    memory_target = next(t for t in data["targets"] if "series" in t)
    assert memory_target["status"] in ("PASS", "MISS")  # two scan lengths were measured

    # PNG: signature and a plausible size from the IHDR chunk.
    png = plot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 100 and height > 100

    # Markdown: the command, the targets, the tables and a working link to the plot.
    md = results.read_text()
    assert md.startswith("# torch_mha CPU attention benchmark")
    assert meta["command"] in md
    assert "## Targets" in md and "## Method" in md
    assert "| dtype |" in md
    assert "![speed-up and memory by length](results.png)" in md


VARIANT_GROUPS = {"window", "gqa", "varlen"}
VARIANT_PAIRS = {
    "window": {"full causal", "F.sdpa + mask"},
    "gqa": {"F.sdpa enable_gqa", "F.sdpa K/V repeated"},
    "varlen": {"padded + key_padding_mask", "F.sdpa padded"},
}
SDPA_CONTENDERS = {"win_sdpa", "gqa_sdpa", "gqa_sdpa_rep", "vl_sdpa"}


def test_bench_attention_variant_groups_tiny(tmp_path) -> None:
    out = tmp_path / "out"
    results = tmp_path / "report" / "RESULTS.md"
    plot = tmp_path / "report" / "results.png"
    args = [
        "--groups", "window,gqa,varlen",
        "--window-length", "64",
        "--window", "16,0",
        "--gqa-length", "32",
        "--gqa-causal", "off,on",
        "--varlen-lengths", "8,16,24,40",
        "--dtypes", "float32",
        "--threads", "1",
        "--repeats", "1",
        "--warmup", "0",
        "--mm-size", "128",
        "--no-progress",
        "--out", str(out),
        "--results", str(results),
        "--plot", str(plot),
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, SCRIPT, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for title in ("Sliding window, ", "Grouped-query attention, ", "Packed varlen batch, "):
        assert title + "training step (fwd+bwd)" in proc.stdout, title

    data = json.loads((out / "bench_attention.json").read_text())
    assert {c["group"] for c in data["cases"]} == VARIANT_GROUPS
    assert {(c["group"], c["causal"]) for c in data["cases"]} == {
        ("window", True),
        ("gqa", False),
        ("gqa", True),
        ("varlen", True),
    }
    for case in data["cases"]:
        assert case["mode"] == "train"
        options = dict(case["options"])
        if case["group"] == "window":
            assert options == {"window": [16, 0]} and case["length"] == 64
        elif case["group"] == "gqa":
            assert options == {"kv_heads": 8} and (case["heads"], case["head_dim"]) == (32, 128)
        else:
            assert options == {"seqlens": [8, 16, 24, 40]}
            assert (case["length"], case["batch"]) == (40, 4)
        assert len(case["contenders"]) == 3, case["key"]
        for result in case["contenders"].values():
            assert result["rounds"] == 1
            assert set(result["phases"]) == {"fwd", "bwd", "fwdbwd"}
            for phase in result["phases"].values():
                assert phase["median_s"] > 0 and phase["gflops"] > 0
        assert set(case["speedups"]) == VARIANT_PAIRS[case["group"]]
    # One memory item per contender and case; the profiler names the SDPA kernels.
    assert len(data["memory"]) == 3 * len(data["cases"])
    for m in data["memory"]:
        assert "error" not in m and m["aten_peak_bytes"] > 0, m
        if m["contender"] in SDPA_CONTENDERS:
            assert any("scaled_dot_product" in k for k in m["sdpa_kernels"]), m
        else:
            assert m["sdpa_kernels"] == [], m
    # Only the variants' targets, float32 and bfloat16; not measured at these shapes.
    assert len(data["targets"]) == 10
    assert all("issue 14" in t["target"] for t in data["targets"])
    assert {t["status"] for t in data["targets"]} == {"not measured"}
    assert data["metadata"]["cpu_flags_absent"] is not None

    md = results.read_text()
    assert "Machine: " in md and "## Targets" in md
    assert "### Sliding window, training step (fwd+bwd)" in md
    assert "varlen: lengths [8, 16, 24, 40]" in md
    assert not plot.exists()  # no length sweep, no memory scan: nothing to plot


def _variant_cases(speedup: float, sdpa_speedup: float):
    """Case records of the variant groups at the issue's shapes (the planners' defaults), as
    the runner makes them from medians chosen so that torch_mha is `speedup` times faster than
    its first anchor and `sdpa_speedup` times faster than the second, read back from JSON."""
    sys.path.insert(0, BENCH_DIR)
    try:
        from attention_bench.cli import parse_args
        from attention_bench.runner import case_record
        from attention_bench.workloads import GROUPS
    finally:
        sys.path.remove(BENCH_DIR)
    args = parse_args(["--variants", "--threads", "2"])
    cases = []
    for name in ("window", "gqa", "varlen"):
        spec = GROUPS[name]
        for dtype in ("float32", "bfloat16"):
            for w in spec.plan(args, 2, dtype):
                (first, ours, _), (second, _, _) = spec.pairs
                medians = {ours: 1.0, first: speedup, second: sdpa_speedup}
                result = {
                    c: {"phases": {p: {"median_s": t} for p in ("fwd", "bwd", "fwdbwd")}}
                    for c, t in medians.items()
                }
                cases.append(json.loads(json.dumps(case_record(w, "train", result, []))))
    return cases, [GROUPS[g] for g in ("window", "gqa", "varlen")]


@pytest.mark.parametrize(
    "speedup, sdpa_speedup, expected",
    [
        # window: >= 10x causal, >= 20x SDPA; gqa: >= 1.2x both; varlen: >= 2x padded.
        (25.0, 25.0, ["PASS"] * 5),
        (5.0, 25.0, ["MISS", "PASS", "PASS", "PASS", "PASS"]),
        (1.5, 1.1, ["MISS", "MISS", "PASS", "MISS", "MISS"]),
    ],
)
def test_variant_targets_at_the_issue_shapes(speedup, sdpa_speedup, expected) -> None:
    sys.path.insert(0, BENCH_DIR)
    try:
        from attention_bench.targets import evaluate_targets
    finally:
        sys.path.remove(BENCH_DIR)
    cases, groups = _variant_cases(speedup, sdpa_speedup)
    targets = evaluate_targets({"cases": cases, "memory": [], "memory_scan_keys": []}, groups)
    assert [t["status"] for t in targets] == expected * 2  # float32, then bfloat16
    # gqa: the causal case (the second one planned) is reported but outside the target.
    gqa = targets[2]
    assert [c["causal"] for c in gqa["cases"]] == [False]
    # A shape other than the issue's is not measured.
    for case in cases:
        case["length"] //= 2
    targets = evaluate_targets({"cases": cases, "memory": [], "memory_scan_keys": []}, groups)
    assert {t["status"] for t in targets} == {"not measured"}
