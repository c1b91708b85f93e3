"""Before/after timing of a CPU kernel change: the core op's forward and backward, one thread.

Build the commit before the change in a second tree (`git worktree add /tmp/base <commit>`,
then `python setup.py build_ext --inplace` there), and run this script under each build in
turn, a few times, alternating, so that both see the same load:

    for i in 1 2 3; do
      for tree in /tmp/base .; do PYTHONPATH=$tree python benchmarks/kernel_ab.py; done
    done

Each line names the build it ran (and the engine of its bfloat16 products, which
--reduced-products can force) and gives, per dtype and head dim, the least CPU time over
--rounds calls of the forward and of the backward (ms; N=1, H=1, L=S=--length, not causal).
CPU time and the minimum, because the machines are shared: another job's load inflates wall
time and single samples, not the fastest of eleven. Compare lines of the two builds from the
same alternation, not absolute times across machines.
"""

import argparse
import os
import sys
import time
from typing import Callable, List

import torch

import torch_mha

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from attention_bench.machine import banner, metadata  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def least_cpu_ms(fn: Callable[[], object], rounds: int) -> float:
    fn()
    times: List[float] = []
    for _ in range(rounds):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return 1e3 * min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--banner", action="store_true", help="print the machine line first")
    parser.add_argument(
        "--reduced-products",
        choices=("auto", "fma", "brgemm"),
        default="auto",
        help="TORCH_MHA_CPU_REDUCED_PRODUCTS for the run: the engine of bfloat16/float16 tiles",
    )
    args = parser.parse_args()
    os.environ["TORCH_MHA_CPU_REDUCED_PRODUCTS"] = args.reduced_products
    torch.set_num_threads(1)
    if args.banner:
        print(banner(metadata(argparse.Namespace(threads=[1])), [1]))
    cells = []
    for head_dim in (int(d) for d in args.head_dims.split(",")):
        for name in args.dtypes.split(","):
            torch.manual_seed(0)
            shape = (1, 1, args.length, head_dim)
            q, k, v = (torch.randn(shape, dtype=DTYPES[name]).requires_grad_() for _ in range(3))
            grad = torch.randn(shape, dtype=DTYPES[name])
            out = torch_mha.attention(q, k, v)[0]
            forward = least_cpu_ms(lambda: torch_mha.attention(q, k, v), args.rounds)
            backward = least_cpu_ms(
                lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True), args.rounds
            )
            cells.append(f"D={head_dim} {name} fwd {forward:.1f} bwd {backward:.1f}")
    build = os.path.dirname(os.path.dirname(os.path.abspath(torch_mha.__file__)))
    # Builds from before the engine choice existed have only the FMA tiles.
    explain_cpu = getattr(torch_mha, "explain_cpu", None)
    engine = explain_cpu(torch.bfloat16).engine if explain_cpu is not None else "fma"
    print(f"{build} (bfloat16 products {engine}): " + " | ".join(cells))


if __name__ == "__main__":
    main()
