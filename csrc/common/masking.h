// Masks as the kernels see them; shared by the CPU and CUDA kernels (compiled by g++ and nvcc).
//
// The fused op never materialises a merged (N, H, L, S) mask. Each mask the caller passes stays
// where it is and is read through a MaskView: a pointer, an element type and four strides that
// broadcast it to (batch, head, query, key). Broadcast dimensions have stride 0.
//
// Polarity follows torch.nn.MultiheadAttention: a bool mask is True where attention is NOT
// allowed (it contributes -inf), a floating mask is added to the scaled scores.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <limits>

namespace torch_mha {

enum class MaskKind : int8_t { kNone, kBool, kFloat, kDouble, kBFloat16, kHalf };

struct MaskView {
  const void* data = nullptr;
  MaskKind kind = MaskKind::kNone;
  int64_t stride_batch = 0;
  int64_t stride_head = 0;
  int64_t stride_query = 0;
  int64_t stride_key = 0;

  C10_HOST_DEVICE bool defined() const { return kind != MaskKind::kNone; }

  // Element offset of (batch, head, query, key 0).
  C10_HOST_DEVICE int64_t row_offset(int64_t batch, int64_t head, int64_t query) const {
    return batch * stride_batch + head * stride_head + query * stride_query;
  }
};

// Additive bias of one mask element.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t mask_bias(bool masked_out) {
  return masked_out ? -std::numeric_limits<acc_t>::infinity() : acc_t(0);
}

template <typename acc_t, typename mask_t>
C10_HOST_DEVICE inline acc_t mask_bias(mask_t value) {
  return static_cast<acc_t>(value);
}

// Bias of element `offset` of a mask whose type is only known at run time. Kernels that can
// hoist the type out of their inner loop call the typed overloads above instead.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t mask_bias_at(const MaskView& mask, int64_t offset) {
  switch (mask.kind) {
    case MaskKind::kBool:
      return mask_bias<acc_t>(static_cast<const bool*>(mask.data)[offset]);
    case MaskKind::kFloat:
      return mask_bias<acc_t>(static_cast<const float*>(mask.data)[offset]);
    case MaskKind::kDouble:
      return mask_bias<acc_t>(static_cast<const double*>(mask.data)[offset]);
    case MaskKind::kBFloat16:
      return mask_bias<acc_t>(static_cast<const c10::BFloat16*>(mask.data)[offset]);
    case MaskKind::kHalf:
      return mask_bias<acc_t>(static_cast<const c10::Half*>(mask.data)[offset]);
    case MaskKind::kNone:
      break;
  }
  return acc_t(0);
}

// Causal masking is top-left aligned, as in F.scaled_dot_product_attention: query i may attend
// to keys 0..i.
C10_HOST_DEVICE inline bool causal_masked_out(int64_t query, int64_t key) {
  return key > query;
}

// Number of leading keys that query rows [0, last_query] may attend to under the causal rule.
C10_HOST_DEVICE inline int64_t causal_key_limit(int64_t last_query, int64_t num_keys) {
  return last_query + 1 < num_keys ? last_query + 1 : num_keys;
}

}  // namespace torch_mha
