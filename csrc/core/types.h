// Plain value types shared by the C++ API, the kernels and the bindings.
#pragma once
#include <cstdint>

namespace moe_ext {

enum class Scoring : int { softmax = 0, sigmoid = 1 };

// Gated activations read h = [gate | up] with 2f columns; the others read h with f columns.
enum class Activation : int { swiglu = 0, geglu = 1, relu = 2, gelu = 3 };

inline bool is_gated(Activation a) { return a == Activation::swiglu || a == Activation::geglu; }

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

// The weights of a grouped GEMM, [E, N, K]: a caller's row-major array in `dtype`, or (packed = true)
// the panel layout of core/packed.h made once by prepack(), or (quant set) quantised weights.
struct WeightView {
  const void* data = nullptr;
  DType dtype = DType::f32;
  bool packed = false;
  int64_t E = 0, N = 0, K = 0;
  const QuantView* quant = nullptr;  // quantised weights (then data, dtype and packed are unused)
};

// "No capacity limit" for permute.
constexpr int64_t kNoCapacity = -1;

}  // namespace moe_ext
