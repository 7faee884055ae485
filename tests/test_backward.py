"""The backward ops (moe_ext.grouped_gemm_backward, activation, activation_backward, unpermute_backward,
permute_backward) against moe_ext.reference in float64, on every ISA tier. docs/api.md "Backward"."""
import ml_dtypes
import numpy as np
import pytest

import moe_ext
from moe_ext import reference as ref
from conftest import (ACTIVATIONS, COMBINE_RTOL, GATED, GEMM_RTOL, assert_close, f64, random_ids,
                      random_offsets, random_topk_weights, random_weights, random_x, unchanged)

# The activation gradients use expf/erfcf (a few ulp) and a handful of float32 operations per element.
ACT_RTOL = 1e-5

GEMM_CASES = {  # name: (per-expert row counts, N, K)
    "balanced": ([9, 9, 9, 9], 23, 45),
    "empty-experts": ([0, 7, 0, 12, 0], 33, 16),
    "M0": ([0, 0, 0], 16, 16),
    "one-row": ([1], 5, 3),
    "few-rows": ([1, 2, 3, 8], 40, 37),
    "odd": ([3, 5, 7, 11, 13], 31, 47),
    "deep": ([20, 0, 9], 37, 300),
    "wide": ([15, 10], 300, 45),
    "many-rows": ([70, 3], 19, 29),
    "N1-K1": ([4, 6], 1, 1),
    "multi-tile": ([300, 0, 130], 150, 140),  # grad_w: several tiles per expert, rows > one depth block
}


@pytest.mark.parametrize("case", GEMM_CASES.values(), ids=GEMM_CASES.keys())
def test_grouped_gemm_backward(rng, case):
    counts, N, K = case
    E = len(counts)
    offsets = random_offsets(rng, E, counts)
    M = int(offsets[-1])
    a, w, g = random_x(rng, M, K), random_weights(rng, (E, N, K), K), random_x(rng, M, N)
    with unchanged(a, w, g, offsets):
        grad_a, grad_w = moe_ext.grouped_gemm_backward(g, a, w, offsets)
    want_a, want_w = ref.grouped_gemm_backward(f64(g), f64(a), f64(w), offsets)
    assert grad_a.dtype == grad_w.dtype == np.float32
    assert_close(grad_a, want_a, GEMM_RTOL, "grad_a")
    assert_close(grad_w, want_w, GEMM_RTOL, "grad_w")
    for e in np.flatnonzero(np.diff(offsets) == 0):
        assert not grad_w[e].any(), "experts without rows get a zero gradient"
    only_a, none_w = moe_ext.grouped_gemm_backward(g, a, w, offsets, need_w=False)
    assert none_w is None and np.array_equal(only_a, grad_a)
    again_a, again_w = moe_ext.grouped_gemm_backward(g, a, w, offsets)
    assert np.array_equal(again_a, grad_a) and np.array_equal(again_w, grad_w), "deterministic"


# 16-bit operands are read as they are (w in place, never widened or transposed): results equal the float64
# reference on the same (rounded) values to float32 accumulation. Shapes: rows past the few-row paths with
# whole 32-column panels of w^T (the packed transposed copy), an odd N (bfloat16 rows with a padded pair),
# few rows, and an expert without rows.
# "deep": an expert with more rows than a depth block of grad_w's bfloat16 pairs (512), odd, and N, K off
# the 16-column steps of its packing.
HALF_CASES = {"panels": ([40, 0, 25], 64, 96), "odd-N": ([20, 3, 30], 33, 40), "few-rows": ([2, 5], 48, 64),
              "deep": ([531, 6], 40, 50)}


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", HALF_CASES.values(), ids=HALF_CASES.keys())
def test_grouped_gemm_backward_16_bit(rng, case, dtype, layout, bf16_dot):
    if dtype != "bfloat16" and not bf16_dot:
        pytest.skip("the bf16_dot switch only matters for bfloat16")
    dt = np.dtype(getattr(ml_dtypes, dtype) if dtype == "bfloat16" else np.float16)
    counts, N, K = case
    E = len(counts)
    offsets = random_offsets(rng, E, counts)
    M = int(offsets[-1])
    a, g = random_x(rng, M, K).astype(dt), random_x(rng, M, N).astype(dt)
    w = random_weights(rng, (E, N, K), K).astype(dt)
    w_arg = np.ascontiguousarray(w.transpose(0, 2, 1)).transpose(0, 2, 1) if layout == "transposed" else w
    with unchanged(a, w_arg, g, offsets):
        grad_a, grad_w = moe_ext.grouped_gemm_backward(g, a, w_arg, offsets)
    want_a, want_w = ref.grouped_gemm_backward(f64(g), f64(a), f64(w), offsets)
    assert grad_a.dtype == np.float32 and grad_w.dtype == dt and grad_w.flags.c_contiguous
    assert_close(grad_a, want_a, GEMM_RTOL, "grad_a")
    # grad_w: float32 sums rounded once to w's dtype; without vdpbf16ps exactly the float32 path's result
    # rounded (with it, the pairs' products are added in another order)
    assert_close(grad_w, want_w, 2.0 ** -8 if dtype == "bfloat16" else 2.0 ** -11, "grad_w")
    wide_w = moe_ext.grouped_gemm_backward(g, a, w_arg.astype(np.float32), offsets, need_a=False)[1]
    if dtype == "float16" or not bf16_dot:
        np.testing.assert_array_equal(grad_w, wide_w.astype(dt))
    # grad_a in a's dtype on request: the float32 result rounded once
    as_a = moe_ext.grouped_gemm_backward(g, a, w_arg, offsets, need_w=False, grad_a_dtype=dt)[0]
    assert as_a.dtype == dt
    np.testing.assert_array_equal(as_a, grad_a.astype(dt))
    # grad_out and a of different dtypes are both taken as float32: the float32 path's numbers
    mixed = moe_ext.grouped_gemm_backward(g.astype(np.float32), a, w_arg, offsets)
    assert_close(mixed[0], want_a, GEMM_RTOL, "grad_a, float32 grad_out")
    np.testing.assert_array_equal(mixed[1], wide_w.astype(dt))


# The second shape spans several grad_w tiles (N, K > 128) and depth blocks of rows (> 256), and an
# expert without rows.
@pytest.mark.parametrize("counts, N, K", [([40, 1, 25], 50, 70), ([300, 0, 130], 150, 140)])
def test_grouped_gemm_backward_thread_count_independent(rng, counts, N, K):
    offsets = random_offsets(rng, 3, counts)
    M = int(offsets[-1])
    a, w, g = random_x(rng, M, K), random_weights(rng, (3, N, K), K), random_x(rng, M, N)
    before = moe_ext.get_num_threads()
    try:
        moe_ext.set_num_threads(1)
        one = moe_ext.grouped_gemm_backward(g, a, w, offsets)
        moe_ext.set_num_threads(3)
        three = moe_ext.grouped_gemm_backward(g, a, w, offsets)
    finally:
        moe_ext.set_num_threads(before)
    assert all(np.array_equal(x, y) for x, y in zip(one, three))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("M,f", [(0, 5), (1, 1), (7, 13), (33, 40)])
def test_activation_and_backward(rng, activation, M, f):
    cols = 2 * f if activation in GATED else f
    h = random_x(rng, M, cols, scale=2.0)
    g = random_x(rng, M, f)
    with unchanged(h, g):
        out = moe_ext.activation(h, activation)
        grad_h = moe_ext.activation_backward(g, h, activation)
    assert out.shape == (M, f) and grad_h.shape == h.shape
    assert_close(out, ref.activation(f64(h), activation), ACT_RTOL, "activation")
    assert_close(grad_h, ref.activation_backward(f64(g), f64(h), activation), ACT_RTOL, "activation_backward")


def test_activation_backward_matches_finite_differences(rng):
    h = rng.standard_normal((4, 12))
    g = rng.standard_normal((4, 6))
    for activation in ACTIVATIONS:
        hh = h if activation in GATED else h[:, :6]
        analytic = ref.activation_backward(g, hh, activation)
        eps = 1e-6
        numeric = np.zeros_like(hh)
        for idx in np.ndindex(*hh.shape):
            hp, hm = hh.copy(), hh.copy()
            hp[idx] += eps
            hm[idx] -= eps
            numeric[idx] = ((ref.activate(hp, activation) - ref.activate(hm, activation)) * g).sum() / (2 * eps)
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-7, err_msg=activation)


def _routing(rng, T, E, k, capacity=None):
    ids = random_ids(rng, T, E, k)
    perm = moe_ext.permute(np.zeros((T, 1), np.float32), ids, E, capacity=capacity)
    return perm.perm_rows, int(perm.expert_offsets[-1])


@pytest.mark.parametrize("T,E,k,d,capacity", [(0, 3, 2, 4, None), (1, 1, 1, 1, None), (9, 4, 2, 17, None),
                                              (23, 5, 3, 33, 4), (40, 8, 8, 5, None)])
def test_unpermute_and_permute_backward(rng, T, E, k, d, capacity):
    perm_rows, M = _routing(rng, T, E, k, capacity)
    y_perm, g, w = random_x(rng, M, d), random_x(rng, T, d), random_topk_weights(rng, T, k)
    with unchanged(y_perm, g, w, perm_rows):
        g_perm, g_w = moe_ext.unpermute_backward(g, y_perm, perm_rows, w)
        g_x = moe_ext.permute_backward(y_perm, perm_rows)
    want_perm, want_w = ref.unpermute_backward(f64(g), f64(y_perm), perm_rows, f64(w))
    assert_close(g_perm, want_perm, COMBINE_RTOL, "grad_y_perm")
    assert_close(g_w, want_w, GEMM_RTOL, "grad_topk_weights")
    assert_close(g_x, ref.permute_backward(f64(y_perm), perm_rows), COMBINE_RTOL, "permute_backward")
    if capacity is not None:
        assert (g_w[perm_rows < 0] == 0).all()


def test_unpermute_backward_repeated_rows(rng):
    """Rows named by several slots (not permute's output, but valid input) accumulate every slot."""
    perm_rows = np.array([[0, 1], [1, 0], [2, -1]], np.int32)
    y_perm, g, w = random_x(rng, 3, 9), random_x(rng, 3, 9), random_topk_weights(rng, 3, 2)
    g_perm, g_w = moe_ext.unpermute_backward(g, y_perm, perm_rows, w)
    want_perm, want_w = ref.unpermute_backward(f64(g), f64(y_perm), perm_rows, f64(w))
    assert_close(g_perm, want_perm, COMBINE_RTOL, "grad_y_perm")
    assert_close(g_w, want_w, GEMM_RTOL, "grad_topk_weights")


def test_backward_bad_arguments(rng):
    a, w = random_x(rng, 4, 3), random_weights(rng, (2, 5, 3), 3)
    with pytest.raises(ValueError, match="grad_out"):
        moe_ext.grouped_gemm_backward(random_x(rng, 4, 4), a, w, np.array([0, 2, 4], np.int32))
    with pytest.raises(ValueError, match="expert_offsets"):
        moe_ext.grouped_gemm_backward(random_x(rng, 4, 5), a, w, np.array([0, 3, 2], np.int32))
    with pytest.raises(ValueError, match="activation"):
        moe_ext.activation_backward(random_x(rng, 2, 2), random_x(rng, 2, 4), "tanh")
    with pytest.raises(ValueError, match="h"):
        moe_ext.activation(random_x(rng, 2, 3), "swiglu")
    with pytest.raises(ValueError, match="perm_rows"):
        moe_ext.unpermute_backward(random_x(rng, 1, 2), random_x(rng, 2, 2), np.array([[5]], np.int32),
                                   np.ones((1, 1), np.float32))
    with pytest.raises(ValueError, match="perm_rows"):
        moe_ext.permute_backward(random_x(rng, 2, 2), np.array([[2]], np.int32))
    with pytest.raises(TypeError, match="grad_act"):
        moe_ext.activation_backward(np.ones((2, 2)), random_x(rng, 2, 4), "swiglu")


def test_grouped_gemm_backward_grad_a_dtype_is_checked(rng):
    offsets = random_offsets(rng, 2, [3, 4])
    a, w, g = random_x(rng, 7, 8), random_weights(rng, (2, 5, 8), 8), random_x(rng, 7, 5)
    with pytest.raises(TypeError, match="grad_a_dtype.*float32 or a's dtype"):
        moe_ext.grouped_gemm_backward(g, a, w, offsets, grad_a_dtype=np.float16)
    with pytest.raises(TypeError, match="grad_a_dtype"):
        moe_ext.grouped_gemm_backward(g, a, w, offsets, grad_a_dtype="not a dtype")
    assert moe_ext.grouped_gemm_backward(g, a, w, offsets, grad_a_dtype=np.float32)[0].dtype == np.float32


# 16-bit h (and grad_act): the float32 computation on the widened rows, rounded once to h's dtype, so
# exactly the float32 path's result rounded. M spans several of the core's blocks of rows (about 128 Ki
# floats each), with a last partial one.
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu", "geglu_tanh(limit=3.0,interleaved)"])
def test_activation_16_bit(rng, dtype, activation):
    dt = np.dtype(getattr(ml_dtypes, dtype) if dtype == "bfloat16" else np.float16)
    gated = moe_ext.activation_from(activation).gated
    M, f = 1501, 64
    h = random_x(rng, M, 2 * f if gated else f).astype(dt)
    g = random_x(rng, M, f).astype(dt)
    with unchanged(h, g):
        out = moe_ext.activation(h, activation)
        grad_h = moe_ext.activation_backward(g, h, activation)
    assert out.dtype == grad_h.dtype == dt and grad_h.shape == h.shape
    np.testing.assert_array_equal(out, moe_ext.activation(h.astype(np.float32), activation).astype(dt))
    wide = moe_ext.activation_backward(g.astype(np.float32), h.astype(np.float32), activation)
    np.testing.assert_array_equal(grad_h, wide.astype(dt))
    # grad_act of another dtype: both taken as float32
    np.testing.assert_array_equal(moe_ext.activation_backward(g.astype(np.float32), h, activation), wide)
