// Fused attention on NVIDIA GPUs: forward, attention weights, and backward.
//
// The kernels are plain SIMT code (no tensor-core instructions) written to be reviewed line by
// line: nothing here can be run in this project's CI, so correctness rests on the build, on the
// host/device headers in common/ (online softmax, masks, dropout) that the CPU kernels also use
// and the CPU tests exercise, and on the GPU test suite wherever a GPU is present.
//
// Tiles: a block of kTile (32) queries against tiles of kTile keys, 4 warps per thread block.
//  * forward / dQ / weights kernels: each warp owns 8 query rows; lane j is key j of the tile;
//  * dK/dV kernel: each warp owns 8 keys; lane i is query i of the tile.
// Score tiles live in shared memory with rows padded by one element, so that lanes reading down a
// column hit distinct banks. Accumulators are float32 (float64 for float64 inputs); each lane
// keeps kDim / 32 columns of its rows (kDim = head dim rounded up to 32, 64 or 128).
//
// The backward is deterministic: dK/dV are computed per key block and dQ per query block, each
// by exactly one thread block, in a fixed order; no atomics anywhere.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "common/dropout.h"
#include "common/masking.h"
#include "common/softmax.h"

namespace torch_mha::cuda {

constexpr int kTile = 32;  // queries per block and keys per tile
constexpr int kWarps = 4;  // warps per thread block
constexpr int kRowsPerWarp = kTile / kWarps;
constexpr int kThreads = kWarps * 32;
// Occupancy hint for __launch_bounds__: without a minimum, ptxas aimed for more resident blocks
// and spilled the forward kernel's accumulators at head_dim 64.
constexpr int kMinBlocksPerSm = 2;

// A 4-D tensor (batch, head, row, column) whose columns are contiguous.
template <typename T>
struct Rows {
  T* data;
  int64_t stride_batch;
  int64_t stride_head;
  int64_t stride_row;

  __device__ T* row(int64_t b, int64_t h, int64_t r) const {
    return data + b * stride_batch + h * stride_head + r * stride_row;
  }
};

// Gradient of the returned weights as (batch, head, query, key) strides (head stride 0 when the
// weights were averaged over heads).
template <typename T, typename acc_t>
struct WeightsGrad {
  const T* data;  // nullptr when the weights were not differentiated
  int64_t strides[4];
  acc_t scale;  // 1/heads when averaged, else 1

  __device__ acc_t at(int64_t b, int64_t h, int64_t i, int64_t j) const {
    return scale * static_cast<acc_t>(
                       data[b * strides[0] + h * strides[1] + i * strides[2] + j * strides[3]]);
  }
};

template <typename scalar_t, typename acc_t>
struct AttentionParams {
  Rows<const scalar_t> query, key, value;
  int64_t batch, heads, query_len, key_len, head_dim, value_dim;
  MaskView attn_mask;
  MaskView key_padding_mask;
  bool is_causal;
  acc_t scale;
  // Dropout: the seed is read on the device, so a launch needs no host synchronisation.
  bool dropout;
  const int64_t* dropout_seed;
  uint32_t dropout_threshold;
  acc_t dropout_keep_scale;
};

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

// Masked, scaled score of query i against key j, given the dot product of the scaled query.
template <typename scalar_t, typename acc_t>
__device__ acc_t masked_score(const AttentionParams<scalar_t, acc_t>& p, int64_t b, int64_t h,
                              int64_t i, int64_t j, acc_t dot) {
  if (j >= p.key_len || (p.is_causal && causal_masked_out(i, j))) {
    return negative_infinity<acc_t>();
  }
  acc_t score = dot;
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
template <typename scalar_t, typename acc_t>
__device__ acc_t dropout_factor(const AttentionParams<scalar_t, acc_t>& p, int64_t b, int64_t h,
                                int64_t i, int64_t j) {
  if (!p.dropout) {
    return acc_t(1);
  }
  const uint64_t seed = static_cast<uint64_t>(*p.dropout_seed);
  const uint64_t row_id = dropout_row_id(b, h, i, p.heads, p.query_len);
  return dropout_keep(seed, row_id, j, p.dropout_threshold) ? p.dropout_keep_scale : acc_t(0);
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
    attention_forward_kernel(AttentionParams<scalar_t, acc_t> p, Rows<scalar_t> out, acc_t* stats) {
  constexpr int kCols = kDim / 32;
  extern __shared__ unsigned char shared_bytes[];
  acc_t* shared = reinterpret_cast<acc_t*>(shared_bytes);
  const int ld_q = p.head_dim + 1, ld_v = p.value_dim + 1, ld_p = kTile + 1;
  acc_t* q_tile = shared;                 // (scale Q) of the block, kTile x head_dim
  acc_t* k_tile = q_tile + kTile * ld_q;  // keys of the current tile
  acc_t* v_tile = k_tile + kTile * ld_q;  // values of the current tile
  acc_t* p_tile = v_tile + kTile * ld_v;  // probabilities (after dropout)

  const BlockIndex block = BlockIndex::decode((p.query_len + kTile - 1) / kTile, p.heads);
  const int64_t b = block.batch, h = block.head, q0 = block.tile * kTile;
  const int rows = static_cast<int>(min64(kTile, p.query_len - q0));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t key_end = p.is_causal ? causal_key_limit(q0 + rows - 1, p.key_len) : p.key_len;

  load_tile(p.query.row(b, h, q0), p.query.stride_row, rows, p.head_dim, p.scale, q_tile, ld_q);

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

  for (int64_t k0 = 0; k0 < key_end; k0 += kTile) {
    const int cols = static_cast<int>(min64(kTile, key_end - k0));
    __syncthreads();  // everyone is done with the previous key/value tile
    load_tile(p.key.row(b, h, k0), p.key.stride_row, cols, p.head_dim, acc_t(1), k_tile, ld_q);
    load_tile(p.value.row(b, h, k0), p.value.stride_row, cols, p.value_dim, acc_t(1), v_tile, ld_v);
    __syncthreads();

#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = warp * kRowsPerWarp + rr;
      const int64_t i = q0 + r, j = k0 + lane;
      const acc_t dot = dot_rows(q_tile + r * ld_q, k_tile + lane * ld_q, p.head_dim);
      const bool visible = r < rows && lane < cols;  // never read masks past the tensors
      const acc_t score = visible ? masked_score(p, b, h, i, j, dot) : negative_infinity<acc_t>();
      const acc_t rescale = online_softmax_update_max(running_max[rr], warp_max(score));
      const acc_t prob = exp(score - softmax_exp_offset(running_max[rr]));
      running_sum[rr] = running_sum[rr] * rescale + warp_sum(prob);
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        acc[rr][c] *= rescale;
      }
      // The running sum uses the undropped probabilities; only P V sees the dropout mask.
      p_tile[r * ld_p + lane] = visible ? prob * dropout_factor(p, b, h, i, j) : acc_t(0);
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

#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int r = warp * kRowsPerWarp + rr;
    if (r >= rows) {
      continue;
    }
    const int64_t i = q0 + r;
    const SoftmaxRowStats<acc_t> row = online_softmax_finish(running_max[rr], running_sum[rr]);
    scalar_t* out_row = out.row(b, h, i);
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int d = lane + 32 * c;
      if (d < p.value_dim) {
        out_row[d] = static_cast<scalar_t>(acc[rr][c] * row.inverse_sum);
      }
    }
    if (lane == 0) {
      acc_t* row_stats = stats + 2 * ((b * p.heads + h) * p.query_len + i);
      row_stats[0] = row.offset;
      row_stats[1] = row.log_sum;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Probabilities recomputed from the saved row statistics (weights output, weights gradient
// term, dQ kernel). Each warp produces, for its 8 rows and the key tile, prob (before dropout)
// and its dropout factor, lane j holding key k0 + j.

template <typename scalar_t, typename acc_t>
struct RowStats {
  acc_t offset[kRowsPerWarp];
  acc_t log_sum[kRowsPerWarp];

  __device__ void load(const acc_t* stats, const AttentionParams<scalar_t, acc_t>& p, int64_t b,
                       int64_t h, int64_t q0, int warp) {
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int64_t i = q0 + warp * kRowsPerWarp + rr;
      // Rows past the end behave as fully masked: probability 0.
      const bool real = i < p.query_len;
      const acc_t* row = stats + 2 * ((b * p.heads + h) * p.query_len + i);
      offset[rr] = real ? row[0] : std::numeric_limits<acc_t>::infinity();
      log_sum[rr] = real ? row[1] : acc_t(0);
    }
  }

  __device__ acc_t probability(int rr, acc_t score) const {
    return exp((score - offset[rr]) - log_sum[rr]);
  }
};

// Weights: one block per (batch, head, query tile), or per (batch, query tile) when averaging.
// Averaged weights are summed over the heads by one thread per element, in head order
// (deterministic), in the accumulate type.
template <typename scalar_t, typename acc_t, int kDim>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    attention_weights_kernel(AttentionParams<scalar_t, acc_t> p, const acc_t* stats, bool average,
                             acc_t* average_out, scalar_t* per_head_out) {
  extern __shared__ unsigned char shared_bytes[];
  acc_t* shared = reinterpret_cast<acc_t*>(shared_bytes);
  const int ld_q = p.head_dim + 1;
  acc_t* q_tile = shared;
  acc_t* k_tile = q_tile + kTile * ld_q;

  const BlockIndex block =
      BlockIndex::decode((p.query_len + kTile - 1) / kTile, average ? 1 : p.heads);
  const int64_t b = block.batch, q0 = block.tile * kTile;
  const int rows = static_cast<int>(min64(kTile, p.query_len - q0));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t first_head = average ? 0 : block.head;
  const int64_t last_head = average ? p.heads : first_head + 1;
  const acc_t head_weight = average ? acc_t(1) / static_cast<acc_t>(p.heads) : acc_t(1);

  for (int64_t h = first_head; h < last_head; ++h) {
    __syncthreads();
    load_tile(p.query.row(b, h, q0), p.query.stride_row, rows, p.head_dim, p.scale, q_tile, ld_q);
    RowStats<scalar_t, acc_t> row_stats;
    row_stats.load(stats, p, b, h, q0, warp);
    for (int64_t k0 = 0; k0 < p.key_len; k0 += kTile) {
      const int cols = static_cast<int>(min64(kTile, p.key_len - k0));
      __syncthreads();
      load_tile(p.key.row(b, h, k0), p.key.stride_row, cols, p.head_dim, acc_t(1), k_tile, ld_q);
      __syncthreads();
#pragma unroll
      for (int rr = 0; rr < kRowsPerWarp; ++rr) {
        const int r = warp * kRowsPerWarp + rr;
        const int64_t i = q0 + r, j = k0 + lane;
        if (r >= rows || lane >= cols) {
          continue;
        }
        const acc_t dot = dot_rows(q_tile + r * ld_q, k_tile + lane * ld_q, p.head_dim);
        const acc_t weight = row_stats.probability(rr, masked_score(p, b, h, i, j, dot)) *
                             dropout_factor(p, b, h, i, j);
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
    softmax_delta_kernel(Rows<const scalar_t> grad_output, Rows<const scalar_t> output,
                         int64_t heads, int64_t query_len, int64_t value_dim, int64_t rows_total,
                         acc_t* delta) {
  const int64_t row =
      static_cast<int64_t>(blockIdx.x) * kWarps + static_cast<int64_t>(threadIdx.x / 32);
  const int lane = threadIdx.x % 32;
  if (row >= rows_total) {
    return;
  }
  const int64_t b = row / (heads * query_len), h = (row / query_len) % heads, i = row % query_len;
  const scalar_t* d_row = grad_output.row(b, h, i);
  const scalar_t* o_row = output.row(b, h, i);
  acc_t sum = 0;
  for (int64_t d = lane; d < value_dim; d += 32) {
    sum += static_cast<acc_t>(d_row[d]) * static_cast<acc_t>(o_row[d]);
  }
  sum = warp_sum(sum);
  if (lane == 0) {
    delta[row] = sum;
  }
}

// delta[b, h, i] += sum_j dW_ij W_ij, with W recomputed: one block per (batch, head, query tile).
template <typename scalar_t, typename acc_t, int kDim>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    weights_delta_kernel(AttentionParams<scalar_t, acc_t> p, const acc_t* stats,
                         WeightsGrad<scalar_t, acc_t> grad_weights, acc_t* delta) {
  extern __shared__ unsigned char shared_bytes[];
  acc_t* shared = reinterpret_cast<acc_t*>(shared_bytes);
  const int ld_q = p.head_dim + 1;
  acc_t* q_tile = shared;
  acc_t* k_tile = q_tile + kTile * ld_q;

  const BlockIndex block = BlockIndex::decode((p.query_len + kTile - 1) / kTile, p.heads);
  const int64_t b = block.batch, h = block.head, q0 = block.tile * kTile;
  const int rows = static_cast<int>(min64(kTile, p.query_len - q0));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t key_end = p.is_causal ? causal_key_limit(q0 + rows - 1, p.key_len) : p.key_len;

  load_tile(p.query.row(b, h, q0), p.query.stride_row, rows, p.head_dim, p.scale, q_tile, ld_q);
  RowStats<scalar_t, acc_t> row_stats;
  row_stats.load(stats, p, b, h, q0, warp);
  acc_t sums[kRowsPerWarp] = {};
  for (int64_t k0 = 0; k0 < key_end; k0 += kTile) {
    const int cols = static_cast<int>(min64(kTile, key_end - k0));
    __syncthreads();
    load_tile(p.key.row(b, h, k0), p.key.stride_row, cols, p.head_dim, acc_t(1), k_tile, ld_q);
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = warp * kRowsPerWarp + rr;
      const int64_t i = q0 + r, j = k0 + lane;
      if (r < rows && lane < cols) {
        const acc_t dot = dot_rows(q_tile + r * ld_q, k_tile + lane * ld_q, p.head_dim);
        const acc_t weight = row_stats.probability(rr, masked_score(p, b, h, i, j, dot)) *
                             dropout_factor(p, b, h, i, j);
        sums[rr] += static_cast<acc_t>(grad_weights.at(b, h, i, j)) * weight;
      }
    }
  }
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int r = warp * kRowsPerWarp + rr;
    const acc_t total = warp_sum(sums[rr]);
    if (lane == 0 && r < rows) {
      delta[(b * p.heads + h) * p.query_len + q0 + r] += total;
    }
  }
}

// dK and dV: one block per (batch, head, key tile). Each warp owns 8 keys; lane i is query i of
// the current query tile.
template <typename scalar_t, typename acc_t, int kDim>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    attention_backward_dkdv_kernel(AttentionParams<scalar_t, acc_t> p,
                                   Rows<const scalar_t> grad_output, const acc_t* stats,
                                   const acc_t* delta, WeightsGrad<scalar_t, acc_t> grad_weights,
                                   bool has_grad_weights, Rows<scalar_t> grad_key,
                                   Rows<scalar_t> grad_value) {
  constexpr int kCols = kDim / 32;
  extern __shared__ unsigned char shared_bytes[];
  acc_t* shared = reinterpret_cast<acc_t*>(shared_bytes);
  const int ld_q = p.head_dim + 1, ld_v = p.value_dim + 1, ld_p = kTile + 1;
  acc_t* k_tile = shared;                        // this block's keys
  acc_t* v_tile = k_tile + kTile * ld_q;         // this block's values
  acc_t* q_tile = v_tile + kTile * ld_v;         // (scale Q) of the current query tile
  acc_t* do_tile = q_tile + kTile * ld_q;        // dO of the current query tile
  acc_t* pt_tile = do_tile + kTile * ld_v;       // P^T after dropout, [key][query]
  acc_t* dst_tile = pt_tile + kTile * ld_p;      // dS^T, [key][query]
  acc_t* query_stats = dst_tile + kTile * ld_p;  // offset, log_sum, delta per query of the tile

  const BlockIndex block = BlockIndex::decode((p.key_len + kTile - 1) / kTile, p.heads);
  const int64_t b = block.batch, h = block.head, k0 = block.tile * kTile;
  const int cols = static_cast<int>(min64(kTile, p.key_len - k0));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  load_tile(p.key.row(b, h, k0), p.key.stride_row, cols, p.head_dim, acc_t(1), k_tile, ld_q);
  load_tile(p.value.row(b, h, k0), p.value.stride_row, cols, p.value_dim, acc_t(1), v_tile, ld_v);

  acc_t dk[kRowsPerWarp][kCols] = {};
  acc_t dv[kRowsPerWarp][kCols] = {};
  // Causal: queries before k0 see none of these keys.
  const int64_t first_query = p.is_causal ? k0 / kTile * kTile : 0;
  for (int64_t q0 = first_query; q0 < p.query_len; q0 += kTile) {
    const int rows = static_cast<int>(min64(kTile, p.query_len - q0));
    __syncthreads();
    load_tile(p.query.row(b, h, q0), p.query.stride_row, rows, p.head_dim, p.scale, q_tile, ld_q);
    load_tile(grad_output.row(b, h, q0), grad_output.stride_row, rows, p.value_dim, acc_t(1),
              do_tile, ld_v);
    if (threadIdx.x < kTile) {
      const int64_t i = q0 + threadIdx.x;
      const bool real = threadIdx.x < rows;
      const acc_t* row = stats + 2 * ((b * p.heads + h) * p.query_len + i);
      query_stats[threadIdx.x] = real ? row[0] : std::numeric_limits<acc_t>::infinity();
      query_stats[kTile + threadIdx.x] = real ? row[1] : acc_t(0);
      query_stats[2 * kTile + threadIdx.x] =
          real ? delta[(b * p.heads + h) * p.query_len + i] : acc_t(0);
    }
    __syncthreads();

#pragma unroll
    for (int kk = 0; kk < kRowsPerWarp; ++kk) {
      const int key = warp * kRowsPerWarp + kk;
      const int64_t i = q0 + lane, j = k0 + key;
      acc_t pd = 0, ds = 0;
      if (key < cols && lane < rows) {
        const acc_t dot = dot_rows(q_tile + lane * ld_q, k_tile + key * ld_q, p.head_dim);
        const acc_t score = masked_score(p, b, h, i, j, dot);
        const acc_t prob = exp((score - query_stats[lane]) - query_stats[kTile + lane]);
        const acc_t factor = dropout_factor(p, b, h, i, j);
        acc_t dprob = dot_rows(v_tile + key * ld_v, do_tile + lane * ld_v, p.value_dim);
        if (has_grad_weights) {
          dprob += static_cast<acc_t>(grad_weights.at(b, h, i, j));
        }
        pd = prob * factor;
        ds = prob * (dprob * factor - query_stats[2 * kTile + lane]);
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

#pragma unroll
  for (int kk = 0; kk < kRowsPerWarp; ++kk) {
    const int key = warp * kRowsPerWarp + kk;
    if (key >= cols) {
      continue;
    }
    scalar_t* dk_row = grad_key.row(b, h, k0 + key);
    scalar_t* dv_row = grad_value.row(b, h, k0 + key);
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
    attention_backward_dq_kernel(AttentionParams<scalar_t, acc_t> p,
                                 Rows<const scalar_t> grad_output, const acc_t* stats,
                                 const acc_t* delta, WeightsGrad<scalar_t, acc_t> grad_weights,
                                 bool has_grad_weights, Rows<scalar_t> grad_query,
                                 acc_t* grad_mask) {
  constexpr int kCols = kDim / 32;
  extern __shared__ unsigned char shared_bytes[];
  acc_t* shared = reinterpret_cast<acc_t*>(shared_bytes);
  const int ld_q = p.head_dim + 1, ld_v = p.value_dim + 1, ld_p = kTile + 1;
  acc_t* q_tile = shared;                  // (scale Q) of this block
  acc_t* do_tile = q_tile + kTile * ld_q;  // dO of this block
  acc_t* k_tile = do_tile + kTile * ld_v;  // keys of the current tile
  acc_t* v_tile = k_tile + kTile * ld_q;   // values of the current tile
  acc_t* ds_tile = v_tile + kTile * ld_v;  // dS, [query][key]

  const BlockIndex block = BlockIndex::decode((p.query_len + kTile - 1) / kTile, p.heads);
  const int64_t b = block.batch, h = block.head, q0 = block.tile * kTile;
  const int rows = static_cast<int>(min64(kTile, p.query_len - q0));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t key_end = p.is_causal ? causal_key_limit(q0 + rows - 1, p.key_len) : p.key_len;

  load_tile(p.query.row(b, h, q0), p.query.stride_row, rows, p.head_dim, p.scale, q_tile, ld_q);
  load_tile(grad_output.row(b, h, q0), grad_output.stride_row, rows, p.value_dim, acc_t(1), do_tile,
            ld_v);
  RowStats<scalar_t, acc_t> row_stats;
  row_stats.load(stats, p, b, h, q0, warp);
  acc_t row_delta[kRowsPerWarp];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int64_t i = q0 + warp * kRowsPerWarp + rr;
    row_delta[rr] = i < p.query_len ? delta[(b * p.heads + h) * p.query_len + i] : acc_t(0);
  }

  acc_t dq[kRowsPerWarp][kCols] = {};
  for (int64_t k0 = 0; k0 < key_end; k0 += kTile) {
    const int cols = static_cast<int>(min64(kTile, key_end - k0));
    __syncthreads();
    load_tile(p.key.row(b, h, k0), p.key.stride_row, cols, p.head_dim, acc_t(1), k_tile, ld_q);
    load_tile(p.value.row(b, h, k0), p.value.stride_row, cols, p.value_dim, acc_t(1), v_tile, ld_v);
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = warp * kRowsPerWarp + rr;
      const int64_t i = q0 + r, j = k0 + lane;
      acc_t ds = 0;
      if (r < rows && lane < cols) {
        const acc_t dot = dot_rows(q_tile + r * ld_q, k_tile + lane * ld_q, p.head_dim);
        const acc_t prob = row_stats.probability(rr, masked_score(p, b, h, i, j, dot));
        acc_t dprob = dot_rows(do_tile + r * ld_v, v_tile + lane * ld_v, p.value_dim);
        if (has_grad_weights) {
          dprob += static_cast<acc_t>(grad_weights.at(b, h, i, j));
        }
        ds = prob * (dprob * dropout_factor(p, b, h, i, j) - row_delta[rr]);
        if (grad_mask != nullptr) {
          grad_mask[((b * p.heads + h) * p.query_len + i) * p.key_len + j] = ds;
        }
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
    scalar_t* dq_row = grad_query.row(b, h, q0 + r);
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int d = lane + 32 * c;
      if (d < p.head_dim) {
        dq_row[d] = static_cast<scalar_t>(p.scale * dq[rr][c]);
      }
    }
  }
}

}  // namespace torch_mha::cuda
