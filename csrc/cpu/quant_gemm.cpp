// The grouped GEMM on quantised weights (core/quant.h's layout): out[rows of e] = a[rows of e] @
// dequantize(w)[e]^T, with the activation optionally fused into the epilogue, as cpu/grouped_gemm.cpp.
//
// Two ways to multiply (chosen by the weight, QuantView::quantize_activations):
// - weight-only (W8A16 / W4A16): weights are dequantised to float32 (scale * (q - z), the values of
//   QuantizedWeight::dequantize) and dotted with the tile's float32 rows of a: for tiles of up to
//   kFusedTileRows rows (decode) in registers: rows in panels 8 at once, the scale applied per group
//   (float_panel_rows; on bfloat16 rows bf16_panel_rows), an expert's last N % 8 rows 32 weights by 4
//   rows at a time (fused_dot_rows); larger tiles (prefill) dequantise each block of the tile's weights
//   once into the float GEMM's panel layout and multiply it with its microkernels (dequantized_product;
//   on bfloat16 rows, the codes as bfloat16 panels, scales per group: coded_product);
// - activation-quantised (W8A8 / W4A8): the rows of a are first quantised per token to int8 (below),
//   then multiplied with the weights in integers (cpu/quant_dot.h), scales in the epilogue: rows a panel
//   of 8 at a time (one row a lane, core/quant.h's kernel layout), an expert's last N % 8 rows one at a
//   time; with VNNI, tiles of more than kIntTileRows rows (prefill) take a register-tiled kernel over
//   the tile's codes laid out once per block (int_tile_vnni, cpu/quant_gemm_vnni.cpp), with the same sums.
// Work is cut into tiles of (expert, block of up to kTileRows rows, block of kTileCols output columns)
// scheduled dynamically. A tile reads its weight rows once, each against all its rows of a: with few
// rows (decode) every quantised byte is read from memory once per call.
// Each output element is summed in an order fixed by the data, never by the thread count.
#include "cpu/activation.h"
#include "cpu/common.h"
#include "cpu/gemm_micro.h"
#include "cpu/kernels.h"
#include "cpu/quant_dot.h"
#include "cpu/vec.h"

namespace moe_ext::cpu::MOE_EXT_CPU_NS {

namespace {

constexpr int64_t kTileCols = 64;   // output columns of a tile (gated fused: 64 gate + 64 up weight rows)
constexpr int64_t kTileRows = 128;  // rows of a in a tile
constexpr int64_t kLocalCols = 2 * kTileCols;

// --- per-token int8 quantisation of the activations (docs/api.md §9) ---------------------------------

// scale = max|x| / 127 (float32), q = x / scale rounded to nearest even; a row of zeros has scale 0 and
// q = 0; a row with a NaN or an infinity has scale NaN (so its outputs are NaN) and q = 0.
#if defined(__AVX512F__)
// 16 depths at a time, the same operations (x / s exactly, rounded to nearest even, clamped), so the same
// bytes: the scalar loop's division per element was about 5% of a W8A8 prefill layer.
// GCC 12's AVX-512 intrinsics start from a self-initialised "undefined" vector, which -Wmaybe-uninitialized
// reports at every inlined call: a false alarm, silenced here.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
void quantize_row(const float* x, int64_t K, const QuantView& w, int8_t* q, float* scale, int32_t* sums) {
  const __m512 limit = _mm512_set1_ps(3.40282347e38f);
  __m512 amax = _mm512_setzero_ps();
  bool finite = true;
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 in = K - k >= 16 ? 0xffff : static_cast<__mmask16>((1u << (K - k)) - 1);
    const __m512 v = _mm512_abs_ps(_mm512_maskz_loadu_ps(in, x + k));
    finite = finite && _mm512_cmp_ps_mask(v, limit, _CMP_LE_OQ) == 0xffff;  // NaN compares false
    amax = _mm512_max_ps(amax, v);
  }
  const float s = finite ? _mm512_reduce_max_ps(amax) / 127.f : __builtin_nanf("");
  const __m512 vs = _mm512_set1_ps(s), hi = _mm512_set1_ps(127.f), lo = _mm512_set1_ps(-127.f);
  const int64_t per_group = w.group / 16;
  __m512i group_sum = _mm512_setzero_si512();
  for (int64_t k = 0; k < w.row_depth; k += 16) {
    __m512i v = _mm512_setzero_si512();
    if (k < K && s > 0.f) {
      const __mmask16 in = K - k >= 16 ? 0xffff : static_cast<__mmask16>((1u << (K - k)) - 1);
      const __m512 r = _mm512_roundscale_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(in, x + k), vs),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      v = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(r, lo), hi));
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtepi32_epi8(v));
    group_sum = _mm512_add_epi32(group_sum, v);
    if ((k / 16 + 1) % per_group == 0) {
      sums[k / w.group] = _mm512_reduce_add_epi32(group_sum);
      group_sum = _mm512_setzero_si512();
    }
  }
  *scale = s;
}
#pragma GCC diagnostic pop
#else
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
#endif

// --- weight-only products --------------------------------------------------------------------------

// Where one row's bytes and scales are: a block's bytes (int4 16, int8 32) come in runs of 4 bytes, `run`
// apart (4 outside a panel, 32 inside one), blocks `block` apart; group g's scale (and zero) at g * `group`.
struct RowAt {
  const uint8_t* values;
  int64_t scales;  // scale_at's index of group 0
  const uint8_t* zeros;
  int64_t run, block, group;
};

RowAt row_at(const QuantView& w, int64_t row) {
  const bool panel = in_panel(w, row);  // the offsets once per row: they divide
  const int64_t v0 = value_offset(w, row, 0), g0 = group_offset(w, row, 0);
  return {w.values + v0, g0, w.zeros ? w.zeros + g0 : nullptr, panel ? 32 : 4,
          panel ? kPanelRows * block_bytes(w) : block_bytes(w), panel ? kPanelRows : 1};
}

#if defined(__AVX2__)
// int4 block b's 16 bytes of a row in exchange order: one load outside a panel, 4 runs of 4 inside (as
// 4 loads into lanes: a 16-byte load over 4 just-stored runs would miss store forwarding).
inline __m128i load_block_u4(const RowAt& at, int64_t b) {
  const uint8_t* bytes = at.values + b * at.block;
  if (at.run == 4) return _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
  int32_t r[4];
  for (int run = 0; run < 4; ++run) memcpy(r + run, bytes + run * at.run, 4);
  return _mm_setr_epi32(r[0], r[1], r[2], r[3]);
}

// o[0..32) = s * (q - z) for one int4 block's 16 bytes (depth j in the low nibble of byte j, j + 16 in
// the high one). The compiler does not vectorise the nibble split well, so AVX2 spells it out.
void dequantize_block_u4(__m128i bytes, float s, int z, float* o) {
  const __m128i low = _mm_set1_epi8(15);
  const __m128i lo = _mm_and_si128(bytes, low), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low);
  const __m256 scale = _mm256_set1_ps(s);
  const __m256i zero = _mm256_set1_epi32(z);
  const __m128i eights[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
  for (int i = 0; i < 4; ++i) {
    const __m256i v = _mm256_sub_epi32(_mm256_cvtepu8_epi32(eights[i]), zero);
    _mm256_storeu_ps(o + 8 * i, _mm256_mul_ps(scale, _mm256_cvtepi32_ps(v)));
  }
}
#else
void dequantize_block_u4(const uint8_t* q, float s, int z, float* o) {
  for (int j = 0; j < kQuantBlock / 2; ++j) {
    o[j] = s * static_cast<float>((q[j] & 15) - z);
    o[j + kQuantBlock / 2] = s * static_cast<float>((q[j] >> 4) - z);
  }
}
#endif

// dst[0 .. 32 (b1 - b0)) = blocks b0 .. b1 - 1 (depths 32 b0 ..) of a weight row, dequantised.
void dequantize_blocks(const QuantView& w, const RowAt& at, int64_t b0, int64_t b1, float* dst) {
  const int64_t blocks = w.group / kQuantBlock;  // per group
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t g = b / blocks;
    const float s = scale_at(w, at.scales + g * at.group);
    const int z = at.zeros ? at.zeros[g * at.group] : (w.scheme == QuantScheme::int4 ? kInt4SymmetricZero : 0);
    float* o = dst + (b - b0) * kQuantBlock;
    if (w.scheme == QuantScheme::int8) {
      int8_t q[kQuantBlock];  // the block's bytes in depth order
      for (int run = 0; run < kQuantBlock / 4; ++run) memcpy(q + 4 * run, at.values + b * at.block + run * at.run, 4);
      for (int i = 0; i < kQuantBlock; ++i) o[i] = s * static_cast<float>(q[i] - z);
      continue;
    }
#if defined(__AVX2__)
    dequantize_block_u4(load_block_u4(at, b), s, z, o);
#else
    uint8_t q[kQuantBlock / 2];  // the block's bytes in exchange order
    for (int run = 0; run < 4; ++run) memcpy(q + 4 * run, at.values + b * at.block + run * at.run, 4);
    dequantize_block_u4(q, s, z, o);
#endif
  }
}

// Weight-only with few rows (decode): the weights are dequantised in registers, 32 at a time, exactly
// as dequantize_blocks does (s * (q - z), one float32 product), and dotted at once, so no dequantised row
// goes through memory. c[r * ldc] = dot(a row r, weight row) for r < R; 4 accumulators a row, summed in
// a fixed order at the end. Rows must be whole 32-depth blocks long (K a multiple of 32) and, for int8,
// outside a panel (its 32 bytes contiguous): rows in panels take float_panel_rows.
constexpr int64_t kFusedRows = 4;

#if defined(__AVX2__)
template <int R>
void fused_dot_rows(const QuantView& w, const RowAt& at, const float* a, int64_t lda, float* c, int64_t ldc) {
  const int64_t blocks = w.group / kQuantBlock;
  const bool int4 = w.scheme == QuantScheme::int4;
  __m256 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 4; ++i) acc[r][i] = _mm256_setzero_ps();
  for (int64_t g = 0; g < w.groups; ++g) {
    const __m256 scale = _mm256_set1_ps(scale_at(w, at.scales + g * at.group));
    const __m256i zero = _mm256_set1_epi32(at.zeros ? at.zeros[g * at.group] : (int4 ? kInt4SymmetricZero : 0));
    for (int64_t b = g * blocks; b < (g + 1) * blocks; ++b) {
      prefetch_ahead(at.values + b * (int4 ? at.block : kQuantBlock));
      __m128i eights[4];  // the block's 32 codes, 8 per vector in depth order
      if (int4) {
        const __m128i v = load_block_u4(at, b), low = _mm_set1_epi8(15);
        const __m128i lo = _mm_and_si128(v, low), hi = _mm_and_si128(_mm_srli_epi16(v, 4), low);
        eights[0] = lo, eights[1] = _mm_srli_si128(lo, 8), eights[2] = hi, eights[3] = _mm_srli_si128(hi, 8);
      } else {
        for (int i = 0; i < 4; ++i)
          eights[i] = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(at.values + b * at.block + 8 * i));
      }
      for (int i = 0; i < 4; ++i) {
        const __m256i q = int4 ? _mm256_cvtepu8_epi32(eights[i]) : _mm256_cvtepi8_epi32(eights[i]);
        const __m256 wv = _mm256_mul_ps(scale, _mm256_cvtepi32_ps(_mm256_sub_epi32(q, zero)));
        for (int r = 0; r < R; ++r)
          acc[r][i] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(a + r * lda + b * kQuantBlock + 8 * i), acc[r][i]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m256 v = _mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]), _mm256_add_ps(acc[r][2], acc[r][3]));
    float lanes[8];
    _mm256_storeu_ps(lanes, v);
    c[r * ldc] = ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6])) + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]));
  }
}
#endif

#if defined(__AVX2__)
// Weight-only panels with few rows (decode): the panel's 8 rows at once, one row a lane, as the integer
// path does (core/quant.h's kernel layout), so one 32-byte load feeds 8 rows x 8 depths (int4; int8: 4)
// instead of each row gathering its 4-byte runs. Per group, lane i sums (q - z) x over the group's depths
// (exact small integers times x, FMA), then adds scale_i times that sum: the scale is applied once per
// group, not once per weight, which moves float32 rounding within the accumulation bound of
// docs/api.md §9 (dequantize-then-dot rounds s (q - z) first). kAcc accumulators a row keep the FMA
// latency chains from bounding decode's 1-2 rows.
template <bool Int4, int R>
void float_panel_rows(const QuantView& w, int64_t first, const float* a, int64_t lda, float* c) {
  constexpr int kAcc = R <= 2 ? 4 : 2;
  constexpr int64_t kBlockBytes = kPanelRows * (Int4 ? kQuantBlock / 2 : kQuantBlock);
  const uint8_t* values = w.values + first * w.row_bytes;
  const int64_t scales = first * w.groups;
  const uint8_t* zeros = w.zeros ? w.zeros + first * w.groups : nullptr;
  const int64_t blocks = w.group / kQuantBlock;
  const __m256i low = _mm256_set1_epi32(15);
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < w.groups; ++g) {
    const __m256i zero = zeros ? _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(zeros + g * kPanelRows)))
                               : _mm256_set1_epi32(kInt4SymmetricZero);
    __m256 sum[R][kAcc];
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < kAcc; ++i) sum[r][i] = _mm256_setzero_ps();
    for (int64_t b = g * blocks; b < (g + 1) * blocks; ++b) {
      const uint8_t* block = values + b * kBlockBytes;
      prefetch_panel_block(block, kBlockBytes);
      const float* ab = a + b * kQuantBlock;
      if (!Int4) {
        for (int chunk = 0; chunk < 8; ++chunk) {  // lane i: depths 4 chunk .. 4 chunk + 3 of row i
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 32 * chunk));
          for (int k = 0; k < 4; ++k) {  // byte k of each lane, sign-extended
            const __m256 q = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 24 - 8 * k), 24));
            for (int r = 0; r < R; ++r) {
              __m256& into = sum[r][k % kAcc];
              into = _mm256_fmadd_ps(q, _mm256_broadcast_ss(ab + r * lda + 4 * chunk + k), into);
            }
          }
        }
        continue;
      }
      for (int chunk = 0; chunk < 4; ++chunk) {  // lane i: bytes 4 chunk .. 4 chunk + 3 of row i's block
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 32 * chunk));
        for (int k = 0; k < 4; ++k) {  // byte 4 chunk + k: depth 4 chunk + k (low nibble), + 16 (high)
          const __m256 lo = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(_mm256_srli_epi32(v, 8 * k), low), zero));
          const __m256 hi = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(_mm256_srli_epi32(v, 8 * k + 4), low), zero));
          const int j = (2 * k) % kAcc;
          for (int r = 0; r < R; ++r) {
            const float* ar = ab + r * lda + 4 * chunk + k;
            sum[r][j] = _mm256_fmadd_ps(lo, _mm256_broadcast_ss(ar), sum[r][j]);
            sum[r][j + 1] = _mm256_fmadd_ps(hi, _mm256_broadcast_ss(ar + 16), sum[r][j + 1]);
          }
        }
      }
    }
    const __m256 scale = (__m256)panel_scales_at(w, scales + g * kPanelRows);
    for (int r = 0; r < R; ++r) {
      __m256 total = sum[r][0];
      for (int i = 1; i < kAcc; ++i) total = _mm256_add_ps(total, sum[r][i]);
      acc[r] = _mm256_fmadd_ps(scale, total, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(c + r * kPanelRows, acc[r]);
}
#endif

#if defined(__AVX512F__)
// The AVX-512 form of float_panel_rows, with fewer unpacking ops per weight (weight-only decode is
// bound by them, not by the read: the AVX2 form spends 4 integer ops on each 8 int4 weights).
// Each 16 bytes of a panel block (4 rows x 4 bytes) widen to 16 lanes, 4 a row, so one 16-byte
// broadcast of a row of a feeds them all; an int4 code becomes its float in one vpermps (which reads
// the low 4 bits of each lane) from a table of q - 8 (symmetric) or of q, then less the row's zero point
// (exact); int8 codes are widened and converted. Per group, lane sums of (q - z) x, then the scale once,
// as in the AVX2 form; a row's 4 lanes are added in a fixed order at the end. Now the widening and the
// vpermps (shuffles) bound it: int4 g128 T=1 from L3 12-16% less time than the AVX2 form on Zen 4.
// Tried and slower: and/sub/convert in place of vpermps; a broadcast and variable shifts in place of the
// widening.
// GCC 12's AVX-512 intrinsics start from a self-initialised "undefined" vector, which -Wmaybe-uninitialized
// reports at every inlined call: a false alarm, silenced for this function.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
template <bool Int4, bool Zeros, int R>
void float_panel_rows_512(const QuantView& w, int64_t first, const float* a, int64_t lda, float* c) {
  constexpr int kChains = R == 1 ? 4 : (R == 2 ? 2 : 1);  // sums a (row of a, half): FMA latency at decode
  constexpr int kChunks = Int4 ? 4 : 8;                   // 32-byte runs of a panel block
  constexpr int64_t kBlockBytes = kPanelRows * (Int4 ? kQuantBlock / 2 : kQuantBlock);
  const uint8_t* values = w.values + first * w.row_bytes;
  const int64_t scales = first * w.groups;
  const uint8_t* zeros = Zeros ? w.zeros + first * w.groups : nullptr;
  const int64_t blocks = w.group / kQuantBlock;
  const float z0 = Zeros ? 0.f : static_cast<float>(-kInt4SymmetricZero);
  const __m512 table = _mm512_add_ps(_mm512_set1_ps(z0), _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  const __m512i quads[2] = {_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                            _mm512_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7)};
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t g = 0; g < w.groups; ++g) {
    __m512 sum[R][2][kChains], zero[2];
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < kChains; ++i) sum[r][0][i] = sum[r][1][i] = _mm512_setzero_ps();
    if (Zeros) {  // lanes 4i + k: zero point of row 4h + i
      const __m512 z8 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(zeros + g * kPanelRows))));
      for (int h = 0; h < 2; ++h) zero[h] = _mm512_permutexvar_ps(quads[h], z8);
    }
    for (int64_t b = g * blocks; b < (g + 1) * blocks; ++b) {
      const uint8_t* block = values + b * kBlockBytes;
      prefetch_panel_block(block, kBlockBytes);
      const float* ab = a + b * kQuantBlock;
      for (int chunk = 0; chunk < kChunks; ++chunk) {  // lanes 4i + k: row 4h + i, byte 4 chunk + k
        __m512 xlo[R], xhi[R];  // int4: depths 4 chunk + k (low nibbles) and + 16 (high); int8: 4 chunk + k
        for (int r = 0; r < R; ++r) {
          xlo[r] = _mm512_broadcast_f32x4(_mm_loadu_ps(ab + r * lda + 4 * chunk));
          if (Int4) xhi[r] = _mm512_broadcast_f32x4(_mm_loadu_ps(ab + r * lda + 16 + 4 * chunk));
        }
        for (int h = 0; h < 2; ++h) {
          const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 32 * chunk + 16 * h));
          if (!Int4) {
            const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
            for (int r = 0; r < R; ++r) sum[r][h][chunk % kChains] = _mm512_fmadd_ps(q, xlo[r], sum[r][h][chunk % kChains]);
            continue;
          }
          const __m512i v = _mm512_cvtepu8_epi32(bytes);
          __m512 lo = _mm512_permutexvar_ps(v, table), hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
          if (Zeros) lo = _mm512_sub_ps(lo, zero[h]), hi = _mm512_sub_ps(hi, zero[h]);
          const int j = (2 * chunk) % kChains, k = (2 * chunk + 1) % kChains;
          for (int r = 0; r < R; ++r) {
            sum[r][h][j] = _mm512_fmadd_ps(lo, xlo[r], sum[r][h][j]);
            sum[r][h][k] = _mm512_fmadd_ps(hi, xhi[r], sum[r][h][k]);
          }
        }
      }
    }
    const __m512 s8 = _mm512_zextps256_ps512((__m256)panel_scales_at(w, scales + g * kPanelRows));
    for (int h = 0; h < 2; ++h) {
      const __m512 scale = _mm512_permutexvar_ps(quads[h], s8);
      for (int r = 0; r < R; ++r) {
        __m512 total = sum[r][h][0];
        for (int i = 1; i < kChains; ++i) total = _mm512_add_ps(total, sum[r][h][i]);
        acc[r][h] = _mm512_fmadd_ps(scale, total, acc[r][h]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 2; ++h) {
      float l[16];
      _mm512_storeu_ps(l, acc[r][h]);
      for (int i = 0; i < 4; ++i) c[r * kPanelRows + 4 * h + i] = (l[4 * i] + l[4 * i + 1]) + (l[4 * i + 2] + l[4 * i + 3]);
    }
}
#pragma GCC diagnostic pop
#endif

#if defined(__AVX512F__)
// Weight-only panels on bfloat16 rows (QuantGemmProblem::bf16_dot; CPUs with AVX512_BF16): the codes
// become bfloat16 (q - z) (exact: |q - z| <= 15 for int4, 128 for int8) and vdpbf16ps multiplies two
// depths a lane, half the instructions of the float32 form for each weight. Each 32-byte run of a panel
// block (8 rows x 4 bytes) widens to 32 words, 4 a row; a row of a's 4 depths for it are one 8-byte
// broadcast. int4: vpermw reads the low 5 bits of each word as an index into a table of 32 bfloat16:
// symmetric codes, (i mod 16) - 8 (a byte's bit 4 is its high nibble's, so the low nibble needs no mask);
// with zero points, i - 16 for the index q - z + 16. int8: each word pair converted to float32 and its
// high halves kept, for 2 rows or more (Mixtral int8 per row, T=16, about 4 rows an expert: 87.9 -> 78.9
// ms; with one row the conversion costs more than the products it halves). Per group, lane sums of
// (q - z) x, then the scale once, as the float32 forms; a row's 2 lanes are added at the end.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // as float_panel_rows_512
template <bool Int4, bool Zeros, int R>
__attribute__((target("avx512bf16"))) void bf16_panel_rows(const QuantView& w, int64_t first, const uint16_t* a,
                                                           int64_t lda, float* c) {
  constexpr int kChains = R == 1 ? 4 : (R == 2 ? 2 : 1);  // sums a row of a: vdpbf16ps latency at decode
  constexpr int64_t kBlockBytes = kPanelRows * (Int4 ? kQuantBlock / 2 : kQuantBlock);
  const uint8_t* values = w.values + first * w.row_bytes;
  const int64_t scales = first * w.groups;
  const uint8_t* zeros = Zeros ? w.zeros + first * w.groups : nullptr;
  const int64_t blocks = w.group / kQuantBlock;
  alignas(64) uint16_t entries[32];
  for (int i = 0; i < 32; ++i) entries[i] = static_cast<uint16_t>(f32_bits(static_cast<float>(Zeros ? i - 16 : i % 16 - kInt4SymmetricZero)) >> 16);
  const __m512i table = _mm512_load_si512(entries), low = _mm512_set1_epi16(15);
  const __m512i high_half = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  const __m512i quads = _mm512_set_epi16(7, 7, 7, 7, 6, 6, 6, 6, 5, 5, 5, 5, 4, 4, 4, 4, 3, 3, 3, 3, 2, 2, 2, 2,
                                         1, 1, 1, 1, 0, 0, 0, 0);  // word 4r + k: row r
  const __m512i pairs = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);  // lane 2r + j: row r
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < w.groups; ++g) {
    __m512i zero = _mm512_setzero_si512();  // words 4r + k: z_r - 16
    if (Zeros) {
      const __m512i z = _mm512_cvtepu8_epi16(_mm256_castsi128_si256(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(zeros + g * kPanelRows))));
      zero = _mm512_sub_epi16(_mm512_permutexvar_epi16(quads, z), _mm512_set1_epi16(16));
    }
    __m512 sum[R][kChains];
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < kChains; ++i) sum[r][i] = _mm512_setzero_ps();
    for (int64_t b = g * blocks; b < (g + 1) * blocks; ++b) {
      const uint8_t* block = values + b * kBlockBytes;
      prefetch_panel_block(block, kBlockBytes);
      const uint16_t* ab = a + b * kQuantBlock;
      if (!Int4) {
        for (int chunk = 0; chunk < 8; ++chunk) {  // word 4r + k: row r's depth 4 chunk + k, sign-extended
          const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 32 * chunk));
          const __m512i v = _mm512_cvtepi8_epi16(bytes);
          const __m512 even = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 16), 16));
          const __m512 odd = _mm512_cvtepi32_ps(_mm512_srai_epi32(v, 16));
          const __m512bh wv = (__m512bh)_mm512_or_si512(_mm512_srli_epi32(_mm512_castps_si512(even), 16),
                                                        _mm512_and_si512(_mm512_castps_si512(odd), high_half));
          for (int r = 0; r < R; ++r) {
            int64_t x;
            memcpy(&x, ab + r * lda + 4 * chunk, 8);
            sum[r][chunk % kChains] = _mm512_dpbf16_ps(sum[r][chunk % kChains], wv, (__m512bh)_mm512_set1_epi64(x));
          }
        }
        continue;
      }
      for (int chunk = 0; chunk < 4; ++chunk) {  // word 4r + k: row r's byte 4 chunk + k
        const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 32 * chunk)));
        __m512i lo = v, hi = _mm512_srli_epi16(v, 4);
        if (Zeros) lo = _mm512_sub_epi16(_mm512_and_si512(v, low), zero), hi = _mm512_sub_epi16(hi, zero);
        const __m512bh wlo = (__m512bh)_mm512_permutexvar_epi16(lo, table), whi = (__m512bh)_mm512_permutexvar_epi16(hi, table);
        const int j = (2 * chunk) % kChains, k = (2 * chunk + 1) % kChains;
        for (int r = 0; r < R; ++r) {  // depths 4 chunk + k (low nibbles) and + 16 (high)
          int64_t xlo, xhi;
          memcpy(&xlo, ab + r * lda + 4 * chunk, 8);
          memcpy(&xhi, ab + r * lda + 16 + 4 * chunk, 8);
          sum[r][j] = _mm512_dpbf16_ps(sum[r][j], wlo, (__m512bh)_mm512_set1_epi64(xlo));
          sum[r][k] = _mm512_dpbf16_ps(sum[r][k], whi, (__m512bh)_mm512_set1_epi64(xhi));
        }
      }
    }
    const __m512 scale = _mm512_permutexvar_ps(pairs, _mm512_zextps256_ps512((__m256)panel_scales_at(w, scales + g * kPanelRows)));
    for (int r = 0; r < R; ++r) {
      __m512 total = sum[r][0];
      for (int i = 1; i < kChains; ++i) total = _mm512_add_ps(total, sum[r][i]);
      acc[r] = _mm512_fmadd_ps(scale, total, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float l[16];
    _mm512_storeu_ps(l, acc[r]);
    for (int i = 0; i < kPanelRows; ++i) c[r * kPanelRows + i] = l[2 * i] + l[2 * i + 1];
  }
}
#pragma GCC diagnostic pop
#endif

// Whether weight-only decode takes panels whole (float_panel_rows): AVX2 (whole blocks: decode needs K a
// multiple of 32, fused_weight_only).
constexpr bool kFloatPanels =
#if defined(__AVX2__)
    true;
#else
    false;
#endif

// c [rows][8] = the panel at flat row `first` (weight-only) times the tile's rows, kFusedRows at a time.
void float_panel(const QuantGemmProblem& p, int64_t first, int64_t a_row, int64_t rows, float* c) {
#if defined(__AVX2__)
  const QuantView& w = *p.w;
  for (int64_t m = 0; m < rows; m += kFusedRows) {
    const float* a = p.a + (a_row + m) * w.K;
    float* cm = c + m * kPanelRows;
#if defined(__AVX512F__)
    // int8 with one row keeps the float32 form (see bf16_panel_rows).
    const bool int4 = w.scheme == QuantScheme::int4;
    if (p.bf16_dot && (int4 || rows - m >= 2)) {
      const uint16_t* a16 = p.a_bf16 + (a_row + m) * w.K;
      switch (min_i64(kFusedRows, rows - m) * 3 + (int4 ? (w.zeros ? 2 : 1) : 0)) {
#define MOE_EXT_BF16_PANEL_CASE(R)                                                 \
  case 3 * R: bf16_panel_rows<false, false, R>(w, first, a16, w.K, cm); break;    \
  case 3 * R + 1: bf16_panel_rows<true, false, R>(w, first, a16, w.K, cm); break; \
  case 3 * R + 2: bf16_panel_rows<true, true, R>(w, first, a16, w.K, cm); break;
        MOE_EXT_BF16_PANEL_CASE(1) MOE_EXT_BF16_PANEL_CASE(2) MOE_EXT_BF16_PANEL_CASE(3) MOE_EXT_BF16_PANEL_CASE(4)
#undef MOE_EXT_BF16_PANEL_CASE
        default: break;
      }
      continue;
    }
    switch (min_i64(kFusedRows, rows - m) * 3 + (w.scheme == QuantScheme::int4 ? (w.zeros ? 2 : 1) : 0)) {
#define MOE_EXT_FLOAT_PANEL_CASE(R)                                                      \
  case 3 * R: float_panel_rows_512<false, false, R>(w, first, a, w.K, cm); break;     \
  case 3 * R + 1: float_panel_rows_512<true, false, R>(w, first, a, w.K, cm); break; \
  case 3 * R + 2: float_panel_rows_512<true, true, R>(w, first, a, w.K, cm); break;
#else
    switch (min_i64(kFusedRows, rows - m) * 2 + (w.scheme == QuantScheme::int4 ? 1 : 0)) {
#define MOE_EXT_FLOAT_PANEL_CASE(R)                                       \
  case 2 * R: float_panel_rows<false, R>(w, first, a, w.K, cm); break; \
  case 2 * R + 1: float_panel_rows<true, R>(w, first, a, w.K, cm); break;
#endif
      MOE_EXT_FLOAT_PANEL_CASE(1) MOE_EXT_FLOAT_PANEL_CASE(2) MOE_EXT_FLOAT_PANEL_CASE(3) MOE_EXT_FLOAT_PANEL_CASE(4)
#undef MOE_EXT_FLOAT_PANEL_CASE
      default: break;
    }
  }
#else
  (void)p, (void)first, (void)a_row, (void)rows, (void)c;
#endif
}

// Whether fused_dot_rows takes this tile (kFusedRows at a time): AVX2, whole blocks, and at most
// kFusedTileRows rows; with more, dequantising each weight row once into scratch costs less than once
// per kFusedRows rows in registers.
constexpr int64_t kFusedTileRows = 16;

bool fused_weight_only(const QuantView& w, int64_t rows) {
#if defined(__AVX2__)
  return rows <= kFusedTileRows && w.K % kQuantBlock == 0;
#else
  (void)w, (void)rows;
  return false;
#endif
}

void fused_column(const QuantGemmProblem& p, int64_t row, int64_t a_row, int64_t rows, float* c, int64_t ldc) {
#if defined(__AVX2__)
  const QuantView& w = *p.w;
  const RowAt at = row_at(w, row);
  for (int64_t m = 0; m < rows; m += kFusedRows) {
    const float* a = p.a + (a_row + m) * w.K;
    float* cm = c + m * ldc;
    switch (min_i64(kFusedRows, rows - m)) {
      case 1: fused_dot_rows<1>(w, at, a, w.K, cm, ldc); break;
      case 2: fused_dot_rows<2>(w, at, a, w.K, cm, ldc); break;
      case 3: fused_dot_rows<3>(w, at, a, w.K, cm, ldc); break;
      default: fused_dot_rows<4>(w, at, a, w.K, cm, ldc); break;
    }
  }
  return;
#endif
  (void)p, (void)row, (void)a_row, (void)rows, (void)c, (void)ldc;
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

// The integer products of the panel at flat row `first` with the tile's rows: c [rows][8].
void int_panel_best(const QuantGemmProblem& p, int64_t first, int64_t a_row, int64_t rows, float* c) {
#if defined(__AVX512F__)
  if (p.vnni) return int_panel_vnni(p, first, a_row, rows, c);
#endif
#if defined(__AVX2__)
  int_panel<PanelAvx2>(p, first, a_row, rows, c);
#else
  int_panel<PanelScalar>(p, first, a_row, rows, c);
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

// --- weight-only, other tiles (prefill): dequantised panels into the float GEMM's microkernels ------

// Depths per block: a block of a dequantised panel (kDequantDepth x kPanelCols float32) is 32 KiB, L1, as
// the float GEMM's blocks (cpu/grouped_gemm.cpp); the tile's rows of a for it (<= 128 KiB) stay in L2.
constexpr int64_t kDequantDepth = 256;
static_assert(kDequantDepth % kQuantBlock == 0 && kTileCols % kPanelCols == 0, "blocks of whole quant blocks, tiles of whole panels");

#if defined(__AVX2__)
// Columns 0..7 of a dequantised panel block (row stride kPanelCols) from one kernel panel (flat rows
// first .. first + 7, one a lane): each 32-byte run holds the 8 rows' codes at 4 depths (int4: 8), so
// every depth is one 8-wide store with no transpose. Values as dequantize gives them: s * (q - z).
void dequantize_kernel_panel(const QuantView& w, int64_t first, int64_t k0, int64_t depth, float* panel) {
  const bool int4 = w.scheme == QuantScheme::int4;
  const int64_t panel_block = kPanelRows * block_bytes(w), blocks = w.group / kQuantBlock;
  const uint8_t* values = w.values + first * w.row_bytes;
  const uint8_t* zeros = w.zeros ? w.zeros + first * w.groups : nullptr;
  const __m256i low = _mm256_set1_epi32(15);
  for (int64_t b = k0 / kQuantBlock; b * kQuantBlock < k0 + depth; ++b) {
    const int64_t g = b / blocks, valid = k0 + depth - b * kQuantBlock;  // depths of block b inside
    const __m256 scale = (__m256)panel_scales_at(w, first * w.groups + g * kPanelRows);
    const __m256i zero = zeros ? _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(zeros + g * kPanelRows)))
                               : _mm256_set1_epi32(int4 ? kInt4SymmetricZero : 0);
    const uint8_t* block = values + b * panel_block;
    float* out = panel + (b * kQuantBlock - k0) * kPanelCols;
    auto put = [&](int d, __m256i q) {
      if (d < valid) _mm256_storeu_ps(out + d * kPanelCols, _mm256_mul_ps(scale, _mm256_cvtepi32_ps(_mm256_sub_epi32(q, zero))));
    };
    for (int chunk = 0; chunk < (int4 ? 4 : 8); ++chunk) {  // lane i: row i's bytes 4 chunk .. 4 chunk + 3
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 32 * chunk));
      for (int k = 0; k < 4; ++k) {
        if (!int4) {
          put(4 * chunk + k, _mm256_srai_epi32(_mm256_slli_epi32(v, 24 - 8 * k), 24));
          continue;
        }
        put(4 * chunk + k, _mm256_and_si256(_mm256_srli_epi32(v, 8 * k), low));
        put(16 + 4 * chunk + k, _mm256_and_si256(_mm256_srli_epi32(v, 8 * k + 4), low));
      }
    }
  }
}
#endif

// panel [depth][kPanelCols] (core/packed.h's float32 layout) = flat weight rows first .. first + rows - 1
// at depths k0 .. k0 + depth - 1, dequantised; columns past `rows` zero. Whole kernel panels 8 columns
// at a time (AVX2), other rows one by one through row_buf (kDequantDepth floats).
void dequantize_panel_block(const QuantView& w, int64_t first, int64_t rows, int64_t k0, int64_t depth,
                            float* row_buf, float* panel) {
  const int64_t b0 = k0 / kQuantBlock, b1 = ceil_div(k0 + depth, kQuantBlock);
  for (int64_t c0 = 0; c0 < kPanelCols; c0 += kPanelRows) {
#if defined(__AVX2__)
    const int64_t row = first + c0;
    if (whole_panel_at(w, row, rows - c0)) {
      dequantize_kernel_panel(w, row, k0, depth, panel + c0);
      continue;
    }
#endif
    for (int64_t c = c0; c < c0 + kPanelRows; ++c) {
      if (c < rows) dequantize_blocks(w, row_at(w, first + c), b0, b1, row_buf);
      for (int64_t q = 0; q < depth; ++q) panel[q * kPanelCols + c] = c < rows ? row_buf[q] : 0.f;
    }
  }
}

// local[r * kLocalCols + s * kTileCols + j] = segment s's weight row j (flat firsts[s] + j, j < seg_rows)
// times the tile's row r: each depth block of each panel is dequantised once per tile and multiplied
// with every row by the float GEMM's microkernel, so the dequantisation is paid once per up to 128
// rows. Each output adds its depths in order within a block and the blocks in order.
void dequantized_product(const QuantGemmProblem& p, const Tile& t, int segments, const int64_t* firsts,
                         int64_t seg_rows, float* local, float* row_buf, float* panel) {
  const int64_t K = p.w->K;
  const float* a = p.a + t.row_begin * K;
  for (int64_t k0 = 0; k0 < K; k0 += kDequantDepth) {
    const int64_t depth = min_i64(kDequantDepth, K - k0);
    for (int s = 0; s < segments; ++s)
      for (int64_t j = 0; j < seg_rows; j += kPanelCols) {
        dequantize_panel_block(*p.w, firsts[s] + j, min_i64(kPanelCols, seg_rows - j), k0, depth, row_buf, panel);
        for (int64_t slice = 0; slice < kPanelCols; slice += kMicroCols)
          for (int64_t m = 0; m < t.rows; m += kMicroRows) {
            const float* a_m = a + m * K + k0;
            float* c = local + m * kLocalCols + s * kTileCols + j + slice;
            switch (min_i64(kMicroRows, t.rows - m)) {
#define MOE_EXT_DEQUANT_CASE(R) \
  case R: micro_kernel<(R <= kMicroRows ? R : 1), float>(a_m, K, panel + slice, depth, c, kLocalCols, k0 > 0); break;
              MOE_EXT_DEQUANT_CASE(1) MOE_EXT_DEQUANT_CASE(2) MOE_EXT_DEQUANT_CASE(3) MOE_EXT_DEQUANT_CASE(4)
              MOE_EXT_DEQUANT_CASE(5) MOE_EXT_DEQUANT_CASE(6) MOE_EXT_DEQUANT_CASE(7) MOE_EXT_DEQUANT_CASE(8)
#undef MOE_EXT_DEQUANT_CASE
              default: break;
            }
          }
      }
  }
}

#if defined(__AVX512F__)
// --- weight-only prefill on bfloat16 rows (QuantGemmProblem::bf16_dot): vdpbf16ps on the codes --------

// bfloat16 bits of small integers (|v| <= 255: exact), as the high halves of their float32 bits.
inline __m256i bf16_high_halves(__m256i v) { return _mm256_castps_si256(_mm256_cvtepi32_ps(v)); }

// words [depth / 2][kPanelCols] = the vdpbf16ps pair layout (core/packed.h) of q - z, not scaled (the
// caller applies each group's scales): column c's word q holds depths k0 + 2q (low half) and k0 + 2q + 1
// of flat weight row first + c, bfloat16 (exact: |q - z| <= 15 for int4, 128 for int8); columns past
// `rows` zero. depth is whole blocks.
void code_panel_block(const QuantView& w, int64_t first, int64_t rows, int64_t k0, int64_t depth, uint32_t* words) {
  const int64_t panel_block = kPanelRows * block_bytes(w), blocks = w.group / kQuantBlock;
  const __m256i low = _mm256_set1_epi32(15), high = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  for (int64_t c0 = 0; c0 < kPanelCols; c0 += kPanelRows) {
    const int64_t row = first + c0;
    if (whole_panel_at(w, row, rows - c0)) {
      const uint8_t* values = w.values + row * w.row_bytes;
      const uint8_t* zeros = w.zeros ? w.zeros + row * w.groups : nullptr;
      for (int64_t b = k0 / kQuantBlock; b * kQuantBlock < k0 + depth; ++b) {
        const int64_t g = b / blocks;
        uint32_t* out = words + (b * kQuantBlock - k0) / 2 * kPanelCols + c0;
        auto put = [&](int d, __m256i even, __m256i odd) {  // depths d, d + 1 of the block
          const __m256i word = _mm256_or_si256(_mm256_srli_epi32(bf16_high_halves(even), 16),
                                               _mm256_and_si256(bf16_high_halves(odd), high));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + d / 2 * kPanelCols), word);
        };
        if (w.scheme == QuantScheme::int8) {
          for (int chunk = 0; chunk < 8; ++chunk) {  // lane i: row i's depths 4 chunk .. 4 chunk + 3
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(values + b * panel_block + 32 * chunk));
            for (int k = 0; k < 4; k += 2)
              put(4 * chunk + k, _mm256_srai_epi32(_mm256_slli_epi32(v, 24 - 8 * k), 24),
                  _mm256_srai_epi32(_mm256_slli_epi32(v, 16 - 8 * k), 24));
          }
          continue;
        }
        const __m256i zero = zeros ? _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(zeros + g * kPanelRows)))
                                   : _mm256_set1_epi32(kInt4SymmetricZero);
        for (int chunk = 0; chunk < 4; ++chunk) {  // lane i: row i's bytes 4 chunk .. 4 chunk + 3
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(values + b * panel_block + 32 * chunk));
          for (int k = 0; k < 4; k += 2)
            for (int nibble = 0; nibble < 2; ++nibble) {  // depths 4 chunk + k, + 1 (+ 16 for high nibbles)
              const int shift = 8 * k + 4 * nibble;
              put(16 * nibble + 4 * chunk + k, _mm256_sub_epi32(_mm256_and_si256(_mm256_srli_epi32(v, shift), low), zero),
                  _mm256_sub_epi32(_mm256_and_si256(_mm256_srli_epi32(v, shift + 8), low), zero));
            }
        }
      }
      continue;
    }
    for (int64_t c = c0; c < c0 + kPanelRows; ++c) {  // a row outside a kernel panel, or none
      const RowAt at = c < rows ? row_at(w, first + c) : RowAt{};
      for (int64_t d = 0; d < depth; d += 2) {
        uint32_t word = 0;
        for (int half = 0; half < 2 && c < rows; ++half) {
          const int64_t depth_at = k0 + d + half, b = depth_at / kQuantBlock, i = depth_at % kQuantBlock, g = b / blocks;
          int code;
          if (w.scheme == QuantScheme::int8) {
            code = static_cast<int8_t>(at.values[b * at.block + i / 4 * at.run + i % 4]);
          } else {
            const uint8_t byte = at.values[b * at.block + (i % 16) / 4 * at.run + i % 4];
            code = (i < 16 ? byte & 15 : byte >> 4) - (at.zeros ? at.zeros[g * at.group] : kInt4SymmetricZero);
          }
          word |= (f32_bits(static_cast<float>(code)) >> 16) << (16 * half);
        }
        words[d / 2 * kPanelCols + c] = word;
      }
    }
  }
}

// As dequantized_product, on bfloat16 rows and the codes: per group (or per block, for groups longer
// than a block: int8 per row), the codes' products with the rows (exact, summed in float32 by vdpbf16ps)
// into `partial`, then each column's scale times that added to the tile's results: the scale applied
// once per group, as the decode panels do. Groups of 32 to 128 depths divide kDequantDepth, so blocks
// hold whole groups; longer ones (multiples of 32: core/quant.cpp's check_format) are cut at blocks.
static_assert(kDequantDepth / 2 * kPanelCols + kTileRows * kPanelCols <= kDequantDepth * kPanelCols,
              "the codes and the partial sums share the dequantised block's space");

void coded_product(const QuantGemmProblem& p, const Tile& t, int segments, const int64_t* firsts, int64_t seg_rows,
                   float* local, uint32_t* words, float* partial) {
  const QuantView& w = *p.w;
  const int64_t K = w.K, lda_pairs = K / 2;  // K is a multiple of 32 (QuantGemmProblem::bf16_dot)
  const int64_t span = min_i64(w.group, kDequantDepth);  // depths a scale covers within a block
  const uint32_t* a_pairs = reinterpret_cast<const uint32_t*>(p.a_bf16) + t.row_begin * lda_pairs;
  for (int64_t k0 = 0; k0 < K; k0 += kDequantDepth) {
    const int64_t depth = min_i64(kDequantDepth, K - k0);
    for (int s = 0; s < segments; ++s)
      for (int64_t j = 0; j < seg_rows; j += kPanelCols) {
        const int64_t cols = min_i64(kPanelCols, seg_rows - j);
        code_panel_block(w, firsts[s] + j, cols, k0, depth, words);
        RowAt at[kPanelCols];  // where each column's scales are
        for (int64_t c = 0; c < cols; ++c) at[c] = row_at(w, firsts[s] + j + c);
        for (int64_t d = 0; d < depth; d += span) {
          const int64_t g = (k0 + d) / w.group;
          for (int64_t m = 0; m < t.rows; m += kMicroRows) {
            const uint32_t* a_m = a_pairs + m * lda_pairs + (k0 + d) / 2;
            const bf16_t* b = reinterpret_cast<const bf16_t*>(words + d / 2 * kPanelCols);
            float* c = partial + m * kPanelCols;
            switch (min_i64(kMicroRows, t.rows - m)) {
#define MOE_EXT_CODED_CASE(R) \
  case R: micro_kernel_dpbf16<(R <= kMicroRows ? R : 1)>(a_m, lda_pairs, b, min_i64(span, depth - d) / 2, c, kPanelCols, false); break;
              MOE_EXT_CODED_CASE(1) MOE_EXT_CODED_CASE(2) MOE_EXT_CODED_CASE(3) MOE_EXT_CODED_CASE(4)
              MOE_EXT_CODED_CASE(5) MOE_EXT_CODED_CASE(6) MOE_EXT_CODED_CASE(7) MOE_EXT_CODED_CASE(8)
#undef MOE_EXT_CODED_CASE
              default: break;
            }
          }
          float scale[kPanelCols] = {};
          for (int64_t c = 0; c < cols; ++c) scale[c] = scale_at(w, at[c].scales + g * at[c].group);
          const bool first_group = k0 + d == 0;
          for (int64_t r = 0; r < t.rows; ++r) {
            float* dst = local + r * kLocalCols + s * kTileCols + j;
            const float* src = partial + r * kPanelCols;
            for (int64_t c = 0; c < kPanelCols; ++c) dst[c] = first_group ? scale[c] * src[c] : dst[c] + scale[c] * src[c];
          }
        }
      }
  }
}
#endif

// Column c[r * kLocalCols] (r < t.rows) of the tile's results = weight row `row` times the tile's rows,
// for the integer path and weight-only decode (fused_weight_only). A row in a panel takes its lane of the
// whole panel's products, computed once per panel and kept in `panel` ([rows][8]) while the tile walks
// the panel's rows.
struct Columns {
  const QuantGemmProblem& p;
  const Tile& t;
  float* panel;  // the current panel's products
  int64_t panel_first = -1;

  void operator()(int64_t row, float* c) {
    const QuantView& w = *p.w;
    const bool weight_only = !w.quantize_activations;
    if (!in_panel(w, row) || (weight_only && !kFloatPanels)) {
      if (weight_only) return fused_column(p, row, t.row_begin, t.rows, c, kLocalCols);
      return int_column_best(p, row, t.row_begin, t.rows, c, kLocalCols);
    }
    const int64_t lane = row % w.N % kPanelRows;
    if (row - lane != panel_first) {
      panel_first = row - lane;
      if (weight_only)
        float_panel(p, panel_first, t.row_begin, t.rows, panel);
      else
        int_panel_best(p, panel_first, t.row_begin, t.rows, panel);
    }
    for (int64_t r = 0; r < t.rows; ++r) c[r * kLocalCols] = panel[r * kPanelRows + lane];
  }
};

// Tiles of more rows than this take int_tile_vnni (activation-quantised, VNNI), fewer the panels.
constexpr int64_t kIntTileRows = 16;
static_assert(kCodeDepth / 4 * kCodeCols + kTileRows * kCodeCols <= kDequantDepth * kPanelCols,
              "int_tile_vnni's codes and sums fit the dequantised block's space");

// A thread's scratch (quant_gemm_scratch_bytes): the tile's results, one panel's products (Columns), one
// dequantised panel block and one dequantised row slice (dequantized_product).
struct Buffers {
  float *local, *panel, *dequantized, *row;
};

static_assert((kTileRows * kLocalCols + kTileRows * kPanelRows + kDequantDepth * kPanelCols + kDequantDepth) * 4 <=
                  quant_gemm_scratch_bytes(),
              "a tile's buffers fit the scratch");

Buffers buffers(void* scratch) {
  float* local = static_cast<float*>(scratch);
  float* panel = local + kTileRows * kLocalCols;
  float* dequantized = panel + kTileRows * kPanelRows;
  return {local, panel, dequantized, dequantized + kDequantDepth * kPanelCols};
}

void run_tile(const QuantGemmProblem& p, const Geometry& g, const Tile& t, const Buffers& buf) {
  const QuantView& w = *p.w;
  const int segments = g.gated && !g.interleaved ? 2 : 1;
  const int64_t first = g.interleaved ? 2 * t.col_begin : t.col_begin;  // w's first row of segment 0
  const int64_t seg_rows = g.interleaved ? 2 * t.cols : t.cols;
  float* local = buf.local;
  const int64_t firsts[2] = {t.expert * w.N + first, t.expert * w.N + g.half + first};  // each segment's first row
#if defined(__AVX512F__)
  if (w.quantize_activations && p.vnni && t.rows > kIntTileRows) {  // the dequantised block's space: codes, sums
    uint32_t* words = reinterpret_cast<uint32_t*>(buf.dequantized);
    int_tile_vnni(p, t.row_begin, t.rows, firsts, segments, seg_rows, local, kLocalCols, kTileCols, words,
                  reinterpret_cast<int32_t*>(words + kCodeDepth / 4 * kCodeCols));
  } else
#endif
  if (!w.quantize_activations && !fused_weight_only(w, t.rows)) {
#if defined(__AVX512F__)
    if (p.bf16_dot) {  // the dequantised block's space holds the codes and the partial sums
      uint32_t* words = reinterpret_cast<uint32_t*>(buf.dequantized);
      coded_product(p, t, segments, firsts, seg_rows, local, words, buf.dequantized + kDequantDepth / 2 * kPanelCols);
    } else
#endif
    dequantized_product(p, t, segments, firsts, seg_rows, local, buf.row, buf.dequantized);
  } else {
    Columns column{p, t, buf.panel};
    for (int s = 0; s < segments; ++s)
      for (int64_t j = 0; j < seg_rows; ++j) column(firsts[s] + j, local + s * kTileCols + j);
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
  const int64_t per_thread = quant_gemm_scratch_bytes();
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
#endif
  for (int64_t index = 0; index < tiles; ++index) {
    Tile t;
    if (find_tile(p, index, col_tiles, g.out_cols, &t))
      run_tile(p, g, t, buffers(static_cast<char*>(scratch) + thread_index() * per_thread));
  }
}

}  // namespace moe_ext::cpu::MOE_EXT_CPU_NS
