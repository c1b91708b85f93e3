// Small helpers shared by the C++ test programs: reading tensors that Python saved, and
// comparisons that report the largest error.
#pragma once

#include <torch/script.h>

#include <cstdio>
#include <string>

namespace torch_mha_test {

// Python saves its tensors as buffers of a scripted module (tests/test_cpp.py).
class TensorFile {
 public:
  explicit TensorFile(const std::string& path) : module_(torch::jit::load(path)) {}
  at::Tensor get(const std::string& name) const { return module_.attr(name).toTensor(); }
  bool has(const std::string& name) const { return module_.hasattr(name); }

 private:
  torch::jit::Module module_;
};

// Counts failed comparisons; the program's exit code is the count.
class Checker {
 public:
  void close(const std::string& what, const at::Tensor& actual, const at::Tensor& expected,
             double tolerance) {
    bool ok = actual.sizes() == expected.sizes();
    double error = -1.0;
    if (ok) {
      error = (actual.to(at::kDouble) - expected.to(at::kDouble)).abs().max().item<double>();
      ok = error <= tolerance;
    }
    std::printf("%-48s max error %.3e (tolerance %.1e) %s\n", what.c_str(), error, tolerance,
                ok ? "ok" : "FAILED");
    failures_ += ok ? 0 : 1;
  }

  void expect(const std::string& what, bool condition) {
    std::printf("%-48s %s\n", what.c_str(), condition ? "ok" : "FAILED");
    failures_ += condition ? 0 : 1;
  }

  int failures() const { return failures_; }

 private:
  int failures_ = 0;
};

}  // namespace torch_mha_test
