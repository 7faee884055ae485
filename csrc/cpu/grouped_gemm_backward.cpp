// The grouped GEMM's weight gradient (csrc/core/backward.cpp; its grad_a is the forward grouped GEMM on
// the weights read as their transpose): dW[e] = dOut[rows]^T @ a[rows] with the forward's microkernel
// shape, reading both operands in place (see below).
#include "cpu/common.h"
#include "cpu/gemm_micro.h"
#include "cpu/kernels.h"
#include "core/threads.h"

// --- grad_w of the grouped GEMM, all experts in one parallel loop -----------------------------------
// grad_w[e] [N, K] = grad_out[rows of e]^T @ a[rows of e], with the rows as the depth. Work is cut into
// tiles of (expert, block of output rows n, block of output columns k), scheduled dynamically so small
// experts never leave a core idle. No operand is transposed whole: per depth block of rows, a tile packs
// its columns of both operands (contiguous reads, in the caller's dtype), then a register-blocked
// microkernel broadcasts grad_out[row, n] against a's panel. Two forms:
// - float32 sums of float32 products (any dtype, widened as packed): a in panels [depth][kPanelCols],
//   grad_out's columns in blocks of kMicroRows, each [depth][kMicroRows] (pack_grad_rows);
// - bfloat16 operands under vdpbf16ps (avx512 tier, GradWProblem::bf16_dot): both packed as pairs of rows
//   (pack_pairs: a in core/packed.h's bfloat16 pair layout), so each 32-bit word holds the two rows'
//   values vdpbf16ps multiplies; no float32 copy of either operand exists.
// The tile's float32 sums are stored in grad_w's dtype. Each element is summed over the expert's rows in
// order, per depth block (the forward GEMM's order), so the result does not depend on the thread count
// or the schedule.
namespace moe_ext::cpu::MOE_EXT_CPU_NS {

namespace {

constexpr int64_t kWeightTileN = 128;  // rows of grad_w per tile (the microkernel's "rows"), float32 form
constexpr int64_t kWeightTileK = 128;  // columns of grad_w per tile: 4 panels
constexpr int64_t kWeightDepth = 256;  // rows of the expert per depth block, float32 (packed a: 128 KiB)
// The bfloat16 pair form packs half the bytes per element, and its packing cost as much as half of its
// products: tiles twice as wide each way pack each operand half as often (the 256 KiB of sums stay in L2).
constexpr int64_t kPairTileN = 256, kPairTileK = 256, kPairDepth = 256;
// Blocks of packed bfloat16 pairs (below) start a line further than their size apart: a multiple of 4 KiB
// apart (a power-of-two number of pairs), the blocks of grad_out's columns fell in the same L1 sets, and
// the pack's stores, one to each block per pair of rows, missed L1 every time.
constexpr int64_t kBlockPadWords = 16;
static_assert(kWeightTileN * kWeightTileK * 4 + (kWeightTileN + kWeightTileK) * kWeightDepth * 4 <= kGemmScratchBytes,
              "float32 tile buffers fit");
static_assert(kPairTileN * kPairTileK * 4 + (kPairTileN + kPairTileK) * kPairDepth * 2 +
                      (kPairTileN / 8 + kPairTileK / 32) * kBlockPadWords * 4 <= kGemmScratchBytes,
              "pair tile buffers fit");
static_assert(kWeightTileK % kPanelCols == 0 && kPairTileK % kPanelCols == 0, "a tile holds whole panels");

struct WeightTile {
  int64_t r0, rows;      // the expert's rows of grad_out and a
  int64_t n0, n_rows;    // rows of grad_w
  int64_t k0, k_cols;    // columns of grad_w
  int64_t ld;            // row stride of the tile's sums (the form's tile width)
};

struct WeightBuffers {
  float* local;  // [tile rows][t.ld] float32 sums
  void* pack;    // a's packed columns
  void* g_pack;  // grad_out's packed columns
};

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

// grad_out's columns [n0, n0 + n_rows) at depths [0, depth) (rows ldg apart), widened into blocks of
// kMicroRows columns, each [depth][kMicroRows]: the microkernel's broadcasts then walk one contiguous run.
// Read in place they came from `depth` rows N floats apart, which for a power-of-two N all fall in one L1
// set (N = 4096: 16 KiB apart), so every broadcast missed L1.
template <typename T>
void pack_grad_rows(const T* g, int64_t ldg, int64_t n_rows, int64_t depth, float* dst) {
  for (int64_t p = 0; p < depth; ++p) {
    const T* src = g + p * ldg;
    for (int64_t m = 0; m < n_rows; m += kMicroRows) {
      float* to = dst + m * depth + p * kMicroRows;
      const int64_t take = min_i64(kMicroRows, n_rows - m);
      for (int64_t r = 0; r < take; ++r) to[r] = to_f32(src[m + r]);
    }
  }
}

// a's columns [k0, k0 + k_cols) at depths [0, depth) (rows lda apart), widened into float32 panels
// [depth][kPanelCols], columns past k_cols zero.
template <typename T>
void pack_a_panels(const T* a, int64_t lda, int64_t k_cols, int64_t depth, float* pack) {
  for (int64_t j = 0; j * kPanelCols < k_cols; ++j) {
    const int64_t cols = min_i64(kPanelCols, k_cols - j * kPanelCols);
    float* panel = pack + j * kWeightDepth * kPanelCols;
    for (int64_t p = 0; p < depth; ++p) {
      widen_row(a + p * lda + j * kPanelCols, cols, panel + p * kPanelCols);
      if (cols < kPanelCols) memset(panel + p * kPanelCols + cols, 0, (kPanelCols - cols) * sizeof(float));
    }
  }
}

// The float32 form: sums of the tile, per depth block, into b.local.
template <typename T>
void tile_sums(const GradWProblem& p, const WeightTile& t, const WeightBuffers& b) {
  const T* g = static_cast<const T*>(p.grad_out) + t.r0 * p.N + t.n0;
  const T* a = static_cast<const T*>(p.a) + t.r0 * p.K + t.k0;
  float* pack = static_cast<float*>(b.pack);
  float* g_pack = static_cast<float*>(b.g_pack);
  for (int64_t d0 = 0; d0 < t.rows; d0 += kWeightDepth) {
    const int64_t depth = min_i64(kWeightDepth, t.rows - d0);
    pack_a_panels(a + d0 * p.K, p.K, t.k_cols, depth, pack);
    pack_grad_rows(g + d0 * p.N, p.N, t.n_rows, depth, g_pack);
    for (int64_t j = 0; j * kPanelCols < t.k_cols; ++j)
      for (int64_t slice = 0; slice < kPanelCols && j * kPanelCols + slice < t.k_cols; slice += kMicroCols)
        for (int64_t m = 0; m < t.n_rows; m += kMicroRows)
          micro_lhs_t(static_cast<int>(min_i64(kMicroRows, t.n_rows - m)), g_pack + m * depth, kMicroRows,
                      pack + j * kWeightDepth * kPanelCols + slice, depth,
                      b.local + m * t.ld + j * kPanelCols + slice, t.ld, d0 > 0);
  }
}

#if defined(__AVX512F__)
static_assert(kMicroCols == kPanelCols, "one microkernel slice per panel");

// c[r][0..kPanelCols) (+)= the pair dot products of grad_out's column r and a's panel b over `pairs`
// pairs of rows: g holds column r's pair q at g[q * kMicroRows + r] (pack_pairs), b is a's packed panel;
// the forward's vdpbf16ps microkernel with that pair stride.
void micro_pairs_t(int rows, const uint32_t* g, const bf16_t* b, int64_t pairs, float* c, int64_t ldc,
                   bool accumulate) {
  switch (rows) {
#define MOE_EXT_ROWS_CASE(R) \
  case R: return micro_kernel_dpbf16<(R <= kMicroRows ? R : 1), kMicroRows>(g, 1, b, pairs, c, ldc, accumulate);
    MOE_EXT_ROWS_CASE(1) MOE_EXT_ROWS_CASE(2) MOE_EXT_ROWS_CASE(3) MOE_EXT_ROWS_CASE(4)
    MOE_EXT_ROWS_CASE(5) MOE_EXT_ROWS_CASE(6) MOE_EXT_ROWS_CASE(7) MOE_EXT_ROWS_CASE(8)
#undef MOE_EXT_ROWS_CASE
    default: break;
  }
}

// Columns [0, cols) of `depth` rows (ld elements apart) as bfloat16 pairs of rows, in blocks of Width
// columns (8 or 32), each [pairs][Width] words (word: row 2q in the low half, 2q + 1 in the high one;
// zero past depth, and past cols up to the block's end): a's panels (width kPanelCols: core/packed.h's pair
// layout) and grad_out's microkernel blocks (width kMicroRows). Row pair by row pair, 16 columns
// at a time in registers: each step reads two contiguous runs (column by column, every row was a new page
// of a wide operand, and the copy cost half as much as the products).
template <int64_t Width>
int64_t block_words(int64_t pairs) { return pairs * Width + kBlockPadWords; }  // block to block

template <int64_t Width>
void pack_pairs(const bf16_t* src, int64_t ld, int64_t cols, int64_t depth, uint32_t* dst) {
  const int64_t pairs = (depth + 1) / 2, padded = ceil_div(cols, Width) * Width;
  auto at = [&](int64_t q, int64_t c) { return dst + c / Width * block_words<Width>(pairs) + q * Width + c % Width; };
  for (int64_t q = 0; q < pairs; ++q) {
    const bf16_t* even = src + 2 * q * ld;
    const bf16_t* odd = 2 * q + 1 < depth ? even + ld : nullptr;
    int64_t c = 0;
    for (; odd && c + 16 <= cols; c += 16) {
      const __m256i e = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(even + c));
      const __m256i o = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(odd + c));
      const __m256i lo = _mm256_unpacklo_epi16(e, o), hi = _mm256_unpackhi_epi16(e, o);  // per 128-bit lane
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(at(q, c)), _mm256_permute2x128_si256(lo, hi, 0x20));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(at(q, c + 8)), _mm256_permute2x128_si256(lo, hi, 0x31));
    }
    for (; c < cols; ++c) *at(q, c) = even[c].bits | (odd ? static_cast<uint32_t>(odd[c].bits) << 16 : 0u);
    for (; c < padded; ++c) *at(q, c) = 0;
  }
}

// The vdpbf16ps form: a's and grad_out's columns as bfloat16 pairs of rows (pack_pairs), then kMicroRows
// columns of grad_out at a time against each of a's panels.
void tile_sums_pairs(const GradWProblem& p, const WeightTile& t, const WeightBuffers& b) {
  const bf16_t* g = static_cast<const bf16_t*>(p.grad_out) + t.r0 * p.N + t.n0;
  const bf16_t* a = static_cast<const bf16_t*>(p.a) + t.r0 * p.K + t.k0;
  uint32_t* pack = static_cast<uint32_t*>(b.pack);
  uint32_t* g_pack = static_cast<uint32_t*>(b.g_pack);
  for (int64_t d0 = 0; d0 < t.rows; d0 += kPairDepth) {
    const int64_t depth = min_i64(kPairDepth, t.rows - d0), pairs = (depth + 1) / 2;
    pack_pairs<kPanelCols>(a + d0 * p.K, p.K, t.k_cols, depth, pack);
    pack_pairs<kMicroRows>(g + d0 * p.N, p.N, t.n_rows, depth, g_pack);
    for (int64_t j = 0; j * kPanelCols < t.k_cols; ++j)
      for (int64_t m = 0; m < t.n_rows; m += kMicroRows)
        micro_pairs_t(static_cast<int>(min_i64(kMicroRows, t.n_rows - m)),
                      g_pack + m / kMicroRows * block_words<kMicroRows>(pairs),
                      reinterpret_cast<const bf16_t*>(pack + j * block_words<kPanelCols>(pairs)), pairs,
                      b.local + m * t.ld + j * kPanelCols, t.ld, d0 > 0);
  }
}
#endif

// The tile's rows of grad_w from its float32 sums (zeros for an expert without rows), in grad_w's dtype.
void store_tile_rows(const GradWProblem& p, const WeightTile& t, const float* local, void* grad_w_e) {
  const int64_t size = dtype_size(p.grad_w_dtype);
  for (int64_t r = 0; r < t.n_rows; ++r) {
    char* out = static_cast<char*>(grad_w_e) + ((t.n0 + r) * p.K + t.k0) * size;
    if (t.rows == 0)
      memset(out, 0, t.k_cols * size);  // all-zero bits are +0 in every dtype
    else if (p.grad_w_dtype == DType::f32)
      memcpy(out, local + r * t.ld, t.k_cols * sizeof(float));
    else if (p.grad_w_dtype == DType::bf16)
      narrow_row(local + r * t.ld, t.k_cols, reinterpret_cast<bf16_t*>(out));
    else
      narrow_row(local + r * t.ld, t.k_cols, reinterpret_cast<f16_t*>(out));
  }
}

// How a call's tiles are summed: the form for its operands, and its tile shape.
struct Form {
  void (*sums)(const GradWProblem&, const WeightTile&, const WeightBuffers&);
  int64_t tile_n, tile_k, pack_bytes;  // pack_bytes: a's packed block (grad_out's follows it)
};

Form form_of(const GradWProblem& p) {
#if defined(__AVX512F__)
  if (p.bf16_dot && p.dtype == DType::bf16)
    return {tile_sums_pairs, kPairTileN, kPairTileK, (kPairTileK * kPairDepth / 2 + kPairTileK / 32 * kBlockPadWords) * 4};
#endif
  const int64_t pack_bytes = kWeightTileK * kWeightDepth * 4;
  switch (p.dtype) {
    case DType::bf16: return {tile_sums<bf16_t>, kWeightTileN, kWeightTileK, pack_bytes};
    case DType::f16: return {tile_sums<f16_t>, kWeightTileN, kWeightTileK, pack_bytes};
    default: return {tile_sums<float>, kWeightTileN, kWeightTileK, pack_bytes};
  }
}

}  // namespace

void grouped_gemm_grad_w(const GradWProblem& p, int threads, void* scratch) {
  const Form form = form_of(p);
  const int64_t n_tiles = ceil_div(p.N, form.tile_n), k_tiles = ceil_div(p.K, form.tile_k);
  const int64_t per_expert = n_tiles * k_tiles, local_bytes = form.tile_n * form.tile_k * 4;
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
#endif
  for (int64_t index = 0; index < p.E * per_expert; ++index) {
    char* mine = static_cast<char*>(scratch) + thread_index() * kGemmScratchBytes;
    const WeightBuffers buf{reinterpret_cast<float*>(mine), mine + local_bytes, mine + local_bytes + form.pack_bytes};
    // Row blocks (nb) vary fastest: tiles running at once write different rows of grad_w, so no two
    // threads first-touch the same fresh page together (each then took the fault: kb fastest, two
    // neighbouring column blocks of the same rows, cost the Mixtral layer's grad_w 1.7 faults per page).
    const int64_t e = index / per_expert, kb = index % per_expert / n_tiles, nb = index % n_tiles;
    WeightTile t;
    t.r0 = p.offsets[e], t.rows = p.offsets[e + 1] - p.offsets[e];
    t.n0 = nb * form.tile_n, t.n_rows = min_i64(form.tile_n, p.N - t.n0);
    t.k0 = kb * form.tile_k, t.k_cols = min_i64(form.tile_k, p.K - t.k0), t.ld = form.tile_k;
    if (t.rows > 0) form.sums(p, t, buf);
    store_tile_rows(p, t, buf.local, static_cast<char*>(p.grad_w) + e * p.N * p.K * dtype_size(p.grad_w_dtype));
  }
}

}  // namespace moe_ext::cpu::MOE_EXT_CPU_NS
