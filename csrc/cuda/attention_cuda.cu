// CUDA entry points of the core attention ops: argument checks (shared with every backend),
// output allocation, and kernel launches on the current stream under a device guard.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "attention_utils.h"
#include "cuda/attention_kernels.cuh"

namespace torch_mha::cuda {
namespace {

// Head dims up to this are supported (the kernels keep head_dim / 32 columns per lane).
constexpr int64_t kMaxHeadDim = 128;

at::Tensor with_unit_last_stride(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

std::optional<at::Tensor> as_optional(const std::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? t : std::nullopt;
}

template <typename T>
Rows<T> rows_of(const at::Tensor& t) {
  return {static_cast<T*>(const_cast<void*>(t.const_data_ptr())), t.stride(0), t.stride(1),
          t.stride(2)};
}

template <typename scalar_t, typename acc_t>
AttentionParams<scalar_t, acc_t> make_params(const at::Tensor& query, const at::Tensor& key,
                                             const at::Tensor& value,
                                             const std::optional<at::Tensor>& attn_mask,
                                             const std::optional<at::Tensor>& key_padding_mask,
                                             bool is_causal, std::optional<double> scale,
                                             double dropout_p,
                                             const std::optional<at::Tensor>& dropout_seed) {
  AttentionParams<scalar_t, acc_t> p;
  p.query = rows_of<const scalar_t>(query);
  p.key = rows_of<const scalar_t>(key);
  p.value = rows_of<const scalar_t>(value);
  p.batch = query.size(0);
  p.heads = query.size(1);
  p.query_len = query.size(2);
  p.key_len = key.size(2);
  p.head_dim = query.size(3);
  p.value_dim = value.size(3);
  p.attn_mask = make_mask_view(attn_mask, /*is_key_padding_mask=*/false);
  p.key_padding_mask = make_mask_view(key_padding_mask, /*is_key_padding_mask=*/true);
  p.is_causal = is_causal;
  p.scale = static_cast<acc_t>(resolve_scale(scale, query.size(3)));
  p.dropout = dropout_p > 0.0;
  p.dropout_seed = p.dropout ? dropout_seed->const_data_ptr<int64_t>() : nullptr;
  p.dropout_threshold = dropout_threshold(dropout_p);
  p.dropout_keep_scale = p.dropout ? static_cast<acc_t>(1.0 / (1.0 - dropout_p)) : acc_t(1);
  return p;
}

// One block per (batch, head, tile); the grid is one-dimensional.
int64_t grid_size(int64_t batch, int64_t heads, int64_t length) {
  const int64_t blocks = batch * heads * ((length + kTile - 1) / kTile);
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(),
              "torch_mha: problem too large for one kernel launch (", blocks, " thread blocks)");
  return blocks;
}

// Dynamic shared memory: `elements` values of acc_t; kernels above 48 KiB must opt in.
template <typename acc_t, typename Kernel>
size_t prepare_shared_memory(Kernel kernel, int64_t elements) {
  const size_t bytes = static_cast<size_t>(elements) * sizeof(acc_t);
  int device = 0;
  int limit = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(bytes <= static_cast<size_t>(limit), "torch_mha: this head_dim/dtype needs ", bytes,
              " bytes of shared memory per block, but the device allows ", limit);
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }
  return bytes;
}

// Calls fn.template operator()<kDim>() with kDim = the smallest of 32, 64, 128 that holds both
// head dims.
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward_cuda(
    const at::Tensor& query_in, const at::Tensor& key_in, const at::Tensor& value_in,
    const std::optional<at::Tensor>& attn_mask_in,
    const std::optional<at::Tensor>& key_padding_mask_in, bool is_causal,
    std::optional<double> scale, double dropout_p, const std::optional<at::Tensor>& dropout_seed,
    bool need_weights, bool average_weights) {
  const std::optional<at::Tensor> attn_mask = as_optional(attn_mask_in);
  const std::optional<at::Tensor> key_padding_mask = as_optional(key_padding_mask_in);
  const AttentionSizes sizes = check_attention_forward_args(
      query_in, key_in, value_in, attn_mask, key_padding_mask, dropout_p, dropout_seed);
  const c10::cuda::CUDAGuard device_guard(query_in.device());
  AttentionForwardOutputs outputs =
      allocate_forward_outputs(query_in, sizes, need_weights, average_weights);
  const at::Tensor query = with_unit_last_stride(query_in);
  const at::Tensor key = with_unit_last_stride(key_in);
  const at::Tensor value = with_unit_last_stride(value_in);
  const int64_t batch = query.size(0), heads = query.size(1), query_len = query.size(2);
  if (need_weights && average_weights && heads == 0) {
    outputs.weights.zero_();  // no head to average over
  }
  if (batch * heads * query_len == 0) {
    return {outputs.output, outputs.softmax_stats, outputs.weights};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, query.scalar_type(), "attention_forward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const auto p = make_params<scalar_t, acc_t>(query, key, value, attn_mask, key_padding_mask,
                                                    is_causal, scale, dropout_p, dropout_seed);
        const int64_t ld_q = p.head_dim + 1, ld_v = p.value_dim + 1, ld_p = kTile + 1;
        dispatch_head_dim(p.head_dim, p.value_dim, [&](auto dim) {
          constexpr int kDim = decltype(dim)::value;
          const auto forward = attention_forward_kernel<scalar_t, acc_t, kDim>;
          const size_t shared =
              prepare_shared_memory<acc_t>(forward, kTile * (2 * ld_q + ld_v + ld_p));
          forward<<<grid_size(batch, heads, query_len), kThreads, shared, stream>>>(
              p, rows_of<scalar_t>(outputs.output),
              outputs.softmax_stats.mutable_data_ptr<acc_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          if (!need_weights) {
            return;
          }
          // Averaged weights are summed in the accumulate type, then stored in the input's.
          at::Tensor average = average_weights
                                   ? (std::is_same_v<scalar_t, acc_t>
                                          ? outputs.weights
                                          : at::empty(outputs.weights.sizes(),
                                                      outputs.weights.options().dtype(
                                                          c10::CppTypeToScalarType<acc_t>::value)))
                                   : at::Tensor();
          const auto weights = attention_weights_kernel<scalar_t, acc_t, kDim>;
          const size_t weights_shared = prepare_shared_memory<acc_t>(weights, kTile * 2 * ld_q);
          weights<<<grid_size(batch, average_weights ? 1 : heads, query_len), kThreads,
                    weights_shared, stream>>>(
              p, outputs.softmax_stats.const_data_ptr<acc_t>(), average_weights,
              average_weights ? average.mutable_data_ptr<acc_t>() : nullptr,
              average_weights ? nullptr : outputs.weights.mutable_data_ptr<scalar_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          if (average_weights && !average.is_same(outputs.weights)) {
            outputs.weights.copy_(average);
          }
        });
      });
  return {outputs.output, outputs.softmax_stats, outputs.weights};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& grad_output_in, const at::Tensor& query_in, const at::Tensor& key_in,
    const at::Tensor& value_in, const at::Tensor& output_in, const at::Tensor& softmax_stats_in,
    const std::optional<at::Tensor>& attn_mask_in,
    const std::optional<at::Tensor>& key_padding_mask_in, bool is_causal,
    std::optional<double> scale, double dropout_p, const std::optional<at::Tensor>& dropout_seed,
    const std::optional<at::Tensor>& grad_weights_in, bool average_weights,
    bool compute_mask_grad) {
  const std::optional<at::Tensor> attn_mask = as_optional(attn_mask_in);
  const std::optional<at::Tensor> key_padding_mask = as_optional(key_padding_mask_in);
  const std::optional<at::Tensor> grad_weights = as_optional(grad_weights_in);
  const AttentionSizes sizes = check_attention_backward_args(
      grad_output_in, query_in, key_in, value_in, output_in, softmax_stats_in, attn_mask,
      key_padding_mask, dropout_p, dropout_seed, grad_weights, average_weights);
  const c10::cuda::CUDAGuard device_guard(query_in.device());
  AttentionBackwardOutputs outputs =
      allocate_backward_outputs(query_in, key_in, value_in, sizes, compute_mask_grad);
  const at::Tensor query = with_unit_last_stride(query_in);
  const at::Tensor key = with_unit_last_stride(key_in);
  const at::Tensor value = with_unit_last_stride(value_in);
  const at::Tensor grad_output = with_unit_last_stride(grad_output_in);
  const at::Tensor output = with_unit_last_stride(output_in);
  const at::Tensor softmax_stats = softmax_stats_in.contiguous();
  const int64_t batch = query.size(0), heads = query.size(1), query_len = query.size(2),
                key_len = key.size(2);
  if (batch * heads == 0 || (query_len == 0 && key_len == 0)) {
    return {outputs.grad_query, outputs.grad_key, outputs.grad_value, outputs.grad_mask};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, query.scalar_type(), "attention_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const auto p = make_params<scalar_t, acc_t>(query, key, value, attn_mask, key_padding_mask,
                                                    is_causal, scale, dropout_p, dropout_seed);
        const acc_t* stats = softmax_stats.const_data_ptr<acc_t>();
        const at::Tensor delta =
            at::empty({batch, heads, query_len},
                      query.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
        WeightsGrad<scalar_t, acc_t> weights_grad{nullptr, {0, 0, 0, 0}, acc_t(1)};
        if (grad_weights.has_value()) {
          const at::Tensor& g = *grad_weights;
          weights_grad.data = g.const_data_ptr<scalar_t>();
          const std::vector<int64_t> strides =
              average_weights ? std::vector<int64_t>{g.stride(0), 0, g.stride(1), g.stride(2)}
                              : g.strides().vec();
          std::copy(strides.begin(), strides.end(), weights_grad.strides);
          weights_grad.scale = average_weights ? acc_t(1) / static_cast<acc_t>(heads) : acc_t(1);
        }
        const int64_t ld_q = p.head_dim + 1, ld_v = p.value_dim + 1, ld_p = kTile + 1;

        if (query_len > 0) {
          const int64_t rows_total = batch * heads * query_len;
          softmax_delta_kernel<scalar_t, acc_t>
              <<<(rows_total + kWarps - 1) / kWarps, kThreads, 0, stream>>>(
                  rows_of<const scalar_t>(grad_output), rows_of<const scalar_t>(output), heads,
                  query_len, p.value_dim, rows_total, delta.mutable_data_ptr<acc_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        dispatch_head_dim(p.head_dim, p.value_dim, [&](auto dim) {
          constexpr int kDim = decltype(dim)::value;
          if (grad_weights.has_value() && query_len > 0) {
            const auto weights_delta = weights_delta_kernel<scalar_t, acc_t, kDim>;
            const size_t shared = prepare_shared_memory<acc_t>(weights_delta, kTile * 2 * ld_q);
            weights_delta<<<grid_size(batch, heads, query_len), kThreads, shared, stream>>>(
                p, stats, weights_grad, delta.mutable_data_ptr<acc_t>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          }
          if (key_len > 0) {
            const auto dkdv = attention_backward_dkdv_kernel<scalar_t, acc_t, kDim>;
            const size_t shared =
                prepare_shared_memory<acc_t>(dkdv, kTile * (2 * ld_q + 2 * ld_v + 2 * ld_p + 3));
            dkdv<<<grid_size(batch, heads, key_len), kThreads, shared, stream>>>(
                p, rows_of<const scalar_t>(grad_output), stats, delta.const_data_ptr<acc_t>(),
                weights_grad, grad_weights.has_value(), rows_of<scalar_t>(outputs.grad_key),
                rows_of<scalar_t>(outputs.grad_value));
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          }
          if (query_len > 0) {
            const auto dq = attention_backward_dq_kernel<scalar_t, acc_t, kDim>;
            const size_t shared =
                prepare_shared_memory<acc_t>(dq, kTile * (2 * ld_q + 2 * ld_v + ld_p));
            dq<<<grid_size(batch, heads, query_len), kThreads, shared, stream>>>(
                p, rows_of<const scalar_t>(grad_output), stats, delta.const_data_ptr<acc_t>(),
                weights_grad, grad_weights.has_value(), rows_of<scalar_t>(outputs.grad_query),
                compute_mask_grad ? outputs.grad_mask.mutable_data_ptr<acc_t>() : nullptr);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          }
        });
      });
  return {outputs.grad_query, outputs.grad_key, outputs.grad_value, outputs.grad_mask};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_mha, CUDA, m) {
  m.impl("attention_forward", &attention_forward_cuda);
  m.impl("attention_backward", &attention_backward_cuda);
}

}  // namespace torch_mha::cuda
