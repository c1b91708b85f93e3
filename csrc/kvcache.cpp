#include "kvcache.h"

#include <ATen/ATen.h>

namespace torch_mha {
namespace {

constexpr const char* kOp = "torch_mha.attention_with_kvcache";

void check_new_entries(const char* name, const at::Tensor& entries, const at::Tensor& cache,
                       const at::Tensor& query) {
  TORCH_CHECK(entries.dim() == 4 && entries.sym_size(0) == cache.sym_size(0) &&
                  entries.sym_size(1) == cache.sym_size(1) &&
                  entries.sym_size(2) == query.sym_size(2) &&
                  entries.sym_size(3) == cache.sym_size(3),
              kOp, ": expected ", name, " of shape (batch, kv_heads, new_len, dim) = (",
              cache.sym_size(0), ", ", cache.sym_size(1), ", ", query.sym_size(2), ", ",
              cache.sym_size(3), "), but got ", entries.sym_sizes());
  TORCH_CHECK(entries.scalar_type() == cache.scalar_type(), kOp, ": expected ", name,
              " of the cache's dtype ", cache.scalar_type(), ", but got ", entries.scalar_type());
  TORCH_CHECK(entries.device() == cache.device(), kOp, ": expected ", name, " on ", cache.device(),
              ", but got ", entries.device());
}

}  // namespace

AttentionForwardArgs check_kvcache_args(const KvCacheArgs& args, bool read_values) {
  const at::Tensor &query = args.query, &k_cache = args.k_cache, &v_cache = args.v_cache;
  TORCH_CHECK(query.dim() == 4, kOp,
              ": expected query of shape (batch, heads, new_len, head_dim), but got a ",
              query.dim(), "-D tensor of shape ", query.sym_sizes());
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4, kOp,
              ": expected k_cache and v_cache of shape (batch, kv_heads, max_len, dim), but got ",
              k_cache.sym_sizes(), " and ", v_cache.sym_sizes());
  TORCH_CHECK(k_cache.sym_size(2) == v_cache.sym_size(2), kOp,
              ": expected k_cache and v_cache to hold the same number of entries (dim 2), but "
              "got ",
              k_cache.sym_sizes(), " and ", v_cache.sym_sizes());
  const at::Tensor& lengths = args.cache_seqlens;
  TORCH_CHECK(lengths.scalar_type() == at::kInt, kOp,
              ": expected cache_seqlens of dtype int32 (torch.int32), but got ",
              lengths.scalar_type());
  TORCH_CHECK(lengths.dim() == 1 && lengths.sym_size(0) == query.sym_size(0), kOp,
              ": expected cache_seqlens of shape (batch,) = (", query.sym_size(0), ",), but got ",
              lengths.sym_sizes());
  TORCH_CHECK(lengths.device() == query.device(), kOp, ": expected cache_seqlens on ",
              query.device(), ", but got ", lengths.device());
  TORCH_CHECK(args.key.has_value() == args.value.has_value(), kOp,
              ": key and value must both be given (new entries to append) or both be None");
  if (args.key.has_value()) {
    check_new_entries("key", *args.key, k_cache, query);
    check_new_entries("value", *args.value, v_cache, query);
  }

  AttentionForwardArgs call;
  // Set first so that every check below names this op.
  call.key_lengths = lengths;
  call.query = query;
  call.key = k_cache;
  call.value = v_cache;
  call.scale = args.scale;
  call.window_left = args.window_left;
  call.window_right = args.window_right;
  call.alibi_slopes = args.alibi_slopes;
  call.softcap = args.softcap;
  call.sinks = args.sinks;
  // The dense checks: dtypes, devices, heads (grouped-query), head dims, the modifiers.
  check_forward_args(call, read_values);

  const int64_t new_len = query.sym_size(2).guard_int(__FILE__, __LINE__);
  if (read_values) {
    const int64_t max_len = k_cache.size(2);
    const at::Tensor host = lengths.to(at::kCPU).contiguous();
    const int32_t* before = host.const_data_ptr<int32_t>();
    for (int64_t b = 0; b < host.numel(); ++b) {
      TORCH_CHECK(before[b] >= 0, kOp, ": cache_seqlens[", b, "] = ", before[b], " is negative");
      TORCH_CHECK(before[b] + new_len <= max_len, kOp, ": cache_seqlens[", b,
                  "] + new_len = ", before[b], " + ", new_len, " exceeds the cache's ", max_len,
                  " entries (k_cache.size(2))");
    }
  }
  call.key_lengths = (lengths + new_len).to(at::kInt);
  return call;
}

void write_kvcache(const KvCacheArgs& args) {
  if (!args.key.has_value()) {
    return;
  }
  const at::Tensor host = args.cache_seqlens.to(at::kCPU).contiguous();
  const int32_t* before = host.const_data_ptr<int32_t>();
  const int64_t new_len = args.query.size(2);
  for (int64_t b = 0; b < host.numel(); ++b) {
    args.k_cache[b].narrow(1, before[b], new_len).copy_((*args.key)[b]);
    args.v_cache[b].narrow(1, before[b], new_len).copy_((*args.value)[b]);
  }
}

}  // namespace torch_mha
