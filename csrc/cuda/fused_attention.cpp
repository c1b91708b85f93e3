// The calls that PyTorch's fused tensor-core kernels compute exactly (backend_selection.h):
// forward and backward through ATen's flash, memory-efficient and cuDNN attention ops. Their row
// log-sum-exp becomes torch_mha's softmax statistics (offset = lse, log_sum = 0), so every
// backward (theirs or torch_mha's own) can consume any forward. Host code only; compiled in
// CUDA builds.
#include "cuda/fused_attention.h"

#include <ATen/ATen.h>
#include <torch/version.h>

#include <limits>

namespace torch_mha::cuda {
namespace {

at::Tensor with_unit_last_stride(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

int64_t round_up(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

// Square causal attention, the only visibility rule passed on (backend_selection.cpp).
bool is_causal_call(const AttentionForwardArgs& args) {
  return args.is_causal || (args.window_left < 0 && args.window_right == 0);
}

// One additive bias in the query's dtype from attn_mask and key_padding_mask (bool True = -inf),
// materialised only over the dimensions they do not broadcast over, and expanded to
// (N, H, L, S) by strides. The last dimension's storage is padded to 16 values, the alignment
// the memory-efficient kernel asks of a bias.
std::optional<at::Tensor> additive_bias(const AttentionForwardArgs& args) {
  if (!args.attn_mask.has_value() && !args.key_padding_mask.has_value()) {
    return std::nullopt;
  }
  const at::Tensor& query = args.query;
  const int64_t n = query.size(0), h = query.size(1), l = query.size(2), s = args.key.size(2);
  auto as_bias = [&](const at::Tensor& mask) {
    if (mask.scalar_type() == at::kBool) {
      return at::zeros(mask.sizes(), query.options().dtype(at::kFloat))
          .masked_fill_(mask, -std::numeric_limits<float>::infinity());
    }
    return mask.to(at::kFloat);
  };
  std::vector<int64_t> sizes = {1, 1, 1, s};
  at::Tensor sum;
  if (args.attn_mask.has_value()) {
    at::Tensor mask = as_bias(*args.attn_mask);
    while (mask.dim() < 4) {
      mask = mask.unsqueeze(0);
    }
    sum = mask;
  }
  if (args.key_padding_mask.has_value()) {
    const at::Tensor padding = as_bias(*args.key_padding_mask).view({n, 1, 1, s});
    sum = sum.defined() ? sum + padding : padding;
  }
  for (int d = 0; d < 3; ++d) {
    sizes[d] = sum.size(d);
  }
  at::Tensor storage = at::empty({sizes[0], sizes[1], sizes[2], round_up(s, 16)}, query.options());
  at::Tensor bias = storage.narrow(3, 0, s);
  bias.copy_(sum);
  return bias.expand({n, h, l, s});
}

// Empty int64 tensors for the random-number state arguments, unused without dropout.
at::Tensor unused_rng_state(const at::Tensor& like) {
  return at::empty({}, like.options().dtype(at::kLong));
}

}  // namespace

ForwardResult fused_attention_forward(const AttentionForwardArgs& args, CudaBackend backend) {
  const AttentionShape shape = check_forward_args(args, /*read_values=*/true);
  AttentionForwardOutputs outputs = allocate_forward_outputs(args, shape);
  const at::Tensor query = with_unit_last_stride(args.query);
  const at::Tensor key = with_unit_last_stride(args.key);
  const at::Tensor value = with_unit_last_stride(args.value);
  const int64_t n = query.size(0), h = query.size(1), l = query.size(2);
  const bool causal = is_causal_call(args);
  at::Tensor output, lse;
  if (backend == CudaBackend::kFlash) {
    auto result = at::_scaled_dot_product_flash_attention(query, key, value, 0.0, causal,
                                                          /*return_debug_mask=*/false, args.scale);
    output = std::get<0>(result);
    lse = std::get<1>(result);
  } else if (backend == CudaBackend::kEfficient) {
    auto result = at::_scaled_dot_product_efficient_attention(
        query, key, value, additive_bias(args), /*compute_log_sumexp=*/true, 0.0, causal,
        args.scale);
    output = std::get<0>(result);
    lse = std::get<1>(result).narrow(2, 0, l);  // rows padded to a multiple of 32
  } else {
    TORCH_CHECK(backend == CudaBackend::kCudnn, "torch_mha: not a fused backend");
    auto result = at::_scaled_dot_product_cudnn_attention(query, key, value, std::nullopt,
                                                          /*compute_log_sumexp=*/true, 0.0, causal,
                                                          /*return_debug_mask=*/false, args.scale);
    output = std::get<0>(result);
    lse = std::get<1>(result).reshape({n, h, l});
  }
  // A row whose keys are all masked gets lse = -inf from the kernel (and 0 or NaN as output);
  // torch_mha's convention is a zero output and statistics (+inf, 0).
  const at::Tensor nothing_visible = lse.isneginf();
  outputs.output.copy_(output.masked_fill(nothing_visible.unsqueeze(-1), 0));
  outputs.softmax_stats.select(-1, 0).copy_(
      lse.masked_fill(nothing_visible, std::numeric_limits<float>::infinity()));
  outputs.softmax_stats.select(-1, 1).zero_();
  return {outputs.output, outputs.softmax_stats, outputs.weights};
}

BackwardResult fused_attention_backward(const AttentionBackwardArgs& args, CudaBackend backend) {
  const AttentionShape shape = check_backward_args(args, /*read_values=*/true);
  AttentionBackwardOutputs outputs = allocate_backward_outputs(args, shape);
  const AttentionForwardArgs& forward = args.forward;
  const at::Tensor query = with_unit_last_stride(forward.query);
  const at::Tensor key = with_unit_last_stride(forward.key);
  const at::Tensor value = with_unit_last_stride(forward.value);
  const at::Tensor grad_output = with_unit_last_stride(args.grad_output);
  const at::Tensor output = with_unit_last_stride(args.output);
  const int64_t n = query.size(0), h = query.size(1), l = query.size(2), s = key.size(2);
  const bool causal = is_causal_call(forward);
  // Any forward's statistics give the row log-sum-exp: offset + log_sum (+inf on rows with
  // nothing visible, whose recomputed probabilities are then all 0).
  const at::Tensor lse = args.softmax_stats.sum(-1).contiguous();
  at::Tensor grad_query, grad_key, grad_value;
  if (backend == CudaBackend::kFlash) {
    std::tie(grad_query, grad_key, grad_value) = at::_scaled_dot_product_flash_attention_backward(
        grad_output, query, key, value, output, lse, at::Tensor(), at::Tensor(), l, s, 0.0, causal,
        unused_rng_state(query), unused_rng_state(query), forward.scale);
  } else {
    TORCH_CHECK(backend == CudaBackend::kEfficient, "torch_mha: not a fused backward");
    at::Tensor padded_lse = at::zeros({n, h, round_up(l, 32)}, lse.options());
    padded_lse.narrow(2, 0, l).copy_(lse);
    const std::optional<at::Tensor> bias = additive_bias(forward);
    at::Tensor grad_bias;
    std::tie(grad_query, grad_key, grad_value, grad_bias) =
        at::_scaled_dot_product_efficient_attention_backward(
            grad_output, query, key, value, bias.has_value() ? *bias : at::Tensor(), output,
            padded_lse, unused_rng_state(query), unused_rng_state(query), 0.0,
            {true, true, true, false}, causal, forward.scale);
  }
  outputs.grad_query.copy_(grad_query);
  outputs.grad_key.copy_(grad_key);
  outputs.grad_value.copy_(grad_value);
  return {outputs.grad_query, outputs.grad_key, outputs.grad_value, outputs.grad_mask,
          outputs.grad_sinks};
}

}  // namespace torch_mha::cuda
