// Whole-array conversions between float32 and the 16-bit dtypes (cpu/convert.h), in parallel chunks.
#include "cpu/convert.h"

#include "cpu/common.h"
#include "cpu/kernels.h"

namespace moe_ext::cpu::MOE_EXT_CPU_NS {

namespace {

constexpr int64_t kChunk = 1 << 14;  // elements per parallel chunk: big enough to amortise the fork

template <typename Src>
void widen_typed(const Src* src, int64_t n, int threads, float* dst) {
  MOE_EXT_PARALLEL_FOR(threads)
  for (int64_t c = 0; c < ceil_div(n, kChunk); ++c)
    widen_row(src + c * kChunk, min_i64(kChunk, n - c * kChunk), dst + c * kChunk);
}

template <typename Dst>
void narrow_typed(const float* src, int64_t n, int threads, Dst* dst) {
  MOE_EXT_PARALLEL_FOR(threads)
  for (int64_t c = 0; c < ceil_div(n, kChunk); ++c)
    narrow_row(src + c * kChunk, min_i64(kChunk, n - c * kChunk), dst + c * kChunk);
}

}  // namespace

void widen(const void* src, DType dtype, int64_t n, int threads, float* dst) {
  switch (dtype) {
    case DType::f32: return widen_typed(static_cast<const float*>(src), n, threads, dst);
    case DType::bf16: return widen_typed(static_cast<const bf16_t*>(src), n, threads, dst);
    case DType::f16: return widen_typed(static_cast<const f16_t*>(src), n, threads, dst);
  }
}

void narrow(const float* src, int64_t n, DType dtype, int threads, void* dst) {
  switch (dtype) {
    case DType::f32: return narrow_typed(src, n, threads, static_cast<float*>(dst));
    case DType::bf16: return narrow_typed(src, n, threads, static_cast<bf16_t*>(dst));
    case DType::f16: return narrow_typed(src, n, threads, static_cast<f16_t*>(dst));
  }
}

}  // namespace moe_ext::cpu::MOE_EXT_CPU_NS
