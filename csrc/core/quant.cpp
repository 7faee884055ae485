#include "core/quant.h"

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "core/gemm_call.h"
#include "core/isa.h"
#include "core/kernels.h"
#include "core/threads.h"
#include "core/workspace.h"

namespace moe_ext {

namespace {

// As for packed weights (core/packed.cpp): large weights on 2 MiB-aligned memory advised for
// transparent huge pages, so a decode step's stream does not miss the TLB every 4 KiB.
constexpr std::size_t kHugePage = std::size_t{2} << 20;

void* allocate(std::size_t bytes) {
  if (bytes > SIZE_MAX - 2 * kHugePage) return nullptr;
  const std::size_t align = bytes >= kHugePage ? kHugePage : 64;
  const std::size_t size = (bytes + 64 + align - 1) / align * align;
  void* p = std::aligned_alloc(align, size);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (p != nullptr && align == kHugePage) madvise(p, size, MADV_HUGEPAGE);
#endif
  return p;
}

[[noreturn]] void fail(const char* name, const std::string& expected, const std::string& got) {
  throw std::invalid_argument(std::string(name) + ": expected " + expected + "; got " + got);
}

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

void check_format(QuantScheme scheme, int64_t E, int64_t N, int64_t K, int64_t group_size, bool zero_point) {
  if (E < 1 || N < 0 || K < 1)
    fail("w", "shape (E, N, K) with E >= 1 and K >= 1",
         "(" + std::to_string(E) + ", " + std::to_string(N) + ", " + std::to_string(K) + ")");
  if (scheme == QuantScheme::int8) {
    if (zero_point) fail("zero_point", "False for scheme 'int8' (int8 is symmetric)", "True");
    if (group_size != 0 && (group_size % kQuantBlock != 0 || group_size <= 0 || K % group_size != 0))
      fail("group_size", "None or a multiple of 32 that divides K = " + std::to_string(K),
           std::to_string(group_size));
    return;
  }
  if (K % 2 != 0) fail("w", "an even K for scheme 'int4' (two values a byte)", "K = " + std::to_string(K));
  if (group_size != 32 && group_size != 64 && group_size != 128)
    fail("group_size", "32, 64 or 128 for scheme 'int4'", group_size == 0 ? "None" : std::to_string(group_size));
  if (K % group_size != 0)
    fail("group_size", "a group size that divides K = " + std::to_string(K), std::to_string(group_size));
}

// --- quantisation of one group (docs/api.md §9: the rounding rules) ---------------------------------

float to_float(const void* w, DType dtype, int64_t i) {
  const uint16_t* h = static_cast<const uint16_t*>(w);
  switch (dtype) {
    case DType::f32: return static_cast<const float*>(w)[i];
    case DType::bf16: {
      const uint32_t bits = static_cast<uint32_t>(h[i]) << 16;
      float f;
      std::memcpy(&f, &bits, 4);
      return f;
    }
    case DType::f16: break;
  }
  // float16: exact widening in software (this file is not compiled per tier, so no F16C).
  const uint32_t sign = static_cast<uint32_t>(h[i] & 0x8000u) << 16, exponent = (h[i] >> 10) & 0x1fu,
                 mantissa = h[i] & 0x3ffu;
  uint32_t bits;
  if (exponent == 0) {
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  }
  bits = exponent == 31 ? (sign | 0x7f800000u | (mantissa << 13)) : (sign | ((exponent + 112) << 23) | (mantissa << 13));
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Quantises x[0..n) (finite) into q (one signed int8, or one unsigned int4 value, per depth).
struct GroupResult {
  float scale;
  int zero;
};

GroupResult quantize_group_int8(const float* x, int64_t n, int* q) {
  float amax = 0.f;
  for (int64_t i = 0; i < n; ++i) amax = std::fabs(x[i]) > amax ? std::fabs(x[i]) : amax;
  const float scale = amax / 127.f;
  for (int64_t i = 0; i < n; ++i) {
    const float r = scale > 0.f ? std::nearbyint(x[i] / scale) : 0.f;
    q[i] = static_cast<int>(r < -127.f ? -127.f : (r > 127.f ? 127.f : r));
  }
  return {scale, 0};
}

GroupResult quantize_group_int4(const float* x, int64_t n, bool zero_point, int* q) {
  if (!zero_point) {  // q + 8 with q in [-7, 7]
    float amax = 0.f;
    for (int64_t i = 0; i < n; ++i) amax = std::fabs(x[i]) > amax ? std::fabs(x[i]) : amax;
    const float scale = amax / 7.f;
    for (int64_t i = 0; i < n; ++i) {
      const float r = scale > 0.f ? std::nearbyint(x[i] / scale) : 0.f;
      q[i] = static_cast<int>(r < -7.f ? -7.f : (r > 7.f ? 7.f : r)) + kInt4SymmetricZero;
    }
    return {scale, kInt4SymmetricZero};
  }
  // Asymmetric: the range [min(x, 0), max(x, 0)] in 15 steps, zero = the rounded -low / scale.
  float low = 0.f, high = 0.f;
  for (int64_t i = 0; i < n; ++i) low = x[i] < low ? x[i] : low, high = x[i] > high ? x[i] : high;
  const float scale = (high - low) / 15.f;
  if (!(scale > 0.f)) {
    for (int64_t i = 0; i < n; ++i) q[i] = 0;
    return {0.f, 0};
  }
  const float z = std::nearbyint(-low / scale);
  const int zero = static_cast<int>(z < 0.f ? 0.f : (z > 15.f ? 15.f : z));
  for (int64_t i = 0; i < n; ++i) {
    const float r = std::nearbyint(x[i] / scale) + static_cast<float>(zero);
    q[i] = static_cast<int>(r < 0.f ? 0.f : (r > 15.f ? 15.f : r));
  }
  return {scale, zero};
}

// Stores one group's values at depth `first` of a row.
void store_group(QuantScheme scheme, const int* q, int64_t first, int64_t n, uint8_t* row) {
  if (scheme == QuantScheme::int8) {
    for (int64_t i = 0; i < n; ++i) row[first + i] = static_cast<uint8_t>(static_cast<int8_t>(q[i]));
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    const int64_t depth = first + i, block = depth / kQuantBlock, j = depth % kQuantBlock;
    uint8_t& byte = row[block * (kQuantBlock / 2) + j % (kQuantBlock / 2)];
    byte = j < kQuantBlock / 2 ? static_cast<uint8_t>((byte & 0xf0u) | q[i]) : static_cast<uint8_t>((byte & 0x0fu) | (q[i] << 4));
  }
}

// The float16 bits of s in *h when s is a float16 value (finite, dropping no bit); false otherwise.
bool half_of(float s, uint16_t* h) {
  uint32_t u;
  std::memcpy(&u, &s, 4);
  const uint32_t sign = (u >> 16) & 0x8000u, magnitude = u & 0x7fffffffu;
  const int exponent = static_cast<int>(magnitude >> 23) - 127;  // s = 1.m * 2^exponent
  if (magnitude == 0) {
    *h = static_cast<uint16_t>(sign);
    return true;
  }
  if (exponent > 15 || exponent < -24) return false;
  if (exponent >= -14) {  // a normal float16: 10 bits of mantissa
    if ((magnitude & 0x1fffu) != 0) return false;
    *h = static_cast<uint16_t>(sign | (static_cast<uint32_t>(exponent + 15) << 10) | ((magnitude >> 13) & 0x3ffu));
    return true;
  }
  const float units = std::fabs(s) * 16777216.f;  // a subnormal float16 is units * 2^-24, units < 1024
  if (units != std::floor(units)) return false;
  *h = static_cast<uint16_t>(sign | static_cast<uint32_t>(units));
  return true;
}

// Scale i (a group_offset) of v, as float32.
float scale_at(const QuantView& v, int64_t i) {
  return v.half_scales ? to_float(v.scales, DType::f16, i) : static_cast<const float*>(v.scales)[i];
}

int value_at(const QuantView& v, int64_t row, int64_t depth) {
  if (v.scheme == QuantScheme::int8) return static_cast<int8_t>(v.values[value_offset(v, row, depth)]);
  const int64_t block = depth / kQuantBlock, j = depth % kQuantBlock;
  const uint8_t byte = v.values[value_offset(v, row, block * (kQuantBlock / 2) + j % (kQuantBlock / 2))];
  return j < kQuantBlock / 2 ? (byte & 0x0f) : (byte >> 4);
}

int zero_of(const QuantView& v, int64_t row, int64_t g) {
  if (v.zeros != nullptr) return v.zeros[group_offset(v, row, g)];
  return v.scheme == QuantScheme::int4 ? kInt4SymmetricZero : 0;
}

std::atomic<bool>& vnni() {
  static std::atomic<bool> value{
#if defined(MOE_EXT_X86_TIERS)
      __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512vnni")
#else
      false
#endif
  };
  return value;
}

bool cpu_has_vnni() {
#if defined(MOE_EXT_X86_TIERS)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

}  // namespace

void QuantizedWeight::Free::operator()(void* p) const { std::free(p); }

QuantView QuantizedWeight::layout(QuantScheme scheme, int64_t E, int64_t N, int64_t K, int64_t group_size,
                                  bool zero_point) {
  check_format(scheme, E, N, K, group_size, zero_point);
  QuantView v;
  v.scheme = scheme, v.E = E, v.N = N, v.K = K;
  v.row_depth = round_up(K, kQuantBlock);  // int4: K is a multiple of its group size, so of 32, already
  v.group = group_size == 0 ? v.row_depth : group_size;
  v.groups = v.row_depth / v.group;
  v.row_bytes = scheme == QuantScheme::int8 ? v.row_depth : v.row_depth / 2;
  return v;
}

QuantizedWeight::QuantizedWeight(QuantScheme scheme, int64_t E, int64_t N, int64_t K, int64_t group_size,
                                 bool zero_point, bool half_scales, bool quantize_activations, bool allocate_parts)
    : group_size_(group_size), view_(layout(scheme, E, N, K, group_size, zero_point)) {
  QuantView& v = view_;
  v.quantize_activations = quantize_activations;
  v.half_scales = half_scales;
  const std::size_t rows = static_cast<std::size_t>(E * N);
  const std::size_t values = rows * v.row_bytes, scales = rows * v.groups * scale_bytes(v),
                    zeros = zero_point ? rows * v.groups : 0;
  bytes_ = values + scales + zeros;
  if (!allocate_parts) return;
  const std::size_t scales_at = round_up(static_cast<int64_t>(values), 64);
  const std::size_t zeros_at = scales_at + round_up(static_cast<int64_t>(scales), 64);
  void* data = allocate(zeros_at + zeros);
  if (data == nullptr) throw std::bad_alloc();
  data_.reset(data);
  uint8_t* base = static_cast<uint8_t*>(data);
  std::memset(base, 0, scales_at);  // the int8 rows' padding is zero
  v.values = base;
  v.scales = base + scales_at;
  v.zeros = zero_point ? base + zeros_at : nullptr;
}

std::unique_ptr<QuantizedWeight> QuantizedWeight::quantize(const void* w, DType dtype, int64_t E, int64_t N,
                                                           int64_t K, QuantScheme scheme, int64_t group_size,
                                                           bool zero_point, bool quantize_activations) {
  std::unique_ptr<QuantizedWeight> q(
      new QuantizedWeight(scheme, E, N, K, group_size, zero_point, false, quantize_activations));
  const QuantView& v = q->view_;
  uint8_t* values = const_cast<uint8_t*>(v.values);
  float* scales = static_cast<float*>(const_cast<void*>(v.scales));
  uint8_t* zeros = const_cast<uint8_t*>(v.zeros);
  const int64_t rows = E * N, group_depth = group_size == 0 ? K : group_size;
  std::atomic<int64_t> bad_row{-1};
#pragma omp parallel for schedule(static) num_threads(num_threads())
  for (int64_t r = 0; r < rows; ++r) {
    std::unique_ptr<float[]> x(new float[group_depth]);
    std::unique_ptr<int[]> qs(new int[group_depth]);
    std::unique_ptr<uint8_t[]> row(new uint8_t[v.row_bytes]());
    for (int64_t g = 0; g < v.groups; ++g) {
      bool finite = true;
      for (int64_t i = 0; i < group_depth; ++i) {
        x[i] = to_float(w, dtype, r * K + g * group_depth + i);
        finite = finite && std::isfinite(x[i]);
      }
      if (!finite) {
        int64_t expected = -1;
        bad_row.compare_exchange_strong(expected, r);
        break;
      }
      const GroupResult res = scheme == QuantScheme::int8 ? quantize_group_int8(x.get(), group_depth, qs.get())
                                                          : quantize_group_int4(x.get(), group_depth, zero_point, qs.get());
      scales[group_offset(v, r, g)] = res.scale;
      if (zeros != nullptr) zeros[group_offset(v, r, g)] = static_cast<uint8_t>(res.zero);
      store_group(scheme, qs.get(), g * group_depth, group_depth, row.get());
    }
    for (int64_t j = 0; j < v.row_bytes; ++j) values[value_offset(v, r, j)] = row[j];
  }
  if (bad_row.load() >= 0) {
    const int64_t r = bad_row.load();
    fail("w", "finite values (NaN and Inf cannot be quantised)",
         "a non-finite value in w[" + std::to_string(r / (N > 0 ? N : 1)) + ", " + std::to_string(r % (N > 0 ? N : 1)) +
             "]");
  }
  return q;
}

std::unique_ptr<QuantizedWeight> QuantizedWeight::from_parts(QuantScheme scheme, int64_t E, int64_t N, int64_t K,
                                                             int64_t group_size, const uint8_t* values,
                                                             const float* scales, const uint8_t* zeros,
                                                             bool quantize_activations) {
  const int64_t groups = layout(scheme, E, N, K, group_size, zeros != nullptr).groups, rows = E * N;
  bool half = true;
  for (int64_t i = 0; i < rows * groups; ++i) {
    if (!std::isfinite(scales[i]))
      fail("scales", "finite values", "a non-finite scale at flat index " + std::to_string(i));
    uint16_t h;
    half = half && half_of(scales[i], &h);
  }
  std::unique_ptr<QuantizedWeight> q(
      new QuantizedWeight(scheme, E, N, K, group_size, zeros != nullptr, half, quantize_activations));
  const QuantView& v = q->view_;
  if (zeros != nullptr)
    for (int64_t i = 0; i < rows * v.groups; ++i)
      if (zeros[i] > 15) fail("zeros", "zero points in 0..15", std::to_string(zeros[i]));
  uint8_t* to_values = const_cast<uint8_t*>(v.values);
  float* to_scales = static_cast<float*>(const_cast<void*>(v.scales));
  uint16_t* to_halves = static_cast<uint16_t*>(const_cast<void*>(v.scales));
  uint8_t* to_zeros = const_cast<uint8_t*>(v.zeros);
#pragma omp parallel for schedule(static) num_threads(num_threads())
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < v.row_bytes; ++j) to_values[value_offset(v, r, j)] = values[r * v.row_bytes + j];
    for (int64_t g = 0; g < v.groups; ++g) {
      const float s = scales[r * v.groups + g];
      if (half)
        half_of(s, &to_halves[group_offset(v, r, g)]);
      else
        to_scales[group_offset(v, r, g)] = s;
      if (zeros != nullptr) to_zeros[group_offset(v, r, g)] = zeros[r * v.groups + g];
    }
  }
  return q;
}

void QuantizedWeight::export_parts(uint8_t* values, float* scales, uint8_t* zeros) const {
  const QuantView& v = view_;
  const int64_t rows = v.E * v.N;
#pragma omp parallel for schedule(static) num_threads(num_threads())
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < v.row_bytes; ++j) values[r * v.row_bytes + j] = v.values[value_offset(v, r, j)];
    for (int64_t g = 0; g < v.groups; ++g) {
      scales[r * v.groups + g] = scale_at(v, group_offset(v, r, g));
      if (zeros != nullptr && v.zeros != nullptr) zeros[r * v.groups + g] = v.zeros[group_offset(v, r, g)];
    }
  }
}

std::unique_ptr<QuantizedWeight> QuantizedWeight::borrow(QuantScheme scheme, int64_t E, int64_t N, int64_t K,
                                                         int64_t group_size, const uint8_t* values,
                                                         const void* scales, bool half_scales, const uint8_t* zeros,
                                                         bool quantize_activations) {
  std::unique_ptr<QuantizedWeight> q(
      new QuantizedWeight(scheme, E, N, K, group_size, zeros != nullptr, half_scales, quantize_activations, false));
  q->view_.values = values, q->view_.scales = scales, q->view_.zeros = zeros;
  return q;
}

std::unique_ptr<QuantizedWeight> QuantizedWeight::with_activations(bool quantize_activations) const {
  const QuantView& v = view_;
  std::unique_ptr<QuantizedWeight> q(
      new QuantizedWeight(v.scheme, v.E, v.N, v.K, group_size_, v.zeros != nullptr, v.half_scales,
                          quantize_activations));
  const std::size_t rows = static_cast<std::size_t>(v.E * v.N);
  std::memcpy(const_cast<uint8_t*>(q->view_.values), v.values, rows * v.row_bytes);  // both in the kernel layout
  std::memcpy(const_cast<void*>(q->view_.scales), v.scales, rows * v.groups * scale_bytes(v));
  if (v.zeros != nullptr) std::memcpy(const_cast<uint8_t*>(q->view_.zeros), v.zeros, rows * v.groups);
  return q;
}

void QuantizedWeight::dequantize(float* out) const {
  const QuantView& v = view_;
  const int64_t rows = v.E * v.N;
#pragma omp parallel for schedule(static) num_threads(num_threads())
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t depth = 0; depth < v.K; ++depth) {
      const int64_t g = depth / v.group;
      const float scale = scale_at(v, group_offset(v, r, g));
      out[r * v.K + depth] = scale * static_cast<float>(value_at(v, r, depth) - zero_of(v, r, g));
    }
  }
}

bool vnni_enabled() { return vnni().load(std::memory_order_relaxed); }
void set_vnni_enabled(bool enabled) { vnni().store(enabled && cpu_has_vnni(), std::memory_order_relaxed); }

void run_quant_gemm(const float* a, DType caller_dtype, const QuantView& w, const int32_t* offsets,
                    bool fuse_activation, const Activation& activation, const float* bias, float* out) {
  QuantGemmProblem p;
  p.a = a, p.w = &w, p.offsets = offsets, p.out = out, p.bias = bias;
  p.fuse_activation = fuse_activation, p.activation = activation;
  p.vnni = current_isa() == Isa::avx512 && vnni_enabled();
  p.bf16_dot = caller_dtype == DType::bf16 && !w.quantize_activations && w.K % kQuantBlock == 0 &&
               current_isa() == Isa::avx512 && bf16_dot_enabled();
  Workspace& ws = thread_workspace();
  const int64_t M = offsets[w.E];
  const int threads = num_threads();  // read once: the scratch is sized for exactly this many
  if (p.bf16_dot && M > 0) {  // as the bfloat16 weights' rule (docs/api.md "dtypes"): rows rounded once
    p.a_bf16 = detail::round_rows_to_bf16(a, M, w.K);  // K is even: no padding
    float* rows = ws.get<float>(Scratch::quant_rows, M * w.K);  // the same values for the float32 paths
    kernels().widen(p.a_bf16, DType::bf16, M * w.K, threads, rows);
    p.a = rows;
  }
  if (w.quantize_activations) {
    // One buffer: int8 rows, then the scales, then the group sums (each part 64-byte aligned).
    const std::size_t rows_bytes = static_cast<std::size_t>(round_up(M * w.row_depth, 64));
    const std::size_t scales_bytes = static_cast<std::size_t>(round_up(M * 4, 64));
    char* buf = static_cast<char*>(ws.get(Scratch::quant_rows, rows_bytes + scales_bytes + M * w.groups * 4));
    p.a_q = reinterpret_cast<int8_t*>(buf);
    p.a_scales = reinterpret_cast<float*>(buf + rows_bytes);
    p.a_sums = reinterpret_cast<int32_t*>(buf + rows_bytes + scales_bytes);
  }
  const int64_t per_thread = quant_gemm_scratch_bytes();
  void* scratch = ws.get(Scratch::gemm_panels, static_cast<std::size_t>(threads * per_thread));
  kernels().quant_gemm(p, threads, scratch);
}

}  // namespace moe_ext
