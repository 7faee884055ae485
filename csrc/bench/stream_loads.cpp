// stream_loads: how fast this machine's cores read a large buffer with 256-bit loads, 512-bit loads, and
// either one with a software prefetch of every line 2 KiB ahead: the decode microkernels' design choice
// (cpu/gemm_micro.h: 256-bit loads for few rows of float32 panels, no software prefetch) in isolation.
// The variants run interleaved, round after round, so a busy neighbour slows them alike; it prints
// each one's median GB/s and its median per-round ratio to the 512-bit read.
//
//   stream_loads [MiB = 1024] [rounds = 15]      (threads: OMP_NUM_THREADS)
#include <immintrin.h>
#include <omp.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "median.h"

namespace {

volatile float g_sink;

// 256 and 512 bits of float32 (GCC vector extensions, unaligned: aligned(4)).
typedef float v256 __attribute__((vector_size(32), aligned(4)));
typedef float v512 __attribute__((vector_size(64), aligned(4)));

// n floats from p summed into 4 accumulators of type V; Prefetch asks for every line 2 KiB ahead, as the
// decode kernels used to.
template <typename V, bool Prefetch>
__attribute__((target("avx512f"))) float sum_range(const float* p, size_t n) {
  constexpr size_t lanes = sizeof(V) / sizeof(float), step = 4 * lanes;
  V s[4] = {};
  for (size_t i = 0; i + step <= n; i += step) {
    if constexpr (Prefetch)
      for (size_t line = 0; line < step * sizeof(float); line += 64)
        _mm_prefetch(reinterpret_cast<const char*>(p + i) + 2048 + line, _MM_HINT_T0);
    for (int j = 0; j < 4; ++j) s[j] += *reinterpret_cast<const V*>(p + i + j * lanes);
  }
  const V all = (s[0] + s[1]) + (s[2] + s[3]);
  float total = 0.f;
  for (size_t l = 0; l < lanes; ++l) total += all[l];
  return total;
}

// Seconds to read all n floats, each thread a contiguous share (as a decode step's column tiles).
template <typename V, bool Prefetch>
double read_seconds(const float* buf, size_t n) {
  const auto start = std::chrono::steady_clock::now();
  float total = 0.f;
#pragma omp parallel reduction(+ : total)
  {
    const size_t threads = omp_get_num_threads(), t = omp_get_thread_num();
    const size_t share = n / threads / 64 * 64;
    total += sum_range<V, Prefetch>(buf + t * share, share);
  }
  g_sink = total;
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

int main(int argc, char** argv) {
  if (!__builtin_cpu_supports("avx512f")) {
    std::printf("stream_loads: this CPU has no AVX-512; nothing to compare\n");
    return 0;
  }
  const size_t mib = argc > 1 ? std::strtoul(argv[1], nullptr, 10) : 1024;
  const int rounds = argc > 2 ? std::atoi(argv[2]) : 15;
  const size_t bytes = mib << 20, n = bytes / sizeof(float);
  // 2 MiB-aligned and advised for huge pages, as PackedWeight allocates large weights (core/packed.cpp).
  float* buf = static_cast<float*>(std::aligned_alloc(size_t{2} << 20, (bytes + (2 << 20) - 1) / (2 << 20) * (2 << 20)));
  if (!buf) return std::printf("stream_loads: cannot allocate %zu MiB\n", mib), 1;
  madvise(buf, bytes, MADV_HUGEPAGE);
#pragma omp parallel for
  for (size_t i = 0; i < n; ++i) buf[i] = 1.f;

  struct Variant {
    const char* name;
    double (*fn)(const float*, size_t);
    std::vector<double> seconds;
  } variants[] = {{"512-bit loads", read_seconds<v512, false>, {}},
                  {"256-bit loads", read_seconds<v256, false>, {}},
                  {"512-bit + prefetch", read_seconds<v512, true>, {}},
                  {"256-bit + prefetch", read_seconds<v256, true>, {}}};
  for (auto& v : variants) v.fn(buf, n);  // warm-up: page faults, huge page promotion
  for (int r = 0; r < rounds; ++r)
    for (auto& v : variants) v.seconds.push_back(v.fn(buf, n));

  std::printf("stream_loads: %zu MiB read by %d threads, %d interleaved rounds\n", mib, omp_get_max_threads(),
              rounds);
  for (auto& v : variants) {
    std::vector<double> ratio;
    for (int r = 0; r < rounds; ++r) ratio.push_back(variants[0].seconds[r] / v.seconds[r]);
    std::printf("  %-20s median %6.1f GB/s   speed vs 512-bit loads (median per round) %.3f\n", v.name,
                bytes / median(v.seconds) / 1e9, median(ratio));
  }
  std::free(buf);
  return 0;
}
