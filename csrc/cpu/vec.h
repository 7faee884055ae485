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
