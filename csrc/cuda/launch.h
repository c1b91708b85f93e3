// Launch shapes of the CUDA kernels (attention_kernels.cuh): thread-block size, grid size and
// dynamic shared memory, computed on the host from the problem. The real launcher
// (attention_cuda.cu) and the test harness that runs the kernels on the CPU
// (tests/cuda_on_cpu/) both take them from here, so the harness allocates exactly the shared
// memory a GPU launch would. Plain C++: compiled by nvcc and by the host compiler.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

#include "attention_params.h"

namespace torch_mha::cuda {

constexpr int kTile = 32;  // queries per block and keys per tile
constexpr int kWarps = 4;  // warps per thread block
constexpr int kRowsPerWarp = kTile / kWarps;
constexpr int kThreads = kWarps * 32;
// Head dims up to this are supported (the kernels keep head_dim / 32 columns per lane).
constexpr int64_t kMaxHeadDim = 128;

struct KernelLaunch {
  int64_t blocks = 0;         // one-dimensional grid
  int threads = kThreads;     // per block
  int64_t shared_values = 0;  // dynamic shared memory, in values of the accumulate type
};

C10_HOST_DEVICE inline int64_t tiles_of(int64_t length) {
  return (length + kTile - 1) / kTile;
}

// Shared tiles store rows padded by one value, so that lanes reading down a column hit
// distinct banks.
C10_HOST_DEVICE inline int64_t padded(int64_t dim) {
  return dim + 1;
}

// Forward: one block per (batch, head, query tile); Q, K, V and P tiles in shared memory.
inline KernelLaunch forward_launch(const AttentionParams& p) {
  return {p.batch * p.heads * tiles_of(p.query_len), kThreads,
          kTile * (2 * padded(p.head_dim) + padded(p.value_dim) + padded(kTile))};
}

// Weights: one block per (batch, head, query tile), or per (batch, query tile) when averaging.
inline KernelLaunch weights_launch(const AttentionParams& p) {
  return {p.batch * (p.average_weights ? 1 : p.heads) * tiles_of(p.query_len), kThreads,
          kTile * 2 * padded(p.head_dim)};
}

// delta = rowsum(dO * O): one warp per query row.
inline KernelLaunch softmax_delta_launch(const AttentionParams& p) {
  const int64_t rows = p.batch * p.heads * p.query_len;
  return {(rows + kWarps - 1) / kWarps, kThreads, 0};
}

// The weights term of delta: one block per (batch, head, query tile).
inline KernelLaunch weights_delta_launch(const AttentionParams& p) {
  return {p.batch * p.heads * tiles_of(p.query_len), kThreads, kTile * 2 * padded(p.head_dim)};
}

// dK and dV: one block per (batch, key/value head, key tile).
inline KernelLaunch dkdv_launch(const AttentionParams& p) {
  return {p.batch * p.kv_heads * tiles_of(p.key_len), kThreads,
          kTile * (2 * padded(p.head_dim) + 2 * padded(p.value_dim) + 2 * padded(kTile) + 3)};
}

// dQ (and the mask gradient): one block per (batch, head, query tile).
inline KernelLaunch dq_launch(const AttentionParams& p) {
  return {p.batch * p.heads * tiles_of(p.query_len), kThreads,
          kTile * (2 * padded(p.head_dim) + 2 * padded(p.value_dim) + padded(kTile))};
}

}  // namespace torch_mha::cuda
