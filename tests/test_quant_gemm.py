"""Quantised weights in grouped_gemm, experts and moe, on every tier, against the float64 reference on
the dequantised weights: weight-only (W8A16 / W4A16) to float32 accumulation rounding; activation-
quantised (W8A8 / W4A8) against the reference that quantises the activations by the same rule."""
import math

import ml_dtypes
import numpy as np
import pytest

import moe_ext
from moe_ext import reference
from conftest import (GATED, GEMM_RTOL, assert_close, random_expert_weights, random_ids, random_offsets,
                      random_router, random_topk_weights, random_x, unchanged)

U = 2.0 ** -24  # float32 unit roundoff

# (scheme, group_size, zero_point)
SCHEMES = [("int8", None, False), ("int8", 32, False), ("int4", 32, False), ("int4", 64, True),
           ("int4", 128, False), ("int4", 128, True)]


def _id(s):
    return f"{s[0]}-g{s[1]}{'-zp' if s[2] else ''}"


def _quantize(w, fmt, activations):
    scheme, group, zp = fmt
    return moe_ext.quantize(w, scheme, group_size=group, zero_point=zp, activations=activations)


def _depth(fmt, multiple=1):
    """A K the format accepts: group multiples (and an odd K for int8 per row)."""
    scheme, group, _ = fmt
    return (group or 32) * multiple + (13 if group is None else 0)


@pytest.mark.parametrize("fmt", SCHEMES, ids=_id)
@pytest.mark.parametrize("counts", [[0, 0, 0], [1, 0, 2], [5, 16, 3], [130, 7, 0]], ids=str)
def test_grouped_gemm_weight_only(rng, fmt, counts):
    out, want = _weight_only_gemm(rng, fmt, _depth(fmt, 3), counts, np.float32)
    assert_close(out, want, GEMM_RTOL, "grouped_gemm")


def _weight_only_gemm(rng, fmt, K, counts, dtype):
    """grouped_gemm of random `dtype` rows on weight-only weights [3, 37, K], checked per element against
    the float64 reference on the dequantised weights: the worst case of a float32 dot of length K on the
    same weights, plus, for 16-bit outputs, their rounding (u = 2^-8 for bfloat16). Returns (out, want)."""
    E, N = 3, 37
    w = rng.standard_normal((E, N, K)).astype(np.float32)
    offsets = random_offsets(rng, E, counts=counts)
    a = rng.standard_normal((int(offsets[-1]), K)).astype(dtype)
    q = _quantize(w, fmt, None)
    with unchanged(a):
        out = moe_ext.grouped_gemm(a, q, offsets)
    assert out.dtype == a.dtype and out.shape == (a.shape[0], N)
    a64, w_dq = a.astype(np.float64), moe_ext.dequantize(q).astype(np.float64)
    want = reference.grouped_gemm(a64, w_dq, offsets)
    u_out = 0.0 if a.dtype == np.float32 else 2.0 ** -8
    for e in range(E):
        lo, hi = offsets[e], offsets[e + 1]
        acc = K * U * (np.abs(a64[lo:hi]) @ np.abs(w_dq[e]).T)
        bound = acc + u_out * (np.abs(want[lo:hi]) + acc)
        assert np.all(np.abs(out[lo:hi].astype(np.float64) - want[lo:hi]) <= bound), e
    return out, want


@pytest.mark.parametrize("fmt", SCHEMES, ids=_id)
@pytest.mark.parametrize("counts", [[0, 0, 0], [1, 0, 2], [5, 16, 3], [130, 7, 0]], ids=str)
def test_grouped_gemm_activation_quantised(rng, vnni, fmt, counts):
    E, N, K = 3, 37, _depth(fmt, 3)
    w = rng.standard_normal((E, N, K)).astype(np.float32)
    offsets = random_offsets(rng, E, counts=counts)
    a = rng.standard_normal((int(offsets[-1]), K)).astype(np.float32)
    if a.shape[0]:
        a[0] = 0  # a row of zeros: scale 0, output 0
    q = _quantize(w, fmt, "int8")
    out = moe_ext.grouped_gemm(a, q, offsets)
    _assert_activation_quantised_bound(out, a, q, offsets)
    if a.shape[0]:
        assert not out[0].any()


# Formats whose K spans several 256-depth blocks of the prefill kernel, some with a group across two of
# them (int8 g96 at K=288, int8 per row).
LONG_ROWS = [(("int8", None, False), 300), (("int8", 96, False), 288), (("int4", 128, True), 640),
             (("int4", 32, False), 288), (("int4", 64, False), 576)]


@pytest.mark.parametrize("fmt,K", LONG_ROWS, ids=lambda v: _id(v) if isinstance(v, tuple) else str(v))
def test_activation_quantised_prefill_is_decode(rng, vnni, fmt, K):
    """Experts of many rows (the prefill tile on VNNI) give every row the bits it gets alone (decode, one
    row a call) in the columns of whole kernel panels, and are within the bound of
    test_grouped_gemm_activation_quantised everywhere: the same integer sums, converted and scaled in the
    same order."""
    E, N = 2, 44  # 40 rows in panels, 4 past them
    w = rng.standard_normal((E, N, K)).astype(np.float32)
    q = _quantize(w, fmt, "int8")
    offsets = random_offsets(rng, E, counts=[70, 19])
    a = (rng.standard_normal((89, K)) * rng.uniform(0.01, 100.0, (89, 1))).astype(np.float32)
    out = moe_ext.grouped_gemm(a, q, offsets)
    alone = np.concatenate([moe_ext.grouped_gemm(a[i:i + 1], q, np.array([0, int(i < 70), 1], np.int32))
                            for i in range(89)])
    np.testing.assert_array_equal(out[:, :40], alone[:, :40])
    _assert_activation_quantised_bound(out, a, q, offsets)


@pytest.mark.parametrize("fmt,K", LONG_ROWS, ids=lambda v: _id(v) if isinstance(v, tuple) else str(v))
def test_activation_quantised_tiers_agree(rng, fmt, K):
    """The per-token quantisation (a vector form on avx512, a scalar one elsewhere) and the integer products
    give the same bits on the avx2 and avx512 tiers, with and without VNNI, decode and prefill, in the
    columns of whole kernel panels (the FMA tiers round alike)."""
    tiers = [t for t in moe_ext.available_isas() if t != "scalar"]
    if "avx512" not in tiers:
        pytest.skip("one FMA tier only")
    w = rng.standard_normal((2, 48, K)).astype(np.float32)
    q = _quantize(w, fmt, "int8")
    offsets = random_offsets(rng, 2, counts=[70, 5])
    a = (rng.standard_normal((75, K)) * rng.uniform(0.01, 100.0, (75, 1))).astype(np.float32)
    has_vnni = moe_ext._core.vnni_enabled()
    previous = moe_ext.get_isa()
    outs = []
    try:
        for tier in tiers:
            moe_ext.set_isa(tier)
            for v in ([True, False] if tier == "avx512" and has_vnni else [has_vnni]):
                moe_ext._core._set_vnni_enabled(v)
                outs.append(moe_ext.grouped_gemm(a, q, offsets))
    finally:
        moe_ext.set_isa(previous)
        moe_ext._core._set_vnni_enabled(has_vnni)
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])


def _assert_activation_quantised_bound(out, a, q, offsets):
    """out (grouped_gemm of a on activation-quantised q) against the float64 reference that quantises the
    activations by the same rule, per element: 2 (groups + 4) float32 roundings of |a_fq| . |w|."""
    a_fq = reference.fake_quantize_activations(a)
    w_dq = moe_ext.dequantize(q).astype(np.float64)
    want = reference.grouped_gemm(a_fq, w_dq, offsets)
    groups = q.scales.shape[-1]
    for e in range(len(offsets) - 1):
        lo, hi = offsets[e], offsets[e + 1]
        bound = 2 * (groups + 4) * U * (np.abs(a_fq[lo:hi]) @ np.abs(w_dq[e]).T)
        assert np.all(np.abs(out[lo:hi] - want[lo:hi]) <= bound), e


def test_int8_paths_agree_exactly_on_the_integers(rng, isa):
    """Integer sums are exact on every path: with one group and power-of-two scales the whole result is
    exact, so every tier and both avx512 paths give the same bits."""
    E, N, K = 2, 9, 64
    codes = rng.integers(-127, 128, size=(E, N, K)).astype(np.int8)
    q = moe_ext.quant.from_parts("int8", (E, N, K), None, codes.view(np.uint8),
                                 np.full((E, N, 1), 0.25, np.float32), activations="int8")
    a = rng.integers(-127, 128, size=(5, K)).astype(np.float32)
    a[:, 0] = 127  # scale exactly 1
    offsets = np.array([0, 2, 5], np.int32)
    want = reference.grouped_gemm(a.astype(np.float64), codes.astype(np.float64) * 0.25, offsets)
    np.testing.assert_array_equal(moe_ext.grouped_gemm(a, q, offsets), want)


def test_nan_and_inf_activations(rng):
    w = rng.standard_normal((1, 5, 64)).astype(np.float32)
    a = rng.standard_normal((3, 64)).astype(np.float32)
    a[1, 3] = np.nan
    a[2, 7] = np.inf
    offsets = np.array([0, 3], np.int32)
    out = moe_ext.grouped_gemm(a, moe_ext.quantize(w, "int8", activations="int8"), offsets)
    assert np.isfinite(out[0]).all() and np.isnan(out[1:]).all()  # docs/api.md §9: the token's outputs are NaN
    out = moe_ext.grouped_gemm(a, moe_ext.quantize(w, "int8"), offsets)
    assert np.isfinite(out[0]).all() and np.isnan(out[1]).all() and not np.isfinite(out[2]).any()


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16])
def test_16_bit_activations(rng, dtype):
    w = rng.standard_normal((2, 20, 64)).astype(np.float32)
    a = rng.standard_normal((7, 64)).astype(dtype)
    offsets = np.array([0, 3, 7], np.int32)
    q = moe_ext.quantize(w, "int4", group_size=32)
    out = moe_ext.grouped_gemm(a, q, offsets)
    assert out.dtype == np.dtype(dtype)
    want = reference.grouped_gemm(a.astype(np.float64), moe_ext.dequantize(q).astype(np.float64), offsets)
    assert_close(out, want, 2.0 ** -8 if dtype == ml_dtypes.bfloat16 else 2.0 ** -10, "16-bit")



@pytest.mark.parametrize("fmt,K", [(f, _depth(f, 3)) for f in SCHEMES] + [(("int8", None, False), 288)],
                         ids=lambda v: _id(v) if isinstance(v, tuple) else f"K{v}")
@pytest.mark.parametrize("counts", [[1, 0, 2], [5, 16, 3], [7, 12, 9], [130, 7, 0]], ids=str)
def test_bfloat16_rows_weight_only(rng, bf16_dot, fmt, K, counts):
    """bfloat16 activations on weight-only weights: with vdpbf16ps (int4 decode's panels, prefill's tiles
    for K a multiple of 32; docs/api.md §9) and without. The rows are exact in bfloat16 and so is each
    q - z, so the products are exact and only float32 accumulation and the bfloat16 output rounding
    (u = 2^-8 of each element) remain. K = 288: an int8 row's one group spans two prefill blocks."""
    _weight_only_gemm(rng, fmt, K, counts, ml_dtypes.bfloat16)


@pytest.mark.parametrize("fmt", [("int4", 32, False), ("int4", 64, True), ("int8", 32, False)], ids=_id)
@pytest.mark.parametrize("T", [1, 4, 40])
def test_bfloat16_experts_weight_only(rng, bf16_dot, fmt, T):
    """experts on bfloat16 tokens: with vdpbf16ps the activation fed to the second GEMM is rounded to
    bfloat16 too (as for bfloat16 weights, docs/api.md "dtypes"), so two roundings of u = 2^-9 in norm."""
    d, f, E, k = 128, 64, 4, 2
    x = random_x(rng, T, d).astype(ml_dtypes.bfloat16)
    w13, w2 = random_expert_weights(rng, E, d, f, "swiglu")
    q13, q2 = _quantize(w13, fmt, None), _quantize(w2, fmt, None)
    weights, ids = random_topk_weights(rng, T, k), random_ids(rng, T, E, k)
    got = moe_ext.experts(x, q13, q2, weights, ids)
    assert got.dtype == x.dtype
    want = reference.quantized_experts(x.astype(np.float64), moe_ext.dequantize(q13), moe_ext.dequantize(q2),
                                       weights, ids, quantize_inputs=(False, False))
    assert_close(got, want, 4 * 2.0 ** -9, "experts")


EXPERT_CASES = [  # T, d, f, E, k, activation
    (0, 64, 32, 4, 2, "swiglu"), (1, 64, 32, 4, 2, "swiglu"), (1, 64, 64, 1, 1, "geglu"),
    (9, 96, 64, 3, 3, "swiglu"), (40, 128, 96, 8, 2, "relu"), (17, 64, 32, 5, 2, "gelu"),
    (200, 64, 64, 2, 2, "swiglu"),
]


@pytest.mark.parametrize("fmt", [("int8", None, False), ("int4", 32, True), ("int4", 32, False)], ids=_id)
@pytest.mark.parametrize("case", EXPERT_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("activations", [None, "int8"], ids=["weight-only", "a8"])
def test_experts_and_moe(rng, fmt, case, activations):
    T, d, f, E, k, act = case
    x = random_x(rng, T, d)
    w13, w2 = random_expert_weights(rng, E, d, f, act)
    q13, q2 = _quantize(w13, fmt, activations), _quantize(w2, fmt, activations)
    weights, ids = random_topk_weights(rng, T, k), random_ids(rng, T, E, k)
    got = moe_ext.experts(x, q13, q2, weights, ids, activation=act)
    a8 = activations == "int8"
    want = reference.quantized_experts(x, moe_ext.dequantize(q13), moe_ext.dequantize(q2), weights, ids,
                                       activation=act, quantize_inputs=(a8, a8))
    # Weight-only: float32 accumulation only. Activation-quantised: float32 rounding of the first
    # GEMM's output can move the second GEMM's input across a rounding boundary of its int8 grid (by
    # one step, scale = max|h| / 127, on rare elements): a bound of a few steps' worth, 1e-3 relative.
    assert_close(got, want, GEMM_RTOL if not a8 else 1e-3, "experts")
    router = random_router(rng, E, d)
    got_moe = moe_ext.moe(x, router, q13, q2, k, activation=act)
    tw, ti = reference.route(x.astype(np.float64), router.astype(np.float64), k)
    want_moe = reference.quantized_experts(x, moe_ext.dequantize(q13), moe_ext.dequantize(q2), tw, ti,
                                           activation=act, quantize_inputs=(a8, a8))
    assert_close(got_moe, want_moe, GEMM_RTOL if not a8 else 1e-3, "moe")


def test_mixed_weights(rng):
    """One slot quantised, the other a plain or packed array; and quantised weights under capacity."""
    T, d, f, E, k = 12, 64, 32, 4, 2
    x = random_x(rng, T, d)
    w13, w2 = random_expert_weights(rng, E, d, f)
    weights, ids = random_topk_weights(rng, T, k), random_ids(rng, T, E, k)
    q13 = moe_ext.quantize(w13, "int4", group_size=64)
    for other in (w2, moe_ext.prepack(w2)):
        got = moe_ext.experts(x, q13, other, weights, ids, capacity=3)
        want = reference.experts(x.astype(np.float64), moe_ext.dequantize(q13).astype(np.float64),
                                 w2.astype(np.float64), weights.astype(np.float64), ids, capacity=3)
        assert_close(got, want, GEMM_RTOL, "mixed")


@pytest.mark.parametrize("activation", ["swiglu", "swiglu(interleaved)", "geglu"])
@pytest.mark.parametrize("activations", [None, "int8"], ids=["weight-only", "a8"])
@pytest.mark.parametrize("f", [20, 36, 44])
@pytest.mark.parametrize("scheme", ["int4", "int8"])
@pytest.mark.parametrize("T", [11, 60], ids=["decode", "prefill"])  # prefill: experts of > 16 rows
def test_panels_split_by_the_gate_up_halves(rng, activation, activations, f, scheme, T):
    """Rows live in panels of 8 (core/quant.h): a gated w13 whose f is not a multiple of 8 has a panel
    holding both gate and up rows, and a tail of f % 8 rows per expert outside the panels."""
    d, E, k = 64, 3, 2
    x = random_x(rng, T, d)
    w13, w2 = random_expert_weights(rng, E, d, f, "swiglu")
    weights, ids = random_topk_weights(rng, T, k), random_ids(rng, T, E, k)
    zp = scheme == "int4" and f == 36
    q13 = moe_ext.quantize(w13, scheme, group_size=32, zero_point=zp, activations=activations)
    got = moe_ext.experts(x, q13, w2, weights, ids, activation=activation)
    a8 = activations == "int8"
    want = reference.quantized_experts(x, moe_ext.dequantize(q13), w2, weights, ids, activation=activation,
                                       quantize_inputs=(a8, False))
    assert_close(got, want, GEMM_RTOL if not a8 else 1e-3, f"{scheme} w13")


def test_int4_kernel_parts_are_the_exchange_parts_interleaved(rng):
    """values/scales/zeros (exchange layout, GGUF order per row) and kernel_parts (panels of 8 rows) hold
    the same bytes, and from_parts of the exchange parts gives the same weight."""
    E, N, K = 2, 19, 96
    q = moe_ext.quantize(rng.standard_normal((E, N, K)).astype(np.float32), "int4", group_size=32, zero_point=True)
    values, scales, zeros = q.kernel_parts()
    assert values.shape == q.values.shape and scales.shape == q.scales.shape and zeros.shape == q.zeros.shape
    panel = values[:, :16].reshape(E, 2, K // 32, 4, 8, 4)  # [e, panel, block, chunk, row, byte]
    np.testing.assert_array_equal(panel.transpose(0, 1, 4, 2, 3, 5).reshape(E, 16, -1), q.values[:, :16])
    np.testing.assert_array_equal(values[:, 16:], q.values[:, 16:])  # the tail rows stay per row
    np.testing.assert_array_equal(scales[:, :16].reshape(E, 2, -1, 8).transpose(0, 1, 3, 2).reshape(E, 16, -1),
                                  q.scales[:, :16])
    np.testing.assert_array_equal(sorted(zeros.ravel()), sorted(q.zeros.ravel()))
    again = moe_ext.quant.from_parts("int4", q.shape, 32, q.values, q.scales, q.zeros)
    np.testing.assert_array_equal(again.kernel_parts()[0], values)
    np.testing.assert_array_equal(moe_ext.dequantize(again), moe_ext.dequantize(q))


def test_int8_kernel_parts_are_the_exchange_parts_interleaved(rng):
    """int8 rows are in panels of 8 too: block b's 256 bytes are 8 chunks of 32, chunk c holding depths
    4c..4c+3 of each of the panel's rows in turn; an odd K's zero padding moves with its block."""
    E, N, K = 2, 11, 77  # 96 depths a row (77 and the padding), one panel of 8 and 3 rows after it
    q = moe_ext.quantize(rng.standard_normal((E, N, K)).astype(np.float32), "int8")
    values, scales, _ = q.kernel_parts()
    panel = values[:, :8].reshape(E, 3, 8, 8, 4)  # [e, block, chunk, row, byte]
    np.testing.assert_array_equal(panel.transpose(0, 3, 1, 2, 4).reshape(E, 8, -1), q.values[:, :8])
    np.testing.assert_array_equal(values[:, 8:], q.values[:, 8:])
    np.testing.assert_array_equal(scales[:, :8, 0], q.scales[:, :8, 0])  # one group: [1][8] is row order
    again = moe_ext.quant.from_parts("int8", q.shape, None, q.values, q.scales)
    np.testing.assert_array_equal(again.kernel_parts()[0], values)


def test_wrong_shape_in_slot(rng):
    x = random_x(rng, 3, 64)
    w13, w2 = random_expert_weights(rng, 4, 64, 16)
    q13, q2 = moe_ext.quantize(w13, "int8"), moe_ext.quantize(w2, "int8")
    weights, ids = random_topk_weights(rng, 3, 2), random_ids(rng, 3, 4, 2)
    with pytest.raises(ValueError, match=r"^w13_or_w1: expected shape \(4, 32, 64\)"):
        moe_ext.experts(x, moe_ext.quantize(w13[:, :16].copy(), "int8"), q2, weights, ids)
    with pytest.raises(ValueError, match=r"^w13_or_w1: expected shape \(4, 32, 64\)"):
        moe_ext.experts(x, q2, q2, weights, ids)
    with pytest.raises(ValueError, match=r"^w2: expected shape \(\*, 64, \*\)"):
        moe_ext.experts(x, q13, q13, weights, ids)
    with pytest.raises(ValueError, match=r"^w: expected shape \(\*, \*, 32\)"):
        moe_ext.grouped_gemm(x[:, :32].copy(), q13, np.array([0, 3, 3, 3, 3], np.int32))


# Measured on Gaussian weights (docs/api.md §9 reports these figures): the layer-output error of each
# scheme against the unquantised float32 layer, Frobenius-relative (T=32, d=f=256, E=4, k=2, SwiGLU),
# with a margin of ~1.25x over the measured figures.
ERROR_BOUNDS = {("int8", None, False, None): 0.015, ("int8", None, False, "int8"): 0.027,
                ("int8", 32, False, None): 0.012, ("int8", 32, False, "int8"): 0.026,
                ("int4", 32, False, None): 0.22, ("int4", 32, True, None): 0.18,
                ("int4", 64, False, None): 0.24, ("int4", 128, False, None): 0.26,
                ("int4", 128, True, None): 0.22, ("int4", 128, False, "int8"): 0.26}


@pytest.mark.parametrize("key", list(ERROR_BOUNDS), ids=lambda k: _id(k[:3]) + (f"-a8" if k[3] else ""))
def test_error_vs_unquantised_layer(rng, key):
    T, d, f, E, k = 32, 256, 256, 4, 2
    x = random_x(rng, T, d)
    w13, w2 = random_expert_weights(rng, E, d, f)
    weights, ids = random_topk_weights(rng, T, k), random_ids(rng, T, E, k)
    exact = reference.experts(x.astype(np.float64), w13.astype(np.float64), w2.astype(np.float64),
                              weights.astype(np.float64), ids)
    fmt, activations = key[:3], key[3]
    got = moe_ext.experts(x, _quantize(w13, fmt, activations), _quantize(w2, fmt, activations), weights, ids)
    err = np.linalg.norm(got - exact) / np.linalg.norm(exact)
    assert err <= ERROR_BOUNDS[key], err
