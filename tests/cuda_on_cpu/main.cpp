// cuda_on_cpu: runs the CUDA backend of torch_mha on the CPU (the fiber runtime of cuda_on_cpu.h,
// built with AddressSanitizer and UndefinedBehaviorSanitizer). Driven by tests/test_cuda_on_cpu.py.
//
//   cuda_on_cpu run SCHEDULE[,SCHEDULE...] INPUT.pt=OUTPUT.pt...
//       Each INPUT.pt holds one problem: the op's arguments as buffers of a scripted module
//       (tests/cpp/check.h's TensorFile): query, key, value and the optional tensors under the
//       names of AttentionForwardArgs; the non-tensor arguments as 0-d tensors (is_causal,
//       scale, ...); for the backward, grad_output (and grad_weights, compute_mask_grad; output
//       and softmax_stats to differentiate given forward results instead of the harness's own).
//       For each SCHEDULE (inorder, reverse, random:<seed>), runs the forward, then the backward
//       on the forward's results, and saves every result as "<schedule>/<name>" in OUTPUT.pt
//       (torch.load reads it). Prints one line per problem and per kernel launch; an exception
//       of the host code (a failed argument check) is printed and exits with status 1.
//   cuda_on_cpu serve
//       Reads commands from standard input, one per line ("run SCHEDULES INPUT.pt=OUTPUT.pt..."),
//       and answers each with the line "cuda_on_cpu: status N" (N: what `run` would exit with).
//       The tests keep one such process for the session, so that LibTorch loads once; a harness
//       failure or a sanitizer report still ends the process.
//   cuda_on_cpu selftest NAME [SCHEDULE]
//       Runs one of the faulty or checking kernels of selftest.cpp.
#include <torch/script.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

#include "../cpp/check.h"
#include "attention_args.h"
#include "cuda_on_cpu.h"
#include "fiber_launcher.h"

namespace cuda_on_cpu {
int run_selftest(const std::string& name);
}

namespace {

using torch_mha::AttentionBackwardArgs;
using torch_mha::AttentionForwardArgs;
using torch_mha_test::TensorFile;

// Python saves each input tensor as its whole storage ("<name>__storage") and its geometry
// ("<name>__geometry": dim, sizes, strides, storage offset), so that strided views (expanded,
// transposed, sliced) arrive as they were.
bool has_tensor(const TensorFile& file, const std::string& name) {
  return file.has(name + "__storage");
}

at::Tensor tensor(const TensorFile& file, const std::string& name) {
  const at::Tensor storage = file.get(name + "__storage");
  const at::Tensor geometry = file.get(name + "__geometry").contiguous();
  const int64_t* g = geometry.const_data_ptr<int64_t>();
  const int64_t dim = g[0];
  TORCH_CHECK(geometry.numel() == 2 + 2 * dim, "bad geometry of ", name);
  return storage.as_strided(at::IntArrayRef(g + 1, dim), at::IntArrayRef(g + 1 + dim, dim),
                            g[1 + 2 * dim]);
}

std::optional<at::Tensor> optional_tensor(const TensorFile& file, const std::string& name) {
  return has_tensor(file, name) ? std::optional<at::Tensor>(tensor(file, name)) : std::nullopt;
}

template <typename T>
T scalar(const TensorFile& file, const std::string& name, T absent) {
  return file.has(name) ? file.get(name).item<T>() : absent;
}

AttentionForwardArgs forward_args(const TensorFile& file) {
  AttentionForwardArgs args;
  args.query = tensor(file, "query");
  args.key = tensor(file, "key");
  args.value = tensor(file, "value");
  args.attn_mask = optional_tensor(file, "attn_mask");
  args.key_padding_mask = optional_tensor(file, "key_padding_mask");
  args.is_causal = scalar(file, "is_causal", false);
  if (file.has("scale")) {
    args.scale = file.get("scale").item<double>();
  }
  args.dropout_p = scalar(file, "dropout_p", 0.0);
  args.dropout_seed = optional_tensor(file, "dropout_seed");
  args.need_weights = scalar(file, "need_weights", false);
  args.average_weights = scalar(file, "average_weights", false);
  args.window_left = scalar<int64_t>(file, "window_left", -1);
  args.window_right = scalar<int64_t>(file, "window_right", -1);
  args.alibi_slopes = optional_tensor(file, "alibi_slopes");
  args.softcap = scalar(file, "softcap", 0.0);
  args.sinks = optional_tensor(file, "sinks");
  args.cu_seqlens_q = optional_tensor(file, "cu_seqlens_q");
  args.cu_seqlens_k = optional_tensor(file, "cu_seqlens_k");
  args.max_seqlen_q = scalar<int64_t>(file, "max_seqlen_q", 0);
  args.max_seqlen_k = scalar<int64_t>(file, "max_seqlen_k", 0);
  return args;
}

void print_launches(const std::string& schedule, const cuda_on_cpu::FiberLauncher& launcher) {
  for (const cuda_on_cpu::LaunchRecord& launch : launcher.launches()) {
    std::printf("launch %s | %s | blocks %lld | threads %d | shared bytes %zu\n", schedule.c_str(),
                launch.kernel.c_str(), static_cast<long long>(launch.blocks), launch.threads,
                launch.shared_bytes);
  }
  std::fflush(stdout);
}

void run(const std::string& input, const std::string& output,
         const std::vector<std::string>& schedules) {
  std::printf("problem %s\n", input.c_str());
  const TensorFile file(input);
  const AttentionForwardArgs forward = forward_args(file);
  c10::Dict<std::string, at::Tensor> results;
  for (const std::string& name : schedules) {
    const cuda_on_cpu::Schedule schedule = cuda_on_cpu::Schedule::parse(name);
    cuda_on_cpu::set_schedule(schedule);
    cuda_on_cpu::FiberLauncher launcher;
    auto [out, stats, weights] = cuda_on_cpu::fiber_attention_forward(forward, launcher);
    results.insert(name + "/output", out);
    results.insert(name + "/softmax_stats", stats);
    results.insert(name + "/weights", weights);
    if (has_tensor(file, "grad_output")) {
      AttentionBackwardArgs backward;
      backward.grad_output = tensor(file, "grad_output");
      backward.forward = forward;
      backward.grad_weights = optional_tensor(file, "grad_weights");
      // As the op's adapter does: the weights are an output of the differentiated call iff
      // their gradient is given.
      backward.forward.need_weights = backward.grad_weights.has_value();
      backward.output = has_tensor(file, "output") ? tensor(file, "output") : out;
      backward.softmax_stats =
          has_tensor(file, "softmax_stats") ? tensor(file, "softmax_stats") : stats;
      backward.compute_mask_grad = scalar(file, "compute_mask_grad", false);
      auto [grad_query, grad_key, grad_value, grad_mask, grad_sinks] =
          cuda_on_cpu::fiber_attention_backward(backward, launcher);
      results.insert(name + "/grad_query", grad_query);
      results.insert(name + "/grad_key", grad_key);
      results.insert(name + "/grad_value", grad_value);
      results.insert(name + "/grad_mask", grad_mask);
      results.insert(name + "/grad_sinks", grad_sinks);
    }
    print_launches(name, launcher);
  }
  const std::vector<char> bytes = torch::jit::pickle_save(c10::IValue(results));
  std::ofstream(output, std::ios::binary).write(bytes.data(), static_cast<long>(bytes.size()));
}

std::vector<std::string> split(const std::string& text, char separator) {
  std::vector<std::string> parts;
  size_t start = 0;
  for (size_t end; (end = text.find(separator, start)) != std::string::npos; start = end + 1) {
    parts.push_back(text.substr(start, end - start));
  }
  parts.push_back(text.substr(start));
  return parts;
}

int run_all(const std::vector<std::string>& arguments) {
  if (arguments.size() < 3) {
    std::fprintf(stderr, "usage: run SCHEDULE[,SCHEDULE...] INPUT.pt=OUTPUT.pt...\n");
    return 2;
  }
  const std::vector<std::string> schedules = split(arguments[1], ',');
  for (size_t i = 2; i < arguments.size(); ++i) {
    const size_t equals = arguments[i].rfind('=');
    if (equals == std::string::npos) {
      std::fprintf(stderr, "expected INPUT.pt=OUTPUT.pt, got %s\n", arguments[i].c_str());
      return 2;
    }
    try {
      run(arguments[i].substr(0, equals), arguments[i].substr(equals + 1), schedules);
    } catch (const c10::Error& error) {
      std::fflush(stdout);
      std::fprintf(stderr, "cuda_on_cpu: error: %s\n", error.what_without_backtrace());
      return 1;
    } catch (const std::exception& error) {
      std::fflush(stdout);
      std::fprintf(stderr, "cuda_on_cpu: error: %s\n", error.what());
      return 1;
    }
  }
  std::printf("cuda_on_cpu: %zu problem(s) x %zu schedule(s) done\n", arguments.size() - 2,
              schedules.size());
  return 0;
}

int serve() {
  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream words(line);
    std::vector<std::string> arguments{std::istream_iterator<std::string>(words),
                                       std::istream_iterator<std::string>()};
    int status = 2;
    if (!arguments.empty() && arguments[0] == "run") {
      status = run_all(arguments);
    } else {
      std::fprintf(stderr, "cuda_on_cpu serve: unknown command: %s\n", line.c_str());
    }
    std::fflush(stderr);
    std::printf("cuda_on_cpu: status %d\n", status);
    std::fflush(stdout);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::string> arguments(argv + 1, argv + argc);
  if (!arguments.empty() && arguments[0] == "run") {
    return run_all(arguments);
  }
  if (arguments.size() == 1 && arguments[0] == "serve") {
    return serve();
  }
  if (arguments.size() >= 2 && arguments.size() <= 3 && arguments[0] == "selftest") {
    cuda_on_cpu::set_schedule(
        cuda_on_cpu::Schedule::parse(arguments.size() == 3 ? arguments[2] : "inorder"));
    return cuda_on_cpu::run_selftest(arguments[1]);
  }
  std::fprintf(stderr,
               "usage: %s run SCHEDULE[,SCHEDULE...] INPUT.pt=OUTPUT.pt...\n"
               "       %s serve\n"
               "       %s selftest NAME [SCHEDULE]\n",
               argv[0], argv[0], argv[0]);
  return 2;
}
