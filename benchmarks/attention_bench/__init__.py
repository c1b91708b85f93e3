"""torch_mha's CPU attention benchmark suite, the package behind benchmarks/bench_attention.py.

`python benchmarks/bench_attention.py ...` is the entry point; it calls `cli.main`. Modules, in
the order a run uses them:

* `cli`       -- the command line (presets, list options) and `main`: run, print, write files.
* `workloads` -- what is timed: the workload groups (registry), their shapes, contenders, the
                 (anchor, torch_mha) pairs and the callables that build inputs and run a call.
* `machine`   -- what it runs on: CPU model and flags, torch build and ISA, torch_mha build, git.
* `runner`    -- one run: plan, torch.mm ceiling, timed cases, memory items, the result dict.
* `timing`    -- interleaved rounds, calls per sample, medians, thread control.
* `memory`    -- peak memory of one call (ATen profiler, RSS) in a worker process; memory scan.
* `targets`   -- the performance targets and their PASS/MISS rules.
* `report`    -- text and Markdown tables, the targets list, RESULTS.md, the JSON file.
* `plot`      -- the PNG: speed-up against length per phase, peak memory against length.
* `progress`  -- the progress bar on stderr and the work estimate behind its ETA.

Adding a workload
-----------------
A workload group is one `register(GroupSpec(...))` call at the end of `workloads.py`. The spec
names the group (its `--groups` value), its contenders (torch_mha and its anchors, with their
labels), the (anchor, ours, label) pairs a speed-up is reported for, a bench class that builds
the inputs once and returns `(setup, run)` callables per contender and mode (write `forward`
and hand it to `mode_callables`, which times forward / backward or inference), a planner that
returns the shapes to run per thread count and dtype, and its targets (`RatioTarget`: the
speed-up of a pair in a phase must reach a threshold). Everything downstream reads the registry:
`--groups`, the presets, planning, the skip rule, the memory measurement, the targets (they are
evaluated and printed with the others) and a generic table per phase in the report and in
RESULTS.md. Parameters beyond the common fields (a window, a number of key/value heads, a cache
length) go in `Workload.options`, which enters the case key and the JSON only when set.

The variants of the core op (issue 14) are three such registrations, fixed-shape groups
(`sweep=False`, like "small") timed as training steps (fwd, bwd, fwd+bwd), each with its targets
at the issue's shape (`RatioTarget.where`; other shapes report "not measured"):

* "window": torch_mha.attention(window_size=(256, 0)) at L=8192, B=1, H=8, D=64 vs the same
  call fully causal (>= 10x) and vs F.scaled_dot_product_attention given the window as a bool
  mask (>= 20x); at most 3 rounds (`max_repeats`: SDPA takes seconds there);
* "gqa": H=32 query heads on Hkv=8 K/V heads, L=2048, D=128, not causal (and causal as a
  second case) vs F.sdpa(enable_gqa=True), the anchor (on CPU it runs the flash kernel on the
  8 K/V heads), and vs F.sdpa on K/V repeat_interleave'd in the call: >= 1.2x each;
* "varlen": 8 causal sequences of 64, 128, 256, 512, 768, 1024, 1536 and 2048 tokens, H=8,
  D=64, torch_mha.varlen_attention on the packed batch vs torch_mha.attention on the batch
  padded to 2048 with a key_padding_mask (>= 2x), and F.sdpa on it with a bool mask (a
  reference).

Their shapes come from --window-length/--window, --gqa-length/--gqa-causal, --varlen-lengths
(defaults: the issue's). The preset `--variants` runs the three at float32 and bfloat16 on 2
threads; the measurement of record is

    python benchmarks/bench_attention.py --variants

(like `--groups window,gqa,varlen --dtypes float32,bfloat16 --threads 2`); a run without a
length-sweep group writes its JSON and RESULTS.md under benchmarks/out/variants/ unless --out or
--results say otherwise, never over benchmarks/RESULTS.md (the main run's). The plot stays
with the length sweeps.

"layer_autocast" (issue 16) is a length sweep in no preset: the layer training step of float32
torch_mha.MultiheadAttention and nn.MultiheadAttention(need_weights=False), same weights, the
forward under torch.autocast("cpu", dtype=torch.bfloat16), at bfloat16 only (its
`GroupSpec.dtypes`); the target is >= 1.0x, >= 1.3x on CPUs with AMX or AVX512-BF16. Issue 16's
measurement with it:

    python benchmarks/bench_attention.py --groups core,layer,layer_autocast \
        --dtypes float32,bfloat16 --head-dims 64,128 --lengths 1024,2048,4096 --threads 2 \
        --modes train --memory-scan linear --memory-lengths 4096,8192

The serving groups (issue 15) live in `serving.py`, inference at fixed shapes, 2 threads:

* "decode": one decode step, H=32 on Hkv=8, D=128, cache 1024, 4096 and 16384 keys, batch 1
  and 4: torch_mha.attention_with_kvcache vs the same in-place append followed by F.sdpa on
  K/V repeat_interleave'd to 32 heads (>= 2x), and F.sdpa(enable_gqa=True) as a reference;
* "generate": greedy generate() tokens/s of the demo Llama model of examples/llama_demo.py
  (shared with examples/generate_hf.py), attn_implementation "torch_mha" vs "sdpa" (>= 1.3x);
* "prefill": one forward of a left-padded batch (1024, 768, 512, 256 tokens) with its
  attention_mask through the same model, "torch_mha" vs "sdpa" (>= 1.2x).

`python benchmarks/bench_attention.py --serving` runs them (float32 and bfloat16) and writes
under benchmarks/out/serving/; --decode-lengths, --decode-batches, --hf-model,
--generate-prompt/-tokens/-batch and --prefill-lengths change the shapes (the tests pass tiny
ones; the targets hold at the defaults only).
"""

import os

BENCH_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # benchmarks/
REPO_ROOT = os.path.dirname(BENCH_DIR)
SCRIPT = os.path.join(BENCH_DIR, "bench_attention.py")  # the entry point; also the memory worker

MIB = float(1 << 20)
GIB = float(1 << 30)
