// Every forward kernel instance (4 dtypes x 3 head dims) compiled as host C++.
#include "fiber_kernels.h"

namespace cuda_on_cpu {

torch_mha::ForwardResult fiber_attention_forward(const torch_mha::AttentionForwardArgs& args,
                                                 FiberLauncher& launcher) {
  return torch_mha::cuda::run_attention_forward(args, launcher);
}

}  // namespace cuda_on_cpu
