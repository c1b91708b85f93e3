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

// A half-open range of indices [begin, end).
struct IndexRange {
  int64_t begin;
  int64_t end;

  C10_HOST_DEVICE bool contains(int64_t index) const { return begin <= index && index < end; }
  C10_HOST_DEVICE bool empty() const { return end <= begin; }
};

C10_HOST_DEVICE inline int64_t max_index(int64_t a, int64_t b) {
  return a > b ? a : b;
}
C10_HOST_DEVICE inline int64_t min_index(int64_t a, int64_t b) {
  return a < b ? a : b;
}

// Which keys a query may see. Two rules, which may both apply:
//  * causal, top-left aligned as in F.scaled_dot_product_attention and nn.MultiheadAttention:
//    query i sees keys j <= i;
//  * a window aligned to the bottom-right, as in FlashAttention: with L queries and S keys,
//    query i sits at key position i + S - L (the queries are the last L of the S positions) and
//    sees keys j with i + S - L - left <= j <= i + S - L + right; -1 leaves a side unbounded.
//    (-1, 0) is therefore causal attention aligned to the bottom-right.
// Both bounds of the visible range grow with i, so the keys of a block of queries, and the
// queries of a block of keys, are the union of the ranges of its first and last index.
struct Visibility {
  bool is_causal = false;
  int64_t window_left = -1;
  int64_t window_right = -1;

  C10_HOST_DEVICE bool restricts() const {
    return is_causal || window_left >= 0 || window_right >= 0;
  }

  // Keys visible to query i of a sequence of query_len queries and key_len keys.
  C10_HOST_DEVICE IndexRange keys_of(int64_t i, int64_t query_len, int64_t key_len) const {
    const int64_t position = i + key_len - query_len;
    int64_t begin = 0, end = key_len;
    if (window_left >= 0) {
      begin = max_index(begin, position - window_left);
    }
    if (window_right >= 0) {
      end = min_index(end, position + window_right + 1);
    }
    if (is_causal) {
      end = min_index(end, i + 1);
    }
    begin = min_index(begin, key_len);
    return {begin, max_index(begin, end)};
  }

  // Queries that see key j.
  C10_HOST_DEVICE IndexRange queries_of(int64_t j, int64_t query_len, int64_t key_len) const {
    const int64_t shift = key_len - query_len;
    int64_t begin = 0, end = query_len;
    if (window_left >= 0) {
      end = min_index(end, j - shift + window_left + 1);
    }
    if (window_right >= 0) {
      begin = max_index(begin, j - shift - window_right);
    }
    if (is_causal) {
      begin = max_index(begin, j);
    }
    begin = min_index(begin, query_len);
    return {begin, max_index(begin, end)};
  }

  // Keys any of the queries [first, last] may see.
  C10_HOST_DEVICE IndexRange keys_of_block(int64_t first, int64_t last, int64_t query_len,
                                           int64_t key_len) const {
    return {keys_of(first, query_len, key_len).begin, keys_of(last, query_len, key_len).end};
  }

  // Keys every one of the queries [first, last] sees (both ends of keys_of grow with i).
  C10_HOST_DEVICE IndexRange keys_of_every_query(int64_t first, int64_t last, int64_t query_len,
                                                 int64_t key_len) const {
    const int64_t begin = keys_of(last, query_len, key_len).begin;
    return {begin, max_index(begin, keys_of(first, query_len, key_len).end)};
  }

  // Queries that see any of the keys [first, last].
  C10_HOST_DEVICE IndexRange queries_of_block(int64_t first, int64_t last, int64_t query_len,
                                              int64_t key_len) const {
    return {queries_of(first, query_len, key_len).begin, queries_of(last, query_len, key_len).end};
  }
};

// ALiBi bias of query i and key j: -slope * |i + S - L - j| (positions aligned like the window).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t alibi_bias(float slope, int64_t i, int64_t j, int64_t query_len,
                                        int64_t key_len) {
  const int64_t distance = i + key_len - query_len - j;
  return -static_cast<acc_t>(slope) * static_cast<acc_t>(distance < 0 ? -distance : distance);
}

}  // namespace torch_mha
