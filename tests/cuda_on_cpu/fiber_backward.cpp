// Every backward kernel instance (4 dtypes x 3 head dims) compiled as host C++.
#include "fiber_kernels.h"

namespace cuda_on_cpu {

torch_mha::BackwardResult fiber_attention_backward(const torch_mha::AttentionBackwardArgs& args,
                                                   FiberLauncher& launcher) {
  return torch_mha::cuda::run_attention_backward(args, launcher);
}

}  // namespace cuda_on_cpu
