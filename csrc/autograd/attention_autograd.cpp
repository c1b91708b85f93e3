// Autograd for the core attention ops (dense and varlen), in C++ so that a TorchScript model
// loaded by a C++ program (no Python anywhere) still trains.
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include "attention_args.h"

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

bool requires_grad(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->requires_grad();
}

// The tensors of a forward call, in the order they are saved for the backward.
enum SavedTensor {
  kQuery,
  kKey,
  kValue,
  kOutput,
  kSoftmaxStats,
  kAttnMask,
  kKeyPaddingMask,
  kDropoutSeed,
  kAlibiSlopes,
  kSinks,
  kCuSeqlensQ,
  kCuSeqlensK,
};

class AttentionFunction : public torch::autograd::Function<AttentionFunction> {
 public:
  // The tensors that can require grad are explicit arguments (so autograd tracks them); `args`
  // carries them again together with everything else.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& /*query*/,
                               const at::Tensor& /*key*/, const at::Tensor& /*value*/,
                               const std::optional<at::Tensor>& /*attn_mask*/,
                               const std::optional<at::Tensor>& /*key_padding_mask*/,
                               const std::optional<at::Tensor>& /*sinks*/,
                               const AttentionForwardArgs& args) {
    TORCH_CHECK(!requires_grad(args.alibi_slopes), args.op_name(),
                ": alibi_slopes do not support gradients; pass a tensor that does not require "
                "grad (for example alibi_slopes.detach())");
    at::Tensor output, softmax_stats, weights;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(output, softmax_stats, weights) = call_forward(args);
    }
    // The weights are not saved: their gradient term is recomputed from softmax_stats.
    ctx->save_for_backward(
        {args.query, args.key, args.value, output, softmax_stats,
         value_or_undefined(args.attn_mask), value_or_undefined(args.key_padding_mask),
         value_or_undefined(args.dropout_seed), value_or_undefined(args.alibi_slopes),
         value_or_undefined(args.sinks), value_or_undefined(args.cu_seqlens_q),
         value_or_undefined(args.cu_seqlens_k)});
    ctx->saved_data["is_causal"] = args.is_causal;
    ctx->saved_data["scale"] = args.scale;
    ctx->saved_data["dropout_p"] = args.dropout_p;
    ctx->saved_data["need_weights"] = args.need_weights;
    ctx->saved_data["average_weights"] = args.average_weights;
    ctx->saved_data["window_left"] = args.window_left;
    ctx->saved_data["window_right"] = args.window_right;
    ctx->saved_data["softcap"] = args.softcap;
    ctx->saved_data["max_seqlen_q"] = args.max_seqlen_q;
    ctx->saved_data["max_seqlen_k"] = args.max_seqlen_k;
    ctx->saved_data["attn_mask_requires_grad"] = requires_grad(args.attn_mask);
    ctx->saved_data["key_padding_mask_requires_grad"] = requires_grad(args.key_padding_mask);
    ctx->mark_non_differentiable({softmax_stats});
    // Without this, autograd hands backward a zero-filled (N, [H,] L, S) gradient for weights that
    // the loss never used, and the backward would run its weights-gradient pass over it.
    ctx->set_materialize_grads(false);
    if (args.is_varlen()) {
      return {output, softmax_stats};
    }
    if (!args.need_weights) {
      ctx->mark_non_differentiable({weights});
    }
    return {output, softmax_stats, weights};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    AttentionBackwardArgs args;
    AttentionForwardArgs& forward = args.forward;
    forward.query = saved[kQuery];
    forward.key = saved[kKey];
    forward.value = saved[kValue];
    forward.attn_mask = defined_or_nullopt(saved[kAttnMask]);
    forward.key_padding_mask = defined_or_nullopt(saved[kKeyPaddingMask]);
    forward.dropout_seed = defined_or_nullopt(saved[kDropoutSeed]);
    forward.alibi_slopes = defined_or_nullopt(saved[kAlibiSlopes]);
    forward.sinks = defined_or_nullopt(saved[kSinks]);
    forward.cu_seqlens_q = defined_or_nullopt(saved[kCuSeqlensQ]);
    forward.cu_seqlens_k = defined_or_nullopt(saved[kCuSeqlensK]);
    forward.is_causal = ctx->saved_data["is_causal"].toBool();
    forward.scale = ctx->saved_data["scale"].toOptional<double>();
    forward.dropout_p = ctx->saved_data["dropout_p"].toDouble();
    forward.average_weights = ctx->saved_data["average_weights"].toBool();
    forward.window_left = ctx->saved_data["window_left"].toInt();
    forward.window_right = ctx->saved_data["window_right"].toInt();
    forward.softcap = ctx->saved_data["softcap"].toDouble();
    forward.max_seqlen_q = ctx->saved_data["max_seqlen_q"].toInt();
    forward.max_seqlen_k = ctx->saved_data["max_seqlen_k"].toInt();
    args.output = saved[kOutput];
    args.softmax_stats = saved[kSoftmaxStats];
    const bool need_weights = ctx->saved_data["need_weights"].toBool();
    const bool attn_mask_grad = ctx->saved_data["attn_mask_requires_grad"].toBool();
    const bool key_padding_mask_grad = ctx->saved_data["key_padding_mask_requires_grad"].toBool();

    args.grad_output = grad_outputs[0].defined() ? grad_outputs[0] : at::zeros_like(args.output);
    if (need_weights && grad_outputs[2].defined()) {
      args.grad_weights = grad_outputs[2];
    }
    forward.need_weights = args.grad_weights.has_value();
    args.compute_mask_grad = attn_mask_grad || key_padding_mask_grad;
    auto [grad_query, grad_key, grad_value, grad_mask, grad_sinks] = call_backward(args);

    at::Tensor grad_attn_mask, grad_key_padding_mask;
    if (attn_mask_grad) {
      grad_attn_mask =
          reduce_mask_grad(grad_mask, *forward.attn_mask, /*is_key_padding_mask=*/false);
    }
    if (key_padding_mask_grad) {
      grad_key_padding_mask =
          reduce_mask_grad(grad_mask, *forward.key_padding_mask, /*is_key_padding_mask=*/true);
    }
    if (!forward.sinks.has_value() || !forward.sinks->requires_grad()) {
      grad_sinks = at::Tensor();
    }
    // One entry per forward argument: query, key, value, attn_mask, key_padding_mask, sinks,
    // args.
    return {grad_query, grad_key,    grad_value, grad_attn_mask, grad_key_padding_mask,
            grad_sinks, at::Tensor()};
  }
};

// The backward op is differentiable only once: its own backward raises.
class AttentionBackwardFunction : public torch::autograd::Function<AttentionBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* /*ctx*/, const at::Tensor& /*grad_output*/,
                               const at::Tensor& /*query*/, const at::Tensor& /*key*/,
                               const at::Tensor& /*value*/, const at::Tensor& /*output*/,
                               const std::optional<at::Tensor>& /*attn_mask*/,
                               const std::optional<at::Tensor>& /*key_padding_mask*/,
                               const std::optional<at::Tensor>& /*grad_weights*/,
                               const std::optional<at::Tensor>& /*sinks*/,
                               const AttentionBackwardArgs& args) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [grad_query, grad_key, grad_value, grad_mask, grad_sinks] = call_backward(args);
    return {grad_query, grad_key, grad_value, grad_mask, grad_sinks};
  }

  static variable_list backward(AutogradContext* /*ctx*/, variable_list /*grad_outputs*/) {
    TORCH_CHECK(false,
                "torch_mha: double backward through attention is not supported (the gradient of "
                "torch_mha.attention_backward is not implemented)");
  }
};

ForwardResult attention_forward_autograd(const AttentionForwardArgs& args) {
  const variable_list result = AttentionFunction::apply(
      args.query, args.key, args.value, args.attn_mask, args.key_padding_mask, args.sinks, args);
  return {result[0], result[1], args.is_varlen() ? at::Tensor() : result[2]};
}

BackwardResult attention_backward_autograd(const AttentionBackwardArgs& args) {
  const AttentionForwardArgs& forward = args.forward;
  const variable_list result = AttentionBackwardFunction::apply(
      args.grad_output, forward.query, forward.key, forward.value, args.output, forward.attn_mask,
      forward.key_padding_mask, args.grad_weights, forward.sinks, args);
  return {result[0], result[1], result[2], result[3], result[4]};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_mha, Autograd, m) {
  register_core_attention_kernels<&attention_forward_autograd, &attention_backward_autograd>(m);
  // Decoding with a cache is inference: a call whose inputs require grad gets a clear error
  // when its gradient is asked for.
  m.impl("attention_with_kvcache", torch::autograd::autogradNotImplementedFallback());
}

TORCH_LIBRARY_IMPL(torch_mha, ADInplaceOrView, m) {
  m.impl("attention_with_kvcache", torch::autograd::autogradNotImplementedInplaceOrViewFallback());
}

}  // namespace torch_mha::autograd
