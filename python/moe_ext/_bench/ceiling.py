"""This machine's ceilings, measured in the benchmark's own run (same process, same thread count).

* compute (GFLOP/s): the faster of a large torch.mm and a large NumPy matmul (n x n by n x n,
  2*n^3 FLOPs) in the dtype; bf16 with torch only (NumPy has no bfloat16).
* bandwidth (GB/s): the best of a large read (NumPy sum over a float32 array, torch sum in the dtype)
  and a large GEMV (torch.mv in the dtype, NumPy float32 matrix @ vector), counting the bytes of the big
  operand once.

Each candidate reports its best of `repeats` timed calls after one warm-up (a ceiling is the best the
machine did, not a typical run). A candidate that cannot run (no torch, ...) is listed with the reason.
"""
import time

import numpy as np

from . import peers

COMPUTE_N = 2048
BANDWIDTH_BYTES = 1 << 30


def _best_seconds(fn, repeats):
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _candidate(name, what, fn, repeats, amount, unit, size):
    """Time fn; amount = FLOPs or bytes per call."""
    try:
        seconds = _best_seconds(fn, repeats)
    except Exception as e:  # noqa: BLE001 - recorded as the candidate's reason
        return {"name": name, "what": what, "value": None, "unit": unit, "size": size,
                "note": f"{type(e).__name__}: {str(e)[:200]}"}
    return {"name": name, "what": what, "value": amount / seconds / 1e9, "unit": unit, "size": size,
            "best_s": seconds}


def _unavailable(name, what, unit, reason):
    return {"name": name, "what": what, "value": None, "unit": unit, "size": None, "note": reason}


def compute(dtype, n=COMPUTE_N, repeats=3):
    """Candidates and best GFLOP/s of an n x n matmul in `dtype` ("fp32" or "bf16")."""
    amount, size = 2.0 * n ** 3, f"{n}x{n} @ {n}x{n}"
    out = []
    try:
        torch = peers.torch_module()
        with torch.inference_mode():
            a = torch.ones((n, n), dtype=peers.torch_dtype(dtype)) * 0.5
            b = torch.ones((n, n), dtype=peers.torch_dtype(dtype)) * 0.25
            out.append(_candidate("torch.mm", "compute", lambda: torch.mm(a, b), repeats, amount,
                                  "GFLOP/s", size))
            del a, b
    except peers.Unavailable as e:
        out.append(_unavailable("torch.mm", "compute", "GFLOP/s", str(e)))
    if dtype == "fp32":
        a = np.full((n, n), 0.5, dtype=np.float32)
        b = np.full((n, n), 0.25, dtype=np.float32)
        out.append(_candidate("numpy.matmul", "compute", lambda: a @ b, repeats, amount, "GFLOP/s", size))
    else:
        out.append(_unavailable("numpy.matmul", "compute", "GFLOP/s", "NumPy has no bfloat16"))
    return out


def bandwidth(dtype, nbytes=BANDWIDTH_BYTES, repeats=3):
    """Candidates of GB/s: large reads and GEMVs of about `nbytes` bytes."""
    out = []
    mib = f"{nbytes / 2**20:g} MiB"
    # A read is a read: the float32 NumPy sum is a candidate for either dtype.
    data = np.full(nbytes // 4, 1.0, dtype=np.float32)
    out.append(_candidate("numpy.sum", "read", lambda: data.sum(), repeats, data.nbytes, "GB/s",
                          f"{mib} float32"))
    del data
    side = int((nbytes // 4) ** 0.5)
    if dtype == "fp32":
        m = np.full((side, side), 0.5, dtype=np.float32)
        v = np.full(side, 0.25, dtype=np.float32)
        out.append(_candidate("numpy GEMV", "GEMV", lambda: m @ v, repeats, m.nbytes, "GB/s",
                              f"{side}x{side} float32"))
        del m, v
    try:
        torch = peers.torch_module()
        tdt = peers.torch_dtype(dtype)
        itemsize = torch.tensor([], dtype=tdt).element_size()
        with torch.inference_mode():
            t = torch.ones(nbytes // itemsize, dtype=tdt)
            out.append(_candidate("torch.sum", "read", lambda: t.sum(), repeats, t.numel() * itemsize,
                                  "GB/s", f"{mib} {dtype}"))
            del t
            rows = nbytes // itemsize // side
            m = torch.ones((rows, side), dtype=tdt)
            v = torch.ones(side, dtype=tdt)
            out.append(_candidate("torch.mv", "GEMV", lambda: torch.mv(m, v), repeats,
                                  m.numel() * itemsize, "GB/s", f"{rows}x{side} {dtype}"))
            del m, v
    except peers.Unavailable as e:
        out.append(_unavailable("torch.sum", "read", "GB/s", str(e)))
        out.append(_unavailable("torch.mv", "GEMV", "GB/s", str(e)))
    return out


def _best(candidates):
    ok = [c for c in candidates if c["value"] is not None]
    return max(ok, key=lambda c: c["value"]) if ok else None


def measure(dtype, n=COMPUTE_N, nbytes=BANDWIDTH_BYTES, repeats=3):
    """{"compute_gflop_per_s", "compute_by", "bandwidth_gb_per_s", "bandwidth_by", "candidates"}."""
    comp, band = compute(dtype, n, repeats), bandwidth(dtype, nbytes, repeats)
    best_c, best_b = _best(comp), _best(band)
    return {
        "compute_gflop_per_s": best_c and best_c["value"], "compute_by": best_c and best_c["name"],
        "bandwidth_gb_per_s": best_b and best_b["value"], "bandwidth_by": best_b and best_b["name"],
        "candidates": comp + band,
    }
