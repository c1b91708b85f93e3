"""Checks torch_mha.MultiheadAttention against torch.nn.MultiheadAttention on one workload.

Prints the largest differences (outputs, attention weights, every gradient) in float64 and
float32, then median times of both modules measured in the same process, interleaved, and the
speed-up. The default workload is an encoder-sized self-attention layer:

    python benchmarks/compare_with_nn.py                      # embed 512, 8 heads, 4 x 512 tokens
    python benchmarks/compare_with_nn.py --length 1024 --batch 2 --threads 1
"""

import argparse
import platform
import time
from typing import Callable, Dict, List, Tuple

import torch
from torch import Tensor, nn

import torch_mha


def make_pair(args: argparse.Namespace, dtype: torch.dtype) -> Tuple[nn.Module, nn.Module]:
    reference = nn.MultiheadAttention(
        args.embed, args.heads, dropout=0.0, batch_first=True, dtype=dtype
    )
    ours = torch_mha.MultiheadAttention(
        args.embed, args.heads, dropout=0.0, batch_first=True, dtype=dtype
    )
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def causal_mask(length: int) -> Tensor:
    return torch.ones(length, length, dtype=torch.bool).triu(1)


def forward_backward(
    module: nn.Module, x: Tensor, need_weights: bool, causal: bool
) -> Tuple[List[Tensor], List[Tensor]]:
    x = x.detach().requires_grad_()
    mask = causal_mask(x.shape[1]) if causal else None
    out, weights = module(x, x, x, need_weights=need_weights, attn_mask=mask, is_causal=causal)
    loss = out.square().sum()
    if weights is not None:
        loss = loss + weights.square().sum()
    params = [p for p in module.parameters()]
    grads = torch.autograd.grad(loss, [x] + params)
    values = [out] + ([weights] if weights is not None else [])
    return values, list(grads)


def accuracy(args: argparse.Namespace) -> None:
    print("Accuracy: largest absolute difference from nn.MultiheadAttention (same weights)")
    print(
        f"{'dtype':>8} {'need_weights':>12} {'causal':>6} {'output':>10} {'weights':>10} "
        f"{'max grad':>10}"
    )
    for dtype in (torch.float64, torch.float32):
        reference, ours = make_pair(args, dtype)
        x = torch.randn(args.batch, args.length, args.embed, dtype=dtype)
        for need_weights in (True, False):
            for causal in (False, True):
                ref_values, ref_grads = forward_backward(reference, x, need_weights, causal)
                our_values, our_grads = forward_backward(ours, x, need_weights, causal)
                diffs = [(a - b).abs().max().item() for a, b in zip(ref_values, our_values)]
                grad_diff = max((a - b).abs().max().item() for a, b in zip(ref_grads, our_grads))
                weights = f"{diffs[1]:10.2e}" if need_weights else f"{'-':>10}"
                print(
                    f"{str(dtype).replace('torch.', ''):>8} {str(need_weights):>12} "
                    f"{str(causal):>6} {diffs[0]:10.2e} {weights} {grad_diff:10.2e}"
                )


def median_times(
    cases: Dict[str, Callable[[], None]], repeats: int, warmup: int
) -> Dict[str, float]:
    """Interleaved timing: every round runs each case once, so load changes hit all alike."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    samples: Dict[str, List[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: sorted(s)[len(s) // 2] for name, s in samples.items()}


def speed(args: argparse.Namespace) -> None:
    reference, ours = make_pair(args, torch.float32)
    x = torch.randn(args.batch, args.length, args.embed)
    print(
        f"\nSpeed: float32, batch {args.batch}, length {args.length}, embed {args.embed}, "
        f"{args.heads} heads, {torch.get_num_threads()} threads; median of {args.repeats}"
    )
    print(
        f"{'mode':>26} {'need_weights':>12} {'nn (ms)':>9} {'torch_mha (ms)':>15} {'speed-up':>9}"
    )
    for need_weights in (True, False):

        def inference(module: nn.Module) -> Callable[[], None]:
            def run() -> None:
                with torch.no_grad():
                    module(x, x, x, need_weights=need_weights)

            return run

        def training(module: nn.Module) -> Callable[[], None]:
            def run() -> None:
                out, weights = module(x_grad, x_grad, x_grad, need_weights=need_weights)
                loss = out.sum() if weights is None else out.sum() + weights.sum()
                loss.backward()

            return run

        x_grad = x.clone().requires_grad_()
        for mode, make in (
            ("inference (eval, no_grad)", inference),
            ("training (fwd + bwd)", training),
        ):
            reference.train(mode.startswith("training"))
            ours.train(mode.startswith("training"))
            times = median_times(
                {"nn": make(reference), "ours": make(ours)}, args.repeats, args.warmup
            )
            print(
                f"{mode:>26} {str(need_weights):>12} {times['nn'] * 1e3:9.2f} "
                f"{times['ours'] * 1e3:15.2f} {times['nn'] / times['ours']:8.2f}x"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--embed", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, torch_mha {torch_mha.__version__} "
        f"({torch.ops.torch_mha._build_info()}), {platform.processor() or platform.machine()}"
    )
    accuracy(args)
    speed(args)


if __name__ == "__main__":
    main()
