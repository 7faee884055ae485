"""The functional API of moe_ext.torch: the SPEC §3 operations on torch tensors, differentiable in the
float inputs (activations, weights, biases, topk_weights; never in ids, offsets or rows). They mirror
moe_ext's NumPy API (python/moe_ext/_api.py) and call torch.ops.moe_ext.* (python/moe_ext/torch/_ops.py).

`experts` and `moe` run the fused op when no gradient is needed; under autograd they chain the
per-step ops (permute, grouped_gemm, activation, grouped_gemm, unpermute) so that autograd keeps the
intermediates and the backward does not recompute them."""
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _ops, _weight_cache
from . import quant as _quant


class RouteResult(NamedTuple):
    topk_weights: Tensor  # [T, k] float32
    topk_ids: Tensor      # [T, k] int32
    probs: Tensor         # [T, E] float32: every expert's score (softmax probability or sigmoid)


class PermuteResult(NamedTuple):
    x_perm: Tensor          # [M, d]
    expert_offsets: Tensor  # [E + 1] int32
    perm_rows: Tensor       # [T, k] int32, -1 for dropped copies


def route(x, w_router, top_k, *, scoring="softmax", renormalize=True, scale=1.0, bias=None,
          correction_bias=None, n_group=None, topk_group=None) -> RouteResult:
    """Router GEMM, scoring, (grouped) top-k. Differentiable in x, w_router, bias through topk_weights
    and probs."""
    return RouteResult(*torch.ops.moe_ext.route(x, w_router, int(top_k), scoring, bool(renormalize),
                                                float(scale), bias, correction_bias, n_group, topk_group))


def permute(x, topk_ids, num_experts, *, capacity=None) -> PermuteResult:
    """Group the T*k token copies by expert (stable: expert, token, slot)."""
    return PermuteResult(*torch.ops.moe_ext.permute(x, topk_ids, int(num_experts), capacity))


def grouped_gemm(a, w, expert_offsets, *, bias=None) -> Tensor:
    """out[rows of e] = a[rows of e] @ w[e]^T (+ bias[e]). w [E, N, K], or the transposed view
    `w_t.transpose(1, 2)` of a contiguous [E, K, N] tensor (no copy); bias [E, N]."""
    return torch.ops.moe_ext.grouped_gemm(a, w, expert_offsets, bias)


def activation(h, activation="swiglu") -> Tensor:
    """The activation description (preset name, canonical string or moe_ext.Activation) on h: gated
    descriptions take h [M, 2f] to act(gate) * (up + up_offset) [M, f], the others act elementwise."""
    return torch.ops.moe_ext.activation(h, _ops._spec(activation))


def unpermute(y_perm, perm_rows, topk_weights) -> Tensor:
    """y[t] = sum_j topk_weights[t, j] * y_perm[perm_rows[t, j]]."""
    return torch.ops.moe_ext.unpermute(y_perm, perm_rows, topk_weights)


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _flat(x):
    return x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x


def _no_quantized_biases(b13_or_b1, b2):
    # the quantised torch op (torch/quant.py) takes no expert biases yet: refuse rather than drop them
    for name, b in (("b13_or_b1", b13_or_b1), ("b2", b2)):
        if b is not None:
            raise ValueError(f"{name}: expected None with quantised expert weights (moe_ext.torch's quantised "
                             f"experts take no biases); got a tensor of shape {tuple(b.shape)}")


def experts(x, w13_or_w1, w2, topk_weights, topk_ids, *, activation="swiglu", capacity=None, b13_or_b1=None,
            b2=None, weight_cache=False) -> Tensor:
    """The expert FFNs over given routing: x [..., d] -> y [..., d]. topk_weights [T, k] of any float
    dtype (computed in float32), topk_ids [T, k] int32 or int64 (T = number of rows of x). `activation`:
    a preset name, canonical string or moe_ext.Activation. Weights [E, N, K] or transposed views of
    contiguous [E, K, N] tensors (no copy); optional biases b13_or_b1 [E, 2f or f] and b2 [E, d].

    weight_cache=True (what MoE and the transformers backend pass: their weights are long-lived
    parameters) runs a call that needs no gradient on the packed expert-weight cache (docs/api.md §8)
    when it is on, on CPU and not while torch.compile traces; a call that needs one frees the weights'
    entries and runs the ops as without it."""
    if _quant.is_quantized(w13_or_w1) or _quant.is_quantized(w2):  # QuantizedExpertWeights (torch/quant.py)
        _no_quantized_biases(b13_or_b1, b2)
        return _quant.experts(x, w13_or_w1, w2, topk_weights, topk_ids, activation=activation, capacity=capacity)
    shape = x.shape
    x = _flat(x)
    k = topk_ids.shape[-1]
    topk_weights = topk_weights.reshape(x.shape[0], k).float()
    topk_ids = topk_ids.reshape(x.shape[0], k)
    activation = _ops._spec(activation)
    needs_grad = _needs_grad(x, w13_or_w1, w2, topk_weights, b13_or_b1, b2)
    if weight_cache and not torch.compiler.is_compiling():
        if needs_grad:
            _weight_cache.release(w13_or_w1, w2)
            _weight_cache.bypass()
        else:
            y = _weight_cache.experts(x, w13_or_w1, w2, topk_weights, topk_ids, activation, capacity, b13_or_b1, b2)
            if y is not None:
                return y.reshape(shape)
    if not needs_grad:
        return torch.ops.moe_ext.experts(x, w13_or_w1, w2, topk_weights, topk_ids, activation, capacity,
                                         b13_or_b1, b2).reshape(shape)
    x_perm, offsets, perm_rows = permute(x, topk_ids, w2.shape[0], capacity=capacity)
    h = grouped_gemm(x_perm, w13_or_w1, offsets, bias=b13_or_b1)
    y_perm = grouped_gemm(torch.ops.moe_ext.activation(h, activation), w2, offsets, bias=b2)
    return unpermute(y_perm, perm_rows, topk_weights).reshape(shape)


def moe(x, w_router, w13_or_w1, w2, top_k, *, activation="swiglu", scoring="softmax", renormalize=True,
        scale=1.0, bias=None, correction_bias=None, n_group=None, topk_group=None, capacity=None, b13_or_b1=None,
        b2=None) -> Tensor:
    """The fused MoE layer: route, then experts. x [..., d] -> y [..., d]. `bias` is the router's bias,
    b13_or_b1 / b2 the experts' (see experts)."""
    shape = x.shape
    x = _flat(x)
    if _quant.is_quantized(w13_or_w1) or _quant.is_quantized(w2):  # route, then the quantised experts
        _no_quantized_biases(b13_or_b1, b2)
        weights, ids, _ = route(x, w_router, top_k, scoring=scoring, renormalize=renormalize, scale=scale,
                                bias=bias, correction_bias=correction_bias, n_group=n_group, topk_group=topk_group)
        return _quant.experts(x, w13_or_w1, w2, weights, ids, activation=activation,
                              capacity=capacity).reshape(shape)
    activation = _ops._spec(activation)
    if not _needs_grad(x, w_router, w13_or_w1, w2, bias, b13_or_b1, b2):
        return torch.ops.moe_ext.moe(x, w_router, w13_or_w1, w2, int(top_k), activation, scoring,
                                     bool(renormalize), float(scale), bias, correction_bias, n_group, topk_group,
                                     capacity, b13_or_b1, b2).reshape(shape)
    weights, ids, _ = route(x, w_router, top_k, scoring=scoring, renormalize=renormalize, scale=scale, bias=bias,
                            correction_bias=correction_bias, n_group=n_group, topk_group=topk_group)
    return experts(x, w13_or_w1, w2, weights, ids, activation=activation, capacity=capacity, b13_or_b1=b13_or_b1,
                   b2=b2).reshape(shape)


def load_balancing_loss(probs, topk_ids, num_experts) -> Tensor:
    """E * sum_e f_e * P_e (Switch/GShard), differentiable through probs (f_e counts are constants)."""
    T = probs.shape[0]
    if T == 0:
        return probs.new_zeros(())
    ids = topk_ids.reshape(-1).long()
    counts = torch.zeros(num_experts, dtype=probs.dtype, device=probs.device).scatter_add_(
        0, ids, torch.ones(ids.shape, dtype=probs.dtype, device=probs.device))  # no data-dependent shape
    f = counts / topk_ids.numel()
    P = probs.mean(0)
    return num_experts * (f * P).sum()


def router_z_loss(logits) -> Tensor:
    """mean over tokens of logsumexp(logits[t])^2, differentiable."""
    if logits.shape[0] == 0:
        return logits.new_zeros(())
    return torch.logsumexp(logits.float(), dim=-1).square().mean()
