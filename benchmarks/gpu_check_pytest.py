"""pytest plugin and parallel runner of benchmarks/gpu_check.sh: a time budget, shards, and a
compact JSON result.

As a plugin (benchmarks/ on PYTHONPATH):

    GPU_CHECK_DEADLINE=<Unix time> GPU_CHECK_RESULTS=<file.json> [GPU_CHECK_SHARD=i/n] \\
        python -m pytest -p gpu_check_pytest -m cuda tests

* Once GPU_CHECK_DEADLINE has passed, the session stops after the test that is running (pytest's
  own shouldstop), so the summary still comes and the tests not run are counted, not lost. A
  SIGINT (what gpu_check.sh's `timeout -s INT` sends) also ends in a written result.
* GPU_CHECK_SLOW_LAST=<regular expression>: the tests whose id matches run after the others
  (the runner below sets "gradcheck|opcheck": slow, and a time budget then cuts them first).
* GPU_CHECK_SHARD=i/n keeps every n-th selected test, starting at the i-th (after -m and -k and
  the reordering), so n processes share the tests evenly.
* GPU_CHECK_RESULTS gets counts (collected, passed, failed, errors, skipped, xfailed, xpassed,
  not run), why the run stopped early, the failures with a short report, and the slowest tests.
  It is rewritten after every failure, so even a killed run leaves what it found.

As a runner:

    python benchmarks/gpu_check_pytest.py --procs 4 --results FILE.json -- -m cuda tests

runs `python -m pytest -p gpu_check_pytest <args>` in --procs processes at once (shard i of n
each, OMP_NUM_THREADS = --threads, default cores / procs), on the same GPU: the CUDA tests spend
most of their time on the CPU (references, Python), which one process cannot spread over a
machine's cores. Prints every shard's output, merges their results into FILE.json; exit status 0
when every shard passed (or selected nothing), else 1.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from typing import Dict, List, Optional

_MAX_REPORT_CHARS = 3000
_MAX_FAILURES = 50
# Outcomes, and which wins when a test reports several (setup, call, teardown).
_RANK = {"passed": 0, "skipped": 1, "xfailed": 1, "xpassed": 2, "failed": 3, "errors": 3}


class _State:
    def __init__(self) -> None:
        self.start = time.time()
        self.deadline = float(os.environ.get("GPU_CHECK_DEADLINE", "0") or 0)
        self.path = os.environ.get("GPU_CHECK_RESULTS", "")
        self.collected = 0
        self.outcomes: Dict[str, str] = {}  # test id -> passed, failed, errors, skipped, ...
        self.failures: List[Dict[str, str]] = []
        self.durations: Dict[str, float] = {}
        self.stopped = ""
        self.exitstatus: Optional[int] = None
        self.sessions: List[object] = []

    def write(self) -> None:
        if not self.path:
            return
        counts = {name: 0 for name in _RANK}
        for outcome in self.outcomes.values():
            counts[outcome] += 1
        slowest = sorted(self.durations.items(), key=lambda kv: -kv[1])[:15]
        data = dict(
            collected=self.collected,
            **counts,
            not_run=max(0, self.collected - len(self.outcomes)),
            stopped=self.stopped,
            exitstatus=self.exitstatus,
            seconds=round(time.time() - self.start, 1),
            failures=self.failures,
            slowest=[{"test": k, "seconds": round(v, 2)} for k, v in slowest],
        )
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, self.path)


_state = _State()

# ---------------------------------------------------------------------------------------------
# Plugin hooks


def pytest_sessionstart(session):
    _state.sessions.append(session)


def _shard_items(config, items):
    slow = os.environ.get("GPU_CHECK_SLOW_LAST", "")
    if slow:  # these last, so that a time budget cuts them first (stable otherwise)
        pattern = re.compile(slow)
        items[:] = [i for i in items if not pattern.search(i.nodeid)] + [
            i for i in items if pattern.search(i.nodeid)
        ]
    shard = os.environ.get("GPU_CHECK_SHARD", "")
    if not shard:
        return
    index, count = (int(x) for x in shard.split("/"))
    keep = [item for k, item in enumerate(items) if k % count == index]
    drop = [item for k, item in enumerate(items) if k % count != index]
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep


try:  # the runner below runs without pytest's hook machinery; the plugin needs it
    import pytest

    @pytest.hookimpl(trylast=True)  # after -m / -k deselection
    def pytest_collection_modifyitems(session, config, items):
        _shard_items(config, items)

except ImportError:  # pragma: no cover
    pass


def pytest_collection_finish(session):
    _state.collected = len(session.items)
    _state.write()


def pytest_runtest_logreport(report):
    _state.durations[report.nodeid] = _state.durations.get(report.nodeid, 0.0) + report.duration
    outcome = None
    if hasattr(report, "wasxfail"):
        if report.when == "call":
            outcome = "xfailed" if report.skipped else "xpassed"
    elif report.failed:
        outcome = "failed" if report.when == "call" else "errors"
    elif report.skipped:
        outcome = "skipped"
    elif report.passed and report.when == "call":
        outcome = "passed"
    if outcome is None:
        return
    # One outcome per test, the worst of its phases (a failed teardown after a pass: an error).
    previous = _state.outcomes.get(report.nodeid)
    if previous is None or _RANK[outcome] > _RANK[previous]:
        _state.outcomes[report.nodeid] = outcome
    if outcome in ("failed", "errors") and len(_state.failures) < _MAX_FAILURES:
        text = str(report.longrepr)
        if len(text) > _MAX_REPORT_CHARS:
            text = "...\n" + text[-_MAX_REPORT_CHARS:]
        _state.failures.append({"test": report.nodeid, "when": report.when, "report": text})
        _state.write()


def pytest_runtest_logfinish(nodeid, location):
    if _state.deadline and time.time() > _state.deadline and not _state.stopped:
        _state.stopped = "time budget of gpu_check.sh reached"
        for session in _state.sessions:
            session.shouldstop = _state.stopped


def pytest_keyboard_interrupt(excinfo):
    if not _state.stopped:
        _state.stopped = "interrupted (SIGINT: the phase's time limit)"


def pytest_sessionfinish(session, exitstatus):
    _state.exitstatus = int(exitstatus)
    _state.write()


# ---------------------------------------------------------------------------------------------
# Runner


def merge(parts: List[Optional[dict]]) -> dict:
    """One result from the shards' results (a shard that wrote none counts as an error)."""
    merged: Dict[str, object] = {name: 0 for name in ["collected", "not_run", *_RANK]}
    failures: List[dict] = []
    slowest: List[dict] = []
    stopped = []
    statuses = []
    seconds = 0.0
    for index, part in enumerate(parts):
        if part is None:
            merged["errors"] += 1
            failures.append(
                {
                    "test": f"shard {index}",
                    "when": "run",
                    "report": "the shard wrote no result (see tests.log)",
                }
            )
            statuses.append(3)
            continue
        for key in ["collected", "not_run", *_RANK]:
            merged[key] += int(part.get(key) or 0)
        failures += part.get("failures", [])
        slowest += part.get("slowest", [])
        if part.get("stopped"):
            stopped.append(part["stopped"])
        statuses.append(part.get("exitstatus"))
        seconds = max(seconds, float(part.get("seconds") or 0))
    merged.update(
        shards=len(parts),
        stopped="; ".join(sorted(set(stopped))),
        exitstatus=max((s for s in statuses if s is not None), default=None),
        seconds=round(seconds, 1),
        failures=failures[:_MAX_FAILURES],
        slowest=sorted(slowest, key=lambda d: -d["seconds"])[:15],
    )
    return merged


def run(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Runs pytest in shards (see the module docstring).")
    p.add_argument("--procs", type=int, default=1)
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="OMP_NUM_THREADS of each process (default: cores / procs)",
    )
    p.add_argument("--results", required=True)
    p.add_argument("pytest_args", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    pytest_args = args.pytest_args
    if pytest_args[:1] == ["--"]:
        pytest_args = pytest_args[1:]
    procs = max(1, args.procs)
    threads = args.threads or max(1, (os.cpu_count() or procs) // procs)
    children = []
    for index in range(procs):
        env = dict(
            os.environ, GPU_CHECK_RESULTS=f"{args.results}.{index}", OMP_NUM_THREADS=str(threads)
        )
        env.setdefault("GPU_CHECK_SLOW_LAST", "gradcheck|opcheck")
        if procs > 1:
            env["GPU_CHECK_SHARD"] = f"{index}/{procs}"
        log = open(f"{args.results}.{index}.log", "w")
        command = [sys.executable, "-m", "pytest", "-p", "gpu_check_pytest", *pytest_args]
        children.append(
            (subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), log)
        )
    print(
        f"gpu_check_pytest: {procs} process(es) x {threads} thread(s): {' '.join(command)}",
        flush=True,
    )
    codes = []
    for child, log in children:
        while True:
            try:
                codes.append(child.wait())
                break
            except KeyboardInterrupt:
                # The phase's limit (timeout signals the whole process group) or a Ctrl-C: the
                # shards got the same SIGINT and are writing their results; wait for them.
                continue
        log.close()
    parts = []
    for index in range(procs):
        print(f"---- shard {index}/{procs}: exit {codes[index]}")
        with open(f"{args.results}.{index}.log", errors="replace") as f:
            sys.stdout.write(f.read())
        try:
            with open(f"{args.results}.{index}") as f:
                parts.append(json.load(f))
        except (OSError, ValueError):
            parts.append(None)
    merged = merge(parts)
    with open(args.results, "w") as f:
        json.dump(merged, f, indent=1)
        f.write("\n")
    print(
        f"gpu_check_pytest: {merged['passed']} passed, {merged['failed']} failed, "
        f"{merged['errors']} errors, {merged['skipped']} skipped, {merged['not_run']} not run "
        f"of {merged['collected']}" + (f" ({merged['stopped']})" if merged["stopped"] else "")
    )
    return 0 if all(code in (0, 5) for code in codes) else 1


if __name__ == "__main__":
    sys.exit(run())
