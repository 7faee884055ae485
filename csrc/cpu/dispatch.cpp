#include <stdexcept>

#include "core/kernels.h"

namespace moe_ext {

// The dispatch layer between core and the CPU tiers, compiled once (not per tier): core declares
// kernels_for() (core/kernels.h) and knows only the kernel signatures; each tier's table lives in
// csrc/cpu/kernels.cpp, compiled once per tier with that tier's flags. A new tier or backend is added
// here and in CMakeLists.txt, without touching core.
namespace cpu::scalar { const Kernels& kernels(); }
#if defined(MOE_EXT_X86_TIERS)
namespace cpu::avx2 { const Kernels& kernels(); }
namespace cpu::avx512 { const Kernels& kernels(); }
#endif

const Kernels& kernels_for(Isa isa) {
  switch (isa) {
    case Isa::scalar: return cpu::scalar::kernels();
#if defined(MOE_EXT_X86_TIERS)
    case Isa::avx2: return cpu::avx2::kernels();
    case Isa::avx512: return cpu::avx512::kernels();
#endif
    default: break;
  }
  throw std::invalid_argument(std::string("isa: tier not compiled in: ") + isa_name(isa));
}

const Kernels& kernels() { return kernels_for(current_isa()); }

}  // namespace moe_ext
