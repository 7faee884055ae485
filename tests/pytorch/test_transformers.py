"""The Hugging Face transformers backend (moe_ext.torch.hf, SPEC §7): `experts_implementation="moe_ext"`.

Tiny randomly initialised models built from configs (no download) of Mixtral, Qwen3-MoE, OLMoE,
DeepSeek-V3 and GPT-OSS (2 layers, both MoE, hidden 64, vocab 128), run with transformers' eager experts and with
moe_ext's, must agree:
- fp32 logits: relative error (Frobenius norm over all logits) <= FP32_RTOL;
- gradients of every parameter (expert weights, routers, attention, embeddings) of a causal-LM loss:
  relative error <= FP32_RTOL each;
- greedy `generate`: the same tokens;
- bf16 logits against fp32 eager: within bf16 rounding (BF16_RTOL), and no worse than transformers' own
  bf16 eager experts (BF16_VS_EAGER);
- `from_pretrained(..., experts_implementation="moe_ext")` from a saved checkpoint gives the same logits;
- no weight copy: the backend hands the experts' parameters themselves to moe_ext.torch.experts and no
  parameter's storage changes.
GPT-OSS (biases, transposed [E, in, out] weights, interleaved gate/up, its clamped alpha-scaled +1 gate) and
tanh-approximated gelu run on moe_ext too; variants moe_ext cannot run (float64, a post-expert norm, a gate
no activation description reproduces, ...) fall back to the eager forward (bit-identical output) with a
warning. Every experts class of transformers: test_hf_families.py.
The kernels' tiers are covered by the op tests: these run once (PER_TIER = False) on the default tier, to
keep the file fast.
"""
import math
import subprocess
import sys
import textwrap
import types

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import moe_ext.torch  # noqa: E402
from moe_ext.torch import hf  # noqa: E402

PER_TIER = False

# fp32: the experts are two GEMMs (d = 64, f = 48) and a weighted sum, in a different order than torch's
# BLAS; each output differs by ~sqrt(K) * 2^-24 relative (~5e-7) and that propagates, not grows, through
# two layers and the LM head (measured <= 2e-6 for logits and every gradient). 1e-5 = tests/conftest's
# GEMM_RTOL; a wrong activation, weight layout or routing weight gives errors of O(1) (the experts change
# the logits by > 100%, checked below).
FP32_RTOL = 1e-5
# bf16 (unit roundoff u = 2^-8 ~ 3.9e-3): attention, norms, residual adds and the LM head round to bf16
# in both implementations, so the logits of a 2-layer bf16 model are a few u from fp32 (eager: ~3-4u
# over all tokens, up to ~11u for its worst token). moe_ext accumulates the experts in f32 and rounds
# once: over the tokens routed as in fp32 its logits must be within 8u of fp32's, and its worst token
# within 1.5x of transformers' own bf16 eager worst token (no error of its own beyond bf16 rounding).
BF16_RTOL = 8 * 2.0 ** -8
BF16_VS_EAGER = 1.5
ARCHS = ("mixtral", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss")
COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=128, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def make_config(arch, **kw):
    if arch == "mixtral":
        return transformers.MixtralConfig(**COMMON, **dict(dict(intermediate_size=48, num_local_experts=4,
                                                                num_experts_per_tok=2), **kw))
    if arch == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**COMMON, **dict(dict(moe_intermediate_size=48, intermediate_size=96,
                                                                 num_experts=8, num_experts_per_tok=2, head_dim=16,
                                                                 norm_topk_prob=True), **kw))
    if arch == "olmoe":
        return transformers.OlmoeConfig(**COMMON, **dict(dict(intermediate_size=48, num_experts=8,
                                                              num_experts_per_tok=2), **kw))
    if arch == "deepseek_v3":
        return transformers.DeepseekV3Config(**COMMON, **dict(dict(
            moe_intermediate_size=48, intermediate_size=96, n_routed_experts=8, num_experts_per_tok=2,
            n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=0,
            n_shared_experts=1, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
            v_head_dim=16), **kw))
    if arch == "gpt_oss":
        return transformers.GptOssConfig(**COMMON, **dict(dict(intermediate_size=48, num_local_experts=4,
                                                               num_experts_per_tok=2, head_dim=16), **kw))
    raise AssertionError(arch)


def experts_modules(model):
    return [m for m in model.modules() if hasattr(m, "down_proj") and isinstance(m.down_proj, torch.nn.Parameter)]


def build(arch, seed=0, **kw):
    """A tiny random model in eval mode. The expert weights are re-drawn at fan-in scale and the routers
    spread (logits ~ N(0, 2^2)), so that the experts dominate the logits and routing is not near-uniform;
    DeepSeek-V3 gets a random nonzero e_score_correction_bias."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(make_config(arch, **kw)).eval()
    with torch.no_grad():
        for m in model.modules():
            if m in experts_modules(model):
                w_in = m.gate_up_proj if hasattr(m, "gate_up_proj") else m.up_proj
                w_in.normal_(0.0, 1 / math.sqrt(w_in.shape[-1]))
                m.down_proj.normal_(0.0, 1 / math.sqrt(m.down_proj.shape[-1]))
            elif type(m).__name__.lower().endswith("topkrouter"):
                m.weight.normal_(0.0, 2 / math.sqrt(m.weight.shape[-1]))
                if hasattr(m, "e_score_correction_bias"):
                    m.e_score_correction_bias.normal_(0.0, 0.1)
    return model


def tokens(seed=1, batch=2, length=9):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def rel(got, want):
    got, want = got.detach().double(), want.detach().double()
    return ((got - want).norm() / want.norm().clamp_min(1e-300)).item()


class Spy:
    """Wraps moe_ext.torch.experts (which hf.experts_forward looks up at call time) and records the weight
    tensors it is given."""

    def __init__(self, monkeypatch):
        self.calls = []
        self.real = moe_ext.torch.experts
        monkeypatch.setattr(moe_ext.torch, "experts", self)

    def __call__(self, x, w13_or_w1, w2, topk_weights, topk_ids, **kw):
        self.calls.append((w13_or_w1, w2, kw.get("activation")))
        return self.real(x, w13_or_w1, w2, topk_weights, topk_ids, **kw)

    def check_no_copy(self, model):
        """Every call got the parameters of one of the model's experts modules: the objects themselves, or
        (is_transposed experts) their transposed views, which share the parameter's memory."""
        params = {(id(m.gate_up_proj if hasattr(m, "gate_up_proj") else m.up_proj), id(m.down_proj))
                  for m in experts_modules(model)}
        assert self.calls, "moe_ext.torch.experts was never called"
        for w_in, w2, _ in self.calls:
            base_in, base_2 = (w if w._base is None else w._base for w in (w_in, w2))
            assert (id(base_in), id(base_2)) in params, "the backend passed something other than the parameters"
            assert isinstance(base_in, torch.nn.Parameter) and isinstance(base_2, torch.nn.Parameter)
            assert w_in.data_ptr() == base_in.data_ptr() and w2.data_ptr() == base_2.data_ptr()


def logits_and_grads(model, ids, implementation):
    model.set_experts_implementation(implementation)
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.logits.detach(), grads


# --------------------------------------------------------------------------------------------------
# parity with the eager experts
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_logits_and_gradients_match_eager(arch, monkeypatch):
    model = build(arch)
    ids = tokens()
    ptrs = {name: p.data_ptr() for name, p in model.named_parameters()}
    want, want_grads = logits_and_grads(model, ids, "eager")
    spy = Spy(monkeypatch)
    got, got_grads = logits_and_grads(model, ids, "moe_ext")
    assert model.config._experts_implementation == "moe_ext"
    spy.check_no_copy(model)
    assert len(spy.calls) == len(experts_modules(model))  # one call per MoE layer and forward
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == ptrs

    assert rel(got, want) <= FP32_RTOL, f"logits: relative error {rel(got, want):.3g}"
    assert got_grads.keys() == want_grads.keys()
    expert_params = [n for n in want_grads if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert len(expert_params) == 2 * len(experts_modules(model))
    for name in want_grads:
        assert rel(got_grads[name], want_grads[name]) <= FP32_RTOL, \
            f"grad of {name}: relative error {rel(got_grads[name], want_grads[name]):.3g}"

    # the comparison is not vacuous: without their experts' output the logits change by > 100%
    with torch.no_grad():
        saved = [m.down_proj.clone() for m in experts_modules(model)]
        for m in experts_modules(model):
            m.down_proj.zero_()
        assert rel(model(ids).logits, want) > 0.5
        for m, w in zip(experts_modules(model), saved):
            m.down_proj.copy_(w)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generate_same_tokens(arch):
    model = build(arch)
    prompt = tokens(seed=2, batch=2, length=7)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.set_experts_implementation("eager")
        want = model.generate(prompt, **kw)
        model.set_experts_implementation("moe_ext")
        got = model.generate(prompt, **kw)
    assert want.shape[1] == prompt.shape[1] + 8
    assert torch.equal(got, want)


class Routing:
    """Records the expert ids each experts module receives (forward pre-hooks), per call."""

    def __init__(self, model):
        self.ids = []
        self.handles = [m.register_forward_pre_hook(self.hook) for m in experts_modules(model)]

    def hook(self, module, args):
        self.ids.append(args[1].sort(dim=-1).values)  # a set per token (DeepSeek-V3's topk is unsorted)

    def remove(self):
        for h in self.handles:
            h.remove()


def per_token_rel(got, want):
    got, want = got.double().flatten(0, -2), want.double().flatten(0, -2)
    return (got - want).norm(dim=-1) / want.norm(dim=-1)


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_within_bf16_rounding_of_fp32_eager(arch, monkeypatch):
    """bf16 moe_ext against fp32 eager, token by token. A token whose experts differ from fp32's in some
    layer (bf16 rounding of the router's input or logits can flip a near tie; transformers' own bf16 eager
    run flips the same way) is not a rounding comparison: such tokens are excluded, and must be few."""
    model = build(arch)
    ids = tokens()
    with torch.no_grad():
        model.set_experts_implementation("eager")
        routing = Routing(model)
        want = model(ids).logits
        model.to(torch.bfloat16)
        eager_bf16 = model(ids).logits
        spy = Spy(monkeypatch)
        model.set_experts_implementation("moe_ext")
        got = model(ids).logits
        routing.remove()
    spy.check_no_copy(model)
    assert got.dtype == torch.bfloat16 and all(w.dtype == torch.bfloat16 for w, _, _ in spy.calls)
    layers = len(experts_modules(model))
    fp32_ids, eager_ids, our_ids = (routing.ids[i * layers:(i + 1) * layers] for i in range(3))
    same = torch.stack([(a == b).all(-1) for a, b in zip(our_ids, fp32_ids)]).all(0)
    eager_same = torch.stack([(a == b).all(-1) for a, b in zip(eager_ids, fp32_ids)]).all(0)
    assert same.float().mean() >= 0.75, f"{int((~same).sum())} of {same.numel()} tokens routed otherwise"
    err = rel(got.flatten(0, -2)[same], want.flatten(0, -2)[same])
    assert err <= BF16_RTOL, f"bf16 moe_ext vs fp32 eager: relative error {err:.3g}"
    worst = per_token_rel(got, want)[same].max()
    eager_worst = per_token_rel(eager_bf16, want)[same & eager_same].max()
    assert worst <= BF16_VS_EAGER * eager_worst, \
        f"bf16 moe_ext's worst token {worst:.3g} vs transformers' bf16 eager worst {eager_worst:.3g}"


@pytest.mark.parametrize("arch", ARCHS)
def test_from_pretrained_experts_implementation(arch, tmp_path, monkeypatch):
    model = build(arch)
    ids = tokens()
    model.set_experts_implementation("eager")
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="moe_ext",
                                                               dtype=torch.float32).eval()
    assert loaded.config._experts_implementation == "moe_ext"
    spy = Spy(monkeypatch)
    with torch.no_grad():
        got = loaded(ids).logits
    spy.check_no_copy(loaded)
    assert rel(got, want) <= FP32_RTOL


# --------------------------------------------------------------------------------------------------
# the experts module contract: sentinels, activations, fallbacks
# --------------------------------------------------------------------------------------------------
def _module_grads(fn, module, x, ids, w):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    y = fn(module, x, ids, w)
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    grads = dict(x=x.grad, w=w.grad, **{n: p.grad for n, p in module.named_parameters()})
    module.zero_grad(set_to_none=True)
    return y.detach(), grads


def test_expert_parallel_sentinels_are_skipped():
    """Under transformers' expert parallelism off-rank copies arrive as id == num_experts, weight 0."""
    experts = experts_modules(build("qwen3_moe"))[0]
    E, T, k = experts.num_experts, 40, 2
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(T, experts.gate_up_proj.shape[-1], generator=gen)
    ids = torch.stack([torch.randperm(E + 1, generator=gen)[:k] for _ in range(T)])  # E = sentinel
    w = torch.rand(T, k, generator=gen).masked_fill(ids == E, 0.0)
    assert (ids == E).any()
    want, want_g = _module_grads(hf._eager_forward(experts), experts, x, ids, w)
    got, got_g = _module_grads(hf.experts_forward, experts, x, ids, w)
    assert rel(got, want) <= FP32_RTOL
    for name in want_g:
        assert rel(got_g[name], want_g[name]) <= FP32_RTOL, name
    assert torch.all(got_g["w"][ids == E] == 0)


def test_empty_batch():
    experts = experts_modules(build("mixtral"))[0]
    x = torch.randn(0, experts.gate_up_proj.shape[-1])
    y = hf.experts_forward(experts, x, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert y.shape == x.shape


def test_geglu_model_runs_on_moe_ext(monkeypatch):
    """hidden_act="gelu" (exact erf gelu) gated experts: moe_ext's "geglu"."""
    model = build("mixtral", hidden_act="gelu")
    ids = tokens()
    want, _ = logits_and_grads(model, ids, "eager")
    spy = Spy(monkeypatch)
    got, _ = logits_and_grads(model, ids, "moe_ext")
    assert {a for _, _, a in spy.calls} == {"geglu"}
    assert rel(got, want) <= FP32_RTOL


@pytest.mark.parametrize("act, activation", [("relu", "relu"), ("gelu", "gelu"), ("relu2", "relu2"),
                                             ("gelu_pytorch_tanh", "gelu_tanh")])
def test_non_gated_experts(act, activation, monkeypatch):
    """Non-gated experts (has_gate=False: up_proj [E, f, d], as Nemotron-H) with relu, exact gelu, relu²
    (Nemotron-H's default) or tanh gelu."""
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts
    cfg = transformers.NemotronHConfig(hidden_size=64, n_routed_experts=6, moe_intermediate_size=40,
                                       num_experts_per_tok=2, mlp_hidden_act=act)
    torch.manual_seed(4)
    experts = NemotronHExperts(cfg)
    with torch.no_grad():
        experts.up_proj.normal_(0, 1 / 8)
        experts.down_proj.normal_(0, 1 / math.sqrt(40))
    assert experts.has_gate is False and hf.fallback_reason(experts) is None
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(30, 64, generator=gen)
    ids = torch.stack([torch.randperm(6, generator=gen)[:2] for _ in range(30)])
    w = torch.rand(30, 2, generator=gen)
    spy = Spy(monkeypatch)
    want, want_g = _module_grads(hf._eager_forward(experts), experts, x, ids, w)
    got, got_g = _module_grads(hf.experts_forward, experts, x, ids, w)
    assert [a for _, _, a in spy.calls] == [activation]
    assert rel(got, want) <= FP32_RTOL
    for name in want_g:
        assert rel(got_g[name], want_g[name]) <= FP32_RTOL, name


def _assert_falls_back(model, ids, reason, monkeypatch):
    with torch.no_grad():
        model.set_experts_implementation("eager")
        want = model(ids).logits
        spy = Spy(monkeypatch)
        model.set_experts_implementation("moe_ext")
        hf._warned.clear()
        with pytest.warns(RuntimeWarning, match=reason):
            got = model(ids).logits
    assert not spy.calls
    assert torch.equal(got, want)  # the eager forward itself: bit-identical


@pytest.mark.parametrize("hidden_act, activation", [("gelu_pytorch_tanh", "geglu_tanh"), ("gelu_new", "geglu_tanh"),
                                                    ("gelu_fast", "geglu_tanh"), ("relu2", "gated=True"),
                                                    ("quick_gelu", "swiglu(alpha=1.702)")])
def test_other_activations_run_on_moe_ext(hidden_act, activation, monkeypatch):
    """tanh-approximated gelu (three spellings), relu² and quick_gelu gated experts: descriptions
    verified on the module's own act_fn."""
    model = build("mixtral", hidden_act=hidden_act)
    ids = tokens()
    want, want_grads = logits_and_grads(model, ids, "eager")
    spy = Spy(monkeypatch)
    got, got_grads = logits_and_grads(model, ids, "moe_ext")
    spy.check_no_copy(model)
    assert all(activation in a for _, _, a in spy.calls), [a for _, _, a in spy.calls]
    assert rel(got, want) <= FP32_RTOL
    for name in want_grads:
        assert rel(got_grads[name], want_grads[name]) <= FP32_RTOL, name


def test_gpt_oss_runs_on_moe_ext(monkeypatch):
    """GPT-OSS experts: biases, transposed [E, in, out] weights (passed as views, no copy), interleaved
    gate/up, and its gate min(g, L) * sigmoid(alpha * min(g, L)) * (clip(u, -L, L) + 1). A small limit
    (swiglu_limit=1) makes the clamps matter; logits and every gradient against eager."""
    model = build("gpt_oss", swiglu_limit=1.0)
    with torch.no_grad():
        for m in experts_modules(model):
            m.gate_up_proj_bias.normal_(0.0, 0.5)
            m.down_proj_bias.normal_(0.0, 0.5)
    ids = tokens()
    ptrs = {name: p.data_ptr() for name, p in model.named_parameters()}
    want, want_grads = logits_and_grads(model, ids, "eager")
    spy = Spy(monkeypatch)
    got, got_grads = logits_and_grads(model, ids, "moe_ext")
    spy.check_no_copy(model)
    assert {a for _, _, a in spy.calls} == {"swiglu(alpha=1.702,limit=1.0,up_offset=1.0,interleaved)"}
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == ptrs
    assert rel(got, want) <= FP32_RTOL, f"logits: relative error {rel(got, want):.3g}"
    assert any(n.endswith("down_proj_bias") for n in want_grads)
    for name in want_grads:
        assert rel(got_grads[name], want_grads[name]) <= FP32_RTOL, \
            f"grad of {name}: relative error {rel(got_grads[name], want_grads[name]):.3g}"


def test_fallback_float64(monkeypatch):
    model = build("olmoe").double()
    _assert_falls_back(model, tokens(), "float64", monkeypatch)


@pytest.mark.parametrize("flag, value, reason", [
    ("has_bias", True, "has_bias without"), ("is_transposed", True, "do not match"),
    ("has_post_expert_norm", True, "without a callable post_expert_norm")])
def test_fallback_flags(flag, value, reason):
    """Flags the module's tensors contradict (a bias flag without bias tensors, [E, out, in] weights read
    as transposed, has_post_expert_norm without a post_expert_norm): the eager forward."""
    experts = experts_modules(build("mixtral"))[0]
    setattr(experts, flag, value)
    assert reason in hf.fallback_reason(experts)
    x = torch.randn(5, 64)
    ids = torch.tensor([[0, 1], [1, 2], [3, 0], [2, 3], [1, 0]])
    w = torch.rand(5, 2)
    hf._warned.clear()
    with pytest.warns(RuntimeWarning, match=reason):
        got = hf.experts_forward(experts, x, ids, w)
    assert torch.equal(got, hf._eager_forward(experts)(experts, x, ids, w))


class _ScaledRMSNorm(torch.nn.Module):
    """An RMS norm with a weight (MuseSpark's post-expert norm is of this kind)."""

    def __init__(self, d):
        super().__init__()
        self.weight = torch.nn.Parameter(1.0 + 0.3 * torch.randn(d, generator=torch.Generator().manual_seed(8)))

    def forward(self, y):
        y32 = y.float()
        return (self.weight * y32 * torch.rsqrt(y32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(y.dtype)


def test_post_expert_norm_runs_on_the_stage_ops(monkeypatch):
    """has_post_expert_norm: permute -> grouped_gemm -> activation -> grouped_gemm -> the module's own norm
    on every expert output row -> unpermute, every step with autograd: output and gradients (x, routing
    weights, expert weights, the norm's weight) against transformers' batched_mm backend (which applies
    post_expert_norm the same way), with expert-parallel sentinels (id == E, weight 0) among the ids."""
    from transformers.integrations.moe import batched_mm_experts_forward
    experts = experts_modules(build("mixtral"))[0]
    experts.post_expert_norm = _ScaledRMSNorm(experts.down_proj.shape[1])
    experts.has_post_expert_norm = True
    experts._is_expert_parallel = True  # batched_mm then clamps the sentinels and masks their weights
    assert hf.fallback_reason(experts) is None
    E, T, k = experts.num_experts, 30, 2
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(T, experts.gate_up_proj.shape[-1], generator=gen)
    ids = torch.stack([torch.randperm(E + 1, generator=gen)[:k] for _ in range(T)])  # E = sentinel
    w = torch.rand(T, k, generator=gen).masked_fill(ids == E, 0.0)
    assert (ids == E).any()
    staged = []
    real = hf._experts_with_post_norm
    monkeypatch.setattr(hf, "_experts_with_post_norm", lambda *a: staged.append(a[4]) or real(*a))
    spy = Spy(monkeypatch)
    want, want_g = _module_grads(batched_mm_experts_forward, experts, x, ids, w)
    got, got_g = _module_grads(hf.experts_forward, experts, x, ids, w)
    assert staged == ["swiglu"] and not spy.calls  # the stage ops, not the fused experts
    assert "post_expert_norm.weight" in want_g
    assert rel(got, want) <= FP32_RTOL
    for name in want_g:
        assert rel(got_g[name], want_g[name]) <= FP32_RTOL, name
    assert torch.all(got_g["w"][ids == E] == 0)


def test_softcapped_swiglu_is_verified_and_other_softcaps_fall_back():
    """A gate softcap_g(g) sigmoid(g) softcap_u(u) with its caps as module attributes (numbers or objects
    with .softcap, as Inkling2's act_fn holds them) maps to swiglu(gate_softcap=..,up_softcap=..); one that
    feeds the capped gate to the sigmoid too (silu(softcap(g))) is no description: it falls back."""
    experts = experts_modules(build("mixtral"))[0]

    def cap(z, c):
        return c * torch.tanh(z / c)

    experts.gate_softcap, experts.up_softcap = 1.5, types.SimpleNamespace(softcap=2.5)
    experts._apply_gate = lambda h: cap(h.chunk(2, -1)[0], 1.5) * torch.sigmoid(h.chunk(2, -1)[0]) \
        * cap(h.chunk(2, -1)[1], 2.5)
    assert hf.activation_of(experts) == "swiglu(gate_softcap=1.5,up_softcap=2.5)"
    experts._apply_gate = lambda h: torch.nn.functional.silu(cap(h.chunk(2, -1)[0], 1.5)) * cap(h.chunk(2, -1)[1], 2.5)
    assert hf.activation_of(experts) is None and "_apply_gate" in hf.fallback_reason(experts)


def test_interleaved_flag_with_the_default_gate_runs_concatenated():
    """is_concatenated=False describes the weights, but transformers' default gate splits [gate | up]
    (its grouped_mm backend does the same): the probe finds "swiglu", not an interleaved description."""
    experts = experts_modules(build("mixtral"))[0]
    experts.is_concatenated = False
    assert hf.fallback_reason(experts) is None and hf.activation_of(experts) == "swiglu"


def test_fallback_custom_gate():
    experts = experts_modules(build("mixtral"))[0]
    experts._apply_gate = lambda h: h[:, :h.shape[1] // 2]  # anything but the default split-act-multiply
    assert "_apply_gate" in hf.fallback_reason(experts)


def test_fallback_limit_after_the_activation():
    """A gate that clamps after the activation, min(silu(g), L) * clip(u, +-L) (BailingHybrid / Step3p7
    with a limit), is no description: the probe, whose values straddle L, tells it from silu(min(g, L))."""
    experts = experts_modules(build("mixtral"))[0]
    experts.limit = 2.0
    experts._apply_gate = lambda h: (torch.nn.functional.silu(h.chunk(2, -1)[0]).clamp(max=2.0)
                                     * h.chunk(2, -1)[1].clamp(-2.0, 2.0))
    assert "_apply_gate" in hf.fallback_reason(experts)


def test_custom_gate_verified_and_redecided_when_its_attributes_change():
    """An instance's own clamped gate is verified (swiglu(limit=L)); changing L re-decides. (Compared with
    transformers' batched_mm backend, which calls _apply_gate, as moe_ext follows it.)"""
    experts = experts_modules(build("mixtral"))[0]
    F = torch.nn.functional

    def gate(h):
        g, u = h.chunk(2, -1)
        return F.silu(g.clamp(max=experts.limit)) * u.clamp(-experts.limit, experts.limit)

    experts._apply_gate = gate
    experts.limit = 3.0
    assert hf.activation_of(experts) == "swiglu(limit=3.0)"
    experts.limit = 0.5
    assert hf.activation_of(experts) == "swiglu(limit=0.5)"
    x = 2 * torch.randn(7, 64)
    ids = torch.tensor([[0, 1], [1, 2], [3, 0], [2, 3], [1, 0], [0, 2], [3, 1]])
    w = torch.rand(7, 2)
    # Mixtral's own eager forward does not call _apply_gate; transformers' batched_mm backend does
    from transformers.integrations.moe import batched_mm_experts_forward
    want = batched_mm_experts_forward(experts, x, ids, w)
    assert rel(hf.experts_forward(experts, x, ids, w), want) <= FP32_RTOL


def test_static_description_agrees_with_the_probe():
    """Under torch.compile the default gate is decided from the act_fn's type alone (no probe): for every
    transformers activation name that maps, the static description is the one the probe verifies."""
    from transformers.activations import ACT2FN
    experts = experts_modules(build("mixtral"))[0]
    mapped = 0
    for name in ACT2FN:
        try:
            experts.act_fn = ACT2FN[name]
        except Exception:  # noqa: BLE001  (activations needing arguments or packages)
            continue
        static = hf._static_description(experts, True)
        if static is not None:
            mapped += 1
            assert hf.activation_of(experts) == static, name
    assert mapped >= 8


def test_torch_compile_fullgraph_default_gate_without_an_eager_call(monkeypatch):
    """The default gate with a known act_fn is decided from its type while torch.compile traces (no
    probe, no eager call first): it runs on moe_ext, not the fallback."""
    experts = experts_modules(build("mixtral"))[0]
    experts.config._experts_implementation = "moe_ext"
    x = torch.randn(6, 64)
    ids = torch.tensor([[0, 1], [1, 2], [3, 0], [2, 3], [1, 0], [0, 2]])
    w = torch.rand(6, 2)
    spy = Spy(monkeypatch)
    got = torch.compile(experts, fullgraph=True, backend="aot_eager")(x, ids, w)
    assert spy.calls and "_moe_ext_activation" not in vars(experts)
    assert rel(got, hf._eager_forward(experts)(experts, x, ids, w)) <= FP32_RTOL


def test_torch_compile_fullgraph_gpt_oss_experts():
    """The backend traces with fullgraph=True once the module's activation is decided (one eager call)."""
    experts = experts_modules(build("gpt_oss", swiglu_limit=1.0))[0]
    experts.config._experts_implementation = "moe_ext"
    x = torch.randn(6, 64)
    ids = torch.tensor([[0, 1], [1, 2], [3, 0], [2, 3], [1, 0], [0, 2]])
    w = torch.rand(6, 2)
    want = experts(x, ids, w)
    compiled = torch.compile(experts, fullgraph=True, backend="aot_eager")
    assert rel(compiled(x, ids, w), want) <= FP32_RTOL


# --------------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------------
def test_registered_and_idempotent():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface
    assert hf.register() and hf.register()
    assert hf.is_registered() and ALL_EXPERTS_FUNCTIONS["moe_ext"] is hf.experts_forward
    # transformers' interface already loaded (the order "transformers first"): registered at once
    del ExpertsInterface._global_mapping["moe_ext"]
    try:
        assert not hf.is_registered()
        assert hf.register_when_available() and hf.is_registered()
    finally:
        hf.register()


SCRIPT_IMPORT_ORDER = """
    import sys
    import moe_ext.torch
    assert "moe_ext.torch.hf" in sys.modules, "import moe_ext.torch does not import moe_ext.torch.hf"
    assert "transformers" not in sys.modules, "importing moe_ext.torch must not import transformers"
    from transformers import MixtralForCausalLM  # loads transformers.integrations.moe
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    assert "moe_ext" in ALL_EXPERTS_FUNCTIONS
    print("ok")
"""
def test_import_registers():
    """`import moe_ext.torch` alone registers "moe_ext" (through moe_ext.torch.hf's import hook) when
    transformers is imported after it, without importing transformers itself. (A fresh interpreter: this
    one has transformers loaded.)"""
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT_IMPORT_ORDER)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


def test_without_transformers(monkeypatch):
    """As if transformers were not installed (sys.modules entry None: importing it raises ImportError):
    registration does nothing and raises nothing, and no import hook is left behind."""
    for name in [n for n in sys.modules if n.startswith("transformers.")]:  # restored after the test
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "transformers", None)
    hooks = [f for f in sys.meta_path if isinstance(f, hf._RegisterOnImport)]
    assert hf.register_when_available() is False
    assert hf.register() is False
    assert [f for f in sys.meta_path if isinstance(f, hf._RegisterOnImport)] == hooks
