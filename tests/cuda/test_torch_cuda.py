"""torch.ops.moe_ext.* on CUDA tensors (python/moe_ext/torch/_cuda.py).

Host side (runs without a GPU): with the CUDA build every op has a CUDA kernel registered, importing
moe_ext.torch with CUDA_VISIBLE_DEVICES="" works, the adapters hand moe_ext.cuda arguments its checks
accept (they reach "no CUDA device"), and their output plumbing (argument order, capacity layout, gradients
not asked for) is checked against the CPU ops with moe_ext.cuda's functions replaced by CPU stand-ins.

GPU side (skipped with the reason without a GPU, failed instead under MOE_EXT_REQUIRE_GPU=1: fixture
`gpu` of gpu_support.py): every op on CUDA against the same op on CPU on the same inputs, autograd, opcheck,
the MoE module and a tiny Mixtral with experts_implementation="moe_ext" against eager. Compared element by
element (gpu_support.assert_rows_close: every element finite, per-row max relative error), with the CUDA
outputs pre-filled with NaN. Tolerances: gpu_support.RTOL by dtype (the CPU kernels compute half dtypes in
float32 and round once; the CUDA kernels also round the intermediates h, activation, y_perm); gradients
go through the forward chain and then the backward one, twice the roundings: 2 * RTOL. Gradients of
whole layers and models compare rows no smaller than 1% of the tensor's largest value (floor=1e-2): a
row far below the rest carries noise propagated from every other row.
"""
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

from gpu_support import RTOL as ROW_RTOL, assert_rows_close, gpu, gpu_status, import_torch, poisoned  # noqa: F401

torch = import_torch()

import moe_ext.torch  # noqa: E402,F401  (registers the ops and, in a CUDA build, their CUDA kernels)
from moe_ext.torch import _cuda, _ops  # noqa: E402

PER_TIER = False  # CPU tiers are not what is under test here

HAVE_CUDA_BUILD = importlib.util.find_spec("moe_ext._cuda") is not None
needs_cuda_build = pytest.mark.skipif(not HAVE_CUDA_BUILD, reason="moe_ext built without CUDA (no nvcc)")


def _device_present():
    return gpu_status()[0]


needs_gpu = pytest.mark.usefixtures("gpu", "poisoned")
OPS = ("route", "permute", "grouped_gemm", "activation", "unpermute", "experts", "moe", "activation_backward",
       "grouped_gemm_backward", "unpermute_backward", "permute_backward", "bias_grad")
GPT_OSS = "swiglu(alpha=1.702,limit=7.0,up_offset=1.0,interleaved)"  # biases, clamps, interleaved gate/up
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RTOL = {torch.float32: ROW_RTOL["float32"], torch.float16: ROW_RTOL["float16"], torch.bfloat16: ROW_RTOL["bfloat16"]}
T, d, f, E, k, C = 37, 24, 20, 6, 2, 9  # odd sizes; C < T*k/E so that capacity drops copies


def inputs(dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)

    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int32).to(device)
    return dict(x=r(T, d), w_router=r(E, d, scale=0.5), w13=r(E, 2 * f, d, scale=0.3), w2=r(E, d, f, scale=0.3),
                tw=torch.rand(T, k, generator=g).to(device), ids=ids, bias=r(E, scale=0.1).float(),
                b13=r(E, 2 * f, scale=0.5), b2=r(E, d, scale=0.5))


# --------------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", OPS)
def test_cuda_kernel_registered_exactly_in_a_cuda_build(name):
    assert _cuda.REGISTERED is HAVE_CUDA_BUILD
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"moe_ext::{name}", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"moe_ext::{name}", "CUDA") is HAVE_CUDA_BUILD


def test_hf_backend_takes_cuda_tensors_exactly_when_registered():
    from moe_ext.torch import hf
    assert hf._device_supported(torch.device("cuda")) is HAVE_CUDA_BUILD
    assert hf._device_supported(torch.device("cpu"))


@needs_cuda_build
def test_import_registers_without_a_visible_device():
    code = textwrap.dedent("""
        import torch, moe_ext.torch
        from moe_ext.torch import _cuda
        assert _cuda.REGISTERED
        assert all(torch._C._dispatch_has_kernel_for_dispatch_key("moe_ext::" + n, "CUDA") for n in _cuda.KERNELS)
        print("ok")
    """)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@needs_cuda_build
@pytest.mark.skipif(_device_present(), reason="checks the path to the device check; a device is present")
def test_adapters_pass_moe_ext_cuda_argument_checks():
    """Mixed dtypes, bf16 top-k weights, int64 ids/offsets, non-contiguous inputs: the adapters turn them
    into what moe_ext.cuda accepts, so the call fails only for want of a device (not TypeError/ValueError)."""
    i = inputs(torch.bfloat16)
    x, w13, w2, ids64 = i["x"], i["w13"], i["w2"], i["ids"].long()
    tw16 = i["tw"].to(torch.bfloat16)
    offs64 = torch.tensor([0, 10, 20, 30, 40, 50, T * k], dtype=torch.int64)
    x_perm = torch.randn(T * k, d).to(torch.bfloat16)
    h = torch.randn(T * k, 2 * f).t().contiguous().t()  # non-contiguous float32
    calls = [
        ("route", (x, i["w_router"].float(), k, "softmax", True, 1.0, i["bias"].half(), None, None, None)),
        ("permute", (x.t().contiguous().t(), ids64, E, C)),
        ("grouped_gemm", (x_perm, w13.float(), offs64)),
        ("activation", (h, "swiglu")),
        ("unpermute", (x_perm, i["ids"], tw16)),
        ("experts", (x, w13, w2.half(), tw16, ids64, "swiglu", C)),
        ("moe", (x, i["w_router"], w13, w2, k, "swiglu", "sigmoid", False, 2.0, None, i["bias"], None, None, None)),
        ("activation_backward", (torch.randn(T * k, f), h.to(torch.bfloat16), "swiglu")),
        ("grouped_gemm_backward", (torch.randn(T * k, 2 * f), x_perm, w13, offs64, True, False)),
        ("unpermute_backward", (torch.randn(T, d), x_perm, i["ids"].long(), tw16)),
        ("permute_backward", (x_perm, i["ids"].long())),
        ("bias_grad", (torch.randn(T * k, 2 * f).to(torch.bfloat16), offs64)),
        ("grouped_gemm", (x_perm, w13, offs64, i["b13"])),
        ("experts", (x, w13, w2, tw16, ids64, GPT_OSS, None, i["b13"], i["b2"].half())),
        ("moe", (x, i["w_router"], w13, w2, k, "swiglu(gate_softcap=4.0,up_softcap=25.0)", "softmax", True, 1.0, None,
                 None, None, None, None, i["b13"].float(), i["b2"])),
        ("activation", (h, "geglu_tanh(limit=3.0,interleaved)")),
        ("activation_backward", (torch.randn(T * k, 2 * f), h, "relu2")),
    ]
    assert {name for name, _ in calls} == set(OPS)
    for name, args in calls:
        with pytest.raises(RuntimeError, match="no CUDA device"):
            _cuda.KERNELS[name](*args)


class CpuStandIns:
    """moe_ext.cuda's functions computed by the CPU ops, with moe_ext.cuda's conventions (single dtype,
    float32 weights, int32 indices, (h, d_act) order, None for gradients not asked for, capacity padding),
    asserting what the adapters must hand over."""

    def __init__(self, monkeypatch):
        for name in ("route", "permute", "grouped_gemm", "activate", "unpermute", "experts", "moe",
                     "activation_backward", "grouped_gemm_backward", "unpermute_backward", "permute_backward",
                     "bias_grad"):
            monkeypatch.setattr(_cuda._k, name, getattr(self, name))

    @staticmethod
    def same(*ts):
        assert all(t.is_contiguous() for t in ts if t is not None)
        assert len({t.dtype for t in ts}) == 1, [t.dtype for t in ts]

    def route(self, x, w, top_k, *, scoring, renormalize, scale, bias, correction_bias, n_group, topk_group,
              return_probs):
        self.same(x, w)
        assert return_probs and all(b is None or b.dtype == torch.float32 for b in (bias, correction_bias))
        return _ops.route(x, w, top_k, scoring, renormalize, scale, bias, correction_bias, n_group, topk_group)

    def permute(self, x, ids, E, *, capacity):
        x_perm, offsets, rows = _ops.permute(x, ids, E, capacity)
        if capacity is not None:  # moe_ext.cuda's layout: min(T*k, E*C) rows, zeros after the kept ones
            M = min(ids.numel(), E * capacity)
            x_perm = torch.cat([x_perm, x_perm.new_zeros((M - x_perm.shape[0], x_perm.shape[1]))])
        return x_perm, offsets, rows

    @staticmethod
    def biases(*bs):
        assert all(b is None or (b.dtype == torch.float32 and b.is_contiguous()) for b in bs)

    def grouped_gemm(self, a, w, offsets, *, bias):
        self.same(a, w)
        self.biases(bias)
        assert offsets.dtype == torch.int32
        return _ops.grouped_gemm(a, w, offsets, bias)

    def activate(self, h, activation):
        self.same(h)
        return _ops.activation(h, activation)

    def unpermute(self, y_perm, rows, tw):
        assert rows.dtype == torch.int32 and tw.dtype == torch.float32
        return _ops.unpermute(y_perm, rows, tw)

    def experts(self, x, w13, w2, tw, ids, *, activation, capacity, b13_or_b1, b2):
        self.same(x, w13, w2)
        self.biases(b13_or_b1, b2)
        assert tw.dtype == torch.float32
        return _ops.experts(x, w13, w2, tw, ids, activation, capacity, b13_or_b1, b2)

    def moe(self, x, wr, w13, w2, top_k, *, activation, scoring, renormalize, scale, bias, correction_bias,
            n_group, topk_group, capacity, b13_or_b1, b2):
        self.same(x, wr, w13, w2)
        self.biases(b13_or_b1, b2)
        return _ops.moe(x, wr, w13, w2, top_k, activation, scoring, renormalize, scale, bias, correction_bias,
                        n_group, topk_group, capacity, b13_or_b1, b2)

    def activation_backward(self, h, d_act, activation):
        self.same(h, d_act)
        return _ops.activation_backward(d_act, h, activation)

    def grouped_gemm_backward(self, g, a, w, offsets, *, need_a, need_w):
        self.same(g, a, w)
        d_a, d_w = _ops.grouped_gemm_backward(g, a, w, offsets, need_a, need_w)
        return (d_a if need_a else None), (d_w if need_w else None)

    def unpermute_backward(self, g, y_perm, rows, tw):
        self.same(g, y_perm)
        assert tw.dtype == torch.float32
        return _ops.unpermute_backward(g, y_perm, rows, tw)

    def permute_backward(self, g, rows):
        return _ops.permute_backward(g, rows)

    def bias_grad(self, g, offsets):
        assert g.is_contiguous() and offsets.dtype == torch.int32
        return _ops.bias_grad(g, offsets)


def assert_same(got, want, exact=True):
    got, want = (got,) if isinstance(got, torch.Tensor) else got, (want,) if isinstance(want, torch.Tensor) else want
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g, w, **({"rtol": 0, "atol": 0} if exact else {}))


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_adapters_return_the_cpu_contract(dtype, monkeypatch):
    """With CPU stand-ins for moe_ext.cuda, each adapter returns exactly what the CPU op returns: this checks
    the plumbing (argument order, output dtypes, capacity rows, empty gradients); the kernels are the GPU
    tests' business."""
    CpuStandIns(monkeypatch)
    i = inputs(dtype)
    ops = torch.ops.moe_ext
    x_perm, offsets, rows = ops.permute(i["x"], i["ids"], E, None)
    h = ops.grouped_gemm(x_perm, i["w13"], offsets)
    a = ops.activation(h, "swiglu")
    g_perm = torch.randn(T * k, d).to(dtype)
    calls = [
        ("route", (i["x"], i["w_router"], k, "softmax", True, 1.0, i["bias"].to(dtype), None, None, None)),
        ("route", (i["x"], i["w_router"].float(), k, "sigmoid", False, 2.5, None, i["bias"], 2, 1)),
        ("permute", (i["x"], i["ids"].long(), E, None)),
        ("permute", (i["x"], i["ids"], E, C)),
        ("permute", (i["x"], i["ids"], E, 0)),
        ("grouped_gemm", (x_perm, i["w13"], offsets.long())),
        ("grouped_gemm", (x_perm.float(), i["w13"], offsets)),
        ("activation", (h, "swiglu")), ("activation", (h, "gelu")),
        ("unpermute", (g_perm, rows, i["tw"].to(dtype))),
        ("experts", (i["x"], i["w13"], i["w2"], i["tw"], i["ids"], "swiglu", None)),
        ("experts", (i["x"], i["w13"][:, :f].contiguous(), i["w2"].float(), i["tw"], i["ids"].long(), "relu", C)),
        ("moe", (i["x"], i["w_router"], i["w13"], i["w2"], k, "geglu", "softmax", True, 1.0, i["bias"], None, None,
                 None, C)),
        ("activation_backward", (torch.randn(T * k, f).to(dtype), h, "swiglu")),
        ("activation_backward", (torch.randn(T * k, 2 * f), h, "relu")),
        ("grouped_gemm_backward", (torch.randn(T * k, d).to(dtype), a, i["w2"], offsets, True, True)),
        ("grouped_gemm_backward", (torch.randn(T * k, d).to(dtype), a, i["w2"], offsets, False, True)),
        ("grouped_gemm_backward", (torch.randn(T * k, d), a, i["w2"], offsets, True, False)),
        ("unpermute_backward", (torch.randn(T, d).to(dtype), g_perm, rows, i["tw"].to(dtype))),
        ("permute_backward", (g_perm, rows)),
        ("bias_grad", (torch.randn(T * k, 2 * f).to(dtype), offsets)),
        ("bias_grad", (torch.randn(T * k, d), offsets.long())),
        ("grouped_gemm", (x_perm, i["w13"], offsets, i["b13"])),
        ("grouped_gemm", (x_perm, i["w13"], offsets, i["b13"].half())),
        ("activation", (h, GPT_OSS)), ("activation", (h, "silu(gated=False,alpha=1.702)")),
        ("activation_backward", (torch.randn(T * k, f).to(dtype), h, "swiglu(gate_softcap=4.0,up_softcap=25.0)")),
        ("experts", (i["x"], i["w13"], i["w2"], i["tw"], i["ids"], GPT_OSS, None, i["b13"], i["b2"])),
        ("experts", (i["x"], i["w13"][:, :f].contiguous(), i["w2"], i["tw"], i["ids"], "relu2", C,
                     i["b13"][:, :f].contiguous().float(), None)),
        ("moe", (i["x"], i["w_router"], i["w13"], i["w2"], k, "geglu_tanh(limit=3.0,interleaved)", "softmax", True,
                 1.0, None, None, None, None, None, None, i["b2"])),
    ]
    assert {name for name, _ in calls} == set(OPS)
    for name, args in calls:
        # Operands of different dtypes (a float32 a with a 16-bit w; grad_out and a apart): the adapter hands
        # moe_ext.cuda one dtype (float32, w too), while the CPU op reads a 16-bit w as it is, on another
        # microkernel where the tier has one (AVX-512: the float32 sums run in another order, last-bit
        # differences): equal to the dtype's tolerance there, bit for bit everywhere else.
        floats = {t.dtype for t in args[:3] if isinstance(t, torch.Tensor) and t.is_floating_point()}
        mixed = name.startswith("grouped_gemm") and len(floats) > 1
        assert_same(_cuda.KERNELS[name](*args), getattr(_ops, name)(*args), exact=not mixed)


# --------------------------------------------------------------------------------------------------
# GPU side
# --------------------------------------------------------------------------------------------------
def cuda_args(args):
    return tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)


def assert_close_to_cpu(got, want, dtype, exact=False):
    got, want = (got,) if isinstance(got, torch.Tensor) else got, (want,) if isinstance(want, torch.Tensor) else want
    for g, w in zip(got, want):
        assert g.device.type == "cuda" and g.dtype == w.dtype and g.shape == w.shape
        if exact or not w.is_floating_point():
            torch.testing.assert_close(g.cpu(), w, rtol=0, atol=0)
        else:
            assert_rows_close(g, w, RTOL[dtype if w.dtype != torch.float32 else torch.float32])


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_every_op_on_cuda_matches_cpu(dtype):
    i = inputs(dtype)
    ops = torch.ops.moe_ext
    x_perm, offsets, rows = ops.permute(i["x"], i["ids"], E, None)
    h = ops.grouped_gemm(x_perm, i["w13"], offsets)
    a = ops.activation(h, "swiglu")
    _, offsets_c, rows_c = ops.permute(i["x"], i["ids"], E, C)
    g_perm = torch.randn(T * k, d).to(dtype)
    cases = [  # (op, args, exact): gathers, index outputs and 0/1-weight sums are exact
        ("route", (i["x"], i["w_router"], k, "softmax", True, 1.0, i["bias"], None, None, None), False),
        ("route", (i["x"], i["w_router"], k, "sigmoid", True, 2.5, None, i["bias"], 2, 1), False),
        ("permute", (i["x"], i["ids"], E, None), True),
        ("permute", (i["x"], i["ids"].long(), E, C), True),
        ("permute", (i["x"], i["ids"], E, 0), True),
        ("grouped_gemm", (x_perm, i["w13"], offsets), False),
        ("activation", (h, "swiglu"), False), ("activation", (h, "geglu"), False),
        ("activation", (h, "relu"), False), ("activation", (h, "gelu"), False),
        ("unpermute", (g_perm, rows, i["tw"]), False),
        ("unpermute", (g_perm[:offsets_c[-1]].contiguous(), rows_c, i["tw"]), False),
        ("experts", (i["x"], i["w13"], i["w2"], i["tw"], i["ids"], "swiglu", None), False),
        ("experts", (i["x"], i["w13"][:, :f].contiguous(), i["w2"], i["tw"], i["ids"], "gelu", C), False),
        ("moe", (i["x"], i["w_router"], i["w13"], i["w2"], k, "swiglu", "softmax", True, 1.0, None, None, None,
                 None, None), False),
        ("moe", (i["x"], i["w_router"], i["w13"], i["w2"], k, "geglu", "sigmoid", False, 2.0, i["bias"], None,
                 None, None, C), False),
        ("activation_backward", (torch.randn(T * k, f).to(dtype), h, "swiglu"), False),
        ("grouped_gemm_backward", (torch.randn(T * k, d).to(dtype), a, i["w2"], offsets, True, True), False),
        ("grouped_gemm_backward", (torch.randn(T * k, d).to(dtype), a, i["w2"], offsets, False, True), False),
        ("unpermute_backward", (torch.randn(T, d).to(dtype), g_perm, rows, i["tw"]), False),
        ("permute_backward", (g_perm, rows), False),
        ("bias_grad", (torch.randn(T * k, 2 * f).to(dtype), offsets), False),
        ("grouped_gemm", (x_perm, i["w13"], offsets, i["b13"]), False),
        ("activation", (h, GPT_OSS), False), ("activation", (h, "relu2"), False),
        ("activation_backward", (torch.randn(T * k, f).to(dtype), h, GPT_OSS), False),
        ("experts", (i["x"], i["w13"], i["w2"], i["tw"], i["ids"], GPT_OSS, None, i["b13"], i["b2"]), False),
        ("moe", (i["x"], i["w_router"], i["w13"], i["w2"], k, "swiglu(gate_softcap=4.0,up_softcap=25.0)", "softmax",
                 True, 1.0, None, None, None, None, C, i["b13"], i["b2"]), False),
    ]
    assert {name for name, _, _ in cases} == set(OPS)
    for name, args, exact in cases:
        op = getattr(ops, name)
        assert_close_to_cpu(op(*cuda_args(args)), op(*args), dtype, exact)


def _grads(fn, tensors):
    for t in tensors:
        t.grad = None
    out = fn()
    (out.float() * torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape)).sum().backward()
    return [out.detach()] + [t.grad for t in tensors]


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("capacity", [None, C])
def test_autograd_on_cuda_matches_cpu(dtype, capacity):
    from moe_ext import torch as mt
    results = []
    for device in ("cpu", "cuda"):
        i = {n: v.requires_grad_(v.is_floating_point() and n != "bias") for n, v in inputs(dtype, device).items()}
        ex = _grads(lambda: mt.experts(i["x"], i["w13"], i["w2"], i["tw"], i["ids"], capacity=capacity),
                    [i["x"], i["w13"], i["w2"], i["tw"]])
        mo = _grads(lambda: mt.moe(i["x"], i["w_router"], i["w13"], i["w2"], k, capacity=capacity),
                    [i["x"], i["w_router"], i["w13"], i["w2"]])
        results.append(ex + mo)
    for got, want in zip(results[1], results[0]):
        assert_rows_close(got, want, 2 * RTOL[dtype], floor=1e-2)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("activation", ["swiglu", GPT_OSS, "swiglu(gate_softcap=4.0,up_softcap=25.0)"])
def test_autograd_with_biases_on_cuda_matches_cpu(dtype, activation):
    """Gradients of x, weights, routing weights and both expert biases: CUDA against the CPU ops."""
    from moe_ext import torch as mt
    results = []
    for device in ("cpu", "cuda"):
        i = {n: v.requires_grad_(v.is_floating_point() and n != "bias") for n, v in inputs(dtype, device).items()}
        results.append(_grads(lambda: mt.experts(i["x"], i["w13"], i["w2"], i["tw"], i["ids"], activation=activation,
                                                 b13_or_b1=i["b13"], b2=i["b2"]),
                              [i["x"], i["w13"], i["w2"], i["tw"], i["b13"], i["b2"]]))
    for got, want in zip(results[1], results[0]):
        assert_rows_close(got, want, 2 * RTOL[dtype], floor=1e-2)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_opcheck_on_cuda(dtype):
    i = {n: v.requires_grad_(v.is_floating_point()) for n, v in inputs(dtype, "cuda").items()}
    ops = torch.ops.moe_ext
    check = lambda op, args: torch.library.opcheck(op, args, raise_exception=True)  # noqa: E731
    check(ops.route, (i["x"], i["w_router"], k, "softmax", True, 1.0, None, None, None, None))
    check(ops.permute, (i["x"], i["ids"], E, None))
    check(ops.permute, (i["x"], i["ids"], E, C))
    x_perm, offsets, rows = ops.permute(i["x"].detach(), i["ids"], E, None)
    check(ops.grouped_gemm, (x_perm.requires_grad_(), i["w13"], offsets))
    h = ops.grouped_gemm(x_perm.detach(), i["w13"].detach(), offsets).requires_grad_()
    check(ops.activation, (h, "swiglu"))
    check(ops.unpermute, (torch.randn(T * k, d, device="cuda").to(dtype).requires_grad_(), rows, i["tw"]))
    check(ops.experts, (i["x"], i["w13"], i["w2"], i["tw"], i["ids"], "swiglu", None))
    check(ops.moe, (i["x"], i["w_router"], i["w13"], i["w2"], k, "swiglu", "softmax", True, 1.0, None, None, None,
                    None, None))
    check(ops.experts, (i["x"], i["w13"], i["w2"], i["tw"], i["ids"], GPT_OSS, None, i["b13"], i["b2"]))
    check(ops.bias_grad, (torch.randn(T * k, 2 * f, device="cuda").to(dtype), offsets))


@needs_gpu
def test_moe_module_forward_backward_on_cuda():
    from moe_ext.torch import MoE
    torch.manual_seed(0)
    cpu = MoE(d, f, E, k, router_bias=True)
    gpu = MoE(d, f, E, k, router_bias=True, device="cuda")
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(3, T, d)
    outs = []
    for module, xx in ((cpu, x), (gpu, x.cuda())):
        y = module(xx)
        loss = (y * y).sum() + module.load_balancing_loss() + module.router_z_loss()
        loss.backward()
        outs.append([y] + [p.grad for p in module.parameters()])
        assert module.last_expert_counts.device == xx.device
    for got, want in zip(outs[1], outs[0]):
        assert_rows_close(got, want, 2 * RTOL[torch.float32], floor=1e-2)


def _logits_and_grads(model, ids, impl):
    """One forward + backward of the LM loss with experts_implementation=impl: logits and every gradient."""
    model.set_experts_implementation(impl)
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    return [out.logits.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]


@needs_gpu
def test_tiny_mixtral_on_cuda_matches_eager():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.MixtralConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=128, intermediate_size=48,
                                        num_local_experts=4, num_experts_per_tok=2)
    model = transformers.AutoModelForCausalLM.from_config(config).cuda().eval()
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1)).cuda()
    results = {impl: _logits_and_grads(model, ids, impl) for impl in ("eager", "moe_ext")}
    from moe_ext.torch import hf
    experts = [m for m in model.modules() if hasattr(m, "gate_up_proj")]
    assert experts and all(hf.fallback_reason(m) is None for m in experts)  # ran on moe_ext, not eager
    for got, want in zip(results["moe_ext"], results["eager"]):
        assert_rows_close(got, want, 2 * RTOL[torch.float32], floor=1e-2)


@needs_gpu
def test_tiny_gpt_oss_on_cuda_matches_eager():
    """gpt-oss experts on CUDA (biases, interleaved gate/up, alpha, clamps, +1; transposed weights) run on
    moe_ext, not eager, and match eager: logits and every gradient."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GptOssConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, vocab_size=128, intermediate_size=48, head_dim=16,
                                       num_local_experts=4, num_experts_per_tok=2, swiglu_limit=1.0)
    model = transformers.AutoModelForCausalLM.from_config(config).cuda().eval()
    experts = [m for m in model.modules() if hasattr(m, "gate_up_proj")]
    with torch.no_grad():
        for m in experts:
            m.gate_up_proj.normal_(0.0, 64 ** -0.5)
            m.down_proj.normal_(0.0, 48 ** -0.5)
            m.gate_up_proj_bias.normal_(0.0, 0.5)
            m.down_proj_bias.normal_(0.0, 0.5)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1)).cuda()
    results = {impl: _logits_and_grads(model, ids, impl) for impl in ("eager", "moe_ext")}
    from moe_ext.torch import hf
    assert experts and all(hf.fallback_reason(m) is None for m in experts)  # ran on moe_ext, not eager
    assert {hf.activation_of(m) for m in experts} == {"swiglu(alpha=1.702,limit=1.0,up_offset=1.0,interleaved)"}
    for got, want in zip(results["moe_ext"], results["eager"]):
        assert_rows_close(got, want, 2 * RTOL[torch.float32], floor=1e-2)
