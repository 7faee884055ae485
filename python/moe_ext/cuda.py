"""moe_ext.cuda: the CUDA kernels on torch CUDA tensors (the launchers of `moe_ext._cuda` underneath).

The torch custom ops (`moe_ext.torch`) register these as the CUDA kernels of `torch.ops.moe_ext.*`.
Every function runs on `torch.cuda.current_stream()` of its tensors' device and allocates its outputs
with torch (so the caching allocator and CUDA graphs see them). Nothing synchronises with the host except
the value checks `check_ids=True` / `check_offsets=True` (the default), which read one reduction back.
Under CUDA graph capture (torch.cuda.graph) the checks run on the device instead and count failures,
which `raise_capture_errors()` turns into a ValueError after the replay; `moe` (router ids are in range
by construction) and calls with the checks off never synchronise. Every call here can be captured.

Signatures (T tokens, d hidden, f intermediate, E experts, k top-k; M rows of the permuted layout):

    available() -> bool                     # built with CUDA and a device is present
    raise_capture_errors(device=None)       # ValueError if value checks failed in graph replays (host sync)
    device_count() -> int                   # 0 without a GPU or driver (never raises)
    route(x [T,d], w_router [E,d], top_k, *, scoring="softmax", renormalize=True, scale=1.0,
          bias=None [E] f32, correction_bias=None [E] f32, n_group=None, topk_group=None,
          return_probs=False) -> (topk_weights [T,k] f32, topk_ids [T,k] i32[, probs [T,E] f32])
    permute(x [T,d], topk_ids [T,k], num_experts, *, capacity=None, check_ids=True)
          -> (x_perm [M,d], expert_offsets [E+1] i32, perm_rows [T,k] i32)
          M = T*k; with capacity C, M = min(T*k, E*C) and rows expert_offsets[E]..M-1 are zeros
          (the kept count is only known on the device; no host synchronisation).
    grouped_gemm(a [M,K], w [E,N,K], expert_offsets [E+1], *, activation=None, bias=None [E,N] f32,
                 check_offsets=True)
          -> out [M,N] = a @ w[e]^T (+ bias[e]); with a gated activation -> [M, N/2] (w = w13: gate and up
             rows [gate | up] or interleaved, as the description says), else act(out) [M,N].
             Rows expert_offsets[E]..M-1 are zeros (no bias).
    activate(h [M,2f or f], activation) -> [M,f]
    unpermute(y_perm [M,d], perm_rows [T,k], topk_weights [T,k] f32) -> y [T,d]
    experts(x, w13_or_w1, w2, topk_weights, topk_ids, *, activation="swiglu", capacity=None,
            check_ids=True, b13_or_b1=None, b2=None) -> y [T,d]
          # permute -> GEMM1 (+ b13_or_b1) + fused activation -> GEMM2 (+ b2) -> unpermute
    moe(x, w_router, w13_or_w1, w2, top_k, *, activation="swiglu", <route keywords>, capacity=None,
        b13_or_b1=None, b2=None) -> y [T,d]
    # backward
    grouped_gemm_backward(d_out [M,N], a [M,K], w [E,N,K], expert_offsets, *, need_a=True, need_w=True)
          -> (d_a [M,K] or None, d_w [E,N,K] or None)   # d_a = d_out @ w[e]; d_w[e] = d_out[rows]^T a[rows]
    activation_backward(h [M,2f or f], d_act [M,f], activation) -> d_h (shape of h)
    unpermute_backward(dy [T,d], y_perm [M,d], perm_rows, topk_weights)
          -> (d_y_perm [M,d], d_topk_weights [T,k] f32)
    permute_backward(d_x_perm [M,d], perm_rows [T,k]) -> d_x [T,d]
    bias_grad(d_out [M,N], expert_offsets [E+1]) -> d_bias [E,N] f32  # d_out's rows summed per expert

Activations: `activation` is a description, as everywhere in moe_ext (SPEC §3.6): a preset name
("swiglu", "geglu", "geglu_tanh", "relu", "gelu", "gelu_tanh", "relu2"), a canonical string such as
"swiglu(alpha=1.702,limit=7.0,up_offset=1.0,interleaved)" or a moe_ext.Activation; the kernels compute
the CPU kernels' formulas in float32. Expert biases b13_or_b1 [E, 2f or f] (w13_or_w1's row order) and
b2 [E, d] are float32, added to the float32 products before the activation and before the combine.

Dtypes: x, weights and every activation tensor share one dtype, float32, bfloat16 or float16
(float32 is exact float32 math: no TF32); accumulation is float32; scores and top-k weights are float32;
index tensors are int32 (int64 topk_ids are accepted and converted). All tensors contiguous, on one CUDA
device. Errors: TypeError (not a tensor, wrong dtype), ValueError (shape, contiguity, values, a tensor
on the wrong device), RuntimeError (moe_ext built without CUDA, or no CUDA device present).
"""
import importlib
import importlib.util
import warnings

import torch

from moe_ext._activation import activation_from


def _load_extension():
    """moe_ext._cuda, or None in a build without CUDA (no such module: the one silent case). A module that
    is there but does not load (a missing symbol, a wrong runtime, a file for another Python) raises
    ImportError with the loader's message: a broken build must never look like a CPU-only one, which
    would turn every GPU test into a skip."""
    spec = importlib.util.find_spec(__name__.rpartition(".")[0] + "._cuda")
    if spec is None:
        return None
    try:
        return importlib.import_module(spec.name)
    except ImportError as error:
        raise ImportError(f"moe_ext._cuda is installed ({spec.origin}) but failed to load: {error}. "
                          "Rebuild moe_ext, or build it without CUDA (-Ccmake.define.MOE_EXT_CUDA=OFF).") from error


_cuda = _load_extension()

__all__ = [
    "available", "device_count", "raise_capture_errors", "route", "permute", "grouped_gemm", "activate",
    "unpermute", "experts", "moe", "grouped_gemm_backward", "activation_backward", "unpermute_backward",
    "permute_backward", "bias_grad",
]

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_FLOATS = tuple(_DTYPE_CODES)
_INDEX = (torch.int32,)
_SCORINGS = {"softmax": 0, "sigmoid": 1}


def device_count():
    """CUDA devices moe_ext._cuda sees: 0 without a GPU or driver, or in a CPU-only build."""
    return _cuda.device_count() if _cuda is not None else 0


def available():
    return device_count() > 0


# ------------------------------------------------------------------------------------------ checks
def _fail(exc, name, expected, got):
    raise exc(f"{name}: expected {expected}; got {got}")


def _tensor(t, name, ndim, dtypes=_FLOATS, shape=None):
    """A contiguous tensor of one of `dtypes`, rank `ndim` and `shape` (None entries match any size)."""
    if not isinstance(t, torch.Tensor):
        _fail(TypeError, name, "a torch.Tensor", type(t).__name__)
    if t.dtype not in dtypes:
        _fail(TypeError, name, "dtype " + " or ".join(str(d) for d in dtypes), str(t.dtype))
    if t.dim() != ndim:
        _fail(ValueError, name, f"a {ndim}-D tensor", f"shape {tuple(t.shape)}")
    if shape is not None and any(want is not None and want != got for want, got in zip(shape, t.shape)):
        wanted = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        _fail(ValueError, name, f"shape {wanted}", f"shape {tuple(t.shape)}")
    if not t.is_contiguous():
        _fail(ValueError, name, "a contiguous tensor", f"strides {t.stride()}")
    return t


def _same_dtype(pairs):
    first_name, first = pairs[0]
    for name, t in pairs[1:]:
        if t.dtype != first.dtype:
            _fail(TypeError, name, f"the dtype of {first_name} ({first.dtype})", str(t.dtype))


def _integer(value, name, low, high=None):
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(TypeError, name, "an int", type(value).__name__)
    if value < low or (high is not None and value > high):
        _fail(ValueError, name, f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}",
              value)
    return value


def _choice(value, name, choices):
    if value not in choices:
        _fail(ValueError, name, "one of " + ", ".join(repr(c) for c in choices), repr(value))
    return value


def _device(fn, **tensors):
    """The one CUDA device all given tensors are on; RuntimeError when CUDA is missing altogether."""
    if _cuda is None:
        raise RuntimeError(f"moe_ext.cuda.{fn}: this moe_ext was built without CUDA (no nvcc at build time)")
    if device_count() == 0:
        raise RuntimeError(f"moe_ext.cuda.{fn}: no CUDA device is available (CUDA runtime: "
                           f"{_cuda.runtime_error()}); the CUDA kernels need an NVIDIA GPU (sm_80 or later)")
    device = None
    for name, t in tensors.items():
        if t is None:
            continue
        if t.device.type != "cuda":
            _fail(ValueError, name, "a CUDA tensor", f"a tensor on {t.device}")
        if device is None:
            device = t.device
        elif t.device != device:
            _fail(ValueError, name, f"a tensor on {device} (the device of the other arguments)", str(t.device))
    return device


def _stream(device):
    return torch.cuda.current_stream(device).cuda_stream


def _ptr(t):
    return 0 if t is None else t.data_ptr()


def _activation(activation):
    """The moe_ext.Activation of a description (ValueError / TypeError naming `activation` otherwise)."""
    return activation_from(activation)


def _bias(bias, name, E, N):
    """None, or a contiguous float32 [E, N] tensor."""
    return None if bias is None else _tensor(bias, name, 2, (torch.float32,), (E, N))


def _ids(topk_ids, T, name="topk_ids"):
    topk_ids = _tensor(topk_ids, name, 2, (torch.int32, torch.int64), (T, None))
    return topk_ids


# ------------------------------------------------------------------------------------------ value checks
# check_ids / check_offsets (on by default) need the values, which live on the device. Outside CUDA graph
# capture they are read back (one small reduction: a host synchronisation) and a bad value is a ValueError
# at once. Under capture a read-back is forbidden, so the same test runs on the device instead and adds
# to a per-device error counter, which raise_capture_errors() reads after the replay. The kernels never
# need the checks for memory safety: ids outside 0..E-1 are dropped (never dereferenced, they add
# nothing) and offsets are clamped to 0..M, so an unchecked bad value gives wrong numbers, never an
# out-of-bounds access.
_ID_CHECK, _OFFSET_CHECK = 0, 1
_capture_errors = {}  # torch.device -> int32 [2] counters (bad topk_ids, bad expert_offsets) under capture
_warned_no_counter = set()


def _capturing():
    """Whether the current stream is capturing a CUDA graph (False with a torch built without CUDA)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _error_counter(device):
    """The device's counters, made on first use outside capture (allocating them during a capture would
    put them in the graph's private memory pool, zeroed only at replay). None if capture came first."""
    counter = _capture_errors.get(device)
    if counter is None and not _capturing():
        counter = _capture_errors[device] = torch.zeros(2, dtype=torch.int32, device=device)
    return counter


def _count_on_device(device, which, bad, fn):
    counter = _error_counter(device)
    if counter is None:
        if (device, which) not in _warned_no_counter:
            _warned_no_counter.add((device, which))
            warnings.warn(f"moe_ext.cuda.{fn}: captured before any eager moe_ext.cuda call on {device}, so the "
                          "value checks of this capture are skipped (invalid ids are dropped and offsets clamped "
                          "by the kernels: no out-of-bounds access). Run one eager call (a warm-up) first.",
                          RuntimeWarning, stacklevel=4)
        return
    counter[which:which + 1].add_(bad.reshape(1).to(torch.int32))


def raise_capture_errors(device=None):
    """Reads (a host synchronisation) and clears the counters of the value checks that ran under CUDA graph
    capture on `device` (default: the current one): ValueError if any captured call, in any replay since
    the last read, saw expert ids outside 0..E-1 or expert offsets that were not a non-decreasing cover of
    0..M. Call it after replaying a graph that holds moe_ext calls; eager calls raise at once instead."""
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    counter = _capture_errors.get(device)
    if counter is None:
        return
    bad_ids, bad_offsets = (int(v) for v in counter.cpu())
    counter.zero_()
    if bad_ids or bad_offsets:
        raise ValueError(f"moe_ext.cuda: in CUDA graph replays on {device}, {bad_ids} call(s) had topk_ids outside "
                         f"0..E-1 and {bad_offsets} had expert_offsets that were not a non-decreasing cover of "
                         "0..M; those copies were dropped (offsets clamped), so their outputs are wrong")


def _check_id_values(topk_ids, E, device=None, fn="permute", name="topk_ids"):
    if topk_ids.numel() == 0:
        return
    if _capturing():
        _count_on_device(device or topk_ids.device, _ID_CHECK, ((topk_ids < 0) | (topk_ids >= E)).any(), fn)
        return
    _error_counter(device or topk_ids.device)  # exists before any capture that follows this call
    low, high = (int(v) for v in torch.stack([topk_ids.min(), topk_ids.max()]).cpu())
    if low < 0 or high >= E:
        _fail(ValueError, name, f"expert ids in [0, {E - 1}]", f"values in [{low}, {high}]")


def _check_offset_values(offsets, M, device=None, fn="grouped_gemm", name="expert_offsets"):
    if _capturing():
        bad = (offsets[0] != 0) | (offsets[-1] != M) | (offsets[1:] < offsets[:-1]).any()
        _count_on_device(device or offsets.device, _OFFSET_CHECK, bad, fn)
        return
    _error_counter(device or offsets.device)
    o = offsets.cpu()
    if int(o[0]) != 0 or int(o[-1]) != M or bool((o[1:] < o[:-1]).any()):
        _fail(ValueError, name, f"a non-decreasing cover of 0..{M} (offsets[0] = 0, offsets[E] = {M})",
              o.tolist() if o.numel() <= 16 else f"offsets[0] = {int(o[0])}, offsets[E] = {int(o[-1])}")


# Debugging aid (the GPU tests turn it on): fill every output the kernels must write with NaN (float) or
# INT32_MAX (int32) instead of leaving it uninitialised, so an element a kernel fails to write shows up.
POISON_OUTPUTS = False


def _new(shape, dtype, device):
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if not POISON_OUTPUTS:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.full(shape, float("nan") if dtype.is_floating_point else 2**31 - 1, dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------ forward
def route(x, w_router, top_k, *, scoring="softmax", renormalize=True, scale=1.0, bias=None,
          correction_bias=None, n_group=None, topk_group=None, return_probs=False):
    x = _tensor(x, "x", 2)
    w_router = _tensor(w_router, "w_router", 2, shape=(None, x.shape[1]))
    _same_dtype([("x", x), ("w_router", w_router)])
    E = w_router.shape[0]
    if E < 1:
        _fail(ValueError, "w_router", "at least one expert (E >= 1)", f"shape {tuple(w_router.shape)}")
    top_k = _integer(top_k, "top_k", 1, E)
    scoring = _choice(scoring, "scoring", tuple(_SCORINGS))
    if bias is not None:
        bias = _tensor(bias, "bias", 1, (torch.float32,), (E,))
    if correction_bias is not None:
        correction_bias = _tensor(correction_bias, "correction_bias", 1, (torch.float32,), (E,))
    if (n_group is None) != (topk_group is None):
        _fail(ValueError, "n_group", "n_group and topk_group both given or both None",
              f"n_group={n_group!r}, topk_group={topk_group!r}")
    device = _device("route", x=x, w_router=w_router, bias=bias, correction_bias=correction_bias)
    T = x.shape[0]
    weights = _new((T, top_k), dtype=torch.float32, device=device)
    ids = _new((T, top_k), dtype=torch.int32, device=device)
    probs = _new((T, E), dtype=torch.float32, device=device) if return_probs else None
    with torch.cuda.device(device):
        _cuda.route(x.data_ptr(), w_router.data_ptr(), T, x.shape[1], E, _DTYPE_CODES[x.dtype], top_k,
                    _SCORINGS[scoring], bool(renormalize), float(scale), _ptr(bias), _ptr(correction_bias),
                    n_group or 0, topk_group or 0, weights.data_ptr(), ids.data_ptr(), _ptr(probs),
                    _stream(device))
    return (weights, ids, probs) if return_probs else (weights, ids)


def _plan(topk_ids, E, capacity, device):
    T, k = topk_ids.shape
    offsets = _new(E + 1, dtype=torch.int32, device=device)
    perm_rows = _new((T, k), dtype=torch.int32, device=device)
    scratch = torch.empty(max(_cuda.permute_scratch_bytes(T, k, E), 1), dtype=torch.uint8, device=device)
    _cuda.permute_plan(topk_ids.data_ptr(), T, k, E, -1 if capacity is None else capacity, offsets.data_ptr(),
                       perm_rows.data_ptr(), scratch.data_ptr(), _stream(device))
    return offsets, perm_rows


def _permuted_rows(T, k, E, capacity):
    return T * k if capacity is None else min(T * k, E * capacity)


def permute(x, topk_ids, num_experts, *, capacity=None, check_ids=True):
    x = _tensor(x, "x", 2)
    topk_ids = _ids(topk_ids, x.shape[0])
    E = _integer(num_experts, "num_experts", 1, 2**31 - 1)
    if capacity is not None:
        capacity = _integer(capacity, "capacity", 0)
    device = _device("permute", x=x, topk_ids=topk_ids)
    if check_ids:
        _check_id_values(topk_ids, E, device)
    topk_ids = topk_ids.to(torch.int32)
    T, k = topk_ids.shape
    M = _permuted_rows(T, k, E, capacity)
    with torch.cuda.device(device):
        offsets, perm_rows = _plan(topk_ids, E, capacity, device)
        padded = capacity is not None or not check_ids  # some rows may be owned by no copy
        x_perm = (torch.zeros if padded else torch.empty)((M, x.shape[1]), dtype=x.dtype, device=device)
        _cuda.gather_rows(x.data_ptr(), perm_rows.data_ptr(), T, k, x.shape[1], M, _DTYPE_CODES[x.dtype],
                          x_perm.data_ptr(), _stream(device))
    return x_perm, offsets, perm_rows


def grouped_gemm(a, w, expert_offsets, *, activation=None, bias=None, check_offsets=True):
    a = _tensor(a, "a", 2)
    w = _tensor(w, "w", 3, shape=(None, None, a.shape[1]))
    _same_dtype([("a", a), ("w", w)])
    E, N, K = w.shape
    if E < 1:
        _fail(ValueError, "w", "at least one expert (E >= 1)", f"shape {tuple(w.shape)}")
    expert_offsets = _tensor(expert_offsets, "expert_offsets", 1, _INDEX, (E + 1,))
    act = None if activation is None else _activation(activation)
    gated = act is not None and act.gated
    if gated and N % 2:
        _fail(ValueError, "w", f"an even number of rows N = 2f for the gated activation {act.spec!r}", f"N = {N}")
    bias = _bias(bias, "bias", E, N)
    device = _device("grouped_gemm", a=a, w=w, expert_offsets=expert_offsets, bias=bias)
    M = a.shape[0]
    if check_offsets:
        _check_offset_values(expert_offsets, M, device)
    out = _new((M, N // 2 if gated else N), dtype=a.dtype, device=device)
    with torch.cuda.device(device):
        _cuda.grouped_gemm(a.data_ptr(), w.data_ptr(), expert_offsets.data_ptr(), E, M, N, K, _DTYPE_CODES[a.dtype],
                           act, _ptr(bias), out.data_ptr(), _stream(device))
    return out


def _activation_columns(h, act):
    """f of h [M, 2f] (gated) or [M, f]."""
    if act.gated and h.shape[1] % 2:
        _fail(ValueError, "h", f"an even number of columns 2f for the gated activation {act.spec!r}",
              f"shape {tuple(h.shape)}")
    return h.shape[1] // 2 if act.gated else h.shape[1]


def activate(h, activation):
    h = _tensor(h, "h", 2)
    act = _activation(activation)
    M, f = h.shape[0], _activation_columns(h, act)
    device = _device("activate", h=h)
    out = _new((M, f), dtype=h.dtype, device=device)
    with torch.cuda.device(device):
        _cuda.activate(h.data_ptr(), M, f, act, _DTYPE_CODES[h.dtype], out.data_ptr(), _stream(device))
    return out


def unpermute(y_perm, perm_rows, topk_weights):
    y_perm = _tensor(y_perm, "y_perm", 2)
    perm_rows = _tensor(perm_rows, "perm_rows", 2, _INDEX)
    topk_weights = _tensor(topk_weights, "topk_weights", 2, (torch.float32,), tuple(perm_rows.shape))
    device = _device("unpermute", y_perm=y_perm, perm_rows=perm_rows, topk_weights=topk_weights)
    (T, k), (M, d) = perm_rows.shape, y_perm.shape
    y = _new((T, d), dtype=y_perm.dtype, device=device)
    with torch.cuda.device(device):
        _cuda.unpermute(y_perm.data_ptr(), perm_rows.data_ptr(), topk_weights.data_ptr(), T, k, d, M,
                        _DTYPE_CODES[y_perm.dtype], y.data_ptr(), _stream(device))
    return y


def _expert_weights(x, w13_or_w1, w2, activation, b13_or_b1=None, b2=None):
    """(w13_or_w1, w2, Activation, b13_or_b1, b2), checked."""
    act = _activation(activation)
    w2 = _tensor(w2, "w2", 3, shape=(None, x.shape[1], None))
    E, d, f = w2.shape
    rows = 2 * f if act.gated else f
    w13_or_w1 = _tensor(w13_or_w1, "w13_or_w1", 3, shape=(E, rows, d))
    _same_dtype([("x", x), ("w13_or_w1", w13_or_w1), ("w2", w2)])
    if E < 1:
        _fail(ValueError, "w2", "at least one expert (E >= 1)", f"shape {tuple(w2.shape)}")
    return w13_or_w1, w2, act, _bias(b13_or_b1, "b13_or_b1", E, rows), _bias(b2, "b2", E, d)


def _experts(x, w13_or_w1, w2, topk_weights, topk_ids, act, capacity, check_ids, device, b13_or_b1, b2):
    E, d, f = w2.shape
    T, k = topk_ids.shape
    x_perm, offsets, perm_rows = permute(x, topk_ids, E, capacity=capacity, check_ids=check_ids)
    M = x_perm.shape[0]
    code = _DTYPE_CODES[x.dtype]
    stream = _stream(device)
    with torch.cuda.device(device):
        hidden = _new((M, f), dtype=x.dtype, device=device)
        _cuda.grouped_gemm(x_perm.data_ptr(), w13_or_w1.data_ptr(), offsets.data_ptr(), E, M, w13_or_w1.shape[1], d,
                           code, act, _ptr(b13_or_b1), hidden.data_ptr(), stream)
        y_perm = _new((M, d), dtype=x.dtype, device=device)
        _cuda.grouped_gemm(hidden.data_ptr(), w2.data_ptr(), offsets.data_ptr(), E, M, d, f, code, None, _ptr(b2),
                           y_perm.data_ptr(), stream)
        y = _new((T, d), dtype=x.dtype, device=device)
        _cuda.unpermute(y_perm.data_ptr(), perm_rows.data_ptr(), topk_weights.data_ptr(), T, k, d, M, code,
                        y.data_ptr(), stream)
    return y


def experts(x, w13_or_w1, w2, topk_weights, topk_ids, *, activation="swiglu", capacity=None, check_ids=True,
            b13_or_b1=None, b2=None):
    x = _tensor(x, "x", 2)
    w13_or_w1, w2, act, b13_or_b1, b2 = _expert_weights(x, w13_or_w1, w2, activation, b13_or_b1, b2)
    topk_ids = _ids(topk_ids, x.shape[0])
    topk_weights = _tensor(topk_weights, "topk_weights", 2, (torch.float32,), tuple(topk_ids.shape))
    if capacity is not None:
        capacity = _integer(capacity, "capacity", 0)
    device = _device("experts", x=x, w13_or_w1=w13_or_w1, w2=w2, topk_weights=topk_weights, topk_ids=topk_ids,
                     b13_or_b1=b13_or_b1, b2=b2)
    return _experts(x, w13_or_w1, w2, topk_weights, topk_ids, act, capacity, check_ids, device, b13_or_b1, b2)


def moe(x, w_router, w13_or_w1, w2, top_k, *, activation="swiglu", scoring="softmax", renormalize=True,
        scale=1.0, bias=None, correction_bias=None, n_group=None, topk_group=None, capacity=None, b13_or_b1=None,
        b2=None):
    x = _tensor(x, "x", 2)
    w13_or_w1, w2, act, b13_or_b1, b2 = _expert_weights(x, w13_or_w1, w2, activation, b13_or_b1, b2)
    if capacity is not None:
        capacity = _integer(capacity, "capacity", 0)
    weights, ids = route(x, w_router, top_k, scoring=scoring, renormalize=renormalize, scale=scale, bias=bias,
                         correction_bias=correction_bias, n_group=n_group, topk_group=topk_group)
    if w_router.shape[0] != w2.shape[0]:
        _fail(ValueError, "w_router", f"{w2.shape[0]} experts (w2.shape[0])", f"shape {tuple(w_router.shape)}")
    device = _device("moe", x=x, w13_or_w1=w13_or_w1, w2=w2, b13_or_b1=b13_or_b1, b2=b2)
    # The router's ids are in range by construction: no host round trip to check them.
    return _experts(x, w13_or_w1, w2, weights, ids, act, capacity, False, device, b13_or_b1, b2)


# ------------------------------------------------------------------------------------------ backward
def grouped_gemm_backward(d_out, a, w, expert_offsets, *, need_a=True, need_w=True):
    a = _tensor(a, "a", 2)
    w = _tensor(w, "w", 3, shape=(None, None, a.shape[1]))
    E, N, K = w.shape
    M = a.shape[0]
    d_out = _tensor(d_out, "d_out", 2, shape=(M, N))
    _same_dtype([("a", a), ("w", w), ("d_out", d_out)])
    expert_offsets = _tensor(expert_offsets, "expert_offsets", 1, _INDEX, (E + 1,))
    device = _device("grouped_gemm_backward", d_out=d_out, a=a, w=w, expert_offsets=expert_offsets)
    code, stream = _DTYPE_CODES[a.dtype], _stream(device)
    d_a = d_w = None
    with torch.cuda.device(device):
        if need_a:  # d_a[rows of e] = d_out[rows] @ w[e] = d_out[rows] @ (w[e]^T)^T: the forward kernel on w^T
            w_t = _new((E, K, N), dtype=w.dtype, device=device)
            _cuda.transpose(w.data_ptr(), E, N, K, code, w_t.data_ptr(), stream)
            d_a = _new((M, K), dtype=a.dtype, device=device)
            _cuda.grouped_gemm(d_out.data_ptr(), w_t.data_ptr(), expert_offsets.data_ptr(), E, M, K, N, code, None,
                               0, d_a.data_ptr(), stream)
        if need_w:  # d_w[e] = d_out[rows]^T @ a[rows], reduced over the rows from the transposes
            d_out_t = _new((N, M), dtype=a.dtype, device=device)
            a_t = _new((K, M), dtype=a.dtype, device=device)
            _cuda.transpose(d_out.data_ptr(), 1, M, N, code, d_out_t.data_ptr(), stream)
            _cuda.transpose(a.data_ptr(), 1, M, K, code, a_t.data_ptr(), stream)
            d_w = _new((E, N, K), dtype=a.dtype, device=device)
            _cuda.grouped_gemm_dw(d_out_t.data_ptr(), a_t.data_ptr(), expert_offsets.data_ptr(), E, M, N, K, code,
                                  d_w.data_ptr(), stream)
    return d_a, d_w


def activation_backward(h, d_act, activation):
    h = _tensor(h, "h", 2)
    act = _activation(activation)
    M, f = h.shape[0], _activation_columns(h, act)
    d_act = _tensor(d_act, "d_act", 2, shape=(M, f))
    _same_dtype([("h", h), ("d_act", d_act)])
    device = _device("activation_backward", h=h, d_act=d_act)
    d_h = _new(h.shape, h.dtype, device)
    with torch.cuda.device(device):
        _cuda.activation_backward(h.data_ptr(), d_act.data_ptr(), M, f, act, _DTYPE_CODES[h.dtype], d_h.data_ptr(),
                                  _stream(device))
    return d_h


def bias_grad(d_out, expert_offsets, *, check_offsets=True):
    """d_bias [E, N] float32: d_out's rows of each expert summed (E = len(expert_offsets) - 1); the gradient of
    grouped_gemm's bias. Rows past expert_offsets[E] belong to no expert."""
    d_out = _tensor(d_out, "d_out", 2)
    expert_offsets = _tensor(expert_offsets, "expert_offsets", 1, _INDEX)
    E = expert_offsets.shape[0] - 1
    if E < 1:
        _fail(ValueError, "expert_offsets", "E + 1 >= 2 values (at least one expert)",
              f"shape {tuple(expert_offsets.shape)}")
    device = _device("bias_grad", d_out=d_out, expert_offsets=expert_offsets)
    M, N = d_out.shape
    if check_offsets:
        _check_offset_values(expert_offsets, M, device, fn="bias_grad")
    d_bias = _new((E, N), torch.float32, device)
    with torch.cuda.device(device):
        _cuda.bias_grad(d_out.data_ptr(), expert_offsets.data_ptr(), E, M, N, _DTYPE_CODES[d_out.dtype],
                        d_bias.data_ptr(), _stream(device))
    return d_bias


def unpermute_backward(dy, y_perm, perm_rows, topk_weights):
    y_perm = _tensor(y_perm, "y_perm", 2)
    perm_rows = _tensor(perm_rows, "perm_rows", 2, _INDEX)
    (T, k), (M, d) = perm_rows.shape, y_perm.shape
    topk_weights = _tensor(topk_weights, "topk_weights", 2, (torch.float32,), (T, k))
    dy = _tensor(dy, "dy", 2, shape=(T, d))
    _same_dtype([("y_perm", y_perm), ("dy", dy)])
    device = _device("unpermute_backward", dy=dy, y_perm=y_perm, perm_rows=perm_rows, topk_weights=topk_weights)
    d_y_perm = torch.zeros((M, d), dtype=y_perm.dtype, device=device)  # rows no copy maps to stay 0
    d_weights = _new((T, k), dtype=torch.float32, device=device)
    with torch.cuda.device(device):
        _cuda.unpermute_backward(dy.data_ptr(), y_perm.data_ptr(), perm_rows.data_ptr(), topk_weights.data_ptr(), T,
                                 k, d, M, _DTYPE_CODES[dy.dtype], d_y_perm.data_ptr(), d_weights.data_ptr(),
                                 _stream(device))
    return d_y_perm, d_weights


def permute_backward(d_x_perm, perm_rows):
    d_x_perm = _tensor(d_x_perm, "d_x_perm", 2)
    perm_rows = _tensor(perm_rows, "perm_rows", 2, _INDEX)
    device = _device("permute_backward", d_x_perm=d_x_perm, perm_rows=perm_rows)
    (T, k), (M, d) = perm_rows.shape, d_x_perm.shape
    d_x = _new((T, d), dtype=d_x_perm.dtype, device=device)
    with torch.cuda.device(device):  # d_x[t] = sum_j d_x_perm[perm_rows[t, j]]: unpermute with unit weights
        _cuda.unpermute(d_x_perm.data_ptr(), perm_rows.data_ptr(), 0, T, k, d, M, _DTYPE_CODES[d_x_perm.dtype],
                        d_x.data_ptr(), _stream(device))
    return d_x
