"""torch.ops.moe_ext.*: the SPEC §3 operations and their backward as PyTorch custom ops.

Each op has a schema (inferred by torch.library.custom_op from the signature, with the functional API's
defaults: `torch.ops.moe_ext.moe(x, w_router, w13, w2, 2)` works), a CPU kernel that hands the tensors'
memory to the NumPy API of moe_ext (no copy for contiguous tensors of the forward kernels' dtypes, nor for
an expert weight that is the transposed view `w_t.transpose(1, 2)` of a contiguous [E, K, N] tensor), a
fake (meta) implementation so torch.compile / FakeTensor tracing works, and, for the forward ops, an
autograd formula whose backward runs the moe_ext backward kernels (csrc/core/backward.h) through the
backward ops below (gradients of expert biases included; the gradient of a transposed weight view flows
back to its base through torch's own view autograd). Scores and top-k weights are float32 whatever the
activation dtype (SPEC §2). `activation` is a description's canonical string (moe_ext.Activation.spec:
a preset name such as "swiglu", or e.g. "swiglu(alpha=1.702,limit=7.0,up_offset=1.0,interleaved)").

CUDA: a CUDA build registers its kernels on these same ops with `<op>.register_kernel("cuda", fn)` from a
module `moe_ext.torch._cuda`, imported at the end of this file when it exists. Nothing else changes.
"""
import importlib.util
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.library import custom_op

import ml_dtypes

import moe_ext
from moe_ext import _backward as _bwd

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ROUTE_DEFAULTS = ("softmax", True, 1.0, None, None, None, None)  # scoring .. topk_group (route and moe)


# --------------------------------------------------------------------------------------------------
# tensor <-> NumPy
# --------------------------------------------------------------------------------------------------
def _np(t: Optional[Tensor], half: bool = False):
    """A NumPy view of a tensor's memory (a copy only to make it contiguous). With `half`, bfloat16 and
    float16 tensors are passed as they are (bfloat16 as an ml_dtypes view: the forward kernels take 16-bit
    data, as grouped_gemm_backward does); otherwise (the other backward kernels, biases) they are widened
    to float32."""
    if t is None:
        return None
    if t.dtype not in FLOAT_DTYPES + (torch.int32, torch.int64):
        raise TypeError(f"expected a float32/bfloat16/float16 or int32/int64 tensor; got dtype {t.dtype}")
    if t.device.type != "cpu":
        raise ValueError(f"expected a CPU tensor (no CUDA kernel registered); got device {t.device}")
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16 and half:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if t.dtype in (torch.bfloat16, torch.float16) and not half:
        t = t.float()
    return t.numpy()


def _np_weight(w: Optional[Tensor], half: bool = False):
    """Like _np for an expert weight [E, N, K], which may also be the transposed view `w_t.transpose(1, 2)`
    of a contiguous [E, K, N] tensor (transformers' is_transposed experts): that view reaches the kernels
    as the same view of the same memory (moe_ext takes it without a copy), not as a contiguous copy."""
    if w is not None and w.dim() == 3 and not w.is_contiguous() and w.transpose(1, 2).is_contiguous():
        return _np(w.transpose(1, 2), half).transpose(0, 2, 1)
    return _np(w, half)


def _spec(activation) -> str:
    """The canonical string of an activation description (preset name, canonical string or
    moe_ext.Activation): what the ops' `activation: str` argument carries."""
    return moe_ext.activation_from(activation).spec


def _gated(activation: str) -> bool:
    return moe_ext.activation_from(activation).gated


def _out(array, dtype=torch.float32) -> Tensor:
    """A tensor owning a NumPy result (the core allocates fresh outputs), cast to `dtype`."""
    array = np.ascontiguousarray(array)
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16).to(dtype)
    return torch.from_numpy(array).to(dtype)


def _float_dtype_check(name, t):
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float32, bfloat16 or float16; got {t.dtype}")


def _with_defaults(inputs, count, defaults):
    """A setup_context's inputs with the trailing arguments torch leaves out when they are at their
    defaults filled in: `count` parameters, the last len(defaults) of which have these defaults."""
    inputs, defaults = tuple(inputs), tuple(defaults)
    missing = count - len(inputs)
    return inputs + (defaults[len(defaults) - missing:] if missing > 0 else ())


def _needs(ctx, count):
    """ctx.needs_input_grad padded with False to the schema's `count` inputs (trailing arguments left at
    their defaults may be missing from it)."""
    needs = tuple(ctx.needs_input_grad)
    return needs + (False,) * (count - len(needs))


def _i32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.int32 else t.to(torch.int32)


# --------------------------------------------------------------------------------------------------
# backward ops (no autograd of their own: they are what the forward ops' backward runs)
# --------------------------------------------------------------------------------------------------
@custom_op("moe_ext::activation", mutates_args=(), device_types="cpu")
def activation(h: Tensor, activation: str = "swiglu") -> Tensor:
    """The activation description (a canonical string, moe_ext.Activation.spec) on h: gated descriptions
    take h [M, 2f] (gate and up concatenated or interleaved) to [M, f], the others act elementwise."""
    return _out(moe_ext.activation(_np(h, True), activation), h.dtype)


@activation.register_fake
def _(h, activation="swiglu"):
    f = h.shape[1] // 2 if _gated(activation) else h.shape[1]
    return h.new_empty((h.shape[0], f))


@custom_op("moe_ext::activation_backward", mutates_args=(), device_types="cpu")
def activation_backward(grad_act: Tensor, h: Tensor, activation: str = "swiglu") -> Tensor:
    # One dtype: read and written as it is (16-bit rows widened block by block in the core); two: float32.
    same = grad_act.dtype == h.dtype
    return _out(_bwd.activation_backward(_np(grad_act, same), _np(h, same), activation), h.dtype)


@activation_backward.register_fake
def _(grad_act, h, activation="swiglu"):
    return torch.empty_like(h)


@custom_op("moe_ext::grouped_gemm_backward", mutates_args=(), device_types="cpu")
def grouped_gemm_backward(grad_out: Tensor, a: Tensor, w: Tensor, expert_offsets: Tensor, need_a: bool = True,
                          need_w: bool = True) -> Tuple[Tensor, Tensor]:
    """(grad_a [M, K] or [0, K] when not needed, grad_w [E, N, K] or [0, N, K])."""
    # 16-bit tensors go in as they are: the weights are read in place (never widened or transposed).
    a_np = _np(a, True)
    grad_a, grad_w = _bwd.grouped_gemm_backward(_np(grad_out, True), a_np, _np_weight(w, True), _np(expert_offsets),
                                                need_a=need_a, need_w=need_w, grad_a_dtype=a_np.dtype)
    M, K = a.shape
    E, N, _ = w.shape
    grad_a = _out(grad_a, a.dtype) if need_a else a.new_empty((0, K))
    grad_w = _out(grad_w, w.dtype) if need_w else w.new_empty((0, N, K))
    return grad_a, grad_w


@grouped_gemm_backward.register_fake
def _(grad_out, a, w, expert_offsets, need_a=True, need_w=True):
    M, K = a.shape
    E, N, _ = w.shape
    return a.new_empty((M if need_a else 0, K)), w.new_empty((E if need_w else 0, N, K))


@custom_op("moe_ext::unpermute_backward", mutates_args=(), device_types="cpu")
def unpermute_backward(grad_y: Tensor, y_perm: Tensor, perm_rows: Tensor,
                       topk_weights: Tensor) -> Tuple[Tensor, Tensor]:
    g_perm, g_w = _bwd.unpermute_backward(_np(grad_y), _np(y_perm), _np(perm_rows), _np(topk_weights))
    return _out(g_perm, y_perm.dtype), _out(g_w, torch.float32)


@unpermute_backward.register_fake
def _(grad_y, y_perm, perm_rows, topk_weights):
    return torch.empty_like(y_perm), perm_rows.new_empty(perm_rows.shape, dtype=torch.float32)


@custom_op("moe_ext::permute_backward", mutates_args=(), device_types="cpu")
def permute_backward(grad_x_perm: Tensor, perm_rows: Tensor) -> Tensor:
    return _out(_bwd.permute_backward(_np(grad_x_perm), _np(perm_rows)), grad_x_perm.dtype)


@permute_backward.register_fake
def _(grad_x_perm, perm_rows):
    return grad_x_perm.new_empty((perm_rows.shape[0], grad_x_perm.shape[1]))


@custom_op("moe_ext::bias_grad", mutates_args=(), device_types="cpu")
def bias_grad(grad_out: Tensor, expert_offsets: Tensor) -> Tensor:
    """[E, N] float32: the gradient of a per-expert bias [E, N] added to the rows of each expert,
    i.e. grad_out's rows summed per expert (E = len(expert_offsets) - 1)."""
    return _out(_bwd.bias_grad(_np(grad_out), _np(expert_offsets)))


@bias_grad.register_fake
def _(grad_out, expert_offsets):
    return grad_out.new_empty((expert_offsets.shape[0] - 1, grad_out.shape[1]), dtype=torch.float32)


# --------------------------------------------------------------------------------------------------
# route
# --------------------------------------------------------------------------------------------------
@custom_op("moe_ext::route", mutates_args=(), device_types="cpu")
def route(x: Tensor, w_router: Tensor, top_k: int, scoring: str = "softmax", renormalize: bool = True,
          scale: float = 1.0, bias: Optional[Tensor] = None, correction_bias: Optional[Tensor] = None,
          n_group: Optional[int] = None, topk_group: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """(topk_weights [T, k] f32, topk_ids [T, k] i32, probs [T, E] f32): probs are the scores (softmax
    probabilities or sigmoids) of every expert, differentiable like topk_weights."""
    weights, ids, probs = moe_ext.route(_np(x, True), _np(w_router, True), top_k, scoring=scoring, renormalize=renormalize,
                                        scale=scale, bias=_np(bias), correction_bias=_np(correction_bias),
                                        n_group=n_group, topk_group=topk_group, return_probs=True)
    return _out(weights), _out(ids, torch.int32), _out(probs)


@route.register_fake
def _(x, w_router, top_k, scoring="softmax", renormalize=True, scale=1.0, bias=None, correction_bias=None,
      n_group=None, topk_group=None):
    T, E = x.shape[0], w_router.shape[0]
    return (x.new_empty((T, top_k), dtype=torch.float32), x.new_empty((T, top_k), dtype=torch.int32),
            x.new_empty((T, E), dtype=torch.float32))


def route_backward_scores(grad_weights, grad_probs, probs, topk_ids, scoring, renormalize, scale):
    """d loss / d logits [T, E] (float32) from the gradients of topk_weights and probs.

    weights = scale * s / S (renormalize, S = sum of the chosen scores s, S != 0) or scale * s, with
    s = probs[t, topk_ids[t]]; probs = softmax(logits) or sigmoid(logits). Plain torch ops on the small
    [T, E] tensors (traceable by torch.compile). The correction bias only selects: it has no gradient."""
    d_probs = torch.zeros_like(probs) if grad_probs is None else grad_probs.to(probs.dtype).clone()
    if grad_weights is not None:
        ids = topk_ids.long()
        g = grad_weights.to(probs.dtype)
        s = probs.gather(1, ids)
        if renormalize:
            total = s.sum(1, keepdim=True)
            nonzero = total != 0
            safe = torch.where(nonzero, total, torch.ones_like(total))
            d_s = torch.where(nonzero, scale / safe * (g - (g * s).sum(1, keepdim=True) / safe), scale * g)
        else:
            d_s = scale * g
        d_probs = d_probs.scatter_add(1, ids, d_s)
    if scoring == "softmax":
        return probs * (d_probs - (d_probs * probs).sum(1, keepdim=True))
    return d_probs * probs * (1 - probs)


def _route_setup(ctx, inputs, output):
    x, w_router, top_k, scoring, renormalize, scale, bias, *_ = _with_defaults(inputs, 10, ROUTE_DEFAULTS)
    weights, ids, probs = output
    ctx.save_for_backward(x, w_router, ids, probs)
    ctx.options = (scoring, renormalize, scale, bias is not None)


def _route_grads(d_logits, x, w_router, has_bias, needs):
    """(grad_x, grad_w_router, grad_bias) of logits = x @ w_router^T (+ bias), f32 accumulation."""
    grad_x = (d_logits @ w_router.float()).to(x.dtype) if needs[0] else None
    grad_w = (d_logits.t() @ x.float()).to(w_router.dtype) if needs[1] else None
    grad_b = d_logits.sum(0) if has_bias and needs[6] else None
    return grad_x, grad_w, grad_b


def _route_backward(ctx, grad_weights, grad_ids, grad_probs):
    x, w_router, ids, probs = ctx.saved_tensors
    scoring, renormalize, scale, has_bias = ctx.options
    d_logits = route_backward_scores(grad_weights, grad_probs, probs, ids, scoring, renormalize, scale)
    grad_x, grad_w, grad_b = _route_grads(d_logits, x, w_router, has_bias, _needs(ctx, 10))
    return grad_x, grad_w, None, None, None, None, grad_b, None, None, None


route.register_autograd(_route_backward, setup_context=_route_setup)


# --------------------------------------------------------------------------------------------------
# permute
# --------------------------------------------------------------------------------------------------
@custom_op("moe_ext::permute", mutates_args=(), device_types="cpu")
def permute(x: Tensor, topk_ids: Tensor, num_experts: int,
            capacity: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """(x_perm [M, d], expert_offsets [E+1] i32, perm_rows [T, k] i32); M = T*k without capacity."""
    res = moe_ext.permute(_np(x, True), _np(topk_ids), num_experts, capacity=capacity)
    return _out(res.x_perm, x.dtype), _out(res.expert_offsets, torch.int32), _out(res.perm_rows, torch.int32)


@permute.register_fake
def _(x, topk_ids, num_experts, capacity=None):
    T, k = topk_ids.shape
    M = T * k if capacity is None else torch.library.get_ctx().new_dynamic_size()
    return (x.new_empty((M, x.shape[1])), x.new_empty((num_experts + 1,), dtype=torch.int32),
            x.new_empty((T, k), dtype=torch.int32))


def _permute_setup(ctx, inputs, output):
    ctx.save_for_backward(output[2])


def _permute_backward(ctx, grad_x_perm, grad_offsets, grad_rows):
    (perm_rows,) = ctx.saved_tensors
    return permute_backward(grad_x_perm.contiguous(), perm_rows), None, None, None


permute.register_autograd(_permute_backward, setup_context=_permute_setup)


# --------------------------------------------------------------------------------------------------
# grouped_gemm
# --------------------------------------------------------------------------------------------------
@custom_op("moe_ext::grouped_gemm", mutates_args=(), device_types="cpu")
def grouped_gemm(a: Tensor, w: Tensor, expert_offsets: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """out[rows of e] = a[rows of e] @ w[e]^T (+ bias[e]). w [E, N, K] or the transposed view of a
    contiguous [E, K, N]; bias [E, N] of any float dtype, added in float32."""
    return _out(moe_ext.grouped_gemm(_np(a, True), _np_weight(w, True), _np(expert_offsets), bias=_np(bias)),
                a.dtype)


@grouped_gemm.register_fake
def _(a, w, expert_offsets, bias=None):
    return a.new_empty((a.shape[0], w.shape[1]))


def _grouped_gemm_setup(ctx, inputs, output):
    a, w, offsets, bias = _with_defaults(inputs, 4, (None,))
    ctx.save_for_backward(a, w, offsets)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _grouped_gemm_backward(ctx, grad_out):
    a, w, offsets = ctx.saved_tensors
    need_a, need_w, _, need_b = _needs(ctx, 4)
    grad_out = grad_out.contiguous()
    grad_a, grad_w = grouped_gemm_backward(grad_out, a, w, offsets, need_a, need_w)
    grad_b = bias_grad(grad_out, offsets).to(ctx.bias_dtype) if need_b else None
    return (grad_a if need_a else None), (grad_w if need_w else None), None, grad_b


grouped_gemm.register_autograd(_grouped_gemm_backward, setup_context=_grouped_gemm_setup)


# --------------------------------------------------------------------------------------------------
# activation's autograd (the op itself is defined with the backward ops above)
# --------------------------------------------------------------------------------------------------
def _activation_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.activation = _with_defaults(inputs, 2, ("swiglu",))[1]


def _activation_autograd(ctx, grad):
    (h,) = ctx.saved_tensors
    return activation_backward(grad.contiguous(), h, ctx.activation), None


activation.register_autograd(_activation_autograd, setup_context=_activation_setup)


# --------------------------------------------------------------------------------------------------
# unpermute
# --------------------------------------------------------------------------------------------------
@custom_op("moe_ext::unpermute", mutates_args=(), device_types="cpu")
def unpermute(y_perm: Tensor, perm_rows: Tensor, topk_weights: Tensor) -> Tensor:
    """y[t] = sum_j topk_weights[t, j] * y_perm[perm_rows[t, j]] (in slot order, -1 skipped)."""
    return _out(moe_ext.unpermute(_np(y_perm, True), _np(perm_rows), _np(topk_weights)), y_perm.dtype)


@unpermute.register_fake
def _(y_perm, perm_rows, topk_weights):
    return y_perm.new_empty((perm_rows.shape[0], y_perm.shape[1]))


def _unpermute_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)
    ctx.weights_dtype = inputs[2].dtype


def _unpermute_backward(ctx, grad_y):
    y_perm, perm_rows, weights = ctx.saved_tensors
    g_perm, g_w = unpermute_backward(grad_y.contiguous(), y_perm, perm_rows, weights)
    return g_perm, None, g_w.to(ctx.weights_dtype)


unpermute.register_autograd(_unpermute_backward, setup_context=_unpermute_setup)


# --------------------------------------------------------------------------------------------------
# experts and moe (fused forward; their backward recomputes the intermediates with the ops above)
# --------------------------------------------------------------------------------------------------
@custom_op("moe_ext::experts", mutates_args=(), device_types="cpu")
def experts(x: Tensor, w13_or_w1: Tensor, w2: Tensor, topk_weights: Tensor, topk_ids: Tensor,
            activation: str = "swiglu", capacity: Optional[int] = None, b13_or_b1: Optional[Tensor] = None,
            b2: Optional[Tensor] = None) -> Tensor:
    """The expert FFNs over given routing. Weights [E, N, K] or transposed views of contiguous [E, K, N];
    biases b13_or_b1 [E, 2f or f] (rows in w13's order) and b2 [E, d], any float dtype."""
    return _out(moe_ext.experts(_np(x, True), _np_weight(w13_or_w1, True), _np_weight(w2, True), _np(topk_weights),
                                _np(topk_ids), activation=activation, capacity=capacity, b13_or_b1=_np(b13_or_b1),
                                b2=_np(b2)), x.dtype)


@experts.register_fake
def _(x, w13_or_w1, w2, topk_weights, topk_ids, activation="swiglu", capacity=None, b13_or_b1=None, b2=None):
    return torch.empty_like(x)


def experts_backward(grad_y, x, w13, w2, topk_weights, topk_ids, act, capacity, b13, b2, needs):
    """(grad_x, grad_w13, grad_w2, grad_topk_weights, grad_b13, grad_b2) of experts(); intermediates are
    recomputed (the fused forward keeps none). `needs`: which of the six are wanted."""
    need_x, need_w13, need_w2, need_weights, need_b13, need_b2 = needs
    E = w2.shape[0]
    x_perm, offsets, perm_rows = permute(x, topk_ids, E, capacity)
    h = grouped_gemm(x_perm, w13, offsets, b13)
    a = activation(h, act)
    y_perm = grouped_gemm(a, w2, offsets, b2)
    g_perm, g_w = unpermute_backward(grad_y.contiguous(), y_perm, perm_rows, topk_weights.float())
    g_a, g_w2 = grouped_gemm_backward(g_perm, a, w2, offsets, True, need_w2)
    g_h = activation_backward(g_a, h, act)
    g_xp, g_w13 = grouped_gemm_backward(g_h, x_perm, w13, offsets, need_x, need_w13)
    g_x = permute_backward(g_xp, perm_rows) if need_x else None
    g_b13 = bias_grad(g_h, offsets).to(b13.dtype) if need_b13 else None
    g_b2 = bias_grad(g_perm, offsets).to(b2.dtype) if need_b2 else None
    return (g_x, g_w13 if need_w13 else None, g_w2 if need_w2 else None,
            g_w.to(topk_weights.dtype) if need_weights else None, g_b13, g_b2)


def _experts_setup(ctx, inputs, output):
    x, w13, w2, weights, ids, act, capacity, b13, b2 = _with_defaults(inputs, 9, ("swiglu", None, None, None))
    ctx.save_for_backward(x, w13, w2, weights, ids, b13, b2)
    ctx.options = (act, capacity)


def _experts_autograd(ctx, grad_y):
    x, w13, w2, weights, ids, b13, b2 = ctx.saved_tensors
    act, capacity = ctx.options
    needs = _needs(ctx, 9)
    g_x, g_w13, g_w2, g_weights, g_b13, g_b2 = experts_backward(
        grad_y, x, w13, w2, weights, ids, act, capacity, b13, b2,
        (needs[0], needs[1], needs[2], needs[3], needs[7], needs[8]))
    return g_x, g_w13, g_w2, g_weights, None, None, None, g_b13, g_b2


experts.register_autograd(_experts_autograd, setup_context=_experts_setup)


@custom_op("moe_ext::moe", mutates_args=(), device_types="cpu")
def moe(x: Tensor, w_router: Tensor, w13_or_w1: Tensor, w2: Tensor, top_k: int, activation: str = "swiglu",
        scoring: str = "softmax", renormalize: bool = True, scale: float = 1.0, bias: Optional[Tensor] = None,
        correction_bias: Optional[Tensor] = None, n_group: Optional[int] = None, topk_group: Optional[int] = None,
        capacity: Optional[int] = None, b13_or_b1: Optional[Tensor] = None, b2: Optional[Tensor] = None) -> Tensor:
    """route, then experts. `bias` is the router's bias [E]; b13_or_b1 and b2 are the experts' biases."""
    return _out(moe_ext.moe(_np(x, True), _np(w_router, True), _np_weight(w13_or_w1, True), _np_weight(w2, True),
                            top_k, activation=activation, scoring=scoring, renormalize=renormalize, scale=scale,
                            bias=_np(bias), correction_bias=_np(correction_bias), n_group=n_group,
                            topk_group=topk_group, capacity=capacity, b13_or_b1=_np(b13_or_b1), b2=_np(b2)),
                x.dtype)


@moe.register_fake
def _(x, w_router, w13_or_w1, w2, top_k, activation="swiglu", scoring="softmax", renormalize=True, scale=1.0,
      bias=None, correction_bias=None, n_group=None, topk_group=None, capacity=None, b13_or_b1=None, b2=None):
    return torch.empty_like(x)


def _moe_setup(ctx, inputs, output):
    (x, w_router, w13, w2, top_k, act, scoring, renormalize, scale, bias, correction_bias, n_group, topk_group,
     capacity, b13, b2) = _with_defaults(inputs, 16, ("swiglu",) + ROUTE_DEFAULTS + (None, None, None))
    ctx.save_for_backward(x, w_router, w13, w2, bias, correction_bias, b13, b2)
    ctx.options = (top_k, act, scoring, renormalize, scale, n_group, topk_group, capacity)


def _moe_autograd(ctx, grad_y):
    x, w_router, w13, w2, bias, correction_bias, b13, b2 = ctx.saved_tensors
    top_k, act, scoring, renormalize, scale, n_group, topk_group, capacity = ctx.options
    weights, ids, probs = route(x, w_router, top_k, scoring, renormalize, scale, bias, correction_bias, n_group,
                                topk_group)
    needs = _needs(ctx, 16)
    route_needed = needs[0] or needs[1] or needs[9]
    g_x, g_w13, g_w2, g_weights, g_b13, g_b2 = experts_backward(
        grad_y, x, w13, w2, weights, ids, act, capacity, b13, b2,
        (needs[0], needs[2], needs[3], route_needed, needs[14], needs[15]))
    g_rx = g_wr = g_b = None
    if route_needed:
        d_logits = route_backward_scores(g_weights, None, probs, ids, scoring, renormalize, scale)
        g_rx, g_wr, g_b = _route_grads(d_logits, x, w_router, bias is not None,
                                       (needs[0], needs[1], 0, 0, 0, 0, needs[9]))
    if needs[0]:
        g_x = g_x + g_rx
    return (g_x, g_wr, g_w13, g_w2, None, None, None, None, None, g_b, None, None, None, None, g_b13, g_b2)


moe.register_autograd(_moe_autograd, setup_context=_moe_setup)


if importlib.util.find_spec("moe_ext.torch._cuda") is not None:  # a CUDA build's kernels for these ops
    importlib.import_module("moe_ext.torch._cuda")
