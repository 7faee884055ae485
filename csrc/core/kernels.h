// The kernel signatures: one table of them per ISA tier, chosen by current_isa(). core knows only this
// table; csrc/cpu/dispatch.cpp defines kernels_for() over the tiers it was built with.
// Kernels never allocate, never validate and never touch Python; their callers (core/ops.cpp) do.
// Every kernel gives results that do not depend on the thread count: each output element is computed
// by one thread in a fixed order.
#pragma once
#include <cstdint>

#include "core/isa.h"
#include "core/quant.h"
#include "core/types.h"

namespace moe_ext {

// A grouped GEMM: out[rows of e] = a[rows of e] @ w[e]^T for the rows offsets[e]..offsets[e+1]-1, with
// the activation optionally applied in the epilogue (the [M, N] product is then never written out).
struct GemmProblem {
  const float* a = nullptr;        // [M, K], M = offsets[E]; may be null with bf16_dot and packed weights
  WeightView w;                    // [E, N, K], unpacked or packed
  const int32_t* offsets = nullptr;
  bool fuse_activation = false;    // out = activation(product): [M, N / 2] gated, [M, N] otherwise
  Activation activation;
  // [E, N] float32 or null: bias[e, n] is added to product column n (w's row n, in w's own row order,
  // interleaved or not) before the activation, or to out without one.
  const float* bias = nullptr;
  // bfloat16 weights only: a is rounded to bfloat16 and multiplied with vdpbf16ps (set only where the
  // CPU has AVX512_BF16 and the caller's activations are bfloat16, so no precision is lost that the
  // caller's dtype did not already drop). Ignored by tiers without it.
  bool bf16_dot = false;
  // With bf16_dot: a rounded to bfloat16 once per call, rows of K rounded up to even (zero-padded), so
  // each 32-bit word holds the pair of depths vdpbf16ps multiplies.
  const uint16_t* a_bf16 = nullptr;
  float* out = nullptr;            // [M, N] or [M, N / 2]
};

// The grouped GEMM's weight gradient: grad_w[e] [N, K] = grad_out[rows of e]^T @ a[rows of e] (zeros for
// experts without rows), summed in float32 and stored in grad_w_dtype.
struct GradWProblem {
  const void* grad_out = nullptr;  // [M, N], M = offsets[E], of `dtype` (read in place)
  const void* a = nullptr;         // [M, K] of `dtype`
  DType dtype = DType::f32;
  const int32_t* offsets = nullptr;
  int64_t E = 0, N = 0, K = 0;
  // bfloat16 operands multiplied with vdpbf16ps, as GemmProblem::bf16_dot (set only where the CPU has
  // AVX512_BF16 and both operands are bfloat16). Ignored by tiers without it.
  bool bf16_dot = false;
  void* grad_w = nullptr;  // [E, N, K] of grad_w_dtype
  DType grad_w_dtype = DType::f32;
};

// A grouped GEMM on quantised weights (core/quant.h): as GemmProblem, plus the int8 activation rows the
// kernel fills first when w.quantize_activations (per token: a_q [M, w.row_depth], a_scales [M], a_sums
// [M, w.groups], the sums of each group's quantised activations, for the zero-point correction).
struct QuantGemmProblem {
  const float* a = nullptr;  // [M, K]
  const QuantView* w = nullptr;
  const int32_t* offsets = nullptr;
  bool fuse_activation = false;
  Activation activation;
  const float* bias = nullptr;  // as GemmProblem::bias
  bool vnni = false;  // avx512 tier: vpdpbusd (set only where the CPU has AVX512_VNNI)
  // Weight-only, K a multiple of 32, on the avx512 tier of a CPU with AVX512_BF16, the caller's
  // activations bfloat16: a's rows are rounded to bfloat16 (a_bf16; `a` then holds the same values in
  // float32 for the paths that read float32), and decode's panels (int4; int8 from 2 rows) and
  // prefill's tiles multiply them with vdpbf16ps, as GemmProblem::bf16_dot.
  bool bf16_dot = false;
  const uint16_t* a_bf16 = nullptr;  // with bf16_dot: [M, K]
  int8_t* a_q = nullptr;
  float* a_scales = nullptr;
  int32_t* a_sums = nullptr;
  float* out = nullptr;
};

struct Kernels {
  // Kernels with per-thread scratch take the thread count their scratch was sized for (`threads`), so a
  // concurrent set_num_threads() cannot make them index past it.
  // Router GEMM, scoring and top-k selection for T tokens. `scratch` holds route_scratch_floats(E) floats
  // per thread. `probs` may be null.
  void (*route)(const float* x, const float* w_router, int64_t T, int64_t d, int64_t E,
                const RouteConfig& config, int threads, float* scratch, float* topk_weights,
                int32_t* topk_ids, float* probs);
  // x_perm[perm_rows[t, j]] = x[t] for every slot with perm_rows >= 0; x_perm's dtype is x's (a copy)
  // or float32 (widened).
  void (*gather_rows)(const void* x, DType x_dtype, const int32_t* perm_rows, int64_t T, int64_t k,
                      int64_t d, void* x_perm, DType perm_dtype);
  // See GemmProblem. `scratch` holds kGemmScratchBytes bytes per thread.
  void (*grouped_gemm)(const GemmProblem& problem, int threads, void* scratch);
  // Packs w [E, N, K] (a plain WeightView, transposed or not) into the layout of core/packed.h
  // (packed_expert_elements(N, K, dtype) per expert).
  void (*pack_weight)(const WeightView& w, int threads, void* packed);
  // n elements between float32 and dtype (round to nearest even), in parallel.
  void (*widen)(const void* src, DType dtype, int64_t n, int threads, float* dst);
  void (*narrow)(const float* src, int64_t n, DType dtype, int threads, void* dst);
  // Gated: h [M, 2f] -> out [M, f]; otherwise h [M, f] -> out [M, f] (may alias h).
  void (*activate)(const float* h, int64_t M, int64_t f, const Activation& activation, int threads, float* out);
  // y[t] = sum_j weights[t, j] * y_perm[perm_rows[t, j]], slots in order, -1 rows skipped.
  void (*unpermute)(const float* y_perm, const int32_t* perm_rows, const float* weights, int64_t T,
                    int64_t k, int64_t d, float* y);

  // Backward kernels (csrc/cpu/*_backward.cpp; the C++ API is core/backward.h).
  // grad_h [M, 2f] (gated) or [M, f] from grad_act [M, f] and the activation's input h.
  void (*activation_backward)(const float* grad_act, const float* h, int64_t M, int64_t f, const Activation& activation,
                              int threads, float* grad_h);
  // grad_y_perm (zeroed by the caller) += w * grad_y per slot; grad_weights [T, k]. threads = 1 when
  // perm_rows may repeat a row.
  void (*unpermute_backward)(const float* grad_y, const float* y_perm, const int32_t* perm_rows,
                             const float* weights, int64_t T, int64_t k, int64_t d, int threads,
                             float* grad_y_perm, float* grad_weights);
  // See GradWProblem. `scratch` holds kGemmScratchBytes bytes per thread.
  void (*grouped_gemm_grad_w)(const GradWProblem& problem, int threads, void* scratch);

  // See QuantGemmProblem. `scratch` holds quant_gemm_scratch_bytes() bytes per thread.
  void (*quant_gemm)(const QuantGemmProblem& problem, int threads, void* scratch);
};

// Per thread: the tile's float32 results and its packed operand blocks (the largest: a bfloat16 weight
// gradient tile, cpu/grouped_gemm_backward.cpp).
constexpr int64_t kGemmScratchBytes = 576 * 1024;

// Tokens whose router logits route computes together (their dot products share loads).
constexpr int64_t kRouteTokenBlock = 4;
// Per thread: a token block's logits, then scores, keys, excluded flags, group scores, group flags.
inline int64_t route_scratch_floats(int64_t E) { return (kRouteTokenBlock + 5) * E; }

// The table of the tier in use.
const Kernels& kernels();
const Kernels& kernels_for(Isa isa);

}  // namespace moe_ext
