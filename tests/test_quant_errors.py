"""Bad input to the quantised weights (issue 18 part 6): every case raises ValueError / TypeError naming
the argument, before any kernel runs; nothing crashes and nothing computes a wrong answer. (The format's
own argument errors are in test_quant_format.py, wrong shapes in a weight slot in test_quant_gemm.py.)"""
import ml_dtypes
import numpy as np
import pytest

import moe_ext
from moe_ext import gguf
from conftest import unchanged

PER_TIER = False


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(scheme=8), TypeError, "^scheme: expected a str"),
    (dict(scheme="INT8"), ValueError, "^scheme: expected one of 'int8', 'int4'; got 'INT8'"),
    (dict(scheme="q4_0"), ValueError, "^scheme: expected one of"),
    (dict(scheme="int4", group_size=32.0), TypeError, "^group_size: expected an integer"),
    (dict(scheme="int4", group_size=True), TypeError, "^group_size: expected an integer"),
    (dict(scheme="int4", group_size=0), ValueError, "^group_size: expected an integer in"),
    (dict(scheme="int8", group_size=-32), ValueError, "^group_size: expected an integer in"),
    (dict(scheme="int4", group_size=32, zero_point=1), TypeError, "^zero_point: expected a bool"),
    (dict(scheme="int8", activations=True), ValueError, "^activations: expected None"),
    (dict(scheme="int8", activations="fp8"), ValueError, "^activations: expected None"),
])
def test_argument_types(rng, kwargs, error, match):
    w = rng.standard_normal((2, 4, 64)).astype(np.float32)
    with pytest.raises(error, match=match):
        moe_ext.quantize(w, **kwargs)


@pytest.mark.parametrize("scheme, group, K", [("int4", 32, 48), ("int4", 64, 96), ("int4", 128, 192),
                                               ("int8", 32, 48), ("int8", 64, 96)])
def test_group_size_not_dividing_k(rng, scheme, group, K):
    with pytest.raises(ValueError, match=f"^group_size: expected a group size that divides K = {K}; got {group}"):
        moe_ext.quantize(rng.standard_normal((1, 3, K)).astype(np.float32), scheme, group_size=group)


@pytest.mark.parametrize("K", [31, 33, 65])
def test_odd_k_for_int4(rng, K):
    with pytest.raises(ValueError, match=f"^w: expected an even K for scheme 'int4'"):
        moe_ext.quantize(rng.standard_normal((1, 3, K)).astype(np.float32), "int4", group_size=32)
    with pytest.raises(ValueError, match="^w: expected an even K"):
        moe_ext.quant.from_parts("int4", (1, 3, K), 32, np.zeros((1, 3, 16), np.uint8), np.zeros((1, 3, 1), np.float32))


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("scheme, group", [("int8", None), ("int8", 32), ("int4", 32), ("int4", 128)])
def test_non_finite_weights(rng, dtype, bad, scheme, group):
    w = rng.standard_normal((3, 5, 128)).astype(dtype)
    w[2, 4, 127] = bad  # the very last value: the scan reaches every group of every row
    with unchanged(w), pytest.raises(ValueError, match=r"^w: expected finite values .*w\[2, 4\]"):
        moe_ext.quantize(w, scheme, group_size=group)


def test_float16_overflowing_values_are_finite(rng):
    """float16's largest values quantise (scales in float32): no overflow to Inf in the scale."""
    w = np.full((1, 2, 64), 65504, np.float16)
    w[0, 1] = -65504
    q = moe_ext.quantize(w, "int8")
    np.testing.assert_allclose(moe_ext.dequantize(q), w.astype(np.float32), rtol=1e-6)


def test_weights_of_another_layer(rng):
    """QuantizedWeights whose shape is not what the op needs: the argument named, with the shape wanted."""
    E, d, f, T, k = 4, 64, 32, 3, 2
    x = rng.standard_normal((T, d)).astype(np.float32)
    w13 = moe_ext.quantize(rng.standard_normal((E, 2 * f, d)).astype(np.float32), "int4", group_size=32)
    w2 = moe_ext.quantize(rng.standard_normal((E, d, f)).astype(np.float32), "int4", group_size=32)
    w2_more = moe_ext.quantize(rng.standard_normal((E + 1, d, f)).astype(np.float32), "int4", group_size=32)
    ids = np.array([[0, 1], [2, 3], [1, 2]], np.int32)
    weights = np.full((T, k), 0.5, np.float32)
    router = rng.standard_normal((E, d)).astype(np.float32)
    with pytest.raises(ValueError, match=r"^w13_or_w1: expected shape \(5, 64, 64\)"):
        moe_ext.experts(x, w13, w2_more, weights, ids)  # E differs between the two
    with pytest.raises(ValueError, match=r"^w13_or_w1: expected shape \(4, 32, 64\) \(E, f, d\) for activation 'relu'"):
        moe_ext.experts(x, w13, w2, weights, ids, activation="relu")  # w13 where w1 is needed
    with pytest.raises(ValueError, match=r"^w2: expected shape \(\*, 32, \*\)"):
        moe_ext.experts(x[:, :32].copy(), w13, w2, weights, ids)  # K (d) mismatch
    w13_more = moe_ext.quantize(rng.standard_normal((E + 1, 2 * f, d)).astype(np.float32), "int4", group_size=32)
    with pytest.raises(ValueError, match=r"^w2: expected shape \(4, \*, \*\) \(E, d, f\) with E = w_router"):
        moe_ext.moe(x, router, w13_more, w2_more, 2)  # experts of another layer than the router's
    with pytest.raises(ValueError, match=r"^w: expected shape \(\*, \*, 32\)"):
        moe_ext.grouped_gemm(rng.standard_normal((3, 32)).astype(np.float32), w13, np.array([0, 1, 2, 3, 3], np.int32))
    with pytest.raises(TypeError, match="^w2: expected a numpy.ndarray"):
        moe_ext.experts(x, w13, [[1.0]], weights, ids)


def test_from_parts_and_borrow_check_their_arrays(rng):
    q = moe_ext.quantize(rng.standard_normal((2, 10, 128)).astype(np.float32), "int4", group_size=64)
    with pytest.raises(ValueError, match="^scales"):
        moe_ext.quant.from_parts("int4", q.shape, 32, q.values, q.scales)  # group 32: 4 scales a row, not 2
    with pytest.raises(ValueError, match="^group_size"):
        moe_ext.quant.from_parts("int4", q.shape, 48, q.values, q.scales)
    with pytest.raises(ValueError, match="^scheme"):
        moe_ext.quant.from_parts("int2", q.shape, 64, q.values, q.scales)
    values, scales, _ = q.kernel_parts()  # borrow reads the kernel layout (10 rows: one panel of 8, 2 after)
    with pytest.raises(ValueError, match="^values"):
        moe_ext._core.quantized_borrow("int4", 2, 10, 128, 64, values[:1], scales, None, False)
    with pytest.raises(TypeError, match="^scales"):
        moe_ext._core.quantized_borrow("int4", 2, 10, 128, 64, values, scales.astype(np.float64), None, False)
    b = moe_ext._core.quantized_borrow("int4", 2, 10, 128, 64, values, scales, None, True)
    assert b.activations == "int8"
    np.testing.assert_array_equal(moe_ext.dequantize(b), moe_ext.dequantize(q))
    del q, values, scales  # the borrowed weight keeps the arrays (and so q's memory) alive
    assert np.isfinite(moe_ext.dequantize(b)).all()


def test_gguf_bad_input(rng):
    blocks = np.zeros((2, 4, 2, 34), np.uint8)
    with pytest.raises(ValueError, match="^ggml_type: expected 8 .Q8_0. or 2 .Q4_0."):
        gguf.from_gguf(data=blocks, ggml_type=12, shape=(2, 4, 64))
    with pytest.raises(ValueError, match="^data: expected 544 bytes of Q8_0 blocks"):
        gguf.from_gguf(data=blocks[:, :3], ggml_type=8, shape=(2, 4, 64))
    with pytest.raises(ValueError, match="^shape: expected .* K a multiple of 32"):
        gguf.from_gguf(data=blocks, ggml_type=8, shape=(2, 4, 48))
    with pytest.raises(TypeError, match="^tensor: expected a GGUFReader tensor"):
        gguf.from_gguf(data=blocks)
    bad = blocks.copy()
    bad[1, 2, 1, :2] = np.array([np.inf], np.float16).view(np.uint8)
    with pytest.raises(ValueError, match="^scales: expected finite values"):
        gguf.from_gguf(data=bad, ggml_type=8, shape=(2, 4, 64))
