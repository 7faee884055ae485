// Router: logits = x @ w_router^T (+ bias), softmax or sigmoid scores, (grouped) top-k, renormalise, scale.
#include "cpu/kernels.h"
#include "core/threads.h"
#include "cpu/common.h"

namespace moe_ext::cpu::MOE_EXT_CPU_NS {

namespace {

constexpr float kNegInf = -INFINITY;

void score_softmax(float* row, int64_t E) {
  float max = kNegInf;
  for (int64_t e = 0; e < E; ++e)
    if (row[e] > max) max = row[e];
  float total = 0.f;
  for (int64_t e = 0; e < E; ++e) {
    row[e] = expf(row[e] - max);
    total += row[e];
  }
  for (int64_t e = 0; e < E; ++e) row[e] = row[e] / total;
}

void score_sigmoid(float* row, int64_t E) {
  for (int64_t e = 0; e < E; ++e) row[e] = 1.f / (1.f + expf(-row[e]));
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

void route_token(const float* x, const float* w_router, int64_t d, int64_t E, const RouteConfig& config,
                 float* scratch, float* weights, int32_t* ids, float* probs) {
  float* scores = scratch;
  float* keys = scratch + E;
  float* excluded = scratch + 2 * E;
  for (int64_t e = 0; e < E; ++e)
    scores[e] = dot(x, w_router + e * d, d) + (config.bias ? config.bias[e] : 0.f);
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
  const int64_t k = config.top_k, stride = route_scratch_floats(E);
  MOE_EXT_PARALLEL_FOR(threads)
  for (int64_t t = 0; t < T; ++t) {
    float* mine = scratch + thread_index() * stride;
    route_token(x + t * d, w_router, d, E, config, mine, topk_weights + t * k, topk_ids + t * k,
                probs ? probs + t * E : nullptr);
  }
}

}  // namespace moe_ext::cpu::MOE_EXT_CPU_NS
