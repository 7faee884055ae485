"""Expert biases (b13_or_b1, b2, grouped_gemm's bias), every activation description, and transposed weight
views (w_t.transpose(0, 2, 1), read in place) through grouped_gemm, experts and moe, plain and prepacked,
float32 / bfloat16 / float16 and quantised, on every tier, against the float64 reference; bias_grad and
grouped_gemm_backward with transposed weights; the errors."""
import dataclasses

import ml_dtypes
import numpy as np
import pytest

import moe_ext
from moe_ext import reference as ref
from conftest import (GEMM_RTOL, SELECTION_MARGIN, assert_close, random_ids, random_offsets, random_router,
                      random_topk_weights, random_weights, random_x, selection_margins, unchanged)

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = (np.dtype(np.float32), BF16, np.dtype(np.float16))
# As tests/test_dtypes.py: the outputs' rounding dominates (u = 2^-9 bfloat16, 2^-12 float16); the
# experts round twice at most (the activation under vdpbf16ps, then y).
TWO_ROUNDINGS = {np.dtype(np.float32): GEMM_RTOL, BF16: 4 * 2.0 ** -9, np.dtype(np.float16): 4 * 2.0 ** -12}
ONE_ROUNDING = {np.dtype(np.float32): GEMM_RTOL, BF16: 2 * 2.0 ** -9, np.dtype(np.float16): 2 * 2.0 ** -12}

DESCRIPTIONS = ("swiglu", "geglu", "geglu_tanh", "relu", "gelu", "gelu_tanh", "relu2", "swiglu(limit=7.0)",
                "swiglu(alpha=1.702,limit=7.0,up_offset=1.0,interleaved)", "swiglu(limit=7.0,interleaved)",
                "geglu(interleaved)", "swiglu(gate_softcap=4.0,up_softcap=5.0)",
                "swiglu(limit=7.0,gate_softcap=3.0,up_softcap=2.0,up_offset=1.0,interleaved)")
GPT_OSS = "swiglu(alpha=1.702,limit=7.0,up_offset=1.0,interleaved)"


def transposed(w):
    """The view HF's transposed weights give: w_t.transpose(0, 2, 1) of a C-contiguous w_t [E, K, N]."""
    view = np.ascontiguousarray(w.transpose(0, 2, 1)).transpose(0, 2, 1)
    assert not view.flags.c_contiguous or min(w.shape[1:]) <= 1
    return view


def f64(*arrays):
    out = tuple(None if a is None else np.asarray(a, dtype=np.float64) for a in arrays)
    return out[0] if len(out) == 1 else out


def expert_inputs(rng, T, d, f, E, k, activation, dtype=np.float32, with_bias=True):
    """x, w13_or_w1, w2, b13_or_b1, b2, topk_weights, topk_ids. First-GEMM outputs ~N(0, 5^2) (weights
    scaled 5 / sqrt(d)), so gates and ups straddle the limit 7 and the clamps bite."""
    rows = 2 * f if moe_ext.activation_from(activation).gated else f
    x = random_x(rng, T, d).astype(dtype)
    w13 = (random_weights(rng, (E, rows, d), d) * 5).astype(dtype)
    w2 = random_weights(rng, (E, d, f), f * 16).astype(dtype)
    b13 = rng.standard_normal((E, rows)).astype(dtype) if with_bias else None
    b2 = rng.standard_normal((E, d)).astype(dtype) if with_bias else None
    return x, w13, w2, b13, b2, random_topk_weights(rng, T, k), random_ids(rng, T, E, k)


def weight_args(w13, w2, layout, packed):
    args = [transposed(w) if layout == "transposed" else w for w in (w13, w2)]
    return [moe_ext.prepack(w) for w in args] if packed else args


# ---------------------------------------------------------------------------------------------------
# experts and moe
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("activation", DESCRIPTIONS)
# decode-like (few rows per expert: the streaming path for plain weights), and prefill-like, with d and
# f not multiples of 8/16/32
@pytest.mark.parametrize("T,d,f,E,k", [(3, 40, 13, 4, 2), (70, 37, 45, 3, 2)], ids=["decode", "prefill"])
def test_experts_float32(rng, activation, bias, layout, packed, T, d, f, E, k):
    x, w13, w2, b13, b2, weights, ids = expert_inputs(rng, T, d, f, E, k, activation, with_bias=bias)
    args = weight_args(w13, w2, layout, packed)
    with unchanged(x, w13, w2, b13, b2, weights, ids):
        y = moe_ext.experts(x, *args, weights, ids, activation=activation, b13_or_b1=b13, b2=b2)
    want = ref.experts(*f64(x, w13, w2), f64(weights), ids, activation=activation, b13_or_b1=f64(b13),
                       b2=f64(b2))
    assert y.dtype == np.float32
    assert_close(y, want, GEMM_RTOL, "experts")


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("activation", DESCRIPTIONS)
@pytest.mark.parametrize("dtype", DTYPES[1:], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("T", [3, 40], ids=["decode", "prefill"])
def test_experts_16_bit(rng, dtype, activation, packed, layout, T):
    """Weights, activations and biases in bfloat16 / float16 (biases widened exactly to float32)."""
    d, f, E, k = 24, 19, 3, 2
    x, w13, w2, b13, b2, weights, ids = expert_inputs(rng, T, d, f, E, k, activation, dtype)
    y = moe_ext.experts(x, *weight_args(w13, w2, layout, packed), weights, ids, activation=activation,
                        b13_or_b1=b13, b2=b2)
    assert y.dtype == dtype
    want = ref.experts(*f64(x, w13, w2), f64(weights), ids, activation=activation, b13_or_b1=f64(b13),
                       b2=f64(b2))
    assert_close(y, want, TWO_ROUNDINGS[dtype], "experts")


@pytest.mark.parametrize("activation", [GPT_OSS, "relu2", "geglu_tanh"])
@pytest.mark.parametrize("T,E,k", [(0, 3, 2), (1, 3, 2), (5, 1, 1), (9, 4, 4)], ids=["T0", "T1", "E1", "k=E"])
def test_experts_edge_sizes(rng, activation, T, E, k):
    d, f = 9, 7
    x, w13, w2, b13, b2, weights, ids = expert_inputs(rng, T, d, f, E, k, activation)
    want = ref.experts(*f64(x, w13, w2), f64(weights), ids, activation=activation, b13_or_b1=f64(b13),
                       b2=f64(b2))
    for layout in ("contiguous", "transposed"):
        for packed in (False, True):
            y = moe_ext.experts(x, *weight_args(w13, w2, layout, packed), weights, ids, activation=activation,
                                b13_or_b1=b13, b2=b2)
            assert y.shape == (T, d)
            assert_close(y, want, GEMM_RTOL, f"experts {layout} packed={packed}")


def test_experts_capacity_drops_biases_too(rng):
    """A dropped copy contributes nothing, its b2 included."""
    T, d, f, E, k = 12, 10, 6, 2, 2
    x, w13, w2, b13, b2, weights, ids = expert_inputs(rng, T, d, f, E, k, GPT_OSS)
    y = moe_ext.experts(x, transposed(w13), w2, weights, ids, activation=GPT_OSS, capacity=3, b13_or_b1=b13, b2=b2)
    want = ref.experts(*f64(x, w13, w2), f64(weights), ids, activation=GPT_OSS, capacity=3, b13_or_b1=f64(b13),
                       b2=f64(b2))
    assert_close(y, want, GEMM_RTOL, "experts")


@pytest.mark.parametrize("activation", ["swiglu", GPT_OSS, "relu2"])
def test_moe_with_biases(rng, activation):
    T, d, f, E, k = 33, 20, 11, 5, 2
    x, w13, w2, b13, b2, _, _ = expert_inputs(rng, T, d, f, E, k, activation)
    w_router = random_router(rng, E, d)
    y = moe_ext.moe(x, w_router, transposed(w13), moe_ext.prepack(transposed(w2)), k, activation=activation,
                    b13_or_b1=b13, b2=b2)
    weights, ids, probs = ref.route(*f64(x, w_router), k, return_probs=True)
    clear = selection_margins(probs, k) > SELECTION_MARGIN
    want = ref.experts(*f64(x, w13, w2), weights, ids, activation=activation, b13_or_b1=f64(b13), b2=f64(b2))
    assert_close(y[clear], want[clear], GEMM_RTOL, "moe")


def test_interleaved_and_transposed_are_bit_identical_to_their_plain_forms(rng):
    """Interleaving only reorders w13's rows and b13's entries, and a transposed view only changes where
    the same values are read from: each output is summed in the same order, so results are equal bit
    for bit (with enough rows per expert that plain weights are packed, not streamed, too)."""
    T, d, f, E, k = 60, 33, 21, 3, 2
    x, w13, w2, b13, b2, weights, ids = expert_inputs(rng, T, d, f, E, k, GPT_OSS)
    gpt_oss = moe_ext.activation_from(GPT_OSS)
    concatenated = dataclasses.replace(gpt_oss, interleaved=False)
    w13_cat = np.ascontiguousarray(np.concatenate([w13[:, 0::2], w13[:, 1::2]], axis=1))
    b13_cat = np.ascontiguousarray(np.concatenate([b13[:, 0::2], b13[:, 1::2]], axis=1))
    base = moe_ext.experts(x, w13_cat, w2, weights, ids, activation=concatenated, b13_or_b1=b13_cat, b2=b2)
    for packed in (False, True):
        for layout in ("contiguous", "transposed"):
            y = moe_ext.experts(x, *weight_args(w13, w2, layout, packed), weights, ids, activation=gpt_oss,
                                b13_or_b1=b13, b2=b2)
            np.testing.assert_array_equal(y, base, err_msg=f"{layout} packed={packed}")


@pytest.mark.parametrize("T,f", [(80, 40), (3, 300)], ids=["prefill", "decode-wide-tiles"])
def test_results_do_not_depend_on_the_thread_count(rng, T, f):
    """Also where transposed decode tiles narrow with more threads: only the tile of a column changes."""
    d, E, k = 48, 4, 2
    x, w13, w2, b13, b2, weights, ids = expert_inputs(rng, T, d, f, E, k, GPT_OSS)
    before = moe_ext.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            moe_ext.set_num_threads(threads)
            results.append(moe_ext.experts(x, transposed(w13), w2, weights, ids, activation=GPT_OSS,
                                           b13_or_b1=b13, b2=b2))
    finally:
        moe_ext.set_num_threads(before)
    for y in results[1:]:
        np.testing.assert_array_equal(y, results[0])


# ---------------------------------------------------------------------------------------------------
# grouped_gemm
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=[d.name for d in DTYPES])
@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("counts", [[0, 0, 0], [1, 0, 2], [5, 20, 3], [140, 7, 0]], ids=str)
def test_grouped_gemm_bias_and_layouts(rng, counts, layout, packed, dtype):
    E, N, K = 3, 45, 37
    offsets = random_offsets(rng, E, counts=counts)
    a = random_x(rng, int(offsets[-1]), K).astype(dtype)
    w = random_weights(rng, (E, N, K), K).astype(dtype)
    bias = rng.standard_normal((E, N)).astype(dtype)
    arg = transposed(w) if layout == "transposed" else w
    arg = moe_ext.prepack(arg) if packed else arg
    out = moe_ext.grouped_gemm(a, arg, offsets, bias=bias)
    assert out.dtype == dtype and out.shape == (a.shape[0], N)
    assert_close(out, ref.grouped_gemm(*f64(a, w), offsets, bias=f64(bias)), ONE_ROUNDING[dtype], "grouped_gemm")
    no_bias = moe_ext.grouped_gemm(a, arg, offsets)
    assert_close(no_bias, ref.grouped_gemm(*f64(a, w), offsets), ONE_ROUNDING[dtype], "grouped_gemm")


def test_prepack_of_a_transposed_view_is_the_usual_packing(rng):
    w = random_weights(rng, (2, 50, 29), 29)
    a = random_x(rng, 40, 29)
    offsets = np.array([0, 25, 40], dtype=np.int32)
    np.testing.assert_array_equal(moe_ext.grouped_gemm(a, moe_ext.prepack(transposed(w)), offsets),
                                  moe_ext.grouped_gemm(a, moe_ext.prepack(w), offsets))


# ---------------------------------------------------------------------------------------------------
# quantised weights: the same epilogue (activation descriptions, biases)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activations", [None, "int8"], ids=["weight-only", "int8-activations"])
@pytest.mark.parametrize("scheme,group", [("int8", None), ("int4", 32)])
@pytest.mark.parametrize("activation", [GPT_OSS, "swiglu(limit=7.0)", "relu2", "gelu_tanh"])
def test_quantized_experts_with_descriptions_and_biases(rng, activation, scheme, group, activations):
    T, d, f, E, k = 21, 64, 32, 3, 2
    x, w13, w2, b13, b2, weights, ids = expert_inputs(rng, T, d, f, E, k, activation)
    q13, q2 = (moe_ext.quantize(w, scheme, group_size=group, activations=activations) for w in (w13, w2))
    y = moe_ext.experts(x, q13, q2, weights, ids, activation=activation, b13_or_b1=b13, b2=b2)
    quantized = activations == "int8"
    want = ref.quantized_experts(x, moe_ext.dequantize(q13), moe_ext.dequantize(q2), weights, ids,
                                 activation=activation, quantize_inputs=(quantized, quantized),
                                 b13_or_b1=f64(b13), b2=f64(b2))
    # Per-token int8 rounding of the second GEMM's input can flip where float32 and float64 activations
    # straddle a rounding boundary: a looser bound there (one int8 step in a few elements).
    assert_close(y, want, 1e-3 if quantized else GEMM_RTOL, "quantized experts")


def test_quantize_a_transposed_view(rng):
    w = random_weights(rng, (2, 40, 64), 64)
    for scheme, group in (("int8", None), ("int4", 32)):
        np.testing.assert_array_equal(moe_ext.dequantize(moe_ext.quantize(transposed(w), scheme, group_size=group)),
                                      moe_ext.dequantize(moe_ext.quantize(w, scheme, group_size=group)))


def test_quantized_grouped_gemm_bias(rng):
    E, N, K = 2, 70, 64
    offsets = np.array([0, 3, 50], dtype=np.int32)
    a = random_x(rng, 50, K)
    w = random_weights(rng, (E, N, K), K)
    bias = rng.standard_normal((E, N)).astype(np.float32)
    q = moe_ext.quantize(w, "int8")
    out = moe_ext.grouped_gemm(a, q, offsets, bias=bias)
    assert_close(out, ref.grouped_gemm(f64(a), moe_ext.dequantize(q).astype(np.float64), offsets, bias=f64(bias)),
                 GEMM_RTOL, "grouped_gemm")


# ---------------------------------------------------------------------------------------------------
# backward: bias gradients, transposed weights
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("counts", [[0, 0], [3, 0, 9], [1], [17, 4, 0, 2]], ids=str)
def test_bias_grad_is_the_per_expert_row_sum(rng, counts):
    offsets = random_offsets(rng, len(counts), counts=counts)
    grad_out = random_x(rng, int(offsets[-1]), 23)
    with unchanged(grad_out, offsets):
        got = moe_ext.bias_grad(grad_out, offsets)
    assert got.dtype == np.float32 and got.shape == (len(counts), 23)
    assert_close(got, ref.bias_grad(f64(grad_out), offsets), 1e-6, "bias_grad")


def test_bias_grad_matches_finite_differences_of_grouped_gemm():
    """d/d bias of sum(grouped_gemm(a, w, offsets, bias) * g) is bias_grad(g, offsets) (linear: exact)."""
    rng = np.random.default_rng(17)
    offsets = np.array([0, 4, 4, 9], dtype=np.int32)
    a, w = rng.standard_normal((9, 5)), rng.standard_normal((3, 6, 5))
    bias, g = rng.standard_normal((3, 6)), rng.standard_normal((9, 6))
    numeric = np.zeros_like(bias)
    for idx in np.ndindex(*bias.shape):
        bp, bm = bias.copy(), bias.copy()
        bp[idx] += 0.5
        bm[idx] -= 0.5
        numeric[idx] = ((ref.grouped_gemm(a, w, offsets, bias=bp) - ref.grouped_gemm(a, w, offsets, bias=bm)) * g).sum()
    np.testing.assert_allclose(ref.bias_grad(g, offsets), numeric, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(moe_ext.bias_grad(g.astype(np.float32), offsets), numeric, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("counts", [[6, 0, 11], [20, 0, 25]], ids=["few-rows", "packed"])
def test_grouped_gemm_backward_with_transposed_weights(rng, counts):
    """grad_a reads w in place either way (as the forward's transposed or row-major weight): bit-identical to
    the plain layout's where every expert has more than 16 rows (both then pack the same panels), equal to
    float32 rounding where the few-row paths differ; grad_w does not read w."""
    E, N, K = 3, 29, 41
    offsets = random_offsets(rng, E, counts=counts)
    M = sum(counts)
    a = random_x(rng, M, K)
    w = random_weights(rng, (E, N, K), K)
    g = random_x(rng, M, N)
    grad_a, grad_w = moe_ext.grouped_gemm_backward(g, a, transposed(w), offsets)
    want_a, want_w = ref.grouped_gemm_backward(*f64(g, a, w), offsets)
    assert grad_w.shape == (E, N, K) and grad_w.flags.c_contiguous
    assert_close(grad_a, want_a, GEMM_RTOL, "grad_a")
    assert_close(grad_w, want_w, GEMM_RTOL, "grad_w")
    plain_a, plain_w = moe_ext.grouped_gemm_backward(g, a, w, offsets)
    assert_close(plain_a, want_a, GEMM_RTOL, "grad_a, plain w")
    if min(c for c in counts if c) > 16:
        np.testing.assert_array_equal(grad_a, plain_a)
    np.testing.assert_array_equal(grad_w, plain_w)


# ---------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------
def _experts_args(rng):
    x, w13, w2, b13, b2, weights, ids = expert_inputs(np.random.default_rng(0), 4, 6, 5, 3, 2, "swiglu")
    return dict(x=x, w13_or_w1=w13, w2=w2, topk_weights=weights, topk_ids=ids, b13_or_b1=b13, b2=b2)


BAD_BIASES = [
    ("b13_or_b1", lambda b: np.ascontiguousarray(b[:, :-1]), ValueError, "shape"),
    ("b13_or_b1", lambda b: b[None], ValueError, "2-d"),
    ("b13_or_b1", lambda b: b.astype(np.float64), TypeError, "dtype"),
    ("b13_or_b1", lambda b: b.tolist(), TypeError, "numpy.ndarray"),
    ("b13_or_b1", lambda b: b[:, ::2], ValueError, "C-contiguous"),
    ("b2", lambda b: b.T.copy(), ValueError, "shape"),
    ("b2", lambda b: b[0], ValueError, "2-d"),
    ("b2", lambda b: b.astype(np.int32), TypeError, "dtype"),
]


@pytest.mark.parametrize("op", ["experts", "moe"])
@pytest.mark.parametrize("name,bad,error,what", BAD_BIASES, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_BIASES)])
def test_bad_biases_name_the_argument(rng, op, name, bad, error, what):
    kw = _experts_args(rng)
    kw[name] = bad(kw[name])
    with pytest.raises(error, match=f"^{name}: expected .*{what}"):
        if op == "experts":
            moe_ext.experts(**kw)
        else:
            x, w13, w2 = kw.pop("x"), kw.pop("w13_or_w1"), kw.pop("w2")
            kw.pop("topk_weights"), kw.pop("topk_ids")
            moe_ext.moe(x, random_router(rng, 3, 6), w13, w2, 2, **kw)


def test_bias_shape_follows_the_activation(rng):
    kw = _experts_args(rng)
    with pytest.raises(ValueError, match=r"^b13_or_b1: expected shape \(3, 10\) \(E, 2f\)"):
        moe_ext.experts(**dict(kw, b13_or_b1=kw["b13_or_b1"][:, :5].copy()))


@pytest.mark.parametrize("bad,error", [(lambda b: np.ascontiguousarray(b[:, :-1]), ValueError), (lambda b: b.astype(np.float64), TypeError),
                                       (lambda b: b[0], ValueError)])
def test_grouped_gemm_bad_bias(rng, bad, error):
    w = random_weights(rng, (2, 5, 3), 3)
    bias = np.zeros((2, 5), np.float32)
    with pytest.raises(error, match="^bias: expected"):
        moe_ext.grouped_gemm(random_x(rng, 4, 3), w, np.array([0, 2, 4], np.int32), bias=bad(bias))


OTHER_STRIDES = {
    "sliced": lambda w: w[:, ::2],
    "swapped-01": lambda w: np.ascontiguousarray(w.transpose(1, 0, 2)).transpose(1, 0, 2),
    "fortran": lambda w: np.asfortranarray(w),
    "transposed-of-sliced": lambda w: np.ascontiguousarray(w.transpose(0, 2, 1))[:, :, :].transpose(0, 2, 1)[:, ::2],
}


@pytest.mark.parametrize("how", OTHER_STRIDES)
def test_weights_with_other_strides_raise(rng, how):
    E, N, K = 3, 8, 6
    w = OTHER_STRIDES[how](random_weights(rng, (E, 2 * N, K), K))
    assert not w.flags.c_contiguous and not w.transpose(0, 2, 1).flags.c_contiguous
    offsets = np.array([0, 1, 2, 3], np.int32)
    with pytest.raises(ValueError, match=r"^w: expected a C-contiguous array \[E, N, K\] or the transposed view"):
        moe_ext.grouped_gemm(random_x(rng, 3, K), w, offsets)
    with pytest.raises(ValueError, match="^w: expected a C-contiguous array"):
        moe_ext.prepack(w)
    with pytest.raises(ValueError, match="^w13_or_w1: expected a C-contiguous array"):
        moe_ext.experts(random_x(rng, 2, K), w, random_weights(rng, (E, K, w.shape[1] // 2), 4),
                        random_topk_weights(rng, 2, 1), random_ids(rng, 2, E, 1))
    with pytest.raises(ValueError, match="^w: expected a C-contiguous array"):
        moe_ext.grouped_gemm_backward(random_x(rng, 3, w.shape[1]), random_x(rng, 3, K), w, offsets)


def test_torch_transposed_weights_pass_without_a_copy(rng):
    """HF stores gpt-oss's gate_up_proj as [E, d, 2f]: w_t.transpose(1, 2).numpy() is accepted as it is."""
    torch = pytest.importorskip("torch")
    T, d, f, E, k = 5, 12, 7, 3, 2
    x, w13, w2, b13, b2, weights, ids = expert_inputs(rng, T, d, f, E, k, GPT_OSS)
    gate_up_proj = torch.from_numpy(np.ascontiguousarray(w13.transpose(0, 2, 1)))  # [E, d, 2f]
    view = gate_up_proj.transpose(1, 2).numpy()
    assert np.shares_memory(view, gate_up_proj.numpy()) and not view.flags.c_contiguous
    y = moe_ext.experts(x, view, w2, weights, ids, activation=GPT_OSS, b13_or_b1=b13, b2=b2)
    want = ref.experts(*f64(x, w13, w2), f64(weights), ids, activation=GPT_OSS, b13_or_b1=f64(b13), b2=f64(b2))
    assert_close(y, want, GEMM_RTOL, "experts")
