// Small dense products on cache-resident tiles, written with at::vec.
//
// Every product in the attention kernels has the shape C (m x n) += A (m x k) * B (k x n) where B
// and C are scratch tiles the kernel packed itself: row-major, unit stride along n, and n padded
// to a whole number of vectors. A is read one scalar at a time and broadcast, so it may have any
// strides; a transposed operand (P^T, dS^T) is just A with its strides swapped.
#pragma once

#ifndef CPU_CAPABILITY
#error "block_matmul.h belongs to the per-ISA kernel build (see cpu/attention_kernel.h)"
#endif

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
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

// C[kRows x kVecs vectors] (+)= A[kRows x k] * B[k x kVecs vectors], accumulators in registers.
template <typename T, int kRows, int kVecs>
inline void matmul_register_tile(int64_t k, const T* a, int64_t a_row_stride,
                                 int64_t a_col_stride, const T* b, int64_t ldb, T* c,
                                 int64_t ldc, bool accumulate) {
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
      const Vec a_value(a[r * a_row_stride + p * a_col_stride]);
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

template <typename T, int kRows>
inline void matmul_row_panel(int64_t n, int64_t k, const T* a, int64_t a_row_stride,
                             int64_t a_col_stride, const T* b, int64_t ldb, T* c, int64_t ldc,
                             bool accumulate) {
  constexpr int64_t kWidth = vector_width<T>();
  constexpr int kVecs = 2;
  int64_t col = 0;
  for (; col + kVecs * kWidth <= n; col += kVecs * kWidth) {
    matmul_register_tile<T, kRows, kVecs>(k, a, a_row_stride, a_col_stride, b + col, ldb,
                                          c + col, ldc, accumulate);
  }
  for (; col < n; col += kWidth) {
    matmul_register_tile<T, kRows, 1>(k, a, a_row_stride, a_col_stride, b + col, ldb, c + col,
                                      ldc, accumulate);
  }
}

// C (m x n) = [C +] A (m x k) * B (k x n). n must be a multiple of vector_width<T>(); B and C
// must hold that many (padded) columns.
template <typename T>
void block_matmul(int64_t m, int64_t n, int64_t k, const T* a, int64_t a_row_stride,
                  int64_t a_col_stride, const T* b, int64_t ldb, T* c, int64_t ldc,
                  bool accumulate) {
  constexpr int kRows = 4;
  int64_t row = 0;
  for (; row + kRows <= m; row += kRows) {
    matmul_row_panel<T, kRows>(n, k, a + row * a_row_stride, a_row_stride, a_col_stride, b, ldb,
                               c + row * ldc, ldc, accumulate);
  }
  const T* a_tail = a + row * a_row_stride;
  T* c_tail = c + row * ldc;
  switch (m - row) {
    case 3:
      matmul_row_panel<T, 3>(n, k, a_tail, a_row_stride, a_col_stride, b, ldb, c_tail, ldc,
                             accumulate);
      break;
    case 2:
      matmul_row_panel<T, 2>(n, k, a_tail, a_row_stride, a_col_stride, b, ldb, c_tail, ldc,
                             accumulate);
      break;
    case 1:
      matmul_row_panel<T, 1>(n, k, a_tail, a_row_stride, a_col_stride, b, ldb, c_tail, ldc,
                             accumulate);
      break;
    default:
      break;
  }
}

}  // namespace torch_mha::cpu::CPU_CAPABILITY
