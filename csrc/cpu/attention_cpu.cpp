// CPU entry points of the core attention ops: argument checks, output allocation, and the choice
// of the kernel build for this CPU's vector ISA (see cpu/attention_kernel.h).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <torch/library.h>

#include <string>

#include "attention_utils.h"
#include "cpu/attention_kernel.h"
#include "torch_mha.h"

namespace torch_mha {
namespace cpu {
namespace {

using ForwardKernel = void (*)(const ForwardKernelArgs&);
using BackwardKernel = void (*)(const BackwardKernelArgs&);

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

// A tensor whose rows the kernels read once per block of the other sequence. When its rows are
// far apart, as in the per-head views of a packed (batch, seq, 3 * embed) projection, they land
// in a few cache sets and evict each other on every pass: one dense copy costs less than that
// once there is more than one pass (measured: layer-shaped views made the forward about 20% and
// the backward about 25% slower than dense inputs, at N=4, H=8, L=1024, D=64).
at::Tensor with_dense_rows(const at::Tensor& t, bool read_repeatedly) {
  const bool dense_rows =
      (t.size(-1) <= 1 || t.stride(-1) == 1) && (t.size(-2) <= 1 || t.stride(-2) == t.size(-1));
  return (read_repeatedly && !dense_rows) ? t.contiguous() : with_unit_last_stride(t);
}

std::optional<at::Tensor> as_optional(const std::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? t : std::nullopt;
}

StridedRows rows_of(const at::Tensor& t) {
  return {const_cast<void*>(t.const_data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
}

// Gradient of the returned weights as (batch, head, query, key). Head-averaged weights have no
// head dimension: every head reads the same element (head stride 0).
Strided4d grad_weights_view(const std::optional<at::Tensor>& t, bool average_weights) {
  Strided4d view;
  if (t.has_value()) {
    view.data = t->const_data_ptr();
    const std::vector<int64_t> strides =
        average_weights ? std::vector<int64_t>{t->stride(0), 0, t->stride(1), t->stride(2)}
                        : t->strides().vec();
    std::copy(strides.begin(), strides.end(), view.strides);
  }
  return view;
}

AttentionProblem make_problem(const at::Tensor& query, const at::Tensor& key,
                              const at::Tensor& value, const std::optional<at::Tensor>& attn_mask,
                              const std::optional<at::Tensor>& key_padding_mask, bool is_causal,
                              std::optional<double> scale, double dropout_p,
                              const std::optional<at::Tensor>& dropout_seed) {
  AttentionProblem problem;
  problem.dtype = query.scalar_type();
  problem.batch = query.size(0);
  problem.heads = query.size(1);
  problem.query_len = query.size(2);
  problem.key_len = key.size(2);
  problem.head_dim = query.size(3);
  problem.value_dim = value.size(3);
  problem.attn_mask = make_mask_view(attn_mask, /*is_key_padding_mask=*/false);
  problem.key_padding_mask = make_mask_view(key_padding_mask, /*is_key_padding_mask=*/true);
  problem.is_causal = is_causal;
  problem.scale = resolve_scale(scale, query.size(3));
  problem.dropout_p = dropout_p;
  problem.dropout_seed = dropout_p > 0.0 ? read_dropout_seed(dropout_seed) : 0;
  return problem;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward_cpu(
    const at::Tensor& query_in, const at::Tensor& key_in, const at::Tensor& value_in,
    const std::optional<at::Tensor>& attn_mask_in,
    const std::optional<at::Tensor>& key_padding_mask_in, bool is_causal,
    std::optional<double> scale, double dropout_p, const std::optional<at::Tensor>& dropout_seed,
    bool need_weights, bool average_weights) {
  const std::optional<at::Tensor> attn_mask = as_optional(attn_mask_in);
  const std::optional<at::Tensor> key_padding_mask = as_optional(key_padding_mask_in);
  const AttentionSizes sizes = check_attention_forward_args(
      query_in, key_in, value_in, attn_mask, key_padding_mask, dropout_p, dropout_seed);
  // Outputs follow the caller's layout (as the Meta kernel does), not that of a private copy.
  AttentionForwardOutputs outputs =
      allocate_forward_outputs(query_in, sizes, need_weights, average_weights);
  // Query rows are packed once per block; keys and values are read once per query block.
  const bool several_query_blocks = query_in.size(2) > kBlockQ;
  const at::Tensor query = with_unit_last_stride(query_in);
  const at::Tensor key = with_dense_rows(key_in, several_query_blocks);
  const at::Tensor value = with_dense_rows(value_in, several_query_blocks);

  ForwardKernelArgs args;
  args.problem = make_problem(query, key, value, attn_mask, key_padding_mask, is_causal, scale,
                              dropout_p, dropout_seed);
  args.query = rows_of(query);
  args.key = rows_of(key);
  args.value = rows_of(value);
  args.output = rows_of(outputs.output);
  args.softmax_stats = outputs.softmax_stats.mutable_data_ptr();
  args.weights = need_weights ? outputs.weights.mutable_data_ptr() : nullptr;
  args.average_weights = average_weights;
  kernels().forward(args);
  return {outputs.output, outputs.softmax_stats, outputs.weights};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
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
  AttentionBackwardOutputs outputs =
      allocate_backward_outputs(query_in, key_in, value_in, sizes, compute_mask_grad);
  // Queries and output gradients are read once per key block, keys and values once per query
  // block; the output only for delta.
  const bool several_key_blocks = key_in.size(2) > kBlockK;
  const bool several_query_blocks = query_in.size(2) > kBlockQ;
  const at::Tensor query = with_dense_rows(query_in, several_key_blocks);
  const at::Tensor key = with_dense_rows(key_in, several_query_blocks);
  const at::Tensor value = with_dense_rows(value_in, several_query_blocks);
  const at::Tensor grad_output = with_dense_rows(grad_output_in, several_key_blocks);
  const at::Tensor output = with_unit_last_stride(output_in);
  const at::Tensor softmax_stats = softmax_stats_in.contiguous();

  BackwardKernelArgs args;
  args.problem = make_problem(query, key, value, attn_mask, key_padding_mask, is_causal, scale,
                              dropout_p, dropout_seed);
  args.grad_output = rows_of(grad_output);
  args.query = rows_of(query);
  args.key = rows_of(key);
  args.value = rows_of(value);
  args.output = rows_of(output);
  args.softmax_stats = softmax_stats.const_data_ptr();
  args.grad_weights = grad_weights_view(grad_weights, average_weights);
  args.grad_weights_scale = average_weights ? 1.0 / static_cast<double>(query.size(1)) : 1.0;
  args.grad_query = rows_of(outputs.grad_query);
  args.grad_key = rows_of(outputs.grad_key);
  args.grad_value = rows_of(outputs.grad_value);
  args.grad_mask = compute_mask_grad ? outputs.grad_mask.mutable_data_ptr() : nullptr;

  const at::TensorOptions scratch_options =
      query.options().dtype(accumulate_type(query.scalar_type()));
  const AttentionProblem& pb = args.problem;
  args.dq_chunks = backward_dq_chunks(pb.batch * pb.heads, pb.key_len);
  args.dq_row_stride = backward_dq_row_stride(pb.head_dim);
  const at::Tensor delta = at::empty({pb.batch, pb.heads, pb.query_len}, scratch_options);
  const at::Tensor dq_partials = at::zeros(
      {args.dq_chunks, pb.batch, pb.heads, pb.query_len, args.dq_row_stride}, scratch_options);
  args.delta = delta.mutable_data_ptr();
  args.dq_partials = dq_partials.mutable_data_ptr();
  kernels().backward(args);
  return {outputs.grad_query, outputs.grad_key, outputs.grad_value, outputs.grad_mask};
}

}  // namespace

int64_t backward_dq_chunks(int64_t batch_heads, int64_t key_len) {
  // Aim for at least this many work items, so that a small batch x heads still keeps several
  // cores busy; each extra chunk costs one float32 copy of dQ for its heads.
  constexpr int64_t kTargetItems = 16;
  const int64_t key_blocks = (key_len + kBlockK - 1) / kBlockK;
  if (batch_heads == 0 || key_blocks == 0) {
    return 1;
  }
  const int64_t wanted = (kTargetItems + batch_heads - 1) / batch_heads;
  return std::max<int64_t>(1, std::min(wanted, key_blocks));
}

int64_t backward_dq_row_stride(int64_t head_dim) {
  constexpr int64_t kPad = 16;  // a multiple of every float/double vector width
  return (head_dim + kPad - 1) / kPad * kPad;
}

TORCH_LIBRARY_IMPL(torch_mha, CPU, m) {
  m.impl("attention_forward", &attention_forward_cpu);
  m.impl("attention_backward", &attention_backward_cpu);
}

}  // namespace cpu

std::string cpu_capability() {
  return cpu::kernels().isa;
}

}  // namespace torch_mha
