// Grouped GEMM over all experts in one launch (see gemm_tile.cuh for the schedules).
//   bfloat16 / float16: tensor cores through mma.sync.m16n8k16 (sm_80+), float32 accumulation; a 64x128x32
//     block tile, 4 warps of 32x64, a 3-stage cp.async pipeline, ldmatrix from padded shared rows
//     (80-byte rows: the 8 rows an ldmatrix reads hit 8 distinct 16-byte bank groups).
//   float32: a SIMT kernel (64x64x16 tile, 4x4 per thread), exact float32 math: no TF32 rounding.
// Operands that are not 16-byte aligned along K (odd K, the dW schedule's per-expert row ranges) take
// an element-wise load path inside the same kernel, so every shape works with one instantiation per dtype.
#include "cuda/gemm_tile.cuh"

namespace moe_ext::cuda {

namespace {

// ---------------------------------------------------------------- tensor cores (bf16, fp16)
constexpr int kBlockM = 64, kBlockN = 128, kBlockK = 32, kStages = 3, kMmaThreads = 128;
constexpr int kWarpN = 64;               // columns per warp (the gated span)
constexpr int kRowStride = kBlockK + 8;  // halves per shared row

template <typename T> struct MmaOp;
template <> struct MmaOp<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float* c, const uint32_t* a, const uint32_t* b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};
template <> struct MmaOp<__half> {
  static __device__ __forceinline__ void run(float* c, const uint32_t* a, const uint32_t* b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, zero-filled when !valid (src-size 0 reads nothing).
__device__ __forceinline__ void copy16_async(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void commit_async() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void wait_async() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(p)));
}

// Loads rows x kBlockK of an operand into shared memory, 8 elements (16 bytes) per piece. row_of(r) gives
// the global row pointer or null (zero fill). vectorised: 16-byte cp.async; else element loads. `any`: a
// valid global address handed to zero-filling copies, which read nothing.
template <typename T, int Rows, typename RowOf>
__device__ __forceinline__ void load_tile(T* shared, RowOf row_of, const T* any, int k0, int k_end,
                                          bool vectorised) {
  constexpr int kPieces = Rows * kBlockK / 8;
  for (int piece = threadIdx.x; piece < kPieces; piece += kMmaThreads) {
    const int r = piece / (kBlockK / 8), c = (piece % (kBlockK / 8)) * 8, k = k0 + c;
    const T* row = row_of(r);
    T* dst = shared + r * kRowStride + c;
    if (vectorised) {
      const bool valid = row != nullptr && k < k_end;
      copy16_async(dst, valid ? row + k : any, valid);
    } else {
      for (int i = 0; i < 8; ++i) dst[i] = row != nullptr && k + i < k_end ? row[k + i] : from_float<T>(0.f);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kMmaThreads) grouped_gemm_mma(GemmArgs<T> g) {
  __shared__ __align__(16) T a_tile[kStages][kBlockM * kRowStride];
  __shared__ __align__(16) T b_tile[kStages][kBlockN * kRowStride];
  BlockProblem<T> p;
  if (!block_problem(g, kBlockM, halves_columns(g.epilogue) ? kBlockN / 2 : kBlockN, p)) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warp_m = warp >> 1, warp_n = warp & 1;
  float acc[2][8][4] = {};

  if (!p.zero && p.k_end > p.k_begin) {
    const bool vectorised = p.k_begin % 8 == 0 && p.k_end % 8 == 0 && p.lda % 8 == 0 && p.ldb % 8 == 0 &&
                            reinterpret_cast<uintptr_t>(p.a) % 16 == 0 && reinterpret_cast<uintptr_t>(p.b) % 16 == 0;
    auto a_row = [&](int r) -> const T* {
      const int m = p.m_begin + r;
      return m < p.m_end ? p.a + m * p.lda : nullptr;
    };
    auto b_row_ptr = [&](int j) -> const T* {
      const int64_t row = b_row(p, j, kWarpN);
      return row >= 0 ? p.b + row * p.ldb : nullptr;
    };
    const int k_tiles = static_cast<int>(ceil_div(p.k_end - p.k_begin, kBlockK));
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < k_tiles) {
        load_tile<T, kBlockM>(a_tile[s], a_row, p.a, p.k_begin + s * kBlockK, p.k_end, vectorised);
        load_tile<T, kBlockN>(b_tile[s], b_row_ptr, p.b, p.k_begin + s * kBlockK, p.k_end, vectorised);
      }
      commit_async();
    }
    for (int kt = 0; kt < k_tiles; ++kt) {
      wait_async<kStages - 2>();
      __syncthreads();  // tile kt is in; every warp is done with the stage refilled below
      const int next = kt + kStages - 1;
      if (next < k_tiles) {
        load_tile<T, kBlockM>(a_tile[next % kStages], a_row, p.a, p.k_begin + next * kBlockK, p.k_end, vectorised);
        load_tile<T, kBlockN>(b_tile[next % kStages], b_row_ptr, p.b, p.k_begin + next * kBlockK, p.k_end, vectorised);
      }
      commit_async();
      const T* as = a_tile[kt % kStages];
      const T* bs = b_tile[kt % kStages];
#pragma unroll
      for (int kk = 0; kk < kBlockK; kk += 16) {
        uint32_t a_frag[2][4], b_frag[8][2];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
          ldmatrix_x4(a_frag[mi], as + (warp_m * 32 + mi * 16 + (lane & 15)) * kRowStride + kk + (lane >> 4) * 8);
#pragma unroll
        for (int np = 0; np < 4; ++np) {
          uint32_t r[4];
          ldmatrix_x4(r, bs + (warp_n * kWarpN + np * 16 + (lane >> 4) * 8 + (lane & 7)) * kRowStride + kk +
                             ((lane >> 3) & 1) * 8);
          b_frag[2 * np][0] = r[0];
          b_frag[2 * np][1] = r[1];
          b_frag[2 * np + 1][0] = r[2];
          b_frag[2 * np + 1][1] = r[3];
        }
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
          for (int ni = 0; ni < 8; ++ni) MmaOp<T>::run(acc[mi][ni], a_frag[mi], b_frag[ni]);
      }
    }
    wait_async<0>();
  }

  // Epilogue: accumulator c[2h + i] of tile (mi, ni) is row lane/4 + 8h, column 2*(lane%4) + i.
  const int tiles = p.gated ? 4 : 8, col_base = p.n_begin + warp_n * (p.gated ? kWarpN / 2 : kWarpN);
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int m = p.m_begin + warp_m * 32 + mi * 16 + (lane >> 2) + 8 * h;
      if (m >= p.m_end) continue;
      T* out_row = p.out + m * p.ldo;
#pragma unroll
      for (int ni = 0; ni < 8; ++ni) {
        if (ni >= tiles) break;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int col = col_base + ni * 8 + 2 * (lane & 3) + i;
          if (col >= p.n_valid) continue;
          const float v = acc[mi][ni][2 * h + i], up = p.gated ? acc[mi][ni + 4][2 * h + i] : 0.f;
          out_row[col] = from_float<T>(p.zero ? 0.f : epilogue_value(g.epilogue, p, col, v, up));
        }
      }
    }
}

// ---------------------------------------------------------------- float32 SIMT
constexpr int kSimtM = 64, kSimtN = 64, kSimtK = 16, kSimtThreads = 256;

__global__ void __launch_bounds__(kSimtThreads) grouped_gemm_simt(GemmArgs<float> g) {
  __shared__ float a_tile[kSimtK][kSimtM + 4];
  __shared__ float b_tile[kSimtK][kSimtN + 4];
  BlockProblem<float> p;
  if (!block_problem(g, kSimtM, halves_columns(g.epilogue) ? kSimtN / 2 : kSimtN, p)) return;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float acc[4][4] = {};
  // Rows ty + 16i, local columns tx + 16j: in gated mode columns j and j + 2 are the gate and up of one
  // output column (span kSimtN).
  if (!p.zero) {
    for (int k0 = p.k_begin; k0 < p.k_end; k0 += kSimtK) {
      for (int idx = threadIdx.x; idx < kSimtM * kSimtK; idx += kSimtThreads) {
        const int r = idx / kSimtK, c = idx % kSimtK, k = k0 + c, m = p.m_begin + r;
        a_tile[c][r] = m < p.m_end && k < p.k_end ? p.a[m * p.lda + k] : 0.f;
        const int64_t row = b_row(p, r, kSimtN);
        b_tile[c][r] = row >= 0 && k < p.k_end ? p.b[row * p.ldb + k] : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int c = 0; c < kSimtK; ++c) {
        float a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = a_tile[c][ty + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = b_tile[c][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
      __syncthreads();
    }
  }
  for (int i = 0; i < 4; ++i) {
    const int m = p.m_begin + ty + 16 * i;
    if (m >= p.m_end) continue;
    for (int j = 0; j < (p.gated ? 2 : 4); ++j) {
      const int col = p.n_begin + tx + 16 * j;
      if (col >= p.n_valid) continue;
      const float up = p.gated ? acc[i][j + 2] : 0.f;
      p.out[m * p.ldo + col] = p.zero ? 0.f : epilogue_value(g.epilogue, p, col, acc[i][j], up);
    }
  }
}

template <typename T>
void launch(const GemmArgs<T>& g, int64_t n_cols, cudaStream_t stream) {
  const bool gated = halves_columns(g.epilogue);
  constexpr bool simt = std::is_same<T, float>::value;
  const int block_m = simt ? kSimtM : kBlockM, block_n = (simt ? kSimtN : kBlockN) / (gated ? 2 : 1);
  const int64_t m_blocks = g.schedule == static_cast<int>(Schedule::rows) ? max_m_tiles(g.M, g.E, block_m)
                                                                            : ceil_div(g.N, block_m);
  const int64_t n_blocks = ceil_div(n_cols, block_n);
  if (n_blocks > 65535) throw std::invalid_argument("grouped_gemm: too many output columns for one launch");
  const dim3 grid(grid_size(m_blocks, "grouped_gemm"), static_cast<unsigned>(n_blocks),
                  g.schedule == static_cast<int>(Schedule::depth) ? g.E : 1);
  if constexpr (simt)
    grouped_gemm_simt<<<grid, kSimtThreads, 0, stream>>>(g);
  else
    grouped_gemm_mma<T><<<grid, kMmaThreads, 0, stream>>>(g);
  check_launch("grouped_gemm");
}

void check_sizes(int64_t E, int64_t M, int64_t N, int64_t K) {
  if (E < 1 || E > 65535) throw std::invalid_argument("E: the CUDA grouped GEMM supports 1..65535 experts");
  if (M > 0x7fffffffLL || N > 0x7fffffffLL || K > 0x7fffffffLL)
    throw std::invalid_argument("grouped_gemm: M, N and K must be < 2^31 on CUDA");
}

}  // namespace

void grouped_gemm_tiled(const void* a, const void* w, const int32_t* expert_offsets, int64_t E, int64_t M,
                        int64_t N, int64_t K, DType dtype, const Epilogue& epilogue, void* out, Stream stream) {
  dispatch_dtype(dtype, [&](auto tag) {
    using Elem = typename decltype(tag)::type;
    const GemmArgs<Elem> g{static_cast<const Elem*>(a), static_cast<const Elem*>(w), expert_offsets,
                           static_cast<int>(E), M, N, K, static_cast<Elem*>(out), epilogue,
                           static_cast<int>(Schedule::rows)};
    launch(g, halves_columns(epilogue) ? N / 2 : N, as_stream(stream));
  });
}

void grouped_gemm_dw(const void* d_out_t, const void* a_t, const int32_t* expert_offsets, int64_t E, int64_t M,
                     int64_t N, int64_t K, DType dtype, void* dw, Stream stream) {
  require_device("moe_ext._cuda.grouped_gemm_dw");
  check_sizes(E, M, N, K);
  if (N == 0 || K == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using Elem = typename decltype(tag)::type;
    const GemmArgs<Elem> g{static_cast<const Elem*>(d_out_t), static_cast<const Elem*>(a_t), expert_offsets,
                           static_cast<int>(E), M, N, K, static_cast<Elem*>(dw), Epilogue{},
                           static_cast<int>(Schedule::depth)};
    launch(g, K, as_stream(stream));
  });
}

// Defined in grouped_gemm_decode.cu.
void grouped_gemm_decode(const void* a, const void* w, const int32_t* expert_offsets, int64_t E, int64_t M,
                         int64_t N, int64_t K, DType dtype, const Epilogue& epilogue, void* out, Stream stream);

bool grouped_gemm_uses_decode(int64_t M) { return M <= 32; }

void grouped_gemm(const void* a, const void* w, const int32_t* expert_offsets, int64_t E, int64_t M, int64_t N,
                  int64_t K, DType dtype, const Epilogue& epilogue, void* out, Stream stream) {
  require_device("moe_ext._cuda.grouped_gemm");
  check_sizes(E, M, N, K);
  if (halves_columns(epilogue) && N % 2 != 0)
    throw std::invalid_argument("w: gated activations need an even N (2f rows)");
  if (M == 0 || N == 0) return;
  if (grouped_gemm_uses_decode(M))
    grouped_gemm_decode(a, w, expert_offsets, E, M, N, K, dtype, epilogue, out, stream);
  else
    grouped_gemm_tiled(a, w, expert_offsets, E, M, N, K, dtype, epilogue, out, stream);
}

}  // namespace moe_ext::cuda
