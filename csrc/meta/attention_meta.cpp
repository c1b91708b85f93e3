// Shape-only kernels: FakeTensor, torch.compile and torch.export trace the ops through these,
// with symbolic sizes, and without any Python-side registration.
#include <torch/library.h>

#include "attention_utils.h"

namespace torch_mha::meta {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward_meta(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    bool /*is_causal*/, std::optional<double> /*scale*/, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed, bool need_weights, bool average_weights) {
  const AttentionSizes sizes = check_attention_forward_args(
      query, key, value, attn_mask, key_padding_mask, dropout_p, dropout_seed);
  AttentionForwardOutputs outputs =
      allocate_forward_outputs(query, sizes, need_weights, average_weights);
  return {outputs.output, outputs.softmax_stats, outputs.weights};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_meta(
    const at::Tensor& grad_output, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& output, const at::Tensor& softmax_stats,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    bool /*is_causal*/, std::optional<double> /*scale*/, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed, const std::optional<at::Tensor>& grad_weights,
    bool average_weights, bool compute_mask_grad) {
  const AttentionSizes sizes = check_attention_backward_args(
      grad_output, query, key, value, output, softmax_stats, attn_mask, key_padding_mask, dropout_p,
      dropout_seed, grad_weights, average_weights);
  AttentionBackwardOutputs outputs =
      allocate_backward_outputs(query, key, value, sizes, compute_mask_grad);
  return {outputs.grad_query, outputs.grad_key, outputs.grad_value, outputs.grad_mask};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_mha, Meta, m) {
  m.impl("attention_forward", &attention_forward_meta);
  m.impl("attention_backward", &attention_backward_meta);
}

}  // namespace torch_mha::meta
