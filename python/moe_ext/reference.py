"""Pure-NumPy reference implementation of every moe_ext op: the ground truth for parity tests.

Each function computes exactly what ``docs/api.md`` states, written for clarity rather than speed.

* Computation happens in the floating dtype of the inputs (``numpy.result_type`` of the floating
  arguments; non-floating inputs compute in float64): pass float64 to get the float64 ground truth,
  float32 to mimic float32 math. 16-bit inputs (float16, ``ml_dtypes.bfloat16``) are upcast and
  computed in float64: a ground truth from the same rounded values, not an emulation of 16-bit math. Unlike the C++ API, which always returns float32 scores and weights,
  ``topk_weights`` and ``probs`` come back in that compute dtype.
* Index outputs (``topk_ids``, ``expert_offsets``, ``perm_rows``) are ``np.int32``.
* GELU is the exact erf form ``0.5 * z * (1 + erf(z / sqrt(2)))`` (PyTorch's
  ``F.gelu(approximate="none")``), used by both ``gelu`` and ``geglu``, evaluated as the equal
  ``0.5 * z * erfc(-z / sqrt(2))`` with ``math.erfc`` in float64 (then rounded to the compute dtype):
  ``1 + erf`` cancels to 0 for z below about -6 even in float64, where erfc keeps full relative accuracy.
* Arguments are not validated beyond what NumPy itself checks.
* ``T = 0`` works everywhere and returns empty arrays of the documented shapes.

Only NumPy and the Python standard library are used.
"""
import math

import numpy as np

from ._types import PermuteResult

__all__ = [
    "route",
    "permute",
    "grouped_gemm",
    "unpermute",
    "experts",
    "moe",
    "load_balancing_loss",
    "router_z_loss",
    "softmax",
    "sigmoid",
    "silu",
    "gelu",
    "relu",
    "activate",
    "GATED_ACTIVATIONS",
    "ACTIVATIONS",
    "activation",
    "activation_backward",
    "grouped_gemm_backward",
    "unpermute_backward",
    "permute_backward",
]

GATED_ACTIVATIONS = ("swiglu", "geglu")
ACTIVATIONS = ("swiglu", "geglu", "relu", "gelu")


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _float_dtype(*arrays):
    """The compute dtype: result_type of the given (non-None) arrays, float64 if that is not floating."""
    dtypes = [np.asarray(a).dtype for a in arrays if a is not None]
    if any(d.itemsize == 2 and d.kind in "fV" for d in dtypes):  # float16, bfloat16: float64 ground truth
        return np.dtype(np.float64)
    try:
        dt = np.result_type(*dtypes)
    except TypeError:  # e.g. ml_dtypes types NumPy cannot promote together
        return np.dtype(np.float64)
    if not np.issubdtype(dt, np.floating):
        dt = np.dtype(np.float64)
    return dt


def softmax(z):
    """Softmax over the last axis, subtracting the row max. NaN anywhere in a row gives a NaN row; a row
    of all -inf (or containing +inf) gives NaN too (inf - inf)."""
    z = np.asarray(z)
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.exp(z - np.max(z, axis=-1, keepdims=True))
        return e / np.sum(e, axis=-1, keepdims=True)


def sigmoid(z):
    """1 / (1 + exp(-z)); sigmoid(+inf) = 1, sigmoid(-inf) = 0, NaN stays NaN."""
    z = np.asarray(z)
    one = z.dtype.type(1)
    with np.errstate(over="ignore"):
        return one / (one + np.exp(-z))


def silu(z):
    """silu(z) = z / (1 + exp(-z)), literally (so silu(-inf) is NaN, silu(-1000) is -0.0)."""
    z = np.asarray(z)
    one = z.dtype.type(1)
    with np.errstate(over="ignore", invalid="ignore"):
        return z / (one + np.exp(-z))


_erfc = np.vectorize(math.erfc, otypes=[np.float64])


def gelu(z):
    """Exact GELU: 0.5 * z * (1 + erf(z / sqrt(2))) = 0.5 * z * erfc(-z / sqrt(2)), erfc from math.erfc
    (float64, then the dtype of z)."""
    z = np.asarray(z)
    dt = z.dtype
    erfc = _erfc((-z / dt.type(math.sqrt(2.0))).astype(np.float64)).astype(dt)
    with np.errstate(invalid="ignore", over="ignore"):
        return dt.type(0.5) * z * erfc


def relu(z):
    """max(z, 0); NaN stays NaN."""
    z = np.asarray(z)
    return np.maximum(z, z.dtype.type(0))


def activate(h, activation):
    """Apply an expert activation to the first GEMM's output h [M, n].

    Gated ("swiglu", "geglu"): n = 2f, gate = h[:, :f], up = h[:, f:], result act(gate) * up [M, f].
    Non-gated ("relu", "gelu"): elementwise, result [M, n].
    """
    h = np.asarray(h)
    if activation in GATED_ACTIVATIONS:
        f = h.shape[1] // 2
        gate, up = h[:, :f], h[:, f:]
        act = silu if activation == "swiglu" else gelu
        return act(gate) * up
    if activation == "relu":
        return relu(h)
    if activation == "gelu":
        return gelu(h)
    raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")


def _stable_descending(keys):
    """Indices of keys in descending order, equal keys keeping their original (ascending) order.
    keys must contain no NaN."""
    return np.argsort(-keys, kind="stable")


def _select_experts(keys, top_k, n_group, topk_group):
    """Top-k expert ids of one token from its selection keys [E] (route steps 3-5)."""
    E = keys.shape[0]
    keys = np.where(np.isnan(keys), -np.inf, keys)  # NaN ranks as -inf

    # Allowed experts: all of them, or only those of the topk_group best groups.
    if n_group is not None and topk_group is not None:
        group_size = E // n_group
        group_scores = np.empty(n_group, dtype=keys.dtype)
        for g in range(n_group):
            group_keys = np.sort(keys[g * group_size:(g + 1) * group_size])[::-1]
            with np.errstate(invalid="ignore"):
                group_scores[g] = group_keys[0] if group_size == 1 else group_keys[0] + group_keys[1]
        # A NaN group score (+inf + -inf) ranks as -inf too.
        group_scores = np.where(np.isnan(group_scores), -np.inf, group_scores)
        kept_groups = _stable_descending(group_scores)[:topk_group]
        allowed = np.sort(np.concatenate(
            [np.arange(g * group_size, (g + 1) * group_size) for g in kept_groups]))
    else:
        allowed = np.arange(E)

    # Only allowed experts are candidates (an allowed -inf key still beats any excluded expert).
    order = _stable_descending(keys[allowed])
    return allowed[order[:top_k]]


# --------------------------------------------------------------------------------------------------
# 1. route
# --------------------------------------------------------------------------------------------------
def route(x, w_router, top_k, *, scoring="softmax", renormalize=True, scale=1.0, bias=None,
          correction_bias=None, n_group=None, topk_group=None, return_probs=False):
    """Router: (topk_weights [T,k], topk_ids [T,k] int32[, probs [T,E]]). See docs/api.md section 1."""
    dt = _float_dtype(x, w_router, bias, correction_bias)
    x = np.asarray(x, dtype=dt)
    w_router = np.asarray(w_router, dtype=dt)
    T, E = x.shape[0], w_router.shape[0]

    # 1. logits (NaN/Inf inputs are documented behaviour: no warnings)
    with np.errstate(invalid="ignore", over="ignore"):
        logits = x @ w_router.T
        if bias is not None:
            logits = logits + np.asarray(bias, dtype=dt)

    # 2. scores
    if scoring == "softmax":
        scores = softmax(logits)
    elif scoring == "sigmoid":
        scores = sigmoid(logits)
    else:
        raise ValueError(f"scoring: expected 'softmax' or 'sigmoid', got {scoring!r}")

    # 3. selection keys
    with np.errstate(invalid="ignore"):
        keys = scores if correction_bias is None else scores + np.asarray(correction_bias, dtype=dt)

    topk_ids = np.zeros((T, top_k), dtype=np.int32)
    topk_weights = np.zeros((T, top_k), dtype=dt)
    scale = dt.type(scale)
    for t in range(T):
        # 4-5. selection
        ids = _select_experts(keys[t], top_k, n_group, topk_group)
        # 6. weights: the scores of the chosen experts (no correction bias)
        w = scores[t, ids]
        if renormalize:
            total = dt.type(0)
            for j in range(top_k):  # slot order
                total = total + w[j]
            if total != 0:  # a sum of exactly 0 leaves the weights at 0 (NaN sums do divide)
                with np.errstate(invalid="ignore"):
                    w = w / total
        topk_ids[t] = ids
        with np.errstate(invalid="ignore", over="ignore"):
            topk_weights[t] = w * scale

    if return_probs:
        return topk_weights, topk_ids, scores
    return topk_weights, topk_ids


# --------------------------------------------------------------------------------------------------
# 2. permute
# --------------------------------------------------------------------------------------------------
def permute(x, topk_ids, num_experts, *, capacity=None):
    """Group the token copies by expert: PermuteResult(x_perm [M,d], expert_offsets [E+1] int32,
    perm_rows [T,k] int32). Order: expert, then token, then slot; with capacity=C an expert keeps its
    first C copies in that order and dropped copies get perm_rows = -1."""
    x = np.asarray(x)
    topk_ids = np.asarray(topk_ids)
    T, k = topk_ids.shape
    E = int(num_experts)

    # Copies (t, j) of each expert, visited in token-then-slot order.
    copies_of = [[] for _ in range(E)]
    for t in range(T):
        for j in range(k):
            copies_of[int(topk_ids[t, j])].append((t, j))

    perm_rows = np.full((T, k), -1, dtype=np.int32)
    expert_offsets = np.zeros(E + 1, dtype=np.int32)
    source_token = []  # source_token[row] = t such that x_perm[row] = x[t]
    for e in range(E):
        kept = copies_of[e] if capacity is None else copies_of[e][:int(capacity)]
        for t, j in kept:
            perm_rows[t, j] = len(source_token)
            source_token.append(t)
        expert_offsets[e + 1] = len(source_token)

    x_perm = x[np.asarray(source_token, dtype=np.intp)]  # [M, d], also when M = 0
    return PermuteResult(x_perm, expert_offsets, perm_rows)


# --------------------------------------------------------------------------------------------------
# 3. grouped_gemm
# --------------------------------------------------------------------------------------------------
def grouped_gemm(a, w, expert_offsets):
    """out[o[e]:o[e+1]] = a[o[e]:o[e+1]] @ w[e].T for every expert e."""
    dt = _float_dtype(a, w)
    a = np.asarray(a, dtype=dt)
    w = np.asarray(w, dtype=dt)
    o = np.asarray(expert_offsets)
    out = np.zeros((a.shape[0], w.shape[1]), dtype=dt)
    for e in range(w.shape[0]):
        lo, hi = int(o[e]), int(o[e + 1])
        if hi > lo:
            out[lo:hi] = a[lo:hi] @ w[e].T
    return out


# --------------------------------------------------------------------------------------------------
# 4. unpermute
# --------------------------------------------------------------------------------------------------
def unpermute(y_perm, perm_rows, topk_weights):
    """y[t] = sum over j = 0..k-1 (in slot order) of topk_weights[t, j] * y_perm[perm_rows[t, j]];
    slots with perm_rows == -1 contribute nothing."""
    dt = _float_dtype(y_perm, topk_weights)
    y_perm = np.asarray(y_perm, dtype=dt)
    topk_weights = np.asarray(topk_weights, dtype=dt)
    perm_rows = np.asarray(perm_rows)
    T, k = perm_rows.shape
    y = np.zeros((T, y_perm.shape[1]), dtype=dt)
    for j in range(k):  # slot order, all tokens at once
        rows = perm_rows[:, j]
        valid = rows >= 0
        y[valid] = y[valid] + topk_weights[valid, j, None] * y_perm[rows[valid]]
    return y


# --------------------------------------------------------------------------------------------------
# 5. experts and moe
# --------------------------------------------------------------------------------------------------
def experts(x, w13_or_w1, w2, topk_weights, topk_ids, *, activation="swiglu", capacity=None):
    """Expert FFNs over precomputed routing: permute -> grouped_gemm(w13_or_w1) -> activation ->
    grouped_gemm(w2) -> unpermute. w13 [E,2f,d] (gate = rows 0..f-1) for swiglu/geglu, w1 [E,f,d] for
    relu/gelu; w2 [E,d,f]."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    dt = _float_dtype(x, w13_or_w1, w2, topk_weights)
    x = np.asarray(x, dtype=dt)
    w13_or_w1 = np.asarray(w13_or_w1, dtype=dt)
    w2 = np.asarray(w2, dtype=dt)
    E = w13_or_w1.shape[0]

    x_perm, expert_offsets, perm_rows = permute(x, topk_ids, E, capacity=capacity)
    h = grouped_gemm(x_perm, w13_or_w1, expert_offsets)
    a = activate(h, activation)
    y_perm = grouped_gemm(a, w2, expert_offsets)
    return unpermute(y_perm, perm_rows, np.asarray(topk_weights, dtype=dt))


def moe(x, w_router, w13_or_w1, w2, top_k, *, activation="swiglu", scoring="softmax",
        renormalize=True, scale=1.0, bias=None, correction_bias=None, n_group=None, topk_group=None,
        capacity=None):
    """The whole MoE layer: route (same keywords) then experts."""
    topk_weights, topk_ids = route(
        x, w_router, top_k, scoring=scoring, renormalize=renormalize, scale=scale, bias=bias,
        correction_bias=correction_bias, n_group=n_group, topk_group=topk_group)
    return experts(x, w13_or_w1, w2, topk_weights, topk_ids, activation=activation,
                   capacity=capacity)


# --------------------------------------------------------------------------------------------------
# 6. losses
# --------------------------------------------------------------------------------------------------
def load_balancing_loss(probs, topk_ids, num_experts):
    """E * sum_e f_e * P_e with f_e = copies routed to e / (T*k) and P_e = mean over tokens of
    probs[:, e] (Switch/GShard). 0.0 when T = 0."""
    dt = _float_dtype(probs)
    probs = np.asarray(probs, dtype=dt)
    topk_ids = np.asarray(topk_ids)
    E = int(num_experts)
    if probs.shape[0] == 0 or topk_ids.size == 0:
        return 0.0
    counts = np.bincount(topk_ids.reshape(-1).astype(np.intp), minlength=E)[:E]
    f = counts.astype(dt) / dt.type(topk_ids.size)
    P = np.mean(probs, axis=0)
    return float(dt.type(E) * np.sum(f * P))


def router_z_loss(logits):
    """mean over tokens of logsumexp(logits[t]) ** 2. 0.0 when T = 0."""
    dt = _float_dtype(logits)
    logits = np.asarray(logits, dtype=dt)
    if logits.shape[0] == 0:
        return 0.0
    m = np.max(logits, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, dt.type(0))  # all -inf row -> -inf, +inf -> +inf, NaN -> NaN
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        lse = m[:, 0] + np.log(np.sum(np.exp(logits - m), axis=-1))
        return float(np.mean(lse * lse))


# --------------------------------------------------------------------------------------------------
# 7. backward (the gradients autograd of moe_ext.torch computes; docs/api.md "Backward")
# --------------------------------------------------------------------------------------------------
def activation(h, activation="swiglu"):
    """The same as activate(h, activation) (the name of the public op)."""
    return activate(h, activation)


def _gelu_grad(z):
    """d gelu / dz = Phi(z) + z phi(z) = 0.5 erfc(-z / sqrt2) + z exp(-z^2 / 2) / sqrt(2 pi)."""
    dt = z.dtype
    erfc = _erfc((-z / dt.type(math.sqrt(2.0))).astype(np.float64)).astype(dt)
    with np.errstate(over="ignore", invalid="ignore"):
        return dt.type(0.5) * erfc + z * np.exp(-z * z / dt.type(2)) / dt.type(math.sqrt(2 * math.pi))


def activation_backward(grad_act, h, activation="swiglu"):
    """dL/dh given grad_act = dL/d activate(h, activation)."""
    dt = _float_dtype(grad_act, h)
    h = np.asarray(h, dtype=dt)
    g = np.asarray(grad_act, dtype=dt)
    if activation in GATED_ACTIVATIONS:
        f = h.shape[1] // 2
        gate, up = h[:, :f], h[:, f:]
        if activation == "swiglu":
            s = sigmoid(gate)
            act, act_grad = silu(gate), s * (1 + gate * (1 - s))
        else:
            act, act_grad = gelu(gate), _gelu_grad(gate)
        return np.concatenate([g * up * act_grad, g * act], axis=1)
    if activation == "relu":
        return g * (h > 0)
    if activation == "gelu":
        return g * _gelu_grad(h)
    raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")


def grouped_gemm_backward(grad_out, a, w, expert_offsets):
    """(grad_a, grad_w) of grouped_gemm: grad_a[rows] = grad_out[rows] @ w[e],
    grad_w[e] = grad_out[rows].T @ a[rows] (0 for experts without rows)."""
    dt = _float_dtype(grad_out, a, w)
    g, a, w = (np.asarray(v, dtype=dt) for v in (grad_out, a, w))
    o = np.asarray(expert_offsets)
    grad_a = np.zeros_like(a)
    grad_w = np.zeros_like(w)
    for e in range(w.shape[0]):
        lo, hi = int(o[e]), int(o[e + 1])
        grad_a[lo:hi] = g[lo:hi] @ w[e]
        grad_w[e] = g[lo:hi].T @ a[lo:hi]
    return grad_a, grad_w


def unpermute_backward(grad_y, y_perm, perm_rows, topk_weights):
    """(grad_y_perm, grad_topk_weights) of unpermute."""
    dt = _float_dtype(grad_y, y_perm, topk_weights)
    g, y_perm, w = (np.asarray(v, dtype=dt) for v in (grad_y, y_perm, topk_weights))
    rows = np.asarray(perm_rows)
    grad_y_perm = np.zeros_like(y_perm)
    grad_w = np.zeros(rows.shape, dtype=dt)
    for t, j in np.ndindex(*rows.shape):
        r = rows[t, j]
        if r >= 0:
            grad_y_perm[r] += w[t, j] * g[t]
            grad_w[t, j] = g[t] @ y_perm[r]
    return grad_y_perm, grad_w


def permute_backward(grad_x_perm, perm_rows):
    """grad_x of permute's x_perm: grad_x[t] = sum_j grad_x_perm[perm_rows[t, j]] (-1 skipped)."""
    g = np.asarray(grad_x_perm, dtype=_float_dtype(grad_x_perm))
    rows = np.asarray(perm_rows)
    return unpermute(g, rows, np.ones(rows.shape, dtype=g.dtype))


# --------------------------------------------------------------------------------------------------
# 9. Quantised expert weights (python/moe_ext/_reference_quant.py)
# --------------------------------------------------------------------------------------------------
from ._reference_quant import (QuantParts, dequantize, fake_quantize_activations, pack,  # noqa: E402
                               quantize, quantize_activations, quantized_experts)
