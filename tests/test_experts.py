"""moe_ext.experts and moe_ext.moe against moe_ext.reference in float64. docs/api.md §5."""
import ml_dtypes
import numpy as np
import pytest

import moe_ext
from moe_ext import reference as ref
from conftest import (ACTIVATIONS, GATED, GEMM_RTOL, SELECTION_MARGIN, assert_close, f64,
                      random_expert_weights, random_ids, random_router, random_routing,
                      random_topk_weights, random_x, selection_margins, unchanged)

SHAPES = [  # (T, d, f, E, k)
    (0, 16, 8, 8, 2),
    (1, 16, 8, 8, 2),
    (37, 45, 23, 8, 2),
    (37, 45, 23, 8, 8),
    (29, 23, 17, 1, 1),
    (300, 64, 32, 64, 6),
]
SHAPE_IDS = [f"T{t}d{d}f{f}E{e}k{k}" for t, d, f, e, k in SHAPES]


def _ref_experts(x, w13, w2, weights, ids, activation, capacity=None):
    return ref.experts(f64(x), f64(w13), f64(w2), f64(weights), ids, activation=activation,
                       capacity=capacity)


def check_experts(x, w13, w2, weights, ids, activation, capacity=None):
    with unchanged(x, w13, w2, weights, ids):
        y = moe_ext.experts(x, w13, w2, weights, ids, activation=activation, capacity=capacity)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert_close(y, _ref_experts(x, w13, w2, weights, ids, activation, capacity), GEMM_RTOL,
                 f"experts[{activation}]")
    return y


# ------------------------------------------------------------------------------------------ experts
@pytest.mark.parametrize("capacity", [None, 3], ids=["nocap", "cap3"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("T,d,f,E,k", SHAPES, ids=SHAPE_IDS)
def test_experts_matches_reference(rng, T, d, f, E, k, activation, capacity):
    x, w13, w2, weights, ids = random_routing(rng, T, d, E, k, activation, f)
    check_experts(x, w13, w2, weights, ids, activation, capacity)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("activation", ["swiglu", "relu"])
def test_experts_rows_at_tile_edges(rng, activation, dtype):
    """Experts whose row counts round a plain-weight tile past its buffer (a regression: 507 rows once
    made two tiles of 258 rows for a 256-row buffer, and rows 256-257 of the first came out wrong)."""
    counts = [253, 255, 256, 257, 505, 507, 512, 761]
    T, d, f, E = sum(counts), 20, 36, len(counts)
    x = random_x(rng, T, d)
    w13, w2 = random_expert_weights(rng, E, d, f, activation)
    ids = np.repeat(np.arange(E, dtype=np.int32), counts)[rng.permutation(T)][:, None]
    weights = random_topk_weights(rng, T, 1)
    if dtype == np.float32:
        check_experts(x, w13, w2, weights, ids, activation)
        return
    x, w13, w2 = (a.astype(dtype) for a in (x, w13, w2))
    got = moe_ext.experts(x, w13, w2, weights, ids, activation=activation)
    want = _ref_experts(*(a.astype(np.float32) for a in (x, w13, w2)), weights, ids, activation, None)
    assert_close(got.astype(np.float32), want, 2.0 ** -7, "bf16 experts")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_experts_large_dims(rng, activation):
    """d and f past the GEMMs' blocking sizes (a few hundred), many rows per expert."""
    T, d, f, E, k = 60, 300, 270, 4, 2
    check_experts(*random_routing(rng, T, d, E, k, activation, f), activation, capacity=None)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_experts_capacity_values(rng, activation):
    """capacity 0 drops everything (exact zeros); 1, 2 and large drop as permute does; a capacity no
    expert reaches is bit-identical to no capacity."""
    T, d, f, E, k = 40, 24, 20, 5, 2
    x, w13, w2, weights, ids = random_routing(rng, T, d, E, k, activation, f)
    y0 = check_experts(x, w13, w2, weights, ids, activation, capacity=0)
    np.testing.assert_array_equal(y0, np.zeros((T, d), np.float32))
    for capacity in (1, 2, 7):
        check_experts(x, w13, w2, weights, ids, activation, capacity=capacity)
    plain = moe_ext.experts(x, w13, w2, weights, ids, activation=activation)
    big = moe_ext.experts(x, w13, w2, weights, ids, activation=activation, capacity=T * k)
    assert plain.tobytes() == big.tobytes()


def test_experts_capacity_drops_later_tokens(rng):
    """With capacity C an expert serves its first C copies in token order: later tokens routed only
    to a full expert get exact zeros."""
    T, d, f, E = 10, 16, 12, 3
    x, w13, w2 = random_x(rng, T, d), *random_expert_weights(rng, E, d, f)
    ids = np.zeros((T, 1), np.int32)  # everyone to expert 0
    weights = random_topk_weights(rng, T, 1)
    y = moe_ext.experts(x, w13, w2, weights, ids, capacity=4)
    np.testing.assert_array_equal(y[4:], np.zeros((T - 4, d), np.float32))
    full = moe_ext.experts(x, w13, w2, weights, ids)
    # (not bit-identical: an expert's GEMM may block its rows differently for 4 rows than for 10)
    assert_close(y[:4], full[:4], GEMM_RTOL, "kept tokens")


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_experts_equals_composed_ops(rng, activation):
    """experts == permute -> grouped_gemm -> activation -> grouped_gemm -> unpermute, composed from the
    public ops (to rounding: the fused path is free to block its GEMMs differently)."""
    T, d, f, E, k = 45, 37, 29, 6, 3
    x, w13, w2, weights, ids = random_routing(rng, T, d, E, k, activation, f)
    y = moe_ext.experts(x, w13, w2, weights, ids, activation=activation, capacity=9)
    x_perm, offsets, rows = moe_ext.permute(x, ids, E, capacity=9)
    h = moe_ext.grouped_gemm(x_perm, w13, offsets)
    a = np.ascontiguousarray(ref.activate(h, activation), dtype=np.float32)
    y_comp = moe_ext.unpermute(moe_ext.grouped_gemm(a, w2, offsets), rows, weights)
    assert_close(y, y_comp, GEMM_RTOL, "composed")


def test_experts_duplicate_ids_in_a_row(rng):
    """A token sent twice to the same expert gets both weighted copies."""
    T, d, f, E = 14, 20, 10, 4
    x, w13, w2 = random_x(rng, T, d), *random_expert_weights(rng, E, d, f)
    ids = rng.integers(0, E, size=(T, 3)).astype(np.int32)
    ids[0] = [2, 2, 2]
    weights = random_topk_weights(rng, T, 3)
    check_experts(x, w13, w2, weights, ids, "swiglu")
    check_experts(x, w13, w2, weights, ids, "swiglu", capacity=2)


def test_experts_int64_ids_same_as_int32(rng):
    x, w13, w2, weights, ids = random_routing(rng, 33, 24, 6, 2, "geglu", 16)
    a = moe_ext.experts(x, w13, w2, weights, ids.astype(np.int64), activation="geglu")
    b = moe_ext.experts(x, w13, w2, weights, ids, activation="geglu")
    assert a.tobytes() == b.tobytes()


def test_experts_unused_experts_and_signed_weights(rng):
    T, d, f, E, k = 21, 18, 14, 9, 2
    x, w13, w2 = random_x(rng, T, d), *random_expert_weights(rng, E, d, f, "relu")
    ids = (random_ids(rng, T, 3, k) * 3 + 1).astype(np.int32)  # only experts 1, 4, 7
    weights = rng.standard_normal((T, k)).astype(np.float32)
    check_experts(x, w13, w2, weights, ids, "relu")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_functions_elementwise(rng, activation):
    """One expert with identity weights: y = act(h) exactly as the kernel computes it, with h = x
    (gated: gate = x, up = 2x). Checks each activation elementwise against the float64 formulas,
    including the exact erf GELU (the tanh approximation is off by up to ~5e-4)."""
    n, T = 48, 64
    z = (rng.standard_normal((T, n)) * 3).astype(np.float32)
    z[0, :8] = [-30.0, -12.5, -6.0, -2.5, 2.5, 6.0, 12.5, 30.0]
    eye = np.eye(n, dtype=np.float32)
    w1 = np.concatenate([eye, 2 * eye])[None] if activation in GATED else eye[None]
    w2 = eye[None]
    y = moe_ext.experts(z, np.ascontiguousarray(w1), w2, np.ones((T, 1), np.float32),
                        np.zeros((T, 1), np.int32), activation=activation)
    z64 = f64(z)
    h = np.concatenate([z64, 2 * z64], axis=1) if activation in GATED else z64
    want = ref.activate(h, activation)
    # a few float32 ulps relative, plus an absolute slack for the cancellation in 1 + erf(z) near
    # z << 0 (float32 1 + erff(z) is off by ~ulp(1)/2, times 0.5|z|) and silu's expf
    up = np.abs(2 * z64) if activation in GATED else 1.0
    slack = 1e-7 * np.maximum(1.0, np.abs(z64)) * np.maximum(1.0, up)
    assert (np.abs(f64(y) - want) <= 2e-6 * np.abs(want) + slack).all()
    if activation in ("gelu", "geglu"):
        tanh_gelu = 0.5 * z64 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z64 + 0.044715 * z64 ** 3)))
        if activation == "geglu":
            tanh_gelu = tanh_gelu * 2 * z64
        assert np.max(np.abs(tanh_gelu - want)) > 1e-4  # the test can tell the two forms apart


def test_activation_relu_keeps_nan_and_gelu_silu_of_nan(rng):
    """NaN through each activation stays NaN (relu must not turn it into 0)."""
    n, T = 16, 4
    z = random_x(rng, T, n)
    z[1, 3] = np.nan
    eye = np.eye(n, dtype=np.float32)
    for activation in ACTIVATIONS:
        w1 = np.concatenate([eye, eye])[None] if activation in GATED else eye[None]
        y = moe_ext.experts(z, np.ascontiguousarray(w1), eye[None], np.ones((T, 1), np.float32),
                            np.zeros((T, 1), np.int32), activation=activation)
        # a NaN in h reaches the whole row through the second GEMM
        assert np.isnan(y[1]).all(), activation
        assert not np.isnan(np.delete(y, 1, axis=0)).any(), activation


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_experts_nan_inputs_stay_in_their_rows(rng, activation):
    """Observed and required: a NaN in x[t] or in topk_weights[t] makes y[t] NaN (all of it: the GEMMs
    mix every column) and leaves every other row bit-identical; a NaN weight element of expert e makes
    NaN exactly the tokens with a kept copy on e; a NaN topk weight of a dropped copy does nothing."""
    T, d, f, E, k = 30, 20, 12, 4, 2
    x, w13, w2, weights, ids = random_routing(rng, T, d, E, k, activation, f)
    clean = moe_ext.experts(x, w13, w2, weights, ids, activation=activation)
    xn = x.copy()
    xn[3, 5] = np.nan
    wn = weights.copy()
    wn[8, 1] = np.nan
    y = moe_ext.experts(xn, w13, w2, wn, ids, activation=activation)
    assert np.isnan(y[[3, 8]]).all()
    others = np.setdiff1d(np.arange(T), [3, 8])
    assert y[others].tobytes() == clean[others].tobytes()
    # NaN in expert e's first weight: every token with a copy on e (nonzero weight) is NaN
    e = int(ids[0, 0])
    w13n = w13.copy()
    w13n[e, 0, 0] = np.nan
    y = moe_ext.experts(x, w13n, w2, weights, ids, activation=activation)
    on_e = (ids == e).any(axis=1)
    assert np.isnan(y[on_e]).all()
    assert y[~on_e].tobytes() == clean[~on_e].tobytes()
    # ... but not when capacity drops those copies
    y = moe_ext.experts(x, w13n, w2, weights, ids, activation=activation, capacity=1)
    first = int(np.nonzero(on_e)[0][0])
    assert np.isnan(y[first]).all()
    later = np.nonzero(on_e)[0][1:]
    assert not np.isnan(y[later]).any()


def test_experts_empty_and_k0(rng):
    d, f, E = 16, 8, 4
    w13, w2 = random_expert_weights(rng, E, d, f)
    y = moe_ext.experts(random_x(rng, 0, d), w13, w2, np.zeros((0, 2), np.float32),
                        np.zeros((0, 2), np.int32))
    assert y.shape == (0, d) and y.dtype == np.float32
    # k = 0: no expert at all, y = 0
    x = random_x(rng, 5, d)
    y = moe_ext.experts(x, w13, w2, np.zeros((5, 0), np.float32), np.zeros((5, 0), np.int32))
    np.testing.assert_array_equal(y, np.zeros((5, d), np.float32))


def test_experts_deterministic(rng):
    x, w13, w2, weights, ids = random_routing(rng, 120, 48, 8, 2, "swiglu", 40)
    first = moe_ext.experts(x, w13, w2, weights, ids)
    for _ in range(3):
        assert moe_ext.experts(x, w13, w2, weights, ids).tobytes() == first.tobytes()


# ---------------------------------------------------------------------------------------------- moe
MOE_OPTIONS = {
    "mixtral": dict(),
    "qwen-norenorm": dict(renormalize=False),
    "sigmoid-scale": dict(scoring="sigmoid", scale=2.5),
    "bias": dict(bias=True),
    "deepseek": dict(scoring="sigmoid", correction_bias=True, n_group=4, topk_group=2, scale=1.5),
    "capacity": dict(capacity=3),
    "capacity0": dict(capacity=0),
}


def _moe_kwargs(rng, E, options):
    kw = dict(options)
    if kw.get("bias"):
        kw["bias"] = rng.standard_normal(E).astype(np.float32)
    if kw.get("correction_bias"):
        kw["correction_bias"] = (rng.standard_normal(E) * 0.1).astype(np.float32)
    return kw


def _split(kw):
    route_kw = {key: v for key, v in kw.items() if key != "capacity"}
    return route_kw, kw.get("capacity")


@pytest.mark.parametrize("options", MOE_OPTIONS.values(), ids=MOE_OPTIONS.keys())
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_moe_equals_route_then_experts(rng, activation, options):
    """moe is route (same keywords) followed by experts: bit-identical on the same tier."""
    T, d, f, E, k = 57, 40, 24, 8, 2
    x, wr = random_x(rng, T, d), random_router(rng, E, d)
    w13, w2 = random_expert_weights(rng, E, d, f, activation)
    kw = _moe_kwargs(rng, E, options)
    route_kw, capacity = _split(kw)
    with unchanged(x, wr, w13, w2, kw.get("bias"), kw.get("correction_bias")):
        y = moe_ext.moe(x, wr, w13, w2, k, activation=activation, **kw)
    weights, ids = moe_ext.route(x, wr, k, **route_kw)
    y2 = moe_ext.experts(x, w13, w2, weights, ids, activation=activation, capacity=capacity)
    assert y.dtype == np.float32 and y.shape == (T, d)
    assert y.tobytes() == y2.tobytes()


MOE_REF_CASES = [("swiglu", "mixtral"), ("geglu", "deepseek"), ("relu", "capacity"),
                 ("gelu", "sigmoid-scale"), ("swiglu", "capacity")]


@pytest.mark.parametrize("activation,options", MOE_REF_CASES, ids=[f"{a}-{o}" for a, o in MOE_REF_CASES])
@pytest.mark.parametrize("T,d,f,E,k", SHAPES, ids=SHAPE_IDS)
def test_moe_matches_reference(rng, T, d, f, E, k, activation, options):
    """Against the float64 reference on the tokens whose routing is clear (ids cannot differ by
    rounding); with a capacity, up to the first unclear token (later drops may depend on it)."""
    kw = _moe_kwargs(rng, E, MOE_OPTIONS[options])
    if "n_group" in kw and (E % kw["n_group"] or kw["topk_group"] * (E // kw["n_group"]) < k):
        kw.pop("n_group"), kw.pop("topk_group")
    x, wr = random_x(rng, T, d), random_router(rng, E, d)
    w13, w2 = random_expert_weights(rng, E, d, f, activation)
    y = moe_ext.moe(x, wr, w13, w2, k, activation=activation, **kw)
    route_kw, capacity = _split(kw)
    ref_kw = {key: (f64(v) if isinstance(v, np.ndarray) else v) for key, v in kw.items()}
    want = ref.moe(f64(x), f64(wr), f64(w13), f64(w2), k, activation=activation, **ref_kw)
    _, _, probs = ref.route(f64(x), f64(wr), k, return_probs=True,
                            **{key: v for key, v in ref_kw.items() if key != "capacity"})
    keys = probs if kw.get("correction_bias") is None else probs + f64(kw["correction_bias"])
    clear = selection_margins(keys, k, kw.get("n_group"), kw.get("topk_group")) > SELECTION_MARGIN
    if capacity is not None:
        first_unclear = int(np.argmin(clear)) if not clear.all() else T
        clear = np.arange(T) < first_unclear
    if T >= 30:
        assert clear.mean() >= 0.5 or capacity is not None
    assert_close(y[clear], want[clear], GEMM_RTOL, f"moe[{activation}]")


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_moe_nan_token_stays_in_its_row(rng, scoring):
    """Observed and required: a NaN in x[t] makes route's weights for t NaN (and its ids 0..k-1), so
    y[t] is all NaN; every other row keeps its routing and its value. (Only to rounding: token t's new
    ids change the experts' row counts, and the GEMM may block an expert's rows by their count.)"""
    T, d, f, E, k = 26, 24, 16, 6, 2
    x, wr = random_x(rng, T, d), random_router(rng, E, d)
    w13, w2 = random_expert_weights(rng, E, d, f)
    clean = moe_ext.moe(x, wr, w13, w2, k, scoring=scoring)
    x[9, 4] = np.nan
    y = moe_ext.moe(x, wr, w13, w2, k, scoring=scoring)
    assert np.isnan(y[9]).all()
    others = np.setdiff1d(np.arange(T), [9])
    assert_close(y[others], clean[others], GEMM_RTOL, "other tokens")
    weights, ids = moe_ext.route(x, wr, k, scoring=scoring)
    np.testing.assert_array_equal(ids[9], np.arange(k))
    assert np.isnan(weights[9]).all() and not np.isnan(weights[others]).any()


def test_moe_e1_and_empty(rng):
    d, f = 12, 10
    x, wr = random_x(rng, 7, d), random_router(rng, 1, d)
    w13, w2 = random_expert_weights(rng, 1, d, f, "gelu")
    y = moe_ext.moe(x, wr, w13, w2, 1, activation="gelu")
    # one expert, weight 1: the expert FFN of every token
    want = ref.experts(f64(x), f64(w13), f64(w2), np.ones((7, 1)), np.zeros((7, 1), np.int32),
                       activation="gelu")
    assert_close(y, want, GEMM_RTOL, "moe E=1")
    y = moe_ext.moe(random_x(rng, 0, d), wr, w13, w2, 1, activation="gelu")
    assert y.shape == (0, d) and y.dtype == np.float32
