// moe_bench: times each stage of the MoE forward through the C++ API, without Python, for profiling.
// Usage: moe_bench [T d f E k [threads [repeats [dtype [weights]]]]]
//   (default: the SPEC §6 "small" shape; dtype f32|bf16|f16 for x and weights; weights packed|plain)
// Prints the median milliseconds of route, permute, GEMM1 (with the activation fused), GEMM2 and
// unpermute, and the whole experts() call.
#include <algorithm>
#include <cmath>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "core/isa.h"
#include "core/kernels.h"
#include "core/ops.h"
#include "core/packed.h"
#include "core/threads.h"
#include "median.h"

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
  return median(ms);
}

std::vector<float> random_vector(size_t n, float scale, std::mt19937& gen) {
  std::normal_distribution<float> normal(0.f, scale);
  std::vector<float> v(n);
  for (float& value : v) value = normal(gen);
  return v;
}

}  // namespace

// float32 values stored as `dtype` (round to nearest even), in a byte buffer.
std::vector<char> as_dtype(const std::vector<float>& v, moe_ext::DType dtype) {
  std::vector<char> out(v.size() * moe_ext::dtype_size(dtype));
  moe_ext::kernels().narrow(v.data(), static_cast<int64_t>(v.size()), dtype, 1, out.data());
  if (dtype == moe_ext::DType::f32) std::copy(v.begin(), v.end(), reinterpret_cast<float*>(out.data()));
  return out;
}

int main(int argc, char** argv) {
  int64_t T = 512, d = 512, f = 1024, E = 8, k = 2;
  int repeats = 10, threads = moe_ext::num_threads();
  std::string dtype_name = "f32", weights_kind = "packed";
  if (argc >= 6) {
    T = std::atoll(argv[1]), d = std::atoll(argv[2]), f = std::atoll(argv[3]), E = std::atoll(argv[4]),
    k = std::atoll(argv[5]);
  }
  if (argc >= 7) threads = std::atoi(argv[6]);
  if (argc >= 8) repeats = std::atoi(argv[7]);
  if (argc >= 9) dtype_name = argv[8];
  if (argc >= 10) weights_kind = argv[9];
  const bool dtype_ok = dtype_name == "f32" || dtype_name == "bf16" || dtype_name == "f16";
  if (T < 1 || d < 1 || f < 1 || E < 1 || k < 1 || k > E || repeats < 1 || threads < 1 || !dtype_ok ||
      (weights_kind != "packed" && weights_kind != "plain")) {
    std::fprintf(stderr, "usage: moe_bench [T d f E k [threads [repeats [f32|bf16|f16 [packed|plain]]]]] "
                         "with sizes >= 1 and k <= E\n");
    return 2;
  }
  const moe_ext::DType dtype = dtype_name == "f32" ? moe_ext::DType::f32
                               : dtype_name == "bf16" ? moe_ext::DType::bf16 : moe_ext::DType::f16;
  try {
    moe_ext::set_isa_from_env();
    moe_ext::set_num_threads(threads);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 2;
  }
  std::mt19937 gen(0);
  const auto x32 = random_vector(T * d, 1.f, gen), w_router = random_vector(E * d, 1.f, gen);
  const auto w13_32 = random_vector(E * 2 * f * d, 1.f / std::sqrt(float(d)), gen);
  const auto w2_32 = random_vector(E * d * f, 1.f / std::sqrt(float(f)), gen);
  const auto x = as_dtype(x32, dtype), w13 = as_dtype(w13_32, dtype), w2 = as_dtype(w2_32, dtype);
  moe_ext::WeightView w13_view, w2_view;
  w13_view.data = w13.data(), w13_view.dtype = dtype, w13_view.E = E, w13_view.N = 2 * f, w13_view.K = d;
  w2_view.data = w2.data(), w2_view.dtype = dtype, w2_view.E = E, w2_view.N = d, w2_view.K = f;
  const moe_ext::PackedWeight w13_packed(w13_view), w2_packed(w2_view);
  if (weights_kind == "packed") w13_view = w13_packed.view(), w2_view = w2_packed.view();
  std::vector<float> weights(T * k), x_perm(T * k * d), activated(T * k * f), y32(T * d);
  std::vector<char> y(T * d * moe_ext::dtype_size(dtype));
  std::vector<char> scratch(threads * moe_ext::kGemmScratchBytes);
  std::vector<int32_t> ids(T * k), offsets(E + 1), perm_rows(T * k);
  moe_ext::RouteConfig config;
  config.top_k = k;
  const moe_ext::Kernels& kern = moe_ext::kernels();
  const bool bf16_dot = dtype == moe_ext::DType::bf16 && moe_ext::current_isa() == moe_ext::Isa::avx512 &&
                        moe_ext::bf16_dot_enabled();
  std::vector<uint16_t> a_bf16(T * k * (std::max(d, f) + 1));
  auto gemm = [&](const float* a, const moe_ext::WeightView& w, bool fuse, float* out) {
    moe_ext::GemmProblem problem;
    problem.a = a, problem.w = w, problem.offsets = offsets.data(), problem.out = out;
    problem.fuse_activation = fuse, problem.activation = moe_ext::Activation::swiglu(), problem.bf16_dot = bf16_dot;
    if (bf16_dot) {  // as core/ops.cpp: the rows rounded to bfloat16 once, padded to even depth
      const int64_t stride = (w.K + 1) / 2 * 2;
      for (int64_t m = 0; m < offsets[E]; ++m) {
        kern.narrow(a + m * w.K, w.K, dtype, 1, a_bf16.data() + m * stride);
        if (stride != w.K) a_bf16[m * stride + w.K] = 0;
      }
      problem.a_bf16 = a_bf16.data();
    }
    kern.grouped_gemm(problem, threads, scratch.data());
  };

  std::printf("moe_bench T=%lld d=%lld f=%lld E=%lld k=%lld isa=%s threads=%d repeats=%d dtype=%s weights=%s%s "
              "(median ms)\n", (long long)T, (long long)d, (long long)f, (long long)E, (long long)k,
              moe_ext::isa_name(moe_ext::current_isa()), threads, repeats, dtype_name.c_str(),
              weights_kind.c_str(), bf16_dot ? " (vdpbf16ps)" : "");
  const double route_ms = median_ms(repeats, [&] {
    moe_ext::route(x.data(), dtype, w_router.data(), moe_ext::DType::f32, T, d, E, config, weights.data(),
                   ids.data(), nullptr);
  });
  const double permute_ms = median_ms(repeats, [&] {
    moe_ext::permute_plan(ids.data(), T, k, E, moe_ext::kNoCapacity, offsets.data(), perm_rows.data());
    kern.gather_rows(x.data(), dtype, perm_rows.data(), T, k, d, x_perm.data(), moe_ext::DType::f32);
  });
  const double gemm1_ms = median_ms(repeats, [&] { gemm(x_perm.data(), w13_view, true, activated.data()); });
  const double gemm2_ms = median_ms(repeats, [&] { gemm(activated.data(), w2_view, false, x_perm.data()); });
  const double unpermute_ms = median_ms(repeats, [&] {
    kern.unpermute(x_perm.data(), perm_rows.data(), weights.data(), T, k, d, y32.data());
    if (dtype != moe_ext::DType::f32) kern.narrow(y32.data(), T * d, dtype, threads, y.data());
  });
  const double experts_ms = median_ms(repeats, [&] {
    moe_ext::experts(x.data(), dtype, w13_view, w2_view, weights.data(), ids.data(), T, d, f, E, k,
                     moe_ext::Activation::swiglu(), moe_ext::kNoCapacity, y.data());
  });
  const double total = route_ms + permute_ms + gemm1_ms + gemm2_ms + unpermute_ms;
  const double gflop = (2.0 * T * k * d * f * 3 + 2.0 * T * d * E) / 1e9;
  std::printf("%-12s %10s %7s\n", "stage", "ms", "share");
  const std::pair<const char*, double> rows[] = {{"route", route_ms},     {"permute", permute_ms},
                                                 {"gemm1+act", gemm1_ms}, {"gemm2", gemm2_ms},
                                                 {"unpermute", unpermute_ms}};
  for (const auto& [name, ms] : rows) std::printf("%-12s %10.3f %6.1f%%\n", name, ms, 100.0 * ms / total);
  std::printf("%-12s %10.3f  %.2f GFLOP/s, %.1f tokens/s\n", "total", total, gflop / (total / 1e3),
              T / (total / 1e3));
  std::printf("%-12s %10.3f  (one experts() call)\n", "experts", experts_ms);
  return 0;
}
