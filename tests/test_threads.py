"""torch_mha under concurrency: Python threads, TorchScript async tasks, per-thread thread counts,
and a forked worker process.

Every case compares bit for bit with the same work done serially on the main thread (computed
first), and every thread is joined with a timeout, so a deadlock fails the test instead of
hanging it. What each case proves:

* ``test_concurrent_python_threads_core_op``: the fused op (forward and backward, masks, causal,
  dropout, weights, mask gradients) called from 4 Python threads at once, 3 calls each, each
  thread with its own inputs. torch releases the GIL inside ops, so the kernels really overlap,
  and each call's at::parallel_for opens its own OpenMP team from its own thread. Equal bits
  mean the kernels share no mutable state across calls (no static scratch, no shared RNG
  state: dropout depends only on the seed tensor).
* ``test_concurrent_python_threads_layer``: the same for torch_mha.MultiheadAttention, one
  module shared by all threads (read-only parameters), gradients by torch.autograd.grad
  (per-call results, no shared .grad accumulation). This includes the projection GEMMs, whose
  results are deterministic for a given thread count (see docs/reliability.md).
* ``test_thread_counts_inside_threads``: two threads run the same problem concurrently, one
  with torch.set_num_threads(1) and one with 2 (the setting is per calling thread under
  OpenMP). Both must equal the serial result: the kernels' results do not depend on the number
  of threads, even while another call is running. Only the fused op is checked here: the
  projections' weight-gradient GEMM (MKL) may change its bits with the thread count.
* ``test_torchscript_fork_runs_on_interop_pool``: a TorchScript function forks tasks with
  torch.jit.fork; they run on PyTorch's inter-op thread pool (at::launch) and each calls the
  forward and backward ops, whose at::parallel_for then opens intra-op OpenMP teams from pool
  threads: the "op called from inside user parallel work" case that Python can reach. (The
  case of a call from inside an at::parallel_for region, where the kernels' own parallel_for
  runs inline, is exercised in C++ by tests/cpp/test_sanitize.cpp under the sanitizers.)
* ``test_forked_worker_process``: a process forked after the parent ran the kernels with an
  OpenMP team (as DataLoader workers are) runs them again with one thread and gets the same
  bits. With 2 threads such a child hangs in GNU OpenMP for any torch op, not only torch_mha's
  (libgomp's thread pool does not survive fork), which is why DataLoader workers use one thread.
"""

from __future__ import annotations

import multiprocessing
import threading
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

import torch
from torch import Tensor

import torch_mha

OPS = torch.ops.torch_mha
JOIN_TIMEOUT_S = 120.0  # per batch of threads; a healthy run takes well under a second each
THREADS = 4
CALLS_PER_THREAD = 3

Result = TypeVar("Result")


def run_in_threads(
    work: Sequence[Callable[[], Result]], timeout_s: float = JOIN_TIMEOUT_S
) -> List[Result]:
    """Runs each callable in its own thread, all released at once by a barrier; fails if any
    thread raises or is still running after the timeout (a deadlock)."""
    results: List[Optional[Result]] = [None] * len(work)
    errors: List[BaseException] = []
    barrier = threading.Barrier(len(work))

    def target(index: int) -> None:
        try:
            barrier.wait(timeout=timeout_s)
            results[index] = work[index]()
        except BaseException as error:  # reported on the main thread
            errors.append(error)

    threads = [
        threading.Thread(target=target, args=(i,), name=f"torch_mha-{i}", daemon=True)
        for i in range(len(work))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout_s)
    alive = [thread.name for thread in threads if thread.is_alive()]
    assert not alive, f"threads still running after {timeout_s} s (deadlock?): {alive}"
    if errors:
        raise errors[0]
    return [r for r in results if r is not None]


def assert_bitwise_equal(
    actual: Sequence[Tensor], expected: Sequence[Tensor], names: Sequence[str], what: str
) -> None:
    assert len(actual) == len(expected) == len(names)
    for name, a, e in zip(names, actual, expected):
        assert a.dtype == e.dtype and a.shape == e.shape, f"{what}: {name}"
        assert torch.equal(a, e), (
            f"{what}: {name} differs from the serial result "
            f"(max difference {float((a.double() - e.double()).abs().max()):.3e})"
        )


# ---------------------------------------------------------------------------------------------
# The fused op


@dataclass
class CoreWork:
    """One problem for the fused op: inputs, masks and upstream gradients."""

    query: Tensor
    key: Tensor
    value: Tensor
    attn_mask: Tensor  # float, requires grad
    key_padding_mask: Tensor  # bool
    grad_output: Tensor
    grad_weights: Tensor
    is_causal: bool
    dropout_p: float
    dropout_seed: Tensor

    def run(self) -> List[Tensor]:
        """Forward and backward; returns output, weights and the four gradients."""
        leaves = [t.detach().requires_grad_(True) for t in (self.query, self.key, self.value)]
        mask = self.attn_mask.detach().requires_grad_(True)
        output, _, weights = OPS.attention_forward(
            *leaves,
            mask,
            self.key_padding_mask,
            self.is_causal,
            None,
            self.dropout_p,
            self.dropout_seed,
            True,  # need_weights
            True,  # average_weights
        )
        grads = torch.autograd.grad(
            [output, weights], [*leaves, mask], [self.grad_output, self.grad_weights]
        )
        return [output.detach(), weights.detach(), *grads]


CORE_NAMES = ["output", "weights", "grad query", "grad key", "grad value", "grad attn_mask"]


def make_core_work(seed: int, dtype: torch.dtype = torch.float32) -> CoreWork:
    """A problem whose lengths cross the 64 x 128 tiles and whose backward splits the keys
    into several dQ chunks (N * H = 2, S = 300: 3 key blocks)."""
    gen = torch.Generator().manual_seed(seed)
    n, h, l, s, e, ev = 1, 2, 130, 300, 16, 24

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    padding = torch.rand(n, s, generator=gen) < 0.2
    padding[:, 0] = False
    return CoreWork(
        query=randn(n, h, l, e),
        key=randn(n, s, h, e).transpose(1, 2),  # batch-first heads, as from a projection
        value=randn(s, n, h, ev).permute(1, 2, 0, 3),  # a projection-like layout
        attn_mask=randn(h, l, s),
        key_padding_mask=padding,
        grad_output=randn(n, h, l, ev),
        grad_weights=randn(n, l, s),
        is_causal=seed % 2 == 1,
        dropout_p=0.2,
        dropout_seed=torch.tensor([1000 + seed]),
    )


def test_concurrent_python_threads_core_op() -> None:
    works = [make_core_work(seed) for seed in range(THREADS)]
    serial = [work.run() for work in works]
    for result in serial:  # the comparison below is between meaningful tensors
        assert all(bool(t.abs().sum() > 0) for t in result)

    def thread_body(work: CoreWork) -> Callable[[], List[List[Tensor]]]:
        return lambda: [work.run() for _ in range(CALLS_PER_THREAD)]

    concurrent = run_in_threads([thread_body(work) for work in works])
    for index, (calls, expected) in enumerate(zip(concurrent, serial)):
        for call, result in enumerate(calls):
            assert_bitwise_equal(result, expected, CORE_NAMES, f"thread {index}, call {call}")


def test_thread_counts_inside_threads() -> None:
    work = make_core_work(seed=7)
    serial = work.run()

    def with_threads(count: int) -> Callable[[], Tuple[int, List[List[Tensor]]]]:
        def body() -> Tuple[int, List[List[Tensor]]]:
            torch.set_num_threads(count)  # this thread's OpenMP setting only
            return torch.get_num_threads(), [work.run() for _ in range(CALLS_PER_THREAD)]

        return body

    main_threads = torch.get_num_threads()
    results = run_in_threads([with_threads(1), with_threads(2), with_threads(1), with_threads(2)])
    assert torch.get_num_threads() == main_threads  # the threads' settings did not leak
    assert sorted(count for count, _ in results) == [1, 1, 2, 2]
    for count, calls in results:
        for call, result in enumerate(calls):
            assert_bitwise_equal(result, serial, CORE_NAMES, f"{count} thread(s), call {call}")


# ---------------------------------------------------------------------------------------------
# The layer


def test_concurrent_python_threads_layer() -> None:
    gen = torch.Generator().manual_seed(0)
    embed_dim, heads, length, batch = 48, 3, 130, 2
    mha = torch_mha.MultiheadAttention(embed_dim, heads, add_bias_kv=True, batch_first=True)
    with torch.no_grad():
        for parameter in mha.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=gen) * 0.2)
    parameters = list(mha.parameters())
    causal = torch.ones(length, length, dtype=torch.bool).triu(1)

    def inputs(seed: int) -> Tuple[Tensor, Tensor, Tensor]:
        g = torch.Generator().manual_seed(100 + seed)
        x = torch.randn(batch, length, embed_dim, generator=g)
        padding = torch.rand(batch, length, generator=g) < 0.1
        padding[:, 0] = False
        return x, padding, torch.randn(batch, length, embed_dim, generator=g)

    def run(seed: int) -> List[Tensor]:
        x, padding, grad_output = inputs(seed)
        x = x.requires_grad_(True)
        # Self-attention (one fused projection GEMM), causal mask + key padding, averaged weights.
        output, weights = mha(x, x, x, key_padding_mask=padding, attn_mask=causal)
        grads = torch.autograd.grad(output, [x, *parameters], grad_output)
        return [output.detach(), weights.detach(), *grads]

    names = ["output", "weights", "grad input"] + [name for name, _ in mha.named_parameters()]
    serial = [run(seed) for seed in range(THREADS)]

    def thread_body(seed: int) -> Callable[[], List[List[Tensor]]]:
        return lambda: [run(seed) for _ in range(CALLS_PER_THREAD)]

    concurrent = run_in_threads([thread_body(seed) for seed in range(THREADS)])
    for index, (calls, expected) in enumerate(zip(concurrent, serial)):
        for call, result in enumerate(calls):
            assert_bitwise_equal(result, expected, names, f"thread {index}, call {call}")


# ---------------------------------------------------------------------------------------------
# TorchScript async tasks


@torch.jit.script
def _attention_task(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor, grad_output: Tensor
) -> List[Tensor]:
    output, stats, _ = torch.ops.torch_mha.attention_forward(
        query, key, value, attn_mask, None, False, None, 0.0, None, False, False
    )
    grad_query, grad_key, grad_value, grad_mask, _ = torch.ops.torch_mha.attention_backward(
        grad_output,
        query,
        key,
        value,
        output,
        stats,
        attn_mask,
        None,
        False,
        None,
        0.0,
        None,
        None,
        False,
        True,  # compute_mask_grad
    )
    return [output, grad_query, grad_key, grad_value, grad_mask]


@torch.jit.script
def _fork_tasks(problems: List[List[Tensor]]) -> List[List[Tensor]]:
    futures = [torch.jit.fork(_attention_task, p[0], p[1], p[2], p[3], p[4]) for p in problems]
    return [torch.jit.wait(future) for future in futures]


def test_torchscript_fork_runs_on_interop_pool() -> None:
    assert torch.get_num_interop_threads() >= 1
    problems: List[List[Tensor]] = []
    for seed in range(6):
        work = make_core_work(seed, dtype=torch.float64)
        problems.append([work.query, work.key, work.value, work.attn_mask, work.grad_output])
    serial = [_attention_task(*p) for p in problems]
    names = ["output", "grad query", "grad key", "grad value", "grad mask"]

    def fork_all() -> List[List[Tensor]]:
        return _fork_tasks(problems)

    # Twice, from two Python threads at once, so the pool's queue holds 12 tasks.
    for results in run_in_threads([fork_all, fork_all]):
        for index, (result, expected) in enumerate(zip(results, serial)):
            assert_bitwise_equal(result, expected, names, f"forked task {index}")


# ---------------------------------------------------------------------------------------------
# A forked worker process


def _worker_result(threads: int) -> Dict[str, Tensor]:
    torch.set_num_threads(threads)
    result = make_core_work(seed=3).run()
    return dict(zip(CORE_NAMES, result))


def test_forked_worker_process() -> None:
    parent = _worker_result(torch.get_num_threads())  # an OpenMP team exists from here on
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:
        pending = pool.apply_async(_worker_result, (1,))
        try:
            child = pending.get(timeout=JOIN_TIMEOUT_S)
        except multiprocessing.TimeoutError as error:
            raise AssertionError(f"forked worker still running after {JOIN_TIMEOUT_S} s") from error
    assert_bitwise_equal(
        [child[name] for name in CORE_NAMES], [parent[name] for name in CORE_NAMES], CORE_NAMES,
        "forked worker (1 thread) vs parent",
    )  # fmt: skip
