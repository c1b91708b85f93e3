"""Properties of the core ops that are CPU-only by nature (each test says why): results bitwise
identical across runs and OpenMP thread counts, and forward + backward memory linear in the
sequence length (measured on the ATen CPU allocator).

Inputs, references and tolerances: tests/attention_testing.py; the CUDA counterparts (bitwise
reproducible CUDA runs) are in tests/test_cuda.py.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import pytest
import torch
from attention_testing import (
    OPS,
    assert_close,
    expected_forward,
    forward,
    forward_tol,
    make_qkv,
)
from torch import Tensor


def _fwd_bwd(
    q: Tensor, k: Tensor, v: Tensor, go: Tensor, gw: Optional[Tensor], **kwargs
) -> List[Tensor]:
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    mask = kwargs.pop("attn_mask", None)
    inputs = list(leaves)
    if mask is not None and mask.is_floating_point():
        mask = mask.detach().clone().requires_grad_()
        inputs.append(mask)
    out, stats, w = forward(*leaves, attn_mask=mask, need_weights=gw is not None, **kwargs)
    loss = (out * go).sum() + ((w * gw).sum() if gw is not None else 0)
    grads = torch.autograd.grad(loss, inputs)
    return [out.detach(), stats, w.detach(), *grads]


DETERMINISM_CASES = {
    "small_batch": dict(shape=(2, 3, 130, 200, 16, 16)),
    "long_keys_chunked": dict(shape=(1, 1, 200, 640, 64, 64)),  # S = 5 key blocks: 5 dQ chunks
    "uneven_chunks": dict(shape=(1, 2, 65, 1200, 16, 16)),  # 10 key blocks in 8 dQ chunks
    "long_keys_chunked_masks_dropout": dict(
        shape=(1, 1, 129, 513, 17, 33), masks=True, is_causal=True, dropout_p=0.2, weights=True
    ),
    # Heads of a query block summed in a fixed order, whatever the thread count.
    "averaged_weights_masks_dropout": dict(
        shape=(2, 3, 129, 200, 16, 16), masks=True, dropout_p=0.2, weights=True, average=True
    ),
}


# CPU-only: the point is the OpenMP thread count (torch.set_num_threads), which the CUDA
# kernels do not depend on. tests/test_cuda.py checks that CUDA runs are bitwise reproducible.
@pytest.mark.parametrize("case", list(DETERMINISM_CASES))
def test_bitwise_deterministic_across_runs_and_threads(case: str) -> None:
    cfg = DETERMINISM_CASES[case]
    n, h, l, s, e, ev = cfg["shape"]
    q, k, v = make_qkv(n, h, l, s, e, ev, torch.float32)
    go = torch.randn(n, h, l, ev)
    gw = None
    if cfg.get("weights"):
        gw = torch.randn(n, l, s) if cfg.get("average") else torch.randn(n, h, l, s)
    kwargs = dict(is_causal=cfg.get("is_causal", False), average_weights=cfg.get("average", False))
    if cfg.get("masks"):
        kwargs["attn_mask"] = torch.randn(1, h, l, s)
        kwargs["key_padding_mask"] = torch.rand(n, s) < 0.2
    if cfg.get("dropout_p"):
        kwargs.update(dropout_p=cfg["dropout_p"], seed=31337)

    results = {}
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        results[threads] = _fwd_bwd(q, k, v, go, gw, **dict(kwargs))
    torch.set_num_threads(2)
    again = _fwd_bwd(q, k, v, go, gw, **dict(kwargs))
    for threads, result in results.items():
        for index, (a, b) in enumerate(zip(result, results[1])):
            assert torch.equal(a, b), f"threads={threads} differs from threads=1 (tensor {index})"
    for index, (a, b) in enumerate(zip(again, results[2])):
        assert torch.equal(a, b), f"second run differs (tensor {index})"
    # ...and the deterministic result is also the right one.
    mask = kwargs.get("attn_mask")
    if not cfg.get("dropout_p"):
        exp = expected_forward(q, k, v, mask, kwargs.get("key_padding_mask"), kwargs["is_causal"])
        assert_close(results[1][0], exp.output, forward_tol(torch.float32))


def _peak_aten_cpu_bytes(fn: Callable[[], None]) -> int:
    """Peak of ATen CPU allocations made while fn runs, above what was live before.

    With profile_memory=True every CPU allocation and free goes through c10's profiled CPU
    memory reporter, which records the running total of live allocations made under the
    profiler; the peak of that total is the peak allocation of fn.
    """
    from torch._C._profiler import _ExtraFields_Allocation
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if isinstance(event.extra_fields, _ExtraFields_Allocation):
            events.append(event)
    assert events, "the profiler recorded no allocation"
    events.sort(key=lambda ev: ev.start_time_ns)
    first = events[0].extra_fields
    baseline = first.total_allocated - first.alloc_size
    return max(ev.extra_fields.total_allocated for ev in events) - baseline


# CPU-only: the measurement is the ATen CPU allocator as seen by the CPU profiler
# (profile_memory=True). CUDA memory would need torch.cuda.max_memory_allocated and other bounds.
def test_memory_is_linear_in_length() -> None:
    n, h, e = 1, 4, 64
    mib = 1 << 20

    def inputs(length: int) -> Tuple[Tensor, Tensor, Tensor]:
        return tuple(torch.randn(n, h, length, e, requires_grad=True) for _ in range(3))

    def fused(q: Tensor, k: Tensor, v: Tensor, need_weights: bool) -> Callable[[], None]:
        def run() -> None:
            out, _, w = OPS.attention_forward(q, k, v, need_weights=need_weights)
            loss = out.sum() + (w.sum() if need_weights else 0)
            loss.backward()

        return run

    l = 4096
    q, k, v = inputs(l)
    score_matrix_bytes = n * h * l * l * 4  # 256 MiB of float32 scores for all heads
    one_head_bytes = l * l * 4  # 64 MiB

    # Positive control: materialising the scores is seen by the measurement.
    naive = _peak_aten_cpu_bytes(lambda: (q @ k.transpose(-1, -2)).softmax(-1))
    assert naive >= score_matrix_bytes

    peak = _peak_aten_cpu_bytes(fused(q, k, v, need_weights=False))
    # The O(L) tensors of fwd+bwd: output, softmax_stats, dO copy, dQ/dK/dV, delta, and the float32
    # dQ partial sums (4 chunks here) -- 9 tensors of N*H*L*E float32 = 36 MiB at L = 4096.
    linear_bytes = 9 * n * h * l * e * 4
    assert peak < one_head_bytes, peak
    assert peak <= linear_bytes * 1.1, peak

    # Linear growth: halving L roughly halves the peak (a quadratic term would quarter it).
    q2, k2, v2 = inputs(l // 2)
    peak_half = _peak_aten_cpu_bytes(fused(q2, k2, v2, need_weights=False))
    assert peak / peak_half < 2.5, (peak, peak_half)

    # Positive control: need_weights=True does allocate the (N, H, L, S) weights.
    peak_weights = _peak_aten_cpu_bytes(fused(q, k, v, need_weights=True))
    assert peak_weights >= score_matrix_bytes, peak_weights
    print(
        f"\nATen CPU peak, fwd+bwd, N={n} H={h} E={e}: L=S={l}: {peak / mib:.1f} MiB "
        f"(O(L) budget {linear_bytes / mib:.0f} MiB); L=S={l // 2}: {peak_half / mib:.1f} MiB; "
        f"need_weights=True: {peak_weights / mib:.1f} MiB; q@k^T+softmax: {naive / mib:.0f} MiB; "
        f"one L x S float32 matrix: {one_head_bytes / mib:.0f} MiB per head, "
        f"{score_matrix_bytes / mib:.0f} MiB for all heads"
    )
