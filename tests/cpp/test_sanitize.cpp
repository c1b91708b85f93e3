// The CPU kernels forward and backward on odd sizes, every mask kind and layout, causal,
// dropout, attention weights and their gradients, float mask gradients, empty dimensions and
// nested parallel regions, each result checked against plain ATen attention in float64.
//
// scripts/sanitize.sh builds this program and libtorch_mha with AddressSanitizer and
// UndefinedBehaviorSanitizer, so an out-of-bounds access, a use after free or undefined
// behaviour in the kernels stops it with a report; the comparisons make it an ordinary test as
// well (tests/test_cpp.py's build compiles it too). Exit status: the number of failed checks.
//
//   test_sanitize
//
// Dropout is checked for consistency: the keep decisions are read from the per-head weights of
// a float64 run with the same seed (they are a pure function of the seed and the element's
// position), and output, weights and gradients of every dtype must then match the reference
// with that mask; the kept fraction must match 1 - p. The mask's bits are tested against an
// independent Philox in tests/test_ops_dropout.py.
#include <ATen/Parallel.h>
#include <torch/torch.h>
#include <torch_mha.h>

#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "check.h"

namespace {

using torch_mha_test::Checker;
using ViewFn = std::function<at::Tensor(const at::Tensor&)>;

constexpr double kInf = std::numeric_limits<double>::infinity();

// ---------------------------------------------------------------------------------------------
// Tolerances and comparisons

double unit_roundoff(at::ScalarType type) {
  switch (type) {
    case at::kDouble:
      return std::ldexp(1.0, -53);
    case at::kFloat:
      return std::ldexp(1.0, -24);
    case at::kBFloat16:
      return std::ldexp(1.0, -8);
    case at::kHalf:
      return std::ldexp(1.0, -11);
    default:
      return 0.0;
  }
}

// Absolute tolerances as fractions of max(1, max|reference|): float64 and float32 accumulate
// in their own type (float32 with a ~2e-6 exp); bfloat16/float16 compute in float32 and round
// each result once (2u), their gradients also use the rounded output in delta (8u).
struct Tolerances {
  double values;
  double grads;
};

Tolerances tolerances_for(at::ScalarType type) {
  if (type == at::kDouble) {
    return {1e-10, 1e-10};
  }
  if (type == at::kFloat) {
    return {2e-5, 2e-5};
  }
  return {2 * unit_roundoff(type), 8 * unit_roundoff(type)};
}

void check_close(Checker& check, const std::string& what, const at::Tensor& actual,
                 const at::Tensor& expected, double fraction) {
  if (actual.sizes() != expected.sizes() || expected.numel() == 0) {
    check.expect(what + " (shape " + std::to_string(expected.numel()) + " elements)",
                 actual.sizes() == expected.sizes());
    return;
  }
  const double scale = std::max(1.0, expected.detach().abs().max().item<double>());
  check.close(what, actual.detach(), expected.detach(), fraction * scale);
}

at::Tensor defined_or_zeros(const at::Tensor& grad, const at::Tensor& like) {
  return grad.defined() ? grad : at::zeros_like(like);
}

// Gradients of sum(outputs[i] * upstream[i]) with respect to inputs (zeros where unused).
std::vector<at::Tensor> gradients(const std::vector<at::Tensor>& outputs,
                                  const std::vector<at::Tensor>& upstream,
                                  const std::vector<at::Tensor>& inputs) {
  std::vector<at::Tensor> used_outputs, used_upstream;
  for (size_t i = 0; i < outputs.size(); ++i) {
    if (outputs[i].requires_grad()) {
      used_outputs.push_back(outputs[i]);
      used_upstream.push_back(upstream[i]);
    }
  }
  std::vector<at::Tensor> grads(inputs.size());
  if (!used_outputs.empty()) {
    grads = torch::autograd::grad(used_outputs, inputs, used_upstream, /*retain_graph=*/false,
                                  /*create_graph=*/false, /*allow_unused=*/true);
  }
  for (size_t i = 0; i < inputs.size(); ++i) {
    grads[i] = defined_or_zeros(grads[i], inputs[i]);
  }
  return grads;
}

// ---------------------------------------------------------------------------------------------
// The reference: plain ATen attention in float64, nn.MultiheadAttention's mask polarity, and a
// safe softmax (a query whose keys are all masked gets zero probabilities and zero gradients).

at::Tensor additive(const at::Tensor& mask) {
  if (mask.scalar_type() == at::kBool) {
    return at::zeros(mask.sizes(), at::kDouble).masked_fill(mask, -kInf);
  }
  return mask.to(at::kDouble);
}

at::Tensor safe_softmax(const at::Tensor& scores) {
  const at::Tensor fully_masked = at::isneginf(scores).all(-1, /*keepdim=*/true);
  return at::softmax(scores.masked_fill(fully_masked, 0.0), -1).masked_fill(fully_masked, 0.0);
}

struct Attention {
  at::Tensor output;
  at::Tensor probs;  // after dropout, per head (N, H, L, S)
};

// q (N, H, L, E), k (N, H, S, E), v (N, H, S, Ev) in float64; dropout_factors multiplies the
// probabilities (0 or 1/(1-p)).
Attention reference_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const std::optional<at::Tensor>& attn_mask,
                              const std::optional<at::Tensor>& key_padding_mask, bool is_causal,
                              const std::optional<at::Tensor>& dropout_factors) {
  const int64_t e = q.size(-1);
  const double scale = e > 0 ? 1.0 / std::sqrt(static_cast<double>(e)) : 1.0;
  at::Tensor scores = at::matmul(q, k.transpose(-1, -2)) * scale;
  if (attn_mask.has_value()) {
    scores = scores + additive(*attn_mask);
  }
  if (key_padding_mask.has_value()) {
    scores = scores + additive(*key_padding_mask).unsqueeze(1).unsqueeze(1);
  }
  if (is_causal) {
    const at::Tensor hidden = at::ones({scores.size(-2), scores.size(-1)}, at::kBool).triu(1);
    scores = scores.masked_fill(hidden, -kInf);
  }
  at::Tensor probs = safe_softmax(scores);
  if (dropout_factors.has_value()) {
    probs = probs * *dropout_factors;
  }
  return {at::matmul(probs, v), probs};
}

// ---------------------------------------------------------------------------------------------
// Inputs in every layout. A Placed tensor is a leaf (what gradients are taken for) and the view
// of it that is passed to the op; the reference applies the same view to a float64 copy.

struct Placed {
  at::Tensor leaf;
  ViewFn view;
  at::Tensor tested() const { return view(leaf); }
};

Placed with_grad(Placed placed, bool requires_grad) {
  placed.leaf.requires_grad_(requires_grad);
  return placed;
}

// The float64 twin of a placed tensor (bool masks stay bool).
Placed twin64(const Placed& placed) {
  at::Tensor leaf = placed.leaf.detach();
  if (leaf.is_floating_point()) {
    leaf = leaf.to(at::kDouble).requires_grad_(placed.leaf.requires_grad());
  }
  return {leaf, placed.view};
}

enum class Layout {
  kContiguous,     // (N, H, len, dim)
  kSeqMajor,       // stored (len, N, H, dim), as heads read out of a projection
  kStridedLast,    // every other element of the last dimension: the op copies it
  kExpandedHeads,  // stored (N, 1, len, dim), heads read with stride 0
};

const char* layout_name(Layout layout) {
  switch (layout) {
    case Layout::kContiguous:
      return "contiguous";
    case Layout::kSeqMajor:
      return "seq-major";
    case Layout::kStridedLast:
      return "strided-last";
    case Layout::kExpandedHeads:
      return "expanded-heads";
  }
  return "?";
}

Placed make_input(Layout layout, int64_t n, int64_t h, int64_t len, int64_t dim,
                  at::ScalarType dtype) {
  auto randn = [&](at::IntArrayRef sizes) { return at::randn(sizes, at::kDouble).to(dtype); };
  switch (layout) {
    case Layout::kContiguous:
      return {randn({n, h, len, dim}), [](const at::Tensor& t) { return t; }};
    case Layout::kSeqMajor:
      return {randn({len, n, h, dim}), [](const at::Tensor& t) { return t.permute({1, 2, 0, 3}); }};
    case Layout::kStridedLast:
      return {randn({n, h, len, 2 * dim}),
              [dim](const at::Tensor& t) { return t.slice(3, 0, 2 * dim, 2); }};
    case Layout::kExpandedHeads:
      return {randn({n, 1, len, dim}), [n, h, len, dim](const at::Tensor& t) {
                return t.expand({n, h, len, dim});
              }};
  }
  TORCH_CHECK(false, "unknown layout");
}

enum class MaskType { kNone, kBool, kFloat /* the query's dtype */, kFloat32 };

const char* mask_type_name(MaskType type) {
  switch (type) {
    case MaskType::kNone:
      return "none";
    case MaskType::kBool:
      return "bool";
    case MaskType::kFloat:
      return "float";
    case MaskType::kFloat32:
      return "float32";
  }
  return "?";
}

enum class MaskShape {
  kFull,           // (N, H, L, S)
  kTwoD,           // (L, S)
  kHeadBroadcast,  // (H, 1, S): broadcast over batch and queries
  kExpandedKeys,   // (L, 1) expanded to (L, S): stride 0 along the keys
  kTransposed,     // stored (S, L), passed transposed
};

enum class PaddingShape {
  kPlain,       // (N, S)
  kTransposed,  // stored (S, N)
  kExpanded,    // (1, S) expanded to (N, S)
};

// A random mask (about a quarter masked out) of the given type; with fully_masked_row, query 0
// has every key masked out (for kHeadBroadcast: every query of head 0).
Placed make_attn_mask(MaskShape shape, MaskType type, at::ScalarType dtype, int64_t n, int64_t h,
                      int64_t l, int64_t s, bool fully_masked_row) {
  std::vector<int64_t> sizes;
  ViewFn view = [](const at::Tensor& t) { return t; };
  int64_t query_dim = 0;  // the leaf dimension that indexes queries (-1: none)
  switch (shape) {
    case MaskShape::kFull:
      sizes = {n, h, l, s};
      query_dim = 2;
      break;
    case MaskShape::kTwoD:
      sizes = {l, s};
      break;
    case MaskShape::kHeadBroadcast:
      sizes = {h, 1, s};
      query_dim = -1;
      break;
    case MaskShape::kExpandedKeys:
      sizes = {l, 1};
      view = [l, s](const at::Tensor& t) { return t.expand({l, s}); };
      break;
    case MaskShape::kTransposed:
      sizes = {s, l};
      query_dim = 1;
      view = [](const at::Tensor& t) { return t.t(); };
      break;
  }
  at::Tensor masked = at::rand(sizes, at::kDouble) < 0.25;
  if (fully_masked_row) {
    const int64_t dim = query_dim >= 0 ? query_dim : 0;
    if (masked.size(dim) > 0) {
      masked.select(dim, 0).fill_(true);
    }
  }
  if (type == MaskType::kBool) {
    return {masked, view};
  }
  const at::ScalarType mask_dtype = type == MaskType::kFloat32 ? at::kFloat : dtype;
  return {at::randn(sizes, at::kDouble).masked_fill(masked, -kInf).to(mask_dtype), view};
}

Placed make_padding_mask(PaddingShape shape, MaskType type, at::ScalarType dtype, int64_t n,
                         int64_t s) {
  std::vector<int64_t> sizes = {n, s};
  ViewFn view = [](const at::Tensor& t) { return t; };
  if (shape == PaddingShape::kTransposed) {
    sizes = {s, n};
    view = [](const at::Tensor& t) { return t.t(); };
  } else if (shape == PaddingShape::kExpanded) {
    sizes = {1, s};
    view = [n, s](const at::Tensor& t) { return t.expand({n, s}); };
  }
  const at::Tensor masked = at::rand(sizes, at::kDouble) < 0.2;
  if (type == MaskType::kBool) {
    return {masked, view};
  }
  const at::ScalarType mask_dtype = type == MaskType::kFloat32 ? at::kFloat : dtype;
  return {at::randn(sizes, at::kDouble).masked_fill(masked, -kInf).to(mask_dtype), view};
}

// A float mask's gradient is rounded to the mask's dtype before the contributions of its
// stride-0 elements are summed: allow a few roundings of the summed |contributions|.
double mask_gradient_slack(const Placed& mask, const at::Tensor& view_grad) {
  at::Tensor leaf = at::zeros(mask.leaf.sizes(), at::kDouble).requires_grad_(true);
  const at::Tensor collected =
      torch::autograd::grad({mask.view(leaf)}, {leaf}, {view_grad.detach().abs()})[0];
  const double bound = collected.numel() > 0 ? collected.max().item<double>() : 0.0;
  return 4 * unit_roundoff(mask.leaf.scalar_type()) * bound;
}

// ---------------------------------------------------------------------------------------------
// The core op

struct Case {
  std::string name;
  at::ScalarType dtype = at::kDouble;
  int64_t n = 1, h = 1, l = 1, s = 1, e = 1, ev = 1;
  Layout query_layout = Layout::kContiguous;
  Layout key_layout = Layout::kContiguous;
  Layout value_layout = Layout::kContiguous;
  MaskType mask_type = MaskType::kNone;
  MaskShape mask_shape = MaskShape::kTwoD;
  MaskType padding_type = MaskType::kNone;
  PaddingShape padding_shape = PaddingShape::kPlain;
  bool fully_masked_row = false;
  bool causal = false;
  double dropout = 0.0;
  bool need_weights = false;
  bool average = false;
  bool grad_weights = false;  // differentiate through the returned weights
  bool mask_grad = false;     // float masks require grad
};

std::string describe(const Case& c) {
  char sizes[160];
  std::snprintf(sizes, sizeof(sizes), "%s N%lld H%lld L%lld S%lld E%lld Ev%lld",
                c10::toString(c.dtype), static_cast<long long>(c.n), static_cast<long long>(c.h),
                static_cast<long long>(c.l), static_cast<long long>(c.s),
                static_cast<long long>(c.e), static_cast<long long>(c.ev));
  std::string text = c.name + " [" + sizes + " q:" + layout_name(c.query_layout) +
                     " k:" + layout_name(c.key_layout) + " v:" + layout_name(c.value_layout) +
                     " mask:" + mask_type_name(c.mask_type) +
                     " kpm:" + mask_type_name(c.padding_type);
  text += c.causal ? " causal" : "";
  text += c.dropout > 0 ? " dropout" : "";
  text += c.need_weights ? (c.average ? " avg-weights" : " weights") : "";
  text += c.mask_grad ? " mask-grad" : "";
  return text + "]";
}

// The dropout factors (0 or 1/(1-p)) the op used, read from the per-head weights of a float64
// run with the same seed and masks; checks that about 1 - p of the visible entries were kept.
at::Tensor dropout_factors(const Case& c, Checker& check, const at::Tensor& q64,
                           const at::Tensor& k64, const at::Tensor& v64,
                           const std::optional<at::Tensor>& attn_mask,
                           const std::optional<at::Tensor>& padding, const at::Tensor& seed) {
  torch::NoGradGuard no_grad;
  auto as_double = [](const std::optional<at::Tensor>& mask) -> std::optional<at::Tensor> {
    if (!mask.has_value() || mask->scalar_type() == at::kBool) {
      return mask;
    }
    return mask->detach().to(at::kDouble);
  };
  const at::Tensor weights = std::get<2>(torch_mha::attention_forward(
      q64, k64, v64, as_double(attn_mask), as_double(padding), c.causal, std::nullopt, c.dropout,
      seed, /*need_weights=*/true, /*average_weights=*/false));
  const at::Tensor probs = reference_attention(q64, k64, v64, as_double(attn_mask),
                                               as_double(padding), c.causal, std::nullopt)
                               .probs;
  const at::Tensor visible = probs > 0;
  const at::Tensor kept = (weights != 0) & visible;
  const double count = visible.sum().item<double>();
  if (count >= 200) {
    const double fraction = kept.sum().item<double>() / count;
    const double keep = 1.0 - c.dropout;
    const double sigma = std::sqrt(keep * (1.0 - keep) / count);
    check.expect("  dropout keeps 1 - p of the entries (within 5 sigma)",
                 std::abs(fraction - keep) <= 5 * sigma + 1.0 / count);
  }
  return kept.to(at::kDouble) / (1.0 - c.dropout);
}

void run_case(const Case& c, Checker& check) {
  std::printf("%s\n", describe(c).c_str());
  const Tolerances tol = tolerances_for(c.dtype);
  const Placed query = with_grad(make_input(c.query_layout, c.n, c.h, c.l, c.e, c.dtype), true);
  const Placed key = with_grad(make_input(c.key_layout, c.n, c.h, c.s, c.e, c.dtype), true);
  const Placed value = with_grad(make_input(c.value_layout, c.n, c.h, c.s, c.ev, c.dtype), true);
  const bool float_mask = c.mask_type == MaskType::kFloat || c.mask_type == MaskType::kFloat32;
  const bool float_padding =
      c.padding_type == MaskType::kFloat || c.padding_type == MaskType::kFloat32;
  std::optional<Placed> mask, padding;
  if (c.mask_type != MaskType::kNone) {
    mask = with_grad(
        make_attn_mask(c.mask_shape, c.mask_type, c.dtype, c.n, c.h, c.l, c.s, c.fully_masked_row),
        c.mask_grad && float_mask);
  }
  if (c.padding_type != MaskType::kNone) {
    padding = with_grad(make_padding_mask(c.padding_shape, c.padding_type, c.dtype, c.n, c.s),
                        c.mask_grad && float_padding);
  }
  auto tested = [](const std::optional<Placed>& p) -> std::optional<at::Tensor> {
    return p.has_value() ? std::optional<at::Tensor>(p->tested()) : std::nullopt;
  };
  const at::Tensor seed = at::full({1}, 20240 + c.l * 7 + c.s, at::kLong);

  auto [output, stats, weights] = torch_mha::attention_forward(
      query.tested(), key.tested(), value.tested(), tested(mask), tested(padding), c.causal,
      std::nullopt, c.dropout, c.dropout > 0 ? std::optional<at::Tensor>(seed) : std::nullopt,
      c.need_weights, c.average);

  // The reference, on float64 twins of the same values.
  const Placed query64 = twin64(query), key64 = twin64(key), value64 = twin64(value);
  std::optional<Placed> mask64, padding64;
  if (mask.has_value()) {
    mask64 = twin64(*mask);
  }
  if (padding.has_value()) {
    padding64 = twin64(*padding);
  }
  std::optional<at::Tensor> factors;
  if (c.dropout > 0) {
    factors = dropout_factors(c, check, query64.tested().detach(), key64.tested().detach(),
                              value64.tested().detach(), tested(mask), tested(padding), seed);
  }
  // The mask views are kept: their gradients bound the rounding of the masks' gradients.
  const std::optional<at::Tensor> mask_view64 = tested(mask64);
  const std::optional<at::Tensor> padding_view64 = tested(padding64);
  const Attention expected = reference_attention(query64.tested(), key64.tested(), value64.tested(),
                                                 mask_view64, padding_view64, c.causal, factors);

  check_close(check, "  output", output, expected.output, tol.values);
  std::vector<at::Tensor> outputs = {output}, expected_outputs = {expected.output};
  if (c.need_weights) {
    // The mean over no heads is taken as 0.
    const at::Tensor expected_weights =
        !c.average ? expected.probs : (c.h > 0 ? expected.probs.mean(1) : expected.probs.sum(1));
    check_close(check, "  weights", weights, expected_weights, tol.values);
    if (c.grad_weights) {
      outputs.push_back(weights);
      expected_outputs.push_back(expected_weights);
    }
  } else {
    check.expect("  no weights without need_weights", weights.numel() == 0);
  }
  {
    // softmax_stats of a fully masked row are (+inf, 0); every other row is finite.
    const at::Tensor sum = stats.sum(-1).to(at::kDouble);
    check.expect("  softmax_stats finite or +inf",
                 !(at::isnan(sum).any().item<bool>()) && !(at::isneginf(sum).any().item<bool>()));
  }

  // Backward: gradients of query, key, value and of the float masks that require grad.
  std::vector<at::Tensor> upstream, upstream64;
  for (const at::Tensor& o : outputs) {
    upstream.push_back(at::randn(o.sizes(), at::kDouble).to(c.dtype));
    upstream64.push_back(upstream.back().to(at::kDouble));
  }
  std::vector<std::string> names = {"query", "key", "value"};
  std::vector<at::Tensor> inputs = {query.leaf, key.leaf, value.leaf};
  std::vector<at::Tensor> inputs64 = {query64.leaf, key64.leaf, value64.leaf};
  std::vector<std::pair<const Placed*, size_t>> mask_inputs;  // (mask, index of its view grad)
  std::vector<at::Tensor> views64;
  if (mask.has_value() && mask->leaf.requires_grad()) {
    names.push_back("attn_mask");
    inputs.push_back(mask->leaf);
    inputs64.push_back(mask64->leaf);
    views64.push_back(*mask_view64);
    mask_inputs.push_back({&*mask, names.size() - 1});
  }
  if (padding.has_value() && padding->leaf.requires_grad()) {
    names.push_back("key_padding_mask");
    inputs.push_back(padding->leaf);
    inputs64.push_back(padding64->leaf);
    views64.push_back(*padding_view64);
    mask_inputs.push_back({&*padding, names.size() - 1});
  }
  const std::vector<at::Tensor> grads = gradients(outputs, upstream, inputs);
  std::vector<at::Tensor> all_inputs64 = inputs64;
  all_inputs64.insert(all_inputs64.end(), views64.begin(), views64.end());
  const std::vector<at::Tensor> expected_grads =
      gradients(expected_outputs, upstream64, all_inputs64);
  std::vector<double> fractions(names.size(), tol.grads);
  for (size_t m = 0; m < mask_inputs.size(); ++m) {
    const auto& [placed, index] = mask_inputs[m];
    const double scale = std::max(1.0, expected_grads[index].numel() > 0
                                           ? expected_grads[index].abs().max().item<double>()
                                           : 0.0);
    fractions[index] =
        tol.grads + mask_gradient_slack(*placed, expected_grads[inputs.size() + m]) / scale;
  }
  for (size_t i = 0; i < names.size(); ++i) {
    check_close(check, "  grad " + names[i], grads[i], expected_grads[i], fractions[i]);
  }
}

// Cases: every (L, S) from {1, 2, 63, 65, 127, 129, 200} appears as L and as S for every dtype;
// head dims cycle through {1, 3, 17, 64, 80} with value_dim != head_dim; the other options cycle
// with periods 2 to 5 over the cases, so the 8 cases of each dtype see every mask type, mask
// shape, padding shape and input layout.
std::vector<Case> core_cases() {
  const std::vector<std::pair<int64_t, int64_t>> lengths = {
      {1, 200}, {2, 129}, {63, 127}, {65, 65}, {127, 2}, {129, 63}, {200, 1}, {200, 200}};
  const std::vector<int64_t> dims = {1, 3, 17, 64, 80};
  const std::vector<at::ScalarType> dtypes = {at::kDouble, at::kFloat, at::kBFloat16, at::kHalf};
  const std::vector<Layout> layouts = {Layout::kContiguous, Layout::kSeqMajor, Layout::kStridedLast,
                                       Layout::kExpandedHeads};
  const std::vector<MaskType> mask_types = {MaskType::kBool, MaskType::kFloat, MaskType::kFloat32,
                                            MaskType::kNone};
  const std::vector<MaskShape> mask_shapes = {MaskShape::kFull, MaskShape::kTwoD,
                                              MaskShape::kHeadBroadcast, MaskShape::kExpandedKeys,
                                              MaskShape::kTransposed};
  const std::vector<PaddingShape> padding_shapes = {PaddingShape::kPlain, PaddingShape::kTransposed,
                                                    PaddingShape::kExpanded};
  std::vector<Case> cases;
  int index = 0;
  for (const at::ScalarType dtype : dtypes) {
    for (const auto& [l, s] : lengths) {
      Case c;
      c.name = "core " + std::to_string(index);
      c.dtype = dtype;
      // N * H <= 2: the backward splits the key blocks of a head into several dQ chunks.
      c.n = 1 + index % 2;
      c.h = 2 - index % 2;
      c.l = l;
      c.s = s;
      c.e = dims[index % dims.size()];
      c.ev = dims[(index + 2) % dims.size()];
      c.query_layout = layouts[index % layouts.size()];
      c.key_layout = layouts[(index + 1) % layouts.size()];
      c.value_layout = layouts[(index + 3) % layouts.size()];
      c.mask_type = mask_types[index % mask_types.size()];
      c.mask_shape = mask_shapes[index % mask_shapes.size()];
      c.padding_type = mask_types[(index + 1) % 3];  // bool, float, float32
      c.padding_shape = padding_shapes[index % padding_shapes.size()];
      c.fully_masked_row = index % 3 == 0;
      c.causal = index % 2 == 1;
      c.dropout = index % 3 == 2 ? 0.3 : 0.0;
      c.need_weights = index % 4 != 3;
      c.average = index % 4 == 1;
      c.grad_weights = c.need_weights && index % 5 != 0;
      c.mask_grad = index % 2 == 0;
      cases.push_back(c);
      ++index;
    }
  }

  // Long keys with N * H = 1: many dQ chunks (backward_dq_chunks) of uneven sizes.
  for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    Case c;
    c.name = "chunked backward";
    c.dtype = dtype;
    c.l = 70;
    c.s = 1100;
    c.e = 17;
    c.ev = 9;
    c.key_layout = Layout::kSeqMajor;
    c.mask_type = MaskType::kFloat;
    c.mask_shape = MaskShape::kFull;
    c.padding_type = MaskType::kBool;
    c.causal = true;
    c.dropout = 0.2;
    c.need_weights = true;
    c.grad_weights = true;
    c.mask_grad = true;
    cases.push_back(c);
  }

  // Empty dimensions, with weights and masks.
  struct Empty {
    const char* name;
    int64_t n, h, l, s, e, ev;
  };
  const std::vector<Empty> empties = {
      {"no batch", 0, 2, 5, 7, 4, 3},      {"no heads", 2, 0, 5, 7, 4, 3},
      {"no queries", 1, 2, 0, 7, 4, 3},    {"no keys", 1, 2, 5, 0, 4, 3},
      {"head_dim 0", 1, 2, 65, 130, 0, 3}, {"value_dim 0", 1, 2, 65, 130, 4, 0}};
  for (const Empty& empty : empties) {
    for (const bool average : {false, true}) {
      Case c;
      c.name = std::string("empty: ") + empty.name;
      c.dtype = average ? at::kFloat : at::kDouble;
      c.n = empty.n;
      c.h = empty.h;
      c.l = empty.l;
      c.s = empty.s;
      c.e = empty.e;
      c.ev = empty.ev;
      c.mask_type = MaskType::kFloat;
      c.mask_shape = MaskShape::kFull;
      c.padding_type = MaskType::kBool;
      c.need_weights = true;
      c.average = average;
      c.grad_weights = true;
      c.mask_grad = true;
      cases.push_back(c);
    }
  }
  return cases;
}

// ---------------------------------------------------------------------------------------------
// The layer (torch_mha::multi_head_attention) against projections + reference attention.

struct LayerCase {
  std::string name;
  at::ScalarType dtype = at::kDouble;
  bool batched = true;
  bool batch_first = false;
  int64_t n = 2, l = 9, s = 9, heads = 3, head_dim = 5;
  int64_t kdim = 0, vdim = 0;   // 0: the embedding dimension (packed projection)
  bool self_attention = false;  // query is key is value
  bool bias = true;
  bool bias_kv = false;
  bool zero_attn = false;
  MaskType mask_type = MaskType::kNone;
  bool mask_3d = false;
  MaskType padding_type = MaskType::kNone;
  bool causal = false;  // attn_mask is the causal mask and is_causal is set
  bool need_weights = true;
  bool average = true;
  double dropout = 0.0;  // in training mode
};

struct LayerParams {
  std::vector<std::string> names;
  std::vector<at::Tensor> tensors;  // leaves requiring grad
  at::Tensor get(const std::string& name) const {
    for (size_t i = 0; i < names.size(); ++i) {
      if (names[i] == name) {
        return tensors[i];
      }
    }
    return at::Tensor();
  }
  std::optional<at::Tensor> optional(const std::string& name) const {
    const at::Tensor t = get(name);
    return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
  }
};

LayerParams make_layer_params(const LayerCase& c) {
  const int64_t e = c.heads * c.head_dim;
  const bool packed = c.kdim == 0 && c.vdim == 0;
  LayerParams p;
  auto add = [&](const std::string& name, std::vector<int64_t> sizes, double scale) {
    p.names.push_back(name);
    p.tensors.push_back((at::randn(sizes, at::kDouble) * scale).to(c.dtype).requires_grad_(true));
  };
  if (packed) {
    add("in_proj_weight", {3 * e, e}, 1.0 / std::sqrt(e));
  } else {
    add("q_proj_weight", {e, e}, 1.0 / std::sqrt(e));
    add("k_proj_weight", {e, c.kdim ? c.kdim : e}, 0.3);
    add("v_proj_weight", {e, c.vdim ? c.vdim : e}, 0.3);
  }
  if (c.bias) {
    add("in_proj_bias", {3 * e}, 0.5);
  }
  if (c.bias_kv) {
    add("bias_k", {1, 1, e}, 1.0);
    add("bias_v", {1, 1, e}, 1.0);
  }
  add("out_proj_weight", {e, e}, 1.0 / std::sqrt(e));
  if (c.bias) {
    add("out_proj_bias", {e}, 0.5);
  }
  return p;
}

// nn.MultiheadAttention's computation in float64 with a safe softmax. Returns the output and
// the per-head probabilities (N, H, L, S') after dropout.
std::pair<at::Tensor, at::Tensor> reference_layer(const LayerCase& c, const LayerParams& p,
                                                  at::Tensor query, at::Tensor key,
                                                  at::Tensor value,
                                                  std::optional<at::Tensor> attn_mask,
                                                  std::optional<at::Tensor> padding,
                                                  const std::optional<at::Tensor>& factors) {
  const int64_t e = c.heads * c.head_dim;
  auto seq_first = [&](const at::Tensor& x) {
    return !c.batched ? x.unsqueeze(1) : (c.batch_first ? x.transpose(0, 1) : x);
  };
  query = seq_first(query);
  key = seq_first(key);
  value = seq_first(value);
  const int64_t l = query.size(0), n = query.size(1);
  at::Tensor w_q, w_k, w_v;
  if (p.get("in_proj_weight").defined()) {
    const std::vector<at::Tensor> w = p.get("in_proj_weight").chunk(3);
    w_q = w[0];
    w_k = w[1];
    w_v = w[2];
  } else {
    w_q = p.get("q_proj_weight");
    w_k = p.get("k_proj_weight");
    w_v = p.get("v_proj_weight");
  }
  std::vector<std::optional<at::Tensor>> b(3);
  if (p.get("in_proj_bias").defined()) {
    const std::vector<at::Tensor> chunks = p.get("in_proj_bias").chunk(3);
    b = {chunks[0], chunks[1], chunks[2]};
  }
  auto project = [](const at::Tensor& x, const at::Tensor& w,
                    const std::optional<at::Tensor>& bias) {
    const at::Tensor y = at::matmul(x, w.t());
    return bias.has_value() ? y + *bias : y;
  };
  at::Tensor q = project(query, w_q, b[0]), k = project(key, w_k, b[1]),
             v = project(value, w_v, b[2]);
  int64_t extra = 0;
  if (c.bias_kv) {
    k = at::cat({k, p.get("bias_k").expand({1, n, e})});
    v = at::cat({v, p.get("bias_v").expand({1, n, e})});
    ++extra;
  }
  auto split = [&](const at::Tensor& x) {
    return x.reshape({x.size(0), n, c.heads, c.head_dim}).permute({1, 2, 0, 3});
  };
  q = split(q);
  k = split(k);
  v = split(v);
  if (c.zero_attn) {
    const at::Tensor zeros = at::zeros({n, c.heads, 1, c.head_dim}, at::kDouble);
    k = at::cat({k, zeros}, 2);
    v = at::cat({v, zeros}, 2);
    ++extra;
  }
  const int64_t s = k.size(2);
  at::Tensor bias = at::zeros({n, c.heads, l, s}, at::kDouble);
  if (padding.has_value() && !c.batched) {
    padding = padding->unsqueeze(0);
  }
  if (c.causal && !padding.has_value() && !c.need_weights) {
    // nn drops the mask and uses the top-left causal rule over every key.
    bias = bias.masked_fill(at::ones({l, s}, at::kBool).triu(1), -kInf);
  } else {
    if (attn_mask.has_value()) {
      at::Tensor m = at::constant_pad_nd(additive(*attn_mask), {0, extra}, 0.0);
      bias = bias + (m.dim() == 2 ? m : m.reshape({n, c.heads, l, s}));
    }
    if (padding.has_value()) {
      bias =
          bias + at::constant_pad_nd(additive(*padding), {0, extra}, 0.0).unsqueeze(1).unsqueeze(1);
    }
  }
  const at::Tensor scores =
      at::matmul(q, k.transpose(-1, -2)) / std::sqrt(static_cast<double>(c.head_dim)) + bias;
  at::Tensor probs = safe_softmax(scores);
  if (factors.has_value()) {
    probs = probs * *factors;
  }
  const at::Tensor merged = at::matmul(probs, v).permute({2, 0, 1, 3}).reshape({l, n, e});
  at::Tensor output = project(merged, p.get("out_proj_weight"), p.optional("out_proj_bias"));
  output = !c.batched ? output.squeeze(1) : (c.batch_first ? output.transpose(0, 1) : output);
  return {output, probs};
}

void run_layer_case(const LayerCase& c, Checker& check) {
  std::printf("layer: %s [%s]\n", c.name.c_str(), c10::toString(c.dtype));
  const Tolerances tol = tolerances_for(c.dtype);
  // Projections round q, k and v to the dtype before attention: a few more roundings.
  const double values_tol =
      c.dtype == at::kDouble || c.dtype == at::kFloat ? tol.values : 4 * tol.values;
  const double grads_tol =
      c.dtype == at::kDouble || c.dtype == at::kFloat ? tol.grads : 4 * tol.grads;
  const int64_t e = c.heads * c.head_dim;
  const LayerParams params = make_layer_params(c);
  auto input_sizes = [&](int64_t len, int64_t features) -> std::vector<int64_t> {
    if (!c.batched) {
      return {len, features};
    }
    return c.batch_first ? std::vector<int64_t>{c.n, len, features}
                         : std::vector<int64_t>{len, c.n, features};
  };
  auto input = [&](int64_t len, int64_t features) {
    return at::randn(input_sizes(len, features), at::kDouble).to(c.dtype).requires_grad_(true);
  };
  const at::Tensor query = input(c.l, e);
  const at::Tensor key = c.self_attention ? query : input(c.s, c.kdim ? c.kdim : e);
  const at::Tensor value = c.self_attention ? query : input(c.s, c.vdim ? c.vdim : e);
  const int64_t s = c.self_attention ? c.l : c.s;

  std::optional<at::Tensor> attn_mask, padding;
  if (c.mask_type != MaskType::kNone) {
    const int64_t rows = c.batched ? c.n * c.heads : c.heads;
    at::Tensor masked =
        c.causal ? at::ones({c.l, s}, at::kBool).triu(1) : at::rand({c.l, s}, at::kDouble) < 0.25;
    if (c.mask_3d) {
      masked = c.causal ? masked.expand({rows, c.l, s}).clone()
                        : at::rand({rows, c.l, s}, at::kDouble) < 0.25;
    }
    if (c.mask_type == MaskType::kBool) {
      attn_mask = masked;
    } else {
      const at::Tensor values = c.causal ? at::zeros(masked.sizes(), at::kDouble)
                                         : at::randn(masked.sizes(), at::kDouble);
      attn_mask = values.masked_fill(masked, -kInf)
                      .to(c.mask_type == MaskType::kFloat32 ? at::kFloat : c.dtype)
                      .requires_grad_(!c.causal);
    }
  }
  if (c.padding_type != MaskType::kNone) {
    std::vector<int64_t> sizes = c.batched ? std::vector<int64_t>{c.n, s} : std::vector<int64_t>{s};
    at::Tensor masked = at::rand(sizes, at::kDouble) < 0.2;
    padding = c.padding_type == MaskType::kBool
                  ? masked
                  : at::randn(sizes, at::kDouble)
                        .masked_fill(masked, -kInf)
                        .to(c.padding_type == MaskType::kFloat32 ? at::kFloat : c.dtype);
  }

  auto [output, weights] = torch_mha::multi_head_attention(
      query, key, value, e, c.heads, params.optional("in_proj_weight"),
      params.optional("in_proj_bias"), params.optional("bias_k"), params.optional("bias_v"),
      c.zero_attn, c.dropout, params.get("out_proj_weight"), params.optional("out_proj_bias"),
      /*training=*/c.dropout > 0, padding, c.need_weights, attn_mask,
      params.optional("q_proj_weight"), params.optional("k_proj_weight"),
      params.optional("v_proj_weight"), std::nullopt, std::nullopt, c.average, c.causal,
      c.batch_first);

  // float64 twins
  LayerParams params64;
  params64.names = params.names;
  for (const at::Tensor& t : params.tensors) {
    params64.tensors.push_back(t.detach().to(at::kDouble).requires_grad_(true));
  }
  auto twin = [](const at::Tensor& t) {
    return t.detach().to(at::kDouble).requires_grad_(t.requires_grad());
  };
  const at::Tensor query64 = twin(query);
  const at::Tensor key64 = c.self_attention ? query64 : twin(key);
  const at::Tensor value64 = c.self_attention ? query64 : twin(value);
  std::optional<at::Tensor> mask64 = attn_mask, padding64 = padding;
  if (attn_mask.has_value() && attn_mask->is_floating_point()) {
    mask64 = twin(*attn_mask);
  }
  if (padding.has_value() && padding->is_floating_point()) {
    padding64 = twin(*padding);
  }
  std::optional<at::Tensor> factors;
  if (c.dropout > 0) {
    // Per-head weights of this very call (need_weights and !average): kept where nonzero.
    torch::NoGradGuard no_grad;
    const at::Tensor probs =
        reference_layer(c, params64, query64, key64, value64, mask64, padding64, std::nullopt)
            .second;
    const at::Tensor per_head = c.batched ? weights : weights.unsqueeze(0);
    factors = ((per_head != 0) & (probs > 0)).to(at::kDouble) / (1.0 - c.dropout);
  }
  const auto [expected_output, probs] =
      reference_layer(c, params64, query64, key64, value64, mask64, padding64, factors);

  check_close(check, "  output", output, expected_output, values_tol);
  std::vector<at::Tensor> outputs = {output}, expected_outputs = {expected_output};
  if (c.need_weights) {
    at::Tensor expected_weights = c.average ? probs.mean(1) : probs;
    if (!c.batched) {
      expected_weights = expected_weights.squeeze(0);
    }
    check_close(check, "  weights", weights, expected_weights, values_tol);
    outputs.push_back(weights);
    expected_outputs.push_back(expected_weights);
  }
  std::vector<at::Tensor> upstream, upstream64;
  for (const at::Tensor& o : outputs) {
    upstream.push_back(at::randn(o.sizes(), at::kDouble).to(c.dtype));
    upstream64.push_back(upstream.back().to(at::kDouble));
  }
  std::vector<std::string> names = params.names;
  std::vector<at::Tensor> inputs = params.tensors, inputs64 = params64.tensors;
  names.push_back("query");
  inputs.push_back(query);
  inputs64.push_back(query64);
  if (!c.self_attention) {
    names.insert(names.end(), {"key", "value"});
    inputs.insert(inputs.end(), {key, value});
    inputs64.insert(inputs64.end(), {key64, value64});
  }
  if (attn_mask.has_value() && attn_mask->requires_grad()) {
    names.push_back("attn_mask");
    inputs.push_back(*attn_mask);
    inputs64.push_back(*mask64);
  }
  const std::vector<at::Tensor> grads = gradients(outputs, upstream, inputs);
  const std::vector<at::Tensor> expected_grads = gradients(expected_outputs, upstream64, inputs64);
  for (size_t i = 0; i < names.size(); ++i) {
    check_close(check, "  grad " + names[i], grads[i], expected_grads[i], grads_tol);
  }
}

std::vector<LayerCase> layer_cases() {
  std::vector<LayerCase> cases;
  {
    LayerCase c;
    c.name = "self-attention, batch_first, bias_kv, zero_attn, bool masks, averaged weights";
    c.self_attention = true;
    c.batch_first = true;
    c.l = 65;
    c.bias_kv = c.zero_attn = true;
    c.mask_type = MaskType::kBool;
    c.padding_type = MaskType::kBool;
    cases.push_back(c);
  }
  {
    LayerCase c;
    c.name = "kdim/vdim, 3-D float mask with grad, float padding, per-head weights";
    c.dtype = at::kFloat;
    c.l = 63;
    c.s = 130;
    c.kdim = 7;
    c.vdim = 11;
    c.mask_type = MaskType::kFloat;
    c.mask_3d = true;
    c.padding_type = MaskType::kFloat;
    c.average = false;
    cases.push_back(c);
  }
  {
    LayerCase c;
    c.name = "unbatched, is_causal with its mask, zero_attn, no weights (kernel causal rule)";
    c.batched = false;
    c.l = c.s = 129;
    c.head_dim = 17;
    c.zero_attn = true;
    c.mask_type = MaskType::kBool;
    c.causal = true;
    c.need_weights = false;
    cases.push_back(c);
  }
  {
    LayerCase c;
    c.name = "bfloat16, no bias, bias_kv, float32 mask";
    c.dtype = at::kBFloat16;
    c.l = 70;
    c.s = 129;
    c.bias = false;
    c.bias_kv = true;
    c.mask_type = MaskType::kFloat32;
    c.padding_type = MaskType::kBool;
    cases.push_back(c);
  }
  {
    LayerCase c;
    c.name = "dropout in training, masks, per-head weights";
    c.l = 66;
    c.s = 140;
    c.mask_type = MaskType::kFloat;
    c.padding_type = MaskType::kBool;
    c.average = false;
    c.dropout = 0.25;
    cases.push_back(c);
  }
  {
    LayerCase c;
    c.name = "empty batch";
    c.n = 0;
    c.mask_type = MaskType::kBool;
    c.mask_3d = true;
    c.padding_type = MaskType::kBool;
    cases.push_back(c);
  }
  return cases;
}

// ---------------------------------------------------------------------------------------------
// Calls from inside a parallel region: the kernels' own at::parallel_for then runs inline on
// the calling OpenMP thread. The results must equal serial calls bit for bit.

void check_nested_parallel(Checker& check) {
  std::printf("nested parallel regions\n");
  torch::NoGradGuard no_grad;
  constexpr int kProblems = 6;
  struct Problem {
    at::Tensor q, k, v, mask, grad_output;
  };
  std::vector<Problem> problems;
  for (int i = 0; i < kProblems; ++i) {
    problems.push_back({at::randn({1, 2, 130, 17}), at::randn({1, 2, 300, 17}),
                        at::randn({1, 2, 300, 9}), at::randn({130, 300}),
                        at::randn({1, 2, 130, 9})});
  }
  const at::Tensor seed = at::full({1}, 99, at::kLong);
  auto run = [&](const Problem& p) {
    auto [output, stats, weights] = torch_mha::attention_forward(
        p.q, p.k, p.v, p.mask, std::nullopt, /*is_causal=*/true, std::nullopt, 0.1, seed,
        /*need_weights=*/true, /*average_weights=*/true);
    auto [dq, dk, dv, dmask, dsinks] = torch_mha::attention_backward(
        p.grad_output, p.q, p.k, p.v, output, stats, p.mask, std::nullopt, true, std::nullopt, 0.1,
        seed, weights, /*average_weights=*/true, /*compute_mask_grad=*/true);
    (void)dsinks;
    return std::vector<at::Tensor>{output, weights, dq, dk, dv, dmask};
  };
  std::vector<std::vector<at::Tensor>> serial, nested(kProblems);
  for (const Problem& p : problems) {
    serial.push_back(run(p));
  }
  at::parallel_for(0, kProblems, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      nested[i] = run(problems[i]);
    }
  });
  bool identical = true;
  for (int i = 0; i < kProblems; ++i) {
    for (size_t t = 0; t < serial[i].size(); ++t) {
      identical = identical && at::equal(nested[i][t], serial[i][t]);
    }
  }
  check.expect("  calls inside at::parallel_for equal serial calls bitwise", identical);
}

}  // namespace

int main() {
  torch::manual_seed(0);
  Checker check;
  std::printf("torch_mha %s, %d threads\n", torch_mha::build_info().c_str(), at::get_num_threads());
  for (const Case& c : core_cases()) {
    run_case(c, check);
  }
  for (const LayerCase& c : layer_cases()) {
    run_layer_case(c, check);
  }
  check_nested_parallel(check);
  std::printf("%d failure(s)\n", check.failures());
  return check.failures();
}
