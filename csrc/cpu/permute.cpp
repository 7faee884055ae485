// Token permutation's data movement: copy each kept token copy to its row of x_perm.
// (The counting sort that decides the rows is integer bookkeeping in core/ops.cpp.)
#include "cpu/kernels.h"
#include "core/threads.h"
#include "cpu/common.h"

namespace moe_ext::cpu::MOE_EXT_CPU_NS {

void gather_rows(const float* x, const int32_t* perm_rows, int64_t T, int64_t k, int64_t d,
                 float* x_perm) {
  const int threads = num_threads();
  MOE_EXT_PARALLEL_FOR(threads)
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < k; ++j) {
      const int64_t row = perm_rows[t * k + j];
      if (row >= 0) memcpy(x_perm + row * d, x + t * d, static_cast<size_t>(d) * sizeof(float));
    }
}

}  // namespace moe_ext::cpu::MOE_EXT_CPU_NS
