// The torch_mha operator library: every schema, and the C++ API that calls them through the
// dispatcher. Kernels live in one folder per backend and register themselves:
//   cpu/       CPU kernels              (TORCH_LIBRARY_IMPL(torch_mha, CPU, ...))
//   cuda/      CUDA kernels             (TORCH_LIBRARY_IMPL(torch_mha, CUDA, ...))
//   meta/      shape-only kernels       (TORCH_LIBRARY_IMPL(torch_mha, Meta, ...))
//   autograd/  C++ autograd functions   (TORCH_LIBRARY_IMPL(torch_mha, Autograd, ...))
//   multi_head_attention.cpp: the full layer, CompositeImplicitAutograd
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>
#include <torch/version.h>

#include <string>

#include "torch_mha.h"

namespace torch_mha {

TORCH_LIBRARY(torch_mha, m) {
  m.def(
      "attention_forward(Tensor query, Tensor key, Tensor value, Tensor? attn_mask=None, "
      "Tensor? key_padding_mask=None, bool is_causal=False, float? scale=None, "
      "float dropout_p=0.0, Tensor? dropout_seed=None, bool need_weights=False, "
      "bool average_weights=False) -> (Tensor output, Tensor softmax_stats, Tensor weights)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "attention_backward(Tensor grad_output, Tensor query, Tensor key, Tensor value, "
      "Tensor output, Tensor softmax_stats, Tensor? attn_mask, Tensor? key_padding_mask, "
      "bool is_causal, float? scale, float dropout_p, Tensor? dropout_seed, "
      "Tensor? grad_weights, bool average_weights, bool compute_mask_grad) "
      "-> (Tensor grad_query, Tensor grad_key, Tensor grad_value, Tensor grad_mask)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "multi_head_attention(Tensor query, Tensor key, Tensor value, int embed_dim, "
      "int num_heads, Tensor? in_proj_weight, Tensor? in_proj_bias, Tensor? bias_k, "
      "Tensor? bias_v, bool add_zero_attn, float dropout_p, Tensor out_proj_weight, "
      "Tensor? out_proj_bias, bool training=True, Tensor? key_padding_mask=None, "
      "bool need_weights=True, Tensor? attn_mask=None, Tensor? q_proj_weight=None, "
      "Tensor? k_proj_weight=None, Tensor? v_proj_weight=None, Tensor? static_k=None, "
      "Tensor? static_v=None, bool average_attn_weights=True, bool is_causal=False, "
      "bool batch_first=False) -> (Tensor attn_output, Tensor attn_weights)",
      {at::Tag::pt2_compliant_tag});
  m.def("_cuda_version() -> int", &cuda_version);
  m.def("_cpu_capability() -> str", &cpu_capability);
  m.def("_build_info() -> str", &build_info);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    bool is_causal, std::optional<double> scale, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed, bool need_weights, bool average_weights) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_mha::attention_forward", "")
                       .typed<decltype(attention_forward)>();
  return op.call(query, key, value, attn_mask, key_padding_mask, is_causal, scale, dropout_p,
                 dropout_seed, need_weights, average_weights);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_output, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& output, const at::Tensor& softmax_stats,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    bool is_causal, std::optional<double> scale, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed, const std::optional<at::Tensor>& grad_weights,
    bool average_weights, bool compute_mask_grad) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_mha::attention_backward", "")
                       .typed<decltype(attention_backward)>();
  return op.call(grad_output, query, key, value, output, softmax_stats, attn_mask, key_padding_mask,
                 is_causal, scale, dropout_p, dropout_seed, grad_weights, average_weights,
                 compute_mask_grad);
}

std::tuple<at::Tensor, at::Tensor> multi_head_attention(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, int64_t embed_dim,
    int64_t num_heads, const std::optional<at::Tensor>& in_proj_weight,
    const std::optional<at::Tensor>& in_proj_bias, const std::optional<at::Tensor>& bias_k,
    const std::optional<at::Tensor>& bias_v, bool add_zero_attn, double dropout_p,
    const at::Tensor& out_proj_weight, const std::optional<at::Tensor>& out_proj_bias,
    bool training, const std::optional<at::Tensor>& key_padding_mask, bool need_weights,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& q_proj_weight,
    const std::optional<at::Tensor>& k_proj_weight, const std::optional<at::Tensor>& v_proj_weight,
    const std::optional<at::Tensor>& static_k, const std::optional<at::Tensor>& static_v,
    bool average_attn_weights, bool is_causal, bool batch_first) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_mha::multi_head_attention", "")
                       .typed<decltype(multi_head_attention)>();
  return op.call(query, key, value, embed_dim, num_heads, in_proj_weight, in_proj_bias, bias_k,
                 bias_v, add_zero_attn, dropout_p, out_proj_weight, out_proj_bias, training,
                 key_padding_mask, need_weights, attn_mask, q_proj_weight, k_proj_weight,
                 v_proj_weight, static_k, static_v, average_attn_weights, is_causal, batch_first);
}

int64_t cuda_version() {
#ifdef TORCH_MHA_CUDA_VERSION
  return TORCH_MHA_CUDA_VERSION;  // the nvcc version, set by the build
#else
  return -1;
#endif
}

std::string build_info() {
  return std::string("torch=") + TORCH_VERSION + ";cuda=" + std::to_string(cuda_version()) +
         ";cpu=" + cpu_capability();
}

}  // namespace torch_mha
