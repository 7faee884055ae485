"""`moe-ext bench`: time the fused MoE forward on the SPEC §6 shapes and print tokens/s and GFLOP/s.

This is the short forward of the README's main job; the peer comparison lives in bench/ at the repo root.
"""
import time

import numpy as np

from . import _api

# name: (T, d, f, E, k), SPEC §6.
SHAPES = {
    "small": (512, 512, 1024, 8, 2),
    "medium": (2048, 1024, 2048, 8, 2),
    "mixtral": (1024, 4096, 14336, 8, 2),
    "decode": (1, 4096, 14336, 8, 2),
    "fine": (1024, 2048, 768, 64, 6),
}


def flops(T, d, f, E, k, gated=True):
    """SPEC §6: 2*T*k*d*f*(3 gated, 2 otherwise) + 2*T*d*E (the router)."""
    return 2 * T * k * d * f * (3 if gated else 2) + 2 * T * d * E


def make_inputs(T, d, f, E, k, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, d), dtype=np.float32)
    w_router = rng.standard_normal((E, d), dtype=np.float32)
    w13 = rng.standard_normal((E, 2 * f, d), dtype=np.float32) * np.float32(d ** -0.5)
    w2 = rng.standard_normal((E, d, f), dtype=np.float32) * np.float32(f ** -0.5)
    return x, w_router, w13, w2


def time_forward(shape, repeats=5, warmup=1):
    """Median, p95 and all seconds of `repeats` timed moe() calls after `warmup` untimed ones."""
    T, d, f, E, k = shape
    x, w_router, w13, w2 = make_inputs(*shape)
    for _ in range(warmup):
        _api.moe(x, w_router, w13, w2, k)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        _api.moe(x, w_router, w13, w2, k)
        seconds.append(time.perf_counter() - start)
    return float(np.median(seconds)), float(np.percentile(seconds, 95)), seconds


def report(name, repeats=5):
    shape = SHAPES[name]
    T, d, f, E, k = shape
    median, p95, _ = time_forward(shape, repeats)
    return {
        "shape": name, "T": T, "d": d, "f": f, "E": E, "k": k, "repeats": repeats,
        "p50_ms": median * 1e3, "p95_ms": p95 * 1e3,
        "tokens_per_s": T / median, "gflop_per_s": flops(*shape) / median / 1e9,
    }
