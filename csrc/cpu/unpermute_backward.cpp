// Gradient of the weighted un-permute y[t] = sum_j w[t, j] * y_perm[perm_rows[t, j]]:
//   grad_y_perm[perm_rows[t, j]] += w[t, j] * grad_y[t]      grad_w[t, j] = <grad_y[t], y_perm[perm_rows[t, j]]>
// Rows no slot points at get 0 (the caller zeroes grad_y_perm); slots with perm_rows = -1 get grad_w 0.
// Several slots may name the same row only when the caller says so (threads = 1): then the adds run in
// (token, slot) order. permute()'s perm_rows never repeat a row, so tokens run in parallel.
#include "cpu/common.h"
#include "cpu/kernels.h"

namespace moe_ext::cpu::MOE_EXT_CPU_NS {

void unpermute_backward(const float* grad_y, const float* y_perm, const int32_t* perm_rows, const float* weights,
                        int64_t T, int64_t k, int64_t d, int threads, float* grad_y_perm, float* grad_weights) {
  MOE_EXT_PARALLEL_FOR(threads)
  for (int64_t t = 0; t < T; ++t) {
    const float* dy = grad_y + t * d;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t row = perm_rows[t * k + j];
      if (row < 0) {
        grad_weights[t * k + j] = 0.f;
        continue;
      }
      const float weight = weights[t * k + j];
      float* dst = grad_y_perm + row * d;
      for (int64_t i = 0; i < d; ++i) dst[i] += weight * dy[i];
      grad_weights[t * k + j] = dot(dy, y_perm + row * d, d);
    }
  }
}

}  // namespace moe_ext::cpu::MOE_EXT_CPU_NS
