"""What the benchmark runs on: CPU model and flags, torch build and ISA, torch_mha build, git.

`metadata` collects it once per run (the JSON's "metadata"); `banner` is the first line printed,
`machine_line` (CPU model, the ISA flags it has and lacks, the kernels each side dispatches to)
heads the printed tables and RESULTS.md, and `metadata_lines` is RESULTS.md's "Machine and
software" section.
"""

import argparse
import os
import platform
import re
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional

import torch

import torch_mha

from . import GIB, REPO_ROOT

# The CPU flags recorded (those the kernels and oneDNN/MKL dispatch on).
INTERESTING_FLAGS = ["avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile"]


def metadata(args: argparse.Namespace) -> Dict[str, Any]:
    config = torch.__config__.show()

    def grab(pattern: str) -> Optional[str]:
        m = re.search(pattern, config)
        return m.group(1).strip() if m else None

    cpu_model, flags = None, []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu_model is None:
                    cpu_model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    mem_total = None
    try:
        mem_total = _meminfo("MemTotal")
    except (OSError, KeyError):
        pass
    git = {}
    try:
        git["commit"] = subprocess.run(
            ["git", "-C", REPO_ROOT, "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        git["dirty"] = bool(
            subprocess.run(
                ["git", "-C", REPO_ROOT, "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
        )
    except (OSError, subprocess.SubprocessError):
        pass
    ops = torch.ops.torch_mha
    return {
        "command": "python " + shlex.join(sys.argv),
        "cwd": os.getcwd(),
        "python_executable": sys.executable,
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_version": torch.__version__,
        "torch_config": {
            "blas": grab(r"BLAS_INFO=([^,]+)"),
            "cpu_capability": grab(r"CPU capability usage: (.+)"),
            "mkl": grab(r"(Intel\(R\) oneAPI Math Kernel Library[^\n]*)"),
            "onednn": grab(r"(Intel\(R\) MKL-DNN[^\n]*)"),
            "openmp": grab(r"(OpenMP [^\n]*)"),
            "parallel_backend": _grab(
                r"ATen parallel backend: ([^\n]*)", torch.__config__.parallel_info()
            ),
        },
        "torch_config_show": config,
        "torch_parallel_info": torch.__config__.parallel_info(),
        "torch_mha": {
            "version": torch_mha.__version__,
            "build_info": str(ops._build_info()),
            "cpu_capability": str(ops._cpu_capability()),
            "library": torch_mha.library_path,
        },
        "git": git,
        "cpu_model": cpu_model,
        "cpu_flags": [f for f in INTERESTING_FLAGS if f in flags],
        # Recorded flags the CPU lacks (empty when /proc/cpuinfo could not be read).
        "cpu_flags_absent": [f for f in INTERESTING_FLAGS if flags and f not in flags],
        "cpu_count": os.cpu_count(),
        "memory_total_gib": round(mem_total / GIB, 1) if mem_total else None,
        "default_threads": torch.get_num_threads(),
        "threads_benchmarked": args.threads,
        "loadavg_start": list(os.getloadavg()),
    }


def _grab(pattern: str, text: str) -> Optional[str]:
    m = re.search(pattern, text)
    return m.group(1).strip() if m else None


def _meminfo(field: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def cpu_flags_text(meta: Dict[str, Any]) -> str:
    """The recorded ISA flags the CPU has, then those it lacks: "avx2 fma; no avx512f ..."."""
    text = " ".join(meta["cpu_flags"]) or "none of " + " ".join(INTERESTING_FLAGS)
    absent = meta.get("cpu_flags_absent")
    if absent and meta["cpu_flags"]:
        text += "; no " + " ".join(absent)
    return text


def banner(meta: Dict[str, Any], threads: List[int]) -> str:
    """The first line printed: torch, torch_mha build and kernels, CPU model, flags, count."""
    return (
        f"torch {torch.__version__} | torch_mha {meta['torch_mha']['version']} "
        f"({meta['torch_mha']['build_info']}, kernels {meta['torch_mha']['cpu_capability']}) | "
        f"{meta['cpu_model']} (flags {cpu_flags_text(meta)}) | {meta['cpu_count']} CPUs | "
        f"threads {threads}"
    )


def machine_line(meta: Dict[str, Any]) -> str:
    """One line naming the machine every table of the run was measured on."""
    return (
        f"Machine: {meta['cpu_model']}, {meta['cpu_count']} CPUs, ISA flags "
        f"{cpu_flags_text(meta)}; torch CPU capability {meta['torch_config']['cpu_capability']}, "
        f"torch_mha kernels {meta['torch_mha']['cpu_capability']}; threads "
        f"{meta['threads_benchmarked']}"
    )


def metadata_lines(meta: Dict[str, Any]) -> List[str]:
    tc = meta["torch_config"]
    return [
        f"date (UTC): {meta['date_utc']}",
        f"command: `{meta['command']}`",
        f"torch: {meta['torch_version']}; BLAS {tc['blas']}; "
        f"CPU capability {tc['cpu_capability']}; "
        f"{tc['mkl']}; {tc['onednn']}; {tc['openmp']}; parallel backend {tc['parallel_backend']}",
        f"torch_mha: {meta['torch_mha']['version']}; build {meta['torch_mha']['build_info']}; "
        f"kernels {meta['torch_mha']['cpu_capability']}",
        f"git: {meta['git'].get('commit', '?')}"
        + (" (with local changes)" if meta["git"].get("dirty") else ""),
        f"CPU: {meta['cpu_model']}; {meta['cpu_count']} CPUs; flags {cpu_flags_text(meta)}; "
        f"memory {meta['memory_total_gib']} GiB",
        f"threads benchmarked: {meta['threads_benchmarked']} (torch default "
        f"{meta['default_threads']}); load average at start {_fmt_load(meta['loadavg_start'])}, "
        f"at end {_fmt_load(meta.get('loadavg_end'))}",
        f"python {meta['python']} on {meta['platform']}",
    ]


def _fmt_load(load: Optional[List[float]]) -> str:
    return " ".join(f"{x:.2f}" for x in load) if load else "-"
