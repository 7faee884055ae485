// Plain value types shared by the C++ API, the kernels and the bindings.
#pragma once
#include <cstdint>
#include <limits>

namespace moe_ext {

enum class Scoring : int { softmax = 0, sigmoid = 1 };

// An expert activation (SPEC §3.6, python/moe_ext/_activation.py): one description for every kernel.
// Gated: h has 2f columns, out = act(min(g, limit)) * (clip(u, -limit, limit) + up_offset), gate and up
// concatenated ([gate | up]) or interleaved (g0 u0 g1 u1 ...); otherwise h has f columns, out = act(h).
// fn silu is z * sigmoid(alpha * z); relu2 is relu(z)^2; gelu is the exact (erf) GELU, gelu_tanh its
// tanh approximation.
enum class ActivationFn : int { silu = 0, gelu = 1, gelu_tanh = 2, relu = 3, relu2 = 4 };

struct Activation {
  ActivationFn fn = ActivationFn::silu;
  bool gated = true;
  bool interleaved = false;
  float alpha = 1.f;
  float limit = std::numeric_limits<float>::infinity();  // +inf: no clamp
  float up_offset = 0.f;
  // Softcaps c tanh(z / c) (gated only; 0: none): up_softcap bounds up after the clamp, before up_offset;
  // gate_softcap (silu only) replaces silu's linear factor: act(g) = c_g tanh(g / c_g) sigmoid(alpha g).
  float gate_softcap = 0.f;
  float up_softcap = 0.f;

  static Activation swiglu() { return {}; }
  static Activation geglu() { return with(ActivationFn::gelu, true); }
  static Activation relu() { return with(ActivationFn::relu, false); }
  static Activation gelu() { return with(ActivationFn::gelu, false); }
  static Activation with(ActivationFn fn, bool gated) {
    Activation a;
    a.fn = fn, a.gated = gated;
    return a;
  }
};

inline bool is_gated(const Activation& a) { return a.gated; }

struct RouteConfig {
  int64_t top_k = 1;
  Scoring scoring = Scoring::softmax;
  bool renormalize = true;
  float scale = 1.0f;
  const float* bias = nullptr;             // [E], added to the logits
  const float* correction_bias = nullptr;  // [E], added to the scores for selection only
  int64_t n_group = 0;                     // 0: no grouped selection
  int64_t topk_group = 0;
};

// Element type of activations and weights (SPEC §4). Scores, top-k weights and accumulators are float32.
enum class DType : int { f32 = 0, bf16 = 1, f16 = 2 };

inline int64_t dtype_size(DType t) { return t == DType::f32 ? 4 : 2; }

struct QuantView;  // core/quant.h

// The weights of a grouped GEMM, [E, N, K]: a caller's row-major array in `dtype`, or (transposed = true)
// the view of a row-major w_t [E, K, N] (element (e, n, k) at (e * K + k) * N + n: HF's transposed expert
// weights, read in place), or (packed = true) the panel layout of core/packed.h made once by prepack(),
// or (quant set) quantised weights.
struct WeightView {
  const void* data = nullptr;
  DType dtype = DType::f32;
  bool packed = false;
  bool transposed = false;
  int64_t E = 0, N = 0, K = 0;
  const QuantView* quant = nullptr;  // quantised weights (then data, dtype and packed are unused)
};

// "No capacity limit" for permute.
constexpr int64_t kNoCapacity = -1;

}  // namespace moe_ext
