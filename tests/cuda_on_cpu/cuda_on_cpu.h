// A CUDA runtime on the CPU, for tests: runs CUDA kernels compiled as host C++.
//
// Every CUDA thread of a block is a fiber (its own stack, switched in user space on one OS
// thread); the blocks of a grid run one after another. A fiber runs until it reaches a barrier
// (__syncthreads, __syncwarp, a warp shuffle) or returns; a barrier releases its threads once all
// of them have arrived, and which runnable thread goes next is chosen by the schedule (in order,
// reverse order, or seeded random order). A barrier that can never complete (threads returned, or
// wait at another barrier) stops the program with a message naming the kernel, block, barrier and
// counts. Dynamic shared memory is a heap buffer of exactly the launch's size, filled with NaN
// bytes before each block, so that AddressSanitizer reports any access past its end and a read of
// an element nobody wrote produces a wrong result. See docs/cuda.md ("The CPU harness").
//
// This header is the runtime's interface; cuda_on_cpu_device.h adds the CUDA spellings that
// kernels use (threadIdx, __syncthreads, __global__, ...).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

namespace cuda_on_cpu {

struct Dim3 {
  unsigned int x = 1, y = 1, z = 1;
};

// Which runnable thread of the block runs next, and in which order the blocks run.
enum class Order { kInOrder, kReverse, kRandom };

struct Schedule {
  Order order = Order::kInOrder;
  uint64_t seed = 0;  // kRandom only

  // "inorder", "reverse" or "random:<seed>"; aborts with a message on anything else.
  static Schedule parse(const std::string& text);
  std::string name() const;
};

// Applies to the launches that follow; a random schedule restarts its generator from the seed.
void set_schedule(const Schedule& schedule);

struct LaunchConfig {
  std::string kernel;  // for messages
  int64_t blocks = 0;
  int threads = 0;  // per block: a multiple of 32, at most 1024
  size_t shared_bytes = 0;
};

// Runs body(context) as every thread of every block of the grid; returns when all have returned.
void launch(const LaunchConfig& config, void (*body)(void*), void* context);

template <typename Fn>
void launch(const LaunchConfig& config, Fn& fn) {
  launch(config, [](void* f) { (*static_cast<Fn*>(f))(); }, &fn);
}

// The demangled name of a function, e.g. a kernel template instance (the program must export
// its symbols: -rdynamic); "kernel at 0x..." if unknown.
std::string function_name(const void* function);

// What a kernel calls, through the macros below; valid only inside a kernel.
const Dim3& thread_idx();
const Dim3& block_idx();
const Dim3& block_dim();
const Dim3& grid_dim();
unsigned char* dynamic_shared_memory();
void sync_threads(const char* file, int line);
void sync_warp(unsigned mask, const char* file, int line);
// Lane l receives `bits` of lane l ^ lane_mask; every lane of the warp must take part.
uint64_t shuffle_xor(unsigned mask, uint64_t bits, int lane_mask, int width, const char* file,
                     int line);

}  // namespace cuda_on_cpu
