"""torch.library.opcheck of every torch.ops.moe_ext op (schema, fake tensor, autograd registration,
AOT dispatch with static and dynamic shapes) in float32, bfloat16 and float16."""
import pytest

torch = pytest.importorskip("torch")
import moe_ext.torch  # noqa: E402,F401  (registers the ops)

PER_TIER = False  # opcheck exercises the registration, not the kernels' tiers
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
T, d, f, E, k = 7, 12, 10, 4, 2


def inputs(dtype, grad=True):
    g = torch.Generator().manual_seed(0)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).requires_grad_(grad)

    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int32)
    return dict(x=r(T, d), w_router=r(E, d, scale=0.5), w13=r(E, 2 * f, d, scale=0.3), w2=r(E, d, f, scale=0.3),
                tw=torch.rand(T, k, generator=g).requires_grad_(grad), ids=ids)


def opcheck(op, args):
    torch.library.opcheck(op, args, raise_exception=True)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_opcheck_forward_ops(dtype):
    i = inputs(dtype)
    ops = torch.ops.moe_ext
    every_variant = dtype == torch.float32  # the half dtypes check one call per op (opcheck is slow)
    opcheck(ops.route, (i["x"], i["w_router"], k, "softmax", True, 1.0, None, None, None, None))
    if every_variant:
        opcheck(ops.route, (i["x"], i["w_router"], k, "sigmoid", False, 2.0, torch.randn(E).requires_grad_(),
                            torch.randn(E), 2, 1))
    opcheck(ops.permute, (i["x"], i["ids"], E, None))
    if every_variant:
        opcheck(ops.permute, (i["x"], i["ids"].long(), E, 3))  # capacity: data-dependent row count
    x_perm, offsets, perm_rows = ops.permute(i["x"].detach(), i["ids"], E, None)
    opcheck(ops.grouped_gemm, (x_perm.requires_grad_(), i["w13"], offsets))
    h = ops.grouped_gemm(x_perm.detach(), i["w13"].detach(), offsets).requires_grad_()
    opcheck(ops.activation, (h, "swiglu"))
    if every_variant:
        opcheck(ops.activation, (h, "gelu"))
    y_perm = torch.randn(T * k, d).to(dtype).requires_grad_()
    opcheck(ops.unpermute, (y_perm, perm_rows, i["tw"]))
    opcheck(ops.experts, (i["x"], i["w13"], i["w2"], i["tw"], i["ids"], "swiglu", None))
    if every_variant:
        opcheck(ops.experts, (i["x"], i["w13"][:, :f].detach().contiguous(), i["w2"], i["tw"], i["ids"], "relu", 3))
    opcheck(ops.moe, (i["x"], i["w_router"], i["w13"], i["w2"], k, "swiglu", "softmax", True, 1.0, None, None, None,
                      None, None))


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_opcheck_backward_ops(dtype):
    i = inputs(dtype, grad=False)
    ops = torch.ops.moe_ext
    x_perm, offsets, perm_rows = ops.permute(i["x"], i["ids"], E, None)
    g_h = torch.randn(T * k, 2 * f).to(dtype)
    opcheck(ops.grouped_gemm_backward, (g_h, x_perm, i["w13"], offsets, True, True))
    if dtype == torch.float32:
        opcheck(ops.grouped_gemm_backward, (g_h, x_perm, i["w13"], offsets, False, True))
    h = ops.grouped_gemm(x_perm, i["w13"], offsets)
    opcheck(ops.activation_backward, (torch.randn(T * k, f).to(dtype), h, "swiglu"))
    opcheck(ops.unpermute_backward, (torch.randn(T, d).to(dtype), x_perm, perm_rows, i["tw"]))
    opcheck(ops.permute_backward, (x_perm, perm_rows))


def test_opcheck_empty_batch():
    x = torch.randn(0, d, requires_grad=True)
    w_router = torch.randn(E, d, requires_grad=True)
    w13, w2 = torch.randn(E, 2 * f, d, requires_grad=True), torch.randn(E, d, f, requires_grad=True)
    opcheck(torch.ops.moe_ext.moe, (x, w_router, w13, w2, k, "swiglu", "softmax", True, 1.0, None, None, None, None,
                                    None))
    opcheck(torch.ops.moe_ext.route, (x, w_router, k, "softmax", True, 1.0, None, None, None, None))
