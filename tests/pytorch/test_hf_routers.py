"""moe_ext.route reproduces the routers of Hugging Face transformers' MoE models (SPEC §3.1).

Each case builds the router ("gate") module of a tiny randomly initialised config of Mixtral, Qwen3-MoE
(norm_topk_prob on and off), OLMoE (both) or DeepSeek-V3 (grouped sigmoid routing with a random nonzero
e_score_correction_bias, routed_scaling_factor != 1, norm_topk_prob on and off, and the real model's
256 experts / 8 groups / 4 kept / top-8 shape), runs it in float32 on random hidden states, and compares
with moe_ext.route (the NumPy API) given the mapping `route_options` below:
- ids: equal, on every row whose selection is decided by more than float32 rounding (see MARGIN);
  Mixtral/Qwen/OLMoE return their ids best first (torch.topk sorted) and so does route, so the order
  must match too; DeepSeek-V3 calls topk(sorted=False), so there the ids are compared as sets.
- weights: elementwise relative error <= WEIGHT_RTOL (f32 rounding, see below).

The routers run per ISA tier (the route kernel is compiled per tier); transformers is imported once.
"""
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import moe_ext  # noqa: E402
from conftest import selection_margins  # noqa: E402

# Both sides compute logits = x @ w^T in float32, torch with its BLAS and route with its own dot
# product: the summation orders differ, so a logit differs by up to ~sqrt(d) * 2^-24 * |x||w| ~ 1e-6
# (d = 64, unit-scale logits). A softmax/sigmoid score and a renormalised weight inherit that as a
# relative error of ~1e-6 plus a few ulp for expf and the divisions: 1e-5 is a safe bound that is still
# "float32 rounding" (any wrong mapping, e.g. a missed renormalisation or scale, is an O(1) error).
WEIGHT_RTOL = 1e-5
# A row whose float64 selection keys have a decisive gap below this could flip on those ~1e-6 logit
# differences; such rows are reported, not compared (with these seeds and spreads they are rare, and
# each test requires at least MIN_CLEAR of its rows to be compared).
MARGIN = 1e-5
MIN_CLEAR = 0.95
T = 256
D = 64


def _config(name, **kw):
    common = dict(hidden_size=D, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                  vocab_size=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if name == "mixtral":
        return transformers.MixtralConfig(**common, intermediate_size=32,
                                          **dict(dict(num_local_experts=8, num_experts_per_tok=2), **kw))
    if name == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**common, moe_intermediate_size=32,
                                           **dict(dict(num_experts=16, num_experts_per_tok=4), **kw))
    if name == "olmoe":
        return transformers.OlmoeConfig(**common, intermediate_size=32,
                                        **dict(dict(num_experts=16, num_experts_per_tok=4), **kw))
    if name == "deepseek_v3":
        return transformers.DeepseekV3Config(**common, moe_intermediate_size=32, q_lora_rank=None,
                                             **dict(dict(n_routed_experts=16, num_experts_per_tok=4,
                                                         n_group=4, topk_group=2,
                                                         routed_scaling_factor=2.5), **kw))
    raise AssertionError(name)


def _router(name, config):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter
    cls = dict(mixtral=MixtralTopKRouter, qwen3_moe=Qwen3MoeTopKRouter, olmoe=OlmoeTopKRouter,
               deepseek_v3=DeepseekV3TopkRouter)[name]
    return cls(config)


def route_options(config, gate):
    """The moe_ext.route arguments that reproduce this HF router: (top_k, kwargs).

    Mixtral renormalises always; Qwen3-MoE and OLMoE when norm_topk_prob; all three score with a softmax
    over all experts. DeepSeek-V3: sigmoid scores, the correction bias for selection only, grouped
    selection (n_group groups ranked by their two best corrected scores, topk_group kept), renormalise
    when norm_topk_prob, then multiply by routed_scaling_factor."""
    if isinstance(config, transformers.DeepseekV3Config):
        return gate.top_k, dict(scoring="sigmoid", renormalize=bool(config.norm_topk_prob),
                                scale=float(config.routed_scaling_factor),
                                correction_bias=gate.e_score_correction_bias.detach().numpy(),
                                n_group=int(config.n_group), topk_group=int(config.topk_group))
    if isinstance(config, transformers.MixtralConfig):
        return gate.top_k, dict(scoring="softmax", renormalize=True)
    return gate.top_k, dict(scoring="softmax", renormalize=bool(config.norm_topk_prob))


def _keys64(x, w, opts):
    """The float64 selection keys (scores + correction bias) the margins are measured on."""
    logits = x.astype(np.float64) @ w.astype(np.float64).T
    if opts["scoring"] == "sigmoid":
        scores = 1.0 / (1.0 + np.exp(-logits))
    else:
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        scores = e / e.sum(axis=1, keepdims=True)
    cb = opts.get("correction_bias")
    return scores if cb is None else scores + cb.astype(np.float64)


CASES = {
    "mixtral": ("mixtral", {}),
    "mixtral_k1": ("mixtral", dict(num_experts_per_tok=1)),
    "qwen3_moe_norm": ("qwen3_moe", dict(norm_topk_prob=True)),
    "qwen3_moe_nonorm": ("qwen3_moe", dict(norm_topk_prob=False)),
    "olmoe": ("olmoe", dict(norm_topk_prob=False)),
    "olmoe_norm": ("olmoe", dict(norm_topk_prob=True)),
    "deepseek_v3_norm": ("deepseek_v3", dict(norm_topk_prob=True)),
    "deepseek_v3_nonorm": ("deepseek_v3", dict(norm_topk_prob=False)),
    "deepseek_v3_one_group": ("deepseek_v3", dict(n_group=1, topk_group=1)),
    "deepseek_v3_full_shape": ("deepseek_v3", dict(n_routed_experts=256, num_experts_per_tok=8,
                                                   n_group=8, topk_group=4)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_route_reproduces_hf_router(case):
    name, kw = CASES[case]
    config = _config(name, **kw)
    gen = torch.Generator().manual_seed(1234 + sorted(CASES).index(case))
    gate = _router(name, config).float()
    E = gate.weight.shape[0]
    with torch.no_grad():
        # logits ~ N(0, 2^2) for unit hidden states (as tests/conftest.random_router): clear top-k rows
        gate.weight.copy_(torch.randn(E, D, generator=gen) * (2.0 / math.sqrt(D)))
        if name == "deepseek_v3":
            # a correction bias of the order of the score gaps, so that it changes the selection
            gate.e_score_correction_bias.copy_(torch.randn(E, generator=gen) * 0.1)
    x = torch.randn(T, D, generator=gen)

    with torch.no_grad():
        _, hf_weights, hf_ids = gate(x)
    assert hf_weights.dtype == torch.float32
    hf_weights, hf_ids = hf_weights.numpy(), hf_ids.numpy()

    k, opts = route_options(config, gate)
    xn, wn = x.numpy(), gate.weight.detach().numpy()
    weights, ids = moe_ext.route(xn, wn, k, **opts)
    assert weights.shape == ids.shape == (T, k)

    if name == "deepseek_v3":  # topk(sorted=False): the slot order is torch's, compare as sets
        order, hf_order = np.argsort(ids, axis=1), np.argsort(hf_ids, axis=1)
        ids, weights = np.take_along_axis(ids, order, 1), np.take_along_axis(weights, order, 1)
        hf_ids, hf_weights = np.take_along_axis(hf_ids, hf_order, 1), np.take_along_axis(hf_weights, hf_order, 1)
        # the correction bias really matters here: without it some rows select other experts
        _, plain = moe_ext.route(xn, wn, k, **dict(opts, correction_bias=None))
        assert (np.sort(plain, axis=1) != hf_ids).any(axis=1).any()

    margins = selection_margins(_keys64(xn, wn, opts), k, opts.get("n_group"), opts.get("topk_group"))
    clear = margins > MARGIN
    assert clear.mean() >= MIN_CLEAR, f"only {clear.sum()} of {T} rows have a clear selection"
    np.testing.assert_array_equal(ids[clear], hf_ids[clear].astype(np.int32))
    rel = np.abs(weights[clear].astype(np.float64) - hf_weights[clear]) / np.abs(hf_weights[clear])
    assert rel.max() <= WEIGHT_RTOL, f"max weight relative error {rel.max():.3g}"
