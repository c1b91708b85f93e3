// Every forward kernel instance (4 dtypes x 3 head dims) compiled as host C++, and the kv-cache
// op, whose CUDA path is the same forward with per-sequence key lengths.
#include "fiber_kernels.h"

namespace cuda_on_cpu {

torch_mha::ForwardResult fiber_attention_forward(const torch_mha::AttentionForwardArgs& args,
                                                 FiberLauncher& launcher) {
  return torch_mha::cuda::run_attention_forward(args, launcher);
}

namespace {

// attention_with_kvcache_on takes the backend's forward as a function pointer: this one runs
// with the launcher of the call in progress.
FiberLauncher* kvcache_launcher = nullptr;

torch_mha::ForwardResult kvcache_forward(const torch_mha::AttentionForwardArgs& args) {
  return torch_mha::cuda::run_attention_forward(args, *kvcache_launcher);
}

}  // namespace

at::Tensor fiber_attention_with_kvcache(const torch_mha::KvCacheArgs& args,
                                        FiberLauncher& launcher) {
  struct Reset {
    ~Reset() { kvcache_launcher = nullptr; }
  } reset;
  kvcache_launcher = &launcher;
  return torch_mha::attention_with_kvcache_on<&kvcache_forward>(args);
}

}  // namespace cuda_on_cpu
