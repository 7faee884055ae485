"""moe_ext.load_balancing_loss and router_z_loss against moe_ext.reference. docs/api.md §6."""
import math

import numpy as np
import pytest

import moe_ext
from moe_ext import reference as ref
from conftest import LOSS_RTOL, f64, random_ids, random_router, random_x, unchanged

SHAPES = [  # (T, E, k)
    (1, 8, 2),
    (37, 8, 2),
    (37, 8, 8),
    (23, 1, 1),
    (300, 64, 6),
    (45, 23, 5),
]


def _probs(rng, T, E):
    logits = rng.standard_normal((T, E)) * 2
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("T,E,k", SHAPES, ids=[f"T{t}E{e}k{k}" for t, e, k in SHAPES])
def test_load_balancing_loss_matches_reference(rng, T, E, k):
    probs, ids = _probs(rng, T, E), random_ids(rng, T, E, k)
    with unchanged(probs, ids):
        got = moe_ext.load_balancing_loss(probs, ids, E)
    assert isinstance(got, float)
    want = ref.load_balancing_loss(f64(probs), ids, E)
    assert math.isclose(got, want, rel_tol=LOSS_RTOL)
    # int64 ids: the same value
    assert moe_ext.load_balancing_loss(probs, ids.astype(np.int64), E) == got


@pytest.mark.parametrize("T,E,k", SHAPES, ids=[f"T{t}E{e}k{k}" for t, e, k in SHAPES])
def test_router_z_loss_matches_reference(rng, T, E, k):
    logits = (rng.standard_normal((T, E)) * 3).astype(np.float32)
    with unchanged(logits):
        got = moe_ext.router_z_loss(logits)
    assert isinstance(got, float)
    assert math.isclose(got, ref.router_z_loss(f64(logits)), rel_tol=LOSS_RTOL)


def test_losses_from_route(rng):
    """The usual pipeline: probs and ids from route, logits from the router GEMM."""
    T, d, E, k = 64, 32, 16, 4
    x, w = random_x(rng, T, d), random_router(rng, E, d)
    _, ids, probs = moe_ext.route(x, w, k, return_probs=True)
    got = moe_ext.load_balancing_loss(probs, ids, E)
    assert math.isclose(got, ref.load_balancing_loss(f64(probs), ids, E), rel_tol=LOSS_RTOL)
    logits = (x @ w.T).astype(np.float32)
    assert math.isclose(moe_ext.router_z_loss(logits), ref.router_z_loss(f64(logits)), rel_tol=LOSS_RTOL)


def test_load_balancing_loss_values(rng):
    """Uniform routing and probabilities give exactly 1 (E * sum_e (1/E)(1/E) * E); all copies on one
    expert with probability p give E * p. f_e counts over T*k copies (HF's value is k times this)."""
    T, E, k = 40, 8, 2
    ids = np.stack([np.arange(T) % E, (np.arange(T) + 1) % E], axis=1).astype(np.int32)
    probs = np.full((T, E), 1.0 / E, np.float32)
    assert math.isclose(moe_ext.load_balancing_loss(probs, ids, E), 1.0, rel_tol=1e-6)
    p = float(np.float32(rng.random()))
    probs = np.full((T, E), (1 - p) / (E - 1), np.float32)
    probs[:, 3] = p
    ids = np.full((T, k), 3, np.int32)
    assert math.isclose(moe_ext.load_balancing_loss(probs, ids, E), E * p, rel_tol=1e-6)


def test_router_z_loss_values(rng):
    """Equal logits c in a row: logsumexp = c + log(E)."""
    T, E = 5, 6
    c = rng.standard_normal(T).astype(np.float32)
    logits = np.repeat(c[:, None], E, axis=1)
    want = float(np.mean((c.astype(np.float64) + math.log(E)) ** 2))
    assert math.isclose(moe_ext.router_z_loss(np.ascontiguousarray(logits)), want, rel_tol=1e-6)


def test_router_z_loss_large_logits_do_not_overflow(rng):
    """logsumexp subtracts the row max: logits of ~1e4 do not overflow."""
    logits = (rng.standard_normal((9, 7)) * 10 + 1e4).astype(np.float32)
    got = moe_ext.router_z_loss(logits)
    assert math.isfinite(got)
    assert math.isclose(got, ref.router_z_loss(f64(logits)), rel_tol=LOSS_RTOL)


def test_losses_empty(rng):
    """T = 0 gives 0.0."""
    E = 8
    assert moe_ext.load_balancing_loss(np.empty((0, E), np.float32), np.empty((0, 2), np.int32), E) == 0.0
    assert moe_ext.router_z_loss(np.empty((0, E), np.float32)) == 0.0


def test_load_balancing_loss_k0(rng):
    """topk_ids with k = 0 (no copies at all) is accepted, so it must give the reference's 0.0
    (or be rejected with a ValueError naming topk_ids) -- never NaN."""
    T, E = 6, 4
    probs = _probs(rng, T, E)
    ids = np.empty((T, 0), np.int32)
    try:
        got = moe_ext.load_balancing_loss(probs, ids, E)
    except ValueError as e:
        assert "topk_ids" in str(e)
        return
    assert got == ref.load_balancing_loss(f64(probs), ids, E) == 0.0


def test_losses_nan_inf(rng):
    """NaN propagates; +inf logits give +inf; rows of -inf give +inf ((-inf)^2), like the reference."""
    T, E = 6, 5
    logits = (rng.standard_normal((T, E)) * 2).astype(np.float32)
    nan = logits.copy()
    nan[2, 1] = np.nan
    assert math.isnan(moe_ext.router_z_loss(nan)) and math.isnan(ref.router_z_loss(f64(nan)))
    inf = logits.copy()
    inf[3, 0] = np.inf
    assert moe_ext.router_z_loss(inf) == ref.router_z_loss(f64(inf)) == math.inf
    ninf = logits.copy()
    ninf[4, :] = -np.inf
    assert moe_ext.router_z_loss(ninf) == ref.router_z_loss(f64(ninf)) == math.inf
    probs, ids = _probs(rng, T, E), random_ids(rng, T, E, 2)
    probs[1, 2] = np.nan
    assert math.isnan(moe_ext.load_balancing_loss(probs, ids, E))


def test_losses_deterministic(rng):
    T, E, k = 200, 32, 4
    probs, ids = _probs(rng, T, E), random_ids(rng, T, E, k)
    logits = (rng.standard_normal((T, E)) * 3).astype(np.float32)
    a = moe_ext.load_balancing_loss(probs, ids, E)
    b = moe_ext.router_z_loss(logits)
    for _ in range(3):
        assert moe_ext.load_balancing_loss(probs, ids, E) == a
        assert moe_ext.router_z_loss(logits) == b
