#include "core/checks.h"

#include <stdexcept>
#include <string>

namespace moe_ext {
namespace {

[[noreturn]] void fail(const std::string& name, const std::string& expected, const std::string& got) {
  throw std::invalid_argument(name + ": expected " + expected + "; got " + got);
}

std::string str(int64_t v) { return std::to_string(v); }

}  // namespace

void check_expert_ids(const int32_t* ids, int64_t count, int64_t E, const char* name) {
  for (int64_t i = 0; i < count; ++i)
    if (ids[i] < 0 || ids[i] >= E)
      fail(name, "expert ids in [0, " + str(E - 1) + "]", str(ids[i]) + " at flat index " + str(i));
}

void check_expert_offsets(const int32_t* offsets, int64_t E, int64_t M, const char* name) {
  if (offsets[0] != 0) fail(name, "offsets starting at 0", str(offsets[0]) + " at index 0");
  for (int64_t e = 0; e < E; ++e)
    if (offsets[e + 1] < offsets[e])
      fail(name, "non-decreasing offsets", str(offsets[e + 1]) + " after " + str(offsets[e]) +
                                               " at index " + str(e + 1));
  if (offsets[E] != M)
    fail(name, "offsets ending at the row count M = " + str(M), str(offsets[E]) + " at index " + str(E));
}

void check_perm_rows(const int32_t* rows, int64_t count, int64_t M, const char* name) {
  for (int64_t i = 0; i < count; ++i)
    if (rows[i] < -1 || rows[i] >= M)
      fail(name, "rows in [-1, " + str(M - 1) + "]", str(rows[i]) + " at flat index " + str(i));
}

void check_route_config(const RouteConfig& config, int64_t E) {
  if (E < 1) fail("w_router", "at least 1 expert (E >= 1)", "E = " + str(E));
  if (config.top_k < 1 || config.top_k > E) fail("top_k", "an integer in [1, E] = [1, " + str(E) + "]", str(config.top_k));
  if (config.n_group == 0 && config.topk_group == 0) return;
  if (config.n_group < 1 || E % config.n_group != 0)
    fail("n_group", "a divisor of E = " + str(E), str(config.n_group));
  if (config.topk_group < 1 || config.topk_group > config.n_group)
    fail("topk_group", "an integer in [1, n_group] = [1, " + str(config.n_group) + "]", str(config.topk_group));
  const int64_t selectable = config.topk_group * (E / config.n_group);
  if (selectable < config.top_k)
    fail("topk_group", "topk_group * (E / n_group) >= top_k = " + str(config.top_k),
         str(config.topk_group) + " groups of " + str(E / config.n_group) + " experts");
}

void check_capacity(int64_t capacity) {
  if (capacity < 0 && capacity != kNoCapacity) fail("capacity", "None or an integer >= 0", str(capacity));
}

}  // namespace moe_ext
