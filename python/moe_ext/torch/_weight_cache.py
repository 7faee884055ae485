"""The packed expert-weight cache: inference through moe_ext.torch.MoE and the "moe_ext" transformers backend
runs on prepacked weights (moe_ext.prepack) without user code. Semantics and cost: docs/api.md §8.

An entry is the PackedWeight of one weight tensor (a parameter, or a transposed view of one), keyed by the
identity of the tensor's storage (a weak reference: the entry dies with the storage) and its offset, shape,
strides and dtype. Every lookup also checks the tensor's data pointer and `_version`, which every in-place
update through the tensor or a view of it bumps (optimizer.step(), load_state_dict, copy_, `w[0] += 1`
under no_grad): a changed weight is packed again, never served stale. The packed copy costs about the
weight's bytes once more; `set_weight_cache` switches the cache off or bounds it, MOE_EXT_WEIGHT_CACHE=0
switches it off at import, and a RuntimeWarning says so the first time the cache grows past WARN_BYTES.
"""
import os
import threading
import warnings
import weakref
from typing import NamedTuple, Optional

import torch

import moe_ext

from . import _ops

WARN_BYTES = 256 << 20  # the first growth past this warns once (the cache costs the weights' bytes again)
# Calls in which no expert gets more than this many rows stay on the plain weights: there the grouped GEMM
# streams plain weight rows (kFewRows in csrc/cpu/grouped_gemm.cpp) instead of packing them, summing in
# another order than the packed kernel, and packed weights measured no faster (docs/api.md §8). So decode
# gives the uncached path's bits and never builds an entry.
FEW_ROWS = 16
_ENV = "MOE_EXT_WEIGHT_CACHE"


class WeightCacheInfo(NamedTuple):
    enabled: bool
    max_bytes: Optional[int]  # None: unbounded
    entries: int              # PackedWeights held
    bytes: int                # their size
    hits: int                 # weight lookups served by a valid entry
    misses: int               # weight lookups without one (new weight, or changed since it was packed)
    builds: int               # PackedWeights built (misses that fitted the budget)
    invalidations: int        # misses that found an entry of an older version / other memory (dropped)
    over_budget: int          # misses not packed because max_bytes would be exceeded (plain weight used)
    few_rows: int             # calls on the plain weights because no expert got more than FEW_ROWS rows
    bypassed: int             # calls that asked for the cache but ran the plain path for another reason


class _Entry(NamedTuple):
    storage_ref: weakref.ref
    data_ptr: int
    version: int
    packed: object  # moe_ext.PackedWeight


def _enabled_from_env():
    value = os.environ.get(_ENV, "1").strip().lower()
    if value in ("1", "true", "on", "yes", ""):
        return True
    if value in ("0", "false", "off", "no"):
        return False
    raise ValueError(f"{_ENV}: expected 0 or 1 (or true/false, on/off); got {value!r}")


_lock = threading.RLock()
_entries = {}
_counts = dict(hits=0, misses=0, builds=0, invalidations=0, over_budget=0, few_rows=0, bypassed=0)
_state = dict(enabled=_enabled_from_env(), max_bytes=None, bytes=0, warned=False)


def set_weight_cache(enabled: bool = True, max_bytes: Optional[int] = None) -> None:
    """Switch the packed expert-weight cache on or off, and bound its size (bytes; None: unbounded).
    Switching it off frees every entry; a bound below the current size frees them too (they are packed
    again, up to the bound, on the next inference calls). Weights that would exceed the bound run on the
    plain path (counted as over_budget)."""
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0):
        raise ValueError(f"max_bytes: expected None or an integer >= 0; got {max_bytes!r}")
    with _lock:
        _state["enabled"], _state["max_bytes"] = bool(enabled), max_bytes
        if not enabled or (max_bytes is not None and _state["bytes"] > max_bytes):
            _drop_all()


def weight_cache_info() -> WeightCacheInfo:
    """The cache's settings, size and counters (since import or the last clear_weight_cache())."""
    with _lock:
        return WeightCacheInfo(_state["enabled"], _state["max_bytes"], len(_entries), _state["bytes"], **_counts)


def clear_weight_cache() -> None:
    """Free every entry and zero the counters (settings unchanged)."""
    with _lock:
        _drop_all()
        for name in _counts:
            _counts[name] = 0


def _drop_all():
    _entries.clear()
    _state["bytes"] = 0


def _key(w):
    storage = w.untyped_storage()
    return storage, (id(storage), w.storage_offset(), tuple(w.shape), tuple(w.stride()), w.dtype)


def _forget(key, ref):
    """Weak-reference callback: the storage died, its entry goes (unless the key now holds a newer one)."""
    with _lock:
        entry = _entries.get(key)
        if entry is not None and entry.storage_ref is ref:
            _pop(key)


def _pop(key):
    entry = _entries.pop(key)
    _state["bytes"] -= entry.packed.nbytes


def release(*weights):
    """Free the entries of these weights (the training path calls this: a trained weight's packed copy
    would only be stale memory)."""
    with _lock:
        if not _entries:
            return
        for w in weights:
            if w is not None:
                key = _key(w)[1]
                if key in _entries:
                    _pop(key)


def _packed(w):
    """The PackedWeight of w (built on a miss), or w's NumPy view when the budget does not allow one."""
    storage, key = _key(w)
    version, data_ptr = w._version, w.data_ptr()
    entry = _entries.get(key)
    if entry is not None and entry.storage_ref() is storage and entry.version == version \
            and entry.data_ptr == data_ptr:
        _counts["hits"] += 1
        return entry.packed
    _counts["misses"] += 1
    if entry is not None:
        _counts["invalidations"] += 1
        _pop(key)
    array = _ops._np_weight(w, True)
    max_bytes = _state["max_bytes"]
    if max_bytes is not None and _state["bytes"] + array.nbytes > max_bytes:
        _counts["over_budget"] += 1
        return array
    packed = moe_ext.prepack(array)
    _counts["builds"] += 1
    _entries[key] = _Entry(weakref.ref(storage, lambda ref, key=key: _forget(key, ref)), data_ptr, version, packed)
    _state["bytes"] += packed.nbytes
    if _state["bytes"] > WARN_BYTES and not _state["warned"]:
        _state["warned"] = True
        warnings.warn(f"moe_ext.torch: the packed expert-weight cache now holds {_state['bytes'] / 2**20:.0f} MiB "
                      "(a packed copy of each expert weight used for inference: about the experts' size again). "
                      "moe_ext.torch.set_weight_cache(False) or MOE_EXT_WEIGHT_CACHE=0 turns it off, "
                      "set_weight_cache(max_bytes=...) bounds it.", RuntimeWarning, stacklevel=6)
    return packed


def _cacheable(w, x):
    """A CPU weight of x's dtype, 3-D, contiguous or a transposed view of a contiguous [E, K, N], whose
    version counter can be read (not an inference-mode tensor)."""
    return (w.device.type == "cpu" and w.dtype == x.dtype and w.dim() == 3 and not w.is_inference()
            and (w.is_contiguous() or w.transpose(1, 2).is_contiguous()))


def experts(x, w13_or_w1, w2, topk_weights, topk_ids, activation, capacity, b13_or_b1, b2):
    """moe_ext.experts on the cached PackedWeights of w13_or_w1 and w2 (x [T, d] 2-D, no gradient wanted),
    or None when the cache is off or does not apply (then the caller runs the plain op)."""
    if not _state["enabled"]:
        return None
    if x.device.type != "cpu" or x.dtype not in _ops.FLOAT_DTYPES \
            or not (_cacheable(w13_or_w1, x) and _cacheable(w2, x)):
        bypass()
        return None
    # Decode (few rows) streams contiguous plain weights as fast as packed ones, so it stays on them and
    # costs no memory; transposed views (gpt-oss) stream through a strided kernel that reads them slower
    # than a packed panel, so they take the packed copy at every size.
    transposed = not (w13_or_w1.is_contiguous() and w2.is_contiguous())
    if not transposed and not _any_expert_past_few_rows(topk_ids, w2.shape[0], capacity):
        return None
    with _lock:
        p13, p2 = _packed(w13_or_w1), _packed(w2)
    y = moe_ext.experts(_ops._np(x, True), p13, p2, _ops._np(topk_weights), _ops._np(topk_ids),
                        activation=activation, capacity=capacity, b13_or_b1=_ops._np(b13_or_b1), b2=_ops._np(b2))
    return _ops._out(y, x.dtype)


def _any_expert_past_few_rows(topk_ids, num_experts, capacity):
    """Whether some expert gets more than FEW_ROWS rows (counted as few_rows when not). Ids out of range
    answer True: the kernels' checks then raise as on the plain path."""
    ids = topk_ids.reshape(-1)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_experts):
        return True
    rows = torch.bincount(ids.long(), minlength=num_experts)
    if capacity is not None:
        rows = rows.clamp(max=max(int(capacity), 0))
    if bool((rows > FEW_ROWS).any()):
        return True
    with _lock:
        _counts["few_rows"] += 1
    return False


def bypass():
    """Count a call that asked for the cache but runs the plain path."""
    with _lock:
        _counts["bypassed"] += 1
