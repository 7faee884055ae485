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

// The four activations the CUDA kernels implement, by code (the CPU side describes activations with
// core/types.h's moe_ext::Activation, which this name shadows inside moe_ext::cuda).
enum class Activation : int { swiglu = 0, geglu = 1, relu = 2, gelu = 3 };

// What GEMM1's epilogue applies: nothing, or the expert activation (gated ones read [gate | up] from the
// two halves of w's N rows and write N/2 columns).
enum class Epilogue : int { none = -1, swiglu = 0, geglu = 1, relu = 2, gelu = 3 };

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

// out [M, N_out] = epilogue(a[rows of e] @ w[e]^T); w [E, N, K]; N_out = N/2 for gated epilogues, else N.
// Rows expert_offsets[E]..M-1 of out are zeros. decode: the GEMV-style path for few rows (M small).
void grouped_gemm(const void* a, const void* w, const int32_t* expert_offsets, int64_t E, int64_t M,
                  int64_t N, int64_t K, DType dtype, Epilogue epilogue, void* out, Stream stream);
bool grouped_gemm_uses_decode(int64_t M);

// y [T, d] = sum_j topk_weights[t, j] * y_perm[perm_rows[t, j]] in slot order (weights null: 1).
void unpermute(const void* y_perm, const int32_t* perm_rows, const float* topk_weights, int64_t T, int64_t k,
               int64_t d, int64_t M, DType dtype, void* y, Stream stream);

// Standalone activation: h [M, 2f or f] -> out [M, f].
void activate(const void* h, int64_t M, int64_t f, Activation activation, DType dtype, void* out, Stream stream);

// ---- backward ----
// dh [M, 2f or f] from h and d_act [M, f].
void activation_backward(const void* h, const void* d_act, int64_t M, int64_t f, Activation activation,
                         DType dtype, void* dh, Stream stream);
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
