// The fiber runtime behind cuda_on_cpu.h. One OS thread; every CUDA thread of the running block
// is a fiber; the scheduler runs the block until all its fibers have returned.
//
// Context switches: on x86-64, a hand-written switch of the callee-saved registers and the stack
// pointer. ucontext's swapcontext works too (CUDA_ON_CPU_UCONTEXT, and on other processors), but
// costs a system call per switch, and AddressSanitizer intercepts it and clears the shadow of the
// whole target stack on every switch, which removes the redzones of the live frames of the fiber
// it switches to (a write past a kernel's local array would go unreported). With the hand-written
// switch, every switch is announced to AddressSanitizer with __sanitizer_start_switch_fiber /
// __sanitizer_finish_switch_fiber instead, so that it knows which stack is current.
#include "cuda_on_cpu.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <tuple>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define CUDA_ON_CPU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CUDA_ON_CPU_ASAN 1
#endif
#endif
#ifdef CUDA_ON_CPU_ASAN
#include <sanitizer/common_interface_defs.h>
#endif

#if !defined(__x86_64__) && !defined(CUDA_ON_CPU_UCONTEXT)
#define CUDA_ON_CPU_UCONTEXT 1
#endif
#ifdef CUDA_ON_CPU_UCONTEXT
#include <ucontext.h>
#endif

#ifndef CUDA_ON_CPU_UCONTEXT
// cuda_on_cpu_switch_stack(save, next): pushes the callee-saved registers, stores the stack
// pointer in *save, loads `next` and pops the registers saved there. A new fiber's stack is
// prepared so that the first switch to it "returns" into fiber_main (make_stack below).
asm(R"(
  .text
  .p2align 4
  .globl cuda_on_cpu_switch_stack
  .hidden cuda_on_cpu_switch_stack
  .type cuda_on_cpu_switch_stack, @function
cuda_on_cpu_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_on_cpu_switch_stack, .-cuda_on_cpu_switch_stack
)");
extern "C" void cuda_on_cpu_switch_stack(void** save, void* next);
#endif

// The body of every fiber (runtime().fiber_main()); its address is where a new fiber starts.
extern "C" void cuda_on_cpu_fiber_main();

namespace cuda_on_cpu {
namespace {

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 1024;
// Generous: AddressSanitizer's redzones make frames several times larger.
constexpr size_t kStackBytes = size_t{512} << 10;
// What a failed barrier or a misuse of the runtime exits with (after printing why).
constexpr int kFailureExitCode = 86;

[[noreturn]] void fail(const std::string& message) {
  std::fflush(stdout);
  std::fprintf(stderr, "cuda_on_cpu: %s\n", message.c_str());
  std::fflush(stderr);
  std::_Exit(kFailureExitCode);
}

// ---------------------------------------------------------------------------------------------
// Stacks and context switches

// A stack with an inaccessible guard page below it: an overflow faults instead of corrupting.
struct Stack {
  void* mapping = nullptr;
  size_t mapping_bytes = 0;
  char* bottom = nullptr;  // lowest usable address
  size_t bytes = 0;

  Stack() {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    mapping_bytes = kStackBytes + page;
    mapping =
        mmap(nullptr, mapping_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mapping == MAP_FAILED) {
      fail("cannot map a fiber stack");
    }
    if (mprotect(mapping, page, PROT_NONE) != 0) {
      fail("cannot protect a fiber stack's guard page");
    }
    bottom = static_cast<char*>(mapping) + page;
    bytes = kStackBytes;
  }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  ~Stack() { munmap(mapping, mapping_bytes); }
};

enum class State { kRunnable, kRunning, kAtBlockBarrier, kAtWarpBarrier, kReturned };

// Where a thread waits: the barrier's kind and its place in the source.
struct Site {
  const char* what = nullptr;  // "__syncthreads", "__syncwarp", "__shfl_xor_sync"
  const char* file = nullptr;
  int line = 0;

  bool operator==(const Site& other) const {
    return line == other.line && (what == other.what || std::strcmp(what, other.what) == 0) &&
           (file == other.file || std::strcmp(file, other.file) == 0);
  }
  std::string str() const {
    const char* slash = std::strrchr(file, '/');
    return std::string(what) + " at " + (slash ? slash + 1 : file) + ":" + std::to_string(line);
  }
};

struct Fiber {
  int index = 0;
  Stack stack;
#ifdef CUDA_ON_CPU_UCONTEXT
  ucontext_t context;
#else
  void* sp = nullptr;  // saved stack pointer while switched out
#endif
  void* fake_stack = nullptr;  // AddressSanitizer's, while switched out
  Dim3 thread_idx;
  State state = State::kReturned;
  Site site;
  int shuffle_source = 0;  // the lane whose value this lane receives
  unsigned shuffle_buffer = 0;
};

struct WarpBarrier {
  int arrived = 0;
  Site site;
  unsigned generation = 0;
  // Shuffle values, double-buffered by generation: a lane overwrites buffer g % 2 only at
  // generation g + 2, which all lanes reach only after reading their generation-g values.
  uint64_t values[2][kWarpSize] = {};
};

struct BlockBarrier {
  int arrived = 0;
  Site site;
};

class Runtime {
 public:
  void set_schedule(const Schedule& schedule) {
    schedule_ = schedule;
    rng_.seed(schedule.seed);
  }

  void launch(const LaunchConfig& config, void (*body)(void*), void* context) {
    if (current_ != nullptr) {
      fail("a kernel launched another kernel (" + config.kernel + "): not supported");
    }
    if (config.threads <= 0 || config.threads > kMaxThreads || config.threads % kWarpSize != 0) {
      fail("kernel " + config.kernel + " launched with " + std::to_string(config.threads) +
           " threads per block: the harness runs multiples of 32 up to 1024");
    }
    if (config.blocks < 0 || config.blocks > 0x7fffffff) {
      fail("kernel " + config.kernel + " launched with " + std::to_string(config.blocks) +
           " blocks");
    }
    config_ = config;
    body_ = body;
    body_context_ = context;
    block_dim_ = {static_cast<unsigned>(config.threads), 1, 1};
    grid_dim_ = {static_cast<unsigned>(config.blocks), 1, 1};
    while (static_cast<int>(fibers_.size()) < config.threads) {
      add_fiber();
    }
    warps_.assign(config.threads / kWarpSize, WarpBarrier{});

    std::vector<int64_t> blocks(config.blocks);
    for (int64_t b = 0; b < config.blocks; ++b) {
      blocks[b] = b;
    }
    if (schedule_.order == Order::kReverse) {
      std::reverse(blocks.begin(), blocks.end());
    } else if (schedule_.order == Order::kRandom) {
      std::shuffle(blocks.begin(), blocks.end(), rng_);
    }
    for (const int64_t block : blocks) {
      run_block(block);
    }
    body_ = nullptr;
  }

  // --- inside a kernel

  Fiber& current() {
    if (current_ == nullptr) {
      fail("a CUDA built-in (threadIdx, __syncthreads, ...) was used outside a kernel");
    }
    return *current_;
  }
  const Dim3& block_idx() {
    current();
    return block_idx_;
  }
  const Dim3& block_dim() {
    current();
    return block_dim_;
  }
  const Dim3& grid_dim() {
    current();
    return grid_dim_;
  }
  unsigned char* shared() {
    current();
    return shared_;
  }

  void sync_threads(const char* file, int line) {
    Fiber& self = current();
    const Site site{"__syncthreads", file, line};
    if (block_barrier_.arrived == 0) {
      block_barrier_.site = site;
    } else if (!(block_barrier_.site == site)) {
      fail(where() + ": threads wait at two different barriers: " +
           std::to_string(block_barrier_.arrived) + " at " + block_barrier_.site.str() +
           ", thread " + std::to_string(self.index) + " at " + site.str());
    }
    self.state = State::kAtBlockBarrier;
    self.site = site;
    if (++block_barrier_.arrived == config_.threads) {
      block_barrier_.arrived = 0;
      for (int t = 0; t < config_.threads; ++t) {
        make_runnable(*fibers_[t]);
      }
    }
    park();
  }

  void sync_warp(unsigned mask, const char* file, int line) {
    check_full_mask(mask, {"__syncwarp", file, line});
    arrive_at_warp_barrier({"__syncwarp", file, line});
  }

  uint64_t shuffle_xor(unsigned mask, uint64_t bits, int lane_mask, int width, const char* file,
                       int line) {
    const Site site{"__shfl_xor_sync", file, line};
    check_full_mask(mask, site);
    if (width != kWarpSize || lane_mask < 0 || lane_mask >= kWarpSize) {
      fail(where() + ": " + site.str() + " with laneMask " + std::to_string(lane_mask) +
           " and width " + std::to_string(width) +
           ": the harness supports width 32 and laneMask in [0, 32)");
    }
    Fiber& self = current();
    const int lane = self.index % kWarpSize;
    WarpBarrier& warp = warps_[self.index / kWarpSize];
    self.shuffle_source = lane ^ lane_mask;
    self.shuffle_buffer = warp.generation % 2;
    warp.values[self.shuffle_buffer][lane] = bits;
    arrive_at_warp_barrier(site);
    return warp.values[self.shuffle_buffer][self.shuffle_source];
  }

  // --- fibers

  // The body of every fiber: run the kernel for the current block, return, and wait to be
  // started again for the next block.
  [[noreturn]] void fiber_main() {
    after_switch();
    for (;;) {
      body_(body_context_);
      Fiber& self = current();
      self.state = State::kReturned;
      --live_;
      park();
    }
  }

 private:
  std::string where() const {
    return "kernel " + config_.kernel + ", block " + std::to_string(block_idx_.x) + " of " +
           std::to_string(config_.blocks) + " (" + std::to_string(config_.threads) +
           " threads per block, schedule " + schedule_.name() + ")";
  }

  void check_full_mask(unsigned mask, const Site& site) {
    if (mask != 0xffffffffu) {
      char hex[16];
      std::snprintf(hex, sizeof(hex), "0x%08x", mask);
      fail(where() + ": " + site.str() + " with mask " + hex +
           ": the harness supports the full-warp mask 0xffffffff only");
    }
  }

  void arrive_at_warp_barrier(const Site& site) {
    Fiber& self = current();
    const int warp_index = self.index / kWarpSize;
    WarpBarrier& warp = warps_[warp_index];
    if (warp.arrived == 0) {
      warp.site = site;
    } else if (!(warp.site == site)) {
      fail(where() + ": the lanes of warp " + std::to_string(warp_index) +
           " wait at two different barriers: " + std::to_string(warp.arrived) + " at " +
           warp.site.str() + ", lane " + std::to_string(self.index % kWarpSize) + " at " +
           site.str());
    }
    self.state = State::kAtWarpBarrier;
    self.site = site;
    if (++warp.arrived == kWarpSize) {
      warp.arrived = 0;
      ++warp.generation;
      for (int lane = 0; lane < kWarpSize; ++lane) {
        make_runnable(*fibers_[warp_index * kWarpSize + lane]);
      }
    }
    park();
  }

  void make_runnable(Fiber& fiber) {
    fiber.state = State::kRunnable;
    runnable_[fiber.index / 64] |= uint64_t{1} << (fiber.index % 64);
    ++runnable_count_;
  }

  void add_fiber() {
    auto fiber = std::make_unique<Fiber>();
    fiber->index = static_cast<int>(fibers_.size());
    char* top = fiber->stack.bottom + fiber->stack.bytes;
#ifdef CUDA_ON_CPU_UCONTEXT
    getcontext(&fiber->context);
    fiber->context.uc_stack.ss_sp = fiber->stack.bottom;
    fiber->context.uc_stack.ss_size = fiber->stack.bytes;
    fiber->context.uc_link = nullptr;
    makecontext(&fiber->context, cuda_on_cpu_fiber_main, 0);
    (void)top;
#else
    // From the top (16-byte aligned): a null return address for fiber_main (so it starts with
    // the stack alignment of a called function, and frame-pointer walks stop there), the
    // address the switch returns to, and the six callee-saved registers it pops (zeros).
    void** sp = reinterpret_cast<void**>(top);
    *--sp = nullptr;
    *--sp = reinterpret_cast<void*>(&cuda_on_cpu_fiber_main);
    for (int r = 0; r < 6; ++r) {
      *--sp = nullptr;
    }
    fiber->sp = sp;
#endif
    fibers_.push_back(std::move(fiber));
  }

  void run_block(int64_t block) {
    block_idx_ = {static_cast<unsigned>(block), 0, 0};
    // Exactly the launch's bytes on the heap: AddressSanitizer's redzone starts at the end.
    // NaN bytes (for float and double) make a read of anything not written first visible.
    std::unique_ptr<unsigned char, decltype(&std::free)> shared(
        static_cast<unsigned char*>(std::malloc(config_.shared_bytes)), &std::free);
    if (shared == nullptr && config_.shared_bytes > 0) {
      fail("out of memory for " + std::to_string(config_.shared_bytes) + " bytes of shared memory");
    }
    if (config_.shared_bytes > 0) {
      std::memset(shared.get(), 0xff, config_.shared_bytes);
    }
    shared_ = shared.get();
    block_barrier_ = BlockBarrier{};
    for (WarpBarrier& warp : warps_) {
      warp.arrived = 0;
    }
    std::fill(std::begin(runnable_), std::end(runnable_), 0);
    runnable_count_ = 0;
    for (int t = 0; t < config_.threads; ++t) {
      Fiber& fiber = *fibers_[t];
      fiber.thread_idx = {static_cast<unsigned>(t), 0, 0};
      make_runnable(fiber);
    }
    live_ = config_.threads;
    switch_to(pick_next());
    // Back here only when every thread of the block has returned.
    shared_ = nullptr;
  }

  Fiber* pick_next() {
    if (runnable_count_ == 0) {
      return nullptr;
    }
    int word = 0;
    int bit = 0;
    if (schedule_.order == Order::kInOrder) {
      while (runnable_[word] == 0) {
        ++word;
      }
      bit = __builtin_ctzll(runnable_[word]);
    } else if (schedule_.order == Order::kReverse) {
      word = kRunnableWords - 1;
      while (runnable_[word] == 0) {
        --word;
      }
      bit = 63 - __builtin_clzll(runnable_[word]);
    } else {
      // The k-th runnable thread, k uniform.
      int k = std::uniform_int_distribution<int>(0, runnable_count_ - 1)(rng_);
      while (__builtin_popcountll(runnable_[word]) <= k) {
        k -= __builtin_popcountll(runnable_[word]);
        ++word;
      }
      uint64_t bits = runnable_[word];
      for (; k > 0; --k) {
        bits &= bits - 1;
      }
      bit = __builtin_ctzll(bits);
    }
    runnable_[word] &= ~(uint64_t{1} << bit);
    --runnable_count_;
    return fibers_[word * 64 + bit].get();
  }

  // The current fiber stops (at a barrier, or returned); the next runnable one runs, or the
  // scheduler once the whole block has returned. Returns when this fiber runs again.
  void park() {
    Fiber* self = current_;
    Fiber* next = pick_next();
    if (next == nullptr) {
      if (live_ > 0) {
        deadlock();
      }
      switch_to(nullptr);
    } else if (next != self) {
      switch_to(next);
    }
    self->state = State::kRunning;
  }

  // Every live thread waits at a barrier that cannot complete.
  [[noreturn]] void deadlock() {
    std::ostringstream message;
    message << where() << ": deadlock, no thread can go on:";
    // (barrier, warp or -1) -> number of threads waiting there
    std::map<std::tuple<std::string, int>, int> groups;
    for (int t = 0; t < config_.threads; ++t) {
      const Fiber& fiber = *fibers_[t];
      if (fiber.state == State::kAtBlockBarrier) {
        ++groups[{fiber.site.str(), -1}];
      } else if (fiber.state == State::kAtWarpBarrier) {
        ++groups[{fiber.site.str(), t / kWarpSize}];
      }
    }
    for (const auto& [key, count] : groups) {
      const auto& [site, warp] = key;
      if (warp < 0) {
        message << "\n  " << site << " reached by " << count << " of " << config_.threads
                << " threads of block " << block_idx_.x;
      } else {
        message << "\n  " << site << " reached by " << count << " of " << kWarpSize
                << " lanes of warp " << warp << " of block " << block_idx_.x;
      }
    }
    message << "\n  " << (config_.threads - live_) << " threads returned";
    fail(message.str());
  }

  // Switches from the current fiber (or the scheduler, current_ == nullptr) to `next` (or the
  // scheduler).
  void switch_to(Fiber* next) {
    Fiber* from = current_;
    current_ = next;
    switching_from_scheduler_ = from == nullptr;
#ifdef CUDA_ON_CPU_ASAN
    void** fake_stack = from != nullptr ? &from->fake_stack : &scheduler_fake_stack_;
    if (next != nullptr) {
      __sanitizer_start_switch_fiber(fake_stack, next->stack.bottom, next->stack.bytes);
    } else {
      __sanitizer_start_switch_fiber(fake_stack, scheduler_stack_bottom_, scheduler_stack_bytes_);
    }
#endif
#ifdef CUDA_ON_CPU_UCONTEXT
    ucontext_t* save = from != nullptr ? &from->context : &scheduler_context_;
    swapcontext(save, next != nullptr ? &next->context : &scheduler_context_);
#else
    void** save = from != nullptr ? &from->sp : &scheduler_sp_;
    cuda_on_cpu_switch_stack(save, next != nullptr ? next->sp : scheduler_sp_);
#endif
    after_switch();
  }

  // First thing on the new stack after a switch.
  void after_switch() {
#ifdef CUDA_ON_CPU_ASAN
    void* fake_stack = current_ != nullptr ? current_->fake_stack : scheduler_fake_stack_;
    const void* from_bottom = nullptr;
    size_t from_bytes = 0;
    __sanitizer_finish_switch_fiber(fake_stack, &from_bottom, &from_bytes);
    if (switching_from_scheduler_) {
      scheduler_stack_bottom_ = from_bottom;
      scheduler_stack_bytes_ = from_bytes;
    }
#endif
  }

  Schedule schedule_;
  std::mt19937_64 rng_;

  LaunchConfig config_;
  void (*body_)(void*) = nullptr;
  void* body_context_ = nullptr;
  Dim3 block_idx_, block_dim_, grid_dim_;
  unsigned char* shared_ = nullptr;

  std::vector<std::unique_ptr<Fiber>> fibers_;
  // The threads that can run, one bit each.
  static constexpr int kRunnableWords = kMaxThreads / 64;
  uint64_t runnable_[kRunnableWords] = {};
  int runnable_count_ = 0;
  int live_ = 0;  // threads of the block that have not returned
  BlockBarrier block_barrier_;
  std::vector<WarpBarrier> warps_;

  Fiber* current_ = nullptr;  // nullptr: the scheduler (the caller of launch)
  bool switching_from_scheduler_ = false;
#ifdef CUDA_ON_CPU_UCONTEXT
  ucontext_t scheduler_context_;
#else
  void* scheduler_sp_ = nullptr;
#endif
  void* scheduler_fake_stack_ = nullptr;
  const void* scheduler_stack_bottom_ = nullptr;
  size_t scheduler_stack_bytes_ = 0;
};

Runtime& runtime() {
  static Runtime* instance = new Runtime();  // never destroyed: fibers may still be parked
  return *instance;
}

}  // namespace

Schedule Schedule::parse(const std::string& text) {
  if (text == "inorder") {
    return {Order::kInOrder, 0};
  }
  if (text == "reverse") {
    return {Order::kReverse, 0};
  }
  const std::string prefix = "random:";
  if (text.compare(0, prefix.size(), prefix) == 0 && text.size() > prefix.size()) {
    char* end = nullptr;
    const unsigned long long seed = std::strtoull(text.c_str() + prefix.size(), &end, 10);
    if (*end == '\0') {
      return {Order::kRandom, seed};
    }
  }
  fail("unknown schedule '" + text + "' (inorder, reverse or random:<seed>)");
}

std::string Schedule::name() const {
  switch (order) {
    case Order::kInOrder:
      return "inorder";
    case Order::kReverse:
      return "reverse";
    case Order::kRandom:
      return "random:" + std::to_string(seed);
  }
  return "?";
}

void set_schedule(const Schedule& schedule) {
  runtime().set_schedule(schedule);
}

void launch(const LaunchConfig& config, void (*body)(void*), void* context) {
  runtime().launch(config, body, context);
}

std::string function_name(const void* function) {
  Dl_info info{};
  if (dladdr(function, &info) != 0 && info.dli_sname != nullptr) {
    int status = 0;
    char* demangled = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    std::string name = status == 0 && demangled != nullptr ? demangled : info.dli_sname;
    std::free(demangled);
    return name;
  }
  char address[32];
  std::snprintf(address, sizeof(address), "kernel at %p", function);
  return address;
}

const Dim3& thread_idx() {
  return runtime().current().thread_idx;
}
const Dim3& block_idx() {
  return runtime().block_idx();
}
const Dim3& block_dim() {
  return runtime().block_dim();
}
const Dim3& grid_dim() {
  return runtime().grid_dim();
}
unsigned char* dynamic_shared_memory() {
  return runtime().shared();
}
void sync_threads(const char* file, int line) {
  runtime().sync_threads(file, line);
}
void sync_warp(unsigned mask, const char* file, int line) {
  runtime().sync_warp(mask, file, line);
}
uint64_t shuffle_xor(unsigned mask, uint64_t bits, int lane_mask, int width, const char* file,
                     int line) {
  return runtime().shuffle_xor(mask, bits, lane_mask, width, file, line);
}

}  // namespace cuda_on_cpu

extern "C" void cuda_on_cpu_fiber_main() {
  cuda_on_cpu::runtime().fiber_main();
}
