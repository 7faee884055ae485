"""Every MoE family of the installed transformers on the "moe_ext" experts backend (SPEC §7).

Discovery (from transformers itself, no list of ours): the source of every
`transformers/models/*/modeling_*.py` is scanned for a class decorated with `@use_experts_implementation`
(with or without arguments) at the start of a line; `test_discovery` then checks that the scan found every
such decorator line, that each class, once imported, carries the decorator's effect (its `__init__` is
the wrapper, `functools.wraps`-marked with `__wrapped__`, and the class has `_apply_gate`), and that there
are at least MIN_FAMILIES of them (a broken scan fails, it does not shrink the test).

Each family's experts module is built from the family's own config class (the one its `__init__` is
annotated with, else the config classes of that model, text configs first, the first one it builds
from) with small sizes: hidden 64, intermediate 48, 8 experts (whatever the config calls them:
SIZE_ATTRIBUTES), plus the few per-family arguments in OVERRIDES. A family that cannot be built fails
with the errors of every config tried: never a silent skip.

Then, on the same random inputs (fp32 weights at fan-in scale, random biases and norm weights, hidden
states scaled so that a clamped gate's limit is crossed, random top-k ids and weights), transformers'
"eager" forward and "moe_ext" run forward and backward, and:
- moe_ext must have run (one call of moe_ext.torch.experts, or of the stage-op path for a post-expert norm,
  no fallback warning; the description EXPECTED_ACTIVATION names where listed), except for the families
  listed in EXPECTED_FALLBACK (none with transformers 5.25), which must fall back with that reason,
  bit-identical to eager (a listed family that starts running on moe_ext fails too: update the table);
- output relative error <= OUT_RTOL, every gradient (hidden states, routing weights, every parameter)
  relative error <= GRAD_RTOL (Frobenius norms; fp32 in both).
Full models: tiny CausalLMs of gpt_oss and deepseek_v4 (logits and every parameter's gradient of a
causal-LM loss against eager).
"""
import inspect
import math
import pathlib
import re
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import moe_ext.torch  # noqa: E402
from moe_ext.torch import hf  # noqa: E402

PER_TIER = False  # the kernels' tiers are covered by the op tests
MIN_FAMILIES = 60
HIDDEN, INTERMEDIATE, EXPERTS, TOP_K, TOKENS = 64, 48, 8, 2, 40
# fp32 on both sides: two GEMMs of K <= 64 in another order and the activation in float32 (~1e-6); a
# wrong activation, layout, bias or clamp is O(1e-2) or more.
OUT_RTOL = 1e-4
GRAD_RTOL = 1e-3

SIZE_ATTRIBUTES = {
    "hidden_size": HIDDEN, "moe_hidden_size": HIDDEN,
    "intermediate_size": INTERMEDIATE, "moe_intermediate_size": INTERMEDIATE,
    "expert_ffn_hidden_size": INTERMEDIATE, "expert_intermediate_size": INTERMEDIATE,
    "num_experts": EXPERTS, "num_local_experts": EXPERTS, "n_routed_experts": EXPERTS,
    "moe_num_experts": EXPERTS, "num_experts_per_tok": TOP_K,
}
# per experts class: config attributes beyond the sizes (set after the config's own __init__)
OVERRIDES = {
    "NemotronHExperts": dict(moe_latent_size=None),  # experts on the hidden size, not a latent one
    "Ernie4_5_VLMoeMoeExperts": dict(moe_intermediate_size=[INTERMEDIATE, INTERMEDIATE]),  # [text, vision]
}
# per experts class: arguments of its __init__ beyond config (as its MoE block passes them)
INIT_ARGS = {
    "Ernie4_5_VLMoeMoeExperts": dict(intermediate_size=INTERMEDIATE),  # the block passes its modality's size
}
# per experts class: how it is called. ErgoExpertProjections' forward takes one route per row with unit
# weight (its subclass ErgoExperts repeats the rows and applies the weights): top-k 1, weights 1, and no
# gradient of top_k_weights (its eager forward does not read them).
CALLS = {
    "ErgoExpertProjections": dict(top_k=1, unit_weights=True),
}
# experts class -> the reason hf.fallback_reason gives: variants moe_ext's kernels do not compute. None
# in transformers 5.25 (MuseSpark's post-expert norm runs on the stage ops, Inkling2's softcapped SwiGLU
# is the description swiglu(gate_softcap=...,up_softcap=...)).
EXPECTED_FALLBACK = {}
# experts class -> the activation description the backend must have chosen (beyond "runs and matches")
EXPECTED_ACTIVATION = {
    "Inkling2Experts": "swiglu(gate_softcap=4.0,up_softcap=25.0)",
    "Inkling2LoopExperts": "swiglu(gate_softcap=4.0,up_softcap=25.0)",
}


# --------------------------------------------------------------------------------------------------
# discovery
# --------------------------------------------------------------------------------------------------
MODELS_DIR = pathlib.Path(transformers.__file__).parent / "models"
DECORATED_CLASS = re.compile(r"^@use_experts_implementation\b(?:\((?P<args>[^)]*)\))?[ \t]*\n"
                             r"class (?P<name>\w+)\(", re.M)
DECORATOR_LINE = re.compile(r"^@use_experts_implementation\b", re.M)


def _scan():
    """[(model, module name, class name)] and the number of decorator lines, from the sources."""
    found, decorators = [], 0
    for path in sorted(MODELS_DIR.glob("*/modeling_*.py")):
        source = path.read_text(encoding="utf-8")
        if "@use_experts_implementation" not in source:
            continue
        decorators += len(DECORATOR_LINE.findall(source))
        found += [(path.parent.name, path.stem, m.group("name")) for m in DECORATED_CLASS.finditer(source)]
    return found, decorators


FAMILIES, DECORATOR_LINES = _scan()
FAMILY_IDS = [f"{model}.{name}" for model, _, name in FAMILIES]


def experts_class(model, module_name, class_name):
    module = __import__(f"transformers.models.{model}.{module_name}", fromlist=[class_name])
    return getattr(module, class_name)


def test_discovery():
    assert len(FAMILIES) == DECORATOR_LINES, "a @use_experts_implementation line not followed by its class"
    assert len(FAMILIES) >= MIN_FAMILIES, f"found {len(FAMILIES)} decorated experts classes"
    assert len(set(FAMILY_IDS)) == len(FAMILY_IDS)
    for listed in list(EXPECTED_FALLBACK) + list(EXPECTED_ACTIVATION) + list(OVERRIDES) + list(CALLS) + list(INIT_ARGS):
        assert listed in {name for _, _, name in FAMILIES}, f"{listed} is no longer a family: update the table"


# --------------------------------------------------------------------------------------------------
# building an experts module from its family's config
# --------------------------------------------------------------------------------------------------
def _config_classes(cls, model):
    """The annotated config class first, then the model's config classes, text configs first."""
    config_base = transformers.PretrainedConfig
    original_init = cls.__init__.__wrapped__
    annotated = inspect.signature(original_init).parameters["config"].annotation
    module = inspect.getmodule(cls)
    local = sorted((v for v in vars(module).values() if isinstance(v, type) and issubclass(v, config_base)
                    and v.__module__.startswith(f"transformers.models.{model}.")),
                   key=lambda c: ("Text" not in c.__name__, c.__name__))
    first = [annotated] if isinstance(annotated, type) and issubclass(annotated, config_base) else []
    return first + [c for c in local if c not in first]


def _extra_init_args(cls):
    """Required __init__ arguments beyond config: layer_idx (a per-layer setting: layer 0)."""
    params = list(inspect.signature(cls.__init__.__wrapped__).parameters.values())[2:]
    required = [p.name for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY,
                                                                                  p.POSITIONAL_OR_KEYWORD)]
    unknown = [name for name in required if name != "layer_idx"]
    assert not unknown, f"{cls.__name__}.__init__ needs {unknown}: add them to the test"
    return {name: 0 for name in required}


def build_experts(model, module_name, class_name, seed=0):
    """The experts module at small sizes, weights/biases/norms random, implementation "eager"."""
    cls = experts_class(model, module_name, class_name)
    errors = []
    for config_class in _config_classes(cls, model):
        try:
            config = config_class()
            for name, value in {**SIZE_ATTRIBUTES, **OVERRIDES.get(class_name, {})}.items():
                if hasattr(config, name):
                    setattr(config, name, value)
            torch.manual_seed(seed)
            experts = cls(config, **_extra_init_args(cls), **INIT_ARGS.get(class_name, {}))
        except Exception as error:  # noqa: BLE001  (reported below if no config class works)
            errors.append(f"{config_class.__name__}: {type(error).__name__}: {error}")
            continue
        size = sum(p.numel() for p in experts.parameters())
        assert size <= 4 * EXPERTS * HIDDEN * INTERMEDIATE, \
            f"{class_name} from {config_class.__name__} has {size} parameters: a size attribute was not set"
        config._experts_implementation = "eager"
        _randomise(experts)
        return experts
    pytest.fail(f"{class_name} could not be built from its config: " + " | ".join(errors))


def _in_out(experts, name):
    """(input, output) sizes of a 3-D expert weight, from the module's layout flag."""
    shape = getattr(experts, name).shape
    return (shape[1], shape[2]) if experts.is_transposed else (shape[2], shape[1])


def _randomise(experts):
    with torch.no_grad():
        for name, p in experts.named_parameters():
            if p.dim() == 3:
                p.normal_(0.0, 1.0 / math.sqrt(_in_out(experts, name)[0]))
            elif name.endswith("_bias"):
                p.normal_(0.0, 0.5)
            else:  # norms and other per-channel scales
                p.copy_(1.0 + 0.2 * torch.randn(p.shape))


def _limit(experts):
    for name in ("limit", "swiglu_limit"):
        value = getattr(experts, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def inputs(experts, seed=1, top_k=TOP_K, unit_weights=False):
    """hidden states [T, d], top_k_index [T, k] (int64, distinct per token) and top_k_weights [T, k]."""
    gen = torch.Generator().manual_seed(seed)
    d = _in_out(experts, "down_proj")[1]
    E = getattr(experts, "down_proj").shape[0]
    # the gate's pre-activations have std = the scale: cross a clamp limit on ~10% of them
    limit = _limit(experts)
    scale = 1.0 if limit is None else max(1.0, 0.6 * limit)
    x = scale * torch.randn(TOKENS, d, generator=gen)
    ids = torch.stack([torch.randperm(E, generator=gen)[:top_k] for _ in range(TOKENS)])
    weights = torch.softmax(torch.randn(TOKENS, top_k, generator=gen), dim=-1)
    if unit_weights:
        weights = torch.ones_like(weights)
    return x, ids, weights


class Calls:
    """Counts the calls of moe_ext.torch.experts and of hf's staged path for a post-expert norm
    (hf.experts_forward looks both up at call time)."""

    def __init__(self, monkeypatch):
        self.count = 0
        self.activations = []
        self.weight_ptrs = set()
        self.real = moe_ext.torch.experts
        self.real_staged = hf._experts_with_post_norm
        monkeypatch.setattr(moe_ext.torch, "experts", self)
        monkeypatch.setattr(hf, "_experts_with_post_norm", self.staged)

    def __call__(self, x, w13_or_w1, w2, *args, **kw):
        self.count += 1
        self.activations.append(str(kw.get("activation")))
        self.weight_ptrs |= {w13_or_w1.data_ptr(), w2.data_ptr()}
        return self.real(x, w13_or_w1, w2, *args, **kw)

    def staged(self, module, x, ids, weights, activation, w_in, w2, *biases):
        self.count += 1
        self.activations.append(str(activation))
        self.weight_ptrs |= {w_in.data_ptr(), w2.data_ptr()}
        return self.real_staged(module, x, ids, weights, activation, w_in, w2, *biases)


def run(experts, implementation, x, ids, weights):
    """Output and gradients (x, weights, every parameter) of sum(y * fixed random cotangent)."""
    experts.config._experts_implementation = implementation
    x = x.clone().requires_grad_(True)
    weights = weights.clone().requires_grad_(True)
    experts.zero_grad(set_to_none=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = experts(x, ids, weights)
        cotangent = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
        (y * cotangent).sum().backward()
    grads = {"hidden_states": x.grad, "top_k_weights": weights.grad}
    grads.update({name: p.grad for name, p in experts.named_parameters()})
    experts.zero_grad(set_to_none=True)
    ours = [str(w.message) for w in caught if str(w.message).startswith("moe_ext:")]
    return y.detach(), grads, ours


def rel(got, want):
    got, want = got.detach().double(), want.detach().double()
    return ((got - want).norm() / want.norm().clamp_min(1e-300)).item()


# --------------------------------------------------------------------------------------------------
# every family: eager vs moe_ext
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_family_matches_eager(family, monkeypatch):
    model, module_name, class_name = family
    experts = build_experts(*family)
    call = CALLS.get(class_name, {})
    x, ids, weights = inputs(experts, **call)
    want, want_grads, _ = run(experts, "eager", x, ids, weights)
    if call.get("unit_weights"):
        del want_grads["top_k_weights"]
    assert all(g is not None for g in want_grads.values()), "eager left a gradient unset"
    hf._warned.clear()
    calls = Calls(monkeypatch)
    got, got_grads, fallback_warnings = run(experts, "moe_ext", x, ids, weights)
    if call.get("unit_weights"):
        del got_grads["top_k_weights"]
    reason = hf.fallback_reason(experts, x)

    if class_name in EXPECTED_FALLBACK:
        assert reason is not None and EXPECTED_FALLBACK[class_name] in reason, \
            f"{class_name}: expected to fall back ({EXPECTED_FALLBACK[class_name]}); got {reason!r}"
        assert calls.count == 0 and len(fallback_warnings) == 1 and reason in fallback_warnings[0]
        assert torch.equal(got, want)  # the eager forward itself
        return

    assert reason is None, f"{class_name} falls back: {reason}"
    assert not fallback_warnings, fallback_warnings
    assert calls.count == 1, f"moe_ext.torch.experts called {calls.count} times"
    if class_name in EXPECTED_ACTIVATION:
        assert calls.activations == [EXPECTED_ACTIVATION[class_name]]
    # no weight copy: the kernels got the parameters' own memory (transposed ones as views)
    params = {p.data_ptr() for p in experts.parameters() if p.dim() == 3}
    assert calls.weight_ptrs <= params and len(calls.weight_ptrs) == 2
    assert rel(got, want) <= OUT_RTOL, f"output: relative error {rel(got, want):.3g} ({calls.activations})"
    assert got_grads.keys() == want_grads.keys()
    for name, want_grad in want_grads.items():
        assert got_grads[name] is not None, f"no gradient for {name}"
        err = rel(got_grads[name], want_grad)
        assert err <= GRAD_RTOL, f"grad of {name}: relative error {err:.3g} ({calls.activations})"
    # not vacuous: the experts' output is not ~0
    assert want.norm() > 0.1 * x.norm()


# --------------------------------------------------------------------------------------------------
# full models: the variants that need the most mapping (biases, transposed, interleaved, clamped gate)
# --------------------------------------------------------------------------------------------------
COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              vocab_size=128, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
FULL_MODELS = {
    "gpt_oss": lambda: transformers.GptOssConfig(**COMMON, intermediate_size=48, num_local_experts=4,
                                                 num_experts_per_tok=2, swiglu_limit=2.0),
    "deepseek_v4": lambda: transformers.DeepseekV4Config(**COMMON, intermediate_size=48, num_local_experts=4,
                                                         num_experts_per_tok=2, swiglu_limit=2.0),
}


def _experts_modules(model):
    return [m for m in model.modules() if hasattr(m, "has_gate") and hasattr(m, "down_proj")]


@pytest.mark.parametrize("arch", sorted(FULL_MODELS))
def test_full_model_matches_eager(arch, monkeypatch):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(FULL_MODELS[arch]()).eval()
    experts = _experts_modules(model)
    assert experts
    for m in experts:
        _randomise(m)
    with torch.no_grad():
        for name, table in model.named_buffers():
            if name.endswith("tid2eid"):  # deepseek_v4's hash routers: distinct random experts per token
                E = experts[0].down_proj.shape[0]
                table.copy_(torch.stack([torch.randperm(E)[:table.shape[1]] for _ in range(table.shape[0])]))
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))

    def logits_and_grads(implementation):
        model.set_experts_implementation(implementation)
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.logits.detach(), grads

    want, want_grads = logits_and_grads("eager")
    calls = Calls(monkeypatch)
    hf._warned.clear()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="moe_ext:")
        got, got_grads = logits_and_grads("moe_ext")
    assert calls.count == len(experts)
    assert rel(got, want) <= OUT_RTOL, f"logits: relative error {rel(got, want):.3g}"
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        assert rel(got_grads[name], want_grads[name]) <= GRAD_RTOL, \
            f"grad of {name}: relative error {rel(got_grads[name], want_grads[name]):.3g}"


# --------------------------------------------------------------------------------------------------
# a clamp after the activation is no description: the probe (straddling the limit) must tell
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("class_name", ["BailingHybridExperts", "Step3p7Experts"])
def test_limit_after_the_activation_falls_back(class_name, monkeypatch):
    """BailingHybrid / Step3p7 with a per-layer limit compute min(act(g), L) * clip(u, +-L): not
    silu(min(g, L)) * clip(u, +-L), so they fall back (bit-identical to eager), with a warning."""
    family = next(f for f in FAMILIES if f[2] == class_name)
    cls = experts_class(*family)
    config = _config_classes(cls, family[0])[0]()
    for name, value in SIZE_ATTRIBUTES.items():
        if hasattr(config, name):
            setattr(config, name, value)
    config.swiglu_limits = [3.0]
    config._experts_implementation = "eager"
    experts = cls(config, layer_idx=0)
    _randomise(experts)
    assert experts.limit == 3.0
    x, ids, weights = inputs(experts)
    want, _, _ = run(experts, "eager", x, ids, weights)
    hf._warned.clear()
    calls = Calls(monkeypatch)
    got, _, fallback_warnings = run(experts, "moe_ext", x, ids, weights)
    assert "custom gate" in hf.fallback_reason(experts)
    assert calls.count == 0 and len(fallback_warnings) == 1
    assert torch.equal(got, want)


# --------------------------------------------------------------------------------------------------
# bfloat16: the variants with the most mapping, against fp32 eager and transformers' own bf16 eager
# --------------------------------------------------------------------------------------------------
BF16_FAMILIES = ("GptOssExperts", "OpenAIPrivacyFilterExperts", "AriaExperts", "ErgoExpertProjections",
                 "NemotronHExperts", "DeepseekV4Experts", "Gemma4TextExperts", "MixtralExperts", "MuseSparkExperts",
                 "Inkling2Experts")
BF16_RTOL = 3e-2  # a few bf16 roundings (u = 2^-8) of the inputs, weights and output


@pytest.mark.parametrize("class_name", BF16_FAMILIES)
def test_family_bf16(class_name, monkeypatch):
    """bf16 weights, biases and hidden states: moe_ext (float32 accumulation, one rounding of the output)
    within BF16_RTOL of fp32 eager on the same bf16-rounded values, and no worse than 1.5x transformers'
    own bf16 eager; gradients reach every parameter in bf16."""
    family = next(f for f in FAMILIES if f[2] == class_name)
    experts = build_experts(*family)
    call = CALLS.get(class_name, {})
    x, ids, weights = inputs(experts, **call)
    experts.to(torch.bfloat16)
    x = x.to(torch.bfloat16)
    exact = build_experts(*family)  # fp32 copy of the bf16-rounded parameters
    exact.load_state_dict({n: p.float() for n, p in experts.state_dict().items()})
    want, _, _ = run(exact, "eager", x.float(), ids, weights)
    eager_bf16, _, _ = run(experts, "eager", x, ids, weights)
    calls = Calls(monkeypatch)
    got, grads, fallback_warnings = run(experts, "moe_ext", x, ids, weights)
    assert calls.count == 1 and not fallback_warnings and got.dtype == torch.bfloat16
    err, eager_err = rel(got, want), rel(eager_bf16, want)
    assert err <= BF16_RTOL and err <= 1.5 * eager_err + 2.0 ** -8, f"bf16: {err:.3g} (eager bf16: {eager_err:.3g})"
    assert all(grads[n] is not None and grads[n].dtype == p.dtype for n, p in experts.named_parameters())
