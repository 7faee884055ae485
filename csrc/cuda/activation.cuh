// The expert activations on the device: core/types.h's Activation (passed to the kernels by value), one
// element at a time in float32, with the formulas of the CPU kernels (csrc/cpu/activation.h forward,
// csrc/cpu/activation_backward.cpp backward). Shared by the GEMM1 epilogue (gemm_tile.cuh,
// grouped_gemm_decode.cu) and the standalone kernels (elementwise.cu).
// Gated: out = act(g') u'' with g' = min(g, L), u' = clip(u, -L, L), u'' = softcap(u') + up_offset, gate
// and up at [gate | up] (columns i and f + i of a 2f row) or interleaved (columns 2i and 2i + 1).
#pragma once
#include "cuda/common.cuh"

namespace moe_ext::cuda {

constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kSqrt2OverPi = 0.79788456080286536f;

// Where output column i's gate and up sit in a gated row of 2f values.
__host__ __device__ __forceinline__ int64_t gate_column(bool interleaved, int64_t i) { return interleaved ? 2 * i : i; }
__host__ __device__ __forceinline__ int64_t up_column(bool interleaved, int64_t f, int64_t i) {
  return interleaved ? 2 * i + 1 : f + i;
}
// Gated and interleaved: the CPU kernels ignore `interleaved` without a gate, and so do these.
__host__ __device__ __forceinline__ bool is_interleaved(const Activation& a) { return a.gated && a.interleaved; }
// An epilogue that applies a gated activation halves the columns (2f products -> f outputs).
__host__ __device__ __forceinline__ bool halves_columns(const Epilogue& e) { return e.activate && e.activation.gated; }

// NaN stays NaN (a max() would turn it into 0).
__device__ __forceinline__ float relu(float z) { return z > 0.f ? z : (z <= 0.f ? 0.f : z); }
__device__ __forceinline__ float relu_grad(float z) { return z > 0.f ? 1.f : (z <= 0.f ? 0.f : z); }
// z sigmoid(alpha z) as z / (1 + e^(-alpha z)) (as the CPU's vsilu_alpha).
__device__ __forceinline__ float silu(float z, float alpha) { return z / (1.f + expf(-(alpha * z))); }
// 0.5 z erfc(-z / sqrt2): the exact GELU without the cancellation of 1 + erf in the negative tail.
__device__ __forceinline__ float gelu(float z) { return 0.5f * z * erfcf(-z * kInvSqrt2); }
__device__ __forceinline__ float gelu_grad(float z) {
  return 0.5f * erfcf(-z * kInvSqrt2) + z * kInvSqrt2Pi * expf(-0.5f * z * z);
}
// The tanh GELU 0.5 z (1 + tanh(y)), y = sqrt(2/pi) (z + 0.044715 z^3), as the equal z sigmoid(2y).
__device__ __forceinline__ float gelu_tanh_gate(float z) {
  return 1.f / (1.f + expf(z * (-1.5957691216057308f + -0.0713548162726009f * (z * z))));
}
__device__ __forceinline__ float gelu_tanh(float z) { return z * gelu_tanh_gate(z); }
__device__ __forceinline__ float softcap(float z, float c) { return c * tanhf(z / c); }

// min(z, limit) and clip(z, -limit, limit); NaN passes both comparisons (torch.clamp). limit = +inf: z.
__device__ __forceinline__ float clamp_max(float z, float limit) { return z > limit ? limit : z; }
__device__ __forceinline__ float clamp_abs(float z, float limit) {
  return z > limit ? limit : (z < -limit ? -limit : z);
}

__device__ __forceinline__ float activation_fn(const Activation& a, float z) {
  switch (a.fn) {
    case ActivationFn::silu: return silu(z, a.alpha);
    case ActivationFn::gelu: return gelu(z);
    case ActivationFn::gelu_tanh: return gelu_tanh(z);
    case ActivationFn::relu: return relu(z);
    case ActivationFn::relu2: break;
  }
  const float r = relu(z);
  return r * r;
}

// act and act' of one element for the fns other than silu (whose gradient is formed in activation_grad).
__device__ __forceinline__ void value_and_grad(ActivationFn fn, float z, float& value, float& grad) {
  switch (fn) {
    case ActivationFn::gelu: value = gelu(z), grad = gelu_grad(z); return;
    case ActivationFn::gelu_tanh: {
      const float s = gelu_tanh_gate(z), dy = kSqrt2OverPi * (1.f + 3.f * 0.044715f * z * z);
      value = z * s, grad = s + 2.f * z * s * (1.f - s) * dy;
      return;
    }
    case ActivationFn::relu: value = relu(z), grad = relu_grad(z); return;
    case ActivationFn::relu2:
    case ActivationFn::silu: break;
  }
  const float r = relu(z);
  value = r * r, grad = 2.f * r;
}

// The activation of one output element: act(z) (not gated; `up` unused), else the gated product.
__device__ __forceinline__ float activate_value(const Activation& a, float z, float up) {
  if (!a.gated) return activation_fn(a, z);
  z = clamp_max(z, a.limit), up = clamp_abs(up, a.limit);
  if (a.up_softcap > 0.f) up = softcap(up, a.up_softcap);
  if (a.up_offset != 0.f) up = up + a.up_offset;
  // gate_softcap: softcap(g) sigmoid(alpha g), the sigmoid on the (clamped) gate itself
  const float act = a.gate_softcap > 0.f ? softcap(z, a.gate_softcap) / (1.f + expf(-(a.alpha * z)))
                                         : activation_fn(a, z);
  return act * up;
}

// dL/dz and (gated) dL/du of one output element from grad = dL/d out and the raw inputs z (the gate) and
// up. The clamps pass no gradient where they bite; NaN propagates.
__device__ __forceinline__ void activation_grad(const Activation& a, float grad, float z_raw, float up_raw, float& dz,
                                                float& du) {
  if (!a.gated) {
    if (a.fn == ActivationFn::silu) {
      const float az = a.alpha * z_raw, s = 1.f / (1.f + expf(-az));
      dz = grad * s * (1.f + az * (1.f - s));
    } else {
      float value, slope;
      value_and_grad(a.fn, z_raw, value, slope);
      dz = grad * slope;
    }
    du = 0.f;
    return;
  }
  const float z = clamp_max(z_raw, a.limit);
  float up = clamp_abs(up_raw, a.limit), up_slope = 1.f;  // up_slope: d softcap(u') / du'
  if (a.up_softcap > 0.f) {
    const float t = tanhf(up / a.up_softcap);
    up = a.up_softcap * t, up_slope = 1.f - t * t;
  }
  if (a.up_offset != 0.f) up = up + a.up_offset;
  float d_gate, d_up;
  if (a.gate_softcap > 0.f) {  // act = c t s, t = tanh(z / c), s = sigmoid(alpha z)
    const float t = tanhf(z / a.gate_softcap), s = 1.f / (1.f + expf(-(a.alpha * z))), capped = a.gate_softcap * t;
    d_gate = grad * up * ((1.f - t * t) * s + capped * (a.alpha * s * (1.f - s)));
    d_up = grad * (capped * s);
  } else if (a.fn == ActivationFn::silu) {
    const float az = a.alpha * z, s = 1.f / (1.f + expf(-az));
    d_gate = grad * up * s * (1.f + az * (1.f - s));
    d_up = grad * z * s;
  } else {
    float value, slope;
    value_and_grad(a.fn, z, value, slope);
    d_gate = grad * up * slope;
    d_up = grad * value;
  }
  if (a.up_softcap > 0.f) d_up = d_up * up_slope;
  dz = z_raw > a.limit ? 0.f : d_gate;
  du = (up_raw > a.limit) || (up_raw < -a.limit) ? 0.f : d_up;
}

}  // namespace moe_ext::cuda
