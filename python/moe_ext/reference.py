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
  ``gelu_tanh`` is ``0.5 * z * (1 + tanh(y))``, y = sqrt(2/pi) (z + 0.044715 z^3) (PyTorch's
  ``approximate="tanh"``), evaluated as the equal ``z / (1 + exp(-2y))`` for the same reason.
* Activations are descriptions (``moe_ext.Activation``, a preset name or its canonical string): fn,
  gated ([gate | up] or interleaved g0 u0 g1 u1 ...), alpha, limit (gate = min(g, L), up = clip(u, -L, L),
  NaN propagating), up_offset. Expert biases (``b13_or_b1`` before the activation, ``b2`` before the
  combine, ``bias`` of grouped_gemm) are added to the GEMM products. Weights may be any NumPy view
  (transposed ones included): the reference only indexes them.
* Arguments are not validated beyond what NumPy itself checks.
* ``T = 0`` works everywhere and returns empty arrays of the documented shapes.

Only NumPy and the Python standard library are used.
"""
import math

import numpy as np

from ._activation import Activation, activation_from
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
    "relu2",
    "gelu_tanh",
    "activate",
    "Activation",
    "activation_from",
    "bias_grad",
    "GATED_ACTIVATIONS",
    "ACTIVATIONS",
    "activation",
    "activation_backward",
    "grouped_gemm_backward",
    "unpermute_backward",
    "permute_backward",
]

GATED_ACTIVATIONS = ("swiglu", "geglu", "geglu_tanh")
ACTIVATIONS = ("swiglu", "geglu", "geglu_tanh", "relu", "gelu", "gelu_tanh", "relu2")


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


def silu(z, alpha=1.0):
    """silu(z) = z / (1 + exp(-alpha z)), literally (so silu(-inf) is NaN, silu(-1000) is -0.0)."""
    z = np.asarray(z)
    one = z.dtype.type(1)
    with np.errstate(over="ignore", invalid="ignore"):
        if alpha == 1.0:
            return z / (one + np.exp(-z))
        return z / (one + np.exp(-(z.dtype.type(alpha) * z)))


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _gelu_tanh_minus_2y(z):
    dt = z.dtype
    return dt.type(-2.0 * _SQRT_2_OVER_PI) * (z + dt.type(0.044715) * z * z * z)


def gelu_tanh(z):
    """GELU, tanh approximation: 0.5 z (1 + tanh(y)), y = sqrt(2/pi) (z + 0.044715 z^3), as the equal
    z / (1 + exp(-2y)) (no cancellation of 1 + tanh(y) for negative z)."""
    z = np.asarray(z)
    with np.errstate(over="ignore", invalid="ignore"):
        return z / (z.dtype.type(1) + np.exp(_gelu_tanh_minus_2y(z)))


def relu2(z):
    """relu(z)**2; NaN stays NaN."""
    r = relu(z)
    return r * r


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


def softcap(z, c):
    """c tanh(z / c) (np.tanh in z's dtype)."""
    z = np.asarray(z)
    c = z.dtype.type(c)
    return c * np.tanh(z / c)


def _fn(a):
    """The elementwise function of an Activation (with a gate_softcap: softcap(z) * sigmoid(alpha z))."""
    if a.gate_softcap is not None:
        return lambda z: softcap(z, a.gate_softcap) * sigmoid(z.dtype.type(a.alpha) * z)
    if a.fn == "silu":
        return lambda z: silu(z, a.alpha)
    return {"gelu": gelu, "gelu_tanh": gelu_tanh, "relu": relu, "relu2": relu2}[a.fn]


def _gate_up(h, a):
    """(gate, up) column views of a gated h [M, 2f]: [gate | up] or interleaved pairs."""
    if a.interleaved:
        return h[:, 0::2], h[:, 1::2]
    f = h.shape[1] // 2
    return h[:, :f], h[:, f:]


def _clamped(gate, up, a):
    """The gate and up the function sees: min(g, L), softcap(clip(u, -L, L)) + up_offset (NaN
    propagating; the softcap only with an up_softcap)."""
    if a.limit is not None:
        limit = gate.dtype.type(a.limit)
        gate, up = np.minimum(gate, limit), np.clip(up, -limit, limit)
    if a.up_softcap is not None:
        up = softcap(up, a.up_softcap)
    if a.up_offset != 0.0:
        up = up + up.dtype.type(a.up_offset)
    return gate, up


def activate(h, activation):
    """Apply an expert activation (a moe_ext.Activation, preset name or canonical string) to the first
    GEMM's output h [M, n].

    Gated: n = 2f, result act(min(gate, L)) * (clip(up, -L, L) + up_offset) [M, f], gate/up from
    [gate | up] or interleaved columns; softcaps (after the clamps, before up_offset) as
    moe_ext.Activation says. Non-gated: elementwise, result [M, n].
    """
    a = activation_from(activation)
    h = np.asarray(h)
    if not a.gated:
        return _fn(a)(h)
    gate, up = _clamped(*_gate_up(h, a), a)
    return _fn(a)(gate) * up


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
def grouped_gemm(a, w, expert_offsets, *, bias=None):
    """out[o[e]:o[e+1]] = a[o[e]:o[e+1]] @ w[e].T (+ bias[e]) for every expert e."""
    dt = _float_dtype(a, w)
    a = np.asarray(a, dtype=dt)
    w = np.asarray(w, dtype=dt)
    o = np.asarray(expert_offsets)
    out = np.zeros((a.shape[0], w.shape[1]), dtype=dt)
    for e in range(w.shape[0]):
        lo, hi = int(o[e]), int(o[e + 1])
        if hi > lo:
            out[lo:hi] = a[lo:hi] @ w[e].T
            if bias is not None:
                out[lo:hi] += np.asarray(bias[e], dtype=dt)
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
def experts(x, w13_or_w1, w2, topk_weights, topk_ids, *, activation="swiglu", capacity=None, b13_or_b1=None,
            b2=None):
    """Expert FFNs over precomputed routing: permute -> grouped_gemm(w13_or_w1) + b13_or_b1 -> activation
    -> grouped_gemm(w2) + b2 -> unpermute. w13 [E,2f,d] (gate = rows 0..f-1, or the even rows when
    interleaved) for gated activations, w1 [E,f,d] otherwise; w2 [E,d,f]; b13_or_b1 [E, 2f or f] in
    w13_or_w1's row order, b2 [E, d]."""
    activation = activation_from(activation)
    dt = _float_dtype(x, w13_or_w1, w2, topk_weights)
    x = np.asarray(x, dtype=dt)
    w13_or_w1 = np.asarray(w13_or_w1, dtype=dt)
    w2 = np.asarray(w2, dtype=dt)
    E = w13_or_w1.shape[0]

    x_perm, expert_offsets, perm_rows = permute(x, topk_ids, E, capacity=capacity)
    h = grouped_gemm(x_perm, w13_or_w1, expert_offsets, bias=b13_or_b1)
    a = activate(h, activation)
    y_perm = grouped_gemm(a, w2, expert_offsets, bias=b2)
    return unpermute(y_perm, perm_rows, np.asarray(topk_weights, dtype=dt))


def moe(x, w_router, w13_or_w1, w2, top_k, *, activation="swiglu", scoring="softmax",
        renormalize=True, scale=1.0, bias=None, correction_bias=None, n_group=None, topk_group=None,
        capacity=None, b13_or_b1=None, b2=None):
    """The whole MoE layer: route (same keywords) then experts."""
    topk_weights, topk_ids = route(
        x, w_router, top_k, scoring=scoring, renormalize=renormalize, scale=scale, bias=bias,
        correction_bias=correction_bias, n_group=n_group, topk_group=topk_group)
    return experts(x, w13_or_w1, w2, topk_weights, topk_ids, activation=activation,
                   capacity=capacity, b13_or_b1=b13_or_b1, b2=b2)


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


def _value_and_grad(a, z):
    """(act(z), act'(z)) of an Activation's function."""
    dt = z.dtype
    if a.gate_softcap is not None:  # c t s, t = tanh(z / c), s = sigmoid(alpha z)
        c, alpha = dt.type(a.gate_softcap), dt.type(a.alpha)
        t, s = np.tanh(z / c), sigmoid(alpha * z)
        return c * t * s, (1 - t * t) * s + c * t * alpha * s * (1 - s)
    if a.fn == "silu":
        s = sigmoid(dt.type(a.alpha) * z)
        return silu(z, a.alpha), s * (1 + dt.type(a.alpha) * z * (1 - s))
    if a.fn == "gelu":
        return gelu(z), _gelu_grad(z)
    if a.fn == "gelu_tanh":
        with np.errstate(over="ignore", invalid="ignore"):
            s = dt.type(1) / (dt.type(1) + np.exp(_gelu_tanh_minus_2y(z)))
            dy = dt.type(_SQRT_2_OVER_PI) * (1 + dt.type(3 * 0.044715) * z * z)
            return z * s, s + 2 * z * s * (1 - s) * dy
    if a.fn == "relu":
        return relu(z), (z > 0).astype(dt)
    return relu2(z), 2 * relu(z)


def activation_backward(grad_act, h, activation="swiglu"):
    """dL/dh given grad_act = dL/d activate(h, activation). Where a limit's clamp bites (gate > L,
    |up| > L) the clamped input gets no gradient."""
    a = activation_from(activation)
    dt = _float_dtype(grad_act, h)
    h = np.asarray(h, dtype=dt)
    g = np.asarray(grad_act, dtype=dt)
    if not a.gated:
        return g * _value_and_grad(a, h)[1]
    gate_raw, up_raw = _gate_up(h, a)
    gate, up = _clamped(gate_raw, up_raw, a)
    act, act_grad = _value_and_grad(a, gate)
    d_gate, d_up = g * up * act_grad, g * act
    if a.up_softcap is not None:  # d softcap(u') / du' = 1 - tanh(u' / c)^2
        up_clamped = up_raw if a.limit is None else np.clip(up_raw, dt.type(-a.limit), dt.type(a.limit))
        d_up = d_up * (1 - np.tanh(up_clamped / dt.type(a.up_softcap)) ** 2)
    if a.limit is not None:
        limit = dt.type(a.limit)
        d_gate = np.where(gate_raw > limit, dt.type(0), d_gate)
        d_up = np.where((up_raw > limit) | (up_raw < -limit), dt.type(0), d_up)
    grad_h = np.empty_like(h)
    grad_gate, grad_up = _gate_up(grad_h, a)
    grad_gate[...], grad_up[...] = d_gate, d_up
    return grad_h


def bias_grad(grad_out, expert_offsets):
    """grad_bias [E, N] of grouped_gemm's bias: the sums of grad_out's rows per expert."""
    g = np.asarray(grad_out, dtype=_float_dtype(grad_out))
    o = np.asarray(expert_offsets)
    return np.stack([g[int(o[e]):int(o[e + 1])].sum(axis=0) for e in range(len(o) - 1)]) if len(o) > 1 \
        else np.zeros((0, g.shape[1]), dtype=g.dtype)


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
