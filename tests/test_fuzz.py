"""Property-based fuzzing of the public API (hypothesis).

Each example builds one call of one op with random shapes, id values, offsets, capacity, NaN/Inf entries,
int32/int64 ids, read-only arrays, and at most one deliberate fault (wrong type, dtype, rank, layout, ids
out of range or past int32, bad offsets, bad rows, bad top_k or capacity). Then:
- a call with a fault raises ValueError or TypeError with a message "<argument>: expected ...; got ...";
- a call without one returns what moe_ext.reference returns (float64, NaN where the reference has NaN);
- no input is ever modified, and nothing crashes (a crash would take the test process down).

Bounded here; the long run is
    MOE_EXT_FUZZ_EXAMPLES=20000 python -m pytest tests/test_fuzz.py -q -s -p no:cacheprovider
which prints the number of calls made per op.
"""
import collections
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moe_ext
from moe_ext import reference as ref

EXAMPLES = int(os.environ.get("MOE_EXT_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize="MOE_EXT_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=list(HealthCheck), database=None)
# float32 kernels against the float64 reference on O(1) data with dot products of length <= 24:
# ~1e-6 relative at worst; 1e-4 (plus a small absolute term for cancellations) catches any wrong index.
RTOL, ATOL = 1e-4, 1e-5
CALLS = collections.Counter()
TIERS = moe_ext.available_isas()


PER_TIER = False  # the tier is drawn per example instead of repeating the whole run per tier


class Call:
    """One fuzzed call: named arguments, the fault injected (if any), and the draw helper."""

    def __init__(self, draw):
        self.draw, self.fault = draw, None

    def maybe(self, fault):
        """Decide (at most once per call) whether to inject `fault`."""
        if self.fault is None and self.draw(st.integers(0, 29)) == 0:
            self.fault = fault
            return True
        return False

    def floats(self, name, shape, *, nan=True, data=False):
        """float32 values; `data` arrays (activations, expert weights) also take bfloat16 and float16,
        so only other dtypes are faults for them."""
        rng = np.random.default_rng(self.draw(st.integers(0, 2**32 - 1)))
        a = rng.standard_normal(shape).astype(np.float32)
        if nan and a.size and self.draw(st.integers(0, 5)) == 0:
            a.flat[self.draw(st.integers(0, a.size - 1))] = self.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        bad = [np.float64, np.int32] if data else [np.float64, np.float16, np.int32]
        return self.finish(name, a, bad_dtypes=bad)

    def ints(self, name, values, *, bad_values=()):
        a = np.asarray(values, dtype=self.draw(st.sampled_from([np.int32, np.int64])))
        if a.size and bad_values and self.maybe(f"{name} value"):
            bad = self.draw(st.sampled_from(list(bad_values) + [2**40, -(2**40)]))
            a = a.astype(np.int64)
            a.flat[self.draw(st.integers(0, a.size - 1))] = bad
        return self.finish(name, a, bad_dtypes=[np.float32, np.int16, np.uint32])

    def finish(self, name, a, bad_dtypes):
        if self.maybe(f"{name} dtype"):
            with np.errstate(invalid="ignore"):  # NaN to int is fine: the call must reject the dtype
                a = a.astype(self.draw(st.sampled_from(bad_dtypes)))
        elif a.size and a.shape[-1] > 1 and self.maybe(f"{name} layout"):
            a = np.repeat(a, 2, axis=-1)[..., ::2]  # same values, strided view
        elif self.maybe(f"{name} rank"):
            a = a[None] if a.ndim == 1 or self.draw(st.booleans()) else a.reshape(-1)
        elif self.maybe(f"{name} type"):
            return a.tolist()
        if self.draw(st.booleans()) and isinstance(a, np.ndarray):
            a.flags.writeable = False
        return a


def dims(draw):
    T = draw(st.integers(0, 12))
    E = draw(st.integers(1, 9))
    return T, draw(st.integers(1, 24)), draw(st.integers(1, 13)), E, draw(st.integers(1, E))


def valid_ids(call, T, k, E, name="topk_ids"):
    rng = np.random.default_rng(call.draw(st.integers(0, 2**32 - 1)))
    ids = np.stack([rng.permutation(E)[:k] for _ in range(T)]) if T else np.zeros((0, k), np.int64)
    return call.ints(name, ids.reshape(T, k), bad_values=[E, -1, E + 100])


def expect(call, ours, theirs, compare):
    """Run the call; check the error contract or the parity contract; inputs must not change."""
    inputs = [a for a in call.args if isinstance(a, np.ndarray)]
    before = [a.tobytes() for a in inputs]
    CALLS[call.op] += 1
    try:
        got = ours()
    except (ValueError, TypeError) as error:
        CALLS[call.op + " raised"] += 1
        assert call.fault is not None, f"{call.op} rejected a valid call: {error!r}"
        assert ": expected " in str(error), f"{call.op}: message without argument/expected: {error!r}"
    else:
        assert call.fault is None, f"{call.op} accepted a call with a fault ({call.fault})"
        with np.errstate(all="ignore"):
            compare(got, theirs())
    assert [a.tobytes() for a in inputs] == before, f"{call.op} modified an input"


def close(got, want):
    """Elementwise within RTOL, plus an absolute slack scaled by the largest finite value: an output that
    cancels to near 0 carries the float32 rounding of its O(max) summands, not of itself."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    finite = np.abs(want[np.isfinite(want)])
    scale = max(1.0, float(finite.max())) if finite.size else 1.0
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL * scale, equal_nan=True)


def f64(*arrays):
    return [np.asarray(a, np.float64) for a in arrays]


def pick_tier(draw):
    moe_ext.set_isa(draw(st.sampled_from(TIERS)))


@st.composite
def route_calls(draw):
    pick_tier(draw)
    call, (T, d, _, E, k) = Call(draw), dims(draw)
    call.op = "route"
    x, w = call.floats("x", (T, d), data=True), call.floats("w_router", (E, d), data=True)
    if call.maybe("top_k"):
        k = draw(st.sampled_from([0, E + 1, -1]))
    options = dict(scoring=draw(st.sampled_from(["softmax", "sigmoid"])), renormalize=draw(st.booleans()))
    if draw(st.booleans()):
        options["correction_bias"] = call.floats("correction_bias", (E,), nan=False)
    groups = [g for g in range(1, E + 1) if E % g == 0]
    if draw(st.booleans()):
        n_group = draw(st.sampled_from(groups))
        topk_group = draw(st.integers(1, n_group))
        if topk_group * (E // n_group) < k and not call.maybe("topk_group"):
            topk_group = n_group
        options.update(n_group=n_group, topk_group=topk_group)
    call.args = [x, w, *options.values()]
    return call, x, w, k, options


@given(route_calls())
@FUZZ
def test_fuzz_route(example):
    call, x, w, k, options = example

    def compare(got, want):
        weights, ids = got
        ref_weights, ref_ids = want
        assert ids.dtype == np.int32 and ((ids >= 0) & (ids < w.shape[0])).all()
        # Near ties may resolve either way between float32 and float64; compare rows that agree.
        same = (ids == ref_ids).all(axis=1)
        close(weights[same], ref_weights[same])

    expect(call, lambda: moe_ext.route(x, w, k, **options),
           lambda: ref.route(*f64(x, w), k, **{key: (np.asarray(v, np.float64) if isinstance(v, np.ndarray) else v)
                                               for key, v in options.items()}), compare)


@st.composite
def permute_calls(draw):
    pick_tier(draw)
    call, (T, d, _, E, k) = Call(draw), dims(draw)
    call.op = "permute"
    x = call.floats("x", (T, d), data=True)
    ids = valid_ids(call, T, k, E)
    capacity = draw(st.sampled_from([None, 0, 1, 2, 100]))
    if call.maybe("capacity"):
        capacity = draw(st.sampled_from([-1, 1.5, "2"]))
    call.args = [x, ids]
    return call, x, ids, E, capacity


@given(permute_calls())
@FUZZ
def test_fuzz_permute(example):
    call, x, ids, E, capacity = example

    def compare(got, want):
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)

    expect(call, lambda: moe_ext.permute(x, ids, E, capacity=capacity),
           lambda: ref.permute(x, np.asarray(ids), E, capacity=capacity), compare)


@st.composite
def grouped_gemm_calls(draw):
    pick_tier(draw)
    call = Call(draw)
    call.op = "grouped_gemm"
    M, N, K, E = draw(st.integers(0, 20)), draw(st.integers(1, 17)), draw(st.integers(0, 19)), draw(st.integers(1, 6))
    a, w = call.floats("a", (M, K), data=True), call.floats("w", (E, N, K), data=True)
    cuts = sorted(draw(st.lists(st.integers(0, M), min_size=E - 1, max_size=E - 1)))
    offsets = np.array([0, *cuts, M])
    if call.maybe("offsets values"):
        where = draw(st.integers(0, E))
        offsets[where] += draw(st.sampled_from([-1, 1, M + 5]))
        if np.all(np.diff(offsets) >= 0) and offsets[0] == 0 and offsets[-1] == M:
            call.fault = None  # the nudge happened to keep a valid cover
    offsets = call.ints("expert_offsets", offsets)
    call.args = [a, w, offsets]
    return call, a, w, offsets


@given(grouped_gemm_calls())
@FUZZ
def test_fuzz_grouped_gemm(example):
    call, a, w, offsets = example
    expect(call, lambda: moe_ext.grouped_gemm(a, w, offsets),
           lambda: ref.grouped_gemm(*f64(a, w), np.asarray(offsets)), close)


@st.composite
def unpermute_calls(draw):
    pick_tier(draw)
    call = Call(draw)
    call.op = "unpermute"
    T, k, d, M = draw(st.integers(0, 12)), draw(st.integers(1, 6)), draw(st.integers(1, 20)), draw(st.integers(0, 30))
    y_perm = call.floats("y_perm", (M, d), data=True)
    rows = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).integers(-1, M, size=(T, k))
    rows = call.ints("perm_rows", rows, bad_values=[M, -2, M + 7])
    weights = call.floats("topk_weights", (T, k))
    call.args = [y_perm, rows, weights]
    return call, y_perm, rows, weights


@given(unpermute_calls())
@FUZZ
def test_fuzz_unpermute(example):
    call, y_perm, rows, weights = example
    expect(call, lambda: moe_ext.unpermute(y_perm, rows, weights),
           lambda: ref.unpermute(*f64(y_perm), np.asarray(rows), *f64(weights)), close)


@st.composite
def experts_calls(draw):
    pick_tier(draw)
    call, (T, d, f, E, k) = Call(draw), dims(draw)
    call.op = "experts"
    activation = draw(st.sampled_from(["swiglu", "geglu", "relu", "gelu"]))
    rows = 2 * f if activation in ("swiglu", "geglu") else f
    if call.maybe("w13_or_w1 rows"):
        rows = f if rows == 2 * f else 2 * f
    x, w13 = call.floats("x", (T, d), data=True), call.floats("w13_or_w1", (E, rows, d), data=True)
    w2 = call.floats("w2", (E, d, f), data=True)
    ids = valid_ids(call, T, k, E)
    weights = call.floats("topk_weights", (T, k))
    capacity = draw(st.sampled_from([None, 0, 1, 3]))
    call.args = [x, w13, w2, weights, ids]
    return call, x, w13, w2, weights, ids, activation, capacity


@given(experts_calls())
@FUZZ
def test_fuzz_experts(example):
    call, x, w13, w2, weights, ids, activation, capacity = example
    expect(call, lambda: moe_ext.experts(x, w13, w2, weights, ids, activation=activation, capacity=capacity),
           lambda: ref.experts(*f64(x, w13, w2, weights), np.asarray(ids), activation=activation,
                               capacity=capacity), close)


@st.composite
def moe_calls(draw):
    pick_tier(draw)
    call, (T, d, f, E, k) = Call(draw), dims(draw)
    call.op = "moe"
    x, w_router = call.floats("x", (T, d), nan=False, data=True), call.floats("w_router", (E, d), nan=False, data=True)
    w13, w2 = (call.floats("w13_or_w1", (E, 2 * f, d), nan=False, data=True),
               call.floats("w2", (E, d, f), nan=False, data=True))
    if call.maybe("top_k"):
        k = draw(st.sampled_from([0, E + 1]))
    call.args = [x, w_router, w13, w2]
    return call, x, w_router, w13, w2, k


@given(moe_calls())
@FUZZ
def test_fuzz_moe(example):
    call, x, w_router, w13, w2, k = example

    def compare(got, want):
        # Rows whose routing is a near tie may pick other experts in float32: compare the rows where the
        # float32 router's choice equals the float64 one.
        same = (moe_ext.route(x, w_router, k)[1] == ref.route(*f64(x, w_router), k)[1]).all(axis=1)
        close(got[same], want[same])

    expect(call, lambda: moe_ext.moe(x, w_router, w13, w2, k), lambda: ref.moe(*f64(x, w_router, w13, w2), k), compare)


@st.composite
def loss_calls(draw):
    pick_tier(draw)
    call, (T, _, _, E, k) = Call(draw), dims(draw)
    call.op = "losses"
    probs = call.floats("probs", (T, E))
    ids = valid_ids(call, T, k, E)
    call.args = [probs, ids]
    return call, probs, ids, E


@given(loss_calls())
@FUZZ
def test_fuzz_losses(example):
    call, probs, ids, E = example
    expect(call, lambda: (moe_ext.load_balancing_loss(probs, ids, E), moe_ext.router_z_loss(probs)),
           lambda: (ref.load_balancing_loss(*f64(probs), np.asarray(ids), E), ref.router_z_loss(*f64(probs))), close)


def test_fuzz_report():
    """Runs last in this file: the per-op call counts of the run (visible with -s)."""
    moe_ext.set_isa(TIERS[-1])
    calls = sum(n for op, n in CALLS.items() if not op.endswith("raised"))
    raised = sum(n for op, n in CALLS.items() if op.endswith("raised"))
    print(f"\nfuzz: {calls} calls, {raised} rejected with ValueError/TypeError, 0 crashes; {dict(CALLS)}")
