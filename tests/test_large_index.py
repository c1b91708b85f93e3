"""64-bit indexing: attention weights with more than 2^31 elements, forward and backward.

The kernels address the weights output as ((b * heads + h) * query_len + i) * key_len + k
(per head), (b * query_len + i) * key_len + k (head-averaged), and read the gradient of the
weights at b * stride_b + h * stride_h + i * stride_i + k * stride_k, all in int64_t. The
cheapest problem where 32-bit arithmetic would go wrong has one batch and one head and
L * S > 2^31: L = 16384 queries, S = 2^17 + 1024 keys (2,164,260,864 weights, 4.3 GB in
bfloat16). Rows i >= 16257 then start beyond element 2^31: with 32-bit offsets their
probabilities would be written (and their weight gradients read) far outside the row, so the
checks below on the last 16 rows would find zeros or garbage, or the process would crash.

Causal attention keeps the computation small: query i sees keys 0..i only, so the kernels
compute L^2 / 2 scores and merely write zeros for the rest of each row. The head dim is 4.

Checked, against a float64 reference computed for the checked rows only (the same bfloat16
values upcast): the per-head weights of rows {0, 1, 8191} and of the last 16 rows (visible part
against the reference, the rest exactly zero), the number of nonzero weights in the whole
output (L (L + 1) / 2: no write lost or misplaced into the masked region); the head-averaged
weights of the same rows; and the query gradient of those rows from the backward with a 4.3 GB
grad_weights tensor whose values depend on the row and the column.

Cost on the project machine (2 cores): about 17 s (up to 25 s under load) and 4.5 GB of memory
at peak (one 4.3 GB tensor at a time). The work runs in a child process, so a crash from a bad
offset fails this test instead of killing the test run; the test is skipped when less than 8 GB
is available.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

import pytest
import torch
from torch import Tensor

QUERY_LEN = 16384
KEY_LEN = 2**17 + 1024
HEAD_DIM = 4
VALUE_DIM = 3
CHECKED_ROWS = [0, 1, 8191] + list(range(QUERY_LEN - 16, QUERY_LEN))
DONE = "large-index checks passed"
REQUIRED_MEMORY_GB = 8.0
BF16_ROUNDOFF = 2.0**-8


def available_memory_gb() -> Optional[float]:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


@pytest.mark.slow
def test_weights_and_their_gradient_beyond_2_31_elements() -> None:
    assert QUERY_LEN * KEY_LEN > 2**31
    assert (QUERY_LEN - 16) * KEY_LEN >= 2**31  # the last 16 rows start beyond 2^31
    memory = available_memory_gb()
    if memory is None or memory < REQUIRED_MEMORY_GB:
        pytest.skip(f"needs {REQUIRED_MEMORY_GB} GB of available memory, found {memory}")
    result = subprocess.run(
        [sys.executable, str(Path(__file__).resolve())], capture_output=True, text=True, timeout=900
    )
    report = (result.stdout + result.stderr)[-6000:]
    how = f"was killed by signal {-result.returncode}" if result.returncode < 0 else "failed"
    assert result.returncode == 0, f"the large-index child process {how}:\n{report}"
    assert DONE in result.stdout, report


# ---------------------------------------------------------------------------------------------
# The child process


def reference_rows(
    q: Tensor, k: Tensor, v: Tensor, rows: Sequence[int], grad_output: Tensor, grad_weights: Tensor
) -> tuple[Tensor, Tensor]:
    """Float64 causal attention for the given query rows: probabilities (R, S) and the gradient
    of sum(output * grad_output) + sum(weights * grad_weights) with respect to those queries."""
    index = torch.tensor(rows)
    q_rows = q[0, 0, index].double().requires_grad_(True)
    k64, v64 = k[0, 0].double(), v[0, 0].double()
    scores = q_rows @ k64.t() / math.sqrt(HEAD_DIM)
    hidden = torch.arange(KEY_LEN)[None, :] > index[:, None]
    probs = torch.softmax(scores.masked_fill(hidden, -math.inf), dim=-1)
    output = probs @ v64
    loss = (output * grad_output[0, 0, index].double()).sum() + (probs * grad_weights).sum()
    (grad_query,) = torch.autograd.grad(loss, q_rows)
    return probs.detach(), grad_query


def assert_close_bf16(actual: Tensor, expected: Tensor, atol_scale: float, what: str) -> None:
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(
        actual.double(),
        expected,
        atol=atol_scale * scale,
        rtol=4 * BF16_ROUNDOFF,
        msg=lambda message: f"{what}: {message}",
    )


def grad_weights_pattern() -> tuple[Tensor, Tensor]:
    """Upstream weight gradients row[i] + col[k]: they depend on the row and the column, and
    every sum is exact in bfloat16 (multiples of 1/16 below 2)."""
    row = ((torch.arange(QUERY_LEN) % 13 - 6) * 0.125).bfloat16()
    col = ((torch.arange(KEY_LEN) % 11 - 5) * 0.0625).bfloat16()
    return row, col


def main() -> None:
    import torch_mha  # noqa: F401  (registers the ops)

    ops = torch.ops.torch_mha
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, QUERY_LEN, HEAD_DIM, generator=gen).bfloat16()
    k = torch.randn(1, 1, KEY_LEN, HEAD_DIM, generator=gen).bfloat16()
    v = torch.randn(1, 1, KEY_LEN, VALUE_DIM, generator=gen).bfloat16()
    grad_output = torch.randn(1, 1, QUERY_LEN, VALUE_DIM, generator=gen).bfloat16()
    checked = torch.tensor(CHECKED_ROWS)
    row, col = grad_weights_pattern()
    grad_weights_rows = row[checked].double()[:, None] + col.double()[None, :]
    probs, expected_grad_query = reference_rows(
        q, k, v, CHECKED_ROWS, grad_output, grad_weights_rows
    )

    for average in (False, True):
        output, stats, weights = ops.attention_forward(
            q, k, v, None, None, True, None, 0.0, None, True, average
        )
        assert weights.numel() > 2**31 and weights.dtype == torch.bfloat16
        rows = weights[0, 0] if not average else weights[0]
        what = "averaged weights" if average else "weights"
        assert_close_bf16(rows[checked], probs, 2e-5, f"{what} of rows {CHECKED_ROWS}")
        if not average:
            visible = QUERY_LEN * (QUERY_LEN + 1) // 2
            nonzero = int(weights.count_nonzero())
            assert nonzero == visible, f"{nonzero} nonzero weights, expected {visible}"
        del weights, rows

    grad_weights = torch.empty(1, 1, QUERY_LEN, KEY_LEN, dtype=torch.bfloat16)
    torch.add(row[:, None], col[None, :], out=grad_weights[0, 0])
    assert torch.equal(grad_weights[0, 0, checked].double(), grad_weights_rows)
    grad_query = ops.attention_backward(
        grad_output, q, k, v, output, stats, None, None, True, None, 0.0, None, grad_weights,
        False, False,
    )[0]  # fmt: skip
    assert_close_bf16(
        grad_query[0, 0, checked], expected_grad_query, 8 * BF16_ROUNDOFF, "grad of the queries"
    )
    print(DONE)


if __name__ == "__main__":
    main()
