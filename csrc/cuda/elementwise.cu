// The memory-bound kernels: unpermute (the weighted combine) and its backward, the standalone activation
// and its backward (cuda/activation.cuh), the expert bias gradient, and the batched transpose the grouped
// GEMM's backward reads. Every output element is written by one thread, with sums in a fixed order: no
// atomics, bit-identical run to run.
#include "cuda/activation.cuh"

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

// One thread per output element (m, i): gated rows hold 2f values, gate and up of column i at
// gate_column / up_column ([gate | up] or interleaved); other rows f values.
template <typename T>
__global__ void activate_kernel(const T* __restrict__ h, int64_t M, int64_t f, Activation a, T* __restrict__ out) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (idx >= M * f) return;
  if (!a.gated) {
    out[idx] = from_float<T>(activate_value(a, to_float(h[idx]), 0.f));
    return;
  }
  const int64_t m = idx / f, i = idx % f;
  const bool interleaved = is_interleaved(a);
  const T* row = h + m * 2 * f;
  out[idx] = from_float<T>(activate_value(a, to_float(row[gate_column(interleaved, i)]),
                                          to_float(row[up_column(interleaved, f, i)])));
}

// dh at the places activate_kernel read h from: every element of dh written exactly once.
template <typename T>
__global__ void activation_backward_kernel(const T* __restrict__ h, const T* __restrict__ d_act, int64_t M, int64_t f,
                                           Activation a, T* __restrict__ dh) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (idx >= M * f) return;
  const float grad = to_float(d_act[idx]);
  float d_gate, d_up;
  if (!a.gated) {
    activation_grad(a, grad, to_float(h[idx]), 0.f, d_gate, d_up);
    dh[idx] = from_float<T>(d_gate);
    return;
  }
  const int64_t m = idx / f, i = idx % f;
  const bool interleaved = is_interleaved(a);
  const int64_t gate_at = m * 2 * f + gate_column(interleaved, i), up_at = m * 2 * f + up_column(interleaved, f, i);
  activation_grad(a, grad, to_float(h[gate_at]), to_float(h[up_at]), d_gate, d_up);
  dh[gate_at] = from_float<T>(d_gate);
  dh[up_at] = from_float<T>(d_up);
}

// grad_bias[e, n] = sum of grad_out[m, n] over expert e's rows m. Block (32 columns, kBiasRowLanes row
// lanes) per (column block, expert): lane y sums rows begin + y, begin + y + kBiasRowLanes, ... in order
// (coalesced along n), then row lane 0 adds the lanes' sums in lane order.
constexpr int kBiasRowLanes = 16;

template <typename T>
__global__ void bias_grad_kernel(const T* __restrict__ grad_out, const int32_t* __restrict__ offsets, int64_t M,
                                 int64_t N, float* __restrict__ grad_bias) {
  __shared__ float partial[kBiasRowLanes][33];
  const int e = blockIdx.y;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  const int64_t begin = clamp_offset(offsets[e], M), end = begin + rows_of(offsets, e, M);
  float sum = 0.f;
  if (n < N)
    for (int64_t m = begin + threadIdx.y; m < end; m += kBiasRowLanes) sum += to_float(grad_out[m * N + n]);
  partial[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y != 0 || n >= N) return;
  float total = 0.f;
  for (int y = 0; y < kBiasRowLanes; ++y) total += partial[y][threadIdx.x];
  grad_bias[e * N + n] = total;
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

void activate(const void* h, int64_t M, int64_t f, const Activation& activation, DType dtype, void* out,
              Stream stream) {
  require_device("moe_ext._cuda.activate");
  if (M * f == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using Elem = typename decltype(tag)::type;
    activate_kernel<Elem><<<blocks_for(M * f, "activate"), kThreads, 0, as_stream(stream)>>>(
        static_cast<const Elem*>(h), M, f, activation, static_cast<Elem*>(out));
  });
  check_launch("activate");
}

void activation_backward(const void* h, const void* d_act, int64_t M, int64_t f, const Activation& activation,
                         DType dtype, void* dh, Stream stream) {
  require_device("moe_ext._cuda.activation_backward");
  if (M * f == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using Elem = typename decltype(tag)::type;
    activation_backward_kernel<Elem><<<blocks_for(M * f, "activation_backward"), kThreads, 0, as_stream(stream)>>>(
        static_cast<const Elem*>(h), static_cast<const Elem*>(d_act), M, f, activation, static_cast<Elem*>(dh));
  });
  check_launch("activation_backward");
}

void bias_grad(const void* grad_out, const int32_t* expert_offsets, int64_t E, int64_t M, int64_t N, DType dtype,
               float* grad_bias, Stream stream) {
  require_device("moe_ext._cuda.bias_grad");
  if (E < 1 || E > 65535) throw std::invalid_argument("E: the CUDA bias_grad supports 1..65535 experts");
  if (M > 0x7fffffffLL) throw std::invalid_argument("bias_grad: M must be < 2^31 on CUDA");
  if (N == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using Elem = typename decltype(tag)::type;
    const dim3 grid(grid_size(ceil_div(N, 32), "bias_grad"), static_cast<unsigned>(E));
    bias_grad_kernel<Elem><<<grid, dim3(32, kBiasRowLanes), 0, as_stream(stream)>>>(
        static_cast<const Elem*>(grad_out), expert_offsets, M, N, grad_bias);
  });
  check_launch("bias_grad");
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
