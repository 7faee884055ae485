// Grouped GEMM: out[rows of e] = a[rows of e] @ w[e]^T, one GEMM per expert over its own rows.
//
// Work is split into tiles of (expert, block of kColBlock output columns), scheduled dynamically over
// the threads, so both cores stay busy when one expert holds most rows or when T is tiny. Inside a tile:
// - experts with many rows: the tile's weights are packed, kDepthBlock at a time, into panels of
//   kPanelCols columns laid out [k][column] (contiguous SIMD loads), and a kMicroRows x kPanelCols
//   register-blocked microkernel walks the rows (GotoBLAS-style);
// - experts with few rows (decode): packing would cost as much as the math, so each weight row is
//   streamed once and dotted with every row of the expert.
// Each output element is summed in an order fixed by these constants and the data, never by the thread
// count or schedule, so results are bit-identical for any number of threads.
#include "cpu/common.h"
#include "cpu/kernels.h"
#include "cpu/vec.h"
#include "core/threads.h"

namespace moe_ext::cpu::MOE_EXT_CPU_NS {

namespace {

// Rows per microkernel: 2 x kMicroRows accumulators + 2 panel loads + 1 broadcast must fit the register
// file (32 registers with AVX-512, 16 below).
constexpr int64_t kMicroRows = kLanes == 16 ? 8 : 6;
constexpr int64_t kPanelCols = 2 * kLanes;      // two registers wide
constexpr int64_t kColBlock = 256;              // a multiple of kPanelCols for every tier (8, 16, 32)
constexpr int64_t kDepthBlock = 256;            // packed block kColBlock x kDepthBlock floats = 256 KiB: in L2
constexpr int64_t kFewRows = 8;                 // at most this many rows: the streaming (dot) path
static_assert(kColBlock * kDepthBlock <= kGemmScratchFloats, "the packed block must fit the scratch");
static_assert(kColBlock % kPanelCols == 0, "column blocks hold whole panels");

// Packs w rows [n0, n0+cols) x depth [k0, k0+depth) into panels [cols/kPanelCols][depth][kPanelCols],
// zero-padding the last panel's missing columns.
void pack_panels(const float* w, int64_t K, int64_t n0, int64_t cols, int64_t k0, int64_t depth, float* packed) {
  for (int64_t panel = 0; panel * kPanelCols < cols; ++panel) {
    float* dst = packed + panel * depth * kPanelCols;
    for (int64_t c = 0; c < kPanelCols; ++c) {
      const int64_t n = panel * kPanelCols + c;
      if (n < cols) {
        const float* src = w + (n0 + n) * K + k0;
        for (int64_t p = 0; p < depth; ++p) dst[p * kPanelCols + c] = src[p];
      } else {
        for (int64_t p = 0; p < depth; ++p) dst[p * kPanelCols + c] = 0.f;
      }
    }
  }
}

// c[r][0..cols) (+)= sum_p rows[r][p] * panel[p][...] for r < rows_used (rows beyond it are repeats of a
// valid row whose results are dropped).
void micro_kernel(const float* const* rows, int64_t rows_used, const float* panel, int64_t depth, float* c,
                  int64_t ldc, int64_t cols, bool accumulate) {
  vec acc[kMicroRows][2] = {};
  for (int64_t p = 0; p < depth; ++p) {
    const vec b0 = load(panel + p * kPanelCols), b1 = load(panel + p * kPanelCols + kLanes);
    for (int64_t r = 0; r < kMicroRows; ++r) {
      const vec a = broadcast(rows[r][p]);
      acc[r][0] += a * b0;
      acc[r][1] += a * b1;
    }
  }
  for (int64_t r = 0; r < rows_used; ++r) {
    float* dst = c + r * ldc;
    if (cols == kPanelCols) {
      store(dst, accumulate ? load(dst) + acc[r][0] : acc[r][0]);
      store(dst + kLanes, accumulate ? load(dst + kLanes) + acc[r][1] : acc[r][1]);
    } else {
      float lanes[kPanelCols];
      store(lanes, acc[r][0]);
      store(lanes + kLanes, acc[r][1]);
      for (int64_t j = 0; j < cols; ++j) dst[j] = accumulate ? dst[j] + lanes[j] : lanes[j];
    }
  }
}

void packed_tile(const float* a, const float* w_expert, int64_t row_begin, int64_t row_end, int64_t n0,
                 int64_t cols, int64_t N, int64_t K, float* packed, float* out) {
  if (K == 0)  // an empty sum: the depth loop below would never write the tile
    for (int64_t m = row_begin; m < row_end; ++m)
      for (int64_t j = 0; j < cols; ++j) out[m * N + n0 + j] = 0.f;
  for (int64_t k0 = 0; k0 < K; k0 += kDepthBlock) {
    const int64_t depth = min_i64(kDepthBlock, K - k0);
    pack_panels(w_expert, K, n0, cols, k0, depth, packed);
    for (int64_t m = row_begin; m < row_end; m += kMicroRows) {
      const int64_t rows_used = min_i64(kMicroRows, row_end - m);
      const float* rows[kMicroRows];
      for (int64_t r = 0; r < kMicroRows; ++r) rows[r] = a + (m + min_i64(r, rows_used - 1)) * K + k0;
      for (int64_t j = 0; j < cols; j += kPanelCols)
        micro_kernel(rows, rows_used, packed + (j / kPanelCols) * depth * kPanelCols, depth,
                     out + m * N + n0 + j, N, min_i64(kPanelCols, cols - j), k0 > 0);
    }
  }
}

void streaming_tile(const float* a, const float* w_expert, int64_t row_begin, int64_t row_end, int64_t n0,
                    int64_t cols, int64_t N, int64_t K, float* out) {
  for (int64_t n = n0; n < n0 + cols; ++n) {
    const float* w_row = w_expert + n * K;
    for (int64_t m = row_begin; m < row_end; ++m) out[m * N + n] = dot(a + m * K, w_row, K);
  }
}

}  // namespace

void grouped_gemm(const float* a, const float* w, const int32_t* offsets, int64_t E, int64_t N, int64_t K,
                  int threads, float* out, float* scratch) {
  const int64_t col_blocks = ceil_div(N, kColBlock), tiles = E * col_blocks;
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
#endif
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t e = tile / col_blocks, n0 = (tile % col_blocks) * kColBlock;
    const int64_t row_begin = offsets[e], row_end = offsets[e + 1];
    if (row_begin == row_end) continue;
    const int64_t cols = min_i64(kColBlock, N - n0);
    const float* w_expert = w + e * N * K;
    if (row_end - row_begin <= kFewRows)
      streaming_tile(a, w_expert, row_begin, row_end, n0, cols, N, K, out);
    else
      packed_tile(a, w_expert, row_begin, row_end, n0, cols, N, K, scratch + thread_index() * kGemmScratchFloats,
                  out);
  }
}

}  // namespace moe_ext::cpu::MOE_EXT_CPU_NS
