// Autograd for the core attention op, in C++ so that a TorchScript model loaded by a C++ program
// (no Python anywhere) still trains.
#include <torch/autograd.h>
#include <torch/library.h>

#include "torch_mha.h"

namespace torch_mha::autograd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor value_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? *t : at::Tensor();
}

std::optional<at::Tensor> defined_or_nullopt(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// Gradient of a mask that was broadcast to (N, H, L, S): sum over the broadcast dimensions.
at::Tensor reduce_mask_grad(const at::Tensor& full_grad, const at::Tensor& mask,
                            bool is_key_padding_mask) {
  if (is_key_padding_mask) {
    // (N, H, L, S) -> (N, S)
    return full_grad.sum({1, 2}).to(mask.scalar_type());
  }
  return full_grad.sum_to_size_symint(mask.sym_sizes()).to(mask.scalar_type());
}

bool mask_requires_grad(const std::optional<at::Tensor>& mask) {
  return mask.has_value() && mask->defined() && mask->requires_grad();
}

class AttentionFunction : public torch::autograd::Function<AttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& query, const at::Tensor& key,
                               const at::Tensor& value, const std::optional<at::Tensor>& attn_mask,
                               const std::optional<at::Tensor>& key_padding_mask, bool is_causal,
                               std::optional<double> scale, double dropout_p,
                               const std::optional<at::Tensor>& dropout_seed, bool need_weights,
                               bool average_weights) {
    at::Tensor output, softmax_stats, weights;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(output, softmax_stats, weights) = torch_mha::attention_forward(
          query, key, value, attn_mask, key_padding_mask, is_causal, scale, dropout_p, dropout_seed,
          need_weights, average_weights);
    }
    // The weights are not saved: their gradient term is recomputed from softmax_stats.
    ctx->save_for_backward({query, key, value, output, softmax_stats, value_or_undefined(attn_mask),
                            value_or_undefined(key_padding_mask),
                            value_or_undefined(dropout_seed)});
    ctx->saved_data["is_causal"] = is_causal;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["need_weights"] = need_weights;
    ctx->saved_data["average_weights"] = average_weights;
    ctx->saved_data["attn_mask_requires_grad"] = mask_requires_grad(attn_mask);
    ctx->saved_data["key_padding_mask_requires_grad"] = mask_requires_grad(key_padding_mask);
    ctx->mark_non_differentiable({softmax_stats});
    // Without this, autograd hands backward a zero-filled (N, [H,] L, S) gradient for weights that
    // the loss never used, and the backward would run its weights-gradient pass over it.
    ctx->set_materialize_grads(false);
    if (!need_weights) {
      ctx->mark_non_differentiable({weights});
    }
    return {output, softmax_stats, weights};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& query = saved[0];
    const at::Tensor& key = saved[1];
    const at::Tensor& value = saved[2];
    const at::Tensor& output = saved[3];
    const at::Tensor& softmax_stats = saved[4];
    const std::optional<at::Tensor> attn_mask = defined_or_nullopt(saved[5]);
    const std::optional<at::Tensor> key_padding_mask = defined_or_nullopt(saved[6]);
    const std::optional<at::Tensor> dropout_seed = defined_or_nullopt(saved[7]);
    const bool need_weights = ctx->saved_data["need_weights"].toBool();
    const bool attn_mask_grad = ctx->saved_data["attn_mask_requires_grad"].toBool();
    const bool key_padding_mask_grad = ctx->saved_data["key_padding_mask_requires_grad"].toBool();

    at::Tensor grad_output = grad_outputs[0];
    at::Tensor grad_weights = need_weights ? grad_outputs[2] : at::Tensor();
    if (!grad_output.defined()) {
      grad_output = at::zeros_like(output);
    }
    auto [grad_query, grad_key, grad_value, grad_mask] = torch_mha::attention_backward(
        grad_output, query, key, value, output, softmax_stats, attn_mask, key_padding_mask,
        ctx->saved_data["is_causal"].toBool(), ctx->saved_data["scale"].toOptional<double>(),
        ctx->saved_data["dropout_p"].toDouble(), dropout_seed, defined_or_nullopt(grad_weights),
        ctx->saved_data["average_weights"].toBool(), attn_mask_grad || key_padding_mask_grad);

    at::Tensor grad_attn_mask, grad_key_padding_mask;
    if (attn_mask_grad) {
      grad_attn_mask = reduce_mask_grad(grad_mask, *attn_mask, /*is_key_padding_mask=*/false);
    }
    if (key_padding_mask_grad) {
      grad_key_padding_mask =
          reduce_mask_grad(grad_mask, *key_padding_mask, /*is_key_padding_mask=*/true);
    }
    // One entry per forward argument; non-tensor arguments get undefined gradients.
    return {grad_query,   grad_key,     grad_value,   grad_attn_mask, grad_key_padding_mask,
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),   at::Tensor(),
            at::Tensor()};
  }
};

// The backward op is differentiable only once: its own backward raises.
class AttentionBackwardFunction : public torch::autograd::Function<AttentionBackwardFunction> {
 public:
  static variable_list forward(
      AutogradContext* /*ctx*/, const at::Tensor& grad_output, const at::Tensor& query,
      const at::Tensor& key, const at::Tensor& value, const at::Tensor& output,
      const at::Tensor& softmax_stats, const std::optional<at::Tensor>& attn_mask,
      const std::optional<at::Tensor>& key_padding_mask, bool is_causal,
      std::optional<double> scale, double dropout_p, const std::optional<at::Tensor>& dropout_seed,
      const std::optional<at::Tensor>& grad_weights, bool average_weights, bool compute_mask_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [grad_query, grad_key, grad_value, grad_mask] = torch_mha::attention_backward(
        grad_output, query, key, value, output, softmax_stats, attn_mask, key_padding_mask,
        is_causal, scale, dropout_p, dropout_seed, grad_weights, average_weights,
        compute_mask_grad);
    return {grad_query, grad_key, grad_value, grad_mask};
  }

  static variable_list backward(AutogradContext* /*ctx*/, variable_list /*grad_outputs*/) {
    TORCH_CHECK(false,
                "torch_mha: double backward through attention is not supported (the gradient of "
                "torch_mha.attention_backward is not implemented)");
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward_autograd(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    bool is_causal, std::optional<double> scale, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed, bool need_weights, bool average_weights) {
  const variable_list result =
      AttentionFunction::apply(query, key, value, attn_mask, key_padding_mask, is_causal, scale,
                               dropout_p, dropout_seed, need_weights, average_weights);
  return {result[0], result[1], result[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_autograd(
    const at::Tensor& grad_output, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& output, const at::Tensor& softmax_stats,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    bool is_causal, std::optional<double> scale, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed, const std::optional<at::Tensor>& grad_weights,
    bool average_weights, bool compute_mask_grad) {
  const variable_list result = AttentionBackwardFunction::apply(
      grad_output, query, key, value, output, softmax_stats, attn_mask, key_padding_mask, is_causal,
      scale, dropout_p, dropout_seed, grad_weights, average_weights, compute_mask_grad);
  return {result[0], result[1], result[2], result[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_mha, Autograd, m) {
  m.impl("attention_forward", &attention_forward_autograd);
  m.impl("attention_backward", &attention_backward_autograd);
}

}  // namespace torch_mha::autograd
