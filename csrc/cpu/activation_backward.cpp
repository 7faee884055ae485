// Gradients of the expert activations (csrc/cpu/activation.cpp): grad_h from grad_act = dL/d act(h).
//   SwiGLU  a = silu(g) u:  du = da silu(g),  dg = da u s (1 + g (1 - s)),  s = sigmoid(g)
//   GeGLU   a = gelu(g) u:  du = da gelu(g),  dg = da u gelu'(g)
//   ReLU:   dz = da [z > 0]          GELU: dz = da gelu'(z)
// with gelu'(z) = Phi(z) + z phi(z) = 0.5 erfc(-z/sqrt2) + z exp(-z^2/2) / sqrt(2 pi).
#include "cpu/common.h"
#include "cpu/kernels.h"
#include "cpu/vec.h"
#include "core/threads.h"

namespace moe_ext::cpu::MOE_EXT_CPU_NS {

namespace {

constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

float gelu(float z) { return 0.5f * z * erfcf(-z * kInvSqrt2); }
float gelu_grad(float z) { return 0.5f * erfcf(-z * kInvSqrt2) + z * kInvSqrt2Pi * expf(-0.5f * z * z); }
float relu_grad(float z) { return z > 0.f ? 1.f : (z <= 0.f ? 0.f : z); }  // NaN stays NaN

// SwiGLU on whole registers, tail through a lane buffer (same code for every element of a row).
void swiglu_block(const float* da, const float* g, const float* u, float* dg, float* du) {
  const vec z = load(g), s = 1.f / (1.f + vexp(-z)), grad = load(da), up = load(u);
  store(du, grad * z * s);
  store(dg, grad * up * s * (1.f + z * (1.f - s)));
}

void swiglu_row(const float* da, const float* gate, const float* up, int64_t f, float* dgate, float* dup) {
  int64_t i = 0;
  for (; i + kLanes <= f; i += kLanes) swiglu_block(da + i, gate + i, up + i, dgate + i, dup + i);
  if (i == f) return;
  float t_da[kLanes] = {}, t_g[kLanes] = {}, t_u[kLanes] = {}, t_dg[kLanes], t_du[kLanes];
  for (int64_t j = 0; i + j < f; ++j) t_da[j] = da[i + j], t_g[j] = gate[i + j], t_u[j] = up[i + j];
  swiglu_block(t_da, t_g, t_u, t_dg, t_du);
  for (int64_t j = 0; i + j < f; ++j) dgate[i + j] = t_dg[j], dup[i + j] = t_du[j];
}

}  // namespace

void activation_backward(const float* grad_act, const float* h, int64_t M, int64_t f, Activation activation,
                         float* grad_h) {
  const bool gated = is_gated(activation);
  const int64_t h_cols = gated ? 2 * f : f;
  const int threads = num_threads();
  MOE_EXT_PARALLEL_FOR(threads)
  for (int64_t m = 0; m < M; ++m) {
    const float* da = grad_act + m * f;
    const float* row = h + m * h_cols;
    float* dst = grad_h + m * h_cols;
    switch (activation) {
      case Activation::swiglu: swiglu_row(da, row, row + f, f, dst, dst + f); break;
      case Activation::geglu:
        for (int64_t i = 0; i < f; ++i) {
          dst[f + i] = da[i] * gelu(row[i]);
          dst[i] = da[i] * row[f + i] * gelu_grad(row[i]);
        }
        break;
      case Activation::relu:
        for (int64_t i = 0; i < f; ++i) dst[i] = da[i] * relu_grad(row[i]);
        break;
      case Activation::gelu:
        for (int64_t i = 0; i < f; ++i) dst[i] = da[i] * gelu_grad(row[i]);
        break;
    }
  }
}

}  // namespace moe_ext::cpu::MOE_EXT_CPU_NS
