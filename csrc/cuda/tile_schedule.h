// The grouped GEMM's tile schedule, as pure functions shared by the host (tests, launch sizes) and the
// device (each block finds its tile). The rows of expert e are expert_offsets[e]..expert_offsets[e+1]-1;
// each expert's rows are cut into M-tiles of block_m rows, the experts' tiles laid end to end (expert 0's
// first), in the spirit of vLLM's block-aligned layout but without padding the data: a tile simply ends
// at its expert's last row. After the experts come tail tiles over rows expert_offsets[E]..M-1 (rows
// that no expert owns, e.g. capacity padding), which the GEMM fills with zeros.
//
// The launch needs no host copy of the offsets: the grid is sized by max_m_tiles(M, E, block_m), an upper
// bound, and blocks past the real count exit at once. Offsets are clamped to 0..M on the way in, so wrong
// offsets can give wrong rows but never an access outside a[M, K] or out[M, N].
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define MOE_EXT_HOST_DEVICE __host__ __device__
#else
#define MOE_EXT_HOST_DEVICE
#endif

namespace moe_ext::cuda {

// A tile: rows row_begin..row_end-1 of expert `expert`; expert == E marks a zero-filled tail tile,
// expert == -1 "no tile" (a block past the end of the schedule).
struct MTile {
  int32_t expert;
  int32_t row_begin;
  int32_t row_end;
};

MOE_EXT_HOST_DEVICE inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

MOE_EXT_HOST_DEVICE inline int32_t clamp_offset(int32_t offset, int64_t M) {
  return offset < 0 ? 0 : (offset > M ? static_cast<int32_t>(M) : offset);
}

// Expert e's rows as [begin, end) within 0..M (empty when the offsets decrease).
MOE_EXT_HOST_DEVICE inline int32_t rows_of(const int32_t* offsets, int64_t e, int64_t M) {
  const int32_t begin = clamp_offset(offsets[e], M), end = clamp_offset(offsets[e + 1], M);
  return end > begin ? end - begin : 0;
}

// An upper bound of the number of M-tiles: sum_e ceil(rows_e / block_m) < M / block_m + E, plus the tail's
// ceil(tail / block_m) <= ceil(M / block_m); never more than M tiles with rows, plus one.
MOE_EXT_HOST_DEVICE inline int64_t max_m_tiles(int64_t M, int64_t E, int64_t block_m) {
  const int64_t bound = M / block_m + E + ceil_div(M, block_m);
  return bound < 2 * M ? bound : 2 * M;
}

// The tile with index `tile`, by a walk over the experts (the host's version and the reference for the
// device's parallel search in grouped_gemm.cu).
inline MTile find_m_tile(const int32_t* offsets, int64_t E, int64_t M, int64_t block_m, int64_t tile) {
  int64_t first = 0;  // tiles of the experts before e
  for (int64_t e = 0; e < E; ++e) {
    const int64_t rows = rows_of(offsets, e, M), n = ceil_div(rows, block_m);
    if (tile < first + n) {
      const int64_t expert_begin = clamp_offset(offsets[e], M), expert_end = expert_begin + rows;
      const int64_t begin = expert_begin + (tile - first) * block_m;
      const int64_t end = begin + block_m < expert_end ? begin + block_m : expert_end;
      return {static_cast<int32_t>(e), static_cast<int32_t>(begin), static_cast<int32_t>(end)};
    }
    first += n;
  }
  const int64_t tail_begin = clamp_offset(offsets[E], M), tail = tile - first;
  const int64_t begin = tail_begin + tail * block_m;
  if (tail >= 0 && begin < M) {
    const int64_t end = begin + block_m < M ? begin + block_m : M;
    return {static_cast<int32_t>(E), static_cast<int32_t>(begin), static_cast<int32_t>(end)};
  }
  return {-1, 0, 0};
}

}  // namespace moe_ext::cuda
