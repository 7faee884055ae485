#include "core/backward.h"

#include <algorithm>
#include <cstring>

#include "core/checks.h"
#include "core/kernels.h"
#include "core/threads.h"
#include "core/workspace.h"

namespace moe_ext {

void activation(const float* h, int64_t M, int64_t f, Activation act, float* out) {
  if (M == 0 || f == 0) return;
  kernels().activate(h, M, f, act, out);
}

void activation_backward(const float* grad_act, const float* h, int64_t M, int64_t f, Activation act,
                         float* grad_h) {
  if (M == 0 || f == 0) return;
  kernels().activation_backward(grad_act, h, M, f, act, grad_h);
}

namespace {

// The forward grouped GEMM kernel on one expert: out [rows, N] = a [rows, K] @ w [N, K]^T.
void gemm_nt(const Kernels& kern, const float* a, const float* w, int64_t rows, int64_t N, int64_t K, float* out) {
  if (rows == 0 || N == 0) return;
  const int32_t offsets[2] = {0, static_cast<int32_t>(rows)};
  const int threads = num_threads();  // read once: the scratch is sized for exactly this many
  void* scratch = thread_workspace().get(Scratch::gemm_panels, static_cast<std::size_t>(threads) * kGemmScratchBytes);
  GemmProblem problem;
  problem.a = a;
  problem.w.data = w;
  problem.w.E = 1;
  problem.w.N = N;
  problem.w.K = K;
  problem.offsets = offsets;
  problem.out = out;
  kern.grouped_gemm(problem, threads, scratch);
}

}  // namespace

void grouped_gemm_backward(const float* grad_out, const float* a, const float* w, const int32_t* expert_offsets,
                           int64_t E, int64_t M, int64_t N, int64_t K, float* grad_a, float* grad_w) {
  check_expert_offsets(expert_offsets, E, M, "expert_offsets");
  const Kernels& kern = kernels();
  Workspace& ws = thread_workspace();
  if (grad_a && K > 0) {
    if (N == 0) std::memset(grad_a, 0, sizeof(float) * M * K);
    float* w_t = ws.get<float>(Scratch::backward_lhs, N * K);
    for (int64_t e = 0; e < E && N > 0; ++e) {
      const int64_t r0 = expert_offsets[e], rows = expert_offsets[e + 1] - r0;
      if (rows == 0) continue;
      // grad_a[rows] = grad_out[rows] @ w[e] = grad_out[rows] @ (w[e]^T [K, N])^T
      kern.transpose(w + e * N * K, N, K, K, w_t);
      gemm_nt(kern, grad_out + r0 * N, w_t, rows, K, N, grad_a + r0 * K);
    }
  }
  if (grad_w && N > 0 && K > 0) {
    int64_t max_rows = 0;
    for (int64_t e = 0; e < E; ++e) max_rows = std::max<int64_t>(max_rows, expert_offsets[e + 1] - expert_offsets[e]);
    float* g_t = ws.get<float>(Scratch::backward_lhs, N * max_rows);
    float* a_t = ws.get<float>(Scratch::backward_rhs, K * max_rows);
    for (int64_t e = 0; e < E; ++e) {
      const int64_t r0 = expert_offsets[e], rows = expert_offsets[e + 1] - r0;
      float* dst = grad_w + e * N * K;
      if (rows == 0) {
        std::memset(dst, 0, sizeof(float) * N * K);
        continue;
      }
      // grad_w[e] [N, K] = grad_out[rows]^T @ a[rows] = (grad_out[rows]^T [N, rows]) @ (a[rows]^T [K, rows])^T
      kern.transpose(grad_out + r0 * N, rows, N, N, g_t);
      kern.transpose(a + r0 * K, rows, K, K, a_t);
      gemm_nt(kern, g_t, a_t, N, K, rows, dst);
    }
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
  kernels().unpermute_backward(grad_y, y_perm, perm_rows, topk_weights, T, k, d, repeats ? 1 : num_threads(),
                               grad_y_perm, grad_topk_weights);
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
