// Building block of the grouped GEMM's backward (csrc/core/backward.cpp): a blocked, multithreaded
// transpose. dA = dOut @ w[e] and dW[e] = dOut[rows]^T @ a[rows] are both run by the forward grouped
// GEMM kernel (packed panels, register-blocked microkernel) on transposed operands, so the backward gets
// the forward's speed and its fixed summation order (deterministic dW, no atomics) for the price of
// transposes, which move O(rows * (N + K)) floats against the GEMM's O(rows * N * K) flops.
#include "cpu/common.h"
#include "cpu/kernels.h"
#include "core/threads.h"

namespace moe_ext::cpu::MOE_EXT_CPU_NS {

namespace {
constexpr int64_t kTransposeBlock = 32;  // 32 x 32 floats = 4 KiB read and written per block: in L1
}  // namespace

void transpose(const float* src, int64_t rows, int64_t cols, int64_t ld, float* dst) {
  const int64_t row_blocks = ceil_div(rows, kTransposeBlock);
  const int threads = num_threads();
  MOE_EXT_PARALLEL_FOR(threads)
  for (int64_t rb = 0; rb < row_blocks; ++rb) {
    const int64_t r0 = rb * kTransposeBlock, r1 = min_i64(rows, r0 + kTransposeBlock);
    for (int64_t c0 = 0; c0 < cols; c0 += kTransposeBlock) {
      const int64_t c1 = min_i64(cols, c0 + kTransposeBlock);
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) dst[c * rows + r] = src[r * ld + c];
    }
  }
}

}  // namespace moe_ext::cpu::MOE_EXT_CPU_NS
