// moe_ext._core.QuantizedWeight: quantised expert weights (core/quant.h), accepted by grouped_gemm,
// experts and moe wherever a weight is. Conversions only; moe_ext.quantize (python/moe_ext/quant.py)
// checks the arguments with the user-facing messages.
#include <pybind11/stl.h>

#include <optional>
#include <string>

#include "core/quant.h"
#include "python/arrays.h"

namespace moe_ext::python {

namespace {

QuantScheme scheme_from(const std::string& name) {
  if (name == "int8") return QuantScheme::int8;
  if (name == "int4") return QuantScheme::int4;
  throw py::value_error("scheme: expected 'int8' or 'int4'; got '" + name + "'");
}

const char* scheme_name(QuantScheme s) { return s == QuantScheme::int8 ? "int8" : "int4"; }

// A read-only NumPy view of part of q's storage (kept alive by `owner`).
template <typename T>
py::array view_of(const T* data, const Shape& shape, const py::object& owner) {
  py::array a(py::dtype::of<T>(), std::vector<py::ssize_t>(shape.begin(), shape.end()), data, owner);
  py::detail::array_proxy(a.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
  return a;
}

// The caller's arrays of a quantised weight, their shapes and dtypes checked against the scheme's layout:
// scales float32, or float16 where half_scales_allowed (the kernel layout's, for borrow).
struct CheckedParts {
  QuantScheme scheme;
  const uint8_t* values;
  const void* scales;
  bool half_scales;
  const uint8_t* zeros;
};

CheckedParts checked_parts(const std::string& scheme, int64_t E, int64_t N, int64_t K, int64_t group_size,
                           const py::array& values, const py::array& scales, const std::optional<py::array>& zeros,
                           bool half_scales_allowed) {
  const QuantScheme s = scheme_from(scheme);
  const QuantView v = QuantizedWeight::layout(s, E, N, K, group_size, zeros.has_value());
  const bool half = half_scales_allowed && scales.dtype().is(py::dtype("float16"));
  const void* scales_data =
      half ? static_cast<const void*>(data_of<uint16_t>(py::array(scales).view("uint16"), "scales", {E, N, v.groups}))
           : data_of<float>(scales, "scales", {E, N, v.groups});
  return {s, data_of<uint8_t>(values, "values", {E, N, v.row_bytes}), scales_data, half,
          zeros ? data_of<uint8_t>(*zeros, "zeros", {E, N, v.groups}) : nullptr};
}

std::unique_ptr<QuantizedWeight> from_parts(const std::string& scheme, int64_t E, int64_t N, int64_t K,
                                            int64_t group_size, const py::array& values, const py::array& scales,
                                            const std::optional<py::array>& zeros, bool activations) {
  const CheckedParts p = checked_parts(scheme, E, N, K, group_size, values, scales, zeros, false);
  py::gil_scoped_release release;
  return QuantizedWeight::from_parts(p.scheme, E, N, K, group_size, p.values, static_cast<const float*>(p.scales),
                                     p.zeros, activations);
}

// A QuantizedWeight over the caller's arrays (no copy; see QuantizedWeight::borrow): the arrays' shapes and
// dtypes are checked here, their values were checked when they were made (moe_ext.torch.quant).
std::unique_ptr<QuantizedWeight> borrowed(const std::string& scheme, int64_t E, int64_t N, int64_t K,
                                          int64_t group_size, const py::array& values, const py::array& scales,
                                          const std::optional<py::array>& zeros, bool activations) {
  const CheckedParts p = checked_parts(scheme, E, N, K, group_size, values, scales, zeros, true);
  return QuantizedWeight::borrow(p.scheme, E, N, K, group_size, p.values, p.scales, p.half_scales, p.zeros,
                                 activations);
}

// (values, scales, zeros or None) of q in the exchange layout, as new arrays.
py::list exchange_parts(const QuantizedWeight& q) {
  const QuantView& v = q.view();
  auto values = output<uint8_t>({v.E, v.N, v.row_bytes});
  auto scales = output<float>({v.E, v.N, v.groups});
  py::object zeros = py::none();
  uint8_t* zeros_ptr = nullptr;
  if (v.zeros != nullptr) {
    auto z = output<uint8_t>({v.E, v.N, v.groups});
    zeros_ptr = z.mutable_data();
    zeros = z;
  }
  uint8_t* values_ptr = values.mutable_data();
  float* scales_ptr = scales.mutable_data();
  {
    py::gil_scoped_release release;
    q.export_parts(values_ptr, scales_ptr, zeros_ptr);
  }
  py::list parts;  // read-only, as the kernel views: writing into a copy would change nothing
  for (py::object part : {py::object(values), py::object(scales), zeros}) {
    if (!part.is_none()) py::detail::array_proxy(part.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
    parts.append(part);
  }
  return parts;
}

}  // namespace

void bind_quant(py::module_& m) {
  py::class_<QuantizedWeight>(m, "QuantizedWeight",
                              "Quantised expert weights [E, N, K] (moe_ext.quantize); see docs/api.md §9.")
      .def_property_readonly("shape", [](const QuantizedWeight& q) {
        return py::make_tuple(q.view().E, q.view().N, q.view().K);
      })
      .def_property_readonly("ndim", [](const QuantizedWeight&) { return 3; })
      .def_property_readonly("scheme", [](const QuantizedWeight& q) { return scheme_name(q.view().scheme); })
      .def_property_readonly("dtype", [](const QuantizedWeight& q) { return scheme_name(q.view().scheme); })
      .def_property_readonly("group_size", [](const QuantizedWeight& q) -> py::object {
        if (q.group_size() == 0) return py::none();
        return py::int_(q.group_size());
      })
      .def_property_readonly("zero_point", &QuantizedWeight::zero_point)
      .def_property_readonly("activations", [](const QuantizedWeight& q) -> py::object {
        if (q.view().quantize_activations) return py::str("int8");
        return py::none();
      })
      .def_property_readonly("nbytes", &QuantizedWeight::nbytes)
      .def_property_readonly("scale_dtype", [](const QuantizedWeight& q) {
        return py::dtype(q.view().half_scales ? "float16" : "float32");
      }, "How the scales are kept: float16 when every one is a float16 value (GGUF imports), else float32.")
      .def_property_readonly("values", [](const QuantizedWeight& q) -> py::object { return exchange_parts(q)[0]; },
                             "uint8 [E, N, row_bytes] in the exchange layout (docs/api.md §9): a copy.")
      .def_property_readonly("scales", [](const QuantizedWeight& q) -> py::object { return exchange_parts(q)[1]; },
                             "float32 [E, N, groups] in the exchange layout: a copy.")
      .def_property_readonly("zeros", [](const QuantizedWeight& q) -> py::object { return exchange_parts(q)[2]; },
                             "uint8 [E, N, groups] (zero points) or None: a copy.")
      .def("kernel_parts", [](const py::object& self) {
        const QuantView& v = self.cast<const QuantizedWeight&>().view();
        const Shape shape{v.E, v.N, v.groups};
        py::array scales = v.half_scales
                               ? view_of<uint16_t>(static_cast<const uint16_t*>(v.scales), shape, self).view("float16")
                               : view_of<float>(static_cast<const float*>(v.scales), shape, self);
        return py::make_tuple(view_of<uint8_t>(v.values, {v.E, v.N, v.row_bytes}, self), scales,
                              v.zeros ? py::object(view_of<uint8_t>(v.zeros, {v.E, v.N, v.groups}, self)) : py::none());
      }, "(values, scales, zeros): read-only views of the parts in the kernel layout (what quantized_borrow takes);\n"
         "scales float16 where scale_dtype is float16, else float32.")
      .def("dequantize", [](const QuantizedWeight& q) {
        const QuantView& v = q.view();
        auto out = output<float>({v.E, v.N, v.K});
        float* out_ptr = out.mutable_data();
        py::gil_scoped_release release;
        q.dequantize(out_ptr);
        return out;
      })
      .def("with_activations", [](const QuantizedWeight& q, bool activations) {
        py::gil_scoped_release release;
        return q.with_activations(activations);
      }, py::arg("quantize_activations"))
      .def("__repr__", [](const QuantizedWeight& q) {
        const QuantView& v = q.view();
        return "QuantizedWeight(shape=(" + std::to_string(v.E) + ", " + std::to_string(v.N) + ", " +
               std::to_string(v.K) + "), scheme='" + scheme_name(v.scheme) + "', group_size=" +
               (q.group_size() == 0 ? std::string("None") : std::to_string(q.group_size())) +
               ", zero_point=" + (q.zero_point() ? "True" : "False") + ", activations=" +
               (v.quantize_activations ? "'int8'" : "None") + ")";
      });

  m.def("quantize", [](const py::array& w, const std::string& scheme, int64_t group_size, bool zero_point,
                       bool activations) {
        const DataArg arg = data_of(w, "w", {kAny, kAny, kAny});
        const int64_t E = w.shape(0), N = w.shape(1), K = w.shape(2);
        const QuantScheme s = scheme_from(scheme);
        py::gil_scoped_release release;
        return QuantizedWeight::quantize(arg.data, arg.dtype, E, N, K, s, group_size, zero_point, activations);
      }, py::arg("w"), py::arg("scheme"), py::arg("group_size"), py::arg("zero_point"), py::arg("activations"));
  m.def("quantized_from_parts", &from_parts, py::arg("scheme"), py::arg("E"), py::arg("N"), py::arg("K"),
        py::arg("group_size"), py::arg("values"), py::arg("scales"), py::arg("zeros").none(true),
        py::arg("activations"));
  m.def("quantized_borrow", &borrowed, py::arg("scheme"), py::arg("E"), py::arg("N"), py::arg("K"),
        py::arg("group_size"), py::arg("values"), py::arg("scales"), py::arg("zeros").none(true),
        py::arg("activations"), py::keep_alive<0, 6>(), py::keep_alive<0, 7>(), py::keep_alive<0, 8>());
  m.def("vnni_enabled", &vnni_enabled, "Whether int8 products use vpdpbusd (AVX512_VNNI) on the avx512 tier.");
  m.def("_set_vnni_enabled", &set_vnni_enabled, py::arg("enabled"),
        "Tests only: turn vpdpbusd off to reach the vpmaddubsw path (cannot turn it on without the CPU).");
}

}  // namespace moe_ext::python
