"""The SPEC §6 benchmark shapes, what they count (FLOPs, bytes) and their inputs."""
from collections import namedtuple

import numpy as np

# name: (T, d, f, E, k), SPEC §6 (SwiGLU experts). "decode" is Mixtral decode at T = 1, 4 and 16.
SHAPES = {
    "small": (512, 512, 1024, 8, 2),
    "medium": (2048, 1024, 2048, 8, 2),
    "mixtral": (1024, 4096, 14336, 8, 2),
    "decode-1": (1, 4096, 14336, 8, 2),
    "decode-4": (4, 4096, 14336, 8, 2),
    "decode-16": (16, 4096, 14336, 8, 2),
    "fine": (1024, 2048, 768, 64, 6),
}
# Names that stand for several shapes.
SHAPE_GROUPS = {
    "decode": ["decode-1", "decode-4", "decode-16"],
    "quick": ["small"],  # the default: the README's main job stays short (decode-1 alone allocates ~6 GB)
    "all": list(SHAPES),
}
SHAPE_CHOICES = list(SHAPES) + list(SHAPE_GROUPS)
QUICK = SHAPE_GROUPS["quick"]
# A custom shape (--shape-spec) with at most this many tokens counts as decode (bandwidth-bound).
DECODE_MAX_TOKENS = 16


class Shape(namedtuple("Shape", "name T d f E k decode")):
    """One benchmark shape. `decode` shapes are memory-bound: they report GB/s of expert weights
    touched and their fraction of the bandwidth ceiling (the others: of the compute ceiling)."""

    @property
    def dims(self):
        return self.T, self.d, self.f, self.E, self.k


def shape(name):
    T, d, f, E, k = SHAPES[name]
    return Shape(name, T, d, f, E, k, name.startswith("decode"))


def expand(names):
    """Shape names (groups expanded, duplicates dropped, order kept) -> [Shape]."""
    out = []
    for name in names:
        for concrete in SHAPE_GROUPS.get(name, [name]):
            if concrete not in SHAPES:
                raise ValueError(f"shape: expected one of {SHAPE_CHOICES}, got {name!r}")
            if concrete not in [s.name for s in out]:
                out.append(shape(concrete))
    return out


def parse_spec(text, name=None):
    """'T,d,f,E,k' -> a custom Shape (decode if T <= DECODE_MAX_TOKENS)."""
    try:
        T, d, f, E, k = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"shape spec: expected 'T,d,f,E,k' (five integers), got {text!r}") from None
    if min(T, d, f, E, k) < 1 or k > E:
        raise ValueError(f"shape spec: expected positive T,d,f,E,k with k <= E, got {text!r}")
    return Shape(name or f"{T}x{d}x{f}x{E}x{k}", T, d, f, E, k, T <= DECODE_MAX_TOKENS)


def flops(T, d, f, E, k, gated=True):
    """SPEC §6: 2*T*k*d*f*(3 gated, 2 otherwise) + 2*T*d*E (the router)."""
    return 2 * T * k * d * f * (3 if gated else 2) + 2 * T * d * E


def dense_flops(T, d, f, E, k):
    """The dense equivalent: one SwiGLU FFN of intermediate size k*f, no router: 2*T*d*(k*f)*3."""
    return 2 * T * d * (k * f) * 3


def weight_bytes(d, f, E, experts_touched, itemsize):
    """Bytes of weights a decode step reads (SPEC §6): 3*d*f per expert the routing touched, plus the
    router E*d, at `itemsize` bytes an element."""
    return (3 * d * f * experts_touched + E * d) * itemsize


def dense_bytes(d, f, k, itemsize):
    """The dense equivalent's weights: 3*d*(k*f) elements."""
    return 3 * d * k * f * itemsize


# Arrays larger than this are filled from a random pool (see fill()): generating 1.4 G normal floats
# for the Mixtral weights takes about a minute, a tiled copy a second. Values do not change timings.
_POOL = (1 << 20) + 7  # not a multiple of any d or f used, so rows differ


def fill(rng, shape, scale=1.0):
    """A float32 array ~ N(0, scale^2): drawn directly when small, else a random pool tiled by doubling
    copies (the same values every run for a given rng state)."""
    n = int(np.prod(shape))
    if n <= 4 * _POOL:
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)).reshape(shape)
    out = np.empty(n, dtype=np.float32)
    out[:_POOL] = rng.standard_normal(_POOL, dtype=np.float32) * np.float32(scale)
    filled = _POOL
    while filled < n:
        m = min(filled, n - filled)
        out[filled:filled + m] = out[:m]
        filled += m
    return out.reshape(shape)


def make_inputs(T, d, f, E, k, seed=0):
    """x [T,d], w_router [E,d], w13 [E,2f,d] (gate rows 0..f-1, up rows f..2f-1), w2 [E,d,f]:
    float32, expert weights scaled 1/sqrt(fan_in)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, d), dtype=np.float32)
    w_router = rng.standard_normal((E, d), dtype=np.float32)
    w13 = fill(rng, (E, 2 * f, d), d ** -0.5)
    w2 = fill(rng, (E, d, f), f ** -0.5)
    return x, w_router, w13, w2


class Workload:
    """The inputs of the shape being measured, shared by every implementation, and their caches.

    Weights are float32 NumPy arrays (the layout moe_ext takes); torch tensors are made from them on
    demand: torch.from_numpy (no copy) for fp32, .to(torch.bfloat16) for bf16. Weights and the torch
    copies are kept while consecutive shapes share (d, f, E) (Mixtral
    prefill and the three decode shapes do) and dropped when the next shape needs others."""

    def __init__(self, seed=0):
        self.seed = seed
        self.shape = None
        self._weights_key = None
        self._weights = None
        self._torch = {}
        self.x = None

    def load(self, shape):
        self.shape = shape
        key = (shape.d, shape.f, shape.E)
        if key != self._weights_key:
            self.release()
            rng = np.random.default_rng(self.seed)
            w_router = rng.standard_normal((shape.E, shape.d), dtype=np.float32)
            w13 = fill(rng, (shape.E, 2 * shape.f, shape.d), shape.d ** -0.5)
            w2 = fill(rng, (shape.E, shape.d, shape.f), shape.f ** -0.5)
            self._weights, self._weights_key = (w_router, w13, w2), key
        self.x = np.random.default_rng([self.seed, shape.T]).standard_normal((shape.T, shape.d),
                                                                             dtype=np.float32)
        self._torch.pop("x", None)
        return self

    def release(self):
        self._weights = self._weights_key = None
        self._torch = {}
        self.x = None

    @property
    def w_router(self):
        return self._weights[0]

    @property
    def w13(self):
        return self._weights[1]

    @property
    def w2(self):
        return self._weights[2]

    def dense_weights(self):
        """(w13_dense [2*k*f, d], w2_dense [d, k*f]) float32 for the dense equivalent: views of the first
        k experts' weights (w13[:k] and w2[:k] are contiguous), the same bytes reinterpreted. A dense
        FFN's time does not depend on its values, and this saves allocating k*3*d*f more elements."""
        s = self.shape
        kf = s.k * s.f
        return self.w13[:s.k].reshape(2 * kf, s.d), self.w2[:s.k].reshape(s.d, kf)

    def torch_arrays(self, dtype):
        """x, w_router, w13, w2 as torch tensors of `dtype` (fp32: sharing memory with the arrays)."""
        return tuple(self._tensor(name, dtype) for name in ("x", "w_router", "w13", "w2"))

    def torch_dense(self, dtype):
        """dense_weights() as torch tensors of `dtype`: views of the experts' tensors (no new copy)."""
        s = self.shape
        kf = s.k * s.f
        _, _, w13, w2 = self.torch_arrays(dtype)
        return w13[:s.k].reshape(2 * kf, s.d), w2[:s.k].reshape(s.d, kf)

    def _tensor(self, name, dtype, array=None):
        import torch

        slot = self._torch.setdefault(name, {})
        if dtype not in slot:
            array = getattr(self, name) if array is None else array
            t = torch.from_numpy(array)
            slot[dtype] = t if dtype == torch.float32 else t.to(dtype)
        return slot[dtype]

    def experts_touched(self):
        """The distinct experts moe_ext's float32 routing of this x selects (all implementations route
        the same x with the same softmax top-k; bf16 routing may differ on near-ties)."""
        from .. import _api

        _, ids = _api.route(self.x, self.w_router, self.shape.k)
        return int(np.unique(ids).size)
