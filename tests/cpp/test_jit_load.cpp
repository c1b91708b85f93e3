// Loads a TorchScript model that uses torch_mha (saved by Python), runs forward and backward and
// one SGD step in C++ with no Python anywhere, and compares with reference tensors Python saved.
//
//   test_jit_load MODEL.pt DATA.pt
#include <torch/script.h>
#include <torch_mha.h>

#include <algorithm>
#include <cstdio>
#include <string>

#include "check.h"

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s MODEL.pt DATA.pt\n", argv[0]);
    return 2;
  }
  torch::jit::Module model = torch::jit::load(argv[1]);
  const torch_mha_test::TensorFile data(argv[2]);
  torch_mha_test::Checker check;
  const double tolerance = 1e-10;  // float64 on both sides

  at::Tensor input = data.get("input").clone().requires_grad_(true);
  at::Tensor output =
      model.forward({input, data.get("key_padding_mask"), data.get("attn_mask")}).toTensor();
  check.expect("output requires grad (C++ autograd kernel)", output.requires_grad());
  output.backward(data.get("grad_output"));
  check.close("output", output, data.get("output"), tolerance);
  check.close("grad of the input", input.grad(), data.get("grad_input"), tolerance);

  // One SGD step on every parameter, as Python did.
  const double lr = data.get("lr").item<double>();
  int checked = 0;
  for (const auto& parameter : model.named_parameters(/*recurse=*/true)) {
    std::string key = parameter.name;
    std::replace(key.begin(), key.end(), '.', '_');
    check.close("grad " + parameter.name, parameter.value.grad(), data.get("grad_" + key),
                tolerance);
    {
      torch::NoGradGuard no_grad;
      parameter.value.sub_(lr * parameter.value.grad());
    }
    check.close("after SGD step " + parameter.name, parameter.value, data.get("step_" + key),
                tolerance);
    ++checked;
  }
  check.expect("every parameter compared (" + std::to_string(checked) + ")",
               checked == data.get("num_parameters").item<int64_t>());
  std::printf("%d failure(s)\n", check.failures());
  return check.failures();
}
