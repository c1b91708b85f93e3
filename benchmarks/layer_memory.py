"""Peak memory of one layer training step (forward + backward) against nn.MultiheadAttention
with need_weights=False, the memory target of issue 16 (<= 1.0x at L = 8192).

    python benchmarks/layer_memory.py                 # L = 8192, E = 512, 8 heads, batch 1
    python benchmarks/layer_memory.py --length 4096

The peak is of ATen's CPU allocations during the step, above what was live before it
(attention_bench.memory.profile_call, as in the benchmark suite's memory items); one warm-up
step first, so parameter gradients already exist on both sides.
"""

import argparse
import os
import sys
from typing import Dict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from attention_bench.machine import banner, metadata  # noqa: E402
from attention_bench.memory import profile_call  # noqa: E402

import torch_mha  # noqa: E402

MIB = 2**20
TARGET = 1.0  # torch_mha's peak / nn's peak


def step_peak(module: torch.nn.Module, length: int, embed: int) -> Dict[str, float]:
    torch.manual_seed(0)
    x = torch.randn(1, length, embed, requires_grad=True)
    grad = torch.randn(1, length, embed)

    def step() -> None:
        out, _ = module(x, x, x, need_weights=False)
        out.backward(grad)

    step()
    result = profile_call(step)
    return {"aten_peak_mib": result["aten_peak_bytes"] / MIB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--embed", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(banner(metadata(argparse.Namespace(threads=[args.threads])), [args.threads]))

    peaks = {}
    for name, cls in (
        ("torch_mha", torch_mha.MultiheadAttention),
        ("nn", torch.nn.MultiheadAttention),
    ):
        torch.manual_seed(0)
        module = cls(args.embed, args.heads, batch_first=True)
        peaks[name] = step_peak(module, args.length, args.embed)["aten_peak_mib"]
    ratio = peaks["torch_mha"] / peaks["nn"]
    verdict = "PASS" if ratio <= TARGET else "MISS"
    print(
        f"layer training step, L={args.length}, E={args.embed}, H={args.heads}, batch 1, float32: "
        f"torch_mha {peaks['torch_mha']:.1f} MiB, nn(need_weights=False) {peaks['nn']:.1f} MiB, "
        f"ratio {ratio:.2f}x (target <= {TARGET:.1f}x): {verdict}"
    )


if __name__ == "__main__":
    main()
