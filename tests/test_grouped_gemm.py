"""moe_ext.grouped_gemm against moe_ext.reference.grouped_gemm in float64. docs/api.md §3."""
import numpy as np
import pytest

import moe_ext
from moe_ext import reference as ref
from conftest import GEMM_RTOL, assert_close, f64, random_offsets, random_weights, random_x, unchanged


def check_gemm(a, w, offsets):
    with unchanged(a, w, offsets):
        out = moe_ext.grouped_gemm(a, w, offsets)
    assert out.dtype == np.float32 and out.shape == (a.shape[0], w.shape[1])
    want = ref.grouped_gemm(f64(a), f64(w), offsets)
    assert_close(out, want, GEMM_RTOL, "grouped_gemm")
    return out


CASES = {  # name: (per-expert row counts, N, K)
    "balanced": ([9, 9, 9, 9], 23, 45),
    "empty-start": ([0, 0, 7, 12], 33, 16),
    "empty-middle": ([5, 0, 0, 11, 3], 17, 40),
    "empty-end": ([13, 4, 0, 0], 70, 23),
    "empty-all-but-one": ([0, 0, 21, 0, 0], 65, 33),
    "E1": ([37], 45, 23),
    "E1-one-row": ([1], 5, 3),
    "M0": ([0, 0, 0], 16, 16),
    "M0-E1": ([0], 8, 5),
    "single-rows": ([1, 1, 1, 1, 1, 1, 1], 129, 17),  # row blocks straddle many experts
    "skewed": ([250, 1, 2, 3], 64, 64),
    "odd": ([3, 5, 7, 11, 13], 31, 47),
    "K1": ([4, 6], 9, 1),
    "N1": ([4, 6], 1, 9),
    "wide-K": ([6, 5], 8, 1000),  # K far from multiples of 16: tail handling
    "E64": ([(7 * e) % 5 for e in range(64)], 23, 45),  # 64 small experts, every fifth one empty
    # either side of the few-rows paths (streamed plain weights up to 16 rows, packed panel by panel)
    "many-rows-odd": ([9, 0, 13, 16, 17, 25, 7], 37, 45),
    "deep-K": ([9, 13, 0, 20], 37, 600),  # K over several depth blocks (partial last one)
    "wide-N": ([15, 10], 300, 45),  # N over several column blocks (partial last one)
    "deep-wide": ([12, 3], 270, 260),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_grouped_gemm_matches_reference(rng, case):
    counts, N, K = case
    E = len(counts)
    offsets = random_offsets(rng, E, counts)
    a = random_x(rng, int(offsets[-1]), K)
    w = random_weights(rng, (E, N, K), K)
    out = check_gemm(a, w, offsets)
    # each expert's rows use that expert's weight: the same as a one-expert call on them
    for e in range(E):
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        if hi > lo:
            alone = moe_ext.grouped_gemm(np.ascontiguousarray(a[lo:hi]), np.ascontiguousarray(w[e:e + 1]),
                                         np.array([0, hi - lo], np.int32))
            assert_close(alone, out[lo:hi], GEMM_RTOL, f"expert {e} alone")


@pytest.mark.parametrize("trial", range(3))
def test_grouped_gemm_random_offsets(rng, trial):
    E, N, K = int(rng.integers(1, 12)), int(rng.integers(1, 80)), int(rng.integers(1, 80))
    offsets = random_offsets(rng, E, max_rows=20)
    check_gemm(random_x(rng, int(offsets[-1]), K), random_weights(rng, (E, N, K), K), offsets)


def test_grouped_gemm_zero_k(rng):
    """K = 0: every output is an empty sum, 0 (experts with few rows and with many)."""
    offsets = random_offsets(rng, 3, [2, 0, 12])
    out = moe_ext.grouped_gemm(np.empty((14, 0), np.float32), np.empty((3, 40, 0), np.float32), offsets)
    np.testing.assert_array_equal(out, np.zeros((14, 40), np.float32))


def test_grouped_gemm_zero_n(rng):
    offsets = random_offsets(rng, 2, [3, 4])
    out = moe_ext.grouped_gemm(random_x(rng, 7, 5), np.empty((2, 0, 5), np.float32), offsets)
    assert out.shape == (7, 0) and out.dtype == np.float32


def test_grouped_gemm_int64_offsets(rng):
    E, N, K = 4, 19, 21
    offsets = random_offsets(rng, E, [3, 0, 8, 2])
    a, w = random_x(rng, 13, K), random_weights(rng, (E, N, K), K)
    got64 = moe_ext.grouped_gemm(a, w, offsets.astype(np.int64))
    got32 = moe_ext.grouped_gemm(a, w, offsets)
    assert got64.tobytes() == got32.tobytes()


def test_grouped_gemm_rows_independent(rng):
    """Each output row depends on its own input row only (bit for bit): rows can be NaN in isolation."""
    E, N, K = 3, 30, 50
    offsets = random_offsets(rng, E, [10, 9, 11])
    a, w = random_x(rng, 30, K), random_weights(rng, (E, N, K), K)
    clean = moe_ext.grouped_gemm(a, w, offsets)
    a[4, 7] = np.nan
    a[20, 0] = np.inf
    out = moe_ext.grouped_gemm(a, w, offsets)
    assert np.isnan(out[4]).all()
    assert not np.isfinite(out[20]).any()
    others = np.setdiff1d(np.arange(30), [4, 20])
    assert out[others].tobytes() == clean[others].tobytes()


def test_grouped_gemm_nan_weight_only_affects_its_expert(rng):
    E, N, K = 3, 12, 20
    offsets = random_offsets(rng, E, [4, 5, 6])
    a, w = random_x(rng, 15, K), random_weights(rng, (E, N, K), K)
    w[1, 3, 2] = np.nan
    out = moe_ext.grouped_gemm(a, w, offsets)
    nan = np.isnan(out)
    assert nan[4:9, 3].all()
    nan[4:9, 3] = False
    assert not nan.any()


def test_grouped_gemm_deterministic(rng):
    E, N, K = 5, 70, 90
    offsets = random_offsets(rng, E, [17, 3, 0, 40, 9])
    a, w = random_x(rng, 69, K), random_weights(rng, (E, N, K), K)
    first = moe_ext.grouped_gemm(a, w, offsets)
    for _ in range(3):
        assert moe_ext.grouped_gemm(a, w, offsets).tobytes() == first.tobytes()
