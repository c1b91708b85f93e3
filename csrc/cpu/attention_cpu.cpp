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

using ForwardKernel = void (*)(const AttentionParams&, ReducedProducts);
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

// How this call multiplies bfloat16/float16 tiles (reduced_products.h); read per call, so that
// TORCH_MHA_CPU_REDUCED_PRODUCTS can be changed between calls, as TORCH_MHA_CUDA_BACKEND can.
ReducedProducts reduced_products_engine(c10::ScalarType dtype) {
  if (dtype != at::kBFloat16 && dtype != at::kHalf) {
    return ReducedProducts::kFloatFma;
  }
  const bool avx512_build = std::string(kernels().isa) == "AVX512";
  return choose_reduced_products(reduced_products_query(dtype, avx512_build)).engine;
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
  kernels().forward(params, reduced_products_engine(params.dtype));
  return {outputs.output, outputs.softmax_stats, outputs.weights};
}

// Where dQ accumulates (BackwardScratch): grad_query itself for chunk 0 when it holds the
// accumulate type and whole vectors per row, and zero-filled float32 (float64) scratch rows,
// padded to whole vectors, for the other chunks. Returns the scratch, to be kept alive.
at::Tensor prepare_dq_accumulation(const AttentionBackwardParams& params,
                                   const AttentionBackwardOutputs& outputs,
                                   BackwardScratch& scratch) {
  scratch.chunks = backward_dq_chunks(params.batch * params.kv_heads, params.key_len);
  const int64_t row_stride = backward_dq_row_stride(params.head_dim);
  const at::Tensor& grad_query = outputs.grad_query;
  const at::TensorOptions options =
      grad_query.options().dtype(accumulate_type(grad_query.scalar_type()));
  const bool first_in_output =
      grad_query.scalar_type() == accumulate_type(grad_query.scalar_type()) &&
      params.head_dim == row_stride;
  const int64_t scratch_chunks = scratch.chunks - (first_in_output ? 1 : 0);
  const bool varlen = params.cu_seqlens_q != nullptr;
  const std::vector<int64_t> sizes =
      varlen ? std::vector<int64_t>{scratch_chunks, grad_query.size(0), params.heads, row_stride}
             : std::vector<int64_t>{scratch_chunks, params.batch, params.heads, params.query_len,
                                    row_stride};
  const at::Tensor partials = at::zeros(sizes, options);
  const RowLayout scratch_rows =
      varlen ? RowLayout{partials.mutable_data_ptr(), 0, row_stride, params.heads * row_stride,
                         params.cu_seqlens_q}
             : RowLayout{partials.mutable_data_ptr(), params.heads * params.query_len * row_stride,
                         params.query_len * row_stride, row_stride, nullptr};
  scratch.chunk_stride = scratch_chunks > 0 ? partials.numel() / scratch_chunks : 0;
  if (first_in_output) {
    outputs.grad_query.zero_();
    scratch.first = params.grad_query;
    scratch.partials = scratch_rows;
  } else {
    scratch.first = scratch_rows;
    scratch.partials = scratch_rows;
    scratch.partials.data =
        static_cast<char*>(scratch_rows.data) + scratch.chunk_stride * partials.element_size();
  }
  return partials;
}

BackwardResult attention_backward_cpu(const AttentionBackwardArgs& args) {
  const AttentionShape shape = check_backward_args(args, /*read_values=*/true);
  AttentionBackwardOutputs outputs = allocate_backward_outputs(args, shape);
  // No dense copies of the inputs here (they would be the peak of a training step): the kernel
  // packs what it reads repeatedly, per head and per key block.
  AttentionBackwardArgs kernel_args = args;
  AttentionForwardArgs& forward = kernel_args.forward;
  forward.query = with_unit_last_stride(args.forward.query);
  forward.key = with_unit_last_stride(args.forward.key);
  forward.value = with_unit_last_stride(args.forward.value);
  kernel_args.grad_output = with_unit_last_stride(args.grad_output);
  kernel_args.output = with_unit_last_stride(args.output);

  const at::Tensor delta = allocate_delta(args);
  std::vector<at::Tensor> keep_alive;
  const AttentionBackwardParams params =
      make_backward_params(kernel_args, outputs, delta, keep_alive);
  BackwardScratch scratch;
  const at::Tensor dq_partials = prepare_dq_accumulation(params, outputs, scratch);
  kernels().backward(params, scratch);
  compute_sink_gradient(args, delta, outputs.grad_sinks);
  return {outputs.grad_query, outputs.grad_key, outputs.grad_value, outputs.grad_mask,
          outputs.grad_sinks};
}

}  // namespace

int64_t backward_dq_chunks(int64_t batch_kv_heads, int64_t key_len) {
  // Aim for at least this many work items, so that a small batch x heads still keeps several
  // cores busy. Each extra chunk costs one float32 copy of dQ: at 8 items, one sequence of 8
  // heads (a training step of the layer at batch 1) needs none and stays at or below the memory
  // of PyTorch's backward. A shape-only rule: results must not depend on the thread count.
  constexpr int64_t kTargetItems = 8;
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
