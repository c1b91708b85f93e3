"""GPU benchmark of torch_mha (issue 13): the core against F.scaled_dot_product_attention and the
layer against nn.MultiheadAttention, forward and forward + backward, on one CUDA GPU.

    python benchmarks/gpu_check.py                       # the full grid, a few minutes on an H100
    python benchmarks/gpu_check.py --budget 150          # stop starting configurations after 150 s
    python benchmarks/gpu_check.py --device cpu          # tiny shapes on the CPU (CI dry run)
    bash benchmarks/gpu_check.sh                         # build, test, sanitize, then this

Grid: float16, bfloat16 and float32; head dims 64 and 128; lengths 1024, 2048, 4096 and 8192 at
batch x length = 16384 tokens (batch 16, 8, 4, 2).
* Core, on (N, H, L, D) tensors with H x D = 2048: F.scaled_dot_product_attention (PyTorch picks
  flash, cuDNN or memory-efficient) against torch_mha.attention with its default routing (which
  hands float16/bfloat16 calls to PyTorch's fused kernels where they compute exactly the call)
  and, for float16/bfloat16, torch_mha.attention with TORCH_MHA_CUDA_BACKEND=own: torch_mha's own
  SIMT kernels (float32 always runs them).
* Layer: nn.MultiheadAttention against torch_mha.MultiheadAttention (same weights, batch_first,
  self-attention, embed 1024, heads = 1024 / head dim, need_weights=False, training mode); the
  own-kernel rows are measured on the core only (the layer adds the same projections to both).
Forward is timed under torch.no_grad(); forward + backward is a training step (autograd.grad of
the output w.r.t. q, k, v for the core; backward into the input and the parameters for the
layer). Each row names the kernels torch_mha used forward / backward (torch_mha.explain).

Method: CUDA events; after one timed call (which sizes the run) and one more warm-up call, each
sample times `inner` back-to-back calls (enough for about 1 ms, so launch gaps do not dominate
short calls), and the figure is the median of `iters` samples (about --target-ms of work per
figure, at least --min-iters samples). Contenders alternate within a configuration. x = the
reference's time / torch_mha's time (above 1: torch_mha is faster). TFLOP/s: forward 4 N H L S D
(attention only; the layer adds its four projections, 8 N L E^2), forward + backward 3.5x that
(projections 3x), causal halves the attention part.

Time budget: configurations run shortest length first (every dtype and head dim at 1024, then
2048, ...), so a budget cuts the longest lengths; --budget / --deadline stop starting a
configuration whose predicted time (from the same dtype and head dim at the previous length)
would pass the deadline, and the rows not run are listed as skipped. The JSON (--json) and the
Markdown table (--markdown) are rewritten after every configuration, so a run cut short keeps
what it measured.

Without a CUDA GPU (and without --device cpu) it exits with status 1 and one line on stderr; so
it does when torch_mha was built without its CUDA kernels.
"""

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
LOW_PRECISION = ("float16", "bfloat16")
# Defaults per device: the issue's grid on a GPU, tiny shapes that only exercise the code on a CPU.
DEFAULTS = {
    "cuda": dict(
        lengths=[1024, 2048, 4096, 8192],
        tokens=16384,
        hidden=2048,
        layer_embed=1024,
        target_ms=150.0,
        min_iters=3,
        max_iters=25,
        max_inner=50,
    ),
    "cpu": dict(
        lengths=[32, 64],
        tokens=128,
        hidden=128,
        layer_embed=128,
        target_ms=1.0,
        min_iters=1,
        max_iters=1,
        max_inner=1,
    ),
}


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
    p.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cpu: tiny shapes, wall-clock timing; checks the code, measures nothing",
    )
    p.add_argument("--quick", action="store_true", help="bfloat16 only, lengths 1024 and 4096")
    p.add_argument("--dtypes", type=names, default=None, help="default float16,bfloat16,float32")
    p.add_argument("--head-dims", type=ints, default=[64, 128])
    p.add_argument("--lengths", type=ints, default=None, help="default 1024,2048,4096,8192")
    p.add_argument("--tokens", type=int, default=None, help="batch x length (default 16384)")
    p.add_argument("--hidden", type=int, default=None, help="core heads x head dim (default 2048)")
    p.add_argument("--layer-embed", type=int, default=None, help="layer embed dim (default 1024)")
    p.add_argument("--causal", action="store_true", help="also causal rows (core)")
    p.add_argument("--no-core", action="store_true", help="skip the core benchmark")
    p.add_argument("--no-layer", action="store_true", help="skip the layer benchmark")
    p.add_argument(
        "--no-own",
        action="store_true",
        help="skip the TORCH_MHA_CUDA_BACKEND=own rows of float16/bfloat16",
    )
    p.add_argument(
        "--target-ms",
        type=float,
        default=None,
        help="work timed per figure (default 150 ms on a GPU)",
    )
    p.add_argument("--min-iters", type=int, default=None, help="samples per figure, at least")
    p.add_argument("--max-iters", type=int, default=None, help="samples per figure, at most")
    p.add_argument("--max-inner", type=int, default=None, help="calls per sample, at most")
    p.add_argument(
        "--budget",
        type=float,
        default=0.0,
        help="seconds from the start after which no configuration starts (0: none)",
    )
    p.add_argument(
        "--deadline",
        type=float,
        default=float(os.environ.get("GPU_CHECK_DEADLINE", "0") or 0),
        help="the same as a Unix time (default $GPU_CHECK_DEADLINE, which "
        "gpu_check.sh sets to its phase's end)",
    )
    p.add_argument("--json", default=os.path.join(HERE, "out", "gpu_check.json"))
    p.add_argument("--markdown", default=None, help="also write the tables here (Markdown)")
    args = p.parse_args(argv)
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.dtypes is None:
        args.dtypes = ["bfloat16"] if args.quick else list(DTYPES)
    if args.quick and args.device == "cuda":
        args.lengths = [1024, 4096]
    deadlines = [t for t in (args.deadline, time.time() + args.budget if args.budget else 0) if t]
    args.deadline = min(deadlines) if deadlines else 0.0
    return args


def load_torch_mha(device: str):
    """Imports torch_mha once the device is known to be usable; exits with one line otherwise."""
    if device == "cuda" and not torch.cuda.is_available():
        cuda = torch.version.cuda or "none: a CPU-only build"
        fail(
            f"no CUDA GPU: torch.cuda.is_available() is False (torch {torch.__version__}, "
            f"CUDA {cuda})"
        )
    import torch_mha

    if device == "cuda" and torch_mha.cuda_version() < 0:
        fail(
            "torch_mha was built without its CUDA kernels: run benchmarks/gpu_check.sh, or "
            "FORCE_CUDA=1 python setup.py build_ext --inplace"
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


def machine(device: str) -> Dict[str, object]:
    info: Dict[str, object] = {
        "device": device,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_mha": str(torch.ops.torch_mha._build_info()),
        "python": platform.python_version(),
        "host": platform.node(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            capability="%d.%d" % (props.major, props.minor),
            multiprocessors=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            driver=driver_version(),
        )
    else:
        info.update(gpu=None, cpu_threads=torch.get_num_threads())
    return info


# ---------------------------------------------------------------------------------------------
# Timing


class Timer:
    """Times `inner` back-to-back calls: CUDA events on a GPU, the wall clock on the CPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def seconds(self, fn: Callable[[], object], inner: int = 1) -> float:
        """Seconds per call, averaged over `inner` calls."""
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / inner
        begin = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - begin) / inner


def measure(fn: Callable[[], object], timer: Timer, args) -> Dict[str, float]:
    """Median time of fn in ms, with the sizes of the measurement (see the module docstring)."""
    timer.sync()
    first = timer.seconds(fn)  # also the first call's one-time costs; sizes the run
    second = timer.seconds(fn)  # warm-up
    per_call = max(min(first, second), 1e-6)
    inner = max(1, min(args.max_inner, int(1e-3 / per_call)))
    iters = int(args.target_ms * 1e-3 / (per_call * inner))
    iters = max(args.min_iters, min(args.max_iters, iters))
    samples = [timer.seconds(fn, inner) for _ in range(iters)]
    return {"ms": statistics.median(samples) * 1e3, "iters": iters, "inner": inner}


def peak_mib(fn: Callable[[], object], timer: Timer) -> Optional[float]:
    """Peak CUDA memory allocated while fn runs, above what was allocated before, in MiB."""
    if not timer.cuda:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - before) / 2**20, 1)


@contextlib.contextmanager
def backend_env(value: Optional[str]):
    """TORCH_MHA_CUDA_BACKEND=value for the duration (torch_mha reads it on every call)."""
    old = os.environ.get("TORCH_MHA_CUDA_BACKEND")
    if value is not None:
        os.environ["TORCH_MHA_CUDA_BACKEND"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TORCH_MHA_CUDA_BACKEND", None)
        else:
            os.environ["TORCH_MHA_CUDA_BACKEND"] = old


def short_error(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


# ---------------------------------------------------------------------------------------------
# Contenders: name -> (environment for TORCH_MHA_CUDA_BACKEND or None, is torch_mha)


def contenders(reference: str, dtype_name: str, args) -> Dict[str, Optional[str]]:
    out: Dict[str, Optional[str]] = {reference: None, "torch_mha": None}
    # The own-kernel rows are measured on the core only (the layer adds the same projections).
    if dtype_name in LOW_PRECISION and reference == "sdpa" and not args.no_own:
        out["torch_mha_own"] = "own"
    return out


def explain_backends(torch_mha, q, k, v, is_causal: bool, env: Optional[str]) -> str:
    with backend_env(env):
        fwd = torch_mha.explain(q, k, v, is_causal=is_causal).backend
        bwd = torch_mha.explain(q, k, v, is_causal=is_causal, backward=True).backend
    return fwd if fwd == bwd else f"{fwd}/{bwd}"


def run_contenders(calls, timer: Timer, args, flops: Dict[str, float]) -> Dict[str, dict]:
    """calls: name -> (env, forward fn, training-step fn). Returns name -> figures."""
    results: Dict[str, dict] = {}
    for name, (env, forward, step) in calls.items():
        entry: Dict[str, object] = {}
        try:
            with backend_env(env):
                for phase, fn in (("fwd", forward), ("fwdbwd", step)):
                    m = measure(fn, timer, args)
                    entry[f"{phase}_ms"] = round(m["ms"], 4)
                    entry[f"{phase}_tflops"] = round(flops[phase] / (m["ms"] * 1e-3) / 1e12, 2)
                    entry[f"{phase}_iters"] = f"{m['iters']}x{m['inner']}"
                entry["fwdbwd_peak_mib"] = peak_mib(step, timer)
        except Exception as error:  # noqa: BLE001 - e.g. out of memory: recorded, the run goes on
            entry["error"] = short_error(error)
            if timer.cuda:
                torch.cuda.empty_cache()
        results[name] = entry
    return results


def ratios(results: Dict[str, dict], reference: str) -> Dict[str, Dict[str, float]]:
    out: Dict[str, Dict[str, float]] = {}
    ref = results.get(reference, {})
    for name, entry in results.items():
        if name == reference:
            continue
        out[name] = {
            phase: round(ref[f"{phase}_ms"] / entry[f"{phase}_ms"], 3)
            for phase in ("fwd", "fwdbwd")
            if f"{phase}_ms" in ref and f"{phase}_ms" in entry
        }
    return out


# ---------------------------------------------------------------------------------------------
# Core: torch_mha.attention vs F.scaled_dot_product_attention


def bench_core(torch_mha, cfg: Dict[str, object], timer: Timer, args) -> Dict[str, object]:
    dtype, d, length, causal = DTYPES[cfg["dtype"]], cfg["head_dim"], cfg["length"], cfg["causal"]
    batch, heads = cfg["batch"], cfg["heads"]
    device = args.device
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (batch, heads, length, d)
    q, k, v = (
        torch.randn(shape, device=device, dtype=dtype, generator=gen).requires_grad_()
        for _ in range(3)
    )
    grad_out = torch.randn(shape, device=device, dtype=dtype, generator=gen)
    flops_fwd = 4.0 * batch * heads * length * length * d * (0.5 if causal else 1.0)
    flops = {"fwd": flops_fwd, "fwdbwd": 3.5 * flops_fwd}

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def ours(q, k, v):
        return torch_mha.attention(q, k, v, is_causal=causal)[0]

    fns = {"sdpa": sdpa, "torch_mha": ours, "torch_mha_own": ours}
    calls = {}
    for name, env in contenders("sdpa", cfg["dtype"], args).items():
        fn = fns[name]

        def forward(fn=fn):
            with torch.no_grad():
                return fn(q, k, v)

        def step(fn=fn):
            return torch.autograd.grad(fn(q, k, v), (q, k, v), grad_out)

        calls[name] = (env, forward, step)
    row: Dict[str, object] = {}
    row["backend"] = {
        name: explain_backends(torch_mha, q, k, v, causal, env)
        for name, (env, _, _) in calls.items()
        if name != "sdpa"
    }
    with torch.no_grad():
        reference = sdpa(q, k, v).float()
        diffs = {}
        for name, (env, forward, _) in calls.items():
            if name != "sdpa":
                with backend_env(env):
                    diffs[name] = float((forward().float() - reference).abs().max())
        del reference
    row["max_abs_diff"] = diffs
    row["results"] = run_contenders(calls, timer, args, flops)
    row["speedup"] = ratios(row["results"], "sdpa")
    return row


# ---------------------------------------------------------------------------------------------
# Layer: torch_mha.MultiheadAttention vs nn.MultiheadAttention


def bench_layer(torch_mha, cfg: Dict[str, object], timer: Timer, args) -> Dict[str, object]:
    dtype, length, batch = DTYPES[cfg["dtype"]], cfg["length"], cfg["batch"]
    embed, heads = cfg["embed"], cfg["heads"]
    device = args.device
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(embed, heads, batch_first=True, device=device, dtype=dtype)
    ours = torch_mha.MultiheadAttention(embed, heads, batch_first=True, device=device, dtype=dtype)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(batch, length, embed, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(batch, length, embed, device=device, dtype=dtype)
    proj = 2.0 * batch * length * embed * embed * 4
    attn = 4.0 * batch * length * length * embed
    flops = {"fwd": proj + attn, "fwdbwd": 3 * proj + 3.5 * attn}
    modules = {"nn": reference, "torch_mha": ours, "torch_mha_own": ours}
    calls = {}
    for name, env in contenders("nn", cfg["dtype"], args).items():
        module = modules[name]
        params = list(module.parameters())

        def forward(module=module):
            with torch.no_grad():
                return module(x, x, x, need_weights=False)[0]

        def step(module=module, params=params):
            out = module(x, x, x, need_weights=False)[0]
            return torch.autograd.grad(out, [x] + params, grad_out)

        calls[name] = (env, forward, step)
    # What the layer's attention call looks like: (N, H, L, D) per-head views of the projections.
    probe = torch.empty(batch, heads, length, embed // heads, device=device, dtype=dtype)
    row: Dict[str, object] = {
        "backend": {
            name: explain_backends(torch_mha, probe, probe, probe, False, env)
            for name, (env, _, _) in calls.items()
            if name != "nn"
        }
    }
    del probe
    with torch.no_grad():
        expected = calls["nn"][1]().float()
        diffs = {}
        for name, (env, forward, _) in calls.items():
            if name != "nn":
                with backend_env(env):
                    diffs[name] = float((forward().float() - expected).abs().max())
        del expected
    row["max_abs_diff"] = diffs
    row["results"] = run_contenders(calls, timer, args, flops)
    row["speedup"] = ratios(row["results"], "nn")
    return row


# ---------------------------------------------------------------------------------------------
# The grid, the budget, the report


def configurations(args) -> List[Dict[str, object]]:
    """Every configuration, shortest length first (a budget then cuts the longest)."""
    out: List[Dict[str, object]] = []
    for length in args.lengths:
        batch = max(1, args.tokens // length)
        if not args.no_core:
            for dtype_name in args.dtypes:
                for d in args.head_dims:
                    for causal in (False, True) if args.causal else (False,):
                        out.append(
                            dict(
                                bench="core",
                                dtype=dtype_name,
                                head_dim=d,
                                heads=max(1, args.hidden // d),
                                batch=batch,
                                length=length,
                                causal=causal,
                            )
                        )
        if not args.no_layer:
            for dtype_name in args.dtypes:
                for d in args.head_dims:
                    out.append(
                        dict(
                            bench="layer",
                            dtype=dtype_name,
                            head_dim=d,
                            heads=max(1, args.layer_embed // d),
                            embed=args.layer_embed,
                            batch=batch,
                            length=length,
                            causal=False,
                        )
                    )
    return out


def predicted_seconds(cfg, done: List[Dict[str, object]]) -> float:
    """Time of the same benchmark, dtype and head dim at the last length run, scaled by length
    (the token count is fixed, so the attention work grows with the length); 0 if none ran."""
    same = [
        r
        for r in done
        if r.get("status") == "ok"
        and all(r[key] == cfg[key] for key in ("bench", "dtype", "head_dim", "causal"))
    ]
    if not same:
        return 0.0
    last = same[-1]
    return float(last["seconds"]) * cfg["length"] / last["length"]


def fmt(value, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def markdown(report: Dict[str, object]) -> str:
    m = report["machine"]
    lines = []
    if m.get("gpu"):
        where = (
            f"{m['gpu']} (sm_{str(m['capability']).replace('.', '')}), driver {m['driver']}, "
            f"torch {m['torch']} (CUDA {m['torch_cuda']})"
        )
    else:
        where = (
            f"CPU (--device cpu: tiny shapes, wall-clock timing; these figures measure "
            f"nothing), torch {m['torch']}"
        )
    lines.append(
        f"Benchmark on {where}. Times in ms (median); x = reference time / torch_mha "
        f"time (above 1: torch_mha faster); `own` = TORCH_MHA_CUDA_BACKEND=own "
        f"(torch_mha's SIMT kernels); backend = what torch_mha ran (forward/backward)."
    )
    for bench, reference, title in (
        (
            "core",
            "sdpa",
            "Core: torch_mha.attention vs F.scaled_dot_product_attention, (N, H, L, D)",
        ),
        (
            "layer",
            "nn",
            "Layer: torch_mha.MultiheadAttention vs nn.MultiheadAttention "
            "(batch_first, need_weights=False)",
        ),
    ):
        rows = [r for r in report["rows"] if r["bench"] == bench]
        if not rows:
            continue
        ref = "SDPA" if reference == "sdpa" else "nn"
        has_own = any("torch_mha_own" in r.get("results", {}) for r in rows)
        columns = [
            "backend",
            f"{ref} fwd",
            "torch_mha fwd",
            "x",
            f"{ref} f+b",
            "torch_mha f+b",
            "x",
        ]
        columns += ["own fwd", "own f+b", "own x f+b"] if has_own else []
        columns += ["torch_mha TFLOP/s f / f+b"]
        lines += [
            "",
            f"### {title}",
            "",
            "| dtype | D | L | N x H | " + " | ".join(columns) + " |",
            "|---|---|---|---|" + "---|" * len(columns),
        ]
        key = {"float16": 0, "bfloat16": 1, "float32": 2}
        for r in sorted(
            rows, key=lambda r: (key.get(r["dtype"], 9), r["head_dim"], r["length"], r["causal"])
        ):
            head = (
                f"| {r['dtype']} | {r['head_dim']} | {r['length']}"
                f"{' causal' if r['causal'] else ''} | {r['batch']} x {r['heads']} |"
            )
            if r["status"] != "ok":
                lines.append(
                    f"{head} {r['status']}: {r.get('reason', '')} |" + " |" * (len(columns) - 1)
                )
                continue
            res, spd = r["results"], r["speedup"]
            ours, own, refr = res.get("torch_mha", {}), res.get("torch_mha_own", {}), res[reference]
            cells = [
                r["backend"].get("torch_mha", "?"),
                fmt(refr.get("fwd_ms")),
                fmt(ours.get("fwd_ms")),
                fmt(spd.get("torch_mha", {}).get("fwd"), ".2f"),
                fmt(refr.get("fwdbwd_ms")),
                fmt(ours.get("fwdbwd_ms")),
                fmt(spd.get("torch_mha", {}).get("fwdbwd"), ".2f"),
            ]
            if has_own:
                cells += [
                    fmt(own.get("fwd_ms")),
                    fmt(own.get("fwdbwd_ms")),
                    fmt(spd.get("torch_mha_own", {}).get("fwdbwd"), ".2f"),
                ]
            cells.append(
                f"{fmt(ours.get('fwd_tflops'), '.1f')} / {fmt(ours.get('fwdbwd_tflops'), '.1f')}"
            )
            errors = [f"{n}: {e['error']}" for n, e in res.items() if "error" in e]
            if errors:
                cells[0] += " (" + "; ".join(errors) + ")"
            lines.append(head + " " + " | ".join(cells) + " |")
    skipped = [r for r in report["rows"] if r["status"] == "skipped"]
    if skipped:
        lines += ["", f"{len(skipped)} configuration(s) skipped: {skipped[0].get('reason')}."]
    return "\n".join(lines) + "\n"


def write(report: Dict[str, object], args) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    tmp = args.json + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    os.replace(tmp, args.json)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(report))


def row_line(row: Dict[str, object]) -> str:
    head = (
        f"{row['bench']:<5} {row['dtype']:<8} D{row['head_dim']:<3} L{row['length']:<5} "
        f"N{row['batch']} H{row['heads']}"
    )
    if row["status"] != "ok":
        return f"{head}: {row['status']} ({row.get('reason', '')})"
    parts = []
    for name, entry in row["results"].items():
        if "error" in entry:
            parts.append(f"{name} error ({entry['error']})")
        else:
            parts.append(f"{name} {entry['fwd_ms']:.3g}/{entry['fwdbwd_ms']:.3g} ms")
    backend = ",".join(f"{k}={v}" for k, v in row["backend"].items())
    return f"{head}: " + "; ".join(parts) + f" [{backend}] ({row['seconds']} s)"


def main(argv: Optional[Sequence[str]] = None) -> int:
    started = time.time()
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)  # the figures mean nothing there; keep a shared CI machine free
    torch_mha = load_torch_mha(args.device)
    timer = Timer(args.device)
    report: Dict[str, object] = {
        "machine": machine(args.device),
        "args": {k: v for k, v in vars(args).items()},
        "method": "CUDA events; median of iters samples of inner back-to-back calls"
        if timer.cuda
        else "wall clock (CPU dry run; the figures measure nothing)",
        "rows": [],
        "complete": False,
    }
    info = report["machine"]
    print(
        f"gpu_check.py: {info.get('gpu') or 'CPU'}, torch {info['torch']}, "
        f"torch_mha {info['torch_mha']}",
        flush=True,
    )
    done: List[Dict[str, object]] = report["rows"]  # type: ignore[assignment]
    write(report, args)
    try:
        for cfg in configurations(args):
            row: Dict[str, object] = dict(cfg)
            now = time.time()
            if args.deadline and now + predicted_seconds(cfg, done) > args.deadline:
                row["status"] = "skipped"
                row["reason"] = "time budget"
            else:
                begin = time.time()
                try:
                    bench = bench_core if cfg["bench"] == "core" else bench_layer
                    row.update(bench(torch_mha, cfg, timer, args))
                    row["status"] = "ok"
                except Exception as error:  # noqa: BLE001 - recorded, the run goes on
                    row["status"] = "error"
                    row["reason"] = short_error(error)
                    if timer.cuda:
                        torch.cuda.empty_cache()
                row["seconds"] = round(time.time() - begin, 2)
            done.append(row)
            print(row_line(row), flush=True)
            write(report, args)
        report["complete"] = True
    except KeyboardInterrupt:
        print("gpu_check.py: interrupted; writing what was measured", file=sys.stderr)
    report["seconds"] = round(time.time() - started, 1)
    write(report, args)
    errors = [
        r
        for r in done
        if r["status"] == "error" or any("error" in e for e in r.get("results", {}).values())
    ]
    print(
        f"gpu_check.py: {len(done)} configurations, "
        f"{sum(r['status'] == 'ok' for r in done)} run, "
        f"{sum(r['status'] == 'skipped' for r in done)} skipped, {len(errors)} with errors; "
        f"wrote {os.path.relpath(args.json)} in {report['seconds']} s",
        flush=True,
    )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
