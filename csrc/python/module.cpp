// The pybind11 module moe_ext._core: unwraps NumPy arrays, releases the GIL and calls the C++ API.
// No math here. The public argument checks with user-facing messages live in python/moe_ext/_checks.py;
// the checks below only make sure a direct call into _core can never reach memory it should not.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <vector>

#include "core/checks.h"
#include "core/isa.h"
#include "core/ops.h"
#include "core/threads.h"
#include "core/workspace.h"
#include "python/arrays.h"

namespace py = pybind11;
void bind_backward(py::module_& m);  // csrc/python/bind_backward.cpp
using namespace moe_ext;  // NOLINT: the C++ API is called moe_ext::op below

namespace {

using python::kAny;
using python::Shape;
using python::shape_str;
using python::DataArg;
using python::activation_from;
using python::data_of;
using python::output;

const float* optional_vector(const std::optional<py::array>& a, const char* name, int64_t E) {
  return a ? data_of<float>(*a, name, {E}) : nullptr;
}

Scoring scoring_from(const std::string& name) {
  if (name == "softmax") return Scoring::softmax;
  if (name == "sigmoid") return Scoring::sigmoid;
  throw py::value_error("scoring: expected 'softmax' or 'sigmoid'; got '" + name + "'");
}

int64_t capacity_from(const std::optional<int64_t>& capacity) { return capacity ? *capacity : kNoCapacity; }

RouteConfig route_config(int64_t E, int64_t top_k, const std::string& scoring, bool renormalize, double scale,
                         const std::optional<py::array>& bias, const std::optional<py::array>& correction_bias,
                         std::optional<int64_t> n_group, std::optional<int64_t> topk_group) {
  RouteConfig config;
  config.top_k = top_k;
  config.scoring = scoring_from(scoring);
  config.renormalize = renormalize;
  config.scale = static_cast<float>(scale);
  config.bias = optional_vector(bias, "bias", E);
  config.correction_bias = optional_vector(correction_bias, "correction_bias", E);
  config.n_group = n_group.value_or(0);
  config.topk_group = topk_group.value_or(0);
  return config;
}

py::tuple py_route(const py::array& x, const py::array& w_router, int64_t top_k, const std::string& scoring,
                bool renormalize, double scale, const std::optional<py::array>& bias,
                const std::optional<py::array>& correction_bias, std::optional<int64_t> n_group,
                std::optional<int64_t> topk_group, bool return_probs) {
  const int64_t E = w_router.ndim() == 2 ? w_router.shape(0) : 0, d = w_router.ndim() == 2 ? w_router.shape(1) : 0;
  const DataArg w_arg = python::data_of(w_router, "w_router", {E, d});
  const DataArg x_arg = python::data_of(x, "x", {kAny, d});
  const int64_t T = x.shape(0);
  const RouteConfig config = route_config(E, top_k, scoring, renormalize, scale, bias, correction_bias, n_group, topk_group);
  check_route_config(config, E);
  auto weights = output<float>({T, top_k});
  auto ids = output<int32_t>({T, top_k});
  auto probs = output<float>({return_probs ? T : 0, E});
  float* probs_ptr = return_probs ? probs.mutable_data() : nullptr;
  float* weights_ptr = weights.mutable_data();
  int32_t* ids_ptr = ids.mutable_data();
  {
    py::gil_scoped_release release;
    moe_ext::route(x_arg.data, x_arg.dtype, w_arg.data, w_arg.dtype, T, d, E, config, weights_ptr, ids_ptr,
                   probs_ptr);
  }
  if (return_probs) return py::make_tuple(weights, ids, probs);
  return py::make_tuple(weights, ids);
}

py::tuple py_permute(const py::array& x, const py::array& topk_ids, int64_t num_experts,
                  std::optional<int64_t> capacity) {
  const DataArg x_arg = python::data_of(x, "x", {kAny, kAny});
  const int64_t T = x.shape(0), d = x.shape(1);
  const int32_t* ids_ptr = data_of<int32_t>(topk_ids, "topk_ids", {T, kAny});
  const int64_t k = topk_ids.shape(1);
  if (num_experts < 1) throw py::value_error("num_experts: expected an integer >= 1; got " + std::to_string(num_experts));
  auto offsets = output<int32_t>({num_experts + 1});
  auto perm_rows = output<int32_t>({T, k});
  int32_t* offsets_ptr = offsets.mutable_data();
  int32_t* rows_ptr = perm_rows.mutable_data();
  int64_t M = 0;
  {
    py::gil_scoped_release release;
    M = permute_plan(ids_ptr, T, k, num_experts, capacity_from(capacity), offsets_ptr, rows_ptr);
  }
  py::array x_perm = python::new_array(x_arg.dtype, {M, d});
  void* x_perm_ptr = x_perm.mutable_data();
  {
    py::gil_scoped_release release;
    permute_gather(x_arg.data, x_arg.dtype, rows_ptr, T, k, d, x_perm_ptr);
  }
  return py::make_tuple(x_perm, offsets, perm_rows);
}

py::array py_grouped_gemm(const py::array& a, const py::object& w, const py::array& expert_offsets,
                          const std::optional<py::array>& bias) {
  const DataArg a_arg = python::data_of(a, "a", {kAny, kAny});
  const int64_t M = a.shape(0), K = a.shape(1);
  const WeightView w_view = python::weight_of(w, "w", {kAny, kAny, K});
  const int32_t* offsets_ptr = data_of<int32_t>(expert_offsets, "expert_offsets", {w_view.E + 1});
  const float* bias_ptr = python::optional_bias(bias, "bias", w_view.E, w_view.N);
  py::array out = python::new_array(a_arg.dtype, {M, w_view.N});
  void* out_ptr = out.mutable_data();
  {
    py::gil_scoped_release release;
    moe_ext::grouped_gemm(a_arg.data, a_arg.dtype, w_view, offsets_ptr, M, out_ptr, bias_ptr);
  }
  return out;
}

py::array py_unpermute(const py::array& y_perm, const py::array& perm_rows, const py::array& topk_weights) {
  const DataArg y_perm_arg = python::data_of(y_perm, "y_perm", {kAny, kAny});
  const int64_t M = y_perm.shape(0), d = y_perm.shape(1);
  const int32_t* rows_ptr = data_of<int32_t>(perm_rows, "perm_rows", {kAny, kAny});
  const int64_t T = perm_rows.shape(0), k = perm_rows.shape(1);
  const float* weights_ptr = data_of<float>(topk_weights, "topk_weights", {T, k});
  py::array y = python::new_array(y_perm_arg.dtype, {T, d});
  void* y_ptr = y.mutable_data();
  {
    py::gil_scoped_release release;
    moe_ext::unpermute(y_perm_arg.data, y_perm_arg.dtype, M, rows_ptr, weights_ptr, T, k, d, y_ptr);
  }
  return y;
}

struct ExpertWeights {
  WeightView w13_or_w1, w2;
  int64_t E, f;
  ExpertBiases biases;
};

ExpertWeights expert_weights(const py::object& w13_or_w1, const py::object& w2, int64_t d, const Activation& activation,
                             const std::optional<py::array>& b13_or_b1, const std::optional<py::array>& b2) {
  const WeightView w2_view = python::weight_of(w2, "w2", {kAny, d, kAny});
  const int64_t E = w2_view.E, f = w2_view.K;
  const int64_t rows = is_gated(activation) ? 2 * f : f;
  ExpertBiases biases;
  biases.b13_or_b1 = python::optional_bias(b13_or_b1, "b13_or_b1", E, rows);
  biases.b2 = python::optional_bias(b2, "b2", E, d);
  return {python::weight_of(w13_or_w1, "w13_or_w1", {E, rows, d}), w2_view, E, f, biases};
}

py::array py_experts(const py::array& x, const py::object& w13_or_w1, const py::object& w2, const py::array& topk_weights,
                  const py::array& topk_ids, const py::object& activation, std::optional<int64_t> capacity,
                  const std::optional<py::array>& b13_or_b1, const std::optional<py::array>& b2) {
  const Activation act = activation_from(activation);
  const DataArg x_arg = python::data_of(x, "x", {kAny, kAny});
  const int64_t T = x.shape(0), d = x.shape(1);
  const ExpertWeights w = expert_weights(w13_or_w1, w2, d, act, b13_or_b1, b2);
  const int32_t* ids_ptr = data_of<int32_t>(topk_ids, "topk_ids", {T, kAny});
  const int64_t k = topk_ids.shape(1);
  const float* weights_ptr = data_of<float>(topk_weights, "topk_weights", {T, k});
  py::array y = python::new_array(x_arg.dtype, {T, d});
  void* y_ptr = y.mutable_data();
  {
    py::gil_scoped_release release;
    moe_ext::experts(x_arg.data, x_arg.dtype, w.w13_or_w1, w.w2, weights_ptr, ids_ptr, T, d, w.f, w.E, k, act,
                     capacity_from(capacity), y_ptr, w.biases);
  }
  return y;
}

py::array py_moe(const py::array& x, const py::array& w_router, const py::object& w13_or_w1, const py::object& w2,
              int64_t top_k, const py::object& activation, const std::string& scoring, bool renormalize,
              double scale, const std::optional<py::array>& bias, const std::optional<py::array>& correction_bias,
              std::optional<int64_t> n_group, std::optional<int64_t> topk_group, std::optional<int64_t> capacity,
              const std::optional<py::array>& b13_or_b1, const std::optional<py::array>& b2) {
  const Activation act = activation_from(activation);
  const DataArg x_arg = python::data_of(x, "x", {kAny, kAny});
  const int64_t T = x.shape(0), d = x.shape(1);
  const ExpertWeights w = expert_weights(w13_or_w1, w2, d, act, b13_or_b1, b2);
  const DataArg router = python::data_of(w_router, "w_router", {w.E, d});
  const RouteConfig config = route_config(w.E, top_k, scoring, renormalize, scale, bias, correction_bias, n_group, topk_group);
  check_route_config(config, w.E);
  py::array y = python::new_array(x_arg.dtype, {T, d});
  void* y_ptr = y.mutable_data();
  {
    py::gil_scoped_release release;
    moe_ext::moe(x_arg.data, x_arg.dtype, router.data, router.dtype, w.w13_or_w1, w.w2, T, d, w.f, w.E, config, act,
                 capacity_from(capacity), y_ptr, w.biases);
  }
  return y;
}

double py_load_balancing_loss(const py::array& probs, const py::array& topk_ids, int64_t num_experts) {
  const float* probs_ptr = data_of<float>(probs, "probs", {kAny, num_experts});
  const int64_t T = probs.shape(0);
  const int32_t* ids_ptr = data_of<int32_t>(topk_ids, "topk_ids", {T, kAny});
  py::gil_scoped_release release;
  return moe_ext::load_balancing_loss(probs_ptr, ids_ptr, T, num_experts, topk_ids.shape(1));
}

double py_router_z_loss(const py::array& logits) {
  const float* logits_ptr = data_of<float>(logits, "logits", {kAny, kAny});
  py::gil_scoped_release release;
  return moe_ext::router_z_loss(logits_ptr, logits.shape(0), logits.shape(1));
}

py::dict build_info() {
  py::dict info;
  info["build_type"] = MOE_EXT_BUILD_TYPE;
  info["compiler"] = MOE_EXT_COMPILER;
  info["cxx_flags"] = MOE_EXT_CXX_FLAGS;
  info["openmp"] = openmp_enabled();
  info["cuda"] = false;
  py::list compiled;
#if defined(MOE_EXT_X86_TIERS)
  for (const char* name : {"scalar", "avx2", "avx512"}) compiled.append(name);
#else
  compiled.append("scalar");
#endif
  info["isa_compiled"] = compiled;
  return info;
}

std::vector<std::string> available_isa_names() {
  std::vector<std::string> out;
  for (Isa isa : available_isas()) out.push_back(isa_name(isa));
  return out;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "moe_ext C++ core (use the functions of the moe_ext package, which check their arguments)";
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const std::invalid_argument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });
  set_isa_from_env();
  python::bind_packed(m);
  python::bind_quant(m);

  using py::arg;
  m.def("route", &py_route, arg("x"), arg("w_router"), arg("top_k"), arg("scoring"), arg("renormalize"), arg("scale"),
        arg("bias").none(true), arg("correction_bias").none(true), arg("n_group").none(true),
        arg("topk_group").none(true), arg("return_probs"));
  m.def("permute", &py_permute, arg("x"), arg("topk_ids"), arg("num_experts"), arg("capacity").none(true));
  m.def("grouped_gemm", &py_grouped_gemm, arg("a"), arg("w"), arg("expert_offsets"), arg("bias").none(true) = py::none());
  m.def("unpermute", &py_unpermute, arg("y_perm"), arg("perm_rows"), arg("topk_weights"));
  m.def("experts", &py_experts, arg("x"), arg("w13_or_w1"), arg("w2"), arg("topk_weights"), arg("topk_ids"),
        arg("activation"), arg("capacity").none(true), arg("b13_or_b1").none(true) = py::none(),
        arg("b2").none(true) = py::none());
  m.def("moe", &py_moe, arg("x"), arg("w_router"), arg("w13_or_w1"), arg("w2"), arg("top_k"), arg("activation"),
        arg("scoring"), arg("renormalize"), arg("scale"), arg("bias").none(true), arg("correction_bias").none(true),
        arg("n_group").none(true), arg("topk_group").none(true), arg("capacity").none(true),
        arg("b13_or_b1").none(true) = py::none(), arg("b2").none(true) = py::none());
  m.def("load_balancing_loss", &py_load_balancing_loss, arg("probs"), arg("topk_ids"), arg("num_experts"));
  m.def("router_z_loss", &py_router_z_loss, arg("logits"));

  m.def("available_isas", &available_isa_names);
  m.def("get_isa", [] { return std::string(isa_name(current_isa())); });
  m.def("set_isa", [](const std::string& name) { set_isa(isa_from_name(name)); }, arg("name"));
  m.def("get_num_threads", &num_threads);
  m.def("set_num_threads", &set_num_threads, arg("n"));
  m.def("workspace_bytes", [] { return thread_workspace().bytes_held(); },
        "Scratch bytes held by the calling thread's workspace.");
  m.def("build_info", &build_info);
  bind_backward(m);
  m.def("bf16_dot_enabled", &bf16_dot_enabled, "Whether bfloat16 GEMMs use vdpbf16ps (AVX512_BF16).");
  m.def("_set_bf16_dot_enabled", &set_bf16_dot_enabled, arg("enabled"),
        "Tests only: turn vdpbf16ps off to reach the widen-to-float32 path (cannot turn it on without the CPU).");
}
