"""`moe-ext check`: parity of this install against the NumPy reference, on every CPU tier it can run.

Each op runs on a handful of shapes (empty, one token, k = E, one expert, many experts, sizes that are
not multiples of the SIMD width) with fresh random float32 inputs; the reference runs in float64 on the
same values. A row fails when its relative error exceeds the tolerance (or, for data movement and ids,
when the result is not exact).
"""
import numpy as np

from . import _api, _core
from . import reference as ref

# float32 accumulation over dot products of length <= ~100 stays far below 1e-5 relative (2^-24 * sqrt(K)
# per dot, a few ulps for exp/erf); 1e-5 leaves room for the FMA tiers without hiding a wrong index.
TOLERANCE = 1e-5
# (T, d, f, E, k)
SHAPES = [(0, 16, 8, 4, 2), (1, 45, 23, 8, 2), (37, 64, 48, 8, 8), (33, 32, 17, 1, 1), (70, 48, 24, 64, 6)]


def _rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def _inputs(T, d, f, E, k, rng):
    def normal(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)
    x, w_router = normal(T, d), normal(E, d)
    w13, w1, w2 = normal(E, 2 * f, d, scale=d ** -0.5), normal(E, f, d, scale=d ** -0.5), normal(E, d, f, scale=f ** -0.5)
    return x, w_router, w13, w1, w2


def _f64(*arrays):
    return [None if a is None else a.astype(np.float64) for a in arrays]


def _ids_agree(ids, ref_ids, keys, k):
    """Ids must match wherever the reference's k-th and (k+1)-th keys are not a near tie."""
    ordered = -np.sort(-np.nan_to_num(keys, nan=-np.inf), axis=1)
    margin = ordered[:, k - 1] - ordered[:, k] if k < keys.shape[1] else np.full(len(keys), np.inf)
    clear = margin > 1e-4
    return bool(np.array_equal(ids[clear], ref_ids[clear]))


def _check_route(x, w_router, k, rng):
    E = w_router.shape[0]
    grouped = E % 4 == 0 and E >= 8 and k <= 2 * (E // 4)
    options = dict(scoring="sigmoid", correction_bias=(rng.standard_normal(E) * 0.1).astype(np.float32),
                   n_group=4, topk_group=2, scale=2.5) if grouped else dict(scoring="softmax")
    weights, ids, probs = _api.route(x, w_router, k, return_probs=True, **options)
    ref_options = {key: (value.astype(np.float64) if isinstance(value, np.ndarray) else value)
                   for key, value in options.items()}
    ref_weights, ref_ids, ref_probs = ref.route(*_f64(x, w_router), k, return_probs=True, **ref_options)
    keys = ref_probs + (ref_options.get("correction_bias", 0.0))
    agree = _ids_agree(ids, ref_ids, keys, k) if len(x) else ids.shape == ref_ids.shape
    err = max(_rel_err(weights, ref_weights), _rel_err(probs, ref_probs)) if len(x) else 0.0
    return ("route (grouped sigmoid)" if grouped else "route (softmax)"), err, agree


def _check_permute(x, ids, E):
    capacity = max(1, len(x) // max(E, 1))
    got, want = _api.permute(x, ids, E, capacity=capacity), ref.permute(x, ids, E, capacity=capacity)
    exact = all(np.array_equal(g, w) for g, w in zip(got, want)) and got.num_dropped == want.num_dropped
    return "permute (capacity)", 0.0, exact


def _check_experts(x, w13, w1, w2, weights, ids, activation):
    w = w13 if activation in _api.GATED_ACTIVATIONS else w1
    got = _api.experts(x, w, w2, weights, ids, activation=activation)
    want = ref.experts(*_f64(x, w, w2, weights), ids, activation=activation)
    return f"experts ({activation})", _rel_err(got, want), True


def _checks_for_shape(shape, rng):
    T, d, f, E, k = shape
    x, w_router, w13, w1, w2 = _inputs(T, d, f, E, k, rng)
    weights, ids, probs = _api.route(x, w_router, k, return_probs=True)
    yield _check_route(x, w_router, k, rng)
    yield _check_permute(x, ids, E)
    x_perm, offsets, perm_rows = _api.permute(x, ids, E)
    h = _api.grouped_gemm(x_perm, w13, offsets)
    yield "grouped_gemm", _rel_err(h, ref.grouped_gemm(*_f64(x_perm, w13), offsets)), True
    y_perm = rng.standard_normal((len(x_perm), d)).astype(np.float32)
    got = _api.unpermute(y_perm, perm_rows, weights)
    yield "unpermute", _rel_err(got, ref.unpermute(*_f64(y_perm), perm_rows, weights.astype(np.float64))), True
    for activation in _api.ACTIVATIONS:
        yield _check_experts(x, w13, w1, w2, weights, ids, activation)
    got = _api.moe(x, w_router, w13, w2, k)
    yield "moe (swiglu)", _rel_err(got, ref.moe(*_f64(x, w_router, w13, w2), k)), True
    loss = _api.load_balancing_loss(probs, ids, E)
    yield "load_balancing_loss", _rel_err(loss, ref.load_balancing_loss(probs.astype(np.float64), ids, E)), True
    logits = (x @ w_router.T).astype(np.float32)
    yield "router_z_loss", _rel_err(_api.router_z_loss(logits), ref.router_z_loss(logits.astype(np.float64))), True


def run(isas=None, seed=0):
    """Yields (isa, op, shape, rel_err, ok) for every check; restores the tier in use afterwards."""
    before = _core.get_isa()
    try:
        for isa in isas or _core.available_isas():
            _core.set_isa(isa)
            for shape in SHAPES:
                rng = np.random.default_rng([seed, *shape])
                for op, err, exact in _checks_for_shape(shape, rng):
                    yield isa, op, shape, err, bool(exact and err <= TOLERANCE)
    finally:
        _core.set_isa(before)
