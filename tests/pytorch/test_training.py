"""Training check: a tiny transformers MixtralForCausalLM (random init, no download) trained a few AdamW
steps on random tokens gives the same loss curve with its MoE blocks replaced by moe_ext.torch.MoE
(sharing the blocks' weights) as with transformers' eager blocks."""
import copy

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import moe_ext.torch as mt  # noqa: E402

PER_TIER = False
STEPS = 6


def tiny_mixtral():
    config = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, max_position_embeddings=64)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(config)


def train(model, tokens):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_loss_curve_matches_eager():
    eager = tiny_mixtral()
    ours = copy.deepcopy(eager)
    for layer in ours.model.layers:
        layer.mlp = mt.MoE.from_hf(layer.mlp)
    assert sum(isinstance(m, mt.MoE) for m in ours.modules()) == 2
    tokens = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    want = train(eager, tokens)
    got = train(ours, tokens)
    assert want[-1] < want[0]  # it does learn
    # float32 with different summation orders: losses agree to ~1e-6 relative; allow for the drift that
    # AdamW's normalised steps can amplify over a few steps.
    for step, (a, b) in enumerate(zip(got, want)):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: moe_ext {a} vs eager {b}"
    # the shared Parameters were trained in place
    for layer_ours, layer_eager in zip(ours.model.layers, eager.model.layers):
        w = layer_ours.mlp.w13
        assert torch.allclose(w, layer_eager.mlp.experts.gate_up_proj, rtol=1e-3, atol=1e-5)
