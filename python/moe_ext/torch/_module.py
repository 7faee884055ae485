"""moe_ext.torch.MoE: an nn.Module MoE block (router + expert FFNs) on the moe_ext ops."""
import math

import torch
from torch import nn

from . import _functional as F
from . import _ops


class MoE(nn.Module):
    """A Mixture-of-Experts block: route each token to `top_k` of `num_experts` FFN experts.

    Parameters (SPEC §2 names and nn.Linear [out, in] layouts): `w_router [E, d]`, `router_bias [E]` (with
    router_bias=True), `w13 [E, 2f, d]` (gate and up rows concatenated, gate rows 0..f-1, or interleaved
    g0 u0 g1 u1 ..., as the activation says) for gated activations or `w1 [E, f, d]` otherwise, and
    `w2 [E, d, f]`; with bias=True the expert biases `b13 [E, 2f]` (or `b1 [E, f]`) and `b2 [E, d]`.
    A `correction_bias [E]` buffer (selection only, DeepSeek-V3 style) exists with correction_bias=True.
    `activation`: a preset name ("swiglu", "geglu", "geglu_tanh", "relu", "gelu", "gelu_tanh", "relu2"), a
    canonical string such as "swiglu(alpha=1.702,limit=7.0,up_offset=1.0,interleaved)", or a
    moe_ext.Activation; the module keeps its canonical string.

    forward(x [..., d]) -> y [..., d]. Inference calls (no gradient wanted, CPU, not under torch.compile)
    run on packed copies of w13_or_w1 and w2 kept in the packed expert-weight cache (about their bytes once
    more; rebuilt when a weight changes; moe_ext.torch.set_weight_cache / MOE_EXT_WEIGHT_CACHE=0; docs/api.md
    §8). After each forward:
    * `last_expert_counts` [E] int64: copies routed to each expert (before any capacity drop);
    * `load_balancing_loss()` and `router_z_loss()`: SPEC §3.6 losses of that forward, differentiable
      through the router (add them to the training loss). The module keeps the last forward's router
      inputs for them until the next forward.
    """

    def __init__(self, hidden_size, intermediate_size, num_experts, top_k, *, activation="swiglu",
                 scoring="softmax", renormalize=True, scale=1.0, router_bias=False, correction_bias=False,
                 n_group=None, topk_group=None, capacity=None, bias=False, device=None, dtype=None):
        super().__init__()
        activation = _ops._spec(activation)  # ValueError/TypeError naming `activation` when invalid
        gated = _ops._gated(activation)
        if not 1 <= int(top_k) <= int(num_experts):
            raise ValueError(f"top_k: expected an integer in [1, num_experts = {num_experts}]; got {top_k!r}")
        factory = dict(device=device, dtype=dtype)
        d, f, E = int(hidden_size), int(intermediate_size), int(num_experts)
        self.hidden_size, self.intermediate_size, self.num_experts, self.top_k = d, f, E, int(top_k)
        self.activation, self.scoring, self.renormalize, self.scale = activation, scoring, bool(renormalize), float(scale)
        self.n_group, self.topk_group, self.capacity = n_group, topk_group, capacity
        self.w_router = nn.Parameter(torch.empty(E, d, **factory))
        self.router_bias = nn.Parameter(torch.empty(E, **factory)) if router_bias else None
        if correction_bias:
            self.register_buffer("correction_bias", torch.zeros(E, dtype=torch.float32, device=device))
        else:
            self.correction_bias = None
        self.gated = gated
        if gated:
            self.w13 = nn.Parameter(torch.empty(E, 2 * f, d, **factory))
        else:
            self.w1 = nn.Parameter(torch.empty(E, f, d, **factory))
        self.w2 = nn.Parameter(torch.empty(E, d, f, **factory))
        if bias:
            setattr(self, self.b13_or_b1_name, nn.Parameter(torch.empty(E, 2 * f if gated else f, **factory)))
            self.b2 = nn.Parameter(torch.empty(E, d, **factory))
        else:
            setattr(self, self.b13_or_b1_name, None)
            self.b2 = None
        self._last = None
        self.last_expert_counts = None
        self.reset_parameters()

    @property
    def w13_or_w1_name(self):
        return "w13" if self.gated else "w1"

    @property
    def w13_or_w1(self):
        return getattr(self, self.w13_or_w1_name)

    @property
    def b13_or_b1_name(self):
        return "b13" if self.gated else "b1"

    @property
    def b13_or_b1(self):
        return getattr(self, self.b13_or_b1_name)

    def reset_parameters(self):
        """nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for every weight and expert bias (fan_in
        of its weight), router bias 0."""
        with torch.no_grad():
            for w, b in ((self.w_router, None), (self.w13_or_w1, self.b13_or_b1), (self.w2, self.b2)):
                bound = 1.0 / math.sqrt(max(w.shape[-1], 1))
                w.uniform_(-bound, bound)
                if b is not None:
                    b.uniform_(-bound, bound)
            if self.router_bias is not None:
                self.router_bias.zero_()

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, self.hidden_size)
        weights, ids, probs = F.route(x, self.w_router, self.top_k, scoring=self.scoring,
                                      renormalize=self.renormalize, scale=self.scale, bias=self.router_bias,
                                      correction_bias=self.correction_bias, n_group=self.n_group,
                                      topk_group=self.topk_group)
        y = F.experts(x, self.w13_or_w1, self.w2, weights, ids, activation=self.activation,
                      capacity=self.capacity, b13_or_b1=self.b13_or_b1, b2=self.b2, weight_cache=True)
        self._last = (x, probs, ids)
        self.last_expert_counts = torch.zeros(self.num_experts, dtype=torch.int64, device=x.device).scatter_add_(
            0, ids.reshape(-1).long(), torch.ones(ids.numel(), dtype=torch.int64, device=x.device))
        return y.reshape(shape)

    def _require_forward(self):
        if self._last is None:
            raise RuntimeError("MoE: no forward has run yet (the losses are those of the last forward)")
        return self._last

    def load_balancing_loss(self):
        """E * sum_e f_e * P_e of the last forward (f_e: fraction of copies routed to e, P_e: mean router
        probability of e), a 0-d float32 tensor differentiable through the router."""
        _, probs, ids = self._require_forward()
        return F.load_balancing_loss(probs, ids, self.num_experts)

    def router_z_loss(self):
        """mean over the last forward's tokens of logsumexp(router logits)^2, differentiable."""
        x, _, _ = self._require_forward()
        logits = nn.functional.linear(x.float(), self.w_router.float(),
                                      None if self.router_bias is None else self.router_bias.float())
        return F.router_z_loss(logits)

    def extra_repr(self):
        return (f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
                f"num_experts={self.num_experts}, top_k={self.top_k}, activation={self.activation!r}, "
                f"scoring={self.scoring!r}, renormalize={self.renormalize}, bias={self.b2 is not None}")

    @classmethod
    def from_hf(cls, block):
        """An MoE sharing the weights (same Parameter objects, no copy) of a Hugging Face transformers
        sparse MoE block with `gate.weight [E, d]` and `experts.gate_up_proj [E, 2f, d]` (or `up_proj`
        when not gated), `experts.down_proj [E, d, f]` and, with has_bias, their `_bias` parameters
        (Mixtral, Qwen2/3-MoE without shared expert, OLMoE, ...: softmax router, top-k, renormalised
        unless `gate.norm_topk_prob` is False). The activation is the description moe_ext.torch.hf
        verifies on the experts' own gate / act_fn (see hf.activation_of). Raises ValueError for variants
        this module does not hold ([E, in, out] transposed weights, shared experts, router bias, a gate
        no description reproduces)."""
        from . import hf
        gate, experts = getattr(block, "gate", None), getattr(block, "experts", None)
        if gate is None or experts is None or not hasattr(experts, "down_proj"):
            raise ValueError(f"block: expected a transformers sparse MoE block with .gate and .experts.gate_up_proj/"
                             f".down_proj; got {type(block).__name__}")
        for flag in ("shared_expert", "shared_experts"):
            if getattr(block, flag, None) is not None:
                raise ValueError(f"block: shared experts are not supported; got {type(block).__name__}.{flag}")
        for flag, ours in (("is_transposed", False), ("has_post_expert_norm", False)):
            if bool(getattr(experts, flag, ours)) != ours:
                raise ValueError(f"block.experts: expected {flag}={ours}; got {not ours}")
        if getattr(gate, "bias", None) is not None:
            raise ValueError("block.gate: a router bias is not supported by from_hf")
        reason = hf.fallback_reason(experts)
        if reason is not None:
            raise ValueError(f"block.experts: {reason}")
        activation = hf.activation_of(experts)
        gated = bool(getattr(experts, "has_gate", True))
        w_name = "gate_up_proj" if gated else "up_proj"
        w_in, w2, w_router = getattr(experts, w_name), experts.down_proj, gate.weight
        E, rows, d = w_in.shape
        has_bias = bool(getattr(experts, "has_bias", False))
        top_k = getattr(gate, "top_k", None) or getattr(block, "top_k")
        renormalize = bool(getattr(gate, "norm_topk_prob", True))
        module = cls(d, rows // 2 if gated else rows, E, top_k, activation=activation, renormalize=renormalize,
                     bias=has_bias, device="meta", dtype=w_in.dtype)
        module.w_router, module.w2 = w_router, w2  # the same Parameters: shared storage
        setattr(module, module.w13_or_w1_name, w_in)
        if has_bias:
            setattr(module, module.b13_or_b1_name, getattr(experts, w_name + "_bias"))
            module.b2 = experts.down_proj_bias
        return module
