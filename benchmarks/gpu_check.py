"""GPU benchmark of torch_mha's CUDA kernels (issue #4): the fused core against
F.scaled_dot_product_attention and the layer against nn.MultiheadAttention, on one CUDA GPU.

    python benchmarks/gpu_check.py            # everything below (a few minutes on an A100/H100)
    python benchmarks/gpu_check.py --quick    # bfloat16, lengths 1024 and 4096, one layer size
    bash benchmarks/gpu_check.sh              # build with CUDA, run the CUDA tests, then this

Core: torch_mha.attention vs F.scaled_dot_product_attention (PyTorch picks its fastest backend:
flash, cuDNN or memory-efficient) on the same (N, H, L, D) tensors; forward, backward and
forward+backward; float16 and bfloat16; head dims 64 and 128 with H x D = 2048; lengths 512, 1024,
2048 and 4096 at N x L = 16384 tokens; causal off and on. FLOPs: forward 4 N H L S D, backward
2.5x the forward, halved with causal masking; TFLOP/s = FLOPs / median time.

Layer: torch_mha.MultiheadAttention vs nn.MultiheadAttention (same weights, batch_first, self
attention, embed 1024, 16 heads), one training step (forward + backward of the output),
need_weights False and True.

Method: CUDA events around each call after warm-up, median over the iterations; contenders
alternate within a configuration. The largest |torch_mha - reference| output difference is
printed as a sanity check (the tests check correctness). Prints two short tables and writes every
number with the machine's description as JSON (--out, default benchmarks/out/gpu_check.json).
Exits with status 1 and one line on stderr when there is no CUDA GPU or torch_mha was built
without its CUDA kernels.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def fail(message: str) -> None:
    print(f"gpu_check: {message}", file=sys.stderr)
    sys.exit(1)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    def ints(text: str) -> List[int]:
        return [int(x) for x in text.split(",") if x]

    def names(text: str) -> List[str]:
        out = [x for x in text.split(",") if x]
        unknown = [x for x in out if x not in DTYPES]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown dtype(s) {unknown} (use {list(DTYPES)})")
        return out

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a subset: bfloat16, L 1024 and 4096")
    p.add_argument("--dtypes", type=names, default=None, help="float16,bfloat16")
    p.add_argument("--head-dims", type=ints, default=[64, 128])
    p.add_argument("--lengths", type=ints, default=None, help="default 512,1024,2048,4096")
    p.add_argument("--tokens", type=int, default=16384, help="batch x length (default 16384)")
    p.add_argument("--hidden", type=int, default=2048, help="heads x head dim (default 2048)")
    p.add_argument("--layer-lengths", type=ints, default=None, help="default 512,1024,2048")
    p.add_argument("--layer-embed", type=int, default=1024)
    p.add_argument("--layer-heads", type=int, default=16)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--no-core", action="store_true", help="skip the core benchmark")
    p.add_argument("--no-layer", action="store_true", help="skip the layer benchmark")
    p.add_argument("--out", default=os.path.join(HERE, "out", "gpu_check.json"))
    args = p.parse_args(argv)
    if args.dtypes is None:
        args.dtypes = ["bfloat16"] if args.quick else ["float16", "bfloat16"]
    if args.lengths is None:
        args.lengths = [1024, 4096] if args.quick else [512, 1024, 2048, 4096]
    if args.layer_lengths is None:
        args.layer_lengths = [1024] if args.quick else [512, 1024, 2048]
    return args


def require_gpu():
    """Imports torch_mha once a CUDA GPU is known to be there; exits with one line otherwise."""
    if not torch.cuda.is_available():
        cuda = torch.version.cuda or "none: a CPU-only build"
        fail(
            f"no CUDA GPU: torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, CUDA {cuda})"
        )
    import torch_mha

    if torch_mha.cuda_version() < 0:
        fail(
            "torch_mha was built without its CUDA kernels: rebuild with "
            "FORCE_CUDA=1 pip install --no-build-isolation -e . (or run benchmarks/gpu_check.sh)"
        )
    return torch_mha


def driver_version() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else "unknown"
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown"


def machine(torch_mha) -> Dict[str, object]:
    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": props.name,
        "capability": "%d.%d" % (props.major, props.minor),
        "multiprocessors": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "driver": driver_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_mha": torch.ops.torch_mha._build_info(),
        "python": platform.python_version(),
        "host": platform.node(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------------------
# Timing


def time_ms(run: Callable[[], Optional[Callable[[], object]]], warmup: int, iters: int) -> float:
    """Median of `iters` timed calls (after `warmup` untimed ones), in ms, by CUDA events.

    `run()` is timed; if it returns a callable, that is a second phase and only IT is timed
    (run() then does untimed set-up, e.g. the forward before a timed backward)."""
    samples = []
    for index in range(warmup + iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        phase = run()
        if phase is not None:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            phase()
        end.record()
        end.synchronize()
        if index >= warmup:
            samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def peak_mib(fn: Callable[[], object]) -> float:
    """Peak CUDA memory allocated while fn runs, above what was allocated before, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


# ---------------------------------------------------------------------------------------------
# Core: torch_mha.attention vs F.scaled_dot_product_attention


def bench_core(args, torch_mha) -> List[Dict[str, object]]:
    contenders = {
        "sdpa": lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
        "torch_mha": lambda q, k, v, causal: torch_mha.attention(q, k, v, is_causal=causal)[0],
    }
    rows = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for d in args.head_dims:
            heads = max(1, args.hidden // d)
            for length in args.lengths:
                batch = max(1, args.tokens // length)
                for causal in (False, True):
                    row: Dict[str, object] = dict(
                        dtype=dtype_name,
                        head_dim=d,
                        heads=heads,
                        batch=batch,
                        length=length,
                        causal=causal,
                    )
                    try:
                        shape = (batch, heads, length, d)
                        row.update(_core_config(contenders, dtype, shape, causal, args))
                    except torch.cuda.OutOfMemoryError:
                        row["error"] = "out of memory"
                        torch.cuda.empty_cache()
                    except RuntimeError as error:  # e.g. a shared-memory limit of this GPU
                        row["error"] = str(error).splitlines()[0][:200]
                        torch.cuda.empty_cache()
                    rows.append(row)
                    print(_core_line(row), flush=True)
    return rows


def _core_config(contenders, dtype, shape, causal, args) -> Dict[str, object]:
    batch, heads, length, d = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(shape, device="cuda", dtype=dtype, generator=gen).requires_grad_()
        for _ in range(3)
    )
    grad_out = torch.randn(shape, device="cuda", dtype=dtype, generator=gen)
    flops_fwd = 4.0 * batch * heads * length * length * d * (0.5 if causal else 1.0)
    flops = {"fwd": flops_fwd, "bwd": 2.5 * flops_fwd, "fwdbwd": 3.5 * flops_fwd}
    with torch.no_grad():
        reference = contenders["sdpa"](q, k, v, causal)
        ours = contenders["torch_mha"](q, k, v, causal)
        max_diff = float((ours.float() - reference.float()).abs().max())
        del reference, ours
    result: Dict[str, object] = {"max_abs_diff": max_diff}
    for name, fn in contenders.items():

        def forward(fn=fn):
            fn(q, k, v, causal)

        def backward_after_forward(fn=fn):
            out = fn(q, k, v, causal)
            return lambda: torch.autograd.grad(out, (q, k, v), grad_out)

        def step(fn=fn):
            torch.autograd.grad(fn(q, k, v, causal), (q, k, v), grad_out)

        times = {
            "fwd": time_ms(forward, args.warmup, args.iters),
            "bwd": time_ms(backward_after_forward, args.warmup, args.iters),
            "fwdbwd": time_ms(step, args.warmup, args.iters),
        }
        for phase, ms in times.items():
            result[f"{name}_{phase}_ms"] = ms
            result[f"{name}_{phase}_tflops"] = flops[phase] / (ms * 1e-3) / 1e12
        result[f"{name}_peak_mib"] = peak_mib(step)
    for phase in ("fwd", "bwd", "fwdbwd"):
        result[f"speedup_{phase}"] = result[f"sdpa_{phase}_ms"] / result[f"torch_mha_{phase}_ms"]
    return result


CORE_HEADER = (
    f"{'dtype':<9} {'D':>4} {'L':>5} {'causal':<6} | "
    f"{'fwd ms sdpa/ours':>17} {'x':>5} | {'bwd ms sdpa/ours':>17} {'x':>5} | "
    f"{'f+b ms sdpa/ours':>17} {'x':>5} | {'TFLOP/s ours f/b':>16} | "
    f"{'TFLOP/s sdpa f/b':>16} | {'max|diff|':>9}"
)


def _core_line(row: Dict[str, object]) -> str:
    head = f"{row['dtype']:<9} {row['head_dim']:>4} {row['length']:>5} {str(row['causal']):<6} | "
    if "error" in row:
        return head + f"error: {row['error']}"
    parts = []
    for phase in ("fwd", "bwd", "fwdbwd"):
        pair = f"{row[f'sdpa_{phase}_ms']:.2f}/{row[f'torch_mha_{phase}_ms']:.2f}"
        parts.append(f"{pair:>17} {row[f'speedup_{phase}']:>4.2f}x")
    ours = f"{row['torch_mha_fwd_tflops']:.1f}/{row['torch_mha_bwd_tflops']:.1f}"
    sdpa = f"{row['sdpa_fwd_tflops']:.1f}/{row['sdpa_bwd_tflops']:.1f}"
    return head + " | ".join(parts) + f" | {ours:>16} | {sdpa:>16} | {row['max_abs_diff']:>9.2e}"


# ---------------------------------------------------------------------------------------------
# Layer: torch_mha.MultiheadAttention vs nn.MultiheadAttention, one training step


def bench_layer(args, torch_mha) -> List[Dict[str, object]]:
    rows = []
    embed, heads = args.layer_embed, args.layer_heads
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for length in args.layer_lengths:
            batch = max(1, args.tokens // length)
            for need_weights in (False, True):
                row: Dict[str, object] = dict(
                    dtype=dtype_name,
                    embed=embed,
                    heads=heads,
                    batch=batch,
                    length=length,
                    need_weights=need_weights,
                )
                try:
                    row.update(_layer_config(torch_mha, dtype, batch, length, need_weights, args))
                except torch.cuda.OutOfMemoryError:
                    row["error"] = "out of memory"
                    torch.cuda.empty_cache()
                except RuntimeError as error:
                    row["error"] = str(error).splitlines()[0][:200]
                    torch.cuda.empty_cache()
                rows.append(row)
                print(_layer_line(row), flush=True)
    return rows


def _layer_config(torch_mha, dtype, batch, length, need_weights, args) -> Dict[str, object]:
    embed, heads = args.layer_embed, args.layer_heads
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(embed, heads, batch_first=True, device="cuda", dtype=dtype)
    ours = torch_mha.MultiheadAttention(embed, heads, batch_first=True, device="cuda", dtype=dtype)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(batch, length, embed, device="cuda", dtype=dtype, requires_grad=True)
    grad_out = torch.randn(batch, length, embed, device="cuda", dtype=dtype)
    modules = {"nn": reference, "torch_mha": ours}
    with torch.no_grad():
        outs = {name: m(x, x, x, need_weights=need_weights)[0] for name, m in modules.items()}
        max_diff = float((outs["torch_mha"].float() - outs["nn"].float()).abs().max())
        del outs
    # FLOPs of a training step: 4 projections (E x E) and the attention, forward + backward.
    proj = 2.0 * batch * length * embed * embed * 4
    attn = 4.0 * batch * length * length * embed
    flops = 3 * proj + 3.5 * attn
    result: Dict[str, object] = {"max_abs_diff": max_diff}
    for name, module in modules.items():
        params = list(module.parameters())

        def step(module=module, params=params):
            for p in params:
                p.grad = None
            out, _ = module(x, x, x, need_weights=need_weights)
            out.backward(grad_out)

        ms = time_ms(step, args.warmup, args.iters)
        result[f"{name}_ms"] = ms
        result[f"{name}_tflops"] = flops / (ms * 1e-3) / 1e12
        result[f"{name}_peak_mib"] = peak_mib(step)
    result["speedup"] = result["nn_ms"] / result["torch_mha_ms"]
    return result


LAYER_HEADER = (
    f"{'dtype':<9} {'L':>5} {'N':>4} {'weights':<7} | {'nn ms':>8} {'ours ms':>8} {'x':>6} | "
    f"{'TFLOP/s nn/ours':>15} | {'peak MiB nn/ours':>17} | {'max|diff|':>9}"
)


def _layer_line(row: Dict[str, object]) -> str:
    head = (
        f"{row['dtype']:<9} {row['length']:>5} {row['batch']:>4} {str(row['need_weights']):<7} | "
    )
    if "error" in row:
        return head + f"error: {row['error']}"
    tflops = f"{row['nn_tflops']:.1f}/{row['torch_mha_tflops']:.1f}"
    peak = f"{row['nn_peak_mib']:.0f}/{row['torch_mha_peak_mib']:.0f}"
    return (
        head
        + f"{row['nn_ms']:>8.2f} {row['torch_mha_ms']:>8.2f} {row['speedup']:>5.2f}x | "
        + f"{tflops:>15} | {peak:>17} | {row['max_abs_diff']:>9.2e}"
    )


# ---------------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    torch_mha = require_gpu()
    info = machine(torch_mha)
    print(
        f"gpu_check: {info['gpu']} (sm_{info['capability'].replace('.', '')}, "
        f"{info['multiprocessors']} SMs, {info['memory_gib']} GiB), driver {info['driver']}, "
        f"torch {info['torch']} (CUDA {info['torch_cuda']}), torch_mha {info['torch_mha']}"
    )
    print(
        f"method: CUDA events, median of {args.iters} after {args.warmup} warm-up calls; "
        f"speed-up x = reference time / torch_mha time"
    )
    report: Dict[str, object] = {"machine": info, "args": vars(args), "core": [], "layer": []}
    if not args.no_core:
        print(
            f"\nCore: torch_mha.attention vs F.scaled_dot_product_attention, N x L = {args.tokens}"
            f" tokens, H x D = {args.hidden}; FLOPs fwd 4NHLSD, bwd 2.5x, causal halved"
        )
        print(CORE_HEADER)
        report["core"] = bench_core(args, torch_mha)
    if not args.no_layer:
        print(
            f"\nLayer: torch_mha.MultiheadAttention vs nn.MultiheadAttention, training step "
            f"(forward + backward), embed {args.layer_embed}, {args.layer_heads} heads, "
            f"batch_first, N x L = {args.tokens} tokens"
        )
        print(LAYER_HEADER)
        report["layer"] = bench_layer(args, torch_mha)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(f"\nwrote {os.path.relpath(args.out)}")
    errors = [row for row in report["core"] + report["layer"] if "error" in row]
    if errors:
        print(f"gpu_check: {len(errors)} configuration(s) failed (see the table)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
