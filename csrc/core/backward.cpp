#include "core/backward.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "core/checks.h"
#include "core/gemm_call.h"
#include "core/kernels.h"
#include "core/threads.h"
#include "core/workspace.h"

namespace moe_ext {

namespace {

// Floats per block of rows of a 16-bit activation, per thread: the block's float32 operands and result
// (256 KiB) stay in the core's L2 between the widening, the kernel and the rounding.
constexpr int64_t kActivationBlockFloats = 64 * 1024;

// Runs `kernel(in0, in1, out, rows, threads)` on float32 rows: directly on float32 data (all threads),
// else one block of rows per thread at a time in one parallel loop, each block widened into the thread's
// part of the workspace (in0_cols / in1_cols floats a row; in1 may be null) and its result (out_cols a
// row) rounded to `dtype`. A parallel region per step of each block cost more than the work at small M.
template <typename Kernel>
void by_row_blocks(const void* in0, int64_t in0_cols, const void* in1, int64_t in1_cols, DType dtype, int64_t M,
                   void* out, int64_t out_cols, Kernel kernel) {
  const int threads = num_threads();
  if (dtype == DType::f32) {
    kernel(static_cast<const float*>(in0), static_cast<const float*>(in1), static_cast<float*>(out), M, threads);
    return;
  }
  const int64_t row_floats = in0_cols + in1_cols + out_cols;
  const int64_t block = std::max<int64_t>(1, kActivationBlockFloats / std::max<int64_t>(1, row_floats));
  const int64_t blocks = (M + block - 1) / block;
  float* buf = thread_workspace().get<float>(Scratch::converted_in, threads * block * row_floats);
  const Kernels& kern = kernels();
  const int64_t size = dtype_size(dtype);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t m0 = b * block, rows = std::min(block, M - m0);
#ifdef _OPENMP
    float* a = buf + omp_get_thread_num() * block * row_floats;
#else
    float* a = buf;
#endif
    float* in1_rows = a + rows * in0_cols;
    float* c = in1_rows + rows * in1_cols;
    kern.widen(static_cast<const char*>(in0) + m0 * in0_cols * size, dtype, rows * in0_cols, 1, a);
    if (in1) kern.widen(static_cast<const char*>(in1) + m0 * in1_cols * size, dtype, rows * in1_cols, 1, in1_rows);
    kernel(a, in1 ? in1_rows : nullptr, c, rows, 1);
    kern.narrow(c, rows * out_cols, dtype, 1, static_cast<char*>(out) + m0 * out_cols * size);
  }
}

}  // namespace

void activation(const void* h, DType dtype, int64_t M, int64_t f, const Activation& act, void* out) {
  if (M == 0 || f == 0) return;
  const int64_t h_cols = is_gated(act) ? 2 * f : f;
  by_row_blocks(h, h_cols, nullptr, 0, dtype, M, out, f,
                [&](const float* h32, const float*, float* o, int64_t rows, int threads) {
                  kernels().activate(h32, rows, f, act, threads, o);
                });
}

void activation_backward(const void* grad_act, const void* h, DType dtype, int64_t M, int64_t f,
                         const Activation& act, void* grad_h) {
  if (M == 0 || f == 0) return;
  const int64_t h_cols = is_gated(act) ? 2 * f : f;
  by_row_blocks(grad_act, f, h, h_cols, dtype, M, grad_h, h_cols,
                [&](const float* g32, const float* h32, float* o, int64_t rows, int threads) {
                  kernels().activation_backward(g32, h32, rows, f, act, threads, o);
                });
}

void grouped_gemm_backward(const void* grad_out, const void* a, DType dtype, const WeightView& w,
                           const int32_t* expert_offsets, int64_t M, void* grad_a, DType grad_a_dtype, void* grad_w) {
  if (w.packed || w.quant != nullptr)
    throw std::invalid_argument("w: expected plain weights (an array [E, N, K]); got packed or quantised weights");
  check_expert_offsets(expert_offsets, w.E, M, "expert_offsets");
  const int64_t E = w.E, N = w.N, K = w.K;
  if (K == 0) return;
  if (N == 0 || M == 0) {
    if (grad_a) std::memset(grad_a, 0, dtype_size(grad_a_dtype) * M * K);
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
    float* grad_a32 = detail::f32_target(grad_a, grad_a_dtype, M * K);
    detail::run_gemm(grad_out32, dtype, w_t, expert_offsets, false, Activation::swiglu(), nullptr, grad_a32, rows_bf16);
    detail::finish_f32(grad_a32, M * K, grad_a_dtype, grad_a);
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
