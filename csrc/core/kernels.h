// The dispatch table: one set of kernels per ISA tier, chosen by current_isa().
// Kernels never allocate, never validate and never touch Python; their callers (core/ops.cpp) do.
// Every kernel gives results that do not depend on the thread count: each output element is computed
// by one thread in a fixed order.
#pragma once
#include <cstdint>

#include "core/isa.h"
#include "core/types.h"

namespace moe_ext {

struct Kernels {
  // Kernels with per-thread scratch take the thread count their scratch was sized for (`threads`), so a
  // concurrent set_num_threads() cannot make them index past it.
  // Router GEMM, scoring and top-k selection for T tokens. `scratch` holds route_scratch_floats(E) floats
  // per thread. `probs` may be null.
  void (*route)(const float* x, const float* w_router, int64_t T, int64_t d, int64_t E,
                const RouteConfig& config, int threads, float* scratch, float* topk_weights,
                int32_t* topk_ids, float* probs);
  // x_perm[perm_rows[t, j]] = x[t] for every slot with perm_rows >= 0.
  void (*gather_rows)(const float* x, const int32_t* perm_rows, int64_t T, int64_t k, int64_t d,
                      float* x_perm);
  // out[rows of e] = a[rows of e] @ w[e]^T; rows of e are offsets[e]..offsets[e+1]-1; M = offsets[E].
  // `scratch` holds kGemmScratchFloats floats per thread (packed weight panels).
  void (*grouped_gemm)(const float* a, const float* w, const int32_t* offsets, int64_t E, int64_t N,
                       int64_t K, int threads, float* out, float* scratch);
  // Gated: h [M, 2f] -> out [M, f]; otherwise h [M, f] -> out [M, f] (may alias h).
  void (*activate)(const float* h, int64_t M, int64_t f, Activation activation, float* out);
  // y[t] = sum_j weights[t, j] * y_perm[perm_rows[t, j]], slots in order, -1 rows skipped.
  void (*unpermute)(const float* y_perm, const int32_t* perm_rows, const float* weights, int64_t T,
                    int64_t k, int64_t d, float* y);

  // Backward kernels (csrc/cpu/*_backward.cpp; the C++ API is core/backward.h).
  // dst [cols, rows] = src [rows, cols]^T, src rows `ld` floats apart.
  void (*transpose)(const float* src, int64_t rows, int64_t cols, int64_t ld, float* dst);
  // grad_h [M, 2f] (gated) or [M, f] from grad_act [M, f] and the activation's input h.
  void (*activation_backward)(const float* grad_act, const float* h, int64_t M, int64_t f, Activation activation,
                              float* grad_h);
  // grad_y_perm (zeroed by the caller) += w * grad_y per slot; grad_weights [T, k]. threads = 1 when
  // perm_rows may repeat a row.
  void (*unpermute_backward)(const float* grad_y, const float* y_perm, const int32_t* perm_rows,
                             const float* weights, int64_t T, int64_t k, int64_t d, int threads,
                             float* grad_y_perm, float* grad_weights);
};

constexpr int64_t kGemmScratchFloats = 256 * 256;

// Per thread: scores, keys, excluded flags, group scores, group flags.
inline int64_t route_scratch_floats(int64_t E) { return 5 * E; }

// The table of the tier in use.
const Kernels& kernels();
const Kernels& kernels_for(Isa isa);

}  // namespace moe_ext
