// The host side of the CUDA backend, written once for every way of running the kernels: checks,
// allocation, AttentionParams, and the sequence of kernel launches of each op. A `Launcher`
// runs one kernel with the shape cuda/launch.h computes:
//  * CudaLauncher (attention_cuda.cu): kernel<<<blocks, threads, shared bytes, stream>>>;
//  * the CPU harness (tests/cuda_on_cpu/): every CUDA thread a fiber, blocks one after another.
// So the harness runs exactly the launches, shapes and shared memory sizes a GPU gets.
//
// Launcher interface:
//   template <typename acc_t, typename Kernel, typename... Args>
//   void run(Kernel kernel, const KernelLaunch& launch, const Args&... args);
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "attention_args.h"
#include "cuda/attention_kernels.cuh"
#include "cuda/launch.h"

namespace torch_mha::cuda {

// Calls fn(std::integral_constant<int, kDim>) with kDim = the smallest of 32, 64, 128 that holds
// both head dims.
template <typename Fn>
void dispatch_head_dim(int64_t head_dim, int64_t value_dim, Fn&& fn) {
  const int64_t dim = std::max(head_dim, value_dim);
  TORCH_CHECK(dim <= kMaxHeadDim, "torch_mha CUDA kernels support head_dim and value_dim up to ",
              kMaxHeadDim, ", but got head_dim ", head_dim, " and value_dim ", value_dim);
  if (dim <= 32) {
    fn(std::integral_constant<int, 32>());
  } else if (dim <= 64) {
    fn(std::integral_constant<int, 64>());
  } else {
    fn(std::integral_constant<int, 128>());
  }
}

inline at::Tensor with_unit_last_stride(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

template <typename Launcher>
ForwardResult run_attention_forward(const AttentionForwardArgs& args, Launcher& launcher) {
  const AttentionShape shape = check_forward_args(args, /*read_values=*/true);
  AttentionForwardOutputs outputs = allocate_forward_outputs(args, shape);
  AttentionForwardArgs kernel_args = args;
  kernel_args.query = with_unit_last_stride(args.query);
  kernel_args.key = with_unit_last_stride(args.key);
  kernel_args.value = with_unit_last_stride(args.value);
  std::vector<at::Tensor> keep_alive;
  AttentionParams params = make_forward_params(kernel_args, outputs, keep_alive);
  if (args.need_weights && args.average_weights && params.heads == 0) {
    outputs.weights.zero_();  // no head to average over
  }
  if (params.batch * params.heads * params.query_len == 0) {
    return {outputs.output, outputs.softmax_stats, outputs.weights};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, params.dtype, "attention_forward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        dispatch_head_dim(params.head_dim, params.value_dim, [&](auto dim) {
          constexpr int kDim = decltype(dim)::value;
          launcher.template run<acc_t>(attention_forward_kernel<scalar_t, acc_t, kDim>,
                                       forward_launch(params), params);
          if (!args.need_weights) {
            return;
          }
          // Averaged weights are summed in the accumulate type, then stored in the input's.
          const bool average = args.average_weights;
          at::Tensor average_sum =
              average ? (std::is_same_v<scalar_t, acc_t>
                             ? outputs.weights
                             : at::empty(outputs.weights.sizes(),
                                         outputs.weights.options().dtype(
                                             c10::CppTypeToScalarType<acc_t>::value)))
                      : at::Tensor();
          launcher.template run<acc_t>(
              attention_weights_kernel<scalar_t, acc_t, kDim>, weights_launch(params), params,
              average ? average_sum.mutable_data_ptr<acc_t>() : nullptr,
              average ? nullptr : outputs.weights.mutable_data_ptr<scalar_t>());
          if (average && !average_sum.is_same(outputs.weights)) {
            outputs.weights.copy_(average_sum);
          }
        });
      });
  return {outputs.output, outputs.softmax_stats, outputs.weights};
}

template <typename Launcher>
BackwardResult run_attention_backward(const AttentionBackwardArgs& args, Launcher& launcher) {
  const AttentionShape shape = check_backward_args(args, /*read_values=*/true);
  AttentionBackwardOutputs outputs = allocate_backward_outputs(args, shape);
  AttentionBackwardArgs kernel_args = args;
  kernel_args.forward.query = with_unit_last_stride(args.forward.query);
  kernel_args.forward.key = with_unit_last_stride(args.forward.key);
  kernel_args.forward.value = with_unit_last_stride(args.forward.value);
  kernel_args.grad_output = with_unit_last_stride(args.grad_output);
  kernel_args.output = with_unit_last_stride(args.output);
  const at::Tensor delta = allocate_delta(args);
  std::vector<at::Tensor> keep_alive;
  const AttentionBackwardParams params =
      make_backward_params(kernel_args, outputs, delta, keep_alive);
  if (params.batch * params.heads == 0 || (params.query_len == 0 && params.key_len == 0)) {
    outputs.grad_key.zero_();
    outputs.grad_value.zero_();
    if (outputs.grad_sinks.numel() > 0) {
      outputs.grad_sinks.zero_();
    }
    return {outputs.grad_query, outputs.grad_key, outputs.grad_value, outputs.grad_mask,
            outputs.grad_sinks};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, params.dtype, "attention_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        launcher.template run<acc_t>(softmax_delta_kernel<scalar_t, acc_t>,
                                     softmax_delta_launch(params), params);
        dispatch_head_dim(params.head_dim, params.value_dim, [&](auto dim) {
          constexpr int kDim = decltype(dim)::value;
          if (params.grad_weights.data != nullptr) {
            launcher.template run<acc_t>(weights_delta_kernel<scalar_t, acc_t, kDim>,
                                         weights_delta_launch(params), params);
          }
          launcher.template run<acc_t>(attention_backward_dkdv_kernel<scalar_t, acc_t, kDim>,
                                       dkdv_launch(params), params);
          launcher.template run<acc_t>(attention_backward_dq_kernel<scalar_t, acc_t, kDim>,
                                       dq_launch(params), params);
        });
      });
  compute_sink_gradient(args, delta, outputs.grad_sinks);
  return {outputs.grad_query, outputs.grad_key, outputs.grad_value, outputs.grad_mask,
          outputs.grad_sinks};
}

}  // namespace torch_mha::cuda
