// Interface between the CPU op entry points (attention_cpu.cpp) and the kernels
// (attention_kernel.cpp).
//
// attention_kernel.cpp is compiled once per CPU vector ISA (DEFAULT, AVX2, AVX512), each time
// with CPU_CAPABILITY naming the ISA, the matching -m flags, and at::vec specialised for it; the
// kernels land in namespace torch_mha::cpu::<ISA>. attention_cpu.cpp picks one at run time with
// the same rule PyTorch uses for its own kernels (at::get_cpu_capability(), which honours the
// ATEN_CPU_CAPABILITY environment variable). The arguments are plain pointers and strides, so
// the per-ISA code shares no inline ATen code with the rest of the library.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "common/masking.h"

namespace torch_mha::cpu {

// Tile sizes: a block of kBlockQ queries against a block of kBlockK keys. The transposed score
// tile (kBlockK x kBlockQ float32 = 32 KiB) and the packed Q^T panel (16 KiB at head_dim 64)
// stay in L1/L2. kBlockQ is a multiple of every vector width.
constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 128;

// A 4-D tensor (batch, head, row, column) whose columns have unit stride.
struct StridedRows {
  void* data = nullptr;
  int64_t stride_batch = 0;
  int64_t stride_head = 0;
  int64_t stride_row = 0;
};

// A 4-D tensor with arbitrary strides (gradients of the returned weights).
struct Strided4d {
  const void* data = nullptr;
  int64_t strides[4] = {0, 0, 0, 0};
};

struct AttentionProblem {
  c10::ScalarType dtype;
  int64_t batch;
  int64_t heads;
  int64_t query_len;
  int64_t key_len;
  int64_t head_dim;
  int64_t value_dim;
  MaskView attn_mask;
  MaskView key_padding_mask;
  bool is_causal;
  double scale;
  double dropout_p;
  uint64_t dropout_seed;
};

struct ForwardKernelArgs {
  AttentionProblem problem;
  StridedRows query, key, value;
  StridedRows output;
  void* softmax_stats;  // (batch, heads, query_len, 2) contiguous, accumulate type
  // Attention probabilities, contiguous: (batch, query_len, key_len) averaged over heads when
  // average_weights, else (batch, heads, query_len, key_len); nullptr when not requested.
  void* weights;
  bool average_weights;
};

struct BackwardKernelArgs {
  AttentionProblem problem;
  StridedRows grad_output, query, key, value, output;
  const void* softmax_stats;  // (batch, heads, query_len, 2) contiguous, accumulate type
  // Gradient of the returned weights, seen as (batch, head, query, key) (head stride 0 for
  // head-averaged weights); data == nullptr unless the weights were differentiated.
  Strided4d grad_weights;
  double grad_weights_scale;  // 1/heads for head-averaged weights, else 1
  StridedRows grad_query, grad_key, grad_value;
  void* grad_mask;  // (batch, heads, query_len, key_len) contiguous accumulate type, or nullptr
  // Scratch, accumulate type, allocated by the caller:
  void* delta;        // (batch, heads, query_len)
  void* dq_partials;  // (dq_chunks, batch, heads, query_len, dq_row_stride), zero-filled
  int64_t dq_chunks;
  int64_t dq_row_stride;
};

// Backward work items are (batch, head, chunk of key blocks); each chunk owns a float32 dQ
// partial sum. The chunk count depends only on the problem, never on the thread count, which
// keeps the backward bitwise reproducible across thread counts.
int64_t backward_dq_chunks(int64_t batch_heads, int64_t key_len);

// dQ partial rows are padded to this many elements (a whole number of vectors on every ISA).
int64_t backward_dq_row_stride(int64_t head_dim);

#define TORCH_MHA_DECLARE_CPU_KERNELS(isa)                        \
  namespace isa {                                                 \
  void attention_forward_kernel(const ForwardKernelArgs& args);   \
  void attention_backward_kernel(const BackwardKernelArgs& args); \
  }

TORCH_MHA_DECLARE_CPU_KERNELS(DEFAULT)
#if defined(TORCH_MHA_CPU_AVX2)
TORCH_MHA_DECLARE_CPU_KERNELS(AVX2)
#endif
#if defined(TORCH_MHA_CPU_AVX512)
TORCH_MHA_DECLARE_CPU_KERNELS(AVX512)
#endif

#undef TORCH_MHA_DECLARE_CPU_KERNELS

}  // namespace torch_mha::cpu
