// Integer dot products of the quantised grouped GEMM (W8A8 / W4A8), int32 per group, scales applied per
// group in float32: a panel of 8 weight rows (core/quant.h's kernel layout, one row a lane; the Panel*
// policies and panel_dot_rows below) or, for an expert's last N % 8 rows, one weight row (the Dot*
// policies and int_dot_rows) times a few int8 activation rows.
//
// A policy supplies the 32-depth block product (int32 lanes, each the sum of 4 depths):
// - DotScalar: plain integer loops (scalar tier);
// - DotAvx2: vpmaddubsw + vpmaddwd. vpmaddubsw multiplies unsigned by signed bytes and saturates its
//   int16 pair sums, so int8 weights go in as |w| against sign(w) * a (both at most 127 in magnitude:
//   2 * 127 * 128 < 32767, never saturating); int4 weights are unsigned nibbles (<= 15) already;
// - DotVnni (csrc/cpu/quant_gemm_vnni.cpp only, compiled with AVX512_VNNI): vpdpbusd, unsigned weight
//   bytes times signed activations into int32 with no int16 stage. int8 weights go in as w + 128
//   (one xor), so the block sum holds 128 * sum(a) too, removed with the group's activation sum.
// Every policy gives the exact integer sums, so all tiers agree on the integers. The group's zero-point
// correction (z * the activations' group sum) is subtracted from lane 0 in int32 (exact); then the float32
// epilogue keeps the 8 lanes apart: acc[lane] += float(lane sum) * group scale (each lane sum < 2^24, so
// exactly converted), and only after the last group are the lanes added, in a fixed order, and times the
// token's scale. No horizontal sum per group: with g32 that was as costly as the products. A tier that
// contracts the multiply-add into FMA may round differently from one that does not.
#pragma once
#include "core/kernels.h"
#include "core/quant.h"
#include "cpu/common.h"
#include "cpu/convert.h"
#if defined(__AVX2__)
#include <immintrin.h>
#endif

typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef uint8_t u8x8 __attribute__((vector_size(8)));

// Policies and templates in the tier's namespace, with internal linkage: each tier (and the VNNI file)
// has its own copy compiled with its own flags (see cpu/common.h).
namespace moe_ext::cpu::MOE_EXT_CPU_NS {
namespace {

struct DotScalar {
  static constexpr int kS8Bias = 0;  // what the block sum adds per unit of activation sum (int8 weights)
  struct Block { int8_t v[32]; };
  static Block load_s8(const uint8_t* p) {
    Block b;
    memcpy(b.v, p, 32);
    return b;
  }
  static Block load_u4(const uint8_t* p) {
    Block b;
    for (int j = 0; j < 16; ++j) b.v[j] = static_cast<int8_t>(p[j] & 15), b.v[j + 16] = static_cast<int8_t>(p[j] >> 4);
    return b;
  }
  static i32x8 dot_s8(i32x8 acc, const Block& w, const int8_t* a) {
    for (int lane = 0; lane < 8; ++lane)
      for (int j = 0; j < 4; ++j) acc[lane] += w.v[4 * lane + j] * a[4 * lane + j];
    return acc;
  }
  static i32x8 dot_u8(i32x8 acc, const Block& w, const int8_t* a) { return dot_s8(acc, w, a); }
};

#if defined(__AVX2__)
struct DotAvx2 {
  static constexpr int kS8Bias = 0;
  typedef __m256i Block;
  static Block load_s8(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static Block load_u4(const uint8_t* p) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), low = _mm_set1_epi8(15);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), low), _mm_and_si128(bytes, low));
  }
  static i32x8 pairs_to_i32(i32x8 acc, __m256i pairs16) {
    return acc + (i32x8)_mm256_madd_epi16(pairs16, _mm256_set1_epi16(1));
  }
  static i32x8 dot_s8(i32x8 acc, Block w, const int8_t* a) {
    const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a));
    return pairs_to_i32(acc, _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(av, w)));
  }
  static i32x8 dot_u8(i32x8 acc, Block w, const int8_t* a) {
    return pairs_to_i32(acc, _mm256_maddubs_epi16(w, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a))));
  }
};
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
struct DotVnni {
  static constexpr int kS8Bias = 128;
  typedef __m256i Block;
  static Block load_s8(const uint8_t* p) {
    return _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), _mm256_set1_epi8(-128));
  }
  static Block load_u4(const uint8_t* p) { return DotAvx2::load_u4(p); }
  static i32x8 dot_u8(i32x8 acc, Block w, const int8_t* a) {
    return (i32x8)_mm256_dpbusd_epi32((__m256i)acc, w, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a)));
  }
  static i32x8 dot_s8(i32x8 acc, Block w, const int8_t* a) { return dot_u8(acc, w, a); }
};
#endif

// Decode reads each weight byte once, and with a few hundred bytes of arithmetic per line the hardware
// prefetchers alone left the stream short of the read bandwidth: each kernel asks for the line
// kQuantPrefetchBytes ahead of the block it loads (bench/quant.py, llama_cpp.py: 5-20% less time at
// T=1..16 on both shapes; further ahead or less far was no better).
constexpr int64_t kQuantPrefetchBytes = 4096;

inline void prefetch_ahead(const uint8_t* p) { __builtin_prefetch(p + kQuantPrefetchBytes, 0, 3); }
// The same for a panel block of `bytes` bytes (int4 128: two lines; int8 256: four).
inline void prefetch_panel_block(const uint8_t* block, int64_t bytes) {
  for (int64_t line = 0; line < bytes; line += 64) prefetch_ahead(block + line);
}

// Scale i (a group_offset) of w, as float32 (float16 scales widened exactly).
inline float scale_at(const QuantView& w, int64_t i) {
  if (!w.half_scales) return static_cast<const float*>(w.scales)[i];
  return to_f32(f16_t{static_cast<const uint16_t*>(w.scales)[i]});
}

// Scales i .. i + 7 of w (a panel's group), as float32.
inline f32x8 panel_scales_at(const QuantView& w, int64_t i) {
  f32x8 s;
  if (!w.half_scales) {
    memcpy(&s, static_cast<const float*>(w.scales) + i, sizeof s);
    return s;
  }
  const uint16_t* h = static_cast<const uint16_t*>(w.scales) + i;
#if defined(__F16C__)
  return (f32x8)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h)));
#else
  for (int l = 0; l < 8; ++l) s[l] = to_f32(f16_t{h[l]});
  return s;
#endif
}

// Rows r < R of c (stride ldc) = weight row `row` (flat index e * N + n) times activation rows
// aq[r * lda ...], with their group sums (stride w.groups) and scales.
template <class Dot, bool Int4, int R>
void int_dot_rows(const QuantView& w, int64_t row, const int8_t* aq, int64_t lda, const int32_t* sums,
                  const float* a_scales, float* c, int64_t ldc) {
  const uint8_t* values = w.values + row * w.row_bytes;
  const int64_t scales = row * w.groups;
  const uint8_t* zeros = w.zeros ? w.zeros + row * w.groups : nullptr;
  constexpr int64_t kBlockBytes = Int4 ? kQuantBlock / 2 : kQuantBlock;
  const int64_t blocks = w.group / kQuantBlock;
  f32x8 acc[R] = {};
  for (int64_t g = 0; g < w.groups; ++g) {
    i32x8 s[R] = {};
    for (int64_t b = g * blocks; b < (g + 1) * blocks; ++b) {
      prefetch_ahead(values + b * kBlockBytes);
      const auto wv = Int4 ? Dot::load_u4(values + b * kBlockBytes) : Dot::load_s8(values + b * kBlockBytes);
      for (int r = 0; r < R; ++r)
        s[r] = Int4 ? Dot::dot_u8(s[r], wv, aq + r * lda + b * kQuantBlock)
                    : Dot::dot_s8(s[r], wv, aq + r * lda + b * kQuantBlock);
    }
    const int32_t zero = Int4 ? (zeros ? zeros[g] : kInt4SymmetricZero) : Dot::kS8Bias;
    const float scale = scale_at(w, scales + g);
    for (int r = 0; r < R; ++r) {
      s[r][0] -= zero * sums[r * w.groups + g];
      acc[r] += __builtin_convertvector(s[r], f32x8) * scale;
    }
  }
  for (int r = 0; r < R; ++r) {
    const f32x8& v = acc[r];
    c[r * ldc] = (((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]))) * a_scales[r];
  }
}

// --- panels (core/quant.h's kernel layout): 8 weight rows, one a lane ------------------------------
// A policy's block<R>(w, a, depth, s, t) adds to s[r] + t[r] (lane i: row i of the panel) the integer
// products of the panel's 32-depth int4 block at w (128 bytes) with activation rows a[r] at `depth`;
// block_s8<R> the same for an int8 block (256 bytes). Two accumulators a row because vpdpbusd adds into
// its accumulator: with one, a group's products form one chain of dependent instructions (32 long for an
// int4 g128 group), whose latency bounded the integer path at decode's one or two rows. Integer sums, so
// the split changes no result. Nibbles are unsigned (0..15), so the zero point is taken off per group with
// the activations' group sum, as above; so is kS8Bias for int8 (vpdpbusd's w + 128).

struct PanelScalar {
  static constexpr int kS8Bias = 0;
  template <int R>
  static void block_s8(const uint8_t* w, const int8_t* const* a, int64_t depth, i32x8* s, i32x8*) {
    for (int c = 0; c < 8; ++c)
      for (int i = 0; i < 8; ++i)
        for (int j = 0; j < 4; ++j) {
          const int8_t q = static_cast<int8_t>(w[32 * c + 4 * i + j]);
          for (int r = 0; r < R; ++r) s[r][i] += q * a[r][depth + 4 * c + j];
        }
  }
  template <int R>
  static void block(const uint8_t* w, const int8_t* const* a, int64_t depth, i32x8* s, i32x8*) {
    for (int c = 0; c < 4; ++c)
      for (int i = 0; i < 8; ++i)
        for (int j = 0; j < 4; ++j) {
          const uint8_t byte = w[32 * c + 4 * i + j];
          for (int r = 0; r < R; ++r)
            s[r][i] += (byte & 15) * a[r][depth + 4 * c + j] + (byte >> 4) * a[r][depth + 16 + 4 * c + j];
        }
  }
};

#if defined(__AVX2__)
inline __m256i broadcast4(const int8_t* p) {
  int32_t v;
  memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// vpmaddubsw (nibble x int8, pairs summed in int16), 8 of them summed in int16 before one vpmaddwd:
// each pair is at most 2 * 15 * 127 = 3810 in magnitude, so 8 of them (30480) never saturate. int8:
// |w| against sign(w) * a as DotAvx2 (a pair at most 2 * 127 * 127 = 32258), one vpmaddwd per chunk.
struct PanelAvx2 {
  static constexpr int kS8Bias = 0;
  template <int R>
  static void block_s8(const uint8_t* w, const int8_t* const* a, int64_t depth, i32x8* s, i32x8*) {
    for (int c = 0; c < 8; ++c) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * c));
      const __m256i magnitude = _mm256_sign_epi8(v, v);
      for (int r = 0; r < R; ++r) {
        const __m256i pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(broadcast4(a[r] + depth + 4 * c), v));
        s[r] += (i32x8)_mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
      }
    }
  }
  template <int R>
  static void block(const uint8_t* w, const int8_t* const* a, int64_t depth, i32x8* s, i32x8*) {
    const __m256i low = _mm256_set1_epi8(15);
    __m256i s16[R];
    for (int c = 0; c < 4; ++c) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * c));
      const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
      for (int r = 0; r < R; ++r) {
        const __m256i pair = _mm256_add_epi16(_mm256_maddubs_epi16(lo, broadcast4(a[r] + depth + 4 * c)),
                                              _mm256_maddubs_epi16(hi, broadcast4(a[r] + depth + 16 + 4 * c)));
        s16[r] = c == 0 ? pair : _mm256_add_epi16(s16[r], pair);
      }
    }
    for (int r = 0; r < R; ++r) s[r] += (i32x8)_mm256_madd_epi16(s16[r], _mm256_set1_epi16(1));
  }
};
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
struct PanelVnni {  // vpdpbusd: nibble (or int8 w + 128) x int8, 4 products summed straight into int32
  static constexpr int kS8Bias = 128;
  template <int R>
  static void block_s8(const uint8_t* w, const int8_t* const* a, int64_t depth, i32x8* s, i32x8* t) {
    for (int c = 0; c < 8; ++c) {
      const __m256i v = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * c)),
                                         _mm256_set1_epi8(-128));
      i32x8* into = c % 2 == 0 ? s : t;  // even chunks into s, odd ones into t
      for (int r = 0; r < R; ++r)
        into[r] = (i32x8)_mm256_dpbusd_epi32((__m256i)into[r], v, broadcast4(a[r] + depth + 4 * c));
    }
  }
  template <int R>
  static void block(const uint8_t* w, const int8_t* const* a, int64_t depth, i32x8* s, i32x8* t) {
    const __m256i low = _mm256_set1_epi8(15);
    for (int c = 0; c < 4; ++c) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * c));
      const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
      for (int r = 0; r < R; ++r) {  // low nibbles into s, high ones into t
        s[r] = (i32x8)_mm256_dpbusd_epi32((__m256i)s[r], lo, broadcast4(a[r] + depth + 4 * c));
        t[r] = (i32x8)_mm256_dpbusd_epi32((__m256i)t[r], hi, broadcast4(a[r] + depth + 16 + 4 * c));
      }
    }
  }
};
#endif

// c[r * 8 + i] (r < R) = panel row i (the panel's first flat row `first`) times activation row r. Per
// group: the int32 sums less zero * group sum, then acc += float(sum) * scale, lane by lane; at the end
// times the token's scale. Each row's sum runs over the groups in order, whatever the tier.
template <class Panel, bool Int4, int R>
void panel_dot_rows(const QuantView& w, int64_t first, const int8_t* aq, int64_t lda, const int32_t* sums,
                    const float* a_scales, float* c) {
  constexpr int64_t kBlockBytes = kPanelRows * (Int4 ? kQuantBlock / 2 : kQuantBlock);
  const uint8_t* values = w.values + first * w.row_bytes;
  const int64_t scales = first * w.groups;
  const uint8_t* zeros = w.zeros ? w.zeros + first * w.groups : nullptr;
  const int64_t blocks = w.group / kQuantBlock;
  const int8_t* a[R];
  for (int r = 0; r < R; ++r) a[r] = aq + r * lda;
  f32x8 acc[R] = {};
  // The lanes' zero points: per group where the weight has them (one 8-byte load, widened), else one
  // constant (built once: per group, a lane-by-lane loop cost as much as a g32 group's products).
  const i32x8 constant_zero = (i32x8){} + (Int4 ? kInt4SymmetricZero : Panel::kS8Bias);
  for (int64_t g = 0; g < w.groups; ++g) {
    i32x8 s[R] = {}, t[R] = {};
    for (int64_t b = g * blocks; b < (g + 1) * blocks; ++b) {
      prefetch_panel_block(values + b * kBlockBytes, kBlockBytes);
      if (Int4)
        Panel::template block<R>(values + b * kBlockBytes, a, b * kQuantBlock, s, t);
      else
        Panel::template block_s8<R>(values + b * kBlockBytes, a, b * kQuantBlock, s, t);
    }
    i32x8 zero = constant_zero;
    if (Int4 && zeros) {
      u8x8 z;
      memcpy(&z, zeros + g * kPanelRows, sizeof z);
      zero = __builtin_convertvector(z, i32x8);
    }
    const f32x8 scale = panel_scales_at(w, scales + g * kPanelRows);
    for (int r = 0; r < R; ++r) {
      s[r] += t[r] - zero * sums[r * w.groups + g];
      acc[r] += __builtin_convertvector(s[r], f32x8) * scale;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 8; ++i) c[r * kPanelRows + i] = acc[r][i] * a_scales[r];
}

constexpr int kPanelActRows = 4;  // activation rows per pass over a panel

// c [rows][8] for the `rows` activation rows starting at a_row, times the panel at flat row `first`.
template <class Panel>
void int_panel(const QuantGemmProblem& p, int64_t first, int64_t a_row, int64_t rows, float* c) {
  const QuantView& w = *p.w;
  for (int64_t m = 0; m < rows; m += kPanelActRows) {
    const int64_t at = a_row + m;
    const int8_t* aq = p.a_q + at * w.row_depth;
    const int32_t* sums = p.a_sums + at * w.groups;
    float* cm = c + m * kPanelRows;
    switch (min_i64(kPanelActRows, rows - m) * 2 + (w.scheme == QuantScheme::int4 ? 1 : 0)) {
#define MOE_EXT_PANEL_CASE(R)                                                                                \
  case 2 * R: panel_dot_rows<Panel, false, R>(w, first, aq, w.row_depth, sums, p.a_scales + at, cm); break; \
  case 2 * R + 1: panel_dot_rows<Panel, true, R>(w, first, aq, w.row_depth, sums, p.a_scales + at, cm); break;
      MOE_EXT_PANEL_CASE(1) MOE_EXT_PANEL_CASE(2) MOE_EXT_PANEL_CASE(3) MOE_EXT_PANEL_CASE(4)
#undef MOE_EXT_PANEL_CASE
      default: break;
    }
  }
}

constexpr int kQuantRows = 8;  // activation rows per pass over a weight row (int32 sums in registers)

// c[r * ldc] for the `rows` activation rows starting at a_row: weight row `row` times each.
template <class Dot>
void int_column(const QuantGemmProblem& p, int64_t row, int64_t a_row, int64_t rows, float* c, int64_t ldc) {
  const QuantView& w = *p.w;
  for (int64_t m = 0; m < rows; m += kQuantRows) {
    const int64_t at = a_row + m;
    const int8_t* aq = p.a_q + at * w.row_depth;
    const int32_t* sums = p.a_sums + at * w.groups;
    const float* a_scales = p.a_scales + at;
    float* cm = c + m * ldc;
    const int n = static_cast<int>(min_i64(kQuantRows, rows - m));
    switch (n * 2 + (w.scheme == QuantScheme::int4 ? 1 : 0)) {
#define MOE_EXT_INT_CASE(R)                                                                               \
  case 2 * R: int_dot_rows<Dot, false, R>(w, row, aq, w.row_depth, sums, a_scales, cm, ldc); break; \
  case 2 * R + 1: int_dot_rows<Dot, true, R>(w, row, aq, w.row_depth, sums, a_scales, cm, ldc); break;
      MOE_EXT_INT_CASE(1) MOE_EXT_INT_CASE(2) MOE_EXT_INT_CASE(3) MOE_EXT_INT_CASE(4)
      MOE_EXT_INT_CASE(5) MOE_EXT_INT_CASE(6) MOE_EXT_INT_CASE(7) MOE_EXT_INT_CASE(8)
#undef MOE_EXT_INT_CASE
      default: break;
    }
  }
}

}  // namespace

// The VNNI instantiations (csrc/cpu/quant_gemm_vnni.cpp, avx512 tier only).
void int_column_vnni(const QuantGemmProblem& p, int64_t row, int64_t a_row, int64_t rows, float* c, int64_t ldc);
void int_panel_vnni(const QuantGemmProblem& p, int64_t first, int64_t a_row, int64_t rows, float* c);

// Prefill (quant_gemm_vnni.cpp): out [rows][...] = the `rows` quantised activation rows from a_row times
// weight rows firsts[s] .. firsts[s] + seg_rows - 1 of each of `segments` segments, into
// local[r * ldl + s * seg_stride + j] (scaled, before bias and activation), as panel_dot_rows computes
// each. Scratch: `words` holds kCodeDepth / 4 x kCodeCols words, `sums` rows x kCodeCols int32.
constexpr int64_t kCodeDepth = 256, kCodeCols = 32;
void int_tile_vnni(const QuantGemmProblem& p, int64_t a_row, int64_t rows, const int64_t* firsts, int segments,
                   int64_t seg_rows, float* local, int64_t ldl, int64_t seg_stride, uint32_t* words, int32_t* sums);

}  // namespace moe_ext::cpu::MOE_EXT_CPU_NS
