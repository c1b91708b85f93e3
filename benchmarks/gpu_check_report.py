"""Helpers of benchmarks/gpu_check.sh: the machine probe and the final report.

    python benchmarks/gpu_check_report.py probe --device cuda --json WORK/probe.json
    python benchmarks/gpu_check_report.py report --work WORK --out OUT --budget 450 --started T

`probe` imports torch (nothing else of the project) and records the machine: GPU, capability
(TORCH_CUDA_ARCH_LIST for the build), driver, torch, nvcc, compute-sanitizer, ninja, the test
packages; with --device cuda it exits 1 when torch cannot run a kernel on the GPU.

`report` uses the standard library only, so it runs whatever happened before. From WORK (the
files gpu_check.sh left there: phases.tsv, probe.json, the logs, the pytest plugin's and the
drivers' JSON) it writes into OUT:
  gpu_check.json   everything: phases with times and limits, build (per-kernel ptxas resources),
                   tests (counts, failures), sanitizer (errors per tool), benchmark rows
  gpu_check.md     the same as a summary with tables
  build.log, tests.log, sanitize.log, bench.log
                   the logs, merged per phase and trimmed (head, lines that look like errors,
                   tail) to stay far below 16 MiB each
Its exit status is the check's: 0 passed, 1 something failed, 2 nothing failed but something
did not run or was cut short.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# ---------------------------------------------------------------------------------------------
# probe


def _version_of(command: List[str], pattern: str) -> Optional[str]:
    if shutil.which(command[0]) is None:
        return None
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(pattern, out.stdout + out.stderr)
    return match.group(1) if match else "unknown"


def _module_version(name: str) -> Optional[str]:
    try:
        module = __import__(name)
    except Exception:  # noqa: BLE001 - absent or broken: reported as absent
        return None
    return str(getattr(module, "__version__", "present"))


def probe(args) -> int:
    import torch

    info: Dict[str, object] = {
        "python": sys.executable,
        "python_version": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cores": os.cpu_count(),
        "nvcc": _version_of(["nvcc", "--version"], r"release (\d+\.\d+)"),
        "compute_sanitizer": _version_of(["compute-sanitizer", "--version"], r"[Vv]ersion (\S+)"),
        "ninja": _version_of(["ninja", "--version"], r"(\S+)"),
        "packages": {
            name: _module_version(name)
            for name in ("setuptools", "pytest", "hypothesis", "numpy", "expecttest")
        },
        "gpus": [],
        "arch_list": "",
    }
    code = 0
    if args.device == "cuda":
        try:
            if not torch.cuda.is_available():
                raise RuntimeError(
                    f"torch.cuda.is_available() is False (torch "
                    f"{torch.__version__}, CUDA {torch.version.cuda})"
                )
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                info["gpus"].append(
                    {
                        "name": p.name,
                        "capability": f"{p.major}.{p.minor}",
                        "multiprocessors": p.multi_processor_count,
                        "memory_gib": round(p.total_memory / 2**30, 1),
                    }
                )
            # Only the GPU the check runs on (cuda:0), not every architecture.
            info["arch_list"] = info["gpus"][0]["capability"]
            info["driver"] = _version_of(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], r"(\S+)"
            )
            torch.ones(1, device="cuda").add_(1).item()  # the GPU really runs a kernel
        except Exception as error:  # noqa: BLE001 - the one line gpu_check.sh shows
            info["error"] = f"{type(error).__name__}: {error}"
            code = 1
    with open(args.json, "w") as f:
        json.dump(info, f, indent=1)
        f.write("\n")
    gpu = info["gpus"][0] if info["gpus"] else None
    print(
        f"python {info['python']} ({info['python_version']}), torch {info['torch']} "
        f"(CUDA {info['torch_cuda']}), nvcc {info['nvcc']}, compute-sanitizer "
        f"{info['compute_sanitizer']}, ninja {info['ninja']}, {info['cores']} cores"
    )
    missing = [name for name, version in info["packages"].items() if version is None]
    if missing:
        print(f"not installed: {', '.join(missing)}")
    if "error" in info:
        print(f"GPU: {info['error']}")
    elif gpu:
        print(
            f"GPU: {gpu['name']}, sm_{gpu['capability'].replace('.', '')}, "
            f"{gpu['multiprocessors']} SMs, {gpu['memory_gib']} GiB, driver {info.get('driver')}"
        )
    else:
        print("GPU: none (dry run)")
    return code


# ---------------------------------------------------------------------------------------------
# reading what the phases left


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _load_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# The order of the phase table (the phases of a stage finish in any order).
PHASE_ORDER = [
    "probe",
    "build",
    "tests",
    "tests-own",
    "memcheck",
    "racecheck",
    "synccheck",
    "bench",
    "cpu-pytest",
    "cpu-sanitize",
    "cpu-bench",
]
# Statuses of a phase that did not run: skipped (time budget, a missing tool), off (on
# request), dry-run.
NOT_RUN = ("skipped", "off", "dry-run")


def read_phases(work: str) -> List[Dict[str, object]]:
    phases = []
    for line in _read(os.path.join(work, "phases.tsv")).splitlines():
        parts = line.split("\t")
        if len(parts) < 5:
            continue
        name, status, seconds, limit, detail = parts[:5]
        phases.append(
            {
                "phase": name,
                "status": status,
                "seconds": int(seconds or 0),
                "limit": int(limit or 0),
                "detail": detail,
            }
        )
    rank = {name: i for i, name in enumerate(PHASE_ORDER)}
    return sorted(phases, key=lambda p: rank.get(p["phase"], len(rank)))


ERROR_LINE = re.compile(
    r"\berror\b|Error:|FAILED|Traceback|Invalid|Race reported|Barrier error"
    r"|Program hit|Killed"
)


def trim(
    text: str, head: int = 150, tail: int = 1200, max_errors: int = 300, width: int = 2000
) -> str:
    """The first `head` and last `tail` lines, and between them up to `max_errors` lines that
    look like errors; every line cut to `width` characters."""
    lines = [line if len(line) <= width else line[:width] + " [...]" for line in text.splitlines()]
    if len(lines) <= head + tail:
        return "\n".join(lines) + ("\n" if lines else "")
    middle = lines[head:-tail]
    errors = [line for line in middle if ERROR_LINE.search(line)][:max_errors]
    out = lines[:head]
    out.append(
        f"[gpu_check: {len(middle)} lines left out; {len(errors)} of them that look like "
        f"errors follow]"
    )
    out += errors
    out.append("[gpu_check: end of the lines left out]")
    out += lines[-tail:]
    return "\n".join(out) + "\n"


def sanitizer_result(tool: str, log: str, driver: Optional[dict], phase: dict) -> dict:
    """Errors compute-sanitizer reported, from its summary line (or, if the run was cut short
    before the summary, from the reports in the log), and the driver's own failures."""
    result: Dict[str, object] = {"tool": tool, "phase_status": phase.get("status")}
    summary = re.findall(r"ERROR SUMMARY: (\d+) errors?", log)
    race = re.findall(
        r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, "
        r"(\d+) warnings?\)",
        log,
    )
    reports = len(
        re.findall(
            r"^=+ (?:Invalid |Error|Race reported|Barrier error|Program hit"
            r"|Uninitialized|Warning)",
            log,
            re.M,
        )
    )
    result["reports_in_log"] = reports
    if race:
        result["summary"] = (
            "RACECHECK SUMMARY: %s hazards displayed (%s errors, %s warnings)" % race[-1]
        )
        result["errors"] = int(race[-1][1])
        result["warnings"] = int(race[-1][2])
    if summary:
        result["summary"] = (
            result.get("summary", "") + " " if race else ""
        ) + f"ERROR SUMMARY: {summary[-1]} errors"
        result["errors"] = max(int(summary[-1]), int(result.get("errors", 0)))
    if driver is not None:
        result["driver"] = driver.get("summary") or {
            "cases": len(driver.get("cases", [])),
            "errors": sum(c.get("status") == "error" for c in driver.get("cases", [])),
        }
        result["driver_errors"] = [
            {"case": c["case"], "error": c.get("error", "")[:500]}
            for c in driver.get("cases", [])
            if c.get("status") == "error"
        ][:20]
    if phase.get("status") in NOT_RUN:
        result["status"] = phase["status"]
    elif result.get("errors", 0) or (not summary and not race and reports):
        result["status"] = "failed"
    elif result.get("driver_errors"):
        result["status"] = "failed"
    elif not summary and not race:
        result["status"] = "timeout" if phase.get("status") == "timeout" else "failed"
        result.setdefault("note", "no sanitizer summary in the log")
    elif phase.get("status") == "timeout":
        result["status"] = "timeout"
    elif phase.get("status") == "failed":
        result["status"] = "failed"
    else:
        result["status"] = "passed"
    return result


def tests_result(data: Optional[dict], phase: dict) -> dict:
    if phase.get("status") in NOT_RUN or data is None:
        out = {"status": phase.get("status") if phase.get("status") in NOT_RUN else "failed"}
        if data is None and out["status"] == "failed":
            out["note"] = "pytest wrote no result (see tests.log)"
        if data is not None:
            out.update(data)
        return out
    out = dict(data)
    if data.get("failed") or data.get("errors"):
        out["status"] = "failed"
    elif data.get("not_run") or phase.get("status") == "timeout":
        out["status"] = "incomplete"
    elif phase.get("status") == "failed" and data.get("exitstatus") not in (0, 5):
        out["status"] = "failed"
    else:
        out["status"] = "passed"
    return out


def build_resources(log: str) -> List[Dict[str, object]]:
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    try:
        import cuda_resources  # scripts/cuda_resources.py
    except ImportError:
        return []
    try:
        rows = cuda_resources.parse(log)
    except Exception:  # noqa: BLE001 - the table is a bonus; the build log has the data
        return []
    return [r._asdict() for r in sorted(rows, key=lambda r: (r.kernel, r.dtype, r.head_dim))]


# ---------------------------------------------------------------------------------------------
# report


PASSING = ("ok", "passed")


def overall(phases: List[dict], results: Dict[str, str], dry_run: bool) -> str:
    """A phase's result where the report refined it (e.g. tests stopped by the deadline exit
    non-zero but are incomplete, not failed), else its exit status."""
    statuses = [results.get(p["phase"], p["status"]) for p in phases] + list(results.values())
    if any(s == "failed" for s in statuses):
        return "failed"
    if dry_run:
        return "dry run passed"
    if any(s in ("timeout", "incomplete", "skipped") for s in statuses):
        return "incomplete"
    return "passed"


def markdown(report: Dict[str, object], bench_md: str) -> str:
    probe_info = report["probe"] or {}
    gpus = probe_info.get("gpus") or []
    gpu = gpus[0] if gpus else None
    lines = [
        "# torch_mha GPU check"
        + (" (DRY RUN: no GPU, nothing measured)" if report["dry_run"] else ""),
        "",
        f"**Result: {report['status']}** in {report['wall_s']} s of a {report['budget_s']} s "
        f"budget ({report['date']}).",
        "",
    ]
    if gpu:
        lines.append(
            f"GPU: {gpu['name']} (sm_{gpu['capability'].replace('.', '')}, "
            f"{gpu['multiprocessors']} SMs, {gpu['memory_gib']} GiB), driver "
            f"{probe_info.get('driver')}."
        )
    else:
        lines.append("GPU: none.")
    lines.append(
        f"Software: python {probe_info.get('python_version')}, torch {probe_info.get('torch')} "
        f"(CUDA {probe_info.get('torch_cuda')}), nvcc {probe_info.get('nvcc')}, "
        f"compute-sanitizer {probe_info.get('compute_sanitizer')}, ninja "
        f"{probe_info.get('ninja')}, {probe_info.get('cores')} cores; built for "
        f"TORCH_CUDA_ARCH_LIST={report['build'].get('arch_list')}."
    )
    missing = [k for k, v in (probe_info.get("packages") or {}).items() if v is None]
    if missing:
        lines.append(f"Not installed there: {', '.join(missing)}.")
    lines += [
        "",
        "## Phases",
        "",
        "| phase | status | seconds | limit (s) | detail |",
        "|---|---|---|---|---|",
    ]
    for p in report["phases"]:
        status = report["results"].get(p["phase"], p["status"])
        lines.append(
            f"| {p['phase']} | {status} | {p['seconds']} | {p['limit'] or '-'} | {p['detail']} |"
        )
    # tests
    lines += ["", "## CUDA tests", ""]
    for key, title in (
        ("default", "default routing"),
        ("own", "TORCH_MHA_CUDA_BACKEND=own, float16/bfloat16 cases"),
    ):
        t = report["tests"].get(key) or {}
        if "collected" in t:
            lines.append(
                f"* {title}: **{t['status']}**: {t.get('passed', 0)} passed, "
                f"{t.get('failed', 0)} failed, {t.get('errors', 0)} errors, "
                f"{t.get('skipped', 0)} skipped, {t.get('not_run', 0)} not run of "
                f"{t['collected']} ({t.get('seconds')} s)"
                + (f"; stopped: {t['stopped']}" if t.get("stopped") else "")
            )
        else:
            lines.append(
                f"* {title}: {t.get('status', 'not run')}"
                + (f" ({t['note']})" if t.get("note") else "")
            )
    failures = [
        (key, f)
        for key in ("default", "own")
        for f in (report["tests"].get(key) or {}).get("failures", [])
    ]
    if failures:
        lines += ["", f"Failures (first {min(len(failures), 30)}):", ""]
        for key, f in failures[:30]:
            last = [x for x in f["report"].splitlines() if x.strip()][-1:] or [""]
            lines.append(f"* [{key}] `{f['test']}` ({f['when']}): {last[0][:300]}")
    # sanitizer
    lines += [
        "",
        "## compute-sanitizer (benchmarks/gpu_sanitize.py, torch_mha's own kernels)",
        "",
        "| tool | status | errors | summary | cases (ok / skipped / errors) |",
        "|---|---|---|---|---|",
    ]
    for tool, r in report["sanitizer"].items():
        d = r.get("driver") or {}
        cases = (
            (
                f"{d.get('ok', '?')} / {d.get('skipped', '?')} / {d.get('errors', '?')} of "
                f"{d.get('cases', '?')}"
            )
            if d
            else "-"
        )
        lines.append(
            f"| {tool} | {r['status']} | {r.get('errors', '-')} | "
            f"{r.get('summary', r.get('note', '-'))} | {cases} |"
        )
    errors = [
        (tool, e) for tool, r in report["sanitizer"].items() for e in r.get("driver_errors", [])
    ]
    for tool, e in errors[:20]:
        lines.append(f"* [{tool}] {e['case']}: {e['error'].strip().splitlines()[-1][:300]}")
    # build resources
    resources = report["build"].get("resources") or []
    if resources:
        spills = [r for r in resources if r["spill_stores"] or r["spill_loads"]]
        lines += [
            "",
            "## Kernel resources (ptxas -v of this build)",
            "",
            f"{len(resources)} kernels, {len(spills)} with spills.",
            "",
            "| kernel | dtype | head dim | arch | registers | spills (B, st/ld) |",
            "|---|---|---|---|---|---|",
        ]
        for r in resources:
            lines.append(
                f"| {r['kernel']} | {r['dtype']} | {r['head_dim']} | {r['arch']} | "
                f"{r['registers']} | {r['spill_stores']}/{r['spill_loads']} |"
            )
    # benchmark
    lines += ["", "## Benchmark (benchmarks/gpu_check.py)", ""]
    lines.append(bench_md.strip() if bench_md.strip() else "Not run.")
    if report.get("commands"):
        lines += ["", "## Commands", "", "```"] + report["commands"] + ["```"]
    lines += ["", "Files: " + ", ".join(report["files"]) + "."]
    return "\n".join(lines) + "\n"


def make_report(args) -> int:
    work, out = args.work, args.out
    os.makedirs(out, exist_ok=True)
    phases = read_phases(work)
    by_name = {p["phase"]: p for p in phases}
    probe_info = _load_json(os.path.join(work, "probe.json"))
    results: Dict[str, str] = {}

    # tests
    tests: Dict[str, dict] = {}
    for key, phase in (("default", "tests"), ("own", "tests-own")):
        data = _load_json(os.path.join(work, f"tests_{key}.json"))
        ph = by_name.get(phase, {"status": "off"})
        if args.dry_run:
            if key == "default" and data is not None:
                data = dict(
                    data,
                    note="dry run: the plugin on tests/test_cuda.py, every CUDA "
                    "test skipped on the CPU",
                )
            tests[key] = dict(data or {}, status="dry-run")
        else:
            tests[key] = tests_result(data, ph)
            results[phase] = tests[key]["status"]

    # sanitizer
    sanitizer: Dict[str, dict] = {}
    for tool in ("memcheck", "racecheck", "synccheck"):
        ph = by_name.get(tool, {"status": "off"})
        sanitizer[tool] = sanitizer_result(
            tool,
            _read(os.path.join(work, f"sanitize_{tool}.log")),
            _load_json(os.path.join(work, f"sanitize_{tool}.json")),
            ph,
        )
        if not args.dry_run:
            results[tool] = sanitizer[tool]["status"]
    if args.dry_run:
        cpu = _load_json(os.path.join(work, "sanitize_cpu.json"))
        sanitizer["cpu (dry run)"] = {
            "tool": "none: the driver on the CPU",
            "status": by_name.get("cpu-sanitize", {}).get("status", "not run"),
            "driver": (cpu or {}).get("summary"),
            "driver_errors": [
                {"case": c["case"], "error": c.get("error", "")}
                for c in (cpu or {}).get("cases", [])
                if c["status"] == "error"
            ],
        }
        if sanitizer["cpu (dry run)"]["driver_errors"]:
            results["cpu-sanitize"] = "failed"

    # build
    build_log = _read(os.path.join(work, "build.log"))
    build = {"arch_list": args.arch, "resources": build_resources(build_log)}
    if build["resources"]:
        build["spilling_kernels"] = sum(
            1 for r in build["resources"] if r["spill_stores"] or r["spill_loads"]
        )

    bench = _load_json(os.path.join(work, "bench.json"))
    bench_md = _read(os.path.join(work, "bench.md"))
    if bench is not None and not args.dry_run:
        bad = [
            r
            for r in bench.get("rows", [])
            if r.get("status") == "error"
            or any("error" in e for e in r.get("results", {}).values())
        ]
        if bad:
            results["bench"] = "failed"
        elif not bench.get("complete") or any(
            r.get("status") == "skipped" for r in bench.get("rows", [])
        ):
            results["bench"] = "incomplete"
        else:
            results["bench"] = "passed"

    # logs: merged per phase, trimmed
    logs = {
        "build.log": ["build.log"],
        "tests.log": ["tests_default.log", "tests_own.log"],
        "sanitize.log": [f"sanitize_{t}.log" for t in ("memcheck", "racecheck", "synccheck")]
        + ["sanitize_cpu.log"],
        "bench.log": ["probe.log", "bench.log"],
    }
    files = ["gpu_check.md", "gpu_check.json"]
    for target, sources in logs.items():
        parts = []
        for source in sources:
            text = _read(os.path.join(work, source))
            if text:
                parts.append(f"######## {source}\n" + trim(text))
        if parts:
            with open(os.path.join(out, target), "w") as f:
                f.write("\n".join(parts))
            files.append(target)

    now = time.time()
    report: Dict[str, object] = {
        "schema": 1,
        "dry_run": args.dry_run,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now)),
        "budget_s": args.budget,
        "wall_s": round(now - args.started) if args.started else None,
        "probe": probe_info,
        "phases": phases,
        "results": results,
        "build": build,
        "tests": tests,
        "sanitizer": sanitizer,
        "benchmark": bench,
        "commands": [c for c in _read(os.path.join(work, "commands.txt")).splitlines() if c],
        "files": files,
    }
    report["status"] = overall(phases, results, args.dry_run)
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    with open(os.path.join(out, "gpu_check.md"), "w") as f:
        f.write(markdown(report, bench_md))
    print(f"gpu_check: {report['status']}; wrote {', '.join(files)} to {out}")
    if report["status"] == "failed":
        return 1
    if report["status"] == "incomplete":
        return 2
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("probe")
    pp.add_argument("--device", choices=("cuda", "none"), default="cuda")
    pp.add_argument("--json", required=True)
    pr = sub.add_parser("report")
    pr.add_argument("--work", required=True)
    pr.add_argument("--out", required=True)
    pr.add_argument("--budget", type=int, default=0)
    pr.add_argument("--started", type=float, default=0.0)
    pr.add_argument("--arch", default="")
    pr.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    return probe(args) if args.command == "probe" else make_report(args)


if __name__ == "__main__":
    sys.exit(main())
