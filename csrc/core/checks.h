// Checks of argument *values* that the kernels rely on for memory safety (ids, offsets, rows).
// Each throws std::invalid_argument naming the argument, what was expected and what came.
// (Shapes and dtypes are checked where the arrays are unwrapped: the Python layer and the bindings.)
#pragma once
#include <cstdint>

#include "core/types.h"

namespace moe_ext {

void check_expert_ids(const int32_t* ids, int64_t count, int64_t E, const char* name);
void check_expert_offsets(const int32_t* offsets, int64_t E, int64_t M, const char* name);
void check_perm_rows(const int32_t* rows, int64_t count, int64_t M, const char* name);
void check_route_config(const RouteConfig& config, int64_t E);
void check_capacity(int64_t capacity);

}  // namespace moe_ext
