// Autocast for the core attention op: inside torch.autocast, query, key and value are cast to
// the autocast dtype (bfloat16 on CPU; float16 or bfloat16 on CUDA) and the kernel runs in that
// precision with float32 accumulation. The full layer needs no entry of its own: it is
// CompositeImplicitAutograd, so its projections go through at::linear, which autocast already
// lowers, and its attention goes through here.
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "torch_mha.h"

namespace torch_mha::autocast {
namespace {

template <c10::DeviceType kDevice, c10::DispatchKey kAutocastKey>
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward_autocast(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    bool is_causal, std::optional<double> scale, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed, bool need_weights, bool average_weights) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(kAutocastKey);
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(kDevice);
  // Masks keep their dtype: the kernel adds bool, float32 or query-dtype masks in float32.
  return torch_mha::attention_forward(at::autocast::cached_cast(dtype, query, kDevice),
                                      at::autocast::cached_cast(dtype, key, kDevice),
                                      at::autocast::cached_cast(dtype, value, kDevice), attn_mask,
                                      key_padding_mask, is_causal, scale, dropout_p, dropout_seed,
                                      need_weights, average_weights);
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_mha, AutocastCPU, m) {
  m.impl("attention_forward",
         &attention_forward_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
}

TORCH_LIBRARY_IMPL(torch_mha, AutocastCUDA, m) {
  m.impl("attention_forward",
         &attention_forward_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
}

}  // namespace torch_mha::autocast
