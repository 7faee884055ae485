"""Activations as data (moe_ext.Activation, SPEC §3.6): the description and its canonical string, the
errors, and the standalone activation and its backward on every tier against the float64 reference
(which is itself checked against finite differences here)."""
import dataclasses
import math

import numpy as np
import pytest

import moe_ext
from moe_ext import reference as ref
from conftest import assert_close, f64, unchanged

# Every preset, plus the clamped SwiGLU (deepseek_v4 / hy_v4), the gpt-oss gate, interleaved forms and
# the (fn, gated) pairs without a preset name.
DESCRIPTIONS = ("swiglu", "geglu", "geglu_tanh", "relu", "gelu", "gelu_tanh", "relu2",
                "swiglu(limit=7.0)",
                "swiglu(alpha=1.702,limit=7.0,up_offset=1.0,interleaved)",
                "swiglu(interleaved)", "geglu_tanh(limit=3.5,interleaved)", "geglu(up_offset=-0.5)",
                "relu(gated=True)", "relu2(gated=True,limit=2.0)", "silu(gated=False)",
                "silu(gated=False,alpha=0.5)",
                # Inkling2's softcapped SwiGLU (its config's defaults), and the softcaps with the other fields
                "swiglu(gate_softcap=4.0,up_softcap=25.0)",
                "swiglu(gate_softcap=1.5,up_softcap=2.0,interleaved)",
                "swiglu(alpha=1.702,limit=7.0,gate_softcap=3.0,up_softcap=5.0,up_offset=1.0)",
                "swiglu(gate_softcap=2.0)", "geglu(up_softcap=2.0)", "relu2(gated=True,limit=2.0,up_softcap=1.5)")
LIMIT = 7.0
# As tests/test_backward.py: expf/erfcf are a few ulp, and the gradients chain a handful of float32 ops.
ACT_RTOL = 1e-5


def cols(activation, f):
    return 2 * f if moe_ext.activation_from(activation).gated else f


def _softcaps(a):
    return [c for c in (a.gate_softcap, a.up_softcap) if c is not None]


def inputs(rng, shape, activation):
    """h for an activation: with a limit L, values spread over about [-2L, 2L] so the clamps bite, some
    exactly at +-L and 0; without one ~N(0, 2.5^2) (far tails only cost float32 accuracy of the argument,
    e.g. gelu's erfc at z = -12 amplifies the rounding of z 300 times). With softcaps c: spread over
    about [-2c, 2c] of the largest c too (with a limit: within the clamps), and values at +-2c, +-c of
    every c, tanh's polynomial/exponential switch (|z/c| = 0.25) and 0."""
    a = moe_ext.activation_from(activation)
    limit, caps = a.limit, _softcaps(a)
    spread = max([limit or 2.5] + [2 * c for c in caps if limit is None])
    h = (rng.standard_normal(shape) * spread).astype(np.float32)
    flat = h.reshape(-1)
    pinned = [] if limit is None else [limit, -limit, 0.0, np.float32(limit) * 1.5]
    for c in caps:
        pinned += [2 * c, -2 * c, c, -c, 0.25 * c, -0.25 * c, 0.2 * c]
    count = min(len(pinned), flat.size)
    flat[:count] = pinned[:count]
    return h


def away_from_offset_cancellation(h, activation):
    """With an up_offset, up + up_offset rounds in float32 (the reference adds in float64): moves up values
    whose sum nearly cancels, where that one rounding would be a large relative error of the element."""
    a = moe_ext.activation_from(activation)
    if not a.gated or a.up_offset == 0.0:
        return h
    up = h[:, 1::2] if a.interleaved else h[:, h.shape[1] // 2:]
    up[...] = np.where(np.abs(up + np.float32(a.up_offset)) < 0.25, up + np.float32(1.0), up)
    return h


# ---------------------------------------------------------------------------------------------------
# The description
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", DESCRIPTIONS)
def test_canonical_string_round_trips(text):
    a = moe_ext.Activation.parse(text)
    assert str(a) == text == a.spec
    assert moe_ext.activation_from(a.spec) == a
    assert moe_ext.activation_from(a) is a


def test_presets_and_fields():
    A = moe_ext.Activation
    assert moe_ext.activation_from("swiglu") == A("silu", True)
    assert moe_ext.activation_from("geglu_tanh") == A("gelu_tanh", True)
    assert moe_ext.activation_from("relu2") == A("relu2", False)
    gpt_oss = A("silu", True, interleaved=True, alpha=1.702, limit=7.0, up_offset=1.0)
    assert str(gpt_oss) == "swiglu(alpha=1.702,limit=7.0,up_offset=1.0,interleaved)"
    assert str(A("silu", True, limit=7)) == "swiglu(limit=7.0)"  # ints become floats
    assert moe_ext.Activation.parse(" swiglu( limit = 7 , interleaved=True ) ") == A("silu", True, True, limit=7.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        gpt_oss.limit = 1.0
    assert hash(gpt_oss) == hash(moe_ext.Activation.parse(str(gpt_oss)))


BAD = [
    (lambda: moe_ext.Activation("tanh", True), "fn"),
    (lambda: moe_ext.Activation("relu", False, limit=7.0), "limit only with a gated"),
    (lambda: moe_ext.Activation("gelu", True, alpha=1.702), "alpha only with fn 'silu'"),
    (lambda: moe_ext.Activation("silu", True, limit=0.0), "limit > 0"),
    (lambda: moe_ext.Activation("silu", True, limit=-1.0), "limit > 0"),
    (lambda: moe_ext.Activation("silu", True, limit=math.nan), "limit finite"),
    (lambda: moe_ext.Activation("silu", True, limit=math.inf), "limit finite"),
    (lambda: moe_ext.Activation("gelu", False, interleaved=True), "interleaved only with a gated"),
    (lambda: moe_ext.Activation("gelu", False, up_offset=1.0), "up_offset only with a gated"),
    (lambda: moe_ext.Activation("silu", "yes"), "gated a bool"),
    (lambda: moe_ext.Activation("silu", True, alpha="1"), "alpha a real number"),
    (lambda: moe_ext.activation_from("silu"), "preset name"),
    (lambda: moe_ext.activation_from("SwiGLU"), "preset name"),
    (lambda: moe_ext.activation_from("swiglu(limit=abc)"), "limit=<number>"),
    (lambda: moe_ext.activation_from("swiglu(limit=nan)"), "limit finite"),
    (lambda: moe_ext.activation_from("swiglu(limit=7.0"), "name(field=value"),
    (lambda: moe_ext.activation_from("swiglu(limit=1,limit=2)"), "at most once"),
    (lambda: moe_ext.activation_from("swiglu(beta=1)"), "fields gated"),
    (lambda: moe_ext.activation_from("relu(limit=7.0)"), "limit only with a gated"),
    (lambda: moe_ext.activation_from("swiglu(interleaved=yes)"), "interleaved=True"),
    (lambda: moe_ext.Activation("gelu", True, gate_softcap=4.0), "gate_softcap only with fn 'silu'"),
    (lambda: moe_ext.activation_from("geglu_tanh(gate_softcap=4.0)"), "gate_softcap only with fn 'silu'"),
    (lambda: moe_ext.Activation("silu", False, gate_softcap=4.0), "gate_softcap only with a gated"),
    (lambda: moe_ext.Activation("gelu", False, up_softcap=4.0), "up_softcap only with a gated"),
    (lambda: moe_ext.Activation("silu", True, gate_softcap=0.0), "gate_softcap > 0"),
    (lambda: moe_ext.Activation("silu", True, up_softcap=-3.0), "up_softcap > 0"),
    (lambda: moe_ext.Activation("silu", True, up_softcap=math.inf), "up_softcap finite"),
    (lambda: moe_ext.Activation("silu", True, gate_softcap=math.nan), "gate_softcap finite"),
    (lambda: moe_ext.Activation("silu", True, up_softcap="30"), "up_softcap a real number"),
    (lambda: moe_ext.Activation("silu", True, gate_softcap=True), "gate_softcap a real number"),
    (lambda: moe_ext.activation_from("swiglu(up_softcap=inf)"), "up_softcap finite"),
    (lambda: moe_ext.activation_from("swiglu(gate_softcap=)"), "gate_softcap=<number>"),
]


@pytest.mark.parametrize("make,message", BAD, ids=[m for _, m in BAD])
def test_invalid_descriptions_raise(make, message):
    with pytest.raises(ValueError, match="^activation: expected") as info:
        make()
    assert message in str(info.value)


@pytest.mark.parametrize("value", [0, None, 1.5, ("silu", True)])
def test_not_a_description_is_a_type_error(value):
    with pytest.raises(TypeError, match="activation"):
        moe_ext.activation_from(value)


# ---------------------------------------------------------------------------------------------------
# activation and activation_backward on the kernels
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", DESCRIPTIONS)
@pytest.mark.parametrize("M,f", [(0, 5), (1, 1), (3, 8), (7, 13), (5, 37)])
def test_activation_and_backward_match_reference(rng, text, M, f):
    h = away_from_offset_cancellation(inputs(rng, (M, cols(text, f)), text), text)
    g = rng.standard_normal((M, f)).astype(np.float32)
    for activation in (text, moe_ext.activation_from(text)):  # strings and objects alike
        with unchanged(h, g):
            out = moe_ext.activation(h, activation)
            grad_h = moe_ext.activation_backward(g, h, activation)
        assert out.shape == (M, f) and grad_h.shape == h.shape
        assert_close(out, ref.activation(f64(h), text), ACT_RTOL, "activation")
        assert_close(grad_h, ref.activation_backward(f64(g), f64(h), text), ACT_RTOL, "activation_backward")


@pytest.mark.parametrize("text", DESCRIPTIONS)
def test_reference_derivative_matches_finite_differences(rng, text):
    """Central differences of the float64 reference, away from the kinks (relu at 0, the clamps at +-L)."""
    f = 6
    a = moe_ext.activation_from(text)
    span = max([2.5] + [2.2 * c for c in _softcaps(a)])  # across +-2c of every softcap c
    h = rng.uniform(-span, span, size=(3, cols(text, f)))
    if a.limit is not None:  # move values off the clamps' kinks by more than eps
        h = np.where(np.abs(np.abs(h) - a.limit) < 1e-3, h + 0.01, h)
    h = np.where(np.abs(h) < 1e-3, h + 0.01, h)
    g = rng.standard_normal((3, f))
    analytic = ref.activation_backward(g, h, text)
    numeric = np.zeros_like(h)
    eps = 1e-6
    for idx in np.ndindex(*h.shape):
        hp, hm = h.copy(), h.copy()
        hp[idx] += eps
        hm[idx] -= eps
        numeric[idx] = ((ref.activate(hp, text) - ref.activate(hm, text)) * g).sum() / (2 * eps)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-7, err_msg=text)


def test_clamps_pass_no_gradient_where_they_bite_and_nan_propagates():
    a = "swiglu(limit=1.0)"
    h = np.array([[2.0, 0.5, np.nan, 3.0, -3.0, 0.25]], dtype=np.float32)  # gate | up, f = 3
    g = np.ones((1, 3), dtype=np.float32)
    out = moe_ext.activation(h, a)
    assert np.isnan(out[0, 2]) and np.isfinite(out[0, :2]).all()
    grad = moe_ext.activation_backward(g, h, a)
    assert grad[0, 0] == 0.0  # gate 2 > 1: clamped
    assert grad[0, 3] == 0.0 and grad[0, 4] == 0.0  # |up| = 3 > 1: clamped
    assert np.isnan(grad[0, 2])
    np.testing.assert_allclose(out, ref.activation(h.astype(np.float64), a), rtol=1e-6)


def test_softcaps_bound_and_pass_gradients_as_tanh_does():
    """softcap(z) = c tanh(z / c): the gate's linear factor and up are bounded by their caps while the
    sigmoid sees the raw gate; far past the caps the gradients vanish, NaN propagates, inf is capped."""
    a = "swiglu(gate_softcap=2.0,up_softcap=3.0)"
    gate = np.array([1e4, -1e4, 0.5, np.nan, np.inf, 1.0], dtype=np.float32)
    up = np.array([1e4, 1e4, -1e4, 1.0, 1.0, np.inf], dtype=np.float32)
    h = np.concatenate([gate, up])[None]
    out = moe_ext.activation(h, a)[0]
    np.testing.assert_allclose(out[[0, 1, 4, 5]], [6.0, 0.0, 6 * np.tanh(1 / 3), 2 * np.tanh(0.5) / (1 + np.exp(-1.0)) * 3],
                               rtol=1e-6)
    assert abs(out[2] - 2 * np.tanh(0.25) / (1 + np.exp(-0.5)) * -3) < 1e-5 and np.isnan(out[3])
    grad = moe_ext.activation_backward(np.ones((1, 6), np.float32), h, a)[0]
    assert grad[0] == 0.0 and grad[6] == 0.0  # both saturated
    assert np.isnan(grad[3])
    np.testing.assert_allclose(moe_ext.activation(h, a), ref.activation(h.astype(np.float64), a), rtol=1e-6)


def test_interleaved_is_the_concatenated_activation_of_the_same_pairs(rng):
    """h interleaved g0 u0 g1 u1 ... gives bit for bit what [gate | up] gives, forward and backward."""
    M, f = 9, 21
    for text in ("swiglu(alpha=1.702,limit=7.0,up_offset=1.0,interleaved)", "geglu_tanh(interleaved)"):
        a = moe_ext.activation_from(text)
        plain = dataclasses.replace(a, interleaved=False)
        h = inputs(rng, (M, 2 * f), text)
        g = rng.standard_normal((M, f)).astype(np.float32)
        concatenated = np.ascontiguousarray(np.concatenate([h[:, 0::2], h[:, 1::2]], axis=1))
        np.testing.assert_array_equal(moe_ext.activation(h, a), moe_ext.activation(concatenated, plain))
        grad = moe_ext.activation_backward(g, h, a)
        grad_plain = moe_ext.activation_backward(g, concatenated, plain)
        np.testing.assert_array_equal(grad[:, 0::2], grad_plain[:, :f])
        np.testing.assert_array_equal(grad[:, 1::2], grad_plain[:, f:])


def test_shape_errors_name_h_and_grad_act(rng):
    with pytest.raises(ValueError, match="^h: expected an even number of columns"):
        moe_ext.activation(rng.standard_normal((2, 5)).astype(np.float32), "swiglu(interleaved)")
    with pytest.raises(ValueError, match="^grad_act: expected shape"):
        moe_ext.activation_backward(np.zeros((2, 3), np.float32), np.zeros((2, 4), np.float32), "relu2")
