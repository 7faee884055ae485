// Quantised expert weights (SPEC §3.7): int8 and int4 weights [E, N, K] with float32 or float16 scales,
// in the layout the quantised grouped GEMM (csrc/cpu/quant_gemm.cpp) reads. Numerics: docs/api.md §9.
//
// Layout, per expert and output row n (rows of an expert consecutive, experts consecutive):
// - values [E, N, row_bytes]: int8: one signed byte per depth, the row zero-padded to row_depth
//   (K rounded up to kQuantBlock); int4: blocks of 32 depths in 16 bytes, byte j of a block holding
//   depth j in its low nibble and depth j + 16 in its high one (GGUF Q4_0's order), unsigned 0..15;
// - scales [E, N, groups]: one per `group` consecutive depths (int8 per row: group = row_depth), kept
//   as float16 when every one is a float16 value (GGUF's are: an import is then the file's bytes, 18 a
//   Q4_0 block of 32 weights rather than 20), else float32 (what quantize makes); read as float32;
// - zeros [E, N, groups] uint8 (int4 with zero points only).
// A weight is value = scale * (q - z) with z = 0 (int8), 8 (int4 symmetric) or zeros[...] (int4 with
// zero points), evaluated in float32: (q - z) exactly, then one rounded product.
//
// That is the exchange layout (from_parts, export_parts, what Python's values/scales/zeros show). Weights
// are kept in the kernel layout: each expert's rows in panels of kPanelRows (8) consecutive rows
// interleaved, so one 32-byte load holds 4 bytes of each of 8 rows and the kernels keep one row per lane
// (no horizontal sums, and one scale epilogue per 8 rows; llama.cpp's repacked Q4_0 does the same). In a
// panel, block b's 8 * block_bytes bytes (int4: 128, int8: 256) are chunks of 32; chunk c holds, for each
// row i of the panel in turn, its block bytes 4c..4c+3 (int8: depths 4c..4c+3; int4: depths 4c..4c+3 in
// the low nibbles, 16+4c.. in the high ones); the panel's scales (and zeros) are [groups][8]. An expert's
// last N % 8 rows stay in the exchange layout. Same bytes in total.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>

#include "core/types.h"

namespace moe_ext {

enum class QuantScheme : int { int8 = 0, int4 = 1 };

// Depths per integer block of the kernels (one 32-byte vector of int8 activations).
constexpr int64_t kQuantBlock = 32;
// int4 symmetric weights store q + 8 (unsigned nibbles): their zero point.
constexpr int kInt4SymmetricZero = 8;
// Rows of a panel (the kernel layout above).
constexpr int64_t kPanelRows = 8;

// What the kernels read: pointers into a QuantizedWeight.
struct QuantView {
  QuantScheme scheme = QuantScheme::int8;
  int64_t E = 0, N = 0, K = 0;
  int64_t row_depth = 0;  // K rounded up to kQuantBlock (the int8 rows' padding; int4 needs none)
  int64_t group = 0;      // depths per scale: a multiple of kQuantBlock dividing row_depth
  int64_t groups = 0;     // row_depth / group
  int64_t row_bytes = 0;  // bytes of one row's values
  const uint8_t* values = nullptr;
  const void* scales = nullptr;       // float32, or float16 (IEEE binary16) where half_scales
  const uint8_t* zeros = nullptr;     // null: z = 0 (int8) or kInt4SymmetricZero (int4)
  bool half_scales = false;
  bool quantize_activations = false;  // W8A8 / W4A8: the GEMM's rows are quantised per token to int8
};

// Bytes of one row's 32-depth block: 32 (int8) or 16 (int4).
inline int64_t block_bytes(const QuantView& v) { return v.scheme == QuantScheme::int8 ? kQuantBlock : kQuantBlock / 2; }
// Rows of each expert that are in panels: the first N rounded down to kPanelRows.
inline int64_t panel_rows(const QuantView& v) { return v.N / kPanelRows * kPanelRows; }
// Whether flat row `row` (e * N + n) is in a panel.
inline bool in_panel(const QuantView& v, int64_t row) { return row % v.N < panel_rows(v); }
// Whether the `rows_left` flat rows from `row` start with a whole panel (8 rows, one a lane): where the
// kernels read 8 rows at a time.
inline bool whole_panel_at(const QuantView& v, int64_t row, int64_t rows_left) {
  return rows_left >= kPanelRows && in_panel(v, row) && row % v.N % kPanelRows == 0;
}
// Where byte j (0 <= j < row_bytes, exchange order) of flat row `row` is kept in values.
inline int64_t value_offset(const QuantView& v, int64_t row, int64_t j) {
  if (!in_panel(v, row)) return row * v.row_bytes + j;
  const int64_t bytes = block_bytes(v), i = row % v.N % kPanelRows, first = row - i, block = j / bytes, b = j % bytes;
  return first * v.row_bytes + block * kPanelRows * bytes + (b / 4) * 32 + i * 4 + b % 4;
}
// Bytes of one scale.
inline int64_t scale_bytes(const QuantView& v) { return v.half_scales ? 2 : 4; }
// Where the scale (and zero point) of group g of flat row `row` is kept, in scales (zeros).
inline int64_t group_offset(const QuantView& v, int64_t row, int64_t g) {
  if (!in_panel(v, row)) return row * v.groups + g;
  const int64_t i = row % v.N % kPanelRows, first = row - i;
  return first * v.groups + g * kPanelRows + i;
}

// An owned, immutable quantised weight. Thread-safe to share: kernels only read it.
class QuantizedWeight {
 public:
  // Quantises w [E, N, K] of `dtype`; group_size 0 means one scale per row (int8 only). Throws
  // std::invalid_argument (naming `w` or `group_size`) for a bad group size, an odd K (int4) or a
  // non-finite weight.
  static std::unique_ptr<QuantizedWeight> quantize(const void* w, DType dtype, int64_t E, int64_t N, int64_t K,
                                                   QuantScheme scheme, int64_t group_size, bool zero_point,
                                                   bool quantize_activations);
  // Copies already-quantised parts in the exchange layout (an import, no requantisation): values
  // [E, N, row_bytes], scales [E, N, groups] (kept as float16 when every one is a float16 value),
  // zeros [E, N, groups] or null.
  static std::unique_ptr<QuantizedWeight> from_parts(QuantScheme scheme, int64_t E, int64_t N, int64_t K,
                                                     int64_t group_size, const uint8_t* values, const float* scales,
                                                     const uint8_t* zeros, bool quantize_activations);
  // A weight over parts that someone else owns (moe_ext.torch's buffers), in the kernel layout (the view's
  // parts of a weight made here, of the same format; scales float16 where half_scales), neither copied nor
  // checked (the caller validated them when it made them): they must outlive the result, unchanged.
  static std::unique_ptr<QuantizedWeight> borrow(QuantScheme scheme, int64_t E, int64_t N, int64_t K,
                                                 int64_t group_size, const uint8_t* values, const void* scales,
                                                 bool half_scales, const uint8_t* zeros, bool quantize_activations);
  // The view's sizes (row_depth, group, groups, row_bytes) for a format, without data; throws as quantize.
  static QuantView layout(QuantScheme scheme, int64_t E, int64_t N, int64_t K, int64_t group_size, bool zero_point);
  // A copy sharing nothing, with the activation mode changed.
  std::unique_ptr<QuantizedWeight> with_activations(bool quantize_activations) const;

  // The float32 values [E, N, K] the kernels multiply by.
  void dequantize(float* out) const;
  // The parts in the exchange layout (sizes as from_parts, scales float32; zeros only with zero points).
  void export_parts(uint8_t* values, float* scales, uint8_t* zeros) const;

  const QuantView& view() const { return view_; }
  int64_t group_size() const { return group_size_; }  // 0: one scale per row
  bool zero_point() const { return view_.zeros != nullptr; }
  std::size_t nbytes() const { return bytes_; }

 private:
  QuantizedWeight(QuantScheme scheme, int64_t E, int64_t N, int64_t K, int64_t group_size, bool zero_point,
                  bool half_scales, bool quantize_activations, bool allocate = true);
  struct Free { void operator()(void* p) const; };
  std::unique_ptr<void, Free> data_;  // values, then scales, then zeros; null when borrowed
  std::size_t bytes_ = 0;
  int64_t group_size_ = 0;
  QuantView view_;
};

// Per-thread scratch bytes of the quantised grouped GEMM: the tile's float32 results (128 rows x 2 x 64
// columns), one panel's products (128 rows x 8), one dequantised panel block (256 depths x 32 columns)
// and one row slice of it (256), float32 (cpu/quant_gemm.cpp checks its carve-up against this).
constexpr int64_t quant_gemm_scratch_bytes() { return (128 * 2 * 64 + 128 * kPanelRows + 256 * 32 + 256) * 4; }
// Whether the avx512 tier multiplies int8 with vpdpbusd: true where the CPU has AVX512_VNNI. Tests turn
// it off to reach the vpmaddubsw path on such CPUs; it cannot be turned on elsewhere.
bool vnni_enabled();
void set_vnni_enabled(bool enabled);

// out [M, N] (or [M, N/2] gated with the activation fused) = a [M, K] float32 times w's rows per expert,
// plus bias [E, N] (or null) per column: what core/ops.cpp's grouped GEMM runs for a quantised weight.
// caller_dtype: the dtype the caller's activations came in (bfloat16 may take vdpbf16ps, as for
// bfloat16 weights: QuantGemmProblem::bf16_dot).
void run_quant_gemm(const float* a, DType caller_dtype, const QuantView& w, const int32_t* offsets,
                    bool fuse_activation, const Activation& activation, const float* bias, float* out);

}  // namespace moe_ext
