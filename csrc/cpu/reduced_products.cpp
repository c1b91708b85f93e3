// The choice of engine for bfloat16/float16 tile products (see reduced_products.h), and the one
// probe it needs of the PyTorch build: whether cpublas::brgemm keeps float32 accumulation.
#include "cpu/reduced_products.h"

#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <cpuinfo.h>

#include <cstdlib>

#include "torch_mha.h"

namespace torch_mha::cpu {
namespace {

bool is_bfloat16(c10::ScalarType dtype) {
  return dtype == c10::ScalarType::BFloat16;
}

// 1 + 2^-12 is exact in float32 and rounds to 1 in bfloat16 and float16: a brgemm that returns
// it from [1, 1] x [1, 2^-12] kept the sum in float32 instead of rounding it to the input type.
template <typename T>
bool brgemm_accumulates_in_float() {
  constexpr float kSmall = 1.0f / 4096.0f;
  const T a[2] = {T(1.0f), T(1.0f)};
  const T b[2] = {T(1.0f), T(kSmall)};
  float c[1] = {0.0f};
  if (!kHaveBrgemm) {
    return false;
  }
  try {
    reduced_matmul(/*m=*/1, /*n=*/1, /*k=*/2, a, /*lda=*/2, b, /*ldb=*/1, c, /*ldc=*/1,
                   /*accumulate=*/false);
  } catch (const c10::Error&) {
    return false;
  }
  return c[0] == 1.0f + kSmall;
}

bool library_exact(c10::ScalarType dtype) {
  static const bool bfloat16 = brgemm_accumulates_in_float<c10::BFloat16>();
  static const bool half = brgemm_accumulates_in_float<c10::Half>();
  return is_bfloat16(dtype) ? bfloat16 : half;
}

}  // namespace

const char* reduced_products_name(ReducedProducts engine) {
  return engine == ReducedProducts::kBrgemm ? "brgemm" : "fma";
}

ReducedProductsChoice choose_reduced_products(const ReducedProductsQuery& q) {
  const std::string& requested = q.requested;
  TORCH_CHECK(
      requested.empty() || requested == "auto" || requested == "fma" || requested == "brgemm",
      "TORCH_MHA_CPU_REDUCED_PRODUCTS must be auto, fma or brgemm, but is '", requested, "'");
  const bool reduced = q.dtype == c10::ScalarType::BFloat16 || q.dtype == c10::ScalarType::Half;
  if (!reduced) {
    return {ReducedProducts::kFloatFma, "float32 and float64 tiles always use the FMA kernels"};
  }
  const char* dtype_name = is_bfloat16(q.dtype) ? "bfloat16" : "float16";
  const std::string library_rounds = std::string("cpublas::brgemm in this PyTorch build rounds ") +
                                     dtype_name + " products to " + dtype_name +
                                     " (no MKL or oneDNN kernel with float32 accumulation)";
  if (requested == "fma") {
    return {ReducedProducts::kFloatFma, "TORCH_MHA_CPU_REDUCED_PRODUCTS=fma"};
  }
  if (requested == "brgemm") {
    TORCH_CHECK(q.library_exact,
                "TORCH_MHA_CPU_REDUCED_PRODUCTS=brgemm cannot be honoured: ", library_rounds);
    return {ReducedProducts::kBrgemm, "TORCH_MHA_CPU_REDUCED_PRODUCTS=brgemm"};
  }
  const bool native =
      is_bfloat16(q.dtype) ? (q.amx_bf16 || q.avx512_bf16) : (q.amx_fp16 || q.avx512_fp16);
  if (!native) {
    return {ReducedProducts::kFloatFma,
            std::string("the CPU has no ") + dtype_name + " dot-product instructions (" +
                (is_bfloat16(q.dtype) ? "amx_bf16, avx512_bf16" : "amx_fp16, avx512_fp16") +
                "): converted float32 FMAs are faster than a library's emulation"};
  }
  if (!q.avx512_build) {
    return {ReducedProducts::kFloatFma,
            "the kernels run a build below AVX512 (ATEN_CPU_CAPABILITY), which stands for a CPU "
            "without these instructions"};
  }
  if (!q.library_exact) {
    return {ReducedProducts::kFloatFma, library_rounds};
  }
  const bool amx = is_bfloat16(q.dtype) ? q.amx_bf16 : q.amx_fp16;
  return {ReducedProducts::kBrgemm,
          std::string("the CPU has ") +
              (amx ? (is_bfloat16(q.dtype) ? "amx_bf16" : "amx_fp16")
                   : (is_bfloat16(q.dtype) ? "avx512_bf16" : "avx512_fp16")) +
              ": cpublas::brgemm reaches it through oneDNN/MKL"};
}

ReducedProductsQuery reduced_products_query(c10::ScalarType dtype, bool avx512_build) {
  static const bool cpuinfo_ready = cpuinfo_initialize();
  ReducedProductsQuery q;
  q.dtype = dtype;
  q.amx_bf16 = cpuinfo_ready && cpuinfo_has_x86_amx_bf16();
  q.avx512_bf16 = cpuinfo_ready && cpuinfo_has_x86_avx512bf16();
  q.amx_fp16 = cpuinfo_ready && cpuinfo_has_x86_amx_fp16();
  q.avx512_fp16 = cpuinfo_ready && cpuinfo_has_x86_avx512fp16();
  q.avx512_build = avx512_build;
  const char* requested = std::getenv("TORCH_MHA_CPU_REDUCED_PRODUCTS");
  q.requested = requested == nullptr ? "" : requested;
  // The probe runs a GEMM: only where the answer can matter.
  const bool reduced = dtype == c10::ScalarType::BFloat16 || dtype == c10::ScalarType::Half;
  q.library_exact = reduced && library_exact(dtype);
  return q;
}

std::tuple<std::string, std::string> explain_cpu_products(c10::ScalarType dtype,
                                                          const std::string& requested,
                                                          c10::OptionalIntArrayRef machine) {
  ReducedProductsQuery q;
  if (machine.has_value()) {
    TORCH_CHECK(machine->size() == 6,
                "_explain_cpu_products: machine must hold 6 flags (amx_bf16, avx512_bf16, "
                "amx_fp16, avx512_fp16, avx512_build, library_exact), but has ",
                machine->size());
    const auto flag = [&](size_t i) { return (*machine)[i] != 0; };
    q.dtype = dtype;
    q.amx_bf16 = flag(0);
    q.avx512_bf16 = flag(1);
    q.amx_fp16 = flag(2);
    q.avx512_fp16 = flag(3);
    q.avx512_build = flag(4);
    q.library_exact = flag(5);
  } else {
    q = reduced_products_query(dtype, cpu_capability() == "AVX512");
  }
  q.requested = requested;
  const ReducedProductsChoice choice = choose_reduced_products(q);
  return {reduced_products_name(choice.engine), choice.reason};
}

}  // namespace torch_mha::cpu
