"""This machine's ceilings, measured in the benchmark's own run (same process, same thread count).

* compute (GFLOP/s): the faster of a large torch.mm and a large NumPy matmul (n x n by n x n,
  2*n^3 FLOPs) in the dtype; for bf16, torch.mm in bf16 and NumPy's float32 matmul: widened to float32,
  bf16 runs at least at the float32 rate, so that is a floor of the machine's bf16 ceiling (a CPU without
  bf16 instructions otherwise shows torch's bf16 fallback, ~0.3 GFLOP/s on AVX2, as its "ceiling").
* bandwidth (GB/s): the best of a large read (NumPy sum over a float32 array, torch sum in the dtype),
  a large copy (SPEC §6; NumPy copyto and torch copy_, counting the bytes read plus the bytes written)
  and a large GEMV (torch.mv in the dtype, NumPy float32 matrix @ vector), counting the bytes of the big
  operand once. NumPy's sum and copy run on one thread; torch's and the GEMVs on all of them.

Each candidate reports its best of `repeats` timed calls after one warm-up (a ceiling is the best the
machine did, not a typical run). A candidate that cannot run (no torch, ...) is listed with the reason.
"""
import time

import numpy as np

from . import peers

COMPUTE_N = 2048
BANDWIDTH_BYTES = 1 << 30
REPEATS = 3  # per pass; the harness measures twice (start and end of the run)


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


def compute(dtype, n=COMPUTE_N, repeats=REPEATS):
    """Candidates and best GFLOP/s of an n x n matmul in `dtype` ("fp32" or "bf16")."""
    amount, size = 2.0 * n ** 3, f"{n}x{n} @ {n}x{n}"
    out = []
    try:
        torch = peers.torch_module()
        with torch.inference_mode():
            ta = torch.full((n, n), 0.5, dtype=peers.torch_dtype(dtype))
            tb = torch.full((n, n), 0.25, dtype=peers.torch_dtype(dtype))
            out.append(_candidate("torch.mm", "compute", lambda: torch.mm(ta, tb), repeats, amount,
                                  "GFLOP/s", size))
    except peers.Unavailable as e:
        out.append(_unavailable("torch.mm", "compute", "GFLOP/s", str(e)))
    a = np.full((n, n), 0.5, dtype=np.float32)
    b = np.full((n, n), 0.25, dtype=np.float32)
    name = "numpy.matmul" if dtype == "fp32" else "numpy.matmul float32 (bf16 widened)"
    out.append(_candidate(name, "compute", lambda: a @ b, repeats, amount, "GFLOP/s", size))
    return out


def bandwidth(dtype, nbytes=BANDWIDTH_BYTES, repeats=REPEATS):
    """Candidates of GB/s: large reads, copies and GEMVs over a buffer of about `nbytes` bytes (one for
    NumPy, then one for torch: at most one buffer is alive at a time)."""
    return _numpy_bandwidth(dtype, nbytes, repeats) + _torch_bandwidth(dtype, nbytes, repeats)


def _numpy_bandwidth(dtype, nbytes, repeats):
    # A read is a read: the float32 NumPy sum and copy are candidates for either dtype.
    mib = f"{nbytes / 2**20:g} MiB"
    n = nbytes // 4 // 2 * 2
    buf = np.full(n, 1.0, dtype=np.float32)
    half = n // 2
    out = [_candidate("numpy.sum", "read", lambda: buf.sum(), repeats, buf.nbytes, "GB/s", f"{mib} float32"),
           _candidate("numpy.copyto", "copy", lambda: np.copyto(buf[half:], buf[:half]), repeats,
                      buf.nbytes, "GB/s", f"{mib} read+written float32")]
    if dtype == "fp32":
        side = int(n ** 0.5)
        mat = buf[:side * side].reshape(side, side)
        vec = np.full(side, 0.25, dtype=np.float32)
        out.append(_candidate("numpy GEMV", "GEMV", lambda: mat @ vec, repeats, mat.nbytes, "GB/s",
                              f"{side}x{side} float32"))
    return out


def _torch_bandwidth(dtype, nbytes, repeats):
    try:
        torch = peers.torch_module()
    except peers.Unavailable as e:
        return [_unavailable(name, what, "GB/s", str(e))
                for name, what in (("torch.sum", "read"), ("torch copy_", "copy"), ("torch.mv", "GEMV"))]
    mib = f"{nbytes / 2**20:g} MiB"
    tdt = peers.torch_dtype(dtype)
    with torch.inference_mode():
        t = torch.ones(nbytes // torch.tensor([], dtype=tdt).element_size() // 2 * 2, dtype=tdt)
        size, h = t.numel() * t.element_size(), t.numel() // 2
        cols = int(t.numel() ** 0.5)
        rows = t.numel() // cols
        m = t[:rows * cols].view(rows, cols)
        v = torch.full((cols,), 0.25, dtype=tdt)
        return [
            _candidate("torch.sum", "read", lambda: t.sum(), repeats, size, "GB/s", f"{mib} {dtype}"),
            _candidate("torch copy_", "copy", lambda: t[h:2 * h].copy_(t[:h]), repeats,
                       2 * h * t.element_size(), "GB/s", f"{mib} read+written {dtype}"),
            _candidate("torch.mv", "GEMV", lambda: torch.mv(m, v), repeats, m.numel() * m.element_size(),
                       "GB/s", f"{rows}x{cols} {dtype}"),
        ]


def _best(candidates):
    ok = [c for c in candidates if c["value"] is not None]
    return max(ok, key=lambda c: c["value"]) if ok else None


def measure(dtype, n=COMPUTE_N, nbytes=BANDWIDTH_BYTES, repeats=REPEATS):
    """{"compute_gflop_per_s", "compute_by", "bandwidth_gb_per_s", "bandwidth_by", "candidates"}."""
    comp, band = compute(dtype, n, repeats), bandwidth(dtype, nbytes, repeats)
    best_c, best_b = _best(comp), _best(band)
    return {
        "compute_gflop_per_s": best_c and best_c["value"], "compute_by": best_c and best_c["name"],
        "bandwidth_gb_per_s": best_b and best_b["value"], "bandwidth_by": best_b and best_b["name"],
        "candidates": comp + band,
    }
