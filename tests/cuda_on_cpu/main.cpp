// cuda_on_cpu: runs the CUDA backend of torch_mha on the CPU (the fiber runtime of cuda_on_cpu.h,
// built with AddressSanitizer and UndefinedBehaviorSanitizer). Driven by tests/test_cuda_on_cpu.py.
//
//   cuda_on_cpu run SCHEDULE[,SCHEDULE...] INPUT=OUTPUT...
//       Each INPUT is a tensor bundle (below) holding one problem: the op's arguments under the
//       names of AttentionForwardArgs; the non-tensor arguments as 0-d tensors (is_causal,
//       scale, ...); for the backward, grad_output (and grad_weights, compute_mask_grad; output
//       and softmax_stats to differentiate given forward results instead of the harness's own).
//       A problem with k_cache is a call of attention_with_kvcache instead (query, k_cache,
//       v_cache, cache_seqlens, optional key/value and the modifiers): the op's own host code
//       (kvcache.h) with the CUDA backend's forward.
//       For each SCHEDULE (inorder, reverse, random:<seed>), runs the forward, then the backward
//       on the forward's results, and writes every result as "<schedule>/<name>" to the bundle
//       OUTPUT. Prints one line per problem and per kernel launch; an exception of the host code
//       (a failed argument check) is printed and exits with status 1.
//   cuda_on_cpu serve
//       Reads commands from standard input, one per line ("run SCHEDULES INPUT=OUTPUT..."), and
//       answers each with the line "cuda_on_cpu: status N" (N: what `run` would exit with). The
//       tests keep one such process for the session, so that LibTorch loads once; a harness
//       failure or a sanitizer report still ends the process.
//
// Tensor bundles: a plain binary format, so that the program needs ATen only (TorchScript's
// serialization headers would double its build time). "CUDAONCPU-BUNDLE-1\n", int64 count, then
// per tensor (integers int64, little endian): name length, name, c10::ScalarType code, dim,
// sizes, strides, storage offset, storage element count, the storage's bytes. A tensor travels as
// its whole storage plus its geometry, so that strided views arrive as they were and results
// keep their memory layout.
#include <ATen/ATen.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "attention_args.h"
#include "cuda_on_cpu.h"
#include "fiber_launcher.h"
#include "kvcache.h"

namespace {

using torch_mha::AttentionBackwardArgs;
using torch_mha::AttentionForwardArgs;

constexpr char kBundleMagic[] = "CUDAONCPU-BUNDLE-1\n";

class Bundle {
 public:
  static Bundle read(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    TORCH_CHECK(in, "cannot open ", path);
    std::string magic(sizeof(kBundleMagic) - 1, '\0');
    in.read(magic.data(), static_cast<std::streamsize>(magic.size()));
    TORCH_CHECK(in && magic == kBundleMagic, path, " is not a tensor bundle");
    Bundle bundle;
    const int64_t count = read_int(in);
    for (int64_t i = 0; i < count; ++i) {
      std::string name(static_cast<size_t>(read_int(in)), '\0');
      in.read(name.data(), static_cast<std::streamsize>(name.size()));
      const auto dtype = static_cast<at::ScalarType>(read_int(in));
      const int64_t dim = read_int(in);
      std::vector<int64_t> geometry(static_cast<size_t>(2 * dim + 2));
      for (int64_t& value : geometry) {
        value = read_int(in);
      }
      const at::Tensor storage = at::empty({geometry.back()}, at::TensorOptions().dtype(dtype));
      in.read(static_cast<char*>(storage.data_ptr()),
              static_cast<std::streamsize>(storage.nbytes()));
      TORCH_CHECK(in, path, ": truncated at ", name);
      bundle.tensors_[name] =
          storage.as_strided(at::IntArrayRef(geometry.data(), dim),
                             at::IntArrayRef(geometry.data() + dim, dim), geometry[2 * dim]);
    }
    return bundle;
  }

  void write(const std::string& path) const {
    std::ofstream out(path, std::ios::binary);
    out.write(kBundleMagic, sizeof(kBundleMagic) - 1);
    write_int(out, static_cast<int64_t>(tensors_.size()));
    for (const auto& [name, t] : tensors_) {
      write_int(out, static_cast<int64_t>(name.size()));
      out.write(name.data(), static_cast<std::streamsize>(name.size()));
      write_int(out, static_cast<int64_t>(t.scalar_type()));
      write_int(out, t.dim());
      for (const int64_t size : t.sizes()) {
        write_int(out, size);
      }
      for (const int64_t stride : t.strides()) {
        write_int(out, stride);
      }
      write_int(out, t.storage_offset());
      const size_t bytes = t.storage().nbytes();
      write_int(out, static_cast<int64_t>(bytes / t.element_size()));
      out.write(static_cast<const char*>(t.storage().data()), static_cast<std::streamsize>(bytes));
    }
    TORCH_CHECK(out, "cannot write ", path);
  }

  bool has(const std::string& name) const { return tensors_.count(name) > 0; }
  const at::Tensor& get(const std::string& name) const {
    const auto found = tensors_.find(name);
    TORCH_CHECK(found != tensors_.end(), "the problem has no tensor ", name);
    return found->second;
  }
  void put(const std::string& name, const at::Tensor& t) { tensors_[name] = t; }

 private:
  static int64_t read_int(std::istream& in) {
    int64_t value = 0;
    in.read(reinterpret_cast<char*>(&value), sizeof(value));
    return value;
  }
  static void write_int(std::ostream& out, int64_t value) {
    out.write(reinterpret_cast<const char*>(&value), sizeof(value));
  }

  std::map<std::string, at::Tensor> tensors_;
};

std::optional<at::Tensor> optional_tensor(const Bundle& file, const std::string& name) {
  return file.has(name) ? std::optional<at::Tensor>(file.get(name)) : std::nullopt;
}

template <typename T>
T scalar(const Bundle& file, const std::string& name, T absent) {
  return file.has(name) ? file.get(name).item<T>() : absent;
}

AttentionForwardArgs forward_args(const Bundle& file) {
  AttentionForwardArgs args;
  args.query = file.get("query");
  args.key = file.get("key");
  args.value = file.get("value");
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

// attention_with_kvcache's arguments (the schema's defaults where absent).
torch_mha::KvCacheArgs kvcache_args(const Bundle& file) {
  torch_mha::KvCacheArgs args;
  args.query = file.get("query");
  args.k_cache = file.get("k_cache");
  args.v_cache = file.get("v_cache");
  args.cache_seqlens = file.get("cache_seqlens");
  args.key = optional_tensor(file, "key");
  args.value = optional_tensor(file, "value");
  if (file.has("scale")) {
    args.scale = file.get("scale").item<double>();
  }
  args.window_left = scalar<int64_t>(file, "window_left", -1);
  args.window_right = scalar<int64_t>(file, "window_right", 0);
  args.alibi_slopes = optional_tensor(file, "alibi_slopes");
  args.softcap = scalar(file, "softcap", 0.0);
  args.sinks = optional_tensor(file, "sinks");
  return args;
}

void run_attention(const Bundle& file, const std::string& name,
                   cuda_on_cpu::FiberLauncher& launcher, Bundle& results) {
  const AttentionForwardArgs forward = forward_args(file);
  auto [out, stats, weights] = cuda_on_cpu::fiber_attention_forward(forward, launcher);
  results.put(name + "/output", out);
  results.put(name + "/softmax_stats", stats);
  results.put(name + "/weights", weights);
  if (!file.has("grad_output")) {
    return;
  }
  AttentionBackwardArgs backward;
  backward.grad_output = file.get("grad_output");
  backward.forward = forward;
  backward.grad_weights = optional_tensor(file, "grad_weights");
  // As the op's adapter does: the weights are an output of the differentiated call iff their
  // gradient is given.
  backward.forward.need_weights = backward.grad_weights.has_value();
  backward.output = file.has("output") ? file.get("output") : out;
  backward.softmax_stats = file.has("softmax_stats") ? file.get("softmax_stats") : stats;
  backward.compute_mask_grad = scalar(file, "compute_mask_grad", false);
  auto [grad_query, grad_key, grad_value, grad_mask, grad_sinks] =
      cuda_on_cpu::fiber_attention_backward(backward, launcher);
  results.put(name + "/grad_query", grad_query);
  results.put(name + "/grad_key", grad_key);
  results.put(name + "/grad_value", grad_value);
  results.put(name + "/grad_mask", grad_mask);
  results.put(name + "/grad_sinks", grad_sinks);
}

void run_kvcache(const Bundle& file, const std::string& name, cuda_on_cpu::FiberLauncher& launcher,
                 Bundle& results) {
  torch_mha::KvCacheArgs args = kvcache_args(file);
  // Each schedule writes into caches of its own, so that each starts from the given ones.
  args.k_cache = args.k_cache.clone();
  args.v_cache = args.v_cache.clone();
  results.put(name + "/output", cuda_on_cpu::fiber_attention_with_kvcache(args, launcher));
  results.put(name + "/k_cache", args.k_cache);
  results.put(name + "/v_cache", args.v_cache);
}

void run(const std::string& input, const std::string& output,
         const std::vector<std::string>& schedules) {
  std::printf("problem %s\n", input.c_str());
  const Bundle file = Bundle::read(input);
  Bundle results;
  for (const std::string& name : schedules) {
    cuda_on_cpu::set_schedule(cuda_on_cpu::Schedule::parse(name));
    cuda_on_cpu::FiberLauncher launcher;
    if (file.has("k_cache")) {
      run_kvcache(file, name, launcher, results);
    } else {
      run_attention(file, name, launcher, results);
    }
    print_launches(name, launcher);
  }
  results.write(output);
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
    std::fprintf(stderr, "usage: run SCHEDULE[,SCHEDULE...] INPUT=OUTPUT...\n");
    return 2;
  }
  const std::vector<std::string> schedules = split(arguments[1], ',');
  for (size_t i = 2; i < arguments.size(); ++i) {
    const size_t equals = arguments[i].rfind('=');
    if (equals == std::string::npos) {
      std::fprintf(stderr, "expected INPUT=OUTPUT, got %s\n", arguments[i].c_str());
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
  std::fprintf(stderr,
               "usage: %s run SCHEDULE[,SCHEDULE...] INPUT=OUTPUT...\n"
               "       %s serve\n",
               argv[0], argv[0]);
  return 2;
}
