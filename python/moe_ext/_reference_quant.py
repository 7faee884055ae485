"""The NumPy ground truth of the quantised weights (docs/api.md §9), part of moe_ext.reference.

Written independently of the C++ code from the rules of docs/api.md: `quantize` gives the integer codes,
scales and zero points (bit-identical to moe_ext.quantize's), `pack` their kernel layout, `dequantize`
the float32 weights, `quantize_activations` the per-token int8 rule, and `quantized_experts` the expert
FFNs with the activation quantisation of W8A8 / W4A8 at each GEMM's input.
"""
from typing import NamedTuple, Optional

import numpy as np

BLOCK = 32  # depths of one int4 block (16 bytes), the int8 rows' padding unit


class QuantParts(NamedTuple):
    """codes [E, N, K] (int8: signed -127..127; int4: unsigned 0..15), scales [E, N, G] float32,
    zeros [E, N, G] (the z of value = scale * (code - z)), group (depths per scale; K for one per row)."""

    scheme: str
    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray
    group: int
    zero_point: bool


def _groups(w, group):
    E, N, K = w.shape
    return w.reshape(E, N, K // group, group)


def quantize(w, scheme, group_size=None, zero_point=False):
    """Quantise w [E, N, K] (any float dtype, taken as float32) by the rules of docs/api.md §9."""
    w = np.asarray(w).astype(np.float32)
    K = w.shape[2]
    group = K if group_size is None else group_size
    x = _groups(w, group)
    f32 = np.float32
    with np.errstate(divide="ignore", invalid="ignore"):
        if scheme == "int8" or not zero_point:
            levels = f32(127) if scheme == "int8" else f32(7)
            amax = np.max(np.abs(x), axis=-1, keepdims=True)
            scales = amax / levels
            r = np.where(scales > 0, np.rint(x / scales), f32(0))
            codes = np.clip(r, -levels, levels).astype(np.int32)
            zero = 0 if scheme == "int8" else 8
            zeros = np.full(scales.shape, zero, dtype=np.int32)
            codes = codes + zero
        else:
            low = np.minimum(np.min(x, axis=-1, keepdims=True), f32(0))
            high = np.maximum(np.max(x, axis=-1, keepdims=True), f32(0))
            scales = (high - low) / f32(15)
            ok = scales > 0
            zeros = np.where(ok, np.clip(np.rint(-low / scales), 0, 15), 0).astype(np.int32)
            r = np.where(ok, np.rint(x / scales) + zeros.astype(np.float32), f32(0))
            codes = np.clip(r, 0, 15).astype(np.int32)
            scales = np.where(ok, scales, f32(0))
    E, N = w.shape[:2]
    return QuantParts(scheme, codes.reshape(E, N, K), scales[..., 0].astype(np.float32),
                      zeros[..., 0], group, bool(zero_point))


def dequantize(parts):
    """float32 weights: scale * (code - zero), (code - zero) exact, one float32 product."""
    E, N, K = parts.codes.shape
    codes = _groups(parts.codes, parts.group)
    diff = (codes - parts.zeros[..., None]).astype(np.float32)
    return (parts.scales[..., None] * diff).reshape(E, N, K)


def pack(parts):
    """(values, scales, zeros or None) in the kernels' layout (csrc/core/quant.h)."""
    E, N, K = parts.codes.shape
    if parts.scheme == "int8":
        depth = -(-K // BLOCK) * BLOCK
        values = np.zeros((E, N, depth), dtype=np.uint8)
        values[..., :K] = parts.codes.astype(np.int8).view(np.uint8)
    else:
        blocks = parts.codes.astype(np.uint8).reshape(E, N, K // BLOCK, 2, BLOCK // 2)
        values = (blocks[..., 0, :] | (blocks[..., 1, :] << 4)).reshape(E, N, K // 2)
    zeros = parts.zeros.astype(np.uint8) if parts.zero_point else None
    return values, parts.scales, zeros


def quantize_activations(x):
    """Per-token int8: scale = max|x| / 127 in float32, code = x / scale rounded to nearest even (0 for
    a row of zeros); a row with NaN or Inf gets scale NaN and codes 0. Returns (codes int8, scales)."""
    x = np.asarray(x, dtype=np.float32)
    finite = np.all(np.isfinite(x), axis=1, keepdims=True)
    amax = np.max(np.abs(np.where(finite, x, 0)), axis=1, keepdims=True) if x.shape[1] else np.zeros((x.shape[0], 1), np.float32)
    scales = (amax / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.where(finite & (scales > 0), np.rint(x / scales), 0)
    codes = np.clip(codes, -127, 127).astype(np.int8)
    scales = np.where(finite, scales, np.float32(np.nan))
    return codes, scales[:, 0]


def fake_quantize_activations(x):
    """The activations as W8A8 / W4A8 multiply them, in float64: code * scale."""
    codes, scales = quantize_activations(x)
    return codes.astype(np.float64) * scales.astype(np.float64)[:, None]


def quantized_experts(x, w13_or_w1, w2, topk_weights, topk_ids, *, activation="swiglu", capacity=None,
                      quantize_inputs=(False, False), b13_or_b1=None, b2=None):
    """experts() in float64 on dequantised weights w13_or_w1, w2 (arrays), with each GEMM's input
    quantised per token first where quantize_inputs says so (first GEMM, second GEMM); biases as
    reference.experts."""
    from . import reference as ref
    x = np.asarray(x, dtype=np.float64)
    E = w13_or_w1.shape[0]
    x_perm, offsets, perm_rows = ref.permute(x, topk_ids, E, capacity=capacity)
    if quantize_inputs[0]:
        x_perm = fake_quantize_activations(x_perm)
    h = ref.grouped_gemm(x_perm, np.asarray(w13_or_w1, np.float64), offsets, bias=b13_or_b1)
    a = ref.activate(h, activation)
    if quantize_inputs[1]:
        # The kernels quantise the float32 activation they computed: round it to float32 first.
        a = fake_quantize_activations(a.astype(np.float32))
    y_perm = ref.grouped_gemm(a, np.asarray(w2, np.float64), offsets, bias=b2)
    return ref.unpermute(y_perm, perm_rows, np.asarray(topk_weights, dtype=np.float64))
