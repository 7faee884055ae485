// A tiny SIMD mapping (PyTorch's Vectorized<T> idea): `vec` is one register of this tier's width, written
// with GCC/Clang vector extensions, so one kernel source serves SSE2 (the scalar tier's baseline), AVX2
// and AVX-512. Included only by csrc/cpu/ sources, which are compiled once per tier.
#pragma once
#include <stdint.h>

#if defined(__AVX512F__)
#define MOE_EXT_LANES 16
#elif defined(__AVX2__)
#define MOE_EXT_LANES 8
#else
#define MOE_EXT_LANES 4
#endif

constexpr int kLanes = MOE_EXT_LANES;
// aligned(4): loads and stores through vec_u may be unaligned (rows of caller arrays).
typedef float vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef float vec_u __attribute__((vector_size(kLanes * sizeof(float)), aligned(4)));

static inline vec load(const float* p) { return *reinterpret_cast<const vec_u*>(p); }
static inline void store(float* p, vec v) { *reinterpret_cast<vec_u*>(p) = v; }
// x - (+0) is x for every x (unlike x + 0 for -0), so the compiler folds it into a plain broadcast.
static inline vec broadcast(float x) { return x - vec{}; }

// The sum of v's lanes in a fixed tree (halves added pairwise), so every caller sums alike.
static inline float lane_sum(vec v) {
  float lanes[kLanes];
  store(lanes, v);
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int lane = 0; lane < width; ++lane) lanes[lane] += lanes[lane + width];
  return lanes[0];
}

typedef int32_t ivec __attribute__((vector_size(kLanes * sizeof(int32_t))));

// e^x to about 1 ulp (Cephes' expf: x = n ln2 + r with |r| <= ln2/2, a degree-6 polynomial in r, and
// 2^n built in the exponent bits). Overflow gives +inf, underflow 0, NaN stays NaN: the same edge
// results as expf, which the reference's float64 exp agrees with after rounding.
static inline vec vexp(vec x) {
  const vec hi = broadcast(88.3762626647949f), lo = broadcast(-87.3365447504f);
  const vec clamped = x > hi ? hi : (x < lo ? lo : x);  // NaN passes through both comparisons
  vec t = clamped * 1.44269504088896341f;
  t = t == t ? t : broadcast(0.f);  // keep NaN out of the float-to-int conversion
  const ivec n = __builtin_convertvector(t + (t >= 0.f ? broadcast(0.5f) : broadcast(-0.5f)), ivec);
  const vec nf = __builtin_convertvector(n, vec);
  const vec r = clamped - nf * 0.693359375f - nf * -2.12194440e-4f;
  vec p = broadcast(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  const vec scale = (vec)((n + 127) << 23);
  const vec result = p * scale;
  return x > hi ? broadcast(__builtin_inff()) : (x < broadcast(-103.972084f) ? broadcast(0.f) : result);
}
