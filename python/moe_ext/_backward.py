"""The backward pass on NumPy arrays (what autograd of moe_ext.torch runs): check the arguments, then call
the C++ core (csrc/core/backward.h). Semantics: docs/api.md "Backward"; ground truth: the functions of
the same names in moe_ext.reference."""
import numpy as np

from . import _checks as check
from . import _core
from ._activation import activation_from


def _h(h, activation):
    activation = activation_from(activation)
    h = check.data_array(h, "h", 2)
    if activation.gated and h.shape[1] % 2:
        check.fail(ValueError, "h", f"an even number of columns (2f) for activation '{activation}'",
                   f"shape {h.shape}")
    return h, activation


def activation(h, activation="swiglu"):
    """The expert activation (a preset name, canonical string or moe_ext.Activation) on the first GEMM's
    output: act(gate) * (up + up_offset) for gated activations (h [M, 2f]; [gate | up] or interleaved
    pairs, clamped with a limit), act(h) otherwise. h float32, bfloat16 or float16; returns [M, f] in h's
    dtype (computed in float32, rounded once)."""
    h, activation = _h(h, activation)
    return _core.activation(h, activation)


def activation_backward(grad_act, h, activation="swiglu"):
    """grad_h (shape of h) of activation(h) given grad_act = dL/d activation(h) [M, f], in h's dtype (computed
    in float32, rounded once). grad_act and h of different dtypes are both taken as float32 (grad_h float32)."""
    h, activation = _h(h, activation)
    f = h.shape[1] // 2 if activation.gated else h.shape[1]
    grad_act = check.data_array(grad_act, "grad_act", 2)
    if grad_act.dtype != h.dtype:
        grad_act, h = grad_act.astype(np.float32), h.astype(np.float32)
    check.expect_shape(grad_act, "grad_act", (h.shape[0], f), " (M, f) with h (M, 2f) or (M, f)")
    return _core.activation_backward(grad_act, h, activation)


def grouped_gemm_backward(grad_out, a, w, expert_offsets, *, need_a=True, need_w=True, grad_a_dtype=None):
    """Of out = grouped_gemm(a, w, expert_offsets): (grad_a [M, K] float32, grad_w [E, N, K] in w's dtype),
    with grad_a[rows of e] = grad_out[rows of e] @ w[e] and grad_w[e] = grad_out[rows of e].T @ a[rows of e]
    (zeros for experts without rows), summed in float32 in an order fixed by the data (deterministic); a
    16-bit w's gradient is rounded once to w's dtype.
    grad_out, a and w may each be float32, bfloat16 or float16 (grad_out and a of different dtypes are
    both taken as float32); w is read in place, never copied or widened, and may be the transposed view
    w_t.transpose(0, 2, 1) of a C-contiguous w_t; grad_w has w's logical shape [E, N, K] (C-contiguous)
    either way. need_a / need_w = False skip one of them (None returned in its place). grad_a_dtype: None or
    float32 (the default), or a's dtype: grad_a rounded once to it (what a 16-bit layer's autograd wants)."""
    a = check.data_array(a, "a", 2)
    w = check.weight_array(w, "w")
    check.expect_shape(w, "w", (None, None, a.shape[1]), " (E, N, K) with K = a.shape[1]")
    if w.shape[0] < 1:
        check.fail(ValueError, "w", "at least one expert (E >= 1)", f"shape {w.shape}")
    grad_out = check.data_array(grad_out, "grad_out", 2)
    check.expect_shape(grad_out, "grad_out", (a.shape[0], w.shape[1]), " (M, N)")
    try:
        wanted = np.dtype(np.float32 if grad_a_dtype is None else grad_a_dtype)
    except TypeError:
        wanted = None
    if wanted not in (np.dtype(np.float32), a.dtype):
        check.fail(TypeError, "grad_a_dtype", f"None, float32 or a's dtype ({a.dtype})", f"{grad_a_dtype!r}")
    if grad_out.dtype != a.dtype:
        grad_out, a = grad_out.astype(np.float32), a.astype(np.float32)
    expert_offsets = check.index_array(expert_offsets, "expert_offsets", 1)
    check.expect_shape(expert_offsets, "expert_offsets", (w.shape[0] + 1,), " (E + 1,)")
    grad_a, grad_w = _core.grouped_gemm_backward(grad_out, a, w, expert_offsets, check.boolean(need_a, "need_a"),
                                                 check.boolean(need_w, "need_w"), wanted == a.dtype)
    if grad_a is not None and grad_a.dtype != wanted:  # a was widened (grad_out of another dtype)
        grad_a = grad_a.astype(wanted)
    return grad_a, grad_w


def bias_grad(grad_out, expert_offsets):
    """Of out = grouped_gemm(a, w, expert_offsets, bias=bias): grad_bias [E, N] float32, the sums of
    grad_out's rows per expert (rows added in order; zeros for experts without rows)."""
    grad_out = check.float_array(grad_out, "grad_out", 2)
    expert_offsets = check.index_array(expert_offsets, "expert_offsets", 1)
    if expert_offsets.shape[0] < 2:
        check.fail(ValueError, "expert_offsets", "shape (E + 1,) with E >= 1", f"shape {expert_offsets.shape}")
    return _core.bias_grad(grad_out, expert_offsets)


def unpermute_backward(grad_y, y_perm, perm_rows, topk_weights):
    """Of y = unpermute(y_perm, perm_rows, topk_weights): (grad_y_perm [M, d], grad_topk_weights [T, k])
    with grad_y_perm[perm_rows[t, j]] = topk_weights[t, j] * grad_y[t] (rows no slot names: 0) and
    grad_topk_weights[t, j] = <grad_y[t], y_perm[perm_rows[t, j]]> (0 where perm_rows is -1)."""
    y_perm = check.float_array(y_perm, "y_perm", 2)
    perm_rows = check.index_array(perm_rows, "perm_rows", 2)
    topk_weights = check.float_array(topk_weights, "topk_weights", 2)
    check.expect_shape(topk_weights, "topk_weights", perm_rows.shape, " = perm_rows.shape")
    grad_y = check.float_array(grad_y, "grad_y", 2)
    check.expect_shape(grad_y, "grad_y", (perm_rows.shape[0], y_perm.shape[1]), " (T, d)")
    return tuple(_core.unpermute_backward(grad_y, y_perm, perm_rows, topk_weights))


def permute_backward(grad_x_perm, perm_rows):
    """Of x_perm = permute(x, ...).x_perm: grad_x [T, d] with grad_x[t] = sum over slots j (in order,
    perm_rows -1 skipped) of grad_x_perm[perm_rows[t, j]]."""
    grad_x_perm = check.float_array(grad_x_perm, "grad_x_perm", 2)
    perm_rows = check.index_array(perm_rows, "perm_rows", 2)
    return _core.permute_backward(grad_x_perm, perm_rows)
