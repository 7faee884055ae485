// Un-permute with the weighted combine: y[t] = sum_j topk_weights[t, j] * y_perm[perm_rows[t, j]].
#include "cpu/kernels.h"
#include "core/threads.h"
#include "cpu/common.h"

namespace moe_ext::cpu::MOE_EXT_CPU_NS {

void unpermute(const float* y_perm, const int32_t* perm_rows, const float* weights, int64_t T,
               int64_t k, int64_t d, float* y) {
  const int threads = num_threads();
  MOE_EXT_PARALLEL_FOR(threads)
  for (int64_t t = 0; t < T; ++t) {
    float* dst = y + t * d;
    for (int64_t i = 0; i < d; ++i) dst[i] = 0.f;
    for (int64_t j = 0; j < k; ++j) {  // slot order: the sum is deterministic
      const int64_t row = perm_rows[t * k + j];
      if (row < 0) continue;
      const float weight = weights[t * k + j];
      const float* src = y_perm + row * d;
      for (int64_t i = 0; i < d; ++i) dst[i] += weight * src[i];
    }
  }
}

}  // namespace moe_ext::cpu::MOE_EXT_CPU_NS
