"""GPU parity of every moe_ext.cuda op, dtype (float32, bfloat16, float16) and the fused layer, against
the CPU kernels (route, exactly) or moe_ext.reference in float64 (everything else), element by element.

Without a GPU every test here is skipped with the reason; under MOE_EXT_REQUIRE_GPU=1 they fail instead
(fixture `gpu`, gpu_support.py). The kernels' outputs are pre-filled with NaN / INT32_MAX (fixture
`poisoned`), so an element no kernel writes is caught. Inputs are rounded to the dtype first and the
reference computed from the rounded values: the error measured is the kernels' own (float32 accumulation,
intermediates and outputs rounded to the dtype); tolerances in gpu_support.py.

Paths covered on purpose: the decode GEMV (M <= 32) with K not a multiple of 8 and row passes with a tail
(rows not a multiple of 8 per expert), rows past expert_offsets[E] (zero-filled), the tile scan over more
experts than a block has threads (E = 256, 300: several chunks), the dW schedule's cp.async branch (offsets
and M multiples of 8) and its element-wise branch, operands that are not 16-byte aligned, strided views
(a ValueError), T = 0, T = 1, one expert with every token, empty experts, capacity with drops, every
activation, and the backward of each op. CUDA graphs: experts and moe captured and replayed on new inputs
equal the eager result; under capture the value checks run on the device. Streams: a call on a side
stream is ordered on that stream.
"""
import numpy as np
import pytest

from gpu_support import (RTOL, ROUTE_WEIGHT_RTOL, assert_equal, assert_rows_close, f64, gpu,  # noqa: F401
                         ids_on_gpu, import_torch, on_gpu, poisoned)

torch = import_torch()

import moe_ext  # noqa: E402
from moe_ext import reference  # noqa: E402

PER_TIER = False
pytestmark = pytest.mark.usefixtures("gpu")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ACTIVATIONS = ("swiglu", "geglu", "relu", "gelu")
GATED = ("swiglu", "geglu")


def random_offsets(rng, E, M, empty_fraction=0.3, multiple=1):
    """Offsets [E+1] covering 0..M with some experts empty; cuts at multiples of `multiple`."""
    cuts = np.sort(rng.integers(0, M // multiple + 1, size=E - 1)) * multiple
    cuts[rng.random(E - 1) < empty_fraction] = 0
    cuts = np.sort(cuts)
    return np.concatenate([[0], cuts, [M]]).astype(np.int32)


def one_expert_offsets(E, M, expert):
    return np.array([0] * (expert + 1) + [M] * (E - expert), dtype=np.int32)


def random_ids(rng, T, E, k):
    return np.argsort(rng.random((T, E)), axis=1)[:, :k].astype(np.int32) if T else np.zeros((0, k), np.int32)


def gemm_reference(a, w, offsets, activation):
    want = reference.grouped_gemm(f64(a), f64(w), offsets)
    return want if activation is None else reference.activate(want, activation)


# ------------------------------------------------------------------------------------------ grouped GEMM
GEMM_CASES = {  # name: (M, N, K, E, offsets kind)
    "decode-1row": (1, 8, 16, 1, "random"),
    "decode-k40": (7, 24, 40, 3, "random"),
    "decode-k61-tail-passes": (29, 24, 61, 3, "passes"),   # K % 8 != 0: element loads; 11-row expert: 8 + 3
    "decode-k100": (32, 40, 100, 4, "passes"),             # bf16/fp16 rows of 200 bytes: not 16-byte multiples
    "decode-one-expert": (20, 16, 32, 5, "one"),
    "tiled-33": (33, 130, 72, 5, "random"),
    "tiled-300": (300, 256, 128, 8, "random"),
    "tiled-k61": (517, 96, 61, 6, "random"),
    "tiled-64-experts": (200, 64, 64, 64, "random"),
    "tiled-one-expert": (150, 64, 48, 8, "one"),
    "tiled-E256": (600, 72, 48, 256, "random"),            # tile scan: 2 chunks of 128 (mma) threads
    "tiled-E300": (1000, 64, 32, 300, "random"),           # 3 chunks (mma), 2 (float32 SIMT, 256 threads)
}


def gemm_offsets(rng, kind, E, M):
    if kind == "one":
        return one_expert_offsets(E, M, E // 2)
    if kind == "passes":
        first = min(11, M)
        return np.concatenate([[0, first], np.sort(rng.integers(first, M + 1, size=E - 2)), [M]]).astype(np.int32)
    return random_offsets(rng, E, M)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", GEMM_CASES)
@pytest.mark.parametrize("activation", [None, *ACTIVATIONS])
def test_grouped_gemm(poisoned, dtype, case, activation):
    M, N, K, E, kind = GEMM_CASES[case]
    rng = np.random.default_rng([M, N, K, E])
    a = on_gpu(rng.standard_normal((M, K)), DTYPES[dtype])
    w = on_gpu(rng.standard_normal((E, N, K)) / np.sqrt(K), DTYPES[dtype])
    offsets = gemm_offsets(rng, kind, E, M)
    out = poisoned.grouped_gemm(a, w, ids_on_gpu(offsets), activation=activation)
    assert out.dtype == DTYPES[dtype]
    assert_rows_close(out, gemm_reference(a, w, offsets, activation), RTOL[dtype], f"grouped_gemm {case}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [0, 20, 100])  # empty, decode path, tiled path
def test_grouped_gemm_zero_fills_rows_past_the_experts(poisoned, dtype, M):
    rng = np.random.default_rng(M)
    a = on_gpu(rng.standard_normal((M, 32)), DTYPES[dtype])
    w = on_gpu(rng.standard_normal((3, 16, 32)), DTYPES[dtype])
    owned = M * 3 // 5
    offsets = np.array([0, owned // 3, owned // 3, owned], dtype=np.int32)
    out = poisoned.grouped_gemm(a, w, ids_on_gpu(offsets), check_offsets=False)
    want = np.zeros((M, 16))
    want[:owned] = reference.grouped_gemm(f64(a)[:owned], f64(w), offsets)
    assert_rows_close(out, want, RTOL[dtype], "grouped_gemm with tail rows")


@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_gemm_is_deterministic(dtype):
    rng = np.random.default_rng(2)
    from moe_ext import cuda
    a = on_gpu(rng.standard_normal((700, 200)), DTYPES[dtype])
    w = on_gpu(rng.standard_normal((5, 300, 200)), DTYPES[dtype])
    offsets = ids_on_gpu(random_offsets(rng, 5, 700))
    first = cuda.grouped_gemm(a, w, offsets)
    for _ in range(3):
        assert torch.equal(cuda.grouped_gemm(a, w, offsets), first)


def misaligned(array, dtype):
    """A contiguous CUDA tensor whose data starts one element past a 16-byte boundary."""
    t = on_gpu(array, dtype)
    flat = torch.empty(t.numel() + 1, dtype=dtype, device="cuda")
    view = flat[1:].view(t.shape)
    view.copy_(t)
    assert view.data_ptr() % 16 != 0 and view.is_contiguous()
    return view


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [16, 200])  # decode and tiled
def test_unaligned_operands_are_computed_correctly(poisoned, dtype, M):
    rng = np.random.default_rng(M + 7)
    K, N, E = 64, 48, 4
    a_np, w_np = rng.standard_normal((M, K)), rng.standard_normal((E, N, K)) / 8
    offsets = random_offsets(rng, E, M)
    a, w = misaligned(a_np, DTYPES[dtype]), misaligned(w_np, DTYPES[dtype])
    out = poisoned.grouped_gemm(a, w, ids_on_gpu(offsets), activation="swiglu")
    assert_rows_close(out, gemm_reference(a, w, offsets, "swiglu"), RTOL[dtype], "grouped_gemm, unaligned")
    T, k = M // 2, 2
    ids = random_ids(rng, T, E, k)
    x = misaligned(rng.standard_normal((T, K)), DTYPES[dtype])
    x_perm, offs, rows = poisoned.permute(x, ids_on_gpu(ids), E)
    want = reference.permute(f64(x), ids, E)
    assert_equal(x_perm, want.x_perm, "permute of an unaligned x")


def test_strided_views_are_a_clear_error(gpu):
    from moe_ext import cuda
    a = torch.randn(64, 32, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2, 48, 32, device="cuda", dtype=torch.bfloat16)
    offsets = torch.tensor([0, 30, 32], dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="a: expected a contiguous tensor"):
        cuda.grouped_gemm(a[::2], w, offsets)
    with pytest.raises(ValueError, match="w: expected a contiguous tensor"):
        cuda.grouped_gemm(a[:32], w.transpose(1, 2).contiguous().transpose(1, 2), offsets)
    with pytest.raises(ValueError, match="x: expected a contiguous tensor"):
        cuda.experts(a.t()[:, :16].t(), w, w[:, :, :24].contiguous(), torch.rand(16, 1, device="cuda"),
                     torch.zeros(16, 1, dtype=torch.int32, device="cuda"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_ops_take_strided_and_unaligned_views(poisoned, dtype):
    """torch.ops.moe_ext makes its inputs contiguous: a transposed x and an unaligned w13 give the right result."""
    import moe_ext.torch  # noqa: F401
    rng = np.random.default_rng(11)
    T, d, f, E, k = 40, 64, 48, 6, 2
    x_np = rng.standard_normal((T, d))
    x = on_gpu(x_np.T, DTYPES[dtype]).t()  # a transposed view
    assert not x.is_contiguous()
    w13 = misaligned(rng.standard_normal((E, 2 * f, d)) / 8, DTYPES[dtype])
    w2 = on_gpu(rng.standard_normal((E, d, f)) / 7, DTYPES[dtype])
    ids, weights = random_ids(rng, T, E, k), rng.random((T, k)).astype(np.float32)
    y = torch.ops.moe_ext.experts(x, w13, w2, torch.from_numpy(weights).cuda(), ids_on_gpu(ids), "swiglu", None)
    want = reference.experts(f64(x), f64(w13), f64(w2), weights.astype(np.float64), ids)
    assert_rows_close(y, want, RTOL[dtype], "torch.ops.moe_ext.experts on views")


# ------------------------------------------------------------------------------------------ route
ROUTE_CASES = {
    "mixtral": dict(E=8, k=2),
    "one-expert": dict(E=1, k=1),
    "k-equals-E": dict(E=6, k=6),
    "sigmoid-scaled": dict(E=64, k=6, scoring="sigmoid", renormalize=False, scale=2.5),
    "grouped": dict(E=16, k=4, scoring="sigmoid", n_group=4, topk_group=2, correction_bias=True),
    "qwen3": dict(E=128, k=8),
    "deepseek-v3": dict(E=256, k=8, scoring="sigmoid", n_group=8, topk_group=4, correction_bias=True, scale=2.5),
    "E300": dict(E=300, k=8, bias=True),
}


def grid_values(rng, shape, step):
    """Multiples of `step` in [-3, 3] * step: exact in every dtype, and every partial sum of a dot product of
    them is exact in float32, so CPU and GPU get bit-identical logits whatever their summation order."""
    return rng.integers(-3, 4, size=shape).astype(np.float32) * step


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ROUTE_CASES)
@pytest.mark.parametrize("T", [0, 1, 37])
def test_route_matches_the_cpu_kernel_exactly(poisoned, dtype, case, T):
    """Ids exactly the CPU kernel's (ties, which the grid makes frequent, go to the lower id on both), weights
    and probabilities to float32 rounding. Grouped cases also check that every id is in a chosen group."""
    case = dict(ROUTE_CASES[case])
    E, k = case.pop("E"), case.pop("k")
    rng = np.random.default_rng([E, k, T])
    d = 48
    x, w_router = grid_values(rng, (T, d), 0.25), grid_values(rng, (E, d), 0.125)
    if case.pop("correction_bias", False):
        case["correction_bias"] = grid_values(rng, E, 1 / 64)
    if case.pop("bias", False):
        case["bias"] = grid_values(rng, E, 1 / 8)
    cpu_w, cpu_ids, cpu_probs = moe_ext.route(x, w_router, k, return_probs=True, **case)
    gpu_case = {key: (torch.from_numpy(v).cuda() if isinstance(v, np.ndarray) else v) for key, v in case.items()}
    weights, ids, probs = poisoned.route(on_gpu(x, DTYPES[dtype]), on_gpu(w_router, DTYPES[dtype]), k,
                                         return_probs=True, **gpu_case)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32 and weights.shape == (T, k)
    assert_equal(ids, cpu_ids, "route ids")
    assert_rows_close(weights, cpu_w, ROUTE_WEIGHT_RTOL, "route weights")
    assert_rows_close(probs, cpu_probs, ROUTE_WEIGHT_RTOL, "route probs")
    if "n_group" in case and T:
        group_size = E // case["n_group"]
        keys = cpu_probs + case["correction_bias"]
        group_scores = np.sort(keys.reshape(T, case["n_group"], group_size), axis=2)[:, :, -2:].sum(axis=2)
        chosen_groups = np.argsort(-group_scores, axis=1, kind="stable")[:, :case["topk_group"]]
        in_chosen = (ids.cpu().numpy()[:, :, None] // group_size == chosen_groups[:, None, :]).any(axis=2)
        assert in_chosen.all(), "grouped routing chose an expert outside the top groups"


# ------------------------------------------------------------------------------------------ permute
@pytest.mark.parametrize("T, k, E, capacity, ids_kind", [
    (0, 2, 4, None, "random"), (1, 1, 1, None, "random"), (1, 8, 300, None, "random"),
    (37, 2, 8, None, "random"), (37, 8, 8, None, "random"), (2000, 6, 64, None, "random"),
    (300, 2, 4, 20, "random"), (300, 2, 4, 0, "random"), (5000, 1, 3000, None, "random"),
    (500, 2, 8, None, "one"), (500, 2, 8, 100, "one"), (257, 8, 256, 5, "random"), (999, 8, 300, None, "random"),
])
def test_permute_matches_the_reference_order(poisoned, T, k, E, capacity, ids_kind):
    rng = np.random.default_rng([T, k, E])
    x = rng.standard_normal((T, 24)).astype(np.float32)
    ids = random_ids(rng, T, E, k)
    if ids_kind == "one":  # one expert gets every token (slot 0), the others slot 1
        ids[:, 0] = E - 1
        ids[:, 1] = rng.integers(0, E - 1, size=T)
    x_perm, offsets, perm_rows = poisoned.permute(on_gpu(x, torch.float32), torch.from_numpy(ids).long().cuda(), E,
                                                  capacity=capacity)
    want = reference.permute(x, ids, E, capacity=capacity)
    assert_equal(offsets, want.expert_offsets, "expert_offsets")
    assert_equal(perm_rows, want.perm_rows, "perm_rows")
    kept = int(want.expert_offsets[-1])
    assert_equal(x_perm[:kept], want.x_perm, "x_perm")
    assert_equal(x_perm[kept:], np.zeros((x_perm.shape[0] - kept, 24)), "x_perm padding")


def test_permute_rejects_bad_ids(gpu):
    from moe_ext import cuda
    x = torch.zeros(3, 4, device="cuda")
    for bad in (5, -1):
        with pytest.raises(ValueError, match="topk_ids"):
            cuda.permute(x, torch.tensor([[0], [bad], [1]], dtype=torch.int32, device="cuda"), 4)


# ------------------------------------------------------------------------------------------ unpermute, activation
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, k, d", [(0, 2, 8), (1, 1, 8), (37, 2, 130), (64, 6, 256), (16, 8, 7168 // 8)])
def test_unpermute(poisoned, dtype, T, k, d):
    rng = np.random.default_rng([T, k, d])
    perm_rows = rng.permutation(T * k).reshape(T, k).astype(np.int32)
    perm_rows[rng.random((T, k)) < 0.1] = -1  # dropped copies
    y_perm = on_gpu(rng.standard_normal((T * k, d)), DTYPES[dtype])
    weights = rng.random((T, k)).astype(np.float32)
    y = poisoned.unpermute(y_perm, ids_on_gpu(perm_rows), torch.from_numpy(weights).cuda())
    assert_rows_close(y, reference.unpermute(f64(y_perm), perm_rows, weights.astype(np.float64)), RTOL[dtype],
                      "unpermute")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activate(poisoned, dtype, activation):
    rng = np.random.default_rng(3)
    h = on_gpu(rng.standard_normal((53, 2 * 37 if activation in GATED else 37)) * 3, DTYPES[dtype])
    assert_rows_close(poisoned.activate(h, activation), reference.activate(f64(h), activation), RTOL[dtype],
                      f"activate {activation}")


# ------------------------------------------------------------------------------------------ fused layer
LAYER_SHAPES = {  # name: (T, d, f, E, k, ids kind)
    "T0": (0, 64, 32, 8, 2, "random"),
    "T1": (1, 64, 32, 8, 2, "random"),
    "decode16": (16, 128, 96, 8, 2, "random"),
    "odd": (257, 96, 80, 6, 3, "random"),
    "k-equals-E": (300, 64, 48, 16, 16, "random"),
    "one-expert": (200, 64, 40, 8, 2, "one"),
    "deepseek-like": (64, 64, 32, 256, 8, "random"),
    "E300": (200, 32, 16, 300, 4, "random"),
}


def layer_inputs(rng, dtype, activation, T, d, f, E, k, ids_kind):
    rows = 2 * f if activation in GATED else f
    x = on_gpu(rng.standard_normal((T, d)), DTYPES[dtype])
    w13 = on_gpu(rng.standard_normal((E, rows, d)) / np.sqrt(d), DTYPES[dtype])
    w2 = on_gpu(rng.standard_normal((E, d, f)) / np.sqrt(f), DTYPES[dtype])
    ids = random_ids(rng, T, E, k)
    if ids_kind == "one" and T:
        ids[:, 0] = 3
        ids[:, 1] = 5  # experts other than 3 and 5 are empty
    weights = rng.random((T, k)).astype(np.float32)
    return x, w13, w2, ids, weights


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", LAYER_SHAPES)
def test_experts_and_moe(poisoned, dtype, activation, shape):
    rng = np.random.default_rng(list(LAYER_SHAPES[shape][:5]))
    T, d, f, E, k, ids_kind = LAYER_SHAPES[shape]
    x, w13, w2, ids, weights = layer_inputs(rng, dtype, activation, *LAYER_SHAPES[shape])
    y = poisoned.experts(x, w13, w2, torch.from_numpy(weights).cuda(), ids_on_gpu(ids), activation=activation)
    want = reference.experts(f64(x), f64(w13), f64(w2), weights.astype(np.float64), ids, activation=activation)
    assert_rows_close(y, want, RTOL[dtype], f"experts {shape}")
    w_router = on_gpu(rng.standard_normal((E, d)) * 2 / np.sqrt(d), DTYPES[dtype])
    y = poisoned.moe(x, w_router, w13, w2, k, activation=activation)
    # near-ties may let the router pick other experts than the float64 reference: compare through the
    # CUDA router's own choice (the router itself is checked exactly against the CPU kernel above)
    route_w, route_ids = poisoned.route(x, w_router, k)
    want = reference.experts(f64(x), f64(w13), f64(w2), f64(route_w), route_ids.cpu().numpy(), activation=activation)
    assert_rows_close(y, want, RTOL[dtype], f"moe {shape}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("capacity", [0, 7, 40])
def test_experts_with_capacity_drops(poisoned, dtype, capacity):
    rng = np.random.default_rng(capacity)
    x, w13, w2, ids, weights = layer_inputs(rng, dtype, "swiglu", 150, 64, 48, 8, 2, "random")
    y = poisoned.experts(x, w13, w2, torch.from_numpy(weights).cuda(), ids_on_gpu(ids), capacity=capacity)
    want = reference.experts(f64(x), f64(w13), f64(w2), weights.astype(np.float64), ids, capacity=capacity)
    assert_rows_close(y, want, RTOL[dtype], f"experts with capacity {capacity}")


# ------------------------------------------------------------------------------------------ backward
BACKWARD_CASES = {  # name: (M, N, K, E, offsets kind)
    "decode-dA": (7, 24, 40, 3, "random"),
    "odd": (300, 130, 72, 5, "random"),
    "square": (64, 64, 64, 8, "random"),
    "dW-cp.async": (256, 96, 80, 4, "multiple8"),  # offsets and M multiples of 8: the 16-byte cp.async loads
    "one-expert": (120, 32, 40, 6, "one"),
    "E300": (1000, 64, 32, 300, "random"),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", BACKWARD_CASES)
def test_grouped_gemm_backward(poisoned, dtype, case):
    M, N, K, E, kind = BACKWARD_CASES[case]
    rng = np.random.default_rng([M, N, K, E])
    a = on_gpu(rng.standard_normal((M, K)), DTYPES[dtype])
    w = on_gpu(rng.standard_normal((E, N, K)) / np.sqrt(K), DTYPES[dtype])
    d_out = on_gpu(rng.standard_normal((M, N)), DTYPES[dtype])
    if kind == "multiple8":  # expert 1 empty, the others multiples of 8 rows
        offsets = np.array([0, 64, 64, 200, 256], dtype=np.int32)
        assert len(offsets) == E + 1 and offsets[-1] == M and (offsets % 8 == 0).all()
    elif kind == "one":
        offsets = one_expert_offsets(E, M, 2)
    else:
        offsets = random_offsets(rng, E, M)
        offsets[1] = offsets[0]  # an expert with no rows: its dW is zero
    d_a, d_w = poisoned.grouped_gemm_backward(d_out, a, w, ids_on_gpu(offsets))
    want_a, want_w = reference.grouped_gemm_backward(f64(d_out), f64(a), f64(w), offsets)
    assert_rows_close(d_a, want_a, RTOL[dtype], f"d_a {case}")
    assert_rows_close(d_w, want_w, RTOL[dtype], f"d_w {case}")
    only_a, no_w = poisoned.grouped_gemm_backward(d_out, a, w, ids_on_gpu(offsets), need_w=False)
    assert no_w is None and torch.equal(only_a, d_a)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_backward(poisoned, dtype, activation):
    rng = np.random.default_rng(4)
    f = 37
    h = on_gpu(rng.standard_normal((29, 2 * f if activation in GATED else f)) * 2, DTYPES[dtype])
    d_act = on_gpu(rng.standard_normal((29, f)), DTYPES[dtype])
    got = poisoned.activation_backward(h, d_act, activation)
    assert_rows_close(got, reference.activation_backward(f64(d_act), f64(h), activation), RTOL[dtype],
                      f"activation_backward {activation}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, k, d", [(41, 3, 70), (1, 2, 16), (0, 2, 8)])
def test_unpermute_and_permute_backward(poisoned, dtype, T, k, d):
    rng = np.random.default_rng([T, k, d])
    perm_rows = rng.permutation(T * k).reshape(T, k).astype(np.int32)
    perm_rows[rng.random((T, k)) < 0.1] = -1  # dropped copies: their gradients are zero
    y_perm = on_gpu(rng.standard_normal((T * k, d)), DTYPES[dtype])
    weights = rng.random((T, k)).astype(np.float32)
    dy = on_gpu(rng.standard_normal((T, d)), DTYPES[dtype])
    d_y_perm, d_w = poisoned.unpermute_backward(dy, y_perm, ids_on_gpu(perm_rows), torch.from_numpy(weights).cuda())
    want_perm, want_w = reference.unpermute_backward(f64(dy), f64(y_perm), perm_rows, weights.astype(np.float64))
    assert_rows_close(d_y_perm, want_perm, RTOL[dtype], "unpermute_backward d_y_perm")
    assert_rows_close(d_w, want_w, RTOL[dtype], "unpermute_backward d_weights")
    d_x = poisoned.permute_backward(d_y_perm, ids_on_gpu(perm_rows))
    assert_rows_close(d_x, reference.permute_backward(f64(d_y_perm), perm_rows), RTOL[dtype], "permute_backward")


# ------------------------------------------------------------------------------------------ graphs, streams
def _graph_case(dtype=torch.bfloat16, T=16, d=128, f=96, E=8, k=2, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s, scale=1.0: (torch.randn(*s, device="cuda", generator=g) * scale).to(dtype)  # noqa: E731
    ids = torch.stack([torch.randperm(E, device="cuda", generator=g)[:k] for _ in range(T)]).int()
    return dict(x=r(T, d), w_router=r(E, d, scale=0.3), w13=r(E, 2 * f, d, scale=d**-0.5),
                w2=r(E, d, f, scale=f**-0.5), weights=torch.rand(T, k, device="cuda", generator=g), ids=ids)


@pytest.mark.parametrize("T", [1, 16, 100])  # decode and tiled GEMMs
@pytest.mark.parametrize("api", ["moe_ext.cuda", "torch.ops"])
def test_cuda_graph_replay_on_new_inputs_equals_eager(gpu, T, api):
    from moe_ext import cuda
    import moe_ext.torch  # noqa: F401  (registers torch.ops.moe_ext)
    if api == "moe_ext.cuda":
        experts = lambda c: cuda.experts(c["x"], c["w13"], c["w2"], c["weights"], c["ids"])  # noqa: E731
        moe = lambda c: cuda.moe(c["x"], c["w_router"], c["w13"], c["w2"], 2)  # noqa: E731
    else:
        ops = torch.ops.moe_ext
        experts = lambda c: ops.experts(c["x"], c["w13"], c["w2"], c["weights"], c["ids"], "swiglu", None)  # noqa: E731
        moe = lambda c: ops.moe(c["x"], c["w_router"], c["w13"], c["w2"], 2,  # noqa: E731
                                "swiglu", "softmax", True, 1.0, None, None, None, None, None)
    static = _graph_case(T=T)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up before capture, as torch.cuda.graph asks
        experts(static), moe(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_experts, y_moe = experts(static), moe(static)
    for seed in (1, 2):
        fresh = _graph_case(T=T, seed=seed)
        for name in ("x", "weights", "ids"):
            static[name].copy_(fresh[name])
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y_experts, experts(fresh)), "experts: graph replay differs from eager"
        assert torch.equal(y_moe, moe(fresh)), "moe: graph replay differs from eager"
    cuda.raise_capture_errors()  # nothing went wrong in the replays


def test_value_checks_under_capture_run_on_the_device(gpu):
    from moe_ext import cuda
    c = _graph_case()
    cuda.experts(c["x"], c["w13"], c["w2"], c["weights"], c["ids"])  # eager warm-up: makes the error counter
    offsets = torch.tensor([0, 4, 4, 9, 9, 12, 12, 16, 16], dtype=torch.int32, device="cuda")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # no host read-back may happen in here: the checks run on the device
        y = cuda.experts(c["x"], c["w13"], c["w2"], c["weights"], c["ids"])
        out = cuda.grouped_gemm(c["x"], c["w13"], offsets)
    graph.replay()
    cuda.raise_capture_errors()
    c["ids"][3, 1] = 8  # out of range: dropped by the kernels, counted by the device check
    graph.replay()
    with pytest.raises(ValueError, match="1 call.*topk_ids outside"):
        cuda.raise_capture_errors()
    assert torch.isfinite(y).all() and torch.isfinite(out).all()
    cuda.raise_capture_errors()  # the read cleared the counters


def test_side_stream_call_is_ordered_on_that_stream(gpu):
    """x is produced on a side stream after a long sleep; a moe_ext call on the same stream must wait for it.
    On the default stream it would read x early (this is what the test would catch)."""
    from moe_ext import cuda
    c = _graph_case(T=64)
    want = cuda.experts(c["x"], c["w13"], c["w2"], c["weights"], c["ids"])
    source = c["x"].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        x = torch.full_like(source, float("nan"))
        torch.cuda._sleep(50_000_000)  # ~25 ms at 2 GHz
        x.copy_(source)
        y = cuda.experts(x, c["w13"], c["w2"], c["weights"], c["ids"], check_ids=False)
        y_moe = cuda.moe(x, c["w_router"], c["w13"], c["w2"], 2)
    side.synchronize()
    assert torch.equal(y, want)
    assert torch.equal(y_moe, cuda.moe(source, c["w_router"], c["w13"], c["w2"], 2))
