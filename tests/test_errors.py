"""Argument checks (SPEC §5, python/moe_ext/_checks.py, csrc/core/checks.cpp).

Every bad argument must raise TypeError (wrong kind of object or dtype) or ValueError (rank, shape,
layout, value), with a message "<argument>: expected <what>; got <what came>", and must leave every
input array untouched. Each case starts from a valid call (checked to succeed) and breaks one thing.
"""
import ml_dtypes
import numpy as np
import pytest

import moe_ext
from conftest import (random_expert_weights, random_ids, random_offsets, random_router,
                      random_topk_weights, random_weights, random_x, unchanged)

T, D, F, E, K = 9, 12, 8, 4, 2  # valid base shapes (E divisible by 2 and 4 for n_group cases)
M = 11                          # rows of grouped_gemm / unpermute inputs


def valid_kwargs(op, rng):
    """Arguments of a call of `op` that succeeds, as keywords."""
    x, w_router = random_x(rng, T, D), random_router(rng, E, D)
    w13, w2 = random_expert_weights(rng, E, D, F, "swiglu")
    weights, ids = random_topk_weights(rng, T, K), random_ids(rng, T, E, K)
    if op == "route":
        return dict(x=x, w_router=w_router, top_k=K)
    if op == "permute":
        return dict(x=x, topk_ids=ids, num_experts=E)
    if op == "grouped_gemm":
        return dict(a=random_x(rng, M, D), w=random_weights(rng, (E, F, D), D),
                    expert_offsets=random_offsets(rng, E, [3, 0, 5, 3]))
    if op == "unpermute":
        rows = rng.permutation(T * K).reshape(T, K).astype(np.int32) % M
        rows[0, 1] = -1
        return dict(y_perm=random_x(rng, M, D), perm_rows=rows, topk_weights=weights)
    if op == "experts":
        return dict(x=x, w13_or_w1=w13, w2=w2, topk_weights=weights, topk_ids=ids)
    if op == "moe":
        return dict(x=x, w_router=w_router, w13_or_w1=w13, w2=w2, top_k=K)
    if op == "load_balancing_loss":
        p = rng.random((T, E)).astype(np.float32)
        return dict(probs=p / p.sum(axis=1, keepdims=True), topk_ids=ids, num_experts=E)
    if op == "router_z_loss":
        return dict(logits=random_x(rng, T, E))
    raise AssertionError(op)


# ------------------------------------------------------------------------------ mutation helpers
def noncontig(a):
    """Same shape and values, every other element of a twice-as-wide buffer: not C-contiguous."""
    wide = np.empty(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
    wide[..., ::2] = a
    return wide[..., ::2]


def fortran(a):
    """Same shape and values, Fortran order (a transposed C array): not C-contiguous."""
    return np.ascontiguousarray(a.T).T


def put(name, fn):
    """A mutation replacing kwargs[name] by fn(old value, kwargs)."""
    def mutate(kw):
        kw[name] = fn(kw.get(name), kw)
    return mutate


def const(name, value):
    return put(name, lambda old, kw: value)


def both(*mutations):
    def mutate(kw):
        for m in mutations:
            m(kw)
    return mutate


def set_at(name, index, value, dtype=None):
    def fn(old, kw):
        new = old.astype(dtype) if dtype is not None else old.copy()
        new[index] = value
        return new
    return put(name, fn)


def array_cases(op, name, ndim, kind="float"):
    """The generic checks of one array argument: type, dtype, rank, layout. kind "float": float32 only
    (scores, weights of the combine); "data": activations and expert weights (float32, bfloat16,
    float16); "int": index arrays."""
    cases = [
        (op, f"{name}-list", put(name, lambda a, kw: a.tolist()), TypeError, name),
        (op, f"{name}-{'float32' if kind == 'int' else 'float64'}",
         put(name, lambda a, kw: a.astype(np.float32 if kind == "int" else np.float64)), TypeError, name),
        (op, f"{name}-rank-up", put(name, lambda a, kw: a[None]), ValueError, name),
        (op, f"{name}-noncontig", put(name, lambda a, kw: noncontig(a)), ValueError, name),
    ]
    if kind in ("float", "data"):
        cases += [
            (op, f"{name}-int32", put(name, lambda a, kw: a.astype(np.int32)), TypeError, name),
            (op, f"{name}-bigendian", put(name, lambda a, kw: a.astype(">f4")), TypeError, name),
            (op, f"{name}-bigendian-float16", put(name, lambda a, kw: a.astype(">f2")), TypeError, name),
        ]
    if kind == "float":  # scores and combine weights stay float32 whatever the activations' dtype
        cases += [
            (op, f"{name}-float16", put(name, lambda a, kw: a.astype(np.float16)), TypeError, name),
            (op, f"{name}-bfloat16", put(name, lambda a, kw: a.astype(ml_dtypes.bfloat16)), TypeError, name),
        ]
    if kind == "int":
        cases += [
            (op, f"{name}-int16", put(name, lambda a, kw: a.astype(np.int16)), TypeError, name),
            (op, f"{name}-uint32", put(name, lambda a, kw: a.astype(np.uint32)), TypeError, name),
            (op, f"{name}-bool", put(name, lambda a, kw: a.astype(bool)), TypeError, name),
            (op, f"{name}-int64-huge", set_at(name, (0,) * ndim, 2 ** 40, np.int64), ValueError,
             f"{name}:.*int32"),
            (op, f"{name}-int64-huge-negative", set_at(name, (-1,) * ndim, -2 ** 40, np.int64), ValueError,
             f"{name}:.*int32"),
        ]
    if ndim >= 2:
        cases += [
            (op, f"{name}-rank-down", put(name, lambda a, kw: np.ascontiguousarray(a[0])), ValueError, name),
            (op, f"{name}-fortran", put(name, lambda a, kw: fortran(a)), ValueError, name),
        ]
    if ndim == 1:
        cases.append((op, f"{name}-2d", put(name, lambda a, kw: a[None, :]), ValueError, name))
    cases.append((op, f"{name}-reversed", put(name, lambda a, kw: a[::-1]), ValueError, name))
    return cases


def routing_cases(op):
    """Checks of the router keywords, shared by route and moe."""
    return [
        (op, "top_k-0", const("top_k", 0), ValueError, "top_k"),
        (op, "top_k-negative", const("top_k", -1), ValueError, "top_k"),
        (op, "top_k-E+1", const("top_k", E + 1), ValueError, "top_k"),
        (op, "top_k-float", const("top_k", 1.5), TypeError, "top_k"),
        (op, "top_k-float-integral", const("top_k", 2.0), TypeError, "top_k"),
        (op, "top_k-bool", const("top_k", True), TypeError, "top_k"),
        (op, "top_k-str", const("top_k", "2"), TypeError, "top_k"),
        (op, "top_k-None", const("top_k", None), TypeError, "top_k"),
        (op, "scoring-unknown", const("scoring", "relu"), ValueError, "scoring"),
        (op, "scoring-case", const("scoring", "Softmax"), ValueError, "scoring"),
        (op, "scoring-int", const("scoring", 1), TypeError, "scoring"),
        (op, "scoring-None", const("scoring", None), TypeError, "scoring"),
        (op, "renormalize-int", const("renormalize", 1), TypeError, "renormalize"),
        (op, "renormalize-str", const("renormalize", "yes"), TypeError, "renormalize"),
        (op, "renormalize-None", const("renormalize", None), TypeError, "renormalize"),
        (op, "scale-nan", const("scale", float("nan")), ValueError, "scale"),
        (op, "scale-inf", const("scale", float("inf")), ValueError, "scale"),
        (op, "scale-neg-inf", const("scale", -np.inf), ValueError, "scale"),
        (op, "scale-str", const("scale", "2.0"), TypeError, "scale"),
        (op, "scale-bool", const("scale", True), TypeError, "scale"),
        (op, "scale-None", const("scale", None), TypeError, "scale"),
        (op, "scale-complex", const("scale", 1j), TypeError, "scale"),
        (op, "scale-array", const("scale", np.ones(2)), TypeError, "scale"),
        (op, "bias-wrong-length", put("bias", lambda a, kw: np.ones(E + 1, np.float32) * 0.5), ValueError, "bias"),
        (op, "bias-2d", put("bias", lambda a, kw: np.full((1, E), 0.25, np.float32)), ValueError, "bias"),
        (op, "bias-float64", put("bias", lambda a, kw: np.full(E, 0.25)), TypeError, "bias"),
        (op, "bias-list", put("bias", lambda a, kw: [0.25] * E), TypeError, "bias"),
        (op, "bias-noncontig", put("bias", lambda a, kw: noncontig(np.full(E, 0.25, np.float32))),
         ValueError, "bias"),
        (op, "correction_bias-wrong-length", put("correction_bias", lambda a, kw: np.full(E - 1, 0.5, np.float32)),
         ValueError, "correction_bias"),
        (op, "correction_bias-float64", put("correction_bias", lambda a, kw: np.full(E, 0.5)), TypeError,
         "correction_bias"),
        (op, "correction_bias-list", put("correction_bias", lambda a, kw: [0.5] * E), TypeError,
         "correction_bias"),
        (op, "n_group-without-topk_group", const("n_group", 2), ValueError, "n_group"),
        (op, "topk_group-without-n_group", const("topk_group", 1), ValueError, "n_group:.*topk_group"),
        (op, "n_group-not-dividing-E", both(const("n_group", 3), const("topk_group", 3)), ValueError, "n_group"),
        (op, "n_group-0", both(const("n_group", 0), const("topk_group", 1)), ValueError, "n_group"),
        (op, "n_group-E+1", both(const("n_group", E + 1), const("topk_group", 1)), ValueError, "n_group"),
        (op, "n_group-float", both(const("n_group", 2.0), const("topk_group", 1)), TypeError, "n_group"),
        (op, "n_group-bool", both(const("n_group", True), const("topk_group", 1)), TypeError, "n_group"),
        (op, "topk_group-0", both(const("n_group", 2), const("topk_group", 0)), ValueError, "topk_group"),
        (op, "topk_group-gt-n_group", both(const("n_group", 2), const("topk_group", 3)), ValueError, "topk_group"),
        (op, "topk_group-too-few-experts", both(const("n_group", 4), const("topk_group", 1)), ValueError,
         "topk_group"),  # 1 group of 1 expert < top_k = 2
        (op, "topk_group-str", both(const("n_group", 2), const("topk_group", "1")), TypeError, "topk_group"),
    ]


# ------------------------------------------------------------------------------------------ cases
CASES = []
# route
CASES += array_cases("route", "x", 2, kind="data")
CASES += array_cases("route", "w_router", 2, kind="data")
CASES += routing_cases("route")
CASES += [
    ("route", "x-d-mismatch", put("x", lambda a, kw: np.ascontiguousarray(a[:, :-1])), ValueError, "w_router"),
    ("route", "w_router-d-mismatch", put("w_router", lambda a, kw: np.ascontiguousarray(a[:, 1:])), ValueError,
     "w_router"),
    ("route", "w_router-no-experts", put("w_router", lambda a, kw: np.ascontiguousarray(a[:0])), ValueError,
     "w_router"),
    ("route", "return_probs-int", const("return_probs", 1), TypeError, "return_probs"),
    ("route", "return_probs-None", const("return_probs", None), TypeError, "return_probs"),
]
# permute
CASES += array_cases("permute", "x", 2, kind="data")
CASES += array_cases("permute", "topk_ids", 2, kind="int")
CASES += [
    ("permute", "topk_ids-rows-mismatch", put("topk_ids", lambda a, kw: np.ascontiguousarray(a[1:])), ValueError,
     "topk_ids"),
    ("permute", "topk_ids-minus-one", set_at("topk_ids", (2, 1), -1), ValueError, "topk_ids"),
    ("permute", "topk_ids-E", set_at("topk_ids", (3, 0), E), ValueError, "topk_ids"),
    ("permute", "topk_ids-int64-E", set_at("topk_ids", (3, 0), E, np.int64), ValueError, "topk_ids"),
    ("permute", "topk_ids-int32-min", set_at("topk_ids", (0, 0), np.iinfo(np.int32).min), ValueError, "topk_ids"),
    ("permute", "topk_ids-above-num_experts", const("num_experts", 1), ValueError, "topk_ids"),
    ("permute", "num_experts-0", const("num_experts", 0), ValueError, "num_experts"),
    ("permute", "num_experts-negative", const("num_experts", -3), ValueError, "num_experts"),
    ("permute", "num_experts-float", const("num_experts", 4.0), TypeError, "num_experts"),
    ("permute", "num_experts-bool", const("num_experts", True), TypeError, "num_experts"),
    ("permute", "num_experts-None", const("num_experts", None), TypeError, "num_experts"),
    ("permute", "capacity-minus-one", const("capacity", -1), ValueError, "capacity"),
    ("permute", "capacity-float", const("capacity", 1.5), TypeError, "capacity"),
    ("permute", "capacity-bool", const("capacity", True), TypeError, "capacity"),
    ("permute", "capacity-str", const("capacity", "2"), TypeError, "capacity"),
]
# grouped_gemm
CASES += array_cases("grouped_gemm", "a", 2, kind="data")
CASES += array_cases("grouped_gemm", "w", 3, kind="data")
CASES += array_cases("grouped_gemm", "expert_offsets", 1, kind="int")
CASES += [
    ("grouped_gemm", "w-rank-2", put("w", lambda a, kw: np.ascontiguousarray(a[0])), ValueError, "w"),
    ("grouped_gemm", "w-K-mismatch", put("w", lambda a, kw: np.ascontiguousarray(a[:, :, 1:])), ValueError, "w"),
    ("grouped_gemm", "a-K-mismatch", put("a", lambda a, kw: np.ascontiguousarray(a[:, :-2])), ValueError, "w"),
    ("grouped_gemm", "w-no-experts", put("w", lambda a, kw: np.ascontiguousarray(a[:0])), ValueError, "w"),
    ("grouped_gemm", "offsets-short", put("expert_offsets", lambda a, kw: np.ascontiguousarray(a[1:])),
     ValueError, "expert_offsets"),
    ("grouped_gemm", "offsets-long", put("expert_offsets", lambda a, kw: np.append(a, a[-1]).astype(np.int32)),
     ValueError, "expert_offsets"),
    ("grouped_gemm", "offsets-not-from-0", set_at("expert_offsets", 0, 1), ValueError, "expert_offsets"),
    ("grouped_gemm", "offsets-negative-start", set_at("expert_offsets", 0, -1), ValueError, "expert_offsets"),
    ("grouped_gemm", "offsets-decreasing", set_at("expert_offsets", 2, 1), ValueError, "expert_offsets"),
    ("grouped_gemm", "offsets-end-below-M", set_at("expert_offsets", -1, M - 1), ValueError, "expert_offsets"),
    ("grouped_gemm", "offsets-end-above-M", set_at("expert_offsets", -1, M + 1), ValueError, "expert_offsets"),
    ("grouped_gemm", "offsets-int64-end-above-M", set_at("expert_offsets", -1, M + 5, np.int64), ValueError,
     "expert_offsets"),
    ("grouped_gemm", "offsets-int64-2**32-wrap", set_at("expert_offsets", -1, 2 ** 32 + M, np.int64),
     ValueError, "expert_offsets"),
    ("grouped_gemm", "offsets-a-has-extra-rows",
     put("a", lambda a, kw: np.concatenate([a, a[:1]])), ValueError, "expert_offsets"),
]
# unpermute
CASES += array_cases("unpermute", "y_perm", 2, kind="data")
CASES += array_cases("unpermute", "perm_rows", 2, kind="int")
CASES += array_cases("unpermute", "topk_weights", 2)
CASES += [
    ("unpermute", "perm_rows-minus-two", set_at("perm_rows", (1, 0), -2), ValueError, "perm_rows"),
    ("unpermute", "perm_rows-M", set_at("perm_rows", (4, 1), M), ValueError, "perm_rows"),
    ("unpermute", "perm_rows-int64-M", set_at("perm_rows", (4, 1), M, np.int64), ValueError, "perm_rows"),
    ("unpermute", "perm_rows-int32-max", set_at("perm_rows", (4, 1), np.iinfo(np.int32).max), ValueError,
     "perm_rows"),
    ("unpermute", "y_perm-fewer-rows", put("y_perm", lambda a, kw: np.ascontiguousarray(a[:3])), ValueError,
     "perm_rows"),
    ("unpermute", "topk_weights-shape", put("topk_weights", lambda a, kw: np.ascontiguousarray(a[:, :1])),
     ValueError, "topk_weights"),
    ("unpermute", "topk_weights-rows", put("topk_weights", lambda a, kw: np.ascontiguousarray(a[1:])),
     ValueError, "topk_weights"),
]
# experts
CASES += array_cases("experts", "x", 2, kind="data")
CASES += array_cases("experts", "w13_or_w1", 3, kind="data")
CASES += array_cases("experts", "w2", 3, kind="data")
CASES += array_cases("experts", "topk_weights", 2)
CASES += array_cases("experts", "topk_ids", 2, kind="int")
CASES += [
    ("experts", "w13-has-f-rows-for-swiglu",
     put("w13_or_w1", lambda a, kw: np.ascontiguousarray(a[:, :F])), ValueError, "w13_or_w1"),
    ("experts", "w13-has-f-rows-for-geglu",
     both(const("activation", "geglu"), put("w13_or_w1", lambda a, kw: np.ascontiguousarray(a[:, :F]))),
     ValueError, "w13_or_w1"),
    ("experts", "w1-has-2f-rows-for-relu", const("activation", "relu"), ValueError, "w13_or_w1"),
    ("experts", "w1-has-2f-rows-for-gelu", const("activation", "gelu"), ValueError, "w13_or_w1"),
    ("experts", "w13-d-mismatch", put("w13_or_w1", lambda a, kw: np.ascontiguousarray(a[:, :, 1:])), ValueError,
     "w13_or_w1"),
    ("experts", "w13-E-mismatch", put("w13_or_w1", lambda a, kw: np.ascontiguousarray(a[1:])), ValueError,
     "w13_or_w1"),
    ("experts", "w2-d-mismatch", put("w2", lambda a, kw: np.ascontiguousarray(a[:, 1:])), ValueError, "w2"),
    ("experts", "w2-f-mismatch", put("w2", lambda a, kw: np.ascontiguousarray(a[:, :, 1:])), ValueError,
     "w13_or_w1"),
    ("experts", "w2-no-experts",
     both(put("w2", lambda a, kw: np.ascontiguousarray(a[:0])),
          put("w13_or_w1", lambda a, kw: np.ascontiguousarray(a[:0]))), ValueError, "w2"),
    ("experts", "w2-rank-2", put("w2", lambda a, kw: np.ascontiguousarray(a[0])), ValueError, "w2"),
    ("experts", "topk_weights-shape", put("topk_weights", lambda a, kw: np.ascontiguousarray(a[:, :1])),
     ValueError, "topk_weights"),
    ("experts", "topk_ids-rows-mismatch", put("topk_ids", lambda a, kw: np.ascontiguousarray(a[1:])),
     ValueError, "topk_ids"),
    ("experts", "topk_ids-minus-one", set_at("topk_ids", (5, 0), -1), ValueError, "topk_ids"),
    ("experts", "topk_ids-E", set_at("topk_ids", (5, 1), E), ValueError, "topk_ids"),
    ("experts", "topk_ids-int64-E", set_at("topk_ids", (5, 1), E, np.int64), ValueError, "topk_ids"),
    ("experts", "activation-unknown", const("activation", "silu"), ValueError, "activation"),
    ("experts", "activation-case", const("activation", "SwiGLU"), ValueError, "activation"),
    ("experts", "activation-int", const("activation", 0), TypeError, "activation"),
    ("experts", "activation-None", const("activation", None), TypeError, "activation"),
    ("experts", "capacity-minus-one", const("capacity", -1), ValueError, "capacity"),
    ("experts", "capacity-float", const("capacity", 2.0), TypeError, "capacity"),
]
# moe
CASES += array_cases("moe", "x", 2, kind="data")
CASES += array_cases("moe", "w_router", 2, kind="data")
CASES += array_cases("moe", "w13_or_w1", 3, kind="data")
CASES += array_cases("moe", "w2", 3, kind="data")
CASES += routing_cases("moe")
CASES += [
    ("moe", "w_router-no-experts", put("w_router", lambda a, kw: np.ascontiguousarray(a[:0])), ValueError,
     "w_router"),
    ("moe", "w_router-d-mismatch", put("w_router", lambda a, kw: np.ascontiguousarray(a[:, 1:])), ValueError,
     "w_router"),
    ("moe", "w_router-E-mismatch", put("w_router", lambda a, kw: np.ascontiguousarray(a[:-1])), ValueError, "w2"),
    ("moe", "w13-has-f-rows-for-swiglu",
     put("w13_or_w1", lambda a, kw: np.ascontiguousarray(a[:, :F])), ValueError, "w13_or_w1"),
    ("moe", "w1-has-2f-rows-for-relu", const("activation", "relu"), ValueError, "w13_or_w1"),
    ("moe", "w2-d-mismatch", put("w2", lambda a, kw: np.ascontiguousarray(a[:, 1:])), ValueError, "w2"),
    ("moe", "activation-unknown", const("activation", "tanh"), ValueError, "activation"),
    ("moe", "activation-int", const("activation", 2), TypeError, "activation"),
    ("moe", "capacity-minus-one", const("capacity", -1), ValueError, "capacity"),
    ("moe", "capacity-str", const("capacity", "1"), TypeError, "capacity"),
]
# losses
CASES += array_cases("load_balancing_loss", "probs", 2)
CASES += array_cases("load_balancing_loss", "topk_ids", 2, kind="int")
CASES += [
    ("load_balancing_loss", "probs-E-mismatch", put("probs", lambda a, kw: np.ascontiguousarray(a[:, 1:])),
     ValueError, "probs"),
    ("load_balancing_loss", "topk_ids-rows-mismatch", put("topk_ids", lambda a, kw: np.ascontiguousarray(a[1:])),
     ValueError, "topk_ids"),
    ("load_balancing_loss", "topk_ids-minus-one", set_at("topk_ids", (0, 0), -1), ValueError, "topk_ids"),
    ("load_balancing_loss", "topk_ids-E", set_at("topk_ids", (1, 1), E), ValueError, "topk_ids"),
    ("load_balancing_loss", "num_experts-0", const("num_experts", 0), ValueError, "num_experts"),
    ("load_balancing_loss", "num_experts-float", const("num_experts", 4.0), TypeError, "num_experts"),
    ("load_balancing_loss", "num_experts-bool", const("num_experts", True), TypeError, "num_experts"),
]
CASES += array_cases("router_z_loss", "logits", 2)
CASES += [
    ("router_z_loss", "logits-no-experts", put("logits", lambda a, kw: np.ascontiguousarray(a[:, :0])),
     ValueError, "logits"),
]


def _call(op, kw):
    return getattr(moe_ext, op)(**kw)


@pytest.mark.parametrize("op", ["route", "permute", "grouped_gemm", "unpermute", "experts", "moe",
                                "load_balancing_loss", "router_z_loss"])
def test_valid_base_call(rng, op):
    """The starting point of every error case is a valid call."""
    kw = valid_kwargs(op, rng)
    with unchanged(*kw.values()):
        _call(op, kw)


@pytest.mark.parametrize("op,case,mutate,error,name", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_bad_argument(rng, op, case, mutate, error, name):
    kw = valid_kwargs(op, rng)
    mutate(kw)
    arrays = [v for v in kw.values() if isinstance(v, np.ndarray)]
    with unchanged(*arrays):
        with pytest.raises(error, match=f"^{name}") as info:
            _call(op, kw)
    message = str(info.value)
    assert "expected" in message and "got" in message, message


def test_int64_ids_are_not_truncated(rng):
    """2**40 + 1 would wrap to the valid id 1 if truncated to int32: it must raise instead."""
    kw = valid_kwargs("permute", rng)
    ids = kw["topk_ids"].astype(np.int64)
    ids[0, 0] = 2 ** 40 + 1
    with unchanged(ids):
        with pytest.raises(ValueError, match="^topk_ids:.*int32"):
            moe_ext.permute(kw["x"], ids, E)
    kw = valid_kwargs("experts", rng)
    ids = kw["topk_ids"].astype(np.int64)
    ids[-1, -1] = 2 ** 32 + 2
    with pytest.raises(ValueError, match="^topk_ids:.*int32"):
        moe_ext.experts(kw["x"], kw["w13_or_w1"], kw["w2"], kw["topk_weights"], ids)


def test_moe_token_copies_must_fit_int32(rng):
    """T * top_k > 2**31 - 1 copies cannot be indexed by int32 rows (d = 0 keeps the arrays empty)."""
    T_big = 2 ** 31
    x = np.empty((T_big, 0), np.float32)
    w_router = np.empty((E, 0), np.float32)
    w13, w2 = np.empty((E, 2, 0), np.float32), np.empty((E, 0, 1), np.float32)
    with pytest.raises(ValueError, match="^top_k"):
        moe_ext.moe(x, w_router, w13, w2, 1)


def test_capacity_and_num_experts_out_of_int64_range(rng):
    """Integers beyond int64 must still give the documented "name: expected ...; got ..." error (a
    ValueError or TypeError naming the argument), not pybind11's generic signature dump."""
    kw = valid_kwargs("permute", rng)
    for key in ("capacity", "num_experts"):
        bad = dict(kw, **{key: 2 ** 70})
        with pytest.raises((ValueError, TypeError), match=f"^{key}:"):
            moe_ext.permute(**bad)


def test_unknown_keyword_is_a_type_error(rng):
    kw = valid_kwargs("route", rng)
    with pytest.raises(TypeError):
        moe_ext.route(**kw, topk=2)
    kw = valid_kwargs("moe", rng)
    with pytest.raises(TypeError):
        moe_ext.moe(**kw, activaton="relu")
