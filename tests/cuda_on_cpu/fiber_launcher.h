// The CUDA backend's host code (csrc/cuda/attention_launch.h) with a launcher that runs each
// kernel on the CPU fiber runtime (cuda_on_cpu.h): the same checks, allocations, parameters,
// dtype / head-dim dispatch, launch sequence, grid sizes and shared-memory sizes as a GPU run.
#pragma once

#include <string>
#include <vector>

#include "attention_args.h"
#include "cuda/launch.h"
#include "kvcache.h"

namespace cuda_on_cpu {

struct LaunchRecord {
  std::string kernel;
  int64_t blocks = 0;
  int threads = 0;
  size_t shared_bytes = 0;
};

// Runs each launch as cuda/attention_cuda.cu's CudaLauncher would on a GPU: nothing for an empty
// grid, one-dimensional grid, shared memory = launch.shared_values values of acc_t.
class FiberLauncher {
 public:
  template <typename acc_t, typename Kernel, typename... Args>
  void run(Kernel kernel, const torch_mha::cuda::KernelLaunch& launch, const Args&... args);

  const std::vector<LaunchRecord>& launches() const { return launches_; }

 private:
  std::vector<LaunchRecord> launches_;
};

// run_attention_forward / run_attention_backward with a FiberLauncher (fiber_forward.cpp and
// fiber_backward.cpp: one translation unit each, so that they compile in parallel).
torch_mha::ForwardResult fiber_attention_forward(const torch_mha::AttentionForwardArgs& args,
                                                 FiberLauncher& launcher);
torch_mha::BackwardResult fiber_attention_backward(const torch_mha::AttentionBackwardArgs& args,
                                                   FiberLauncher& launcher);
// attention_with_kvcache as the CUDA backend registers it (attention_with_kvcache_on of its
// forward): kvcache.h's checks and in-place cache write, then the forward with per-sequence key
// lengths, here run with `launcher`.
at::Tensor fiber_attention_with_kvcache(const torch_mha::KvCacheArgs& args,
                                        FiberLauncher& launcher);

}  // namespace cuda_on_cpu
