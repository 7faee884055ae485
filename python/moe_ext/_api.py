"""The public operations of SPEC §3 on NumPy arrays: check the arguments, then call the C++ core."""
from . import _checks as check
from . import _core
from ._activation import PRESETS, activation_from
from ._types import PermuteResult

# What an expert-weight argument may be besides an array.
WEIGHT_TYPES = (_core.PackedWeight, _core.QuantizedWeight)

SCORINGS = ("softmax", "sigmoid")
# The preset names (any moe_ext.Activation or canonical string is accepted too).
ACTIVATIONS = tuple(PRESETS)
GATED_ACTIVATIONS = tuple(name for name, (_, gated) in PRESETS.items() if gated)


def _routing_options(E, top_k, scoring, renormalize, scale, bias, correction_bias, n_group, topk_group):
    top_k = check.integer(top_k, "top_k", 1, E)
    options = dict(
        scoring=check.choice(scoring, "scoring", SCORINGS),
        renormalize=check.boolean(renormalize, "renormalize"),
        scale=check.real(scale, "scale"),
        bias=check.optional_float_array(bias, "bias", (E,)),
        correction_bias=check.optional_float_array(correction_bias, "correction_bias", (E,)),
        n_group=check.optional_integer(n_group, "n_group", 1, E),
        topk_group=check.optional_integer(topk_group, "topk_group", 1, E),
    )
    if (options["n_group"] is None) != (options["topk_group"] is None):
        check.fail(ValueError, "n_group", "n_group and topk_group both given or both None",
                   f"n_group={n_group!r}, topk_group={topk_group!r}")
    return top_k, options


def _router(x, w_router):
    x = check.data_array(x, "x", 2)
    w_router = check.data_array(w_router, "w_router", 2)
    check.expect_shape(w_router, "w_router", (None, x.shape[1]), " (E, d) with d = x.shape[1]")
    if w_router.shape[0] < 1:
        check.fail(ValueError, "w_router", "at least one expert (E >= 1)", f"shape {w_router.shape}")
    return x, w_router


def route(x, w_router, top_k, *, scoring="softmax", renormalize=True, scale=1.0, bias=None,
          correction_bias=None, n_group=None, topk_group=None, return_probs=False):
    """Router GEMM, scoring, (grouped) top-k. Returns (topk_weights [T,k] f32, topk_ids [T,k] i32)
    and, with return_probs=True, also probs [T,E] f32. See docs/api.md §1."""
    x, w_router = _router(x, w_router)
    top_k, options = _routing_options(w_router.shape[0], top_k, scoring, renormalize, scale, bias,
                                      correction_bias, n_group, topk_group)
    return_probs = check.boolean(return_probs, "return_probs")
    return tuple(_core.route(x, w_router, top_k, return_probs=return_probs, **options))


def _ids(topk_ids, T, name="topk_ids"):
    topk_ids = check.index_array(topk_ids, name, 2)
    check.expect_shape(topk_ids, name, (T, None), " (T, k) with T = x.shape[0]")
    check.copies_fit(*topk_ids.shape, name=name)
    return topk_ids


def permute(x, topk_ids, num_experts, *, capacity=None):
    """Group the T*k token copies by expert. Returns PermuteResult(x_perm, expert_offsets, perm_rows),
    with .num_dropped. See docs/api.md §2."""
    x = check.data_array(x, "x", 2)
    topk_ids = _ids(topk_ids, x.shape[0])
    num_experts = check.integer(num_experts, "num_experts", 1, check.INT32_MAX)  # ids are int32
    capacity = check.optional_integer(capacity, "capacity", 0)
    return PermuteResult(*_core.permute(x, topk_ids, num_experts, capacity))


def prepack(w):
    """Pack expert weights w [E, N, K] (float32, bfloat16 or float16; C-contiguous or the transposed view
    w_t.transpose(0, 2, 1)) once into the grouped GEMM's panel layout. The returned PackedWeight is
    accepted by grouped_gemm, experts and moe wherever w is, and gives the same results as w; it holds its
    own copy (later changes to w do not reach it). See docs/api.md §3."""
    return _core.PackedWeight(check.weight_array(w, "w"))


def grouped_gemm(a, w, expert_offsets, *, bias=None):
    """out[rows of e] = a[rows of e] @ w[e].T (+ bias[e]) for the rows expert_offsets[e]:expert_offsets[e+1].
    out has a's dtype; w may be a PackedWeight, QuantizedWeight or transposed view; bias [E, N] (float32,
    bfloat16 or float16) is added in float32."""
    a = check.data_array(a, "a", 2)
    w = check.weight(w, "w", WEIGHT_TYPES)
    check.expect_shape(w, "w", (None, None, a.shape[1]), " (E, N, K) with K = a.shape[1]")
    if w.shape[0] < 1:
        check.fail(ValueError, "w", "at least one expert (E >= 1)", f"shape {w.shape}")
    expert_offsets = check.index_array(expert_offsets, "expert_offsets", 1)
    check.expect_shape(expert_offsets, "expert_offsets", (w.shape[0] + 1,), " (E + 1,)")
    bias = check.optional_bias(bias, "bias", w.shape[:2], " (E, N) with w (E, N, K)")
    return _core.grouped_gemm(a, w, expert_offsets, bias)


def unpermute(y_perm, perm_rows, topk_weights):
    """y[t] = sum_j topk_weights[t, j] * y_perm[perm_rows[t, j]] (rows of -1 skipped)."""
    y_perm = check.data_array(y_perm, "y_perm", 2)
    perm_rows = check.index_array(perm_rows, "perm_rows", 2)
    topk_weights = check.float_array(topk_weights, "topk_weights", 2)
    check.expect_shape(topk_weights, "topk_weights", perm_rows.shape, " = perm_rows.shape")
    return _core.unpermute(y_perm, perm_rows, topk_weights)


def _expert_weights(x, w13_or_w1, w2, activation, b13_or_b1, b2):
    """The checked weights, the Activation and the biases (float32 or None) of experts/moe."""
    activation = activation_from(activation)
    w2 = check.weight(w2, "w2", WEIGHT_TYPES)
    E, d, f = w2.shape
    check.expect_shape(w2, "w2", (None, x.shape[1], None), " (E, d, f) with d = x.shape[1]")
    if E < 1:
        check.fail(ValueError, "w2", "at least one expert (E >= 1)", f"shape {w2.shape}")
    w13_or_w1 = check.weight(w13_or_w1, "w13_or_w1", WEIGHT_TYPES)
    rows, rows_name = (2 * f, "2f") if activation.gated else (f, "f")
    check.expect_shape(w13_or_w1, "w13_or_w1", (E, rows, d), f" (E, {rows_name}, d) for activation '{activation}'")
    b13_or_b1 = check.optional_bias(b13_or_b1, "b13_or_b1", (E, rows),
                                    f" (E, {rows_name}) for activation '{activation}'")
    b2 = check.optional_bias(b2, "b2", (E, d), " (E, d) with w2 (E, d, f)")
    return w13_or_w1, w2, activation, b13_or_b1, b2


def experts(x, w13_or_w1, w2, topk_weights, topk_ids, *, activation="swiglu", capacity=None, b13_or_b1=None,
            b2=None):
    """The expert FFNs over precomputed routing: permute, grouped GEMM (+ b13_or_b1), activation, grouped
    GEMM (+ b2), weighted un-permute. Returns y [T, d] in x's dtype. See docs/api.md §5."""
    x = check.data_array(x, "x", 2)
    w13_or_w1, w2, activation, b13_or_b1, b2 = _expert_weights(x, w13_or_w1, w2, activation, b13_or_b1, b2)
    topk_ids = _ids(topk_ids, x.shape[0])
    topk_weights = check.float_array(topk_weights, "topk_weights", 2)
    check.expect_shape(topk_weights, "topk_weights", topk_ids.shape, " = topk_ids.shape")
    capacity = check.optional_integer(capacity, "capacity", 0)
    return _core.experts(x, w13_or_w1, w2, topk_weights, topk_ids, activation, capacity, b13_or_b1, b2)


def moe(x, w_router, w13_or_w1, w2, top_k, *, activation="swiglu", scoring="softmax", renormalize=True,
        scale=1.0, bias=None, correction_bias=None, n_group=None, topk_group=None, capacity=None,
        b13_or_b1=None, b2=None):
    """The fused MoE layer: route, then experts. Returns y [T, d]. See docs/api.md §5."""
    x, w_router = _router(x, w_router)
    w13_or_w1, w2, activation, b13_or_b1, b2 = _expert_weights(x, w13_or_w1, w2, activation, b13_or_b1, b2)
    check.expect_shape(w2, "w2", (w_router.shape[0], None, None), " (E, d, f) with E = w_router.shape[0]")
    top_k, options = _routing_options(w_router.shape[0], top_k, scoring, renormalize, scale, bias,
                                      correction_bias, n_group, topk_group)
    check.copies_fit(x.shape[0], top_k, name="top_k")
    capacity = check.optional_integer(capacity, "capacity", 0)
    return _core.moe(x, w_router, w13_or_w1, w2, top_k, activation, capacity=capacity, b13_or_b1=b13_or_b1, b2=b2,
                     **options)


def load_balancing_loss(probs, topk_ids, num_experts):
    """Switch/GShard auxiliary loss E * sum_e f_e * P_e (f_e over the T*k copies). Returns a float."""
    num_experts = check.integer(num_experts, "num_experts", 1, check.INT32_MAX)
    probs = check.float_array(probs, "probs", 2)
    check.expect_shape(probs, "probs", (None, num_experts), " (T, E) with E = num_experts")
    topk_ids = _ids(topk_ids, probs.shape[0])
    return _core.load_balancing_loss(probs, topk_ids, num_experts)


def router_z_loss(logits):
    """mean over tokens of logsumexp(logits[t])**2. Returns a float."""
    logits = check.float_array(logits, "logits", 2)
    if logits.shape[1] < 1:
        check.fail(ValueError, "logits", "shape (T, E) with E >= 1", f"shape {logits.shape}")
    return _core.router_z_loss(logits)
