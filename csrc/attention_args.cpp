#include "attention_args.h"

#include <ATen/ATen.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <numeric>

namespace torch_mha {
namespace {

bool is_supported_input_type(at::ScalarType type) {
  return type == at::kDouble || type == at::kFloat || type == at::kBFloat16 || type == at::kHalf;
}

void check_dtypes_and_devices(const char* op, const at::Tensor& query, const at::Tensor& key,
                              const at::Tensor& value) {
  TORCH_CHECK(is_supported_input_type(query.scalar_type()), op,
              ": expected query of dtype float64, float32, bfloat16 or float16, but got ",
              query.scalar_type());
  TORCH_CHECK(
      key.scalar_type() == query.scalar_type() && value.scalar_type() == query.scalar_type(), op,
      ": expected query, key and value to have the same dtype, but got query ", query.scalar_type(),
      ", key ", key.scalar_type(), ", value ", value.scalar_type());
  TORCH_CHECK(key.device() == query.device() && value.device() == query.device(), op,
              ": expected query, key and value on the same device, but got query on ",
              query.device(), ", key on ", key.device(), ", value on ", value.device());
}

// query (N, H, L, D), key (N, Hkv, S, D), value (N, Hkv, S, Dv) with H a multiple of Hkv.
AttentionShape check_dense_qkv(const char* op, const at::Tensor& query, const at::Tensor& key,
                               const at::Tensor& value) {
  TORCH_CHECK(query.defined() && key.defined() && value.defined(), op,
              ": query, key and value must be defined tensors");
  TORCH_CHECK(query.dim() == 4, op,
              ": expected query of shape (batch, heads, query_len, head_dim), but got a ",
              query.dim(), "-D tensor of shape ", query.sym_sizes());
  TORCH_CHECK(key.dim() == 4, op,
              ": expected key of shape (batch, kv_heads, key_len, head_dim), but got a ", key.dim(),
              "-D tensor of shape ", key.sym_sizes());
  TORCH_CHECK(value.dim() == 4, op,
              ": expected value of shape (batch, kv_heads, key_len, value_dim), but got a ",
              value.dim(), "-D tensor of shape ", value.sym_sizes());
  check_dtypes_and_devices(op, query, key, value);
  TORCH_CHECK(key.sym_size(0) == query.sym_size(0) && value.sym_size(0) == query.sym_size(0), op,
              ": expected the same batch size (dim 0) for query, key and value, but got query ",
              query.sym_sizes(), ", key ", key.sym_sizes(), ", value ", value.sym_sizes());
  const c10::SymInt& heads = query.sym_size(1);
  const c10::SymInt& kv_heads = key.sym_size(1);
  TORCH_CHECK(
      value.sym_size(1) == kv_heads && (kv_heads == 0 ? heads == 0 : (heads % kv_heads) == 0), op,
      ": expected the number of heads (dim 1) of key and value to be equal and to divide "
      "that of query (grouped-query attention), but got query ",
      query.sym_sizes(), ", key ", key.sym_sizes(), ", value ", value.sym_sizes());
  TORCH_CHECK(key.sym_size(2) == value.sym_size(2), op,
              ": expected key and value to have the same length (dim 2), but got key ",
              key.sym_sizes(), " and value ", value.sym_sizes());
  TORCH_CHECK(key.sym_size(3) == query.sym_size(3), op,
              ": expected query and key to have the same head_dim (dim 3), but got query ",
              query.sym_sizes(), " and key ", key.sym_sizes());
  return {query.sym_size(0), heads, kv_heads, query.sym_size(2), key.sym_size(2), query.sym_size(3),
          value.sym_size(3)};
}

// Reads cu_seqlens on the host (a copy for device tensors) and checks that it is a valid prefix
// sum of `total` rows whose sequences are at most `max_seqlen` long.
void check_seqlens_values(const char* op, const char* name, const at::Tensor& cu_seqlens,
                          int64_t total, const char* max_name, int64_t max_seqlen) {
  const at::Tensor host = cu_seqlens.to(at::kCPU).contiguous();
  const int32_t* offsets = host.const_data_ptr<int32_t>();
  const int64_t count = host.numel();
  TORCH_CHECK(offsets[0] == 0, op, ": expected ", name, " to start at 0, but it starts at ",
              offsets[0]);
  for (int64_t b = 0; b + 1 < count; ++b) {
    const int64_t length = static_cast<int64_t>(offsets[b + 1]) - offsets[b];
    TORCH_CHECK(length >= 0, op, ": expected ", name, " to be non-decreasing, but ", name, "[",
                b + 1, "] = ", offsets[b + 1], " < ", name, "[", b, "] = ", offsets[b]);
    TORCH_CHECK(length <= max_seqlen, op, ": ", max_name, " = ", max_seqlen,
                " is smaller than sequence ", b, ", of length ", length, " (", name, ")");
  }
  TORCH_CHECK(offsets[count - 1] == total, op, ": expected ", name, " to end at the total length ",
              total, ", but it ends at ", offsets[count - 1]);
}

// query (total_q, H, D), key (total_k, Hkv, D), value (total_k, Hkv, Dv), cu_seqlens int32.
AttentionShape check_varlen_qkv(const char* op, const AttentionForwardArgs& args,
                                bool read_values) {
  const at::Tensor &query = args.query, &key = args.key, &value = args.value;
  TORCH_CHECK(query.defined() && key.defined() && value.defined(), op,
              ": query, key and value must be defined tensors");
  TORCH_CHECK(query.dim() == 3, op,
              ": expected query of shape (total_q, heads, head_dim), but got a ", query.dim(),
              "-D tensor of shape ", query.sym_sizes());
  TORCH_CHECK(key.dim() == 3, op,
              ": expected key of shape (total_k, kv_heads, head_dim), but got a ", key.dim(),
              "-D tensor of shape ", key.sym_sizes());
  TORCH_CHECK(value.dim() == 3, op,
              ": expected value of shape (total_k, kv_heads, value_dim), but got a ", value.dim(),
              "-D tensor of shape ", value.sym_sizes());
  check_dtypes_and_devices(op, query, key, value);
  const c10::SymInt& heads = query.sym_size(1);
  const c10::SymInt& kv_heads = key.sym_size(1);
  TORCH_CHECK(
      value.sym_size(1) == kv_heads && (kv_heads == 0 ? heads == 0 : (heads % kv_heads) == 0), op,
      ": expected the number of heads (dim 1) of key and value to be equal and to divide "
      "that of query (grouped-query attention), but got query ",
      query.sym_sizes(), ", key ", key.sym_sizes(), ", value ", value.sym_sizes());
  TORCH_CHECK(key.sym_size(0) == value.sym_size(0), op,
              ": expected key and value to have the same total length (dim 0), but got key ",
              key.sym_sizes(), " and value ", value.sym_sizes());
  TORCH_CHECK(key.sym_size(2) == query.sym_size(2), op,
              ": expected query and key to have the same head_dim (dim 2), but got query ",
              query.sym_sizes(), " and key ", key.sym_sizes());

  const at::Tensor& cu_q = *args.cu_seqlens_q;
  const at::Tensor& cu_k = *args.cu_seqlens_k;
  for (const auto& [name, cu] : {std::pair<const char*, const at::Tensor*>{"cu_seqlens_q", &cu_q},
                                 {"cu_seqlens_k", &cu_k}}) {
    TORCH_CHECK(cu->scalar_type() == at::kInt, op, ": expected ", name,
                " of dtype int32 (torch.int32), but got ", cu->scalar_type());
    TORCH_CHECK(cu->dim() == 1 && cu->sym_size(0) >= 1, op, ": expected ", name,
                " of shape (batch + 1,), but got shape ", cu->sym_sizes());
    TORCH_CHECK(cu->device() == query.device(), op, ": expected ", name, " on ", query.device(),
                ", but got ", cu->device());
  }
  TORCH_CHECK(cu_q.sym_size(0) == cu_k.sym_size(0), op,
              ": expected cu_seqlens_q and cu_seqlens_k to describe the same number of "
              "sequences, but got shapes ",
              cu_q.sym_sizes(), " and ", cu_k.sym_sizes());
  TORCH_CHECK(args.max_seqlen_q >= 0 && args.max_seqlen_k >= 0, op,
              ": expected max_seqlen_q and max_seqlen_k >= 0, but got ", args.max_seqlen_q, " and ",
              args.max_seqlen_k);
  if (read_values) {
    check_seqlens_values(op, "cu_seqlens_q", cu_q, query.size(0), "max_seqlen_q",
                         args.max_seqlen_q);
    check_seqlens_values(op, "cu_seqlens_k", cu_k, key.size(0), "max_seqlen_k", args.max_seqlen_k);
  }
  return {cu_q.sym_size(0) - 1,
          heads,
          kv_heads,
          c10::SymInt(args.max_seqlen_q),
          c10::SymInt(args.max_seqlen_k),
          query.sym_size(2),
          value.sym_size(2)};
}

void check_mask(const char* op, const char* name, const std::optional<at::Tensor>& mask,
                const at::Tensor& query, bool is_key_padding_mask, const AttentionShape& shape) {
  if (!mask.has_value()) {
    return;
  }
  const at::Tensor& m = *mask;
  const at::ScalarType type = m.scalar_type();
  TORCH_CHECK(type == at::kBool || type == query.scalar_type() || type == at::kFloat, op, ": ",
              name,
              " must be a bool tensor (True = masked out) or a floating tensor of the query's "
              "dtype (",
              query.scalar_type(), ") or float32, but got dtype ", type);
  TORCH_CHECK(m.device() == query.device(), op, ": expected ", name,
              " on the same device as query (", query.device(), "), but got ", m.device());
  if (is_key_padding_mask) {
    TORCH_CHECK(m.dim() == 2 && m.sym_size(0) == shape.batch && m.sym_size(1) == shape.key_len, op,
                ": expected ", name, " of shape (batch, key_len) = (", shape.batch, ", ",
                shape.key_len, "), but got shape ", m.sym_sizes());
    return;
  }
  const std::array<c10::SymInt, 4> target = {shape.batch, shape.heads, shape.query_len,
                                             shape.key_len};
  bool broadcastable = m.dim() <= 4;
  for (int64_t d = 0; broadcastable && d < m.dim(); ++d) {
    const c10::SymInt& size = m.sym_size(d);
    const c10::SymInt& want = target[4 - m.dim() + d];
    broadcastable = size == 1 || size == want;
  }
  TORCH_CHECK(broadcastable, op, ": expected ", name,
              " broadcastable to (batch, heads, query_len, key_len) = (", shape.batch, ", ",
              shape.heads, ", ", shape.query_len, ", ", shape.key_len, "), but got shape ",
              m.sym_sizes());
}

void check_dropout(const char* op, const at::Tensor& query, double dropout_p,
                   const std::optional<at::Tensor>& dropout_seed) {
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, op,
                    ": dropout_p must be in [0, 1), but got ", dropout_p);
  if (dropout_p == 0.0) {
    return;
  }
  TORCH_CHECK(dropout_seed.has_value(), op,
              ": dropout_p > 0 needs a dropout_seed tensor (one int64 element)");
  const at::Tensor& seed = *dropout_seed;
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.sym_numel() == 1, op,
              ": expected dropout_seed to be an int64 tensor with one element, but got dtype ",
              seed.scalar_type(), " and shape ", seed.sym_sizes());
  TORCH_CHECK(seed.device() == query.device(), op, ": expected dropout_seed on ", query.device(),
              ", but got ", seed.device());
}

// window_size, softcap, alibi_slopes and sinks.
void check_score_modifiers(const char* op, const AttentionForwardArgs& args,
                           const AttentionShape& shape) {
  TORCH_CHECK_VALUE(args.window_left >= -1 && args.window_right >= -1, op,
                    ": window_size must be (left, right) with each side >= 0, or -1 for no "
                    "limit, but got (",
                    args.window_left, ", ", args.window_right, ")");
  TORCH_CHECK_VALUE(args.softcap >= 0.0 && std::isfinite(args.softcap), op,
                    ": softcap must be a finite number >= 0 (0 disables it), but got ",
                    args.softcap);
  const at::Tensor& query = args.query;
  if (args.alibi_slopes.has_value()) {
    const at::Tensor& slopes = *args.alibi_slopes;
    TORCH_CHECK(slopes.scalar_type() == at::kFloat, op,
                ": expected alibi_slopes of dtype float32, but got ", slopes.scalar_type());
    TORCH_CHECK((slopes.dim() == 1 && slopes.sym_size(0) == shape.heads) ||
                    (slopes.dim() == 2 && slopes.sym_size(0) == shape.batch &&
                     slopes.sym_size(1) == shape.heads),
                op, ": expected alibi_slopes of shape (heads,) = (", shape.heads,
                ",) or (batch, heads) = (", shape.batch, ", ", shape.heads, "), but got shape ",
                slopes.sym_sizes());
    TORCH_CHECK(slopes.device() == query.device(), op, ": expected alibi_slopes on ",
                query.device(), ", but got ", slopes.device());
  }
  if (args.sinks.has_value()) {
    const at::Tensor& sinks = *args.sinks;
    TORCH_CHECK(sinks.scalar_type() == query.scalar_type() || sinks.scalar_type() == at::kFloat, op,
                ": expected sinks of the query's dtype (", query.scalar_type(),
                ") or float32, but got ", sinks.scalar_type());
    TORCH_CHECK(sinks.dim() == 1 && sinks.sym_size(0) == shape.heads, op,
                ": expected sinks of shape (heads,) = (", shape.heads, ",), but got shape ",
                sinks.sym_sizes());
    TORCH_CHECK(sinks.device() == query.device(), op, ": expected sinks on ", query.device(),
                ", but got ", sinks.device());
  }
}

void check_same_shape(const char* op, const char* name, const at::Tensor& tensor,
                      c10::SymIntArrayRef expected, const at::Tensor& query) {
  TORCH_CHECK(tensor.defined(), op, ": ", name, " must be defined");
  TORCH_CHECK(tensor.sym_sizes() == expected, op, ": expected ", name, " of shape ", expected,
              ", but got ", tensor.sym_sizes());
  TORCH_CHECK(tensor.device() == query.device(), op, ": expected ", name, " on ", query.device(),
              ", but got ", tensor.device());
}

std::vector<c10::SymInt> output_sizes(const AttentionForwardArgs& args,
                                      const AttentionShape& shape) {
  if (args.is_varlen()) {
    return {args.query.sym_size(0), shape.heads, shape.value_dim};
  }
  return {shape.batch, shape.heads, shape.query_len, shape.value_dim};
}

std::vector<c10::SymInt> stats_sizes(const AttentionForwardArgs& args,
                                     const AttentionShape& shape) {
  if (args.is_varlen()) {
    return {args.query.sym_size(0), shape.heads, 2};
  }
  return {shape.batch, shape.heads, shape.query_len, 2};
}

// Rows of a per-head tensor: (batch, heads, rows, cols) dense, (total, heads, cols) varlen.
RowLayout rows_of(const at::Tensor& t, const std::optional<at::Tensor>& cu_seqlens) {
  RowLayout rows;
  rows.data = const_cast<void*>(t.const_data_ptr());
  if (cu_seqlens.has_value()) {
    rows.stride_head = t.stride(1);
    rows.stride_row = t.stride(0);
    rows.batch_start = cu_seqlens->const_data_ptr<int32_t>();
  } else {
    rows.stride_batch = t.stride(0);
    rows.stride_head = t.stride(1);
    rows.stride_row = t.stride(2);
  }
  return rows;
}

// A window wider than every sequence is no limit; clamping it keeps index arithmetic in range.
int64_t clamp_window(int64_t side, int64_t query_len, int64_t key_len) {
  return side < 0 ? -1 : std::min(side, query_len + key_len);
}

}  // namespace

const char* AttentionForwardArgs::op_name() const {
  if (key_lengths.has_value()) {
    return "torch_mha.attention_with_kvcache";
  }
  return is_varlen() ? "torch_mha.varlen_attention_forward" : "torch_mha.attention_forward";
}

const char* AttentionBackwardArgs::op_name() const {
  return forward.is_varlen() ? "torch_mha.varlen_attention_backward"
                             : "torch_mha.attention_backward";
}

AttentionShape check_forward_args(const AttentionForwardArgs& args, bool read_values) {
  const char* op = args.op_name();
  const AttentionShape shape = args.is_varlen()
                                   ? check_varlen_qkv(op, args, read_values)
                                   : check_dense_qkv(op, args.query, args.key, args.value);
  check_mask(op, "attn_mask", args.attn_mask, args.query, /*is_key_padding_mask=*/false, shape);
  check_mask(op, "key_padding_mask", args.key_padding_mask, args.query,
             /*is_key_padding_mask=*/true, shape);
  check_dropout(op, args.query, args.dropout_p, args.dropout_seed);
  check_score_modifiers(op, args, shape);
  return shape;
}

AttentionShape check_backward_args(const AttentionBackwardArgs& args, bool read_values) {
  const char* op = args.op_name();
  AttentionForwardArgs forward = args.forward;
  const AttentionShape shape = args.forward.is_varlen()
                                   ? check_varlen_qkv(op, forward, read_values)
                                   : check_dense_qkv(op, forward.query, forward.key, forward.value);
  const at::Tensor& query = forward.query;
  check_mask(op, "attn_mask", forward.attn_mask, query, /*is_key_padding_mask=*/false, shape);
  check_mask(op, "key_padding_mask", forward.key_padding_mask, query,
             /*is_key_padding_mask=*/true, shape);
  check_dropout(op, query, forward.dropout_p, forward.dropout_seed);
  check_score_modifiers(op, forward, shape);

  const std::vector<c10::SymInt> out_shape = output_sizes(forward, shape);
  check_same_shape(op, "grad_output", args.grad_output, out_shape, query);
  check_same_shape(op, "output", args.output, out_shape, query);
  TORCH_CHECK(args.grad_output.scalar_type() == query.scalar_type() &&
                  args.output.scalar_type() == query.scalar_type(),
              op, ": expected grad_output and output of dtype ", query.scalar_type(), ", but got ",
              args.grad_output.scalar_type(), " and ", args.output.scalar_type());
  check_same_shape(op, "softmax_stats", args.softmax_stats, stats_sizes(forward, shape), query);
  TORCH_CHECK(args.softmax_stats.scalar_type() == accumulate_type(query.scalar_type()), op,
              ": expected softmax_stats of dtype ", accumulate_type(query.scalar_type()),
              ", but got ", args.softmax_stats.scalar_type());

  if (args.grad_weights.has_value()) {
    const std::vector<c10::SymInt> weights_shape =
        forward.average_weights
            ? std::vector<c10::SymInt>{shape.batch, shape.query_len, shape.key_len}
            : std::vector<c10::SymInt>{shape.batch, shape.heads, shape.query_len, shape.key_len};
    check_same_shape(op, "grad_weights", *args.grad_weights, weights_shape, query);
    TORCH_CHECK(args.grad_weights->scalar_type() == query.scalar_type(), op,
                ": expected grad_weights of dtype ", query.scalar_type(), ", but got ",
                args.grad_weights->scalar_type());
  }
  return shape;
}

at::ScalarType accumulate_type(at::ScalarType input_type) {
  return input_type == at::kDouble ? at::kDouble : at::kFloat;
}

double resolve_scale(std::optional<double> scale, int64_t head_dim) {
  if (scale.has_value()) {
    return *scale;
  }
  return head_dim > 0 ? 1.0 / std::sqrt(static_cast<double>(head_dim)) : 1.0;
}

at::Tensor empty_with_layout_of(const at::Tensor& like, c10::SymIntArrayRef sizes,
                                const at::TensorOptions& options) {
  const int64_t dims = like.dim();
  TORCH_INTERNAL_ASSERT(dims >= 1 && static_cast<int64_t>(sizes.size()) == dims);
  const c10::SymIntArrayRef like_strides = like.sym_strides();
  std::vector<int64_t> outer_to_inner(dims - 1);
  std::iota(outer_to_inner.begin(), outer_to_inner.end(), 0);
  std::stable_sort(outer_to_inner.begin(), outer_to_inner.end(),
                   [&](int64_t a, int64_t b) { return like_strides[a] > like_strides[b]; });
  std::vector<c10::SymInt> strides(dims);
  strides[dims - 1] = 1;
  c10::SymInt extent = sizes[dims - 1];
  for (int64_t i = dims - 2; i >= 0; --i) {
    const int64_t d = outer_to_inner[i];
    strides[d] = extent;
    extent = extent * sizes[d];
  }
  return at::empty_strided_symint(sizes, strides, options);
}

AttentionForwardOutputs allocate_forward_outputs(const AttentionForwardArgs& args,
                                                 const AttentionShape& shape) {
  const at::Tensor& query = args.query;
  AttentionForwardOutputs outputs;
  outputs.output = empty_with_layout_of(query, output_sizes(args, shape), query.options());
  outputs.softmax_stats = at::empty_symint(
      stats_sizes(args, shape), query.options().dtype(accumulate_type(query.scalar_type())));
  if (args.need_weights && args.average_weights) {
    outputs.weights =
        at::empty_symint({shape.batch, shape.query_len, shape.key_len}, query.options());
  } else if (args.need_weights) {
    outputs.weights = at::empty_symint({shape.batch, shape.heads, shape.query_len, shape.key_len},
                                       query.options());
  } else {
    outputs.weights = at::empty({0}, query.options());
  }
  return outputs;
}

AttentionBackwardOutputs allocate_backward_outputs(const AttentionBackwardArgs& args,
                                                   const AttentionShape& shape) {
  const AttentionForwardArgs& forward = args.forward;
  const at::Tensor &query = forward.query, &key = forward.key, &value = forward.value;
  AttentionBackwardOutputs outputs;
  outputs.grad_query = empty_with_layout_of(query, query.sym_sizes(), query.options());
  outputs.grad_key = empty_with_layout_of(key, key.sym_sizes(), key.options());
  outputs.grad_value = empty_with_layout_of(value, value.sym_sizes(), value.options());
  const at::TensorOptions mask_options =
      query.options().dtype(accumulate_type(query.scalar_type()));
  if (args.compute_mask_grad) {
    outputs.grad_mask =
        at::zeros_symint({shape.batch, shape.heads, shape.query_len, shape.key_len}, mask_options);
  } else {
    outputs.grad_mask = at::empty({0}, mask_options);
  }
  if (forward.sinks.has_value()) {
    outputs.grad_sinks = at::empty_symint({shape.heads}, forward.sinks->options());
  } else {
    outputs.grad_sinks = at::empty({0}, query.options());
  }
  return outputs;
}

MaskView make_mask_view(const std::optional<at::Tensor>& mask, bool is_key_padding_mask) {
  MaskView view;
  if (!mask.has_value()) {
    return view;
  }
  const at::Tensor& m = *mask;
  view.data = m.const_data_ptr();
  switch (m.scalar_type()) {
    case at::kBool:
      view.kind = MaskKind::kBool;
      break;
    case at::kFloat:
      view.kind = MaskKind::kFloat;
      break;
    case at::kDouble:
      view.kind = MaskKind::kDouble;
      break;
    case at::kBFloat16:
      view.kind = MaskKind::kBFloat16;
      break;
    case at::kHalf:
      view.kind = MaskKind::kHalf;
      break;
    default:
      TORCH_CHECK(false, "torch_mha: unsupported mask dtype ", m.scalar_type());
  }
  // A broadcast (size-1) dimension reads the same element for every index: stride 0.
  auto stride_of = [&](int64_t dim) -> int64_t {
    return (dim < 0 || m.size(dim) == 1) ? 0 : m.stride(dim);
  };
  if (is_key_padding_mask) {
    view.stride_batch = stride_of(0);
    view.stride_key = stride_of(1);
  } else {
    const int64_t lead = 4 - m.dim();
    view.stride_batch = stride_of(0 - lead);
    view.stride_head = stride_of(1 - lead);
    view.stride_query = stride_of(2 - lead);
    view.stride_key = stride_of(3 - lead);
  }
  return view;
}

namespace {

// The sequence offsets as the kernels read them (contiguous), or nothing for dense tensors.
struct SequenceOffsets {
  std::optional<at::Tensor> query;
  std::optional<at::Tensor> key;
};

SequenceOffsets sequence_offsets(const AttentionForwardArgs& args,
                                 std::vector<at::Tensor>& keep_alive) {
  if (!args.is_varlen()) {
    return {};
  }
  SequenceOffsets offsets{args.cu_seqlens_q->contiguous(), args.cu_seqlens_k->contiguous()};
  keep_alive.push_back(*offsets.query);
  keep_alive.push_back(*offsets.key);
  return offsets;
}

}  // namespace

AttentionParams make_forward_params(const AttentionForwardArgs& args,
                                    const AttentionForwardOutputs& outputs,
                                    std::vector<at::Tensor>& keep_alive) {
  const at::Tensor &query = args.query, &key = args.key, &value = args.value;
  const SequenceOffsets offsets = sequence_offsets(args, keep_alive);
  const std::optional<at::Tensor>& cu_q = offsets.query;
  const std::optional<at::Tensor>& cu_k = offsets.key;
  AttentionParams p;
  if (args.key_lengths.has_value()) {
    const at::Tensor key_lengths = args.key_lengths->contiguous();
    keep_alive.push_back(key_lengths);
    p.key_lengths = key_lengths.const_data_ptr<int32_t>();
  }
  p.dtype = query.scalar_type();
  if (cu_q.has_value()) {
    p.batch = cu_q->size(0) - 1;
    p.heads = query.size(1);
    p.kv_heads = key.size(1);
    p.query_len = args.max_seqlen_q;
    p.key_len = args.max_seqlen_k;
    p.head_dim = query.size(2);
    p.value_dim = value.size(2);
    p.cu_seqlens_q = cu_q->const_data_ptr<int32_t>();
    p.cu_seqlens_k = cu_k->const_data_ptr<int32_t>();
  } else {
    p.batch = query.size(0);
    p.heads = query.size(1);
    p.kv_heads = key.size(1);
    p.query_len = query.size(2);
    p.key_len = key.size(2);
    p.head_dim = query.size(3);
    p.value_dim = value.size(3);
  }
  p.query = rows_of(query, cu_q);
  p.key = rows_of(key, cu_k);
  p.value = rows_of(value, cu_k);
  p.output = rows_of(outputs.output, cu_q);
  p.softmax_stats = rows_of(outputs.softmax_stats, cu_q);
  p.weights = (args.need_weights && outputs.weights.defined()) ? outputs.weights.mutable_data_ptr()
                                                               : nullptr;
  p.average_weights = args.average_weights;

  p.scale = resolve_scale(args.scale, p.head_dim);
  p.softcap = args.softcap;
  p.attn_mask = make_mask_view(args.attn_mask, /*is_key_padding_mask=*/false);
  p.key_padding_mask = make_mask_view(args.key_padding_mask, /*is_key_padding_mask=*/true);
  p.visibility.is_causal = args.is_causal;
  p.visibility.window_left = clamp_window(args.window_left, p.query_len, p.key_len);
  p.visibility.window_right = clamp_window(args.window_right, p.query_len, p.key_len);
  if (args.alibi_slopes.has_value()) {
    const at::Tensor slopes = args.alibi_slopes->contiguous();
    keep_alive.push_back(slopes);
    p.alibi_slopes = slopes.const_data_ptr<float>();
    p.alibi_batch_stride = slopes.dim() == 2 ? p.heads : 0;
  }
  if (args.sinks.has_value()) {
    const at::Tensor sinks =
        args.sinks->detach().to(accumulate_type(query.scalar_type())).contiguous();
    keep_alive.push_back(sinks);
    p.sinks = sinks.const_data_ptr();
  }
  p.dropout_p = args.dropout_p;
  if (args.dropout_p > 0.0) {
    const at::Tensor seed = args.dropout_seed->contiguous();
    keep_alive.push_back(seed);
    p.dropout_seed = seed.const_data_ptr<int64_t>();
  }
  return p;
}

at::Tensor allocate_delta(const AttentionBackwardArgs& args) {
  const at::Tensor& query = args.forward.query;
  const at::TensorOptions options = query.options().dtype(accumulate_type(query.scalar_type()));
  if (args.forward.is_varlen()) {
    return at::empty({query.size(0), query.size(1)}, options);
  }
  return at::empty({query.size(0), query.size(1), query.size(2)}, options);
}

AttentionBackwardParams make_backward_params(const AttentionBackwardArgs& args,
                                             const AttentionBackwardOutputs& outputs,
                                             const at::Tensor& delta,
                                             std::vector<at::Tensor>& keep_alive) {
  const AttentionForwardArgs& forward = args.forward;
  AttentionForwardOutputs forward_outputs;
  forward_outputs.output = args.output;
  forward_outputs.softmax_stats = args.softmax_stats.contiguous();
  keep_alive.push_back(forward_outputs.softmax_stats);
  AttentionBackwardParams p;
  static_cast<AttentionParams&>(p) = make_forward_params(forward, forward_outputs, keep_alive);
  const SequenceOffsets offsets = sequence_offsets(forward, keep_alive);
  const std::optional<at::Tensor>& cu_q = offsets.query;
  p.grad_output = rows_of(args.grad_output, cu_q);
  p.grad_query = rows_of(outputs.grad_query, cu_q);
  p.grad_key = rows_of(outputs.grad_key, offsets.key);
  p.grad_value = rows_of(outputs.grad_value, offsets.key);
  if (cu_q.has_value()) {
    p.delta = {delta.mutable_data_ptr(), 0, delta.stride(1), delta.stride(0),
               cu_q->const_data_ptr<int32_t>()};
  } else {
    p.delta = {delta.mutable_data_ptr(), delta.stride(0), delta.stride(1), delta.stride(2),
               nullptr};
  }
  if (args.grad_weights.has_value()) {
    const at::Tensor& g = *args.grad_weights;
    p.grad_weights.data = g.const_data_ptr();
    const std::vector<int64_t> strides =
        forward.average_weights ? std::vector<int64_t>{g.stride(0), 0, g.stride(1), g.stride(2)}
                                : g.strides().vec();
    std::copy(strides.begin(), strides.end(), p.grad_weights.strides);
    p.grad_weights_scale = forward.average_weights ? 1.0 / static_cast<double>(p.heads) : 1.0;
  }
  p.grad_mask = args.compute_mask_grad ? outputs.grad_mask.mutable_data_ptr() : nullptr;
  return p;
}

void compute_sink_gradient(const AttentionBackwardArgs& args, const at::Tensor& delta,
                           at::Tensor& grad_sinks) {
  if (!args.forward.sinks.has_value()) {
    return;
  }
  const at::Tensor& stats = args.softmax_stats;
  const bool varlen = args.forward.is_varlen();
  // Rows as (..., heads) for varlen (total_q, heads, 2), (batch, heads, L) for dense.
  const at::Tensor offset = stats.select(-1, 0);
  const at::Tensor log_sum = stats.select(-1, 1);
  const at::Tensor sinks = args.forward.sinks->to(stats.scalar_type());
  const at::Tensor sinks_by_row = varlen ? sinks.view({1, -1}) : sinks.view({1, -1, 1});
  const at::Tensor p_sink = at::exp((sinks_by_row - offset) - log_sum);
  const std::vector<int64_t> row_dims =
      varlen ? std::vector<int64_t>{0} : std::vector<int64_t>{0, 2};
  grad_sinks.copy_(at::neg(at::sum(p_sink * delta, row_dims)));
}

AttentionForwardArgs detail::varlen_forward_args(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, std::optional<double> scale, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed, bool is_causal, int64_t window_left,
    int64_t window_right, const std::optional<at::Tensor>& alibi_slopes, double softcap,
    const std::optional<at::Tensor>& sinks) {
  AttentionForwardArgs args;
  args.query = query;
  args.key = key;
  args.value = value;
  args.cu_seqlens_q = cu_seqlens_q;
  args.cu_seqlens_k = cu_seqlens_k;
  args.max_seqlen_q = max_seqlen_q;
  args.max_seqlen_k = max_seqlen_k;
  args.scale = scale;
  args.dropout_p = dropout_p;
  args.dropout_seed = present(dropout_seed);
  args.is_causal = is_causal;
  args.window_left = window_left;
  args.window_right = window_right;
  args.alibi_slopes = present(alibi_slopes);
  args.softcap = softcap;
  args.sinks = present(sinks);
  return args;
}

}  // namespace torch_mha
