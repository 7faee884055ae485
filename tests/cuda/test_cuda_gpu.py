"""GPU parity of every CUDA op, dtype (float32, bfloat16, float16) and the fused layer against
moe_ext.reference (float64). Skipped, with the reason "no CUDA device", where no GPU is present.

Inputs are rounded to the dtype first and the float64 reference is computed from those rounded values,
so the error measured is the kernels' own: float32 accumulation plus the rounding of intermediates
(h, activation, y_perm) and outputs to the dtype. Tolerances (relative Frobenius norm):
  float32: 2e-5 (no TF32: exact float32 products, K <= 1024 sums, ~sqrt(K) * 6e-8 typical);
  float16: 4e-3 (unit roundoff 4.9e-4; two GEMMs, each output and intermediate rounded once);
  bfloat16: 2e-2 (unit roundoff 3.9e-3; same chain).
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from moe_ext import reference  # noqa: E402

PER_TIER = False


def _device_present():
    try:
        from moe_ext import cuda
    except ImportError:
        return False
    return cuda.device_count() > 0 and torch.cuda.is_available()


pytestmark = pytest.mark.skipif(not _device_present(), reason="no CUDA device")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RTOL = {"float32": 2e-5, "float16": 4e-3, "bfloat16": 2e-2}
ACTIVATIONS = ("swiglu", "geglu", "relu", "gelu")
GATED = ("swiglu", "geglu")


@pytest.fixture
def mcuda():
    from moe_ext import cuda
    return cuda


def rel_err(got, want):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300))


def on_gpu(array, dtype):
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to("cuda", dtype)


def f64(t):
    return t.float().cpu().numpy().astype(np.float64)


def random_offsets(rng, E, M):
    cuts = np.sort(rng.integers(0, M + 1, size=E - 1))
    return np.concatenate([[0], cuts, [M]]).astype(np.int32)


# ------------------------------------------------------------------------------------------ grouped GEMM
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M, N, K, E", [
    (1, 8, 16, 1), (7, 24, 40, 3), (32, 64, 64, 4),       # decode path (M <= 32)
    (33, 130, 72, 5), (300, 256, 128, 8), (517, 96, 61, 6),  # tiled; K = 61: the unaligned load path
    (200, 64, 64, 64),                                     # many experts, most with few rows
])
@pytest.mark.parametrize("activation", [None, *ACTIVATIONS])
def test_grouped_gemm(mcuda, dtype, M, N, K, E, activation):
    rng = np.random.default_rng(M * 1000 + N + K + E)
    a = on_gpu(rng.standard_normal((M, K)), DTYPES[dtype])
    w = on_gpu(rng.standard_normal((E, N, K)) / np.sqrt(K), DTYPES[dtype])
    offsets = random_offsets(rng, E, M)
    out = mcuda.grouped_gemm(a, w, torch.from_numpy(offsets).cuda(), activation=activation)
    want = reference.grouped_gemm(f64(a), f64(w), offsets)
    if activation is not None:
        want = reference.activate(want, activation)
    assert out.shape == want.shape and out.dtype == DTYPES[dtype]
    assert rel_err(f64(out), want) <= RTOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_gemm_zero_fills_rows_past_the_experts(mcuda, dtype):
    rng = np.random.default_rng(1)
    a = on_gpu(rng.standard_normal((100, 32)), DTYPES[dtype])
    w = on_gpu(rng.standard_normal((3, 16, 32)), DTYPES[dtype])
    offsets = torch.tensor([0, 10, 10, 60], dtype=torch.int32, device="cuda")
    out = mcuda.grouped_gemm(a, w, offsets, check_offsets=False)
    assert torch.count_nonzero(out[60:]) == 0
    want = reference.grouped_gemm(f64(a)[:60], f64(w), offsets.cpu().numpy())
    assert rel_err(f64(out[:60]), want) <= RTOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_gemm_is_deterministic(mcuda, dtype):
    rng = np.random.default_rng(2)
    a = on_gpu(rng.standard_normal((700, 200)), DTYPES[dtype])
    w = on_gpu(rng.standard_normal((5, 300, 200)), DTYPES[dtype])
    offsets = torch.from_numpy(random_offsets(rng, 5, 700)).cuda()
    first = mcuda.grouped_gemm(a, w, offsets)
    for _ in range(3):
        assert torch.equal(mcuda.grouped_gemm(a, w, offsets), first)


# ------------------------------------------------------------------------------------------ route
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [
    dict(E=8, k=2), dict(E=1, k=1), dict(E=6, k=6), dict(E=64, k=6, scoring="sigmoid", renormalize=False, scale=2.5),
    dict(E=16, k=4, scoring="sigmoid", n_group=4, topk_group=2, correction_bias=True),
])
@pytest.mark.parametrize("T", [0, 1, 37])
def test_route(mcuda, dtype, case, T):
    case = dict(case)
    E, k = case.pop("E"), case.pop("k")
    rng = np.random.default_rng(E * 100 + k + T)
    d = 48
    x = on_gpu(rng.standard_normal((T, d)), DTYPES[dtype])
    w_router = on_gpu(rng.standard_normal((E, d)) * 2 / np.sqrt(d), DTYPES[dtype])
    if case.pop("correction_bias", False):
        case["correction_bias"] = torch.from_numpy(rng.standard_normal(E).astype(np.float32) * 0.1).cuda()
    weights, ids, probs = mcuda.route(x, w_router, k, return_probs=True, **case)
    ref_case = {key: (v.cpu().numpy().astype(np.float64) if torch.is_tensor(v) else v) for key, v in case.items()}
    want_w, want_ids, want_probs = reference.route(f64(x), f64(w_router), k, return_probs=True, **ref_case)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert rel_err(probs.cpu().numpy(), want_probs) <= 1e-5
    # rows whose selection is decided by more than the float32 error must pick the same ids
    keys = want_probs + (ref_case.get("correction_bias", 0.0))
    top = -np.sort(-keys, axis=1)[:, :min(k + 1, E)] if T else np.zeros((0, 1))
    clear = (top[:, :-1] - top[:, 1:]).min(axis=1) > 1e-4 if T and top.shape[1] > 1 else np.ones(T, bool)
    clear &= "n_group" not in case  # grouped rows: compared through the weights' norm only
    np.testing.assert_array_equal(ids.cpu().numpy()[clear], want_ids[clear])
    assert rel_err(weights.cpu().numpy()[clear], want_w[clear]) <= 1e-5


# ------------------------------------------------------------------------------------------ permute
@pytest.mark.parametrize("T, k, E, capacity", [
    (0, 2, 4, None), (1, 1, 1, None), (37, 2, 8, None), (37, 8, 8, None), (2000, 6, 64, None),
    (300, 2, 4, 20), (300, 2, 4, 0), (5000, 1, 3000, None),
])
def test_permute_matches_cpu_order(mcuda, T, k, E, capacity):
    rng = np.random.default_rng(T + k + E)
    x = rng.standard_normal((T, 24)).astype(np.float32)
    ids = np.argsort(rng.random((T, E)), axis=1)[:, :k].astype(np.int32) if T else np.zeros((0, k), np.int32)
    x_perm, offsets, perm_rows = mcuda.permute(torch.from_numpy(x).cuda(), torch.from_numpy(ids).cuda(), E,
                                               capacity=capacity)
    want = reference.permute(x, ids, E, capacity=capacity)
    np.testing.assert_array_equal(offsets.cpu().numpy(), want.expert_offsets)
    np.testing.assert_array_equal(perm_rows.cpu().numpy(), want.perm_rows)
    kept = int(want.expert_offsets[-1])
    np.testing.assert_array_equal(x_perm.cpu().numpy()[:kept], want.x_perm)
    assert torch.count_nonzero(x_perm[kept:]) == 0


def test_permute_rejects_bad_ids(mcuda):
    x = torch.zeros(3, 4, device="cuda")
    with pytest.raises(ValueError, match="topk_ids"):
        mcuda.permute(x, torch.tensor([[0], [5], [1]], dtype=torch.int32, device="cuda"), 4)


# ------------------------------------------------------------------------------------------ unpermute, activation
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, k, d", [(1, 1, 8), (37, 2, 130), (64, 6, 256)])
def test_unpermute(mcuda, dtype, T, k, d):
    rng = np.random.default_rng(T * k + d)
    perm_rows = rng.permutation(T * k).reshape(T, k).astype(np.int32)
    perm_rows[rng.random((T, k)) < 0.1] = -1  # dropped copies
    y_perm = on_gpu(rng.standard_normal((T * k, d)), DTYPES[dtype])
    weights = rng.random((T, k)).astype(np.float32)
    y = mcuda.unpermute(y_perm, torch.from_numpy(perm_rows).cuda(), torch.from_numpy(weights).cuda())
    assert rel_err(f64(y), reference.unpermute(f64(y_perm), perm_rows, weights.astype(np.float64))) <= RTOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activate(mcuda, dtype, activation):
    rng = np.random.default_rng(3)
    h = on_gpu(rng.standard_normal((53, 2 * 37 if activation in GATED else 37)) * 3, DTYPES[dtype])
    assert rel_err(f64(mcuda.activate(h, activation)), reference.activate(f64(h), activation)) <= RTOL[dtype]


# ------------------------------------------------------------------------------------------ fused layer
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("T, d, f, E, k", [(1, 64, 32, 8, 2), (16, 128, 96, 8, 2), (257, 96, 80, 6, 3),
                                            (300, 64, 48, 16, 16)])
def test_experts_and_moe(mcuda, dtype, activation, T, d, f, E, k):
    rng = np.random.default_rng(T + d + f + E + k)
    rows = 2 * f if activation in GATED else f
    x = on_gpu(rng.standard_normal((T, d)), DTYPES[dtype])
    w13 = on_gpu(rng.standard_normal((E, rows, d)) / np.sqrt(d), DTYPES[dtype])
    w2 = on_gpu(rng.standard_normal((E, d, f)) / np.sqrt(f), DTYPES[dtype])
    ids = np.argsort(rng.random((T, E)), axis=1)[:, :k].astype(np.int32)
    weights = rng.random((T, k)).astype(np.float32)
    y = mcuda.experts(x, w13, w2, torch.from_numpy(weights).cuda(), torch.from_numpy(ids).cuda(), activation=activation)
    want = reference.experts(f64(x), f64(w13), f64(w2), weights.astype(np.float64), ids, activation=activation)
    assert rel_err(f64(y), want) <= 2 * RTOL[dtype]
    w_router = on_gpu(rng.standard_normal((E, d)) * 2 / np.sqrt(d), DTYPES[dtype])
    y = mcuda.moe(x, w_router, w13, w2, k, activation=activation)
    # the reference routes from the same (rounded) inputs; near-ties may pick other experts, so compare
    # through the CUDA router's own choice
    weights, ids = mcuda.route(x, w_router, k)
    want = reference.experts(f64(x), f64(w13), f64(w2), weights.cpu().numpy().astype(np.float64),
                             ids.cpu().numpy(), activation=activation)
    assert rel_err(f64(y), want) <= 2 * RTOL[dtype]


# ------------------------------------------------------------------------------------------ backward
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M, N, K, E", [(7, 24, 40, 3), (300, 130, 72, 5), (64, 64, 64, 8)])
def test_grouped_gemm_backward(mcuda, dtype, M, N, K, E):
    rng = np.random.default_rng(M + N + K + E)
    a = on_gpu(rng.standard_normal((M, K)), DTYPES[dtype])
    w = on_gpu(rng.standard_normal((E, N, K)) / np.sqrt(K), DTYPES[dtype])
    d_out = on_gpu(rng.standard_normal((M, N)), DTYPES[dtype])
    offsets = random_offsets(rng, E, M)
    offsets[1] = offsets[0]  # an expert with no rows: its dW is zero
    d_a, d_w = mcuda.grouped_gemm_backward(d_out, a, w, torch.from_numpy(offsets).cuda())
    A, W, G = f64(a), f64(w), f64(d_out)
    want_a, want_w = np.zeros_like(A), np.zeros_like(W)
    for e in range(E):
        lo, hi = offsets[e], offsets[e + 1]
        want_a[lo:hi] = G[lo:hi] @ W[e]
        want_w[e] = G[lo:hi].T @ A[lo:hi]
    assert rel_err(f64(d_a), want_a) <= RTOL[dtype]
    assert rel_err(f64(d_w), want_w) <= RTOL[dtype]
    assert torch.count_nonzero(d_w[0]) == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_backward(mcuda, dtype, activation):
    rng = np.random.default_rng(4)
    f = 37
    h = torch.from_numpy(rng.standard_normal((29, 2 * f if activation in GATED else f))).to(DTYPES[dtype])
    d_act = torch.from_numpy(rng.standard_normal((29, f))).to(DTYPES[dtype])
    got = mcuda.activation_backward(h.cuda(), d_act.cuda(), activation)
    h64 = h.double().requires_grad_()
    act = {"swiglu": lambda g, u: torch.nn.functional.silu(g) * u, "geglu": lambda g, u: torch.nn.functional.gelu(g) * u}
    out = act[activation](h64[:, :f], h64[:, f:]) if activation in GATED else (
        torch.relu(h64) if activation == "relu" else torch.nn.functional.gelu(h64))
    out.backward(d_act.double())
    assert rel_err(f64(got), h64.grad.numpy()) <= RTOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_unpermute_and_permute_backward(mcuda, dtype):
    rng = np.random.default_rng(5)
    T, k, d = 41, 3, 70
    perm_rows = rng.permutation(T * k).reshape(T, k).astype(np.int32)
    y_perm = torch.from_numpy(rng.standard_normal((T * k, d))).to(DTYPES[dtype])
    weights = torch.from_numpy(rng.random((T, k)).astype(np.float32))
    dy = torch.from_numpy(rng.standard_normal((T, d))).to(DTYPES[dtype])
    rows = torch.from_numpy(perm_rows)
    d_y_perm, d_w = mcuda.unpermute_backward(dy.cuda(), y_perm.cuda(), rows.cuda(), weights.cuda())
    yp = y_perm.double().requires_grad_()
    wt = weights.double().requires_grad_()
    y = (wt[:, :, None] * yp[rows.long()]).sum(1)
    y.backward(dy.double())
    assert rel_err(f64(d_y_perm), yp.grad.numpy()) <= RTOL[dtype]
    assert rel_err(d_w.cpu().numpy(), wt.grad.numpy()) <= RTOL[dtype]
    d_x = mcuda.permute_backward(d_y_perm, rows.cuda())
    want = f64(d_y_perm)[perm_rows].sum(1)
    assert rel_err(f64(d_x), want) <= RTOL[dtype]
