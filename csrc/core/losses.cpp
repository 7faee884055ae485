// Router auxiliary losses. Serial and in double: O(T*E) work, and a fixed summation order keeps them
// bit-identical from run to run.
#include <cmath>

#include "core/checks.h"
#include "core/ops.h"
#include "core/workspace.h"

namespace moe_ext {

double load_balancing_loss(const float* probs, const int32_t* topk_ids, int64_t T, int64_t E, int64_t k) {
  check_expert_ids(topk_ids, T * k, E, "topk_ids");
  if (T == 0 || k == 0) return 0.0;  // no copies: nothing is unbalanced
  int64_t* copies = thread_workspace().get<int64_t>(Scratch::cursor, E);
  for (int64_t e = 0; e < E; ++e) copies[e] = 0;
  for (int64_t i = 0; i < T * k; ++i) ++copies[topk_ids[i]];
  double loss = 0.0;
  for (int64_t e = 0; e < E; ++e) {
    double prob_sum = 0.0;
    for (int64_t t = 0; t < T; ++t) prob_sum += probs[t * E + e];
    const double fraction = static_cast<double>(copies[e]) / static_cast<double>(T * k);
    loss += fraction * (prob_sum / static_cast<double>(T));
  }
  return static_cast<double>(E) * loss;
}

double router_z_loss(const float* logits, int64_t T, int64_t E) {
  if (T == 0) return 0.0;
  double total = 0.0;
  for (int64_t t = 0; t < T; ++t) {
    const float* row = logits + t * E;
    double max = -INFINITY;
    bool any_nan = false;
    for (int64_t e = 0; e < E; ++e) {
      any_nan |= std::isnan(row[e]);
      max = std::fmax(max, static_cast<double>(row[e]));
    }
    double sum = 0.0;
    for (int64_t e = 0; e < E; ++e) sum += std::exp(static_cast<double>(row[e]) - max);
    // An infinite max decides the row on its own (and would make inf - inf below); NaN wins over all.
    const double lse = any_nan ? NAN : std::isinf(max) ? max : max + std::log(sum);
    total += lse * lse;
  }
  return total / static_cast<double>(T);
}

}  // namespace moe_ext
