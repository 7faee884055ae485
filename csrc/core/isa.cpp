#include "core/isa.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

namespace moe_ext {
namespace {

bool cpu_supports(Isa isa) {
#if defined(MOE_EXT_X86_TIERS)
  // __builtin_cpu_supports also checks that the OS saves the AVX/AVX-512 register state (XGETBV).
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  switch (isa) {
    case Isa::scalar: return true;
    case Isa::avx2: return avx2;
    case Isa::avx512:
      return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }
  return false;
#else
  return isa == Isa::scalar;
#endif
}

Isa best_isa() { return available_isas().back(); }

std::atomic<int>& current() {
  static std::atomic<int> value{static_cast<int>(best_isa())};
  return value;
}

std::string names_of(const std::vector<Isa>& isas) {
  std::string out;
  for (Isa isa : isas) out += (out.empty() ? "" : ", ") + std::string(isa_name(isa));
  return out;
}

bool cpu_has_avx512_bf16() {
#if defined(MOE_EXT_X86_TIERS)
  return cpu_supports(Isa::avx512) && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

std::atomic<bool>& bf16_dot() {
  static std::atomic<bool> value{cpu_has_avx512_bf16()};
  return value;
}

}  // namespace

bool bf16_dot_enabled() { return bf16_dot().load(std::memory_order_relaxed); }

void set_bf16_dot_enabled(bool enabled) {
  bf16_dot().store(enabled && cpu_has_avx512_bf16(), std::memory_order_relaxed);
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::scalar: return "scalar";
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
  }
  return "?";
}

Isa isa_from_name(const std::string& name) {
  for (Isa isa : {Isa::scalar, Isa::avx2, Isa::avx512})
    if (name == isa_name(isa)) return isa;
  throw std::invalid_argument("isa: expected one of scalar, avx2, avx512; got '" + name + "'");
}

std::vector<Isa> available_isas() {
  std::vector<Isa> out;
  for (Isa isa : {Isa::scalar, Isa::avx2, Isa::avx512})
    if (cpu_supports(isa)) out.push_back(isa);
  return out;
}

Isa current_isa() { return static_cast<Isa>(current().load(std::memory_order_relaxed)); }

void set_isa(Isa isa) {
  if (!cpu_supports(isa))
    throw std::invalid_argument(std::string("isa: expected a tier this CPU and build support (") +
                                names_of(available_isas()) + "); got '" + isa_name(isa) + "'");
  current().store(static_cast<int>(isa), std::memory_order_relaxed);
}

void set_isa_from_env() {
  const char* value = std::getenv("MOE_EXT_ISA");
  if (value == nullptr || *value == '\0') return;
  try {
    set_isa(isa_from_name(value));
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(std::string("MOE_EXT_ISA: ") + e.what());
  }
}

}  // namespace moe_ext
