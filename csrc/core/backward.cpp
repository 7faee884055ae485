#include "core/backward.h"

#include <algorithm>
#include <cstring>

#include "core/checks.h"
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

void grouped_gemm_backward(const float* grad_out, const float* a, const float* w, const int32_t* expert_offsets,
                           int64_t E, int64_t M, int64_t N, int64_t K, float* grad_a, float* grad_w,
                           bool w_transposed) {
  check_expert_offsets(expert_offsets, E, M, "expert_offsets");
  const Kernels& kern = kernels();
  Workspace& ws = thread_workspace();
  const int threads = num_threads();  // read once: the scratch is sized for exactly this many
  void* scratch = ws.get(Scratch::gemm_panels, static_cast<std::size_t>(threads) * kGemmScratchBytes);
  if (grad_a && K > 0) {
    if (N == 0) {
      std::memset(grad_a, 0, sizeof(float) * M * K);
    } else if (M > 0) {
      // grad_a[rows of e] = grad_out[rows of e] @ w[e] = grad_out[rows] @ (w[e]^T [K, N])^T: every expert
      // with rows transposed once (a transposed w already is w^T in memory), then one grouped GEMM call
      // over all experts (the forward's tiling).
      const float* w_t = w;
      if (!w_transposed) {
        float* copy = ws.get<float>(Scratch::backward_lhs, E * N * K);
        for (int64_t e = 0; e < E; ++e)
          if (expert_offsets[e + 1] > expert_offsets[e]) kern.transpose(w + e * N * K, N, K, K, copy + e * N * K);
        w_t = copy;
      }
      GemmProblem problem;
      problem.a = grad_out;
      problem.w.data = w_t;
      problem.w.E = E;
      problem.w.N = K;
      problem.w.K = N;
      problem.offsets = expert_offsets;
      problem.out = grad_a;
      kern.grouped_gemm(problem, threads, scratch);
    }
  }
  if (grad_w && N > 0 && K > 0) kern.grouped_gemm_grad_w(grad_out, a, expert_offsets, E, N, K, threads, scratch, grad_w);
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
