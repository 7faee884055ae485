// dot_peak: the arithmetic ceiling of this machine's cores for the instructions the GEMMs are built on:
// 16-lane vpdpbusd (int8 x uint8, 4 products a lane: the W8A8 / W4A8 kernels), vdpbf16ps (bfloat16, 2 a
// lane: packed bf16 and the weight-only codes) and vfmadd231ps (float32), each on 16 independent
// accumulators so that latency never bounds it, on every thread at once. The instructions run in
// interleaved rounds (a busy neighbour slows them alike); it prints each one's median rate in operations
// per second (a multiply-add is 2), the figure docs/api.md §9.2 gives the kernels' GOP/s a fraction of.
//
//   dot_peak [rounds = 9]      (threads: OMP_NUM_THREADS)
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "median.h"

namespace {

constexpr long kSteps = 1 << 22;  // per thread per round: 16 instructions a step
volatile int g_sink;

// A checksum of the accumulators (so the loops are not optimised away), through memory.
template <typename V>
int lane_sum(const V* acc) {
  int lanes[16];
  int s = 0;
  for (int i = 0; i < 16; ++i) {
    std::memcpy(lanes, &acc[i], sizeof lanes);
    for (int l = 0; l < 16; ++l) s += lanes[l];
  }
  return s;
}

// Each loop: 16 chains of kSteps dependent instructions; the asm keeps the operands opaque (not folded).
__attribute__((target("avx512f,avx512vnni"))) int run_dpbusd() {
  __m512i acc[16], a = _mm512_set1_epi32(0x01010101), b = _mm512_set1_epi32(0x01020102);
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_set1_epi32(i);
  for (long k = 0; k < kSteps; ++k) {
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], a, b);
    __asm__ volatile("" : "+v"(a));
  }
  return lane_sum(acc);
}

__attribute__((target("avx512f,avx512bf16"))) int run_dpbf16() {
  __m512 acc[16];
  __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80), b = a;
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_set1_ps(static_cast<float>(i));
  for (long k = 0; k < kSteps; ++k) {
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
    __asm__ volatile("" : "+v"(a));
  }
  return lane_sum(acc);
}

__attribute__((target("avx512f"))) int run_fma() {
  __m512 acc[16], a = _mm512_set1_ps(1e-9f), b = a;
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_set1_ps(static_cast<float>(i));
  for (long k = 0; k < kSteps; ++k) {
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
    __asm__ volatile("" : "+v"(a));
  }
  return lane_sum(acc);
}

struct Instruction {
  const char* name;
  int (*run)();
  double ops;  // operations per instruction: 16 lanes x multiply-adds a lane x 2
  bool supported;
  std::vector<double> seconds;
};

}  // namespace

int main(int argc, char** argv) {
  if (!__builtin_cpu_supports("avx512f")) {
    std::printf("dot_peak: this CPU has no AVX-512; nothing to measure\n");
    return 0;
  }
  const int rounds = argc > 1 ? std::atoi(argv[1]) : 9;
  std::vector<Instruction> all = {
      {"vpdpbusd zmm", run_dpbusd, 16 * 4 * 2, __builtin_cpu_supports("avx512vnni") != 0, {}},
      {"vdpbf16ps zmm", run_dpbf16, 16 * 2 * 2, __builtin_cpu_supports("avx512bf16") != 0, {}},
      {"vfmadd231ps zmm", run_fma, 16 * 2, true, {}},
  };
  for (int r = 0; r < rounds; ++r)
    for (Instruction& in : all) {
      if (!in.supported) continue;
      const auto t0 = std::chrono::steady_clock::now();
      int sink = 0;
#pragma omp parallel reduction(+ : sink)
      sink += in.run();
      g_sink = sink;
      in.seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
  const int threads = omp_get_max_threads();
  std::printf("dot_peak: %d threads, %d interleaved rounds, 16 independent chains a thread\n", threads, rounds);
  for (const Instruction& in : all) {
    if (!in.supported) {
      std::printf("  %-16s not on this CPU\n", in.name);
      continue;
    }
    const double ops = in.ops * 16.0 * kSteps * threads;
    const double seconds = median(in.seconds);
    std::printf("  %-16s median %7.1f GOP/s (%.2f G instructions/s a thread)\n", in.name, ops / seconds / 1e9,
                16.0 * kSteps / seconds / 1e9);
  }
  return 0;
}
