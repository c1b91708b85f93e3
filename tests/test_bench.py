"""Smoke test of benchmarks/bench_attention.py: the smallest run produces well-formed outputs.

Runs the script in a subprocess (one length, one dtype, one repeat, no warm-up) and checks the
JSON, PNG and Markdown it writes. It never looks at timing values: they mean nothing at this size.
"""

import json
import os
import struct
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_attention.py")


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
