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
#include <cstring>
#include <vector>

namespace {

volatile float g_sink;

// One thread's share [begin, end) summed into 4 accumulators of Width bits; Prefetch asks for every
// line 2 KiB ahead, as the decode kernels used to.
template <int Width, bool Prefetch>
__attribute__((target("avx512f"))) float sum_range(const float* p, size_t n) {
  constexpr size_t lanes = Width / 32, step = 4 * lanes;
  if constexpr (Width == 512) {
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (size_t i = 0; i + step <= n; i += step) {
      if constexpr (Prefetch)
        for (size_t line = 0; line < step * 4; line += 64)
          _mm_prefetch(reinterpret_cast<const char*>(p + i) + 2048 + line, _MM_HINT_T0);
      s0 = _mm512_add_ps(s0, _mm512_loadu_ps(p + i));
      s1 = _mm512_add_ps(s1, _mm512_loadu_ps(p + i + lanes));
      s2 = _mm512_add_ps(s2, _mm512_loadu_ps(p + i + 2 * lanes));
      s3 = _mm512_add_ps(s3, _mm512_loadu_ps(p + i + 3 * lanes));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
  } else {
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (size_t i = 0; i + step <= n; i += step) {
      if constexpr (Prefetch)
        for (size_t line = 0; line < step * 4; line += 64)
          _mm_prefetch(reinterpret_cast<const char*>(p + i) + 2048 + line, _MM_HINT_T0);
      s0 = _mm256_add_ps(s0, _mm256_loadu_ps(p + i));
      s1 = _mm256_add_ps(s1, _mm256_loadu_ps(p + i + lanes));
      s2 = _mm256_add_ps(s2, _mm256_loadu_ps(p + i + 2 * lanes));
      s3 = _mm256_add_ps(s3, _mm256_loadu_ps(p + i + 3 * lanes));
    }
    float out[8];
    _mm256_storeu_ps(out, _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    return out[0] + out[1] + out[2] + out[3] + out[4] + out[5] + out[6] + out[7];
  }
}

// Seconds to read all n floats, each thread a contiguous share (as a decode step's column tiles).
template <int Width, bool Prefetch>
double read_seconds(const float* buf, size_t n) {
  const auto start = std::chrono::steady_clock::now();
  float total = 0.f;
#pragma omp parallel reduction(+ : total)
  {
    const size_t threads = omp_get_num_threads(), t = omp_get_thread_num();
    const size_t share = n / threads / 64 * 64;
    total += sum_range<Width, Prefetch>(buf + t * share, share);
  }
  g_sink = total;
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
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
  } variants[] = {{"512-bit loads", read_seconds<512, false>, {}},
                  {"256-bit loads", read_seconds<256, false>, {}},
                  {"512-bit + prefetch", read_seconds<512, true>, {}},
                  {"256-bit + prefetch", read_seconds<256, true>, {}}};
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
