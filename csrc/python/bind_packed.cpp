// moe_ext._core.PackedWeight: expert weights packed once into the grouped GEMM's panel layout
// (core/packed.h), accepted by grouped_gemm, experts and moe wherever that weight is.
#include <pybind11/stl.h>

#include "python/arrays.h"

namespace moe_ext::python {

void bind_packed(py::module_& m) {
  py::class_<PackedWeight>(m, "PackedWeight",
                           "Expert weights [E, N, K] packed once for the grouped GEMM (moe_ext.prepack).")
      .def(py::init([](const py::array& w) {
             const WeightView view = weight_array_of(w, "w", {kAny, kAny, kAny});
             py::gil_scoped_release release;
             return new PackedWeight(view);
           }),
           py::arg("w"))
      .def_property_readonly("shape", [](const PackedWeight& p) { return py::make_tuple(p.E(), p.N(), p.K()); })
      .def_property_readonly("ndim", [](const PackedWeight&) { return 3; })
      .def_property_readonly("dtype", [](const PackedWeight& p) { return numpy_dtype(p.dtype()); })
      .def_property_readonly("nbytes", &PackedWeight::nbytes)
      .def("__repr__", [](const PackedWeight& p) {
        return "PackedWeight(shape=(" + std::to_string(p.E()) + ", " + std::to_string(p.N()) + ", " +
               std::to_string(p.K()) + "), dtype=" + std::string(py::str(numpy_dtype(p.dtype()))) + ")";
      });
}

}  // namespace moe_ext::python
