// The W8A8 / W4A8 integer products with vpdpbusd: compiled for the avx512 tier only, with AVX512_VNNI
// enabled for this file alone (CMakeLists.txt), and called only where the CPU has it (core/quant.cpp's
// vnni_enabled(), QuantGemmProblem::vnni), so the rest of the tier never contains a VNNI instruction.
#include "cpu/quant_dot.h"

namespace moe_ext::cpu::MOE_EXT_CPU_NS {

void int_column_vnni(const QuantGemmProblem& p, int64_t row, int64_t a_row, int64_t rows, float* c, int64_t ldc) {
  int_column<DotVnni>(p, row, a_row, rows, c, ldc);
}

void int_panel_vnni(const QuantGemmProblem& p, int64_t first, int64_t a_row, int64_t rows, float* c) {
  int_panel<PanelVnni>(p, first, a_row, rows, c);
}

}  // namespace moe_ext::cpu::MOE_EXT_CPU_NS
