// CUDA entry points of the core attention ops. Each call goes where select_cuda_backend()
// (backend_selection.h) sends it: PyTorch's fused tensor-core kernels (cuda/fused_attention.cpp)
// or torch_mha's own kernels, whose host side is cuda/attention_launch.h, run under a device
// guard with kernels launched on the current stream.
#include <ATen/Context.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <limits>

#include "backend_selection.h"
#include "cuda/attention_launch.h"
#include "cuda/fused_attention.h"
#include "kvcache.h"

namespace torch_mha::cuda {
namespace {

// Runs a kernel on the current stream: one-dimensional grid, dynamic shared memory in values
// of acc_t (kernels above 48 KiB must opt in), launch checked.
struct CudaLauncher {
  cudaStream_t stream;

  template <typename acc_t, typename Kernel, typename... Args>
  void run(Kernel kernel, const KernelLaunch& launch, const Args&... args) {
    if (launch.blocks == 0) {
      return;
    }
    TORCH_CHECK(launch.blocks <= std::numeric_limits<int32_t>::max(),
                "torch_mha: problem too large for one kernel launch (", launch.blocks,
                " thread blocks)");
    const size_t bytes = static_cast<size_t>(launch.shared_values) * sizeof(acc_t);
    int device = 0;
    int limit = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    TORCH_CHECK(bytes <= static_cast<size_t>(limit), "torch_mha: this head_dim/dtype needs ", bytes,
                " bytes of shared memory per block, but the device allows ", limit);
    if (bytes > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(bytes)));
    }
    kernel<<<static_cast<unsigned int>(launch.blocks), launch.threads, bytes, stream>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// The backend for a call on the current device, under the process's settings.
CudaBackend choose_backend(const AttentionForwardArgs& args, bool backward, bool mask_grad) {
  // Attributes rather than at::cuda::getCurrentDeviceProperties(): ATen/cuda/CUDAContext.h pulls
  // in cuSPARSE/cuBLAS headers, which a pip-installed CUDA torch does not always ship.
  const int device = c10::cuda::current_device();
  int major = 0;
  int minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  const char* requested = std::getenv("TORCH_MHA_CUDA_BACKEND");
  return select_cuda_backend(cuda_backend_query(args, backward, mask_grad, major, minor,
                                                at::globalContext().deterministicAlgorithms(),
                                                requested == nullptr ? "" : requested))
      .backend;
}

ForwardResult attention_forward_cuda(const AttentionForwardArgs& args) {
  const c10::cuda::CUDAGuard device_guard(args.query.device());
  const CudaBackend backend = choose_backend(args, /*backward=*/false, /*mask_grad=*/false);
  if (backend != CudaBackend::kOwn) {
    return fused_attention_forward(args, backend);
  }
  CudaLauncher launcher{c10::cuda::getCurrentCUDAStream()};
  return run_attention_forward(args, launcher);
}

BackwardResult attention_backward_cuda(const AttentionBackwardArgs& args) {
  const c10::cuda::CUDAGuard device_guard(args.forward.query.device());
  const CudaBackend backend = choose_backend(args.forward, /*backward=*/true,
                                             /*mask_grad=*/args.compute_mask_grad);
  if (backend != CudaBackend::kOwn) {
    return fused_attention_backward(args, backend);
  }
  CudaLauncher launcher{c10::cuda::getCurrentCUDAStream()};
  return run_attention_backward(args, launcher);
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_mha, CUDA, m) {
  register_core_attention_kernels<&attention_forward_cuda, &attention_backward_cuda>(m);
  register_kvcache_kernel<&attention_with_kvcache_on<&attention_forward_cuda>>(m);
}

}  // namespace torch_mha::cuda
