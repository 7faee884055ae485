#include "core/ops.h"

#include "core/checks.h"
#include "core/kernels.h"
#include "core/threads.h"
#include "core/workspace.h"

namespace moe_ext {

void route(const float* x, const float* w_router, int64_t T, int64_t d, int64_t E, const RouteConfig& config,
           float* topk_weights, int32_t* topk_ids, float* probs) {
  check_route_config(config, E);
  if (T == 0) return;
  const int threads = num_threads();  // read once: the scratch is sized for exactly this many
  float* scratch = thread_workspace().get<float>(Scratch::route_rows, threads * route_scratch_floats(E));
  kernels().route(x, w_router, T, d, E, config, threads, scratch, topk_weights, topk_ids, probs);
}

int64_t permute_plan(const int32_t* topk_ids, int64_t T, int64_t k, int64_t E, int64_t capacity,
                     int32_t* expert_offsets, int32_t* perm_rows) {
  check_expert_ids(topk_ids, T * k, E, "topk_ids");
  check_capacity(capacity);
  // Counting sort: count the kept copies of each expert, prefix-sum them, then hand out rows in
  // (token, slot) order, which makes the order within an expert stable and deterministic.
  for (int64_t e = 0; e <= E; ++e) expert_offsets[e] = 0;
  for (int64_t i = 0; i < T * k; ++i) {
    int32_t& count = expert_offsets[topk_ids[i] + 1];
    if (capacity == kNoCapacity || count < capacity) ++count;
  }
  for (int64_t e = 0; e < E; ++e) expert_offsets[e + 1] += expert_offsets[e];
  int64_t* cursor = thread_workspace().get<int64_t>(Scratch::cursor, E);
  for (int64_t e = 0; e < E; ++e) cursor[e] = expert_offsets[e];
  for (int64_t i = 0; i < T * k; ++i) {
    const int32_t e = topk_ids[i];
    perm_rows[i] = cursor[e] < expert_offsets[e + 1] ? static_cast<int32_t>(cursor[e]++) : -1;
  }
  return expert_offsets[E];
}

void permute_gather(const float* x, const int32_t* perm_rows, int64_t T, int64_t k, int64_t d, float* x_perm) {
  if (T == 0 || d == 0) return;
  kernels().gather_rows(x, perm_rows, T, k, d, x_perm);
}

namespace {

float* gemm_scratch(int threads) {
  return thread_workspace().get<float>(Scratch::gemm_panels, threads * kGemmScratchFloats);
}

}  // namespace

void grouped_gemm(const float* a, const float* w, const int32_t* expert_offsets, int64_t E, int64_t M,
                  int64_t N, int64_t K, float* out) {
  check_expert_offsets(expert_offsets, E, M, "expert_offsets");
  if (M == 0 || N == 0) return;
  const int threads = num_threads();  // read once: the scratch is sized for exactly this many
  kernels().grouped_gemm(a, w, expert_offsets, E, N, K, threads, out, gemm_scratch(threads));
}

void unpermute(const float* y_perm, int64_t M, const int32_t* perm_rows, const float* topk_weights,
               int64_t T, int64_t k, int64_t d, float* y) {
  check_perm_rows(perm_rows, T * k, M, "perm_rows");
  if (T == 0 || d == 0) return;
  kernels().unpermute(y_perm, perm_rows, topk_weights, T, k, d, y);
}

void experts(const float* x, const float* w13_or_w1, const float* w2, const float* topk_weights,
             const int32_t* topk_ids, int64_t T, int64_t d, int64_t f, int64_t E, int64_t k,
             Activation activation, int64_t capacity, float* y) {
  Workspace& ws = thread_workspace();
  int32_t* offsets = ws.get<int32_t>(Scratch::offsets, E + 1);
  int32_t* perm_rows = ws.get<int32_t>(Scratch::perm_rows, T * k);
  const int64_t M = permute_plan(topk_ids, T, k, E, capacity, offsets, perm_rows);
  const int64_t h_cols = is_gated(activation) ? 2 * f : f;
  float* x_perm = ws.get<float>(Scratch::x_perm, M * d);
  float* hidden = ws.get<float>(Scratch::hidden, M * h_cols);
  float* activated = ws.get<float>(Scratch::activated, M * f);
  const Kernels& kern = kernels();
  if (M > 0) {
    kern.gather_rows(x, perm_rows, T, k, d, x_perm);
    const int threads = num_threads();  // read once: the scratch is sized for exactly this many
    float* panels = gemm_scratch(threads);
    kern.grouped_gemm(x_perm, w13_or_w1, offsets, E, h_cols, d, threads, hidden, panels);
    kern.activate(hidden, M, f, activation, activated);
    // x_perm is dead after the first GEMM and has y_perm's shape [M, d].
    kern.grouped_gemm(activated, w2, offsets, E, d, f, threads, x_perm, panels);
  }
  if (T > 0) kern.unpermute(x_perm, perm_rows, topk_weights, T, k, d, y);  // dropped copies add nothing
}

void moe(const float* x, const float* w_router, const float* w13_or_w1, const float* w2, int64_t T, int64_t d,
         int64_t f, int64_t E, const RouteConfig& config, Activation activation, int64_t capacity, float* y) {
  Workspace& ws = thread_workspace();
  float* topk_weights = ws.get<float>(Scratch::route_weights, T * config.top_k);
  int32_t* topk_ids = ws.get<int32_t>(Scratch::route_ids, T * config.top_k);
  route(x, w_router, T, d, E, config, topk_weights, topk_ids, nullptr);
  experts(x, w13_or_w1, w2, topk_weights, topk_ids, T, d, f, E, config.top_k, activation, capacity, y);
}

}  // namespace moe_ext
