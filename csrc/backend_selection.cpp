#include "backend_selection.h"

#include "attention_args.h"

#include <tuple>

namespace torch_mha {
namespace {

bool is_half_precision(c10::ScalarType dtype) {
  return dtype == c10::ScalarType::Half || dtype == c10::ScalarType::BFloat16;
}

// Whether the call's visibility rule is plain causal attention (L == S, so top-left and
// bottom-right alignment coincide), none at all, or something the fused kernels do not take.
enum class Causality { kNone, kCausal, kOther };

Causality causality_of(const CudaBackendQuery& q) {
  const bool window = q.window_left >= 0 || q.window_right >= 0;
  const bool bottom_right_causal = q.window_left < 0 && q.window_right == 0;
  if (!q.is_causal && !window) {
    return Causality::kNone;
  }
  if ((q.is_causal || bottom_right_causal) && (!window || bottom_right_causal) &&
      q.query_len == q.key_len) {
    return Causality::kCausal;
  }
  return Causality::kOther;
}

// Why no fused kernel can compute this call exactly (empty: some can).
std::string common_reason(const CudaBackendQuery& q) {
  if (!is_half_precision(q.dtype)) {
    return "dtype " + std::string(c10::toString(q.dtype)) +
           ": the fused kernels are used for float16 and bfloat16 only";
  }
  if (q.dropout_p > 0.0) {
    return "dropout: torch_mha's own kernels draw the mask from its Philox stream, so that a "
           "seed drops the same elements on CPU and GPU";
  }
  if (q.need_weights) {
    return "need_weights: the fused kernels do not return the attention weights";
  }
  if (q.varlen) {
    return "packed variable-length batch";
  }
  if (q.key_lengths) {
    return "per-sequence key lengths (a KV cache)";
  }
  if (q.has_alibi) {
    return "ALiBi slopes";
  }
  if (q.softcap > 0.0) {
    return "softcap";
  }
  if (q.has_sinks) {
    return "attention sinks";
  }
  if (q.heads != q.kv_heads) {
    return "grouped-query heads (the fused kernels would need K and V repeated in memory)";
  }
  if (causality_of(q) == Causality::kOther) {
    return "a sliding window or a causal rule with query_len != key_len (only square causal "
           "attention is passed on)";
  }
  if (q.backward && q.mask_grad) {
    return "the masks require grad: torch_mha's own backward returns their gradient";
  }
  if (q.batch * q.heads * q.query_len * q.key_len == 0) {
    return "empty input";
  }
  if (q.head_dim != q.value_dim) {
    return "head_dim != value_dim";
  }
  if (q.head_dim % 8 != 0 || q.head_dim > 256) {
    return "head_dim " + std::to_string(q.head_dim) + ": needs a multiple of 8, at most 256";
  }
  return "";
}

bool has_mask(const CudaBackendQuery& q) {
  return q.has_attn_mask || q.has_key_padding_mask;
}

std::string flash_reason(const CudaBackendQuery& q) {
  if (has_mask(q)) {
    return "masks: the flash kernel takes no additive bias";
  }
  if (q.device_major < 8) {
    return "needs compute capability 8.0 or newer";
  }
  if (q.backward && q.deterministic) {
    return "torch.use_deterministic_algorithms(True): its backward accumulates dQ with "
           "atomics";
  }
  return "";
}

std::string efficient_reason(const CudaBackendQuery& q) {
  if (q.device_major < 5) {
    return "needs compute capability 5.0 or newer";
  }
  return "";
}

std::string cudnn_reason(const CudaBackendQuery& q) {
  if (q.requested != "cudnn") {
    return "used only when TORCH_MHA_CUDA_BACKEND=cudnn asks for it (not yet measured against "
           "the flash kernel by this project)";
  }
  if (q.backward) {
    return "its backward is not used: the flash or memory-efficient backward (or torch_mha's "
           "own) takes the same row log-sum-exp";
  }
  if (has_mask(q)) {
    return "masks";
  }
  if (q.device_major < 8) {
    return "needs compute capability 8.0 or newer";
  }
  return "";
}

}  // namespace

const char* backend_name(CudaBackend backend) {
  switch (backend) {
    case CudaBackend::kOwn:
      return "torch_mha";
    case CudaBackend::kFlash:
      return "flash";
    case CudaBackend::kEfficient:
      return "efficient";
    case CudaBackend::kCudnn:
      return "cudnn";
  }
  return "?";
}

CudaBackendChoice select_cuda_backend(const CudaBackendQuery& q) {
  CudaBackendChoice choice;
  const CudaBackend order[] = {CudaBackend::kCudnn, CudaBackend::kFlash, CudaBackend::kEfficient};
  if (q.requested == "own") {
    for (CudaBackend candidate : order) {
      choice.rejected.emplace_back(candidate, "TORCH_MHA_CUDA_BACKEND=own");
    }
    return choice;
  }
  const std::string common = common_reason(q);
  // A backend the caller named goes first; then cuDNN (only if named), flash, efficient.
  std::vector<CudaBackend> candidates;
  for (CudaBackend candidate : order) {
    if (q.requested == backend_name(candidate)) {
      candidates.insert(candidates.begin(), candidate);
    } else {
      candidates.push_back(candidate);
    }
  }
  bool chosen = false;
  for (CudaBackend candidate : candidates) {
    std::string reason = common;
    if (reason.empty()) {
      reason = candidate == CudaBackend::kFlash       ? flash_reason(q)
               : candidate == CudaBackend::kEfficient ? efficient_reason(q)
                                                      : cudnn_reason(q);
    }
    if (reason.empty() && !chosen) {
      choice.backend = candidate;
      chosen = true;
    } else if (!reason.empty()) {
      choice.rejected.emplace_back(candidate, reason);
    } else {
      choice.rejected.emplace_back(
          candidate, std::string("eligible, but ") + backend_name(choice.backend) + " goes first");
    }
  }
  return choice;
}

}  // namespace torch_mha

namespace torch_mha {

CudaBackendQuery cuda_backend_query(const AttentionForwardArgs& args, bool backward, bool mask_grad,
                                    int device_major, int device_minor, bool deterministic,
                                    const std::string& requested) {
  TORCH_CHECK(requested.empty() || requested == "auto" || requested == "own" ||
                  requested == "flash" || requested == "efficient" || requested == "cudnn",
              "TORCH_MHA_CUDA_BACKEND must be auto, own, flash, efficient or cudnn, but is '",
              requested, "'");
  CudaBackendQuery q;
  const at::Tensor& query = args.query;
  q.dtype = query.scalar_type();
  q.varlen = args.is_varlen();
  q.key_lengths = args.key_lengths.has_value();
  q.heads = query.size(1);  // (N, H, L, D), or (total, H, D) packed
  q.kv_heads = args.key.size(1);
  if (q.varlen) {
    q.batch = args.cu_seqlens_q->numel() - 1;
    q.query_len = args.max_seqlen_q;
    q.key_len = args.max_seqlen_k;
  } else {
    q.batch = query.size(0);
    q.query_len = query.size(2);
    q.key_len = args.key.size(2);
  }
  q.head_dim = query.size(-1);
  q.value_dim = args.value.size(-1);
  q.has_attn_mask = args.attn_mask.has_value();
  q.has_key_padding_mask = args.key_padding_mask.has_value();
  q.is_causal = args.is_causal;
  q.window_left = args.window_left;
  q.window_right = args.window_right;
  q.has_alibi = args.alibi_slopes.has_value();
  q.softcap = args.softcap;
  q.has_sinks = args.sinks.has_value();
  q.dropout_p = args.dropout_p;
  q.need_weights = args.need_weights;
  q.backward = backward;
  q.mask_grad = mask_grad;
  q.deterministic = deterministic;
  q.device_major = device_major;
  q.device_minor = device_minor;
  q.requested = requested;
  return q;
}

}  // namespace torch_mha

namespace torch_mha {

std::tuple<std::string, std::vector<std::string>, std::vector<std::string>> explain_cuda_backend(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    bool is_causal, double dropout_p, bool need_weights, int64_t window_left, int64_t window_right,
    const std::optional<at::Tensor>& alibi_slopes, double softcap,
    const std::optional<at::Tensor>& sinks, bool backward, bool mask_grad, int64_t device_major,
    int64_t device_minor, bool deterministic, const std::string& requested) {
  AttentionForwardArgs args;
  args.query = query;
  args.key = key;
  args.value = value;
  args.attn_mask = detail::present(attn_mask);
  args.key_padding_mask = detail::present(key_padding_mask);
  args.is_causal = is_causal;
  args.dropout_p = dropout_p;
  args.need_weights = need_weights;
  args.window_left = window_left;
  args.window_right = window_right;
  args.alibi_slopes = detail::present(alibi_slopes);
  args.softcap = softcap;
  args.sinks = detail::present(sinks);
  TORCH_CHECK(query.dim() == 4 && key.dim() == 4 && value.dim() == 4,
              "torch_mha.explain: expected 4-D query, key and value (batch, heads, length, dim)");
  const CudaBackendChoice choice = select_cuda_backend(
      cuda_backend_query(args, backward, mask_grad, static_cast<int>(device_major),
                         static_cast<int>(device_minor), deterministic, requested));
  std::vector<std::string> candidates, reasons;
  for (const auto& [candidate, reason] : choice.rejected) {
    candidates.emplace_back(backend_name(candidate));
    reasons.push_back(reason);
  }
  return {backend_name(choice.backend), candidates, reasons};
}

}  // namespace torch_mha
