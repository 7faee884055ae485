// What one block of a grouped GEMM computes, shared by the tensor-core kernel (grouped_gemm.cu) and the
// float32 SIMT kernel. Two schedules over the same block shape:
//   rows (forward, dA): a block owns one M-tile of one expert (found from the device-side offsets, see
//     tile_schedule.h) and one N-tile: out[rows] = epilogue(a[rows] @ w[e]^T), K the full depth.
//   depth (dW): a block owns one (N-tile, K-tile) of dw[e] (e = blockIdx.z); the reduction runs over the
//     expert's rows, read from the transposes d_out^T [N, M] and a^T [K, M]. Deterministic: each output
//     element is one block's sum in a fixed order, no atomics. No epilogue.
// The rows schedule's epilogue (bias, activation) runs on each float32 product, see epilogue_value().
#pragma once
#include "cuda/activation.cuh"

namespace moe_ext::cuda {

enum class Schedule : int { rows = 0, depth = 1 };

template <typename T>
struct GemmArgs {
  const T* a;  // rows: a [M, K]; depth: d_out^T [N, M]
  const T* b;  // rows: w [E, N, K]; depth: a^T [K, M]
  const int32_t* offsets;
  int E;
  int64_t M, N, K;
  T* out;  // rows: [M, N_out]; depth: dw [E, N, K]
  Epilogue epilogue;  // rows only
  int schedule;  // Schedule
};

// The block's problem: A rows m_begin..m_end-1 (a + m * lda + k), output columns n_begin.. (n_valid of
// them), reduction k_begin..k_end-1 over the B rows chosen by b_row(), output row m at out + m * ldo.
template <typename T>
struct BlockProblem {
  const T* a;
  int64_t lda;
  int m_begin, m_end;
  const T* b;
  int64_t ldb;
  int n_begin, n_valid;  // n_valid: output columns (f for gated activations)
  int k_begin, k_end;
  T* out;
  int64_t ldo;
  const float* bias;  // the tile's expert's bias row (w's N values), or null
  bool gated, interleaved;  // gated: output column c reads w rows gate_column(c) and up_column(c)
  bool zero;  // a tail tile (rows no expert owns), written as zeros
};

// Which M-tile of the rows schedule this block owns: a parallel walk over the experts in chunks of
// blockDim.x (a block scan of their tile counts); the same answer as find_m_tile() in tile_schedule.h.
__device__ inline MTile find_m_tile_block(const int32_t* offsets, int E, int64_t M, int block_m, int64_t tile) {
  __shared__ int scan_partial[32];
  __shared__ int tiles_before;
  __shared__ MTile found;
  if (threadIdx.x == 0) {
    tiles_before = 0;
    found = MTile{-1, 0, 0};
  }
  __syncthreads();
  for (int chunk = 0; chunk < E; chunk += blockDim.x) {
    const int e = chunk + threadIdx.x;
    const int rows = e < E ? rows_of(offsets, e, M) : 0;
    const int n = static_cast<int>(ceil_div(rows, block_m));
    const int inclusive = block_inclusive_scan(n, scan_partial);
    const int64_t first = tiles_before + inclusive - n;
    if (n > 0 && tile >= first && tile < first + n) {
      const int begin = clamp_offset(offsets[e], M) + static_cast<int>(tile - first) * block_m;
      const int end = min(begin + block_m, clamp_offset(offsets[e], M) + rows);
      found = MTile{e, begin, end};
    }
    __syncthreads();
    if (threadIdx.x == blockDim.x - 1) tiles_before += inclusive;
    __syncthreads();
    if (found.expert >= 0) return found;
  }
  const int64_t tail = tile - tiles_before, begin = clamp_offset(offsets[E], M) + tail * block_m;
  if (tail >= 0 && begin < M) return MTile{E, static_cast<int>(begin), static_cast<int>(min(begin + block_m, M))};
  return MTile{-1, 0, 0};
}

// The block's problem; false if the block has nothing to do. n_tile_cols: output columns per block.
template <typename T>
__device__ inline bool block_problem(const GemmArgs<T>& g, int block_m, int n_tile_cols, BlockProblem<T>& p) {
  const bool gated = halves_columns(g.epilogue);
  p.n_begin = blockIdx.y * n_tile_cols;
  p.gated = gated;
  p.interleaved = gated && is_interleaved(g.epilogue.activation);
  p.zero = false;
  p.bias = nullptr;
  if (g.schedule == static_cast<int>(Schedule::rows)) {
    const MTile tile = find_m_tile_block(g.offsets, g.E, g.M, block_m, blockIdx.x);
    if (tile.expert < 0) return false;
    const int64_t n_out = gated ? g.N / 2 : g.N;
    p.a = g.a;
    p.lda = g.K;
    p.m_begin = tile.row_begin;
    p.m_end = tile.row_end;
    p.zero = tile.expert == g.E;
    p.b = g.b + (p.zero ? 0 : tile.expert) * g.N * g.K;
    p.ldb = g.K;
    p.n_valid = static_cast<int>(n_out);
    if (g.epilogue.bias && !p.zero) p.bias = g.epilogue.bias + static_cast<int64_t>(tile.expert) * g.N;
    p.k_begin = 0;
    p.k_end = static_cast<int>(g.K);
    p.out = g.out;
    p.ldo = n_out;
  } else {
    const int e = blockIdx.z;
    p.a = g.a;
    p.lda = g.M;
    p.m_begin = blockIdx.x * block_m;
    p.m_end = static_cast<int>(min(static_cast<int64_t>(p.m_begin) + block_m, g.N));
    p.b = g.b;
    p.ldb = g.M;
    p.n_valid = static_cast<int>(g.K);
    p.k_begin = clamp_offset(g.offsets[e], g.M);
    p.k_end = max(p.k_begin, static_cast<int>(clamp_offset(g.offsets[e + 1], g.M)));
    p.out = g.out + static_cast<int64_t>(e) * g.N * g.K;
    p.ldo = g.K;
  }
  return true;
}

// The B row (of w, or of a^T) that feeds local column j of a block, or -1 past the edge. Gated epilogues
// pair them up: each span of `span` local columns holds span/2 gate rows, then the up rows of the same
// span/2 output columns, so that one thread's accumulators hold both factors of an output column (w's
// own layout, [gate | up] or interleaved, only decides which rows those are).
template <typename T>
__device__ __forceinline__ int64_t b_row(const BlockProblem<T>& p, int j, int span) {
  if (!p.gated) {
    const int col = p.n_begin + j;
    return col < p.n_valid ? col : -1;
  }
  const int half = span / 2, slot = j / span, within = j % span;
  const int col = p.n_begin + slot * half + within % half;
  if (col >= p.n_valid) return -1;
  return within >= half ? up_column(p.interleaved, p.n_valid, col) : gate_column(p.interleaved, col);
}

// The epilogue of output column `col` from its float32 product(s): `value` (the gate's, for gated
// activations) and `up` (gated only): bias first (w's row order), then the activation.
template <typename T>
__device__ __forceinline__ float epilogue_value(const Epilogue& e, const BlockProblem<T>& p, int col, float value,
                                                float up) {
  if (p.bias) {
    value += p.bias[p.gated ? gate_column(p.interleaved, col) : col];
    if (p.gated) up += p.bias[up_column(p.interleaved, p.n_valid, col)];
  }
  return e.activate ? activate_value(e.activation, value, up) : value;
}

}  // namespace moe_ext::cuda
