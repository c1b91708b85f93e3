"""The CPU half of benchmarks/gpu_check.sh (issue 13): its --dry-run, the pytest plugin's time
budget, the report's parsing of compute-sanitizer output, and the one-line exit without a GPU.

The dry run (one run shared by the tests of this module, about 20 s on 2 cores) plans the phases,
prints the commands a GPU machine would run, runs the sanitizer driver and the benchmark on the
CPU on tiny shapes and the pytest plugin on the CUDA tests' collection, and writes the outputs a
GPU run writes; these tests check them.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check_report  # noqa: E402


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHON=sys.executable, **extra)
    env.pop("OUT", None)  # the device tool's output folder would take precedence over --out
    return env


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    start = time.time()
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=REPO,
        timeout=600,
    )
    return proc, out, time.time() - start


def test_dry_run_succeeds_and_writes_the_outputs(dry_run):
    proc, out, seconds = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    files = sorted(p.name for p in out.iterdir())
    assert {"gpu_check.json", "gpu_check.md", "tests.log", "sanitize.log", "bench.log"} <= set(
        files
    )
    # What a device visit brings back: at most 8 files of at most 16 MiB.
    assert len(files) <= 8
    assert all((out / f).stat().st_size < 16 * 2**20 for f in files)
    print(f"dry run: {seconds:.1f} s")


def test_dry_run_plans_every_phase_and_prints_the_commands(dry_run):
    proc, out, _ = dry_run
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] is True
    assert report["status"] == "dry run passed"
    phases = {p["phase"]: p for p in report["phases"]}
    for name in ("build", "tests", "tests-own", "memcheck", "racecheck", "synccheck", "bench"):
        assert phases[name]["status"] == "dry-run", phases[name]
        assert phases[name]["limit"] > 0
    for name in ("cpu-pytest", "cpu-sanitize", "cpu-bench"):
        assert phases[name]["status"] == "ok", phases[name]
    commands = "\n".join(report["commands"])
    assert "setup.py build_ext --inplace" in commands and "FORCE_CUDA=1" in commands
    assert "-m cuda tests/test_cuda.py tests" in commands
    assert "TORCH_MHA_CUDA_BACKEND=own" in commands and "-k float16" in commands
    for tool in ("memcheck", "racecheck", "synccheck"):
        assert f"compute-sanitizer --tool {tool} --kernel-name kns=torch_mha" in commands
    assert "benchmarks/gpu_check.py" in commands
    assert "would run:" in proc.stdout


def test_dry_run_exercises_the_drivers_on_the_cpu(dry_run):
    _, out, _ = dry_run
    report = json.loads((out / "gpu_check.json").read_text())
    # The pytest plugin counted the CUDA tests it collected (all skipped on the CPU).
    tests = report["tests"]["default"]
    assert tests["collected"] > 50 and tests["skipped"] == tests["collected"], tests
    # The sanitizer driver ran every case on the CPU without an error.
    cpu = report["sanitizer"]["cpu (dry run)"]
    assert cpu["driver"]["errors"] == 0 and cpu["driver"]["ok"] > 40, cpu
    for tool in ("memcheck", "racecheck", "synccheck"):
        assert report["sanitizer"][tool]["status"] == "dry-run"
    # The benchmark ran the whole grid (tiny shapes): core and layer, every dtype and head dim,
    # with the own-kernel contender for float16/bfloat16 (core) and a backend per row.
    rows = report["benchmark"]["rows"]
    assert report["benchmark"]["complete"]
    assert {(r["bench"], r["dtype"], r["head_dim"]) for r in rows} == {
        (b, d, h)
        for b in ("core", "layer")
        for d in ("float16", "bfloat16", "float32")
        for h in (64, 128)
    }
    for r in rows:
        assert r["status"] == "ok", r
        reference = "sdpa" if r["bench"] == "core" else "nn"
        expected = {reference, "torch_mha"} | (
            {"torch_mha_own"} if r["dtype"] != "float32" and r["bench"] == "core" else set()
        )
        assert set(r["results"]) == expected
        for entry in r["results"].values():
            assert "error" not in entry and entry["fwd_ms"] > 0 and entry["fwdbwd_ms"] > 0
        assert r["backend"]["torch_mha"]
        if "torch_mha_own" in r["backend"]:
            assert r["backend"]["torch_mha_own"] == "torch_mha"


def test_dry_run_markdown(dry_run):
    _, out, _ = dry_run
    md = (out / "gpu_check.md").read_text()
    assert md.startswith("# torch_mha GPU check (DRY RUN")
    for heading in (
        "## Phases",
        "## CUDA tests",
        "## compute-sanitizer",
        "## Benchmark",
        "### Core",
        "### Layer",
        "## Commands",
    ):
        assert heading in md
    assert "| bfloat16 | 128 |" in md


@pytest.mark.skipif(
    Path("/dev/nvidia0").exists()
    or bool(subprocess.run(["sh", "-c", "command -v nvidia-smi"], capture_output=True).stdout),
    reason="this machine has an NVIDIA GPU (or its tools)",
)
def test_without_a_gpu_one_line_and_status_1(tmp_path):
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "no NVIDIA GPU" in proc.stderr


def test_bad_arguments_are_refused():
    for args in (["--budget", "soon"], ["--frobnicate"]):
        proc = subprocess.run(
            ["bash", str(SCRIPT), "--dry-run", *args],
            capture_output=True,
            text=True,
            env=_env(),
            cwd=REPO,
            timeout=60,
        )
        assert proc.returncode == 1 and "gpu_check:" in proc.stderr


def test_pytest_plugin_stops_at_the_deadline(tmp_path):
    (tmp_path / "test_some.py").write_text(
        "import pytest\n"
        "def test_a(): pass\n"
        "def test_b(): assert 1 == 2\n"
        "@pytest.mark.skip(reason='no')\n"
        "def test_c(): pass\n"
        "def test_d(): pass\n"
    )
    results = tmp_path / "results.json"
    env = _env(
        GPU_CHECK_RESULTS=str(results), GPU_CHECK_DEADLINE="0", PYTHONPATH=str(REPO / "benchmarks")
    )
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "gpu_check_pytest",
        "-p",
        "no:cacheprovider",
        "-q",
        "test_some.py",
    ]
    subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, timeout=120)
    data = json.loads(results.read_text())
    assert (data["collected"], data["passed"], data["failed"], data["skipped"]) == (4, 2, 1, 1)
    assert data["not_run"] == 0 and data["stopped"] == ""
    assert data["failures"][0]["test"] == "test_some.py::test_b"
    # A deadline in the past: the first test runs, then the session stops.
    env["GPU_CHECK_DEADLINE"] = str(time.time() - 1)
    subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, timeout=120)
    data = json.loads(results.read_text())
    assert data["passed"] == 1 and data["not_run"] == 3 and "time budget" in data["stopped"]


CLEAN_MEMCHECK = (
    "========= COMPUTE-SANITIZER\ngpu_sanitize: ...\n========= ERROR SUMMARY: 0 errors\n"
)
DIRTY_MEMCHECK = (
    "========= COMPUTE-SANITIZER\n"
    "========= Invalid __global__ read of size 4 bytes\n"
    "=========     at torch_mha::cuda::attention_forward_kernel<float, float, 64>(...)\n"
    "========= ERROR SUMMARY: 1 error\n"
)
RACECHECK = (
    "========= COMPUTE-SANITIZER\n"
    "========= RACECHECK SUMMARY: 3 hazards displayed (2 errors, 1 warnings)\n"
)
CUT_SHORT = "========= COMPUTE-SANITIZER\n========= Barrier error detected. Divergent thread(s)\n"


@pytest.mark.parametrize(
    "log,phase,status,errors",
    [
        (CLEAN_MEMCHECK, "ok", "passed", 0),
        (DIRTY_MEMCHECK, "failed", "failed", 1),
        (
            "========= COMPUTE-SANITIZER\n========= RACECHECK SUMMARY: 0 hazards displayed "
            "(0 errors, 0 warnings)\n",
            "ok",
            "passed",
            0,
        ),
        (RACECHECK, "failed", "failed", 2),
        (CUT_SHORT, "timeout", "failed", None),
        ("========= COMPUTE-SANITIZER\n", "timeout", "timeout", None),
        ("", "skipped", "skipped", None),
    ],
    ids=["clean", "errors", "race_clean", "races", "cut_short_with_report", "cut_short", "skipped"],
)
def test_sanitizer_summaries(log, phase, status, errors):
    result = gpu_check_report.sanitizer_result("memcheck", log, None, {"status": phase})
    assert result["status"] == status
    assert result.get("errors") == errors


def test_sanitizer_driver_failures_fail_the_tool():
    driver = {
        "summary": {"cases": 2, "ok": 1, "skipped": 0, "errors": 1},
        "cases": [
            {"case": "a", "status": "ok"},
            {"case": "b", "status": "error", "error": "RuntimeError: boom"},
        ],
    }
    result = gpu_check_report.sanitizer_result(
        "synccheck", CLEAN_MEMCHECK, driver, {"status": "failed"}
    )
    assert result["status"] == "failed" and result["driver_errors"][0]["case"] == "b"


def test_trim_keeps_head_tail_and_errors():
    text = "\n".join(f"line {i}" + (" error: bad" if i == 5000 else "") for i in range(10000))
    trimmed = gpu_check_report.trim(text, head=10, tail=20)
    lines = trimmed.splitlines()
    assert lines[0] == "line 0" and lines[-1] == "line 9999"
    assert "line 5000 error: bad" in lines
    assert len(lines) == 10 + 20 + 3
