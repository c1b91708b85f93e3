// Fused attention on NVIDIA GPUs: forward, attention weights, and backward.
//
// The kernels are plain SIMT code (no tensor-core instructions) written to be reviewed line by
// line. Besides the GPU, they run on the CPU in the test suite (tests/cuda_on_cpu/), compiled
// as host C++ with one fiber per CUDA thread.
//
// Tiles: a block of kTile (32) queries against tiles of kTile keys, 4 warps per thread block.
//  * forward / dQ / weights kernels: each warp owns 8 query rows; lane j is key j of the tile;
//  * dK/dV kernel: each warp owns 8 keys; lane i is query i of the tile.
// Score tiles live in shared memory with rows padded by one element, so that lanes reading down a
// column hit distinct banks. Accumulators are float32 (float64 for float64 inputs); each lane
// keeps kDim / 32 columns of its rows (kDim = head dim rounded up to 32, 64 or 128).
//
// Every kernel reads the problem from AttentionParams (attention_params.h): grouped-query heads,
// packed variable-length batches, the causal rule and sliding windows, ALiBi, softcapping and
// sink logits are handled here exactly as in the CPU kernels.
//
// The backward is deterministic: dK/dV are computed per key block (summed over the query heads
// of a group in a fixed order) and dQ per query block, each by exactly one thread block; no
// atomics anywhere.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "attention_params.h"
#include "common/dropout.h"
#include "common/masking.h"
#include "common/softmax.h"
#include "cuda/launch.h"

// The dynamic shared memory of a kernel, as bytes. The CPU harness defines this macro before
// including the file to hand each block a buffer sized by launch.h.
#ifndef TORCH_MHA_DYNAMIC_SHARED_MEMORY
#define TORCH_MHA_DYNAMIC_SHARED_MEMORY(name) extern __shared__ unsigned char name[]
#endif

namespace torch_mha::cuda {

// Occupancy hint for __launch_bounds__: without a minimum, ptxas aimed for more resident blocks
// and spilled the forward kernel's accumulators at head_dim 64.
constexpr int kMinBlocksPerSm = 2;

// ---------------------------------------------------------------------------------------------
// Building blocks shared by the kernels

__device__ inline int64_t min64(int64_t a, int64_t b) {
  return a < b ? a : b;
}

// Grids are one-dimensional over (batch, head, tile), so no batch or head count runs into the
// 65535 limit of the other grid dimensions.
struct BlockIndex {
  int64_t batch;
  int64_t head;
  int64_t tile;

  __device__ static BlockIndex decode(int64_t tiles, int64_t heads) {
    const int64_t x = blockIdx.x;
    return {x / (tiles * heads), (x / tiles) % heads, x % tiles};
  }
};

// The lengths of sequence b (its own in a packed batch).
struct SequenceLengths {
  int64_t query_len;
  int64_t key_len;

  __device__ SequenceLengths(const AttentionParams& p, int64_t b)
      : query_len(p.query_len_of(b)), key_len(p.key_len_of(b)) {}
};

template <typename acc_t>
__device__ acc_t warp_max(acc_t value) {
  for (int offset = 16; offset > 0; offset /= 2) {
    value = nan_propagating_max(value, __shfl_xor_sync(0xffffffffu, value, offset));
  }
  return value;
}

template <typename acc_t>
__device__ acc_t warp_sum(acc_t value) {
  for (int offset = 16; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  return value;
}

// rows x cols elements of a strided source into a padded shared tile (acc_t), times multiplier;
// rows past `valid_rows` are zero-filled. All threads of the block take part.
template <typename scalar_t, typename acc_t>
__device__ void load_tile(const scalar_t* first_row, int64_t row_stride, int valid_rows, int cols,
                          acc_t multiplier, acc_t* tile, int ld) {
  for (int index = threadIdx.x; index < kTile * cols; index += blockDim.x) {
    const int r = index / cols;
    const int c = index % cols;
    tile[r * ld + c] =
        r < valid_rows ? multiplier * static_cast<acc_t>(first_row[r * row_stride + c]) : acc_t(0);
  }
}

// Score of query i against key j of sequence b, head h, given the dot product of the scaled
// query and the key: softcap, then ALiBi and the masks added, -inf where the causal rule or the
// window hides the key. `softcap_slope`, if given, receives d(score)/d(dot) of the cap.
template <typename acc_t>
__device__ acc_t masked_score(const AttentionParams& p, const SequenceLengths& seq, int64_t b,
                              int64_t h, int64_t i, int64_t j, acc_t dot,
                              acc_t* softcap_slope = nullptr) {
  if (j >= seq.key_len || !p.visibility.keys_of(i, seq.query_len, seq.key_len).contains(j)) {
    return negative_infinity<acc_t>();
  }
  acc_t score = dot;
  if (p.softcap > 0.0) {
    const acc_t cap = static_cast<acc_t>(p.softcap);
    const acc_t t = tanh(score / cap);
    score = cap * t;
    if (softcap_slope != nullptr) {
      *softcap_slope = acc_t(1) - t * t;
    }
  }
  if (p.alibi_slopes != nullptr) {
    score += alibi_bias<acc_t>(p.alibi_slope(b, h), i, j, seq.query_len, seq.key_len);
  }
  if (p.attn_mask.defined()) {
    score += mask_bias_at<acc_t>(p.attn_mask,
                                 p.attn_mask.row_offset(b, h, i) + j * p.attn_mask.stride_key);
  }
  if (p.key_padding_mask.defined()) {
    score += mask_bias_at<acc_t>(p.key_padding_mask, p.key_padding_mask.row_offset(b, h, i) +
                                                         j * p.key_padding_mask.stride_key);
  }
  return score;
}

// Dropout factor of element (b, h, i, j): 0 if dropped, 1/(1-p) if kept (common/dropout.h).
template <typename acc_t>
__device__ acc_t dropout_factor(const AttentionParams& p, int64_t b, int64_t h, int64_t i,
                                int64_t j) {
  if (!p.has_dropout()) {
    return acc_t(1);
  }
  const uint64_t seed = static_cast<uint64_t>(*p.dropout_seed);
  const uint64_t row_id = dropout_row_id(b, h, i, p.heads, p.query_len);
  return dropout_keep(seed, row_id, j, dropout_threshold(p.dropout_p))
             ? static_cast<acc_t>(1.0 / (1.0 - p.dropout_p))
             : acc_t(0);
}

// Dot product of two padded shared-memory rows over `length` elements.
template <typename acc_t>
__device__ acc_t dot_rows(const acc_t* a, const acc_t* b, int length) {
  acc_t sum = 0;
  for (int d = 0; d < length; ++d) {
    sum += a[d] * b[d];
  }
  return sum;
}

// ---------------------------------------------------------------------------------------------
// Forward: one block per (batch, head, query tile).

template <typename scalar_t, typename acc_t, int kDim>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    attention_forward_kernel(const AttentionParams p) {
  constexpr int kCols = kDim / 32;
  TORCH_MHA_DYNAMIC_SHARED_MEMORY(shared_bytes);
  acc_t* shared = reinterpret_cast<acc_t*>(shared_bytes);
  const int ld_q = p.head_dim + 1, ld_v = p.value_dim + 1, ld_p = kTile + 1;
  acc_t* q_tile = shared;                 // (scale Q) of the block, kTile x head_dim
  acc_t* k_tile = q_tile + kTile * ld_q;  // keys of the current tile
  acc_t* v_tile = k_tile + kTile * ld_q;  // values of the current tile
  acc_t* p_tile = v_tile + kTile * ld_v;  // probabilities (after dropout)

  const BlockIndex block = BlockIndex::decode(tiles_of(p.query_len), p.heads);
  const int64_t b = block.batch, h = block.head, q0 = block.tile * kTile;
  const SequenceLengths seq(p, b);
  if (q0 >= seq.query_len) {
    return;  // past the end of a shorter sequence of a packed batch: the whole block leaves
  }
  const int64_t kv_head = p.kv_head_of(h);
  const int rows = static_cast<int>(min64(kTile, seq.query_len - q0));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const IndexRange keys = p.visibility.keys_of_block(q0, q0 + rows - 1, seq.query_len, seq.key_len);

  load_tile(p.query.row<const scalar_t>(b, h, q0), p.query.stride_row, rows, p.head_dim,
            static_cast<acc_t>(p.scale), q_tile, ld_q);

  acc_t acc[kRowsPerWarp][kCols];
  acc_t running_max[kRowsPerWarp], running_sum[kRowsPerWarp];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    running_max[rr] = negative_infinity<acc_t>();
    running_sum[rr] = 0;
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      acc[rr][c] = 0;
    }
  }

  for (int64_t k0 = keys.begin; k0 < keys.end; k0 += kTile) {
    const int cols = static_cast<int>(min64(kTile, keys.end - k0));
    __syncthreads();  // everyone is done with the previous key/value tile
    load_tile(p.key.row<const scalar_t>(b, kv_head, k0), p.key.stride_row, cols, p.head_dim,
              acc_t(1), k_tile, ld_q);
    load_tile(p.value.row<const scalar_t>(b, kv_head, k0), p.value.stride_row, cols, p.value_dim,
              acc_t(1), v_tile, ld_v);
    __syncthreads();

#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = warp * kRowsPerWarp + rr;
      const int64_t i = q0 + r, j = k0 + lane;
      const acc_t dot = dot_rows(q_tile + r * ld_q, k_tile + lane * ld_q, p.head_dim);
      const bool visible = r < rows && lane < cols;  // never read masks past the tensors
      const acc_t score =
          visible ? masked_score(p, seq, b, h, i, j, dot) : negative_infinity<acc_t>();
      const acc_t rescale = online_softmax_update_max(running_max[rr], warp_max(score));
      const acc_t prob = exp(score - softmax_exp_offset(running_max[rr]));
      running_sum[rr] = running_sum[rr] * rescale + warp_sum(prob);
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        acc[rr][c] *= rescale;
      }
      // The running sum uses the undropped probabilities; only P V sees the dropout mask.
      p_tile[r * ld_p + lane] = visible ? prob * dropout_factor<acc_t>(p, b, h, i, j) : acc_t(0);
    }
    __syncwarp();
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = warp * kRowsPerWarp + rr;
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const int d = lane + 32 * c;
        if (d < p.value_dim) {
          acc_t sum = 0;
          for (int jj = 0; jj < cols; ++jj) {
            sum += p_tile[r * ld_p + jj] * v_tile[jj * ld_v + d];
          }
          acc[rr][c] += sum;
        }
      }
    }
  }

  const acc_t* sinks = static_cast<const acc_t*>(p.sinks);
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int r = warp * kRowsPerWarp + rr;
    if (r >= rows) {
      continue;
    }
    const int64_t i = q0 + r;
    const acc_t sink_factor =
        sinks != nullptr ? online_softmax_add_sink(running_max[rr], running_sum[rr], sinks[h])
                         : acc_t(1);
    const SoftmaxRowStats<acc_t> row = online_softmax_finish(running_max[rr], running_sum[rr]);
    scalar_t* out_row = p.output.row<scalar_t>(b, h, i);
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int d = lane + 32 * c;
      if (d < p.value_dim) {
        out_row[d] = static_cast<scalar_t>(acc[rr][c] * (row.inverse_sum * sink_factor));
      }
    }
    if (lane == 0) {
      acc_t* row_stats = p.softmax_stats.row<acc_t>(b, h, i);
      row_stats[0] = row.offset;
      row_stats[1] = row.log_sum;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Probabilities recomputed from the saved row statistics (weights output, weights gradient
// term, dQ kernel). Each warp produces, for its 8 rows and the key tile, prob (before dropout)
// and its dropout factor, lane j holding key k0 + j.

template <typename acc_t>
struct RowStats {
  acc_t offset[kRowsPerWarp];
  acc_t log_sum[kRowsPerWarp];

  __device__ void load(const AttentionParams& p, const SequenceLengths& seq, int64_t b, int64_t h,
                       int64_t q0, int warp) {
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int64_t i = q0 + warp * kRowsPerWarp + rr;
      // Rows past the end behave as fully masked: probability 0.
      const bool real = i < seq.query_len;
      const acc_t* row = real ? p.softmax_stats.row<const acc_t>(b, h, i) : nullptr;
      offset[rr] = real ? row[0] : std::numeric_limits<acc_t>::infinity();
      log_sum[rr] = real ? row[1] : acc_t(0);
    }
  }

  __device__ acc_t probability(int rr, acc_t score) const {
    return exp((score - offset[rr]) - log_sum[rr]);
  }
};

// Weights (dense batches): one block per (batch, head, query tile), or per (batch, query tile)
// when averaging. Averaged weights are summed over the heads by one thread per element, in head
// order (deterministic), in the accumulate type.
template <typename scalar_t, typename acc_t, int kDim>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    attention_weights_kernel(const AttentionParams p, acc_t* average_out, scalar_t* per_head_out) {
  TORCH_MHA_DYNAMIC_SHARED_MEMORY(shared_bytes);
  acc_t* shared = reinterpret_cast<acc_t*>(shared_bytes);
  const int ld_q = p.head_dim + 1;
  acc_t* q_tile = shared;
  acc_t* k_tile = q_tile + kTile * ld_q;
  const bool average = p.average_weights;

  const BlockIndex block = BlockIndex::decode(tiles_of(p.query_len), average ? 1 : p.heads);
  const int64_t b = block.batch, q0 = block.tile * kTile;
  const SequenceLengths seq(p, b);
  const int rows = static_cast<int>(min64(kTile, seq.query_len - q0));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t first_head = average ? 0 : block.head;
  const int64_t last_head = average ? p.heads : first_head + 1;
  const acc_t head_weight = average ? acc_t(1) / static_cast<acc_t>(p.heads) : acc_t(1);

  for (int64_t h = first_head; h < last_head; ++h) {
    const int64_t kv_head = p.kv_head_of(h);
    __syncthreads();
    load_tile(p.query.row<const scalar_t>(b, h, q0), p.query.stride_row, rows, p.head_dim,
              static_cast<acc_t>(p.scale), q_tile, ld_q);
    RowStats<acc_t> row_stats;
    row_stats.load(p, seq, b, h, q0, warp);
    for (int64_t k0 = 0; k0 < seq.key_len; k0 += kTile) {
      const int cols = static_cast<int>(min64(kTile, seq.key_len - k0));
      __syncthreads();
      load_tile(p.key.row<const scalar_t>(b, kv_head, k0), p.key.stride_row, cols, p.head_dim,
                acc_t(1), k_tile, ld_q);
      __syncthreads();
#pragma unroll
      for (int rr = 0; rr < kRowsPerWarp; ++rr) {
        const int r = warp * kRowsPerWarp + rr;
        const int64_t i = q0 + r, j = k0 + lane;
        if (r >= rows || lane >= cols) {
          continue;
        }
        const acc_t dot = dot_rows(q_tile + r * ld_q, k_tile + lane * ld_q, p.head_dim);
        const acc_t weight = row_stats.probability(rr, masked_score(p, seq, b, h, i, j, dot)) *
                             dropout_factor<acc_t>(p, b, h, i, j);
        if (average) {
          acc_t* slot = average_out + (b * p.query_len + i) * p.key_len + j;
          *slot = (h == 0 ? acc_t(0) : *slot) + head_weight * weight;
        } else {
          per_head_out[((b * p.heads + h) * p.query_len + i) * p.key_len + j] =
              static_cast<scalar_t>(weight);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward

// delta[b, h, i] = dO_i . O_i: one warp per query row.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    softmax_delta_kernel(const AttentionBackwardParams p) {
  const int64_t row =
      static_cast<int64_t>(blockIdx.x) * kWarps + static_cast<int64_t>(threadIdx.x / 32);
  const int lane = threadIdx.x % 32;
  if (row >= p.batch * p.heads * p.query_len) {
    return;
  }
  const int64_t b = row / (p.heads * p.query_len), h = (row / p.query_len) % p.heads,
                i = row % p.query_len;
  if (i >= p.query_len_of(b)) {
    return;
  }
  const scalar_t* d_row = p.grad_output.row<const scalar_t>(b, h, i);
  const scalar_t* o_row = p.output.row<const scalar_t>(b, h, i);
  acc_t sum = 0;
  for (int64_t d = lane; d < p.value_dim; d += 32) {
    sum += static_cast<acc_t>(d_row[d]) * static_cast<acc_t>(o_row[d]);
  }
  sum = warp_sum(sum);
  if (lane == 0) {
    *p.delta.row<acc_t>(b, h, i) = sum;
  }
}

// The gradient of the returned weights at (b, h, i, j), times its scale (1/heads if averaged).
template <typename scalar_t, typename acc_t>
__device__ acc_t weights_grad_at(const AttentionBackwardParams& p, int64_t b, int64_t h, int64_t i,
                                 int64_t j) {
  const scalar_t* data = static_cast<const scalar_t*>(p.grad_weights.data);
  return static_cast<acc_t>(p.grad_weights_scale) *
         static_cast<acc_t>(data[p.grad_weights.offset(b, h, i, j)]);
}

// delta[b, h, i] += sum_j dW_ij W_ij, with W recomputed: one block per (batch, head, query tile).
// Dense batches only.
template <typename scalar_t, typename acc_t, int kDim>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    weights_delta_kernel(const AttentionBackwardParams p) {
  TORCH_MHA_DYNAMIC_SHARED_MEMORY(shared_bytes);
  acc_t* shared = reinterpret_cast<acc_t*>(shared_bytes);
  const int ld_q = p.head_dim + 1;
  acc_t* q_tile = shared;
  acc_t* k_tile = q_tile + kTile * ld_q;

  const BlockIndex block = BlockIndex::decode(tiles_of(p.query_len), p.heads);
  const int64_t b = block.batch, h = block.head, q0 = block.tile * kTile;
  const SequenceLengths seq(p, b);
  const int64_t kv_head = p.kv_head_of(h);
  const int rows = static_cast<int>(min64(kTile, seq.query_len - q0));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const IndexRange keys = p.visibility.keys_of_block(q0, q0 + rows - 1, seq.query_len, seq.key_len);

  load_tile(p.query.row<const scalar_t>(b, h, q0), p.query.stride_row, rows, p.head_dim,
            static_cast<acc_t>(p.scale), q_tile, ld_q);
  RowStats<acc_t> row_stats;
  row_stats.load(p, seq, b, h, q0, warp);
  acc_t sums[kRowsPerWarp] = {};
  for (int64_t k0 = keys.begin; k0 < keys.end; k0 += kTile) {
    const int cols = static_cast<int>(min64(kTile, keys.end - k0));
    __syncthreads();
    load_tile(p.key.row<const scalar_t>(b, kv_head, k0), p.key.stride_row, cols, p.head_dim,
              acc_t(1), k_tile, ld_q);
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = warp * kRowsPerWarp + rr;
      const int64_t i = q0 + r, j = k0 + lane;
      if (r < rows && lane < cols) {
        const acc_t dot = dot_rows(q_tile + r * ld_q, k_tile + lane * ld_q, p.head_dim);
        const acc_t weight = row_stats.probability(rr, masked_score(p, seq, b, h, i, j, dot)) *
                             dropout_factor<acc_t>(p, b, h, i, j);
        sums[rr] += weights_grad_at<scalar_t, acc_t>(p, b, h, i, j) * weight;
      }
    }
  }
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int r = warp * kRowsPerWarp + rr;
    const acc_t total = warp_sum(sums[rr]);
    if (lane == 0 && r < rows) {
      *p.delta.row<acc_t>(b, h, q0 + r) += total;
    }
  }
}

// dK and dV: one block per (batch, key/value head, key tile), looping over the query heads of
// the group and the query tiles that see the keys. Each warp owns 8 keys; lane i is query i of
// the current query tile.
template <typename scalar_t, typename acc_t, int kDim>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    attention_backward_dkdv_kernel(const AttentionBackwardParams p) {
  constexpr int kCols = kDim / 32;
  TORCH_MHA_DYNAMIC_SHARED_MEMORY(shared_bytes);
  acc_t* shared = reinterpret_cast<acc_t*>(shared_bytes);
  const int ld_q = p.head_dim + 1, ld_v = p.value_dim + 1, ld_p = kTile + 1;
  acc_t* k_tile = shared;                        // this block's keys
  acc_t* v_tile = k_tile + kTile * ld_q;         // this block's values
  acc_t* q_tile = v_tile + kTile * ld_v;         // (scale Q) of the current query tile
  acc_t* do_tile = q_tile + kTile * ld_q;        // dO of the current query tile
  acc_t* pt_tile = do_tile + kTile * ld_v;       // P^T after dropout, [key][query]
  acc_t* dst_tile = pt_tile + kTile * ld_p;      // dS^T, [key][query]
  acc_t* query_stats = dst_tile + kTile * ld_p;  // offset, log_sum, delta per query of the tile

  const BlockIndex block = BlockIndex::decode(tiles_of(p.key_len), p.kv_heads);
  const int64_t b = block.batch, kv_head = block.head, k0 = block.tile * kTile;
  const SequenceLengths seq(p, b);
  if (k0 >= seq.key_len) {
    return;  // past the end of a shorter sequence of a packed batch: the whole block leaves
  }
  const int cols = static_cast<int>(min64(kTile, seq.key_len - k0));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const IndexRange queries =
      p.visibility.queries_of_block(k0, k0 + cols - 1, seq.query_len, seq.key_len);
  const acc_t scale = static_cast<acc_t>(p.scale);

  load_tile(p.key.row<const scalar_t>(b, kv_head, k0), p.key.stride_row, cols, p.head_dim, acc_t(1),
            k_tile, ld_q);
  load_tile(p.value.row<const scalar_t>(b, kv_head, k0), p.value.stride_row, cols, p.value_dim,
            acc_t(1), v_tile, ld_v);

  acc_t dk[kRowsPerWarp][kCols] = {};
  acc_t dv[kRowsPerWarp][kCols] = {};
  for (int64_t h = kv_head * p.group_size(); h < (kv_head + 1) * p.group_size(); ++h) {
    for (int64_t q0 = queries.begin / kTile * kTile; q0 < queries.end; q0 += kTile) {
      const int rows = static_cast<int>(min64(kTile, seq.query_len - q0));
      __syncthreads();
      load_tile(p.query.row<const scalar_t>(b, h, q0), p.query.stride_row, rows, p.head_dim, scale,
                q_tile, ld_q);
      load_tile(p.grad_output.row<const scalar_t>(b, h, q0), p.grad_output.stride_row, rows,
                p.value_dim, acc_t(1), do_tile, ld_v);
      if (threadIdx.x < kTile) {
        const int64_t i = q0 + threadIdx.x;
        const bool real = static_cast<int>(threadIdx.x) < rows;
        const acc_t* row = real ? p.softmax_stats.row<const acc_t>(b, h, i) : nullptr;
        query_stats[threadIdx.x] = real ? row[0] : std::numeric_limits<acc_t>::infinity();
        query_stats[kTile + threadIdx.x] = real ? row[1] : acc_t(0);
        query_stats[2 * kTile + threadIdx.x] = real ? *p.delta.row<const acc_t>(b, h, i) : acc_t(0);
      }
      __syncthreads();

#pragma unroll
      for (int kk = 0; kk < kRowsPerWarp; ++kk) {
        const int key = warp * kRowsPerWarp + kk;
        const int64_t i = q0 + lane, j = k0 + key;
        acc_t pd = 0, ds = 0;
        if (key < cols && lane < rows) {
          const acc_t dot = dot_rows(q_tile + lane * ld_q, k_tile + key * ld_q, p.head_dim);
          acc_t slope = 1;
          const acc_t score = masked_score(p, seq, b, h, i, j, dot, &slope);
          const acc_t prob = exp((score - query_stats[lane]) - query_stats[kTile + lane]);
          const acc_t factor = dropout_factor<acc_t>(p, b, h, i, j);
          acc_t dprob = dot_rows(v_tile + key * ld_v, do_tile + lane * ld_v, p.value_dim);
          if (p.grad_weights.data != nullptr) {
            dprob += weights_grad_at<scalar_t, acc_t>(p, b, h, i, j);
          }
          pd = prob * factor;
          ds = prob * (dprob * factor - query_stats[2 * kTile + lane]) * slope;
        }
        pt_tile[key * ld_p + lane] = pd;
        dst_tile[key * ld_p + lane] = ds;
      }
      __syncwarp();
#pragma unroll
      for (int kk = 0; kk < kRowsPerWarp; ++kk) {
        const int key = warp * kRowsPerWarp + kk;
#pragma unroll
        for (int c = 0; c < kCols; ++c) {
          const int d = lane + 32 * c;
          acc_t sum_v = 0, sum_k = 0;
          for (int r = 0; r < rows; ++r) {
            if (d < p.value_dim) {
              sum_v += pt_tile[key * ld_p + r] * do_tile[r * ld_v + d];
            }
            if (d < p.head_dim) {
              sum_k += dst_tile[key * ld_p + r] * q_tile[r * ld_q + d];
            }
          }
          dv[kk][c] += sum_v;
          dk[kk][c] += sum_k;  // q_tile is scaled: dK = scale * dS^T Q
        }
      }
    }
  }

#pragma unroll
  for (int kk = 0; kk < kRowsPerWarp; ++kk) {
    const int key = warp * kRowsPerWarp + kk;
    if (key >= cols) {
      continue;
    }
    scalar_t* dk_row = p.grad_key.row<scalar_t>(b, kv_head, k0 + key);
    scalar_t* dv_row = p.grad_value.row<scalar_t>(b, kv_head, k0 + key);
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int d = lane + 32 * c;
      if (d < p.head_dim) {
        dk_row[d] = static_cast<scalar_t>(dk[kk][c]);
      }
      if (d < p.value_dim) {
        dv_row[d] = static_cast<scalar_t>(dv[kk][c]);
      }
    }
  }
}

// dQ (and the mask gradient, dS itself): one block per (batch, head, query tile). Each warp owns
// 8 query rows; lane j is key j of the current key tile.
template <typename scalar_t, typename acc_t, int kDim>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    attention_backward_dq_kernel(const AttentionBackwardParams p) {
  constexpr int kCols = kDim / 32;
  TORCH_MHA_DYNAMIC_SHARED_MEMORY(shared_bytes);
  acc_t* shared = reinterpret_cast<acc_t*>(shared_bytes);
  const int ld_q = p.head_dim + 1, ld_v = p.value_dim + 1, ld_p = kTile + 1;
  acc_t* q_tile = shared;                  // (scale Q) of this block
  acc_t* do_tile = q_tile + kTile * ld_q;  // dO of this block
  acc_t* k_tile = do_tile + kTile * ld_v;  // keys of the current tile
  acc_t* v_tile = k_tile + kTile * ld_q;   // values of the current tile
  acc_t* ds_tile = v_tile + kTile * ld_v;  // dS, [query][key]

  const BlockIndex block = BlockIndex::decode(tiles_of(p.query_len), p.heads);
  const int64_t b = block.batch, h = block.head, q0 = block.tile * kTile;
  const SequenceLengths seq(p, b);
  if (q0 >= seq.query_len) {
    return;  // past the end of a shorter sequence of a packed batch: the whole block leaves
  }
  const int64_t kv_head = p.kv_head_of(h);
  const int rows = static_cast<int>(min64(kTile, seq.query_len - q0));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const IndexRange keys = p.visibility.keys_of_block(q0, q0 + rows - 1, seq.query_len, seq.key_len);
  acc_t* grad_mask = static_cast<acc_t*>(p.grad_mask);

  load_tile(p.query.row<const scalar_t>(b, h, q0), p.query.stride_row, rows, p.head_dim,
            static_cast<acc_t>(p.scale), q_tile, ld_q);
  load_tile(p.grad_output.row<const scalar_t>(b, h, q0), p.grad_output.stride_row, rows,
            p.value_dim, acc_t(1), do_tile, ld_v);
  RowStats<acc_t> row_stats;
  row_stats.load(p, seq, b, h, q0, warp);
  acc_t row_delta[kRowsPerWarp];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int64_t i = q0 + warp * kRowsPerWarp + rr;
    row_delta[rr] = i < seq.query_len ? *p.delta.row<const acc_t>(b, h, i) : acc_t(0);
  }

  acc_t dq[kRowsPerWarp][kCols] = {};
  for (int64_t k0 = keys.begin; k0 < keys.end; k0 += kTile) {
    const int cols = static_cast<int>(min64(kTile, keys.end - k0));
    __syncthreads();
    load_tile(p.key.row<const scalar_t>(b, kv_head, k0), p.key.stride_row, cols, p.head_dim,
              acc_t(1), k_tile, ld_q);
    load_tile(p.value.row<const scalar_t>(b, kv_head, k0), p.value.stride_row, cols, p.value_dim,
              acc_t(1), v_tile, ld_v);
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = warp * kRowsPerWarp + rr;
      const int64_t i = q0 + r, j = k0 + lane;
      acc_t ds = 0;
      if (r < rows && lane < cols) {
        const acc_t dot = dot_rows(q_tile + r * ld_q, k_tile + lane * ld_q, p.head_dim);
        acc_t slope = 1;
        const acc_t prob = row_stats.probability(rr, masked_score(p, seq, b, h, i, j, dot, &slope));
        acc_t dprob = dot_rows(do_tile + r * ld_v, v_tile + lane * ld_v, p.value_dim);
        if (p.grad_weights.data != nullptr) {
          dprob += weights_grad_at<scalar_t, acc_t>(p, b, h, i, j);
        }
        ds = prob * (dprob * dropout_factor<acc_t>(p, b, h, i, j) - row_delta[rr]);
        if (grad_mask != nullptr) {
          // The masks are added after the softcap: their gradient is dS itself.
          grad_mask[((b * p.heads + h) * p.query_len + i) * p.key_len + j] = ds;
        }
        ds *= slope;
      }
      ds_tile[r * ld_p + lane] = ds;
    }
    __syncwarp();
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = warp * kRowsPerWarp + rr;
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const int d = lane + 32 * c;
        if (d < p.head_dim) {
          acc_t sum = 0;
          for (int jj = 0; jj < cols; ++jj) {
            sum += ds_tile[r * ld_p + jj] * k_tile[jj * ld_q + d];
          }
          dq[rr][c] += sum;
        }
      }
    }
  }

#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int r = warp * kRowsPerWarp + rr;
    if (r >= rows) {
      continue;
    }
    scalar_t* dq_row = p.grad_query.row<scalar_t>(b, h, q0 + r);
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int d = lane + 32 * c;
      if (d < p.head_dim) {
        dq_row[d] = static_cast<scalar_t>(static_cast<acc_t>(p.scale) * dq[rr][c]);
      }
    }
  }
}

}  // namespace torch_mha::cuda
