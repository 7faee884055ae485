"""moe_ext.unpermute against moe_ext.reference.unpermute in float64. docs/api.md §4."""
import numpy as np
import pytest

import moe_ext
from moe_ext import reference as ref
from conftest import (COMBINE_RTOL, assert_close, f64, random_ids, random_topk_weights, random_x,
                      unchanged)

SHAPES = [  # (T, d, E, k)
    (0, 16, 8, 2),
    (1, 16, 8, 2),
    (37, 45, 8, 2),
    (37, 45, 8, 8),
    (29, 23, 1, 1),
    (300, 64, 64, 6),
]


def check_unpermute(y_perm, rows, weights):
    with unchanged(y_perm, rows, weights):
        y = moe_ext.unpermute(y_perm, rows, weights)
    assert y.dtype == np.float32 and y.shape == (rows.shape[0], y_perm.shape[1])
    assert_close(y, ref.unpermute(f64(y_perm), rows, f64(weights)), COMBINE_RTOL, "unpermute")
    return y


@pytest.mark.parametrize("capacity", [None, 0, 1, 3], ids=["nocap", "cap0", "cap1", "cap3"])
@pytest.mark.parametrize("T,d,E,k", SHAPES, ids=[f"T{t}d{d}E{e}k{k}" for t, d, e, k in SHAPES])
def test_unpermute_matches_reference(rng, T, d, E, k, capacity):
    """perm_rows from a real permute (with -1 for dropped copies)."""
    ids = random_ids(rng, T, E, k)
    _, offsets, rows = ref.permute(random_x(rng, T, 1), ids, E, capacity=capacity)
    y_perm = random_x(rng, int(offsets[-1]), d)
    check_unpermute(y_perm, rows, random_topk_weights(rng, T, k))


def test_unpermute_arbitrary_rows(rng):
    """perm_rows need not come from permute: repeated rows, any order, signed weights."""
    T, d, k, M = 25, 13, 4, 7
    rows = rng.integers(-1, M, size=(T, k)).astype(np.int32)
    weights = rng.standard_normal((T, k)).astype(np.float32)
    check_unpermute(random_x(rng, M, d), rows, weights)


def test_unpermute_dropped_rows_contribute_nothing(rng):
    """-1 slots add nothing, even with NaN or Inf weights; all-dropped tokens give exact zeros."""
    T, d, k, M = 12, 9, 3, 40
    rows = rng.permutation(M)[:T * k].reshape(T, k).astype(np.int32)
    rows[0] = -1
    rows[1, 1] = -1
    rows[2, [0, 2]] = -1
    weights = random_topk_weights(rng, T, k)
    weights[0] = [np.nan, np.inf, -np.inf]
    weights[1, 1] = np.nan
    weights[2, [0, 2]] = np.inf
    y_perm = random_x(rng, M, d)
    y = check_unpermute(y_perm, rows, weights)
    np.testing.assert_array_equal(y[0], np.zeros(d, np.float32))
    assert np.isfinite(y).all()
    # the same as leaving those slots' weights at 0
    w0 = weights.copy()
    w0[rows < 0] = 0
    assert moe_ext.unpermute(y_perm, rows, w0).tobytes() == y.tobytes()


def test_unpermute_slot_order_sum(rng):
    """The sum runs over j = 0..k-1 in order: ((0 + big) + small) + (-big) loses `small` in float32.
    Power-of-two weights keep the products exact, so the expected value is exact on every tier."""
    T, d = 16, 8
    big = (rng.random((T, d)) + 1.0) * 2.0 ** 30
    small = rng.random((T, d)) + 0.25
    y_perm = np.concatenate([big, small, -big]).astype(np.float32)
    rows = np.stack([np.arange(T), T + np.arange(T), 2 * T + np.arange(T)], axis=1).astype(np.int32)
    weights = (2.0 ** rng.integers(-2, 3, size=(T, 1)) * np.ones((1, 3))).astype(np.float32)
    y = moe_ext.unpermute(y_perm, rows, weights)
    acc = np.zeros((T, d), np.float32)
    for j in range(3):
        acc = acc + weights[:, j:j + 1] * y_perm[rows[:, j]]
    assert y.tobytes() == acc.tobytes()
    assert (y != weights[:, :1] * small.astype(np.float32)).any()  # the order really mattered
    # another slot order gives another (exact) result
    perm = [0, 2, 1]
    y2 = moe_ext.unpermute(y_perm, np.ascontiguousarray(rows[:, perm]), np.ascontiguousarray(weights[:, perm]))
    np.testing.assert_array_equal(y2, weights[:, :1] * small.astype(np.float32))


def test_unpermute_int64_rows(rng):
    T, d, k, M = 15, 11, 3, 30
    rows = rng.integers(-1, M, size=(T, k)).astype(np.int32)
    y_perm, weights = random_x(rng, M, d), random_topk_weights(rng, T, k)
    a = moe_ext.unpermute(y_perm, rows.astype(np.int64), weights)
    b = moe_ext.unpermute(y_perm, rows, weights)
    assert a.tobytes() == b.tobytes()


def test_unpermute_empty_y_perm(rng):
    """M = 0: every slot must be -1; the result is zeros."""
    T, d, k = 6, 5, 2
    y = moe_ext.unpermute(np.empty((0, d), np.float32), np.full((T, k), -1, np.int32),
                          random_topk_weights(rng, T, k))
    np.testing.assert_array_equal(y, np.zeros((T, d), np.float32))


def test_unpermute_nan_rows_only_reach_their_tokens(rng):
    T, d, k, M = 20, 7, 2, 40
    rows = rng.permutation(M).reshape(T, k).astype(np.int32)
    y_perm, weights = random_x(rng, M, d), random_topk_weights(rng, T, k)
    clean = moe_ext.unpermute(y_perm, rows, weights)
    y_perm[rows[3, 1], 2] = np.nan
    y = moe_ext.unpermute(y_perm, rows, weights)
    assert np.isnan(y[3, 2]) and np.isnan(y).sum() == 1
    others = np.setdiff1d(np.arange(T), [3])
    assert y[others].tobytes() == clean[others].tobytes()


def test_permute_then_unpermute_roundtrip(rng):
    """unpermute(permute(x).x_perm) with weights 1/k each gives back x (up to rounding)."""
    T, d, E, k = 33, 21, 6, 3
    x, ids = random_x(rng, T, d), random_ids(rng, T, E, k)
    x_perm, _, rows = moe_ext.permute(x, ids, E)
    y = moe_ext.unpermute(x_perm, rows, np.full((T, k), 1.0 / k, np.float32))
    assert_close(y, f64(x), COMBINE_RTOL, "roundtrip")
