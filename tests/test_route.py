"""moe_ext.route against moe_ext.reference.route (float64 ground truth), docs/api.md section 1."""
import numpy as np
import pytest

import moe_ext
from moe_ext import reference as ref
from conftest import (ROUTE_RTOL, SELECTION_MARGIN, assert_close, f64, random_router, random_x,
                      selection_margins, unchanged)

# (T, d, E, k): empty, one token, sizes not multiples of 16, k = E, E = 1, many small experts, T and E
# off the router's token and expert blocks (4 x 4 with AVX-512, 2 x 4 below).
SHAPES = [
    (0, 16, 8, 2),
    (1, 16, 8, 2),
    (37, 45, 8, 2),
    (37, 45, 8, 8),
    (23, 23, 1, 1),
    (300, 64, 64, 6),
    (50, 17, 16, 4),
    (7, 33, 7, 3),
    (6, 16, 5, 2),
    (5, 100, 10, 3),
]


def _reference(x, w, k, **kw):
    cb = kw.get("correction_bias")
    b = kw.get("bias")
    kw = dict(kw, bias=f64(b) if b is not None else None, correction_bias=f64(cb) if cb is not None else None)
    return ref.route(f64(x), f64(w), k, return_probs=True, **kw)


def _selection_keys(probs64, correction_bias):
    return probs64 if correction_bias is None else probs64 + f64(correction_bias)


def check_route(x, w, k, min_clear=0.8, **kw):
    """Runs route (with and without probs) and compares it with the float64 reference:
    probs everywhere, ids exactly and weights on the rows whose selection margin is clear."""
    T, E = x.shape[0], w.shape[0]
    inputs = [x, w, kw.get("bias"), kw.get("correction_bias")]
    with unchanged(*inputs):
        weights, ids, probs = moe_ext.route(x, w, k, return_probs=True, **kw)
        weights2, ids2 = moe_ext.route(x, w, k, **kw)
    assert weights.dtype == np.float32 and ids.dtype == np.int32 and probs.dtype == np.float32
    assert weights.shape == (T, k) and ids.shape == (T, k) and probs.shape == (T, E)
    # return_probs only adds an output
    np.testing.assert_array_equal(ids2, ids)
    assert weights2.tobytes() == weights.tobytes()

    want_w, want_ids, want_probs = _reference(x, w, k, **kw)
    assert_close(probs, want_probs, ROUTE_RTOL, "probs")
    # ids are always valid and distinct
    assert ((ids >= 0) & (ids < E)).all()
    assert all(len(set(row)) == k for row in ids.tolist())

    margins = selection_margins(_selection_keys(want_probs, kw.get("correction_bias")), k,
                                kw.get("n_group"), kw.get("topk_group"))
    clear = margins > SELECTION_MARGIN
    if T:
        assert clear.mean() >= min_clear, f"only {clear.mean():.0%} of the rows have a clear margin"
    np.testing.assert_array_equal(ids[clear], want_ids[clear])
    assert_close(weights[clear], want_w[clear], ROUTE_RTOL, "topk_weights")
    return weights, ids, probs


@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "norenorm"])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("T,d,E,k", SHAPES, ids=[f"T{t}d{d}E{e}k{k}" for t, d, e, k in SHAPES])
def test_route_matches_reference(rng, T, d, E, k, scoring, renormalize):
    x, w = random_x(rng, T, d), random_router(rng, E, d)
    check_route(x, w, k, scoring=scoring, renormalize=renormalize)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("scale", [2.5, 0.37, -1.5])
def test_route_scale(rng, scoring, scale):
    T, d, E, k = 41, 32, 12, 3
    x, w = random_x(rng, T, d), random_router(rng, E, d)
    weights, ids, _ = check_route(x, w, k, scoring=scoring, scale=scale)
    # scale multiplies after renormalisation: |weights| sum to |scale| per row
    np.testing.assert_allclose(weights.astype(np.float64).sum(axis=1), np.full(T, scale), rtol=1e-5)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("which", ["bias", "correction_bias", "both"])
def test_route_biases(rng, scoring, which):
    T, d, E, k = 53, 29, 16, 4
    x, w = random_x(rng, T, d), random_router(rng, E, d)
    kw = {}
    if which in ("bias", "both"):
        kw["bias"] = rng.standard_normal(E).astype(np.float32)
    if which in ("correction_bias", "both"):
        kw["correction_bias"] = (rng.standard_normal(E) * 0.3).astype(np.float32)
    check_route(x, w, k, scoring=scoring, **kw)


def test_route_correction_bias_affects_selection_only(rng):
    """A large correction bias on expert 0 makes it chosen everywhere, but its weight is its score."""
    T, d, E, k = 30, 16, 8, 2
    x, w = random_x(rng, T, d), random_router(rng, E, d)
    cb = (rng.random(E) * 1e-3).astype(np.float32)
    cb[3] = 10.0 + rng.random()
    weights, ids, probs = moe_ext.route(x, w, k, scoring="sigmoid", renormalize=False,
                                        correction_bias=cb, return_probs=True)
    assert (ids[:, 0] == 3).all()
    np.testing.assert_array_equal(weights[:, 0], probs[:, 3])
    # probs are the scores, unaffected by the correction bias
    _, _, probs_nocb = moe_ext.route(x, w, k, scoring="sigmoid", return_probs=True)
    np.testing.assert_array_equal(probs, probs_nocb)


GROUPED = [
    # (T, d, E, k, n_group, topk_group, scoring, correction_bias)
    (40, 32, 16, 4, 4, 2, "softmax", False),
    (40, 32, 16, 4, 4, 2, "sigmoid", True),
    (40, 24, 8, 2, 8, 3, "softmax", False),   # groups of one expert: a group's score is its one key
    (40, 24, 8, 2, 8, 3, "sigmoid", True),
    (60, 45, 64, 6, 8, 4, "sigmoid", True),   # DeepSeek-V3 style
    (20, 16, 12, 3, 3, 1, "softmax", False),  # topk_group * group size == 4 >= k
    (20, 16, 12, 4, 3, 1, "sigmoid", False),  # exactly the kept group's 4 experts
    (20, 16, 8, 8, 2, 2, "softmax", False),   # every group kept, k = E
    (0, 16, 16, 4, 4, 2, "sigmoid", True),
    (1, 16, 16, 4, 4, 2, "sigmoid", True),
]


@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "norenorm"])
@pytest.mark.parametrize("T,d,E,k,n_group,topk_group,scoring,use_cb", GROUPED,
                         ids=[f"T{c[0]}E{c[2]}k{c[3]}g{c[4]}tg{c[5]}-{c[6]}{'-cb' if c[7] else ''}"
                              for c in GROUPED])
def test_route_grouped(rng, T, d, E, k, n_group, topk_group, scoring, use_cb, renormalize):
    x, w = random_x(rng, T, d), random_router(rng, E, d)
    cb = (rng.standard_normal(E) * 0.1).astype(np.float32) if use_cb else None
    _, ids, _ = check_route(x, w, k, scoring=scoring, renormalize=renormalize, correction_bias=cb,
                            n_group=n_group, topk_group=topk_group, scale=1.75)
    # every chosen expert lies in at most topk_group groups
    size = E // n_group
    for row in ids.tolist():
        assert len({e // size for e in row}) <= topk_group


def test_route_grouped_excludes_groups(rng):
    """The best single expert is not chosen when its group loses on the sum of its two best keys."""
    T, d, E = 12, 8, 8
    x = random_x(rng, T, d)
    w = random_router(rng, E, d) * 1e-3  # small logits: the bias decides
    bias = np.array([5.0, -5.0, 3.0, 3.0, -5.0, -5.0, -5.0, -5.0], np.float32)
    bias += (rng.random(E) * 1e-2).astype(np.float32)
    with unchanged(x, w, bias):
        _, ids = moe_ext.route(x, w, 2, scoring="sigmoid", bias=bias, n_group=4, topk_group=1)
    # (the order of experts 2 and 3 is decided by tiny differences: not checked here)
    # group 0 = {5, -5} sums lower than group 1 = {3, 3}: expert 0 is never chosen
    np.testing.assert_array_equal(np.sort(ids, axis=1), np.tile([2, 3], (T, 1)))


def test_route_k_equals_e_is_a_permutation(rng):
    T, d, E = 25, 19, 7
    x, w = random_x(rng, T, d), random_router(rng, E, d)
    weights, ids, probs = check_route(x, w, E)
    np.testing.assert_array_equal(np.sort(ids, axis=1), np.tile(np.arange(E), (T, 1)))
    # descending score order
    chosen = np.take_along_axis(probs, ids, axis=1)
    assert (np.diff(chosen, axis=1) <= 0).all()


def test_route_single_expert(rng):
    x, w = random_x(rng, 9, 13), random_router(rng, 1, 13)
    weights, ids = moe_ext.route(x, w, 1)
    np.testing.assert_array_equal(ids, np.zeros((9, 1), np.int32))
    np.testing.assert_array_equal(weights, np.ones((9, 1), np.float32))
    weights, ids = moe_ext.route(x, w, 1, renormalize=False, scale=3.0)
    np.testing.assert_array_equal(weights, np.full((9, 1), 3.0, np.float32))  # softmax of 1 expert = 1


def test_route_empty(rng):
    x, w = random_x(rng, 0, 16), random_router(rng, 8, 16)
    weights, ids, probs = moe_ext.route(x, w, 3, return_probs=True)
    assert weights.shape == (0, 3) and ids.shape == (0, 3) and probs.shape == (0, 8)
    assert weights.dtype == np.float32 and ids.dtype == np.int32 and probs.dtype == np.float32


def test_route_rows_independent_and_deterministic(rng):
    """Reruns are bit-identical; a token's routing does not depend on the other tokens of the batch
    (to rounding: a batched router GEMM may block tokens differently)."""
    T, d, E, k = 64, 40, 16, 4
    x, w = random_x(rng, T, d), random_router(rng, E, d)
    full = moe_ext.route(x, w, k, return_probs=True)
    again = moe_ext.route(x, w, k, return_probs=True)
    for a, b in zip(full, again):
        assert a.tobytes() == b.tobytes()
    part = moe_ext.route(np.ascontiguousarray(x[10:17]), w, k, return_probs=True)
    assert_close(part[0], full[0][10:17], ROUTE_RTOL, "weights")
    assert_close(part[2], full[2][10:17], ROUTE_RTOL, "probs")
    _, _, want_probs = _reference(x[10:17], w, k)
    clear = selection_margins(want_probs, k) > SELECTION_MARGIN
    np.testing.assert_array_equal(part[1][clear], full[1][10:17][clear])


# --------------------------------------------------------------------------------------------- ties
def _stable_topk(keys, k):
    """Expected ids from the kernel's own float32 keys: descending, equal keys to the lower id."""
    return np.argsort(-keys, axis=1, kind="stable")[:, :k].astype(np.int32)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_route_exact_ties_pick_lower_id_duplicated_rows(rng, scoring):
    """Duplicated router rows give bit-equal logits, hence exact ties: the lower id goes first."""
    T, E, k = 60, 8, 3
    base = random_router(rng, 4, 1)
    w = np.ascontiguousarray(base[[0, 1, 0, 2, 1, 3, 0, 2]])  # experts {0,2,6}, {1,4}, {3,7} tie
    x = random_x(rng, T, 1)
    weights, ids, probs = moe_ext.route(x, w, k, scoring=scoring, return_probs=True)
    np.testing.assert_array_equal(ids, _stable_topk(probs, k))
    # the tied experts really have equal scores
    np.testing.assert_array_equal(probs[:, 0], probs[:, 2])
    np.testing.assert_array_equal(probs[:, 0], probs[:, 6])
    np.testing.assert_array_equal(probs[:, 1], probs[:, 4])
    # the first slot is always the lowest id of its tie class {0,2,6}, {1,4}, {3,7}, {5}
    assert set(ids[:, 0].tolist()) <= {0, 1, 3, 5}
    # and the reference agrees exactly (d = 1: the float32 and float64 orders agree)
    want_w, want_ids, _ = _reference(x, w, k, scoring=scoring)
    np.testing.assert_array_equal(ids, want_ids)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_route_exact_ties_with_correction_bias(rng, scoring):
    T, E, k = 40, 8, 4
    base = random_router(rng, 4, 1)
    w = np.ascontiguousarray(base[[0, 1, 0, 2, 1, 3, 0, 2]])
    x = random_x(rng, T, 1)
    cb_base = (rng.standard_normal(4) * 0.05).astype(np.float32)
    cb = np.ascontiguousarray(cb_base[[0, 1, 0, 2, 1, 3, 0, 2]])
    _, ids, probs = moe_ext.route(x, w, k, scoring=scoring, correction_bias=cb, return_probs=True)
    np.testing.assert_array_equal(ids, _stable_topk(probs + cb, k))  # float32 add, as the kernel


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_route_exact_ties_integer_inputs(rng, scoring):
    """Small integer inputs: exact logits, many exact ties; ids equal the reference's exactly."""
    T, d, E, k = 80, 3, 10, 4
    x = rng.integers(-2, 3, size=(T, d)).astype(np.float32)
    w = rng.integers(-1, 2, size=(E, d)).astype(np.float32)
    weights, ids, probs = moe_ext.route(x, w, k, scoring=scoring, return_probs=True)
    want_w, want_ids, want_probs = _reference(x, w, k, scoring=scoring)
    margins = selection_margins(want_probs, k, exact_ties_ok=True)
    assert (margins > SELECTION_MARGIN).all()
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(ids, _stable_topk(probs, k))
    assert_close(weights, want_w, ROUTE_RTOL, "topk_weights")
    # there were ties to break
    sorted_p = -np.sort(-probs, axis=1)
    assert (sorted_p[:, :k] == sorted_p[:, 1:k + 1]).any()


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("E,n_group,topk_group,k", [(8, 4, 1, 2), (8, 4, 2, 3), (8, 8, 3, 2), (16, 4, 2, 4)])
def test_route_grouped_exact_ties_pick_lower_group(rng, E, n_group, topk_group, k, scoring):
    """Groups with identical experts tie exactly: the lower group is kept first."""
    T, d = 60, 2
    size = E // n_group
    x = rng.integers(-2, 3, size=(T, d)).astype(np.float32)
    pattern = rng.integers(-2, 3, size=(n_group // 2, size, d)).astype(np.float32)
    w = np.ascontiguousarray(np.repeat(pattern, 2, axis=0).reshape(E, d))  # groups 2i and 2i+1 equal
    kw = dict(scoring=scoring, n_group=n_group, topk_group=topk_group)
    weights, ids, probs = moe_ext.route(x, w, k, return_probs=True, **kw)
    want_w, want_ids, want_probs = _reference(x, w, k, **kw)
    # exact ties are decided alike in float32 and float64; mathematical ties that round differently
    # (e.g. sigmoid(z) + sigmoid(-z) = 1 in two groups) are not: those rows are left out
    clear = selection_margins(want_probs, k, n_group, topk_group, exact_ties_ok=True) > SELECTION_MARGIN
    assert clear.mean() >= 0.6
    np.testing.assert_array_equal(ids[clear], want_ids[clear])
    assert_close(weights[clear], want_w[clear], ROUTE_RTOL, "topk_weights")
    # tied groups: an expert of group 2i+1 is only chosen when group 2i is chosen too
    for row in ids.tolist():
        groups = {e // size for e in row}
        assert all(g - 1 in groups for g in groups if g % 2 == 1), row


# ------------------------------------------------------------------------------------------ NaN/Inf
def _check_valid_ids(ids, E, k):
    assert ids.dtype == np.int32
    assert ((ids >= 0) & (ids < E)).all(), ids
    for row in ids.tolist():
        assert len(set(row)) == k, row


@pytest.mark.parametrize("grouped", [False, True], ids=["flat", "grouped"])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_route_nan_inf_inputs(rng, scoring, grouped):
    """Rows with NaN/+inf/-inf inputs: valid distinct ids, equal to the reference's (their keys are
    exact: NaN, 0, 1 or inf), NaN weights exactly where the reference has them; other rows unaffected."""
    T, d, E, k = 24, 20, 16, 4
    kw = dict(scoring=scoring)
    if grouped:
        kw.update(n_group=4, topk_group=2)
    x, w = random_x(rng, T, d), random_router(rng, E, d)
    clean = moe_ext.route(x, w, k, return_probs=True, **kw)
    bad_rows = [1, 5, 6, 11, 17]
    x[1, 3] = np.nan
    x[5, :] = np.nan
    x[6, 0] = np.inf
    x[11, 7] = -np.inf
    x[17, 2], x[17, 9] = np.inf, -np.inf
    with unchanged(x, w):
        weights, ids, probs = moe_ext.route(x, w, k, return_probs=True, **kw)
    _check_valid_ids(ids, E, k)
    want_w, want_ids, want_probs = _reference(x, w, k, **kw)
    np.testing.assert_array_equal(ids[bad_rows], want_ids[bad_rows])
    assert_close(weights[bad_rows], want_w[bad_rows], ROUTE_RTOL, "weights of NaN/Inf rows")
    assert_close(probs[bad_rows], want_probs[bad_rows], ROUTE_RTOL, "probs of NaN/Inf rows")
    # NaN in x reaches every logit of the token: all keys NaN -> ids 0..k-1 (flat), NaN weights
    if not grouped:
        np.testing.assert_array_equal(ids[[1, 5]], np.tile(np.arange(k, dtype=np.int32), (2, 1)))
    assert np.isnan(weights[[1, 5]]).all()
    # the other rows are exactly what they were without the bad values
    good = np.setdiff1d(np.arange(T), bad_rows)
    for got, before in zip((weights, ids, probs), clean):
        assert got[good].tobytes() == before[good].tobytes()


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_route_nan_router_row(rng, scoring):
    """A NaN router row: under sigmoid that expert alone is NaN and never chosen (while another is
    left); under softmax every score of every token is NaN and the ids are 0..k-1."""
    T, d, E, k = 30, 16, 8, 3
    x, w = random_x(rng, T, d), random_router(rng, E, d)
    w[2, 5] = np.nan
    weights, ids, probs = moe_ext.route(x, w, k, scoring=scoring, return_probs=True)
    _check_valid_ids(ids, E, k)
    want_w, want_ids, want_probs = _reference(x, w, k, scoring=scoring)
    if scoring == "sigmoid":
        assert np.isnan(probs[:, 2]).all() and not np.isnan(np.delete(probs, 2, axis=1)).any()
        assert (ids != 2).all()
        assert not np.isnan(weights).any()
        clear = selection_margins(want_probs, k) > SELECTION_MARGIN
        np.testing.assert_array_equal(ids[clear], want_ids[clear])
    else:
        assert np.isnan(probs).all() and np.isnan(weights).all()
        np.testing.assert_array_equal(ids, np.tile(np.arange(k, dtype=np.int32), (T, 1)))
        np.testing.assert_array_equal(ids, want_ids)


def test_route_nan_everywhere_grouped_gives_first_ids(rng):
    """All keys NaN under grouped selection: groups 0..topk_group-1 are kept, ids 0..k-1."""
    T, d, E, k = 5, 8, 16, 6
    x, w = random_x(rng, T, d), random_router(rng, E, d)
    x[:, 0] = np.nan
    weights, ids = moe_ext.route(x, w, k, scoring="sigmoid", n_group=4, topk_group=2)
    np.testing.assert_array_equal(ids, np.tile(np.arange(k, dtype=np.int32), (T, 1)))
    assert np.isnan(weights).all()


def test_route_inf_logits(rng):
    """+inf logits: softmax scores are NaN (inf - inf), sigmoid scores 1 (exact ties, lower id first)."""
    T, d, E, k = 6, 4, 8, 3
    x = random_x(rng, T, d)
    w = np.abs(random_router(rng, E, d)) + np.float32(0.1)  # all positive: +inf input -> +inf logits
    x[:, 1] = np.inf
    weights, ids, probs = moe_ext.route(x, w, k, scoring="sigmoid", return_probs=True)
    np.testing.assert_array_equal(probs, np.ones((T, E), np.float32))
    np.testing.assert_array_equal(ids, np.tile(np.arange(k, dtype=np.int32), (T, 1)))
    np.testing.assert_array_equal(weights, np.full((T, k), 1.0 / k, np.float32))
    weights, ids, probs = moe_ext.route(x, w, k, scoring="softmax", return_probs=True)
    assert np.isnan(probs).all() and np.isnan(weights).all()
    np.testing.assert_array_equal(ids, np.tile(np.arange(k, dtype=np.int32), (T, 1)))


def test_route_zero_sum_keeps_zero_weights(rng):
    """sigmoid scores of exactly 0 (logits -inf): renormalising a sum of 0 leaves the weights at 0."""
    T, d, E, k = 7, 12, 6, 2
    x, w = random_x(rng, T, d), random_router(rng, E, d)
    bias = np.full(E, -np.inf, np.float32)
    weights, ids = moe_ext.route(x, w, k, scoring="sigmoid", bias=bias)
    np.testing.assert_array_equal(weights, np.zeros((T, k), np.float32))
    np.testing.assert_array_equal(ids, np.tile(np.arange(k, dtype=np.int32), (T, 1)))
    want_w, want_ids, _ = _reference(x, w, k, scoring="sigmoid", bias=bias)
    np.testing.assert_array_equal(weights, want_w)


def test_route_scale_beyond_float32_range(rng):
    """scale passes the "finite number" check but does not fit in float32: either it is rejected
    (ValueError naming scale) or the weights are the reference's (finite where those fit float32)."""
    T, d, E, k = 20, 16, 8, 4
    x, w = random_x(rng, T, d), random_router(rng, E, d)
    scale = 1e39
    try:
        weights, _ = moe_ext.route(x, w, k, scale=scale)
    except ValueError as e:
        assert "scale" in str(e)
        return
    want_w, _, _ = _reference(x, w, k, scale=scale)
    with np.errstate(over="ignore"):
        want32 = want_w.astype(np.float32)
    np.testing.assert_array_equal(np.isinf(weights), np.isinf(want32))


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_route_large_logits(rng, scoring):
    """Logits in the hundreds: softmax subtracts the row max (no overflow to NaN), sigmoid saturates
    to exactly 0 or 1 without NaN."""
    T, d, E, k = 30, 16, 8, 3
    x, w = random_x(rng, T, d, scale=60.0), random_router(rng, E, d)
    weights, ids, probs = moe_ext.route(x, w, k, scoring=scoring, return_probs=True)
    assert np.isfinite(weights).all() and np.isfinite(probs).all()
    want_w, want_ids, want_probs = _reference(x, w, k, scoring=scoring)
    assert_close(probs, want_probs, ROUTE_RTOL, "probs")
    clear = selection_margins(want_probs, k, exact_ties_ok=scoring == "sigmoid") > SELECTION_MARGIN
    np.testing.assert_array_equal(ids[clear], want_ids[clear])


def test_route_zero_width(rng):
    """d = 0: every logit is 0 (+ bias): uniform softmax, so ids 0..k-1 with weights 1/k; with a
    bias, the bias alone decides."""
    T, E, k = 5, 6, 2
    x, w = np.empty((T, 0), np.float32), np.empty((E, 0), np.float32)
    weights, ids = moe_ext.route(x, w, k)
    np.testing.assert_array_equal(ids, np.tile(np.arange(k, dtype=np.int32), (T, 1)))
    np.testing.assert_allclose(weights, np.full((T, k), 0.5), rtol=1e-6)
    bias = rng.permutation(E).astype(np.float32)
    _, ids = moe_ext.route(x, w, k, bias=bias)
    np.testing.assert_array_equal(ids, np.tile(np.argsort(-bias)[:k].astype(np.int32), (T, 1)))
