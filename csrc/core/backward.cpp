#include "core/backward.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "core/checks.h"
#include "core/gemm_call.h"
#include "core/kernels.h"
#include "core/threads.h"
#include "core/workspace.h"

namespace moe_ext {

void activation(const float* h, int64_t M, int64_t f, const Activation& act, float* out) {
  if (M == 0 || f == 0) return;
  kernels().activate(h, M, f, act, out);
}

void activation_backward(const float* grad_act, const float* h, int64_t M, int64_t f, const Activation& act,
                         float* grad_h) {
  if (M == 0 || f == 0) return;
  kernels().activation_backward(grad_act, h, M, f, act, grad_h);
}

void grouped_gemm_backward(const void* grad_out, const void* a, DType dtype, const WeightView& w,
                           const int32_t* expert_offsets, int64_t M, float* grad_a, void* grad_w) {
  if (w.packed || w.quant != nullptr)
    throw std::invalid_argument("w: expected plain weights (an array [E, N, K]); got packed or quantised weights");
  check_expert_offsets(expert_offsets, w.E, M, "expert_offsets");
  const int64_t E = w.E, N = w.N, K = w.K;
  if (K == 0) return;
  if (N == 0 || M == 0) {
    if (grad_a) std::memset(grad_a, 0, sizeof(float) * M * K);
    if (grad_w) std::memset(grad_w, 0, dtype_size(w.dtype) * E * N * K);
    return;
  }
  if (grad_a) {
    // grad_a[rows of e] = grad_out[rows of e] @ w[e]: the forward GEMM with w^T [K, N] as the weight. That
    // is w's own memory read the other way (a transposed view of a row-major w, a row-major view of a
    // transposed one), which the forward's packing and few-row paths take in place.
    WeightView w_t = w;
    w_t.N = K, w_t.K = N, w_t.transposed = !w.transposed;
    // bfloat16 gradients with an even N already are the rows vdpbf16ps takes. With a row-major w (w^T
    // transposed), every tile packs w^T and never reads float32 rows, so none are made; the few-row path
    // of a transposed w streams its rows of w^T against float32 rows.
    const bool rows_as_they_are = dtype == DType::bf16 && N % 2 == 0 && detail::use_bf16_dot(dtype, w_t);
    const bool no_f32_rows = rows_as_they_are && w_t.transposed;
    const auto* rows_bf16 = rows_as_they_are ? static_cast<const uint16_t*>(grad_out) : nullptr;
    const float* grad_out32 = no_f32_rows ? nullptr : detail::as_f32(grad_out, dtype, M * N, Scratch::converted_in);
    detail::run_gemm(grad_out32, dtype, w_t, expert_offsets, false, Activation::swiglu(), nullptr, grad_a, rows_bf16);
  }
  if (grad_w) {
    // Both operands are read in place, in their dtype: the tiles widen (or pair) what they pack.
    GradWProblem problem;
    problem.grad_out = grad_out, problem.a = a, problem.dtype = dtype, problem.offsets = expert_offsets;
    problem.E = E, problem.N = N, problem.K = K, problem.grad_w = grad_w, problem.grad_w_dtype = w.dtype;
    problem.bf16_dot = detail::use_bf16_dot(dtype, w);
    const int threads = num_threads();  // read once: the scratch is sized for exactly this many
    kernels().grouped_gemm_grad_w(problem, threads, detail::gemm_scratch(threads));
  }
}

void bias_grad(const float* grad_out, const int32_t* expert_offsets, int64_t E, int64_t M, int64_t N,
               float* grad_bias) {
  check_expert_offsets(expert_offsets, E, M, "expert_offsets");
  // Cheap next to any GEMM (one pass over grad_out): a plain loop, rows added in order per expert.
  for (int64_t e = 0; e < E; ++e) {
    float* sum = grad_bias + e * N;
    std::memset(sum, 0, sizeof(float) * N);
    for (int64_t m = expert_offsets[e]; m < expert_offsets[e + 1]; ++m)
      for (int64_t n = 0; n < N; ++n) sum[n] += grad_out[m * N + n];
  }
}

void unpermute_backward(const float* grad_y, const float* y_perm, int64_t M, const int32_t* perm_rows,
                        const float* topk_weights, int64_t T, int64_t k, int64_t d, float* grad_y_perm,
                        float* grad_topk_weights) {
  check_perm_rows(perm_rows, T * k, M, "perm_rows");
  if (M * d > 0) std::memset(grad_y_perm, 0, sizeof(float) * M * d);
  if (T == 0) return;
  if (d == 0) {
    for (int64_t i = 0; i < T * k; ++i) grad_topk_weights[i] = 0.f;
    return;
  }
  // Tokens run in parallel only when no two slots write the same row (always so for permute's rows).
  unsigned char* seen = thread_workspace().get<unsigned char>(Scratch::backward_marks, M);
  std::memset(seen, 0, M);
  bool repeats = false;
  for (int64_t i = 0; i < T * k && !repeats; ++i)
    if (perm_rows[i] >= 0) repeats = seen[perm_rows[i]]++ != 0;
  // The kernel is memory bound and short (about 3 floats moved per multiply-add): a parallel region only
  // pays off with enough work per thread, and costs far more than it saves on a busy machine otherwise.
  constexpr int64_t kFloatsPerThread = int64_t{1} << 19;
  const int64_t useful = std::max<int64_t>(1, T * k * d / kFloatsPerThread);
  const int threads = repeats ? 1 : static_cast<int>(std::min<int64_t>(num_threads(), useful));
  kernels().unpermute_backward(grad_y, y_perm, perm_rows, topk_weights, T, k, d, threads, grad_y_perm,
                               grad_topk_weights);
}

void permute_backward(const float* grad_x_perm, int64_t M, const int32_t* perm_rows, int64_t T, int64_t k,
                      int64_t d, float* grad_x) {
  check_perm_rows(perm_rows, T * k, M, "perm_rows");
  if (T == 0 || d == 0) return;
  // The adjoint of the gather is the un-permute with unit weights (same slot-order sum).
  float* ones = thread_workspace().get<float>(Scratch::backward_marks, T * k);
  for (int64_t i = 0; i < T * k; ++i) ones[i] = 1.f;
  kernels().unpermute(grad_x_perm, perm_rows, ones, T, k, d, grad_x);
}

}  // namespace moe_ext
