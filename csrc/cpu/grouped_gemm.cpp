// Grouped GEMM: out[rows of e] = a[rows of e] @ w[e]^T, one GEMM per expert over its own rows.
// The plain tier: tiles of (row block, column block) spread over the threads; each output element is
// one fixed-order dot product, so the result does not depend on the tiling or the thread count.
#include "cpu/kernels.h"
#include "core/threads.h"
#include "cpu/common.h"

namespace moe_ext::cpu::MOE_EXT_CPU_NS {

namespace {

// Rows per tile: a weight row is loaded once and reused from L1 across this many token rows.
constexpr int64_t kRowBlock = 8;
// Columns per tile: small enough that a skewed expert or a tiny T still yields a tile per thread.
constexpr int64_t kColBlock = 64;

// The expert owning row m: the last e with offsets[e] <= m (skips empty experts).
int64_t expert_of_row(const int32_t* offsets, int64_t E, int64_t m) {
  int64_t lo = 0, hi = E;
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (offsets[mid] <= m) lo = mid;
    else hi = mid;
  }
  return lo;
}

void gemm_tile(const float* a, const float* w_expert, int64_t row_begin, int64_t row_end,
               int64_t col_begin, int64_t col_end, int64_t N, int64_t K, float* out) {
  for (int64_t n = col_begin; n < col_end; ++n) {
    const float* w_row = w_expert + n * K;
    for (int64_t m = row_begin; m < row_end; ++m) out[m * N + n] = dot(a + m * K, w_row, K);
  }
}

}  // namespace

void grouped_gemm(const float* a, const float* w, const int32_t* offsets, int64_t E, int64_t N,
                  int64_t K, float* out) {
  const int64_t M = offsets[E];
  const int64_t row_blocks = ceil_div(M, kRowBlock), col_blocks = ceil_div(N, kColBlock);
  const int64_t tiles = row_blocks * col_blocks;
  const int threads = num_threads();
  MOE_EXT_PARALLEL_FOR(threads)
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t col_begin = (tile % col_blocks) * kColBlock;
    const int64_t col_end = min_i64(col_begin + kColBlock, N);
    int64_t m = (tile / col_blocks) * kRowBlock;
    const int64_t block_end = min_i64(m + kRowBlock, M);
    while (m < block_end) {  // a row block may straddle experts
      const int64_t e = expert_of_row(offsets, E, m);
      const int64_t rows_end = min_i64(block_end, offsets[e + 1]);
      gemm_tile(a, w + e * N * K, m, rows_end, col_begin, col_end, N, K, out);
      m = rows_end;
    }
  }
}

}  // namespace moe_ext::cpu::MOE_EXT_CPU_NS
