"""ExpertParallelMoE (SPEC §7 scale-out) against the unsharded moe_ext.torch.MoE.

Worlds of 1, 2 and 4 processes on this machine over gloo (loopback), started from a forkserver that has
imported torch and moe_ext once (spawning each rank would re-import torch: seconds per rank on 2 cores).
Every rank draws the inputs of all ranks from one seed, keeps its own tokens (one rank has none) and
checks, per case:
- output: ep(x_r) against moe(x_r) of the unsharded layer;
- input gradient: d(sum(y * g_r))/dx_r, same comparison;
- expert gradients: this rank's block of the unsharded layer's gradients all-reduced over the group (each
  rank back-propagating its own tokens), against the sharded layer's local gradients, which the exchange
  delivered to their owner;
- router gradient: both all-reduced (the router is replicated; its gradient is per rank's tokens).
With a capacity, the reference is the unsharded layer with the same capacity on the concatenation
x_0, ..., x_{W-1} (the documented global token order), and its gradients need no all-reduce.
The routing is skewed (a shared direction in x that the router of some experts opposes), so some experts
get no copies at all; each case asserts that it happened.

Tolerance: RTOL = 1e-5 relative (Frobenius) in float32 (bf16: see BF16_RTOL). Both sides run the same kernels on the same rows;
the differences are only the order of float32 sums (an expert's dW over rows of several ranks, an
all-reduce of partial gradients) and the GEMM's row blocking: a few ulp on values of norm ~1, far below it.

Results (max relative errors) travel back to pytest through a queue; a rank that fails sends its
traceback; every wait has a timeout and stray ranks are killed, so a failure never hangs the suite.
"""
import datetime
import math
import multiprocessing
import os
import tempfile
import traceback
import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

import moe_ext  # noqa: E402

PER_TIER = False  # the kernels' tiers are covered elsewhere; this module tests the exchange
RTOL = 1e-5
WORLD_TIMEOUT_S = 120  # a whole world (start, all cases, exit); a hung collective errors after 30 s
COLLECTIVE_TIMEOUT_S = 30

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

# Small shapes, odd d, uneven splits. per_rank: experts per rank (E = per_rank * W); capacity: the
# layer's; capacity_factor: given to from_moe (the reference gets C = ceil(factor * T_global * k / E)).
CASES = {
    "swiglu": dict(activation="swiglu", top_k=2, per_rank=3),
    "relu_k3_one_expert_per_rank": dict(activation="relu", top_k=3, per_rank=1),
    "swiglu_capacity": dict(activation="swiglu", top_k=2, per_rank=3, capacity=3),
    "geglu_capacity_factor": dict(activation="geglu", top_k=2, per_rank=3, capacity_factor=0.5),
    "sigmoid_grouped_biases": dict(activation="swiglu", top_k=2, per_rank=4, scoring="sigmoid",
                                   router_bias=True, correction_bias=True, n_group=2, topk_group=1,
                                   scale=2.5),
    # bf16 weights and activations (the exchange moves bf16 rows): both sides round their outputs and
    # gradients to bf16 (u = 2^-8 ~ 3.9e-3), so an element may differ by an ulp where the float32 sums
    # differ in order; the all-reduced gradients add one bf16 rounding per rank. BF16_RTOL = 1e-2.
    "swiglu_bf16": dict(activation="swiglu", top_k=2, per_rank=3, dtype=torch.bfloat16),
}
BF16_RTOL = 1e-2
D, F = 13, 10


def _tokens_per_rank(W):
    """Uneven, one rank (the second) with none."""
    return [[11], [7, 0], [5, 0, 17, 9]][{1: 0, 2: 1, 4: 2}[W]]


# --------------------------------------------------------------------------------------------------
# What each rank runs
# --------------------------------------------------------------------------------------------------
def _rel(got, want):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(torch.linalg.norm(got - want) / max(float(torch.linalg.norm(want)), 1e-300))


def _make_layer(E, seed, device, top_k, activation="swiglu", **options):
    """The unsharded layer, identical on every rank (same seed), with skewed routing: the router rows
    of the last experts point against a direction u that every token carries, the first one along it."""
    import moe_ext.torch as mt
    gen = torch.Generator().manual_seed(seed)
    moe = mt.MoE(D, F, E, top_k, activation=activation, **options)
    u = torch.randn(D, generator=gen)
    u /= u.norm()
    with torch.no_grad():
        for name, p in moe.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
        if moe.correction_bias is not None:
            moe.correction_bias.copy_(torch.randn(E, generator=gen) * 0.1)
        dead = max(1, E // 4)  # these experts never win: logit -18 against O(1) for the others
        moe.w_router[E - dead:] = -6.0 * u
        moe.w_router[0] += 1.0 * u
    return moe.to(device), u.to(device)


def _along(noise, u):
    """Tokens = noise orthogonal to u, plus 3 u: the dead experts' logits are exactly -18 (see above)."""
    return noise - torch.outer(noise @ u, u) + 3.0 * u


def _case(name, rank, W, group, device, *, per_rank, top_k, capacity=None, capacity_factor=None,
          dtype=torch.float32, **options):
    import moe_ext.torch as mt
    E = per_rank * W
    top_k = min(top_k, E)
    seed = 1000 + 17 * W + zlib.crc32(name.encode()) % 997  # same on every rank
    sizes = _tokens_per_rank(W)
    if capacity_factor is not None:  # what the sharded layer derives from the global token count
        capacity = math.ceil(capacity_factor * sum(sizes) * top_k / E)
    moe, u = _make_layer(E, seed, device, top_k, capacity=capacity, **options)
    moe = moe.to(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    xs = [_along(torch.randn(n, D, generator=gen), u.cpu()).to(device, dtype) for n in sizes]
    gs = [torch.randn(n, D, generator=gen).to(device, dtype) for n in sizes]
    x_r, g_r = xs[rank].clone().requires_grad_(True), gs[rank]

    ep = mt.ExpertParallelMoE.from_moe(moe, group, capacity_factor=capacity_factor)
    assert list(ep.local_expert_ids) == list(range(rank * per_rank, (rank + 1) * per_rank))
    y = ep(x_r)
    (y * g_r).sum().backward()
    with torch.no_grad():
        y_inference = ep(x_r)  # the fused no-grad path on the receiving side
    out = {"y_no_grad": _rel(y_inference, y)}

    x_all = torch.cat(xs)
    with torch.no_grad():  # routing is skewed: some experts get no copies from anyone
        moe(x_all)
        counts = moe.last_expert_counts.cpu()
    out["idle_experts"] = int((counts == 0).sum()) if E > top_k else -1  # -1: k = E

    params = dict(moe.named_parameters())
    if capacity is None:  # each rank back-propagates its own tokens, then the gradients are summed
        x_ref = xs[rank].clone().requires_grad_(True)
        y_ref = moe(x_ref)
        (y_ref * g_r).sum().backward()
        for p in params.values():
            dist.all_reduce(p.grad, group=group)
        dx_ref = x_ref.grad
    else:  # the unsharded layer on the concatenation (global token order), then this rank's rows
        x_all.requires_grad_(True)
        y_all = moe(x_all)
        (y_all * torch.cat(gs)).sum().backward()
        lo = sum(sizes[:rank])
        y_ref, dx_ref = y_all[lo:lo + sizes[rank]], x_all.grad[lo:lo + sizes[rank]]
        out["dropped_total"] = _all_sum(ep.last_num_dropped, group, device)
    out["y"] = _rel(y, y_ref)
    out["dx"] = _rel(x_r.grad, dx_ref)
    block = slice(rank * per_rank, (rank + 1) * per_rank)
    for pname, p in ep.named_parameters():
        if pname in ("w_router", "router_bias"):  # replicated: all-reduce
            dist.all_reduce(p.grad, group=group)
            out["d" + pname] = _rel(p.grad, params[pname].grad)
        else:
            out["d" + pname] = _rel(p.grad, params[pname].grad[block])
    return out


def _all_sum(n, group, device):
    t = torch.tensor([n], dtype=torch.int64, device=device)
    dist.all_reduce(t, group=group)
    return int(t)


def _errors(rank, W, device):
    """Bad configurations raise clearly (checked on every rank, no collective involved)."""
    import moe_ext.torch as mt
    out = {}
    if W > 1:
        moe, _ = _make_layer(W + 1, 5, device, 1)
        try:
            mt.ExpertParallelMoE.from_moe(moe)
            out["indivisible"] = "no error"
        except ValueError as e:
            out["indivisible"] = str(e)
    moe, _ = _make_layer(W, 5, device, 1)
    try:
        mt.ExpertParallelMoE.from_moe(moe)(torch.zeros(3, D + 1, device=device))
        out["bad_x"] = "no error"
    except ValueError as e:
        out["bad_x"] = str(e)
    return out


def _rank_main(rank, W, store, backend, results):
    try:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        torch.set_num_threads(1)
        moe_ext.set_num_threads(1)
        device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
        if backend == "nccl":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=W,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        out = {name: _case(name, rank, W, None, device, **case) for name, case in CASES.items()}
        out["errors"] = _errors(rank, W, device)
        if W == 4:  # two process groups of 2 side by side: ranks, sizes and ownership are the group's
            groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
            out["subgroup"] = _case("swiglu", rank % 2, 2, groups[rank // 2], device, **CASES["swiglu"])
        dist.barrier()
        dist.destroy_process_group()
        results.put((rank, out, None))
    except BaseException:  # noqa: BLE001 - report anything to the parent
        results.put((rank, None, traceback.format_exc()))


# --------------------------------------------------------------------------------------------------
# The parent: start a world, collect, never hang
# --------------------------------------------------------------------------------------------------
def _context():
    # torch._dynamo too: the first call of a torch.library custom op imports it (seconds), once per rank
    # unless the forkserver already has.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "torch._dynamo", "moe_ext", "moe_ext.torch"])
    return ctx


def run_world(W, backend="gloo"):
    """Run every case on a world of W ranks; returns {rank: {case: {metric: value}}}."""
    ctx = _context()
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_rank_main, args=(r, W, store, backend, results), daemon=True)
                 for r in range(W)]
        for p in procs:
            p.start()
        got, failures = {}, []
        try:
            for _ in range(W):
                rank, out, tb = results.get(timeout=WORLD_TIMEOUT_S)
                if tb is not None:
                    failures.append(f"rank {rank}:\n{tb}")
                got[rank] = out
        except Exception as e:  # noqa: BLE001 - queue.Empty: a rank hung or died silently
            failures.append(f"world of {W}: no result from ranks {sorted(set(range(W)) - set(got))} "
                            f"within {WORLD_TIMEOUT_S} s ({type(e).__name__})")
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
                    p.join(timeout=5)
        if failures:
            pytest.fail("\n".join(failures))
    return got


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda w: f"world{w}")
def world(request):
    return request.param, run_world(request.param)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_unsharded_layer(world, case):
    W, got = world
    worst = {}
    for rank in range(W):
        for metric, err in got[rank][case].items():
            if metric in ("idle_experts", "dropped_total"):
                continue
            worst[metric] = max(worst.get(metric, 0.0), err)
    print(f"world {W} {case}: max relative errors {worst}")
    rtol = BF16_RTOL if CASES[case].get("dtype") == torch.bfloat16 else RTOL
    for metric, err in worst.items():
        assert err <= rtol, f"world {W}, {case}, {metric}: relative error {err:.3g} > {rtol}"
    assert got[0][case]["idle_experts"] != 0, "the skewed routing should leave some expert idle"
    if "dropped_total" in got[0][case]:
        assert got[0][case]["dropped_total"] > 0, "the capacity should drop copies in this case"


def test_subgroups(world):
    """ExpertParallelMoE on a group that is not the world (two groups of 2 inside the world of 4)."""
    W, got = world
    if W != 4:
        pytest.skip("the two groups of 2 run inside the world of 4")
    for rank in range(W):
        for metric, err in got[rank]["subgroup"].items():
            if metric not in ("idle_experts", "dropped_total"):
                assert err <= RTOL, f"rank {rank}, subgroup, {metric}: relative error {err:.3g} > {RTOL}"


def test_bad_configuration_raises(world):
    W, got = world
    for rank in range(W):
        msg = got[rank]["errors"]["bad_x"]
        assert msg.startswith("x: expected shape (..., 13)") and "(3, 14)" in msg, msg
        if W == 1:
            continue  # every E divides a world of 1
        msg = got[rank]["errors"]["indivisible"]
        assert "num_experts" in msg and str(W + 1) in msg and str(W) in msg, msg


def test_needs_initialised_process_group():
    import moe_ext.torch as mt
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    moe, _ = _make_layer(4, 3, "cpu", 2)
    with pytest.raises(RuntimeError, match="init_process_group"):
        mt.ExpertParallelMoE.from_moe(moe)


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.device_count() >= 2
                         and dist.is_nccl_available() and moe_ext.info().get("cuda")),
                    reason="NCCL expert parallelism needs torch with CUDA and NCCL, moe_ext built with "
                           "CUDA, and >= 2 GPUs (NCCL cannot put two ranks on one GPU)")
def test_nccl_on_gpu_tensors():
    got = run_world(2, backend="nccl")
    for rank in range(2):
        for case, metrics in got[rank].items():
            if case == "errors":
                continue
            for metric, err in metrics.items():
                if metric not in ("idle_experts", "dropped_total"):
                    assert err <= RTOL, f"nccl rank {rank}, {case}, {metric}: {err:.3g}"
