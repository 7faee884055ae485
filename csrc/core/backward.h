// The C++ API of the backward pass (what autograd of the PyTorch ops runs), on raw row-major float32
// arrays (the grouped GEMM's backward also on 16-bit ones), plus the activation forward the backward needs
// to recompute. Names and semantics: docs/api.md "Backward". Each call is deterministic: no atomics, every
// sum in an order fixed by the data.
#pragma once
#include <cstdint>

#include "core/types.h"

namespace moe_ext {

// out [M, f] = act(h); h [M, 2f] (gated) or [M, f]. h and out of `dtype`: 16-bit rows are widened and the
// float32 results rounded once, a block of rows at a time (no whole float32 copy).
void activation(const void* h, DType dtype, int64_t M, int64_t f, const Activation& activation, void* out);
// grad_h (shape of h) from grad_act [M, f]; grad_act, h and grad_h of `dtype`, as activation.
void activation_backward(const void* grad_act, const void* h, DType dtype, int64_t M, int64_t f,
                         const Activation& activation, void* grad_h);

// Of out = grouped_gemm(a [M, K], w [E, N, K], offsets): grad_a [M, K] = grad_out[rows of e] @ w[e] and
// grad_w [E, N, K] = grad_out[rows of e]^T @ a[rows of e] (0 for experts without rows). grad_a is in
// grad_a_dtype (summed in float32, rounded once if 16-bit); grad_w has w's dtype (summed in float32, then rounded: a 16-bit weight's gradient is stored as the
// weight is, and is never written out in float32). Either output may be null (not wanted). grad_out
// [M, N] and a [M, K] come in `dtype` (float32, bfloat16 or float16); w is a plain weight (WeightView:
// any of those dtypes, transposed or not, not packed or quantised), read where it lies: grad_a is the
// forward grouped GEMM on w seen as its transpose, so no copy of the weights (widened or transposed) is
// made.
void grouped_gemm_backward(const void* grad_out, const void* a, DType dtype, const WeightView& w,
                           const int32_t* expert_offsets, int64_t M, void* grad_a, DType grad_a_dtype, void* grad_w);

// Of out = grouped_gemm(a, w, offsets, bias): grad_bias [E, N] = the sums of grad_out's rows per expert
// (rows in order; 0 for experts without rows).
void bias_grad(const float* grad_out, const int32_t* expert_offsets, int64_t E, int64_t M, int64_t N,
               float* grad_bias);

// Of y = unpermute(y_perm [M, d], perm_rows [T, k], topk_weights [T, k]): grad_y_perm [M, d] and
// grad_topk_weights [T, k].
void unpermute_backward(const float* grad_y, const float* y_perm, int64_t M, const int32_t* perm_rows,
                        const float* topk_weights, int64_t T, int64_t k, int64_t d, float* grad_y_perm,
                        float* grad_topk_weights);

// Of x_perm = permute(x, ...).x_perm: grad_x [T, d][t] = sum over slots j (in order, -1 skipped) of
// grad_x_perm[perm_rows[t, j]].
void permute_backward(const float* grad_x_perm, int64_t M, const int32_t* perm_rows, int64_t T, int64_t k,
                      int64_t d, float* grad_x);

}  // namespace moe_ext
