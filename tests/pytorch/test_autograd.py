"""Gradients of the moe_ext.torch ops (their backward runs moe_ext's backward kernels) against autograd of
a plain-PyTorch float64 implementation (torch_reference.py), on every ISA tier."""
import pytest

torch = pytest.importorskip("torch")
import moe_ext.torch as mt  # noqa: E402
from moe_ext.torch._ops import route_backward_scores  # noqa: E402

import torch_reference as ref  # noqa: E402

# float32 kernels vs float64: chained float32 GEMMs of depth <= 64 (~sqrt(K) u each, u = 6e-8), softmax and
# the activation: 1e-5 per GEMM as in tests/conftest.py, times the ~5 chained steps of the backward.
F32_RTOL = 5e-5
# bf16/fp16 tensors: math in float32, but every op's output (and so every saved intermediate) is rounded
# to the tensor dtype: u = 2^-8 (bf16) / 2^-11 (fp16) per rounding, a few roundings per path.
HALF_RTOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3}
ACTIVATIONS = ("swiglu", "geglu", "relu", "gelu")


def rel(got, want):
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, (got.shape, want.shape)
    return float((got - want).norm() / want.norm().clamp_min(1e-300)) if want.numel() else 0.0


def leaf(t, dtype=torch.float32):
    return t.detach().to(dtype).requires_grad_(True)


def grads_of(out_and_upstream, inputs):
    loss = sum((o.double() * g).sum() for o, g in out_and_upstream)
    return torch.autograd.grad(loss, inputs, allow_unused=True)


def make(seed, T, d, f, E, k, act="swiglu"):
    g = torch.Generator().manual_seed(seed)
    rows = 2 * f if act in ref.GATED else f
    x = torch.randn(T, d, generator=g, dtype=torch.float64)
    w_router = torch.randn(E, d, generator=g, dtype=torch.float64) * (2 / d ** 0.5)
    w13 = torch.randn(E, rows, d, generator=g, dtype=torch.float64) / d ** 0.5
    w2 = torch.randn(E, d, f, generator=g, dtype=torch.float64) / f ** 0.5
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int32) if T else \
        torch.zeros(0, k, dtype=torch.int32)
    tw = torch.rand(T, k, generator=g, dtype=torch.float64) + 0.1
    return x, w_router, w13, w2, ids, tw, g


def check_grads(got, want, rtol, names):
    for name, a, b in zip(names, got, want):
        if b is None:
            continue
        assert a is not None, f"{name}: no gradient"
        assert rel(a, b) <= rtol, f"{name}: relative error {rel(a, b):.3g} > {rtol}"


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("with_bias", [False, True])
def test_route_gradients(scoring, renormalize, with_bias):
    x, w, _, _, _, _, g = make(1, 13, 24, 4, 6, 2)
    b = torch.randn(6, generator=g, dtype=torch.float64) if with_bias else None
    scale = 2.5
    xs, ws = leaf(x), leaf(w)
    bs = leaf(b) if with_bias else None
    weights, ids, probs = mt.route(xs, ws, 2, scoring=scoring, renormalize=renormalize, scale=scale, bias=bs)
    assert weights.dtype == probs.dtype == torch.float32 and ids.dtype == torch.int32
    gw, gp = torch.randn(weights.shape, generator=g, dtype=torch.float64), torch.randn(probs.shape, generator=g,
                                                                                    dtype=torch.float64)
    inputs = [xs, ws] + ([bs] if with_bias else [])
    got = grads_of([(weights, gw), (probs, gp)], inputs)
    x64, w64 = leaf(x, torch.float64), leaf(w, torch.float64)
    b64 = leaf(b, torch.float64) if with_bias else None
    want_w, want_p = ref.route_weights(x64, w64, ids, scoring=scoring, renormalize=renormalize, scale=scale, bias=b64)
    assert rel(weights, want_w) < 1e-5 and rel(probs, want_p) < 1e-5
    want = grads_of([(want_w, gw), (want_p, gp)], [x64, w64] + ([b64] if with_bias else []))
    check_grads(got, want, F32_RTOL, ["x", "w_router", "bias"])


def test_route_gradients_grouped_selection():
    """correction_bias and grouped selection choose the experts but do not enter the weights' gradient."""
    x, w, _, _, _, _, g = make(2, 17, 16, 4, 8, 3)
    cb = torch.randn(8, generator=g) * 0.1
    xs, ws = leaf(x), leaf(w)
    weights, ids, _ = mt.route(xs, ws, 3, scoring="sigmoid", scale=1.7, correction_bias=cb, n_group=4, topk_group=2)
    gw = torch.randn(weights.shape, generator=g, dtype=torch.float64)
    got = grads_of([(weights, gw)], [xs, ws])
    x64, w64 = leaf(x, torch.float64), leaf(w, torch.float64)
    want_w, _ = ref.route_weights(x64, w64, ids, scoring="sigmoid", scale=1.7)
    check_grads(got, grads_of([(want_w, gw)], [x64, w64]), F32_RTOL, ["x", "w_router"])


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_route_backward_scores_is_exact_in_float64(scoring):
    """The hand-written router gradient (plain torch ops) equals autograd when run in float64."""
    x, w, _, _, ids, _, g = make(3, 9, 8, 4, 5, 2)
    logits = leaf(x @ w.t(), torch.float64)
    probs = torch.softmax(logits, -1) if scoring == "softmax" else torch.sigmoid(logits)
    s = probs.gather(1, ids.long())
    weights = 0.7 * s / s.sum(1, keepdim=True)
    gw, gp = torch.randn(weights.shape, generator=g, dtype=torch.float64), torch.randn(probs.shape, generator=g,
                                                                                    dtype=torch.float64)
    (want,) = torch.autograd.grad((weights * gw).sum() + (probs * gp).sum(), logits)
    got = route_backward_scores(gw, gp, probs.detach(), ids, scoring, True, 0.7)
    assert rel(got, want) < 1e-12


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("path", ["fused-op", "functional"])
@pytest.mark.parametrize("T", [0, 1, 21])
def test_experts_gradients(act, path, T):
    x, _, w13, w2, ids, tw, g = make(4, T, 20, 13, 5, 2, act)
    ins = [leaf(t) for t in (x, w13, w2, tw)]
    if path == "fused-op":
        y = torch.ops.moe_ext.experts(*ins, ids, act, None)
    else:
        y = mt.experts(*ins, ids, activation=act)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    got = grads_of([(y, gy)], ins)
    if T == 0:
        assert y.shape == (0, 20) and all(gr is None or not gr.any() for gr in got)
        return
    ins64 = [leaf(t, torch.float64) for t in (x, w13, w2, tw)]
    want_y = ref.experts(*ins64[:3], ins64[3], ids, act)
    assert rel(y, want_y) < 1e-5
    want = grads_of([(want_y, gy)], ins64)
    check_grads(got, want, F32_RTOL, ["x", "w13_or_w1", "w2", "topk_weights"])


@pytest.mark.parametrize("path", ["fused-op", "functional"])
def test_experts_gradients_with_capacity(path):
    x, _, w13, w2, ids, tw, g = make(5, 30, 12, 7, 4, 2)
    ins = [leaf(t) for t in (x, w13, w2, tw)]
    y = (torch.ops.moe_ext.experts(*ins, ids, "swiglu", 9) if path == "fused-op"
         else mt.experts(*ins, ids, activation="swiglu", capacity=9))
    kept = mt.permute(x.float(), ids, 4, capacity=9).perm_rows >= 0
    assert not kept.all()
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    got = grads_of([(y, gy)], ins)
    ins64 = [leaf(t, torch.float64) for t in (x, w13, w2, tw)]
    want_y = ref.experts(*ins64[:3], ins64[3] * kept, ids)  # dropped copies contribute nothing
    check_grads(got, grads_of([(want_y, gy)], ins64), F32_RTOL, ["x", "w13", "w2", "topk_weights"])
    assert not got[3][~kept].any()


@pytest.mark.parametrize("path", ["fused-op", "functional"])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_moe_gradients(path, scoring):
    x, w_router, w13, w2, _, _, g = make(6, 25, 16, 11, 6, 2)
    b = torch.randn(6, generator=g, dtype=torch.float64) * 0.1
    ins = [leaf(t) for t in (x, w_router, w13, w2, b)]
    if path == "fused-op":
        y = torch.ops.moe_ext.moe(*ins[:4], 2, "swiglu", scoring, True, 1.3, ins[4], None, None, None, None)
    else:
        y = mt.moe(*ins[:4], 2, scoring=scoring, scale=1.3, bias=ins[4])
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    got = grads_of([(y, gy)], ins)
    _, ids, _ = mt.route(x.float(), w_router.float(), 2, scoring=scoring, bias=b.float())
    ins64 = [leaf(t, torch.float64) for t in (x, w_router, w13, w2, b)]
    tw, _ = ref.route_weights(ins64[0], ins64[1], ids, scoring=scoring, scale=1.3, bias=ins64[4])
    want_y = ref.experts(ins64[0], ins64[2], ins64[3], tw, ids)
    assert rel(y, want_y) < 1e-5
    check_grads(got, grads_of([(want_y, gy)], ins64), F32_RTOL, ["x", "w_router", "w13", "w2", "bias"])


def test_step_op_gradients():
    """permute -> grouped_gemm -> activation -> grouped_gemm -> unpermute, each op against its own
    float64 reference with the same routing."""
    x, _, w13, w2, ids, tw, g = make(7, 11, 10, 6, 4, 3)
    ins = [leaf(t) for t in (x, w13, w2, tw)]
    x_perm, offsets, perm_rows = mt.permute(ins[0], ids, 4)
    h = mt.grouped_gemm(x_perm, ins[1], offsets)
    a = mt.activation(h, "swiglu")
    y_perm = mt.grouped_gemm(a, ins[2], offsets)
    y = mt.unpermute(y_perm, perm_rows, ins[3])
    outs = [x_perm, h, a, y_perm, y]
    ups = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs]
    got = grads_of(list(zip(outs, ups)), ins)
    ins64 = [leaf(t, torch.float64) for t in (x, w13, w2, tw)]
    xp64 = ref.permute(ins64[0], perm_rows, x_perm.shape[0])
    h64 = ref.grouped_gemm(xp64, ins64[1], offsets)
    a64 = ref.activation(h64, "swiglu")
    yp64 = ref.grouped_gemm(a64, ins64[2], offsets)
    y64 = ref.unpermute(yp64, perm_rows, ins64[3])
    for o, w in zip(outs, [xp64, h64, a64, yp64, y64]):
        assert rel(o, w) < 1e-5
    check_grads(got, grads_of(list(zip([xp64, h64, a64, yp64, y64], ups)), ins64), F32_RTOL,
                ["x", "w13", "w2", "topk_weights"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("path", ["fused-op", "functional"])
def test_half_dtypes(dtype, path):
    x, w_router, w13, w2, _, _, g = make(8, 19, 32, 24, 4, 2)
    ins = [leaf(t, dtype) for t in (x, w_router, w13, w2)]
    if path == "fused-op":
        y = torch.ops.moe_ext.moe(*ins, 2, "swiglu", "softmax", True, 1.0, None, None, None, None, None)
    else:
        y = mt.moe(*ins, 2)
    assert y.dtype == dtype
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    got = grads_of([(y, gy)], ins)
    assert all(gr.dtype == dtype for gr in got)
    _, ids, _ = mt.route(ins[0].detach(), ins[1].detach(), 2)
    ins64 = [leaf(t.detach(), torch.float64) for t in ins]  # the same (rounded) values in float64
    tw, _ = ref.route_weights(ins64[0], ins64[1], ids)
    want_y = ref.experts(ins64[0], ins64[2], ins64[3], tw, ids)
    assert rel(y, want_y) < HALF_RTOL[dtype]
    check_grads(got, grads_of([(want_y, gy)], ins64), HALF_RTOL[dtype], ["x", "w_router", "w13", "w2"])
