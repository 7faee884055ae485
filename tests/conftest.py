"""Shared fixtures and helpers of the moe_ext test suite.

* ``isa`` (autouse): every test runs once per CPU tier this machine has (``moe_ext.available_isas()``),
  except the tests of ``test_reference.py``, which never call the kernels, and of modules that set
  ``PER_TIER = False``: those run exactly once, with ``isa`` None.
* ``rng``: a NumPy Generator seeded from the test's node id (fresh, reproducible data per test).
* ``bf16_dot``, ``vnni`` (on request): both bfloat16 product paths, both int8 product paths, where the CPU
  has them.
* helpers: ``rel_err``, ``random_*`` input makers, ``unchanged`` (inputs bit-identical after a call),
  ``f64`` (cast to float64 for the reference) and the tolerance constants below.

Test modules import the helpers with ``from conftest import ...`` (pytest puts tests/ on sys.path).
"""
import contextlib
import math
import zlib

import numpy as np
import pytest

import moe_ext

# --------------------------------------------------------------------------------------------------
# Tolerances (relative Frobenius-norm errors, float32 kernels against the float64 reference).
# --------------------------------------------------------------------------------------------------
# float32 has a unit roundoff u = 2^-24 ~ 6e-8. A dot product of length K accumulated in float32 has a
# typical (random-walk) relative error ~ sqrt(K) * u and a worst case ~ K * u. For K <= ~4096 the typical
# error is <= 64 * 6e-8 ~ 4e-6, and a norm over many outputs averages it further: 1e-5 leaves a margin
# for the two chained GEMMs, the float32 activation (expf/erff are a few ulp) and the weighted combine.
GEMM_RTOL = 1e-5
# route: a router GEMM of length d <= 128 (error ~ sqrt(d) * u * |logit scale| ~ 1e-6 absolute on the
# logits), then expf and one division per score (a few ulp each): weights and probs within 1e-5.
ROUTE_RTOL = 1e-5
# unpermute: at most k (<= 8 here) float32 multiply-adds per output, each rounding once: ~k * u ~ 5e-7.
COMBINE_RTOL = 2e-6
# Losses are accumulated in double in C++ from the float32 inputs, exactly what the float64 reference
# does with the same values: only the summation order differs (~T * 1e-16), so 1e-6 is very loose.
LOSS_RTOL = 1e-6
# Selection: float32 scores are within ~1e-6 of the float64 ones (see ROUTE_RTOL), so a row whose
# reference gap between the k-th and (k+1)-th selection key (and, for grouped selection, between the
# topk_group-th and next group score) exceeds 1e-4 must select exactly the reference's ids.
SELECTION_MARGIN = 1e-4
# Pure data movement (permute's gather, perm_rows, offsets): bit-exact, compared with
# assert_array_equal, no tolerance.

ACTIVATIONS = tuple(moe_ext.reference.ACTIVATIONS)  # the presets
GATED = tuple(moe_ext.reference.GATED_ACTIVATIONS)
TINY = np.finfo(np.float64).tiny


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------
def _runs_on_kernels(module):
    """test_reference.py checks the NumPy reference only: it is not repeated per ISA tier. A module that
    handles tiers itself (the CLI's subprocesses, the fuzzer's per-example draw) sets PER_TIER = False."""
    return module.__name__.rsplit(".", 1)[-1] != "test_reference" and getattr(module, "PER_TIER", True)


def pytest_generate_tests(metafunc):
    if "isa" in metafunc.fixturenames and _runs_on_kernels(metafunc.module):
        tiers = moe_ext.available_isas()
        metafunc.parametrize("isa", tiers, ids=tiers, indirect=True)


@pytest.fixture(autouse=True)
def isa(request):
    """Select the CPU tier of this test's parameter for its duration, then restore the previous one."""
    name = getattr(request, "param", None)
    if name is None:  # test_reference.py or PER_TIER = False: no tier
        yield None
        return
    previous = moe_ext.get_isa()
    moe_ext.set_isa(name)
    try:
        yield name
    finally:
        moe_ext.set_isa(previous)


@pytest.fixture(params=[True, False], ids=["dpbf16", "widen"])
def bf16_dot(request):
    """Both bfloat16 paths where the CPU has vdpbf16ps; only the widening one elsewhere."""
    available = moe_ext._core.bf16_dot_enabled()
    if request.param and not available:
        pytest.skip("this CPU has no AVX512_BF16 (the widen path is the one tested)")
    moe_ext._core._set_bf16_dot_enabled(request.param)
    try:
        yield request.param
    finally:
        moe_ext._core._set_bf16_dot_enabled(available)


@pytest.fixture(params=["vnni", "no-vnni"])
def vnni(request, isa):
    """On the avx512 tier of a CPU with AVX512_VNNI, both int8 product paths; elsewhere one run."""
    has = moe_ext._core.vnni_enabled()
    if request.param == "no-vnni" and not (has and isa == "avx512"):
        pytest.skip("no second int8 path on this tier")
    moe_ext._core._set_vnni_enabled(request.param == "vnni")
    try:
        yield request.param
    finally:
        moe_ext._core._set_vnni_enabled(has)


@pytest.fixture
def rng(request):
    """A Generator seeded from the node id: fresh data per test (and per tier), reproducible run to run."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------
def rel_err(got, want):
    """||got - want|| / max(||want||, tiny), in float64 (Frobenius norm over all elements)."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.linalg.norm((got - want).ravel()) / max(np.linalg.norm(want.ravel()), TINY))


def assert_close(got, want, rtol, what=""):
    """rel_err(got, want) <= rtol, with NaN/Inf required at the same places (and equal infinities)."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{what}: NaN positions")
    inf = np.isinf(want)
    np.testing.assert_array_equal(got[inf], want[inf], err_msg=f"{what}: infinities")
    finite = np.isfinite(want)
    assert np.isfinite(got[finite]).all(), f"{what}: non-finite values where the reference is finite"
    err = rel_err(got[finite], want[finite])
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol:.3g}"


def f64(*arrays):
    """The float64 copies of float32 inputs (None passes through), for the float64 ground truth."""
    out = tuple(None if a is None else np.asarray(a, dtype=np.float64) for a in arrays)
    return out[0] if len(out) == 1 else out


def random_x(rng, T, d, scale=1.0):
    """Activations [T, d] float32 ~ N(0, scale^2)."""
    return (rng.standard_normal((T, d)) * scale).astype(np.float32)


def random_router(rng, E, d, spread=2.0):
    """Router weight [E, d] float32 ~ N(0, 1/d) * spread: logits ~ N(0, spread^2) for unit x, which
    spreads the softmax scores so that most rows have a clear top-k."""
    return (rng.standard_normal((E, d)) * (spread / math.sqrt(max(d, 1)))).astype(np.float32)


def random_weights(rng, shape, fan_in):
    """A float32 weight of the given shape ~ N(0, 1/fan_in)."""
    return (rng.standard_normal(shape) / math.sqrt(max(fan_in, 1))).astype(np.float32)


def random_expert_weights(rng, E, d, f, activation="swiglu"):
    """(w13 [E,2f,d] or w1 [E,f,d], w2 [E,d,f]) float32, scaled 1/sqrt(fan_in)."""
    rows = 2 * f if activation in GATED else f
    return random_weights(rng, (E, rows, d), d), random_weights(rng, (E, d, f), f)


def random_ids(rng, T, E, k, dtype=np.int32):
    """topk_ids [T, k]: k distinct experts per row (k <= E), random order."""
    if T == 0:
        return np.zeros((0, k), dtype=dtype)
    keys = rng.random((T, E))
    return np.argsort(keys, axis=1)[:, :k].astype(dtype)


def random_topk_weights(rng, T, k):
    """topk_weights [T, k] float32, positive, each row summing to ~1 (like a renormalised router)."""
    w = rng.random((T, k)) + 0.05
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def random_offsets(rng, E, counts=None, max_rows=12):
    """expert_offsets [E+1] int32 from per-expert row counts (random in 0..max_rows unless given)."""
    if counts is None:
        counts = rng.integers(0, max_rows + 1, size=E)
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)


def random_routing(rng, T, d, E, k, activation="swiglu", f=None):
    """A full set of experts() inputs: x, w13_or_w1, w2, topk_weights, topk_ids."""
    f = f if f is not None else max(1, d // 2)
    x = random_x(rng, T, d)
    w13, w2 = random_expert_weights(rng, E, d, f, activation)
    return x, w13, w2, random_topk_weights(rng, T, k), random_ids(rng, T, E, k)


@contextlib.contextmanager
def unchanged(*arrays):
    """Context manager: the given ndarrays (others are ignored) must be bit-identical, same dtype,
    shape and strides, when the block ends, whether or not it raised."""
    watched = [(a, a.copy(), a.strides) for a in arrays if isinstance(a, np.ndarray)]
    try:
        yield
    finally:
        for i, (a, before, strides) in enumerate(watched):
            assert a.dtype == before.dtype and a.shape == before.shape and a.strides == strides, \
                f"input {i} changed its dtype/shape/strides"
            assert a.tobytes() == before.tobytes(), f"input {i} was written to"


def selection_margins(keys, top_k, n_group=None, topk_group=None, exact_ties_ok=False):
    """Per row of float64 selection keys [T, E] (NaN counts as -inf), the smallest change of a key that
    could change the reference's selection; inf when nothing can. For the experts: the gaps between
    consecutive keys among the k+1 best allowed ones (the order of the ids matters too); for grouped
    selection also the gap between the topk_group-th and the next group score.

    With exact_ties_ok, keys that are exactly equal are fine (the lower-id rule decides them alike in
    float32 and float64) and the margin is the smallest gap between *distinct* values that matter: all
    distinct keys down to the k-th, and the next distinct key below it (which rounding could merge into
    the tie: float32 saturates sigmoid(20) to 1.0 where float64 does not)."""
    keys = np.where(np.isnan(keys), -np.inf, np.asarray(keys, dtype=np.float64))
    T, E = keys.shape
    margins = np.full(T, np.inf)

    def boundary_gap(sorted_desc, n, order_matters):
        """Smallest decisive gap for choosing the n best of sorted_desc."""
        if n >= len(sorted_desc) and not order_matters:
            return np.inf
        with np.errstate(invalid="ignore"):
            if not exact_ties_ok:
                top = sorted_desc[:n + 1]
                gaps = top[:-1] - top[1:] if order_matters else top[n - 1:n] - top[n:n + 1]
            else:
                distinct = np.unique(sorted_desc)[::-1]  # descending distinct values
                pos = int(np.nonzero(distinct == sorted_desc[n - 1])[0][0])
                lo = 0 if order_matters else max(pos - 1, 0)
                rel = distinct[lo:pos + 2]
                gaps = rel[:-1] - rel[1:]
        gaps = np.nan_to_num(gaps, nan=0.0)  # -inf - -inf: undecided
        return np.min(gaps) if gaps.size else np.inf

    for t in range(T):
        row = keys[t]
        allowed = np.arange(E)
        if n_group is not None:
            size = E // n_group
            top2 = -np.sort(-row.reshape(n_group, size), axis=1)[:, :2]
            with np.errstate(invalid="ignore"):
                gscore = top2[:, 0] if size == 1 else top2[:, 0] + top2[:, 1]
            gscore = np.where(np.isnan(gscore), -np.inf, gscore)
            if topk_group < n_group:  # only the membership of the kept groups matters
                margins[t] = min(margins[t], boundary_gap(np.sort(gscore)[::-1], topk_group, False))
            kept = np.argsort(-gscore, kind="stable")[:topk_group]
            allowed = np.sort(np.concatenate([np.arange(g * size, (g + 1) * size) for g in kept]))
        sk = np.sort(row[allowed])[::-1]
        margins[t] = min(margins[t], boundary_gap(sk, top_k, True))
    return margins
