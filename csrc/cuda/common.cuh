// Shared device helpers: element types and their float conversions, warp/block reductions, launch checks.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/launch.h"
#include "cuda/tile_schedule.h"

namespace moe_ext::cuda {

inline cudaStream_t as_stream(Stream s) { return static_cast<cudaStream_t>(s); }

// Throws std::runtime_error naming the kernel if its launch failed (no synchronisation: asynchronous
// faults surface at the caller's next synchronising call, as with any CUDA library).
inline void check_launch(const char* kernel) {
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess)
    throw std::runtime_error(std::string("moe_ext._cuda: launch of ") + kernel + " failed: " +
                             cudaGetErrorString(status));
}

inline unsigned grid_size(int64_t blocks, const char* what) {
  if (blocks > 0x7fffffffLL) throw std::invalid_argument(std::string(what) + ": problem too large for one launch");
  return static_cast<unsigned>(blocks);
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) with the element type T of `dtype` (C++17: the lambda reads T from the tag).
template <typename F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::float32: f(TypeTag<float>{}); return;
    case DType::bfloat16: f(TypeTag<__nv_bfloat16>{}); return;
    case DType::float16: f(TypeTag<__half>{}); return;
  }
  throw std::invalid_argument("dtype: expected 0 (float32), 1 (bfloat16) or 2 (float16); got " +
                              std::to_string(static_cast<int>(dtype)));
}

// A fixed butterfly: every lane gets the same sum, in the same order on every run.
__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Block-wide sum in a fixed order (warp butterflies, then warp 0 over the warp sums). `shared` holds 32
// floats. Every thread gets the total.
__device__ __forceinline__ float block_sum(float v, float* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // `shared` may still be read from a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < warps; ++w) total += shared[w];
  return total;
}

// Block-wide inclusive scan of ints. `shared` holds 32 ints. Every thread must call it.
__device__ __forceinline__ int block_inclusive_scan(int v, int* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int other = __shfl_up_sync(0xffffffffu, v, offset);
    if (lane >= offset) v += other;
  }
  __syncthreads();
  if (lane == 31) shared[warp] = v;
  __syncthreads();
  int before = 0;
  for (int w = 0; w < warp; ++w) before += shared[w];
  (void)warps;
  return v + before;
}

}  // namespace moe_ext::cuda
