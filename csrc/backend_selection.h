// Which kernel runs a CUDA attention call: torch_mha's own SIMT kernels, or one of PyTorch's
// fused tensor-core kernels (flash, memory-efficient, cuDNN) where they compute exactly what was
// asked. A pure function of shapes, dtypes, flags and the device's compute capability, so it is
// unit-tested on the CPU and answers torch_mha.explain() anywhere; the CUDA backend
// (cuda/attention_cuda.cu) calls it for every forward and backward.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace torch_mha {

enum class CudaBackend { kOwn, kFlash, kEfficient, kCudnn };

const char* backend_name(CudaBackend backend);

// Everything the choice depends on.
struct CudaBackendQuery {
  c10::ScalarType dtype = c10::ScalarType::Float;
  int64_t batch = 0;
  int64_t heads = 0;
  int64_t kv_heads = 0;
  int64_t query_len = 0;
  int64_t key_len = 0;
  int64_t head_dim = 0;
  int64_t value_dim = 0;
  bool varlen = false;
  bool key_lengths = false;  // per-sequence key lengths (a KV cache)
  bool has_attn_mask = false;
  bool has_key_padding_mask = false;
  bool is_causal = false;
  int64_t window_left = -1;
  int64_t window_right = -1;
  bool has_alibi = false;
  double softcap = 0.0;
  bool has_sinks = false;
  double dropout_p = 0.0;
  bool need_weights = false;
  bool backward = false;       // choosing the kernel of a backward call
  bool mask_grad = false;      // the backward must return the gradient of the masks
  bool deterministic = false;  // torch.use_deterministic_algorithms(True)
  int device_major = 0;        // compute capability of the GPU
  int device_minor = 0;
  // TORCH_MHA_CUDA_BACKEND: "" or "auto" (choose), "own", "flash", "efficient" or "cudnn" (use
  // that one where it can run, else choose).
  std::string requested;
};

struct CudaBackendChoice {
  CudaBackend backend = CudaBackend::kOwn;
  // Every fused candidate that was not chosen, with the reason.
  std::vector<std::pair<CudaBackend, std::string>> rejected;
};

CudaBackendChoice select_cuda_backend(const CudaBackendQuery& query);

struct AttentionForwardArgs;

// The query of a call: its arguments, plus what the selection also depends on.
CudaBackendQuery cuda_backend_query(const AttentionForwardArgs& args, bool backward, bool mask_grad,
                                    int device_major, int device_minor, bool deterministic,
                                    const std::string& requested);

// select_cuda_backend() for a dense call described by tensors and flags, as names: (chosen,
// rejected candidates, their reasons). The op torch_mha::_explain_cuda_backend, behind
// torch_mha.explain() in Python.
std::tuple<std::string, std::vector<std::string>, std::vector<std::string>> explain_cuda_backend(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    bool is_causal, double dropout_p, bool need_weights, int64_t window_left, int64_t window_right,
    const std::optional<at::Tensor>& alibi_slopes, double softcap,
    const std::optional<at::Tensor>& sinks, bool backward, bool mask_grad, int64_t device_major,
    int64_t device_minor, bool deterministic, const std::string& requested);

}  // namespace torch_mha
