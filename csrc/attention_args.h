// The core attention ops' arguments as one struct, and what every backend does with them before
// its kernels run: argument checks, output allocation, and filling the AttentionParams that the
// kernels read (attention_params.h). CPU, CUDA, Meta, Autograd and Autocast all go through here,
// so they accept the same inputs, raise the same errors and return identically laid out tensors.
//
// The four core ops (schemas in ops.cpp) map onto two structs:
//   attention_forward / varlen_attention_forward    -> AttentionForwardArgs
//   attention_backward / varlen_attention_backward  -> AttentionBackwardArgs
// A backend implements one forward and one backward function on these structs and registers
// them for all four ops with register_core_attention_kernels(); the ops' positional signatures
// are written out only in the adapters at the bottom of this file.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "attention_params.h"

namespace torch_mha {

struct AttentionForwardArgs {
  at::Tensor query;  // (batch, heads, query_len, head_dim), or (total_q, heads, head_dim) varlen
  at::Tensor key;    // (batch, kv_heads, key_len, head_dim), or (total_k, kv_heads, head_dim)
  at::Tensor value;  // (batch, kv_heads, key_len, value_dim), or (total_k, kv_heads, value_dim)
  std::optional<at::Tensor> attn_mask;         // broadcastable to (batch, heads, L, S)
  std::optional<at::Tensor> key_padding_mask;  // (batch, S)
  bool is_causal = false;
  std::optional<double> scale;
  double dropout_p = 0.0;
  std::optional<at::Tensor> dropout_seed;
  bool need_weights = false;
  bool average_weights = false;
  int64_t window_left = -1;
  int64_t window_right = -1;
  std::optional<at::Tensor> alibi_slopes;
  double softcap = 0.0;
  std::optional<at::Tensor> sinks;
  // Packed variable-length batch: int32 (batch + 1) prefix sums and the longest sequences.
  std::optional<at::Tensor> cu_seqlens_q;
  std::optional<at::Tensor> cu_seqlens_k;
  int64_t max_seqlen_q = 0;
  int64_t max_seqlen_k = 0;
  // Dense batch with a KV cache: int32 (batch) number of valid key rows per sequence
  // (attention_with_kvcache fills it; no op takes it directly).
  std::optional<at::Tensor> key_lengths;

  bool is_varlen() const { return cu_seqlens_q.has_value(); }
  const char* op_name() const;
};

struct AttentionBackwardArgs {
  at::Tensor grad_output;
  AttentionForwardArgs forward;  // the inputs of the forward call being differentiated
  at::Tensor output;
  at::Tensor softmax_stats;
  std::optional<at::Tensor> grad_weights;
  bool compute_mask_grad = false;

  const char* op_name() const;
};

using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // output, stats, weights
// grad_query, grad_key, grad_value, grad_mask, grad_sinks
using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Sizes of a problem, symbolic so that the Meta kernel can trace dynamic shapes.
struct AttentionShape {
  c10::SymInt batch;
  c10::SymInt heads;
  c10::SymInt kv_heads;
  c10::SymInt query_len;  // the longest sequence when varlen
  c10::SymInt key_len;
  c10::SymInt head_dim;
  c10::SymInt value_dim;
};

// Every check of the forward's arguments; each failure names the argument and what was
// expected. Values inside cu_seqlens are checked only where `read_values` (real tensors).
AttentionShape check_forward_args(const AttentionForwardArgs& args, bool read_values);
// The forward's checks plus those of the backward's own arguments.
AttentionShape check_backward_args(const AttentionBackwardArgs& args, bool read_values);

// Precision of softmax statistics and accumulators: float64 for float64 inputs, else float32.
at::ScalarType accumulate_type(at::ScalarType input_type);

// Softmax scale: the caller's value, or 1/sqrt(head_dim).
double resolve_scale(std::optional<double> scale, int64_t head_dim);

struct AttentionForwardOutputs {
  at::Tensor output;         // layout of the query
  at::Tensor softmax_stats;  // (batch, heads, L, 2) or varlen (total_q, heads, 2), accumulate type
  at::Tensor weights;        // (batch, [heads,] L, S) if requested, else empty
};

AttentionForwardOutputs allocate_forward_outputs(const AttentionForwardArgs& args,
                                                 const AttentionShape& shape);

struct AttentionBackwardOutputs {
  at::Tensor grad_query;  // layout of query
  at::Tensor grad_key;    // layout of key
  at::Tensor grad_value;  // layout of value
  at::Tensor grad_mask;   // (batch, heads, L, S) zeros, accumulate type, if requested; else empty
  at::Tensor grad_sinks;  // (heads), dtype of sinks, if sinks were given; else empty
};

AttentionBackwardOutputs allocate_backward_outputs(const AttentionBackwardArgs& args,
                                                   const AttentionShape& shape);

// The problem as the kernels read it. `args` holds the tensors the kernels will actually read
// (a backend may have replaced query, key or value by a copy with another layout). Small
// tensors converted for the kernels (float32 slopes, accumulate-type sinks, int32 sequence
// offsets) are appended to `keep_alive`, which must outlive the kernels.
AttentionParams make_forward_params(const AttentionForwardArgs& args,
                                    const AttentionForwardOutputs& outputs,
                                    std::vector<at::Tensor>& keep_alive);
// Same for the backward; `delta` is the caller's (batch, heads, L) or varlen (total_q, heads)
// accumulate-type scratch for delta.
AttentionBackwardParams make_backward_params(const AttentionBackwardArgs& args,
                                             const AttentionBackwardOutputs& outputs,
                                             const at::Tensor& delta,
                                             std::vector<at::Tensor>& keep_alive);

// delta scratch of the backward: (batch, heads, L) or varlen (total_q, heads).
at::Tensor allocate_delta(const AttentionBackwardArgs& args);

// grad_sinks[h] = -sum over rows of p_sink * delta, where p_sink = exp(sink - offset - log_sum)
// is the probability the sink took from each row: the sink's share of the softmax gradient.
void compute_sink_gradient(const AttentionBackwardArgs& args, const at::Tensor& delta,
                           at::Tensor& grad_sinks);

// A 4-D (or 3-D varlen) tensor of `sizes` whose memory order follows `like`: the last dimension
// is innermost and the others are ordered by like's strides. Heads read out of a projection of
// shape (L, N, 3E) therefore produce an output laid out as (L, N, H, D).
at::Tensor empty_with_layout_of(const at::Tensor& like, c10::SymIntArrayRef sizes,
                                const at::TensorOptions& options);

// The mask as the kernels read it, broadcast to (batch, heads, L, S) by strides. A key padding
// mask has shape (batch, S).
MaskView make_mask_view(const std::optional<at::Tensor>& mask, bool is_key_padding_mask);

// ---------------------------------------------------------------------------------------------
// Op adapters: the schemas' positional signatures, mapped onto the structs above.

using ForwardImpl = ForwardResult (*)(const AttentionForwardArgs&);
using BackwardImpl = BackwardResult (*)(const AttentionBackwardArgs&);

namespace detail {

inline std::optional<at::Tensor> present(const std::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? t : std::nullopt;
}

template <ForwardImpl impl>
ForwardResult attention_forward_op(const at::Tensor& query, const at::Tensor& key,
                                   const at::Tensor& value,
                                   const std::optional<at::Tensor>& attn_mask,
                                   const std::optional<at::Tensor>& key_padding_mask,
                                   bool is_causal, std::optional<double> scale, double dropout_p,
                                   const std::optional<at::Tensor>& dropout_seed, bool need_weights,
                                   bool average_weights, int64_t window_left, int64_t window_right,
                                   const std::optional<at::Tensor>& alibi_slopes, double softcap,
                                   const std::optional<at::Tensor>& sinks) {
  AttentionForwardArgs args;
  args.query = query;
  args.key = key;
  args.value = value;
  args.attn_mask = present(attn_mask);
  args.key_padding_mask = present(key_padding_mask);
  args.is_causal = is_causal;
  args.scale = scale;
  args.dropout_p = dropout_p;
  args.dropout_seed = present(dropout_seed);
  args.need_weights = need_weights;
  args.average_weights = average_weights;
  args.window_left = window_left;
  args.window_right = window_right;
  args.alibi_slopes = present(alibi_slopes);
  args.softcap = softcap;
  args.sinks = present(sinks);
  return impl(args);
}

template <BackwardImpl impl>
BackwardResult attention_backward_op(
    const at::Tensor& grad_output, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& output, const at::Tensor& softmax_stats,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    bool is_causal, std::optional<double> scale, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed, const std::optional<at::Tensor>& grad_weights,
    bool average_weights, bool compute_mask_grad, int64_t window_left, int64_t window_right,
    const std::optional<at::Tensor>& alibi_slopes, double softcap,
    const std::optional<at::Tensor>& sinks) {
  AttentionBackwardArgs args;
  args.grad_output = grad_output;
  AttentionForwardArgs& fwd = args.forward;
  fwd.query = query;
  fwd.key = key;
  fwd.value = value;
  fwd.attn_mask = present(attn_mask);
  fwd.key_padding_mask = present(key_padding_mask);
  fwd.is_causal = is_causal;
  fwd.scale = scale;
  fwd.dropout_p = dropout_p;
  fwd.dropout_seed = present(dropout_seed);
  fwd.average_weights = average_weights;
  fwd.window_left = window_left;
  fwd.window_right = window_right;
  fwd.alibi_slopes = present(alibi_slopes);
  fwd.softcap = softcap;
  fwd.sinks = present(sinks);
  args.output = output;
  args.softmax_stats = softmax_stats;
  args.grad_weights = present(grad_weights);
  fwd.need_weights = args.grad_weights.has_value();
  args.compute_mask_grad = compute_mask_grad;
  return impl(args);
}

AttentionForwardArgs varlen_forward_args(const at::Tensor& query, const at::Tensor& key,
                                         const at::Tensor& value, const at::Tensor& cu_seqlens_q,
                                         const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                         int64_t max_seqlen_k, std::optional<double> scale,
                                         double dropout_p,
                                         const std::optional<at::Tensor>& dropout_seed,
                                         bool is_causal, int64_t window_left, int64_t window_right,
                                         const std::optional<at::Tensor>& alibi_slopes,
                                         double softcap, const std::optional<at::Tensor>& sinks);

template <ForwardImpl impl>
std::tuple<at::Tensor, at::Tensor> varlen_attention_forward_op(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, std::optional<double> scale, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed, bool is_causal, int64_t window_left,
    int64_t window_right, const std::optional<at::Tensor>& alibi_slopes, double softcap,
    const std::optional<at::Tensor>& sinks) {
  auto [output, softmax_stats, weights] = impl(varlen_forward_args(
      query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, dropout_p,
      dropout_seed, is_causal, window_left, window_right, alibi_slopes, softcap, sinks));
  (void)weights;
  return {output, softmax_stats};
}

template <BackwardImpl impl>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> varlen_attention_backward_op(
    const at::Tensor& grad_output, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& output, const at::Tensor& softmax_stats,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, std::optional<double> scale, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed, bool is_causal, int64_t window_left,
    int64_t window_right, const std::optional<at::Tensor>& alibi_slopes, double softcap,
    const std::optional<at::Tensor>& sinks) {
  AttentionBackwardArgs args;
  args.grad_output = grad_output;
  args.forward = varlen_forward_args(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                     max_seqlen_k, scale, dropout_p, dropout_seed, is_causal,
                                     window_left, window_right, alibi_slopes, softcap, sinks);
  args.output = output;
  args.softmax_stats = softmax_stats;
  auto [grad_query, grad_key, grad_value, grad_mask, grad_sinks] = impl(args);
  (void)grad_mask;
  return {grad_query, grad_key, grad_value, grad_sinks};
}

}  // namespace detail

// Registers a backend's forward for the dense and the varlen op.
template <ForwardImpl forward>
void register_forward_kernels(torch::Library& m) {
  m.impl("attention_forward", &detail::attention_forward_op<forward>);
  m.impl("varlen_attention_forward", &detail::varlen_attention_forward_op<forward>);
}

// Registers a backend's forward and backward for the dense and the varlen ops.
template <ForwardImpl forward, BackwardImpl backward>
void register_core_attention_kernels(torch::Library& m) {
  register_forward_kernels<forward>(m);
  m.impl("attention_backward", &detail::attention_backward_op<backward>);
  m.impl("varlen_attention_backward", &detail::varlen_attention_backward_op<backward>);
}

// Calls the op that `args` describes (dense or varlen) through the dispatcher, below the
// current dispatch key: what the Autograd and Autocast kernels run underneath themselves.
ForwardResult call_forward(const AttentionForwardArgs& args);
BackwardResult call_backward(const AttentionBackwardArgs& args);

}  // namespace torch_mha
