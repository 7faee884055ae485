// Expert FFN activations: SwiGLU and GeGLU on h = [gate | up], ReLU and GELU (exact erf form) on h.
#include "cpu/kernels.h"
#include "core/threads.h"
#include "cpu/common.h"
#include "cpu/vec.h"

namespace moe_ext::cpu::MOE_EXT_CPU_NS {

namespace {

// 0.5 z (1 + erf(z/sqrt2)) written with erfc, which keeps its relative accuracy in the negative tail
// where 1 + erf cancels.
float gelu(float z) { return 0.5f * z * erfcf(-z * 0.70710678118654752f); }
// NaN stays NaN (a max() would turn it into 0).
float relu(float z) { return z > 0.f ? z : (z <= 0.f ? 0.f : z); }

// GeGLU, GELU and ReLU, element by element (SwiGLU has its vector path below).
float apply(Activation activation, float z) { return activation == Activation::relu ? relu(z) : gelu(z); }

// SwiGLU on whole registers: the expf of the scalar path is the layer's costliest call otherwise.
// The tail of a row goes through the same vector code via a lane buffer, so every element of a row is
// computed the same way.
void swiglu_row(const float* gate, const float* up, int64_t f, float* dst) {
  int64_t i = 0;
  for (; i + kLanes <= f; i += kLanes) {
    const vec z = load(gate + i);
    store(dst + i, z / (1.f + vexp(-z)) * load(up + i));
  }
  if (i == f) return;
  float z_tail[kLanes] = {}, up_tail[kLanes] = {}, out_tail[kLanes];
  for (int64_t j = 0; i + j < f; ++j) z_tail[j] = gate[i + j], up_tail[j] = up[i + j];
  const vec z = load(z_tail);
  store(out_tail, z / (1.f + vexp(-z)) * load(up_tail));
  for (int64_t j = 0; i + j < f; ++j) dst[i + j] = out_tail[j];
}

}  // namespace

void activate(const float* h, int64_t M, int64_t f, Activation activation, float* out) {
  const bool gated = is_gated(activation);
  const int64_t h_cols = gated ? 2 * f : f;
  const int threads = num_threads();
  MOE_EXT_PARALLEL_FOR(threads)
  for (int64_t m = 0; m < M; ++m) {
    const float* row = h + m * h_cols;
    float* dst = out + m * f;
    if (activation == Activation::swiglu)
      swiglu_row(row, row + f, f, dst);
    else if (gated)
      for (int64_t i = 0; i < f; ++i) dst[i] = apply(activation, row[i]) * row[f + i];
    else
      for (int64_t i = 0; i < f; ++i) dst[i] = apply(activation, row[i]);
  }
}

}  // namespace moe_ext::cpu::MOE_EXT_CPU_NS
