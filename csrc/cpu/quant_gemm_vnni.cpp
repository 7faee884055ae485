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

// --- prefill: a tile's rows against blocks of unpacked codes ----------------------------------------
// panel_dot_rows reads 4 activation rows against one 8-row panel: one weight load and four broadcasts for
// four 8-lane vpdpbusd, and a float epilogue per group and row. With many rows (prefill) the loads and
// the epilogue bound it (about half of vpdpbusd's peak on Zen 4). Here, as the float GEMM does, each
// 256-depth block of kCodeCols weight rows is laid out once per tile as unsigned bytes [depth / 4]
// [kCodeCols] (4 depths a 32-bit word: int8 w + 128, int4 the nibble), and a register tile of 4
// activation rows x 32 weight rows runs on 16-lane vpdpbusd (two weight loads and four broadcasts per 8
// instructions), each group's epilogue into float32 sums that stay in registers over the block (with
// them in memory, g32 was slower than the panels). The integers are the same exact sums as
// panel_dot_rows', converted and scaled per group in the same order, so a panel row's result is the
// same bits on either path. On Zen 4 (Mixtral w13, one expert, 64 and 128 rows) 6 rows a pass were no
// faster than 4.
// GCC 12's AVX-512 intrinsics start from a self-initialised "undefined" vector, which -Wmaybe-uninitialized
// reports at every inlined call: a false alarm, silenced for this part.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
namespace {

constexpr int kCodeRows = 4;  // activation rows of the register tile

// words [depth / 4][kCodeCols] = weight rows first .. first + rows - 1 at depths k0 .. k0 + depth - 1
// (whole 32-depth blocks), as vpdpbusd's unsigned bytes; columns past `rows` zero.
void code_block_u8(const QuantView& w, int64_t first, int64_t rows, int64_t k0, int64_t depth, uint32_t* words) {
  const bool int4 = w.scheme == QuantScheme::int4;
  const int64_t panel_block = kPanelRows * block_bytes(w);
  for (int64_t c0 = 0; c0 < kCodeCols; c0 += kPanelRows) {
    const int64_t row = first + c0;
    if (whole_panel_at(w, row, rows - c0)) {
      // A kernel panel: chunk c of block b holds 4 bytes of each of its 8 rows, so its 32 bytes are 8
      // consecutive words of one depth quad (int8: quad 8b + c; int4: 8b + c low nibbles, 8b + 4 + c high).
      const uint8_t* values = w.values + row * w.row_bytes;
      for (int64_t b = k0 / kQuantBlock; b * kQuantBlock < k0 + depth; ++b) {
        uint32_t* out = words + (b * kQuantBlock - k0) / 4 * kCodeCols + c0;
        const uint8_t* block = values + b * panel_block;
        // The next block's lines, a block's products ahead (the hardware prefetchers fell behind: each
        // block is read once per tile, between long runs of arithmetic).
        for (int64_t line = 0; line < panel_block; line += 64)
          __builtin_prefetch(block + kCodeDepth / kQuantBlock * panel_block + line, 0, 3);
        for (int c = 0; c < (int4 ? 4 : 8); ++c) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 32 * c));
          if (!int4) {
            const __m256i biased = _mm256_xor_si256(v, _mm256_set1_epi8(-128));  // w + 128
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + c * kCodeCols), biased);
            continue;
          }
          const __m256i low = _mm256_set1_epi8(15);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + c * kCodeCols), _mm256_and_si256(v, low));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (c + 4) * kCodeCols),
                              _mm256_and_si256(_mm256_srli_epi16(v, 4), low));
        }
      }
      continue;
    }
    for (int64_t c = c0; c < c0 + kPanelRows; ++c) {  // a row outside a kernel panel, or none
      for (int64_t q = 0; q < depth / 4; ++q) {
        uint8_t bytes[4] = {};
        for (int i = 0; i < 4 && c < rows; ++i) {
          const int64_t d = k0 + 4 * q + i;
          if (!int4) {
            bytes[i] = w.values[value_offset(w, first + c, d)] ^ 0x80;
            continue;
          }
          const int64_t in_block = d % kQuantBlock;
          const uint8_t byte = w.values[value_offset(w, first + c, d / kQuantBlock * 16 + in_block % 16)];
          bytes[i] = in_block < 16 ? byte & 15 : byte >> 4;
        }
        memcpy(words + q * kCodeCols + c, bytes, 4);
      }
    }
  }
}

// Where the scales (and zeros) of a block's columns are: group g of column c at base[c] + g * stride[c];
// a whole kernel panel's 8 columns (panel[c / 8]) have theirs side by side.
struct ColumnGroups {
  int64_t base[kCodeCols] = {}, stride[kCodeCols] = {};
  bool panel[kCodeCols / kPanelRows] = {};
};

ColumnGroups column_groups(const QuantView& w, int64_t first, int64_t cols) {
  ColumnGroups at;
  for (int64_t c = 0; c < cols; ++c)
    at.base[c] = group_offset(w, first + c, 0), at.stride[c] = in_panel(w, first + c) ? kPanelRows : 1;
  for (int64_t c0 = 0; c0 < kCodeCols; c0 += kPanelRows)
    at.panel[c0 / kPanelRows] = whole_panel_at(w, first + c0, cols - c0);
  return at;
}

// What closes a group (panel_dot_rows' epilogue), for a block's columns: sum[r][c] - zero_c x row r's
// group sum, converted, times scale_c, added to the row's float32 sums (columns past `cols`: scale 0).
struct GroupEnd {
  __m512i zero[2];
  __m512 scale[2];
  int64_t g;
};

GroupEnd group_end(const QuantView& w, const ColumnGroups& at, int64_t cols, int64_t g) {
  alignas(64) float scale[kCodeCols] = {};
  alignas(64) int32_t zero[kCodeCols] = {};
  const int32_t constant_zero = w.scheme == QuantScheme::int4 ? kInt4SymmetricZero : PanelVnni::kS8Bias;
  for (int64_t c0 = 0; c0 < cols; c0 += kPanelRows) {
    if (at.panel[c0 / kPanelRows]) {  // 8 scales (and zeros) side by side
      const int64_t i = at.base[c0] + g * kPanelRows;
      const f32x8 s = panel_scales_at(w, i);
      memcpy(scale + c0, &s, sizeof s);
      for (int l = 0; l < kPanelRows; ++l) zero[c0 + l] = w.zeros ? w.zeros[i + l] : constant_zero;
      continue;
    }
    for (int64_t c = c0; c < min_i64(cols, c0 + kPanelRows); ++c) {
      const int64_t i = at.base[c] + g * at.stride[c];
      scale[c] = scale_at(w, i);
      zero[c] = w.zeros ? w.zeros[i] : constant_zero;
    }
  }
  GroupEnd e;
  for (int h = 0; h < 2; ++h) e.zero[h] = _mm512_load_si512(zero + 16 * h), e.scale[h] = _mm512_load_ps(scale + 16 * h);
  e.g = g;
  return e;
}

// A run of a block's depths within one group: quads [q0, q0 + quads) of the block; `accumulate`: the
// group began in an earlier block (its int32 sums so far are in `partial`); `end`: the run closes the group.
struct Run {
  int64_t q0, quads;
  bool accumulate;
  const GroupEnd* end;
};

// One block's runs for activation rows m .. m + R - 1 (a: the rows at the block's first depth, int8)
// against the block's words: per run, the int32 sums in registers, then either the group's epilogue into
// the rows' float32 sums, kept in registers over the block (out[r * ldo ..] read before the first run
// where an earlier group has closed, written after the last run where one has), or the sums kept in
// partial [R][kCodeCols] for the group's next block. The float32 sums take each group in order, as
// panel_dot_rows' do.
template <int R>
void dot_block(const int8_t* a, int64_t lda, const uint32_t* words, const Run* runs, int n_runs, int32_t* partial,
               const int32_t* group_sums, int64_t sums_stride, bool have_out, float* out, int64_t ldo) {
  __m512 sum[R][2];
  bool stored = have_out;  // whether out holds this row block's float32 sums
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 2; ++h) sum[r][h] = have_out ? _mm512_loadu_ps(out + r * ldo + 16 * h) : _mm512_setzero_ps();
  for (int i = 0; i < n_runs; ++i) {
    const Run& run = runs[i];
    __m512i acc[R][2];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
      for (int h = 0; h < 2; ++h)
        acc[r][h] = run.accumulate ? _mm512_loadu_si512(partial + r * kCodeCols + 16 * h) : _mm512_setzero_si512();
    for (int64_t q = run.q0; q < run.q0 + run.quads; ++q) {
      const __m512i w0 = _mm512_loadu_si512(words + q * kCodeCols), w1 = _mm512_loadu_si512(words + q * kCodeCols + 16);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        int32_t v;
        memcpy(&v, a + r * lda + 4 * q, 4);
        const __m512i x = _mm512_set1_epi32(v);
        acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], w0, x);
        acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], w1, x);
      }
    }
    const GroupEnd* e = run.end;
    if (!e) {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
        for (int h = 0; h < 2; ++h) _mm512_storeu_si512(partial + r * kCodeCols + 16 * h, acc[r][h]);
      continue;
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512i x = _mm512_set1_epi32(group_sums[r * sums_stride + e->g]);
      for (int h = 0; h < 2; ++h) {
        const __m512 f = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][h], _mm512_mullo_epi32(e->zero[h], x)));
        sum[r][h] = e->g == 0 ? _mm512_mul_ps(f, e->scale[h]) : _mm512_fmadd_ps(f, e->scale[h], sum[r][h]);
      }
    }
    stored = true;
  }
  if (!stored) return;
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 2; ++h) _mm512_storeu_ps(out + r * ldo + 16 * h, sum[r][h]);
}

void dot_block_rows(int64_t rows, const int8_t* a, int64_t lda, const uint32_t* words, const Run* runs, int n_runs,
                    int32_t* partial, const int32_t* group_sums, int64_t sums_stride, bool have_out, float* out,
                    int64_t ldo) {
  switch (rows) {
#define MOE_EXT_BLOCK_CASE(R) \
  case R: dot_block<R>(a, lda, words, runs, n_runs, partial, group_sums, sums_stride, have_out, out, ldo); break;
    MOE_EXT_BLOCK_CASE(1) MOE_EXT_BLOCK_CASE(2) MOE_EXT_BLOCK_CASE(3) MOE_EXT_BLOCK_CASE(4)
#undef MOE_EXT_BLOCK_CASE
    default: break;
  }
}

}  // namespace

void int_tile_vnni(const QuantGemmProblem& p, int64_t a_row, int64_t rows, const int64_t* firsts, int segments,
                   int64_t seg_rows, float* local, int64_t ldl, int64_t seg_stride, uint32_t* words, int32_t* sums) {
  const QuantView& w = *p.w;
  const int8_t* aq = p.a_q + a_row * w.row_depth;
  const int32_t* group_sums = p.a_sums + a_row * w.groups;
  constexpr int kMaxRuns = kCodeDepth / kQuantBlock;  // groups are whole 32-depth blocks
  for (int s = 0; s < segments; ++s)
    for (int64_t j = 0; j < seg_rows; j += kCodeCols) {
      const int64_t cols = min_i64(kCodeCols, seg_rows - j), first = firsts[s] + j;
      float* out = local + s * seg_stride + j;
      const ColumnGroups at = column_groups(w, first, cols);
      for (int64_t k0 = 0; k0 < w.row_depth; k0 += kCodeDepth) {
        const int64_t depth = min_i64(kCodeDepth, w.row_depth - k0);
        code_block_u8(w, first, cols, k0, depth, words);
        GroupEnd ends[kMaxRuns];
        Run runs[kMaxRuns];
        int n_runs = 0;
        for (int64_t d = 0; d < depth;) {  // runs within one group: a group may span blocks (int8 per row)
          const int64_t g = (k0 + d) / w.group, end = min_i64(depth, (g + 1) * w.group - k0);
          const bool closes = (k0 + end) % w.group == 0;
          if (closes) ends[n_runs] = group_end(w, at, cols, g);
          runs[n_runs] = Run{d / 4, (end - d) / 4, (k0 + d) % w.group != 0, closes ? &ends[n_runs] : nullptr};
          ++n_runs;
          d = end;
        }
        const bool have_out = k0 >= w.group;  // a group closed in an earlier block
        for (int64_t m = 0; m < rows; m += kCodeRows)
          dot_block_rows(min_i64(kCodeRows, rows - m), aq + m * w.row_depth + k0, w.row_depth, words, runs, n_runs,
                         sums + m * kCodeCols, group_sums + m * w.groups, w.groups, have_out, out + m * ldl, ldl);
      }
      for (int64_t r = 0; r < rows; ++r)  // times the token's scale, last, as panel_dot_rows
        for (int h = 0; h < 2; ++h) {
          float* o = out + r * ldl + 16 * h;
          _mm512_storeu_ps(o, _mm512_mul_ps(_mm512_loadu_ps(o), _mm512_set1_ps(p.a_scales[a_row + r])));
        }
    }
}
#pragma GCC diagnostic pop

}  // namespace moe_ext::cpu::MOE_EXT_CPU_NS
