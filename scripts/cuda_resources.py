"""Per-kernel register, stack and spill use from a `nvcc -Xptxas=-v` build log, as a table.

python scripts/cuda_resources.py build/cuda-check/build.log [--fail-on-spills] [--markdown]
"""

import argparse
import re
import subprocess
import sys
from typing import List, NamedTuple


class KernelResources(NamedTuple):
    kernel: str
    dtype: str
    head_dim: str
    arch: str
    registers: int
    stack: int
    spill_stores: int
    spill_loads: int


def demangle(name: str) -> str:
    result = subprocess.run(["c++filt", name], capture_output=True, text=True)
    return result.stdout.strip() or name


def parse(log: str) -> List[KernelResources]:
    rows: List[KernelResources] = []
    current = None
    for line in log.splitlines():
        entry = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
        if entry:
            name = demangle(entry.group(1))
            match = re.search(r"cuda::(\w+)<(?:c10::)?(\w+), \w+(?:, (\d+))?>", name)
            kernel, dtype, dim = (
                (match.group(1), match.group(2), match.group(3) or "-")
                if match
                else (name, "", "-")
            )
            current = {"kernel": kernel, "dtype": dtype, "head_dim": dim, "arch": entry.group(2)}
            continue
        frame = re.search(
            r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line
        )
        if frame and current is not None:
            current.update(
                stack=int(frame.group(1)),
                spill_stores=int(frame.group(2)),
                spill_loads=int(frame.group(3)),
            )
            continue
        used = re.search(r"Used (\d+) registers", line)
        if used and current is not None and "stack" in current:
            rows.append(KernelResources(registers=int(used.group(1)), **current))
            current = None
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log")
    parser.add_argument("--fail-on-spills", action="store_true")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    rows = parse(open(args.log).read())
    if not rows:
        print("cuda_resources: no ptxas information in the log (was -Xptxas=-v passed?)")
        return 1
    rows.sort(key=lambda r: (r.arch, r.kernel, r.dtype, r.head_dim))
    if args.markdown:
        print("| kernel | dtype | head dim | arch | registers | stack (B) | spills (B, st/ld) |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r.kernel} | {r.dtype} | {r.head_dim} | {r.arch} | {r.registers} | {r.stack} "
                f"| {r.spill_stores}/{r.spill_loads} |"
            )
    else:
        header = ("kernel", "dtype", "dim", "arch", "regs", "stack", "spills")
        print("{:34} {:9} {:>4} {:6} {:>5} {:>6} {:>8}".format(*header))
        for r in rows:
            spills = f"{r.spill_stores}/{r.spill_loads}"
            print(
                f"{r.kernel:34} {r.dtype:9} {r.head_dim:>4} {r.arch:6} {r.registers:5d} "
                f"{r.stack:6d} {spills:>8}"
            )
    spilling = [r for r in rows if r.spill_stores or r.spill_loads]
    print(f"cuda_resources: {len(rows)} kernels, {len(spilling)} with spills")
    if spilling and args.fail_on_spills:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
