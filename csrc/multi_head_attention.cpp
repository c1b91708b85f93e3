// The full multi-head attention layer as one op: input projections, head split, masks, the fused
// attention core, head merge and output projection. Registered as CompositeImplicitAutograd, so
// it is a single node in TorchScript, autograd comes from the ops it calls (at::linear and the
// core op's C++ autograd), and torch.compile/export see through it.
//
// Semantics follow torch.nn.functional.multi_head_attention_forward (see
// docs/semantics.md), with three deliberate differences: masks are never merged into an
// (N*H, L, S) tensor, heads are split and merged with views instead of copies, and a query row
// whose keys are all masked gives zeros instead of NaN.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>

#include "torch_mha.h"

namespace torch_mha {
namespace {

constexpr const char* kOp = "torch_mha.multi_head_attention";

bool present(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined();
}

void check_same_dtype_and_device(const char* name, const std::optional<at::Tensor>& t,
                                 const at::Tensor& query) {
  if (!present(t)) {
    return;
  }
  TORCH_CHECK(t->scalar_type() == query.scalar_type(), kOp, ": expected ", name,
              " to have the same dtype as query (", query.scalar_type(), "), but got ",
              t->scalar_type());
  TORCH_CHECK(t->device() == query.device(), kOp, ": expected ", name,
              " on the same device as query (", query.device(), "), but got ", t->device());
}

void check_shape(const char* name, const std::optional<at::Tensor>& t,
                 c10::SymIntArrayRef expected) {
  if (!present(t)) {
    return;
  }
  TORCH_CHECK(t->sym_sizes() == expected, kOp, ": expected ", name, " of shape ", expected,
              ", but got ", t->sym_sizes());
}

void check_mask_dtype_and_device(const char* name, const std::optional<at::Tensor>& mask,
                                 const at::Tensor& query) {
  if (!present(mask)) {
    return;
  }
  TORCH_CHECK(mask->scalar_type() == at::kBool || at::isFloatingType(mask->scalar_type()), kOp,
              ": only bool and floating types of ", name, " are supported, but got ",
              mask->scalar_type());
  TORCH_CHECK(mask->device() == query.device(), kOp, ": expected ", name,
              " on the same device as query (", query.device(), "), but got ", mask->device());
}

// Appends one never-masked key column, for add_bias_kv and add_zero_attn.
std::optional<at::Tensor> pad_mask(const std::optional<at::Tensor>& mask) {
  if (!present(mask)) {
    return mask;
  }
  return at::constant_pad_nd(*mask, {0, 1}, 0);
}

std::tuple<at::Tensor, at::Tensor> multi_head_attention_composite(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, int64_t embed_dim,
    int64_t num_heads, const std::optional<at::Tensor>& in_proj_weight,
    const std::optional<at::Tensor>& in_proj_bias, const std::optional<at::Tensor>& bias_k,
    const std::optional<at::Tensor>& bias_v, bool add_zero_attn, double dropout_p,
    const at::Tensor& out_proj_weight, const std::optional<at::Tensor>& out_proj_bias,
    bool training, const std::optional<at::Tensor>& key_padding_mask_in, bool need_weights,
    const std::optional<at::Tensor>& attn_mask_in, const std::optional<at::Tensor>& q_proj_weight,
    const std::optional<at::Tensor>& k_proj_weight, const std::optional<at::Tensor>& v_proj_weight,
    const std::optional<at::Tensor>& static_k, const std::optional<at::Tensor>& static_v,
    bool average_attn_weights, bool is_causal, bool batch_first) {
  // ---- Shapes of the inputs, as torch.nn.MultiheadAttention accepts them.
  TORCH_CHECK(query.dim() == 3 || query.dim() == 2, kOp,
              ": query should be unbatched 2D or batched 3D tensor but received ", query.dim(),
              "-D query tensor");
  const bool is_batched = query.dim() == 3;
  TORCH_CHECK(key.dim() == query.dim() && value.dim() == query.dim(), kOp, ": for ",
              is_batched ? "batched (3-D)" : "unbatched (2-D)",
              " query, expected key and value to be ", query.dim(), "-D, but found ", key.dim(),
              "-D and ", value.dim(), "-D tensors");
  if (present(key_padding_mask_in)) {
    TORCH_CHECK(key_padding_mask_in->dim() == query.dim() - 1, kOp, ": for ",
                is_batched ? "batched (3-D)" : "unbatched (2-D)",
                " query, expected key_padding_mask to be None or ", query.dim() - 1,
                "-D, but found ", key_padding_mask_in->dim(), "-D tensor");
  }
  if (present(attn_mask_in)) {
    TORCH_CHECK(attn_mask_in->dim() == 2 || attn_mask_in->dim() == 3, kOp,
                ": expected attn_mask to be None, 2-D or 3-D, but found ", attn_mask_in->dim(),
                "-D tensor");
  }
  TORCH_CHECK(embed_dim > 0 && num_heads > 0, kOp,
              ": embed_dim and num_heads must be greater than 0, got embed_dim=", embed_dim,
              " and num_heads=", num_heads);
  TORCH_CHECK(embed_dim % num_heads == 0, kOp, ": embed_dim (", embed_dim,
              ") must be divisible by num_heads (", num_heads, ")");
  TORCH_CHECK(query.sym_size(-1) == embed_dim, kOp, ": was expecting embedding dimension of ",
              embed_dim, ", but got ", query.sym_size(-1));
  TORCH_CHECK(at::isFloatingType(query.scalar_type()), kOp,
              ": expected a floating point query, but got ", query.scalar_type());
  check_same_dtype_and_device("key", key, query);
  check_same_dtype_and_device("value", value, query);
  check_same_dtype_and_device("in_proj_weight", in_proj_weight, query);
  check_same_dtype_and_device("in_proj_bias", in_proj_bias, query);
  check_same_dtype_and_device("q_proj_weight", q_proj_weight, query);
  check_same_dtype_and_device("k_proj_weight", k_proj_weight, query);
  check_same_dtype_and_device("v_proj_weight", v_proj_weight, query);
  check_same_dtype_and_device("bias_k", bias_k, query);
  check_same_dtype_and_device("bias_v", bias_v, query);
  check_same_dtype_and_device("out_proj_weight", out_proj_weight, query);
  check_same_dtype_and_device("out_proj_bias", out_proj_bias, query);
  check_same_dtype_and_device("static_k", static_k, query);
  check_same_dtype_and_device("static_v", static_v, query);
  // is_causal with neither a key padding mask nor weights: like
  // torch.nn.functional.multi_head_attention_forward, attn_mask (required) is replaced by the
  // causal rule below and not checked further.
  const bool mask_replaced_by_causal = is_causal && !present(key_padding_mask_in) && !need_weights;
  check_mask_dtype_and_device("key_padding_mask", key_padding_mask_in, query);
  if (!mask_replaced_by_causal) {
    check_mask_dtype_and_device("attn_mask", attn_mask_in, query);
  }
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, kOp,
                    ": dropout probability must be in [0, 1), but got ", dropout_p);

  // Self-attention is recognised by identity, as nn.MultiheadAttention does: it selects one
  // fused projection GEMM. Checked on the caller's tensors, before any reshaping.
  const bool qkv_same = query.is_same(key) && key.is_same(value);
  const bool kv_same = key.is_same(value);

  // Unbatched inputs become a batch of one in (seq, batch, embed) order; batch_first is ignored
  // for them, as in torch.nn.MultiheadAttention.
  const bool batch_major = is_batched && batch_first;
  const int64_t seq_dim = batch_major ? 1 : 0;
  const int64_t batch_dim = batch_major ? 0 : 1;
  const at::Tensor q_in = is_batched ? query : query.unsqueeze(1);
  const at::Tensor k_in = is_batched ? key : key.unsqueeze(1);
  const at::Tensor v_in = is_batched ? value : value.unsqueeze(1);
  std::optional<at::Tensor> key_padding_mask = key_padding_mask_in;
  if (present(key_padding_mask) && !is_batched) {
    key_padding_mask = key_padding_mask->unsqueeze(0);
  }
  std::optional<at::Tensor> attn_mask = attn_mask_in;

  // Symbolic sizes throughout, so torch.compile(dynamic=True) and torch.export keep lengths and
  // batch dynamic instead of specialising the graph to the first call.
  const c10::SymInt batch = q_in.sym_size(batch_dim);
  const c10::SymInt query_len = q_in.sym_size(seq_dim);
  const c10::SymInt key_len = k_in.sym_size(seq_dim);
  const int64_t head_dim = embed_dim / num_heads;
  TORCH_CHECK(k_in.sym_size(batch_dim) == batch && v_in.sym_size(batch_dim) == batch, kOp,
              ": expected query, key and value to have the same batch size, but got query ",
              query.sym_sizes(), ", key ", key.sym_sizes(), ", value ", value.sym_sizes(),
              batch_first ? " (batch_first=True)" : " (batch_first=False)");
  TORCH_CHECK(v_in.sym_size(seq_dim) == key_len, kOp,
              ": expected key and value to have the same sequence length, but got key ",
              key.sym_sizes(), " and value ", value.sym_sizes());

  const bool packed = present(in_proj_weight);
  if (packed) {
    TORCH_CHECK(key.sym_sizes() == value.sym_sizes(), kOp, ": key shape ", key.sym_sizes(),
                " does not match value shape ", value.sym_sizes());
    TORCH_CHECK(key.sym_size(-1) == embed_dim, kOp,
                ": with a packed in_proj_weight, key and value must have embedding dimension ",
                embed_dim, ", but got ", key.sym_size(-1));
    check_shape("in_proj_weight", in_proj_weight, {c10::SymInt(3 * embed_dim), embed_dim});
  } else {
    TORCH_CHECK(present(q_proj_weight) && present(k_proj_weight) && present(v_proj_weight), kOp,
                ": without in_proj_weight, q_proj_weight, k_proj_weight and v_proj_weight must "
                "all be given");
    check_shape("q_proj_weight", q_proj_weight, {embed_dim, embed_dim});
    check_shape("k_proj_weight", k_proj_weight, {embed_dim, key.sym_size(-1)});
    check_shape("v_proj_weight", v_proj_weight, {embed_dim, value.sym_size(-1)});
  }
  check_shape("in_proj_bias", in_proj_bias, {c10::SymInt(3 * embed_dim)});
  check_shape("out_proj_weight", out_proj_weight, {embed_dim, embed_dim});
  check_shape("out_proj_bias", out_proj_bias, {c10::SymInt(embed_dim)});
  if (present(bias_k) && present(bias_v)) {
    TORCH_CHECK(!present(static_k), kOp, ": bias cannot be added to static key.");
    TORCH_CHECK(!present(static_v), kOp, ": bias cannot be added to static value.");
  }
  TORCH_CHECK(present(bias_v) || !present(bias_k), kOp, ": bias_k is set but bias_v is None");
  TORCH_CHECK(present(bias_k) || !present(bias_v), kOp, ": bias_v is set but bias_k is None");
  check_shape("bias_k", bias_k, {1, 1, embed_dim});
  check_shape("bias_v", bias_v, {1, 1, embed_dim});

  if (present(attn_mask) && !mask_replaced_by_causal) {
    if (attn_mask->dim() == 2) {
      TORCH_CHECK(attn_mask->sym_size(0) == query_len && attn_mask->sym_size(1) == key_len,
                  "The shape of the 2D attn_mask is ", attn_mask->sym_sizes(), ", but should be (",
                  query_len, ", ", key_len, ").");
    } else {
      TORCH_CHECK(attn_mask->sym_size(0) == batch * num_heads &&
                      attn_mask->sym_size(1) == query_len && attn_mask->sym_size(2) == key_len,
                  "The shape of the 3D attn_mask is ", attn_mask->sym_sizes(), ", but should be (",
                  batch * num_heads, ", ", query_len, ", ", key_len, ").");
    }
  }
  // is_causal is a hint that attn_mask is the causal mask. Like nn.MultiheadAttention, the mask
  // is required, and it is replaced by the kernel's own causal rule exactly where torch would
  // hand is_causal to scaled_dot_product_attention: no key padding mask and no weights.
  bool causal = false;
  if (is_causal) {
    TORCH_CHECK(present(attn_mask),
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                "module method `generate_square_subsequent_mask` to create this mask.");
    if (mask_replaced_by_causal) {
      attn_mask.reset();
      causal = true;
    }
  }

  // ---- Input projections. Queries, keys and values stay as views into the projection output.
  // Slices are taken with split, whose backward is one concatenation; narrow would make
  // autograd zero-fill a full-size gradient per slice.
  at::Tensor q, k, v;
  auto bias_slices = [&](std::vector<int64_t> sizes) {
    std::vector<std::optional<at::Tensor>> slices(sizes.size());
    if (present(in_proj_bias)) {
      const std::vector<at::Tensor> parts = in_proj_bias->split_with_sizes(sizes);
      std::copy(parts.begin(), parts.end(), slices.begin());
    }
    return slices;
  };
  if (packed) {
    const at::Tensor& w = *in_proj_weight;
    if (qkv_same) {
      const std::vector<at::Tensor> qkv =
          at::linear(q_in, w, in_proj_bias).split(embed_dim, /*dim=*/-1);
      q = qkv[0];
      k = qkv[1];
      v = qkv[2];
    } else if (kv_same) {
      const std::vector<at::Tensor> w_parts = w.split_with_sizes({embed_dim, 2 * embed_dim});
      const auto b_parts = bias_slices({embed_dim, 2 * embed_dim});
      q = at::linear(q_in, w_parts[0], b_parts[0]);
      const std::vector<at::Tensor> kv =
          at::linear(k_in, w_parts[1], b_parts[1]).split(embed_dim, /*dim=*/-1);
      k = kv[0];
      v = kv[1];
    } else {
      const std::vector<at::Tensor> w_parts = w.split(embed_dim);
      const auto b_parts = bias_slices({embed_dim, embed_dim, embed_dim});
      q = at::linear(q_in, w_parts[0], b_parts[0]);
      k = at::linear(k_in, w_parts[1], b_parts[1]);
      v = at::linear(v_in, w_parts[2], b_parts[2]);
    }
  } else {
    const auto b_parts = bias_slices({embed_dim, embed_dim, embed_dim});
    q = at::linear(q_in, *q_proj_weight, b_parts[0]);
    k = at::linear(k_in, *k_proj_weight, b_parts[1]);
    v = at::linear(v_in, *v_proj_weight, b_parts[2]);
  }

  // ---- Learned key/value biases: one extra position at the end of the sequence.
  if (present(bias_k)) {
    const std::vector<c10::SymInt> bias_shape = batch_major
                                                    ? std::vector<c10::SymInt>{batch, 1, embed_dim}
                                                    : std::vector<c10::SymInt>{1, batch, embed_dim};
    k = at::cat({k, bias_k->expand_symint(bias_shape)}, seq_dim);
    v = at::cat({v, bias_v->expand_symint(bias_shape)}, seq_dim);
    attn_mask = pad_mask(attn_mask);
    key_padding_mask = pad_mask(key_padding_mask);
  }

  // ---- Head split, as views: (seq, batch, E) or (batch, seq, E) -> (batch, heads, seq, D).
  auto split_heads = [&](const at::Tensor& x) {
    const at::Tensor per_head = x.unflatten_symint(-1, {num_heads, head_dim});
    return batch_major ? per_head.permute({0, 2, 1, 3}) : per_head.permute({1, 2, 0, 3});
  };
  auto static_heads = [&](const char* name, const at::Tensor& s) {
    TORCH_CHECK(s.dim() == 3 && s.sym_size(0) == batch * num_heads && s.sym_size(2) == head_dim,
                kOp, ": expected ", name, " of shape (", batch * num_heads, ", seq_len, ", head_dim,
                "), but got ", s.sym_sizes());
    return s.view_symint({batch, num_heads, s.sym_size(1), head_dim});
  };
  const at::Tensor q_heads = split_heads(q);
  at::Tensor k_heads = present(static_k) ? static_heads("static_k", *static_k) : split_heads(k);
  at::Tensor v_heads = present(static_v) ? static_heads("static_v", *static_v) : split_heads(v);
  TORCH_CHECK(k_heads.sym_size(2) == v_heads.sym_size(2), kOp,
              ": keys and values have different lengths after static_k/static_v: ",
              k_heads.sym_size(2), " and ", v_heads.sym_size(2));

  // ---- A zero key/value position, appended after the head split.
  if (add_zero_attn) {
    const std::vector<c10::SymInt> zero_shape = {batch, num_heads, 1, head_dim};
    k_heads = at::cat({k_heads, at::zeros_symint(zero_shape, k_heads.options())}, 2);
    v_heads = at::cat({v_heads, at::zeros_symint(zero_shape, v_heads.options())}, 2);
    attn_mask = pad_mask(attn_mask);
    key_padding_mask = pad_mask(key_padding_mask);
  }
  const c10::SymInt total_key_len = k_heads.sym_size(2);
  if (present(key_padding_mask)) {
    // Checked after the padding above, against the keys the kernel will see.
    TORCH_CHECK(
        key_padding_mask->sym_size(0) == batch && key_padding_mask->sym_size(1) == total_key_len,
        kOp, ": expected key_padding_mask of shape (batch, key_len) = (", batch, ", ",
        total_key_len, "), but got ", key_padding_mask->sym_sizes());
  }

  // ---- Masks go to the kernel unmerged: 2-D (L, S) broadcasts, 3-D (N*H, L, S) is
  // batch-major, row n*H + h.
  if (present(attn_mask) && attn_mask->dim() == 3) {
    attn_mask = attn_mask->reshape_symint({batch, num_heads, query_len, attn_mask->sym_size(-1)});
  }

  // ---- Dropout on the attention probabilities, only in training. The seed comes from the
  // default generator, so torch.manual_seed reproduces a run.
  const double p = training ? dropout_p : 0.0;
  std::optional<at::Tensor> seed;
  if (p > 0.0) {
    seed =
        at::randint(std::numeric_limits<int64_t>::max(), {1}, q_heads.options().dtype(at::kLong));
  }

  // Head-averaged weights are averaged inside the kernel: (N, L, S) is all that is allocated.
  auto [attn, softmax_stats, weights] =
      attention_forward(q_heads, k_heads, v_heads, attn_mask, key_padding_mask, causal,
                        std::nullopt, p, seed, need_weights, average_attn_weights);
  (void)softmax_stats;

  // ---- Head merge (a view: the kernel wrote the output in the query's layout) and output
  // projection.
  const at::Tensor merged =
      (batch_major ? attn.permute({0, 2, 1, 3}) : attn.permute({2, 0, 1, 3})).flatten(2);
  at::Tensor output = at::linear(merged, out_proj_weight, out_proj_bias);
  if (!is_batched) {
    output = output.squeeze(1);
  }

  if (!need_weights) {
    return {output, at::empty({0}, output.options())};
  }
  if (!is_batched) {
    weights = weights.squeeze(0);
  }
  return {output, weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_mha, CompositeImplicitAutograd, m) {
  m.impl("multi_head_attention", &multi_head_attention_composite);
}

}  // namespace torch_mha
