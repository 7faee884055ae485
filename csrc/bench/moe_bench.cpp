// moe_bench: times each stage of the MoE forward through the C++ API, without Python, for profiling.
// Usage: moe_bench [T d f E k [repeats]]   (default: the SPEC §6 "small" shape, 10 repeats)
// Prints the median milliseconds of route, permute, GEMM1, activation, GEMM2 and unpermute.
#include <algorithm>
#include <cmath>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <vector>

#include "core/isa.h"
#include "core/kernels.h"
#include "core/ops.h"
#include "core/threads.h"

namespace {

using Clock = std::chrono::steady_clock;

double median_ms(int repeats, const std::function<void()>& stage) {
  stage();  // warm-up
  std::vector<double> ms;
  for (int r = 0; r < repeats; ++r) {
    const auto start = Clock::now();
    stage();
    ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - start).count());
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

std::vector<float> random_vector(size_t n, float scale, std::mt19937& gen) {
  std::normal_distribution<float> normal(0.f, scale);
  std::vector<float> v(n);
  for (float& value : v) value = normal(gen);
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  int64_t T = 512, d = 512, f = 1024, E = 8, k = 2;
  int repeats = 10;
  if (argc >= 6) {
    T = std::atoll(argv[1]), d = std::atoll(argv[2]), f = std::atoll(argv[3]), E = std::atoll(argv[4]),
    k = std::atoll(argv[5]);
  }
  if (argc >= 7) repeats = std::atoi(argv[6]);
  if (T < 1 || d < 1 || f < 1 || E < 1 || k < 1 || k > E || repeats < 1) {
    std::fprintf(stderr, "usage: moe_bench [T d f E k [repeats]] with sizes >= 1 and k <= E\n");
    return 2;
  }
  try {
    moe_ext::set_isa_from_env();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 2;
  }
  std::mt19937 gen(0);
  const auto x = random_vector(T * d, 1.f, gen), w_router = random_vector(E * d, 1.f, gen);
  const auto w13 = random_vector(E * 2 * f * d, 1.f / std::sqrt(float(d)), gen);
  const auto w2 = random_vector(E * d * f, 1.f / std::sqrt(float(f)), gen);
  std::vector<float> weights(T * k), x_perm(T * k * d), hidden(T * k * 2 * f), activated(T * k * f), y(T * d);
  std::vector<float> panels(moe_ext::num_threads() * moe_ext::kGemmScratchFloats);
  std::vector<int32_t> ids(T * k), offsets(E + 1), perm_rows(T * k);
  moe_ext::RouteConfig config;
  config.top_k = k;
  const moe_ext::Kernels& kern = moe_ext::kernels();
  int64_t M = 0;

  std::printf("moe_bench T=%lld d=%lld f=%lld E=%lld k=%lld isa=%s threads=%d repeats=%d (median ms)\n",
              (long long)T, (long long)d, (long long)f, (long long)E, (long long)k,
              moe_ext::isa_name(moe_ext::current_isa()), moe_ext::num_threads(), repeats);
  const double route_ms = median_ms(repeats, [&] {
    moe_ext::route(x.data(), w_router.data(), T, d, E, config, weights.data(), ids.data(), nullptr);
  });
  const double permute_ms = median_ms(repeats, [&] {
    M = moe_ext::permute_plan(ids.data(), T, k, E, moe_ext::kNoCapacity, offsets.data(), perm_rows.data());
    moe_ext::permute_gather(x.data(), perm_rows.data(), T, k, d, x_perm.data());
  });
  const double gemm1_ms = median_ms(repeats, [&] {
    kern.grouped_gemm(x_perm.data(), w13.data(), offsets.data(), E, 2 * f, d, moe_ext::num_threads(), hidden.data(), panels.data());
  });
  const double act_ms = median_ms(repeats, [&] {
    kern.activate(hidden.data(), M, f, moe_ext::Activation::swiglu, activated.data());
  });
  const double gemm2_ms = median_ms(repeats, [&] {
    kern.grouped_gemm(activated.data(), w2.data(), offsets.data(), E, d, f, moe_ext::num_threads(), x_perm.data(), panels.data());
  });
  const double unpermute_ms = median_ms(repeats, [&] {
    kern.unpermute(x_perm.data(), perm_rows.data(), weights.data(), T, k, d, y.data());
  });
  const double total = route_ms + permute_ms + gemm1_ms + act_ms + gemm2_ms + unpermute_ms;
  const double gflop = (2.0 * T * k * d * f * 3 + 2.0 * T * d * E) / 1e9;
  std::printf("%-12s %10s %7s\n", "stage", "ms", "share");
  const std::pair<const char*, double> rows[] = {{"route", route_ms},   {"permute", permute_ms},
                                                 {"gemm1", gemm1_ms},   {"activation", act_ms},
                                                 {"gemm2", gemm2_ms},   {"unpermute", unpermute_ms}};
  for (const auto& [name, ms] : rows) std::printf("%-12s %10.3f %6.1f%%\n", name, ms, 100.0 * ms / total);
  std::printf("%-12s %10.3f  %.2f GFLOP/s, %.1f tokens/s\n", "total", total, gflop / (total / 1e3),
              T / (total / 1e3));
  return 0;
}
