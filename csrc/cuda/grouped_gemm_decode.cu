// The decode path of the grouped GEMM (few rows in all, e.g. T <= 16 tokens at k = 2): memory-bound, so
// each weight row is read once per pass of up to 8 token rows, with 16-byte loads, and the token rows
// (tiny) come from L1. Grid: (expert, 16 output columns); a warp owns 4 columns, and for gated
// activations reads the gate and up rows of a column together ([gate | up] or interleaved rows). Bias
// and activation are applied to the warp's sums, in the order of the tiled kernels' epilogue. Experts
// with no rows exit at once and touch no weight. Block E (past the experts) zero-fills rows
// expert_offsets[E]..M-1.
#include "cuda/activation.cuh"

namespace moe_ext::cuda {

namespace {

constexpr int kDecodeWarps = 4, kColumnsPerWarp = 4, kRowsPerPass = 8;

// Elements of a 16-byte vector starting at p (aligned), as floats.
template <typename T>
__device__ __forceinline__ void load16(const T* p, float* out) {
  constexpr int n = 16 / sizeof(T);
  const int4 raw = *reinterpret_cast<const int4*>(p);
  const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < n; ++i) out[i] = to_float(v[i]);
}

// Sums rows [row_begin, row_end) (at most kRowsPerPass) of a against w_row (and w_up when gated).
template <typename T>
__device__ __forceinline__ void dot_pass(const T* a, int64_t K, int row_begin, int row_end, const T* w_row,
                                         const T* w_up, bool vectorised, float* gate_sum, float* up_sum) {
  const int lane = threadIdx.x & 31, rows = row_end - row_begin;
  constexpr int n = 16 / sizeof(T);
  if (vectorised) {
    for (int64_t k = static_cast<int64_t>(lane) * n; k < K; k += 32 * n) {
      float wg[n], wu[n], x[n];
      load16(w_row + k, wg);
      if (w_up) load16(w_up + k, wu);
#pragma unroll
      for (int r = 0; r < kRowsPerPass; ++r) {
        if (r < rows) {  // a guard, not a break: keeps the sums in registers (no spills)
          load16(a + (row_begin + r) * K + k, x);
#pragma unroll
          for (int i = 0; i < n; ++i) {
            gate_sum[r] = fmaf(x[i], wg[i], gate_sum[r]);
            if (w_up) up_sum[r] = fmaf(x[i], wu[i], up_sum[r]);
          }
        }
      }
    }
  } else {
    for (int64_t k = lane; k < K; k += 32) {
      const float wg = to_float(w_row[k]), wu = w_up ? to_float(w_up[k]) : 0.f;
#pragma unroll
      for (int r = 0; r < kRowsPerPass; ++r) {
        if (r < rows) {
          const float x = to_float(a[(row_begin + r) * K + k]);
          gate_sum[r] = fmaf(x, wg, gate_sum[r]);
          up_sum[r] = fmaf(x, wu, up_sum[r]);
        }
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(32 * kDecodeWarps)
grouped_gemm_decode_kernel(const T* __restrict__ a, const T* __restrict__ w, const int32_t* __restrict__ offsets,
                           int E, int64_t M, int64_t N, int64_t K, Epilogue epilogue, bool vectorised,
                           T* __restrict__ out) {
  const int e = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const bool gated = halves_columns(epilogue), interleaved = gated && is_interleaved(epilogue.activation);
  const int64_t n_out = gated ? N / 2 : N;
  const int col0 = (blockIdx.y * kDecodeWarps + warp) * kColumnsPerWarp;
  if (e == E) {  // the tail: rows no expert owns
    for (int64_t m = clamp_offset(offsets[E], M); m < M; ++m)
      for (int c = lane; c < kColumnsPerWarp; c += 32)
        if (col0 + c < n_out) out[m * n_out + col0 + c] = from_float<T>(0.f);
    return;
  }
  const int row_begin = clamp_offset(offsets[e], M), row_end = row_begin + rows_of(offsets, e, M);
  if (row_end == row_begin) return;
  const T* expert_w = w + static_cast<int64_t>(e) * N * K;
  const float* bias = epilogue.bias ? epilogue.bias + static_cast<int64_t>(e) * N : nullptr;
  for (int c = 0; c < kColumnsPerWarp; ++c) {
    const int64_t col = col0 + c;
    if (col >= n_out) break;
    // the w rows (and bias entries) of this output column: the gate's and the up's, or col's own
    const int64_t gate_row = gated ? gate_column(interleaved, col) : col;
    const int64_t up_row = gated ? up_column(interleaved, n_out, col) : -1;
    const T* w_row = expert_w + gate_row * K;
    const T* w_up = gated ? expert_w + up_row * K : nullptr;
    for (int pass = row_begin; pass < row_end; pass += kRowsPerPass) {
      const int pass_end = min(pass + kRowsPerPass, row_end);
      float gate_sum[kRowsPerPass] = {}, up_sum[kRowsPerPass] = {};
      dot_pass(a, K, pass, pass_end, w_row, w_up, vectorised, gate_sum, up_sum);
      // Lane r takes row r's totals; the epilogue (bias, activation) then runs once, on lanes 0..rows-1.
      float gate_total = 0.f, up_total = 0.f;
#pragma unroll
      for (int r = 0; r < kRowsPerPass; ++r) {
        if (r >= pass_end - pass) break;  // the same for every lane: the butterflies stay warp-wide
        const float g = warp_sum(gate_sum[r]), u = gated ? warp_sum(up_sum[r]) : 0.f;
        if (lane == r) gate_total = g, up_total = u;
      }
      if (lane < pass_end - pass) {
        if (bias) {
          gate_total += bias[gate_row];
          if (gated) up_total += bias[up_row];
        }
        const float v = epilogue.activate ? activate_value(epilogue.activation, gate_total, up_total) : gate_total;
        out[(pass + lane) * n_out + col] = from_float<T>(v);
      }
    }
  }
}

}  // namespace

void grouped_gemm_decode(const void* a, const void* w, const int32_t* expert_offsets, int64_t E, int64_t M,
                         int64_t N, int64_t K, DType dtype, const Epilogue& epilogue, void* out, Stream stream) {
  const int64_t n_out = halves_columns(epilogue) ? N / 2 : N;
  const int64_t col_blocks = ceil_div(n_out, kDecodeWarps * kColumnsPerWarp);
  if (col_blocks > 65535) throw std::invalid_argument("grouped_gemm: too many output columns for one launch");
  dispatch_dtype(dtype, [&](auto tag) {
    using Elem = typename decltype(tag)::type;
    const bool vectorised = (K * sizeof(Elem)) % 16 == 0 && reinterpret_cast<uintptr_t>(a) % 16 == 0 &&
                            reinterpret_cast<uintptr_t>(w) % 16 == 0;
    const dim3 grid(static_cast<unsigned>(E + 1), static_cast<unsigned>(col_blocks));
    grouped_gemm_decode_kernel<Elem><<<grid, 32 * kDecodeWarps, 0, as_stream(stream)>>>(
        static_cast<const Elem*>(a), static_cast<const Elem*>(w), expert_offsets, static_cast<int>(E), M, N, K,
        epilogue, vectorised, static_cast<Elem*>(out));
  });
  check_launch("grouped_gemm (decode)");
}

}  // namespace moe_ext::cuda
