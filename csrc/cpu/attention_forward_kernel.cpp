// Fused (flash-style) attention forward on the CPU, and the attention weights; one build per
// vector ISA (see cpu/attention_kernels.h).
//
// Work items are (batch, key/value head, up to kMaxHeadsPerItem of its query heads, block of
// queries). For each block of keys the item may see: S^T = K (scale Q)^T, the score modifiers
// and masks (ScoreTransform), online softmax per query (running max m and sum l), O += P V.
// The query heads of a grouped-query group share each key and value tile while it is in cache.
// Memory is O(L): the L x S probabilities are only written when the caller asks for the
// attention weights.
#ifndef CPU_CAPABILITY
#error "attention_forward_kernel.cpp is compiled once per ISA with -DCPU_CAPABILITY=<ISA>"
#endif

#include <ATen/Dispatch.h>

#include "cpu/tile_helpers.h"

namespace torch_mha::cpu::CPU_CAPABILITY {
namespace {

// Query heads of one group handled together: each keeps a Q^T panel and an output accumulator
// (32 KiB each at head_dim 128), and four of them plus the key/value tiles fit in a 512 KiB L2.
constexpr int64_t kMaxHeadsPerItem = 4;

template <typename scalar_t>
void attention_forward_typed(const AttentionParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t kWidth = Vec::size();
  constexpr int64_t ld = kBlockQ;  // leading dimension of every transposed tile
  const int64_t head_dim = p.head_dim, value_dim = p.value_dim;
  const int64_t value_dim_padded = round_up(value_dim, kWidth);
  const int64_t query_blocks = (p.query_len + kBlockQ - 1) / kBlockQ;
  const int64_t group = p.group_size();
  const int64_t heads_per_item = std::min(group, kMaxHeadsPerItem);
  const int64_t head_chunks =
      heads_per_item > 0 ? (group + heads_per_item - 1) / heads_per_item : 0;
  const int64_t items = p.batch * p.kv_heads * head_chunks * query_blocks;
  const ScoreTransform transform{p};
  const DropoutConfig dropout(p);
  const acc_t scale = static_cast<acc_t>(p.scale);
  const acc_t* sinks = static_cast<const acc_t*>(p.sinks);

  parallel_over_items(items, [&](const auto& claim) {
    // Per query head of the item: (scale Q)^T, output accumulator, running max and sum.
    std::vector<acc_t> qt(heads_per_item * head_dim * ld);
    std::vector<acc_t> acc(heads_per_item * kBlockQ * value_dim_padded);
    std::vector<acc_t> m(heads_per_item * ld), l(heads_per_item * ld);
    std::vector<acc_t> st(kBlockK * ld);  // S^T, then P^T
    std::vector<acc_t> factors(dropout.enabled ? kBlockK * ld : 0);
    // Per query: the block's max, exp offset, rescale factor, column sum.
    std::vector<acc_t> block_max(ld), offset(ld), rescale(ld), block_sum(ld);
    std::vector<acc_t> v_buffer;

    for (int64_t item = claim(); item < items; item = claim()) {
      const int64_t qb = item % query_blocks;
      const int64_t head_chunk = (item / query_blocks) % head_chunks;
      const int64_t kv_head = (item / (query_blocks * head_chunks)) % p.kv_heads;
      const Sequence seq(p, item / (query_blocks * head_chunks * p.kv_heads));
      if (qb * kBlockQ >= seq.query_len) {
        continue;  // past the end of a shorter sequence of a packed batch
      }
      const int64_t b = seq.batch;
      const QueryBlock block(p, seq, qb, kWidth);
      const int64_t q0 = block.q0, rows = block.rows, padded_rows = block.padded_rows;
      const int64_t first_head = kv_head * group + head_chunk * heads_per_item;
      const int64_t item_heads = std::min(heads_per_item, (kv_head + 1) * group - first_head);

      for (int64_t g = 0; g < item_heads; ++g) {
        pack_transposed(p.query.row<const scalar_t>(b, first_head + g, q0), p.query.stride_row,
                        rows, head_dim, scale, qt.data() + g * head_dim * ld, ld, padded_rows);
      }
      std::fill(acc.begin(), acc.end(), acc_t(0));
      std::fill(m.begin(), m.end(), negative_infinity<acc_t>());
      std::fill(l.begin(), l.end(), acc_t(0));

      for (int64_t k0 = block.keys.begin; k0 < block.keys.end; k0 += kBlockK) {
        const int64_t cols = std::min(kBlockK, block.keys.end - k0);
        const scalar_t* keys = p.key.row<const scalar_t>(b, kv_head, k0);
        const RowsOperand<acc_t> values =
            rows_operand(p.value.row<const scalar_t>(b, kv_head, k0), p.value.stride_row, cols,
                         value_dim, v_buffer);
        for (int64_t g = 0; g < item_heads; ++g) {
          const int64_t h = first_head + g;
          acc_t* head_acc = acc.data() + g * kBlockQ * value_dim_padded;
          acc_t* head_m = m.data() + g * ld;
          acc_t* head_l = l.data() + g * ld;
          block_matmul<acc_t, scalar_t>(cols, padded_rows, head_dim, keys, p.key.stride_row, 1,
                                        qt.data() + g * head_dim * ld, ld, st.data(), ld,
                                        /*accumulate=*/false);
          transform.apply(seq, h, q0, rows, padded_rows, k0, cols, st.data(), ld,
                          static_cast<acc_t*>(nullptr));

          // Online softmax, every step element-wise over the block's queries.
          for (int64_t i = 0; i < padded_rows; i += kWidth) {
            Vec mx(negative_infinity<acc_t>());
            for (int64_t j = 0; j < cols; ++j) {
              mx = at::vec::maximum(mx, Vec::loadu(st.data() + j * ld + i));
            }
            mx.store(block_max.data() + i);
          }
          for (int64_t i = 0; i < padded_rows; ++i) {
            rescale[i] = online_softmax_update_max(head_m[i], block_max[i]);
            offset[i] = softmax_exp_offset(head_m[i]);
          }
          for (int64_t i = 0; i < padded_rows; i += kWidth) {
            const Vec off = Vec::loadu(offset.data() + i);
            Vec sum(acc_t(0));
            for (int64_t j = 0; j < cols; ++j) {
              const Vec prob = exp_vec(Vec::loadu(st.data() + j * ld + i) - off);
              prob.store(st.data() + j * ld + i);
              sum = sum + prob;
            }
            sum.store(block_sum.data() + i);
          }
          for (int64_t i = 0; i < rows; ++i) {
            head_l[i] = head_l[i] * rescale[i] + block_sum[i];
            if (rescale[i] != acc_t(1)) {
              acc_t* row = head_acc + i * value_dim_padded;
              const acc_t f = rescale[i];
              at::vec::map([f](Vec x) { return x * Vec(f); }, row, row, value_dim_padded);
            }
          }
          if (dropout.enabled) {
            // The running sum above uses the undropped probabilities; only P V sees the mask.
            dropout.tile_factors(b, h, q0, rows, k0, cols, factors.data(), ld);
            multiply_tiles(st.data(), factors.data(), st.data(), cols, padded_rows, ld);
          }
          block_matmul<acc_t, acc_t>(rows, value_dim_padded, cols, st.data(), 1, ld, values.data,
                                     values.ld, head_acc, value_dim_padded, /*accumulate=*/true);
        }
      }

      for (int64_t g = 0; g < item_heads; ++g) {
        const int64_t h = first_head + g;
        const acc_t* head_acc = acc.data() + g * kBlockQ * value_dim_padded;
        for (int64_t i = 0; i < rows; ++i) {
          acc_t row_max = m[g * ld + i], row_sum = l[g * ld + i];
          const acc_t sink_factor =
              sinks != nullptr ? online_softmax_add_sink(row_max, row_sum, sinks[h]) : acc_t(1);
          const SoftmaxRowStats<acc_t> stats = online_softmax_finish(row_max, row_sum);
          acc_t* stats_row = p.softmax_stats.row<acc_t>(b, h, q0 + i);
          stats_row[0] = stats.offset;
          stats_row[1] = stats.log_sum;
          store_row(head_acc + i * value_dim_padded, value_dim, stats.inverse_sum * sink_factor,
                    p.output.row<scalar_t>(b, h, q0 + i));
        }
      }
    }
  });
}

// The attention weights, once the forward has produced the final row statistics: recompute each
// probability tile, apply dropout, and write it, or, for head-averaged weights, sum the heads of
// a query block in a fixed order in float32 and write the mean. Dense batches only.
template <typename scalar_t>
void attention_weights_typed(const AttentionParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t kWidth = vector_width<acc_t>();
  constexpr int64_t ld = kBlockQ;
  const int64_t heads = p.heads, query_len = p.query_len, key_len = p.key_len,
                head_dim = p.head_dim;
  const int64_t query_blocks = (query_len + kBlockQ - 1) / kBlockQ;
  const bool average = p.average_weights;
  scalar_t* weights_data = static_cast<scalar_t*>(p.weights);
  if (heads == 0) {
    // No head to average over: the mean is taken as 0 (a per-head tensor is empty anyway).
    if (average) {
      std::fill(weights_data, weights_data + p.batch * query_len * key_len, scalar_t(0));
    }
    return;
  }
  const int64_t heads_per_item = average ? heads : 1;
  const ScoreTransform transform{p};
  const DropoutConfig dropout(p);
  const acc_t head_weight = acc_t(1) / static_cast<acc_t>(heads_per_item);

  const int64_t items = p.batch * (heads / heads_per_item) * query_blocks;
  parallel_over_items(items, [&](const auto& claim) {
    std::vector<acc_t> qt(head_dim * ld), pt(kBlockK * ld);
    BlockStats<acc_t> stats;
    std::vector<acc_t> factors(dropout.enabled ? kBlockK * ld : 0);
    std::vector<acc_t> mean(average ? kBlockQ * key_len : 0);
    for (int64_t item = claim(); item < items; item = claim()) {
      const Sequence seq(p, item / ((heads / heads_per_item) * query_blocks));
      const int64_t b = seq.batch;
      const int64_t first_head = (item / query_blocks) % (heads / heads_per_item) * heads_per_item;
      const QueryBlock block(p, seq, item % query_blocks, kWidth);
      const int64_t q0 = block.q0, rows = block.rows, padded_rows = block.padded_rows;
      std::fill(mean.begin(), mean.end(), acc_t(0));
      for (int64_t h = first_head; h < first_head + heads_per_item; ++h) {
        pack_transposed(p.query.row<const scalar_t>(b, h, q0), p.query.stride_row, rows, head_dim,
                        static_cast<acc_t>(p.scale), qt.data(), ld, padded_rows);
        stats.load(p, b, h, q0, rows, padded_rows);
        for (int64_t k0 = 0; k0 < key_len; k0 += kBlockK) {
          const int64_t cols = std::min(kBlockK, key_len - k0);
          const bool visible = k0 < block.keys.end && k0 + cols > block.keys.begin;
          if (visible) {
            probability_tile<scalar_t>(p, transform, seq, h, q0, rows, padded_rows, qt.data(),
                                       stats.offset.data(), stats.log_sum.data(), k0, cols,
                                       pt.data(), static_cast<acc_t*>(nullptr));
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

}  // namespace

void attention_forward_kernel(const AttentionParams& params) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params.dtype, "attention_forward_cpu",
                                  [&] {
                                    attention_forward_typed<scalar_t>(params);
                                    if (params.weights != nullptr) {
                                      attention_weights_typed<scalar_t>(params);
                                    }
                                  });
}

}  // namespace torch_mha::cpu::CPU_CAPABILITY
