// Fused (flash-style) attention on the CPU: forward and backward, one build per vector ISA.
//
// The kernels work on transposed score tiles: S^T = K Q^T, keys down the rows and a block of
// queries along the vectorised dimension. That choice removes every horizontal reduction from
// the online softmax (row maxima and sums become element-wise vector operations over queries),
// and it lets the products read K, V, Q and dO straight from the caller's tensors: only Q^T and
// dO^T of a query block are packed. Products are block_matmul register tiles (block_matmul.h).
//
// Forward, per (batch, head, block of queries): for each block of keys, S^T = K (scale Q)^T plus
// masks, online softmax per query (running max m and sum l), O += P V. Memory is O(L): the L x S
// probabilities are only written when the caller asks for the attention weights.
//
// Backward, per (batch, head, chunk of key blocks): recompute P^T from the saved row statistics;
// dV and dK of a key block accumulate in float32 scratch across all query blocks, dQ goes to one
// float32 partial sum per chunk, reduced in a fixed order afterwards. The number of chunks
// depends only on the problem size, never on the thread count, so gradients are bitwise
// reproducible for any number of threads.
#ifndef CPU_CAPABILITY
#error "attention_kernel.cpp is compiled once per ISA with -DCPU_CAPABILITY=<ISA> (see setup.py)"
#endif

#include "cpu/attention_kernel.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/dropout.h"
#include "common/masking.h"
#include "common/softmax.h"
#include "cpu/block_matmul.h"

namespace torch_mha::cpu::CPU_CAPABILITY {
namespace {

// Typed view of StridedRows.
template <typename T>
struct RowAccessor {
  T* data;
  int64_t stride_batch;
  int64_t stride_head;
  int64_t stride_row;

  explicit RowAccessor(const StridedRows& rows)
      : data(static_cast<T*>(rows.data)),
        stride_batch(rows.stride_batch),
        stride_head(rows.stride_head),
        stride_row(rows.stride_row) {}

  T* row(int64_t batch, int64_t head, int64_t r) const {
    return data + batch * stride_batch + head * stride_head + r * stride_row;
  }
};

// Per-thread scratch that grows on demand and is reused across work items.
template <typename T>
T* scratch(std::vector<T>& buffer, int64_t size) {
  if (static_cast<int64_t>(buffer.size()) < size) {
    buffer.resize(size);
  }
  return buffer.data();
}

// dst[r, c] = multiplier * src[r, c] for r < rows, c < cols; columns [cols, ld) are zeroed.
template <typename scalar_t, typename acc_t>
void pack_rows(const scalar_t* src, int64_t src_row_stride, int64_t rows, int64_t cols,
               acc_t multiplier, acc_t* dst, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* in = src + r * src_row_stride;
    acc_t* out = dst + r * ld;
    for (int64_t c = 0; c < cols; ++c) {
      out[c] = multiplier * static_cast<acc_t>(in[c]);
    }
    std::fill(out + cols, out + ld, acc_t(0));
  }
}

// dst[c, r] = multiplier * src[r, c] for r < rows, c < cols; columns [rows, padded_rows) of
// dst are zeroed. Used for Q^T and dO^T of a query block.
template <typename scalar_t, typename acc_t>
void pack_transposed(const scalar_t* src, int64_t src_row_stride, int64_t rows, int64_t cols,
                     acc_t multiplier, acc_t* dst, int64_t ld, int64_t padded_rows) {
  for (int64_t c = 0; c < cols; ++c) {
    std::fill(dst + c * ld + rows, dst + c * ld + padded_rows, acc_t(0));
  }
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* in = src + r * src_row_stride;
    for (int64_t c = 0; c < cols; ++c) {
      dst[c * ld + r] = multiplier * static_cast<acc_t>(in[c]);
    }
  }
}

// Rows of an input as the B operand of block_matmul: the input itself when it already is a
// float tensor of whole vectors, else a packed float copy in `buffer`.
template <typename acc_t>
struct RowsOperand {
  const acc_t* data;
  int64_t ld;
};

template <typename scalar_t, typename acc_t>
RowsOperand<acc_t> rows_operand(const scalar_t* src, int64_t src_row_stride, int64_t rows,
                                int64_t cols, std::vector<acc_t>& buffer) {
  constexpr int64_t kWidth = vector_width<acc_t>();
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (cols % kWidth == 0) {
      return {src, src_row_stride};
    }
  }
  const int64_t ld = round_up(cols, kWidth);
  acc_t* packed = scratch(buffer, rows * ld);
  pack_rows(src, src_row_stride, rows, cols, acc_t(1), packed, ld);
  return {packed, ld};
}

template <typename scalar_t, typename acc_t>
void store_row(const acc_t* src, int64_t count, acc_t multiplier, scalar_t* dst) {
  for (int64_t c = 0; c < count; ++c) {
    dst[c] = static_cast<scalar_t>(multiplier * src[c]);
  }
}

template <typename acc_t>
at::vec::Vectorized<acc_t> exp_vec(const at::vec::Vectorized<acc_t>& x) {
  // float: PyTorch's fast exp (about 20 ulp, exact 0 for -inf), as its own flash kernel uses.
  if constexpr (std::is_same_v<acc_t, float>) {
    return x.exp_u20();
  } else {
    return x.exp();
  }
}

// ---- Masks on a transposed tile: st[j * ld + i] is (key k0 + j, query q0 + i).

template <typename acc_t, typename mask_t>
void add_mask_transposed(const mask_t* mask, int64_t stride_query, int64_t stride_key, int64_t rows,
                         int64_t cols, acc_t* st, int64_t ld) {
  using Vec = at::vec::Vectorized<acc_t>;
  if (stride_query == 0) {
    // The same value for every query (key padding masks, (N, 1, 1, S) biases): one broadcast
    // add per key, skipped where the mask adds nothing.
    for (int64_t j = 0; j < cols; ++j) {
      const acc_t bias = mask_bias<acc_t>(mask[j * stride_key]);
      if (bias != acc_t(0)) {
        at::vec::map([bias](Vec x) { return x + Vec(bias); }, st + j * ld, st + j * ld, rows);
      }
    }
    return;
  }
  for (int64_t j = 0; j < cols; ++j) {
    acc_t* s = st + j * ld;
    const mask_t* m = mask + j * stride_key;
    for (int64_t i = 0; i < rows; ++i) {
      s[i] += mask_bias<acc_t>(m[i * stride_query]);
    }
  }
}

template <typename acc_t>
void apply_mask(const MaskView& mask, int64_t batch, int64_t head, int64_t q0, int64_t rows,
                int64_t k0, int64_t cols, acc_t* st, int64_t ld) {
  const int64_t offset = mask.row_offset(batch, head, q0) + k0 * mask.stride_key;
  const int64_t sq = mask.stride_query, sk = mask.stride_key;
  switch (mask.kind) {
    case MaskKind::kBool:
      add_mask_transposed(static_cast<const bool*>(mask.data) + offset, sq, sk, rows, cols, st, ld);
      break;
    case MaskKind::kFloat:
      add_mask_transposed(static_cast<const float*>(mask.data) + offset, sq, sk, rows, cols, st,
                          ld);
      break;
    case MaskKind::kDouble:
      add_mask_transposed(static_cast<const double*>(mask.data) + offset, sq, sk, rows, cols, st,
                          ld);
      break;
    case MaskKind::kBFloat16:
      add_mask_transposed(static_cast<const c10::BFloat16*>(mask.data) + offset, sq, sk, rows, cols,
                          st, ld);
      break;
    case MaskKind::kHalf:
      add_mask_transposed(static_cast<const c10::Half*>(mask.data) + offset, sq, sk, rows, cols, st,
                          ld);
      break;
    case MaskKind::kNone:
      break;
  }
}

// Everything that turns raw scores into masked scores, identical in the forward, the weights
// sweep and the backward recomputation.
struct ScoreMasking {
  MaskView attn_mask;
  MaskView key_padding_mask;
  bool is_causal;

  template <typename acc_t>
  void apply(int64_t batch, int64_t head, int64_t q0, int64_t rows, int64_t k0, int64_t cols,
             acc_t* st, int64_t ld) const {
    apply_mask(attn_mask, batch, head, q0, rows, k0, cols, st, ld);
    apply_mask(key_padding_mask, batch, head, q0, rows, k0, cols, st, ld);
    if (is_causal) {
      // Key k0 + j is hidden from queries q0 + i < k0 + j: a prefix of each key row.
      for (int64_t j = 0; j < cols; ++j) {
        const int64_t hidden = std::min(rows, k0 + j - q0);
        if (hidden > 0) {
          std::fill(st + j * ld, st + j * ld + hidden, negative_infinity<acc_t>());
        }
      }
    }
  }
};

struct DropoutConfig {
  bool enabled;
  uint64_t seed;
  uint32_t threshold;
  double keep_scale;  // 1 / (1 - p)
  int64_t heads;
  int64_t query_len;

  explicit DropoutConfig(const AttentionProblem& pb)
      : enabled(pb.dropout_p > 0.0),
        seed(pb.dropout_seed),
        threshold(dropout_threshold(pb.dropout_p)),
        keep_scale(pb.dropout_p > 0.0 ? 1.0 / (1.0 - pb.dropout_p) : 1.0),
        heads(pb.heads),
        query_len(pb.query_len) {}

  // factors[j * ld + i] = (keep ? 1/(1-p) : 0) for queries q0 + i (i < rows) and keys k0 + j
  // (j < cols): the transposed tile of the mask the shared generator defines row by row.
  template <typename acc_t>
  void tile_factors(int64_t batch, int64_t head, int64_t q0, int64_t rows, int64_t k0, int64_t cols,
                    acc_t* factors, int64_t ld) const {
    const acc_t kept = static_cast<acc_t>(keep_scale);
    for (int64_t i = 0; i < rows; ++i) {
      DropoutRowGenerator generator(seed, dropout_row_id(batch, head, q0 + i, heads, query_len), k0,
                                    threshold);
      for (int64_t j = 0; j < cols; ++j) {
        factors[j * ld + i] = generator.next_keep() ? kept : acc_t(0);
      }
    }
  }
};

// out[j * ld + i] = a[j * ld + i] * b[j * ld + i] over a (cols x width-padded rows) tile.
template <typename acc_t>
void multiply_tiles(const acc_t* a, const acc_t* b, acc_t* out, int64_t cols, int64_t padded_rows,
                    int64_t ld) {
  using Vec = at::vec::Vectorized<acc_t>;
  for (int64_t j = 0; j < cols; ++j) {
    for (int64_t i = 0; i < padded_rows; i += Vec::size()) {
      (Vec::loadu(a + j * ld + i) * Vec::loadu(b + j * ld + i)).store(out + j * ld + i);
    }
  }
}

// The rows of one query block and the keys they may see (all of them, or under the causal
// rule those up to the block's last query).
struct QueryBlock {
  int64_t q0;
  int64_t rows;
  int64_t padded_rows;  // rounded up to whole vectors
  int64_t key_end;

  QueryBlock(const AttentionProblem& pb, int64_t index, int64_t width)
      : q0(index * kBlockQ),
        rows(std::min(kBlockQ, pb.query_len - q0)),
        padded_rows(round_up(rows, width)),
        key_end(pb.is_causal ? causal_key_limit(q0 + rows - 1, pb.key_len) : pb.key_len) {}
};

// A query block's softmax statistics, split into vectors of offsets and log-sums and padded up
// to a whole vector with (+inf, 0): padding queries get probability 0.
template <typename acc_t>
struct BlockStats {
  std::vector<acc_t> offset = std::vector<acc_t>(kBlockQ);
  std::vector<acc_t> log_sum = std::vector<acc_t>(kBlockQ);

  void load(const acc_t* stats_rows, int64_t rows, int64_t padded_rows) {
    for (int64_t i = 0; i < padded_rows; ++i) {
      offset[i] = i < rows ? stats_rows[2 * i] : std::numeric_limits<acc_t>::infinity();
      log_sum[i] = i < rows ? stats_rows[2 * i + 1] : acc_t(0);
    }
  }
};

// P^T for queries [q0, q0 + rows) against keys [k0, k0 + cols), before dropout: the tile
// exp((S^T - offset) - log_sum) with the call's masks, S^T = K (scale Q)^T. qt is the query
// block's packed (scale Q)^T; offset and log_sum hold one value per (padded) query.
template <typename scalar_t, typename acc_t>
void probability_tile(const RowAccessor<const scalar_t>& k, const ScoreMasking& masking,
                      int64_t head_dim, int64_t b, int64_t h, int64_t q0, int64_t rows,
                      int64_t padded_rows, const acc_t* qt, const acc_t* offset,
                      const acc_t* log_sum, int64_t k0, int64_t cols, acc_t* pt) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t ld = kBlockQ;
  block_matmul<acc_t, scalar_t>(cols, padded_rows, head_dim, k.row(b, h, k0), k.stride_row, 1, qt,
                                ld, pt, ld, /*accumulate=*/false);
  masking.apply(b, h, q0, rows, k0, cols, pt, ld);
  for (int64_t i = 0; i < padded_rows; i += Vec::size()) {
    const Vec row_offset = Vec::loadu(offset + i);
    const Vec row_log_sum = Vec::loadu(log_sum + i);
    for (int64_t j = 0; j < cols; ++j) {
      // (s - offset) first: exact for the scores that matter, whatever their magnitude.
      exp_vec((Vec::loadu(pt + j * ld + i) - row_offset) - row_log_sum).store(pt + j * ld + i);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Forward

template <typename scalar_t>
void attention_forward_typed(const ForwardKernelArgs& args) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t kWidth = Vec::size();
  constexpr int64_t ld = kBlockQ;  // leading dimension of every transposed tile
  const AttentionProblem& pb = args.problem;
  const int64_t heads = pb.heads, query_len = pb.query_len, head_dim = pb.head_dim,
                value_dim = pb.value_dim;
  const int64_t value_dim_padded = round_up(value_dim, kWidth);
  const int64_t query_blocks = (query_len + kBlockQ - 1) / kBlockQ;
  const ScoreMasking masking{pb.attn_mask, pb.key_padding_mask, pb.is_causal};
  const DropoutConfig dropout(pb);

  const RowAccessor<const scalar_t> q(args.query);
  const RowAccessor<const scalar_t> k(args.key);
  const RowAccessor<const scalar_t> v(args.value);
  const RowAccessor<scalar_t> out(args.output);
  acc_t* stats_data = static_cast<acc_t*>(args.softmax_stats);

  at::parallel_for(0, pb.batch * heads * query_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qt(head_dim * ld);  // (scale Q)^T of the query block
    std::vector<acc_t> st(kBlockK * ld);   // S^T, then P^T
    std::vector<acc_t> factors(dropout.enabled ? kBlockK * ld : 0);
    std::vector<acc_t> acc(kBlockQ * value_dim_padded);
    std::vector<acc_t> v_buffer;
    // Per query: running max and sum, the block's max, exp offset, rescale factor, column sum.
    std::vector<acc_t> m(ld), l(ld), block_max(ld), offset(ld), rescale(ld), block_sum(ld);

    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (heads * query_blocks);
      const int64_t h = (item / query_blocks) % heads;
      const QueryBlock block(pb, item % query_blocks, kWidth);
      const int64_t q0 = block.q0, rows = block.rows, padded_rows = block.padded_rows;

      pack_transposed(q.row(b, h, q0), q.stride_row, rows, head_dim, static_cast<acc_t>(pb.scale),
                      qt.data(), ld, padded_rows);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      std::fill(m.begin(), m.end(), negative_infinity<acc_t>());
      std::fill(l.begin(), l.end(), acc_t(0));

      for (int64_t k0 = 0; k0 < block.key_end; k0 += kBlockK) {
        const int64_t cols = std::min(kBlockK, block.key_end - k0);
        block_matmul<acc_t, scalar_t>(cols, padded_rows, head_dim, k.row(b, h, k0), k.stride_row, 1,
                                      qt.data(), ld, st.data(), ld, /*accumulate=*/false);
        masking.apply(b, h, q0, rows, k0, cols, st.data(), ld);

        // Online softmax, every step element-wise over the block's queries.
        for (int64_t i = 0; i < padded_rows; i += kWidth) {
          Vec mx(negative_infinity<acc_t>());
          for (int64_t j = 0; j < cols; ++j) {
            mx = at::vec::maximum(mx, Vec::loadu(st.data() + j * ld + i));
          }
          mx.store(block_max.data() + i);
        }
        for (int64_t i = 0; i < padded_rows; ++i) {
          rescale[i] = online_softmax_update_max(m[i], block_max[i]);
          offset[i] = softmax_exp_offset(m[i]);
        }
        for (int64_t i = 0; i < padded_rows; i += kWidth) {
          const Vec off = Vec::loadu(offset.data() + i);
          Vec sum(acc_t(0));
          for (int64_t j = 0; j < cols; ++j) {
            const Vec p = exp_vec(Vec::loadu(st.data() + j * ld + i) - off);
            p.store(st.data() + j * ld + i);
            sum = sum + p;
          }
          sum.store(block_sum.data() + i);
        }
        for (int64_t i = 0; i < rows; ++i) {
          l[i] = l[i] * rescale[i] + block_sum[i];
          if (rescale[i] != acc_t(1)) {
            acc_t* row = acc.data() + i * value_dim_padded;
            const acc_t f = rescale[i];
            at::vec::map([f](Vec x) { return x * Vec(f); }, row, row, value_dim_padded);
          }
        }
        if (dropout.enabled) {
          // The running sum above uses the undropped probabilities; only P V sees the mask.
          dropout.tile_factors(b, h, q0, rows, k0, cols, factors.data(), ld);
          multiply_tiles(st.data(), factors.data(), st.data(), cols, padded_rows, ld);
        }
        const RowsOperand<acc_t> values =
            rows_operand(v.row(b, h, k0), v.stride_row, cols, value_dim, v_buffer);
        block_matmul<acc_t, acc_t>(rows, value_dim_padded, cols, st.data(), 1, ld, values.data,
                                   values.ld, acc.data(), value_dim_padded,
                                   /*accumulate=*/true);
      }

      acc_t* stats_rows = stats_data + 2 * ((b * heads + h) * query_len + q0);
      for (int64_t i = 0; i < rows; ++i) {
        const SoftmaxRowStats<acc_t> stats = online_softmax_finish(m[i], l[i]);
        stats_rows[2 * i] = stats.offset;
        stats_rows[2 * i + 1] = stats.log_sum;
        store_row(acc.data() + i * value_dim_padded, value_dim, stats.inverse_sum,
                  out.row(b, h, q0 + i));
      }
    }
  });
}

// The attention weights, once the forward has produced the final row statistics: recompute each
// probability tile, apply dropout, and write it, or, for head-averaged weights, sum the heads of
// a query block in a fixed order in float32 and write the mean.
template <typename scalar_t>
void attention_weights_typed(const ForwardKernelArgs& args) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t kWidth = vector_width<acc_t>();
  constexpr int64_t ld = kBlockQ;
  const AttentionProblem& pb = args.problem;
  const int64_t heads = pb.heads, query_len = pb.query_len, key_len = pb.key_len,
                head_dim = pb.head_dim;
  const int64_t query_blocks = (query_len + kBlockQ - 1) / kBlockQ;
  const bool average = args.average_weights;
  scalar_t* weights_data = static_cast<scalar_t*>(args.weights);
  if (heads == 0) {
    // No head to average over: the mean is taken as 0 (a per-head tensor is empty anyway).
    if (average) {
      std::fill(weights_data, weights_data + pb.batch * query_len * pb.key_len, scalar_t(0));
    }
    return;
  }
  const int64_t heads_per_item = average ? heads : 1;
  const ScoreMasking masking{pb.attn_mask, pb.key_padding_mask, pb.is_causal};
  const DropoutConfig dropout(pb);
  const RowAccessor<const scalar_t> q(args.query);
  const RowAccessor<const scalar_t> k(args.key);
  const acc_t* stats_data = static_cast<const acc_t*>(args.softmax_stats);
  const acc_t head_weight = acc_t(1) / static_cast<acc_t>(heads_per_item);

  const int64_t items = pb.batch * (heads / heads_per_item) * query_blocks;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qt(head_dim * ld), pt(kBlockK * ld);
    BlockStats<acc_t> stats;
    std::vector<acc_t> factors(dropout.enabled ? kBlockK * ld : 0);
    std::vector<acc_t> mean(average ? kBlockQ * key_len : 0);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / ((heads / heads_per_item) * query_blocks);
      const int64_t first_head = (item / query_blocks) % (heads / heads_per_item) * heads_per_item;
      const QueryBlock block(pb, item % query_blocks, kWidth);
      const int64_t q0 = block.q0, rows = block.rows, padded_rows = block.padded_rows;
      std::fill(mean.begin(), mean.end(), acc_t(0));
      for (int64_t h = first_head; h < first_head + heads_per_item; ++h) {
        pack_transposed(q.row(b, h, q0), q.stride_row, rows, head_dim, static_cast<acc_t>(pb.scale),
                        qt.data(), ld, padded_rows);
        stats.load(stats_data + 2 * ((b * heads + h) * query_len + q0), rows, padded_rows);
        for (int64_t k0 = 0; k0 < key_len; k0 += kBlockK) {
          const int64_t cols = std::min(kBlockK, key_len - k0);
          const bool visible = k0 < block.key_end;
          if (visible) {
            probability_tile(k, masking, head_dim, b, h, q0, rows, padded_rows, qt.data(),
                             stats.offset.data(), stats.log_sum.data(), k0, cols, pt.data());
            if (dropout.enabled) {
              dropout.tile_factors(b, h, q0, rows, k0, cols, factors.data(), ld);
              multiply_tiles(pt.data(), factors.data(), pt.data(), cols, padded_rows, ld);
            }
          }
          for (int64_t i = 0; i < rows; ++i) {
            if (average) {
              if (visible) {
                acc_t* sum = mean.data() + i * key_len + k0;
                for (int64_t j = 0; j < cols; ++j) {
                  sum[j] += head_weight * pt[j * ld + i];
                }
              }
              continue;
            }
            scalar_t* w = weights_data + ((b * heads + h) * query_len + q0 + i) * key_len + k0;
            for (int64_t j = 0; j < cols; ++j) {
              w[j] = visible ? static_cast<scalar_t>(pt[j * ld + i]) : scalar_t(0);
            }
          }
        }
      }
      if (average) {
        for (int64_t i = 0; i < rows; ++i) {
          store_row(mean.data() + i * key_len, key_len, acc_t(1),
                    weights_data + (b * query_len + q0 + i) * key_len);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward

// The weights term of delta, sum_j dW[i, j] W[i, j], where W (the returned weights, after
// dropout) is recomputed tile by tile rather than kept from the forward.
template <typename scalar_t>
void add_weights_delta(const BackwardKernelArgs& args) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t kWidth = vector_width<acc_t>();
  constexpr int64_t ld = kBlockQ;
  const AttentionProblem& pb = args.problem;
  const int64_t heads = pb.heads, query_len = pb.query_len, head_dim = pb.head_dim;
  const int64_t query_blocks = (query_len + kBlockQ - 1) / kBlockQ;
  const ScoreMasking masking{pb.attn_mask, pb.key_padding_mask, pb.is_causal};
  const DropoutConfig dropout(pb);
  const RowAccessor<const scalar_t> q(args.query);
  const RowAccessor<const scalar_t> k(args.key);
  const acc_t* stats_data = static_cast<const acc_t*>(args.softmax_stats);
  acc_t* delta_data = static_cast<acc_t*>(args.delta);
  const auto* grad_weights = static_cast<const scalar_t*>(args.grad_weights.data);
  const int64_t* gw_strides = args.grad_weights.strides;
  const acc_t gw_scale = static_cast<acc_t>(args.grad_weights_scale);

  at::parallel_for(0, pb.batch * heads * query_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qt(head_dim * ld), pt(kBlockK * ld), sums(ld);
    BlockStats<acc_t> stats;
    std::vector<acc_t> factors(dropout.enabled ? kBlockK * ld : 0);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (heads * query_blocks);
      const int64_t h = (item / query_blocks) % heads;
      const QueryBlock block(pb, item % query_blocks, kWidth);
      const int64_t q0 = block.q0, rows = block.rows, padded_rows = block.padded_rows;
      pack_transposed(q.row(b, h, q0), q.stride_row, rows, head_dim, static_cast<acc_t>(pb.scale),
                      qt.data(), ld, padded_rows);
      acc_t* delta_rows = delta_data + (b * heads + h) * query_len + q0;
      stats.load(stats_data + 2 * ((b * heads + h) * query_len + q0), rows, padded_rows);
      std::fill(sums.begin(), sums.end(), acc_t(0));
      for (int64_t k0 = 0; k0 < block.key_end; k0 += kBlockK) {
        const int64_t cols = std::min(kBlockK, block.key_end - k0);
        probability_tile(k, masking, head_dim, b, h, q0, rows, padded_rows, qt.data(),
                         stats.offset.data(), stats.log_sum.data(), k0, cols, pt.data());
        if (dropout.enabled) {
          dropout.tile_factors(b, h, q0, rows, k0, cols, factors.data(), ld);
          multiply_tiles(pt.data(), factors.data(), pt.data(), cols, padded_rows, ld);
        }
        for (int64_t i = 0; i < rows; ++i) {
          const scalar_t* gw = grad_weights + b * gw_strides[0] + h * gw_strides[1] +
                               (q0 + i) * gw_strides[2] + k0 * gw_strides[3];
          for (int64_t j = 0; j < cols; ++j) {
            sums[i] += static_cast<acc_t>(gw[j * gw_strides[3]]) * pt[j * ld + i];
          }
        }
      }
      for (int64_t i = 0; i < rows; ++i) {
        delta_rows[i] += gw_scale * sums[i];
      }
    }
  });
}

// delta[b, h, i] = sum_d dO[i, d] O[i, d] (+ sum_j dW[i, j] W[i, j] when the returned weights
// were differentiated): the per-query term of the softmax gradient, dS = P (dP - delta).
template <typename scalar_t>
void compute_softmax_delta(const BackwardKernelArgs& args) {
  using acc_t = at::opmath_type<scalar_t>;
  const AttentionProblem& pb = args.problem;
  const int64_t heads = pb.heads, query_len = pb.query_len, value_dim = pb.value_dim;
  acc_t* delta_data = static_cast<acc_t*>(args.delta);
  const RowAccessor<const scalar_t> dout(args.grad_output);
  const RowAccessor<const scalar_t> out(args.output);
  at::parallel_for(0, pb.batch * heads * query_len, 64, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (heads * query_len);
      const int64_t h = (item / query_len) % heads;
      const int64_t i = item % query_len;
      const scalar_t* d_row = dout.row(b, h, i);
      const scalar_t* o_row = out.row(b, h, i);
      acc_t sum = 0;
      for (int64_t d = 0; d < value_dim; ++d) {
        sum += static_cast<acc_t>(d_row[d]) * static_cast<acc_t>(o_row[d]);
      }
      delta_data[item] = sum;
    }
  });
  if (args.grad_weights.data != nullptr) {
    add_weights_delta<scalar_t>(args);
  }
}

// What the backward needs of every query block of one head, packed once per (batch, head) and
// reused by every key block: (scale Q)^T, dO^T, the row statistics and delta, padded with
// values that make padding queries contribute nothing.
template <typename scalar_t, typename acc_t>
struct HeadPanels {
  int64_t batch = -1;
  int64_t head = -1;
  std::vector<acc_t> qt, dot, offset, log_sum, delta;
  std::vector<acc_t> q_rows, dout_rows;  // packed rows, only when the input can't be used
  RowsOperand<acc_t> q_operand{nullptr, 0};
  RowsOperand<acc_t> dout_operand{nullptr, 0};

  void prepare(const BackwardKernelArgs& args, int64_t b, int64_t h) {
    if (b == batch && h == head) {
      return;
    }
    batch = b;
    head = h;
    const AttentionProblem& pb = args.problem;
    const int64_t query_blocks = (pb.query_len + kBlockQ - 1) / kBlockQ;
    const RowAccessor<const scalar_t> q(args.query);
    const RowAccessor<const scalar_t> dout(args.grad_output);
    const acc_t* stats_head =
        static_cast<const acc_t*>(args.softmax_stats) + 2 * (b * pb.heads + h) * pb.query_len;
    const acc_t* delta_head =
        static_cast<const acc_t*>(args.delta) + (b * pb.heads + h) * pb.query_len;
    scratch(qt, query_blocks * pb.head_dim * kBlockQ);
    scratch(dot, query_blocks * pb.value_dim * kBlockQ);
    scratch(offset, query_blocks * kBlockQ);
    scratch(log_sum, query_blocks * kBlockQ);
    scratch(delta, query_blocks * kBlockQ);
    for (int64_t qb = 0; qb < query_blocks; ++qb) {
      const int64_t q0 = qb * kBlockQ;
      const int64_t rows = std::min(kBlockQ, pb.query_len - q0);
      pack_transposed(q.row(b, h, q0), q.stride_row, rows, pb.head_dim,
                      static_cast<acc_t>(pb.scale), qt.data() + qb * pb.head_dim * kBlockQ, kBlockQ,
                      kBlockQ);
      pack_transposed(dout.row(b, h, q0), dout.stride_row, rows, pb.value_dim, acc_t(1),
                      dot.data() + qb * pb.value_dim * kBlockQ, kBlockQ, kBlockQ);
      for (int64_t i = 0; i < kBlockQ; ++i) {
        // (+inf, 0) makes every probability of a padding query 0.
        const bool real = i < rows;
        offset[q0 + i] = real ? stats_head[2 * (q0 + i)] : std::numeric_limits<acc_t>::infinity();
        log_sum[q0 + i] = real ? stats_head[2 * (q0 + i) + 1] : acc_t(0);
        delta[q0 + i] = real ? delta_head[q0 + i] : acc_t(0);
      }
    }
    q_operand = rows_operand(q.row(b, h, 0), q.stride_row, pb.query_len, pb.head_dim, q_rows);
    dout_operand =
        rows_operand(dout.row(b, h, 0), dout.stride_row, pb.query_len, pb.value_dim, dout_rows);
  }
};

template <typename scalar_t>
void attention_backward_typed(const BackwardKernelArgs& args) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t kWidth = Vec::size();
  constexpr int64_t ld = kBlockQ;
  const AttentionProblem& pb = args.problem;
  const int64_t heads = pb.heads, query_len = pb.query_len, key_len = pb.key_len,
                head_dim = pb.head_dim, value_dim = pb.value_dim;
  const int64_t head_dim_padded = round_up(head_dim, kWidth);
  const int64_t value_dim_padded = round_up(value_dim, kWidth);
  const int64_t query_blocks = (query_len + kBlockQ - 1) / kBlockQ;
  const int64_t key_blocks = (key_len + kBlockK - 1) / kBlockK;
  const int64_t chunks = args.dq_chunks;
  const ScoreMasking masking{pb.attn_mask, pb.key_padding_mask, pb.is_causal};
  const DropoutConfig dropout(pb);

  compute_softmax_delta<scalar_t>(args);

  const RowAccessor<const scalar_t> k(args.key);
  const RowAccessor<const scalar_t> v(args.value);
  const RowAccessor<scalar_t> dk(args.grad_key);
  const RowAccessor<scalar_t> dv(args.grad_value);
  acc_t* grad_mask_data = static_cast<acc_t*>(args.grad_mask);
  const auto* grad_weights_data = static_cast<const scalar_t*>(args.grad_weights.data);
  const int64_t* gw_strides = args.grad_weights.strides;
  const acc_t gw_scale = static_cast<acc_t>(args.grad_weights_scale);
  acc_t* dq_partials_data = static_cast<acc_t*>(args.dq_partials);
  const int64_t dq_row_stride = args.dq_row_stride;
  const int64_t dq_head_stride = query_len * dq_row_stride;
  const acc_t scale = static_cast<acc_t>(pb.scale);

  at::parallel_for(0, pb.batch * heads * chunks, 1, [&](int64_t begin, int64_t end) {
    HeadPanels<scalar_t, acc_t> panels;
    std::vector<acc_t> pt(kBlockK * ld);   // P^T
    std::vector<acc_t> dst(kBlockK * ld);  // dP^T, then dS^T
    std::vector<acc_t> factors(dropout.enabled ? kBlockK * ld : 0);
    std::vector<acc_t> dropped(dropout.enabled ? kBlockK * ld : 0);
    std::vector<acc_t> dk_acc(kBlockK * head_dim_padded);
    std::vector<acc_t> dv_acc(kBlockK * value_dim_padded);
    std::vector<acc_t> k_buffer;

    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (heads * chunks);
      const int64_t h = (item / chunks) % heads;
      const int64_t chunk = item % chunks;
      panels.prepare(args, b, h);
      acc_t* dq_head = dq_partials_data + ((chunk * pb.batch + b) * heads + h) * dq_head_stride;

      for (int64_t kb = chunk * key_blocks / chunks; kb < (chunk + 1) * key_blocks / chunks; ++kb) {
        const int64_t k0 = kb * kBlockK;
        const int64_t cols = std::min(kBlockK, key_len - k0);
        const RowsOperand<acc_t> keys =
            rows_operand(k.row(b, h, k0), k.stride_row, cols, head_dim, k_buffer);
        std::fill(dk_acc.begin(), dk_acc.end(), acc_t(0));
        std::fill(dv_acc.begin(), dv_acc.end(), acc_t(0));

        // Causal: queries before k0 see none of these keys.
        for (int64_t qb = masking.is_causal ? k0 / kBlockQ : 0; qb < query_blocks; ++qb) {
          const QueryBlock block(pb, qb, kWidth);
          const int64_t q0 = block.q0, rows = block.rows, padded_rows = block.padded_rows;
          const acc_t* qt = panels.qt.data() + qb * head_dim * ld;
          const acc_t* dot = panels.dot.data() + qb * value_dim * ld;

          // P^T, recomputed
          probability_tile(k, masking, head_dim, b, h, q0, rows, padded_rows, qt,
                           panels.offset.data() + q0, panels.log_sum.data() + q0, k0, cols,
                           pt.data());
          const acc_t* used_pt = pt.data();
          if (dropout.enabled) {
            dropout.tile_factors(b, h, q0, rows, k0, cols, factors.data(), ld);
            multiply_tiles(pt.data(), factors.data(), dropped.data(), cols, padded_rows, ld);
            used_pt = dropped.data();
          }

          // dV += P_dropped^T dO
          block_matmul<acc_t, acc_t>(cols, value_dim_padded, rows, used_pt, ld, 1,
                                     panels.dout_operand.data + q0 * panels.dout_operand.ld,
                                     panels.dout_operand.ld, dv_acc.data(), value_dim_padded,
                                     /*accumulate=*/true);

          // dP^T = V dO^T (+ dW^T), times the dropout factors
          block_matmul<acc_t, scalar_t>(cols, padded_rows, value_dim, v.row(b, h, k0), v.stride_row,
                                        1, dot, ld, dst.data(), ld,
                                        /*accumulate=*/false);
          if (grad_weights_data != nullptr) {
            for (int64_t i = 0; i < rows; ++i) {
              const scalar_t* gw = grad_weights_data + b * gw_strides[0] + h * gw_strides[1] +
                                   (q0 + i) * gw_strides[2] + k0 * gw_strides[3];
              for (int64_t j = 0; j < cols; ++j) {
                dst[j * ld + i] += gw_scale * static_cast<acc_t>(gw[j * gw_strides[3]]);
              }
            }
          }
          if (dropout.enabled) {
            multiply_tiles(dst.data(), factors.data(), dst.data(), cols, padded_rows, ld);
          }

          // dS^T = P^T (dP^T - delta)
          for (int64_t i = 0; i < padded_rows; i += kWidth) {
            const Vec delta = Vec::loadu(panels.delta.data() + q0 + i);
            for (int64_t j = 0; j < cols; ++j) {
              const Vec p = Vec::loadu(pt.data() + j * ld + i);
              (p * (Vec::loadu(dst.data() + j * ld + i) - delta)).store(dst.data() + j * ld + i);
            }
          }
          if (grad_mask_data != nullptr) {
            for (int64_t i = 0; i < rows; ++i) {
              acc_t* g = grad_mask_data + ((b * heads + h) * query_len + q0 + i) * key_len + k0;
              for (int64_t j = 0; j < cols; ++j) {
                g[j] = dst[j * ld + i];
              }
            }
          }

          // dK += dS^T Q (scaled when stored), dQ += dS K (scaled when reduced)
          block_matmul<acc_t, acc_t>(cols, head_dim_padded, rows, dst.data(), ld, 1,
                                     panels.q_operand.data + q0 * panels.q_operand.ld,
                                     panels.q_operand.ld, dk_acc.data(), head_dim_padded,
                                     /*accumulate=*/true);
          block_matmul<acc_t, acc_t>(rows, head_dim_padded, cols, dst.data(), 1, ld, keys.data,
                                     keys.ld, dq_head + q0 * dq_row_stride, dq_row_stride,
                                     /*accumulate=*/true);
        }
        for (int64_t j = 0; j < cols; ++j) {
          store_row(dk_acc.data() + j * head_dim_padded, head_dim, scale, dk.row(b, h, k0 + j));
          store_row(dv_acc.data() + j * value_dim_padded, value_dim, acc_t(1),
                    dv.row(b, h, k0 + j));
        }
      }
    }
  });

  // dQ = scale * sum over chunks, always summed in chunk order.
  const RowAccessor<scalar_t> dq(args.grad_query);
  at::parallel_for(0, pb.batch * heads * query_len, 64, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(head_dim);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (heads * query_len);
      const int64_t h = (item / query_len) % heads;
      const int64_t i = item % query_len;
      std::fill(row.begin(), row.end(), acc_t(0));
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        const acc_t* partial = dq_partials_data +
                               ((chunk * pb.batch + b) * heads + h) * dq_head_stride +
                               i * dq_row_stride;
        for (int64_t d = 0; d < head_dim; ++d) {
          row[d] += partial[d];
        }
      }
      store_row(row.data(), head_dim, scale, dq.row(b, h, i));
    }
  });
}

}  // namespace

void attention_forward_kernel(const ForwardKernelArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, args.problem.dtype,
                                  "attention_forward_cpu", [&] {
                                    attention_forward_typed<scalar_t>(args);
                                    if (args.weights != nullptr) {
                                      attention_weights_typed<scalar_t>(args);
                                    }
                                  });
}

void attention_backward_kernel(const BackwardKernelArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, args.problem.dtype,
                                  "attention_backward_cpu",
                                  [&] { attention_backward_typed<scalar_t>(args); });
}

}  // namespace torch_mha::cpu::CPU_CAPABILITY
