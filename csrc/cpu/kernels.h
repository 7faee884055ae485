// The kernels of one tier; csrc/cpu/*.cpp are compiled once per tier with MOE_EXT_CPU_NS naming it.
#pragma once
#include "core/kernels.h"

namespace moe_ext::cpu::MOE_EXT_CPU_NS {

void route(const float* x, const float* w_router, int64_t T, int64_t d, int64_t E,
           const RouteConfig& config, int threads, float* scratch, float* topk_weights, int32_t* topk_ids,
           float* probs);
void gather_rows(const void* x, DType x_dtype, const int32_t* perm_rows, int64_t T, int64_t k, int64_t d,
                 void* x_perm, DType perm_dtype);
void grouped_gemm(const GemmProblem& problem, int threads, void* scratch);
void pack_weight(const WeightView& w, int threads, void* packed);
void widen(const void* src, DType dtype, int64_t n, int threads, float* dst);
void narrow(const float* src, int64_t n, DType dtype, int threads, void* dst);
void activate(const float* h, int64_t M, int64_t f, const Activation& activation, int threads, float* out);
void unpermute(const float* y_perm, const int32_t* perm_rows, const float* weights, int64_t T,
               int64_t k, int64_t d, float* y);
void activation_backward(const float* grad_act, const float* h, int64_t M, int64_t f, const Activation& activation,
                         int threads, float* grad_h);
void unpermute_backward(const float* grad_y, const float* y_perm, const int32_t* perm_rows, const float* weights,
                        int64_t T, int64_t k, int64_t d, int threads, float* grad_y_perm, float* grad_weights);
void grouped_gemm_grad_w(const GradWProblem& problem, int threads, void* scratch);
void quant_gemm(const QuantGemmProblem& problem, int threads, void* scratch);
const Kernels& kernels();

}  // namespace moe_ext::cpu::MOE_EXT_CPU_NS
