// Element conversions between float32 and the 16-bit dtypes (SPEC §4): bfloat16 is the high half of a
// float32 (widen by a shift, narrow with round-to-nearest-even); float16 goes through F16C on the SIMD
// tiers and a bit-exact software conversion on the scalar tier. Kernels compute in float32 registers.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cpu/vec.h"
#if defined(__F16C__)
#include <immintrin.h>
#endif

// Storage types: distinct so templates pick the right conversion.
struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

typedef uint32_t uvec __attribute__((vector_size(kLanes * sizeof(uint32_t))));
typedef uint16_t hvec_u __attribute__((vector_size(kLanes * sizeof(uint16_t)), aligned(2)));
typedef uint32_t uvec_u __attribute__((vector_size(kLanes * sizeof(uint32_t)), aligned(4)));

static inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float f32_from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static inline float to_f32(float x) { return x; }
static inline float to_f32(bf16_t x) { return f32_from_bits(static_cast<uint32_t>(x.bits) << 16); }
static inline float to_f32(f16_t x) {
#if defined(__F16C__)
  return _cvtsh_ss(x.bits);
#else
  const uint32_t sign = static_cast<uint32_t>(x.bits & 0x8000u) << 16, exponent = (x.bits >> 10) & 0x1fu,
                 mantissa = x.bits & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float32
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 31) return f32_from_bits(sign | 0x7f800000u | (mantissa << 13));
  return f32_from_bits(sign | ((exponent + 112) << 23) | (mantissa << 13));
#endif
}

// Round to nearest even; NaN stays a (quiet) NaN.
static inline uint16_t bf16_bits_from(float f) {
  const uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
static inline uint16_t f16_bits_from(float f) {
#if defined(__F16C__)
  return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
  uint32_t u = f32_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return sign | 0x7e00u;                   // NaN
  if (u >= 0x477ff000u) return sign | 0x7c00u;                  // rounds to infinity (>= 65520)
  if (u < 0x38800000u)                                          // below 2^-14: a subnormal half
    return sign | static_cast<uint16_t>(nearbyintf(f32_from_bits(u) * 16777216.f));
  u += 0xfffu + ((u >> 13) & 1u);                              // round the 13 dropped bits to even
  return sign | static_cast<uint16_t>((u - (112u << 23)) >> 13);
#endif
}
static inline void from_f32(float x, float* dst) { *dst = x; }
static inline void from_f32(float x, bf16_t* dst) { dst->bits = bf16_bits_from(x); }
static inline void from_f32(float x, f16_t* dst) { dst->bits = f16_bits_from(x); }

// kLanes elements widened to float32.
static inline vec load_f32(const float* p) { return load(p); }
static inline vec load_f32(const bf16_t* p) {
  const uvec wide = __builtin_convertvector(*reinterpret_cast<const hvec_u*>(p), uvec);
  return (vec)(wide << 16);
}
static inline vec load_f32(const f16_t* p) {
#if defined(__AVX512F__)
  // The builtin with a zero pass-through: GCC 12's _mm512_cvtph_ps warns about its undefined one.
  return (vec)__builtin_ia32_vcvtph2ps512_mask((__v16hi)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
                                               (__v16sf)_mm512_setzero_ps(), (__mmask16)-1, _MM_FROUND_CUR_DIRECTION);
#elif defined(__F16C__) && defined(__AVX2__)
  return (vec)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  float lanes[kLanes];
  for (int i = 0; i < kLanes; ++i) lanes[i] = to_f32(p[i]);
  return load(lanes);
#endif
}

static inline void store_from_f32(float* p, vec v) { store(p, v); }
static inline void store_from_f32(bf16_t* p, vec v) {
  const uvec u = (uvec)v;
  const uvec rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uvec quiet = (u >> 16) | 0x40u;
  const uvec bits = (u & 0x7fffffffu) > 0x7f800000u ? quiet : rounded;
  *reinterpret_cast<hvec_u*>(p) = __builtin_convertvector(bits, hvec_u);
}
static inline void store_from_f32(f16_t* p, vec v) {
#if defined(__AVX512F__)
  const __m256i bits = (__m256i)__builtin_ia32_vcvtps2ph512_mask((__v16sf)v, _MM_FROUND_TO_NEAREST_INT,
                                                                 (__v16hi)_mm256_setzero_si256(), (__mmask16)-1);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bits);
#elif defined(__F16C__) && defined(__AVX2__)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT));
#else
  float lanes[kLanes];
  store(lanes, v);
  for (int i = 0; i < kLanes; ++i) from_f32(lanes[i], p + i);
#endif
}

// n elements of any storage type to/from float32.
template <typename Src>
static inline void widen_row(const Src* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store(dst + i, load_f32(src + i));
  for (; i < n; ++i) dst[i] = to_f32(src[i]);
}
template <typename Dst>
static inline void narrow_row(const float* src, int64_t n, Dst* dst) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store_from_f32(dst + i, load(src + i));
  for (; i < n; ++i) from_f32(src[i], dst + i);
}
