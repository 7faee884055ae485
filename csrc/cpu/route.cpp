// Router: logits = x @ w_router^T (+ bias), softmax or sigmoid scores, (grouped) top-k, renormalise, scale.
// Tokens are handled in blocks of kTokens: their logits first, then each token's selection.
#include "cpu/kernels.h"
#include "core/threads.h"
#include "cpu/common.h"
#include "cpu/vec.h"

namespace moe_ext::cpu::MOE_EXT_CPU_NS {

namespace {

constexpr float kNegInf = -INFINITY;

// f(row[e]) for every e, kLanes at a time (the tail through a padded copy). vexp (cpu/vec.h) rather than
// expf: libm's slow path for results that underflow, common in a softmax over many experts, cost more
// than the router GEMM.
template <typename F>
void map_lanes(float* row, int64_t E, F f) {
  int64_t e = 0;
  for (; e + kLanes <= E; e += kLanes) store(row + e, f(load(row + e)));
  if (e < E) {
    float tail[kLanes] = {};
    for (int64_t i = 0; e + i < E; ++i) tail[i] = row[e + i];
    store(tail, f(load(tail)));
    for (int64_t i = 0; e + i < E; ++i) row[e + i] = tail[i];
  }
}

void score_softmax(float* row, int64_t E) {
  float max = kNegInf;
  for (int64_t e = 0; e < E; ++e)
    if (row[e] > max) max = row[e];
  map_lanes(row, E, [max](vec v) { return vexp(v - max); });
  float total = 0.f;
  for (int64_t e = 0; e < E; ++e) total += row[e];
  for (int64_t e = 0; e < E; ++e) row[e] = row[e] / total;
}

void score_sigmoid(float* row, int64_t E) {
  map_lanes(row, E, [](vec v) { return 1.f / (1.f + vexp(-v)); });
}

// NaN ranks as -inf so that selection always yields valid ids.
float selection_key(float value) { return __builtin_isnan(value) ? kNegInf : value; }

// The best candidate (largest key; the lower index on ties), or -1 if none. `excluded` marks non-candidates.
int64_t best_candidate(const float* keys, const float* excluded, int64_t n) {
  int64_t best = -1;
  for (int64_t i = 0; i < n; ++i)
    if (excluded[i] == 0.f && (best < 0 || keys[i] > keys[best])) best = i;
  return best;
}

// Grouped selection (DeepSeek-V3): keep the topk_group groups whose two best keys sum highest.
void exclude_groups(const float* keys, int64_t E, const RouteConfig& config, float* group_scores,
                    float* group_kept, float* excluded) {
  const int64_t groups = config.n_group, size = E / groups;
  for (int64_t g = 0; g < groups; ++g) {
    float first = kNegInf, second = kNegInf;
    for (int64_t e = g * size; e < (g + 1) * size; ++e) {
      if (keys[e] > first) {
        second = first;
        first = keys[e];
      } else if (keys[e] > second) {
        second = keys[e];
      }
    }
    group_scores[g] = selection_key(size == 1 ? first : first + second);
    group_kept[g] = 0.f;
  }
  for (int64_t chosen = 0; chosen < config.topk_group; ++chosen)
    group_kept[best_candidate(group_scores, group_kept, groups)] = 1.f;
  for (int64_t e = 0; e < E; ++e) excluded[e] = group_kept[e / size] == 0.f ? 1.f : 0.f;
}

// --- router logits ---------------------------------------------------------------------------------
// One dot product at a time waits on its own FMA chain. Here Tb tokens x Eb experts are summed together:
// each x chunk feeds Eb FMAs and each w_router chunk Tb, so the loop is bound by FMA throughput. Every
// logit is summed in the same order (lanes over d, then the lanes in a fixed tree) whatever block it
// falls in, so results do not depend on the thread count.
constexpr int kExpertBlock = 4;
constexpr int kTokens = kLanes == 16 ? 4 : 2;  // Tb x Eb accumulators + Eb weights fit the register file
static_assert(kTokens <= kRouteTokenBlock, "a thread's scratch holds the token block's logits");

// logits[t * E + e] = x[t] . w_router[e] for Tb tokens and Eb experts from e0.
template <int Tb, int Eb>
void logits_block(const float* x, const float* w_router, int64_t d, int64_t E, int64_t e0, float* logits) {
  vec acc[Tb][Eb] = {};
  int64_t p = 0;
  for (; p + kLanes <= d; p += kLanes) {
    vec w[Eb];
    for (int e = 0; e < Eb; ++e) w[e] = load(w_router + (e0 + e) * d + p);
    for (int t = 0; t < Tb; ++t) {
      const vec xt = load(x + t * d + p);
      for (int e = 0; e < Eb; ++e) acc[t][e] += xt * w[e];
    }
  }
  if (p < d) {  // the tail, zero-padded to a whole vector
    float xt[Tb][kLanes] = {}, we[Eb][kLanes] = {};
    for (int64_t i = 0; p + i < d; ++i) {
      for (int t = 0; t < Tb; ++t) xt[t][i] = x[t * d + p + i];
      for (int e = 0; e < Eb; ++e) we[e][i] = w_router[(e0 + e) * d + p + i];
    }
    for (int t = 0; t < Tb; ++t)
      for (int e = 0; e < Eb; ++e) acc[t][e] += load(xt[t]) * load(we[e]);
  }
  for (int t = 0; t < Tb; ++t)
    for (int e = 0; e < Eb; ++e) logits[t * E + e0 + e] = lane_sum(acc[t][e]);
}

template <int Tb>
void token_logits(const float* x, const float* w_router, int64_t d, int64_t E, float* logits) {
  int64_t e = 0;
  for (; e + kExpertBlock <= E; e += kExpertBlock) logits_block<Tb, kExpertBlock>(x, w_router, d, E, e, logits);
  for (; e < E; ++e) logits_block<Tb, 1>(x, w_router, d, E, e, logits);
}

// --- selection -------------------------------------------------------------------------------------

void route_token(const float* logits, int64_t E, const RouteConfig& config, float* scratch, float* weights,
                 int32_t* ids, float* probs) {
  float* scores = scratch;
  float* keys = scratch + E;
  float* excluded = scratch + 2 * E;
  for (int64_t e = 0; e < E; ++e) scores[e] = logits[e] + (config.bias ? config.bias[e] : 0.f);
  if (config.scoring == Scoring::softmax) score_softmax(scores, E);
  else score_sigmoid(scores, E);
  for (int64_t e = 0; e < E; ++e) {
    keys[e] = selection_key(scores[e] + (config.correction_bias ? config.correction_bias[e] : 0.f));
    excluded[e] = 0.f;
  }
  if (config.n_group > 0) exclude_groups(keys, E, config, scratch + 3 * E, scratch + 4 * E, excluded);
  float total = 0.f;
  for (int64_t j = 0; j < config.top_k; ++j) {
    const int64_t e = best_candidate(keys, excluded, E);
    excluded[e] = 1.f;
    ids[j] = static_cast<int32_t>(e);
    weights[j] = scores[e];
    total += scores[e];
  }
  if (config.renormalize && total != 0.f)
    for (int64_t j = 0; j < config.top_k; ++j) weights[j] = weights[j] / total;
  for (int64_t j = 0; j < config.top_k; ++j) weights[j] *= config.scale;
  if (probs)
    for (int64_t e = 0; e < E; ++e) probs[e] = scores[e];
}

}  // namespace

void route(const float* x, const float* w_router, int64_t T, int64_t d, int64_t E,
           const RouteConfig& config, int threads, float* scratch, float* topk_weights, int32_t* topk_ids,
           float* probs) {
  const int64_t k = config.top_k, stride = route_scratch_floats(E), blocks = ceil_div(T, kTokens);
  MOE_EXT_PARALLEL_FOR(threads)
  for (int64_t block = 0; block < blocks; ++block) {
    float* logits = scratch + thread_index() * stride;
    float* selection = logits + kRouteTokenBlock * E;
    const int64_t t0 = block * kTokens, tokens = min_i64(kTokens, T - t0);
    if (tokens == kTokens)
      token_logits<kTokens>(x + t0 * d, w_router, d, E, logits);
    else
      for (int64_t t = 0; t < tokens; ++t) token_logits<1>(x + (t0 + t) * d, w_router, d, E, logits + t * E);
    for (int64_t t = 0; t < tokens; ++t)
      route_token(logits + t * E, E, config, selection, topk_weights + (t0 + t) * k, topk_ids + (t0 + t) * k,
                  probs ? probs + (t0 + t) * E : nullptr);
  }
}

}  // namespace moe_ext::cpu::MOE_EXT_CPU_NS
