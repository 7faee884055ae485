// The C++ API of moe_ext: one function per operation of SPEC.md §3, on raw row-major arrays.
// Activations and weights may be float32, bfloat16 or float16 (each with its DType; results come back in
// the dtype of the op's main input: x, a or y_perm); scores, top-k weights and accumulation are float32.
// Each function checks the argument values the kernels rely on, takes scratch from the calling thread's
// workspace and runs the kernels of the current ISA tier. Names and semantics: docs/api.md.
// The float32-only overloads at the end are shorthands for the same calls.
#pragma once
#include <cstdint>

#include "core/types.h"

namespace moe_ext {

// topk_weights, topk_ids: [T, k]; probs: [T, E] or null.
void route(const void* x, DType x_dtype, const void* w_router, DType w_router_dtype, int64_t T, int64_t d,
           int64_t E, const RouteConfig& config, float* topk_weights, int32_t* topk_ids, float* probs);

// Decides each copy's row (counting sort by expert, then token, then slot; capacity drops the rest):
// fills expert_offsets [E+1] and perm_rows [T, k] and returns M, the number of rows kept.
int64_t permute_plan(const int32_t* topk_ids, int64_t T, int64_t k, int64_t E, int64_t capacity,
                     int32_t* expert_offsets, int32_t* perm_rows);
// Copies the tokens to their rows: x_perm [M, d] in x's dtype.
void permute_gather(const void* x, DType dtype, const int32_t* perm_rows, int64_t T, int64_t k, int64_t d,
                    void* x_perm);

// out [M, N] in a's dtype, with M = expert_offsets[E]; w [E, N, K] plain, transposed, packed or quantised
// (WeightView); bias [E, N] float32 or null, added per expert row.
void grouped_gemm(const void* a, DType a_dtype, const WeightView& w, const int32_t* expert_offsets, int64_t M,
                  void* out, const float* bias = nullptr);

// y [T, d] from y_perm [M, d], both in `dtype`.
void unpermute(const void* y_perm, DType dtype, int64_t M, const int32_t* perm_rows, const float* topk_weights,
               int64_t T, int64_t k, int64_t d, void* y);

// The experts' biases, float32, or null: b13_or_b1 [E, 2f or f] in w13_or_w1's row order (added before
// the activation), b2 [E, d] (added to each expert's output before the weighted combine).
struct ExpertBiases {
  const float* b13_or_b1 = nullptr;
  const float* b2 = nullptr;
};

// The expert FFNs over given routing; y [T, d] in x's dtype. w13_or_w1: [E, 2f, d] (gated) or [E, f, d];
// w2: [E, d, f].
void experts(const void* x, DType x_dtype, const WeightView& w13_or_w1, const WeightView& w2,
             const float* topk_weights, const int32_t* topk_ids, int64_t T, int64_t d, int64_t f, int64_t E,
             int64_t k, const Activation& activation, int64_t capacity, void* y, const ExpertBiases& biases = {});

// route, then experts.
void moe(const void* x, DType x_dtype, const void* w_router, DType w_router_dtype, const WeightView& w13_or_w1,
         const WeightView& w2, int64_t T, int64_t d, int64_t f, int64_t E, const RouteConfig& config,
         const Activation& activation, int64_t capacity, void* y, const ExpertBiases& biases = {});

// E * sum_e f_e * P_e (f_e: fraction of the T*k copies sent to e; P_e: mean of probs[:, e]); 0 for T = 0.
double load_balancing_loss(const float* probs, const int32_t* topk_ids, int64_t T, int64_t E, int64_t k);
// mean over tokens of logsumexp(logits[t])^2; 0 for T = 0.
double router_z_loss(const float* logits, int64_t T, int64_t E);

// A plain float32 weight array [E, N, K].
inline WeightView plain_weights(const float* w, int64_t E, int64_t N, int64_t K) {
  WeightView v;
  v.data = w, v.dtype = DType::f32, v.E = E, v.N = N, v.K = K;
  return v;
}

// float32 shorthands.
inline void route(const float* x, const float* w_router, int64_t T, int64_t d, int64_t E, const RouteConfig& config,
                  float* topk_weights, int32_t* topk_ids, float* probs) {
  route(x, DType::f32, w_router, DType::f32, T, d, E, config, topk_weights, topk_ids, probs);
}
inline void permute_gather(const float* x, const int32_t* perm_rows, int64_t T, int64_t k, int64_t d, float* x_perm) {
  permute_gather(x, DType::f32, perm_rows, T, k, d, x_perm);
}
inline void grouped_gemm(const float* a, const float* w, const int32_t* expert_offsets, int64_t E, int64_t M,
                         int64_t N, int64_t K, float* out) {
  grouped_gemm(a, DType::f32, plain_weights(w, E, N, K), expert_offsets, M, out);
}
inline void unpermute(const float* y_perm, int64_t M, const int32_t* perm_rows, const float* topk_weights,
                      int64_t T, int64_t k, int64_t d, float* y) {
  unpermute(y_perm, DType::f32, M, perm_rows, topk_weights, T, k, d, y);
}
inline void experts(const float* x, const float* w13_or_w1, const float* w2, const float* topk_weights,
                    const int32_t* topk_ids, int64_t T, int64_t d, int64_t f, int64_t E, int64_t k,
                    const Activation& activation, int64_t capacity, float* y) {
  experts(x, DType::f32, plain_weights(w13_or_w1, E, is_gated(activation) ? 2 * f : f, d),
          plain_weights(w2, E, d, f), topk_weights, topk_ids, T, d, f, E, k, activation, capacity, y);
}
inline void moe(const float* x, const float* w_router, const float* w13_or_w1, const float* w2, int64_t T,
                int64_t d, int64_t f, int64_t E, const RouteConfig& config, const Activation& activation, int64_t capacity,
                float* y) {
  moe(x, DType::f32, w_router, DType::f32, plain_weights(w13_or_w1, E, is_gated(activation) ? 2 * f : f, d),
      plain_weights(w2, E, d, f), T, d, f, E, config, activation, capacity, y);
}

}  // namespace moe_ext
