// CPU instruction-set tiers, detected at load time and forced with MOE_EXT_ISA.
#pragma once
#include <string>
#include <vector>

namespace moe_ext {

enum class Isa : int { scalar = 0, avx2 = 1, avx512 = 2 };

const char* isa_name(Isa isa);
// Throws std::invalid_argument for an unknown name.
Isa isa_from_name(const std::string& name);
// Tiers compiled into this build that this CPU can run, lowest first.
std::vector<Isa> available_isas();
Isa current_isa();
// Throws std::invalid_argument when the tier is not available here.
void set_isa(Isa isa);
// Whether the avx512 tier multiplies bfloat16 with vdpbf16ps: true where the CPU has AVX512_BF16.
// Tests turn it off to reach the widen-to-float32 path on such CPUs; it cannot be turned on elsewhere.
bool bf16_dot_enabled();
void set_bf16_dot_enabled(bool enabled);
// Applies MOE_EXT_ISA if set (throws std::invalid_argument naming the variable when it cannot be honoured).
void set_isa_from_env();

}  // namespace moe_ext
