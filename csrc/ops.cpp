// The torch_mha operator library: every schema, and the C++ API that calls them through the
// dispatcher. Kernels live in one folder per backend and register themselves:
//   cpu/       CPU kernels              (TORCH_LIBRARY_IMPL(torch_mha, CPU, ...))
//   cuda/      CUDA kernels             (TORCH_LIBRARY_IMPL(torch_mha, CUDA, ...))
//   meta/      shape-only kernels       (TORCH_LIBRARY_IMPL(torch_mha, Meta, ...))
//   autograd/  C++ autograd functions   (TORCH_LIBRARY_IMPL(torch_mha, Autograd, ...))
//   multi_head_attention.cpp: the full layer, CompositeImplicitAutograd
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>
#include <torch/version.h>

#include <string>

#include "attention_args.h"
#include "backend_selection.h"
#include "cpu/reduced_products.h"
#include "torch_mha.h"

namespace torch_mha {

TORCH_LIBRARY(torch_mha, m) {
  m.def(
      "attention_forward(Tensor query, Tensor key, Tensor value, Tensor? attn_mask=None, "
      "Tensor? key_padding_mask=None, bool is_causal=False, float? scale=None, "
      "float dropout_p=0.0, Tensor? dropout_seed=None, bool need_weights=False, "
      "bool average_weights=False, int window_left=-1, int window_right=-1, "
      "Tensor? alibi_slopes=None, float softcap=0.0, Tensor? sinks=None) "
      "-> (Tensor output, Tensor softmax_stats, Tensor weights)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "attention_backward(Tensor grad_output, Tensor query, Tensor key, Tensor value, "
      "Tensor output, Tensor softmax_stats, Tensor? attn_mask, Tensor? key_padding_mask, "
      "bool is_causal, float? scale, float dropout_p, Tensor? dropout_seed, "
      "Tensor? grad_weights, bool average_weights, bool compute_mask_grad, "
      "int window_left=-1, int window_right=-1, Tensor? alibi_slopes=None, float softcap=0.0, "
      "Tensor? sinks=None) -> (Tensor grad_query, Tensor grad_key, Tensor grad_value, "
      "Tensor grad_mask, Tensor grad_sinks)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "varlen_attention_forward(Tensor query, Tensor key, Tensor value, Tensor cu_seqlens_q, "
      "Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float? scale=None, "
      "float dropout_p=0.0, Tensor? dropout_seed=None, bool is_causal=False, "
      "int window_left=-1, int window_right=-1, Tensor? alibi_slopes=None, float softcap=0.0, "
      "Tensor? sinks=None) -> (Tensor output, Tensor softmax_stats)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "varlen_attention_backward(Tensor grad_output, Tensor query, Tensor key, Tensor value, "
      "Tensor output, Tensor softmax_stats, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, float? scale, float dropout_p, Tensor? dropout_seed, "
      "bool is_causal, int window_left, int window_right, Tensor? alibi_slopes, float softcap, "
      "Tensor? sinks) -> (Tensor grad_query, Tensor grad_key, Tensor grad_value, "
      "Tensor grad_sinks)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "attention_with_kvcache(Tensor query, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor cache_seqlens, Tensor? key=None, Tensor? value=None, float? scale=None, "
      "int window_left=-1, int window_right=0, Tensor? alibi_slopes=None, float softcap=0.0, "
      "Tensor? sinks=None) -> Tensor",
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
  m.def(
      "_explain_cuda_backend(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, "
      "Tensor? key_padding_mask, bool is_causal, float dropout_p, bool need_weights, "
      "int window_left, int window_right, Tensor? alibi_slopes, float softcap, Tensor? sinks, "
      "bool backward, bool mask_grad, int device_major, int device_minor, bool deterministic, "
      "str requested) -> (str backend, str[] candidates, str[] reasons)",
      &explain_cuda_backend);
  m.def(
      "_explain_cpu_products(ScalarType dtype, str requested, int[]? machine=None) "
      "-> (str engine, str reason)",
      &cpu::explain_cpu_products);
  m.def("_cuda_version() -> int", &cuda_version);
  m.def("_cpu_capability() -> str", &cpu_capability);
  m.def("_build_info() -> str", &build_info);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    bool is_causal, std::optional<double> scale, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed, bool need_weights, bool average_weights,
    int64_t window_left, int64_t window_right, const std::optional<at::Tensor>& alibi_slopes,
    double softcap, const std::optional<at::Tensor>& sinks) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_mha::attention_forward", "")
                       .typed<decltype(attention_forward)>();
  return op.call(query, key, value, attn_mask, key_padding_mask, is_causal, scale, dropout_p,
                 dropout_seed, need_weights, average_weights, window_left, window_right,
                 alibi_slopes, softcap, sinks);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_output, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& output, const at::Tensor& softmax_stats,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    bool is_causal, std::optional<double> scale, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed, const std::optional<at::Tensor>& grad_weights,
    bool average_weights, bool compute_mask_grad, int64_t window_left, int64_t window_right,
    const std::optional<at::Tensor>& alibi_slopes, double softcap,
    const std::optional<at::Tensor>& sinks) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_mha::attention_backward", "")
                       .typed<decltype(attention_backward)>();
  return op.call(grad_output, query, key, value, output, softmax_stats, attn_mask, key_padding_mask,
                 is_causal, scale, dropout_p, dropout_seed, grad_weights, average_weights,
                 compute_mask_grad, window_left, window_right, alibi_slopes, softcap, sinks);
}

std::tuple<at::Tensor, at::Tensor> varlen_attention_forward(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, std::optional<double> scale, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed, bool is_causal, int64_t window_left,
    int64_t window_right, const std::optional<at::Tensor>& alibi_slopes, double softcap,
    const std::optional<at::Tensor>& sinks) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_mha::varlen_attention_forward", "")
                       .typed<decltype(varlen_attention_forward)>();
  return op.call(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                 dropout_p, dropout_seed, is_causal, window_left, window_right, alibi_slopes,
                 softcap, sinks);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> varlen_attention_backward(
    const at::Tensor& grad_output, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& output, const at::Tensor& softmax_stats,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, std::optional<double> scale, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed, bool is_causal, int64_t window_left,
    int64_t window_right, const std::optional<at::Tensor>& alibi_slopes, double softcap,
    const std::optional<at::Tensor>& sinks) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_mha::varlen_attention_backward", "")
                       .typed<decltype(varlen_attention_backward)>();
  return op.call(grad_output, query, key, value, output, softmax_stats, cu_seqlens_q, cu_seqlens_k,
                 max_seqlen_q, max_seqlen_k, scale, dropout_p, dropout_seed, is_causal, window_left,
                 window_right, alibi_slopes, softcap, sinks);
}

at::Tensor attention_with_kvcache(const at::Tensor& query, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                  const std::optional<at::Tensor>& key,
                                  const std::optional<at::Tensor>& value,
                                  std::optional<double> scale, int64_t window_left,
                                  int64_t window_right,
                                  const std::optional<at::Tensor>& alibi_slopes, double softcap,
                                  const std::optional<at::Tensor>& sinks) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_mha::attention_with_kvcache", "")
                       .typed<decltype(attention_with_kvcache)>();
  return op.call(query, k_cache, v_cache, cache_seqlens, key, value, scale, window_left,
                 window_right, alibi_slopes, softcap, sinks);
}

ForwardResult call_forward(const AttentionForwardArgs& a) {
  if (a.is_varlen()) {
    auto [output, softmax_stats] = varlen_attention_forward(
        a.query, a.key, a.value, *a.cu_seqlens_q, *a.cu_seqlens_k, a.max_seqlen_q, a.max_seqlen_k,
        a.scale, a.dropout_p, a.dropout_seed, a.is_causal, a.window_left, a.window_right,
        a.alibi_slopes, a.softcap, a.sinks);
    return {output, softmax_stats, at::Tensor()};
  }
  return attention_forward(a.query, a.key, a.value, a.attn_mask, a.key_padding_mask, a.is_causal,
                           a.scale, a.dropout_p, a.dropout_seed, a.need_weights, a.average_weights,
                           a.window_left, a.window_right, a.alibi_slopes, a.softcap, a.sinks);
}

BackwardResult call_backward(const AttentionBackwardArgs& b) {
  const AttentionForwardArgs& a = b.forward;
  if (a.is_varlen()) {
    auto [grad_query, grad_key, grad_value, grad_sinks] = varlen_attention_backward(
        b.grad_output, a.query, a.key, a.value, b.output, b.softmax_stats, *a.cu_seqlens_q,
        *a.cu_seqlens_k, a.max_seqlen_q, a.max_seqlen_k, a.scale, a.dropout_p, a.dropout_seed,
        a.is_causal, a.window_left, a.window_right, a.alibi_slopes, a.softcap, a.sinks);
    // No mask gradient in a packed batch; an empty tensor keeps every result defined.
    return {grad_query, grad_key, grad_value, at::empty({0}, grad_query.options()), grad_sinks};
  }
  return attention_backward(b.grad_output, a.query, a.key, a.value, b.output, b.softmax_stats,
                            a.attn_mask, a.key_padding_mask, a.is_causal, a.scale, a.dropout_p,
                            a.dropout_seed, b.grad_weights, a.average_weights, b.compute_mask_grad,
                            a.window_left, a.window_right, a.alibi_slopes, a.softcap, a.sinks);
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
