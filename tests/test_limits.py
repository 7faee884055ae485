"""Size limits: index arithmetic past 2**31 elements is 64-bit (T*k > 2**31 - 1 copies are rejected:
test_errors.py).

The big arrays are np.zeros, which the OS maps lazily: only the pages a kernel touches are committed,
so these tests address > 8 GiB without using it.
"""
import numpy as np
import pytest

import moe_ext

PER_TIER = False  # the address arithmetic is shared by the tiers; the kernels' loops are tested elsewhere


def lazy_zeros(shape):
    try:
        return np.zeros(shape, np.float32)
    except MemoryError:  # e.g. under a sanitizer's allocator, or with overcommit disabled
        pytest.skip(f"cannot reserve {np.prod(shape) * 4 / 2**30:.1f} GiB of address space")


def test_unpermute_reads_rows_past_2_to_31_elements():
    M, d = 2**21 + 3, 1024  # M * d > 2**31
    y_perm = lazy_zeros((M, d))
    rng = np.random.default_rng(0)
    y_perm[M - 1] = rng.standard_normal(d)
    y_perm[M - 2] = rng.standard_normal(d)
    rows = np.array([[M - 1, -1], [M - 2, M - 1]], np.int32)
    weights = np.array([[2.0, 5.0], [0.5, -1.0]], np.float32)
    y = moe_ext.unpermute(y_perm, rows, weights)
    np.testing.assert_array_equal(y[0], 2 * y_perm[M - 1])
    np.testing.assert_allclose(y[1], 0.5 * y_perm[M - 2] - y_perm[M - 1], rtol=1e-6)


def test_grouped_gemm_reads_an_expert_past_2_to_31_elements():
    E, N, K = 65, 2**12, 2**13  # E * N * K > 2**31
    w = lazy_zeros((E, N, K))
    rng = np.random.default_rng(1)
    w[E - 1, N - 1] = rng.standard_normal(K)
    a = rng.standard_normal((2, K)).astype(np.float32)
    offsets = np.zeros(E + 1, np.int32)
    offsets[E] = 2
    out = moe_ext.grouped_gemm(a, w, offsets)
    want = a.astype(np.float64) @ w[E - 1, N - 1].astype(np.float64)
    np.testing.assert_allclose(out[:, N - 1], want, rtol=1e-5)
    assert not out[:, : N - 1].any()

