// Small dense products on cache-resident tiles, written with at::vec.
//
// Every product in the attention kernels has the shape C (m x n) [+]= A (m x k) * B (k x n)
// where B and C are row-major with unit stride along n, the vectorised dimension, and n is a
// whole number of vectors. A is read one scalar at a time and broadcast, so it may have any
// strides and any element type (a bfloat16 row of the input, or a transposed float tile such as
// P^T): transposing an A operand costs nothing.
#pragma once

#ifndef CPU_CAPABILITY
#error "block_matmul.h belongs to the per-ISA kernel build (see cpu/attention_kernel.h)"
#endif

#include <ATen/cpu/vec/vec.h>

#include <cstdint>

// Everything here depends on the vector width, so it lives in the ISA's own namespace: every
// build of the kernel gets distinct symbols (the same device at::vec uses). Without it the linker
// would keep one ISA's copy of these inline functions for all builds.
namespace torch_mha::cpu::CPU_CAPABILITY {

template <typename T>
constexpr int64_t vector_width() {
  return static_cast<int64_t>(at::vec::Vectorized<T>::size());
}

inline int64_t round_up(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

// A register tile of kRows x kVecs vectors of C, accumulated over k.
template <typename T, typename AT, int kRows, int kVecs>
inline void matmul_register_tile(int64_t k, const AT* a, int64_t a_row_stride, int64_t a_col_stride,
                                 const T* b, int64_t ldb, T* c, int64_t ldc, bool accumulate) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t kWidth = Vec::size();
  Vec acc[kRows][kVecs];
  for (int r = 0; r < kRows; ++r) {
    for (int v = 0; v < kVecs; ++v) {
      acc[r][v] = accumulate ? Vec::loadu(c + r * ldc + v * kWidth) : Vec(T(0));
    }
  }
  for (int64_t p = 0; p < k; ++p) {
    Vec b_row[kVecs];
    for (int v = 0; v < kVecs; ++v) {
      b_row[v] = Vec::loadu(b + p * ldb + v * kWidth);
    }
    for (int r = 0; r < kRows; ++r) {
      const Vec a_value(static_cast<T>(a[r * a_row_stride + p * a_col_stride]));
      for (int v = 0; v < kVecs; ++v) {
        acc[r][v] = at::vec::fmadd(a_value, b_row[v], acc[r][v]);
      }
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int v = 0; v < kVecs; ++v) {
      acc[r][v].store(c + r * ldc + v * kWidth);
    }
  }
}

// Register tile: kTileRows rows of C by register_tile_vecs() vectors. With 32 vector registers
// (AVX-512) a 6 x 4 tile keeps 24 accumulators, 4 B vectors and one broadcast A value in
// registers: 24 FMAs per 10 loads. With 16 (AVX2) a 6 x 2 tile (12 + 2 + 1) does the same job.
template <typename T>
constexpr int register_tile_vecs() {
  return sizeof(at::vec::Vectorized<T>) >= 64 ? 4 : 2;
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
constexpr int kTileRows = 6;
#else
constexpr int kTileRows = 4;  // emulated vectors: fewer registers to play with
#endif

// One strip of C, kVecs vectors wide, all m rows: register tiles down the strip, then the
// leftover rows. The strip's B panel (k x kVecs vectors: 8 KiB at k = 128 on AVX2) stays in L1
// while every row of A streams past it once; walking rows outside strips instead re-read the
// whole of B for each register tile, and at head dim 128 B no longer fits in L1.
template <typename T, typename AT, int kVecs>
inline void matmul_column_strip(int64_t m, int64_t k, const AT* a, int64_t a_row_stride,
                                int64_t a_col_stride, const T* b, int64_t ldb, T* c, int64_t ldc,
                                bool accumulate) {
  int64_t row = 0;
  for (; row + kTileRows <= m; row += kTileRows) {
    matmul_register_tile<T, AT, kTileRows, kVecs>(k, a + row * a_row_stride, a_row_stride,
                                                  a_col_stride, b, ldb, c + row * ldc, ldc,
                                                  accumulate);
  }
  const AT* a_tail = a + row * a_row_stride;
  T* c_tail = c + row * ldc;
  switch (m - row) {
    case 5:
      matmul_register_tile<T, AT, 5, kVecs>(k, a_tail, a_row_stride, a_col_stride, b, ldb, c_tail,
                                            ldc, accumulate);
      break;
    case 4:
      matmul_register_tile<T, AT, 4, kVecs>(k, a_tail, a_row_stride, a_col_stride, b, ldb, c_tail,
                                            ldc, accumulate);
      break;
    case 3:
      matmul_register_tile<T, AT, 3, kVecs>(k, a_tail, a_row_stride, a_col_stride, b, ldb, c_tail,
                                            ldc, accumulate);
      break;
    case 2:
      matmul_register_tile<T, AT, 2, kVecs>(k, a_tail, a_row_stride, a_col_stride, b, ldb, c_tail,
                                            ldc, accumulate);
      break;
    case 1:
      matmul_register_tile<T, AT, 1, kVecs>(k, a_tail, a_row_stride, a_col_stride, b, ldb, c_tail,
                                            ldc, accumulate);
      break;
    default:
      break;
  }
}

// C (m x n) = [C +] A (m x k) * B (k x n). n must be a multiple of vector_width<T>(), and every
// row of B and C must hold n readable elements.
template <typename T, typename AT>
void block_matmul(int64_t m, int64_t n, int64_t k, const AT* a, int64_t a_row_stride,
                  int64_t a_col_stride, const T* b, int64_t ldb, T* c, int64_t ldc,
                  bool accumulate) {
  constexpr int64_t kWidth = vector_width<T>();
  constexpr int kVecs = register_tile_vecs<T>();
  int64_t col = 0;
  for (; col + kVecs * kWidth <= n; col += kVecs * kWidth) {
    matmul_column_strip<T, AT, kVecs>(m, k, a, a_row_stride, a_col_stride, b + col, ldb, c + col,
                                      ldc, accumulate);
  }
  for (; col < n; col += kWidth) {
    matmul_column_strip<T, AT, 1>(m, k, a, a_row_stride, a_col_stride, b + col, ldb, c + col, ldc,
                                  accumulate);
  }
}

}  // namespace torch_mha::cpu::CPU_CAPABILITY
