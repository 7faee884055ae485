// The host-side launchers of the CUDA kernels: plain C++ (no CUDA headers), raw device pointers, a dtype
// code and a stream handle, so that the bindings (csrc/python/cuda_module.cpp) need neither nvcc nor
// libtorch. Launchers never synchronise and never allocate: callers pass every output and scratch buffer.
// Every launcher throws std::runtime_error if no CUDA device is present or a launch fails, and
// std::invalid_argument for sizes it cannot handle.
#pragma once
#include <cstdint>

#include "core/types.h"

namespace moe_ext::cuda {

// Element type of activations and weights. Scores, top-k weights and accumulation are always float32.
enum class DType : int { float32 = 0, bfloat16 = 1, float16 = 2 };

// What a grouped GEMM's epilogue does to each float32 product before it is stored: bias[e] added (w's row
// order), then, with `activate`, the expert activation (core/types.h's moe_ext::Activation, the CPU
// kernels' description: gated ones read gate and up from w's N = 2f rows, [gate | up] or interleaved,
// and write N/2 columns).
struct Epilogue {
  const float* bias = nullptr;  // [E, N] float32, or null
  bool activate = false;
  Activation activation;
};

using Stream = void*;  // a cudaStream_t

int device_count();             // 0 without a device or driver; never throws
const char* runtime_error();    // why device_count() is 0 ("" when a device is present)
void require_device(const char* what);  // std::runtime_error naming `what` when device_count() == 0
int runtime_version();          // the CUDA runtime version this module was built with (e.g. 13000)

// ---- forward ----
// topk_weights, topk_ids [T, k]; probs [T, E] or null. x [T, d], w_router [E, d] of `dtype`;
// bias, correction_bias float32 [E] or null.
void route(const void* x, const void* w_router, int64_t T, int64_t d, int64_t E, DType dtype,
           const RouteConfig& config, float* topk_weights, int32_t* topk_ids, float* probs, Stream stream);

// Scratch (bytes) permute_plan needs for T*k copies over E experts.
int64_t permute_scratch_bytes(int64_t T, int64_t k, int64_t E);
// Counting sort on the device: expert_offsets [E+1], perm_rows [T, k] (-1 for dropped copies and for
// ids outside 0..E-1, which are never dereferenced). capacity < 0: none.
void permute_plan(const int32_t* topk_ids, int64_t T, int64_t k, int64_t E, int64_t capacity,
                  int32_t* expert_offsets, int32_t* perm_rows, void* scratch, Stream stream);
// x_perm[perm_rows[t, j]] = x[t] (row -1: skipped); x_perm has M rows, rows no copy maps to are untouched.
void gather_rows(const void* x, const int32_t* perm_rows, int64_t T, int64_t k, int64_t d, int64_t M,
                 DType dtype, void* x_perm, Stream stream);

// out [M, N_out] = epilogue(a[rows of e] @ w[e]^T); w [E, N, K]; N_out = N/2 for gated activations, else N.
// Rows expert_offsets[E]..M-1 of out are zeros (no bias). decode: the GEMV-style path for few rows.
void grouped_gemm(const void* a, const void* w, const int32_t* expert_offsets, int64_t E, int64_t M,
                  int64_t N, int64_t K, DType dtype, const Epilogue& epilogue, void* out, Stream stream);
bool grouped_gemm_uses_decode(int64_t M);

// y [T, d] = sum_j topk_weights[t, j] * y_perm[perm_rows[t, j]] in slot order (weights null: 1).
void unpermute(const void* y_perm, const int32_t* perm_rows, const float* topk_weights, int64_t T, int64_t k,
               int64_t d, int64_t M, DType dtype, void* y, Stream stream);

// Standalone activation: h [M, 2f (gated) or f] -> out [M, f].
void activate(const void* h, int64_t M, int64_t f, const Activation& activation, DType dtype, void* out,
              Stream stream);

// ---- backward ----
// dh [M, 2f or f] from h and d_act [M, f] (same layout as h; clamped inputs get 0 where the clamp bites).
void activation_backward(const void* h, const void* d_act, int64_t M, int64_t f, const Activation& activation,
                         DType dtype, void* dh, Stream stream);
// grad_bias [E, N] float32 = the sums of grad_out's [M, N] rows per expert (the gradient of an expert bias
// added to those rows); rows past expert_offsets[E] count for nobody, experts with no rows get zeros.
// One block per (expert, 32 columns), sums in a fixed order: deterministic, no atomics.
void bias_grad(const void* grad_out, const int32_t* expert_offsets, int64_t E, int64_t M, int64_t N, DType dtype,
               float* grad_bias, Stream stream);
// dst [B, C, R] = transpose of src [B, R, C] per batch.
void transpose(const void* src, int64_t B, int64_t R, int64_t C, DType dtype, void* dst, Stream stream);
// dw [E, N, K]: dw[e] = d_out[rows of e]^T @ a[rows of e], from the transposes d_out_t [N, M] and
// a_t [K, M]; zeros for experts with no rows. One block per output tile: deterministic, no atomics.
void grouped_gemm_dw(const void* d_out_t, const void* a_t, const int32_t* expert_offsets, int64_t E,
                     int64_t M, int64_t N, int64_t K, DType dtype, void* dw, Stream stream);
// d_y_perm [M, d] (rows no copy maps to are untouched), d_weights [T, k] float32 (0 for dropped copies).
void unpermute_backward(const void* dy, const void* y_perm, const int32_t* perm_rows, const float* topk_weights,
                        int64_t T, int64_t k, int64_t d, int64_t M, DType dtype, void* d_y_perm,
                        float* d_weights, Stream stream);

}  // namespace moe_ext::cuda
