"""The packed expert-weight cache of moe_ext.torch (docs/api.md §8): MoE and the "moe_ext" transformers backend
run inference on prepacked weights, never stale, never under autograd or torch.compile, freed with their
parameters, switchable and counted.

Equality with the uncached path: the packed and plain weights give bit-identical results when every routed
expert has more than 16 rows (both run the packed-panel GEMM). Calls in which no expert has more than 16 rows
(decode) stay on the plain weights (bit-identical by construction, counted as few_rows). In between (some
experts above 16 rows, some at or below) the plain path streams the small experts' weight rows and sums in
another order, so there the results agree to float32 rounding (FP32_RTOL)."""
import gc
import math
import os
import subprocess
import sys
import textwrap
import warnings

import pytest

torch = pytest.importorskip("torch")

import moe_ext.torch as mt  # noqa: E402
from moe_ext.torch import _weight_cache  # noqa: E402

PER_TIER = False  # the cache is Python over moe_ext.prepack, whose tiers test_prepack.py covers
FP32_RTOL = 1e-5  # GEMMs of depth <= 96 summed in another order: ~sqrt(K) * 2^-24 relative
d, f, E, k = 64, 96, 8, 2
LARGE_T = 160  # 320 copies over 8 experts: every expert gets > 16 rows with this seed (checked)
MIXED_T = 56   # 112 copies over 8 experts: some above 16 rows, some at or below (checked)


@pytest.fixture(autouse=True)
def fresh_cache():
    mt.set_weight_cache(True)
    mt.clear_weight_cache()
    yield
    mt.set_weight_cache(True)
    mt.clear_weight_cache()


def rel(got, want):
    got, want = got.detach().double(), want.detach().double()
    return ((got - want).norm() / want.norm().clamp_min(1e-300)).item()


def uncached(fn):
    """fn() on the plain path, the cache's entries and counters kept (set_weight_cache(False) would free them)."""
    saved = (_weight_cache._state["enabled"], dict(_weight_cache._counts))
    _weight_cache._state["enabled"] = False
    try:
        return fn()
    finally:
        _weight_cache._state["enabled"] = saved[0]
        _weight_cache._counts.update(saved[1])


def module(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    return mt.MoE(d, f, E, k, dtype=dtype, **kw)


def info():
    return mt.weight_cache_info()


@pytest.mark.parametrize("activation,bias", [("swiglu", False), ("relu", True),
                                             ("swiglu(alpha=1.702,limit=7.0,up_offset=1.0,interleaved)", True)])
def test_module_matches_uncached_fp32(activation, bias):
    m = module(activation=activation, bias=bias)
    for T in (LARGE_T, 1, 5, MIXED_T, LARGE_T):
        x = torch.randn(T, d, generator=torch.Generator().manual_seed(T))
        with torch.no_grad():
            want = uncached(lambda: m(x))
            got = m(x)
        counts = m.last_expert_counts
        if T == MIXED_T:
            assert int(counts.max()) > 16 and int(counts.min()) <= 16
            assert rel(got, want) <= FP32_RTOL
        else:
            assert int(counts.min()) > 16 or int(counts.max()) <= 16
            assert torch.equal(got, want)
    assert info().builds == 2 and info().hits == 4 and info().entries == 2 and info().few_rows == 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_module_matches_uncached_half(dtype):
    m = module(dtype)
    for T in (1, MIXED_T, LARGE_T):
        x = torch.randn(T, d).to(dtype)
        with torch.no_grad():
            want = uncached(lambda: m(x))
            got = m(x)
        # the same f32 accumulation; at most the last bit of the 16-bit result differs (decode order)
        assert rel(got.float(), want.float()) <= 2.0 ** -8
    assert info().builds == 2


def test_inference_mode_and_frozen_weights_use_the_cache():
    m = module()
    x = torch.randn(LARGE_T, d)
    with torch.inference_mode():
        m(x)
    assert info().builds == 2
    m.requires_grad_(False)
    m(x)  # grad mode on, but no tensor wants a gradient
    assert info().hits == 2


def test_in_place_changes_are_never_served_stale():
    m = module()
    x = torch.randn(LARGE_T, d)
    with torch.no_grad():
        before = m(x)
        m.w13[0, 0, 0] += 1.0
        after_add = m(x)
        assert not torch.equal(after_add, before)
        assert torch.equal(after_add, uncached(lambda: m(x)))
        saved = {name: t.clone() for name, t in m.state_dict().items()}
        m.w2.copy_(torch.randn_like(m.w2))
        after_copy = m(x)
        assert not torch.equal(after_copy, after_add)
        assert torch.equal(after_copy, uncached(lambda: m(x)))
        m.load_state_dict(saved)
        assert torch.equal(m(x), after_add)
    assert info().invalidations == 4  # w13, w2, then both again (load_state_dict copies every parameter)


def test_optimizer_step_invalidates():
    m = module()
    x = torch.randn(LARGE_T, d)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    with torch.no_grad():
        before = m(x)
    m(x).square().sum().backward()
    opt.step()
    with torch.no_grad():
        after = m(x)
        assert not torch.equal(after, before) and torch.equal(after, uncached(lambda: m(x)))


def test_replaced_data_with_the_same_version_is_not_stale():
    """`param.data = t` keeps the parameter object and its version counter: the storage identity check
    catches it."""
    m = module()
    x = torch.randn(LARGE_T, d)
    with torch.no_grad():
        m(x)
        version = m.w13._version
        m.w13.data = torch.randn_like(m.w13)
        assert m.w13._version == version
        assert torch.equal(m(x), uncached(lambda: m(x)))


def test_training_never_uses_the_cache_and_gradients_are_unchanged():
    m = module(bias=True)
    x = torch.randn(LARGE_T, d)
    with torch.no_grad():
        m(x)  # an inference call first: its entries are freed by the training call
    assert info().entries == 2

    def grads():
        m.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_(True)
        m(xg).square().sum().backward()
        return [xg.grad] + [p.grad.clone() for p in m.parameters()]

    before = info()
    with_cache = grads()
    after = info()
    assert (after.hits, after.misses, after.builds) == (before.hits, before.misses, before.builds)
    assert after.entries == 0 and after.bypassed == before.bypassed + 1
    without = uncached(grads)
    assert all(torch.equal(a, b) for a, b in zip(with_cache, without))


def test_torch_compile_fullgraph_runs_the_plain_ops():
    m = module()
    x = torch.randn(9, d)
    with torch.no_grad():
        want = uncached(lambda: m(x))
        got = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    assert rel(got, want) <= FP32_RTOL
    assert info().misses == 0 and info().hits == 0


def test_entries_die_with_the_module():
    m = module()
    with torch.no_grad():
        m(torch.randn(LARGE_T, d))
    assert info().entries == 2 and info().bytes > 0
    del m
    gc.collect()
    assert info().entries == 0 and info().bytes == 0


def test_a_new_tensor_at_a_reused_address_is_not_served_an_old_entry():
    m = module()
    x = torch.randn(LARGE_T, d)
    with torch.no_grad():
        m(x)
        m2 = module()
        m2.w13.data = m.w13.data.clone()
        del m
        gc.collect()
        torch.manual_seed(1)
        m3 = module()
        m3.reset_parameters()
        assert torch.equal(m3(x), uncached(lambda: m3(x)))


def test_disable_and_budget():
    m = module()
    x = torch.randn(LARGE_T, d)
    mt.set_weight_cache(False)
    with torch.no_grad():
        m(x)
    assert info().entries == 0 and info().misses == 0 and not info().enabled
    w13_bytes = m.w13.numel() * 4
    mt.set_weight_cache(True, max_bytes=w13_bytes + 1)
    with torch.no_grad():
        y = m(x)
    got = info()
    assert got.max_bytes == w13_bytes + 1 and got.builds == 1 and got.over_budget == 1 and got.entries == 1
    assert rel(y, uncached(lambda: m(x))) <= FP32_RTOL
    mt.set_weight_cache(True, max_bytes=0)  # below the current size: entries freed
    assert info().entries == 0 and info().bytes == 0
    with pytest.raises(ValueError, match="max_bytes"):
        mt.set_weight_cache(True, max_bytes=-1)


def test_environment_variable_disables():
    code = textwrap.dedent("""
        import torch, moe_ext.torch as mt
        m = mt.MoE(8, 16, 4, 2)
        with torch.no_grad():
            m(torch.randn(100, 8))
        i = mt.weight_cache_info()
        print(i.enabled, i.entries, i.misses)
    """)
    env = dict(os.environ, MOE_EXT_WEIGHT_CACHE="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "0", "0"]
    env["MOE_EXT_WEIGHT_CACHE"] = "maybe"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "MOE_EXT_WEIGHT_CACHE" in bad.stderr


def test_warns_once_past_the_threshold(monkeypatch):
    monkeypatch.setattr(_weight_cache, "WARN_BYTES", 1000)
    monkeypatch.setitem(_weight_cache._state, "warned", False)
    m = module()
    with pytest.warns(RuntimeWarning, match="MOE_EXT_WEIGHT_CACHE=0"):
        with torch.no_grad():
            m(torch.randn(LARGE_T, d))
    m2 = module()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            m2(torch.randn(LARGE_T, d))
    assert info().entries == 4


def test_state_dict_unchanged():
    m = module()
    before = {name: t.clone() for name, t in m.state_dict().items()}
    with torch.no_grad():
        m(torch.randn(LARGE_T, d))
    after = m.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    assert all(type(t) is torch.Tensor for t in after.values())


# --------------------------------------------------------------------------------------------------
# the transformers backend
# --------------------------------------------------------------------------------------------------
def hf_experts(arch):
    transformers = pytest.importorskip("transformers")
    common = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                  max_position_embeddings=64)
    if arch == "mixtral":
        config = transformers.MixtralConfig(**common, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)
    else:
        config = transformers.GptOssConfig(**common, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                                           head_dim=16, swiglu_limit=1.0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    experts = [m for m in model.modules() if isinstance(getattr(m, "down_proj", None), torch.nn.Parameter)][0]
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0.0, 1 / math.sqrt(p.shape[-1]))
    experts.config._experts_implementation = "moe_ext"
    return experts


def routing(T, seed=0, mixed=False):
    """x [T, 64], ids [T, 2] over 4 experts, weights [T, 2]. mixed: expert 3 gets only 3 rows, the others
    (T = 40) more than 16."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(3 if mixed and t >= 3 else 4, generator=g)[:2] for t in range(T)])
    if mixed:
        ids[:3, 0] = 3
    return torch.randn(T, 64, generator=g), ids, torch.rand(T, 2, generator=g)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_hf_backend_matches_uncached_and_is_never_stale(arch):
    experts = hf_experts(arch)
    if arch == "gpt_oss":
        assert experts.is_transposed and experts.has_bias
    for T, mixed in ((80, False), (1, False), (3, False), (40, True)):  # 80: 160 copies, > 16 rows each
        x, ids, w = routing(T, mixed=mixed)
        with torch.no_grad():
            want = uncached(lambda: experts(x, ids, w))
            got = experts(x, ids, w)
        if mixed or (arch == "gpt_oss" and T < 16):  # transposed decode: packed panels, another sum order
            assert rel(got, want) <= FP32_RTOL
        else:
            assert torch.equal(got, want)
    if arch == "gpt_oss":  # transposed weights take the packed copy at every size (decode included)
        assert info().builds == 2 and info().hits == 6 and info().few_rows == 0
    else:
        assert info().builds == 2 and info().hits == 2 and info().few_rows == 2
    x, ids, w = routing(80)
    w_in = experts.gate_up_proj
    with torch.no_grad():
        before = experts(x, ids, w)
        w_in[0, 0, 0] += 1.0
        after = experts(x, ids, w)
        assert not torch.equal(after, before) and torch.equal(after, uncached(lambda: experts(x, ids, w)))
    assert info().invalidations == 1
    # training: no cache, same gradients
    x.requires_grad_(True)
    grads = []
    for cached in (True, False):
        mt.set_weight_cache(cached)
        experts.zero_grad(set_to_none=True)
        x.grad = None
        experts(x, ids, w).square().sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in experts.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_hf_backend_torch_compile_fullgraph():
    experts = hf_experts("gpt_oss")
    x, ids, w = routing(80)
    with torch.no_grad():
        want = experts(x, ids, w)  # decides the activation eagerly (and fills the cache)
        got = torch.compile(experts, fullgraph=True, backend="aot_eager")(x, ids, w)
    assert torch.equal(got, want)  # plain ops in the graph, packed weights eagerly: the same bits here
    assert info().misses == 2 and info().hits == 0


def test_hf_entries_die_with_the_model():
    experts = hf_experts("mixtral")
    with torch.no_grad():
        experts(*routing(80))
    assert info().entries == 2
    del experts
    gc.collect()
    assert info().entries == 0
