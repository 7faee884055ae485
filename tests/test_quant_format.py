"""moe_ext.quantize / dequantize / QuantizedWeight: the format, the rounding rules of docs/api.md §9
against the independent NumPy reference (bit for bit), and the argument errors. Kernel-free: run once."""
import ml_dtypes
import numpy as np
import pytest

import moe_ext
from moe_ext import reference
from conftest import unchanged

PER_TIER = False

# (scheme, group_size, zero_point, K)
FORMATS = [("int8", None, False, 45), ("int8", None, False, 64), ("int8", 32, False, 96), ("int8", 64, False, 128),
           ("int4", 32, False, 64), ("int4", 64, False, 192), ("int4", 128, False, 256),
           ("int4", 32, True, 96), ("int4", 64, True, 128), ("int4", 128, True, 256)]


def _ids(fmt):
    scheme, group, zp, K = fmt
    return f"{scheme}-g{group}-{'zp' if zp else 'sym'}-K{K}"


@pytest.mark.parametrize("fmt", FORMATS, ids=_ids)
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16])
def test_matches_reference_bitwise(rng, fmt, dtype):
    scheme, group, zp, K = fmt
    w = (rng.standard_normal((3, 7, K)) * rng.uniform(0.1, 3)).astype(dtype)
    w[0, 0] = 0                 # an all-zero row: scale 0, codes 0 (zero point 0)
    w[0, 1] = 0.5               # a constant row
    w[1, 2] = -np.abs(w[1, 2])  # one-signed rows (zero point at an end)
    w[1, 3] = np.abs(w[1, 3])
    with unchanged(w):
        q = moe_ext.quantize(w, scheme, group_size=group, zero_point=zp)
    parts = reference.quantize(w, scheme, group, zp)
    values, scales, zeros = reference.pack(parts)
    np.testing.assert_array_equal(q.values, values)
    np.testing.assert_array_equal(q.scales, scales)
    if zp:
        np.testing.assert_array_equal(q.zeros, zeros)
    else:
        assert q.zeros is None
    np.testing.assert_array_equal(moe_ext.dequantize(q), reference.dequantize(parts))
    assert moe_ext.dequantize(q).dtype == np.float32


@pytest.mark.parametrize("fmt", FORMATS, ids=_ids)
def test_error_within_half_a_step(rng, fmt):
    """Every dequantised weight is within half a quantisation step (plus float32 rounding) of w."""
    scheme, group, zp, K = fmt
    w = rng.standard_normal((2, 5, K)).astype(np.float32)
    q = moe_ext.quantize(w, scheme, group_size=group, zero_point=zp)
    g = q.scales.shape[-1]
    steps = np.repeat(q.scales, K // g if group else K, axis=-1)[..., :K].astype(np.float64)
    err = np.abs(moe_ext.dequantize(q).astype(np.float64) - w)
    assert np.all(err <= 0.5 * steps * (1 + 1e-5) + 1e-6 * np.abs(w))


def test_attributes(rng):
    w = rng.standard_normal((3, 70, 128)).astype(np.float32)
    q8 = moe_ext.quantize(w, "int8")
    assert isinstance(q8, moe_ext.QuantizedWeight)
    assert q8.shape == (3, 70, 128) and q8.ndim == 3 and q8.scheme == "int8" and q8.dtype == "int8"
    assert q8.group_size is None and not q8.zero_point and q8.activations is None
    assert q8.nbytes == 3 * 70 * (128 + 4)
    q4 = moe_ext.quantize(w, "int4", group_size=64, zero_point=True, activations="int8")
    assert q4.group_size == 64 and q4.zero_point and q4.activations == "int8"
    assert q4.nbytes == 3 * 70 * (64 + 2 * 4 + 2)
    assert "scheme='int4', group_size=64, zero_point=True, activations='int8'" in repr(q4)
    assert not q4.values.flags.writeable and not q4.scales.flags.writeable
    other = moe_ext.quant.with_activations(q4, None)
    assert other.activations is None
    np.testing.assert_array_equal(moe_ext.dequantize(other), moe_ext.dequantize(q4))


def test_int8_per_row_pads_odd_k(rng):
    w = rng.standard_normal((1, 3, 33)).astype(np.float32)
    q = moe_ext.quantize(w, "int8")
    assert q.values.shape == (1, 3, 64) and not q.values[..., 33:].any()


def test_is_a_copy(rng):
    w = rng.standard_normal((2, 4, 64)).astype(np.float32)
    q = moe_ext.quantize(w, "int4", group_size=32)
    before = moe_ext.dequantize(q)
    w[:] = 0
    np.testing.assert_array_equal(moe_ext.dequantize(q), before)


def test_from_parts_round_trip(rng):
    w = rng.standard_normal((2, 6, 128)).astype(np.float32)
    q = moe_ext.quantize(w, "int4", group_size=32, zero_point=True)
    again = moe_ext.quant.from_parts("int4", q.shape, 32, q.values, q.scales, q.zeros)
    np.testing.assert_array_equal(moe_ext.dequantize(again), moe_ext.dequantize(q))


@pytest.mark.parametrize("kwargs, name, match", [
    (dict(scheme="int3"), "scheme", "'int8', 'int4'"),
    (dict(scheme="int8", group_size=48), "group_size", "multiple of 32"),
    (dict(scheme="int8", group_size=64), "group_size", "divides K = 96"),
    (dict(scheme="int4", group_size=None), "group_size", "32, 64 or 128"),
    (dict(scheme="int4", group_size=16), "group_size", "32, 64 or 128"),
    (dict(scheme="int4", group_size=64), "group_size", "divides K = 96"),
    (dict(scheme="int8", zero_point=True), "zero_point", "symmetric"),
    (dict(scheme="int8", activations="int4"), "activations", "'int8'"),
])
def test_bad_arguments(rng, kwargs, name, match):
    w = rng.standard_normal((2, 3, 96)).astype(np.float32)
    with pytest.raises(ValueError, match=f"^{name}: expected .*{match}"):
        moe_ext.quantize(w, **kwargs)


def test_bad_weights(rng):
    with pytest.raises(ValueError, match="^w: expected an even K"):
        moe_ext.quantize(rng.standard_normal((1, 2, 33)).astype(np.float32), "int4", group_size=32)
    w = rng.standard_normal((2, 3, 64)).astype(np.float32)
    for bad in (np.nan, np.inf, -np.inf):
        w2 = w.copy()
        w2[1, 2, 5] = bad
        with pytest.raises(ValueError, match=r"^w: expected finite values.*w\[1, 2\]"):
            moe_ext.quantize(w2, "int8")
    with pytest.raises(TypeError, match="^w: expected dtype"):
        moe_ext.quantize(w.astype(np.float64), "int8")
    with pytest.raises(ValueError, match="^w: expected a 3-d array"):
        moe_ext.quantize(w[0], "int8")
    with pytest.raises(ValueError, match="^w: expected shape"):
        moe_ext.quantize(np.zeros((1, 2, 0), np.float32), "int8")
    with pytest.raises(TypeError, match="^q: expected a moe_ext.QuantizedWeight"):
        moe_ext.dequantize(w)


def test_from_parts_checks_its_arrays(rng):
    q = moe_ext.quantize(rng.standard_normal((2, 6, 128)).astype(np.float32), "int4", group_size=32,
                         zero_point=True)
    with pytest.raises(ValueError, match="values"):
        moe_ext.quant.from_parts("int4", q.shape, 32, q.values[:, :5], q.scales, q.zeros)
    bad = q.zeros.copy()
    bad[0, 0, 0] = 16
    with pytest.raises(ValueError, match="^zeros: expected zero points in 0..15"):
        moe_ext.quant.from_parts("int4", q.shape, 32, q.values, q.scales, bad)
    scales = q.scales.copy()
    scales[1, 1, 1] = np.nan
    with pytest.raises(ValueError, match="^scales: expected finite"):
        moe_ext.quant.from_parts("int4", q.shape, 32, q.values, scales, q.zeros)


def test_reference_activation_quantisation():
    x = np.array([[0.0, 0.0], [1.0, -0.5], [np.nan, 1.0], [254.0, 1.0]], dtype=np.float32)
    codes, scales = reference.quantize_activations(x)
    assert scales[0] == 0 and not codes[0].any()
    assert scales[1] == np.float32(1.0) / np.float32(127) and list(codes[1]) == [127, -64]  # -63.5 -> -64 (even)
    assert np.isnan(scales[2]) and not codes[2].any()
    assert scales[3] == np.float32(2.0) and list(codes[3]) == [127, 0]  # 0.5 -> 0 (even)
