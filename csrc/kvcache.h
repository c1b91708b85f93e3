// attention_with_kvcache: attention for decoding and chunked prefill against a key/value cache
// that the op extends in place. The host side, shared by every backend: checks, the in-place
// write (after every check has passed), and the forward call it becomes (a dense call whose
// sequence b sees its first cache_seqlens[b] + L_new cached keys, aligned to the bottom-right).
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>

#include "attention_args.h"

namespace torch_mha {

struct KvCacheArgs {
  at::Tensor query;                 // (N, H, L_new, D)
  at::Tensor k_cache;               // (N, Hkv, S_max, D), written in place when key is given
  at::Tensor v_cache;               // (N, Hkv, S_max, Dv), likewise
  at::Tensor cache_seqlens;         // int32 (N): valid entries per sequence before the call
  std::optional<at::Tensor> key;    // (N, Hkv, L_new, D) new entries, or none
  std::optional<at::Tensor> value;  // (N, Hkv, L_new, Dv)
  std::optional<double> scale;
  int64_t window_left = -1;
  int64_t window_right = 0;
  std::optional<at::Tensor> alibi_slopes;
  double softcap = 0.0;
  std::optional<at::Tensor> sinks;
};

// Every check (each failure names the argument); `read_values` also reads cache_seqlens
// (real tensors) to check the bounds. Returns the forward call the op is.
AttentionForwardArgs check_kvcache_args(const KvCacheArgs& args, bool read_values);

// Writes key/value at [cache_seqlens[b], cache_seqlens[b] + L_new) of each sequence's cache.
void write_kvcache(const KvCacheArgs& args);

using KvCacheImpl = at::Tensor (*)(const KvCacheArgs&);

namespace detail {

template <KvCacheImpl impl>
at::Tensor attention_with_kvcache_op(const at::Tensor& query, const at::Tensor& k_cache,
                                     const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                     const std::optional<at::Tensor>& key,
                                     const std::optional<at::Tensor>& value,
                                     std::optional<double> scale, int64_t window_left,
                                     int64_t window_right,
                                     const std::optional<at::Tensor>& alibi_slopes, double softcap,
                                     const std::optional<at::Tensor>& sinks) {
  KvCacheArgs args;
  args.query = query;
  args.k_cache = k_cache;
  args.v_cache = v_cache;
  args.cache_seqlens = cache_seqlens;
  args.key = present(key);
  args.value = present(value);
  args.scale = scale;
  args.window_left = window_left;
  args.window_right = window_right;
  args.alibi_slopes = present(alibi_slopes);
  args.softcap = softcap;
  args.sinks = present(sinks);
  return impl(args);
}

}  // namespace detail

// The op on a backend whose forward is `forward`: check, write the cache, attend.
template <ForwardImpl forward>
at::Tensor attention_with_kvcache_on(const KvCacheArgs& args) {
  const AttentionForwardArgs call = check_kvcache_args(args, /*read_values=*/true);
  write_kvcache(args);
  return std::get<0>(forward(call));
}

template <KvCacheImpl impl>
void register_kvcache_kernel(torch::Library& m) {
  m.impl("attention_with_kvcache", &detail::attention_with_kvcache_op<impl>);
}

}  // namespace torch_mha
