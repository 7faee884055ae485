// Bindings of the backward C++ API (core/backward.h) into moe_ext._core; called from module.cpp.
// As in module.cpp: the user-facing checks are in python/moe_ext/_backward.py, these only make sure a
// direct call can never reach memory it should not. The GIL is released around every kernel.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>
#include <vector>

#include "core/backward.h"
#include "python/arrays.h"

namespace py = pybind11;

namespace {

using moe_ext::python::activation_from;
using moe_ext::python::data_of;
using moe_ext::python::kAny;
using moe_ext::python::output;

// The intermediate size f of h [M, 2f] (gated) or [M, f].
int64_t intermediate_of(const py::array& h, const moe_ext::Activation& act) {
  if (h.ndim() != 2) throw py::value_error("h: expected a 2-D array");
  const int64_t cols = h.shape(1);
  if (moe_ext::is_gated(act) && cols % 2 != 0) throw py::value_error("h: expected an even column count (2f)");
  return moe_ext::is_gated(act) ? cols / 2 : cols;
}

// h (and grad_act) float32, bfloat16 or float16, of one dtype; the result in that dtype.
py::array py_activation(const py::array& h, const py::object& activation) {
  const moe_ext::Activation act = activation_from(activation);
  const int64_t f = intermediate_of(h, act);
  const moe_ext::python::DataArg h_arg = moe_ext::python::data_of(h, "h", {kAny, kAny});
  const int64_t M = h.shape(0);
  py::array out = moe_ext::python::new_array(h_arg.dtype, {M, f});
  void* out_ptr = out.mutable_data();
  py::gil_scoped_release release;
  moe_ext::activation(h_arg.data, h_arg.dtype, M, f, act, out_ptr);
  return out;
}

py::array py_activation_backward(const py::array& grad_act, const py::array& h, const py::object& activation) {
  const moe_ext::Activation act = activation_from(activation);
  const int64_t f = intermediate_of(h, act);
  const moe_ext::python::DataArg h_arg = moe_ext::python::data_of(h, "h", {kAny, kAny});
  const int64_t M = h.shape(0);
  const moe_ext::python::DataArg g_arg = moe_ext::python::data_of(grad_act, "grad_act", {M, f});
  if (g_arg.dtype != h_arg.dtype) throw py::type_error("grad_act: expected the dtype of h");
  py::array grad_h = moe_ext::python::new_array(h_arg.dtype, {M, h.shape(1)});
  void* out_ptr = grad_h.mutable_data();
  py::gil_scoped_release release;
  moe_ext::activation_backward(g_arg.data, h_arg.data, h_arg.dtype, M, f, act, out_ptr);
  return grad_h;
}

// grad_a float32, or in a's dtype with grad_a_as_a.
py::tuple py_grouped_gemm_backward(const py::array& grad_out, const py::array& a, const py::array& w,
                                   const py::array& expert_offsets, bool need_a, bool need_w, bool grad_a_as_a) {
  const moe_ext::python::DataArg a_arg = moe_ext::python::data_of(a, "a", {kAny, kAny});
  const int64_t M = a.shape(0), K = a.shape(1);
  const moe_ext::WeightView w_view = moe_ext::python::weight_array_of(w, "w", {kAny, kAny, K});
  const int64_t E = w_view.E, N = w_view.N;
  const moe_ext::python::DataArg g_arg = moe_ext::python::data_of(grad_out, "grad_out", {M, N});
  if (g_arg.dtype != a_arg.dtype) throw py::type_error("grad_out: expected the dtype of a");
  const int32_t* offsets_ptr = data_of<int32_t>(expert_offsets, "expert_offsets", {E + 1});
  const moe_ext::DType ga_dtype = grad_a_as_a ? a_arg.dtype : moe_ext::DType::f32;
  py::array grad_a = moe_ext::python::new_array(ga_dtype, {need_a ? M : 0, K});
  py::array grad_w = moe_ext::python::new_array(w_view.dtype, {need_w ? E : 0, N, K});
  void* ga = need_a ? grad_a.mutable_data() : nullptr;
  void* gw = need_w ? grad_w.mutable_data() : nullptr;
  {
    py::gil_scoped_release release;
    moe_ext::grouped_gemm_backward(g_arg.data, a_arg.data, a_arg.dtype, w_view, offsets_ptr, M, ga, ga_dtype, gw);
  }
  return py::make_tuple(need_a ? py::object(grad_a) : py::none(), need_w ? py::object(grad_w) : py::none());
}

py::array py_bias_grad(const py::array& grad_out, const py::array& expert_offsets) {
  const float* g_ptr = data_of<float>(grad_out, "grad_out", {kAny, kAny});
  const int64_t M = grad_out.shape(0), N = grad_out.shape(1);
  const int32_t* offsets_ptr = data_of<int32_t>(expert_offsets, "expert_offsets", {kAny});
  const int64_t E = expert_offsets.shape(0) - 1;
  if (E < 1) throw py::value_error("expert_offsets: expected at least 2 entries (E >= 1)");
  auto grad_bias = output<float>({E, N});
  float* out_ptr = grad_bias.mutable_data();
  py::gil_scoped_release release;
  moe_ext::bias_grad(g_ptr, offsets_ptr, E, M, N, out_ptr);
  return grad_bias;
}

py::tuple py_unpermute_backward(const py::array& grad_y, const py::array& y_perm, const py::array& perm_rows,
                                const py::array& topk_weights) {
  const float* y_perm_ptr = data_of<float>(y_perm, "y_perm", {kAny, kAny});
  const int64_t M = y_perm.shape(0), d = y_perm.shape(1);
  const int32_t* rows_ptr = data_of<int32_t>(perm_rows, "perm_rows", {kAny, kAny});
  const int64_t T = perm_rows.shape(0), k = perm_rows.shape(1);
  const float* w_ptr = data_of<float>(topk_weights, "topk_weights", {T, k});
  const float* gy_ptr = data_of<float>(grad_y, "grad_y", {T, d});
  auto grad_y_perm = output<float>({M, d});
  auto grad_w = output<float>({T, k});
  float* gyp = grad_y_perm.mutable_data();
  float* gw = grad_w.mutable_data();
  {
    py::gil_scoped_release release;
    moe_ext::unpermute_backward(gy_ptr, y_perm_ptr, M, rows_ptr, w_ptr, T, k, d, gyp, gw);
  }
  return py::make_tuple(grad_y_perm, grad_w);
}

py::array py_permute_backward(const py::array& grad_x_perm, const py::array& perm_rows) {
  const float* g_ptr = data_of<float>(grad_x_perm, "grad_x_perm", {kAny, kAny});
  const int64_t M = grad_x_perm.shape(0), d = grad_x_perm.shape(1);
  const int32_t* rows_ptr = data_of<int32_t>(perm_rows, "perm_rows", {kAny, kAny});
  const int64_t T = perm_rows.shape(0), k = perm_rows.shape(1);
  auto grad_x = output<float>({T, d});
  float* out_ptr = grad_x.mutable_data();
  py::gil_scoped_release release;
  moe_ext::permute_backward(g_ptr, M, rows_ptr, T, k, d, out_ptr);
  return grad_x;
}

}  // namespace

void bind_backward(py::module_& m) {
  using py::arg;
  m.def("activation", &py_activation, arg("h"), arg("activation"));
  m.def("activation_backward", &py_activation_backward, arg("grad_act"), arg("h"), arg("activation"));
  m.def("grouped_gemm_backward", &py_grouped_gemm_backward, arg("grad_out"), arg("a"), arg("w"),
        arg("expert_offsets"), arg("need_a") = true, arg("need_w") = true, arg("grad_a_as_a") = false);
  m.def("bias_grad", &py_bias_grad, arg("grad_out"), arg("expert_offsets"));
  m.def("unpermute_backward", &py_unpermute_backward, arg("grad_y"), arg("y_perm"), arg("perm_rows"),
        arg("topk_weights"));
  m.def("permute_backward", &py_permute_backward, arg("grad_x_perm"), arg("perm_rows"));
}
