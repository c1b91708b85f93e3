// Interface between the CPU op entry points (attention_cpu.cpp) and the kernels.
//
// The kernel files (the sources listed in cpu/isa_builds.json: attention_forward_kernel.cpp,
// attention_backward_kernel.cpp) are compiled once per CPU vector ISA (DEFAULT, AVX2, AVX512),
// each time with CPU_CAPABILITY naming the ISA, the matching -m flags, and at::vec specialised
// for it; the kernels land in namespace torch_mha::cpu::<ISA>. attention_cpu.cpp picks one at run
// time with the same rule PyTorch uses for its own kernels (at::get_cpu_capability(), which
// honours the ATEN_CPU_CAPABILITY environment variable). The kernels read the problem from
// AttentionParams (plain pointers, sizes and strides), so the per-ISA code shares no inline ATen
// code with the rest of the library.
#pragma once

#include <cstdint>

#include "attention_params.h"
#include "cpu/reduced_products.h"

namespace torch_mha::cpu {

// Tile sizes: a block of kBlockQ queries against a block of kBlockK keys. The transposed score
// tile (kBlockK x kBlockQ float32 = 32 KiB) and the packed Q^T panel (16 KiB at head_dim 64)
// stay in L1/L2. kBlockQ is a multiple of every vector width.
constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 128;

// Where the backward accumulates dQ, in the accumulate type: one partial sum per chunk of key
// blocks, each laid out like the query with rows of at least head_dim rounded up to whole
// vectors. Chunk 0 may be grad_query itself (float32/float64 queries whose head_dim is a
// multiple of 16, zero-filled by the caller: no scratch for it); the others are caller-allocated
// zero-filled scratch.
struct BackwardScratch {
  RowLayout first;     // chunk 0's rows
  RowLayout partials;  // chunk 1's rows; chunk c >= 1 starts (c - 1) * chunk_stride further
  int64_t chunk_stride = 0;
  int64_t chunks = 1;

  const RowLayout& dq_layout(int64_t chunk) const { return chunk == 0 ? first : partials; }

  template <typename T>
  T* dq_row(int64_t chunk, int64_t b, int64_t h, int64_t i) const {
    if (chunk == 0) {
      return first.row<T>(b, h, i);
    }
    return partials.row<T>(b, h, i) + (chunk - 1) * chunk_stride;
  }
};

// Backward work items are (batch, key/value head, chunk of key blocks); each chunk owns a dQ
// partial sum. The chunk count depends only on the problem, never on the thread count, which
// keeps the backward bitwise reproducible across thread counts.
int64_t backward_dq_chunks(int64_t batch_kv_heads, int64_t key_len);

// dQ partial rows are padded to this many elements (a whole number of vectors on every ISA).
int64_t backward_dq_row_stride(int64_t head_dim);

#define TORCH_MHA_DECLARE_CPU_KERNELS(isa)                                                        \
  namespace isa {                                                                                 \
  void attention_forward_kernel(const AttentionParams& params, ReducedProducts reduced_products); \
  void attention_backward_kernel(const AttentionBackwardParams& params,                           \
                                 const BackwardScratch& scratch);                                 \
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
