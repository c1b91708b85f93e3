// Forward and backward through PyTorch's fused CUDA attention kernels, for the calls
// select_cuda_backend() (backend_selection.h) passes on; see fused_attention.cpp.
#pragma once

#include "attention_args.h"
#include "backend_selection.h"

namespace torch_mha::cuda {

ForwardResult fused_attention_forward(const AttentionForwardArgs& args, CudaBackend backend);
BackwardResult fused_attention_backward(const AttentionBackwardArgs& args, CudaBackend backend);

}  // namespace torch_mha::cuda
