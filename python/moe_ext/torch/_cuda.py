"""CUDA kernels of torch.ops.moe_ext.*: each op's CPU contract (arguments, outputs, dtypes, shapes) served by
moe_ext.cuda (launchers of the `moe_ext._cuda` extension on the current stream). Imported by _ops.py.

In a build without CUDA (`moe_ext._cuda` missing) nothing is registered and REGISTERED is False; hf.py
reads it to decide whether CUDA tensors can run on moe_ext. Registering touches no device, so importing
works without a GPU (a call on CUDA tensors then needs one, as any CUDA tensor does).

Adaptations, all so that a CUDA call returns what the CPU kernel returns on the same inputs:
* the CPU kernels compute in float32 whatever the dtype; moe_ext.cuda wants one dtype per call, so mixed
  float dtypes are computed in float32 here and the result takes the dtype the CPU kernel gives it;
* top-k weights and router biases of any float dtype become float32; index tensors become int32;
* permute with capacity: moe_ext.cuda returns min(T*k, E*C) rows with zero padding (the kept count lives
  on the device); the op's contract is the kept rows only (M = T*k - dropped), so the kept count is read
  back (one host synchronisation, capacity only) and the padding cut off;
* backward ops return [0, ...] tensors for gradients not asked for (moe_ext.cuda returns None);
* activations are descriptions (the ops' canonical strings), which moe_ext.cuda takes as they are; expert
  biases of any float dtype become float32 (the CPU kernels add them in float32 too); defaults as the
  ops' schemas (torch leaves trailing defaults out);
* value checks of moe_ext.cuda stay on (check_ids, check_offsets): a bad id or offset is a ValueError,
  as on CPU, never an out-of-bounds access on the device (the price: a small read-back per call).
  Under CUDA graph capture (serving engines capture decode) the read-back is impossible: the checks
  then run on the device and moe_ext.cuda.raise_capture_errors() reports them after the replay (see
  moe_ext/cuda.py); the kernels drop bad ids and clamp bad offsets, so nothing reads out of bounds.
  Every op here can be captured except permute with capacity, whose row count depends on the data.
"""
import torch

from moe_ext import cuda as _k
from . import _ops

REGISTERED = False


def _c(t):
    return None if t is None else t.contiguous()


def _f32(t):
    return None if t is None else t.float().contiguous()


def _i32(t):
    return _ops._i32(t).contiguous()


def _common(*ts):
    """The tensors, contiguous, in one float dtype: their own when they agree, else float32 (as on CPU).
    Non-float dtypes are left alone for moe_ext.cuda's TypeError (the CPU op rejects them too)."""
    same = all(t.dtype == ts[0].dtype for t in ts) or any(t.dtype not in _ops.FLOAT_DTYPES for t in ts)
    return [t.contiguous() if same else t.float().contiguous() for t in ts]


def route(x, w_router, top_k, scoring="softmax", renormalize=True, scale=1.0, bias=None, correction_bias=None,
          n_group=None, topk_group=None):
    x, w_router = _common(x, w_router)
    return _k.route(x, w_router, top_k, scoring=scoring, renormalize=renormalize, scale=scale, bias=_f32(bias),
                    correction_bias=_f32(correction_bias), n_group=n_group, topk_group=topk_group,
                    return_probs=True)


def permute(x, topk_ids, num_experts, capacity=None):
    if capacity is not None and _k._capturing():
        raise RuntimeError("moe_ext::permute with capacity returns only the kept rows, a number known after the "
                           "kernels ran: it cannot be captured in a CUDA graph (experts and moe with capacity can)")
    x_perm, offsets, perm_rows = _k.permute(_c(x), _c(topk_ids), num_experts, capacity=capacity)
    if capacity is not None:  # the op returns the kept rows only (see the module docstring)
        kept = int(offsets[-1])
        if kept < x_perm.shape[0]:
            x_perm = x_perm[:kept].clone()  # own storage: no output is a view of a larger buffer
    return x_perm, offsets, perm_rows


def grouped_gemm(a, w, expert_offsets, bias=None):
    a2, w2 = _common(a, w)
    return _k.grouped_gemm(a2, w2, _i32(expert_offsets), bias=_f32(bias)).to(a.dtype)


def activation(h, activation="swiglu"):
    return _k.activate(_c(h), activation)


def unpermute(y_perm, perm_rows, topk_weights):
    return _k.unpermute(_c(y_perm), _i32(perm_rows), _f32(topk_weights))


def experts(x, w13_or_w1, w2, topk_weights, topk_ids, activation="swiglu", capacity=None, b13_or_b1=None, b2=None):
    x2, w13, w2 = _common(x, w13_or_w1, w2)
    return _k.experts(x2, w13, w2, _f32(topk_weights), _c(topk_ids), activation=activation, capacity=capacity,
                      b13_or_b1=_f32(b13_or_b1), b2=_f32(b2)).to(x.dtype)


def moe(x, w_router, w13_or_w1, w2, top_k, activation="swiglu", scoring="softmax", renormalize=True, scale=1.0,
        bias=None, correction_bias=None, n_group=None, topk_group=None, capacity=None, b13_or_b1=None, b2=None):
    x2, w_router, w13, w2 = _common(x, w_router, w13_or_w1, w2)
    return _k.moe(x2, w_router, w13, w2, top_k, activation=activation, scoring=scoring, renormalize=renormalize,
                  scale=scale, bias=_f32(bias), correction_bias=_f32(correction_bias), n_group=n_group,
                  topk_group=topk_group, capacity=capacity, b13_or_b1=_f32(b13_or_b1), b2=_f32(b2)).to(x.dtype)


def activation_backward(grad_act, h, activation="swiglu"):
    h2, g = _common(h, grad_act)
    return _k.activation_backward(h2, g, activation).to(h.dtype)  # note: moe_ext.cuda takes (h, d_act)


def grouped_gemm_backward(grad_out, a, w, expert_offsets, need_a=True, need_w=True):
    g, a2, w2 = _common(grad_out, a, w)
    d_a, d_w = _k.grouped_gemm_backward(g, a2, w2, _i32(expert_offsets), need_a=need_a, need_w=need_w)
    (M, K), (E, N, _) = a.shape, w.shape
    return (d_a.to(a.dtype) if need_a else a.new_empty((0, K)),
            d_w.to(w.dtype) if need_w else w.new_empty((0, N, K)))


def unpermute_backward(grad_y, y_perm, perm_rows, topk_weights):
    g, y2 = _common(grad_y, y_perm)
    d_perm, d_w = _k.unpermute_backward(g, y2, _i32(perm_rows), _f32(topk_weights))
    return d_perm.to(y_perm.dtype), d_w


def permute_backward(grad_x_perm, perm_rows):
    return _k.permute_backward(_c(grad_x_perm), _i32(perm_rows))


def bias_grad(grad_out, expert_offsets):
    return _k.bias_grad(_c(grad_out), _i32(expert_offsets))


KERNELS = {name: globals()[name] for name in (
    "route", "permute", "grouped_gemm", "activation", "unpermute", "experts", "moe", "activation_backward",
    "grouped_gemm_backward", "unpermute_backward", "permute_backward", "bias_grad")}

if _k._cuda is not None:  # a build with the CUDA kernels (moe_ext._cuda imported); no device needed here
    for _name, _fn in KERNELS.items():
        getattr(_ops, _name).register_kernel("cuda", _fn)
    REGISTERED = True
