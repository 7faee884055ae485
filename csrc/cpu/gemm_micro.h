// The grouped GEMM's register-blocked microkernels (GotoBLAS/BLIS style): Rows rows of a (float32,
// row stride lda) times one slice of kMicroCols columns of a packed weight panel (core/packed.h; panel
// rows are kPanelCols wide), for `depth` depth steps, into c (row stride ldc), stored or added.
// Rows * 2 accumulators + 2 weight registers + 1 broadcast fit the register file: 8 rows with AVX-512's
// 32 registers, 6 with 16. Each output element is summed over p in order (per depth block), so results
// depend on the data and the blocking constants only, never on threads or schedule.
#pragma once
#include "core/packed.h"
#include "cpu/convert.h"
#include "cpu/vec.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

constexpr int64_t kMicroCols = 2 * kLanes;
constexpr int kMicroRows = kLanes == 16 ? 8 : 6;
static_assert(moe_ext::kPanelCols % kMicroCols == 0, "a panel holds whole microkernel slices");

// Zeroes a tile's accumulators in registers. Not `vec acc[Rows][2] = {}`: GCC then zeroed a stack copy of
// the tile (rep stos) and spilled through it before the store.
template <int Rows>
static inline __attribute__((always_inline)) void zero_acc(vec (&acc)[Rows][2]) {
  for (int r = 0; r < Rows; ++r) acc[r][0] = acc[r][1] = vec{};
}

template <int Rows>
static inline __attribute__((always_inline)) void store_tile(vec (&acc)[Rows][2], float* c, int64_t ldc,
                                                              bool accumulate) {
  for (int r = 0; r < Rows; ++r) {
    float* dst = c + r * ldc;
    store(dst, accumulate ? load(dst) + acc[r][0] : acc[r][0]);
    store(dst + kLanes, accumulate ? load(dst + kLanes) + acc[r][1] : acc[r][1]);
  }
}

// Prefetch (decode of 16-bit panels, walking a panel): with 3 or more rows the kernel computes long enough
// per weight line that the hardware prefetchers fall behind the stream; each depth step's line of this
// slice is asked for kPrefetchBytes ahead (one prefetch per line read). With 1 or 2 rows the same
// prefetch slowed bfloat16 decode.
constexpr int64_t kPrefetchBytes = 8 * 1024;

// float32 or float16 weights with rows ldb elements apart: element (p, c) at p * ldb + c; b points at the
// slice's column 0.
template <int Rows, typename P, bool Prefetch = false>
static inline __attribute__((always_inline)) void micro_kernel_rows(const float* a, int64_t lda, const P* b,
                                                                   int64_t ldb, int64_t depth, float* c,
                                                                   int64_t ldc, bool accumulate) {
  vec acc[Rows][2];
  zero_acc(acc);
  for (int64_t p = 0; p < depth; ++p) {
    if constexpr (Prefetch) __builtin_prefetch(reinterpret_cast<const char*>(b + p * ldb) + kPrefetchBytes, 0, 3);
    const vec b0 = load_f32(b + p * ldb), b1 = load_f32(b + p * ldb + kLanes);
    for (int r = 0; r < Rows; ++r) {
      const vec ar = broadcast(a[r * lda + p]);
      acc[r][0] += ar * b0;
      acc[r][1] += ar * b1;
    }
  }
  store_tile<Rows>(acc, c, ldc, accumulate);
}

// float32 or float16 panels (ldb = kPanelCols, a constant the compiler folds in).
template <int Rows, typename P, bool Prefetch = false>
static void micro_kernel(const float* a, int64_t lda, const P* b, int64_t depth, float* c, int64_t ldc,
                         bool accumulate) {
  micro_kernel_rows<Rows, P, Prefetch>(a, lda, b, moe_ext::kPanelCols, depth, c, ldc, accumulate);
}

// The same on any row stride: a transposed weight w_t [K, N] read in place (ldb = N).
template <int Rows, typename P>
static void micro_kernel_strided(const float* a, int64_t lda, const P* b, int64_t ldb, int64_t depth, float* c,
                                 int64_t ldc, bool accumulate) {
  micro_kernel_rows<Rows>(a, lda, b, ldb, depth, c, ldc, accumulate);
}

// bfloat16 pair panels widened in registers: the 32-bit word of column c at pair q holds depth 2q in
// its low half and 2q+1 in its high half, so a shift and a mask give both as float32.
// Prefetch: as micro_kernel_rows's.

template <int Rows, bool Prefetch = false>
static void micro_kernel_bf16(const float* a, int64_t lda, const bf16_t* b, int64_t depth, float* c, int64_t ldc,
                              bool accumulate) {
  const uint32_t* words = reinterpret_cast<const uint32_t*>(b);
  // Odd depths go to their own accumulators (added to the even ones at the end) with 1 or 2 rows, where
  // otherwise each accumulator would wait on two chained FMAs per pair: decode's few rows would be
  // bound by FMA latency instead of the weight stream. More rows have enough independent chains (and
  // not the registers for this).
  constexpr bool kSplit = Rows <= 2;
  vec acc[Rows][2], acc_odd[kSplit ? Rows : 1][2];
  zero_acc(acc);
  zero_acc(acc_odd);
  const uvec high_half = (uvec){} + 0xffff0000u;
  int64_t q = 0;
  for (; 2 * q + 1 < depth; ++q) {
    if constexpr (Prefetch) __builtin_prefetch(words + q * moe_ext::kPanelCols + kPrefetchBytes / 4, 0, 3);
    const uvec w0 = *reinterpret_cast<const uvec_u*>(words + q * moe_ext::kPanelCols);
    const uvec w1 = *reinterpret_cast<const uvec_u*>(words + q * moe_ext::kPanelCols + kLanes);
    const vec even0 = (vec)(w0 << 16), even1 = (vec)(w1 << 16), odd0 = (vec)(w0 & high_half),
              odd1 = (vec)(w1 & high_half);
    for (int r = 0; r < Rows; ++r) {
      const vec a_even = broadcast(a[r * lda + 2 * q]), a_odd = broadcast(a[r * lda + 2 * q + 1]);
      acc[r][0] += a_even * even0;
      acc[r][1] += a_even * even1;
      vec (&odd)[2] = kSplit ? acc_odd[kSplit ? r : 0] : acc[r];
      odd[0] += a_odd * odd0;
      odd[1] += a_odd * odd1;
    }
  }
  if constexpr (kSplit)
    for (int r = 0; r < Rows; ++r) acc[r][0] += acc_odd[r][0], acc[r][1] += acc_odd[r][1];
  if (2 * q < depth) {  // odd depth: the last pair's high half is padding
    const uvec w0 = *reinterpret_cast<const uvec_u*>(words + q * moe_ext::kPanelCols);
    const uvec w1 = *reinterpret_cast<const uvec_u*>(words + q * moe_ext::kPanelCols + kLanes);
    for (int r = 0; r < Rows; ++r) {
      const vec a_even = broadcast(a[r * lda + 2 * q]);
      acc[r][0] += a_even * (vec)(w0 << 16);
      acc[r][1] += a_even * (vec)(w1 << 16);
    }
  }
  store_tile<Rows>(acc, c, ldc, accumulate);
}

#if defined(__AVX512F__)
// Few rows of float32 panels (decode), where streaming the weights is the whole cost: the same product as
// micro_kernel<Rows> with 256-bit loads, which read a stream a few percent faster than 512-bit ones on
// Zen 4 (the stream_loads binary, csrc/bench/, measures both). Every lane adds the same products in the
// same order as micro_kernel's, so the results are bit-identical. No software prefetch here or anywhere
// in the decode path: the hardware prefetchers follow a sequential panel, and asking for every line
// ahead made the same read slower (stream_loads again).
typedef float narrow_vec __attribute__((vector_size(32)));
typedef float narrow_vec_u __attribute__((vector_size(32), aligned(4)));
constexpr int kNarrowLanes = 8, kNarrowRows = 4;  // 4 rows x 4 accumulators: half the register file

template <int Rows>
static void micro_kernel_narrow(const float* a, int64_t lda, const float* b, int64_t depth, float* c, int64_t ldc,
                                bool accumulate) {
  constexpr int kParts = kMicroCols / kNarrowLanes;
  narrow_vec acc[Rows][kParts] = {};
  for (int64_t p = 0; p < depth; ++p) {
    narrow_vec w[kParts];
    for (int i = 0; i < kParts; ++i)
      w[i] = *reinterpret_cast<const narrow_vec_u*>(b + p * moe_ext::kPanelCols + i * kNarrowLanes);
    for (int r = 0; r < Rows; ++r) {
      const narrow_vec ar = a[r * lda + p] - narrow_vec{};
      for (int i = 0; i < kParts; ++i) acc[r][i] += ar * w[i];
    }
  }
  for (int r = 0; r < Rows; ++r)
    for (int i = 0; i < kParts; ++i) {
      narrow_vec_u* dst = reinterpret_cast<narrow_vec_u*>(c + r * ldc + i * kNarrowLanes);
      *dst = accumulate ? *dst + acc[r][i] : acc[r][i];
    }
}

// AVX512_BF16: vdpbf16ps adds a[2q] b[2q] + a[2q+1] b[2q+1] to each float32 lane, 32 products per
// instruction. `a_pairs` holds the rows rounded to bfloat16, two depths per 32-bit word (row stride
// lda_pairs words, pairs PairStride words apart: 1 for rows, kMicroRows for the weight gradient's blocks of
// grad_out columns); depth is whole pairs (padding is zero on both sides).
template <int Rows, int64_t PairStride = 1>
__attribute__((target("avx512bf16"))) static void micro_kernel_dpbf16(const uint32_t* a_pairs, int64_t lda_pairs,
                                                                     const bf16_t* b, int64_t pairs, float* c,
                                                                     int64_t ldc, bool accumulate) {
  const uint32_t* words = reinterpret_cast<const uint32_t*>(b);
  __m512 acc[Rows][2];
  for (int r = 0; r < Rows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t q = 0; q < pairs; ++q) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(words + q * moe_ext::kPanelCols);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(words + q * moe_ext::kPanelCols + 16);
#pragma GCC unroll 8  // at -O2 GCC kept the accumulators on the stack (a load and a store per vdpbf16ps)
    for (int r = 0; r < Rows; ++r) {
      const __m512bh ar = (__m512bh)_mm512_set1_epi32(static_cast<int>(a_pairs[r * lda_pairs + q * PairStride]));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], ar, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], ar, w1);
    }
  }
  vec out[Rows][2];
  for (int r = 0; r < Rows; ++r) out[r][0] = (vec)acc[r][0], out[r][1] = (vec)acc[r][1];
  store_tile<Rows>(out, c, ldc, accumulate);
}
#endif
