"""moe_ext.permute against moe_ext.reference.permute: pure data movement, so bit-exact. docs/api.md §2."""
import numpy as np
import pytest

import moe_ext
from moe_ext import reference as ref
from conftest import random_ids, random_x, unchanged

SHAPES = [  # (T, d, E, k)
    (0, 16, 8, 2),
    (1, 16, 8, 2),
    (37, 45, 8, 2),
    (37, 45, 8, 8),
    (29, 23, 1, 1),
    (300, 64, 64, 6),
    (64, 1, 5, 3),
]


def check_permute(x, ids, E, capacity=None):
    """Bit-exact against the reference, plus the documented invariants. Returns the result."""
    with unchanged(x, ids):
        res = moe_ext.permute(x, ids, E, capacity=capacity)
    assert isinstance(res, moe_ext.PermuteResult) and len(res) == 3
    x_perm, offsets, rows = res  # unpacks as a 3-tuple
    want = ref.permute(x, ids.astype(np.int64), E, capacity=capacity)
    T, k = ids.shape
    M = int(want.expert_offsets[-1])
    assert x_perm.dtype == np.float32 and offsets.dtype == np.int32 and rows.dtype == np.int32
    assert x_perm.shape == (M, x.shape[1]) and offsets.shape == (E + 1,) and rows.shape == (T, k)
    np.testing.assert_array_equal(offsets, want.expert_offsets)
    np.testing.assert_array_equal(rows, want.perm_rows)
    assert x_perm.tobytes() == want.x_perm.astype(np.float32).tobytes()
    assert res.num_dropped == want.num_dropped == T * k - M
    # invariants: x_perm[perm_rows[t, j]] == x[t]; offsets a non-decreasing cover of 0..M
    kept = rows >= 0
    tok = np.broadcast_to(np.arange(T)[:, None], (T, k))
    np.testing.assert_array_equal(x_perm[rows[kept]], x[tok[kept]])
    assert offsets[0] == 0 and offsets[-1] == M and (np.diff(offsets) >= 0).all()
    assert sorted(rows[kept].tolist()) == list(range(M))  # every row filled exactly once
    # expert e owns rows offsets[e]:offsets[e+1]
    owner = np.repeat(np.arange(E), np.diff(offsets))
    np.testing.assert_array_equal(owner[rows[kept]], ids[kept])
    return res


@pytest.mark.parametrize("T,d,E,k", SHAPES, ids=[f"T{t}d{d}E{e}k{k}" for t, d, e, k in SHAPES])
def test_permute_matches_reference(rng, T, d, E, k):
    check_permute(random_x(rng, T, d), random_ids(rng, T, E, k), E)


def test_permute_stable_order(rng):
    """Rows are ordered by expert, then token, then slot."""
    T, d, E, k = 50, 7, 6, 3
    x, ids = random_x(rng, T, d), random_ids(rng, T, E, k)
    _, offsets, rows = check_permute(x, ids, E)
    order = sorted((int(ids[t, j]), t, j) for t in range(T) for j in range(k))
    for row, (e, t, j) in enumerate(order):
        assert rows[t, j] == row
    np.testing.assert_array_equal(np.diff(offsets), np.bincount(ids.ravel(), minlength=E))


def test_permute_duplicate_ids_in_a_row(rng):
    """Two slots of a token on the same expert: two copies, slot order within the token."""
    T, d, E = 20, 9, 4
    x = random_x(rng, T, d)
    ids = rng.integers(0, E, size=(T, 3)).astype(np.int32)
    ids[0] = [2, 2, 2]
    ids[1] = [1, 3, 1]
    _, offsets, rows = check_permute(x, ids, E)
    assert rows[0, 0] < rows[0, 1] < rows[0, 2]
    assert rows[1, 0] < rows[1, 2]


def test_permute_unused_experts(rng):
    """Experts nobody picks own no rows (also the first and the last)."""
    T, d, E, k = 30, 8, 10, 2
    ids = (random_ids(rng, T, 4, k) * 2 + 2).astype(np.int32)  # only experts 2, 4, 6, 8
    _, offsets, _ = check_permute(random_x(rng, T, d), ids, E)
    counts = np.diff(offsets)
    assert (counts[[0, 1, 3, 5, 7, 9]] == 0).all() and counts.sum() == T * k


@pytest.mark.parametrize("capacity", [0, 1, 2, 5, 10 ** 6])
@pytest.mark.parametrize("T,d,E,k", [(37, 45, 8, 2), (300, 16, 64, 6), (40, 8, 3, 3), (0, 8, 4, 2)])
def test_permute_capacity(rng, T, d, E, k, capacity):
    x, ids = random_x(rng, T, d), random_ids(rng, T, E, k)
    res = check_permute(x, ids, E, capacity=capacity)
    counts = np.bincount(ids.ravel(), minlength=E)
    kept = np.minimum(counts, capacity)
    np.testing.assert_array_equal(np.diff(res.expert_offsets), kept)
    assert res.num_dropped == int((counts - kept).sum())
    # an expert keeps its first copies in (token, slot) order
    for e in range(E):
        t_idx, j_idx = np.nonzero(ids == e)  # row-major: token then slot order
        keep = res.perm_rows[t_idx, j_idx] >= 0
        assert keep[:capacity].all() and not keep[capacity:].any()
    if capacity == 0:
        assert res.x_perm.shape == (0, d) and (res.perm_rows == -1).all()
        assert res.num_dropped == T * k
    if capacity >= T * k:  # no limit reached: same as no capacity
        plain = moe_ext.permute(x, ids, E)
        for a, b in zip(res, plain):
            assert a.tobytes() == b.tobytes()


def test_permute_capacity_with_duplicates(rng):
    T, d, E = 12, 5, 3
    x = random_x(rng, T, d)
    ids = rng.integers(0, E, size=(T, 4)).astype(np.int32)
    ids[0] = [1, 1, 1, 1]
    res = check_permute(x, ids, E, capacity=2)
    np.testing.assert_array_equal(res.perm_rows[0] >= 0, [True, True, False, False])


@pytest.mark.parametrize("capacity", [None, 3])
def test_permute_int64_ids_same_as_int32(rng, capacity):
    T, d, E, k = 41, 19, 7, 3
    x, ids = random_x(rng, T, d), random_ids(rng, T, E, k)
    ids64 = ids.astype(np.int64)
    with unchanged(ids64):
        a = moe_ext.permute(x, ids64, E, capacity=capacity)
    b = moe_ext.permute(x, ids, E, capacity=capacity)
    for u, v in zip(a, b):
        assert u.dtype == v.dtype and u.tobytes() == v.tobytes()
    assert a.num_dropped == b.num_dropped


def test_permute_num_experts_numpy_integer(rng):
    x, ids = random_x(rng, 10, 4), random_ids(rng, 10, 5, 2)
    a = moe_ext.permute(x, ids, np.int64(5), capacity=np.int32(2))
    b = moe_ext.permute(x, ids, 5, capacity=2)
    for u, v in zip(a, b):
        assert u.tobytes() == v.tobytes()


def test_permute_empty_k(rng):
    """k = 0: no copies at all."""
    x = random_x(rng, 6, 4)
    res = check_permute(x, np.zeros((6, 0), np.int32), 3)
    assert res.x_perm.shape == (0, 4) and res.num_dropped == 0


def test_permute_zero_width(rng):
    """d = 0: rows of nothing, offsets and perm_rows as usual."""
    T, E, k = 9, 4, 2
    check_permute(np.empty((T, 0), np.float32), random_ids(rng, T, E, k), E)


def test_permute_copies_nan_and_inf_bits(rng):
    """Pure data movement: NaN payloads, -0.0 and infinities come through bit for bit."""
    T, d, E, k = 10, 6, 4, 2
    x = random_x(rng, T, d)
    x[0, 0] = np.nan
    x[1, 1] = -0.0
    x[2, 2] = np.inf
    x[3] = np.frombuffer(np.array([0x7FC00123, 0xFFC00001, 0x00000001, 0x80000001, 0x7F7FFFFF, 0xFF800000],
                                  np.uint32).tobytes(), np.float32)
    check_permute(x, random_ids(rng, T, E, k), E)


def test_permute_large_expert_count_few_tokens(rng):
    """More experts than copies: most experts empty."""
    T, d, E, k = 3, 16, 300, 4
    check_permute(random_x(rng, T, d), random_ids(rng, T, E, k), E)
