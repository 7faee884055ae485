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

static inline vec activate_vec(moe_ext::Activation activation, vec z, vec up) {
  switch (activation) {
    case moe_ext::Activation::swiglu: return vsilu(z) * up;
    case moe_ext::Activation::geglu: return vgelu(z) * up;
    case moe_ext::Activation::relu: return vrelu(z);
    case moe_ext::Activation::gelu: break;
  }
  return vgelu(z);
}

// dst[i] = activation(src[i]) (times up[i] for the gated ones; `up` is ignored otherwise).
static inline void activate_row(moe_ext::Activation activation, const float* src, const float* up, int64_t n,
                                float* dst) {
  const bool gated = moe_ext::is_gated(activation);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    store(dst + i, activate_vec(activation, load(src + i), gated ? load(up + i) : vec{}));
  if (i == n) return;
  float z_tail[kLanes] = {}, up_tail[kLanes] = {}, out_tail[kLanes];
  for (int64_t j = 0; i + j < n; ++j) z_tail[j] = src[i + j], up_tail[j] = gated ? up[i + j] : 0.f;
  store(out_tail, activate_vec(activation, load(z_tail), load(up_tail)));
  for (int64_t j = 0; i + j < n; ++j) dst[i + j] = out_tail[j];
}
