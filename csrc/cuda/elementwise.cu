// The memory-bound kernels: unpermute (the weighted combine) and its backward, the standalone activation
// and its backward, and the batched transpose the grouped GEMM's backward reads. Every output element is
// written by one thread, with sums in a fixed order: no atomics, bit-identical run to run.
#include "cuda/common.cuh"

namespace moe_ext::cuda {

namespace {

constexpr int kThreads = 256;

// y[t, i] = sum_j w[t, j] * y_perm[perm_rows[t, j], i], slots in order (as the CPU kernel).
template <typename T>
__global__ void unpermute_kernel(const T* __restrict__ y_perm, const int32_t* __restrict__ perm_rows,
                                 const float* __restrict__ weights, int k, int64_t d, int64_t M, T* __restrict__ y) {
  const int64_t t = blockIdx.x, i = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  if (i >= d) return;
  float sum = 0.f;
  for (int j = 0; j < k; ++j) {
    const int64_t row = perm_rows[t * k + j];
    if (row < 0 || row >= M) continue;
    sum = fmaf(weights ? weights[t * k + j] : 1.f, to_float(y_perm[row * d + i]), sum);
  }
  y[t * d + i] = from_float<T>(sum);
}

// One block per token: d_y_perm[row] = w * dy[t]; d_weights[t, j] = dy[t] . y_perm[row] (block sum in a
// fixed order); dropped copies get d_weights 0.
template <typename T>
__global__ void unpermute_backward_kernel(const T* __restrict__ dy, const T* __restrict__ y_perm,
                                          const int32_t* __restrict__ perm_rows, const float* __restrict__ weights,
                                          int k, int64_t d, int64_t M, T* __restrict__ d_y_perm,
                                          float* __restrict__ d_weights) {
  __shared__ float partial[32];
  const int64_t t = blockIdx.x;
  for (int j = 0; j < k; ++j) {
    const int64_t row = perm_rows[t * k + j];
    const bool kept = row >= 0 && row < M;
    const float w = weights ? weights[t * k + j] : 1.f;
    float dot = 0.f;
    if (kept)
      for (int64_t i = threadIdx.x; i < d; i += kThreads) {
        const float g = to_float(dy[t * d + i]);
        d_y_perm[row * d + i] = from_float<T>(w * g);
        dot = fmaf(g, to_float(y_perm[row * d + i]), dot);
      }
    const float total = block_sum(dot, partial);
    if (d_weights && threadIdx.x == 0) d_weights[t * k + j] = kept ? total : 0.f;
  }
}

__device__ __forceinline__ float gelu_derivative(float z) {
  // d/dz [z Phi(z)] = Phi(z) + z phi(z)
  return 0.5f * erfcf(-z * 0.70710678118654752f) + z * 0.39894228040143268f * __expf(-0.5f * z * z);
}

template <typename T>
__global__ void activate_kernel(const T* __restrict__ h, int64_t M, int64_t f, int activation, T* __restrict__ out) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (idx >= M * f) return;
  const int64_t m = idx / f, i = idx % f;
  const Activation a = static_cast<Activation>(activation);
  if ((a == Activation::swiglu || a == Activation::geglu)) {
    const T* row = h + m * 2 * f;
    out[idx] = from_float<T>(activate_one(a, to_float(row[i])) * to_float(row[f + i]));
  } else {
    out[idx] = from_float<T>(activate_one(a, to_float(h[idx])));
  }
}

template <typename T>
__global__ void activation_backward_kernel(const T* __restrict__ h, const T* __restrict__ d_act, int64_t M, int64_t f,
                                           int activation, T* __restrict__ dh) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (idx >= M * f) return;
  const int64_t m = idx / f, i = idx % f;
  const Activation a = static_cast<Activation>(activation);
  const float grad = to_float(d_act[idx]);
  if ((a == Activation::swiglu || a == Activation::geglu)) {
    const float gate = to_float(h[m * 2 * f + i]), up = to_float(h[m * 2 * f + f + i]);
    float act, slope;
    if (a == Activation::swiglu) {
      const float s = 1.f / (1.f + __expf(-gate));
      act = gate * s;
      slope = s * (1.f + gate * (1.f - s));
    } else {
      act = gelu(gate);
      slope = gelu_derivative(gate);
    }
    dh[m * 2 * f + i] = from_float<T>(grad * up * slope);
    dh[m * 2 * f + f + i] = from_float<T>(grad * act);
  } else {
    const float z = to_float(h[idx]);
    const float slope = a == Activation::relu ? (z > 0.f ? 1.f : 0.f) : gelu_derivative(z);
    dh[idx] = from_float<T>(grad * slope);
  }
}

// dst[b] = src[b]^T through a padded 32x33 shared tile (coalesced on both sides, no bank conflicts).
template <typename T>
__global__ void transpose_kernel(const T* __restrict__ src, int64_t R, int64_t C, T* __restrict__ dst) {
  __shared__ T tile[32][33];
  const int64_t b = blockIdx.z, r0 = static_cast<int64_t>(blockIdx.y) * 32, c0 = static_cast<int64_t>(blockIdx.x) * 32;
  const T* s = src + b * R * C;
  T* o = dst + b * R * C;
  for (int y = threadIdx.y; y < 32; y += 8)
    if (r0 + y < R && c0 + threadIdx.x < C) tile[y][threadIdx.x] = s[(r0 + y) * C + c0 + threadIdx.x];
  __syncthreads();
  for (int y = threadIdx.y; y < 32; y += 8)
    if (c0 + y < C && r0 + threadIdx.x < R) o[(c0 + y) * R + r0 + threadIdx.x] = tile[threadIdx.x][y];
}

unsigned blocks_for(int64_t n, const char* what) { return grid_size(ceil_div(n, kThreads), what); }

}  // namespace

void unpermute(const void* y_perm, const int32_t* perm_rows, const float* topk_weights, int64_t T, int64_t k,
               int64_t d, int64_t M, DType dtype, void* y, Stream stream) {
  require_device("moe_ext._cuda.unpermute");
  if (T == 0 || d == 0) return;
  if (ceil_div(d, kThreads) > 65535) throw std::invalid_argument("unpermute: d too large");
  dispatch_dtype(dtype, [&](auto tag) {
    using Elem = typename decltype(tag)::type;
    const dim3 grid(grid_size(T, "unpermute"), static_cast<unsigned>(ceil_div(d, kThreads)));
    unpermute_kernel<Elem><<<grid, kThreads, 0, as_stream(stream)>>>(
        static_cast<const Elem*>(y_perm), perm_rows, topk_weights, static_cast<int>(k), d, M, static_cast<Elem*>(y));
  });
  check_launch("unpermute");
}

void unpermute_backward(const void* dy, const void* y_perm, const int32_t* perm_rows, const float* topk_weights,
                        int64_t T, int64_t k, int64_t d, int64_t M, DType dtype, void* d_y_perm, float* d_weights,
                        Stream stream) {
  require_device("moe_ext._cuda.unpermute_backward");
  if (T == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using Elem = typename decltype(tag)::type;
    unpermute_backward_kernel<Elem><<<grid_size(T, "unpermute_backward"), kThreads, 0, as_stream(stream)>>>(
        static_cast<const Elem*>(dy), static_cast<const Elem*>(y_perm), perm_rows, topk_weights, static_cast<int>(k),
        d, M, static_cast<Elem*>(d_y_perm), d_weights);
  });
  check_launch("unpermute_backward");
}

void activate(const void* h, int64_t M, int64_t f, Activation activation, DType dtype, void* out, Stream stream) {
  require_device("moe_ext._cuda.activate");
  if (M * f == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using Elem = typename decltype(tag)::type;
    activate_kernel<Elem><<<blocks_for(M * f, "activate"), kThreads, 0, as_stream(stream)>>>(
        static_cast<const Elem*>(h), M, f, static_cast<int>(activation), static_cast<Elem*>(out));
  });
  check_launch("activate");
}

void activation_backward(const void* h, const void* d_act, int64_t M, int64_t f, Activation activation, DType dtype,
                         void* dh, Stream stream) {
  require_device("moe_ext._cuda.activation_backward");
  if (M * f == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using Elem = typename decltype(tag)::type;
    activation_backward_kernel<Elem><<<blocks_for(M * f, "activation_backward"), kThreads, 0, as_stream(stream)>>>(
        static_cast<const Elem*>(h), static_cast<const Elem*>(d_act), M, f, static_cast<int>(activation),
        static_cast<Elem*>(dh));
  });
  check_launch("activation_backward");
}

void transpose(const void* src, int64_t B, int64_t R, int64_t C, DType dtype, void* dst, Stream stream) {
  require_device("moe_ext._cuda.transpose");
  if (B * R * C == 0) return;
  if (B > 65535 || ceil_div(R, 32) > 65535) throw std::invalid_argument("transpose: too many rows or batches");
  dispatch_dtype(dtype, [&](auto tag) {
    using Elem = typename decltype(tag)::type;
    const dim3 grid(grid_size(ceil_div(C, 32), "transpose"), static_cast<unsigned>(ceil_div(R, 32)),
                    static_cast<unsigned>(B));
    transpose_kernel<Elem><<<grid, dim3(32, 8), 0, as_stream(stream)>>>(static_cast<const Elem*>(src), R, C,
                                                                          static_cast<Elem*>(dst));
  });
  check_launch("transpose");
}

}  // namespace moe_ext::cuda
