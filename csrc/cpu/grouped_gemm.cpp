// Grouped GEMM: out[rows of e] = a[rows of e] @ w[e]^T, one GEMM per expert over its own rows, with the
// activation optionally fused into the epilogue.
//
// Work is cut into tiles of (expert, block of rows, block of kTileCols output columns), scheduled
// dynamically over the threads, so both cores stay busy when one expert holds most rows or when T is
// tiny. A tile computes into a float32 buffer of its own (scratch), then its epilogue writes the output:
// the activation (gated: act(gate) * up from the tile's gate and up columns, so the [M, 2f] product is
// never written out), or without one a copy of what did not go straight to out (whole panels do).
// Inside a tile, per depth block of kDepthBlock:
// - weights in the packed panel layout (core/packed.h: prepacked once, or packed here panel by panel
//   when the caller passed a plain or transposed array) feed a register-blocked microkernel
//   (cpu/gemm_micro.h);
//   the loop order keeps one microkernel's weight slice (kDepthBlock<W> x kMicroCols) in L1 across the
//   tile's rows and the tile's rows of a (<= 256 x kDepthBlock<W> floats) in L2;
// - plain weights with few rows per expert (decode): packing would cost as much as the math, so each
//   weight row is streamed once and dotted with every row of the expert. Transposed float32/float16
//   weights (w_t [K, N]) have no contiguous weight rows: there the microkernel reads w_t in place, a few
//   depth rows at a time across the whole tile, whose columns are widened (up to kWideCols) so that
//   each depth row is read as one long contiguous run (transposed bfloat16 weights are packed, the
//   microkernel needing the pair layout).
// Gated activations with interleaved gate/up rows (g0 u0 g1 u1 ...) need no reordering of the weights:
// a tile of output columns [c, c + n) computes the product columns [2c, 2c + 2n) as one segment, and the
// epilogue reads gate and up from alternate columns. Biases are added per product column in the epilogue
// (before the activation), so every path and layout shares them.
// Each output element is summed in an order fixed by the data and these constants, never by the thread
// count or the schedule, so results are bit-identical for any number of threads.
#include "core/packed.h"
#include "cpu/activation.h"
#include "cpu/common.h"
#include "cpu/convert.h"
#include "cpu/gemm_micro.h"
#include "cpu/kernels.h"
#include "cpu/vec.h"

#include <type_traits>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace moe_ext::cpu::MOE_EXT_CPU_NS {

namespace {

// Depths per block: a panel's depth block (kDepthBlock x kPanelCols weights) is 32 KiB, the L1 size:
// 256 float32 depths, 512 for the 2-byte dtypes (half the partial-sum round trips of 256).
template <typename W> constexpr int64_t kDepthBlock = 32 * 1024 / (kPanelCols * int64_t{sizeof(W)});
// Few rows (decode) walk each panel's blocks in turn, kMicroCols columns at a time: a block's lines are
// read in kPanelCols / kMicroCols strided passes. bfloat16 blocks of half the size (16 KiB) read faster
// there (Mixtral decode T=1..16, bench/decode_bandwidth.py: 6-12% less time); float32 and float16 did not.
template <typename W> constexpr int64_t kStreamDepthBlock = kDepthBlock<W> / (std::is_same_v<W, bf16_t> ? 2 : 1);
constexpr int64_t kTileCols = 128;     // output columns of a tile (4 panels; gated fused: 4 gate + 5 up panels)
constexpr int64_t kTileRows = 128;     // rows of a tile with packed weights (a's block: 128 KiB, in L2)
constexpr int64_t kMaxTileRows = 256;  // plain weights: more rows per tile amortise the per-tile packing
constexpr int64_t kFewRows = 16;       // plain weights, at most this many rows in an expert: streaming
constexpr int64_t kPanelFirstRows = 2 * kMicroRows;  // packed weights, at most this many rows: panel by panel
constexpr int64_t kLocalCols = kTileCols + kTileCols + kPanelCols;  // gate span + up span (misaligned up)
constexpr int64_t kLocalBytes = kMaxTileRows * kLocalCols * 4;
// Transposed weights, few rows: output columns of a tile (at most), and depth rows read per pass. 1024
// float32 columns are 4 KiB of a depth row, a page: the hardware prefetchers follow a run that long,
// and 16 rows at a time keep few pages in flight.
constexpr int64_t kWideCols = 1024;
constexpr int64_t kWideDepth = 16;
static_assert(kFewRows * (2 * kWideCols + kPanelCols) * 4 <= kLocalBytes, "a wide tile fits the scratch");
constexpr int64_t kPackBytes = kPanelCols * kDepthBlock<float> * 4;
static_assert(kLocalBytes + kPackBytes <= kGemmScratchBytes, "a tile's buffers fit the scratch");
static_assert(kTileCols % kPanelCols == 0 && kDepthBlock<float> % 2 == 0, "tiles hold whole panels, blocks whole pairs");

// The columns of w a tile reads: one segment, or for a fused gated tile the gate and the up segment.
struct Segment {
  int64_t first_panel = 0, panels = 0;  // panels covering [begin, begin + cols)
  int64_t local_col = 0;                // where the first panel lands in the tile's buffer
  int64_t offset = 0;                   // begin - first_panel * kPanelCols
  int64_t cols = 0;                     // product columns of the segment
  int64_t begin() const { return first_panel * kPanelCols + offset; }
};

template <typename W> constexpr bool kIsBf16 = false;
template <> constexpr bool kIsBf16<bf16_t> = true;
template <typename W> constexpr DType kDType = DType::f32;
template <> constexpr DType kDType<bf16_t> = DType::bf16;
template <> constexpr DType kDType<f16_t> = DType::f16;

struct Tile {
  int64_t expert, row_begin, row_end, col_begin, cols;
};

struct Geometry {
  int64_t out_cols;  // columns of out
  int64_t half;      // fused gated, concatenated: f (the up rows' offset in w); 0 otherwise
  bool gated, interleaved;
  int64_t tile_cols = kTileCols;  // output columns of a tile
  int64_t ld = kLocalCols;        // row stride of a tile's buffer
};

Segment segment(int64_t begin, int64_t cols, int64_t local_col) {
  Segment s;
  s.first_panel = begin / kPanelCols;
  s.panels = ceil_div(begin + cols, kPanelCols) - s.first_panel;
  s.local_col = local_col;
  s.offset = begin - s.first_panel * kPanelCols;
  s.cols = cols;
  return s;
}

// The product segments of a tile: its columns; fused gated, the gate and the up columns (concatenated),
// or the interleaved pairs of its columns (one segment of twice the width, starting on a panel boundary
// since col_begin is a multiple of kTileCols). Returns the count.
int tile_segments(const Geometry& g, const Tile& t, Segment* segs) {
  if (g.interleaved) {
    segs[0] = segment(2 * t.col_begin, 2 * t.cols, 0);
    return 1;
  }
  segs[0] = segment(t.col_begin, t.cols, 0);
  if (!g.gated) return 1;
  segs[1] = segment(g.half + t.col_begin, t.cols, segs[0].panels * kPanelCols);
  return 2;
}

// How a tile computes its product (see the top of the file).
enum class Product { packed, streamed, transposed };

Product product_of(const GemmProblem& p, int64_t expert_rows) {
  if (p.w.packed || expert_rows > kFewRows) return Product::packed;
  if (!p.w.transposed) return Product::streamed;
  return p.w.dtype == DType::bf16 ? Product::packed : Product::transposed;
}

// Whether a tile takes all of its expert's rows (the few-row paths, which read each weight once).
bool streams(const GemmProblem& p, int64_t expert_rows) { return product_of(p, expert_rows) != Product::packed; }

// Tiles are wide when every expert takes the transposed few-row path: as wide as kWideCols, halved while
// there are fewer than two tiles per thread (only which tile computes a column depends on `threads`,
// never how it is summed).
Geometry geometry(const GemmProblem& p, int threads) {
  const bool gated = p.fuse_activation && is_gated(p.activation);
  const bool interleaved = gated && p.activation.interleaved;
  Geometry g{gated ? p.w.N / 2 : p.w.N, gated && !interleaved ? p.w.N / 2 : 0, gated, interleaved};
  int64_t experts = 0;
  for (int64_t e = 0; e < p.w.E; ++e) {
    const int64_t rows = p.offsets[e + 1] - p.offsets[e];
    if (rows == 0) continue;
    if (product_of(p, rows) != Product::transposed) return g;
    ++experts;
  }
  int64_t cols = kWideCols;
  while (cols > kTileCols && experts * ceil_div(g.out_cols, cols) < 2 * threads) cols /= 2;
  g.tile_cols = cols, g.ld = 2 * cols + kPanelCols;
  return g;
}

// Rows per tile for an expert: at most kTileRows (packed) or kMaxTileRows (plain; streaming tiles take
// all rows), fewer when the whole problem has too few tiles to keep every thread busy. A multiple of
// kMicroRows. Only the schedule depends on `threads`, never an output's summation order.
int64_t tile_rows(const GemmProblem& p, int64_t expert_rows, int64_t col_tiles, int64_t total_rows, int threads) {
  if (streams(p, expert_rows)) return expert_rows;
  int64_t target = p.w.packed ? kTileRows : kMaxTileRows;
  // Enough tiles overall: about 4 per thread, counting this expert's share of the rows.
  const int64_t wanted = 4 * threads;
  while (target > 4 * kMicroRows && ceil_div(total_rows, target) * col_tiles < wanted) target /= 2;
  // Whole microkernel blocks, so that rounding the rows up below never passes the target: the tile
  // buffer holds kMaxTileRows rows (with 6-row blocks, 507 rows once made two tiles of 258).
  target = target / kMicroRows * kMicroRows;
  const int64_t blocks = ceil_div(expert_rows, target);
  return ceil_div(ceil_div(expert_rows, blocks), kMicroRows) * kMicroRows;
}

// --- packing ---------------------------------------------------------------------------------------

// Where depth p of column c goes in a packed panel (core/packed.h).
template <typename W>
int64_t panel_at(int64_t p, int64_t c) {
  return kIsBf16<W> ? (p / 2) * 2 * kPanelCols + 2 * c + (p % 2) : p * kPanelCols + c;
}

// The row-major case of pack_panel below, 8 columns by 8 units at a time, transposed in registers (a
// unit: a float32 or float16 depth, or a bfloat16 pair of depths, the 32-bit word of the pair layout;
// the packed panel is [units][kPanelCols] of them). src: the panel's first column at its first depth,
// columns ld elements apart. Does the first cols / 8 * 8 columns up to the last whole 8 units and
// returns how many depths that covers; the caller packs the rest element by element. The plain-weight
// GEMM packs every panel once per call, so this copy is on its critical path: element by element it
// cost about a tenth of a fine-grained layer's time.
#if defined(__AVX2__)
inline void transpose8x8_32(__m256 (&r)[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i)
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]), t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  for (int h = 0; h < 2; ++h)
    for (int i = 0; i < 2; ++i) {
      u[4 * h + 2 * i] = _mm256_shuffle_ps(t[4 * h + i], t[4 * h + i + 2], _MM_SHUFFLE(1, 0, 1, 0));
      u[4 * h + 2 * i + 1] = _mm256_shuffle_ps(t[4 * h + i], t[4 * h + i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    }
  for (int j = 0; j < 4; ++j)
    r[j] = _mm256_permute2f128_ps(u[j], u[j + 4], 0x20), r[j + 4] = _mm256_permute2f128_ps(u[j], u[j + 4], 0x31);
}

inline void transpose8x8_16(__m128i (&r)[8]) {
  __m128i b[8], c[8];
  for (int i = 0; i < 4; ++i)
    b[2 * i] = _mm_unpacklo_epi16(r[2 * i], r[2 * i + 1]), b[2 * i + 1] = _mm_unpackhi_epi16(r[2 * i], r[2 * i + 1]);
  for (int h = 0; h < 2; ++h)
    for (int i = 0; i < 2; ++i) {
      c[4 * h + 2 * i] = _mm_unpacklo_epi32(b[4 * h + i], b[4 * h + i + 2]);
      c[4 * h + 2 * i + 1] = _mm_unpackhi_epi32(b[4 * h + i], b[4 * h + i + 2]);
    }
  for (int j = 0; j < 4; ++j)
    r[2 * j] = _mm_unpacklo_epi64(c[j], c[j + 4]), r[2 * j + 1] = _mm_unpackhi_epi64(c[j], c[j + 4]);
}
#endif

template <typename W>
int64_t pack_blocks(const W* src, int64_t ld, int64_t cols, int64_t depth, W* dst) {
#if defined(__AVX2__)
  constexpr int64_t kDepthsPerUnit = kIsBf16<W> ? 2 : 1;
  const int64_t units = depth / kDepthsPerUnit / 8 * 8;
  for (int64_t c0 = 0; c0 + 8 <= cols; c0 += 8)
    for (int64_t u0 = 0; u0 < units; u0 += 8) {
      const W* from = src + c0 * ld + u0 * kDepthsPerUnit;
      W* to = dst + (u0 * kPanelCols + c0) * kDepthsPerUnit;
      if constexpr (std::is_same_v<W, f16_t>) {
        __m128i r[8];
        for (int i = 0; i < 8; ++i) r[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(from + i * ld));
        transpose8x8_16(r);
        for (int j = 0; j < 8; ++j) _mm_storeu_si128(reinterpret_cast<__m128i*>(to + j * kPanelCols), r[j]);
      } else {
        __m256 r[8];
        for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(reinterpret_cast<const float*>(from + i * ld));
        transpose8x8_32(r);
        for (int j = 0; j < 8; ++j)
          _mm256_storeu_ps(reinterpret_cast<float*>(to + j * kPanelCols * kDepthsPerUnit), r[j]);
      }
    }
  return units * kDepthsPerUnit;
#else
  (void)src, (void)ld, (void)cols, (void)depth, (void)dst;
  return 0;
#endif
}

// The transposed bfloat16 case of pack_panel below for a whole panel: each pair of depth rows (kPanelCols
// contiguous values each) interleaved into the pair layout's words, 16 columns per step. Returns the depths
// done (whole pairs; none for other dtypes, partial panels or without AVX2); the caller packs the rest
// element by element. A transposed weight (gpt-oss's experts; every weight in the backward's grad_a) is
// packed once per tile, so this copy is on the critical path: element by element it cost a quarter of the
// bfloat16 backward's grad_a GEMM.
template <typename W>
int64_t pack_transposed_pairs(const W* src, int64_t ld, int64_t cols, int64_t depth, W* dst) {
#if defined(__AVX2__)
  if constexpr (kIsBf16<W>) {
    if (cols != kPanelCols) return 0;
    const int64_t pairs = depth / 2;
    for (int64_t q = 0; q < pairs; ++q) {
      const W* even = src + 2 * q * ld;
      W* to = dst + q * 2 * kPanelCols;
      for (int64_t c = 0; c < kPanelCols; c += 16) {
        const __m256i e = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(even + c));
        const __m256i o = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(even + ld + c));
        const __m256i lo = _mm256_unpacklo_epi16(e, o), hi = _mm256_unpackhi_epi16(e, o);  // per 128-bit lane
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(to + 2 * c), _mm256_permute2x128_si256(lo, hi, 0x20));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(to + 2 * c + 16), _mm256_permute2x128_si256(lo, hi, 0x31));
      }
    }
    return 2 * pairs;
  }
#endif
  (void)src, (void)ld, (void)cols, (void)depth, (void)dst;
  return 0;
}

// Panel `panel` of one expert's w [N, K] (row-major, or transposed: element (n, k) at k * N + n), depths
// [k0, k0 + depth), into dst (core/packed.h's layout with `depth` in place of K). Columns past N and the
// bfloat16 pair padding are zero. Each layout is read along its contiguous direction.
template <typename W>
void pack_panel(const W* w_expert, int64_t N, int64_t K, bool transposed, int64_t panel, int64_t k0, int64_t depth,
                W* dst) {
  const int64_t padded = kIsBf16<W> ? (depth + 1) / 2 * 2 : depth;
  const int64_t n0 = panel * kPanelCols, cols = min_i64(kPanelCols, N - n0);
  if (transposed) {
    const int64_t done = pack_transposed_pairs(w_expert + k0 * N + n0, N, cols, depth, dst);
    for (int64_t p = done; p < depth; ++p) {
      const W* src = w_expert + (k0 + p) * N + n0;
      for (int64_t c = 0; c < cols; ++c) dst[panel_at<W>(p, c)] = src[c];
    }
  } else {
    const int64_t done = pack_blocks(w_expert + n0 * K + k0, K, cols, depth, dst);
    for (int64_t c = 0; c < cols; ++c) {
      const W* src = w_expert + (n0 + c) * K + k0;
      for (int64_t p = c < cols / 8 * 8 ? done : 0; p < depth; ++p) dst[panel_at<W>(p, c)] = src[p];
    }
  }
  for (int64_t p = 0; p < padded; ++p)
    for (int64_t c = p < depth ? cols : 0; c < kPanelCols; ++c) memset(dst + panel_at<W>(p, c), 0, sizeof(W));
}

// --- one tile --------------------------------------------------------------------------------------

struct TileBuffers {
  float* local;  // [rows][kLocalCols]
  void* pack;    // one packed panel block
};

// A tile without an activation computes its first `panels` panels (whole ones, inside N) straight into
// out, row stride ld; only the rest goes through the tile's buffer and the epilogue's copy.
struct DirectOut {
  float* out = nullptr;
  int64_t ld = 0, panels = 0;
};

// a_pairs (with dpbf16): the same rows as a, bfloat16 pairs, row stride lda_pairs words. Stream: few rows
// (decode), the weight stream is the whole cost.
template <int Rows, bool Stream, typename W>
void micro_dispatch_rows(const float* a, int64_t lda, const uint32_t* a_pairs, int64_t lda_pairs, const W* b,
                         int64_t depth, float* c, int64_t ldc, bool accumulate, bool dpbf16) {
  (void)a_pairs, (void)lda_pairs, (void)dpbf16;
  if constexpr (kIsBf16<W>) {
#if defined(__AVX512F__)
    if (dpbf16) return micro_kernel_dpbf16<Rows>(a_pairs, lda_pairs, b, (depth + 1) / 2, c, ldc, accumulate);
#endif
    micro_kernel_bf16<Rows, Stream && Rows >= 3>(a, lda, b, depth, c, ldc, accumulate);
  } else {
#if defined(__AVX512F__)
    if constexpr (Stream && Rows <= kNarrowRows && std::is_same_v<W, float>)
      return micro_kernel_narrow<Rows>(a, lda, b, depth, c, ldc, accumulate);
#endif
    micro_kernel<Rows, W, Stream && Rows >= 3 && std::is_same_v<W, f16_t>>(a, lda, b, depth, c, ldc, accumulate);
  }
}

template <bool Stream, typename W>
void micro_dispatch(int rows, const float* a, int64_t lda, const uint32_t* a_pairs, int64_t lda_pairs, const W* b,
                    int64_t depth, float* c, int64_t ldc, bool accumulate, bool dpbf16) {
  switch (rows) {
#define MOE_EXT_ROWS_CASE(R)                                                                                 \
  case R:                                                                                                    \
    return micro_dispatch_rows<(R <= kMicroRows ? R : 1), Stream>(a, lda, a_pairs, lda_pairs, b, depth, c, ldc, \
                                                                    accumulate, dpbf16);
    MOE_EXT_ROWS_CASE(1) MOE_EXT_ROWS_CASE(2) MOE_EXT_ROWS_CASE(3) MOE_EXT_ROWS_CASE(4)
    MOE_EXT_ROWS_CASE(5) MOE_EXT_ROWS_CASE(6) MOE_EXT_ROWS_CASE(7) MOE_EXT_ROWS_CASE(8)
#undef MOE_EXT_ROWS_CASE
    default: break;
  }
}

// The tile's product a[rows] @ w[e, columns of the segments]^T via the microkernels, into buf.local or,
// for its first direct.panels panels, into out.
template <typename W>
void packed_product(const GemmProblem& p, const Tile& t, const Segment* segs, int n_segs, bool dpbf16,
                    const TileBuffers& buf, const DirectOut& direct) {
  const int64_t K = p.w.K, rows = t.row_end - t.row_begin;
  const W* w_expert = static_cast<const W*>(p.w.data) +
                      (p.w.packed ? t.expert * packed_expert_elements(p.w.N, K, p.w.dtype) : t.expert * p.w.N * K);
  const float* a = p.a ? p.a + t.row_begin * K : nullptr;  // null under vdpbf16ps from gathered rows
  const int64_t lda_pairs = (K + 1) / 2;
  const uint32_t* a_pairs = dpbf16 ? reinterpret_cast<const uint32_t*>(p.a_bf16) + t.row_begin * lda_pairs : nullptr;
  if (K == 0)  // an empty sum: the depth loop would never write the buffer
    for (int64_t r = 0; r < rows; ++r) memset(buf.local + r * kLocalCols, 0, kLocalCols * sizeof(float));
  // One depth block of one panel: every microkernel slice times every row of the tile.
  auto block_product = [&](int s, int64_t j, int64_t k0, bool stream) {
    const int64_t depth = min_i64(stream ? kStreamDepthBlock<W> : kDepthBlock<W>, K - k0);
    const int64_t panel = segs[s].first_panel + j;
    const W* block;
    if (p.w.packed) {
      block = w_expert + panel * panel_elements(K, p.w.dtype) + k0 * kPanelCols;
    } else {
      pack_panel(w_expert, p.w.N, K, p.w.transposed, panel, k0, depth, static_cast<W*>(buf.pack));
      block = static_cast<const W*>(buf.pack);
    }
    const int64_t pair_step = kIsBf16<W> ? 2 : 1;  // elements per column in a panel row
    const bool to_out = s == 0 && j < direct.panels;
    const int64_t ldc = to_out ? direct.ld : kLocalCols;
    for (int64_t slice = 0; slice < kPanelCols; slice += kMicroCols) {
      float* c = (to_out ? direct.out : buf.local + segs[s].local_col) + j * kPanelCols + slice;
      for (int64_t m = 0; m < rows; m += kMicroRows) {
        const int r = static_cast<int>(min_i64(kMicroRows, rows - m));
        const float* a_m = a ? a + m * K + k0 : nullptr;
        const uint32_t* pairs_m = a_pairs ? a_pairs + m * lda_pairs + k0 / 2 : nullptr;
        if (stream)
          micro_dispatch<true, W>(r, a_m, K, pairs_m, lda_pairs, block + slice * pair_step, depth, c + m * ldc, ldc,
                                  k0 > 0, dpbf16);
        else
          micro_dispatch<false, W>(r, a_m, K, pairs_m, lda_pairs, block + slice * pair_step, depth, c + m * ldc, ldc,
                                   k0 > 0, dpbf16);
      }
    }
  };
  if (p.w.packed && rows <= kPanelFirstRows) {
    // Few rows (decode): the weights are the whole cost. Walk each packed panel start to end (one
    // contiguous stream) instead of hopping between the tile's panels per depth block; every output
    // still adds its depth blocks in k0 order, so the sums are unchanged.
    for (int s = 0; s < n_segs; ++s)
      for (int64_t j = 0; j < segs[s].panels; ++j)
        for (int64_t k0 = 0; k0 < K; k0 += kStreamDepthBlock<W>) block_product(s, j, k0, true);
  } else {
    for (int64_t k0 = 0; k0 < K; k0 += kDepthBlock<W>)
      for (int s = 0; s < n_segs; ++s)
        for (int64_t j = 0; j < segs[s].panels; ++j) block_product(s, j, k0, false);
  }
}

// Streaming: out column n = dot(a row, w row n) for each of the expert's few rows. 16-bit rows ask for the
// line kPrefetchBytes ahead of each step (one line a step with AVX-512): on Zen 4 the hardware prefetchers
// alone left bfloat16/float16 decode at 0.3-0.5 of the read (Mixtral layer, T=1 and 8: 29.6 -> 12.8 ms and
// 165 -> 74 ms in bf16); float32 showed no clear change and is left without.
constexpr int kStreamRows = kLanes == 16 ? 8 : 4;  // 2 accumulators per row in registers

template <int Rows, typename W>
void stream_rows(const float* a, int64_t lda, const W* w_row, int64_t K, float* c) {
  vec acc[Rows][2] = {};
  int64_t p = 0;
  constexpr int64_t kStep = 2 * kLanes;
  for (; p + kStep <= K; p += kStep) {
    if constexpr (sizeof(W) == 2) __builtin_prefetch(reinterpret_cast<const char*>(w_row + p) + kPrefetchBytes, 0, 3);
    const vec w0 = load_f32(w_row + p), w1 = load_f32(w_row + p + kLanes);
    for (int r = 0; r < Rows; ++r) {
      acc[r][0] += load(a + r * lda + p) * w0;
      acc[r][1] += load(a + r * lda + p + kLanes) * w1;
    }
  }
  float w_tail[kStep] = {};
  for (int64_t i = 0; p + i < K; ++i) w_tail[i] = to_f32(w_row[p + i]);
  for (int r = 0; r < Rows; ++r) {
    float a_tail[kStep] = {};
    for (int64_t i = 0; p + i < K; ++i) a_tail[i] = a[r * lda + p + i];
    acc[r][0] += load(a_tail) * load(w_tail);
    acc[r][1] += load(a_tail + kLanes) * load(w_tail + kLanes);
    c[r * kLocalCols] = lane_sum(acc[r][0] + acc[r][1]);
  }
}

template <typename W>
void streamed_product(const GemmProblem& p, const Tile& t, const Segment* segs, int n_segs, float* local) {
  const int64_t K = p.w.K, rows = t.row_end - t.row_begin;
  const W* w_expert = static_cast<const W*>(p.w.data) + t.expert * p.w.N * K;
  const float* a = p.a + t.row_begin * K;
  for (int s = 0; s < n_segs; ++s) {
    const int64_t begin = segs[s].begin();
    for (int64_t n = begin; n < begin + segs[s].cols; ++n)
      for (int64_t m = 0; m < rows; m += kStreamRows) {
        float* c = local + m * kLocalCols + segs[s].local_col + segs[s].offset + (n - begin);
        const float* a_rows = a + m * K;
        const W* w_row = w_expert + n * K;
        switch (min_i64(kStreamRows, rows - m)) {
#define MOE_EXT_STREAM_CASE(R) \
  case R: stream_rows<(R <= kStreamRows ? R : 1)>(a_rows, K, w_row, K, c); break;
          MOE_EXT_STREAM_CASE(1) MOE_EXT_STREAM_CASE(2) MOE_EXT_STREAM_CASE(3) MOE_EXT_STREAM_CASE(4)
          MOE_EXT_STREAM_CASE(5) MOE_EXT_STREAM_CASE(6) MOE_EXT_STREAM_CASE(7) MOE_EXT_STREAM_CASE(8)
#undef MOE_EXT_STREAM_CASE
          default: break;
        }
      }
  }
}

// dst [depth][kMicroCols] = the first `width` columns of `depth` rows of src (row stride ld), zero-padded.
template <typename W>
void copy_padded_slice(const W* src, int64_t ld, int64_t depth, int64_t width, W* dst) {
  memset(dst, 0, static_cast<size_t>(depth * kMicroCols) * sizeof(W));
  for (int64_t q = 0; q < depth; ++q)
    for (int64_t c = 0; c < width; ++c) dst[q * kMicroCols + c] = src[q * ld + c];
}

// Few rows on transposed weights w_t [K, N] (float32/float16): the microkernel reads slices of w_t's rows
// in place (row stride N), kWideDepth depth rows at a time across all of the tile's columns, into the
// tile's buffer (row stride ld). A slice cut by the segment's end is first copied, zero-padded to
// kMicroCols columns, so nothing past the segment is read. Each output adds its depths in order within
// a pass and the passes in order.
template <typename W>
void transposed_product(const GemmProblem& p, const Tile& t, const Segment* segs, int n_segs, int64_t ld,
                        const TileBuffers& buf) {
  const int64_t K = p.w.K, N = p.w.N, rows = t.row_end - t.row_begin;
  const W* w_t = static_cast<const W*>(p.w.data) + t.expert * N * K;
  const float* a = p.a + t.row_begin * K;
  W* padded = static_cast<W*>(buf.pack);
  if (K == 0)
    for (int64_t r = 0; r < rows; ++r) memset(buf.local + r * ld, 0, ld * sizeof(float));
  for (int64_t k0 = 0; k0 < K; k0 += kWideDepth) {
    const int64_t depth = min_i64(kWideDepth, K - k0);
    for (int s = 0; s < n_segs; ++s)
      for (int64_t j = 0; j < segs[s].cols; j += kMicroCols) {
        const int64_t col = segs[s].begin() + j, width = min_i64(kMicroCols, segs[s].cols - j);
        const W* b = w_t + k0 * N + col;
        int64_t ldb = N;
        if (width < kMicroCols) {
          copy_padded_slice(b, N, depth, width, padded);
          b = padded, ldb = kMicroCols;
        }
        float* c = buf.local + segs[s].local_col + segs[s].offset + j;
        for (int64_t m = 0; m < rows; m += kMicroRows) {
          const float* a_m = a + m * K + k0;
          float* c_m = c + m * ld;
          switch (min_i64(kMicroRows, rows - m)) {
#define MOE_EXT_STRIDED_CASE(R)                                                                         \
  case R:                                                                                               \
    micro_kernel_strided<(R <= kMicroRows ? R : 1)>(a_m, K, b, ldb, depth, c_m, ld, k0 > 0);         \
    break;
            MOE_EXT_STRIDED_CASE(1) MOE_EXT_STRIDED_CASE(2) MOE_EXT_STRIDED_CASE(3) MOE_EXT_STRIDED_CASE(4)
            MOE_EXT_STRIDED_CASE(5) MOE_EXT_STRIDED_CASE(6) MOE_EXT_STRIDED_CASE(7) MOE_EXT_STRIDED_CASE(8)
#undef MOE_EXT_STRIDED_CASE
            default: break;
          }
        }
      }
  }
}

// Writes the tile's rows of out from its buffer (past the `direct` columns already there): a copy or the
// activation, after the bias (added to the buffer, or to out for the direct columns).
void epilogue(const GemmProblem& p, const Geometry& g, const Tile& t, const Segment* segs, int n_segs, float* local,
              int64_t direct) {
  const float* bias = p.bias ? p.bias + t.expert * p.w.N : nullptr;
  for (int64_t r = 0; r < t.row_end - t.row_begin; ++r) {
    float* row = local + r * g.ld;
    float* dst = p.out + (t.row_begin + r) * g.out_cols + t.col_begin;
    if (!p.fuse_activation) {
      memcpy(dst + direct, row + segs[0].offset + direct, static_cast<size_t>(t.cols - direct) * sizeof(float));
      if (bias) add_bias(dst, bias + t.col_begin, t.cols);
      continue;
    }
    if (bias)
      for (int s = 0; s < n_segs; ++s)
        add_bias(row + segs[s].local_col + segs[s].offset, bias + segs[s].begin(), segs[s].cols);
    activate_product_row(p.activation, row + segs[0].offset,
                         n_segs > 1 ? row + segs[1].local_col + segs[1].offset : nullptr, t.cols, dst);
  }
}

template <typename W>
void run_tile(const GemmProblem& p, const Geometry& g, const Tile& t, bool dpbf16, const TileBuffers& buf) {
  Segment segs[2];
  const int n_segs = tile_segments(g, t, segs);
  const int64_t expert_rows = p.offsets[t.expert + 1] - p.offsets[t.expert];
  DirectOut direct;
  const Product product = product_of(p, expert_rows);
  if (product == Product::streamed) {
    streamed_product<W>(p, t, segs, n_segs, buf.local);
  } else if (product == Product::transposed) {
    if constexpr (!kIsBf16<W>) transposed_product<W>(p, t, segs, n_segs, g.ld, buf);
  } else {
    // Without an activation the tile starts on a panel boundary (col_begin is a multiple of kTileCols),
    // so its whole panels can go straight to out. K = 0 leaves the sums to the zeroed buffer.
    if (!p.fuse_activation && p.w.K > 0)
      direct = {p.out + t.row_begin * g.out_cols + t.col_begin, g.out_cols, t.cols / kPanelCols};
    packed_product<W>(p, t, segs, n_segs, dpbf16, buf, direct);
  }
  epilogue(p, g, t, segs, n_segs, buf.local, direct.panels * kPanelCols);
}

// The tile with this index in (expert, row block, column block) order, or false when past the end.
bool find_tile(const GemmProblem& p, const Geometry& g, int64_t index, int64_t col_tiles, int64_t total_rows,
               int threads, Tile* t) {
  for (int64_t e = 0; e < p.w.E; ++e) {
    const int64_t begin = p.offsets[e], rows = p.offsets[e + 1] - begin;
    if (rows == 0) continue;
    const int64_t per_tile = tile_rows(p, rows, col_tiles, total_rows, threads);
    const int64_t tiles = ceil_div(rows, per_tile) * col_tiles;
    if (index >= tiles) {
      index -= tiles;
      continue;
    }
    const int64_t row_block = index / col_tiles, col_block = index % col_tiles;
    t->expert = e;
    t->row_begin = begin + row_block * per_tile;
    t->row_end = min_i64(begin + rows, t->row_begin + per_tile);
    t->col_begin = col_block * g.tile_cols;
    t->cols = min_i64(g.tile_cols, g.out_cols - t->col_begin);
    return true;
  }
  return false;
}

template <typename W>
void grouped_gemm_typed(const GemmProblem& p, int threads, void* scratch) {
  const Geometry g = geometry(p, threads);
  const int64_t col_tiles = ceil_div(g.out_cols, g.tile_cols), total_rows = p.offsets[p.w.E];
  int64_t tiles = 0;
  for (int64_t e = 0; e < p.w.E; ++e) {
    const int64_t rows = p.offsets[e + 1] - p.offsets[e];
    if (rows > 0) tiles += ceil_div(rows, tile_rows(p, rows, col_tiles, total_rows, threads)) * col_tiles;
  }
#if defined(__AVX512F__)
  const bool dpbf16 = p.bf16_dot && p.a_bf16 != nullptr && kIsBf16<W>;
#else
  const bool dpbf16 = false;
#endif
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
#endif
  for (int64_t index = 0; index < tiles; ++index) {
    char* mine = static_cast<char*>(scratch) + thread_index() * kGemmScratchBytes;
    const TileBuffers buf{reinterpret_cast<float*>(mine), mine + kLocalBytes};
    Tile t;
    if (find_tile(p, g, index, col_tiles, total_rows, threads, &t)) run_tile<W>(p, g, t, dpbf16, buf);
  }
}

template <typename W>
void pack_weight_typed(const WeightView& w, int threads, W* packed) {
  const int64_t N = w.N, K = w.K, panels = panel_count(N), panel_size = panel_elements(K, kDType<W>);
  MOE_EXT_PARALLEL_FOR(threads)
  for (int64_t i = 0; i < w.E * panels; ++i) {
    const int64_t e = i / panels, panel = i % panels;
    pack_panel(static_cast<const W*>(w.data) + e * N * K, N, K, w.transposed, panel, 0, K,
               packed + e * panels * panel_size + panel * panel_size);
  }
}

}  // namespace

void grouped_gemm(const GemmProblem& problem, int threads, void* scratch) {
  switch (problem.w.dtype) {
    case DType::f32: return grouped_gemm_typed<float>(problem, threads, scratch);
    case DType::bf16: return grouped_gemm_typed<bf16_t>(problem, threads, scratch);
    case DType::f16: return grouped_gemm_typed<f16_t>(problem, threads, scratch);
  }
}

void pack_weight(const WeightView& w, int threads, void* packed) {
  switch (w.dtype) {
    case DType::f32: return pack_weight_typed(w, threads, static_cast<float*>(packed));
    case DType::bf16: return pack_weight_typed(w, threads, static_cast<bf16_t*>(packed));
    case DType::f16: return pack_weight_typed(w, threads, static_cast<f16_t*>(packed));
  }
}

}  // namespace moe_ext::cpu::MOE_EXT_CPU_NS
