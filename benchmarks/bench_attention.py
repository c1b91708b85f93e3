"""Benchmark suite for torch_mha's CPU attention kernels (issue #5).

Times torch_mha against its anchors in one process, interleaved, and reports speed-ups, GFLOP/s,
peak memory and the issue's targets:

* the full layer: torch_mha.MultiheadAttention vs nn.MultiheadAttention, both with
  need_weights=True (nn's default: explicit L x S matrices) and with need_weights=False (nn calls
  F.scaled_dot_product_attention, PyTorch's CPU flash kernel); same weights, batch_first=True;
* the core: torch_mha.attention vs F.scaled_dot_product_attention on the same (N, H, L, D) tensors;
* a small inference call (L=32, B=8, E=256, 8 heads) against nn's native fast path;
* on request (--groups layer_autocast, issue 16): the layer training step of float32 modules
  under torch.autocast bfloat16, torch_mha vs nn.MultiheadAttention(need_weights=False);
* the variants of issue 14 at fixed shapes: a sliding window (vs full causal and vs SDPA with
  the same mask), grouped-query heads (vs SDPA with enable_gqa=True and with K/V repeated) and
  a packed varlen batch (vs the same batch padded with a key padding mask);
* a large torch.mm as the machine's ceiling.

    python benchmarks/bench_attention.py --quick    # about a minute or two: a subset
    python benchmarks/bench_attention.py --full     # the length sweeps (hours on 2 cores)
    python benchmarks/bench_attention.py --variants # window, gqa, varlen (about 20-30 min)
    python benchmarks/bench_attention.py --lengths 1024,2048 --dtypes bfloat16 --threads 2

Outputs: a table on stdout, a JSON file with every sample and the metadata (--out), a PNG plot
(--plot) and a Markdown report (--results). See the "Method" section of the report
(attention_bench/report.py, METHOD).

This script is the entry point only; the suite is the package next to it,
benchmarks/attention_bench/ (its docstring lists the modules and how to add a workload).
"""

from attention_bench.cli import main  # benchmarks/ is on sys.path: it holds this script

if __name__ == "__main__":
    main()
