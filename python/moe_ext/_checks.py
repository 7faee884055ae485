"""Argument checks of the public API (SPEC §5).

Every failure raises TypeError (wrong kind of object or dtype) or ValueError (wrong rank, shape, value,
layout), with a message of the form "<argument>: expected <what>; got <what came>". Checks of index
*values* (ids in range, offsets non-decreasing, rows in range) run in C++ (csrc/core/checks.cpp), in one
pass over the data, with messages of the same form.
"""
import numbers

import numpy as np

try:  # NumPy has no bfloat16; ml_dtypes (a dependency) provides the field's standard one
    import ml_dtypes
except ImportError:  # pragma: no cover - bfloat16 arrays cannot exist without it
    ml_dtypes = None

INT32_MAX = np.iinfo(np.int32).max
INT64_MAX = np.iinfo(np.int64).max
# Scores, top-k weights, biases, probabilities, logits.
FLOAT_DTYPES = (np.dtype(np.float32),)
# Activations and weights (SPEC §4): float32, bfloat16 (ml_dtypes.bfloat16), float16.
DATA_DTYPES = (np.dtype(np.float32),) + ((np.dtype(ml_dtypes.bfloat16),) if ml_dtypes else ()) + (
    np.dtype(np.float16),)
INDEX_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))


def fail(error, name, expected, got):
    raise error(f"{name}: expected {expected}; got {got}")


def _dtype_names(dtypes):
    return " or ".join(str(d) for d in dtypes)


def _array(value, name, ndim, dtypes):
    if not isinstance(value, np.ndarray):
        fail(TypeError, name, "a numpy.ndarray", type(value).__name__)
    if value.dtype not in dtypes:
        fail(TypeError, name, f"dtype {_dtype_names(dtypes)}", f"dtype {value.dtype}")
    if value.ndim != ndim:
        fail(ValueError, name, f"a {ndim}-d array", f"a {value.ndim}-d array of shape {value.shape}")
    if not value.flags.c_contiguous:
        fail(ValueError, name, "a C-contiguous array", f"a non-contiguous array (strides {value.strides})")
    if not value.flags.aligned:  # e.g. a view at an odd offset of a byte buffer; the kernels load whole elements
        fail(ValueError, name, f"an array aligned to its {value.itemsize}-byte elements",
             "an unaligned array (pass a copy: array.copy())")
    return value


def float_array(value, name, ndim):
    """A C-contiguous float array of the given rank."""
    return _array(value, name, ndim, FLOAT_DTYPES)


def data_array(value, name, ndim):
    """A C-contiguous activation or weight array of the given rank: float32, bfloat16 or float16."""
    return _array(value, name, ndim, DATA_DTYPES)


def is_transposed_view(value):
    """Whether a 3-d array is w_t.transpose(0, 2, 1) of a C-contiguous w_t [E, K, N] (and not itself
    C-contiguous): HF's transposed expert weights, which the kernels read in place."""
    return value.ndim == 3 and not value.flags.c_contiguous and value.transpose(0, 2, 1).flags.c_contiguous


def weight_array(value, name, dtypes=DATA_DTYPES):
    """Expert weights [E, N, K] as an array: C-contiguous, or the transposed view w_t.transpose(0, 2, 1)
    of a C-contiguous w_t [E, K, N]. Any other layout raises."""
    if isinstance(value, np.ndarray) and value.ndim == 3 and is_transposed_view(value):
        _array(value.transpose(0, 2, 1), name, 3, dtypes)  # dtype and alignment
        return value
    try:
        return _array(value, name, 3, dtypes)
    except ValueError as error:
        if "C-contiguous" not in str(error):
            raise
        fail(ValueError, name, "a C-contiguous array [E, N, K] or the transposed view w_t.transpose(0, 2, 1) "
             "of a C-contiguous w_t [E, K, N]", f"an array of shape {value.shape} with strides {value.strides}")


def weight(value, name, packed_type):
    """Expert weights [E, N, K]: a PackedWeight (prepack) or QuantizedWeight (quantize), or a data array
    (C-contiguous or transposed, see weight_array); packed_type is the class or a tuple of the classes
    accepted."""
    if isinstance(value, packed_type):
        return value
    return weight_array(value, name)


def optional_bias(value, name, shape, how=""):
    """A bias [E, N] in float32, bfloat16 or float16 (C-contiguous), returned as float32 (the kernels add
    it in float32; a widening of E * N values), or None."""
    if value is None:
        return None
    value = data_array(value, name, len(shape))
    expect_shape(value, name, shape, how)
    return np.ascontiguousarray(value, dtype=np.float32)


def index_array(value, name, ndim):
    """A C-contiguous int32 array; int64 is accepted and narrowed only when every value fits."""
    value = _array(value, name, ndim, INDEX_DTYPES)
    if value.dtype == np.int32 or value.size == 0:
        return value.astype(np.int32, copy=False)
    low, high = int(value.min()), int(value.max())
    for bad in (low, high):
        if not -INT32_MAX - 1 <= bad <= INT32_MAX:
            fail(ValueError, name, "int64 values that fit in int32", f"{bad}")
    return value.astype(np.int32)


def optional_float_array(value, name, shape):
    if value is None:
        return None
    value = float_array(value, name, len(shape))
    expect_shape(value, name, shape)
    return value


def expect_shape(value, name, shape, how=""):
    """Checks value.shape against `shape`, whose None entries match anything."""
    if len(shape) != value.ndim or any(want is not None and want != got for want, got in zip(shape, value.shape)):
        wanted = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
        fail(ValueError, name, f"shape {wanted}{how}", f"shape {value.shape}")


def integer(value, name, low, high=INT64_MAX):
    """A Python or NumPy integer (not a bool) in [low, high] (the C++ core takes int64)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        fail(TypeError, name, "an integer", f"{value!r} ({type(value).__name__})")
    value = int(value)
    if value < low or value > high:
        fail(ValueError, name, f"an integer in [{low}, {high}]", value)
    return value


def optional_integer(value, name, low, high=INT64_MAX):
    return None if value is None else integer(value, name, low, high)


FLOAT32_MAX = float(np.finfo(np.float32).max)


def real(value, name):
    """A real number that float32 represents as a finite value (the kernels compute in float32)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        fail(TypeError, name, "a real number", f"{value!r} ({type(value).__name__})")
    value = float(value)
    if not abs(value) <= FLOAT32_MAX:
        fail(ValueError, name, f"a finite number of magnitude <= {FLOAT32_MAX:.6g} (float32)", value)
    return value


def boolean(value, name):
    if not isinstance(value, (bool, np.bool_)):
        fail(TypeError, name, "a bool", f"{value!r} ({type(value).__name__})")
    return bool(value)


def choice(value, name, options):
    if not isinstance(value, str):
        fail(TypeError, name, "a str", f"{value!r} ({type(value).__name__})")
    if value not in options:
        fail(ValueError, name, "one of " + ", ".join(repr(o) for o in options), repr(value))
    return value


def copies_fit(T, k, name="topk_ids"):
    """Rows of the permuted copies are int32: T*k must fit."""
    if T * k > INT32_MAX:
        fail(ValueError, name, f"T*k <= {INT32_MAX} token copies", f"T*k = {T}*{k} = {T * k}")
