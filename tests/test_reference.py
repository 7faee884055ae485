"""moe_ext.reference against naive per-element Python loops written independently here."""
import math

import numpy as np
import pytest

from moe_ext import reference as ref
from moe_ext._types import PermuteResult

RTOL, ATOL = 1e-12, 1e-14
NAN = float("nan")


# ---------------------------------------------------------------------------- naive implementations
def _key(v):
    return -math.inf if math.isnan(v) else v


def _argmax_lowest(candidates, keys):
    """Candidate with the largest key (NaN = -inf); the first one wins ties."""
    best = None
    for c in candidates:
        if best is None or _key(keys[c]) > _key(keys[best]):
            best = c
    return best


def naive_route(x, w, k, scoring="softmax", renormalize=True, scale=1.0, bias=None,
                correction_bias=None, n_group=None, topk_group=None):
    T, d = x.shape
    E = w.shape[0]
    weights, ids, probs = [], [], []
    for t in range(T):
        logits = []
        for e in range(E):
            s = 0.0
            for i in range(d):
                s += float(x[t, i]) * float(w[e, i])
            logits.append(s + (float(bias[e]) if bias is not None else 0.0))
        if scoring == "softmax":
            if any(math.isnan(v) for v in logits):
                scores = [NAN] * E
            else:
                m = max(logits)
                ex = [math.exp(v - m) for v in logits]
                scores = [v / sum(ex) for v in ex]
        else:
            scores = [1.0 / (1.0 + math.exp(-v)) if not math.isnan(v) else NAN for v in logits]
        keys = [scores[e] + (float(correction_bias[e]) if correction_bias is not None else 0.0)
                for e in range(E)]
        allowed = list(range(E))
        if n_group is not None:
            gs = E // n_group
            gscore = []
            for g in range(n_group):
                vals = sorted((_key(keys[e]) for e in range(g * gs, (g + 1) * gs)), reverse=True)
                gscore.append(vals[0] if gs == 1 else vals[0] + vals[1])
            groups = []
            for _ in range(topk_group):
                groups.append(_argmax_lowest([g for g in range(n_group) if g not in groups], gscore))
            allowed = [e for e in range(E) if e // gs in groups]
        chosen = []
        for _ in range(k):
            chosen.append(_argmax_lowest([e for e in allowed if e not in chosen], keys))
        wt = [scores[e] for e in chosen]
        if renormalize:
            s = sum(wt)
            if s != 0:
                wt = [v / s for v in wt]
        weights.append([v * scale for v in wt])
        ids.append(chosen)
        probs.append(scores)
    return (np.array(weights, dtype=np.float64).reshape(T, k), np.array(ids).reshape(T, k),
            np.array(probs, dtype=np.float64).reshape(T, E))


def naive_permute(x, ids, E, capacity=None):
    T, k = ids.shape
    rows, offsets, perm_rows = [], [0], np.full((T, k), -1)
    for e in range(E):
        kept = 0
        for t in range(T):
            for j in range(k):
                if ids[t, j] == e and (capacity is None or kept < capacity):
                    perm_rows[t, j] = len(rows)
                    rows.append(x[t])
                    kept += 1
        offsets.append(len(rows))
    return np.array(rows).reshape(len(rows), x.shape[1]), np.array(offsets), perm_rows


def naive_grouped_gemm(a, w, offsets):
    M, K = a.shape
    out = np.full((M, w.shape[1]), NAN)
    for e in range(w.shape[0]):
        for r in range(offsets[e], offsets[e + 1]):
            for n in range(w.shape[1]):
                out[r, n] = sum(float(a[r, c]) * float(w[e, n, c]) for c in range(K))
    return out


def naive_unpermute(y_perm, perm_rows, weights):
    T, k = perm_rows.shape
    y = np.zeros((T, y_perm.shape[1]))
    for t in range(T):
        for i in range(y_perm.shape[1]):
            for j in range(k):
                if perm_rows[t, j] >= 0:
                    y[t, i] += weights[t, j] * y_perm[perm_rows[t, j], i]
    return y


def _act(z, name):
    if name in ("swiglu",):
        return z / (1.0 + math.exp(-z))
    if name in ("geglu", "gelu"):
        return 0.5 * z * (1.0 + math.erf(z / math.sqrt(2.0)))
    return max(z, 0.0)


def naive_experts(x, w13, w2, weights, ids, activation, capacity=None):
    T, d = x.shape
    k = ids.shape[1]
    f = w2.shape[2]
    y = np.zeros((T, d))
    for t in range(T):
        for j in range(k):
            e = ids[t, j]
            before = sum(1 for tt in range(T) for jj in range(k)
                         if ids[tt, jj] == e and (tt, jj) < (t, j))
            if capacity is not None and before >= capacity:
                continue
            h = [sum(x[t, c] * w13[e, r, c] for c in range(d)) for r in range(w13.shape[1])]
            if activation in ("swiglu", "geglu"):
                a = [_act(h[i], activation) * h[f + i] for i in range(f)]
            else:
                a = [_act(h[i], activation) for i in range(f)]
            for i in range(d):
                y[t, i] += weights[t, j] * sum(w2[e, i, c] * a[c] for c in range(f))
    return y


def _distinct_ids(rng, T, E, k):
    return np.array([rng.permutation(E)[:k] for _ in range(T)], dtype=np.int32).reshape(T, k)


# ---------------------------------------------------------------------------- route
ROUTE_CASES = [
    dict(E=8, k=2),
    dict(E=8, k=2, renormalize=False),
    dict(E=8, k=2, scoring="sigmoid"),
    dict(E=8, k=2, scoring="sigmoid", renormalize=False),
    dict(E=8, k=3, scale=2.5, bias=True),
    dict(E=8, k=2, scoring="sigmoid", correction_bias=True, scale=1.7),
    dict(E=8, k=2, n_group=4, topk_group=2, correction_bias=True, scoring="sigmoid"),
    dict(E=16, k=4, n_group=4, topk_group=2, correction_bias=True, scoring="sigmoid", scale=2.5),
    dict(E=16, k=4, n_group=4, topk_group=2, renormalize=False),
    dict(E=8, k=3, n_group=8, topk_group=3, correction_bias=True),  # one expert per group
    dict(E=5, k=5),  # k = E
    dict(E=5, k=5, scoring="sigmoid", renormalize=False),
    dict(E=1, k=1),
    dict(E=1, k=1, scoring="sigmoid"),
]


@pytest.mark.parametrize("case", ROUTE_CASES, ids=lambda c: ",".join(f"{a}={b}" for a, b in c.items()))
def test_route_matches_naive(case):
    case = dict(case)
    E, k = case.pop("E"), case.pop("k")
    rng = np.random.default_rng(1000 + E * 10 + k)
    T, d = 11, 6
    x = rng.standard_normal((T, d))
    w = rng.standard_normal((E, d))
    if case.pop("bias", False):
        case["bias"] = rng.standard_normal(E)
    if case.pop("correction_bias", False):
        case["correction_bias"] = rng.standard_normal(E) * 0.3
    tw, ti, probs = ref.route(x, w, k, return_probs=True, **case)
    nw, ni, nprobs = naive_route(x, w, k, **case)
    assert tw.dtype == np.float64 and probs.dtype == np.float64 and ti.dtype == np.int32
    assert tw.shape == (T, k) and ti.shape == (T, k) and probs.shape == (T, E)
    np.testing.assert_array_equal(ti, ni)
    np.testing.assert_allclose(tw, nw, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(probs, nprobs, rtol=RTOL, atol=ATOL)
    tw2, ti2 = ref.route(x, w, k, **case)
    np.testing.assert_array_equal(tw2, tw)
    np.testing.assert_array_equal(ti2, ti)
    if case.get("n_group"):
        gs = E // case["n_group"]
        assert all(len({e // gs for e in row}) <= case["topk_group"] for row in ti)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("grouped", [False, True])
def test_route_ties_pick_lower_id(scoring, grouped):
    # d = 1 makes every logit a single product, so duplicated router rows tie exactly.
    rng = np.random.default_rng(7)
    T, E, k = 9, 8, 3
    x = rng.standard_normal((T, 1))
    base = rng.standard_normal((4, 1))
    if grouped:  # groups (0,1),(2,3),(4,5),(6,7); group 2 duplicates group 0, group 3 group 1
        w = np.concatenate([base, base])
        kw = dict(n_group=4, topk_group=1)
        k = 2
    else:  # experts 2i and 2i+1 tie
        w = np.repeat(base, 2, axis=0)
        kw = {}
    tw, ti = ref.route(x, w, k, scoring=scoring, **kw)
    nw, ni, _ = naive_route(x, w, k, scoring=scoring, **kw)
    np.testing.assert_array_equal(ti, ni)
    np.testing.assert_allclose(tw, nw, rtol=RTOL, atol=ATOL)
    if grouped:
        assert (ti < 4).all()  # the lower group of each tied pair
    else:
        assert (ti[:, 0] % 2 == 0).all() and (ti[:, 1] == ti[:, 0] + 1).all()


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("grouped", [False, True])
def test_route_nan(scoring, grouped):
    rng = np.random.default_rng(11)
    T, d, E, k = 6, 5, 8, 3
    kw = dict(n_group=4, topk_group=2) if grouped else {}
    x = rng.standard_normal((T, d))
    x[1, 2] = NAN  # every logit of token 1 is NaN
    w = rng.standard_normal((E, d))
    bias = rng.standard_normal(E)
    bias[[0, 5]] = NAN  # experts 0 and 5 NaN for every token
    tw, ti, probs = ref.route(x, w, k, scoring=scoring, bias=bias, return_probs=True, **kw)
    nw, ni, nprobs = naive_route(x, w, k, scoring=scoring, bias=bias, **kw)
    np.testing.assert_array_equal(ti, ni)
    np.testing.assert_allclose(tw, nw, rtol=RTOL, atol=ATOL)  # NaN positions must agree too
    np.testing.assert_allclose(probs, nprobs, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(ti[1], np.arange(k))
    assert np.isnan(tw[1]).all()
    for row in ti:
        assert len(set(row)) == k and ((0 <= row) & (row < E)).all()
    if scoring == "softmax":
        assert np.isnan(probs).all()
    else:
        assert np.isnan(probs[:, [0, 5]]).all() and not np.isnan(np.delete(probs, [1], 0)[:, 1]).any()


def test_route_zero_sum_renormalize_and_dtype():
    # Sigmoid of very negative logits underflows to exactly 0: the weights stay 0, not NaN.
    x = np.array([[-800.0], [0.5]])
    w = np.array([[1.3], [1.1], [0.9]])
    tw, ti = ref.route(x, w, 2, scoring="sigmoid")
    np.testing.assert_array_equal(tw[0], [0.0, 0.0])
    np.testing.assert_array_equal(ti[0], [0, 1])  # all scores tie at 0
    # float32 in, float32 out
    tw32, ti32, p32 = ref.route(x.astype(np.float32), w.astype(np.float32), 2, return_probs=True)
    assert tw32.dtype == np.float32 and p32.dtype == np.float32 and ti32.dtype == np.int32


# ---------------------------------------------------------------------------- permute / gemm / unpermute
@pytest.mark.parametrize("capacity", [None, 0, 1, 2, 100])
def test_permute(capacity):
    rng = np.random.default_rng(21)
    T, d, E, k = 10, 3, 5, 2
    x = rng.standard_normal((T, d))
    ids = _distinct_ids(rng, T, E, k)
    res = ref.permute(x, ids, E, capacity=capacity)
    assert isinstance(res, PermuteResult)
    x_perm, offsets, perm_rows = res
    nx, no, npr = naive_permute(x, ids, E, capacity)
    assert offsets.dtype == np.int32 and perm_rows.dtype == np.int32
    np.testing.assert_array_equal(offsets, no)
    np.testing.assert_array_equal(perm_rows, npr)
    np.testing.assert_array_equal(x_perm, nx)
    counts = np.bincount(ids.ravel(), minlength=E)
    dropped = 0 if capacity is None else int(np.maximum(counts - capacity, 0).sum())
    assert res.num_dropped == dropped
    assert x_perm.shape == (T * k - dropped, d) and offsets[0] == 0 and offsets[-1] == T * k - dropped
    for t in range(T):
        for j in range(k):
            if perm_rows[t, j] >= 0:
                np.testing.assert_array_equal(x_perm[perm_rows[t, j]], x[t])


@pytest.mark.parametrize("counts", [[3, 0, 2, 0, 4], [0, 0, 5], [4, 0, 0], [0, 0, 0]])
def test_grouped_gemm(counts):
    rng = np.random.default_rng(31)
    E, K, N = len(counts), 4, 3
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    a = rng.standard_normal((offsets[-1], K))
    w = rng.standard_normal((E, N, K))
    out = ref.grouped_gemm(a, w, offsets)
    assert out.shape == (offsets[-1], N) and out.dtype == np.float64
    np.testing.assert_allclose(out, naive_grouped_gemm(a, w, offsets), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("capacity", [None, 1])
def test_unpermute(capacity):
    rng = np.random.default_rng(41)
    T, d, E, k = 8, 3, 4, 3
    ids = _distinct_ids(rng, T, E, k)
    _, offsets, perm_rows = ref.permute(rng.standard_normal((T, d)), ids, E, capacity=capacity)
    assert capacity is None or (perm_rows == -1).any()
    y_perm = rng.standard_normal((offsets[-1], d))
    weights = rng.standard_normal((T, k))
    y = ref.unpermute(y_perm, perm_rows, weights)
    np.testing.assert_allclose(y, naive_unpermute(y_perm, perm_rows, weights), rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------- experts / moe
@pytest.mark.parametrize("capacity", [None, 2])
@pytest.mark.parametrize("activation", ["swiglu", "geglu", "relu", "gelu"])
def test_experts(activation, capacity):
    rng = np.random.default_rng(51)
    T, d, f, E, k = 7, 5, 4, 4, 2
    gated = activation in ("swiglu", "geglu")
    x = rng.standard_normal((T, d))
    w13 = rng.standard_normal((E, 2 * f if gated else f, d))
    w2 = rng.standard_normal((E, d, f))
    ids = _distinct_ids(rng, T, E, k)
    weights = rng.standard_normal((T, k))
    y = ref.experts(x, w13, w2, weights, ids, activation=activation, capacity=capacity)
    assert y.shape == (T, d) and y.dtype == np.float64
    ny = naive_experts(x, w13, w2, weights, ids, activation, capacity)
    np.testing.assert_allclose(y, ny, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("kw", [
    dict(activation="swiglu"),
    dict(activation="gelu", scoring="sigmoid", renormalize=False, scale=2.0, capacity=3),
    dict(activation="geglu", scoring="sigmoid", correction_bias=True, n_group=4, topk_group=2),
    dict(activation="relu", bias=True, capacity=0),
])
def test_moe_is_route_then_experts(kw):
    kw = dict(kw)
    rng = np.random.default_rng(61)
    T, d, f, E, k = 9, 6, 5, 8, 2
    if kw.pop("bias", False):
        kw["bias"] = rng.standard_normal(E)
    if kw.pop("correction_bias", False):
        kw["correction_bias"] = rng.standard_normal(E)
    act, cap = kw.pop("activation"), kw.pop("capacity", None)
    gated = act in ("swiglu", "geglu")
    x = rng.standard_normal((T, d))
    wr = rng.standard_normal((E, d))
    w13 = rng.standard_normal((E, 2 * f if gated else f, d))
    w2 = rng.standard_normal((E, d, f))
    y = ref.moe(x, wr, w13, w2, k, activation=act, capacity=cap, **kw)
    tw, ti = ref.route(x, wr, k, **kw)
    np.testing.assert_array_equal(
        y, ref.experts(x, w13, w2, tw, ti, activation=act, capacity=cap))
    if cap == 0:
        np.testing.assert_array_equal(y, np.zeros((T, d)))


# ---------------------------------------------------------------------------- losses
def test_losses_hand_computed():
    # f = [1/2, 1/2, 0, 0], P = [.4, .3, .2, .1]: 4 * (.2 + .15) = 1.4
    assert ref.load_balancing_loss(np.array([[0.4, 0.3, 0.2, 0.1]]), np.array([[0, 1]]), 4) == \
        pytest.approx(1.4, rel=1e-14)
    # f = [1, 0], P = [.5, .5]: 2 * .5 = 1
    assert ref.load_balancing_loss(np.array([[0.75, 0.25], [0.25, 0.75]]), np.array([[0], [0]]), 2) == \
        pytest.approx(1.0, rel=1e-14)
    # lse([0, 0]) = log 2; lse([1, 2, 3]) = log(e + e^2 + e^3)
    assert ref.router_z_loss(np.array([[0.0, 0.0]])) == pytest.approx(math.log(2) ** 2, rel=1e-14)
    lse = math.log(math.e + math.e ** 2 + math.e ** 3)
    z = ref.router_z_loss(np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]))
    assert z == pytest.approx((lse ** 2 + math.log(3) ** 2) / 2, rel=1e-14)
    assert isinstance(z, float)


@pytest.mark.parametrize("seed", [0, 1])
def test_losses_match_naive(seed):
    rng = np.random.default_rng(71 + seed)
    T, E, k = 13, 6, 2
    logits = rng.standard_normal((T, E)) * 3
    probs = ref.softmax(logits)
    ids = _distinct_ids(rng, T, E, k)
    nlb = E * sum(sum(1 for t in range(T) for j in range(k) if ids[t, j] == e) / (T * k)
                  * sum(probs[t, e] for t in range(T)) / T for e in range(E))
    assert ref.load_balancing_loss(probs, ids, E) == pytest.approx(nlb, rel=1e-12)
    nz = sum(math.log(sum(math.exp(v) for v in logits[t])) ** 2 for t in range(T)) / T
    assert ref.router_z_loss(logits) == pytest.approx(nz, rel=1e-12)


# ---------------------------------------------------------------------------- T = 0
def test_empty_inputs():
    d, f, E, k = 4, 3, 5, 2
    rng = np.random.default_rng(81)
    x = np.zeros((0, d))
    wr = rng.standard_normal((E, d))
    w13 = rng.standard_normal((E, 2 * f, d))
    w2 = rng.standard_normal((E, d, f))
    tw, ti, probs = ref.route(x, wr, k, return_probs=True, n_group=5, topk_group=2)
    assert tw.shape == (0, k) and ti.shape == (0, k) and probs.shape == (0, E)
    assert ti.dtype == np.int32
    for scoring in ("softmax", "sigmoid"):
        assert ref.route(x, wr, k, scoring=scoring)[0].shape == (0, k)
    x_perm, offsets, perm_rows = res = ref.permute(x, ti, E, capacity=1)
    assert x_perm.shape == (0, d) and perm_rows.shape == (0, k) and res.num_dropped == 0
    np.testing.assert_array_equal(offsets, np.zeros(E + 1))
    assert offsets.dtype == np.int32 and perm_rows.dtype == np.int32
    assert ref.grouped_gemm(x_perm, w13, offsets).shape == (0, 2 * f)
    assert ref.unpermute(np.zeros((0, d)), perm_rows, tw).shape == (0, d)
    for act in ("swiglu", "geglu"):
        assert ref.experts(x, w13, w2, tw, ti, activation=act).shape == (0, d)
    for act in ("relu", "gelu"):
        assert ref.experts(x, w13[:, :f], w2, tw, ti, activation=act).shape == (0, d)
    assert ref.moe(x, wr, w13, w2, k, capacity=2).shape == (0, d)
    assert ref.load_balancing_loss(probs, ti, E) == 0.0
    assert ref.router_z_loss(np.zeros((0, E))) == 0.0
