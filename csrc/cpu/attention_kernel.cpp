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
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attention_utils.h"
#include "common/dropout.h"
#include "common/masking.h"
#include "common/softmax.h"
#include "cpu/block_matmul.h"

namespace torch_mha::cpu {
namespace {

// Tile sizes. A query block of 32 rows against a key block of 128 keeps the score tile (16 KiB in
// float32) and the packed K/V panels (32 KiB each at head_dim 64) in L1/L2.
constexpr int64_t kBlockQ = 32;
constexpr int64_t kBlockK = 128;

// Backward work items aim for at least this many (batch, head, chunk) items so that small
// batch x heads still keeps every core busy. A constant, not the thread count: see above.
constexpr int64_t kBackwardTargetItems = 16;

// A 4-D strided tensor viewed as rows of its last dimension (which must have unit stride).
template <typename T>
struct RowAccessor {
  T* data;
  int64_t stride_batch;
  int64_t stride_head;
  int64_t stride_row;

  RowAccessor(const at::Tensor& t, T* ptr)
      : data(ptr), stride_batch(t.stride(0)), stride_head(t.stride(1)), stride_row(t.stride(2)) {}

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
void attention_forward_kernel(const at::Tensor& query, const at::Tensor& key,
                              const at::Tensor& value, const ScoreMasking& masking,
                              double scale, const DropoutConfig& dropout, at::Tensor& output,
                              at::Tensor& logsumexp, at::Tensor* weights) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t kWidth = vector_width<acc_t>();
  const int64_t batch = query.size(0), heads = query.size(1), query_len = query.size(2),
                key_len = key.size(2), head_dim = query.size(3), value_dim = value.size(3);
  const int64_t head_dim_padded = round_up(head_dim, kWidth);
  const int64_t value_dim_padded = round_up(value_dim, kWidth);
  const int64_t block_k_padded = round_up(kBlockK, kWidth);
  const int64_t query_blocks = (query_len + kBlockQ - 1) / kBlockQ;

  const RowAccessor<const scalar_t> q(query, query.const_data_ptr<scalar_t>());
  const RowAccessor<const scalar_t> k(key, key.const_data_ptr<scalar_t>());
  const RowAccessor<const scalar_t> v(value, value.const_data_ptr<scalar_t>());
  const RowAccessor<scalar_t> out(output, output.mutable_data_ptr<scalar_t>());
  acc_t* lse_data = logsumexp.mutable_data_ptr<acc_t>();
  scalar_t* weights_data = weights ? weights->mutable_data_ptr<scalar_t>() : nullptr;

  at::parallel_for(0, batch * heads * query_blocks, 1, [&](int64_t begin, int64_t end) {
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

      pack_rows(q.row(b, h, q0), q.stride_row, rows, head_dim, static_cast<acc_t>(scale),
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
at::Tensor compute_softmax_delta(const at::Tensor& grad_output, const at::Tensor& output,
                                 const at::Tensor* grad_weights, const at::Tensor* weights) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = output.size(0), heads = output.size(1), query_len = output.size(2),
                value_dim = output.size(3);
  at::Tensor delta = at::empty({batch, heads, query_len},
                               output.options().dtype(accumulate_type(output.scalar_type())));
  acc_t* delta_data = delta.mutable_data_ptr<acc_t>();
  const RowAccessor<const scalar_t> dout(grad_output, grad_output.const_data_ptr<scalar_t>());
  const RowAccessor<const scalar_t> out(output, output.const_data_ptr<scalar_t>());

  at::parallel_for(0, batch * heads * query_len, 64, [&](int64_t begin, int64_t end) {
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
        const int64_t key_len = weights->size(3);
        const scalar_t* gw = grad_weights->const_data_ptr<scalar_t>() +
                             b * grad_weights->stride(0) + h * grad_weights->stride(1) +
                             i * grad_weights->stride(2);
        const scalar_t* w = weights->const_data_ptr<scalar_t>() + b * weights->stride(0) +
                            h * weights->stride(1) + i * weights->stride(2);
        for (int64_t j = 0; j < key_len; ++j) {
          sum += static_cast<acc_t>(gw[j * grad_weights->stride(3)]) *
                 static_cast<acc_t>(w[j * weights->stride(3)]);
        }
      }
      delta_data[item] = sum;
    }
  });
  return delta;
}

int64_t backward_chunks(int64_t batch_heads, int64_t key_blocks) {
  if (batch_heads == 0 || key_blocks == 0) {
    return 1;
  }
  const int64_t wanted = (kBackwardTargetItems + batch_heads - 1) / batch_heads;
  return std::max<int64_t>(1, std::min(wanted, key_blocks));
}

template <typename scalar_t>
void attention_backward_kernel(const at::Tensor& grad_output, const at::Tensor& query,
                               const at::Tensor& key, const at::Tensor& value,
                               const at::Tensor& logsumexp, const at::Tensor& delta,
                               const ScoreMasking& masking, double scale,
                               const DropoutConfig& dropout, const at::Tensor* grad_weights,
                               at::Tensor& grad_query, at::Tensor& grad_key,
                               at::Tensor& grad_value, at::Tensor* grad_mask) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t kWidth = vector_width<acc_t>();
  const int64_t batch = query.size(0), heads = query.size(1), query_len = query.size(2),
                key_len = key.size(2), head_dim = query.size(3), value_dim = value.size(3);
  const int64_t head_dim_padded = round_up(head_dim, kWidth);
  const int64_t value_dim_padded = round_up(value_dim, kWidth);
  const int64_t block_k_padded = round_up(kBlockK, kWidth);
  const int64_t query_blocks = (query_len + kBlockQ - 1) / kBlockQ;
  const int64_t key_blocks = (key_len + kBlockK - 1) / kBlockK;
  const int64_t chunks = backward_chunks(batch * heads, key_blocks);

  const RowAccessor<const scalar_t> q(query, query.const_data_ptr<scalar_t>());
  const RowAccessor<const scalar_t> k(key, key.const_data_ptr<scalar_t>());
  const RowAccessor<const scalar_t> v(value, value.const_data_ptr<scalar_t>());
  const RowAccessor<const scalar_t> dout(grad_output, grad_output.const_data_ptr<scalar_t>());
  const RowAccessor<scalar_t> dk(grad_key, grad_key.mutable_data_ptr<scalar_t>());
  const RowAccessor<scalar_t> dv(grad_value, grad_value.mutable_data_ptr<scalar_t>());
  const acc_t* lse_data = logsumexp.const_data_ptr<acc_t>();
  const acc_t* delta_data = delta.const_data_ptr<acc_t>();
  acc_t* grad_mask_data = grad_mask ? grad_mask->mutable_data_ptr<acc_t>() : nullptr;
  const scalar_t* grad_weights_data =
      grad_weights ? grad_weights->const_data_ptr<scalar_t>() : nullptr;

  // One float32 dQ partial per chunk: (chunks, batch, heads, query_len, head_dim_padded).
  at::Tensor dq_partials =
      at::zeros({chunks, batch, heads, query_len, head_dim_padded},
                query.options().dtype(accumulate_type(query.scalar_type())));
  acc_t* dq_partials_data = dq_partials.mutable_data_ptr<acc_t>();
  const int64_t dq_head_stride = query_len * head_dim_padded;

  at::parallel_for(0, batch * heads * chunks, 1, [&](int64_t begin, int64_t end) {
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
      acc_t* dq_head = dq_partials_data + ((chunk * batch + b) * heads + h) * dq_head_stride;
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
          pack_rows(q.row(b, h, q0), q.stride_row, rows, head_dim, static_cast<acc_t>(scale),
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
            std::fill(p + cols, p + cols_padded, acc_t(0));
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
              const scalar_t* gw = grad_weights_data + b * grad_weights->stride(0) +
                                   h * grad_weights->stride(1) + i * grad_weights->stride(2) +
                                   k0 * grad_weights->stride(3);
              for (int64_t c = 0; c < cols; ++c) {
                ds[c] += static_cast<acc_t>(gw[c * grad_weights->stride(3)]);
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
            std::fill(ds + cols, ds + cols_padded, acc_t(0));
            if (grad_mask_data != nullptr) {
              std::copy(ds, ds + cols,
                        grad_mask_data + ((b * heads + h) * query_len + i) * key_len + k0);
            }
          }
          // dQ += dS K (scaled at the end), dK += dS^T (scale Q)
          block_matmul<acc_t>(rows, head_dim_padded, cols, dscores.data(), block_k_padded, 1,
                              k_rows.data(), head_dim_padded, dq_head + q0 * head_dim_padded,
                              head_dim_padded, /*accumulate=*/true);
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
  const RowAccessor<scalar_t> dq(grad_query, grad_query.mutable_data_ptr<scalar_t>());
  at::parallel_for(0, batch * heads * query_len, 64, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(head_dim);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (heads * query_len);
      const int64_t h = (item / query_len) % heads;
      const int64_t i = item % query_len;
      std::fill(row.begin(), row.end(), acc_t(0));
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        const acc_t* partial = dq_partials_data +
                               ((chunk * batch + b) * heads + h) * dq_head_stride +
                               i * head_dim_padded;
        for (int64_t d = 0; d < head_dim; ++d) {
          row[d] += partial[d];
        }
      }
      store_row(row.data(), head_dim, static_cast<acc_t>(scale), dq.row(b, h, i));
    }
  });
}

// The kernels index rows with a unit-stride last dimension; anything else is copied once.
at::Tensor with_unit_last_stride(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

std::optional<at::Tensor> as_optional(const std::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? t : std::nullopt;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward_cpu(
    const at::Tensor& query_in, const at::Tensor& key_in, const at::Tensor& value_in,
    const std::optional<at::Tensor>& attn_mask_in,
    const std::optional<at::Tensor>& key_padding_mask_in, bool is_causal,
    std::optional<double> scale, double dropout_p, const std::optional<at::Tensor>& dropout_seed,
    bool need_weights) {
  const std::optional<at::Tensor> attn_mask = as_optional(attn_mask_in);
  const std::optional<at::Tensor> key_padding_mask = as_optional(key_padding_mask_in);
  const AttentionSizes sizes = check_attention_forward_args(
      query_in, key_in, value_in, attn_mask, key_padding_mask, dropout_p, dropout_seed);
  const at::Tensor query = with_unit_last_stride(query_in);
  const at::Tensor key = with_unit_last_stride(key_in);
  const at::Tensor value = with_unit_last_stride(value_in);
  // Outputs follow the caller's layout (as the Meta kernel does), not that of a private copy.
  AttentionForwardOutputs outputs =
      allocate_forward_outputs(query_in, value_in, sizes, need_weights);

  const ScoreMasking masking{make_mask_view(attn_mask, false),
                             make_mask_view(key_padding_mask, true), is_causal};
  const DropoutConfig dropout(dropout_p, read_dropout_seed(dropout_seed));
  const double softmax_scale = resolve_scale(scale, query.size(3));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, query.scalar_type(), "attention_forward_cpu", [&] {
        attention_forward_kernel<scalar_t>(query, key, value, masking, softmax_scale, dropout,
                                           outputs.output, outputs.logsumexp,
                                           need_weights ? &outputs.weights : nullptr);
      });
  return {outputs.output, outputs.logsumexp, outputs.weights};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_output_in, const at::Tensor& query_in, const at::Tensor& key_in,
    const at::Tensor& value_in, const at::Tensor& output_in, const at::Tensor& logsumexp_in,
    const std::optional<at::Tensor>& attn_mask_in,
    const std::optional<at::Tensor>& key_padding_mask_in, bool is_causal,
    std::optional<double> scale, double dropout_p, const std::optional<at::Tensor>& dropout_seed,
    const std::optional<at::Tensor>& grad_weights_in, const std::optional<at::Tensor>& weights_in,
    bool compute_mask_grad) {
  const std::optional<at::Tensor> attn_mask = as_optional(attn_mask_in);
  const std::optional<at::Tensor> key_padding_mask = as_optional(key_padding_mask_in);
  const std::optional<at::Tensor> grad_weights = as_optional(grad_weights_in);
  const std::optional<at::Tensor> weights = as_optional(weights_in);
  const AttentionSizes sizes = check_attention_backward_args(
      grad_output_in, query_in, key_in, value_in, output_in, logsumexp_in, attn_mask,
      key_padding_mask, dropout_p, dropout_seed, grad_weights, weights);
  const at::Tensor query = with_unit_last_stride(query_in);
  const at::Tensor key = with_unit_last_stride(key_in);
  const at::Tensor value = with_unit_last_stride(value_in);
  const at::Tensor grad_output = with_unit_last_stride(grad_output_in);
  const at::Tensor output = with_unit_last_stride(output_in);
  const at::Tensor logsumexp = logsumexp_in.contiguous();

  AttentionBackwardOutputs outputs =
      allocate_backward_outputs(query_in, key_in, value_in, sizes, compute_mask_grad);
  const ScoreMasking masking{make_mask_view(attn_mask, false),
                             make_mask_view(key_padding_mask, true), is_causal};
  const DropoutConfig dropout(dropout_p, read_dropout_seed(dropout_seed));
  const double softmax_scale = resolve_scale(scale, query.size(3));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, query.scalar_type(), "attention_backward_cpu", [&] {
        const at::Tensor delta = compute_softmax_delta<scalar_t>(
            grad_output, output, grad_weights ? &*grad_weights : nullptr,
            weights ? &*weights : nullptr);
        attention_backward_kernel<scalar_t>(
            grad_output, query, key, value, logsumexp, delta, masking, softmax_scale, dropout,
            grad_weights ? &*grad_weights : nullptr, outputs.grad_query, outputs.grad_key,
            outputs.grad_value, compute_mask_grad ? &outputs.grad_mask : nullptr);
      });
  return {outputs.grad_query, outputs.grad_key, outputs.grad_value, outputs.grad_mask};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_mha, CPU, m) {
  m.impl("attention_forward", &attention_forward_cpu);
  m.impl("attention_backward", &attention_backward_cpu);
}

}  // namespace torch_mha::cpu
