"""moe_ext.torch with activation descriptions, expert biases and transposed weight views (SPEC §3.6):
the torch ops, the functional API and MoE against a float64 plain-PyTorch loop (torch_reference.py),
forward and every gradient; the ops' schema defaults; transposed views reaching the kernels without a
copy; opcheck and torch.compile with the new arguments."""
import pytest

torch = pytest.importorskip("torch")
import moe_ext  # noqa: E402
import moe_ext.torch as mt  # noqa: E402
from moe_ext.torch import _ops  # noqa: E402

import torch_reference as ref  # noqa: E402

PER_TIER = False  # the kernels' tiers are covered by tests/test_bias_transposed.py and the op tests
F32_RTOL = 5e-5  # as test_autograd.py: float32 kernels against float64, a few chained steps
T, d, f, E, k = 23, 16, 12, 5, 2
DESCRIPTIONS = ["swiglu", "geglu_tanh", "relu2", "gelu_tanh", "swiglu(limit=1.5)",
                "swiglu(alpha=1.702,limit=1.5,up_offset=1.0,interleaved)", "geglu(interleaved)",
                "swiglu(gate_softcap=1.5,up_softcap=2.0)",  # Inkling2's softcapped SwiGLU (small caps: they bite)
                moe_ext.Activation("silu", True, alpha=1.702, limit=1.5, up_offset=1.0, interleaved=True)]


def rel(got, want):
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, (got.shape, want.shape)
    return float((got - want).norm() / want.norm().clamp_min(1e-300))


def make(act, seed=0, bias=True, transposed=False):
    """float64 leaves: x, w13_or_w1, w2 (transposed: the [E, out, in] views of contiguous [E, in, out]
    tensors, as transformers' is_transposed experts hold them), biases, routing."""
    g = torch.Generator().manual_seed(seed)
    rows = 2 * f if moe_ext.activation_from(act).gated else f

    def weight(out, inp):
        w = torch.randn(E, inp, out, generator=g, dtype=torch.float64) if transposed else \
            torch.randn(E, out, inp, generator=g, dtype=torch.float64)
        return (w / inp ** 0.5).requires_grad_(True)

    x = (2 * torch.randn(T, d, generator=g, dtype=torch.float64)).requires_grad_(True)
    w13, w2 = weight(rows, d), weight(d, f)
    b13 = (0.5 * torch.randn(E, rows, generator=g, dtype=torch.float64)).requires_grad_(bias)
    b2 = (0.5 * torch.randn(E, d, generator=g, dtype=torch.float64)).requires_grad_(bias)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int32)
    tw = (torch.rand(T, k, generator=g, dtype=torch.float64) + 0.1).requires_grad_(True)
    return x, w13, w2, (b13 if bias else None), (b2 if bias else None), ids, tw


def view(w, transposed):
    return w.transpose(1, 2) if transposed else w


def f32(t):
    return None if t is None else t.detach().float().requires_grad_(t.requires_grad)


@pytest.mark.parametrize("act", DESCRIPTIONS, ids=str)
@pytest.mark.parametrize("transposed", [False, True], ids=["NK", "transposed"])
@pytest.mark.parametrize("path", ["functional", "fused_op"])
def test_experts_forward_and_gradients(act, transposed, path):
    """The functional API (per-step ops under autograd) and the fused op's own autograd (recomputing
    backward), with biases and (transposed) weight views: y and the gradients of x, weights, biases and
    topk_weights against the float64 loop. The transposed weights' gradients reach their base tensors."""
    x, w13, w2, b13, b2, ids, tw = make(act, transposed=transposed)
    want = ref.experts(x, view(w13, transposed), view(w2, transposed), tw, ids, act, b13, b2)
    upstream = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    leaves64 = (x, w13, w2, b13, b2, tw)
    want_grads = torch.autograd.grad((want * upstream).sum(), leaves64)

    leaves = [f32(t) for t in leaves64]
    x32, w13_32, w2_32, b13_32, b2_32, tw32 = leaves
    w13_in, w2_in = view(w13_32, transposed), view(w2_32, transposed)
    if path == "functional":
        got = mt.experts(x32, w13_in, w2_in, tw32, ids, activation=act, b13_or_b1=b13_32, b2=b2_32)
    else:
        got = torch.ops.moe_ext.experts(x32, w13_in, w2_in, tw32, ids, _ops._spec(act), None, b13_32, b2_32)
    assert rel(got, want) <= F32_RTOL
    got_grads = torch.autograd.grad((got.double() * upstream).sum(), leaves)
    for name, a, b in zip(("x", "w13", "w2", "b13", "b2", "topk_weights"), got_grads, want_grads):
        assert a.shape == b.shape, name
        assert rel(a, b) <= F32_RTOL, f"{name}: relative error {rel(a, b):.3g}"


@pytest.mark.parametrize("transposed", [False, True], ids=["NK", "transposed"])
def test_moe_op_and_functional_with_biases(transposed):
    """moe (route + experts) with expert biases, a description and transposed views: the fused op without
    gradients and the functional API with them agree with route + the float64 loop."""
    act = "swiglu(alpha=1.702,limit=1.5,up_offset=1.0,interleaved)"
    x, w13, w2, b13, b2, _, _ = make(act, seed=3, transposed=transposed)
    w_router = (torch.randn(E, d, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) / d ** 0.5
                ).requires_grad_(True)
    args32 = [f32(t) for t in (x, w_router, w13, w2, b13, b2)]
    x32, wr32, w13_32, w2_32, b13_32, b2_32 = args32
    w13_in, w2_in = view(w13_32, transposed), view(w2_32, transposed)
    with torch.no_grad():
        weights, ids, _ = mt.route(x32, wr32, k)
        fused = torch.ops.moe_ext.moe(x32, wr32, w13_in, w2_in, k, act, b13_or_b1=b13_32, b2=b2_32)
    want = ref.experts(x, view(w13, transposed), view(w2, transposed), weights.double(), ids, act, b13, b2)
    assert rel(fused, want) <= F32_RTOL
    got = mt.moe(x32, wr32, w13_in, w2_in, k, activation=act, b13_or_b1=b13_32, b2=b2_32)
    assert rel(got, want) <= F32_RTOL
    got.sum().backward()
    assert all(t.grad is not None for t in args32)
    # the op's own autograd (recomputing backward) gives the functional API's gradients
    fresh = [f32(t) for t in (x, w_router, w13, w2, b13, b2)]
    y = torch.ops.moe_ext.moe(fresh[0], fresh[1], view(fresh[2], transposed), view(fresh[3], transposed), k, act,
                              b13_or_b1=fresh[4], b2=fresh[5])
    y.sum().backward()
    for a, b in zip(fresh, args32):
        assert rel(a.grad, b.grad) <= F32_RTOL


def test_grouped_gemm_bias_and_transposed():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(9, d, generator=g, requires_grad=True)
    w_t = torch.randn(E, d, f, generator=g, requires_grad=True)  # [E, K, N]: w = w_t.transpose(1, 2)
    bias = torch.randn(E, f, generator=g, requires_grad=True)
    offsets = torch.tensor([0, 2, 2, 5, 9, 9], dtype=torch.int32)
    got = mt.grouped_gemm(a, w_t.transpose(1, 2), offsets, bias=bias)
    want = torch.cat([a[int(offsets[e]):int(offsets[e + 1])] @ w_t[e] + bias[e] for e in range(E)])
    assert rel(got, want) <= 1e-6
    upstream = torch.randn(got.shape, generator=g)
    got_grads = torch.autograd.grad((got * upstream).sum(), (a, w_t, bias))
    want_grads = torch.autograd.grad((want * upstream).sum(), (a, w_t, bias))
    for a_, b_ in zip(got_grads, want_grads):
        assert rel(a_, b_) <= 1e-5
    assert torch.equal(torch.ops.moe_ext.bias_grad(upstream, offsets),
                       torch.from_numpy(moe_ext.bias_grad(upstream.numpy(), offsets.numpy())))


def test_schema_defaults_as_vllm_sglang_callers_use_them():
    """torch.ops.moe_ext.* take the functional API's defaults: moe(x, w_router, w13, w2, top_k) etc."""
    g = torch.Generator().manual_seed(6)
    x, w_router = torch.randn(T, d, generator=g), torch.randn(E, d, generator=g)
    w13, w2 = torch.randn(E, 2 * f, d, generator=g), torch.randn(E, d, f, generator=g)
    ops = torch.ops.moe_ext
    assert torch.equal(ops.moe(x, w_router, w13, w2, 2), mt.moe(x, w_router, w13, w2, 2))
    assert torch.equal(ops.moe(x, w_router, w13, w2, 2),
                       ops.moe(x, w_router, w13, w2, 2, "swiglu", "softmax", True, 1.0, None, None, None, None, None,
                               None, None))
    weights, ids, _ = ops.route(x, w_router, 2)
    assert torch.equal(ops.experts(x, w13, w2, weights, ids), mt.experts(x, w13, w2, weights, ids))
    x_perm, offsets, _ = ops.permute(x, ids, E)
    h = ops.grouped_gemm(x_perm, w13, offsets)
    assert torch.equal(ops.activation(h), ops.activation(h, "swiglu"))
    # autograd with the trailing arguments left out (torch drops them before setup_context)
    leaves = [t.clone().requires_grad_(True) for t in (x, w_router, w13, w2)]
    ops.moe(*leaves, 2).square().sum().backward()
    want = [t.clone().requires_grad_(True) for t in (x, w_router, w13, w2)]
    mt.moe(*want, 2).square().sum().backward()
    for a, b in zip(leaves, want):
        assert rel(a.grad, b.grad) <= 1e-5
    h_leaf = h.clone().requires_grad_(True)
    ops.activation(h_leaf).sum().backward()
    assert h_leaf.grad is not None
    schemas = {name: str(getattr(ops, name).default._schema) for name in
               ("moe", "experts", "route", "permute", "grouped_gemm", "activation")}
    for name, fragment in [("moe", 'str activation="swiglu", str scoring="softmax", bool renormalize=True, '
                                   "float scale=1., Tensor? bias=None"),
                           ("moe", "Tensor? b13_or_b1=None, Tensor? b2=None"),
                           ("experts", 'str activation="swiglu", SymInt? capacity=None, Tensor? b13_or_b1=None'),
                           ("route", 'str scoring="softmax", bool renormalize=True'),
                           ("permute", "SymInt? capacity=None"), ("grouped_gemm", "Tensor? bias=None"),
                           ("activation", 'str activation="swiglu"')]:
        assert fragment in schemas[name], schemas[name]


def test_transposed_weights_reach_the_kernels_without_a_copy(monkeypatch):
    """The NumPy arrays moe_ext.experts receives for transposed views are views of the tensors' own
    memory (same data pointer, transposed strides), not contiguous copies."""
    seen = {}
    real = moe_ext.experts

    def spy(x, w13, w2, *args, **kw):
        seen["w13"], seen["w2"] = w13, w2
        return real(x, w13, w2, *args, **kw)

    monkeypatch.setattr(moe_ext, "experts", spy)
    x, w13_t, w2_t, b13, b2, ids, tw = make("swiglu", transposed=True)
    w13_t, w2_t = w13_t.detach().float(), w2_t.detach().float()
    with torch.no_grad():
        mt.experts(x.float(), w13_t.transpose(1, 2), w2_t.transpose(1, 2), tw.float(), ids)
    for name, base in (("w13", w13_t), ("w2", w2_t)):
        array = seen[name]
        assert array.__array_interface__["data"][0] == base.data_ptr(), f"{name} was copied"
        assert array.shape == tuple(base.transpose(1, 2).shape)
        assert not array.flags.c_contiguous


def test_descriptions_normalised_and_bad_ones_rejected():
    act = moe_ext.Activation("silu", True, limit=7.0)
    m = mt.MoE(d, f, E, k, activation=act, bias=True)
    assert m.activation == "swiglu(limit=7.0)" and m.w13.shape == (E, 2 * f, d) and m.b13.shape == (E, 2 * f)
    assert mt.MoE(d, f, E, k, activation="relu2", bias=True).b1.shape == (E, f)
    with pytest.raises(ValueError, match="activation"):
        mt.MoE(d, f, E, k, activation="swish")
    with pytest.raises(ValueError, match="activation"):
        mt.experts(torch.randn(3, d), torch.randn(E, 2 * f, d), torch.randn(E, d, f), torch.rand(3, k),
                   torch.zeros(3, k, dtype=torch.int32), activation="swiglu(limit=-1)")
    with pytest.raises(ValueError, match="b2"):
        mt.experts(torch.randn(3, d), torch.randn(E, 2 * f, d), torch.randn(E, d, f), torch.rand(3, k),
                   torch.zeros(3, k, dtype=torch.int32), b2=torch.randn(E, d + 1))


@pytest.mark.parametrize("act", ["swiglu(alpha=1.702,limit=1.5,up_offset=1.0,interleaved)", "relu2"])
def test_module_with_biases_matches_reference(act):
    torch.manual_seed(7)
    m = mt.MoE(d, f, E, k, activation=act, bias=True).double().float()
    x = torch.randn(T, d, requires_grad=True)
    y = m(x)
    p = dict(m.named_parameters())
    with torch.no_grad():
        weights, ids, _ = mt.route(x, m.w_router, k)
    want = ref.experts(x.double(), p[m.w13_or_w1_name].double(), p["w2"].double(), weights.double(), ids, act,
                       p[m.b13_or_b1_name].double(), p["b2"].double())
    assert rel(y, want) <= F32_RTOL
    y.sum().backward()
    assert all(q.grad is not None for q in m.parameters())
    assert "b2" in m.state_dict() and m.b13_or_b1_name in m.state_dict()


def test_opcheck_with_descriptions_biases_and_transposed_views():
    g = torch.Generator().manual_seed(8)
    act = "swiglu(alpha=1.702,limit=1.5,up_offset=1.0,interleaved)"
    x = torch.randn(7, d, generator=g, requires_grad=True)
    w13 = torch.randn(E, d, 2 * f, generator=g).transpose(1, 2).requires_grad_(True)
    w2 = torch.randn(E, d, f, generator=g, requires_grad=True)
    b13, b2 = torch.randn(E, 2 * f, generator=g, requires_grad=True), torch.randn(E, d, generator=g,
                                                                                   requires_grad=True)
    tw = torch.rand(7, k, generator=g, requires_grad=True)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(7)]).to(torch.int32)
    ops = torch.ops.moe_ext
    torch.library.opcheck(ops.experts, (x, w13, w2, tw, ids, act, None, b13, b2))
    torch.library.opcheck(ops.moe, (x, torch.randn(E, d, generator=g, requires_grad=True), w13, w2, k, act),
                          dict(b13_or_b1=b13, b2=b2))
    x_perm, offsets, _ = ops.permute(x.detach(), ids, E)
    torch.library.opcheck(ops.grouped_gemm, (x_perm.requires_grad_(), w13, offsets, b13))
    h = ops.grouped_gemm(x_perm.detach(), w13.detach(), offsets).requires_grad_()
    torch.library.opcheck(ops.activation, (h, act))
    torch.library.opcheck(ops.activation_backward, (torch.randn(h.shape[0], f, generator=g), h.detach(), act))
    torch.library.opcheck(ops.bias_grad, (torch.randn(h.shape, generator=g), offsets))


def test_torch_compile_fullgraph_with_biases_and_description():
    torch.manual_seed(9)
    m = mt.MoE(d, f, E, k, activation="swiglu(alpha=1.702,limit=1.5,up_offset=1.0,interleaved)", bias=True)
    x = torch.randn(T, d)

    def step(module, inp):
        return module(inp).square().sum()

    loss = step(m, x)
    grads = torch.autograd.grad(loss, list(m.parameters()))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss_c = compiled(m, x)
    grads_c = torch.autograd.grad(loss_c, list(m.parameters()))
    assert rel(loss_c, loss) <= 1e-6
    for a, b in zip(grads_c, grads):
        assert rel(a, b) <= 1e-5
