// The CUDA spellings that kernels use (threadIdx, __syncthreads, __shfl_xor_sync, __global__,
// ...), mapped onto the fiber runtime of cuda_on_cpu.h.
//
// Include order: every library header first (c10, ATen, the kernels' own includes), then this
// file, then the kernels: the macros defined here must not reach the library headers.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda_on_cpu.h"

namespace cuda_on_cpu {

struct SyncWarpAt {
  const char* file;
  int line;
  void operator()(unsigned mask = 0xffffffffu) const { sync_warp(mask, file, line); }
};

struct ShuffleAt {
  const char* file;
  int line;

  template <typename T>
  T xor_sync(unsigned mask, T value, int lane_mask, int width = 32) const {
    static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= sizeof(uint64_t),
                  "__shfl_xor_sync: values of at most 8 bytes");
    uint64_t bits = 0;
    std::memcpy(&bits, &value, sizeof(T));
    bits = shuffle_xor(mask, bits, lane_mask, width, file, line);
    T result;
    std::memcpy(&result, &bits, sizeof(T));
    return result;
  }
};

// Fibers switch only at barriers, so a read-modify-write between two barriers is atomic.
template <typename T>
T atomic_add(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}

}  // namespace cuda_on_cpu

// CUDA's math headers declare float overloads of the C math functions in the global namespace
// (exp(float) is expf, not exp(double)); <cmath> puts them in std only.
using std::exp;
using std::log;
using std::sqrt;
using std::tanh;

#define threadIdx (::cuda_on_cpu::thread_idx())
#define blockIdx (::cuda_on_cpu::block_idx())
#define blockDim (::cuda_on_cpu::block_dim())
#define gridDim (::cuda_on_cpu::grid_dim())
#define warpSize 32

#define __syncthreads() ::cuda_on_cpu::sync_threads(__FILE__, __LINE__)
#define __syncwarp(...) ::cuda_on_cpu::SyncWarpAt{__FILE__, __LINE__}(__VA_ARGS__)
#define __shfl_xor_sync(...) ::cuda_on_cpu::ShuffleAt{__FILE__, __LINE__}.xor_sync(__VA_ARGS__)
#define atomicAdd(address, value) ::cuda_on_cpu::atomic_add(address, value)

#define __global__
#define __device__
#define __host__
#define __forceinline__ __inline__ __attribute__((always_inline))
#define __launch_bounds__(...)
// Static shared memory would silently become per-thread memory here: refuse to compile it.
#define __shared__ cuda_on_cpu_does_not_support_static_shared_memory
#define TORCH_MHA_DYNAMIC_SHARED_MEMORY(name) \
  unsigned char* const name = ::cuda_on_cpu::dynamic_shared_memory()
