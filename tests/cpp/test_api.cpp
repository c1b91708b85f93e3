// Uses torch_mha's C++ API directly, with autograd, from a LibTorch program:
//  * torch_mha::multi_head_attention against nn.MultiheadAttention results saved by Python;
//  * torch_mha::attention_forward against plain ATen attention computed here;
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
  check_concurrent_calls(data, check);
  std::printf("%d failure(s)\n", check.failures());
  return check.failures();
}
