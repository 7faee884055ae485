// Router on the GPU: one block per token. The warps compute the E logits (x . w_router[e], float32
// accumulation, a fixed reduction order), then one thread scores and selects exactly as the CPU kernel
// does (csrc/cpu/route.cpp): softmax or sigmoid, correction bias for selection only, DeepSeek-V3 grouped
// selection, ties to the lower id, NaN ranked as -inf, renormalise, scale. E is small (<= a few hundred),
// so the serial selection costs little next to reading x and w_router.
#include <cmath>

#include "cuda/common.cuh"

namespace moe_ext::cuda {

namespace {

constexpr int kRouteThreads = 128;
constexpr int64_t kMaxRouteExperts = 2048;  // 5 floats of shared memory per expert, within 48 KiB

struct DeviceRouteConfig {
  int top_k;
  int scoring;  // Scoring
  bool renormalize;
  float scale;
  const float* bias;
  const float* correction_bias;
  int n_group;
  int topk_group;
};

__device__ float selection_key(float v) { return isnan(v) ? -INFINITY : v; }

__device__ int best_candidate(const float* keys, const float* excluded, int n) {
  int best = -1;
  for (int i = 0; i < n; ++i)
    if (excluded[i] == 0.f && (best < 0 || keys[i] > keys[best])) best = i;
  return best;
}

__device__ void exclude_groups(const float* keys, int E, const DeviceRouteConfig& c, float* group_scores,
                               float* group_kept, float* excluded) {
  const int size = E / c.n_group;
  for (int g = 0; g < c.n_group; ++g) {
    float first = -INFINITY, second = -INFINITY;
    for (int e = g * size; e < (g + 1) * size; ++e) {
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
  for (int chosen = 0; chosen < c.topk_group; ++chosen)
    group_kept[best_candidate(group_scores, group_kept, c.n_group)] = 1.f;
  for (int e = 0; e < E; ++e) excluded[e] = group_kept[e / size] == 0.f ? 1.f : 0.f;
}

// Scores in place, then selection; runs on one thread.
__device__ void score_and_select(float* scores, int E, const DeviceRouteConfig& c, float* weights, int32_t* ids,
                                 float* probs) {
  float* keys = scores + E;
  float* excluded = scores + 2 * E;
  if (c.scoring == static_cast<int>(Scoring::softmax)) {
    float max = -INFINITY, total = 0.f;
    for (int e = 0; e < E; ++e) max = scores[e] > max ? scores[e] : max;
    for (int e = 0; e < E; ++e) total += (scores[e] = expf(scores[e] - max));
    for (int e = 0; e < E; ++e) scores[e] = scores[e] / total;
  } else {
    for (int e = 0; e < E; ++e) scores[e] = 1.f / (1.f + expf(-scores[e]));
  }
  for (int e = 0; e < E; ++e) {
    keys[e] = selection_key(scores[e] + (c.correction_bias ? c.correction_bias[e] : 0.f));
    excluded[e] = 0.f;
  }
  if (c.n_group > 0) exclude_groups(keys, E, c, scores + 3 * E, scores + 4 * E, excluded);
  float total = 0.f;
  for (int j = 0; j < c.top_k; ++j) {
    const int e = best_candidate(keys, excluded, E);
    excluded[e] = 1.f;
    ids[j] = e;
    weights[j] = scores[e];
    total += scores[e];
  }
  if (c.renormalize && total != 0.f)
    for (int j = 0; j < c.top_k; ++j) weights[j] = weights[j] / total;
  for (int j = 0; j < c.top_k; ++j) weights[j] *= c.scale;
  if (probs)
    for (int e = 0; e < E; ++e) probs[e] = scores[e];
}

template <typename T>
__global__ void __launch_bounds__(kRouteThreads)
route_kernel(const T* __restrict__ x, const T* __restrict__ w_router, int d, int E, DeviceRouteConfig c,
             float* __restrict__ topk_weights, int32_t* __restrict__ topk_ids, float* __restrict__ probs) {
  extern __shared__ float scratch[];  // 5 * E floats: scores, keys, excluded, group scores, group flags
  const int64_t t = blockIdx.x;
  const T* row = x + t * d;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int e = warp; e < E; e += kRouteThreads / 32) {
    const T* w = w_router + static_cast<int64_t>(e) * d;
    float sum = 0.f;
    for (int i = lane; i < d; i += 32) sum += to_float(row[i]) * to_float(w[i]);
    sum = warp_sum(sum);
    if (lane == 0) scratch[e] = sum + (c.bias ? c.bias[e] : 0.f);
  }
  __syncthreads();
  if (threadIdx.x == 0)
    score_and_select(scratch, E, c, topk_weights + t * c.top_k, topk_ids + t * c.top_k,
                     probs ? probs + t * E : nullptr);
}

}  // namespace

void route(const void* x, const void* w_router, int64_t T, int64_t d, int64_t E, DType dtype,
           const RouteConfig& config, float* topk_weights, int32_t* topk_ids, float* probs, Stream stream) {
  require_device("moe_ext._cuda.route");
  if (E < 1 || E > kMaxRouteExperts)
    throw std::invalid_argument("num_experts: the CUDA router supports 1.." + std::to_string(kMaxRouteExperts) +
                                " experts; got " + std::to_string(E));
  if (d > 0x7fffffffLL) throw std::invalid_argument("d: expected < 2^31");
  if (T == 0) return;
  const DeviceRouteConfig c{static_cast<int>(config.top_k), static_cast<int>(config.scoring), config.renormalize,
                            config.scale, config.bias, config.correction_bias, static_cast<int>(config.n_group),
                            static_cast<int>(config.topk_group)};
  const size_t shared = 5 * static_cast<size_t>(E) * sizeof(float);
  dispatch_dtype(dtype, [&](auto tag) {
    using Elem = typename decltype(tag)::type;
    route_kernel<Elem><<<grid_size(T, "route"), kRouteThreads, shared, as_stream(stream)>>>(
        static_cast<const Elem*>(x), static_cast<const Elem*>(w_router), static_cast<int>(d),
        static_cast<int>(E), c, topk_weights, topk_ids, probs);
  });
  check_launch("route");
}

}  // namespace moe_ext::cuda
