"""Expert activations as data (SPEC §3.6): one description reaches every kernel, forward and backward.

An ``Activation`` says which function runs on the first GEMM's output h, and how h is laid out:

* ``gated=True``: h has 2f columns, ``out = act(gate) * (up + up_offset)``, gate and up either concatenated
  (``[gate | up]``) or ``interleaved`` (``g0 u0 g1 u1 ...``); with ``limit`` L, gate = min(g, L) and
  up = clip(u, -L, L) first (NaN stays NaN, as torch.clamp).
* softcaps (gated only; ``softcap_c(z) = c tanh(z / c)``, c a positive finite float, None = none):
  ``up_softcap`` c_u bounds up before the multiply, ``gate_softcap`` c_g (fn "silu" only) replaces silu's
  linear factor: ``act(g) = softcap_{c_g}(g) * sigmoid(alpha g)``, the sigmoid seeing g itself (Inkling2's
  softcapped SwiGLU). Order: the limit's clamps first, then the softcaps, then ``+ up_offset``:
  ``out = softcap_{c_g}(g') sigmoid(alpha g') * (softcap_{c_u}(u') + up_offset)``, g' = min(g, L),
  u' = clip(u, -L, L).
* ``gated=False``: h has f columns, ``out = act(h)``.

``fn`` is one of "silu" (``z * sigmoid(alpha * z)``), "gelu" (exact, erf), "gelu_tanh" (tanh
approximation), "relu", "relu2" (``relu(z)**2``). Presets name the common descriptions; every API taking
``activation=`` accepts a preset name, a canonical string (``str(a)``) or an Activation.
"""
import dataclasses
import math
import numbers
from typing import Optional

import numpy as np

FNS = ("silu", "gelu", "gelu_tanh", "relu", "relu2")
# Preset name -> (fn, gated). The canonical string of a description starts with the preset name of its
# (fn, gated) pair, or with fn and an explicit gated=... where no preset has that pair.
PRESETS = {
    "swiglu": ("silu", True),
    "geglu": ("gelu", True),
    "geglu_tanh": ("gelu_tanh", True),
    "relu": ("relu", False),
    "gelu": ("gelu", False),
    "gelu_tanh": ("gelu_tanh", False),
    "relu2": ("relu2", False),
}
_PRESET_OF = {pair: name for name, pair in PRESETS.items()}
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _fail(expected, got):
    raise ValueError(f"activation: expected {expected}; got {got}")


def _real(value, field):
    """A finite real that float32 represents (the kernels run in float32)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        _fail(f"{field} a real number", f"{value!r} ({type(value).__name__})")
    value = float(value)
    if not abs(value) <= _FLOAT32_MAX:
        _fail(f"{field} finite (float32)", repr(value))
    return value


def _flag(value, field):
    if not isinstance(value, (bool, np.bool_)):
        _fail(f"{field} a bool", f"{value!r} ({type(value).__name__})")
    return bool(value)


@dataclasses.dataclass(frozen=True)
class Activation:
    """An expert activation (see the module docstring). Invalid combinations raise ValueError."""

    fn: str
    gated: bool
    interleaved: bool = False
    alpha: float = 1.0
    limit: Optional[float] = None
    up_offset: float = 0.0
    gate_softcap: Optional[float] = None
    up_softcap: Optional[float] = None

    def __post_init__(self):
        if not isinstance(self.fn, str) or self.fn not in FNS:
            _fail("fn one of " + ", ".join(repr(f) for f in FNS), repr(self.fn))
        gated = _flag(self.gated, "gated")
        interleaved = _flag(self.interleaved, "interleaved")
        alpha = _real(self.alpha, "alpha")
        up_offset = _real(self.up_offset, "up_offset")
        limit = None if self.limit is None else _real(self.limit, "limit")
        softcaps = {field: None if getattr(self, field) is None else _real(getattr(self, field), field)
                    for field in ("gate_softcap", "up_softcap")}
        if alpha != 1.0 and self.fn != "silu":
            _fail("alpha only with fn 'silu'", f"alpha={alpha!r} with fn {self.fn!r}")
        if not gated:
            for field, value, default in (("interleaved", interleaved, False), ("limit", limit, None),
                                          ("up_offset", up_offset, 0.0),
                                          ("gate_softcap", softcaps["gate_softcap"], None),
                                          ("up_softcap", softcaps["up_softcap"], None)):
                if value != default:
                    _fail(f"{field} only with a gated activation", f"{field}={value!r} with gated=False")
        if limit is not None and not limit > 0:
            _fail("limit > 0 (or None)", repr(limit))
        for field, value in softcaps.items():
            if value is not None and not value > 0:
                _fail(f"{field} > 0 (or None)", repr(value))
        if softcaps["gate_softcap"] is not None and self.fn != "silu":
            _fail("gate_softcap only with fn 'silu'", f"gate_softcap={softcaps['gate_softcap']!r} with fn {self.fn!r}")
        for field, value in (("gated", gated), ("interleaved", interleaved), ("alpha", alpha),
                             ("limit", limit), ("up_offset", up_offset), *softcaps.items()):
            object.__setattr__(self, field, value)

    @property
    def spec(self):
        """The canonical string: the preset name, else e.g. 'swiglu(alpha=1.702,limit=7.0,up_offset=1.0,
        interleaved)' or 'swiglu(gate_softcap=30.0,up_softcap=30.0)' (non-default fields only, in the fixed
        order alpha, limit, gate_softcap, up_softcap, up_offset, interleaved; gated=... where no preset
        fits)."""
        preset = _PRESET_OF.get((self.fn, self.gated))
        fields = [] if preset else [f"gated={self.gated}"]
        if self.alpha != 1.0:
            fields.append(f"alpha={self.alpha!r}")
        if self.limit is not None:
            fields.append(f"limit={self.limit!r}")
        for field in ("gate_softcap", "up_softcap"):
            if getattr(self, field) is not None:
                fields.append(f"{field}={getattr(self, field)!r}")
        if self.up_offset != 0.0:
            fields.append(f"up_offset={self.up_offset!r}")
        if self.interleaved:
            fields.append("interleaved")
        name = preset or self.fn
        return f"{name}({','.join(fields)})" if fields else name

    def __str__(self):
        return self.spec

    @classmethod
    def parse(cls, text):
        """The Activation of a preset name or canonical string (inverse of str())."""
        if not isinstance(text, str):
            raise TypeError(f"activation: expected a str or moe_ext.Activation; got {text!r} ({type(text).__name__})")
        name, fields = _split(text)
        if name in PRESETS:
            fn, gated = PRESETS[name]
        elif name in FNS and "gated" in fields:
            fn, gated = name, None
        else:
            _fail("a preset name (" + ", ".join(repr(p) for p in PRESETS) + ") or a fn name ("
                  + ", ".join(repr(f) for f in FNS) + ") with gated=True/False in parentheses", repr(text))
        kwargs = {}
        for key, value in fields.items():
            if key == "gated":
                kwargs[key] = _parse_bool(value, key, text)
            elif key == "interleaved":
                kwargs[key] = True if value is None else _parse_bool(value, key, text)
            elif key in ("alpha", "limit", "up_offset", "gate_softcap", "up_softcap"):
                kwargs[key] = _parse_float(value, key, text)
            else:
                _fail("fields gated, alpha, limit, gate_softcap, up_softcap, up_offset, interleaved",
                      f"{key!r} in {text!r}")
        kwargs.setdefault("gated", gated)
        return cls(fn=fn, **kwargs)


def _split(text):
    """'name(a=1,b)' -> ('name', {'a': '1', 'b': None})."""
    text = text.strip()
    if "(" not in text:
        return text, {}
    if not text.endswith(")"):
        _fail("'name(field=value,...)'", repr(text))
    name, body = text[:-1].split("(", 1)
    fields = {}
    for part in filter(None, (p.strip() for p in body.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if key in fields:
            _fail("each field at most once", f"{key!r} twice in {text!r}")
        fields[key] = value.strip() if sep else None
    return name.strip(), fields


def _parse_bool(value, key, text):
    if value not in ("True", "False"):
        _fail(f"{key}=True or {key}=False", repr(text))
    return value == "True"


def _parse_float(value, key, text):
    try:
        number = float(value)
    except (TypeError, ValueError):
        _fail(f"{key}=<number>", repr(text))
    if math.isnan(number) or math.isinf(number):
        _fail(f"{key} finite", repr(text))
    return number


def activation_from(x):
    """The Activation of a preset name, canonical string or Activation; ValueError/TypeError otherwise."""
    if isinstance(x, Activation):
        return x
    return Activation.parse(x)
