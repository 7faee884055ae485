"""Every op in float32, bfloat16 (ml_dtypes) and float16, against the float64 reference computed from the
same rounded inputs, on every tier; bfloat16 both with vdpbf16ps (where the CPU has AVX512_BF16) and
with the widen-to-float32 path.

Tolerances (relative Frobenius norm), from the dtypes' unit roundoff u: bfloat16 u = 2^-9, float16
u = 2^-12. Inputs are exact in float32 and products accumulate in float32 (error ~ sqrt(K) 2^-24, far
below these), so the error is dominated by rounding outputs to the caller's dtype: at most u per element
(about u / sqrt(3) in norm for uniform rounding errors). The experts path may round once more inside:
with vdpbf16ps the activation fed to the second GEMM is rounded to bfloat16 (as a bfloat16 PyTorch layer
does). So one rounding: 2u; two chained: 4u.
"""
import ml_dtypes
import numpy as np
import pytest

import moe_ext
from moe_ext import reference
from conftest import (ACTIVATIONS, GATED, GEMM_RTOL, ROUTE_RTOL, assert_close, random_expert_weights,
                      random_ids, random_offsets, random_router, random_topk_weights, random_x,
                      selection_margins, SELECTION_MARGIN)

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = (np.dtype(np.float32), BF16, np.dtype(np.float16))
ONE_ROUNDING = {np.dtype(np.float32): GEMM_RTOL, BF16: 2 * 2.0 ** -9, np.dtype(np.float16): 2 * 2.0 ** -12}
TWO_ROUNDINGS = {np.dtype(np.float32): GEMM_RTOL, BF16: 4 * 2.0 ** -9, np.dtype(np.float16): 4 * 2.0 ** -12}
IDS = [d.name for d in DTYPES]


def as_(dtype, *arrays):
    return tuple(a.astype(dtype) for a in arrays)


def f64(*arrays):
    return tuple(np.asarray(a, dtype=np.float64) for a in arrays)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_route(rng, dtype):
    T, d, E, k = 37, 70, 9, 3
    x, w_router = as_(dtype, random_x(rng, T, d), random_router(rng, E, d))
    weights, ids, probs = moe_ext.route(x, w_router, k, return_probs=True)
    assert weights.dtype == np.float32 and probs.dtype == np.float32 and ids.dtype == np.int32
    want_weights, want_ids, want_probs = reference.route(*f64(x, w_router), k, return_probs=True)
    assert_close(probs, want_probs, ROUTE_RTOL, "probs")  # widening is exact: float32 accuracy
    clear = selection_margins(want_probs, k) > SELECTION_MARGIN
    np.testing.assert_array_equal(ids[clear], want_ids[clear])
    assert_close(weights[clear], want_weights[clear], ROUTE_RTOL, "weights")


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_permute_copies_bits(rng, dtype):
    T, d, E, k = 29, 33, 5, 2
    x = random_x(rng, T, d).astype(dtype)
    got = moe_ext.permute(x, random_ids(rng, T, E, k), E)
    assert got.x_perm.dtype == dtype
    rows = got.perm_rows
    for t in range(T):
        for j in range(k):
            assert got.x_perm[rows[t, j]].tobytes() == x[t].tobytes()


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
# few rows (streaming), many rows in one expert (row blocks), odd K past a float32 depth block (256) and
# past two of the 2-byte dtypes' (512), N past a tile
@pytest.mark.parametrize("M,N,K,E,counts", [(7, 33, 45, 3, None), (300, 70, 301, 2, [290, 10]),
                                            (60, 161, 17, 4, None), (1, 5, 3, 1, [1]),
                                            (40, 37, 1101, 2, [30, 10])])
def test_grouped_gemm(rng, dtype, packed, bf16_dot, M, N, K, E, counts):
    if dtype != BF16 and not bf16_dot:
        pytest.skip("the bf16_dot switch only matters for bfloat16")
    offsets = random_offsets(rng, E, counts=counts or _split(rng, M, E))
    a = random_x(rng, M, K).astype(dtype)
    w = (rng.standard_normal((E, N, K)) / np.sqrt(K)).astype(np.float32).astype(dtype)
    out = moe_ext.grouped_gemm(a, moe_ext.prepack(w) if packed else w, offsets)
    assert out.dtype == dtype and out.shape == (M, N)
    assert_close(out, reference.grouped_gemm(*f64(a, w), offsets), ONE_ROUNDING[dtype], "out")


def _split(rng, M, E):
    cuts = np.sort(rng.integers(0, M + 1, size=E - 1))
    return np.diff(np.concatenate([[0], cuts, [M]]))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_unpermute(rng, dtype):
    T, d, E, k = 23, 41, 6, 3
    ids = random_ids(rng, T, E, k)
    perm = moe_ext.permute(random_x(rng, T, d), ids, E)
    y_perm = random_x(rng, perm.x_perm.shape[0], d).astype(dtype)
    weights = random_topk_weights(rng, T, k)
    y = moe_ext.unpermute(y_perm, perm.perm_rows, weights)
    assert y.dtype == dtype
    want = reference.unpermute(*f64(y_perm), perm.perm_rows, weights.astype(np.float64))
    assert_close(y, want, ONE_ROUNDING[dtype], "y")


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
# decode-like (few rows per expert), prefill-like with f not a multiple of the 32-column panels
@pytest.mark.parametrize("T,d,f,E,k", [(3, 40, 24, 4, 2), (150, 72, 45, 3, 2)])
def test_experts_and_moe(rng, dtype, activation, packed, bf16_dot, T, d, f, E, k):
    if dtype != BF16 and not bf16_dot:
        pytest.skip("the bf16_dot switch only matters for bfloat16")
    x, w_router = as_(dtype, random_x(rng, T, d), random_router(rng, E, d))
    w1, w2 = as_(dtype, *random_expert_weights(rng, E, d, f, activation))
    weights, ids = random_topk_weights(rng, T, k), random_ids(rng, T, E, k)
    args1, args2 = (moe_ext.prepack(w1), moe_ext.prepack(w2)) if packed else (w1, w2)
    y = moe_ext.experts(x, args1, args2, weights, ids, activation=activation)
    assert y.dtype == dtype
    want = reference.experts(*f64(x, w1, w2), weights.astype(np.float64), ids, activation=activation)
    assert_close(y, want, TWO_ROUNDINGS[dtype], "experts")
    y = moe_ext.moe(x, w_router, args1, args2, k, activation=activation)
    assert y.dtype == dtype
    want_weights, want_ids, probs = reference.route(*f64(x, w_router), k, return_probs=True)
    if (selection_margins(probs, k) > SELECTION_MARGIN).all():  # else float32 may pick other experts
        want = reference.experts(*f64(x, w1, w2), want_weights, want_ids, activation=activation)
        assert_close(y, want, TWO_ROUNDINGS[dtype], "moe")


@pytest.mark.parametrize("wdtype", [BF16, np.dtype(np.float16)], ids=["bfloat16", "float16"])
def test_float32_activations_with_16_bit_weights(rng, wdtype):
    """Weights widen exactly, so float32 activations keep float32 accuracy (and the float32 output)."""
    T, d, f, E, k = 40, 48, 36, 4, 2
    x = random_x(rng, T, d)
    w1, w2 = as_(wdtype, *random_expert_weights(rng, E, d, f))
    weights, ids = random_topk_weights(rng, T, k), random_ids(rng, T, E, k)
    for args in ((w1, w2), (moe_ext.prepack(w1), moe_ext.prepack(w2))):
        y = moe_ext.experts(x, *args, weights, ids)
        assert y.dtype == np.float32
        want = reference.experts(*f64(x, w1, w2), weights.astype(np.float64), ids)
        assert_close(y, want, GEMM_RTOL, "experts")


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_empty_and_special_values(rng, dtype):
    E, d, f, k = 3, 16, 8, 2
    w1, w2 = as_(dtype, *random_expert_weights(rng, E, d, f))
    x = np.zeros((0, d), dtype)
    y = moe_ext.experts(x, w1, w2, np.zeros((0, k), np.float32), np.zeros((0, k), np.int32))
    assert y.shape == (0, d) and y.dtype == dtype
    x = random_x(rng, 4, d).astype(dtype)
    x[1, 3] = np.nan
    y = moe_ext.experts(x, w1, w2, random_topk_weights(rng, 4, k), random_ids(rng, 4, E, k))
    assert np.isnan(np.asarray(y[1], np.float32)).all() and np.isfinite(np.asarray(y[[0, 2, 3]], np.float32)).all()


def test_reference_upcasts_16_bit_inputs(rng):
    """The ground truth from 16-bit inputs is computed in float64 from the same rounded values."""
    x = random_x(rng, 5, 8).astype(BF16)
    w = random_router(rng, 3, 8).astype(np.float16)
    weights, _ = reference.route(x, w, 2)
    assert weights.dtype == np.float64
    np.testing.assert_array_equal(weights, reference.route(*f64(x, w), 2)[0])
