// Uses torch_mha's C++ API directly, with autograd, from a LibTorch program:
//  * torch_mha::multi_head_attention against nn.MultiheadAttention results saved by Python;
//  * torch_mha::attention_forward against plain ATen attention computed here;
//  * torch_mha::attention with grouped-query heads, a sliding window and sinks, and
//    torch_mha::varlen_attention, against plain ATen computed here;
//  * concurrent calls from several C++ threads against a serial call.
//
//   test_api DATA.pt
#include <torch/torch.h>
#include <torch_mha.h>

#include <cmath>
#include <cstdio>
#include <thread>
#include <vector>

#include "check.h"

namespace {

using torch_mha_test::Checker;
using torch_mha_test::TensorFile;

void check_layer_against_python(const TensorFile& data, Checker& check) {
  const double tolerance = 1e-10;
  at::Tensor query = data.get("query").clone().requires_grad_(true);
  at::Tensor key = data.get("key").clone().requires_grad_(true);
  at::Tensor value = data.get("value").clone().requires_grad_(true);
  at::Tensor in_proj_weight = data.get("in_proj_weight").clone().requires_grad_(true);
  at::Tensor in_proj_bias = data.get("in_proj_bias").clone().requires_grad_(true);
  at::Tensor out_proj_weight = data.get("out_proj_weight").clone().requires_grad_(true);
  at::Tensor out_proj_bias = data.get("out_proj_bias").clone().requires_grad_(true);
  const int64_t embed_dim = query.size(-1);
  const int64_t num_heads = data.get("num_heads").item<int64_t>();

  auto [output, weights] = torch_mha::multi_head_attention(
      query, key, value, embed_dim, num_heads, in_proj_weight, in_proj_bias,
      /*bias_k=*/std::nullopt, /*bias_v=*/std::nullopt, /*add_zero_attn=*/false,
      /*dropout_p=*/0.0, out_proj_weight, out_proj_bias, /*training=*/true,
      data.get("key_padding_mask"), /*need_weights=*/true, data.get("attn_mask"));
  check.expect("layer output requires grad", output.requires_grad());
  const at::Tensor loss =
      (output * data.get("grad_output")).sum() + (weights * data.get("grad_weights")).sum();
  loss.backward();
  check.close("layer output vs nn.MultiheadAttention", output, data.get("output"), tolerance);
  check.close("layer weights vs nn.MultiheadAttention", weights, data.get("weights"), tolerance);
  const std::vector<std::pair<const char*, at::Tensor>> leaves = {
      {"query", query},
      {"key", key},
      {"value", value},
      {"in_proj_weight", in_proj_weight},
      {"in_proj_bias", in_proj_bias},
      {"out_proj_weight", out_proj_weight},
      {"out_proj_bias", out_proj_bias}};
  for (const auto& [name, leaf] : leaves) {
    check.close(std::string("layer grad ") + name, leaf.grad(),
                data.get(std::string("grad_") + name), tolerance);
  }
}

// Plain ATen attention with nn.MultiheadAttention's mask polarity (true = masked out).
at::Tensor reference_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& mask) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(q.size(-1)));
  at::Tensor scores = at::matmul(q, k.transpose(-1, -2)) * scale;
  scores = scores.masked_fill(mask, -std::numeric_limits<double>::infinity());
  return at::matmul(at::softmax(scores, -1), v);
}

void check_core_against_aten(Checker& check) {
  torch::manual_seed(0);
  const auto options = at::TensorOptions().dtype(at::kDouble);
  at::Tensor q = at::randn({2, 3, 70, 16}, options).requires_grad_(true);
  at::Tensor k = at::randn({2, 3, 130, 16}, options).requires_grad_(true);
  at::Tensor v = at::randn({2, 3, 130, 8}, options).requires_grad_(true);
  at::Tensor mask = at::rand({70, 130}) > 0.7;
  mask.select(1, 0).fill_(false);  // every query keeps at least one key
  at::Tensor grad = at::randn({2, 3, 70, 8}, options);

  auto [output, stats, weights] = torch_mha::attention_forward(q, k, v, mask);
  (void)stats;
  (void)weights;
  auto ours = torch::autograd::grad({output}, {q, k, v}, {grad});
  at::Tensor expected = reference_attention(q, k, v, mask);
  auto theirs = torch::autograd::grad({expected}, {q, k, v}, {grad});
  check.close("attention_forward vs ATen", output, expected, 1e-12);
  check.close("attention grad query vs ATen", ours[0], theirs[0], 1e-10);
  check.close("attention grad key vs ATen", ours[1], theirs[1], 1e-10);
  check.close("attention grad value vs ATen", ours[2], theirs[2], 1e-10);
}

// Grouped-query heads (K/V repeated here, never by the op), a causal sliding window aligned to
// the bottom-right, and per-head sinks (one more logit in the softmax denominator).
at::Tensor reference_variants(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              int64_t window, const at::Tensor& sinks) {
  const int64_t group = q.size(1) / k.size(1);
  const int64_t L = q.size(2), S = k.size(2);
  const double scale = 1.0 / std::sqrt(static_cast<double>(q.size(-1)));
  at::Tensor scores = at::matmul(q, k.repeat_interleave(group, 1).transpose(-1, -2)) * scale;
  const at::Tensor i = at::arange(L, at::kLong).view({L, 1});
  const at::Tensor j = at::arange(S, at::kLong).view({1, S});
  const at::Tensor position = i + (S - L);
  const at::Tensor hidden = (j < position - window) | (j > position);
  scores = scores.masked_fill(hidden, -std::numeric_limits<double>::infinity());
  const at::Tensor sink_column = sinks.view({1, -1, 1, 1}).expand({q.size(0), q.size(1), L, 1});
  const at::Tensor probs = at::softmax(at::cat({scores, sink_column}, -1), -1).narrow(-1, 0, S);
  return at::matmul(probs, v.repeat_interleave(group, 1));
}

void check_variants_against_aten(Checker& check) {
  torch::manual_seed(1);
  const auto options = at::TensorOptions().dtype(at::kDouble);
  at::Tensor q = at::randn({2, 4, 50, 16}, options).requires_grad_(true);
  at::Tensor k = at::randn({2, 2, 90, 16}, options).requires_grad_(true);
  at::Tensor v = at::randn({2, 2, 90, 8}, options).requires_grad_(true);
  at::Tensor sinks = at::randn({4}, options).requires_grad_(true);
  at::Tensor grad = at::randn({2, 4, 50, 8}, options);
  const int64_t window = 20;

  auto [output, weights] = torch_mha::attention(
      q, k, v, std::nullopt, std::nullopt, /*is_causal=*/false, std::nullopt, 0.0,
      /*need_weights=*/false, false, /*window_size=*/{window, 0}, std::nullopt, 0.0, sinks);
  check.expect("attention returns no weights unless asked", !weights.has_value());
  auto ours = torch::autograd::grad({output}, {q, k, v, sinks}, {grad});
  const at::Tensor expected = reference_variants(q, k, v, window, sinks);
  auto theirs = torch::autograd::grad({expected}, {q, k, v, sinks}, {grad});
  check.close("attention (GQA, window, sinks) vs ATen", output, expected, 1e-12);
  const char* names[] = {"query", "key", "value", "sinks"};
  for (int n = 0; n < 4; ++n) {
    check.close(std::string("attention (GQA, window, sinks) grad ") + names[n], ours[n], theirs[n],
                1e-10);
  }

  // The same problem packed as one sequence of a varlen batch, next to a shorter one.
  const at::Tensor packed_q = at::cat({q[0].transpose(0, 1), q[1].transpose(0, 1).narrow(0, 0, 7)});
  const at::Tensor packed_k = at::cat({k[0].transpose(0, 1), k[1].transpose(0, 1).narrow(0, 0, 9)});
  const at::Tensor packed_v = at::cat({v[0].transpose(0, 1), v[1].transpose(0, 1).narrow(0, 0, 9)});
  const at::Tensor cu_q = at::tensor({0, 50, 57}, at::kInt);
  const at::Tensor cu_k = at::tensor({0, 90, 99}, at::kInt);
  const at::Tensor packed_out =
      torch_mha::varlen_attention(packed_q, packed_k, packed_v, cu_q, cu_k, 50, 90, std::nullopt,
                                  0.0, false, {window, 0}, std::nullopt, 0.0, sinks);
  check.close("varlen_attention, first sequence vs ATen", packed_out.narrow(0, 0, 50),
              expected[0].transpose(0, 1), 1e-12);
  const at::Tensor second =
      reference_variants(q[1].narrow(1, 0, 7).unsqueeze(0), k[1].narrow(1, 0, 9).unsqueeze(0),
                         v[1].narrow(1, 0, 9).unsqueeze(0), window, sinks);
  check.close("varlen_attention, second sequence vs ATen", packed_out.narrow(0, 50, 7),
              second[0].transpose(0, 1), 1e-12);
}

void check_concurrent_calls(const TensorFile& data, Checker& check) {
  torch::NoGradGuard no_grad;
  const at::Tensor query = data.get("query");
  const int64_t num_heads = data.get("num_heads").item<int64_t>();
  auto run = [&]() {
    return std::get<0>(torch_mha::multi_head_attention(
        query, query, query, query.size(-1), num_heads, data.get("in_proj_weight"),
        data.get("in_proj_bias"), std::nullopt, std::nullopt, false, 0.0,
        data.get("out_proj_weight"), data.get("out_proj_bias"), /*training=*/false));
  };
  const at::Tensor serial = run();
  constexpr int kThreads = 4;
  std::vector<at::Tensor> results(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t]() {
      for (int repeat = 0; repeat < 5; ++repeat) {
        results[t] = run();
      }
    });
  }
  for (auto& thread : threads) {
    thread.join();
  }
  bool identical = true;
  for (const auto& result : results) {
    identical = identical && at::equal(result, serial);
  }
  check.expect("4 C++ threads give the serial result bitwise", identical);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DATA.pt\n", argv[0]);
    return 2;
  }
  const TensorFile data(argv[1]);
  Checker check;
  std::printf("torch_mha %s\n", torch_mha::build_info().c_str());
  check_layer_against_python(data, check);
  check_core_against_aten(check);
  check_variants_against_aten(check);
  check_concurrent_calls(data, check);
  std::printf("%d failure(s)\n", check.failures());
  return check.failures();
}
