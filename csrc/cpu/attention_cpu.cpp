// CPU entry points of the core attention ops: the shared checks and allocation
// (attention_args.h), the input layouts the CPU kernels read best, and the choice of the kernel
// build for this CPU's vector ISA (see cpu/attention_kernels.h).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <torch/library.h>

#include <string>

#include "attention_args.h"
#include "cpu/attention_kernels.h"
#include "kvcache.h"
#include "torch_mha.h"

namespace torch_mha {
namespace cpu {
namespace {

using ForwardKernel = void (*)(const AttentionParams&);
using BackwardKernel = void (*)(const AttentionBackwardParams&, const BackwardScratch&);

struct KernelSet {
  const char* isa;
  ForwardKernel forward;
  BackwardKernel backward;
};

// The best build this library has that PyTorch would also use on this CPU.
KernelSet select_kernels() {
  const std::string capability = at::get_cpu_capability();
#if defined(TORCH_MHA_CPU_AVX512)
  if (capability == "AVX512") {
    return {"AVX512", &AVX512::attention_forward_kernel, &AVX512::attention_backward_kernel};
  }
#endif
#if defined(TORCH_MHA_CPU_AVX2)
  if (capability == "AVX512" || capability == "AVX2") {
    return {"AVX2", &AVX2::attention_forward_kernel, &AVX2::attention_backward_kernel};
  }
#endif
  (void)capability;
  return {"DEFAULT", &DEFAULT::attention_forward_kernel, &DEFAULT::attention_backward_kernel};
}

const KernelSet& kernels() {
  static const KernelSet selected = select_kernels();
  return selected;
}

// The kernels index rows with a unit-stride last dimension; anything else is copied once.
at::Tensor with_unit_last_stride(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

// A per-head tensor whose rows the kernels read once per block of the other sequence. When its
// rows are far apart, as in the per-head views of a packed (batch, seq, 3 * embed) projection,
// they land in a few cache sets and evict each other on every pass: one dense copy costs less
// than that once there is more than one pass (measured: layer-shaped views made the forward
// about 20% and the backward about 25% slower than dense inputs, at N=4, H=8, L=1024, D=64).
// Packed variable-length tensors (total, heads, dim) keep their layout.
at::Tensor with_dense_rows(const at::Tensor& t, bool read_repeatedly) {
  if (t.dim() != 4) {
    return with_unit_last_stride(t);
  }
  const bool dense_rows =
      (t.size(-1) <= 1 || t.stride(-1) == 1) && (t.size(-2) <= 1 || t.stride(-2) == t.size(-1));
  return (read_repeatedly && !dense_rows) ? t.contiguous() : with_unit_last_stride(t);
}

ForwardResult attention_forward_cpu(const AttentionForwardArgs& args) {
  const AttentionShape shape = check_forward_args(args, /*read_values=*/true);
  // Outputs follow the caller's layout (as the Meta kernel does), not that of a private copy.
  AttentionForwardOutputs outputs = allocate_forward_outputs(args, shape);
  // Query rows are packed once per block; keys and values are read once per query block.
  const bool several_query_blocks = shape.query_len.expect_int() > kBlockQ;
  AttentionForwardArgs kernel_args = args;
  kernel_args.query = with_unit_last_stride(args.query);
  kernel_args.key = with_dense_rows(args.key, several_query_blocks);
  kernel_args.value = with_dense_rows(args.value, several_query_blocks);
  std::vector<at::Tensor> keep_alive;
  const AttentionParams params = make_forward_params(kernel_args, outputs, keep_alive);
  kernels().forward(params);
  return {outputs.output, outputs.softmax_stats, outputs.weights};
}

// dQ partial sums: one float32 (float64) copy of the query's rows per chunk of key blocks,
// zero-filled, rows padded to whole vectors.
at::Tensor allocate_dq_partials(const AttentionBackwardArgs& args, const AttentionParams& params,
                                BackwardScratch& scratch) {
  scratch.chunks = backward_dq_chunks(params.batch * params.kv_heads, params.key_len);
  const int64_t row_stride = backward_dq_row_stride(params.head_dim);
  const at::Tensor& query = args.forward.query;
  const at::TensorOptions options = query.options().dtype(accumulate_type(query.scalar_type()));
  at::Tensor partials;
  if (params.cu_seqlens_q != nullptr) {
    partials = at::zeros({scratch.chunks, query.size(0), params.heads, row_stride}, options);
    scratch.dq_rows = {partials.mutable_data_ptr(), 0, row_stride, params.heads * row_stride,
                       params.cu_seqlens_q};
  } else {
    partials = at::zeros({scratch.chunks, params.batch, params.heads, params.query_len, row_stride},
                         options);
    scratch.dq_rows = {partials.mutable_data_ptr(), params.heads * params.query_len * row_stride,
                       params.query_len * row_stride, row_stride, nullptr};
  }
  scratch.chunk_stride = partials.numel() / std::max<int64_t>(scratch.chunks, 1);
  return partials;
}

BackwardResult attention_backward_cpu(const AttentionBackwardArgs& args) {
  const AttentionShape shape = check_backward_args(args, /*read_values=*/true);
  AttentionBackwardOutputs outputs = allocate_backward_outputs(args, shape);
  // Queries and output gradients are read once per key block, keys and values once per query
  // block; the output only for delta.
  const bool several_key_blocks = shape.key_len.expect_int() > kBlockK;
  const bool several_query_blocks = shape.query_len.expect_int() > kBlockQ;
  AttentionBackwardArgs kernel_args = args;
  AttentionForwardArgs& forward = kernel_args.forward;
  forward.query = with_dense_rows(args.forward.query, several_key_blocks);
  forward.key = with_dense_rows(args.forward.key, several_query_blocks);
  forward.value = with_dense_rows(args.forward.value, several_query_blocks);
  kernel_args.grad_output = with_dense_rows(args.grad_output, several_key_blocks);
  kernel_args.output = with_unit_last_stride(args.output);

  const at::Tensor delta = allocate_delta(args);
  std::vector<at::Tensor> keep_alive;
  const AttentionBackwardParams params =
      make_backward_params(kernel_args, outputs, delta, keep_alive);
  BackwardScratch scratch;
  const at::Tensor dq_partials = allocate_dq_partials(args, params, scratch);
  kernels().backward(params, scratch);
  compute_sink_gradient(args, delta, outputs.grad_sinks);
  return {outputs.grad_query, outputs.grad_key, outputs.grad_value, outputs.grad_mask,
          outputs.grad_sinks};
}

}  // namespace

int64_t backward_dq_chunks(int64_t batch_kv_heads, int64_t key_len) {
  // Aim for at least this many work items, so that a small batch x heads still keeps several
  // cores busy; each extra chunk costs one float32 copy of dQ for its heads.
  constexpr int64_t kTargetItems = 16;
  const int64_t key_blocks = (key_len + kBlockK - 1) / kBlockK;
  if (batch_kv_heads == 0 || key_blocks == 0) {
    return 1;
  }
  const int64_t wanted = (kTargetItems + batch_kv_heads - 1) / batch_kv_heads;
  return std::max<int64_t>(1, std::min(wanted, key_blocks));
}

int64_t backward_dq_row_stride(int64_t head_dim) {
  constexpr int64_t kPad = 16;  // a multiple of every float/double vector width
  return (head_dim + kPad - 1) / kPad * kPad;
}

TORCH_LIBRARY_IMPL(torch_mha, CPU, m) {
  register_core_attention_kernels<&attention_forward_cpu, &attention_backward_cpu>(m);
  register_kvcache_kernel<&attention_with_kvcache_on<&attention_forward_cpu>>(m);
}

}  // namespace cpu

std::string cpu_capability() {
  return cpu::kernels().isa;
}

}  // namespace torch_mha
