// Token permutation on the GPU, giving exactly the CPU order (expert, then token, then slot) with no host
// synchronisation: three launches on the stream.
//   1. count_chunks: the copies are cut into chunks of 32*W (W warps per block); each block counts its
//      chunk's copies per expert (shared-memory integer atomics: the counts do not depend on their order).
//   2. scan_chunks (one block): per expert, an exclusive scan over the chunks gives each chunk's first rank
//      within the expert; capacity clips each expert's total; an exclusive scan over experts gives
//      expert_offsets.
//   3. assign_rows: within a chunk a copy's rank is (copies of its expert in earlier warps) + (copies of its
//      expert in lower lanes, from __match_any_sync); rank >= kept drops the copy (perm_rows = -1).
// Ranks grow with the copy index t*k+j, so the order within an expert is stable, as on the CPU.
#include "cuda/common.cuh"

namespace moe_ext::cuda {

namespace {

constexpr int64_t kMaxPermuteExperts = 12288;  // per-warp counters of one warp: 48 KiB of shared memory

int warps_per_chunk(int64_t E) {
  const int64_t w = kMaxPermuteExperts / (E > 0 ? E : 1);  // 8 warps up to 1536 experts
  return static_cast<int>(w < 1 ? 1 : (w > 8 ? 8 : w));
}

__global__ void count_chunks(const int32_t* __restrict__ ids, int64_t copies, int E, int32_t* __restrict__ counts) {
  extern __shared__ int counter[];
  for (int e = threadIdx.x; e < E; e += blockDim.x) counter[e] = 0;
  __syncthreads();
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < copies) {
    const int32_t e = ids[i];
    if (e >= 0 && e < E) atomicAdd(&counter[e], 1);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) counts[static_cast<int64_t>(blockIdx.x) * E + e] = counter[e];
}

// counts [chunks, E] becomes each chunk's first rank per expert; totals [E] the copies per expert.
__global__ void scan_chunks(int32_t* __restrict__ counts, int64_t chunks, int E, int64_t capacity,
                            int32_t* __restrict__ totals, int32_t* __restrict__ expert_offsets) {
  __shared__ int partial[32];
  __shared__ int carry;
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int running = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      const int v = counts[c * E + e];
      counts[c * E + e] = running;
      running += v;
    }
    totals[e] = capacity >= 0 && running > capacity ? static_cast<int>(capacity) : running;
  }
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int base = 0; base < E; base += blockDim.x) {
    const int e = base + threadIdx.x;
    const int kept = e < E ? totals[e] : 0;
    const int inclusive = block_inclusive_scan(kept, partial);
    const int before = carry;
    if (e < E) expert_offsets[e] = before + inclusive - kept;
    __syncthreads();
    if (threadIdx.x == blockDim.x - 1) carry = before + inclusive;
    __syncthreads();
  }
  if (threadIdx.x == 0) expert_offsets[E] = carry;
}

__global__ void assign_rows(const int32_t* __restrict__ ids, int64_t copies, int E,
                            const int32_t* __restrict__ chunk_base, const int32_t* __restrict__ expert_offsets,
                            int32_t* __restrict__ perm_rows) {
  extern __shared__ int warp_count[];  // [warps, E]: copies per expert in each warp, then exclusive over warps
  const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int i = threadIdx.x; i < warps * E; i += blockDim.x) warp_count[i] = 0;
  __syncthreads();
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int32_t id = i < copies ? ids[i] : -1;
  const int e = id >= 0 && id < E ? id : -1;  // invalid ids (and lanes past the end) share key -1
  const unsigned peers = __match_any_sync(0xffffffffu, e);
  const int rank_in_warp = __popc(peers & ((1u << lane) - 1u));
  if (e >= 0 && rank_in_warp == 0) warp_count[warp * E + e] = __popc(peers);
  __syncthreads();
  for (int x = threadIdx.x; x < E; x += blockDim.x) {
    int running = 0;
    for (int w = 0; w < warps; ++w) {
      const int v = warp_count[w * E + x];
      warp_count[w * E + x] = running;
      running += v;
    }
  }
  __syncthreads();
  if (i >= copies) return;
  if (e < 0) {
    perm_rows[i] = -1;
    return;
  }
  const int rank = chunk_base[static_cast<int64_t>(blockIdx.x) * E + e] + warp_count[warp * E + e] + rank_in_warp;
  const int kept = expert_offsets[e + 1] - expert_offsets[e];
  perm_rows[i] = rank < kept ? expert_offsets[e] + rank : -1;
}

template <typename T>
__global__ void gather_kernel(const T* __restrict__ x, const int32_t* __restrict__ perm_rows, int64_t copies,
                              int k, int64_t d, int64_t M, bool vectorised, T* __restrict__ x_perm) {
  const int64_t copy = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (copy >= copies) return;
  const int64_t row = perm_rows[copy];
  if (row < 0 || row >= M) return;
  const T* src = x + (copy / k) * d;
  T* dst = x_perm + row * d;
  if (vectorised) {  // 16-byte moves; d * sizeof(T) is a multiple of 16 and both rows are aligned
    const int64_t n = d * static_cast<int64_t>(sizeof(T)) / 16;
    for (int64_t v = lane; v < n; v += 32) reinterpret_cast<int4*>(dst)[v] = reinterpret_cast<const int4*>(src)[v];
  } else {
    for (int64_t v = lane; v < d; v += 32) dst[v] = src[v];
  }
}

}  // namespace

int64_t permute_scratch_bytes(int64_t T, int64_t k, int64_t E) {
  const int64_t chunk = 32 * warps_per_chunk(E), chunks = ceil_div(T * k, chunk);
  return (chunks + 1) * E * static_cast<int64_t>(sizeof(int32_t));
}

void permute_plan(const int32_t* topk_ids, int64_t T, int64_t k, int64_t E, int64_t capacity,
                  int32_t* expert_offsets, int32_t* perm_rows, void* scratch, Stream stream) {
  require_device("moe_ext._cuda.permute_plan");
  if (E < 1 || E > kMaxPermuteExperts)
    throw std::invalid_argument("num_experts: the CUDA permute supports 1.." + std::to_string(kMaxPermuteExperts) +
                                " experts; got " + std::to_string(E));
  const int64_t copies = T * k;
  if (copies > 0x7fffffffLL) throw std::invalid_argument("topk_ids: T*k must be < 2^31 on CUDA");
  const int warps = warps_per_chunk(E), threads = 32 * warps;
  const int64_t chunks = ceil_div(copies, threads);
  int32_t* counts = static_cast<int32_t*>(scratch);
  int32_t* totals = counts + chunks * E;
  cudaStream_t s = as_stream(stream);
  const int e = static_cast<int>(E);
  if (chunks > 0) {
    count_chunks<<<grid_size(chunks, "permute"), threads, E * sizeof(int), s>>>(topk_ids, copies, e, counts);
    check_launch("permute count_chunks");
  }
  scan_chunks<<<1, 1024, 0, s>>>(counts, chunks, e, capacity, totals, expert_offsets);
  check_launch("permute scan_chunks");
  if (chunks > 0) {
    assign_rows<<<grid_size(chunks, "permute"), threads, warps * E * sizeof(int), s>>>(
        topk_ids, copies, e, counts, expert_offsets, perm_rows);
    check_launch("permute assign_rows");
  }
}

void gather_rows(const void* x, const int32_t* perm_rows, int64_t T, int64_t k, int64_t d, int64_t M,
                 DType dtype, void* x_perm, Stream stream) {
  require_device("moe_ext._cuda.gather_rows");
  if (T * k == 0 || d == 0) return;
  constexpr int kCopiesPerBlock = 8;
  dispatch_dtype(dtype, [&](auto tag) {
    using Elem = typename decltype(tag)::type;
    const bool vectorised = (d * sizeof(Elem)) % 16 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                            reinterpret_cast<uintptr_t>(x_perm) % 16 == 0;
    gather_kernel<Elem><<<grid_size(ceil_div(T * k, kCopiesPerBlock), "gather_rows"), 32 * kCopiesPerBlock, 0,
                          as_stream(stream)>>>(static_cast<const Elem*>(x), perm_rows, T * k, static_cast<int>(k),
                                               d, M, vectorised, static_cast<Elem*>(x_perm));
  });
  check_launch("gather_rows");
}

}  // namespace moe_ext::cuda
