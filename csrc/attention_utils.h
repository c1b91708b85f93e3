// Argument checking and output allocation for the core attention ops, shared by every backend
// (CPU, CUDA, Meta) so that they accept the same inputs and return identically laid out tensors.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>

#include <optional>

#include "common/masking.h"

namespace torch_mha {

// Sizes of one attention problem: query (batch, heads, query_len, head_dim), key
// (batch, heads, key_len, head_dim), value (batch, heads, key_len, value_dim).
struct AttentionSizes {
  c10::SymInt batch;
  c10::SymInt heads;
  c10::SymInt query_len;
  c10::SymInt key_len;
  c10::SymInt head_dim;
  c10::SymInt value_dim;
};

// Validates the arguments of attention_forward and returns the problem sizes. Every failure
// names the argument and what was expected.
AttentionSizes check_attention_forward_args(const at::Tensor& query, const at::Tensor& key,
                                            const at::Tensor& value,
                                            const std::optional<at::Tensor>& attn_mask,
                                            const std::optional<at::Tensor>& key_padding_mask,
                                            double dropout_p,
                                            const std::optional<at::Tensor>& dropout_seed);

// Validates the extra arguments of attention_backward (on top of the forward checks).
AttentionSizes check_attention_backward_args(
    const at::Tensor& grad_output, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& output, const at::Tensor& softmax_stats,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    double dropout_p, const std::optional<at::Tensor>& dropout_seed,
    const std::optional<at::Tensor>& grad_weights, bool average_weights);

// Precision of softmax statistics and accumulators: float64 for float64 inputs, else float32.
at::ScalarType accumulate_type(at::ScalarType input_type);

// Softmax scale: the caller's value, or 1/sqrt(head_dim).
double resolve_scale(std::optional<double> scale, int64_t head_dim);

// A fresh tensor of `sizes` (4-D) whose memory order follows `like`: the last dimension is
// innermost and the first three are ordered by like's strides. Heads read out of a projection of
// shape (L, N, 3E) therefore produce an output laid out as (L, N, H, D), which merges back into
// (L, N, E) as a view.
at::Tensor empty_with_layout_of(const at::Tensor& like, c10::SymIntArrayRef sizes,
                                const at::TensorOptions& options);

struct AttentionForwardOutputs {
  at::Tensor output;  // (batch, heads, query_len, value_dim), layout of query
  // (batch, heads, query_len, 2), accumulate type: per query row the offset subtracted before
  // exponentiating and log(sum of exponentials); their sum is the row's log-sum-exp.
  at::Tensor softmax_stats;
  at::Tensor weights;  // (batch, [heads,] query_len, key_len) if requested, else empty
};

AttentionForwardOutputs allocate_forward_outputs(const at::Tensor& query,
                                                 const AttentionSizes& sizes, bool need_weights,
                                                 bool average_weights);

struct AttentionBackwardOutputs {
  at::Tensor grad_query;  // layout of query
  at::Tensor grad_key;    // layout of key
  at::Tensor grad_value;  // layout of value
  at::Tensor grad_mask;   // (batch, heads, query_len, key_len) zeros if requested, else empty
};

AttentionBackwardOutputs allocate_backward_outputs(const at::Tensor& query, const at::Tensor& key,
                                                   const at::Tensor& value,
                                                   const AttentionSizes& sizes,
                                                   bool compute_mask_grad);

// The mask as the kernels read it, broadcast to (batch, heads, query_len, key_len) by strides.
// A key padding mask has shape (batch, key_len).
MaskView make_mask_view(const std::optional<at::Tensor>& mask, bool is_key_padding_mask);

// The dropout seed as an unsigned integer (read on the host).
uint64_t read_dropout_seed(const std::optional<at::Tensor>& dropout_seed);

}  // namespace torch_mha
