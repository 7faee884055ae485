"""moe_ext.prepack: a PackedWeight is accepted wherever its weight is and gives the same results."""
import ml_dtypes
import numpy as np
import pytest

import moe_ext
from moe_ext import reference
from conftest import GEMM_RTOL, assert_close, random_expert_weights, random_offsets, random_routing, unchanged


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16])
def test_attributes(rng, dtype):
    w = rng.standard_normal((3, 70, 45)).astype(dtype)
    with unchanged(w):
        packed = moe_ext.prepack(w)
    assert isinstance(packed, moe_ext.PackedWeight)
    assert packed.shape == (3, 70, 45) and packed.ndim == 3 and packed.dtype == np.dtype(dtype)
    assert packed.nbytes >= w.nbytes
    assert "PackedWeight(shape=(3, 70, 45)" in repr(packed)


def test_packed_equals_plain_bitwise_for_many_rows(rng):
    """With more rows than the streaming path takes, plain weights are packed per tile into the same
    layout, so the summation order, and the result, is the same bit for bit."""
    M, N, K, E = 200, 90, 300, 3
    a = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((E, N, K)).astype(np.float32)
    offsets = random_offsets(rng, E, counts=[60, 70, 70])
    np.testing.assert_array_equal(moe_ext.grouped_gemm(a, moe_ext.prepack(w), offsets),
                                  moe_ext.grouped_gemm(a, w, offsets))


def test_packed_is_a_copy(rng):
    x, w13, w2, weights, ids = random_routing(rng, 20, 24, 4, 2, f=16)
    p13, p2 = moe_ext.prepack(w13), moe_ext.prepack(w2)
    want = reference.experts(x.astype(np.float64), w13.astype(np.float64), w2.astype(np.float64),
                             weights.astype(np.float64), ids)
    w13[:] = 0  # packing copied the values
    assert_close(moe_ext.experts(x, p13, p2, weights, ids), want, GEMM_RTOL, "experts")


def test_survives_a_tier_change(rng):
    """The packed layout does not depend on the ISA tier."""
    x, w13, w2, weights, ids = random_routing(rng, 30, 20, 3, 2, f=12)
    packed = [moe_ext.prepack(w) for w in (w13, w2)]
    tier = moe_ext.get_isa()
    results = []
    try:
        for isa in moe_ext.available_isas():
            moe_ext.set_isa(isa)
            results.append(moe_ext.experts(x, *packed, weights, ids))
    finally:
        moe_ext.set_isa(tier)
    want = reference.experts(x.astype(np.float64), w13.astype(np.float64), w2.astype(np.float64),
                             weights.astype(np.float64), ids)
    for y in results:
        assert_close(y, want, GEMM_RTOL, "experts")


def test_thread_count_does_not_change_bits(rng):
    x, w13, w2, weights, ids = random_routing(rng, 300, 64, 2, 2, f=80)  # one expert: many row blocks
    packed = [moe_ext.prepack(w) for w in (w13, w2)]
    threads = moe_ext.get_num_threads()
    try:
        moe_ext.set_num_threads(1)
        one = moe_ext.experts(x, *packed, weights, ids)
        moe_ext.set_num_threads(3)
        three = moe_ext.experts(x, *packed, weights, ids)
    finally:
        moe_ext.set_num_threads(threads)
    np.testing.assert_array_equal(one, three)


def test_errors(rng):
    w1, w2 = random_expert_weights(rng, 3, 8, 4)
    with pytest.raises(TypeError, match="w: expected dtype"):
        moe_ext.prepack(w1.astype(np.float64))
    with pytest.raises(ValueError, match="w: expected a 3-d array"):
        moe_ext.prepack(w1[0])
    with pytest.raises(TypeError, match="w: expected a numpy.ndarray"):
        moe_ext.prepack(w1.tolist())
    x = rng.standard_normal((5, 8)).astype(np.float32)
    ids = np.zeros((5, 2), np.int32)
    ids[:, 1] = 1
    weights = np.full((5, 2), 0.5, np.float32)
    with pytest.raises(ValueError, match="w13_or_w1"):  # gated needs [E, 2f, d]; this is [E, d, f]
        moe_ext.experts(x, moe_ext.prepack(w2), moe_ext.prepack(w2), weights, ids)
    with pytest.raises(ValueError, match="w2"):  # [E, f, d] instead of [E, d, f]
        moe_ext.experts(x, moe_ext.prepack(w1), moe_ext.prepack(np.ascontiguousarray(w2.transpose(0, 2, 1))),
                        weights, ids)
    with pytest.raises(ValueError, match="w: expected shape"):  # K = 5 is not the packed K = 8
        moe_ext.grouped_gemm(np.ascontiguousarray(x[:, :5]), moe_ext.prepack(w1), np.array([0, 5, 5, 5], np.int32))
