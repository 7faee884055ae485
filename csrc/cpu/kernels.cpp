#include "cpu/kernels.h"

namespace moe_ext::cpu::MOE_EXT_CPU_NS {

const Kernels& kernels() {
  static const Kernels table{route, gather_rows, grouped_gemm, pack_weight, widen, narrow, activate, unpermute,
                               activation_backward, unpermute_backward,
                               grouped_gemm_grad_w, quant_gemm};
  return table;
}

}  // namespace moe_ext::cpu::MOE_EXT_CPU_NS
