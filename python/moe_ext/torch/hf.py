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

What runs on moe_ext: experts modules in transformers' standard layout, i.e. `gate_up_proj [E, 2f, d]`
(rows 0..f-1 gate, f..2f-1 up; moe_ext's w13) or `up_proj [E, f, d]` for non-gated experts, and
`down_proj [E, d, f]` (w2), no biases, no post-expert norm, the default gate, an activation moe_ext has
(silu -> "swiglu", exact erf gelu -> "geglu" when gated; relu / exact gelu when not), CPU tensors (or
CUDA tensors in a build with the CUDA kernels, moe_ext.torch._cuda.REGISTERED) of dtype float32,
bfloat16 or float16 (the module's dtype; hidden states of the same dtype). The parameters themselves are
handed to the kernels: no weight copy is made here.
Anything else (biases, transposed or interleaved weights, tanh-approximated gelu, other activations,
custom `_apply_gate`, a post-expert norm, DTensor-sharded weights, other devices or dtypes) runs the
module's own eager forward instead, with one warning per experts class and reason: never something else.

Expert-parallel sentinels: under transformers' expert parallelism `top_k_index` may hold `num_experts`
(an expert on another rank) with weight 0. Those copies are given expert 0 and weight 0 (with a gradient
of 0 for that weight), which leaves the result unchanged for finite expert outputs.
"""
import importlib.abc
import importlib.util
import sys
import threading
import warnings

import torch

NAME = "moe_ext"
_INTERFACE_MODULE = "transformers.integrations.moe"

# (HF activation, gated) -> moe_ext activation
_ACTIVATIONS = {("silu", True): "swiglu", ("gelu", True): "geglu",
                ("relu", False): "relu", ("gelu", False): "gelu"}
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
    activation, w_in, w2 = plan
    num_experts = w_in.shape[0]
    # Expert-parallel sentinels (id == num_experts, weight 0): a valid id with weight 0 contributes
    # nothing; masked_fill also gives their weight a zero gradient, as eager (which skips them) does.
    sentinel = top_k_index == num_experts
    ids = top_k_index.masked_fill(sentinel, 0)
    weights = top_k_weights.to(torch.float32).masked_fill(sentinel, 0.0)  # SPEC §2: weights are f32
    from moe_ext import torch as moe_torch  # at call time: moe_ext.torch imports this module
    y = moe_torch.experts(hidden_states.contiguous(), w_in, w2, weights, ids, activation=activation)
    return y.to(hidden_states.dtype)


def fallback_reason(experts_module, hidden_states=None):
    """Why `experts_module` would run its eager forward under "moe_ext" (a sentence), or None when it
    runs on moe_ext. `hidden_states` (optional) adds the checks on the input's device and dtype."""
    plan = _plan(experts_module, hidden_states)
    return plan if isinstance(plan, str) else None


def _plan(self, hidden_states):
    """(moe_ext activation, w13_or_w1, w2) for a module moe_ext runs as it is, else the reason why not."""
    for flag, wrong, reason in (("has_bias", True, "expert biases"),
                                ("is_transposed", True, "transposed expert weights ([E, in, out])"),
                                ("is_concatenated", False, "interleaved gate/up rows"),
                                ("has_post_expert_norm", True, "a norm after each expert")):
        if bool(getattr(self, flag, not wrong)) == wrong:
            return reason
    gated = bool(getattr(self, "has_gate", True))
    # the class's gate must be transformers' default (split, act(gate) * up), and no instance override;
    # (looked up on the class and in vars(): comparing a bound method's __func__ does not trace in dynamo)
    if gated and (getattr(type(self), "_apply_gate", None) is not _default_apply_gate()
                  or "_apply_gate" in vars(self)):
        return "a custom gate (_apply_gate)"
    act = _activation_name(getattr(self, "act_fn", None))
    activation = _ACTIVATIONS.get((act, gated))
    if activation is None:
        what = act or type(getattr(self, "act_fn", None)).__name__
        return f"activation {what} ({'gated' if gated else 'not gated'}) is not one of moe_ext's"
    w_in = getattr(self, "gate_up_proj" if gated else "up_proj", None)
    w2 = getattr(self, "down_proj", None)
    if not isinstance(w_in, torch.Tensor) or not isinstance(w2, torch.Tensor):
        return "no gate_up_proj/up_proj and down_proj tensors"
    if _is_dtensor(w_in) or _is_dtensor(w2):
        return "DTensor (sharded) expert weights"
    if w_in.dim() != 3 or w2.dim() != 3:
        return "expert weights that are not [E, out, in]"
    E, rows, d = w_in.shape
    f = rows // 2 if gated else rows
    if (gated and rows % 2) or tuple(w2.shape) != (E, d, f):
        return f"expert weight shapes {tuple(w_in.shape)} and {tuple(w2.shape)} that do not match"
    if getattr(self, "num_experts", E) != E:
        return f"num_experts {self.num_experts} != the weights' {E} experts"
    if w_in.dtype not in _DTYPES or w2.dtype != w_in.dtype:
        return f"expert weights of dtype {w_in.dtype} / {w2.dtype}"
    if not _device_supported(w_in.device) or w2.device != w_in.device:
        return f"expert weights on {w_in.device}"
    if hidden_states is not None:
        if hidden_states.dtype != w_in.dtype:
            return f"hidden states of dtype {hidden_states.dtype} with weights of {w_in.dtype}"
        if hidden_states.device != w_in.device:
            return f"hidden states on {hidden_states.device} with weights on {w_in.device}"
        if hidden_states.dim() != 2 or hidden_states.shape[1] != d:
            return f"hidden states of shape {tuple(hidden_states.shape)} for d = {d}"
    return activation, w_in, w2


def _activation_name(act):
    """"silu", "gelu" (exact, erf), "relu", or None for anything else (tanh gelu included)."""
    F = torch.nn.functional
    if act in (F.silu,):
        return "silu"
    if act in (F.relu,):
        return "relu"
    if act in (F.gelu,):  # the function's default is the exact gelu
        return "gelu"
    kind = type(act)
    if kind is torch.nn.SiLU:
        return "silu"
    if kind is torch.nn.ReLU:
        return "relu"
    if kind is torch.nn.GELU:
        return "gelu" if act.approximate == "none" else None
    try:
        from transformers import activations as hf_act
    except ImportError:
        return None
    if kind is hf_act.SiLUActivation:
        return "silu"
    if kind is hf_act.GELUActivation:
        # nn.functional.gelu (exact) or the erf formula in Python ("gelu_python"): the same function
        inner = getattr(act, "act", None)
        exact = inner is F.gelu or getattr(inner, "__func__", None) is hf_act.GELUActivation._gelu_python
        return "gelu" if exact else None
    return None


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
