// The grouped GEMM on quantised weights (core/quant.h's layout): out[rows of e] = a[rows of e] @
// dequantize(w)[e]^T, with the activation optionally fused into the epilogue, as cpu/grouped_gemm.cpp.
//
// Two ways to multiply (chosen by the weight, QuantView::quantize_activations):
// - weight-only (W8A16 / W4A16): each weight row is dequantised once per tile into a float32 row
//   (scale * (q - z), the values of QuantizedWeight::dequantize), then dotted with the tile's float32
//   rows of a as the float kernels do (kLanes-wide partial sums, a fixed tree at the end);
// - activation-quantised (W8A8 / W4A8): the rows of a are first quantised per token to int8 (below),
//   then each weight row is multiplied with them in integers (cpu/quant_dot.h), scales in the epilogue.
// Work is cut into tiles of (expert, block of up to kTileRows rows, block of kTileCols output columns)
// scheduled dynamically. A tile walks its weight rows once, start to end, each against all its rows of
// a: with few rows (decode) every quantised byte is read from memory once per call.
// Each output element is summed in an order fixed by the data, never by the thread count.
#include "cpu/activation.h"
#include "cpu/common.h"
#include "cpu/kernels.h"
#include "cpu/quant_dot.h"
#include "cpu/vec.h"

namespace moe_ext::cpu::MOE_EXT_CPU_NS {

namespace {

constexpr int64_t kTileCols = 64;   // output columns of a tile (gated fused: 64 gate + 64 up weight rows)
constexpr int64_t kTileRows = 128;  // rows of a in a tile
constexpr int64_t kLocalCols = 2 * kTileCols;
constexpr int64_t kFloatRows = kLanes == 16 ? 8 : 4;  // rows of a per pass over a dequantised row

// --- per-token int8 quantisation of the activations (docs/api.md §9) ---------------------------------

// scale = max|x| / 127 (float32), q = x / scale rounded to nearest even; a row of zeros has scale 0 and
// q = 0; a row with a NaN or an infinity has scale NaN (so its outputs are NaN) and q = 0.
void quantize_row(const float* x, int64_t K, const QuantView& w, int8_t* q, float* scale, int32_t* sums) {
  float amax = 0.f;
  bool finite = true;
  for (int64_t k = 0; k < K; ++k) {
    const float v = fabsf(x[k]);
    finite = finite && v <= 3.40282347e38f;
    amax = v > amax ? v : amax;
  }
  const float s = finite ? amax / 127.f : __builtin_nanf("");
  for (int64_t k = 0; k < w.row_depth; ++k) {
    float r = 0.f;
    if (k < K && s > 0.f) r = nearbyintf(x[k] / s);
    q[k] = static_cast<int8_t>(r < -127.f ? -127.f : (r > 127.f ? 127.f : r));
  }
  *scale = s;
  for (int64_t g = 0; g < w.groups; ++g) {
    int32_t sum = 0;
    for (int64_t k = g * w.group; k < (g + 1) * w.group; ++k) sum += q[k];
    sums[g] = sum;
  }
}

// --- weight-only products --------------------------------------------------------------------------

// dst[0..row_depth) = the dequantised weight row `row` (flat e * N + n).
void dequantize_row(const QuantView& w, int64_t row, float* dst) {
  const uint8_t* values = w.values + row * w.row_bytes;
  const float* scales = w.scales + row * w.groups;
  for (int64_t g = 0; g < w.groups; ++g) {
    const float s = scales[g];
    const int z = w.zeros ? w.zeros[row * w.groups + g] : (w.scheme == QuantScheme::int4 ? kInt4SymmetricZero : 0);
    float* out = dst + g * w.group;
    if (w.scheme == QuantScheme::int8) {
      const int8_t* q = reinterpret_cast<const int8_t*>(values) + g * w.group;
      for (int64_t i = 0; i < w.group; ++i) out[i] = s * static_cast<float>(q[i] - z);
      continue;
    }
    const uint8_t* bytes = values + g * w.group / 2;
    for (int64_t b = 0; b < w.group / kQuantBlock; ++b)
      for (int j = 0; j < kQuantBlock / 2; ++j) {
        const uint8_t byte = bytes[b * kQuantBlock / 2 + j];
        out[b * kQuantBlock + j] = s * static_cast<float>((byte & 15) - z);
        out[b * kQuantBlock + j + kQuantBlock / 2] = s * static_cast<float>((byte >> 4) - z);
      }
  }
}

// c[r * ldc] = dot(a row r, w_row) over K depths for r < R. Few rows (decode) get 4 independent
// accumulators a row, so the FMA latency chain does not bound them; more rows have enough with 2.
template <int R>
void float_dot_rows(const float* a, int64_t lda, const float* w_row, int64_t K, float* c, int64_t ldc) {
  constexpr int kAcc = R <= 2 ? 4 : 2;
  constexpr int64_t kStep = kAcc * kLanes;
  vec acc[R][kAcc] = {};
  int64_t p = 0;
  for (; p + kStep <= K; p += kStep) {
    vec w[kAcc];
    for (int j = 0; j < kAcc; ++j) w[j] = load(w_row + p + j * kLanes);
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < kAcc; ++j) acc[r][j] += load(a + r * lda + p + j * kLanes) * w[j];
  }
  float w_tail[kStep] = {};
  for (int64_t i = 0; p + i < K; ++i) w_tail[i] = w_row[p + i];
  for (int r = 0; r < R; ++r) {
    float a_tail[kStep] = {};
    for (int64_t i = 0; p + i < K; ++i) a_tail[i] = a[r * lda + p + i];
    for (int j = 0; j < kAcc; ++j) acc[r][j] += load(a_tail + j * kLanes) * load(w_tail + j * kLanes);
    vec sum = acc[r][0];
    for (int j = 1; j < kAcc; ++j) sum += acc[r][j];
    c[r * ldc] = lane_sum(sum);
  }
}

void float_column(const QuantGemmProblem& p, const float* w_row, int64_t a_row, int64_t rows, float* c, int64_t ldc) {
  const int64_t K = p.w->K;
  for (int64_t m = 0; m < rows; m += kFloatRows) {
    const float* a = p.a + (a_row + m) * K;
    float* cm = c + m * ldc;
    switch (min_i64(kFloatRows, rows - m)) {
#define MOE_EXT_FLOAT_CASE(R) \
  case R: float_dot_rows<(R <= kFloatRows ? R : 1)>(a, K, w_row, K, cm, ldc); break;
      MOE_EXT_FLOAT_CASE(1) MOE_EXT_FLOAT_CASE(2) MOE_EXT_FLOAT_CASE(3) MOE_EXT_FLOAT_CASE(4)
      MOE_EXT_FLOAT_CASE(5) MOE_EXT_FLOAT_CASE(6) MOE_EXT_FLOAT_CASE(7) MOE_EXT_FLOAT_CASE(8)
#undef MOE_EXT_FLOAT_CASE
      default: break;
    }
  }
}

// The integer products of weight row `row` with the tile's rows, on this tier's best policy.
void int_column_best(const QuantGemmProblem& p, int64_t row, int64_t a_row, int64_t rows, float* c, int64_t ldc) {
#if defined(__AVX512F__)
  if (p.vnni) return int_column_vnni(p, row, a_row, rows, c, ldc);
#endif
#if defined(__AVX2__)
  int_column<DotAvx2>(p, row, a_row, rows, c, ldc);
#else
  (void)p.vnni;
  int_column<DotScalar>(p, row, a_row, rows, c, ldc);
#endif
}

// --- tiles -----------------------------------------------------------------------------------------

struct Tile {
  int64_t expert, row_begin, rows, col_begin, cols;
};

// As cpu/grouped_gemm.cpp: a fused gated tile reads its gate and up rows (concatenated: two runs of
// t.cols rows, f apart; interleaved: one run of 2 t.cols rows from 2 col_begin).
struct Geometry {
  int64_t out_cols, half;  // half: fused gated, concatenated, the up rows' offset in w (f); 0 otherwise
  bool gated, interleaved;
};

Geometry geometry(const QuantGemmProblem& p) {
  const bool gated = p.fuse_activation && is_gated(p.activation);
  const bool interleaved = gated && p.activation.interleaved;
  return {gated ? p.w->N / 2 : p.w->N, gated && !interleaved ? p.w->N / 2 : 0, gated, interleaved};
}

bool find_tile(const QuantGemmProblem& p, int64_t index, int64_t col_tiles, int64_t out_cols, Tile* t) {
  for (int64_t e = 0; e < p.w->E; ++e) {
    const int64_t begin = p.offsets[e], rows = p.offsets[e + 1] - begin;
    const int64_t tiles = ceil_div(rows, kTileRows) * col_tiles;
    if (index >= tiles) {
      index -= tiles;
      continue;
    }
    t->expert = e;
    t->row_begin = begin + index / col_tiles * kTileRows;
    t->rows = min_i64(kTileRows, begin + rows - t->row_begin);
    t->col_begin = index % col_tiles * kTileCols;
    t->cols = min_i64(kTileCols, out_cols - t->col_begin);
    return true;
  }
  return false;
}

void run_tile(const QuantGemmProblem& p, const Geometry& g, const Tile& t, float* local, float* w_row) {
  const QuantView& w = *p.w;
  const int segments = g.gated && !g.interleaved ? 2 : 1;
  const int64_t first = g.interleaved ? 2 * t.col_begin : t.col_begin;  // w's first row of segment 0
  const int64_t seg_rows = g.interleaved ? 2 * t.cols : t.cols;
  for (int s = 0; s < segments; ++s)
    for (int64_t j = 0; j < seg_rows; ++j) {
      const int64_t row = t.expert * w.N + s * g.half + first + j;
      float* c = local + s * kTileCols + j;
      if (w.quantize_activations) {
        int_column_best(p, row, t.row_begin, t.rows, c, kLocalCols);
      } else {
        dequantize_row(w, row, w_row);
        float_column(p, w_row, t.row_begin, t.rows, c, kLocalCols);
      }
    }
  const float* bias = p.bias ? p.bias + t.expert * w.N : nullptr;
  for (int64_t r = 0; r < t.rows; ++r) {
    float* src = local + r * kLocalCols;
    float* dst = p.out + (t.row_begin + r) * g.out_cols + t.col_begin;
    if (bias)
      for (int s = 0; s < segments; ++s) add_bias(src + s * kTileCols, bias + s * g.half + first, seg_rows);
    if (!p.fuse_activation)
      memcpy(dst, src, static_cast<size_t>(t.cols) * sizeof(float));
    else
      activate_product_row(p.activation, src, g.gated ? src + kTileCols : nullptr, t.cols, dst);
  }
}

}  // namespace

void quant_gemm(const QuantGemmProblem& p, int threads, void* scratch) {
  const QuantView& w = *p.w;
  const int64_t M = p.offsets[w.E];
  if (w.quantize_activations) {
    MOE_EXT_PARALLEL_FOR(threads)
    for (int64_t m = 0; m < M; ++m)
      quantize_row(p.a + m * w.K, w.K, w, p.a_q + m * w.row_depth, p.a_scales + m, p.a_sums + m * w.groups);
  }
  const Geometry g = geometry(p);
  const int64_t col_tiles = ceil_div(g.out_cols, kTileCols);
  int64_t tiles = 0;
  for (int64_t e = 0; e < w.E; ++e) tiles += ceil_div(p.offsets[e + 1] - p.offsets[e], kTileRows) * col_tiles;
  const int64_t per_thread = quant_gemm_scratch_bytes(w.row_depth);
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
#endif
  for (int64_t index = 0; index < tiles; ++index) {
    char* mine = static_cast<char*>(scratch) + thread_index() * per_thread;
    Tile t;
    if (find_tile(p, index, col_tiles, g.out_cols, &t))
      run_tile(p, g, t, reinterpret_cast<float*>(mine), reinterpret_cast<float*>(mine + kTileRows * kLocalCols * 4));
  }
}

}  // namespace moe_ext::cpu::MOE_EXT_CPU_NS
