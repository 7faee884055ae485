#include "core/ops.h"

#include "core/checks.h"
#include "core/gemm_call.h"
#include "core/isa.h"
#include "core/kernels.h"
#include "core/quant.h"
#include "core/threads.h"
#include "core/workspace.h"

namespace moe_ext {

namespace detail {  // declared in core/gemm_call.h

const uint16_t* round_rows_to_bf16(const float* a, int64_t M, int64_t K) {
  const int64_t stride = (K + 1) / 2 * 2;
  uint16_t* rows = thread_workspace().get<uint16_t>(Scratch::gemm_a_bf16, M * stride);
  const Kernels& kern = kernels();
  if (stride == K) {  // even K: the rows are one contiguous run, narrowed by all threads
    kern.narrow(a, M * K, DType::bf16, num_threads(), rows);
    return rows;
  }
  for (int64_t m = 0; m < M; ++m) {
    kern.narrow(a + m * K, K, DType::bf16, 1, rows + m * stride);
    if (stride != K) rows[m * stride + K] = 0;
  }
  return rows;
}

float* f32_target(void* out, DType dtype, int64_t n) {
  return dtype == DType::f32 ? static_cast<float*>(out) : thread_workspace().get<float>(Scratch::converted_out, n);
}

void finish_f32(const float* result, int64_t n, DType dtype, void* out) {
  if (dtype != DType::f32) kernels().narrow(result, n, dtype, num_threads(), out);
}

// vdpbf16ps only where the caller already works in bfloat16.
bool use_bf16_dot(DType activations, const WeightView& w) {
  return activations == DType::bf16 && w.dtype == DType::bf16 && current_isa() == Isa::avx512 &&
         bf16_dot_enabled();
}

const float* as_f32(const void* data, DType dtype, int64_t n, Scratch slot) {
  if (dtype == DType::f32) return static_cast<const float*>(data);
  float* copy = thread_workspace().get<float>(slot, n);
  kernels().widen(data, dtype, n, num_threads(), copy);
  return copy;
}

void* gemm_scratch(int threads) {
  return thread_workspace().get(Scratch::gemm_panels, static_cast<std::size_t>(threads) * kGemmScratchBytes);
}

void run_gemm(const float* a, DType caller_dtype, const WeightView& w, const int32_t* offsets, bool fuse,
              const Activation& activation, const float* bias, float* out, const uint16_t* a_bf16) {
  if (w.quant != nullptr) return run_quant_gemm(a, caller_dtype, *w.quant, offsets, fuse, activation, bias, out);
  GemmProblem problem;
  problem.a = a, problem.w = w, problem.offsets = offsets, problem.out = out, problem.bias = bias;
  problem.fuse_activation = fuse, problem.activation = activation;
  problem.bf16_dot = use_bf16_dot(caller_dtype, w);
  if (problem.bf16_dot) problem.a_bf16 = a_bf16 ? a_bf16 : round_rows_to_bf16(a, offsets[w.E], w.K);
  const int threads = num_threads();  // read once: the scratch is sized for exactly this many
  kernels().grouped_gemm(problem, threads, gemm_scratch(threads));
}

}  // namespace detail

using namespace detail;

void route(const void* x, DType x_dtype, const void* w_router, DType w_router_dtype, int64_t T, int64_t d,
           int64_t E, const RouteConfig& config, float* topk_weights, int32_t* topk_ids, float* probs) {
  check_route_config(config, E);
  if (T == 0) return;
  const float* x32 = as_f32(x, x_dtype, T * d, Scratch::converted_in);
  const float* w32 = as_f32(w_router, w_router_dtype, E * d, Scratch::converted_in2);
  const int threads = num_threads();  // read once: the scratch is sized for exactly this many
  float* scratch = thread_workspace().get<float>(Scratch::route_rows, threads * route_scratch_floats(E));
  kernels().route(x32, w32, T, d, E, config, threads, scratch, topk_weights, topk_ids, probs);
}

int64_t permute_plan(const int32_t* topk_ids, int64_t T, int64_t k, int64_t E, int64_t capacity,
                     int32_t* expert_offsets, int32_t* perm_rows) {
  check_expert_ids(topk_ids, T * k, E, "topk_ids");
  check_capacity(capacity);
  // Counting sort: count the kept copies of each expert, prefix-sum them, then hand out rows in
  // (token, slot) order, which makes the order within an expert stable and deterministic.
  for (int64_t e = 0; e <= E; ++e) expert_offsets[e] = 0;
  for (int64_t i = 0; i < T * k; ++i) {
    int32_t& count = expert_offsets[topk_ids[i] + 1];
    if (capacity == kNoCapacity || count < capacity) ++count;
  }
  for (int64_t e = 0; e < E; ++e) expert_offsets[e + 1] += expert_offsets[e];
  int64_t* cursor = thread_workspace().get<int64_t>(Scratch::cursor, E);
  for (int64_t e = 0; e < E; ++e) cursor[e] = expert_offsets[e];
  for (int64_t i = 0; i < T * k; ++i) {
    const int32_t e = topk_ids[i];
    perm_rows[i] = cursor[e] < expert_offsets[e + 1] ? static_cast<int32_t>(cursor[e]++) : -1;
  }
  return expert_offsets[E];
}

void permute_gather(const void* x, DType dtype, const int32_t* perm_rows, int64_t T, int64_t k, int64_t d,
                    void* x_perm) {
  if (T == 0 || d == 0) return;
  kernels().gather_rows(x, dtype, perm_rows, T, k, d, x_perm, dtype);
}

void grouped_gemm(const void* a, DType a_dtype, const WeightView& w, const int32_t* expert_offsets, int64_t M,
                  void* out, const float* bias) {
  check_expert_offsets(expert_offsets, w.E, M, "expert_offsets");
  if (M == 0 || w.N == 0) return;
  const float* a32 = as_f32(a, a_dtype, M * w.K, Scratch::converted_in);
  float* out32 = f32_target(out, a_dtype, M * w.N);
  run_gemm(a32, a_dtype, w, expert_offsets, false, Activation::swiglu(), bias, out32);
  finish_f32(out32, M * w.N, a_dtype, out);
}

void unpermute(const void* y_perm, DType dtype, int64_t M, const int32_t* perm_rows, const float* topk_weights,
               int64_t T, int64_t k, int64_t d, void* y) {
  check_perm_rows(perm_rows, T * k, M, "perm_rows");
  if (T == 0 || d == 0) return;
  const float* y_perm32 = as_f32(y_perm, dtype, M * d, Scratch::converted_in);
  float* y32 = f32_target(y, dtype, T * d);
  kernels().unpermute(y_perm32, perm_rows, topk_weights, T, k, d, y32);
  finish_f32(y32, T * d, dtype, y);
}

void experts(const void* x, DType x_dtype, const WeightView& w13_or_w1, const WeightView& w2,
             const float* topk_weights, const int32_t* topk_ids, int64_t T, int64_t d, int64_t f, int64_t E,
             int64_t k, const Activation& activation, int64_t capacity, void* y, const ExpertBiases& biases) {
  Workspace& ws = thread_workspace();
  int32_t* offsets = ws.get<int32_t>(Scratch::offsets, E + 1);
  int32_t* perm_rows = ws.get<int32_t>(Scratch::perm_rows, T * k);
  const int64_t M = permute_plan(topk_ids, T, k, E, capacity, offsets, perm_rows);
  float* x_perm = ws.get<float>(Scratch::x_perm, M * d);
  float* activated = ws.get<float>(Scratch::activated, M * f);
  const Kernels& kern = kernels();
  // bfloat16 tokens into vdpbf16ps on packed weights: the rows are gathered as they are, already the
  // operand (rows of even d need no padding), rather than widened to float32 and rounded back.
  const bool gather_bf16 = use_bf16_dot(x_dtype, w13_or_w1) && w13_or_w1.packed && d % 2 == 0;
  if (M > 0) {
    // The activation runs in the first GEMM's epilogue: the [M, 2f] product is never written out.
    if (gather_bf16) {
      uint16_t* rows = ws.get<uint16_t>(Scratch::gemm_a_bf16, M * d);
      kern.gather_rows(x, x_dtype, perm_rows, T, k, d, rows, x_dtype);
      run_gemm(nullptr, x_dtype, w13_or_w1, offsets, true, activation, biases.b13_or_b1, activated, rows);
    } else {
      kern.gather_rows(x, x_dtype, perm_rows, T, k, d, x_perm, DType::f32);  // widened once, here
      run_gemm(x_perm, x_dtype, w13_or_w1, offsets, true, activation, biases.b13_or_b1, activated);
    }
    // x_perm is dead after the first GEMM and has y_perm's shape [M, d].
    run_gemm(activated, x_dtype, w2, offsets, false, activation, biases.b2, x_perm);
  }
  if (T == 0) return;
  float* y32 = f32_target(y, x_dtype, T * d);
  kern.unpermute(x_perm, perm_rows, topk_weights, T, k, d, y32);  // dropped copies add nothing
  finish_f32(y32, T * d, x_dtype, y);
}

void moe(const void* x, DType x_dtype, const void* w_router, DType w_router_dtype, const WeightView& w13_or_w1,
         const WeightView& w2, int64_t T, int64_t d, int64_t f, int64_t E, const RouteConfig& config,
         const Activation& activation, int64_t capacity, void* y, const ExpertBiases& biases) {
  Workspace& ws = thread_workspace();
  float* topk_weights = ws.get<float>(Scratch::route_weights, T * config.top_k);
  int32_t* topk_ids = ws.get<int32_t>(Scratch::route_ids, T * config.top_k);
  route(x, x_dtype, w_router, w_router_dtype, T, d, E, config, topk_weights, topk_ids, nullptr);
  experts(x, x_dtype, w13_or_w1, w2, topk_weights, topk_ids, T, d, f, E, config.top_k, activation, capacity, y,
          biases);
}

}  // namespace moe_ext
