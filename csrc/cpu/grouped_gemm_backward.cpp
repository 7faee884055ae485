// The grouped GEMM's weight gradient (csrc/core/backward.cpp; its grad_a is the forward grouped GEMM on
// the weights read as their transpose): dW[e] = dOut[rows]^T @ a[rows] with the forward's microkernel
// shape, reading both operands in place (see below).
#include "cpu/common.h"
#include "cpu/gemm_micro.h"
#include "cpu/kernels.h"
#include "core/threads.h"

// --- grad_w of the grouped GEMM, all experts in one parallel loop -----------------------------------
// grad_w[e] [N, K] = grad_out[rows of e]^T @ a[rows of e], with the rows as the depth. Work is cut into
// tiles of (expert, kWeightTileN output rows n, kWeightTileK output columns k), scheduled dynamically
// so small experts never leave a core idle. No operand is transposed whole: per depth block of rows, a
// tile packs its columns of a (contiguous reads) into panels and copies its columns of grad_out into
// blocks of kMicroRows (pack_grad_rows), from which the microkernel below broadcasts grad_out[row, n]
// (the operand read "transposed"). The tile's float32 sums are stored in grad_w's dtype. Each element is summed
// over the expert's rows in order, per depth block of kWeightDepth (the forward GEMM's order), so the
// result does not depend on the thread count or the schedule.
namespace moe_ext::cpu::MOE_EXT_CPU_NS {

namespace {

constexpr int64_t kWeightTileN = 128;  // rows of grad_w per tile (the microkernel's "rows")
constexpr int64_t kWeightTileK = 128;  // columns of grad_w per tile: 4 panels
constexpr int64_t kWeightDepth = 256;  // rows of the expert per depth block (packed block: 128 KiB)
constexpr int64_t kWeightPanels = kWeightTileK / kPanelCols;
constexpr int64_t kWeightLocalBytes = kWeightTileN * kWeightTileK * 4;
constexpr int64_t kWeightPackBytes = kWeightTileK * kWeightDepth * 4;
static_assert(kWeightLocalBytes + kWeightPackBytes + kWeightTileN * kWeightDepth * 4 <= kGemmScratchBytes,
              "tile buffers fit");
static_assert(kWeightTileK % kPanelCols == 0, "a tile holds whole panels");

// c[r][0..kMicroCols) (+)= sum_p g[p * ldg + r] * b[p * kPanelCols + ...]: g's rows are depths.
template <int Rows>
void micro_kernel_lhs_t(const float* g, int64_t ldg, const float* b, int64_t depth, float* c, int64_t ldc,
                        bool accumulate) {
  vec acc[Rows][2];
  zero_acc(acc);
  for (int64_t p = 0; p < depth; ++p) {
    const vec b0 = load(b + p * kPanelCols), b1 = load(b + p * kPanelCols + kLanes);
    const float* gp = g + p * ldg;
    for (int r = 0; r < Rows; ++r) {
      const vec gr = broadcast(gp[r]);
      acc[r][0] += gr * b0;
      acc[r][1] += gr * b1;
    }
  }
  store_tile<Rows>(acc, c, ldc, accumulate);
}

void micro_lhs_t(int rows, const float* g, int64_t ldg, const float* b, int64_t depth, float* c, int64_t ldc,
                 bool accumulate) {
  switch (rows) {
#define MOE_EXT_ROWS_CASE(R) \
  case R: return micro_kernel_lhs_t<(R <= kMicroRows ? R : 1)>(g, ldg, b, depth, c, ldc, accumulate);
    MOE_EXT_ROWS_CASE(1) MOE_EXT_ROWS_CASE(2) MOE_EXT_ROWS_CASE(3) MOE_EXT_ROWS_CASE(4)
    MOE_EXT_ROWS_CASE(5) MOE_EXT_ROWS_CASE(6) MOE_EXT_ROWS_CASE(7) MOE_EXT_ROWS_CASE(8)
#undef MOE_EXT_ROWS_CASE
    default: break;
  }
}

// grad_out's columns [n0, n0 + n_rows) at depths [0, depth) (rows ldg apart), copied into blocks of
// kMicroRows columns, each [depth][kMicroRows]: the microkernel's broadcasts then walk one contiguous run.
// Read in place they came from `depth` rows N floats apart, which for a power-of-two N all fall in one L1
// set (N = 4096: 16 KiB apart), so every broadcast missed L1.
void pack_grad_rows(const float* g, int64_t ldg, int64_t n_rows, int64_t depth, float* dst) {
  for (int64_t p = 0; p < depth; ++p) {
    const float* src = g + p * ldg;
    for (int64_t m = 0; m < n_rows; m += kMicroRows) {
      float* to = dst + m * depth + p * kMicroRows;
      const int64_t take = min_i64(kMicroRows, n_rows - m);
      for (int64_t r = 0; r < take; ++r) to[r] = src[m + r];
    }
  }
}

void grad_w_tile(const float* grad_out, const float* a, int64_t r0, int64_t rows, int64_t N, int64_t K, int64_t n0,
                 int64_t n_rows, int64_t k0, int64_t k_cols, float* local, float* pack, float* g_pack, void* dst,
                 DType dst_dtype) {
  const int64_t panels = ceil_div(k_cols, kPanelCols);
  for (int64_t d0 = 0; d0 < rows; d0 += kWeightDepth) {
    const int64_t depth = min_i64(kWeightDepth, rows - d0);
    for (int64_t j = 0; j < panels; ++j) {  // panel j: element (p, c) at p * kPanelCols + c
      const int64_t cols = min_i64(kPanelCols, k_cols - j * kPanelCols);
      float* panel = pack + j * kWeightDepth * kPanelCols;
      for (int64_t p = 0; p < depth; ++p) {
        memcpy(panel + p * kPanelCols, a + (r0 + d0 + p) * K + k0 + j * kPanelCols, cols * sizeof(float));
        if (cols < kPanelCols) memset(panel + p * kPanelCols + cols, 0, (kPanelCols - cols) * sizeof(float));
      }
    }
    pack_grad_rows(grad_out + (r0 + d0) * N + n0, N, n_rows, depth, g_pack);
    for (int64_t j = 0; j < panels; ++j)
      for (int64_t slice = 0; slice < kPanelCols && j * kPanelCols + slice < k_cols; slice += kMicroCols)
        for (int64_t m = 0; m < n_rows; m += kMicroRows)
          micro_lhs_t(static_cast<int>(min_i64(kMicroRows, n_rows - m)), g_pack + m * depth, kMicroRows,
                      pack + j * kWeightDepth * kPanelCols + slice, depth,
                      local + m * kWeightTileK + j * kPanelCols + slice, kWeightTileK, d0 > 0);
  }
  const int64_t size = dtype_size(dst_dtype);
  for (int64_t r = 0; r < n_rows; ++r) {
    char* out = static_cast<char*>(dst) + ((n0 + r) * K + k0) * size;
    if (rows == 0)
      memset(out, 0, k_cols * size);  // all-zero bits are +0 in every dtype
    else if (dst_dtype == DType::f32)
      memcpy(out, local + r * kWeightTileK, k_cols * sizeof(float));
    else if (dst_dtype == DType::bf16)
      narrow_row(local + r * kWeightTileK, k_cols, reinterpret_cast<bf16_t*>(out));
    else
      narrow_row(local + r * kWeightTileK, k_cols, reinterpret_cast<f16_t*>(out));
  }
}

}  // namespace

void grouped_gemm_grad_w(const float* grad_out, const float* a, const int32_t* offsets, int64_t E, int64_t N,
                         int64_t K, int threads, void* scratch, void* grad_w, DType grad_w_dtype) {
  const int64_t n_tiles = ceil_div(N, kWeightTileN), k_tiles = ceil_div(K, kWeightTileK);
  const int64_t per_expert = n_tiles * k_tiles;
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
#endif
  for (int64_t index = 0; index < E * per_expert; ++index) {
    char* mine = static_cast<char*>(scratch) + thread_index() * kGemmScratchBytes;
    float* local = reinterpret_cast<float*>(mine);
    float* pack = reinterpret_cast<float*>(mine + kWeightLocalBytes);
    float* g_pack = reinterpret_cast<float*>(mine + kWeightLocalBytes + kWeightPackBytes);
    const int64_t e = index / per_expert, nb = index % per_expert / k_tiles, kb = index % k_tiles;
    const int64_t n0 = nb * kWeightTileN, k0 = kb * kWeightTileK;
    grad_w_tile(grad_out, a, offsets[e], offsets[e + 1] - offsets[e], N, K, n0, min_i64(kWeightTileN, N - n0), k0,
                min_i64(kWeightTileK, K - k0), local, pack, g_pack,
                static_cast<char*>(grad_w) + e * N * K * dtype_size(grad_w_dtype), grad_w_dtype);
  }
}

}  // namespace moe_ext::cpu::MOE_EXT_CPU_NS
