// torch_mha public C++ API.
//
// Every function calls through the PyTorch dispatcher, so autograd, autocast and the backend
// kernels (CPU, CUDA) apply exactly as they do for the same op called from Python or TorchScript.
// Including this header also keeps libtorch_mha linked into a program that never names one of
// its symbols otherwise (see the link anchor at the bottom), which a program that only loads a
// TorchScript model using torch_mha ops needs.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#include "macros.h"

namespace torch_mha {

// Attention with autograd, the function users call (torch_mha.attention in Python):
//   query (N, H, L, E), key (N, Hkv, S, E), value (N, Hkv, S, Ev), with H a multiple of Hkv.
// Masks, is_causal, scale and the modifiers are those of attention_forward below, with
// window_size = {left, right}. dropout_p > 0 draws its seed from PyTorch's default generator.
// Returns (output (N, H, L, Ev), weights (N, [H,] L, S) if need_weights else nullopt).
TORCH_MHA_API std::tuple<at::Tensor, std::optional<at::Tensor>> attention(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask = std::nullopt,
    const std::optional<at::Tensor>& key_padding_mask = std::nullopt, bool is_causal = false,
    std::optional<double> scale = std::nullopt, double dropout_p = 0.0, bool need_weights = false,
    bool average_weights = false, at::IntArrayRef window_size = {-1, -1},
    const std::optional<at::Tensor>& alibi_slopes = std::nullopt, double softcap = 0.0,
    const std::optional<at::Tensor>& sinks = std::nullopt);

// Attention over a packed batch of sequences of different lengths, with autograd
// (torch_mha.varlen_attention): see varlen_attention_forward below. Returns (total_q, H, Ev).
TORCH_MHA_API at::Tensor varlen_attention(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, std::optional<double> scale = std::nullopt, double dropout_p = 0.0,
    bool is_causal = false, at::IntArrayRef window_size = {-1, -1},
    const std::optional<at::Tensor>& alibi_slopes = std::nullopt, double softcap = 0.0,
    const std::optional<at::Tensor>& sinks = std::nullopt);

// The fused core op on per-head tensors: what attention() calls, with the dropout seed explicit
// and the softmax statistics returned for the backward.
//   query (N, H, L, E), key (N, Hkv, S, E), value (N, Hkv, S, Ev); H a multiple of Hkv (query
//     head h reads key/value head h / (H / Hkv): grouped-query attention)
//   attn_mask: broadcastable to (N, H, L, S); bool (true = masked out) or floating (added)
//   key_padding_mask: (N, S); bool (true = padding) or floating (added)
//   is_causal: query i attends keys 0..i (top-left aligned)
//   scale: defaults to 1/sqrt(E)
//   dropout_p, dropout_seed: dropout on the probabilities; the seed is an int64 tensor
//   need_weights, average_weights: also return the attention probabilities (after dropout),
//     averaged over heads when average_weights
//   window_left, window_right: query i sees keys j with i + S - L - left <= j <= i + S - L +
//     right (bottom-right aligned); -1 = no limit on that side. Combines with is_causal.
//   alibi_slopes: float32 (H) or (N, H); adds -slope * |i + S - L - j| to the scores
//   softcap: > 0 caps the scaled scores as softcap * tanh(score / softcap), before any bias
//   sinks: (H) logits that join each row's softmax denominator only
// Returns (output (N, H, L, Ev), softmax_stats (N, H, L, 2), weights: (N, L, S) averaged or
// (N, H, L, S) per head, or an empty tensor when need_weights is false). softmax_stats holds
// each query row's (offset, log of the sum): softmax_stats.sum(-1) is the row's log-sum-exp,
// +inf for a row whose keys are all masked (and no sink).
TORCH_MHA_API std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask = std::nullopt,
    const std::optional<at::Tensor>& key_padding_mask = std::nullopt, bool is_causal = false,
    std::optional<double> scale = std::nullopt, double dropout_p = 0.0,
    const std::optional<at::Tensor>& dropout_seed = std::nullopt, bool need_weights = false,
    bool average_weights = false, int64_t window_left = -1, int64_t window_right = -1,
    const std::optional<at::Tensor>& alibi_slopes = std::nullopt, double softcap = 0.0,
    const std::optional<at::Tensor>& sinks = std::nullopt);

// Gradient of attention_forward. grad_weights is the gradient of the returned weights (or
// nullopt), averaged over heads or not as average_weights says. Returns (grad_query, grad_key,
// grad_value, grad_mask, grad_sinks), where grad_mask is the (N, H, L, S) gradient of the additive
// masks when compute_mask_grad is true and an empty tensor otherwise, and grad_sinks the
// gradient of sinks (empty without sinks).
TORCH_MHA_API std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
attention_backward(const at::Tensor& grad_output, const at::Tensor& query, const at::Tensor& key,
                   const at::Tensor& value, const at::Tensor& output,
                   const at::Tensor& softmax_stats, const std::optional<at::Tensor>& attn_mask,
                   const std::optional<at::Tensor>& key_padding_mask, bool is_causal,
                   std::optional<double> scale, double dropout_p,
                   const std::optional<at::Tensor>& dropout_seed,
                   const std::optional<at::Tensor>& grad_weights, bool average_weights,
                   bool compute_mask_grad, int64_t window_left = -1, int64_t window_right = -1,
                   const std::optional<at::Tensor>& alibi_slopes = std::nullopt,
                   double softcap = 0.0, const std::optional<at::Tensor>& sinks = std::nullopt);

// Attention over a packed batch of sequences of different lengths.
//   query (total_q, H, E), key (total_k, Hkv, E), value (total_k, Hkv, Ev)
//   cu_seqlens_q, cu_seqlens_k: int32 (B + 1) prefix sums of the sequence lengths
//   max_seqlen_q, max_seqlen_k: at least the longest sequence
// Sequence b attends only within itself; causal, window and ALiBi positions are relative to its
// own lengths. Dropout draws the mask of a dense (B, H, max_seqlen_q, max_seqlen_k) call, so a
// packed batch and the same batch padded agree. Returns (output (total_q, H, Ev), softmax_stats
// (total_q, H, 2)).
TORCH_MHA_API std::tuple<at::Tensor, at::Tensor> varlen_attention_forward(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, std::optional<double> scale = std::nullopt, double dropout_p = 0.0,
    const std::optional<at::Tensor>& dropout_seed = std::nullopt, bool is_causal = false,
    int64_t window_left = -1, int64_t window_right = -1,
    const std::optional<at::Tensor>& alibi_slopes = std::nullopt, double softcap = 0.0,
    const std::optional<at::Tensor>& sinks = std::nullopt);

// Gradient of varlen_attention_forward: (grad_query, grad_key, grad_value, grad_sinks).
TORCH_MHA_API std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> varlen_attention_backward(
    const at::Tensor& grad_output, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& output, const at::Tensor& softmax_stats,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, std::optional<double> scale, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed, bool is_causal, int64_t window_left,
    int64_t window_right, const std::optional<at::Tensor>& alibi_slopes, double softcap,
    const std::optional<at::Tensor>& sinks);

// Attention against a key/value cache, for decoding and chunked prefill (no autograd).
//   query (N, H, L_new, D); k_cache, v_cache (N, Hkv, S_max, D / Dv); cache_seqlens int32 (N):
//   valid entries per sequence before the call (not modified).
//   key, value (N, Hkv, L_new, D / Dv), if given, are written in place at
//   [cache_seqlens[b], cache_seqlens[b] + L_new) of each sequence's cache, after every check.
// Sequence b's queries then attend to its first cache_seqlens[b] + L_new cached keys, the window
// aligned to the bottom-right (the default (-1, 0): causal for a chunk, everything for one
// token). Returns (N, H, L_new, Dv).
TORCH_MHA_API at::Tensor attention_with_kvcache(
    const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& key = std::nullopt,
    const std::optional<at::Tensor>& value = std::nullopt,
    std::optional<double> scale = std::nullopt, int64_t window_left = -1, int64_t window_right = 0,
    const std::optional<at::Tensor>& alibi_slopes = std::nullopt, double softcap = 0.0,
    const std::optional<at::Tensor>& sinks = std::nullopt);

// The whole torch.nn.MultiheadAttention layer (projections, heads, masks, attention, output
// projection), with the semantics of torch.nn.functional.multi_head_attention_forward plus
// batch_first. Returns (attn_output, attn_weights); attn_weights is an empty tensor when
// need_weights is false.
TORCH_MHA_API std::tuple<at::Tensor, at::Tensor> multi_head_attention(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, int64_t embed_dim,
    int64_t num_heads, const std::optional<at::Tensor>& in_proj_weight,
    const std::optional<at::Tensor>& in_proj_bias, const std::optional<at::Tensor>& bias_k,
    const std::optional<at::Tensor>& bias_v, bool add_zero_attn, double dropout_p,
    const at::Tensor& out_proj_weight, const std::optional<at::Tensor>& out_proj_bias,
    bool training = true, const std::optional<at::Tensor>& key_padding_mask = std::nullopt,
    bool need_weights = true, const std::optional<at::Tensor>& attn_mask = std::nullopt,
    const std::optional<at::Tensor>& q_proj_weight = std::nullopt,
    const std::optional<at::Tensor>& k_proj_weight = std::nullopt,
    const std::optional<at::Tensor>& v_proj_weight = std::nullopt,
    const std::optional<at::Tensor>& static_k = std::nullopt,
    const std::optional<at::Tensor>& static_v = std::nullopt, bool average_attn_weights = true,
    bool is_causal = false, bool batch_first = false);

// CUDA version the library was compiled with (e.g. 13000), or -1 for a CPU-only build.
TORCH_MHA_API int64_t cuda_version();

// The CPU vector ISA whose kernel build runs on this machine: "AVX512", "AVX2" or "DEFAULT".
TORCH_MHA_API std::string cpu_capability();

// "key=value" pairs separated by ';': torch version compiled against, CUDA version, CPU ISA.
TORCH_MHA_API std::string build_info();

namespace detail {
// Link anchor: any program including this header references a symbol of the library, so the
// linker keeps it (and its op registrations) even with --as-needed.
extern "C" {
TORCH_MHA_INLINE_VARIABLE auto _torch_mha_register_ops = &cuda_version;
}
}  // namespace detail

}  // namespace torch_mha
