// The expert activations on whole SIMD registers, shared by the activation kernel and the grouped
// GEMM's fused epilogue. A row's tail goes through the same vector code via a lane buffer, so every
// element of a row is computed the same way whatever its position.
#pragma once
#include "core/types.h"
#include "cpu/common.h"
#include "cpu/vec.h"

// erfc(x) to about 2e-7 relative for |x| < 10.5 (0 beyond, where erfc(x) < float32's denormals; 2 for
// x < -10.5): erfc(|x|) = t exp(-x^2 + P(t)), t = 1 / (1 + |x|/2), with the degree-9 Chebyshev-fitted
// P of Numerical Recipes' erfcc (fractional error < 1.2e-7 in exact arithmetic). x^2 is split as
// x_hi^2 + (x - x_hi)(x + x_hi), x_hi being x with 12 significant bits so x_hi^2 is exact: otherwise the
// rounding of x^2 alone would cost x^2 * 6e-8 relative, 5e-6 at x = 9.
static inline vec verfc(vec x) {
  const vec ax = x < 0.f ? -x : x;
  const vec t = 1.f / (1.f + 0.5f * ax);
  vec p = broadcast(0.17087277f);
  p = p * t - 0.82215223f;
  p = p * t + 1.48851587f;
  p = p * t - 1.13520398f;
  p = p * t + 0.27886807f;
  p = p * t - 0.18628806f;
  p = p * t + 0.09678418f;
  p = p * t + 0.37409196f;
  p = p * t + 1.00002368f;
  p = p * t - 1.26551223f;
  const vec ax_hi = (vec)((ivec)ax & ((ivec){} - 4096));  // keep sign, exponent and 11 mantissa bits
  const vec big = broadcast(10.5f);
  const vec ax_safe = ax < big ? ax : big;  // keeps inf and NaN out of the split (NaN is restored below)
  const vec hi = ax < big ? ax_hi : big;
  const vec r = t * vexp(-(hi * hi)) * vexp(p - (ax_safe - hi) * (ax_safe + hi));
  const vec tail = ax < big ? r : (ax == ax ? broadcast(0.f) : ax);
  return x < 0.f ? 2.f - tail : tail;
}

// 0.5 z erfc(-z / sqrt2): the exact GELU, with erfc keeping its relative accuracy in the negative tail
// where 1 + erf(z / sqrt2) cancels.
static inline vec vgelu(vec z) { return 0.5f * z * verfc(z * -0.70710678118654752f); }
static inline vec vsilu(vec z) { return z / (1.f + vexp(-z)); }
// NaN stays NaN (a max() would turn it into 0).
static inline vec vrelu(vec z) { return z > 0.f ? z : (z <= 0.f ? broadcast(0.f) : z); }

// gelu with the tanh approximation, 0.5 z (1 + tanh(y)) with y = sqrt(2/pi) (z + 0.044715 z^3), evaluated
// as the equal z sigmoid(2y) = z / (1 + e^(-2y)): no cancellation of 1 + tanh(y) in the negative tail.
static inline vec vgelu_tanh(vec z) {
  const vec minus_two_y = z * (-1.5957691216057308f + -0.0713548162726009f * (z * z));
  return z / (1.f + vexp(minus_two_y));
}
// z sigmoid(alpha z); alpha = 1 gives vsilu's bits (1 * z is z).
static inline vec vsilu_alpha(vec z, float alpha) { return z / (1.f + vexp(-(alpha * z))); }

// tanh(y): an odd Taylor polynomial to y^9 for |y| < 0.25 (next term < 1e-8 relative), else
// sign(y) (1 - e) / (1 + e) with e = e^(-2|y|) (no overflow; 1 - e loses at most ~2 bits there). NaN stays
// NaN, +-inf gives +-1.
static inline vec vtanh(vec y) {
  const vec ay = y < 0.f ? -y : y;
  const vec e = vexp(-2.f * ay);
  const vec big = (1.f - e) / (1.f + e);
  const vec y2 = y * y;
  vec p = broadcast(62.f / 2835.f);
  p = p * y2 - 17.f / 315.f;
  p = p * y2 + 2.f / 15.f;
  p = p * y2 - 1.f / 3.f;
  const vec small = y + y * y2 * p;
  return ay < 0.25f ? small : (y < 0.f ? -big : big);
}
// The softcap c tanh(z / c) (c > 0).
static inline vec vsoftcap(vec z, float c) { return c * vtanh(z / c); }
static inline bool has_gate_softcap(const moe_ext::Activation& a) { return a.gated && a.gate_softcap > 0.f; }
static inline bool has_up_softcap(const moe_ext::Activation& a) { return a.gated && a.up_softcap > 0.f; }

// min(z, limit) and clip(z, -limit, limit); NaN passes both comparisons, so it stays NaN (torch.clamp).
static inline vec vclamp_max(vec z, float limit) { return z > limit ? broadcast(limit) : z; }
static inline vec vclamp_abs(vec z, float limit) {
  return z > limit ? broadcast(limit) : (z < -limit ? broadcast(-limit) : z);
}
static inline bool has_limit(const moe_ext::Activation& a) { return a.limit < __builtin_inff(); }

static inline vec activate_fn(const moe_ext::Activation& a, vec z) {
  switch (a.fn) {
    case moe_ext::ActivationFn::silu: return vsilu_alpha(z, a.alpha);
    case moe_ext::ActivationFn::gelu: return vgelu(z);
    case moe_ext::ActivationFn::gelu_tanh: return vgelu_tanh(z);
    case moe_ext::ActivationFn::relu: return vrelu(z);
    case moe_ext::ActivationFn::relu2: break;
  }
  const vec r = vrelu(z);
  return r * r;
}

// act(gate) * up for gated activations (clamps and up_offset applied here), act(z) otherwise (`up`
// unused). Only non-default fields cost anything: without a limit, softcap or offset the old activations
// compute exactly what they always did.
static inline vec activate_vec(const moe_ext::Activation& a, vec z, vec up) {
  if (!a.gated) return activate_fn(a, z);
  if (has_limit(a)) z = vclamp_max(z, a.limit), up = vclamp_abs(up, a.limit);
  if (has_up_softcap(a)) up = vsoftcap(up, a.up_softcap);
  if (a.up_offset != 0.f) up = up + a.up_offset;
  // gate_softcap: softcap(g) sigmoid(alpha g), the sigmoid on the (clamped) gate itself
  const vec act = has_gate_softcap(a) ? vsoftcap(z, a.gate_softcap) / (1.f + vexp(-(a.alpha * z))) : activate_fn(a, z);
  return act * up;
}

// dst[i] = activation(gate[i * stride]) (times up[i * stride] for the gated ones; `up` is ignored
// otherwise), i < n. stride 2 reads interleaved g0 u0 g1 u1 ... (gate = row, up = row + 1).
static inline void activate_row(const moe_ext::Activation& activation, const float* gate, const float* up,
                                int64_t stride, int64_t n, float* dst) {
  const moe_ext::Activation a = activation;  // a local copy: stores to dst cannot alias its fields
  int64_t i = 0;
  if (stride == 1)
    for (; i + kLanes <= n; i += kLanes) store(dst + i, activate_vec(a, load(gate + i), a.gated ? load(up + i) : vec{}));
  // Strided rows and the tail go through lane buffers, computed by the same vector code.
  for (; i < n; i += kLanes) {
    float z_lanes[kLanes] = {}, up_lanes[kLanes] = {}, out_lanes[kLanes];
    const int64_t count = n - i < kLanes ? n - i : kLanes;
    for (int64_t j = 0; j < count; ++j)
      z_lanes[j] = gate[(i + j) * stride], up_lanes[j] = a.gated ? up[(i + j) * stride] : 0.f;
    store(out_lanes, activate_vec(a, load(z_lanes), load(up_lanes)));
    for (int64_t j = 0; j < count; ++j) dst[i + j] = out_lanes[j];
  }
}

// One output row of a tile from its float32 product row h (bias already added): the gated [gate | up]
// halves at gate and up, or interleaved pairs at gate (up unused), or one segment.
static inline void activate_product_row(const moe_ext::Activation& a, const float* gate, const float* up, int64_t n,
                                        float* dst) {
  if (a.gated && a.interleaved)
    activate_row(a, gate, gate + 1, 2, n, dst);
  else
    activate_row(a, gate, up, 1, n, dst);
}

// row[i] += bias[i], i < n (the GEMM epilogue's per-column bias, before any activation).
static inline void add_bias(float* row, const float* bias, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store(row + i, load(row + i) + load(bias + i));
  for (; i < n; ++i) row[i] += bias[i];
}
