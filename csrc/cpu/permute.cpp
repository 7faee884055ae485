// Token permutation's data movement: copy each kept token copy to its row of x_perm, in x's dtype or
// widened to float32 (the expert path's GEMMs read float32 rows).
// (The counting sort that decides the rows is integer bookkeeping in core/ops.cpp.)
#include "cpu/kernels.h"
#include "core/threads.h"
#include "cpu/common.h"
#include "cpu/convert.h"

namespace moe_ext::cpu::MOE_EXT_CPU_NS {

namespace {

template <typename Src>
void widening_gather(const Src* x, const int32_t* perm_rows, int64_t T, int64_t k, int64_t d, float* x_perm,
                     int threads) {
  MOE_EXT_PARALLEL_FOR(threads)
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < k; ++j) {
      const int64_t row = perm_rows[t * k + j];
      if (row >= 0) widen_row(x + t * d, d, x_perm + row * d);
    }
}

}  // namespace

void gather_rows(const void* x, DType x_dtype, const int32_t* perm_rows, int64_t T, int64_t k, int64_t d,
                 void* x_perm, DType perm_dtype) {
  const int threads = num_threads();
  if (perm_dtype == x_dtype) {
    const size_t row_bytes = static_cast<size_t>(d * dtype_size(x_dtype));
    const char* src = static_cast<const char*>(x);
    char* dst = static_cast<char*>(x_perm);
    MOE_EXT_PARALLEL_FOR(threads)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < k; ++j) {
        const int64_t row = perm_rows[t * k + j];
        if (row >= 0) memcpy(dst + row * row_bytes, src + t * row_bytes, row_bytes);
      }
    return;
  }
  float* dst = static_cast<float*>(x_perm);  // widening: perm_dtype is float32
  switch (x_dtype) {
    case DType::bf16: return widening_gather(static_cast<const bf16_t*>(x), perm_rows, T, k, d, dst, threads);
    case DType::f16: return widening_gather(static_cast<const f16_t*>(x), perm_rows, T, k, d, dst, threads);
    case DType::f32: return widening_gather(static_cast<const float*>(x), perm_rows, T, k, d, dst, threads);
  }
}

}  // namespace moe_ext::cpu::MOE_EXT_CPU_NS
