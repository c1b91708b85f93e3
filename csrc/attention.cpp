// The C++ counterparts of torch_mha.attention and torch_mha.varlen_attention: draw the dropout
// seed from PyTorch's default generator and call the core ops, whose autograd, CPU, CUDA and
// Meta kernels do the rest. Plain functions rather than ops: an op returning an optional
// tensor (the weights) cannot be recorded by torch.jit.trace, and the Python functions reach
// the same core ops in every mode.
#include <ATen/ATen.h>

#include <limits>

#include "torch_mha.h"

namespace torch_mha {
namespace {

// One int64 seed per call, from the default generator of the query's device: torch.manual_seed
// reproduces a run, and the core op stays a pure function of its inputs.
std::optional<at::Tensor> draw_dropout_seed(double dropout_p, const at::Tensor& query) {
  if (dropout_p <= 0.0) {
    return std::nullopt;
  }
  return at::randint(std::numeric_limits<int64_t>::max(), {1}, query.options().dtype(at::kLong));
}

void check_window_size(const char* op, at::IntArrayRef window_size) {
  TORCH_CHECK_VALUE(window_size.size() == 2, op,
                    ": window_size must be a pair (left, right), but got ", window_size.size(),
                    " values");
}

}  // namespace

std::tuple<at::Tensor, std::optional<at::Tensor>> attention(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    bool is_causal, std::optional<double> scale, double dropout_p, bool need_weights,
    bool average_weights, at::IntArrayRef window_size,
    const std::optional<at::Tensor>& alibi_slopes, double softcap,
    const std::optional<at::Tensor>& sinks) {
  check_window_size("torch_mha::attention", window_size);
  auto [output, softmax_stats, weights] =
      attention_forward(query, key, value, attn_mask, key_padding_mask, is_causal, scale, dropout_p,
                        draw_dropout_seed(dropout_p, query), need_weights, average_weights,
                        window_size[0], window_size[1], alibi_slopes, softcap, sinks);
  (void)softmax_stats;
  return {output, need_weights ? std::optional<at::Tensor>(weights) : std::nullopt};
}

at::Tensor varlen_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                            int64_t max_seqlen_q, int64_t max_seqlen_k, std::optional<double> scale,
                            double dropout_p, bool is_causal, at::IntArrayRef window_size,
                            const std::optional<at::Tensor>& alibi_slopes, double softcap,
                            const std::optional<at::Tensor>& sinks) {
  check_window_size("torch_mha::varlen_attention", window_size);
  auto [output, softmax_stats] = varlen_attention_forward(
      query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, dropout_p,
      draw_dropout_seed(dropout_p, query), is_causal, window_size[0], window_size[1], alibi_slopes,
      softcap, sinks);
  (void)softmax_stats;
  return output;
}

}  // namespace torch_mha
