// The pybind11 module moe_ext._cuda: launchers of the CUDA kernels over raw device pointers (Python ints,
// e.g. torch's data_ptr()), sizes, a dtype code (0 float32, 1 bfloat16, 2 float16), activation
// descriptions (moe_ext.Activation or its strings, parsed as the CPU module parses them) and a cudaStream_t
// as an int (torch.cuda.current_stream().cuda_stream). No libtorch: python/moe_ext/cuda.py wraps these with
// torch tensors and checks their arguments. The checks below only keep a direct call from making a kernel
// index outside the sizes it was given (pointers themselves cannot be checked). Launches are
// asynchronous; no function here synchronises.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/checks.h"
#include "cuda/launch.h"
#include "cuda/tile_schedule.h"
#include "python/activation_arg.h"

namespace py = pybind11;
using namespace moe_ext;  // NOLINT

namespace {

using Ptr = std::uintptr_t;

template <typename T = void>
T* ptr(Ptr p) {
  return reinterpret_cast<T*>(p);
}

cuda::DType dtype_from(int code) {
  if (code < 0 || code > 2)
    throw std::invalid_argument("dtype: expected 0 (float32), 1 (bfloat16) or 2 (float16); got " + std::to_string(code));
  return static_cast<cuda::DType>(code);
}

// The activation: a description (moe_ext.Activation, preset name or canonical string) parsed as the CPU
// bindings parse it. Needs the GIL.
Activation activation_from(const py::object& activation) { return python::activation_from(activation); }

void non_negative(std::initializer_list<std::pair<const char*, int64_t>> sizes) {
  for (const auto& [name, value] : sizes)
    if (value < 0) throw std::invalid_argument(std::string(name) + ": expected a size >= 0; got " + std::to_string(value));
}

void py_route(Ptr x, Ptr w_router, int64_t T, int64_t d, int64_t E, int dtype, int64_t top_k, int scoring,
              bool renormalize, double scale, Ptr bias, Ptr correction_bias, int64_t n_group, int64_t topk_group,
              Ptr topk_weights, Ptr topk_ids, Ptr probs, Ptr stream) {
  non_negative({{"T", T}, {"d", d}});
  if (scoring != 0 && scoring != 1) throw std::invalid_argument("scoring: expected 0 (softmax) or 1 (sigmoid)");
  RouteConfig config;
  config.top_k = top_k;
  config.scoring = static_cast<Scoring>(scoring);
  config.renormalize = renormalize;
  config.scale = static_cast<float>(scale);
  config.bias = ptr<const float>(bias);
  config.correction_bias = ptr<const float>(correction_bias);
  config.n_group = n_group;
  config.topk_group = topk_group;
  check_route_config(config, E);
  py::gil_scoped_release release;
  cuda::route(ptr(x), ptr(w_router), T, d, E, dtype_from(dtype), config, ptr<float>(topk_weights),
              ptr<int32_t>(topk_ids), ptr<float>(probs), ptr(stream));
}

void py_permute_plan(Ptr topk_ids, int64_t T, int64_t k, int64_t E, int64_t capacity, Ptr expert_offsets,
                     Ptr perm_rows, Ptr scratch, Ptr stream) {
  non_negative({{"T", T}, {"k", k}});
  check_capacity(capacity);
  py::gil_scoped_release release;
  cuda::permute_plan(ptr<const int32_t>(topk_ids), T, k, E, capacity, ptr<int32_t>(expert_offsets),
                     ptr<int32_t>(perm_rows), ptr(scratch), ptr(stream));
}

void py_gather_rows(Ptr x, Ptr perm_rows, int64_t T, int64_t k, int64_t d, int64_t M, int dtype, Ptr x_perm, Ptr stream) {
  non_negative({{"T", T}, {"k", k}, {"d", d}, {"M", M}});
  py::gil_scoped_release release;
  cuda::gather_rows(ptr(x), ptr<const int32_t>(perm_rows), T, k, d, M, dtype_from(dtype), ptr(x_perm), ptr(stream));
}

// activation None: no activation; bias 0: none, else float32 [E, N] in w's row order.
void py_grouped_gemm(Ptr a, Ptr w, Ptr expert_offsets, int64_t E, int64_t M, int64_t N, int64_t K, int dtype,
                     const py::object& activation, Ptr bias, Ptr out, Ptr stream) {
  non_negative({{"M", M}, {"N", N}, {"K", K}});
  cuda::Epilogue epi;
  epi.bias = ptr<const float>(bias);
  epi.activate = !activation.is_none();
  if (epi.activate) epi.activation = activation_from(activation);
  if (epi.activate && epi.activation.gated && N % 2 != 0)
    throw std::invalid_argument("N: a gated activation needs an even N (2f rows); got " + std::to_string(N));
  const cuda::DType dt = dtype_from(dtype);
  py::gil_scoped_release release;
  cuda::grouped_gemm(ptr(a), ptr(w), ptr<const int32_t>(expert_offsets), E, M, N, K, dt, epi, ptr(out), ptr(stream));
}

void py_grouped_gemm_dw(Ptr d_out_t, Ptr a_t, Ptr expert_offsets, int64_t E, int64_t M, int64_t N, int64_t K, int dtype,
                        Ptr dw, Ptr stream) {
  non_negative({{"M", M}, {"N", N}, {"K", K}});
  const cuda::DType dt = dtype_from(dtype);
  py::gil_scoped_release release;
  cuda::grouped_gemm_dw(ptr(d_out_t), ptr(a_t), ptr<const int32_t>(expert_offsets), E, M, N, K, dt, ptr(dw), ptr(stream));
}

void py_transpose(Ptr src, int64_t B, int64_t R, int64_t C, int dtype, Ptr dst, Ptr stream) {
  non_negative({{"B", B}, {"R", R}, {"C", C}});
  const cuda::DType dt = dtype_from(dtype);
  py::gil_scoped_release release;
  cuda::transpose(ptr(src), B, R, C, dt, ptr(dst), ptr(stream));
}

void py_unpermute(Ptr y_perm, Ptr perm_rows, Ptr topk_weights, int64_t T, int64_t k, int64_t d, int64_t M, int dtype,
                  Ptr y, Ptr stream) {
  non_negative({{"T", T}, {"k", k}, {"d", d}, {"M", M}});
  const cuda::DType dt = dtype_from(dtype);
  py::gil_scoped_release release;
  cuda::unpermute(ptr(y_perm), ptr<const int32_t>(perm_rows), ptr<const float>(topk_weights), T, k, d, M, dt, ptr(y),
                  ptr(stream));
}

void py_unpermute_backward(Ptr dy, Ptr y_perm, Ptr perm_rows, Ptr topk_weights, int64_t T, int64_t k, int64_t d,
                           int64_t M, int dtype, Ptr d_y_perm, Ptr d_weights, Ptr stream) {
  non_negative({{"T", T}, {"k", k}, {"d", d}, {"M", M}});
  const cuda::DType dt = dtype_from(dtype);
  py::gil_scoped_release release;
  cuda::unpermute_backward(ptr(dy), ptr(y_perm), ptr<const int32_t>(perm_rows), ptr<const float>(topk_weights), T, k,
                           d, M, dt, ptr(d_y_perm), ptr<float>(d_weights), ptr(stream));
}

void py_activate(Ptr h, int64_t M, int64_t f, const py::object& activation, int dtype, Ptr out, Ptr stream) {
  non_negative({{"M", M}, {"f", f}});
  const Activation act = activation_from(activation);
  const cuda::DType dt = dtype_from(dtype);
  py::gil_scoped_release release;
  cuda::activate(ptr(h), M, f, act, dt, ptr(out), ptr(stream));
}

void py_activation_backward(Ptr h, Ptr d_act, int64_t M, int64_t f, const py::object& activation, int dtype, Ptr dh,
                            Ptr stream) {
  non_negative({{"M", M}, {"f", f}});
  const Activation act = activation_from(activation);
  const cuda::DType dt = dtype_from(dtype);
  py::gil_scoped_release release;
  cuda::activation_backward(ptr(h), ptr(d_act), M, f, act, dt, ptr(dh), ptr(stream));
}

void py_bias_grad(Ptr grad_out, Ptr expert_offsets, int64_t E, int64_t M, int64_t N, int dtype, Ptr grad_bias,
                  Ptr stream) {
  non_negative({{"M", M}, {"N", N}});
  if (E < 1) throw std::invalid_argument("E: expected at least one expert; got " + std::to_string(E));
  const cuda::DType dt = dtype_from(dtype);
  py::gil_scoped_release release;
  cuda::bias_grad(ptr(grad_out), ptr<const int32_t>(expert_offsets), E, M, N, dt, ptr<float>(grad_bias), ptr(stream));
}

// The rows schedule's tiles for given offsets (host walk of tile_schedule.h): [(expert, row_begin, row_end)],
// tail tiles with expert == E. For tests and for understanding a launch; the kernels do the same on the device.
std::vector<std::tuple<int, int, int>> py_tile_schedule(const std::vector<int32_t>& offsets, int64_t M, int64_t block_m) {
  if (offsets.size() < 2) throw std::invalid_argument("offsets: expected E + 1 >= 2 values");
  if (block_m < 1) throw std::invalid_argument("block_m: expected >= 1");
  non_negative({{"M", M}});
  const int64_t E = static_cast<int64_t>(offsets.size()) - 1;
  std::vector<std::tuple<int, int, int>> tiles;
  const int64_t bound = cuda::max_m_tiles(M, E, block_m);
  for (int64_t t = 0; t < bound; ++t) {
    const cuda::MTile tile = cuda::find_m_tile(offsets.data(), E, M, block_m, t);
    if (tile.expert < 0) break;
    tiles.emplace_back(tile.expert, tile.row_begin, tile.row_end);
  }
  return tiles;
}

py::dict build_info() {
  py::dict info;
  info["built"] = true;
  info["architectures"] = MOE_EXT_CUDA_ARCHS;
  info["nvcc"] = MOE_EXT_CUDA_COMPILER;
  info["runtime_version"] = cuda::runtime_version();
  info["static_runtime"] = true;
  return info;
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "moe_ext CUDA kernels: launchers over raw device pointers (use moe_ext.cuda, which takes torch tensors)";
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const std::invalid_argument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });
  using py::arg;
  m.def("device_count", &cuda::device_count, "CUDA devices visible (0 without a GPU or driver; never raises)");
  m.def("runtime_error", [] { return std::string(cuda::runtime_error()); }, "why device_count() is 0");
  m.def("build_info", &build_info);
  m.def("tile_schedule", &py_tile_schedule, arg("offsets"), arg("M"), arg("block_m"));
  m.def("max_m_tiles", &cuda::max_m_tiles, arg("M"), arg("E"), arg("block_m"));
  m.def("permute_scratch_bytes", &cuda::permute_scratch_bytes, arg("T"), arg("k"), arg("E"));
  m.def("grouped_gemm_uses_decode", &cuda::grouped_gemm_uses_decode, arg("M"));
  m.attr("GEMM_BLOCK_M") = 64;  // the M-tile of both the tensor-core and the float32 kernel

  m.def("route", &py_route, arg("x"), arg("w_router"), arg("T"), arg("d"), arg("E"), arg("dtype"), arg("top_k"),
        arg("scoring"), arg("renormalize"), arg("scale"), arg("bias"), arg("correction_bias"), arg("n_group"),
        arg("topk_group"), arg("topk_weights"), arg("topk_ids"), arg("probs"), arg("stream"));
  m.def("permute_plan", &py_permute_plan, arg("topk_ids"), arg("T"), arg("k"), arg("E"), arg("capacity"),
        arg("expert_offsets"), arg("perm_rows"), arg("scratch"), arg("stream"));
  m.def("gather_rows", &py_gather_rows, arg("x"), arg("perm_rows"), arg("T"), arg("k"), arg("d"), arg("M"),
        arg("dtype"), arg("x_perm"), arg("stream"));
  m.def("grouped_gemm", &py_grouped_gemm, arg("a"), arg("w"), arg("expert_offsets"), arg("E"), arg("M"), arg("N"),
        arg("K"), arg("dtype"), arg("activation").none(true), arg("bias"), arg("out"), arg("stream"));
  m.def("grouped_gemm_dw", &py_grouped_gemm_dw, arg("d_out_t"), arg("a_t"), arg("expert_offsets"), arg("E"), arg("M"),
        arg("N"), arg("K"), arg("dtype"), arg("dw"), arg("stream"));
  m.def("transpose", &py_transpose, arg("src"), arg("B"), arg("R"), arg("C"), arg("dtype"), arg("dst"), arg("stream"));
  m.def("unpermute", &py_unpermute, arg("y_perm"), arg("perm_rows"), arg("topk_weights"), arg("T"), arg("k"), arg("d"),
        arg("M"), arg("dtype"), arg("y"), arg("stream"));
  m.def("unpermute_backward", &py_unpermute_backward, arg("dy"), arg("y_perm"), arg("perm_rows"), arg("topk_weights"),
        arg("T"), arg("k"), arg("d"), arg("M"), arg("dtype"), arg("d_y_perm"), arg("d_weights"), arg("stream"));
  m.def("activate", &py_activate, arg("h"), arg("M"), arg("f"), arg("activation"), arg("dtype"), arg("out"),
        arg("stream"));
  m.def("activation_backward", &py_activation_backward, arg("h"), arg("d_act"), arg("M"), arg("f"), arg("activation"),
        arg("dtype"), arg("dh"), arg("stream"));
  m.def("bias_grad", &py_bias_grad, arg("grad_out"), arg("expert_offsets"), arg("E"), arg("M"), arg("N"),
        arg("dtype"), arg("grad_bias"), arg("stream"));
}
