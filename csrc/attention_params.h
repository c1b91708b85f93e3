// One description of an attention problem, read by every kernel: the CPU builds (cpu/), the CUDA
// kernels (cuda/) and the test harness that runs the CUDA kernels on the CPU. It is filled once,
// on the host, from the op's arguments (attention_args.cpp), after every check has passed; the
// kernels trust it. Plain data only (pointers, sizes, strides, flags), so the same struct is
// passed to a __global__ function by value.
//
// Shapes, in the kernels' terms:
//   query  (batch, heads, query_len, head_dim)     key   (batch, kv_heads, key_len, head_dim)
//   output (batch, heads, query_len, value_dim)    value (batch, kv_heads, key_len, value_dim)
// Query head h reads key/value head h / (heads / kv_heads) (grouped-query attention).
// A packed variable-length batch (varlen) stores sequence b's rows at [cu_seqlens[b],
// cu_seqlens[b+1]) of a (total, heads, dim) tensor; query_len and key_len are then the longest
// sequence, and every per-sequence quantity goes through the *_len_of(b) accessors.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/macros/Macros.h>

#include <cstdint>

#include "common/masking.h"

namespace torch_mha {

// Rows of a tensor seen as (batch, head, row, column) with unit column stride. In a packed
// batch, sequence b starts at row batch_start[b] of one long sequence (stride_batch is 0).
struct RowLayout {
  void* data = nullptr;
  int64_t stride_batch = 0;
  int64_t stride_head = 0;
  int64_t stride_row = 0;
  const int32_t* batch_start = nullptr;

  template <typename T>
  C10_HOST_DEVICE T* row(int64_t batch, int64_t head, int64_t r) const {
    const int64_t first = batch_start == nullptr ? 0 : batch_start[batch];
    return static_cast<T*>(data) + batch * stride_batch + head * stride_head +
           (first + r) * stride_row;
  }
};

// A 4-D tensor with arbitrary strides, read as (batch, head, query, key): the gradient of the
// returned weights (head stride 0 when the weights were averaged over heads).
struct Strided4d {
  const void* data = nullptr;
  int64_t strides[4] = {0, 0, 0, 0};

  C10_HOST_DEVICE int64_t offset(int64_t b, int64_t h, int64_t i, int64_t j) const {
    return b * strides[0] + h * strides[1] + i * strides[2] + j * strides[3];
  }
};

struct AttentionParams {
  c10::ScalarType dtype = c10::ScalarType::Float;  // of query, key, value and output

  int64_t batch = 0;
  int64_t heads = 0;
  int64_t kv_heads = 0;
  int64_t query_len = 0;  // the longest sequence when varlen
  int64_t key_len = 0;
  int64_t head_dim = 0;
  int64_t value_dim = 0;
  // Packed variable-length batch: int32 (batch + 1) prefix sums, or nullptr for dense tensors.
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* cu_seqlens_k = nullptr;
  // Dense batch whose sequence b uses only the first key_lengths[b] key rows (a KV cache):
  // int32 (batch), or nullptr.
  const int32_t* key_lengths = nullptr;

  RowLayout query, key, value, output;
  // Per query row, in the accumulate type: the offset subtracted before exponentiating and
  // log(sum of exponentials) (common/softmax.h). Rows of two elements.
  RowLayout softmax_stats;
  // Attention probabilities after dropout, contiguous: (batch, query_len, key_len) averaged over
  // heads when average_weights, else (batch, heads, query_len, key_len); nullptr if not asked.
  void* weights = nullptr;
  bool average_weights = false;

  // Scores: s = softcap * tanh(scale q.k / softcap) (when softcap > 0), then ALiBi, attn_mask
  // and key_padding_mask are added, then keys outside the causal rule or the window get -inf.
  double scale = 1.0;
  double softcap = 0.0;
  MaskView attn_mask;
  MaskView key_padding_mask;
  Visibility visibility;
  // float32 ALiBi slopes, (heads) or (batch, heads) with alibi_batch_stride = heads; or nullptr.
  const float* alibi_slopes = nullptr;
  int64_t alibi_batch_stride = 0;
  // Per-head sink logits (heads) in the accumulate type, or nullptr: they join each row's
  // softmax denominator and nothing else.
  const void* sinks = nullptr;

  // Dropout on the probabilities. The seed is an int64 in the tensors' memory (a device pointer
  // for CUDA, read there so that a launch needs no host synchronisation).
  double dropout_p = 0.0;
  const int64_t* dropout_seed = nullptr;

  C10_HOST_DEVICE int64_t query_len_of(int64_t b) const {
    return cu_seqlens_q == nullptr ? query_len : cu_seqlens_q[b + 1] - cu_seqlens_q[b];
  }
  C10_HOST_DEVICE int64_t key_len_of(int64_t b) const {
    if (cu_seqlens_k != nullptr) {
      return cu_seqlens_k[b + 1] - cu_seqlens_k[b];
    }
    return key_lengths == nullptr ? key_len : key_lengths[b];
  }
  // Query heads per key/value head.
  C10_HOST_DEVICE int64_t group_size() const { return kv_heads > 0 ? heads / kv_heads : 1; }
  C10_HOST_DEVICE int64_t kv_head_of(int64_t head) const { return head / group_size(); }
  C10_HOST_DEVICE bool has_dropout() const { return dropout_p > 0.0; }
  C10_HOST_DEVICE float alibi_slope(int64_t b, int64_t h) const {
    return alibi_slopes[b * alibi_batch_stride + h];
  }
};

// What the backward reads and writes on top of the forward's problem.
struct AttentionBackwardParams : AttentionParams {
  RowLayout grad_output;  // (batch, heads, query_len, value_dim)
  RowLayout grad_query, grad_key, grad_value;
  // Gradient of the returned weights (data == nullptr unless they were differentiated), and the
  // factor it enters with: 1/heads for head-averaged weights, else 1.
  Strided4d grad_weights;
  double grad_weights_scale = 1.0;
  // dS, the gradient of the scores, (batch, heads, query_len, key_len) contiguous in the
  // accumulate type, for masks that require grad; nullptr otherwise.
  void* grad_mask = nullptr;
  // delta_i = dO_i . O_i (+ sum_j dW_ij W_ij): one accumulate-type value per query row, laid
  // out like softmax_stats with rows of one element. Written by the backward.
  RowLayout delta;
};

}  // namespace torch_mha
