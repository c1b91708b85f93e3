"""Smoke tests of benchmarks/bench_attention.py: the smallest runs produce well-formed outputs.

Runs the script in a subprocess (one length, one dtype, one repeat, no warm-up) and checks the
JSON, PNG and Markdown it writes: once for the length-sweep groups, once for the variant groups
of issue 14 (window, gqa, varlen) at tiny shapes of their own. They never look at timing values:
they mean nothing at this size. The variants' targets are checked on made-up case records at
the issue's shapes instead (PASS/MISS rules, and that the planned shapes are the ones they hold
at).
"""

import argparse
import json
import os
import struct
import subprocess
import sys

import pytest
import torch

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
    assert "Targets (issues #5, #14, #15 and #16)" in proc.stdout
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


SERVING_GROUPS = {"decode", "generate", "prefill"}
SERVING_PAIRS = {
    "decode": {"F.sdpa K/V repeated", "F.sdpa enable_gqa"},
    "generate": {"sdpa backend"},
    "prefill": {"sdpa backend"},
}


def _bench_modules():
    sys.path.insert(0, BENCH_DIR)
    try:
        from attention_bench import cli, runner, serving, targets, workloads
    finally:
        sys.path.remove(BENCH_DIR)
    return cli, runner, serving, targets, workloads


def test_bench_attention_serving_groups_tiny(tmp_path) -> None:
    pytest.importorskip("transformers", reason="transformers is not installed")
    out = tmp_path / "out"
    results = tmp_path / "report" / "RESULTS.md"
    args = [
        "--serving",
        "--decode-lengths", "64,96",
        "--decode-batches", "1,2",
        "--hf-model", "tiny",
        "--generate-prompt", "12",
        "--generate-tokens", "5",
        "--generate-batch", "2",
        "--prefill-lengths", "20,7,13",
        "--dtypes", "float32",
        "--threads", "1",
        "--repeats", "1",
        "--warmup", "0",
        "--mm-size", "128",
        "--no-progress",
        "--out", str(out),
        "--results", str(results),
        "--plot", str(tmp_path / "report" / "results.png"),
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, SCRIPT, *args], cwd=ROOT, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for title in ("Decode step, ", "generate(), ", "Padded prefill, "):
        assert title + "inference (eval, no_grad)" in proc.stdout, title
    assert "generate(): tokens/s" in proc.stdout

    data = json.loads((out / "bench_attention.json").read_text())
    assert data["config"]["preset"] == "serving"
    assert {c["group"] for c in data["cases"]} == SERVING_GROUPS
    shapes = sorted((c["length"], c["batch"]) for c in data["cases"] if c["group"] == "decode")
    assert shapes == [(64, 1), (64, 2), (96, 1), (96, 2)]
    for case in data["cases"]:
        assert case["mode"] == "infer"
        options = dict(case["options"])
        if case["group"] == "decode":
            assert options == {"kv_heads": 8} and (case["heads"], case["head_dim"]) == (32, 128)
            assert len(case["contenders"]) == 3
        elif case["group"] == "generate":
            assert options == {"model": "tiny", "new_tokens": 5}
            assert (case["length"], case["batch"]) == (12, 2)
        else:
            assert options == {"model": "tiny", "seqlens": [20, 7, 13]}
            assert (case["length"], case["batch"]) == (20, 3)
        for result in case["contenders"].values():
            assert result["rounds"] == 1 and set(result["phases"]) == {"infer"}
            assert result["phases"]["infer"]["median_s"] > 0
        assert set(case["speedups"]) == SERVING_PAIRS[case["group"]]
    # Memory: the decode step's contenders only (whole-model calls are not profiled); the
    # repeat_interleave anchor allocates the repeated K/V, torch_mha reads the cache in place.
    assert {m["workload"]["group"] for m in data["memory"]} == {"decode"}
    for m in data["memory"]:
        assert "error" not in m, m
        w = m["workload"]
        repeated = 2 * w["batch"] * 32 * w["length"] * 128 * 4
        if m["contender"] == "dec_sdpa_rep":
            assert m["aten_peak_bytes"] >= repeated
        elif m["contender"] == "dec_ours":
            assert m["aten_peak_bytes"] < repeated / 4
    # Only the serving targets; the tiny shapes are not the issue's.
    assert len(data["targets"]) == 6
    assert all("issue 15" in t["target"] for t in data["targets"])
    assert {t["status"] for t in data["targets"]} == {"not measured"}
    md = results.read_text()
    assert "decode: cache lengths [64, 96], batches [1, 2]" in md
    assert "### generate(): tokens/s" in md


def test_decode_bench_contenders_compute_attention_over_the_cache() -> None:
    """Each decode contender appends the new token and returns softmax attention of the one
    query over the whole cache: checked against a dense float64 reference on K/V repeated."""
    _, _, serving, _, workloads = _bench_modules()
    w = workloads.Workload("decode", "float64", 32 * 16, 32, 40, 2, False, 1, (("kv_heads", 8),))
    bench = serving.DecodeBench(w)
    old_k = bench.k_cache.clone()
    k = torch.cat([old_k[:, :, :-1], bench.k_new], 2).repeat_interleave(4, dim=1)
    v = torch.cat([bench.v_cache[:, :, :-1], bench.v_new], 2).repeat_interleave(4, dim=1)
    expected = (bench.q @ k.transpose(-1, -2) / 16**0.5).softmax(-1) @ v
    for contender in w.contenders:
        bench.k_cache.copy_(old_k)  # undo the previous contender's append
        out, weights = bench.forward(contender)()
        assert weights is None and out.shape == (2, 32, 1, 16)
        torch.testing.assert_close(out, expected, msg=contender)
        assert torch.equal(bench.k_cache[:, :, -1:], bench.k_new), contender
        assert torch.equal(bench.k_cache[:, :, :-1], old_k[:, :, :-1]), contender


def test_model_benches_run_the_same_model_with_both_backends() -> None:
    """generate and prefill: the torch_mha and sdpa contenders hold the same weights; greedy
    generate() gives the same tokens (new_tokens of them after the prompt) and the padded
    prefill the same last-position logits."""
    pytest.importorskip("transformers", reason="transformers is not installed")
    _, _, serving, _, workloads = _bench_modules()
    options = (("model", "tiny"), ("new_tokens", 6))
    w = workloads.Workload("generate", "float32", 64, 8, 10, 2, True, 1, options)
    bench = serving.GenerateBench(w)
    ours, theirs = (bench.forward(c)()[0] for c in ("gen_ours", "gen_sdpa"))
    assert ours.shape == (2, 10 + 6) and torch.equal(ours[:, :10], bench.ids)
    assert torch.equal(ours, theirs)
    options = (("model", "tiny"), ("seqlens", (20, 7, 13)))
    w = workloads.Workload("prefill", "float32", 64, 8, 20, 3, True, 1, options)
    bench = serving.PrefillBench(w)
    assert bench.mask.sum(1).tolist() == [20, 7, 13]
    ours, theirs = (bench.forward(c)()[0] for c in ("pre_ours", "pre_sdpa"))
    assert ours.shape == (3, 1, bench.vocab)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=2e-5)


def _serving_cases(decode: float, generate: float, prefill: float):
    """Case records of the serving groups at the issue's shapes (the --serving defaults), as
    the runner makes them from medians that make torch_mha `decode` times faster than the
    repeat_interleave anchor (and than the enable_gqa reference), `generate` and `prefill`
    times faster than the sdpa backend; read back from JSON."""
    cli, runner, _, _, workloads = _bench_modules()
    args = cli.parse_args(["--serving"])
    speedups = {"decode": decode, "generate": generate, "prefill": prefill}
    cases = []
    for name in ("decode", "generate", "prefill"):
        spec = workloads.GROUPS[name]
        for dtype in ("float32", "bfloat16"):
            for w in spec.plan(args, 2, dtype):
                medians = {c: speedups[name] for c in spec.contenders}
                medians[spec.pairs[0][1]] = 1.0
                result = {c: {"phases": {"infer": {"median_s": t}}} for c, t in medians.items()}
                cases.append(json.loads(json.dumps(runner.case_record(w, "infer", result, []))))
    return cases, [workloads.GROUPS[g] for g in ("decode", "generate", "prefill")]


def test_serving_plans_are_the_issue_shapes() -> None:
    cases, _ = _serving_cases(1.0, 1.0, 1.0)
    decode = [c for c in cases if c["group"] == "decode" and c["dtype"] == "float32"]
    assert sorted((c["length"], c["batch"]) for c in decode) == [
        (n, b) for n in (1024, 4096, 16384) for b in (1, 4)
    ]
    assert {(c["heads"], dict(c["options"])["kv_heads"], c["head_dim"]) for c in decode} == {
        (32, 8, 128)
    }
    (prefill,) = [c for c in cases if c["group"] == "prefill" and c["dtype"] == "float32"]
    assert dict(prefill["options"]) == {"model": "demo", "seqlens": [1024, 768, 512, 256]}
    assert (prefill["length"], prefill["batch"]) == (1024, 4)


@pytest.mark.parametrize(
    "decode, generate, prefill, expected",
    [
        # decode >= 2x, generate >= 1.3x, prefill >= 1.2x
        (2.5, 1.4, 1.25, ["PASS", "PASS", "PASS"]),
        (1.9, 1.4, 1.25, ["MISS", "PASS", "PASS"]),
        (2.0, 1.29, 1.19, ["PASS", "MISS", "MISS"]),
    ],
)
def test_serving_targets_at_the_issue_shapes(decode, generate, prefill, expected) -> None:
    _, _, _, targets, _ = _bench_modules()
    cases, groups = _serving_cases(decode, generate, prefill)
    found = targets.evaluate_targets({"cases": cases, "memory": [], "memory_scan_keys": []}, groups)
    assert [t["status"] for t in found] == expected * 2  # float32, then bfloat16
    # Every decode case (3 cache lengths x 2 batches) counts, the worst decides.
    assert len(found[0]["cases"]) == 6 and found[0]["worst"] == pytest.approx(decode)
    # One slow decode case is a MISS even when the others pass.
    slow = next(c for c in cases if c["group"] == "decode" and c["length"] == 16384)
    slow["speedups"]["F.sdpa K/V repeated"]["infer"] = 1.5
    found = targets.evaluate_targets({"cases": cases, "memory": [], "memory_scan_keys": []}, groups)
    assert found[0]["status"] == "MISS" and found[0]["worst"] == pytest.approx(1.5)
    # Other shapes, another model or another thread count: not measured.
    for case in cases:
        case["options"] = [[k, "tiny" if k == "model" else v] for k, v in case["options"]]
        if case["group"] == "decode":
            case["threads"] = 1
    found = targets.evaluate_targets({"cases": cases, "memory": [], "memory_scan_keys": []}, groups)
    assert {t["status"] for t in found} == {"not measured"}


def test_attention_share_counts_the_attention_calls_of_both_backends() -> None:
    """benchmarks/attention_share.py: its clock sees every attention call of both backends
    (one per layer and forward), its attention time is a part of the total, and it leaves
    transformers' registry as it found it."""
    pytest.importorskip("transformers", reason="transformers is not installed")
    from transformers import AttentionInterface

    import torch_mha.hf  # noqa: F401  (registers "torch_mha")

    sys.path.insert(0, BENCH_DIR)
    import attention_share

    before = {b: AttentionInterface._global_mapping[b] for b in attention_share.BACKENDS}
    options = argparse.Namespace(hf_model="tiny", prefill_lengths=(20, 7, 13))
    bench = attention_share.serving.PrefillBench(
        attention_share.serving.plan_prefill(options, 1, "float32")[0]
    )
    clock = attention_share.AttentionClock(list(attention_share.BACKENDS))
    try:
        with torch.no_grad():
            for contender in ("pre_ours", "pre_sdpa"):
                bench.forward(contender)()
    finally:
        clock.restore()
    layers = len(bench.model("pre_ours").model.layers)
    assert clock.calls == 2 * layers and clock.seconds > 0
    result = attention_share.measure("prefill", "float32", 1, 2, options)
    for backend in attention_share.BACKENDS:
        assert 0 < result[backend]["attention"] < result[backend]["total"], backend
    assert {b: AttentionInterface._global_mapping[b] for b in before} == before


def _core_cases(speedup: float, mm_fraction: float):
    """Core-group case records at L 1024-4096, D 64 and 128, float32 and bfloat16, with
    torch_mha `speedup` times faster than F.sdpa in every phase and its fwd+bwd GFLOP/s
    `mm_fraction` of a made-up torch.mm ceiling; read back from JSON."""
    cli, runner, _, _, workloads = _bench_modules()
    args = cli.parse_args(["--groups", "core", "--lengths", "1024,2048,4096"])
    args.head_dims = [64, 128]
    cases = []
    for dtype in ("float32", "bfloat16"):
        for w in workloads.GROUPS["core"].plan(args, 2, dtype):
            result = {
                c: {"phases": {p: {"median_s": t} for p in ("fwd", "bwd", "fwdbwd")}}
                for c, t in (("ours", 1.0), ("sdpa", speedup))
            }
            cases.append(json.loads(json.dumps(runner.case_record(w, "train", result, []))))
    ceiling = []
    for dtype in ("float32", "bfloat16"):
        ours = [c for c in cases if c["dtype"] == dtype][0]["contenders"]["ours"]
        gflops = ours["phases"]["fwdbwd"]["gflops"]
        ceiling.append({"dtype": dtype, "threads": 2, "gflops": gflops / mm_fraction})
    return cases, ceiling


@pytest.mark.parametrize("flags", [["avx2", "fma"], ["avx2", "fma", "avx512f", "avx512_bf16"]])
@pytest.mark.parametrize("speedup", [1.1, 1.3, 1.6])
def test_issue16_targets_depend_on_the_machine(flags, speedup) -> None:
    """bfloat16 core targets: >= 1.0x without bfloat16 instructions, >= 1.5x with them; float32
    fwd+bwd >= 1.2x whatever the CPU; the 80% ceiling target reads torch.mm's GFLOP/s."""
    _, _, _, targets, workloads = _bench_modules()
    cases, ceiling = _core_cases(speedup, 0.85)
    data = {
        "cases": cases,
        "ceiling": ceiling,
        "memory": [],
        "memory_scan_keys": [],
        "metadata": {"cpu_flags": flags},
    }
    found = {t["target"]: t for t in targets.evaluate_targets(data, [workloads.GROUPS["core"]])}
    issue16 = {name: t for name, t in found.items() if "issue 16" in name}
    native = "avx512_bf16" in flags
    bf16 = [t for name, t in issue16.items() if name.startswith("bfloat16: ")]
    fp32 = [t for name, t in issue16.items() if not name.startswith("bfloat16: ")]
    assert len(bf16) == 2 and len(fp32) == 2  # fwd and fwd+bwd; fwd+bwd ratio and ceiling
    for t in bf16:
        assert t["threshold"] == (1.5 if native else 1.0)
        assert t["status"] == ("PASS" if speedup >= t["threshold"] else "MISS")
        assert {c["head_dim"] for c in t["cases"]} == {64, 128}
    ratio, ceiling_target = sorted(fp32, key=lambda t: t.get("unit") == "of mm")
    assert ratio["status"] == ("PASS" if speedup >= 1.2 else "MISS")
    assert ceiling_target["status"] == "PASS"
    assert ceiling_target["worst"] == pytest.approx(0.85)


def test_issue16_layer_memory_target() -> None:
    """The layer peak at L=8192 from the memory scan: torch_mha / nn(need_weights=False)."""
    _, _, _, targets, workloads = _bench_modules()

    def record(contender: str, length: int, peak: float) -> dict:
        w = workloads.Workload("layer", "float32", 512, 8, length, 1, False, 2)
        return {
            "workload_key": w.key(),
            "workload": w.to_dict(),
            "contender": contender,
            "mode": "train",
            "aten_peak_bytes": peak,
        }

    for ours, expected in ((140.0, "PASS"), (150.0, "MISS")):
        memory = [record("nn_nw", 8192, 146.0), record("ours_nw", 8192, ours)]
        memory += [record("nn_nw", 4096, 73.0), record("ours_nw", 4096, 70.0)]
        data = {"memory": memory, "memory_scan_keys": [m["workload_key"] for m in memory]}
        t = targets.layer_memory_target(data)
        assert t["status"] == expected and t["worst"] == pytest.approx(ours / 146.0)
    # Without the L=8192 point, not measured.
    data = {"memory": memory[2:], "memory_scan_keys": [m["workload_key"] for m in memory]}
    assert targets.layer_memory_target(data)["status"] == "not measured"


def _layer_autocast_cases(speedup: float):
    """layer_autocast case records at L 1024-4096, D 64 and 128, as issue 16's command plans
    them (bfloat16 only), with torch_mha `speedup` times faster than nn(need_weights=False) in
    every phase; read back from JSON."""
    cli, runner, _, _, workloads = _bench_modules()
    args = cli.parse_args(
        ["--groups", "layer_autocast", "--dtypes", "float32,bfloat16", "--head-dims", "64,128"]
        + ["--lengths", "1024,2048,4096", "--threads", "2", "--modes", "train"]
    )
    sweep, fixed = workloads.plan_workloads(args)
    assert not fixed and {w.dtype for w in sweep} == {"bfloat16"}  # not at float32
    cases = []
    for w in sweep:
        result = {
            c: {"phases": {p: {"median_s": t} for p in ("fwd", "bwd", "fwdbwd")}}
            for c, t in (("ours_nw", 1.0), ("nn_nw", speedup))
        }
        cases.append(json.loads(json.dumps(runner.case_record(w, "train", result, []))))
    return cases


@pytest.mark.parametrize(
    "flags", [["avx2", "fma"], ["avx2", "avx512f", "avx512_bf16"], ["avx2", "amx_bf16"]]
)
@pytest.mark.parametrize("speedup", [0.9, 1.1, 1.4])
def test_issue16_layer_autocast_target_depends_on_the_machine(flags, speedup) -> None:
    """The layer training step under autocast vs nn(need_weights=False): >= 1.0x without
    bfloat16 instructions, >= 1.3x with AMX or AVX512-BF16; bfloat16 only, every planned case
    (D 64 and 128, L 1024-4096, causal or not) counts and the worst decides."""
    _, _, _, targets, workloads = _bench_modules()
    sys.path.insert(0, BENCH_DIR)
    try:
        from attention_bench.report import describe_target, targets_text
    finally:
        sys.path.remove(BENCH_DIR)

    spec = workloads.GROUPS["layer_autocast"]
    assert spec.presets == () and spec.dtypes == ("bfloat16",)  # run only when asked
    cases = _layer_autocast_cases(speedup)
    assert {dict(c["options"])["autocast"] for c in cases} == {True}
    assert {(c["heads"], c["batch"] * c["length"]) for c in cases} == {(8, 4096)}
    data = {"cases": cases, "memory": [], "memory_scan_keys": [], "metadata": {"cpu_flags": flags}}
    (found,) = targets.evaluate_targets(data, [spec])
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    assert found["target"].startswith("bfloat16: ") and "autocast" in found["target"]
    assert "issue 16" in found["target"] and "need_weights=False" in found["target"]
    assert found["threshold"] == (1.3 if native else 1.0)
    assert found["status"] == ("PASS" if speedup >= found["threshold"] else "MISS")
    assert found["worst"] == pytest.approx(speedup)
    assert len(found["cases"]) == len(cases) == 12  # 2 head dims x 2 causal x 3 lengths
    assert {(c["head_dim"], c["length"]) for c in found["cases"]} == {
        (d, n) for d in (64, 128) for n in (1024, 2048, 4096)
    }
    # Reported like the other targets: verdict, threshold, worst case and the per-row ratios.
    text = targets_text({"targets": [found]})
    assert f"{found['status']:>12}  bfloat16: layer training step" in text
    assert f"(>= {found['threshold']}x)" in text
    row = describe_target(found)
    assert row.startswith(f"worst {speedup:.2f}x (") and f"{speedup:.2f}x@1024/D128/causal" in row
    # One slow row is a MISS even when the others pass.
    cases[-1]["speedups"]["need_weights=False"]["fwdbwd"] = 0.5
    (found,) = targets.evaluate_targets(data, [spec])
    assert found["status"] == "MISS" and found["worst"] == pytest.approx(0.5)


def test_bench_attention_layer_autocast_tiny(tmp_path) -> None:
    """A tiny run of --groups layer_autocast: both contenders timed at bfloat16 with the
    autocast option, its target evaluated ("not measured": L=64, 1 thread); then the two
    modules of its bench under autocast give the same output and gradients."""
    out = tmp_path / "out"
    results = tmp_path / "report" / "RESULTS.md"
    plot = tmp_path / "report" / "results.png"
    args = [
        "--groups", "layer_autocast",
        "--lengths", "64",
        "--tokens", "64",
        "--dtypes", "bfloat16",
        "--head-dims", "64",
        "--causal", "off",
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
        [sys.executable, SCRIPT, *args], cwd=ROOT, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Layer under autocast (float32 modules, bfloat16 compute), training step" in proc.stdout

    data = json.loads((out / "bench_attention.json").read_text())
    (case,) = data["cases"]
    assert (case["group"], case["dtype"], case["mode"]) == ("layer_autocast", "bfloat16", "train")
    assert dict(case["options"]) == {"autocast": True}
    assert (case["length"], case["batch"], case["head_dim"], case["heads"]) == (64, 1, 64, 8)
    assert set(case["contenders"]) == {"nn_nw", "ours_nw"}
    for result in case["contenders"].values():
        assert result["rounds"] == 1 and set(result["phases"]) == {"fwd", "bwd", "fwdbwd"}
        assert all(p["median_s"] > 0 for p in result["phases"].values())
    assert set(case["speedups"]) == {"need_weights=False"}
    assert {m["contender"] for m in data["memory"]} == {"nn_nw", "ours_nw"}
    assert all("error" not in m and m["aten_peak_bytes"] > 0 for m in data["memory"])
    (target,) = data["targets"]
    assert target["target"].startswith("bfloat16: ") and "issue 16" in target["target"]
    assert target["status"] == "not measured"
    md = results.read_text()
    assert "### Layer under autocast" in md and "autocast=True" in md
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the group has its panels

    # The bench's own calls: float32 modules, bfloat16 output, torch_mha matches nn.
    _, _, _, _, workloads = _bench_modules()
    for causal in (False, True):
        w = workloads.Workload(
            "layer_autocast", "bfloat16", 8 * 16, 8, 48, 2, causal, 1, (("autocast", True),)
        )
        bench = workloads.LayerBench(w)
        assert bench.x.dtype == torch.float32 and bench.grad_out.dtype == torch.bfloat16
        outputs, grads = {}, {}
        for contender in w.contenders:
            module = bench.module(contender)
            assert {p.dtype for p in module.parameters()} == {torch.float32}
            out_, weights = bench.forward(contender)()
            assert weights is None and out_.dtype == torch.bfloat16, contender
            outputs[contender] = out_
            grads[contender] = torch.autograd.grad(out_, bench.x, bench.grad_out)[0]
            assert grads[contender].dtype == torch.float32
        torch.testing.assert_close(outputs["ours_nw"], outputs["nn_nw"], atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(grads["ours_nw"], grads["nn_nw"], atol=2e-2, rtol=2e-2)


def test_kernel_ab_times_both_passes_of_each_case() -> None:
    """benchmarks/kernel_ab.py: one line naming the build that ran, with a forward and a
    backward time for every dtype and head dim asked for."""
    script = os.path.join(BENCH_DIR, "kernel_ab.py")
    out = subprocess.run(
        [sys.executable, script, "--length", "80", "--rounds", "2", "--head-dims", "8,16"]
        + ["--reduced-products", "fma"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout.strip()
    build, cells = out.split(": ", 1)
    build, engine = build.split(" (bfloat16 products ")
    assert os.path.isfile(os.path.join(build, "torch_mha", "__init__.py"))
    assert engine == "fma)"  # forced by --reduced-products
    cells = cells.split(" | ")
    assert [c.split(" fwd ")[0] for c in cells] == [
        "D=8 float32",
        "D=8 bfloat16",
        "D=16 float32",
        "D=16 bfloat16",
    ]
    for cell in cells:
        forward, backward = cell.split(" fwd ")[1].split(" bwd ")
        assert float(forward) >= 0 and float(backward) >= 0
