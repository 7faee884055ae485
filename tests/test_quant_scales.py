"""Float16 scales (core/quant.h): parts whose scales are all float16 values (a GGUF import's) are kept as
float16 and read exactly, so the weight multiplies like the same parts with float32 scales, bit for bit,
on every tier and product path; one scale that is not a float16 value keeps them all float32."""
import ml_dtypes
import numpy as np
import pytest

import moe_ext
from moe_ext.quant import from_parts
from conftest import random_offsets

# (scheme, group_size, zero_point)
FORMATS = [("int8", None, False), ("int8", 32, False), ("int4", 32, False), ("int4", 64, True),
           ("int4", 128, False)]


def _id(f):
    return f"{f[0]}-g{f[1]}{'-zp' if f[2] else ''}"


def _half_scales(rng, shape):
    """Positive float16 values over many binades, subnormals included, as float32 (exact)."""
    s = rng.uniform(0.5, 2.0, shape) * 2.0 ** rng.integers(-26, 6, shape)
    return np.maximum(s.astype(np.float16), np.float16(2.0 ** -24)).astype(np.float32)


def _pair(rng, fmt, E, N, K, activations):
    """(half, full): the same random parts, the second with scale [0, 0, 0] nudged off float16 (so kept
    as float32): they differ in weight row (0, 0) only."""
    scheme, group, zp = fmt
    q = moe_ext.quantize(rng.standard_normal((E, N, K)).astype(np.float32), scheme, group_size=group,
                         zero_point=zp)
    scales = _half_scales(rng, q.scales.shape)
    nudged = scales.copy()
    nudged[0, 0, 0] = np.nextafter(nudged[0, 0, 0], np.float32(np.inf))
    half = from_parts(scheme, (E, N, K), group, q.values, scales, q.zeros, activations=activations)
    full = from_parts(scheme, (E, N, K), group, q.values, nudged, q.zeros, activations=activations)
    return half, full


@pytest.mark.parametrize("fmt", FORMATS, ids=_id)
@pytest.mark.parametrize("activations", [None, "int8"])
@pytest.mark.parametrize("counts", [[1, 0, 2], [5, 20, 3]], ids=str)
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["float32", "bfloat16"])
def test_half_scales_multiply_as_float32_ones(rng, vnni, fmt, activations, counts, dtype):
    """bfloat16 tokens: int4 weight-only decode on vdpbf16ps where the CPU has it (docs/api.md §9)."""
    E, N, K = 3, 21, 256  # 21 rows: two panels of 8 and 5 rows outside them
    half, full = _pair(rng, fmt, E, N, K, activations)
    assert half.scale_dtype == np.float16 and full.scale_dtype == np.float32
    w_half, w_full = moe_ext.dequantize(half), moe_ext.dequantize(full)
    np.testing.assert_array_equal(w_half[:, 1:], w_full[:, 1:])
    np.testing.assert_array_equal(w_half[1:], w_full[1:])
    offsets = random_offsets(rng, E, counts=counts)
    a = rng.standard_normal((int(offsets[-1]), K)).astype(dtype)
    out_half, out_full = moe_ext.grouped_gemm(a, half, offsets), moe_ext.grouped_gemm(a, full, offsets)
    out_half, out_full = out_half.astype(np.float32), out_full.astype(np.float32)
    rows0 = slice(0, int(offsets[1]))  # expert 0's rows see the nudged row 0 in column 0
    np.testing.assert_array_equal(out_half[:, 1:], out_full[:, 1:])
    np.testing.assert_array_equal(out_half[int(offsets[1]):], out_full[int(offsets[1]):])
    rtol = 1e-5 if dtype == np.float32 else 2.0 ** -7  # bfloat16 outputs: one rounding step apart at most
    np.testing.assert_allclose(out_half[rows0, 0], out_full[rows0, 0], rtol=rtol, atol=1e-30)


@pytest.mark.parametrize("fmt", FORMATS, ids=_id)
def test_parts_bytes_and_kernel_layout(rng, fmt):
    E, N, K = 2, 11, 128
    half, full = _pair(rng, fmt, E, N, K, None)
    groups = half.scales.shape[2]
    zeros = E * N * groups if fmt[2] else 0
    assert full.nbytes - half.nbytes == 2 * E * N * groups
    assert half.nbytes == half.values.nbytes + 2 * E * N * groups + zeros
    assert half.scales.dtype == np.float32  # the exchange layout is float32 either way
    np.testing.assert_array_equal(half.values, full.values)
    values, scales, _ = half.kernel_parts()
    assert scales.dtype == np.float16 and full.kernel_parts()[1].dtype == np.float32
    np.testing.assert_array_equal(np.sort(scales.astype(np.float32).ravel()), np.sort(half.scales.ravel()))
    again = from_parts(fmt[0], (E, N, K), fmt[1], half.values, half.scales, half.zeros)
    assert again.scale_dtype == np.float16
    np.testing.assert_array_equal(again.kernel_parts()[1], scales)
    # with_activations keeps the storage
    assert moe_ext.quant.with_activations(half, "int8").scale_dtype == np.float16


@pytest.mark.parametrize("value, half", [
    (0.0, True), (-0.0, True), (1.0 / 3.0, False), (65504.0, True), (65520.0, False), (2.0 ** 16, False),
    (2.0 ** -24, True), (3 * 2.0 ** -24, True), (2.0 ** -25, False), (2.0 ** -14, True),
    (2.0 ** -14 + 2.0 ** -24, True), (2.0 ** -14 + 2.0 ** -25, False), (1.0 + 2.0 ** -10, True),
    (1.0 + 2.0 ** -11, False), (-7.5, True), (1e-40, False)])
def test_which_scales_are_float16(value, half):
    """One group of one row: kept as float16 exactly when the value is one (subnormals included)."""
    values = np.full((1, 1, 16), 0x98, dtype=np.uint8)
    q = from_parts("int4", (1, 1, 32), 32, values, np.array([[[value]]], dtype=np.float32))
    assert q.scale_dtype == (np.float16 if half else np.float32)
    assert q.scales[0, 0, 0] == np.float32(value) and np.signbit(q.scales[0, 0, 0]) == np.signbit(np.float32(value))
    w = moe_ext.dequantize(q)[0, 0]
    np.testing.assert_array_equal(w[:16], np.float32(value) * np.float32(0x8 - 8))
    np.testing.assert_array_equal(w[16:], np.float32(value) * np.float32(0x9 - 8))


def test_torch_buffers_keep_float16_scales(rng):
    torch = pytest.importorskip("torch")
    from moe_ext.torch.quant import QuantizedExpertWeight
    half, _ = _pair(rng, ("int4", 32, False), 2, 16, 64, None)
    module = QuantizedExpertWeight.from_quantized(half)
    assert module.scales.dtype == torch.float16
    assert module.nbytes == half.nbytes
    np.testing.assert_array_equal(module.dequantize().numpy(), moe_ext.dequantize(half))
    state = module.state_dict()
    assert state["scales"].dtype == torch.float16
