"""Quantised expert weights (SPEC §3.7, docs/api.md §9): quantize, dequantize, QuantizedWeight.

A QuantizedWeight is accepted by grouped_gemm, experts and moe wherever an expert weight is. Whether the
activations are quantised too is a property of the weight, chosen when it is made:
`activations=None` keeps them in float (W8A16 / W4A16), `activations="int8"` quantises each GEMM's rows
per token to int8 on the fly (W8A8 / W4A8).
"""
import numpy as np

from . import _checks as check
from . import _core
from ._core import QuantizedWeight

SCHEMES = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128)
ACTIVATION_MODES = (None, "int8")


def _activations(value):
    if value is not None and value not in ACTIVATION_MODES:
        check.fail(ValueError, "activations", "None (weight-only) or 'int8' (per-token dynamic int8)", repr(value))
    return value == "int8"


def _group_size(scheme, group_size, K):
    if group_size is None:
        if scheme == "int4":
            check.fail(ValueError, "group_size", "32, 64 or 128 for scheme 'int4'", "None")
        return 0
    group_size = check.integer(group_size, "group_size", 1)
    if scheme == "int4" and group_size not in INT4_GROUP_SIZES:
        check.fail(ValueError, "group_size", "32, 64 or 128 for scheme 'int4'", group_size)
    if scheme == "int8" and group_size % 32 != 0:
        check.fail(ValueError, "group_size", "None or a multiple of 32 for scheme 'int8'", group_size)
    if K % group_size != 0:
        check.fail(ValueError, "group_size", f"a group size that divides K = {K}", group_size)
    return group_size


def quantize(w, scheme, *, group_size=None, zero_point=False, activations=None):
    """Quantise expert weights w [E, N, K] (float32, bfloat16 or float16; C-contiguous or the transposed
    view w_t.transpose(0, 2, 1), which is copied to [E, N, K] once here).

    scheme "int8": symmetric, one float32 scale per output row (group_size=None, the vLLM/SGLang W8A8
    layout) or per group of `group_size` depths (a multiple of 32 dividing K; 32 is GGUF Q8_0's).
    scheme "int4": groups of 32, 64 or 128 depths, symmetric or (zero_point=True) with a zero point per
    group; two values a byte; K even.
    activations: None keeps the GEMMs' rows in float (W8A16 / W4A16); "int8" quantises them per token.
    Returns a QuantizedWeight. Rounding rules: docs/api.md §9.
    """
    scheme = check.choice(scheme, "scheme", SCHEMES)
    w = np.ascontiguousarray(check.weight_array(w, "w"))  # quantisation reads rows: one copy, once
    E, N, K = w.shape
    if E < 1 or K < 1:
        check.fail(ValueError, "w", "shape (E, N, K) with E >= 1 and K >= 1", f"shape {w.shape}")
    zero_point = check.boolean(zero_point, "zero_point")
    if zero_point and scheme == "int8":
        check.fail(ValueError, "zero_point", "False for scheme 'int8' (int8 is symmetric)", True)
    if scheme == "int4" and K % 2 != 0:
        check.fail(ValueError, "w", "an even K for scheme 'int4' (two values a byte)", f"shape {w.shape}")
    group_size = _group_size(scheme, group_size, K)
    return _core.quantize(w, scheme, group_size, zero_point, _activations(activations))


def dequantize(q):
    """The float32 values [E, N, K] the kernels multiply by: scale * (q - zero) in float32."""
    if not isinstance(q, QuantizedWeight):
        check.fail(TypeError, "q", "a moe_ext.QuantizedWeight", type(q).__name__)
    return q.dequantize()


def with_activations(q, activations):
    """A copy of q with another activation mode (None or "int8"), the same quantised values."""
    if not isinstance(q, QuantizedWeight):
        check.fail(TypeError, "q", "a moe_ext.QuantizedWeight", type(q).__name__)
    return q.with_activations(_activations(activations))


def from_parts(scheme, shape, group_size, values, scales, zeros=None, *, activations=None):
    """A QuantizedWeight from parts in the exchange layout (docs/api.md §9: what q.values/scales/zeros give),
    copied, never requantised: values uint8 [E, N, row_bytes], scales float32 [E, N, groups], zeros uint8
    [E, N, groups] or None. The scales are kept as float16 when every one is a float16 value (a GGUF
    import's are), else as float32: q.scale_dtype says which; either way they are read exactly."""
    scheme = check.choice(scheme, "scheme", SCHEMES)
    E, N, K = (check.integer(s, "shape", 0) for s in shape)
    if scheme == "int4" and K % 2 != 0:
        check.fail(ValueError, "w", "an even K for scheme 'int4' (two values a byte)", f"shape {tuple(shape)}")
    group_size = _group_size(scheme, group_size, K) if K > 0 else 0
    values = np.ascontiguousarray(values, dtype=np.uint8)
    scales = np.ascontiguousarray(scales, dtype=np.float32)
    if zeros is not None:
        zeros = np.ascontiguousarray(zeros, dtype=np.uint8)
    return _core.quantized_from_parts(scheme, E, N, K, group_size, values, scales, zeros, _activations(activations))
