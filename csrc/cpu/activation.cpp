// The standalone expert activation (core/types.h's Activation) on h [M, 2f] (gated) or [M, f]. The vector
// math lives in cpu/activation.h, shared with the grouped GEMM's fused epilogue.
#include "cpu/activation.h"

#include "core/threads.h"
#include "cpu/kernels.h"

namespace moe_ext::cpu::MOE_EXT_CPU_NS {

void activate(const float* h, int64_t M, int64_t f, const Activation& activation, int threads, float* out) {
  const int64_t h_cols = is_gated(activation) ? 2 * f : f;
  MOE_EXT_PARALLEL_FOR(threads)
  for (int64_t m = 0; m < M; ++m) {
    const float* row = h + m * h_cols;
    activate_product_row(activation, row, is_gated(activation) ? row + f : nullptr, f, out + m * f);
  }
}

}  // namespace moe_ext::cpu::MOE_EXT_CPU_NS
