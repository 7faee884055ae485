// Unwrapping NumPy arrays of the activation dtypes (float32, float16, ml_dtypes.bfloat16) and expert
// weights (such an array or a PackedWeight) for the bindings. Checks only what memory safety needs; the
// user-facing messages come from python/moe_ext/_checks.py.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <optional>
#include <string>
#include <vector>

#include "core/packed.h"
#include "core/quant.h"
#include "core/types.h"
#include "python/activation_arg.h"

namespace moe_ext::python {

namespace py = pybind11;

using Shape = std::vector<int64_t>;
constexpr int64_t kAny = -1;

std::string shape_str(const py::array& a);
// Throws ValueError unless a is C-contiguous, aligned and of the given shape (kAny matches any size).
void check_layout(const py::array& a, const char* name, const Shape& shape);

// The DType of a float32, float16 or bfloat16 (ml_dtypes) array; TypeError for any other dtype.
DType dtype_of(const py::array& a, const char* name);
// The NumPy dtype of a DType (bfloat16 needs ml_dtypes).
py::dtype numpy_dtype(DType dtype);

struct DataArg {
  const void* data;
  DType dtype;
};
// An activation/weight array of shape `shape` in one of the three dtypes.
DataArg data_of(const py::array& a, const char* name, const Shape& shape);

// A weight argument: a PackedWeight or QuantizedWeight (its view) or an array [E, N, K] (kAny allowed),
// C-contiguous or the transposed view w_t.transpose(0, 2, 1) of a C-contiguous w_t [E, K, N].
WeightView weight_of(const py::object& w, const char* name, const Shape& shape);

// A plain weight array [E, N, K], C-contiguous or such a transposed view; ValueError for other strides.
WeightView weight_array_of(const py::array& w, const char* name, const Shape& shape);

// A new C-contiguous array of `dtype`.
py::array new_array(DType dtype, const Shape& shape);

// The data pointer of a C-contiguous, aligned array of dtype T and the given shape (kAny matches any size).
template <typename T>
const T* data_of(const py::array& a, const char* name, const Shape& shape) {
  if (!a.dtype().is(py::dtype::of<T>()))
    throw py::type_error(std::string(name) + ": expected dtype " + std::string(py::str(py::dtype::of<T>())) +
                         "; got " + std::string(py::str(a.dtype())));
  check_layout(a, name, shape);
  return static_cast<const T*>(a.data());
}

// A new C-contiguous array whose memory moe_ext allocates (64-byte aligned) and a capsule frees, not
// NumPy's allocator: NumPy madvise(MADV_HUGEPAGE)s every array of 4 MiB or more, and where transparent
// huge pages defragment on madvise (the kernel's default) each first touch of such an output may compact
// memory synchronously. On the 2-core VMs here a fresh 32 MiB array took 360-480 ms to fill that way and
// 18 ms without the madvise; every op's output (a training step's gradients, a prefill's activations) is
// fresh memory.
py::array owned_array(const py::dtype& dtype, const Shape& shape);

// A new C-contiguous array of T (see owned_array).
template <typename T>
py::array_t<T> output(const Shape& shape) {
  return py::array_t<T>(owned_array(py::dtype::of<T>(), shape));
}

// An optional float32 bias [E, N] (null when absent).
const float* optional_bias(const std::optional<py::array>& bias, const char* name, int64_t E, int64_t N);

void bind_packed(py::module_& m);
void bind_quant(py::module_& m);

}  // namespace moe_ext::python
