// Fused (flash-style) attention on the CPU: forward and backward.
//
// Forward, per (batch, head, block of queries): for each block of keys, S = (scale Q) K^T plus
// masks, online softmax (running max and sum), O += P V. Nothing of size L x S exists unless the
// caller asks for the attention weights; the row log-sum-exp is saved instead.
//
// Backward recomputes P = exp(S - lse) tile by tile. Work items are (batch, head, chunk of key
// blocks): dK and dV of a key block stay in registers/L1 for the whole sweep over query blocks,
// and dQ goes to one float32 partial sum per chunk, reduced in a fixed order afterwards. The
// number of chunks depends only on the problem size, never on the thread count, so results are
// bitwise reproducible for any number of threads.
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

// dst[r, c] = multiplier * src[r, c] for r < rows, c < cols; columns [cols, ld) are zeroed so
// the padded tile can be used as the B operand of block_matmul.
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

// dst[c, r] = src[r, c]: a block of keys (or values) stored transposed, so a product with it
// runs along keys. Columns [rows, padded_rows) are zeroed.
template <typename scalar_t, typename acc_t>
void pack_transposed(const scalar_t* src, int64_t src_row_stride, int64_t rows, int64_t cols,
                     acc_t* dst, int64_t ld, int64_t padded_rows) {
  for (int64_t c = 0; c < cols; ++c) {
    std::fill(dst + c * ld + rows, dst + c * ld + padded_rows, acc_t(0));
  }
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* in = src + r * src_row_stride;
    for (int64_t c = 0; c < cols; ++c) {
      dst[c * ld + r] = static_cast<acc_t>(in[c]);
    }
  }
}

template <typename scalar_t, typename acc_t>
void store_row(const acc_t* src, int64_t count, acc_t multiplier, scalar_t* dst) {
  for (int64_t c = 0; c < count; ++c) {
    dst[c] = static_cast<scalar_t>(multiplier * src[c]);
  }
}

template <typename acc_t, typename mask_t>
void add_mask_to_row(acc_t* scores, int64_t count, const mask_t* mask, int64_t stride) {
  if (stride == 1) {
    for (int64_t c = 0; c < count; ++c) {
      scores[c] += mask_bias<acc_t>(mask[c]);
    }
  } else {
    for (int64_t c = 0; c < count; ++c) {
      scores[c] += mask_bias<acc_t>(mask[c * stride]);
    }
  }
}

// scores[c] += mask(batch, head, query, first_key + c) for c < count.
template <typename acc_t>
void apply_mask(const MaskView& mask, int64_t batch, int64_t head, int64_t query,
                int64_t first_key, acc_t* scores, int64_t count) {
  const int64_t offset = mask.row_offset(batch, head, query) + first_key * mask.stride_key;
  switch (mask.kind) {
    case MaskKind::kBool:
      add_mask_to_row(scores, count, static_cast<const bool*>(mask.data) + offset,
                      mask.stride_key);
      break;
    case MaskKind::kFloat:
      add_mask_to_row(scores, count, static_cast<const float*>(mask.data) + offset,
                      mask.stride_key);
      break;
    case MaskKind::kDouble:
      add_mask_to_row(scores, count, static_cast<const double*>(mask.data) + offset,
                      mask.stride_key);
      break;
    case MaskKind::kBFloat16:
      add_mask_to_row(scores, count, static_cast<const c10::BFloat16*>(mask.data) + offset,
                      mask.stride_key);
      break;
    case MaskKind::kHalf:
      add_mask_to_row(scores, count, static_cast<const c10::Half*>(mask.data) + offset,
                      mask.stride_key);
      break;
    case MaskKind::kNone:
      break;
  }
}

// Everything that turns one row of raw scores into masked scores, identical in the forward, the
// weights pass and the backward recomputation.
struct ScoreMasking {
  MaskView attn_mask;
  MaskView key_padding_mask;
  bool is_causal;

  template <typename acc_t>
  void apply(int64_t batch, int64_t head, int64_t query, int64_t first_key, acc_t* scores,
             int64_t count) const {
    apply_mask(attn_mask, batch, head, query, first_key, scores, count);
    apply_mask(key_padding_mask, batch, head, query, first_key, scores, count);
    if (is_causal) {
      for (int64_t c = std::max<int64_t>(0, query + 1 - first_key); c < count; ++c) {
        scores[c] = negative_infinity<acc_t>();
      }
    }
  }
};

struct DropoutConfig {
  bool enabled = false;
  uint64_t seed = 0;
  uint32_t threshold = 0;
  double keep_scale = 1.0;  // 1 / (1 - p)

  DropoutConfig(double p, uint64_t seed_value) {
    enabled = p > 0.0;
    seed = seed_value;
    threshold = dropout_threshold(p);
    keep_scale = enabled ? 1.0 / (1.0 - p) : 1.0;
  }

  // factors[c] = keep ? 1/(1-p) : 0 for the `count` columns starting at first_key.
  template <typename acc_t>
  void row_factors(uint64_t row_id, int64_t first_key, int64_t count, acc_t* factors) const {
    DropoutRowGenerator generator(seed, row_id, first_key, threshold);
    const acc_t kept = static_cast<acc_t>(keep_scale);
    for (int64_t c = 0; c < count; ++c) {
      factors[c] = generator.next_keep() ? kept : acc_t(0);
    }
  }
};

template <typename acc_t>
acc_t row_max(const acc_t* x, int64_t count) {
  acc_t result = negative_infinity<acc_t>();
  for (int64_t c = 0; c < count; ++c) {
    result = nan_propagating_max(result, x[c]);
  }
  return result;
}

// x[c] = exp(x[c] - offset); returns the sum.
template <typename acc_t>
acc_t exp_and_sum(acc_t* x, int64_t count, acc_t offset) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec offset_vec(offset);
  Vec sum_vec(acc_t(0));
  int64_t c = 0;
  for (; c + Vec::size() <= count; c += Vec::size()) {
    const Vec e = (Vec::loadu(x + c) - offset_vec).exp();
    e.store(x + c);
    sum_vec = sum_vec + e;
  }
  acc_t sum = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, sum_vec);
  for (; c < count; ++c) {
    x[c] = static_cast<acc_t>(std::exp(x[c] - offset));
    sum += x[c];
  }
  return sum;
}

template <typename acc_t>
void scale_row(acc_t* x, int64_t count, acc_t factor) {
  at::vec::map([factor](at::vec::Vectorized<acc_t> v) { return v * at::vec::Vectorized<acc_t>(factor); },
               x, x, count);
}

// ---------------------------------------------------------------------------------------------
// Forward

template <typename scalar_t>
void attention_forward_typed(const ForwardKernelArgs& args) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t kWidth = vector_width<acc_t>();
  const AttentionProblem& pb = args.problem;
  const int64_t heads = pb.heads, query_len = pb.query_len, key_len = pb.key_len,
                head_dim = pb.head_dim, value_dim = pb.value_dim;
  const int64_t head_dim_padded = round_up(head_dim, kWidth);
  const int64_t value_dim_padded = round_up(value_dim, kWidth);
  const int64_t block_k_padded = round_up(kBlockK, kWidth);
  const int64_t query_blocks = (query_len + kBlockQ - 1) / kBlockQ;
  const ScoreMasking masking{pb.attn_mask, pb.key_padding_mask, pb.is_causal};
  const DropoutConfig dropout(pb.dropout_p, pb.dropout_seed);

  const RowAccessor<const scalar_t> q(args.query);
  const RowAccessor<const scalar_t> k(args.key);
  const RowAccessor<const scalar_t> v(args.value);
  const RowAccessor<scalar_t> out(args.output);
  acc_t* lse_data = static_cast<acc_t*>(args.logsumexp);
  scalar_t* weights_data = static_cast<scalar_t*>(args.weights);

  at::parallel_for(0, pb.batch * heads * query_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> q_tile(kBlockQ * head_dim_padded);
    std::vector<acc_t> kt_panel(head_dim * block_k_padded);
    std::vector<acc_t> v_panel(kBlockK * value_dim_padded);
    std::vector<acc_t> scores(kBlockQ * block_k_padded);
    std::vector<acc_t> acc(kBlockQ * value_dim_padded);
    std::vector<acc_t> dropout_factors(kBlockK);
    acc_t running_max[kBlockQ];
    acc_t running_sum[kBlockQ];

    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (heads * query_blocks);
      const int64_t h = (item / query_blocks) % heads;
      const int64_t q0 = (item % query_blocks) * kBlockQ;
      const int64_t rows = std::min(kBlockQ, query_len - q0);
      // Under the causal rule the last row of this block sees keys [0, q0 + rows).
      const int64_t key_end =
          masking.is_causal ? causal_key_limit(q0 + rows - 1, key_len) : key_len;

      pack_rows(q.row(b, h, q0), q.stride_row, rows, head_dim, static_cast<acc_t>(pb.scale),
                q_tile.data(), head_dim_padded);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      std::fill(running_max, running_max + rows, negative_infinity<acc_t>());
      std::fill(running_sum, running_sum + rows, acc_t(0));

      for (int64_t k0 = 0; k0 < key_end; k0 += kBlockK) {
        const int64_t cols = std::min(kBlockK, key_end - k0);
        const int64_t cols_padded = round_up(cols, kWidth);
        pack_transposed(k.row(b, h, k0), k.stride_row, cols, head_dim, kt_panel.data(),
                        block_k_padded, cols_padded);
        pack_rows(v.row(b, h, k0), v.stride_row, cols, value_dim, acc_t(1), v_panel.data(),
                  value_dim_padded);
        block_matmul<acc_t>(rows, cols_padded, head_dim, q_tile.data(), head_dim_padded, 1,
                            kt_panel.data(), block_k_padded, scores.data(), block_k_padded,
                            /*accumulate=*/false);
        for (int64_t r = 0; r < rows; ++r) {
          acc_t* s = scores.data() + r * block_k_padded;
          masking.apply(b, h, q0 + r, k0, s, cols);
          const acc_t factor = online_softmax_update_max(running_max[r], row_max(s, cols));
          const acc_t block_sum = exp_and_sum(s, cols, softmax_exp_offset(running_max[r]));
          running_sum[r] = running_sum[r] * factor + block_sum;
          if (factor != acc_t(1)) {
            scale_row(acc.data() + r * value_dim_padded, value_dim_padded, factor);
          }
          if (dropout.enabled) {
            // The row sum above uses the undropped probabilities; only P V sees the mask.
            dropout.row_factors(dropout_row_id(b, h, q0 + r, heads, query_len), k0, cols,
                                dropout_factors.data());
            for (int64_t c = 0; c < cols; ++c) {
              s[c] *= dropout_factors[c];
            }
          }
        }
        block_matmul<acc_t>(rows, value_dim_padded, cols, scores.data(), block_k_padded, 1,
                            v_panel.data(), value_dim_padded, acc.data(), value_dim_padded,
                            /*accumulate=*/true);
      }

      acc_t* lse_rows = lse_data + (b * heads + h) * query_len + q0;
      for (int64_t r = 0; r < rows; ++r) {
        const SoftmaxRowResult<acc_t> result =
            online_softmax_finish(running_max[r], running_sum[r]);
        lse_rows[r] = result.logsumexp;
        store_row(acc.data() + r * value_dim_padded, value_dim, result.inverse_sum,
                  out.row(b, h, q0 + r));
      }

      if (weights_data == nullptr) {
        continue;
      }
      // Weights were requested: recompute each score tile and write exp(s - lse), after dropout,
      // in a second sweep now that the row statistics are final.
      for (int64_t k0 = 0; k0 < key_len; k0 += kBlockK) {
        const int64_t cols = std::min(kBlockK, key_len - k0);
        const int64_t cols_padded = round_up(cols, kWidth);
        const bool visible = k0 < key_end;
        if (visible) {
          pack_transposed(k.row(b, h, k0), k.stride_row, cols, head_dim, kt_panel.data(),
                          block_k_padded, cols_padded);
          block_matmul<acc_t>(rows, cols_padded, head_dim, q_tile.data(), head_dim_padded, 1,
                              kt_panel.data(), block_k_padded, scores.data(), block_k_padded,
                              /*accumulate=*/false);
        }
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = q0 + r;
          scalar_t* w = weights_data + ((b * heads + h) * query_len + i) * key_len + k0;
          if (!visible) {
            std::fill(w, w + cols, scalar_t(0));
            continue;
          }
          acc_t* s = scores.data() + r * block_k_padded;
          masking.apply(b, h, i, k0, s, cols);
          for (int64_t c = 0; c < cols; ++c) {
            s[c] = probability_from_logsumexp(s[c], lse_rows[r]);
          }
          if (dropout.enabled) {
            dropout.row_factors(dropout_row_id(b, h, i, heads, query_len), k0, cols,
                                dropout_factors.data());
            for (int64_t c = 0; c < cols; ++c) {
              s[c] *= dropout_factors[c];
            }
          }
          store_row(s, cols, acc_t(1), w);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward

// delta[b, h, i] = sum_d dO[i, d] O[i, d] (+ sum_j dW[i, j] W[i, j] when the returned weights
// were differentiated): the row term of the softmax gradient, dS = P * (dP - delta).
template <typename scalar_t>
void compute_softmax_delta(const BackwardKernelArgs& args) {
  using acc_t = at::opmath_type<scalar_t>;
  const AttentionProblem& pb = args.problem;
  const int64_t heads = pb.heads, query_len = pb.query_len, key_len = pb.key_len,
                value_dim = pb.value_dim;
  acc_t* delta_data = static_cast<acc_t*>(args.delta);
  const RowAccessor<const scalar_t> dout(args.grad_output);
  const RowAccessor<const scalar_t> out(args.output);
  const auto* grad_weights = static_cast<const scalar_t*>(args.grad_weights.data);
  const auto* weights = static_cast<const scalar_t*>(args.weights.data);
  const int64_t* gw_strides = args.grad_weights.strides;
  const int64_t* w_strides = args.weights.strides;

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
      if (grad_weights != nullptr) {
        const scalar_t* gw =
            grad_weights + b * gw_strides[0] + h * gw_strides[1] + i * gw_strides[2];
        const scalar_t* w = weights + b * w_strides[0] + h * w_strides[1] + i * w_strides[2];
        for (int64_t j = 0; j < key_len; ++j) {
          sum += static_cast<acc_t>(gw[j * gw_strides[3]]) * static_cast<acc_t>(w[j * w_strides[3]]);
        }
      }
      delta_data[item] = sum;
    }
  });
}

template <typename scalar_t>
void attention_backward_typed(const BackwardKernelArgs& args) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t kWidth = vector_width<acc_t>();
  const AttentionProblem& pb = args.problem;
  const int64_t heads = pb.heads, query_len = pb.query_len, key_len = pb.key_len,
                head_dim = pb.head_dim, value_dim = pb.value_dim;
  const int64_t head_dim_padded = round_up(head_dim, kWidth);
  const int64_t value_dim_padded = round_up(value_dim, kWidth);
  const int64_t block_k_padded = round_up(kBlockK, kWidth);
  const int64_t query_blocks = (query_len + kBlockQ - 1) / kBlockQ;
  const int64_t key_blocks = (key_len + kBlockK - 1) / kBlockK;
  const int64_t chunks = args.dq_chunks;
  const ScoreMasking masking{pb.attn_mask, pb.key_padding_mask, pb.is_causal};
  const DropoutConfig dropout(pb.dropout_p, pb.dropout_seed);

  compute_softmax_delta<scalar_t>(args);

  const RowAccessor<const scalar_t> q(args.query);
  const RowAccessor<const scalar_t> k(args.key);
  const RowAccessor<const scalar_t> v(args.value);
  const RowAccessor<const scalar_t> dout(args.grad_output);
  const RowAccessor<scalar_t> dk(args.grad_key);
  const RowAccessor<scalar_t> dv(args.grad_value);
  const acc_t* lse_data = static_cast<const acc_t*>(args.logsumexp);
  const acc_t* delta_data = static_cast<const acc_t*>(args.delta);
  acc_t* grad_mask_data = static_cast<acc_t*>(args.grad_mask);
  const auto* grad_weights_data = static_cast<const scalar_t*>(args.grad_weights.data);
  const int64_t* gw_strides = args.grad_weights.strides;
  acc_t* dq_partials_data = static_cast<acc_t*>(args.dq_partials);
  const int64_t dq_row_stride = args.dq_row_stride;
  const int64_t dq_head_stride = query_len * dq_row_stride;

  at::parallel_for(0, pb.batch * heads * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> kt_panel(head_dim * block_k_padded);
    std::vector<acc_t> k_rows(kBlockK * head_dim_padded);
    std::vector<acc_t> vt_panel(value_dim * block_k_padded);
    std::vector<acc_t> q_tile(kBlockQ * head_dim_padded);
    std::vector<acc_t> dout_tile(kBlockQ * value_dim_padded);
    std::vector<acc_t> probs(kBlockQ * block_k_padded);
    std::vector<acc_t> dropped_probs(dropout.enabled ? kBlockQ * block_k_padded : 0);
    std::vector<acc_t> dropout_factors(dropout.enabled ? kBlockQ * block_k_padded : 0);
    std::vector<acc_t> dscores(kBlockQ * block_k_padded);
    std::vector<acc_t> dk_acc(kBlockK * head_dim_padded);
    std::vector<acc_t> dv_acc(kBlockK * value_dim_padded);

    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (heads * chunks);
      const int64_t h = (item / chunks) % heads;
      const int64_t chunk = item % chunks;
      const int64_t first_block = chunk * key_blocks / chunks;
      const int64_t last_block = (chunk + 1) * key_blocks / chunks;
      acc_t* dq_head = dq_partials_data + ((chunk * pb.batch + b) * heads + h) * dq_head_stride;
      const acc_t* lse_head = lse_data + (b * heads + h) * query_len;
      const acc_t* delta_head = delta_data + (b * heads + h) * query_len;

      for (int64_t kb = first_block; kb < last_block; ++kb) {
        const int64_t k0 = kb * kBlockK;
        const int64_t cols = std::min(kBlockK, key_len - k0);
        const int64_t cols_padded = round_up(cols, kWidth);
        pack_transposed(k.row(b, h, k0), k.stride_row, cols, head_dim, kt_panel.data(),
                        block_k_padded, cols_padded);
        pack_rows(k.row(b, h, k0), k.stride_row, cols, head_dim, acc_t(1), k_rows.data(),
                  head_dim_padded);
        pack_transposed(v.row(b, h, k0), v.stride_row, cols, value_dim, vt_panel.data(),
                        block_k_padded, cols_padded);
        std::fill(dk_acc.begin(), dk_acc.end(), acc_t(0));
        std::fill(dv_acc.begin(), dv_acc.end(), acc_t(0));

        // Causal: rows before k0 see none of these keys.
        const int64_t first_query_block = masking.is_causal ? k0 / kBlockQ : 0;
        for (int64_t qb = first_query_block; qb < query_blocks; ++qb) {
          const int64_t q0 = qb * kBlockQ;
          const int64_t rows = std::min(kBlockQ, query_len - q0);
          pack_rows(q.row(b, h, q0), q.stride_row, rows, head_dim, static_cast<acc_t>(pb.scale),
                    q_tile.data(), head_dim_padded);
          pack_rows(dout.row(b, h, q0), dout.stride_row, rows, value_dim, acc_t(1),
                    dout_tile.data(), value_dim_padded);

          // P = exp(S - lse), recomputed.
          block_matmul<acc_t>(rows, cols_padded, head_dim, q_tile.data(), head_dim_padded, 1,
                              kt_panel.data(), block_k_padded, probs.data(), block_k_padded,
                              /*accumulate=*/false);
          for (int64_t r = 0; r < rows; ++r) {
            acc_t* p = probs.data() + r * block_k_padded;
            masking.apply(b, h, q0 + r, k0, p, cols);
            const acc_t lse = lse_head[q0 + r];
            for (int64_t c = 0; c < cols; ++c) {
              p[c] = probability_from_logsumexp(p[c], lse);
            }
            if (dropout.enabled) {
              acc_t* factors = dropout_factors.data() + r * block_k_padded;
              dropout.row_factors(dropout_row_id(b, h, q0 + r, heads, query_len), k0, cols,
                                  factors);
              acc_t* dropped = dropped_probs.data() + r * block_k_padded;
              for (int64_t c = 0; c < cols; ++c) {
                dropped[c] = p[c] * factors[c];
              }
            }
          }
          const acc_t* used_probs = dropout.enabled ? dropped_probs.data() : probs.data();

          // dV += P_dropped^T dO
          block_matmul<acc_t>(cols, value_dim_padded, rows, used_probs, 1, block_k_padded,
                              dout_tile.data(), value_dim_padded, dv_acc.data(),
                              value_dim_padded, /*accumulate=*/true);
          // dP = dO V^T (+ dW), then dS = P * (dP * dropout - delta)
          block_matmul<acc_t>(rows, cols_padded, value_dim, dout_tile.data(), value_dim_padded,
                              1, vt_panel.data(), block_k_padded, dscores.data(),
                              block_k_padded, /*accumulate=*/false);
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t i = q0 + r;
            acc_t* ds = dscores.data() + r * block_k_padded;
            const acc_t* p = probs.data() + r * block_k_padded;
            if (grad_weights_data != nullptr) {
              const scalar_t* gw = grad_weights_data + b * gw_strides[0] + h * gw_strides[1] +
                                   i * gw_strides[2] + k0 * gw_strides[3];
              for (int64_t c = 0; c < cols; ++c) {
                ds[c] += static_cast<acc_t>(gw[c * gw_strides[3]]);
              }
            }
            if (dropout.enabled) {
              const acc_t* factors = dropout_factors.data() + r * block_k_padded;
              for (int64_t c = 0; c < cols; ++c) {
                ds[c] *= factors[c];
              }
            }
            const acc_t row_delta = delta_head[i];
            for (int64_t c = 0; c < cols; ++c) {
              // A probability of exactly 0 (masked key) contributes nothing, even where dP is
              // not finite.
              ds[c] = p[c] == acc_t(0) ? acc_t(0) : p[c] * (ds[c] - row_delta);
            }
            if (grad_mask_data != nullptr) {
              std::copy(ds, ds + cols,
                        grad_mask_data + ((b * heads + h) * query_len + i) * key_len + k0);
            }
          }
          // dQ += dS K (scaled at the end), dK += dS^T (scale Q)
          block_matmul<acc_t>(rows, head_dim_padded, cols, dscores.data(), block_k_padded, 1,
                              k_rows.data(), head_dim_padded, dq_head + q0 * dq_row_stride,
                              dq_row_stride, /*accumulate=*/true);
          block_matmul<acc_t>(cols, head_dim_padded, rows, dscores.data(), 1, block_k_padded,
                              q_tile.data(), head_dim_padded, dk_acc.data(), head_dim_padded,
                              /*accumulate=*/true);
        }
        for (int64_t c = 0; c < cols; ++c) {
          store_row(dk_acc.data() + c * head_dim_padded, head_dim, acc_t(1),
                    dk.row(b, h, k0 + c));
          store_row(dv_acc.data() + c * value_dim_padded, value_dim, acc_t(1),
                    dv.row(b, h, k0 + c));
        }
      }
    }
  });

  // dQ = scale * sum over chunks, always summed in chunk order.
  const RowAccessor<scalar_t> dq(args.grad_query);
  const acc_t scale = static_cast<acc_t>(pb.scale);
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
                                  "attention_forward_cpu",
                                  [&] { attention_forward_typed<scalar_t>(args); });
}

void attention_backward_kernel(const BackwardKernelArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, args.problem.dtype,
                                  "attention_backward_cpu",
                                  [&] { attention_backward_typed<scalar_t>(args); });
}

}  // namespace torch_mha::cpu::CPU_CAPABILITY
