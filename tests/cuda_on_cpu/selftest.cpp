// cuda_on_cpu_selftest NAME [SCHEDULE]: small kernels that check the harness itself
// (tests/test_cuda_on_cpu.py runs each in a process of its own): the faulty ones must be stopped
// with a clear message or a sanitizer report; the others print what they saw and exit with 0
// when it was right. A program of its own, without LibTorch, so that a process costs nothing.
#include <cmath>
#include <cstdio>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "cuda_on_cpu.h"
// clang-format off
#include "cuda_on_cpu_device.h"
// clang-format on

namespace cuda_on_cpu {
namespace {

constexpr int kThreads = 128;

// Thread t writes shared[t], then reads its neighbour's element, with or without a barrier
// between: without it, the neighbour may not have written yet and the read sees the NaN fill.
template <bool kBarrier>
__global__ void neighbour_kernel(float* out) {
  float* shared = reinterpret_cast<float*>(dynamic_shared_memory());
  shared[threadIdx.x] = static_cast<float>(threadIdx.x);
  if (kBarrier) {
    __syncthreads();
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = shared[(threadIdx.x + 1) % blockDim.x];
}

// Half of the block skips the barrier.
__global__ void partial_barrier_kernel(float* out) {
  if (threadIdx.x < kThreads / 2) {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

// Two halves of the block at two different barriers.
__global__ void divergent_barriers_kernel(float* out) {
  if (threadIdx.x < kThreads / 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

// Half of each warp leaves before a shuffle.
__global__ void partial_shuffle_kernel(float* out) {
  if (threadIdx.x % 32 >= 16) {
    return;
  }
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

__global__ void partial_mask_kernel(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1.0f, 1);
}

// Thread 127 writes one element past the end of the block's shared memory.
__global__ void shared_overflow_kernel(float* out) {
  float* shared = reinterpret_cast<float*>(dynamic_shared_memory());
  shared[threadIdx.x + 1] = 1.0f;
  out[threadIdx.x] = 1.0f;
}

// Writes one element past a local array after a barrier, i.e. on a fiber stack that has been
// switched out and back in: the stack's redzones must survive the switches.
__global__ void local_overflow_kernel(float* out) {
  float local[8];
  for (int i = 0; i < 8; ++i) {
    local[i] = static_cast<float>(i);
  }
  __syncthreads();
  volatile int index = 8;
  float* volatile element = local;  // opaque to UBSan: ASan must catch this
  element[index] = 1.0f;
  out[threadIdx.x] = local[threadIdx.x % 8];
}

// A signed integer overflow after a barrier: UndefinedBehaviorSanitizer stops the kernel.
__global__ void signed_overflow_kernel(const int* numbers, float* out) {
  __syncthreads();
  const int value = numbers[0] + numbers[1];
  out[threadIdx.x] = static_cast<float>(value);
}

// The built-ins, shuffles, __syncwarp and atomics give what CUDA gives.
__global__ void builtins_kernel(double* sums, int* errors, long long* total) {
  const int lane = threadIdx.x % 32;
  if (blockDim.x != kThreads || blockDim.y != 1 || gridDim.y != 1 || threadIdx.y != 0 ||
      blockIdx.y != 0 || blockIdx.x >= gridDim.x) {
    atomicAdd(errors, 1);
  }
  double value = lane;
  for (int offset = 16; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  if (value != 31 * 32 / 2) {
    atomicAdd(errors, 1);
  }
  // Each lane receives the value of lane ^ 5, of any 8-byte type.
  const long long partner = __shfl_xor_sync(0xffffffffu, static_cast<long long>(lane) << 40, 5);
  if (partner != static_cast<long long>(lane ^ 5) << 40) {
    atomicAdd(errors, 1);
  }
  float* shared = reinterpret_cast<float*>(dynamic_shared_memory());
  shared[threadIdx.x] = static_cast<float>(lane);
  __syncwarp();
  if (shared[(threadIdx.x / 32) * 32 + (lane + 1) % 32] != static_cast<float>((lane + 1) % 32)) {
    atomicAdd(errors, 1);
  }
  sums[blockIdx.x * blockDim.x + threadIdx.x] = value;
  atomicAdd(total, static_cast<long long>(blockIdx.x * blockDim.x + threadIdx.x));
}

template <typename Kernel, typename... Args>
void launch_kernel(const char* name, int64_t blocks, size_t shared_bytes, Kernel kernel,
                   Args... args) {
  auto body = [&] { kernel(args...); };
  launch({name, blocks, kThreads, shared_bytes}, body);
}

int neighbours(bool barrier) {
  const int blocks = 3;
  std::vector<float> out(blocks * kThreads, -1.0f);
  if (barrier) {
    launch_kernel("neighbour_kernel<true>", blocks, kThreads * sizeof(float),
                  neighbour_kernel<true>, out.data());
  } else {
    launch_kernel("neighbour_kernel<false>", blocks, kThreads * sizeof(float),
                  neighbour_kernel<false>, out.data());
  }
  int wrong = 0;
  for (int i = 0; i < blocks * kThreads; ++i) {
    wrong += out[i] != static_cast<float>((i % kThreads + 1) % kThreads);
  }
  std::printf("neighbours: %d of %d reads wrong\n", wrong, blocks * kThreads);
  return barrier && wrong > 0 ? 1 : 0;
}

int builtins() {
  const int blocks = 5;
  std::vector<double> sums(blocks * kThreads, 0.0);
  int errors = 0;
  long long total = 0;
  launch_kernel("builtins_kernel", blocks, kThreads * sizeof(float), builtins_kernel, sums.data(),
                &errors, &total);
  const long long n = blocks * kThreads;
  const bool ok = errors == 0 && total == n * (n - 1) / 2 && sums[n - 1] == 496.0;
  std::printf("builtins: %d error(s), atomic total %lld: %s\n", errors, total, ok ? "ok" : "WRONG");
  return ok ? 0 : 1;
}

int run_selftest(const std::string& name) {
  std::vector<float> out(kThreads, 0.0f);
  const std::map<std::string, std::function<int()>> tests = {
      {"neighbours_without_barrier", [] { return neighbours(false); }},
      {"neighbours_with_barrier", [] { return neighbours(true); }},
      {"builtins", builtins},
      {"partial_barrier",
       [&] {
         launch_kernel("partial_barrier_kernel", 2, 0, partial_barrier_kernel, out.data());
         return 0;
       }},
      {"divergent_barriers",
       [&] {
         launch_kernel("divergent_barriers_kernel", 1, 0, divergent_barriers_kernel, out.data());
         return 0;
       }},
      {"partial_shuffle",
       [&] {
         launch_kernel("partial_shuffle_kernel", 1, 0, partial_shuffle_kernel, out.data());
         return 0;
       }},
      {"partial_mask",
       [&] {
         launch_kernel("partial_mask_kernel", 1, 0, partial_mask_kernel, out.data());
         return 0;
       }},
      {"shared_overflow",
       [&] {
         launch_kernel("shared_overflow_kernel", 1, kThreads * sizeof(float),
                       shared_overflow_kernel, out.data());
         return 0;
       }},
      {"local_overflow",
       [&] {
         launch_kernel("local_overflow_kernel", 1, 0, local_overflow_kernel, out.data());
         return 0;
       }},
      {"signed_overflow",
       [&] {
         const int numbers[2] = {2147483647, 1};
         launch_kernel("signed_overflow_kernel", 1, 0, signed_overflow_kernel, numbers, out.data());
         return 0;
       }},
  };
  const auto test = tests.find(name);
  if (test == tests.end()) {
    std::fprintf(stderr, "unknown self-test %s\n", name.c_str());
    return 2;
  }
  const int status = test->second();
  std::printf("selftest %s: returned %d\n", name.c_str(), status);
  return status;
}

}  // namespace
}  // namespace cuda_on_cpu

int main(int argc, char** argv) {
  if (argc < 2 || argc > 3) {
    std::fprintf(stderr, "usage: %s NAME [SCHEDULE]\n", argv[0]);
    return 2;
  }
  cuda_on_cpu::set_schedule(cuda_on_cpu::Schedule::parse(argc == 3 ? argv[2] : "inorder"));
  return cuda_on_cpu::run_selftest(argv[1]);
}
