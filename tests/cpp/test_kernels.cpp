// C++ unit tests: every kernel of every ISA tier against a plain double-precision loop, over odd sizes
// (XNNPACK's microkernel-tester idea: one generic tester, many shapes). Run by ctest.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/checks.h"
#include "core/isa.h"
#include "core/kernels.h"
#include "core/ops.h"
#include "core/packed.h"
#include "core/threads.h"
#include "core/workspace.h"

namespace moe_ext {
namespace {

// float32 dot products of length K carry ~sqrt(K) * 2^-24 relative error; 1e-5 is far above that for
// K <= ~1000 yet far below any indexing mistake (which gives O(1) errors).
constexpr double kTolerance = 1e-5;

std::vector<float> random_floats(size_t n, std::mt19937& gen, float scale = 1.f) {
  std::normal_distribution<float> normal(0.f, scale);
  std::vector<float> v(n);
  for (float& value : v) value = normal(gen);
  return v;
}

double rel_err(const std::vector<float>& got, const std::vector<double>& want) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    diff += (got[i] - want[i]) * (got[i] - want[i]);
    norm += want[i] * want[i];
  }
  return std::sqrt(diff) / std::max(std::sqrt(norm), 1e-30);
}

// Random offsets of M rows over E experts, with some experts empty.
std::vector<int32_t> random_offsets(int64_t M, int64_t E, std::mt19937& gen) {
  std::vector<int32_t> offsets(E + 1, 0);
  std::uniform_int_distribution<int64_t> pick(0, E - 1);
  std::vector<int64_t> counts(E, 0);
  for (int64_t m = 0; m < M; ++m) ++counts[pick(gen) % (E > 2 ? E - 1 : E)];  // the last expert often empty
  for (int64_t e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + static_cast<int32_t>(counts[e]);
  return offsets;
}

class TierTest : public ::testing::TestWithParam<Isa> {
 protected:
  void SetUp() override { set_isa(GetParam()); }
  const Kernels& kern() const { return kernels_for(GetParam()); }
  std::mt19937 gen{1234};
};

std::string tier_name(const ::testing::TestParamInfo<Isa>& info) { return isa_name(info.param); }

struct GemmShape { int64_t M, N, K, E; };

TEST_P(TierTest, GroupedGemmMatchesPlainLoop) {
  for (GemmShape s : {GemmShape{0, 5, 7, 3}, {1, 1, 1, 1}, {17, 33, 45, 4}, {64, 48, 16, 8}, {37, 70, 129, 5},
                      {9, 3, 200, 1}, {21, 17, 0, 3}, {70, 300, 530, 2}, {100, 513, 257, 3}, {31, 8, 9, 1}}) {
    const auto a = random_floats(s.M * s.K, gen), w = random_floats(s.E * s.N * s.K, gen);
    const auto offsets = random_offsets(s.M, s.E, gen);
    std::vector<float> out(s.M * s.N, NAN);
    std::vector<char> scratch(num_threads() * kGemmScratchBytes);
    GemmProblem problem;
    problem.a = a.data(), problem.w = plain_weights(w.data(), s.E, s.N, s.K), problem.offsets = offsets.data();
    problem.out = out.data();
    if (s.M > 0) kern().grouped_gemm(problem, num_threads(), scratch.data());
    std::vector<double> want(s.M * s.N, 0.0);
    for (int64_t e = 0; e < s.E; ++e)
      for (int64_t m = offsets[e]; m < offsets[e + 1]; ++m)
        for (int64_t n = 0; n < s.N; ++n)
          for (int64_t kk = 0; kk < s.K; ++kk) want[m * s.N + n] += double(a[m * s.K + kk]) * w[(e * s.N + n) * s.K + kk];
    EXPECT_LE(rel_err(out, want), kTolerance) << "M=" << s.M << " N=" << s.N << " K=" << s.K << " E=" << s.E;
  }
}

double activation_ref(const Activation& act, double z) {
  switch (act.fn) {
    case ActivationFn::silu: return z / (1 + std::exp(-z));
    case ActivationFn::gelu: return 0.5 * z * (1 + std::erf(z / std::sqrt(2.0)));
    case ActivationFn::relu: return z > 0 ? z : 0;
    default: break;  // the other functions are checked from Python against the reference
  }
  return z;
}

TEST_P(TierTest, ActivationsMatchPlainLoop) {
  for (Activation act : {Activation::swiglu(), Activation::geglu(), Activation::relu(), Activation::gelu()})
    for (int64_t M : {1, 7, 30})
      for (int64_t f : {1, 15, 33}) {
        const int64_t cols = is_gated(act) ? 2 * f : f;
        const auto h = random_floats(M * cols, gen, 3.f);
        std::vector<float> out(M * f);
        kern().activate(h.data(), M, f, act, 2, out.data());
        std::vector<double> want(M * f);
        for (int64_t m = 0; m < M; ++m)
          for (int64_t i = 0; i < f; ++i)
            want[m * f + i] = activation_ref(act, h[m * cols + i]) * (is_gated(act) ? h[m * cols + f + i] : 1.0);
        EXPECT_LE(rel_err(out, want), kTolerance) << "activation " << int(act.fn) << (act.gated ? " gated" : "") << " M=" << M << " f=" << f;
      }
}

// The vectorised GELU (erfc-based) element by element against double erfc of the same float argument,
// over the whole range where the result is a normal float32, and at the special values.
TEST_P(TierTest, GeluIsAccurateElementwise) {
  std::vector<float> z;
  for (float v = -13.f; v <= 13.f; v += 0.00731f) z.push_back(v);
  for (float v : {0.f, -0.f, 1e-30f, -1e-30f, 1e-3f, -1e-3f}) z.push_back(v);
  std::vector<float> out(z.size());
  kern().activate(z.data(), 1, static_cast<int64_t>(z.size()), Activation::gelu(), 2, out.data());
  double worst = 0;
  for (size_t i = 0; i < z.size(); ++i) {
    const float arg = z[i] * -0.70710678118654752f;  // the kernel's float argument of erfc
    const double want = 0.5 * double(z[i]) * std::erfc(double(arg));
    if (std::fabs(want) < 1e-37) continue;  // denormal results: no relative accuracy to ask for
    worst = std::max(worst, std::fabs(out[i] - want) / std::fabs(want));
  }
  EXPECT_LE(worst, 1e-6);
  const float specials[] = {INFINITY, -INFINITY, NAN, 20.f, -20.f};
  float got[5];
  kern().activate(specials, 1, 5, Activation::gelu(), 2, got);
  EXPECT_EQ(got[0], INFINITY);
  EXPECT_TRUE(std::isnan(got[1]));  // -inf * erfc(inf) = -inf * 0, as the reference
  EXPECT_TRUE(std::isnan(got[2]));
  EXPECT_EQ(got[3], 20.f);
  EXPECT_EQ(got[4], -0.f);
}

// float32 results of bfloat16/float16 weights (exactly widened) against a double loop, plain and
// packed, and with vdpbf16ps where the CPU has it (a rounded to bfloat16 first, as the kernel does).
TEST_P(TierTest, GroupedGemmSixteenBitWeights) {
  for (DType dtype : {DType::bf16, DType::f16})
    for (bool packed : {false, true})
      for (GemmShape s : {GemmShape{37, 70, 129, 5}, {300, 40, 301, 2}, {5, 33, 7, 2}}) {
        const auto a = random_floats(s.M * s.K, gen), w32 = random_floats(s.E * s.N * s.K, gen);
        std::vector<uint16_t> w(w32.size());
        kernels_for(Isa::scalar).narrow(w32.data(), static_cast<int64_t>(w.size()), dtype, 1, w.data());
        std::vector<float> w_wide(w.size());
        kernels_for(Isa::scalar).widen(w.data(), dtype, static_cast<int64_t>(w.size()), 1, w_wide.data());
        const auto offsets = random_offsets(s.M, s.E, gen);
        WeightView plain;
        plain.data = w.data(), plain.dtype = dtype, plain.E = s.E, plain.N = s.N, plain.K = s.K;
        const PackedWeight packed_w(plain);
        WeightView view = packed_w.view();
        if (!packed) view.data = w.data(), view.packed = false;
        for (bool dot : {false, true}) {
          if (dot && !(dtype == DType::bf16 && GetParam() == Isa::avx512 && bf16_dot_enabled())) continue;
          std::vector<float> out(s.M * s.N, NAN);
          std::vector<char> scratch(num_threads() * kGemmScratchBytes);
          GemmProblem problem;
          problem.a = a.data(), problem.w = view, problem.offsets = offsets.data(), problem.out = out.data();
          problem.bf16_dot = dot;
          const int64_t stride = (s.K + 1) / 2 * 2;  // rows of a in bfloat16, padded to even depth
          std::vector<uint16_t> a_bf16(s.M * stride, 0);
          for (int64_t m = 0; m < s.M; ++m)
            kernels_for(Isa::scalar).narrow(a.data() + m * s.K, s.K, DType::bf16, 1, a_bf16.data() + m * stride);
          if (dot) problem.a_bf16 = a_bf16.data();
          kern().grouped_gemm(problem, num_threads(), scratch.data());
          std::vector<double> want(s.M * s.N, 0.0);
          for (int64_t e = 0; e < s.E; ++e)
            for (int64_t m = offsets[e]; m < offsets[e + 1]; ++m)
              for (int64_t n = 0; n < s.N; ++n)
                for (int64_t kk = 0; kk < s.K; ++kk) {
                  want[m * s.N + n] += double(a[m * s.K + kk]) * w_wide[(e * s.N + n) * s.K + kk];
                }
          // vdpbf16ps rounds a to bfloat16 (unit roundoff 2^-9 per product, averaged over K in the norm).
          EXPECT_LE(rel_err(out, want), dot ? 2e-3 : kTolerance) << "dtype " << int(dtype) << " packed " << packed << " dot "
                                                    << dot << " M=" << s.M << " N=" << s.N << " K=" << s.K;
        }
      }
}

TEST_P(TierTest, PermuteIsAStableCountingSortAndGatherCopiesRows) {
  for (int64_t T : {0, 1, 13, 50})
    for (int64_t k : {1, 3})
      for (int64_t E : {1, 4, 9})
        for (int64_t capacity : {kNoCapacity, int64_t{0}, int64_t{2}}) {
          const int64_t d = 19;
          std::uniform_int_distribution<int32_t> pick(0, static_cast<int32_t>(E - 1));
          std::vector<int32_t> ids(T * k), offsets(E + 1), rows(T * k);
          for (auto& id : ids) id = pick(gen);
          const int64_t M = permute_plan(ids.data(), T, k, E, capacity, offsets.data(), rows.data());
          // Plain loop: walk experts, then (token, slot) in order.
          int64_t next = 0;
          for (int64_t e = 0; e < E; ++e) {
            EXPECT_EQ(offsets[e], next);
            int64_t taken = 0;
            for (int64_t i = 0; i < T * k; ++i) {
              if (ids[i] != e) continue;
              const bool kept = capacity == kNoCapacity || taken < capacity;
              EXPECT_EQ(rows[i], kept ? next : -1) << "copy " << i;
              if (kept) ++next, ++taken;
            }
          }
          EXPECT_EQ(M, next);
          const auto x = random_floats(T * d, gen);
          std::vector<float> x_perm(M * d, NAN);
          if (T > 0) kern().gather_rows(x.data(), DType::f32, rows.data(), T, k, d, x_perm.data(), DType::f32);
          for (int64_t i = 0; i < T * k; ++i)
            if (rows[i] >= 0)
              for (int64_t c = 0; c < d; ++c) ASSERT_EQ(x_perm[rows[i] * d + c], x[(i / k) * d + c]);
        }
}

TEST_P(TierTest, UnpermuteSumsSlotsInOrder) {
  for (int64_t T : {1, 11, 40})
    for (int64_t k : {1, 2, 6}) {
      const int64_t d = 23, M = T * k + 3;
      std::uniform_int_distribution<int32_t> pick(-1, static_cast<int32_t>(M - 1));
      std::vector<int32_t> rows(T * k);
      for (auto& r : rows) r = pick(gen);
      const auto y_perm = random_floats(M * d, gen), weights = random_floats(T * k, gen);
      std::vector<float> y(T * d, NAN);
      kern().unpermute(y_perm.data(), rows.data(), weights.data(), T, k, d, y.data());
      std::vector<double> want(T * d, 0.0);
      for (int64_t t = 0; t < T; ++t)
        for (int64_t j = 0; j < k; ++j)
          if (rows[t * k + j] >= 0)
            for (int64_t c = 0; c < d; ++c) want[t * d + c] += double(weights[t * k + j]) * y_perm[rows[t * k + j] * d + c];
      EXPECT_LE(rel_err(y, want), kTolerance) << "T=" << T << " k=" << k;
    }
}

// Plain-loop router for one token: returns ids; fills weights.
std::vector<int32_t> route_ref(const float* x, const std::vector<float>& w, int64_t d, int64_t E, const RouteConfig& c,
                               std::vector<double>& weights, double& margin) {
  std::vector<double> scores(E), keys(E);
  double max = -INFINITY, total = 0;
  for (int64_t e = 0; e < E; ++e) {
    double logit = 0;
    for (int64_t i = 0; i < d; ++i) logit += double(x[i]) * w[e * d + i];
    scores[e] = logit + (c.bias ? c.bias[e] : 0.f);
    max = std::max(max, scores[e]);
  }
  for (auto& s : scores) {
    if (c.scoring == Scoring::softmax) total += (s = std::exp(s - max));
    else s = 1 / (1 + std::exp(-s));
  }
  std::vector<bool> allowed(E, true);
  for (int64_t e = 0; e < E; ++e) {
    if (c.scoring == Scoring::softmax) scores[e] /= total;
    keys[e] = scores[e] + (c.correction_bias ? c.correction_bias[e] : 0.f);
  }
  if (c.n_group > 0) {
    const int64_t size = E / c.n_group;
    std::vector<double> group(c.n_group);
    for (int64_t g = 0; g < c.n_group; ++g) {
      std::vector<double> members(keys.begin() + g * size, keys.begin() + (g + 1) * size);
      std::sort(members.rbegin(), members.rend());
      group[g] = members[0] + (size > 1 ? members[1] : 0.0);
    }
    std::vector<bool> kept(c.n_group, false);
    for (int64_t chosen = 0; chosen < c.topk_group; ++chosen) {
      int64_t best = -1;
      for (int64_t g = 0; g < c.n_group; ++g)
        if (!kept[g] && (best < 0 || group[g] > group[best])) best = g;
      kept[best] = true;
    }
    for (int64_t e = 0; e < E; ++e) allowed[e] = kept[e / size];
  }
  std::vector<int32_t> ids;
  double sum = 0;
  margin = INFINITY;
  for (int64_t j = 0; j <= c.top_k && j < E; ++j) {
    int64_t best = -1;
    for (int64_t e = 0; e < E; ++e)
      if (allowed[e] && (best < 0 || keys[e] > keys[best])) best = e;
    if (best < 0) break;
    if (j == c.top_k) {  // the runner-up decides how clear the choice was
      margin = keys[ids.back()] - keys[best];
      break;
    }
    allowed[best] = false;
    ids.push_back(static_cast<int32_t>(best));
    weights.push_back(scores[best]);
    sum += scores[best];
  }
  for (auto& value : weights) value = (c.renormalize ? value / sum : value) * c.scale;
  return ids;
}

TEST_P(TierTest, RouteMatchesPlainLoop) {
  struct Case { int64_t E, k, n_group, topk_group; Scoring scoring; bool renormalize; };
  for (Case cs : {Case{1, 1, 0, 0, Scoring::softmax, true}, {8, 2, 0, 0, Scoring::softmax, true},
                  {8, 8, 0, 0, Scoring::softmax, false}, {64, 6, 0, 0, Scoring::softmax, false},
                  {16, 4, 4, 2, Scoring::sigmoid, true}, {9, 3, 3, 2, Scoring::sigmoid, false}}) {
    const int64_t T = 29, d = 37;
    const auto x = random_floats(T * d, gen), w = random_floats(cs.E * d, gen);
    const auto bias = random_floats(cs.E, gen, 0.1f);
    RouteConfig c;
    c.top_k = cs.k, c.scoring = cs.scoring, c.renormalize = cs.renormalize, c.scale = 1.5f;
    c.n_group = cs.n_group, c.topk_group = cs.topk_group;
    if (cs.scoring == Scoring::sigmoid) c.correction_bias = bias.data();
    std::vector<float> weights(T * cs.k), probs(T * cs.E);
    std::vector<int32_t> ids(T * cs.k);
    route(x.data(), w.data(), T, d, cs.E, c, weights.data(), ids.data(), probs.data());
    for (int64_t t = 0; t < T; ++t) {
      std::vector<double> want_weights;
      double margin = 0;
      const auto want = route_ref(x.data() + t * d, w, d, cs.E, c, want_weights, margin);
      if (margin < 1e-4) continue;  // a near tie may resolve either way in float32
      for (int64_t j = 0; j < cs.k; ++j) {
        EXPECT_EQ(ids[t * cs.k + j], want[j]) << "E=" << cs.E << " token " << t;
        EXPECT_NEAR(weights[t * cs.k + j], want_weights[j], 1e-5 * std::max(1.0, std::abs(want_weights[j])));
      }
    }
  }
}

TEST_P(TierTest, RouteGivesValidIdsForNanAndInf) {
  const int64_t T = 4, d = 5, E = 6, k = 3;
  auto x = random_floats(T * d, gen);
  const auto w = random_floats(E * d, gen);
  x[0] = NAN, x[d] = INFINITY, x[2 * d] = -INFINITY;
  RouteConfig c;
  c.top_k = k;
  std::vector<float> weights(T * k);
  std::vector<int32_t> ids(T * k);
  route(x.data(), w.data(), T, d, E, c, weights.data(), ids.data(), nullptr);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < k; ++j) {
      EXPECT_GE(ids[t * k + j], 0);
      EXPECT_LT(ids[t * k + j], E);
      for (int64_t i = 0; i < j; ++i) EXPECT_NE(ids[t * k + i], ids[t * k + j]);
    }
  EXPECT_EQ(ids[0], 0);  // all-NaN token: the lowest ids in order
  EXPECT_EQ(ids[1], 1);
  EXPECT_EQ(ids[2], 2);
}

TEST_P(TierTest, ExpertsEqualsTheStagesComposed) {
  const int64_t T = 31, d = 21, f = 13, E = 5, k = 2;
  const auto x = random_floats(T * d, gen), w13 = random_floats(E * 2 * f * d, gen, 0.2f);
  const auto w2 = random_floats(E * d * f, gen, 0.2f), weights = random_floats(T * k, gen);
  std::vector<int32_t> ids(T * k), offsets(E + 1), rows(T * k);
  for (int64_t t = 0; t < T; ++t) ids[t * k] = t % E, ids[t * k + 1] = (t + 2) % E;
  std::vector<float> y(T * d), x_perm(T * k * d), h(T * k * 2 * f), a(T * k * f), y_perm(T * k * d), y2(T * d);
  experts(x.data(), w13.data(), w2.data(), weights.data(), ids.data(), T, d, f, E, k, Activation::swiglu(),
          kNoCapacity, y.data());
  const int64_t M = permute_plan(ids.data(), T, k, E, kNoCapacity, offsets.data(), rows.data());
  permute_gather(x.data(), rows.data(), T, k, d, x_perm.data());
  grouped_gemm(x_perm.data(), w13.data(), offsets.data(), E, M, 2 * f, d, h.data());
  kern().activate(h.data(), M, f, Activation::swiglu(), 2, a.data());
  grouped_gemm(a.data(), w2.data(), offsets.data(), E, M, d, f, y_perm.data());
  unpermute(y_perm.data(), M, rows.data(), weights.data(), T, k, d, y2.data());
  EXPECT_EQ(y, y2);  // the same kernels in the same order: bit-identical
}

TEST_P(TierTest, ResultsDoNotDependOnThreadCount) {
  const int64_t M = 45, N = 70, K = 33, E = 3;
  const auto a = random_floats(M * K, gen), w = random_floats(E * N * K, gen);
  const auto offsets = random_offsets(M, E, gen);
  std::vector<float> one(M * N), two(M * N);
  const int before = num_threads();
  set_num_threads(1);
  grouped_gemm(a.data(), w.data(), offsets.data(), E, M, N, K, one.data());
  set_num_threads(3);
  grouped_gemm(a.data(), w.data(), offsets.data(), E, M, N, K, two.data());
  set_num_threads(before);
  EXPECT_EQ(one, two);
}

INSTANTIATE_TEST_SUITE_P(EveryTier, TierTest, ::testing::ValuesIn(available_isas()), tier_name);

TEST(Checks, RejectOutOfRangeValues) {
  const int32_t ids[] = {0, 3, 4};
  EXPECT_THROW(check_expert_ids(ids, 3, 4, "topk_ids"), std::invalid_argument);
  EXPECT_NO_THROW(check_expert_ids(ids, 2, 4, "topk_ids"));
  const int32_t decreasing[] = {0, 3, 2, 4};
  EXPECT_THROW(check_expert_offsets(decreasing, 3, 4, "expert_offsets"), std::invalid_argument);
  const int32_t short_cover[] = {0, 1, 2, 3};
  EXPECT_THROW(check_expert_offsets(short_cover, 3, 4, "expert_offsets"), std::invalid_argument);
  const int32_t rows[] = {-1, 0, 5};
  EXPECT_THROW(check_perm_rows(rows, 3, 5, "perm_rows"), std::invalid_argument);
  EXPECT_NO_THROW(check_perm_rows(rows, 2, 5, "perm_rows"));
  RouteConfig c;
  c.top_k = 5;
  EXPECT_THROW(check_route_config(c, 4), std::invalid_argument);
  c.top_k = 2, c.n_group = 3, c.topk_group = 1;
  EXPECT_THROW(check_route_config(c, 8), std::invalid_argument);  // 3 does not divide 8
  c.n_group = 4, c.topk_group = 1;
  EXPECT_NO_THROW(check_route_config(c, 8));
  c.top_k = 3;
  EXPECT_THROW(check_route_config(c, 8), std::invalid_argument);  // one group of 2 cannot give 3
  EXPECT_THROW(check_capacity(-2), std::invalid_argument);
  try {
    check_expert_ids(ids, 3, 4, "topk_ids");
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("topk_ids: expected expert ids in [0, 3]; got 4"), std::string::npos);
  }
}

TEST(Workspace, GrowsAndIsReused) {
  Workspace ws;
  void* first = ws.get(Scratch::activated, 1000);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(first) % 64, 0u);
  EXPECT_EQ(ws.get(Scratch::activated, 500), first);  // smaller: same buffer, no allocation
  void* grown = ws.get(Scratch::activated, 100000);
  EXPECT_GE(ws.bytes_held(), 100000u);
  EXPECT_EQ(ws.get(Scratch::activated, 100000), grown);
}

TEST(Isa, NamesRoundTripAndUnknownNamesThrow) {
  for (Isa isa : available_isas()) EXPECT_EQ(isa_from_name(isa_name(isa)), isa);
  EXPECT_THROW(isa_from_name("sse9"), std::invalid_argument);
  EXPECT_EQ(available_isas().front(), Isa::scalar);
  EXPECT_THROW(set_num_threads(0), std::invalid_argument);
}

// Offsets into a weight tensor past 2^31 elements: the last expert of a [E, N, K] tensor with
// E*N*K > 2^31 must be addressed with 64-bit arithmetic. Only the touched pages are ever committed.
TEST(Limits, GroupedGemmAddressesWeightsPast2To31Elements) {
  const int64_t E = 65, N = 1 << 12, K = 1 << 13;  // E*N*K = 65 * 2^25 > 2^31 elements, 8.7 GB virtual
  float* w = static_cast<float*>(std::calloc(static_cast<size_t>(E * N * K), sizeof(float)));
  if (w == nullptr) GTEST_SKIP() << "could not reserve the address space";
  const int64_t M = 2, e = E - 1, n = N - 1;
  for (int64_t kk = 0; kk < K; ++kk) w[(e * N + n) * K + kk] = 1.f;  // last row of the last expert
  std::vector<float> a(M * K, 0.5f), out(M * N);
  std::vector<int32_t> offsets(E + 1, 0);
  offsets[E] = static_cast<int32_t>(M);
  grouped_gemm(a.data(), w, offsets.data(), E, M, N, K, out.data());
  EXPECT_EQ(out[N - 1], 0.5f * K);
  EXPECT_EQ(out[2 * N - 1], 0.5f * K);
  EXPECT_EQ(out[0], 0.f);
  std::free(w);
}

}  // namespace
}  // namespace moe_ext
