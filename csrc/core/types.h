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

// "No capacity limit" for permute.
constexpr int64_t kNoCapacity = -1;

}  // namespace moe_ext
