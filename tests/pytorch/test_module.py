"""moe_ext.torch.MoE: forward and gradients vs a plain-torch float64 MoE, losses, expert counts,
state_dict names, from_hf (weights shared with a transformers block, same output), torch.compile."""
import pytest

torch = pytest.importorskip("torch")
import moe_ext.torch as mt  # noqa: E402

import torch_reference as ref  # noqa: E402

PER_TIER = False  # module plumbing; the kernels' tiers are covered by test_autograd.py
RTOL = 5e-5  # as F32_RTOL in test_autograd.py


def rel(got, want):
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm().clamp_min(1e-300))


def reference_forward(m, x):
    """The module's math in float64 plain torch (ids from the module's own router)."""
    p = {n: t.detach().double().requires_grad_() for n, t in m.named_parameters()}
    x64 = x.detach().double().requires_grad_()
    ids = mt.route(x.detach().reshape(-1, m.hidden_size), m.w_router.detach(), m.top_k, scoring=m.scoring,
                   renormalize=m.renormalize).topk_ids
    tw, probs = ref.route_weights(x64.reshape(-1, m.hidden_size), p["w_router"], ids, scoring=m.scoring,
                                  renormalize=m.renormalize)
    y = ref.experts(x64.reshape(-1, m.hidden_size), p[m.w13_or_w1_name], p["w2"], tw, ids, m.activation)
    return y.reshape(x.shape), x64, p, probs, ids


@pytest.mark.parametrize("activation", ["swiglu", "relu"])
def test_forward_backward_match_reference(activation):
    torch.manual_seed(0)
    m = mt.MoE(16, 12, 5, 2, activation=activation)
    x = torch.randn(3, 7, 16, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape
    want, x64, p, _, _ = reference_forward(m, x)
    assert rel(y, want) < 1e-5
    gy = torch.randn_like(want)
    (y.double() * gy).sum().backward()
    (want * gy).sum().backward()
    assert rel(x.grad, x64.grad) < RTOL
    for name, param in m.named_parameters():
        assert rel(param.grad, p[name].grad) < RTOL, name


def test_parameter_names_and_shapes():
    m = mt.MoE(8, 6, 4, 2, router_bias=True, correction_bias=True)
    shapes = {n: tuple(t.shape) for n, t in m.state_dict().items()}
    assert shapes == {"w_router": (4, 8), "router_bias": (4,), "w13": (4, 12, 8), "w2": (4, 8, 6),
                      "correction_bias": (4,)}
    plain = mt.MoE(8, 6, 4, 2, activation="gelu")
    assert {n: tuple(t.shape) for n, t in plain.state_dict().items()} == {
        "w_router": (4, 8), "w1": (4, 6, 8), "w2": (4, 8, 6)}


def test_losses_and_counts():
    torch.manual_seed(1)
    m = mt.MoE(16, 8, 6, 2)
    with pytest.raises(RuntimeError, match="no forward"):
        m.load_balancing_loss()
    x = torch.randn(40, 16)
    m(x)
    _, _, p, probs, ids = reference_forward(m, x)
    counts = torch.bincount(ids.reshape(-1).long(), minlength=6)
    assert torch.equal(m.last_expert_counts, counts) and int(counts.sum()) == 40 * 2
    want_lb = 6 * ((counts.double() / 80) * probs.mean(0)).sum()
    lb = m.load_balancing_loss()
    assert abs(lb.item() - want_lb.item()) < 1e-5 * want_lb.item()
    logits = x.double() @ p["w_router"].t()
    want_z = torch.logsumexp(logits, -1).square().mean()
    z = m.router_z_loss()
    assert abs(z.item() - want_z.item()) < 1e-5 * want_z.item()
    # both are differentiable through the router
    (lb + z).backward()
    (want_lb + want_z).backward()
    assert rel(m.w_router.grad, p["w_router"].grad) < RTOL


def _tiny_config(name):
    import transformers
    common = dict(hidden_size=16, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, vocab_size=32)
    if name == "mixtral":
        return transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **common), \
            "transformers.models.mixtral.modeling_mixtral", "MixtralSparseMoeBlock"
    if name == "qwen3_moe":
        return transformers.Qwen3MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=12,
                                           norm_topk_prob=False, **common), \
            "transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeSparseMoeBlock"
    return transformers.OlmoeConfig(num_experts=4, num_experts_per_tok=2, **common), \
        "transformers.models.olmoe.modeling_olmoe", "OlmoeSparseMoeBlock"


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "olmoe"])
def test_from_hf_shares_weights_and_matches(name):
    pytest.importorskip("transformers")
    import importlib
    config, module_name, block_name = _tiny_config(name)
    torch.manual_seed(2)
    block = getattr(importlib.import_module(module_name), block_name)(config)
    for prm in block.parameters():
        torch.nn.init.normal_(prm, std=0.3)
    m = mt.MoE.from_hf(block)
    assert m.w13 is block.experts.gate_up_proj and m.w2 is block.experts.down_proj and m.w_router is block.gate.weight
    assert m.w13.data_ptr() == block.experts.gate_up_proj.data_ptr()
    x = torch.randn(2, 5, 16, requires_grad=True)
    want = block(x)
    want = want[0] if isinstance(want, tuple) else want
    y = m(x)
    assert rel(y, want) < 1e-5
    gy = torch.randn_like(y)
    got = torch.autograd.grad((y * gy).sum(), [x, m.w13, m.w2, m.w_router])
    exp = torch.autograd.grad((want * gy).sum(), [x, m.w13, m.w2, m.w_router])
    for a, b, n in zip(got, exp, ["x", "w13", "w2", "w_router"]):
        assert rel(a, b) < 1e-4, n


def test_from_hf_rejects_unsupported_blocks():
    with pytest.raises(ValueError, match="block"):
        mt.MoE.from_hf(torch.nn.Linear(2, 2))


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(3)
    m = mt.MoE(16, 8, 4, 2)
    x = torch.randn(9, 16, requires_grad=True)

    def step(model, inp):
        y = model(inp)
        return (y.square().sum() + 0.1 * model.load_balancing_loss() + 0.01 * model.router_z_loss())

    explanation = torch._dynamo.explain(step)(m, x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss_c = compiled(m, x)
    g_c = torch.autograd.grad(loss_c, [x, m.w_router, m.w13, m.w2])
    loss_e = step(m, x)
    g_e = torch.autograd.grad(loss_e, [x, m.w_router, m.w13, m.w2])
    assert torch.allclose(loss_c, loss_e, rtol=1e-6)
    for a, b in zip(g_c, g_e):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the inference path (fused ops) traces too
        fused = torch.compile(m, fullgraph=True, backend="aot_eager")
        assert torch.allclose(fused(x), m(x))
