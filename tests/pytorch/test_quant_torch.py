"""Quantised experts in PyTorch (moe_ext.torch.quantize_experts, docs/api.md §9): tiny random Mixtral and
Qwen3-MoE models (transformers configs, hidden 64, 8 experts, no download) and moe_ext.torch.MoE.

- Each converted experts module against the float module it replaced, on the same hidden states (float32):
  the expert output's relative error (Frobenius) is within the scheme's bound (LAYER_RTOL, set from the
  weights' quantisation step: int8 ~1%, W8A8 ~2%, int4 g32/g64 ~17-19% on fan-in Gaussians),
  and exactly what the NumPy API gives on the same QuantizedWeights (the op adds nothing of its own).
- The whole model: logits within MODEL_RTOL of the float model, teacher-forced greedy tokens agree on
  most positions, generate() runs, expert bytes drop by the format's factor, the float parameters are gone.
- Any experts_implementation runs the quantised experts; torch.compile (fullgraph) traces the op;
  a backward through it raises; bad arguments raise naming the argument and convert nothing.
The kernels' tiers are covered by tests/test_quant_gemm.py: these run once (PER_TIER = False).
"""
import copy
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import moe_ext  # noqa: E402
import moe_ext.torch as mt  # noqa: E402
from moe_ext.torch import quant as tq  # noqa: E402

PER_TIER = False

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=128, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
# (scheme, group_size, activations) -> bound on an experts module's output error vs float. Measured on
# these models: int8 per row 1.0-1.1%, int8 g32 0.9-1.0%, W8A8 1.7-2.0%, int4 g32 16.6-17.6% (its
# weights alone are 9.8% off: a step of max|w|/7 over 32 Gaussians), int4 g64 18.7-19.2%, W4A8 g32
# 16.7-17.6%. The bounds leave ~25% for other seeds; a wrong scale, layout or activation is O(100%).
LAYER_RTOL = {("int8", None, None): 0.014, ("int8", 32, None): 0.013, ("int8", None, "int8"): 0.025,
              ("int4", 32, None): 0.22, ("int4", 64, None): 0.24, ("int4", 32, "int8"): 0.22}
FORMATS = list(LAYER_RTOL)


def fmt_id(fmt):
    scheme, group, act = fmt
    return f"{scheme}-g{group}" + ("-a8" if act else "")


def make_model(arch, seed=0):
    """A tiny float32 model whose experts dominate (fan-in scale weights, spread router), eval mode."""
    torch.manual_seed(seed)
    if arch == "mixtral":
        cfg = transformers.MixtralConfig(**COMMON, intermediate_size=128, num_local_experts=8, num_experts_per_tok=2)
    else:
        cfg = transformers.Qwen3MoeConfig(**COMMON, moe_intermediate_size=64, intermediate_size=128, num_experts=8,
                                          num_experts_per_tok=2, head_dim=16, norm_topk_prob=True)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if tq._hf_weights(m) is not None:
                m.gate_up_proj.normal_(0.0, 1 / math.sqrt(m.gate_up_proj.shape[-1]))
                m.down_proj.normal_(0.0, 1 / math.sqrt(m.down_proj.shape[-1]))
            elif type(m).__name__.lower().endswith("topkrouter"):
                m.weight.normal_(0.0, 2 / math.sqrt(m.weight.shape[-1]))
    return model


def tokens(batch=4, length=16, seed=1):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def rel(got, want):
    got, want = got.detach().double(), want.detach().double()
    return ((got - want).norm() / want.norm()).item()


def quantize(model, fmt):
    scheme, group, act = fmt
    return mt.quantize_experts(model, scheme, group_size=group, activations=act)


def experts_inputs(model, ids):
    """{block name: (hidden_states, top_k_index, top_k_weights)} as the experts of each block saw them."""
    seen, hooks = {}, []
    for name, m in model.named_modules():
        if name.endswith(".experts"):
            hooks.append(m.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, args)))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("fmt", FORMATS, ids=fmt_id)
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_experts_modules_close_to_float(arch, fmt):
    model = make_model(arch)
    inputs = experts_inputs(model, tokens())
    floats = {name: model.get_submodule(name) for name in inputs}
    quantize(model, fmt)
    assert inputs
    for name, args in inputs.items():
        q = model.get_submodule(name)
        assert isinstance(q, mt.QuantizedExperts)
        with torch.no_grad():
            want, got = floats[name](*args), q(*args)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert rel(got, want) <= LAYER_RTOL[fmt], (name, rel(got, want))
        # the op adds nothing to moe_ext.experts on the same quantised weights
        x, ids, weights = args
        np_y = moe_ext.experts(x.numpy(), q.gate_up_proj.core(), q.down_proj.core(), weights.float().numpy(),
                               ids.to(torch.int32).numpy())
        np.testing.assert_array_equal(got.numpy(), np_y)


@pytest.mark.parametrize("fmt", [("int8", None, None), ("int4", 32, None)], ids=fmt_id)
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_model_logits_generate_and_memory(arch, fmt):
    model = make_model(arch)
    ids = tokens()
    with torch.no_grad():
        want = model(ids).logits
    before = mt.expert_bytes(model)
    float_params = {n for n, p in model.named_parameters() if n.endswith(("gate_up_proj", "down_proj"))}
    assert float_params
    assert quantize(model, fmt) is model
    after = mt.expert_bytes(model)
    assert not float_params & {n for n, _ in model.named_parameters()}  # the float experts are gone
    # float32 -> int8 per row: 1/4 plus a float32 scale per row (K = 64 or 128); int4 g32: 1/8 plus one per 32
    assert after / before <= (0.25 + 1 / 64 + 1e-9 if fmt[0] == "int8" else 0.125 + 1 / 32 + 1e-9)
    with torch.no_grad():
        got = model(ids).logits
    # logits: the experts' error plus the routing it flips in layer 2 (measured int8 2-9%, int4 31-37%)
    assert rel(got, want) <= (0.15 if fmt[0] == "int8" else 0.6)
    # teacher-forced greedy tokens: measured 97-100% (int8) and 45-67% (int4 g32, whose ~17% expert error
    # these expert-dominated random models pass on to nearly flat logits)
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    assert agree >= (0.9 if fmt[0] == "int8" else 0.35)
    out = model.generate(ids[:1], max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 6)


def test_bf16_model_runs_quantised():
    model = make_model("mixtral").to(torch.bfloat16)
    ids = tokens()
    with torch.no_grad():
        want = model(ids).logits.float()
    mt.quantize_experts(model, "int8")
    with torch.no_grad():
        got = model(ids).logits
    assert got.dtype == torch.bfloat16
    assert (got.float().argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.9
    model.generate(ids[:1], max_new_tokens=4, do_sample=False)


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm", "moe_ext"])
def test_any_experts_implementation_runs_quantised(implementation):
    model = make_model("qwen3_moe")
    mt.quantize_experts(model, "int4", group_size=32)
    ids = tokens()
    with torch.no_grad():
        base = model(ids).logits
    model.set_experts_implementation(implementation)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)


def moe_module(activation="swiglu"):
    torch.manual_seed(0)
    return mt.MoE(64, 96, 8, 2, activation=activation)


@pytest.mark.parametrize("activation", ["swiglu", "relu"])
def test_moe_module(activation):
    m = moe_module(activation)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        want = m(x)
    name = m.w13_or_w1_name
    mt.quantize_experts(m, "int8", group_size=32)
    assert isinstance(getattr(m, name), mt.QuantizedExpertWeight) and isinstance(m.w2, mt.QuantizedExpertWeight)
    assert {n for n, _ in m.named_parameters()} == {"w_router"}
    assert {f"{name}.values", f"{name}.scales", "w2.values", "w2.scales"} <= set(m.state_dict())
    with torch.no_grad():
        got = m(x)
    assert got.shape == x.shape and rel(got, want) <= 0.015
    assert m.last_expert_counts.sum() == 15 * 2
    # functional API: moe and experts with the quantised weights give the module's result
    with torch.no_grad():
        y = mt.moe(x, m.w_router, m.w13_or_w1, m.w2, 2, activation=activation)
    assert torch.equal(y, got)
    # again: already quantised modules are skipped, so nothing is left to convert
    with pytest.raises(ValueError, match="^model_or_module: expected a module holding MoE experts"):
        mt.quantize_experts(m, "int4", group_size=32)


def test_torch_compile_traces_the_quantised_op():
    m = moe_module()
    mt.quantize_experts(m, "int4", group_size=32, activations="int8")
    x = torch.randn(9, 64)
    with torch.no_grad():
        want = m(x)
        got = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    model = make_model("mixtral")
    mt.quantize_experts(model, "int8")
    block = model.model.layers[0].mlp
    h = torch.randn(2, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(block, fullgraph=True, backend="aot_eager")(h), block(h),
                                   rtol=0, atol=0)


def test_opcheck():
    m = moe_module()
    mt.quantize_experts(m, "int4", group_size=32, zero_point=True)
    x = torch.randn(7, 64)
    weights, ids, _ = mt.route(x, m.w_router.detach(), 2)
    w13, w2 = m.w13, m.w2
    args = (x, w13.values, w13.scales, w13.zeros, w13.format, w2.values, w2.scales, w2.zeros, w2.format,
            weights, ids, "swiglu", None)
    torch.library.opcheck(torch.ops.moe_ext.quantized_experts, args, raise_exception=True,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_backward_raises():
    m = moe_module()
    mt.quantize_experts(m, "int8")
    x = torch.randn(4, 64, requires_grad=True)
    y = m(x)  # the forward runs
    with pytest.raises(RuntimeError, match="inference only"):
        y.sum().backward()


def test_bad_arguments_convert_nothing():
    with pytest.raises(TypeError, match="^model_or_module: expected a torch.nn.Module"):
        mt.quantize_experts("model", "int8")
    with pytest.raises(ValueError, match="^model_or_module: expected a module holding MoE experts"):
        mt.quantize_experts(torch.nn.Linear(4, 4), "int8")
    model = make_model("mixtral")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for kwargs, error, match in [
        (dict(scheme="int3"), ValueError, "^scheme: expected one of 'int8', 'int4'"),
        (dict(scheme=8), TypeError, "^scheme: expected a str"),
        (dict(scheme="int4", group_size=128), ValueError, "^group_size: expected a group size that divides K = 64"),
        (dict(scheme="int4"), ValueError, "^group_size: expected 32, 64 or 128"),
        (dict(scheme="int8", group_size=48), ValueError, "^group_size: expected None or a multiple of 32"),
        (dict(scheme="int8", zero_point=True), ValueError, "^zero_point: expected False"),
        (dict(scheme="int8", activations="int4"), ValueError, "^activations: expected None"),
    ]:
        with pytest.raises(error, match=match):
            mt.quantize_experts(model, **kwargs)
    # nothing was converted
    assert not any(isinstance(m, mt.QuantizedExperts) for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    experts = model.model.layers[0].mlp.experts
    with pytest.raises(ValueError, match="^model_or_module: expected a model or MoE block holding"):
        mt.quantize_experts(experts, "int8")
    experts.has_bias = True  # a variant the kernels do not compute: refused, not run as something else
    with pytest.raises(ValueError, match="expert biases"):
        mt.quantize_experts(model, "int8")
    odd = mt.MoE(64, 33, 4, 2)  # K = f = 33 for w2: int4 needs an even K
    with pytest.raises(ValueError, match="^scheme: expected 'int8' for experts with an odd K"):
        mt.quantize_experts(odd, "int4", group_size=32)


def test_functional_shape_and_type_errors():
    m = moe_module()
    mt.quantize_experts(m, "int8")
    x = torch.randn(4, 64)
    weights, ids, _ = mt.route(x, m.w_router.detach(), 2)
    with pytest.raises(ValueError, match="^w13_or_w1: expected shape"):
        mt.experts(x, m.w2, m.w13, weights, ids)  # w13 and w2 swapped
    with pytest.raises(ValueError, match="^w13_or_w1: expected shape"):
        mt.experts(torch.randn(4, 32), m.w13, m.w2, weights, ids)  # K mismatch
    with pytest.raises(ValueError, match="^w13_or_w1: expected shape"):
        mt.experts(x, m.w13, m.w2, weights, ids, activation="relu")  # w1 rows expected for relu
    with pytest.raises(TypeError, match="^w2: expected a QuantizedExpertWeight"):
        mt.experts(x, m.w13, torch.randn(8, 64, 96), weights, ids)
    with pytest.raises(TypeError, match=r"^w13_or_w1: expected a QuantizedExpertWeight .*wrap it"):
        mt.experts(x, m.w13.core(), m.w2, weights, ids)  # a NumPy-side moe_ext.QuantizedWeight
    with pytest.raises(ValueError, match="^activation: expected a preset name"):
        mt.experts(x, m.w13, m.w2, weights, ids, activation="tanh")
    with pytest.raises(TypeError, match="^q: expected a moe_ext.QuantizedWeight"):
        mt.QuantizedExpertWeight(torch.zeros(2, 3, 4))


def test_from_quantized_weight_and_empty_batch():
    rng = np.random.default_rng(0)
    q13 = moe_ext.quantize(rng.standard_normal((4, 64, 32)).astype(np.float32), "int4", group_size=32)
    q2 = moe_ext.quantize(rng.standard_normal((4, 32, 32)).astype(np.float32), "int8")
    w13, w2 = mt.QuantizedExpertWeight.from_quantized(q13), mt.QuantizedExpertWeight(q2)
    np.testing.assert_array_equal(w13.dequantize().numpy(), moe_ext.dequantize(q13))
    assert w13.nbytes == q13.nbytes and w2.nbytes == q2.nbytes
    x = torch.randn(0, 32)
    y = mt.experts(x, w13, w2, torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.int32))
    assert y.shape == (0, 32)
    x = torch.randn(5, 32)
    ids = torch.tensor([[0, 1], [2, 3], [1, 1], [3, 0], [2, 2]], dtype=torch.int32)
    weights = torch.rand(5, 2)
    want = moe_ext.experts(x.numpy(), q13, q2, weights.numpy(), ids.numpy())
    np.testing.assert_array_equal(mt.experts(x, w13, w2, weights, ids).numpy(), want)


def test_state_dict_round_trip():
    """A quantised model's state_dict loads into another model quantised with the same arguments."""
    a, b = make_model("qwen3_moe", seed=0), make_model("qwen3_moe", seed=1)
    for m in (a, b):
        mt.quantize_experts(m, "int4", group_size=32, zero_point=True)
    ids = tokens()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(b(ids).logits, a(ids).logits, rtol=0, atol=0)
