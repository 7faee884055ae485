// Helpers for the kernels in csrc/cpu/. Every helper is `static` (internal linkage): the same source is
// compiled once per tier with different flags, and a shared inline symbol could let the linker keep an
// AVX-512 copy for the scalar tier. For the same reason the kernels avoid std:: templates.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef _OPENMP
#define MOE_EXT_PRAGMA(x) _Pragma(#x)
#define MOE_EXT_PARALLEL_FOR(threads) MOE_EXT_PRAGMA(omp parallel for schedule(static) num_threads(threads))
#else
#define MOE_EXT_PARALLEL_FOR(threads)
#endif

static inline int thread_index() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Sixteen independent partial sums in a fixed order: the compiler can keep them in vector registers
// without reassociating (no -ffast-math), and the result is the same whatever the thread count.
static inline float dot(const float* a, const float* b, int64_t n) {
  float acc[16] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int lane = 0; lane < 16; ++lane) acc[lane] += a[i + lane] * b[i + lane];
  for (int lane = 0; i + lane < n; ++lane) acc[lane] += a[i + lane] * b[i + lane];
  for (int width = 8; width > 0; width /= 2)
    for (int lane = 0; lane < width; ++lane) acc[lane] += acc[lane + width];
  return acc[0];
}

static inline int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
