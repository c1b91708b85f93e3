// Fused (flash-style) attention backward on the CPU; one build per vector ISA (see
// cpu/attention_kernels.h).
//
// First delta_i = dO_i . O_i (plus the weights term when the returned weights were
// differentiated). Then work items are (batch, key/value head, chunk of key blocks). For each key
// block, every query block that can see it, and every query head of the group: recompute P^T
// from the saved row statistics, dV += P_dropped^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta),
// dK += dS^T Q, dQ_chunk += dS K. dK and dV of a key block accumulate in float32 scratch over all
// the query heads of its group in a fixed order; dQ goes to one float32 partial sum per chunk,
// reduced in chunk order afterwards. The number of chunks depends only on the problem size,
// never on the thread count, so gradients are bitwise reproducible for any number of threads.
#ifndef CPU_CAPABILITY
#error "attention_backward_kernel.cpp is compiled once per ISA with -DCPU_CAPABILITY=<ISA>"
#endif

#include <ATen/Dispatch.h>

#include "cpu/tile_helpers.h"

namespace torch_mha::cpu::CPU_CAPABILITY {
namespace {

// The weights term of delta, sum_j dW[i, j] W[i, j], where W (the returned weights, after
// dropout) is recomputed tile by tile rather than kept from the forward. Dense batches only.
template <typename scalar_t>
void add_weights_delta(const AttentionBackwardParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t kWidth = vector_width<acc_t>();
  constexpr int64_t ld = kBlockQ;
  const int64_t heads = p.heads, head_dim = p.head_dim;
  const int64_t query_blocks = (p.query_len + kBlockQ - 1) / kBlockQ;
  const ScoreTransform transform{p};
  const DropoutConfig dropout(p);
  const auto* grad_weights = static_cast<const scalar_t*>(p.grad_weights.data);
  const acc_t gw_scale = static_cast<acc_t>(p.grad_weights_scale);

  const int64_t items = p.batch * heads * query_blocks;
  parallel_over_items(items, kBlockQ * p.key_len * head_dim, [&](const auto& claim) {
    const int64_t qt_ld = query_panel_ld<acc_t>();
    std::vector<acc_t> qt(head_dim * qt_ld), pt(kBlockK * ld), sums(ld);
    BlockStats<acc_t> stats;
    std::vector<acc_t> factors(dropout.enabled ? kBlockK * ld : 0);
    for (int64_t item = claim(); item < items; item = claim()) {
      const Sequence seq(p, item / (heads * query_blocks));
      const int64_t b = seq.batch;
      const int64_t h = (item / query_blocks) % heads;
      const QueryBlock block(p, seq, item % query_blocks, kWidth);
      const int64_t q0 = block.q0, rows = block.rows, padded_rows = block.padded_rows;
      pack_transposed(p.query.row<const scalar_t>(b, h, q0), p.query.stride_row, rows, head_dim,
                      static_cast<acc_t>(p.scale), qt.data(), qt_ld, padded_rows);
      stats.load(p, b, h, q0, rows, padded_rows);
      std::fill(sums.begin(), sums.end(), acc_t(0));
      for (int64_t k0 = block.keys.begin; k0 < block.keys.end; k0 += kBlockK) {
        const int64_t cols = std::min(kBlockK, block.keys.end - k0);
        probability_tile(p, transform, seq, h, q0, rows, padded_rows,
                         p.key.row<const scalar_t>(b, p.kv_head_of(h), k0), p.key.stride_row,
                         qt.data(), stats.offset.data(), stats.log_sum.data(), k0, cols, pt.data(),
                         static_cast<acc_t*>(nullptr));
        if (dropout.enabled) {
          dropout.tile_factors(b, h, q0, rows, k0, cols, factors.data(), ld);
          multiply_tiles(pt.data(), factors.data(), pt.data(), cols, padded_rows, ld);
        }
        for (int64_t i = 0; i < rows; ++i) {
          const scalar_t* gw = grad_weights + p.grad_weights.offset(b, h, q0 + i, k0);
          for (int64_t j = 0; j < cols; ++j) {
            sums[i] += static_cast<acc_t>(gw[j * p.grad_weights.strides[3]]) * pt[j * ld + i];
          }
        }
      }
      for (int64_t i = 0; i < rows; ++i) {
        *p.delta.row<acc_t>(b, h, q0 + i) += gw_scale * sums[i];
      }
    }
  });
}

// delta[b, h, i] = sum_d dO[i, d] O[i, d] (+ the weights term): the per-query term of the
// softmax gradient, dS = P (dP - delta).
template <typename scalar_t>
void compute_softmax_delta(const AttentionBackwardParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t heads = p.heads, query_len = p.query_len, value_dim = p.value_dim;
  at::parallel_for(0, p.batch * heads * query_len, 64, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (heads * query_len);
      const int64_t h = (item / query_len) % heads;
      const int64_t i = item % query_len;
      if (i >= p.query_len_of(b)) {
        continue;
      }
      const scalar_t* d_row = p.grad_output.row<const scalar_t>(b, h, i);
      const scalar_t* o_row = p.output.row<const scalar_t>(b, h, i);
      acc_t sum = 0;
      for (int64_t d = 0; d < value_dim; ++d) {
        sum += static_cast<acc_t>(d_row[d]) * static_cast<acc_t>(o_row[d]);
      }
      *p.delta.row<acc_t>(b, h, i) = sum;
    }
  });
  if (p.grad_weights.data != nullptr) {
    add_weights_delta<scalar_t>(p);
  }
}

// What the backward needs of every query block of one head, packed once per (batch, head) and
// reused by every key block: (scale Q)^T, dO^T, the row statistics and delta, padded with
// values that make padding queries contribute nothing.
template <typename scalar_t, typename acc_t>
struct HeadPanels {
  std::vector<acc_t> qt, dot, offset, log_sum, delta;
  std::vector<acc_t> q_rows, dout_rows;  // packed rows (rows_operand)
  RowsOperand<acc_t> q_operand{nullptr, 0};
  RowsOperand<acc_t> dout_operand{nullptr, 0};

  void prepare(const AttentionBackwardParams& p, const Sequence& seq, int64_t h) {
    const int64_t b = seq.batch;
    const int64_t query_blocks = (seq.query_len + kBlockQ - 1) / kBlockQ;
    const int64_t ld = query_panel_ld<acc_t>();
    scratch(qt, query_blocks * p.head_dim * ld);
    scratch(dot, query_blocks * p.value_dim * ld);
    scratch(offset, query_blocks * kBlockQ);
    scratch(log_sum, query_blocks * kBlockQ);
    scratch(delta, query_blocks * kBlockQ);
    for (int64_t qb = 0; qb < query_blocks; ++qb) {
      const int64_t q0 = qb * kBlockQ;
      const int64_t rows = std::min(kBlockQ, seq.query_len - q0);
      pack_transposed(p.query.row<const scalar_t>(b, h, q0), p.query.stride_row, rows, p.head_dim,
                      static_cast<acc_t>(p.scale), qt.data() + qb * p.head_dim * ld, ld, kBlockQ);
      pack_transposed(p.grad_output.row<const scalar_t>(b, h, q0), p.grad_output.stride_row, rows,
                      p.value_dim, acc_t(1), dot.data() + qb * p.value_dim * ld, ld, kBlockQ);
      for (int64_t i = 0; i < kBlockQ; ++i) {
        // (+inf, 0) makes every probability of a padding query 0.
        const bool real = i < rows;
        const acc_t* stats = real ? p.softmax_stats.row<const acc_t>(b, h, q0 + i) : nullptr;
        offset[q0 + i] = real ? stats[0] : std::numeric_limits<acc_t>::infinity();
        log_sum[q0 + i] = real ? stats[1] : acc_t(0);
        delta[q0 + i] = real ? *p.delta.row<const acc_t>(b, h, q0 + i) : acc_t(0);
      }
    }
    q_operand = rows_operand(p.query.row<const scalar_t>(b, h, 0), p.query.stride_row,
                             seq.query_len, p.head_dim, q_rows);
    dout_operand = rows_operand(p.grad_output.row<const scalar_t>(b, h, 0),
                                p.grad_output.stride_row, seq.query_len, p.value_dim, dout_rows);
  }
};

template <typename scalar_t>
void attention_backward_typed(const AttentionBackwardParams& p, const BackwardScratch& work) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t kWidth = Vec::size();
  constexpr int64_t ld = kBlockQ;
  const int64_t heads = p.heads, head_dim = p.head_dim, value_dim = p.value_dim;
  const int64_t head_dim_padded = round_up(head_dim, kWidth);
  const int64_t value_dim_padded = round_up(value_dim, kWidth);
  const int64_t panel_ld = query_panel_ld<acc_t>();
  // k_tile is dQ's B operand: rows a conflict-free stride apart (conflict_free_row_stride).
  const int64_t k_ld = conflict_free_row_stride<acc_t>(head_dim);
  const int64_t key_blocks = (p.key_len + kBlockK - 1) / kBlockK;
  const int64_t chunks = work.chunks;
  const int64_t group = p.group_size();
  const ScoreTransform transform{p};
  const DropoutConfig dropout(p);
  const bool softcap = p.softcap > 0.0;

  compute_softmax_delta<scalar_t>(p);

  acc_t* grad_mask_data = static_cast<acc_t*>(p.grad_mask);
  const auto* grad_weights_data = static_cast<const scalar_t*>(p.grad_weights.data);
  const acc_t gw_scale = static_cast<acc_t>(p.grad_weights_scale);
  const acc_t scale = static_cast<acc_t>(p.scale);

  const int64_t items = p.batch * p.kv_heads * chunks;
  // Five products per tile pair: S^T, dP^T, dV, dK, dQ.
  const int64_t work_per_item =
      group * p.query_len * (p.key_len / chunks + 1) * (3 * head_dim + 2 * value_dim);
  parallel_over_items(items, work_per_item, [&](const auto& claim) {
    std::vector<HeadPanels<scalar_t, acc_t>> panels(group);
    int64_t panels_batch = -1, panels_kv_head = -1;
    std::vector<acc_t> pt(kBlockK * ld);   // P^T
    std::vector<acc_t> dst(kBlockK * ld);  // dP^T, then dS^T
    std::vector<acc_t> slope(softcap ? kBlockK * ld : 0);
    std::vector<acc_t> factors(dropout.enabled ? kBlockK * ld : 0);
    std::vector<acc_t> dropped(dropout.enabled ? kBlockK * ld : 0);
    std::vector<acc_t> dk_acc(kBlockK * head_dim_padded);
    std::vector<acc_t> dv_acc(kBlockK * value_dim_padded);
    // The key block's keys and values, packed once and read for every query block and head:
    // dense float rows whatever the input's dtype and strides.
    std::vector<acc_t> k_tile(kBlockK * k_ld);
    std::vector<acc_t> v_tile(kBlockK * value_dim_padded);

    for (int64_t item = claim(); item < items; item = claim()) {
      const int64_t chunk = item % chunks;
      const int64_t kv_head = (item / chunks) % p.kv_heads;
      const Sequence seq(p, item / (chunks * p.kv_heads));
      const int64_t b = seq.batch;
      const int64_t first_block = chunk * key_blocks / chunks;
      const int64_t last_block =
          std::min((chunk + 1) * key_blocks / chunks, (seq.key_len + kBlockK - 1) / kBlockK);
      if (first_block >= last_block) {
        continue;
      }
      if (b != panels_batch || kv_head != panels_kv_head) {
        for (int64_t g = 0; g < group; ++g) {
          panels[g].prepare(p, seq, kv_head * group + g);
        }
        panels_batch = b;
        panels_kv_head = kv_head;
      }
      for (int64_t kb = first_block; kb < last_block; ++kb) {
        const int64_t k0 = kb * kBlockK;
        const int64_t cols = std::min(kBlockK, seq.key_len - k0);
        pack_rows(p.key.row<const scalar_t>(b, kv_head, k0), p.key.stride_row, cols, head_dim,
                  acc_t(1), k_tile.data(), k_ld);
        pack_rows(p.value.row<const scalar_t>(b, kv_head, k0), p.value.stride_row, cols, value_dim,
                  acc_t(1), v_tile.data(), value_dim_padded);
        std::fill(dk_acc.begin(), dk_acc.end(), acc_t(0));
        std::fill(dv_acc.begin(), dv_acc.end(), acc_t(0));
        const IndexRange queries =
            p.visibility.queries_of_block(k0, k0 + cols - 1, seq.query_len, seq.key_len);

        for (int64_t qb = queries.begin / kBlockQ; qb * kBlockQ < queries.end; ++qb) {
          const QueryBlock block(p, seq, qb, kWidth);
          const int64_t q0 = block.q0, rows = block.rows, padded_rows = block.padded_rows;
          for (int64_t g = 0; g < group; ++g) {
            const int64_t h = kv_head * group + g;
            const HeadPanels<scalar_t, acc_t>& panel = panels[g];
            const acc_t* qt = panel.qt.data() + qb * head_dim * panel_ld;
            const acc_t* dot = panel.dot.data() + qb * value_dim * panel_ld;

            // P^T, recomputed
            probability_tile(p, transform, seq, h, q0, rows, padded_rows, k_tile.data(), k_ld, qt,
                             panel.offset.data() + q0, panel.log_sum.data() + q0, k0, cols,
                             pt.data(), softcap ? slope.data() : nullptr);
            const acc_t* used_pt = pt.data();
            if (dropout.enabled) {
              dropout.tile_factors(b, h, q0, rows, k0, cols, factors.data(), ld);
              multiply_tiles(pt.data(), factors.data(), dropped.data(), cols, padded_rows, ld);
              used_pt = dropped.data();
            }

            // dV += P_dropped^T dO
            block_matmul<acc_t, acc_t>(cols, value_dim_padded, rows, used_pt, ld, 1,
                                       panel.dout_operand.data + q0 * panel.dout_operand.ld,
                                       panel.dout_operand.ld, dv_acc.data(), value_dim_padded,
                                       /*accumulate=*/true);

            // dP^T = V dO^T (+ dW^T), times the dropout factors
            block_matmul<acc_t, acc_t>(cols, padded_rows, value_dim, v_tile.data(),
                                       value_dim_padded, 1, dot, panel_ld, dst.data(), ld,
                                       /*accumulate=*/false);
            if (grad_weights_data != nullptr) {
              for (int64_t i = 0; i < rows; ++i) {
                const scalar_t* gw = grad_weights_data + p.grad_weights.offset(b, h, q0 + i, k0);
                for (int64_t j = 0; j < cols; ++j) {
                  dst[j * ld + i] +=
                      gw_scale * static_cast<acc_t>(gw[j * p.grad_weights.strides[3]]);
                }
              }
            }
            if (dropout.enabled) {
              multiply_tiles(dst.data(), factors.data(), dst.data(), cols, padded_rows, ld);
            }

            // dS^T = P^T (dP^T - delta)
            for (int64_t i = 0; i < padded_rows; i += kWidth) {
              const Vec delta = Vec::loadu(panel.delta.data() + q0 + i);
              for (int64_t j = 0; j < cols; ++j) {
                const Vec prob = Vec::loadu(pt.data() + j * ld + i);
                (prob * (Vec::loadu(dst.data() + j * ld + i) - delta))
                    .store(dst.data() + j * ld + i);
              }
            }
            if (grad_mask_data != nullptr) {
              // The masks are added after the softcap: their gradient is dS itself.
              for (int64_t i = 0; i < rows; ++i) {
                acc_t* g_row =
                    grad_mask_data + ((b * heads + h) * p.query_len + q0 + i) * p.key_len + k0;
                for (int64_t j = 0; j < cols; ++j) {
                  g_row[j] = dst[j * ld + i];
                }
              }
            }
            if (softcap) {
              multiply_tiles(dst.data(), slope.data(), dst.data(), cols, padded_rows, ld);
            }

            // dK += dS^T Q (scaled when stored), dQ += dS K (scaled when reduced)
            block_matmul<acc_t, acc_t>(cols, head_dim_padded, rows, dst.data(), ld, 1,
                                       panel.q_operand.data + q0 * panel.q_operand.ld,
                                       panel.q_operand.ld, dk_acc.data(), head_dim_padded,
                                       /*accumulate=*/true);
            block_matmul<acc_t, acc_t>(rows, head_dim_padded, cols, dst.data(), 1, ld,
                                       k_tile.data(), k_ld, work.dq_row<acc_t>(chunk, b, h, q0),
                                       work.dq_layout(chunk).stride_row, /*accumulate=*/true);
          }
        }
        for (int64_t j = 0; j < cols; ++j) {
          store_row(dk_acc.data() + j * head_dim_padded, head_dim, scale,
                    p.grad_key.row<scalar_t>(b, kv_head, k0 + j));
          store_row(dv_acc.data() + j * value_dim_padded, value_dim, acc_t(1),
                    p.grad_value.row<scalar_t>(b, kv_head, k0 + j));
        }
      }
    }
  });

  // dQ = scale * sum over chunks, always summed in chunk order (chunk 0 may already sit in
  // grad_query itself).
  const int64_t query_len = p.query_len;
  at::parallel_for(0, p.batch * heads * query_len, 64, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(head_dim);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (heads * query_len);
      const int64_t h = (item / query_len) % heads;
      const int64_t i = item % query_len;
      if (i >= p.query_len_of(b)) {
        continue;
      }
      std::fill(row.begin(), row.end(), acc_t(0));
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        const acc_t* chunk_row = work.dq_row<const acc_t>(chunk, b, h, i);
        for (int64_t d = 0; d < head_dim; ++d) {
          row[d] += chunk_row[d];
        }
      }
      store_row(row.data(), head_dim, scale, p.grad_query.row<scalar_t>(b, h, i));
    }
  });
}

}  // namespace

void attention_backward_kernel(const AttentionBackwardParams& params,
                               const BackwardScratch& scratch) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params.dtype, "attention_backward_cpu",
                                  [&] { attention_backward_typed<scalar_t>(params, scratch); });
}

}  // namespace torch_mha::cpu::CPU_CAPABILITY
