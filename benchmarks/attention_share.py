"""How much of the serving groups' model time is attention: the bound on what any attention
backend can gain in the generate() and prefill targets of issue 15.

    python benchmarks/attention_share.py                  # float32 and bfloat16, 5 rounds
    python benchmarks/attention_share.py --dtypes float32 --rounds 3

The workloads are the suite's (attention_bench.serving: the demo Llama model, generate() of 128
tokens after 512, and the padded prefill of 1024/768/512/256 tokens), built the same way. In
each round both backends run once, interleaved; transformers' attention entries "sdpa" and
"torch_mha" are wrapped meanwhile so that the time spent inside them is summed per call. Per
backend: the median total and attention time, and the attention share of the total. Then

    measured  = T(sdpa) / T(torch_mha)
    bound     = T(sdpa) / (T(sdpa) - A(sdpa))   the speed-up if torch_mha's attention took no
                                                 time and everything else stayed as sdpa's

A target above the bound cannot be met by the attention backend.
"""

import argparse
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from attention_bench import serving  # noqa: E402
from attention_bench.machine import banner, metadata  # noqa: E402

BACKENDS = {"torch_mha": "_ours", "sdpa": "_sdpa"}  # backend -> contender suffix
GROUPS = {
    "generate": (serving.GenerateBench, serving.plan_generate, "gen"),
    "prefill": (serving.PrefillBench, serving.plan_prefill, "pre"),
}


class AttentionClock:
    """Wraps the registered attention functions of `backends`, summing the seconds spent in
    them; `restore` puts the originals back."""

    def __init__(self, backends: List[str]) -> None:
        from transformers import AttentionInterface

        import torch_mha.hf  # noqa: F401  (registers "torch_mha")

        self.interface = AttentionInterface
        self.originals = {name: AttentionInterface._global_mapping[name] for name in backends}
        self.seconds = 0.0
        self.calls = 0
        for name, original in self.originals.items():
            AttentionInterface.register(name, self._timed(original))

    def _timed(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        return timed

    def restore(self) -> None:
        for name, original in self.originals.items():
            self.interface.register(name, original)


def measure(
    group: str, dtype: str, threads: int, rounds: int, options: argparse.Namespace
) -> Dict[str, Dict[str, float]]:
    """Median total and attention seconds per backend; `options` are the suite's workload
    options (hf_model, generate_prompt, generate_tokens, prefill_lengths; None: defaults)."""
    bench_cls, plan, prefix = GROUPS[group]
    workload = plan(options, threads, dtype)[0]
    bench = bench_cls(workload)
    calls = {b: bench.forward(prefix + suffix) for b, suffix in BACKENDS.items()}
    totals: Dict[str, List[float]] = {b: [] for b in BACKENDS}
    attention: Dict[str, List[float]] = {b: [] for b in BACKENDS}
    clock = AttentionClock(list(BACKENDS))
    try:
        with torch.no_grad():
            for fn in calls.values():
                fn()  # warm-up
            for _ in range(rounds):
                for backend, fn in calls.items():
                    clock.seconds = 0.0
                    start = time.perf_counter()
                    fn()
                    totals[backend].append(time.perf_counter() - start)
                    attention[backend].append(clock.seconds)
    finally:
        clock.restore()
    return {
        b: {"total": statistics.median(totals[b]), "attention": statistics.median(attention[b])}
        for b in BACKENDS
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--groups", default="generate,prefill")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hf-model", choices=("demo", "tiny"), default=None)
    parser.add_argument("--generate-prompt", type=int, default=None)
    parser.add_argument("--generate-tokens", type=int, default=None)
    parser.add_argument("--prefill-lengths", type=int, nargs="+", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(banner(metadata(argparse.Namespace(threads=[args.threads])), [args.threads]))
    print(
        f"{'group':<9} {'dtype':<9} {'backend':<10} {'total ms':>9} {'attn ms':>8} "
        f"{'attn share':>10}   {'measured':>8} {'bound':>6}"
    )
    for group in args.groups.split(","):
        for dtype in args.dtypes.split(","):
            m = measure(group, dtype, args.threads, args.rounds, args)
            sdpa, ours = m["sdpa"], m["torch_mha"]
            measured = sdpa["total"] / ours["total"]
            bound = sdpa["total"] / (sdpa["total"] - sdpa["attention"])
            for backend, r in m.items():
                tail = f"   {measured:7.2f}x {bound:5.2f}x" if backend == "sdpa" else ""
                print(
                    f"{group:<9} {dtype:<9} {backend:<10} {1e3 * r['total']:9.1f} "
                    f"{1e3 * r['attention']:8.1f} {r['attention'] / r['total']:9.1%}{tail}"
                )


if __name__ == "__main__":
    main()
