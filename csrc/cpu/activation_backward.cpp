// Gradients of the expert activations (core/types.h's Activation): grad_h from grad_act = dL/d act(h).
// Gated, out = act(g') u'' with g' = min(g, L), u' = clip(u, -L, L), u'' = u' + up_offset:
//   du = da act(g') [|u| <= L],   dg = da u'' act'(g') [g <= L]
// (the clamps pass no gradient where they bite; NaN propagates). Softcaps (after the clamps, before
// up_offset): u'' = c_u tanh(u'/c_u) + up_offset gives du a factor 1 - tanh^2(u'/c_u); gate_softcap makes
// act = c_g t s with t = tanh(g'/c_g), s = sigmoid(a g'), act' = (1 - t^2) s + c_g t a s (1 - s).
// Non-gated: dz = da act'(z). With
//   silu_a:    act = z s,  act' = s (1 + a z (1 - s)),  s = sigmoid(a z)
//   gelu:      act' = Phi(z) + z phi(z) = 0.5 erfc(-z/sqrt2) + z exp(-z^2/2) / sqrt(2 pi)
//   gelu_tanh: act = z s,  act' = s + 2 z s (1 - s) y',  s = sigmoid(2y), y = c (z + 0.044715 z^3)
//   relu:      act' = [z > 0]          relu2: act = relu(z)^2, act' = 2 relu(z)
// silu runs on whole registers (tail and interleaved rows through lane buffers); the others per element
// (gelu and geglu exactly as before the descriptions existed).
#include "cpu/activation.h"
#include "cpu/common.h"
#include "cpu/kernels.h"
#include "cpu/vec.h"
#include "core/threads.h"

namespace moe_ext::cpu::MOE_EXT_CPU_NS {

namespace {

constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kSqrt2OverPi = 0.79788456080286536f;

float gelu(float z) { return 0.5f * z * erfcf(-z * kInvSqrt2); }
float gelu_grad(float z) { return 0.5f * erfcf(-z * kInvSqrt2) + z * kInvSqrt2Pi * expf(-0.5f * z * z); }
float relu(float z) { return z > 0.f ? z : (z <= 0.f ? 0.f : z); }       // NaN stays NaN
float relu_grad(float z) { return z > 0.f ? 1.f : (z <= 0.f ? 0.f : z); }  // NaN stays NaN

// The sigmoid(2y) of gelu_tanh, as 1 / (1 + e^(-2y)).
float gelu_tanh_gate(float z) { return 1.f / (1.f + expf(-2.f * kSqrt2OverPi * (z + 0.044715f * z * z * z))); }
float gelu_tanh(float z) { return z * gelu_tanh_gate(z); }
float gelu_tanh_grad(float z) {
  const float s = gelu_tanh_gate(z), dy = kSqrt2OverPi * (1.f + 3.f * 0.044715f * z * z);
  return s + 2.f * z * s * (1.f - s) * dy;
}

// act and act' of one element for the fns computed per element (not silu).
void value_and_grad(ActivationFn fn, float z, float* value, float* grad) {
  switch (fn) {
    case ActivationFn::gelu: *value = gelu(z), *grad = gelu_grad(z); return;
    case ActivationFn::gelu_tanh: *value = gelu_tanh(z), *grad = gelu_tanh_grad(z); return;
    case ActivationFn::relu: *value = relu(z), *grad = relu_grad(z); return;
    case ActivationFn::relu2:
    case ActivationFn::silu: break;
  }
  const float r = relu(z);
  *value = r * r, *grad = 2.f * r;
}

// One lane block of grad_h: z and up the (unclamped) inputs, results in dz and du (du unused when not
// gated). silu on registers, the other fns per lane.
void block_grad(const Activation& a, const float* da, const float* z_in, const float* up_in, float* dz, float* du) {
  vec z = load(z_in), up = a.gated ? load(up_in) : vec{};
  const vec grad = load(da);
  const vec z_raw = z, up_raw = up;
  const bool clamp = a.gated && has_limit(a);
  if (clamp) z = vclamp_max(z, a.limit), up = vclamp_abs(up, a.limit);
  vec up_slope = broadcast(1.f);  // d softcap(u') / du', used only with an up_softcap
  if (has_up_softcap(a)) {
    const vec t = vtanh(up / a.up_softcap);
    up = a.up_softcap * t, up_slope = 1.f - t * t;
  }
  if (a.gated && a.up_offset != 0.f) up = up + a.up_offset;
  vec dgate, dup;
  if (has_gate_softcap(a)) {
    const vec t = vtanh(z / a.gate_softcap), s = 1.f / (1.f + vexp(-(a.alpha * z)));
    const vec capped = a.gate_softcap * t;
    dgate = grad * up * ((1.f - t * t) * s + capped * (a.alpha * s * (1.f - s)));
    dup = grad * (capped * s);
  } else if (a.fn == ActivationFn::silu) {
    // The products associate as they always have, so swiglu's gradients keep their bits.
    const vec az = a.alpha * z, s = 1.f / (1.f + vexp(-az));
    if (!a.gated) {
      store(dz, grad * s * (1.f + az * (1.f - s)));
      return;
    }
    dgate = grad * up * s * (1.f + az * (1.f - s));
    dup = grad * z * s;
  } else {
    float z_lanes[kLanes], v_lanes[kLanes], g_lanes[kLanes];
    store(z_lanes, z);
    for (int j = 0; j < kLanes; ++j) value_and_grad(a.fn, z_lanes[j], v_lanes + j, g_lanes + j);
    const vec value = load(v_lanes), slope = load(g_lanes);
    if (!a.gated) {
      store(dz, grad * slope);
      return;
    }
    dgate = grad * up * slope;
    dup = grad * value;
  }
  if (has_up_softcap(a)) dup = dup * up_slope;
  if (clamp) {
    dgate = z_raw > a.limit ? broadcast(0.f) : dgate;
    dup = (up_raw > a.limit) | (up_raw < -a.limit) ? broadcast(0.f) : dup;
  }
  store(dz, dgate);
  store(du, dup);
}

// One row: gate/z at z[i * stride], up at up[i * stride], gradients to dz / du at the same places.
void row_grad(const Activation& activation, const float* da, const float* z, const float* up, int64_t stride,
              int64_t f, float* dz, float* du) {
  const Activation a = activation;  // a local copy: stores to dz / du cannot alias its fields
  int64_t i = 0;
  if (stride == 1)
    for (; i + kLanes <= f; i += kLanes)
      block_grad(a, da + i, z + i, a.gated ? up + i : nullptr, dz + i, a.gated ? du + i : nullptr);
  for (; i < f; i += kLanes) {
    float t_da[kLanes] = {}, t_z[kLanes] = {}, t_up[kLanes] = {}, t_dz[kLanes], t_du[kLanes];
    const int64_t count = f - i < kLanes ? f - i : kLanes;
    for (int64_t j = 0; j < count; ++j)
      t_da[j] = da[i + j], t_z[j] = z[(i + j) * stride], t_up[j] = a.gated ? up[(i + j) * stride] : 0.f;
    block_grad(a, t_da, t_z, t_up, t_dz, t_du);
    for (int64_t j = 0; j < count; ++j) {
      dz[(i + j) * stride] = t_dz[j];
      if (a.gated) du[(i + j) * stride] = t_du[j];
    }
  }
}

}  // namespace

void activation_backward(const float* grad_act, const float* h, int64_t M, int64_t f, const Activation& activation,
                         int threads, float* grad_h) {
  const bool gated = is_gated(activation), interleaved = gated && activation.interleaved;
  const int64_t h_cols = gated ? 2 * f : f;
  const int64_t up_at = interleaved ? 1 : f, stride = interleaved ? 2 : 1;
  MOE_EXT_PARALLEL_FOR(threads)
  for (int64_t m = 0; m < M; ++m) {
    const float* row = h + m * h_cols;
    float* dst = grad_h + m * h_cols;
    row_grad(activation, grad_act + m * f, row, gated ? row + up_at : nullptr, stride, f, dst,
             gated ? dst + up_at : nullptr);
  }
}

}  // namespace moe_ext::cpu::MOE_EXT_CPU_NS
