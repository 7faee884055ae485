"""Quantised experts in PyTorch (SPEC §3.7, docs/api.md §9): inference only.

    moe_ext.torch.quantize_experts(model, "int4", group_size=128)   # in place; returns model

converts the experts of every MoE module of `model`: each transformers experts module (the modules
transformers wraps with `use_experts_implementation`: `gate_up_proj [E, 2f, d]` or `up_proj [E, f, d]`,
and `down_proj [E, d, f]`) is replaced in its parent by a `QuantizedExperts`, which runs on moe_ext's
quantised kernels whatever the model's `experts_implementation`; in a `moe_ext.torch.MoE` the float
`w13`/`w1` and `w2` parameters are replaced by `QuantizedExpertWeight`s and its forward runs quantised.
The float expert weights are released (nothing here keeps them), so expert memory drops to the quantised
bytes (`expert_bytes(model)` counts them).

A `QuantizedExpertWeight` is an nn.Module holding a moe_ext.QuantizedWeight's parts as buffers (values
uint8, scales float32 or float16 (the weight's scale_dtype), zeros uint8 or None: the kernel layout of
csrc/core/quant.h), so state_dict, `.to("cpu")`
and memory accounting see them. The kernels read the buffers in place (moe_ext._core.quantized_borrow):
no copy per call. The buffers are checked once, when they are made; a caller who writes into them owns
the result.

The op `torch.ops.moe_ext.quantized_experts` has a fake kernel (torch.compile traces it) and no
backward: asking for a gradient through it raises RuntimeError.
"""
from typing import List, Optional

import numpy as np
import torch
from torch import Tensor, nn
from torch.library import custom_op

import moe_ext
from moe_ext import _checks as check
from moe_ext import _core
from moe_ext import quant as _quant

from . import _ops

_SCHEME_IDS = {"int8": 0, "int4": 1}


# --------------------------------------------------------------------------------------------------
# the weight
# --------------------------------------------------------------------------------------------------
class QuantizedExpertWeight(nn.Module):
    """Quantised expert weights [E, N, K] as buffers (`values`, `scales`, `zeros`), in moe_ext's
    kernel layout. Made by `QuantizedExpertWeight.quantize(w, scheme, ...)` (as moe_ext.quantize) or
    from a moe_ext.QuantizedWeight (`from_quantized`, e.g. a GGUF import). Not a tensor: only the
    moe_ext.torch expert functions, MoE and QuantizedExperts take it."""

    def __init__(self, q):
        super().__init__()
        if not isinstance(q, _core.QuantizedWeight):
            check.fail(TypeError, "q", "a moe_ext.QuantizedWeight", type(q).__name__)
        self.scheme, self.shape = q.scheme, tuple(q.shape)
        self.group_size, self.zero_point, self.activations = q.group_size, q.zero_point, q.activations
        values, scales, zeros = q.kernel_parts()  # the layout the kernels read (docs/api.md §9)
        self.register_buffer("values", torch.from_numpy(np.array(values)))
        self.register_buffer("scales", torch.from_numpy(np.array(scales)))
        self.register_buffer("zeros", None if zeros is None else torch.from_numpy(np.array(zeros)))

    @classmethod
    def from_quantized(cls, q):
        return cls(q)

    @classmethod
    def quantize(cls, w, scheme, *, group_size=None, zero_point=False, activations=None):
        """Quantise a float tensor w [E, N, K] (float32, bfloat16 or float16, CPU) as moe_ext.quantize."""
        if not isinstance(w, Tensor):
            check.fail(TypeError, "w", "a torch.Tensor", type(w).__name__)
        return cls(moe_ext.quantize(_ops._np(w, True), scheme, group_size=group_size, zero_point=zero_point,
                                    activations=activations))

    @property
    def ndim(self):
        return 3

    @property
    def format(self) -> List[int]:
        """What the op needs besides the buffers: [scheme id, K, group size (0: per row), activations]."""
        return [_SCHEME_IDS[self.scheme], self.shape[2], self.group_size or 0, int(self.activations == "int8")]

    @property
    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in (self.values, self.scales, self.zeros) if t is not None)

    def core(self):
        """A moe_ext.QuantizedWeight reading these buffers in place (no copy)."""
        return _borrow(self.values, self.scales, self.zeros, self.format)

    def dequantize(self) -> Tensor:
        """The float32 weights [E, N, K] the kernels multiply by."""
        return torch.from_numpy(self.core().dequantize())

    def extra_repr(self):
        return (f"shape={self.shape}, scheme={self.scheme!r}, group_size={self.group_size}, "
                f"zero_point={self.zero_point}, activations={self.activations!r}, nbytes={self.nbytes}")


def _buffer(t, name, *dtypes):
    if t.dtype not in dtypes or t.device.type != "cpu" or t.dim() != 3:
        expected = " or ".join(str(d) for d in dtypes)
        raise ValueError(f"{name}: expected a 3-d CPU tensor of dtype {expected}; got {t.dim()}-d {t.dtype} on {t.device}")
    return t.detach().contiguous().numpy()


def _borrow(values, scales, zeros, fmt):
    scheme, K, group_size, activations = fmt
    E, N = values.shape[0], values.shape[1]
    return _core.quantized_borrow("int8" if scheme == 0 else "int4", E, N, K, group_size,
                                  _buffer(values, "values", torch.uint8),
                                  _buffer(scales, "scales", torch.float32, torch.float16),
                                  None if zeros is None else _buffer(zeros, "zeros", torch.uint8), bool(activations))


# --------------------------------------------------------------------------------------------------
# the op
# --------------------------------------------------------------------------------------------------
@custom_op("moe_ext::quantized_experts", mutates_args=(), device_types="cpu")
def quantized_experts(x: Tensor, w13_values: Tensor, w13_scales: Tensor, w13_zeros: Optional[Tensor],
                      w13_format: List[int], w2_values: Tensor, w2_scales: Tensor, w2_zeros: Optional[Tensor],
                      w2_format: List[int], topk_weights: Tensor, topk_ids: Tensor, activation: str,
                      capacity: Optional[int]) -> Tensor:
    """moe_ext.experts on quantised w13_or_w1 and w2 (each: buffers and QuantizedExpertWeight.format)."""
    w13 = _borrow(w13_values, w13_scales, w13_zeros, w13_format)
    w2 = _borrow(w2_values, w2_scales, w2_zeros, w2_format)
    y = moe_ext.experts(_ops._np(x, True), w13, w2, _ops._np(topk_weights), _ops._np(topk_ids),
                        activation=activation, capacity=capacity)
    return _ops._out(y, x.dtype)


@quantized_experts.register_fake
def _(x, w13_values, w13_scales, w13_zeros, w13_format, w2_values, w2_scales, w2_zeros, w2_format, topk_weights,
      topk_ids, activation, capacity):
    return torch.empty_like(x)


def _no_backward(ctx, grad):
    raise RuntimeError("moe_ext.torch: quantised experts are inference only: there is no backward through "
                       "quantised weights (run under torch.no_grad() / torch.inference_mode(), or train the "
                       "float model)")


quantized_experts.register_autograd(_no_backward)


def is_quantized(w):
    """Whether w is a quantised expert weight (a NumPy-side moe_ext.QuantizedWeight counts, to be refused
    with a hint by experts() rather than reach an op that takes tensors)."""
    return isinstance(w, (QuantizedExpertWeight, _core.QuantizedWeight))


def experts(x, w13_or_w1, w2, topk_weights, topk_ids, *, activation="swiglu", capacity=None) -> Tensor:
    """moe_ext.torch.experts with QuantizedExpertWeights (both weights quantised): x [..., d] -> y."""
    for name, w in (("w13_or_w1", w13_or_w1), ("w2", w2)):
        if not isinstance(w, QuantizedExpertWeight):
            hint = " (wrap it: QuantizedExpertWeight(q))" if isinstance(w, _core.QuantizedWeight) else ""
            check.fail(TypeError, name, "a QuantizedExpertWeight (both expert weights quantised)",
                       type(w).__name__ + hint)
    description = moe_ext.activation_from(activation)
    activation = description.spec
    E, d, f = w2.shape
    rows = 2 * f if description.gated else f
    if tuple(w13_or_w1.shape) != (E, rows, x.shape[-1]) or d != x.shape[-1]:
        check.fail(ValueError, "w13_or_w1", f"shape (E, {'2f' if rows != f else 'f'}, d) = ({E}, {rows}, "
                   f"{x.shape[-1]}) beside w2 of shape {w2.shape} and x of shape {tuple(x.shape)}", w13_or_w1.shape)
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    k = topk_ids.shape[-1]
    topk_weights = topk_weights.reshape(x.shape[0], k).float()
    topk_ids = topk_ids.reshape(x.shape[0], k)
    y = torch.ops.moe_ext.quantized_experts(
        x, w13_or_w1.values, w13_or_w1.scales, w13_or_w1.zeros, w13_or_w1.format, w2.values, w2.scales, w2.zeros,
        w2.format, topk_weights, topk_ids, activation, capacity)
    return y.reshape(shape)


# --------------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------------
class QuantizedExperts(nn.Module):
    """A transformers experts module after quantize_experts: forward(hidden_states [T, d], top_k_index
    [T, k], top_k_weights [T, k]) -> [T, d], transformers' experts contract, on moe_ext's quantised
    kernels. Expert-parallel sentinels (id == num_experts) contribute nothing, as in moe_ext.torch.hf."""

    def __init__(self, w_in, down_proj, activation, gated, source_class=""):
        super().__init__()
        self.gated, self.activation, self.source_class = gated, activation, source_class
        self.num_experts = down_proj.shape[0]
        if gated:
            self.gate_up_proj = w_in
        else:
            self.up_proj = w_in
        self.down_proj = down_proj

    def forward(self, hidden_states, top_k_index, top_k_weights):
        w_in = self.gate_up_proj if self.gated else self.up_proj
        sentinel = top_k_index == self.num_experts
        ids = top_k_index.masked_fill(sentinel, 0)
        weights = top_k_weights.to(torch.float32).masked_fill(sentinel, 0.0)
        return experts(hidden_states.contiguous(), w_in, self.down_proj, weights, ids,
                       activation=self.activation).to(hidden_states.dtype)

    def extra_repr(self):
        return f"num_experts={self.num_experts}, activation={self.activation!r}, from={self.source_class}"


def _hf_weights(module):
    """(gated, w_in, down_proj) of a transformers experts module, or None for any other module."""
    down = getattr(module, "down_proj", None)
    if not isinstance(down, Tensor) or down.dim() != 3:
        return None
    for gated, name in ((True, "gate_up_proj"), (False, "up_proj")):
        w_in = getattr(module, name, None)
        if isinstance(w_in, Tensor) and w_in.dim() == 3:
            return gated, w_in, down
    return None


def _hf_plan(name, module):
    """(activation, gated, w_in, down_proj) for a transformers experts module moe_ext runs, else raises."""
    from . import hf
    gated, w_in, down = _hf_weights(module)
    reason = ("expert biases" if getattr(module, "has_bias", False) else
              "transposed expert weights" if getattr(module, "is_transposed", False) else
              hf.fallback_reason(module))
    # the description the transformers backend verified against the module's own gate (hf.py)
    activation = hf.activation_of(module)
    if reason is None and activation is None:
        reason = "an activation moe_ext does not have"
    if reason is not None:
        check.fail(ValueError, "model_or_module", "experts moe_ext can run quantised",
                   f"{name or 'the module'} ({type(module).__name__}): {reason}")
    return activation, gated, w_in, down


def _targets(root):
    from ._module import MoE
    found = []
    for name, module in root.named_modules():
        if isinstance(module, MoE):
            if not is_quantized(module.w13_or_w1):
                found.append((name, module, None))
        elif _hf_weights(module) is not None:
            if module is root:
                check.fail(ValueError, "model_or_module", "a model or MoE block holding the experts module "
                           "(it is replaced in its parent)", f"the experts module {type(module).__name__} itself")
            found.append((name, module, _hf_plan(name, module)))
    return found


def _check_format(weights, scheme, group_size, zero_point, activations):
    """Every weight's K must suit the format before anything is converted (never half a model)."""
    scheme = check.choice(scheme, "scheme", _quant.SCHEMES)
    for w in weights:
        E, N, K = w.shape
        if w.dtype not in _ops.FLOAT_DTYPES or w.device.type != "cpu":
            check.fail(TypeError, "model_or_module", "CPU expert weights of dtype float32, bfloat16 or float16",
                       f"{w.dtype} on {w.device}")
        if scheme == "int4" and K % 2:
            check.fail(ValueError, "scheme", "'int8' for experts with an odd K (int4 packs two values a byte)",
                       f"'int4' with a weight of shape {tuple(w.shape)}")
        _quant._group_size(scheme, group_size, K)
    if zero_point and scheme == "int8":
        check.fail(ValueError, "zero_point", "False for scheme 'int8' (int8 is symmetric)", True)
    _quant._activations(activations)
    return scheme


def quantize_experts(model_or_module, scheme, *, group_size=None, zero_point=False, activations=None):
    """Quantise, in place, the experts of every MoE module in `model_or_module` (a transformers model or
    block, a moe_ext.torch.MoE, or any module holding them): scheme "int8" (group_size None = one scale
    per row, or a multiple of 32) or "int4" (group_size 32, 64 or 128; zero_point=True for asymmetric),
    activations None (W8A16 / W4A16) or "int8" (W8A8 / W4A8). Already quantised modules are left as
    they are. Returns model_or_module. Raises (converting nothing) when a module cannot be run quantised
    or its shapes do not suit the format. Inference only."""
    if not isinstance(model_or_module, nn.Module):
        check.fail(TypeError, "model_or_module", "a torch.nn.Module", type(model_or_module).__name__)
    targets = _targets(model_or_module)
    if not targets:
        check.fail(ValueError, "model_or_module", "a module holding MoE experts (transformers experts modules "
                   "or moe_ext.torch.MoE) not yet quantised", f"{type(model_or_module).__name__} with none")
    weights = [w for _, m, plan in targets
               for w in ((m.w13_or_w1, m.w2) if plan is None else plan[2:])]
    scheme = _check_format(weights, scheme, group_size, zero_point, activations)
    options = dict(group_size=group_size, zero_point=zero_point, activations=activations)
    with torch.no_grad():
        for name, module, plan in targets:
            if plan is None:  # moe_ext.torch.MoE: swap its parameters, its forward dispatches on them
                for attr in (module.w13_or_w1_name, "w2"):
                    q = QuantizedExpertWeight.quantize(getattr(module, attr), scheme, **options)
                    delattr(module, attr)
                    setattr(module, attr, q)
                continue
            activation, gated, w_in, down = plan
            new = QuantizedExperts(QuantizedExpertWeight.quantize(w_in, scheme, **options),
                                   QuantizedExpertWeight.quantize(down, scheme, **options),
                                   activation, gated, type(module).__name__)
            parent_name, _, child = name.rpartition(".")
            setattr(model_or_module.get_submodule(parent_name), child, new)
            del w_in, down
    return model_or_module


def expert_bytes(model):
    """Bytes of the expert weights of `model`: float parameters of transformers experts modules and MoE
    experts, plus quantised buffers."""
    from ._module import MoE
    total = 0
    for module in model.modules():
        if isinstance(module, QuantizedExpertWeight):
            total += module.nbytes
        elif isinstance(module, MoE):
            total += sum(w.numel() * w.element_size() for w in (module.w13_or_w1, module.w2) if isinstance(w, Tensor))
        elif _hf_weights(module) is not None:
            total += sum(w.numel() * w.element_size() for w in _hf_weights(module)[1:])
    return total
