"""Runs scripts/sanitize.sh: libtorch_mha and the LibTorch test programs (tests/cpp) built with
AddressSanitizer + UndefinedBehaviorSanitizer, then run; any failed check or sanitizer report
fails. See the script's header for what runs and which sanitizer options are used, and why.

The build goes to build/sanitize and is reused: the first run compiles the library (three
kernel builds) with the sanitizers, a few minutes on 2 cores; later runs take about 40 s.
Skipped only when cmake, a C++ compiler or gcc's sanitizer runtimes are missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "sanitize.sh"
TIMEOUT_S = 3600  # a cold build on a slow machine; a warm run takes under a minute
REPORT_MARKERS = (
    "ERROR: AddressSanitizer",
    "ERROR: LeakSanitizer",
    "runtime error:",
    "SUMMARY: AddressSanitizer",
    "SUMMARY: UndefinedBehaviorSanitizer",
)


def missing_requirement() -> Optional[str]:
    """Why the sanitizer build cannot run here, or None."""
    if shutil.which("cmake") is None:
        return "cmake is not installed"
    compiler = shutil.which("c++")
    if compiler is None:
        return "no C++ compiler (c++) on PATH"
    for runtime in ("libasan.so", "libubsan.so"):
        found = subprocess.run(
            [compiler, f"-print-file-name={runtime}"], capture_output=True, text=True
        ).stdout.strip()
        if not os.path.isabs(found) or not os.path.exists(found):
            return f"the sanitizer runtime {runtime} is not installed for {compiler}"
    return None


def sanitizer_reports(output: str) -> List[str]:
    return [line for line in output.splitlines() if any(m in line for m in REPORT_MARKERS)]


def test_sanitizers_report_nothing() -> None:
    reason = missing_requirement()
    if reason is not None:
        pytest.skip(reason)
    env = dict(os.environ, PYTHON=sys.executable)
    result = subprocess.run(
        ["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=TIMEOUT_S
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, (
        f"scripts/sanitize.sh exited with {result.returncode}:\n" + (output[-8000:])
    )
    assert sanitizer_reports(output) == []
    # The sanitizers are live: the self-check's faulty programs were stopped...
    for faulty in ("heap_overflow", "signed_overflow"):
        assert f"{faulty}: stopped with exit" in output, output[-4000:]
    # ...and every program ran to the end with all its checks passing.
    assert output.count("0 failure(s)") >= 2, output[-4000:]
    assert "test_api and test_jit_load: 0 failure(s)" in output, output[-4000:]
    assert "== sanitizer reports: 0" in output, output[-4000:]
