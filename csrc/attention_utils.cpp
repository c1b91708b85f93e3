#include "attention_utils.h"

#include <ATen/ATen.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <array>
#include <cmath>

namespace torch_mha {
namespace {

constexpr const char* kForwardOp = "torch_mha.attention_forward";

bool is_supported_input_type(at::ScalarType type) {
  return type == at::kDouble || type == at::kFloat || type == at::kBFloat16 || type == at::kHalf;
}

void check_qkv(const char* op, const at::Tensor& query, const at::Tensor& key,
               const at::Tensor& value) {
  TORCH_CHECK(query.defined() && key.defined() && value.defined(), op,
              ": query, key and value must be defined tensors");
  TORCH_CHECK(query.dim() == 4, op,
              ": expected query of shape (batch, heads, query_len, head_dim), but got a ",
              query.dim(), "-D tensor of shape ", query.sym_sizes());
  TORCH_CHECK(key.dim() == 4, op,
              ": expected key of shape (batch, heads, key_len, head_dim), but got a ", key.dim(),
              "-D tensor of shape ", key.sym_sizes());
  TORCH_CHECK(value.dim() == 4, op,
              ": expected value of shape (batch, heads, key_len, value_dim), but got a ",
              value.dim(), "-D tensor of shape ", value.sym_sizes());
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
  TORCH_CHECK(key.sym_size(0) == query.sym_size(0) && value.sym_size(0) == query.sym_size(0), op,
              ": expected the same batch size (dim 0) for query, key and value, but got query ",
              query.sym_sizes(), ", key ", key.sym_sizes(), ", value ", value.sym_sizes());
  TORCH_CHECK(key.sym_size(1) == query.sym_size(1) && value.sym_size(1) == query.sym_size(1), op,
              ": expected the same number of heads (dim 1) for query, key and value, but got "
              "query ",
              query.sym_sizes(), ", key ", key.sym_sizes(), ", value ", value.sym_sizes());
  TORCH_CHECK(key.sym_size(2) == value.sym_size(2), op,
              ": expected key and value to have the same length (dim 2), but got key ",
              key.sym_sizes(), " and value ", value.sym_sizes());
  TORCH_CHECK(key.sym_size(3) == query.sym_size(3), op,
              ": expected query and key to have the same head_dim (dim 3), but got query ",
              query.sym_sizes(), " and key ", key.sym_sizes());
}

void check_mask(const char* op, const char* name, const std::optional<at::Tensor>& mask,
                const at::Tensor& query, bool is_key_padding_mask, const AttentionSizes& sizes) {
  if (!mask.has_value() || !mask->defined()) {
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
    TORCH_CHECK(m.dim() == 2 && m.sym_size(0) == sizes.batch && m.sym_size(1) == sizes.key_len, op,
                ": expected ", name, " of shape (batch, key_len) = (", sizes.batch, ", ",
                sizes.key_len, "), but got shape ", m.sym_sizes());
    return;
  }
  const std::array<c10::SymInt, 4> target = {sizes.batch, sizes.heads, sizes.query_len,
                                             sizes.key_len};
  bool broadcastable = m.dim() <= 4;
  for (int64_t d = 0; broadcastable && d < m.dim(); ++d) {
    const c10::SymInt& size = m.sym_size(d);
    const c10::SymInt& want = target[4 - m.dim() + d];
    broadcastable = size == 1 || size == want;
  }
  TORCH_CHECK(broadcastable, op, ": expected ", name,
              " broadcastable to (batch, heads, query_len, key_len) = (", sizes.batch, ", ",
              sizes.heads, ", ", sizes.query_len, ", ", sizes.key_len, "), but got shape ",
              m.sym_sizes());
}

void check_dropout(const char* op, const at::Tensor& query, double dropout_p,
                   const std::optional<at::Tensor>& dropout_seed) {
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, op,
                    ": dropout_p must be in [0, 1), but got ", dropout_p);
  if (dropout_p == 0.0) {
    return;
  }
  TORCH_CHECK(dropout_seed.has_value() && dropout_seed->defined(), op,
              ": dropout_p > 0 needs a dropout_seed tensor (one int64 element)");
  const at::Tensor& seed = *dropout_seed;
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.sym_numel() == 1, op,
              ": expected dropout_seed to be an int64 tensor with one element, but got dtype ",
              seed.scalar_type(), " and shape ", seed.sym_sizes());
  TORCH_CHECK(seed.device() == query.device(), op, ": expected dropout_seed on ", query.device(),
              ", but got ", seed.device());
}

AttentionSizes sizes_of(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value) {
  return {query.sym_size(0), query.sym_size(1), query.sym_size(2),
          key.sym_size(2),   query.sym_size(3), value.sym_size(3)};
}

void check_same_shape(const char* op, const char* name, const at::Tensor& tensor,
                      c10::SymIntArrayRef expected, const at::Tensor& query) {
  TORCH_CHECK(tensor.defined(), op, ": ", name, " must be defined");
  TORCH_CHECK(tensor.sym_sizes() == expected, op, ": expected ", name, " of shape ", expected,
              ", but got ", tensor.sym_sizes());
  TORCH_CHECK(tensor.device() == query.device(), op, ": expected ", name, " on ", query.device(),
              ", but got ", tensor.device());
}

}  // namespace

AttentionSizes check_attention_forward_args(const at::Tensor& query, const at::Tensor& key,
                                            const at::Tensor& value,
                                            const std::optional<at::Tensor>& attn_mask,
                                            const std::optional<at::Tensor>& key_padding_mask,
                                            double dropout_p,
                                            const std::optional<at::Tensor>& dropout_seed) {
  check_qkv(kForwardOp, query, key, value);
  const AttentionSizes sizes = sizes_of(query, key, value);
  check_mask(kForwardOp, "attn_mask", attn_mask, query, /*is_key_padding_mask=*/false, sizes);
  check_mask(kForwardOp, "key_padding_mask", key_padding_mask, query,
             /*is_key_padding_mask=*/true, sizes);
  check_dropout(kForwardOp, query, dropout_p, dropout_seed);
  return sizes;
}

AttentionSizes check_attention_backward_args(
    const at::Tensor& grad_output, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& output, const at::Tensor& softmax_stats,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    double dropout_p, const std::optional<at::Tensor>& dropout_seed,
    const std::optional<at::Tensor>& grad_weights, bool average_weights) {
  constexpr const char* op = "torch_mha.attention_backward";
  check_qkv(op, query, key, value);
  const AttentionSizes sizes = sizes_of(query, key, value);
  check_mask(op, "attn_mask", attn_mask, query, /*is_key_padding_mask=*/false, sizes);
  check_mask(op, "key_padding_mask", key_padding_mask, query, /*is_key_padding_mask=*/true, sizes);
  check_dropout(op, query, dropout_p, dropout_seed);

  const std::vector<c10::SymInt> out_shape = {sizes.batch, sizes.heads, sizes.query_len,
                                              sizes.value_dim};
  check_same_shape(op, "grad_output", grad_output, out_shape, query);
  check_same_shape(op, "output", output, out_shape, query);
  TORCH_CHECK(grad_output.scalar_type() == query.scalar_type() &&
                  output.scalar_type() == query.scalar_type(),
              op, ": expected grad_output and output of dtype ", query.scalar_type(), ", but got ",
              grad_output.scalar_type(), " and ", output.scalar_type());
  check_same_shape(op, "softmax_stats", softmax_stats,
                   {sizes.batch, sizes.heads, sizes.query_len, 2}, query);
  TORCH_CHECK(softmax_stats.scalar_type() == accumulate_type(query.scalar_type()), op,
              ": expected softmax_stats of dtype ", accumulate_type(query.scalar_type()),
              ", but got ", softmax_stats.scalar_type());

  if (grad_weights.has_value() && grad_weights->defined()) {
    const std::vector<c10::SymInt> weights_shape =
        average_weights
            ? std::vector<c10::SymInt>{sizes.batch, sizes.query_len, sizes.key_len}
            : std::vector<c10::SymInt>{sizes.batch, sizes.heads, sizes.query_len, sizes.key_len};
    check_same_shape(op, "grad_weights", *grad_weights, weights_shape, query);
    TORCH_CHECK(grad_weights->scalar_type() == query.scalar_type(), op,
                ": expected grad_weights of dtype ", query.scalar_type(), ", but got ",
                grad_weights->scalar_type());
  }
  return sizes;
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
  TORCH_INTERNAL_ASSERT(like.dim() == 4 && sizes.size() == 4);
  const c10::SymIntArrayRef like_strides = like.sym_strides();
  std::array<int64_t, 3> outer_to_inner = {0, 1, 2};
  std::stable_sort(outer_to_inner.begin(), outer_to_inner.end(),
                   [&](int64_t a, int64_t b) { return like_strides[a] > like_strides[b]; });
  std::vector<c10::SymInt> strides(4);
  strides[3] = 1;
  c10::SymInt extent = sizes[3];
  for (int64_t i = 2; i >= 0; --i) {
    const int64_t d = outer_to_inner[i];
    strides[d] = extent;
    extent = extent * sizes[d];
  }
  return at::empty_strided_symint(sizes, strides, options);
}

AttentionForwardOutputs allocate_forward_outputs(const at::Tensor& query,
                                                 const AttentionSizes& sizes, bool need_weights,
                                                 bool average_weights) {
  AttentionForwardOutputs outputs;
  outputs.output = empty_with_layout_of(
      query, {sizes.batch, sizes.heads, sizes.query_len, sizes.value_dim}, query.options());
  outputs.softmax_stats =
      at::empty_symint({sizes.batch, sizes.heads, sizes.query_len, 2},
                       query.options().dtype(accumulate_type(query.scalar_type())));
  if (need_weights && average_weights) {
    outputs.weights =
        at::empty_symint({sizes.batch, sizes.query_len, sizes.key_len}, query.options());
  } else if (need_weights) {
    outputs.weights = at::empty_symint({sizes.batch, sizes.heads, sizes.query_len, sizes.key_len},
                                       query.options());
  } else {
    outputs.weights = at::empty({0}, query.options());
  }
  return outputs;
}

AttentionBackwardOutputs allocate_backward_outputs(const at::Tensor& query, const at::Tensor& key,
                                                   const at::Tensor& value,
                                                   const AttentionSizes& sizes,
                                                   bool compute_mask_grad) {
  AttentionBackwardOutputs outputs;
  outputs.grad_query = empty_with_layout_of(query, query.sym_sizes(), query.options());
  outputs.grad_key = empty_with_layout_of(key, key.sym_sizes(), key.options());
  outputs.grad_value = empty_with_layout_of(value, value.sym_sizes(), value.options());
  const at::TensorOptions mask_options =
      query.options().dtype(accumulate_type(query.scalar_type()));
  if (compute_mask_grad) {
    outputs.grad_mask =
        at::zeros_symint({sizes.batch, sizes.heads, sizes.query_len, sizes.key_len}, mask_options);
  } else {
    outputs.grad_mask = at::empty({0}, mask_options);
  }
  return outputs;
}

MaskView make_mask_view(const std::optional<at::Tensor>& mask, bool is_key_padding_mask) {
  MaskView view;
  if (!mask.has_value() || !mask->defined()) {
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

uint64_t read_dropout_seed(const std::optional<at::Tensor>& dropout_seed) {
  if (!dropout_seed.has_value() || !dropout_seed->defined()) {
    return 0;
  }
  return static_cast<uint64_t>(dropout_seed->to(at::kCPU).item<int64_t>());
}

}  // namespace torch_mha
