"""What the GPU tests of tests/cuda share: whether they may run, and how they compare.

Whether (fixture `gpu`): a GPU test runs where moe_ext._cuda loads and sees a device that torch sees too.
Otherwise it is skipped with the precise reason, except under MOE_EXT_REQUIRE_GPU=1 (the device run sets
it), where it fails: a GPU run must not turn into a pass of skips. A moe_ext._cuda that is installed but
does not load is never a skip: importing moe_ext.cuda raises the loader's message, and so does the test.

How (assert_rows_close): element by element, never through one norm that hides a wrong row. Every element
of the result must be finite; per row (the last axis), max |got - want| over the row's max |want| must stay
within the dtype's tolerance; a row whose reference is all zeros must be exactly zero. The kernels'
outputs are pre-filled with NaN / INT32_MAX (fixture `poisoned`), so an element a kernel never writes
fails the isfinite test or the comparison instead of passing as the zero that fresh memory often holds.

Tolerances (per-row max relative error against a float64 reference computed from the same rounded
inputs). The CUDA kernels accumulate in float32 and round the intermediates (h after the fused
activation, y_perm) and the outputs to the dtype. Emulating exactly that rounding chain on the CPU for the
fused layer on the test shapes gives at most 7.5e-4 (float16) and 7.1e-3 (bfloat16); a single rounding
to the dtype is at most its unit roundoff (4.9e-4, 3.9e-3) of the row's largest element. float32 (no TF32,
exact products, K <= 1024): ~sqrt(K) * 6e-8 ~ 2e-6 typical. The bounds below leave 4-5x of margin; a
wrong row, tile or expert gives errors of order 1.
"""
import functools
import importlib.util
import os

import numpy as np
import pytest

REQUIRE_GPU = os.environ.get("MOE_EXT_REQUIRE_GPU") == "1"
RTOL = {"float32": 2e-5, "float16": 4e-3, "bfloat16": 3e-2}
# router weights: the same float32 logits (inputs chosen so the logits are exact, see test_cuda_gpu.py)
# through expf and one division on each side: a few float32 ulps
ROUTE_WEIGHT_RTOL = 2e-6


def import_torch():
    """torch, or a skip without it; under MOE_EXT_REQUIRE_GPU=1 a missing torch is an error."""
    if REQUIRE_GPU:
        import torch
        return torch
    return pytest.importorskip("torch")


def on_gpu(array, dtype):
    """A NumPy array as a CUDA tensor of `dtype` (through float32)."""
    return import_torch().from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to("cuda", dtype)


def f64(t):
    """A tensor as a float64 NumPy array."""
    return t.detach().double().cpu().numpy()


def ids_on_gpu(ids):
    """Expert ids or offsets as an int32 CUDA tensor."""
    return import_torch().from_numpy(np.ascontiguousarray(ids, dtype=np.int32)).cuda()


@functools.lru_cache(maxsize=None)
def _status():
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if importlib.util.find_spec("moe_ext._cuda") is None:
        return False, "moe_ext built without CUDA (no nvcc at build time)"
    from moe_ext import cuda  # a module that is there but does not load raises here, with the loader's message
    if cuda.device_count() == 0:
        return False, f"no CUDA device (moe_ext._cuda: {cuda._cuda.runtime_error() or 'none visible'})"
    if not torch.cuda.is_available():
        return False, f"no CUDA device visible to torch {torch.__version__} (torch.version.cuda = {torch.version.cuda})"
    return True, ""


def gpu_status():
    """(present, reason): whether the GPU tests can run here, and if not, why."""
    return _status()


@pytest.fixture
def gpu():
    present, reason = gpu_status()
    if not present:
        if REQUIRE_GPU:
            pytest.fail(f"MOE_EXT_REQUIRE_GPU=1 but {reason}", pytrace=False)
        pytest.skip(reason)


@pytest.fixture
def poisoned(monkeypatch, gpu):
    """moe_ext.cuda with every output it allocates pre-filled with NaN (floats) / INT32_MAX (int32)."""
    from moe_ext import cuda
    monkeypatch.setattr(cuda, "POISON_OUTPUTS", True)
    return cuda


def _numpy64(t):
    if hasattr(t, "detach"):
        t = t.detach()
        if t.is_floating_point():
            t = t.double()
        t = t.cpu().numpy()
    return np.asarray(t, dtype=np.float64)


def row_errors(got, want, floor=0.0):
    """Per row (all axes but the last flattened into rows): max |got - want| / max |want|; rows whose
    reference is all zeros give 0 if got is all zeros there too, else inf. Non-finite got: inf.
    floor > 0: a row's scale is at least floor * (the largest |want| anywhere), for whole-model gradients,
    where rows far smaller than the rest carry noise propagated from everywhere else (kernel tests use 0)."""
    got, want = _numpy64(got), _numpy64(want)
    assert got.shape == want.shape, f"shape {got.shape}, expected {want.shape}"
    if got.size == 0:
        return np.zeros(0)
    cols = got.shape[-1] if got.ndim else 1
    got, want = got.reshape(-1, cols), want.reshape(-1, cols)
    with np.errstate(invalid="ignore", divide="ignore"):
        diff = np.abs(got - want).max(axis=1)
        scale = np.maximum(np.abs(want).max(axis=1), floor * np.abs(want).max())
        err = np.where(scale > 0, diff / np.where(scale > 0, scale, 1.0), np.where(diff == 0, 0.0, np.inf))
    err[~np.isfinite(got).all(axis=1)] = np.inf
    return err


def assert_rows_close(got, want, rtol, what="result", floor=0.0):
    """Every element finite, and each row within rtol (see the module docstring and row_errors)."""
    g = _numpy64(got)
    bad = ~np.isfinite(g)
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {g.size} elements not finite (unwritten or overflowed), "
                           f"first at index {tuple(int(i) for i in np.argwhere(bad)[0])}")
    want = _numpy64(want)
    assert np.isfinite(want).all(), f"{what}: the reference itself is not finite"
    err = row_errors(g, want, floor)
    if err.size:
        row = int(np.argmax(err))
        got_row, want_row = g.reshape(err.size, -1)[row], want.reshape(err.size, -1)[row]
        assert err[row] <= rtol, (f"{what}: row {row} has max relative error {err[row]:.3g} > {rtol:g} "
                                  f"(got {got_row[:4]}, want {want_row[:4]})")


def assert_equal(got, want, what="result"):
    """Exact equality (indices, offsets, data movement), with the first mismatch named."""
    g, w = _numpy64(got), _numpy64(want)
    assert g.shape == w.shape, f"{what}: shape {g.shape}, expected {w.shape}"
    mismatch = g != w
    if mismatch.any():
        first = tuple(int(i) for i in np.argwhere(mismatch)[0])
        raise AssertionError(f"{what}: {int(mismatch.sum())} of {g.size} elements differ, first at {first}: "
                             f"got {g[first]}, want {w[first]}")
