// Pre-packed expert weights (SPEC §4 "prepack"): the grouped GEMM's panel layout, made once so that no
// call re-packs. The layout does not depend on the ISA tier, so a packed weight works after set_isa().
//
// Weights [E, N, K] are cut into panels of kPanelCols consecutive output columns (the last panel of an
// expert zero-padded). Panel j of expert e holds its kPanelCols x K weights depth-major, so the GEMM
// microkernel reads one contiguous row of kPanelCols weights per depth step:
// - float32 and float16: element (p, c) at p * kPanelCols + c;
// - bfloat16: pairs of depths interleaved, element (p, c) at (p / 2) * 2 * kPanelCols + 2 * c + p % 2,
//   the operand layout of vdpbf16ps (AVX512_BF16); K is padded to even with zeros.
// Elements keep the weight's dtype (packing never rounds).
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>

#include "core/types.h"

namespace moe_ext {

constexpr int64_t kPanelCols = 32;

inline int64_t panel_count(int64_t N) { return (N + kPanelCols - 1) / kPanelCols; }
// Depth of a packed panel: K, rounded up to even for bfloat16 pairs.
inline int64_t packed_depth(int64_t K, DType dtype) { return dtype == DType::bf16 ? (K + 1) / 2 * 2 : K; }
// Elements of one packed panel and of one packed expert.
inline int64_t panel_elements(int64_t K, DType dtype) { return kPanelCols * packed_depth(K, dtype); }
inline int64_t packed_expert_elements(int64_t N, int64_t K, DType dtype) {
  return panel_count(N) * panel_elements(K, dtype);
}

// An owned, immutable packed copy of one weight array. Thread-safe to share: kernels only read it.
class PackedWeight {
 public:
  // Packs w [E, N, K] (a plain WeightView: row-major or transposed) with the current tier's kernels.
  explicit PackedWeight(const WeightView& w);
  WeightView view() const;
  DType dtype() const { return dtype_; }
  int64_t E() const { return E_; }
  int64_t N() const { return N_; }
  int64_t K() const { return K_; }
  std::size_t nbytes() const { return bytes_; }

 private:
  struct Free { void operator()(void* p) const; };
  std::unique_ptr<void, Free> data_;
  std::size_t bytes_ = 0;
  DType dtype_;
  int64_t E_, N_, K_;
};

}  // namespace moe_ext
