// Scratch memory reused across calls: each calling thread owns one workspace whose buffers only grow,
// so steady-state calls allocate nothing and concurrent callers never share scratch.
#pragma once
#include <cstddef>
#include <cstdint>

namespace moe_ext {

// One buffer per use inside a call, so that growing one never moves another that is still in use.
enum class Scratch : int {
  route_rows,      // per-OpenMP-thread rows of route's selection state
  route_weights,   // moe(): topk_weights
  route_ids,       // moe(): topk_ids
  offsets,         // expert_offsets
  perm_rows,       // perm_rows
  cursor,          // permute's per-expert write positions
  x_perm,          // permuted tokens, reused for the expert outputs
  activated,       // activation output [M, f]
  gemm_panels,     // per-OpenMP-thread tile buffers of the grouped GEMM
  converted_in,    // a float32 copy of a 16-bit input (x, a, y_perm)
  converted_in2,   // a second one (w_router; the backward GEMM's a)
  converted_out,   // a float32 result before it is rounded to the caller's dtype
  gemm_a_bf16,     // a GEMM's rows rounded to bfloat16 for vdpbf16ps
  backward_marks,  // backward: rows seen (repeat detection) or ones (permute_backward's weights)
  quant_rows,      // quantised GEMM: the int8 activation rows, their scales and group sums (W8A8 /
                   // W4A8), or the rows rounded to bfloat16, as float32 (QuantGemmProblem::bf16_dot)
  count
};

class Workspace {
 public:
  Workspace() = default;
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  ~Workspace();

  // At least `bytes` bytes, 64-byte aligned, valid until the next request for the same slot.
  void* get(Scratch slot, std::size_t bytes);
  template <typename T>
  T* get(Scratch slot, int64_t count) {
    return static_cast<T*>(get(slot, static_cast<std::size_t>(count) * sizeof(T)));
  }
  std::size_t bytes_held() const;

 private:
  void* data_[static_cast<int>(Scratch::count)] = {};
  std::size_t size_[static_cast<int>(Scratch::count)] = {};
};

// The calling thread's workspace.
Workspace& thread_workspace();

}  // namespace moe_ext
