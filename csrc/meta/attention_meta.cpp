// Shape-only kernels: FakeTensor, torch.compile and torch.export trace the ops through these,
// with symbolic sizes, and without any Python-side registration. The checks and the allocation
// are those of the real kernels (attention_args.cpp), so fake and real outputs agree.
#include <torch/library.h>

#include "attention_args.h"
#include "kvcache.h"

namespace torch_mha::meta {
namespace {

ForwardResult attention_forward_meta(const AttentionForwardArgs& args) {
  const AttentionShape shape = check_forward_args(args, /*read_values=*/false);
  AttentionForwardOutputs outputs = allocate_forward_outputs(args, shape);
  return {outputs.output, outputs.softmax_stats, outputs.weights};
}

BackwardResult attention_backward_meta(const AttentionBackwardArgs& args) {
  const AttentionShape shape = check_backward_args(args, /*read_values=*/false);
  AttentionBackwardOutputs outputs = allocate_backward_outputs(args, shape);
  return {outputs.grad_query, outputs.grad_key, outputs.grad_value, outputs.grad_mask,
          outputs.grad_sinks};
}

// The output of attention_with_kvcache (the caches are written in place: nothing to allocate).
at::Tensor attention_with_kvcache_meta(const KvCacheArgs& args) {
  const AttentionForwardArgs call = check_kvcache_args(args, /*read_values=*/false);
  return allocate_forward_outputs(call, check_forward_args(call, /*read_values=*/false)).output;
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_mha, Meta, m) {
  register_core_attention_kernels<&attention_forward_meta, &attention_backward_meta>(m);
  register_kvcache_kernel<&attention_with_kvcache_meta>(m);
}

}  // namespace torch_mha::meta
