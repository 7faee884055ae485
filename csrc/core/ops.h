// The C++ API of moe_ext: one function per operation of SPEC.md §3, on raw row-major float32 arrays.
// Each checks the argument values the kernels rely on, takes scratch from the calling thread's workspace
// and runs the kernels of the current ISA tier. Names and semantics: docs/api.md.
#pragma once
#include <cstdint>

#include "core/types.h"

namespace moe_ext {

// topk_weights, topk_ids: [T, k]; probs: [T, E] or null.
void route(const float* x, const float* w_router, int64_t T, int64_t d, int64_t E, const RouteConfig& config,
           float* topk_weights, int32_t* topk_ids, float* probs);

// Decides each copy's row (counting sort by expert, then token, then slot; capacity drops the rest):
// fills expert_offsets [E+1] and perm_rows [T, k] and returns M, the number of rows kept.
int64_t permute_plan(const int32_t* topk_ids, int64_t T, int64_t k, int64_t E, int64_t capacity,
                     int32_t* expert_offsets, int32_t* perm_rows);
// Copies the tokens to their rows: x_perm [M, d].
void permute_gather(const float* x, const int32_t* perm_rows, int64_t T, int64_t k, int64_t d, float* x_perm);

// out [M, N] with M = expert_offsets[E]; w [E, N, K].
void grouped_gemm(const float* a, const float* w, const int32_t* expert_offsets, int64_t E, int64_t M,
                  int64_t N, int64_t K, float* out);

// y [T, d] from y_perm [M, d].
void unpermute(const float* y_perm, int64_t M, const int32_t* perm_rows, const float* topk_weights,
               int64_t T, int64_t k, int64_t d, float* y);

// The expert FFNs over given routing. w13_or_w1: [E, 2f, d] (gated) or [E, f, d]; w2: [E, d, f].
void experts(const float* x, const float* w13_or_w1, const float* w2, const float* topk_weights,
             const int32_t* topk_ids, int64_t T, int64_t d, int64_t f, int64_t E, int64_t k,
             Activation activation, int64_t capacity, float* y);

// route, then experts.
void moe(const float* x, const float* w_router, const float* w13_or_w1, const float* w2, int64_t T, int64_t d,
         int64_t f, int64_t E, const RouteConfig& config, Activation activation, int64_t capacity, float* y);

// E * sum_e f_e * P_e (f_e: fraction of the T*k copies sent to e; P_e: mean of probs[:, e]); 0 for T = 0.
double load_balancing_loss(const float* probs, const int32_t* topk_ids, int64_t T, int64_t E, int64_t k);
// mean over tokens of logsumexp(logits[t])^2; 0 for T = 0.
double router_z_loss(const float* logits, int64_t T, int64_t E);

}  // namespace moe_ext
