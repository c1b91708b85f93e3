// Included by the translation units that compile the CUDA kernels as host C++. The library's
// headers come first, then the CUDA spellings of cuda_on_cpu_device.h, then the kernels (see the
// include order note there).
#pragma once

// clang-format off
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "attention_args.h"
#include "attention_params.h"
#include "common/dropout.h"
#include "common/masking.h"
#include "common/softmax.h"
#include "cuda/launch.h"
#include "cuda_on_cpu.h"
#include "fiber_launcher.h"

#include "cuda_on_cpu_device.h"

#include "cuda/attention_launch.h"
// clang-format on

namespace cuda_on_cpu {

template <typename acc_t, typename Kernel, typename... Args>
void FiberLauncher::run(Kernel kernel, const torch_mha::cuda::KernelLaunch& launch,
                        const Args&... args) {
  if (launch.blocks == 0) {
    return;
  }
  LaunchRecord record{function_name(reinterpret_cast<const void*>(kernel)), launch.blocks,
                      launch.threads, static_cast<size_t>(launch.shared_values) * sizeof(acc_t)};
  auto body = [&] { kernel(args...); };
  cuda_on_cpu::launch({record.kernel, record.blocks, record.threads, record.shared_bytes}, body);
  launches_.push_back(std::move(record));
}

}  // namespace cuda_on_cpu
