// Which engine multiplies bfloat16 and float16 tiles in the CPU forward.
//
// The kernels' own register tiles (block_matmul.h) convert reduced-precision operands to float32
// and use float32 FMAs: the fastest choice where the CPU has no bfloat16/float16 dot-product
// instructions (AVX2, AVX-512 without avx512_bf16), and exact in float32. Where it has them
// (AMX tiles, AVX512-BF16 VDPBF16PS, AVX512-FP16), PyTorch's exported batch-reduce GEMM,
// at::native::cpublas::brgemm, reaches them through the kernel libraries PyTorch ships (oneDNN,
// MKL's bf16 x bf16 -> f32 GEMM): the same engine F.scaled_dot_product_attention's CPU kernel
// multiplies with. Accumulation and the softmax stay float32 either way; with brgemm the
// probabilities are rounded to the input type before P V, as in PyTorch's kernel.
#pragma once

#include <ATen/native/CPUBlas.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <c10/util/OptionalArrayRef.h>

#include <cstdint>

#include <string>
#include <tuple>

namespace torch_mha::cpu {

enum class ReducedProducts { kFloatFma, kBrgemm };

// PyTorch builds that export brgemm for both reduced types (torch 2.6 and later) say so.
#if defined(CPUBLAS_BRGEMM_BF16BF16F32) && defined(CPUBLAS_BRGEMM_F16F16F32)
constexpr bool kHaveBrgemm = true;
#else
constexpr bool kHaveBrgemm = false;
#endif

// C (m x n, float32, row stride ldc) [+]= A (m x k) B (k x n), A and B row-major bfloat16 or
// float16 with row strides lda and ldb, through cpublas::brgemm. Only called where
// choose_reduced_products picked kBrgemm, which requires kHaveBrgemm.
template <typename T>
void reduced_matmul(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b,
                    int64_t ldb, float* c, int64_t ldc, bool accumulate) {
#if defined(CPUBLAS_BRGEMM_BF16BF16F32) && defined(CPUBLAS_BRGEMM_F16F16F32)
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, a, b, c, /*is_vnni=*/false);
#else
  TORCH_CHECK(false, "torch_mha: this PyTorch build does not export cpublas::brgemm");
#endif
}

const char* reduced_products_name(ReducedProducts engine);

// What the choice depends on, so that it can be tested for machines other than this one.
struct ReducedProductsQuery {
  c10::ScalarType dtype = c10::ScalarType::BFloat16;
  bool amx_bf16 = false;
  bool avx512_bf16 = false;
  bool amx_fp16 = false;
  bool avx512_fp16 = false;
  // The kernels run their AVX512 build (ATEN_CPU_CAPABILITY and the CPU allow it). A lower
  // forced capability stands for a machine without these instructions, so it gets FMAs.
  bool avx512_build = false;
  // cpublas::brgemm accumulates this dtype's products in float32 in this PyTorch build (a
  // build without MKL's or oneDNN's kernel rounds every product tile to the input type).
  bool library_exact = false;
  // TORCH_MHA_CPU_REDUCED_PRODUCTS: "" or "auto" (choose), "fma" or "brgemm" (force).
  std::string requested;
};

struct ReducedProductsChoice {
  ReducedProducts engine = ReducedProducts::kFloatFma;
  std::string reason;
};

// A pure function of the query. Forcing brgemm where the library would round raises.
ReducedProductsChoice choose_reduced_products(const ReducedProductsQuery& query);

// The query for this machine, this kernel build and the environment now.
ReducedProductsQuery reduced_products_query(c10::ScalarType dtype, bool avx512_build);

// The op torch_mha::_explain_cpu_products: the choice for this machine (machine empty), or for
// one described as 0/1 flags [amx_bf16, avx512_bf16, amx_fp16, avx512_fp16, avx512_build,
// library_exact].
std::tuple<std::string, std::string> explain_cpu_products(c10::ScalarType dtype,
                                                          const std::string& requested,
                                                          c10::OptionalIntArrayRef machine);

}  // namespace torch_mha::cpu
