"""Hugging Face transformers backend: "moe_ext" in transformers' ExpertsInterface (SPEC §7).

transformers (v5 and later) picks the forward of every MoE experts module by name through
`transformers.integrations.moe.ExpertsInterface`; this module registers `experts_forward` there as
"moe_ext", so that

    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="moe_ext")
    model.set_experts_implementation("moe_ext")      # or switch an already loaded model

run the experts of every MoE layer on moe_ext's kernels, forward and backward (through the autograd of
`moe_ext.torch.experts`). The model's own router still chooses the experts; only the experts run here.

Registration: importing this module (`import moe_ext.torch` imports it) calls
`register_when_available()`. If transformers' experts interface is already loaded, "moe_ext" is
registered at once; otherwise a one-shot import hook registers it the moment
`transformers.integrations.moe` is first imported, so importing moe_ext.torch never pays for importing
transformers, and the order of the two imports does not matter. Without transformers nothing happens.
`register()` registers explicitly (idempotent).

How an experts module is mapped (transformers' `use_experts_implementation` flags and attributes):
* weights: `gate_up_proj` (has_gate) or `up_proj`, and `down_proj`, [E, out, in]; with is_transposed
  ([E, in, out]) the views `w.transpose(1, 2)` are passed, which moe_ext takes without a copy. The
  parameters themselves (or those views of them) reach moe_ext.torch.experts: no weight copy is made here.
  It is called with weight_cache=True: inference calls (no gradient wanted, CPU, not under torch.compile)
  run on packed copies of the two expert weights kept beside the parameters (about their bytes once more;
  never stale; moe_ext.torch.set_weight_cache / MOE_EXT_WEIGHT_CACHE=0; docs/api.md §8).
* has_bias: `gate_up_proj_bias` / `up_proj_bias` [E, 2f or f] and `down_proj_bias` [E, d].
* the activation, as a moe_ext.Activation description: candidates are built from the module's attributes
  (its `act_fn`, `alpha`/`swiglu_alpha`, `limit`/`swiglu_limit`, is_concatenated, and `gate_softcap` /
  `up_softcap` of the module or its act_fn) and each is VERIFIED against the module's own code: its
  `_apply_gate` (gated) or `act_fn` (not gated) runs on a small float64 probe whose values straddle the
  clamp limit and +-2x every softcap, and the first description that gives the same values
  (to 1e-12 relative; 1e-5 when the gate itself computes in float32) is used. This covers the default
  gate with silu / exact gelu / tanh-approximated gelu ("gelu_pytorch_tanh", "gelu_new", "gelu_fast",
  nn.GELU(approximate="tanh")) / relu / relu² (ReLUSquaredActivation) / quick_gelu, gpt-oss's clamped,
  alpha-scaled, +1, interleaved gate, the clamped SwiGLU of DeepSeek-V4 / HY-V4 / GLM-5-Next and the
  softcapped SwiGLU of Inkling2 / Inkling2-Loop (swiglu(gate_softcap=..,up_softcap=..)). The
  decision is cached on the module (recomputed when the attributes it was made from change); the probe
  never runs inside torch.compile (an undecided custom gate falls back there: run one forward eagerly
  first). The default gate with an act_fn of a known type is decided without a probe.
* dtypes float32, bfloat16, float16 (the module's, hidden states of the same dtype); CPU tensors, or CUDA
  tensors in a build with the CUDA kernels (moe_ext.torch._cuda.REGISTERED), which take the same
  activation descriptions and expert biases.
* has_post_expert_norm (MuseSpark): the stage ops with autograd instead of the fused experts op, the
  module's own `post_expert_norm` applied to the [M, d] expert output rows before the weighted combine
  (_experts_with_post_norm).
Anything else runs the module's own eager forward instead, with one warning per experts class and reason
(never something else): a gate no description reproduces (e.g. a limit applied after the activation),
has_post_expert_norm without a callable post_expert_norm, DTensor-sharded weights, other devices or
dtypes.

Expert-parallel sentinels: under transformers' expert parallelism `top_k_index` may hold `num_experts`
(an expert on another rank) with weight 0. Those copies are given expert 0 and weight 0 (with a gradient
of 0 for that weight), which leaves the result unchanged for finite expert outputs.
"""
import importlib.abc
import importlib.util
import math
import sys
import threading
import warnings

import torch

import moe_ext

NAME = "moe_ext"
_INTERFACE_MODULE = "transformers.integrations.moe"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------------
# the backend
# --------------------------------------------------------------------------------------------------
def experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """transformers' experts forward contract: `self` is the experts module, hidden_states [T, d],
    top_k_index [T, k] (expert ids), top_k_weights [T, k]; returns [T, d] in hidden_states' dtype."""
    plan = _plan(self, hidden_states)
    if isinstance(plan, str):
        _warn_fallback(type(self), plan)
        return _eager_forward(self)(self, hidden_states, top_k_index, top_k_weights)
    activation, w_in, w2, b_in, b2 = plan
    if bool(getattr(self, "has_post_expert_norm", False)):
        return _experts_with_post_norm(self, hidden_states, top_k_index, top_k_weights, *plan)
    num_experts = w_in.shape[0]
    # Expert-parallel sentinels (id == num_experts, weight 0): a valid id with weight 0 contributes
    # nothing; masked_fill also gives their weight a zero gradient, as eager (which skips them) does.
    sentinel = top_k_index == num_experts
    ids = top_k_index.masked_fill(sentinel, 0)
    weights = top_k_weights.to(torch.float32).masked_fill(sentinel, 0.0)  # SPEC §2: weights are f32
    from moe_ext import torch as moe_torch  # at call time: moe_ext.torch imports this module
    y = moe_torch.experts(hidden_states.contiguous(), w_in, w2, weights, ids, activation=activation,
                          b13_or_b1=b_in, b2=b2, weight_cache=True)
    return y.to(hidden_states.dtype)


def _experts_with_post_norm(self, hidden_states, top_k_index, top_k_weights, activation, w_in, w2, b_in, b2):
    """The experts of a module with has_post_expert_norm, on moe_ext's stage ops (autograd through each):
    permute -> grouped_gemm (+ b_in) -> activation -> grouped_gemm (+ b2) -> the module's own
    post_expert_norm on every expert output row [M, d] (torch, autograd) -> unpermute with the routing
    weights. Sentinels as in experts_forward: expert 0 with weight 0 (the norm's output is finite)."""
    from moe_ext import torch as moe_torch  # at call time: moe_ext.torch imports this module
    num_experts = w_in.shape[0]
    sentinel = top_k_index == num_experts
    ids = top_k_index.masked_fill(sentinel, 0)
    weights = top_k_weights.to(torch.float32).masked_fill(sentinel, 0.0)
    x_perm, offsets, perm_rows = moe_torch.permute(hidden_states.contiguous(), ids, num_experts)
    h = moe_torch.grouped_gemm(x_perm, w_in, offsets, bias=b_in)
    y_perm = moe_torch.grouped_gemm(moe_torch.activation(h, activation), w2, offsets, bias=b2)
    y_perm = self.post_expert_norm(y_perm).to(y_perm.dtype)
    return moe_torch.unpermute(y_perm, perm_rows, weights).to(hidden_states.dtype)


def fallback_reason(experts_module, hidden_states=None):
    """Why `experts_module` would run its eager forward under "moe_ext" (a sentence), or None when it
    runs on moe_ext. `hidden_states` (optional) adds the checks on the input's device and dtype."""
    plan = _plan(experts_module, hidden_states)
    return plan if isinstance(plan, str) else None


def activation_of(experts_module):
    """The moe_ext activation description (canonical string) moe_ext runs `experts_module` with, or None
    when no description reproduces its gate / activation (it then falls back)."""
    decision = _activation(experts_module, bool(getattr(experts_module, "has_gate", True)))
    return None if decision.startswith("!") else decision


def _plan(self, hidden_states):
    """(activation, w13_or_w1, w2, b13_or_b1, b2) to run `self` on moe_ext, else the reason why not."""
    if bool(getattr(self, "has_post_expert_norm", False)) and not callable(getattr(self, "post_expert_norm", None)):
        return "has_post_expert_norm without a callable post_expert_norm"
    gated = bool(getattr(self, "has_gate", True))
    weights = _weights(self, gated)
    if isinstance(weights, str):
        return weights
    w_in, w2, b_in, b2 = weights
    tensors = [t for t in (w_in, w2, b_in, b2) if t is not None]
    if w_in.dtype not in _DTYPES or w2.dtype != w_in.dtype or any(t.dtype not in _DTYPES for t in tensors):
        return "expert weights (and biases) of dtype " + " / ".join(str(t.dtype) for t in tensors)
    if not _device_supported(w_in.device) or any(t.device != w_in.device for t in tensors):
        return f"expert weights on {w_in.device}"
    if hidden_states is not None:
        d = w_in.shape[2]
        if hidden_states.dtype != w_in.dtype:
            return f"hidden states of dtype {hidden_states.dtype} with weights of {w_in.dtype}"
        if hidden_states.device != w_in.device:
            return f"hidden states on {hidden_states.device} with weights on {w_in.device}"
        if hidden_states.dim() != 2 or hidden_states.shape[1] != d:
            return f"hidden states of shape {tuple(hidden_states.shape)} for d = {d}"
    activation = _activation(self, gated)
    if activation.startswith("!"):
        return activation[1:]
    return activation, w_in, w2, b_in, b2


def _weights(self, gated):
    """(w13_or_w1 [E, N, d], w2 [E, d, f], b13_or_b1 [E, N] or None, b2 [E, d] or None), transposed
    weights as views of the parameters, else the reason the module's tensors cannot run."""
    w_name = "gate_up_proj" if gated else "up_proj"
    w_in, w2 = getattr(self, w_name, None), getattr(self, "down_proj", None)
    if not isinstance(w_in, torch.Tensor) or not isinstance(w2, torch.Tensor):
        return f"no {w_name} and down_proj tensors"
    if _is_dtensor(w_in) or _is_dtensor(w2):
        return "DTensor (sharded) expert weights"
    if w_in.dim() != 3 or w2.dim() != 3:
        return "expert weights that are not 3-D [E, out, in] (or [E, in, out] with is_transposed)"
    if bool(getattr(self, "is_transposed", False)):  # [E, in, out]: the [E, out, in] views, no copy
        w_in, w2 = w_in.transpose(1, 2), w2.transpose(1, 2)
    E, rows, d = w_in.shape
    f = rows // 2 if gated else rows
    if (gated and rows % 2) or tuple(w2.shape) != (E, d, f):
        return f"expert weight shapes {tuple(w_in.shape)} and {tuple(w2.shape)} (as [E, out, in]) that do not match"
    if getattr(self, "num_experts", E) != E:
        return f"num_experts {self.num_experts} != the weights' {E} experts"
    b_in = b2 = None
    if bool(getattr(self, "has_bias", False)):
        b_in, b2 = getattr(self, w_name + "_bias", None), getattr(self, "down_proj_bias", None)
        if not isinstance(b_in, torch.Tensor) or not isinstance(b2, torch.Tensor) or _is_dtensor(b_in) \
                or _is_dtensor(b2):
            return f"has_bias without {w_name}_bias and down_proj_bias tensors"
        if tuple(b_in.shape) != (E, rows) or tuple(b2.shape) != (E, d):
            return f"expert bias shapes {tuple(b_in.shape)} and {tuple(b2.shape)} for weights [E={E}, {rows}, {d}]"
    return w_in, w2, b_in, b2


# --------------------------------------------------------------------------------------------------
# the activation: candidate descriptions from the module's attributes, verified on a probe
# --------------------------------------------------------------------------------------------------
_LIMIT_NAMES = ("limit", "swiglu_limit")
_ALPHA_NAMES = ("alpha", "swiglu_alpha")
_QUICK_GELU_ALPHA = 1.702  # transformers' QuickGELUActivation: x * sigmoid(1.702 x)
_FNS = ("silu", "gelu", "gelu_tanh", "relu", "relu2")
_PROBES = ((torch.float64, 1e-12), (torch.float32, 1e-5))  # (dtype, relative tolerance) tried in turn


def _real_attribute(self, names):
    for name in names:
        value = getattr(self, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def _softcap_value(owner, name):
    """A softcap constant: owner.<name> as a number, or as a module/object with a numeric .softcap
    (transformers' Inkling2Softcap); None otherwise."""
    value = getattr(owner, name, None)
    value = getattr(value, "softcap", value)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return float(value)
    return None


def _softcaps(self):
    """(gate_softcap, up_softcap) named by the module or its act_fn (e.g. Inkling2SoftcappedSwiGLU's
    gate_softcap / up_softcap modules), each None when absent."""
    act = getattr(self, "act_fn", None)
    return tuple(_softcap_value(self, name) if _softcap_value(self, name) is not None else _softcap_value(act, name)
                 for name in ("gate_softcap", "up_softcap"))


def _decision_key(self, gated):
    """What the activation decision depends on: the gate code (class or instance), the act_fn object,
    the numeric attributes and layout flags. Compared element by element (`is` for the objects)."""
    gate = vars(self).get("_apply_gate", getattr(type(self), "_apply_gate", None))
    return (gated, gate, getattr(self, "act_fn", None), _real_attribute(self, _ALPHA_NAMES),
            _real_attribute(self, _LIMIT_NAMES), bool(getattr(self, "is_concatenated", True)), *_softcaps(self))


def _same_key(a, b):
    return len(a) == len(b) and all(x is y or (type(x) in (bool, float) and x == y) for x, y in zip(a, b))


def _activation(self, gated):
    """The canonical description string, or "!" + the reason none applies. Decided once per module (and
    again when its key changes); never probed while torch.compile traces."""
    key = _decision_key(self, gated)
    cached = vars(self).get("_moe_ext_activation")
    if cached is not None and _same_key(cached[0], key):
        return cached[1]
    if torch.compiler.is_compiling():
        static = _static_description(self, gated)
        return static if static is not None else \
            "!a custom gate not yet verified (the probe does not run under torch.compile: run one forward eagerly)"
    decision = _verify(self, gated)
    self.__dict__["_moe_ext_activation"] = (key, decision)  # a plain attribute: not a submodule or buffer
    return decision


def _static_description(self, gated):
    """The description of transformers' default gate (or a non-gated module) with an act_fn of a known
    type, without running anything; None otherwise."""
    if gated and (getattr(type(self), "_apply_gate", None) is not _default_apply_gate()
                  or "_apply_gate" in vars(self)):
        return None
    fn = _static_fn(getattr(self, "act_fn", None))
    if fn is None:
        return None
    name, alpha = fn
    return moe_ext.Activation(name, gated, alpha=alpha).spec


def _static_fn(act):
    """(fn, alpha) of an act_fn of a known type (torch's or transformers'), else None."""
    F = torch.nn.functional
    by_function = {F.silu: "silu", F.relu: "relu", F.gelu: "gelu"}  # F.gelu's default is the exact gelu
    if not isinstance(act, torch.nn.Module):
        name = by_function.get(act) if callable(act) else None
        return None if name is None else (name, 1.0)
    kind = type(act)
    if kind is torch.nn.SiLU:
        return "silu", 1.0
    if kind is torch.nn.ReLU:
        return "relu", 1.0
    if kind is torch.nn.GELU:
        return ("gelu" if act.approximate == "none" else "gelu_tanh"), 1.0
    try:
        from transformers import activations as hf_act
    except ImportError:
        return None
    known = {"SiLUActivation": ("silu", 1.0), "GELUTanh": ("gelu_tanh", 1.0), "NewGELUActivation": ("gelu_tanh", 1.0),
             "FastGELUActivation": ("gelu_tanh", 1.0), "PytorchGELUTanh": ("gelu_tanh", 1.0),
             "ReLUSquaredActivation": ("relu2", 1.0), "QuickGELUActivation": ("silu", _QUICK_GELU_ALPHA)}
    for name, fn in known.items():
        if kind is getattr(hf_act, name, None):
            return fn
    if kind is getattr(hf_act, "GELUActivation", None):
        # nn.functional.gelu (exact) or the erf formula in Python ("gelu_python"): the same function
        inner = getattr(act, "act", None)
        exact = inner is F.gelu or getattr(inner, "__func__", None) is hf_act.GELUActivation._gelu_python
        return ("gelu", 1.0) if exact else None
    return None


def _candidates(self, gated):
    """Activation descriptions worth trying, most likely first (the static one, then the attributes')."""
    static = _static_fn(getattr(self, "act_fn", None))
    fns = ([static[0]] if static else []) + [fn for fn in _FNS if not static or fn != static[0]]
    alpha = _real_attribute(self, _ALPHA_NAMES)
    alphas = [a for a in dict.fromkeys([alpha, static[1] if static else None, 1.0, _QUICK_GELU_ALPHA])
              if a is not None]
    caps = [(None, None)]
    if not gated:
        layouts, limits, offsets = [False], [None], [0.0]
    else:
        gate_cap, up_cap = _softcaps(self)
        if gate_cap is not None or up_cap is not None:  # the softcapped SwiGLU first, then one cap at a time
            caps = list(dict.fromkeys([(gate_cap, up_cap), (gate_cap, None), (None, up_cap)])) + caps
        concatenated = bool(getattr(self, "is_concatenated", True))
        layouts = [not concatenated, concatenated]
        limit = _real_attribute(self, _LIMIT_NAMES)
        limits = [limit, None] if limit is not None and limit > 0 else [None]
        offsets = [0.0, 1.0]
    for gate_cap, up_cap in caps:
        for fn in (["silu"] if gate_cap is not None else fns):
            for a in (alphas if fn == "silu" else [1.0]):
                for limit in limits:
                    for offset in offsets:
                        for interleaved in layouts:
                            yield moe_ext.Activation(fn, gated, interleaved=interleaved, alpha=a, limit=limit,
                                                     up_offset=offset, gate_softcap=gate_cap, up_softcap=up_cap)


def _probe(self, gated, dtype):
    """A probe tensor h (values across +-1.5 x the limit, or +-6, and across +-2 x every softcap) for the
    module's gate / act_fn."""
    limit = _real_attribute(self, _LIMIT_NAMES)
    span = 1.5 * limit if limit is not None and limit > 0 else 6.0
    span = max([span] + [2.0 * c for c in _softcaps(self) if c is not None])
    rows, cols = 48, 16 if gated else 8
    values = torch.linspace(-span, span, rows * cols, dtype=torch.float64)
    order = torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))
    return values[order].reshape(rows, cols).to(dtype)


def reference_activation(h, description):
    """A moe_ext activation description computed with torch ops (in h's dtype): the semantics the probe
    compares against, and a readable statement of them."""
    a = moe_ext.activation_from(description)
    F = torch.nn.functional

    def act(z):
        if a.gate_softcap is not None:
            return a.gate_softcap * torch.tanh(z / a.gate_softcap) * torch.sigmoid(a.alpha * z)
        if a.fn == "silu":
            return z * torch.sigmoid(a.alpha * z)
        if a.fn in ("gelu", "gelu_tanh"):
            return F.gelu(z, approximate="tanh" if a.fn == "gelu_tanh" else "none")
        return F.relu(z) if a.fn == "relu" else F.relu(z).square()

    if not a.gated:
        return act(h)
    f = h.shape[-1] // 2
    gate, up = (h[..., 0::2], h[..., 1::2]) if a.interleaved else (h[..., :f], h[..., f:])
    if a.limit is not None:
        gate, up = gate.clamp(max=a.limit), up.clamp(min=-a.limit, max=a.limit)
    if a.up_softcap is not None:
        up = a.up_softcap * torch.tanh(up / a.up_softcap)
    return act(gate) * (up + a.up_offset)


def _verify(self, gated):
    """The first candidate description that reproduces the module's own gate / act_fn on the probe."""
    run = self._apply_gate if gated else getattr(self, "act_fn", None)
    what = "gate (_apply_gate)" if gated else "act_fn"
    if run is None or not callable(run):
        return f"!no {what} to run"
    candidates = list(_candidates(self, gated))
    error = None
    for dtype, tolerance in _PROBES:
        h = _probe(self, gated, dtype)
        try:
            with torch.no_grad():
                got = run(h.clone())
        except Exception as e:  # noqa: BLE001  (a gate that cannot run on the probe: no decision)
            error = f"{type(e).__name__}: {e}"
            continue
        expected = (h.shape[0], h.shape[1] // 2 if gated else h.shape[1])
        if not isinstance(got, torch.Tensor) or got.shape != expected:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            return f"!its {what} returns {shape} for a probe of shape {tuple(h.shape)}"
        got = got.double()
        for description in candidates:
            want = reference_activation(h.double(), description)
            if bool(((got - want).abs() <= tolerance * (1 + want.abs())).all()):
                return description.spec
    act = getattr(self, "act_fn", None)
    act_name = type(act).__name__ if isinstance(act, torch.nn.Module) else getattr(act, "__name__", repr(act))
    if error is not None:
        return f"!its custom gate ({what}) failed on the probe ({error})"
    if gated and (type(self)._apply_gate is not _default_apply_gate() or "_apply_gate" in vars(self)):
        return f"!its custom gate (_apply_gate of {type(self).__name__}) matches none of moe_ext's activations"
    return f"!activation {act_name} ({'gated' if gated else 'not gated'}) matches none of moe_ext's activations"


def _default_apply_gate():
    from transformers.integrations import moe as hf_moe
    return getattr(hf_moe, "_default_apply_gate", None)


def _is_dtensor(t):
    dtensor = getattr(getattr(torch.distributed, "tensor", None), "DTensor", None) \
        if torch.distributed.is_available() else None
    return dtensor is not None and isinstance(t, dtensor)


def _device_supported(device):
    # the ops of moe_ext.torch have CPU kernels; a CUDA build adds them from moe_ext.torch._cuda (the module
    # is imported in every build, but registers kernels only where moe_ext._cuda was built: REGISTERED)
    cuda = sys.modules.get("moe_ext.torch._cuda")
    return device.type == "cpu" or (device.type == "cuda" and getattr(cuda, "REGISTERED", False))


def _eager_forward(self):
    """The experts class's own forward: transformers' `use_experts_implementation` wraps it with
    functools.wraps, which keeps the original as `__wrapped__`."""
    for cls in type(self).__mro__:
        forward = cls.__dict__.get("forward")
        if forward is not None:
            return getattr(forward, "__wrapped__", forward)
    raise TypeError(f"{type(self).__name__} has no forward")


_warned = set()


def _warn_fallback(cls, reason):
    key = (cls, reason)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"moe_ext: {cls.__name__} runs its eager experts forward: {reason}", RuntimeWarning,
                      stacklevel=3)


# --------------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------------
def register():
    """Register "moe_ext" in transformers' ExpertsInterface (idempotent). Returns False, and does nothing,
    when transformers (v5 or later, with integrations.moe) is not installed."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:
        return False
    ExpertsInterface.register(NAME, experts_forward)
    return True


def is_registered():
    """True when "moe_ext" is in transformers' ExpertsInterface (imports nothing)."""
    hf_moe = sys.modules.get(_INTERFACE_MODULE)
    mapping = getattr(getattr(hf_moe, "ExpertsInterface", None), "_global_mapping", {})
    return mapping.get(NAME) is experts_forward


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when `transformers.integrations.moe` is about to be imported, it wraps that
    module's loader so that `register()` runs right after the module has executed, then removes itself."""

    _lock = threading.Lock()

    def find_spec(self, fullname, path, target=None):
        if fullname != _INTERFACE_MODULE:
            return None
        for finder in list(sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        original = loader.exec_module

        def exec_module(module):
            del loader.exec_module  # back to the loader's own method
            original(module)
            register()
            self.remove()

        loader.exec_module = exec_module  # instance attribute, this module's loader only
        return spec

    def remove(self):
        with self._lock:
            if self in sys.meta_path:
                sys.meta_path.remove(self)


def register_when_available():
    """Register now if transformers' experts interface is loaded; else, if transformers is installed,
    as soon as it is imported (see _RegisterOnImport). Never imports transformers, never raises."""
    if _INTERFACE_MODULE in sys.modules:
        return register()
    try:
        installed = importlib.util.find_spec("transformers") is not None
    except (ImportError, ValueError):
        installed = False
    if installed and not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
    return False


register_when_available()  # importing this module (as `import moe_ext.torch` does) registers "moe_ext"
