// Internal to core: what ops.cpp and backward.cpp share to run a grouped GEMM (defined in ops.cpp): float32
// views of 16-bit inputs, the kernels' scratch and the call itself. Not part of the C++ API.
#pragma once
#include <cstdint>

#include "core/types.h"
#include "core/workspace.h"

namespace moe_ext::detail {

// Whether a grouped GEMM multiplies with vdpbf16ps: the caller's activations and w are bfloat16, on the avx512
// tier of a CPU with AVX512_BF16 (see GemmProblem::bf16_dot).
bool use_bf16_dot(DType activations, const WeightView& w);
// Where a float32 result of n elements goes: out itself (float32), or a workspace buffer that finish_f32
// then rounds into out.
float* f32_target(void* out, DType dtype, int64_t n);
void finish_f32(const float* result, int64_t n, DType dtype, void* out);
// a [M, K] rounded to bfloat16 once (rows padded to even K with a zero), in the gemm_a_bf16 slot: the
// vdpbf16ps operand (GemmProblem::a_bf16, QuantGemmProblem::a_bf16).
const uint16_t* round_rows_to_bf16(const float* a, int64_t M, int64_t K);
// `data` as float32: itself, or a widened copy in the workspace slot.
const float* as_f32(const void* data, DType dtype, int64_t n, Scratch slot);
// The grouped GEMM kernels' per-thread scratch (kGemmScratchBytes each) for `threads` threads.
void* gemm_scratch(int threads);
// out [M, N] (or the activation's [M, f]) = a [M, K] @ w[e]^T per expert, on the current tier. caller_dtype:
// the dtype the caller's activations came in (decides vdpbf16ps). a_bf16: with vdpbf16ps, a's rows already
// rounded (then a itself may be null: packed weights never read the float32 rows under vdpbf16ps); null to
// round them here.
void run_gemm(const float* a, DType caller_dtype, const WeightView& w, const int32_t* offsets, bool fuse,
              const Activation& activation, const float* bias, float* out, const uint16_t* a_bf16 = nullptr);

}  // namespace moe_ext::detail
