"""Calls every torch_mha CUDA kernel on small shapes, for compute-sanitizer (issue 13).

    compute-sanitizer --tool memcheck --kernel-name kns=torch_mha --error-exitcode 99 \\
        python benchmarks/gpu_sanitize.py
    python benchmarks/gpu_sanitize.py --device cpu     # the same calls on the CPU (CI dry run)
    python benchmarks/gpu_sanitize.py --list           # the cases

benchmarks/gpu_check.sh runs it under memcheck, racecheck and synccheck. Every kernel of
csrc/cuda/attention_kernels.cuh runs, for every instantiation: attention_forward_kernel and
attention_weights_kernel (per head and averaged), softmax_delta_kernel, weights_delta_kernel (a
backward through the returned weights), attention_backward_dkdv_kernel and
attention_backward_dq_kernel, for float32, float16, bfloat16 and float64 at head dims 32, 64 and
128 (the kernels' kDim); then every feature on its own: masks (bool, float, a float mask that
requires grad), key padding, causal, dropout, grouped-query heads, sliding windows, ALiBi,
softcap, sinks, packed varlen batches, odd sizes (lengths off the 32-row tiles, value_dim !=
head_dim, L = 1), fully masked rows and the MultiheadAttention layer.

TORCH_MHA_CUDA_BACKEND=own is set (unless --route auto), so the calls run torch_mha's own
kernels, not PyTorch's fused ones; every case checks that with torch_mha.explain.
PYTORCH_NO_CUDA_MEMORY_CACHING=1 is set before torch starts, so every tensor is its own
allocation and memcheck sees an access past its end (with the caching allocator it would land
in the same pooled block and go unnoticed).

Each case runs, synchronizes and checks its results are finite; a failure is printed and
recorded and the next case runs. Exit status: 0 if every case passed, 1 otherwise. --json
writes the per-case results (rewritten after every case, so a run cut short keeps its results).
"""

import argparse
import json
import os
import re
import sys
import time
import traceback
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

# Before torch initialises CUDA: every tensor its own cudaMalloc (see the docstring).
os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")

import torch  # noqa: E402

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
HEAD_DIMS = (32, 64, 128)  # the kDim instantiations (dispatch_head_dim in attention_launch.h)


class Case(NamedTuple):
    name: str
    run: Callable[[str], List[torch.Tensor]]  # device -> tensors to check (outputs, grads)
    explain: Optional[Callable[[str], object]] = None  # device -> torch_mha.explain(...)


def _randn(*shape, dtype=torch.float32, device="cpu", requires_grad=False, scale=1.0):
    # Drawn on the CPU from a fixed generator, so the CPU and GPU runs see the same values.
    gen = torch.Generator().manual_seed(hash(shape) % (2**31))
    t = (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)
    return t.requires_grad_(requires_grad)


def _qkv(n, h, hkv, lq, sk, e, ev, dtype, device, requires_grad=True):
    return (
        _randn(n, h, lq, e, dtype=dtype, device=device, requires_grad=requires_grad),
        _randn(n, hkv, sk, e, dtype=dtype, device=device, requires_grad=requires_grad),
        _randn(n, hkv, sk, ev, dtype=dtype, device=device, requires_grad=requires_grad),
    )


def _backward(outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]):
    """Gradients of sum(out * fixed random) for every output, w.r.t. the inputs that need it."""
    loss = sum(
        (o.float() * _randn(*o.shape, device=o.device)).sum() for o in outputs if o is not None
    )
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    return list(torch.autograd.grad(loss, wanted, allow_unused=True))


def attention_case(
    name: str,
    dtype: torch.dtype,
    shape=(2, 2, 2, 40, 70, 64, 64),
    backward: bool = True,
    mask: Optional[str] = None,
    padding: bool = False,
    **kw,
) -> Case:
    """torch_mha.attention forward (+ backward) on (N, H, Hkv, L, S, E, Ev)."""
    n, h, hkv, lq, sk, e, ev = shape

    def inputs(device):
        q, k, v = _qkv(n, h, hkv, lq, sk, e, ev, dtype, device, requires_grad=backward)
        extra = dict(kw)
        if mask == "bool":
            # A pattern that leaves every row some keys, plus row 0 fully masked.
            m = torch.arange(lq)[:, None] % 3 == torch.arange(sk)[None, :] % 3
            m[0, :] = True
            extra["attn_mask"] = m.to(device)
        elif mask in ("float", "float_grad"):
            extra["attn_mask"] = _randn(
                n, h, lq, sk, dtype=dtype, device=device, requires_grad=mask == "float_grad"
            )
        if padding:
            kpm = torch.zeros(n, sk, dtype=torch.bool)
            kpm[:, sk // 2 :] = True
            extra["key_padding_mask"] = kpm.to(device)
        if "alibi_slopes" in extra:
            extra["alibi_slopes"] = _randn(h, device=device).abs()
        if "sinks" in extra:
            extra["sinks"] = _randn(h, dtype=dtype, device=device, requires_grad=backward)
        return q, k, v, extra

    def run(device):
        import torch_mha

        q, k, v, extra = inputs(device)
        out, weights = torch_mha.attention(q, k, v, **extra)
        checked = [out] + ([weights] if weights is not None else [])
        if backward:
            grads = _backward(
                checked if extra.get("need_weights") else [out],
                [q, k, v, extra.get("attn_mask"), extra.get("sinks")],
            )
            checked += [g for g in grads if g is not None]
        return checked

    def explain(device):
        import torch_mha

        q, k, v, extra = inputs(device)
        allowed = (
            "attn_mask",
            "key_padding_mask",
            "is_causal",
            "dropout_p",
            "need_weights",
            "window_size",
            "alibi_slopes",
            "softcap",
            "sinks",
        )
        return torch_mha.explain(
            q, k, v, backward=backward, **{key: val for key, val in extra.items() if key in allowed}
        )

    return Case(name, run, explain)


def varlen_case(name: str, dtype: torch.dtype, e: int = 64, **kw) -> Case:
    lengths_q, lengths_k = [5, 40, 0, 33], [9, 40, 7, 65]

    def run(device):
        import torch_mha

        h, hkv = 4, 2
        tq, tk = sum(lengths_q), sum(lengths_k)
        q = _randn(tq, h, e, dtype=dtype, device=device, requires_grad=True)
        k = _randn(tk, hkv, e, dtype=dtype, device=device, requires_grad=True)
        v = _randn(tk, hkv, e, dtype=dtype, device=device, requires_grad=True)

        def cumulative(lengths):
            offsets = [0]
            for length in lengths:
                offsets.append(offsets[-1] + length)
            return torch.tensor(offsets, dtype=torch.int32, device=device)

        out = torch_mha.varlen_attention(
            q,
            k,
            v,
            cumulative(lengths_q),
            cumulative(lengths_k),
            max(lengths_q),
            max(lengths_k),
            **kw,
        )
        return [out] + _backward([out], [q, k, v])

    return Case(name, run)


def layer_case(name: str, dtype: torch.dtype, need_weights: bool) -> Case:
    def run(device):
        import torch_mha

        torch.manual_seed(0)
        layer = torch_mha.MultiheadAttention(64, 4, batch_first=True, device=device, dtype=dtype)
        x = _randn(2, 37, 64, dtype=dtype, device=device, requires_grad=True)
        kpm = torch.zeros(2, 37, dtype=torch.bool)
        kpm[1, 30:] = True
        out, weights = layer(x, x, x, key_padding_mask=kpm.to(device), need_weights=need_weights)
        checked = [out] + ([weights] if weights is not None else [])
        grads = _backward(checked, [x] + list(layer.parameters()))
        return checked + grads

    return Case(name, run)


def cases() -> List[Case]:
    out: List[Case] = []
    f32 = torch.float32
    # Every kernel x dtype x head dim: forward, per-head weights, backward through output and
    # weights (softmax_delta, weights_delta, dK/dV, dQ); then averaged weights (forward only).
    for dtype_name, dtype in DTYPES.items():
        for d in HEAD_DIMS:
            out.append(
                attention_case(
                    f"kernels/{dtype_name}/d{d}", dtype, (2, 2, 2, 40, 70, d, d), need_weights=True
                )
            )
        out.append(
            attention_case(
                f"averaged_weights/{dtype_name}",
                dtype,
                (2, 3, 3, 33, 65, 64, 64),
                backward=True,
                need_weights=True,
                average_weights=True,
            )
        )
    # Head dims between the instantiations, value_dim != head_dim, tiny and odd lengths.
    out += [
        attention_case("odd/e40_ev24", f32, (1, 2, 2, 45, 37, 40, 24)),
        attention_case("odd/e128_ev1", f32, (1, 2, 2, 33, 33, 128, 1)),
        attention_case("odd/L1_S1", f32, (3, 2, 2, 1, 1, 64, 64)),
        attention_case("odd/L1_S100", torch.float16, (1, 2, 2, 1, 100, 64, 64)),
        attention_case("odd/L100_S1", torch.bfloat16, (1, 2, 2, 100, 1, 64, 64)),
        attention_case("odd/no_keys", f32, (1, 2, 2, 8, 0, 32, 32)),
    ]
    # Features, each alone (float32 and one 16-bit type), then several together.
    for dtype_name in ("float32", "bfloat16"):
        dtype = DTYPES[dtype_name]
        out += [
            attention_case(f"bool_mask/{dtype_name}", dtype, mask="bool", need_weights=True),
            attention_case(f"float_mask/{dtype_name}", dtype, mask="float"),
            attention_case(f"float_mask_grad/{dtype_name}", dtype, mask="float_grad"),
            attention_case(f"key_padding/{dtype_name}", dtype, padding=True),
            attention_case(f"causal/{dtype_name}", dtype, is_causal=True),
            attention_case(
                f"causal_square/{dtype_name}", dtype, (2, 2, 2, 70, 70, 64, 64), is_causal=True
            ),
            attention_case(f"dropout/{dtype_name}", dtype, dropout_p=0.3),
            attention_case(
                f"dropout_weights/{dtype_name}", dtype, dropout_p=0.3, need_weights=True
            ),
            attention_case(f"gqa/{dtype_name}", dtype, (2, 6, 2, 40, 70, 64, 64)),
            attention_case(
                f"mqa_weights/{dtype_name}",
                dtype,
                (1, 4, 1, 40, 70, 32, 32),
                need_weights=True,
                average_weights=True,
            ),
            attention_case(f"window/{dtype_name}", dtype, window_size=(20, 5)),
            attention_case(f"window_left/{dtype_name}", dtype, window_size=(-1, 0)),
            attention_case(f"alibi/{dtype_name}", dtype, alibi_slopes=True),
            attention_case(f"softcap/{dtype_name}", dtype, softcap=5.0),
            attention_case(f"sinks/{dtype_name}", dtype, sinks=True),
            attention_case(
                f"together/{dtype_name}",
                dtype,
                (2, 4, 2, 50, 70, 64, 64),
                mask="bool",
                padding=True,
                window_size=(30, 10),
                alibi_slopes=True,
                softcap=3.0,
                sinks=True,
                dropout_p=0.2,
                need_weights=True,
            ),
            varlen_case(f"varlen/{dtype_name}", dtype),
            varlen_case(
                f"varlen_causal_window/{dtype_name}",
                dtype,
                e=32,
                is_causal=True,
                window_size=(8, 0),
                softcap=2.0,
            ),
            layer_case(f"layer/{dtype_name}", dtype, need_weights=False),
            layer_case(f"layer_weights/{dtype_name}", dtype, need_weights=True),
        ]
    out.append(attention_case("float_mask_grad/float64", torch.float64, mask="float_grad"))
    out.append(varlen_case("varlen/float16", torch.float16, e=128, alibi_slopes=None))
    return out


def run_cases(selected: List[Case], device: str, route: str, json_path: Optional[str]) -> int:
    results: List[Dict[str, object]] = []
    report = {"device": device, "route": route, "cases": results}

    def save():
        if json_path:
            with open(json_path, "w") as f:
                json.dump(report, f, indent=1)
                f.write("\n")

    failed = 0
    for case in selected:
        start = time.perf_counter()
        entry: Dict[str, object] = {"case": case.name}
        try:
            if case.explain is not None and route == "own":
                backend = case.explain(device).backend
                entry["backend"] = backend
                if backend != "torch_mha":
                    raise AssertionError(f"explain() chose {backend}, not torch_mha's kernels")
            tensors = case.run(device)
            if device == "cuda":
                torch.cuda.synchronize()
            bad = [i for i, t in enumerate(tensors) if not bool(torch.isfinite(t).all())]
            if bad:
                raise AssertionError(f"non-finite values in result(s) {bad}")
            entry["status"] = "ok"
        except RuntimeError as error:
            text = str(error)
            if "shared memory" in text and device == "cuda":
                # A GPU with less opt-in shared memory per block than this instantiation needs.
                entry["status"] = "skipped"
                entry["reason"] = text.splitlines()[0][:300]
            else:
                entry["status"] = "error"
                entry["error"] = "".join(traceback.format_exception_only(type(error), error))[:2000]
        except Exception as error:  # noqa: BLE001 - reported per case, the run goes on
            entry["status"] = "error"
            entry["error"] = "".join(traceback.format_exception_only(type(error), error))[:2000]
        entry["seconds"] = round(time.perf_counter() - start, 3)
        results.append(entry)
        if entry["status"] == "error":
            failed += 1
        print(
            f"gpu_sanitize: {entry['status']:<7} {case.name} ({entry['seconds']} s)"
            + (f": {entry.get('error') or entry.get('reason')}" if entry["status"] != "ok" else ""),
            flush=True,
        )
        save()
    report["summary"] = {
        "cases": len(results),
        "ok": sum(r["status"] == "ok" for r in results),
        "skipped": sum(r["status"] == "skipped" for r in results),
        "errors": failed,
    }
    save()
    print(f"gpu_sanitize: {report['summary']}")
    return 1 if failed else 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument(
        "--route",
        choices=("own", "auto"),
        default="own",
        help="own: TORCH_MHA_CUDA_BACKEND=own (default); auto: the default routing",
    )
    p.add_argument("--only", default=None, help="a regular expression on the case names")
    p.add_argument("--list", action="store_true", help="print the case names and exit")
    p.add_argument("--json", default=None, help="write the per-case results here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.route == "own":
        os.environ["TORCH_MHA_CUDA_BACKEND"] = "own"
    selected = [c for c in cases() if args.only is None or re.search(args.only, c.name)]
    if args.list:
        print("\n".join(c.name for c in selected))
        return 0
    if args.device == "cpu":
        torch.set_num_threads(1)  # tiny shapes: threads only cost time on a shared CI machine
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_sanitize: no CUDA GPU (use --device cpu for the CPU run)", file=sys.stderr)
        return 1
    import torch_mha

    if args.device == "cuda" and torch_mha.cuda_version() < 0:
        print("gpu_sanitize: torch_mha was built without its CUDA kernels", file=sys.stderr)
        return 1
    print(
        f"gpu_sanitize: {len(selected)} cases on {args.device}, route {args.route}, "
        f"TORCH_MHA_CUDA_BACKEND={os.environ.get('TORCH_MHA_CUDA_BACKEND', '')!r}",
        flush=True,
    )
    return run_cases(selected, args.device, args.route, args.json)


if __name__ == "__main__":
    sys.exit(main())
