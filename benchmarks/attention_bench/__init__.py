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

Core-op workloads planned next, each one registration with its own anchor, ratio and target:
sliding-window attention (window (256, 0) at L=8192 vs full causal and vs SDPA with an explicit
mask), grouped-query attention (H=32, Hkv=8 vs SDPA with enable_gqa), packed variable-length
batches vs a padded batch with a key padding mask, and one decode step with a KV cache vs SDPA.
They are fixed-shape groups (`sweep=False`, like "small"); the plot stays with the length sweeps.
"""

import os

BENCH_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # benchmarks/
REPO_ROOT = os.path.dirname(BENCH_DIR)
SCRIPT = os.path.join(BENCH_DIR, "bench_attention.py")  # the entry point; also the memory worker

MIB = float(1 << 20)
GIB = float(1 << 30)
