// Autocast for the core attention ops: inside torch.autocast, query, key and value are cast to
// the autocast dtype (bfloat16 on CPU; float16 or bfloat16 on CUDA) and the kernel runs in that
// precision with float32 accumulation. The full layer needs no entry of its own: it is
// CompositeImplicitAutograd, so its projections go through at::linear, which autocast already
// lowers, and its attention goes through here. The backward ops need none either: autograd
// calls them with the tensors the forward saw.
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "attention_args.h"

namespace torch_mha::autocast {
namespace {

template <c10::DeviceType kDevice, c10::DispatchKey kAutocastKey>
ForwardResult attention_forward_autocast(const AttentionForwardArgs& args) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(kAutocastKey);
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(kDevice);
  AttentionForwardArgs cast = args;
  cast.query = at::autocast::cached_cast(dtype, args.query, kDevice);
  cast.key = at::autocast::cached_cast(dtype, args.key, kDevice);
  cast.value = at::autocast::cached_cast(dtype, args.value, kDevice);
  // Masks keep their dtype (the kernel adds bool, float32 or query-dtype masks in float32);
  // sinks are logits and enter in float32.
  if (args.sinks.has_value() && args.sinks->scalar_type() != dtype) {
    cast.sinks = at::autocast::cached_cast(at::kFloat, *args.sinks, kDevice);
  }
  return call_forward(cast);
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_mha, AutocastCPU, m) {
  register_forward_kernels<
      &attention_forward_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>>(m);
}

TORCH_LIBRARY_IMPL(torch_mha, AutocastCUDA, m) {
  register_forward_kernels<
      &attention_forward_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>>(m);
}

}  // namespace torch_mha::autocast
