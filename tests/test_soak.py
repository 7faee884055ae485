"""Soak: many threads and many calls.

- 8 Python threads run thousands of mixed calls (every op, several shapes, each ISA tier in turn) and get
  results bit-identical to the serial run of the same calls.
- Resident memory stays flat over 10,000 mixed calls, rejected calls included: neither the workspace nor
  the bindings leak.
"""
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import moe_ext

PER_TIER = False  # each test walks the tiers itself
THREADS = 8
SHAPES = [(0, 8, 4, 2, 1), (1, 17, 9, 4, 2), (13, 32, 16, 8, 2), (29, 24, 12, 16, 6), (40, 16, 8, 3, 3)]


def make_calls(seed=0):
    """(name, thunk) pairs covering every op on every shape, plus calls that must raise."""
    rng = np.random.default_rng(seed)
    calls = []
    for T, d, f, E, k in SHAPES:
        x = rng.standard_normal((T, d), dtype=np.float32)
        w_router = rng.standard_normal((E, d), dtype=np.float32)
        w13 = rng.standard_normal((E, 2 * f, d), dtype=np.float32)
        w1 = np.ascontiguousarray(w13[:, :f])
        w2 = rng.standard_normal((E, d, f), dtype=np.float32)
        weights, ids, probs = moe_ext.route(x, w_router, k, return_probs=True)
        x_perm, offsets, rows = moe_ext.permute(x, ids, E)
        y_perm = rng.standard_normal((len(x_perm), d), dtype=np.float32)
        calls += [
            ("route", lambda x=x, w=w_router, k=k: moe_ext.route(x, w, k, return_probs=True)),
            ("route sigmoid", lambda x=x, w=w_router, k=k: moe_ext.route(x, w, k, scoring="sigmoid", scale=2.0)),
            ("permute", lambda x=x, i=ids, E=E: moe_ext.permute(x, i, E, capacity=2)),
            ("grouped_gemm", lambda a=x_perm, w=w13, o=offsets: moe_ext.grouped_gemm(a, w, o)),
            ("unpermute", lambda y=y_perm, r=rows, w=weights: moe_ext.unpermute(y, r, w)),
            ("experts relu", lambda x=x, w1=w1, w2=w2, wt=weights, i=ids: moe_ext.experts(x, w1, w2, wt, i, activation="relu")),
            ("moe", lambda x=x, wr=w_router, w13=w13, w2=w2, k=k: moe_ext.moe(x, wr, w13, w2, k)),
            ("moe geglu", lambda x=x, wr=w_router, w13=w13, w2=w2, k=k: moe_ext.moe(x, wr, w13, w2, k, activation="geglu", capacity=3)),
            ("losses", lambda p=probs, i=ids, E=E: (moe_ext.load_balancing_loss(p, i, E), moe_ext.router_z_loss(p))),
            ("bad ids", lambda x=x, E=E, k=k: moe_ext.permute(x, np.full((len(x), k), E, np.int32), E) if len(x) else moe_ext.route(x, x, 0)),
            ("bad dtype", lambda x=x, w=w_router, k=k: moe_ext.route(x.astype(np.float64), w, k)),
        ]
    return calls


def outcome(thunk):
    """A call's result as bytes (bit-exact comparison), or the error it raised."""
    try:
        result = thunk()
    except (ValueError, TypeError) as error:
        return f"{type(error).__name__}: {error}"
    parts = result if isinstance(result, tuple) else (result,)
    return tuple(np.asarray(p).tobytes() + str(np.asarray(p).shape).encode() for p in parts)


@pytest.mark.parametrize("tier", moe_ext.available_isas())
def test_threads_agree_with_serial(tier):
    previous = moe_ext.get_isa()
    moe_ext.set_isa(tier)
    try:
        calls = make_calls()
        serial = [outcome(thunk) for _, thunk in calls]
        rounds = 12  # 8 threads x 12 rounds x 55 calls: 5280 calls per tier

        def worker(offset):
            order = np.random.default_rng(offset).permutation(len(calls))
            mismatches = 0
            for _ in range(rounds):
                for i in order:
                    mismatches += outcome(calls[i][1]) != serial[i]
            return mismatches

        with ThreadPoolExecutor(THREADS) as pool:
            assert sum(pool.map(worker, range(THREADS))) == 0
    finally:
        moe_ext.set_isa(previous)


def resident_bytes():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
@pytest.mark.skipif("asan" in os.environ.get("LD_PRELOAD", ""), reason="ASan's quarantine holds freed memory")
def test_resident_memory_is_flat_over_10000_calls():
    calls = make_calls(seed=1)
    for _, thunk in calls * 20:  # warm up: the workspaces reach their final size
        outcome(thunk)
    before = resident_bytes()
    done = 0
    while done < 10_000:
        for _, thunk in calls:
            outcome(thunk)
            done += 1
    after = resident_bytes()
    print(f"\nRSS before {before / 2**20:.1f} MiB, after {done} calls {after / 2**20:.1f} MiB")
    # A leak of even one small array per call would be 10,000 * >= 100 bytes; allow allocator noise.
    assert after - before < 4 * 2**20, (before, after)
