#include "python/arrays.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <new>

namespace moe_ext::python {

std::string shape_str(const py::array& a) {
  std::string out = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) out += (i ? ", " : "") + std::to_string(a.shape(i));
  return out + (a.ndim() == 1 ? ",)" : ")");
}

void check_layout(const py::array& a, const char* name, const Shape& shape) {
  bool ok = a.ndim() == static_cast<py::ssize_t>(shape.size());
  for (size_t i = 0; ok && i < shape.size(); ++i) ok = shape[i] == kAny || a.shape(i) == shape[i];
  if (!ok) throw py::value_error(std::string(name) + ": unexpected shape " + shape_str(a));
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(std::string(name) + ": expected a C-contiguous array");
  if (reinterpret_cast<uintptr_t>(a.data()) % a.itemsize() != 0)
    throw py::value_error(std::string(name) + ": expected an array aligned to its elements");
}

const float* optional_bias(const std::optional<py::array>& bias, const char* name, int64_t E, int64_t N) {
  return bias ? data_of<float>(*bias, name, {E, N}) : nullptr;
}

// Whether a (3-d) is w_t.transpose(0, 2, 1) of a C-contiguous, aligned w_t.
bool is_transposed_view(const py::array& a) {
  const py::array t = a.attr("transpose")(0, 2, 1);
  return (t.flags() & py::array::c_style) && reinterpret_cast<uintptr_t>(a.data()) % a.itemsize() == 0;
}

WeightView weight_array_of(const py::array& a, const char* name, const Shape& shape) {
  const DType dtype = dtype_of(a, name);
  WeightView v;
  v.transposed = a.ndim() == 3 && !(a.flags() & py::array::c_style) && is_transposed_view(a);
  if (v.transposed) {
    bool ok = true;
    for (size_t i = 0; i < 3; ++i) ok = ok && (shape[i] == kAny || a.shape(i) == shape[i]);
    if (!ok) throw py::value_error(std::string(name) + ": unexpected shape " + shape_str(a));
  } else {
    check_layout(a, name, shape);
  }
  v.data = a.data(), v.dtype = dtype, v.E = a.shape(0), v.N = a.shape(1), v.K = a.shape(2);
  return v;
}

DType dtype_of(const py::array& a, const char* name) {
  const py::dtype dt = a.dtype();
  if (dt.is(py::dtype::of<float>())) return DType::f32;
  const bool native = dt.attr("byteorder").cast<std::string>() != ">";
  if (native && dt.itemsize() == 2) {
    const std::string type_name = py::str(dt.attr("name"));
    if (type_name == "float16") return DType::f16;
    if (type_name == "bfloat16") return DType::bf16;
  }
  throw py::type_error(std::string(name) + ": expected dtype float32, bfloat16 or float16; got " +
                       std::string(py::str(dt)));
}

py::dtype numpy_dtype(DType dtype) {
  switch (dtype) {
    case DType::f32: return py::dtype::of<float>();
    case DType::f16: return py::dtype("float16");
    case DType::bf16: break;
  }
  return py::dtype::from_args(py::module_::import("ml_dtypes").attr("bfloat16"));
}

DataArg data_of(const py::array& a, const char* name, const Shape& shape) {
  const DType dtype = dtype_of(a, name);
  check_layout(a, name, shape);
  return {a.data(), dtype};
}

WeightView weight_of(const py::object& w, const char* name, const Shape& shape) {
  const bool quantized = py::isinstance<QuantizedWeight>(w);
  if (quantized || py::isinstance<PackedWeight>(w)) {
    WeightView v;
    if (quantized) {
      const QuantView& q = w.cast<const QuantizedWeight&>().view();
      v.quant = &q, v.E = q.E, v.N = q.N, v.K = q.K;  // q lives as long as the caller's object
    } else {
      v = w.cast<const PackedWeight&>().view();
    }
    const int64_t dims[3] = {v.E, v.N, v.K};
    for (int i = 0; i < 3; ++i)
      if (shape[i] != kAny && shape[i] != dims[i])
        throw py::value_error(std::string(name) + ": unexpected shape of the packed or quantised weight");
    return v;
  }
  if (!py::isinstance<py::array>(w))
    throw py::type_error(std::string(name) + ": expected an array, a PackedWeight or a QuantizedWeight");
  return weight_array_of(w.cast<py::array>(), name, shape);
}

py::array owned_array(const py::dtype& dtype, const Shape& shape) {
  constexpr std::size_t kAlign = 64;
  std::size_t bytes = static_cast<std::size_t>(dtype.itemsize());
  for (const int64_t n : shape) bytes *= static_cast<std::size_t>(n);
  // aligned_alloc wants a multiple of the alignment; an empty array still gets a block of its own
  void* data = std::aligned_alloc(kAlign, (std::max<std::size_t>(bytes, 1) + kAlign - 1) / kAlign * kAlign);
  if (data == nullptr) throw std::bad_alloc();
  py::capsule owner(data, [](void* p) { std::free(p); });
  return py::array(dtype, std::vector<py::ssize_t>(shape.begin(), shape.end()), data, owner);
}

py::array new_array(DType dtype, const Shape& shape) { return owned_array(numpy_dtype(dtype), shape); }

}  // namespace moe_ext::python
