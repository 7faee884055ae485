"""Expert parallelism on this machine: tokens/s and bytes exchanged per token against world size.

    PYTHONPATH=python python bench/expert_parallel.py                 # worlds 1, 2, 4; SPEC "small" shape
    PYTHONPATH=python python bench/expert_parallel.py --worlds 1 2 --tokens 2048 --d 1024 --f 2048

For each world size W it starts W processes (gloo on loopback, one forkserver so torch is imported once),
builds the same unsharded moe_ext.torch.MoE on every rank, shards it with ExpertParallelMoE.from_moe and
splits a global batch of --tokens tokens evenly over the ranks (strong scaling). Per iteration every rank
starts after a barrier, and the iteration's time is the slowest rank's (all-reduce MAX). It reports
- tokens/s: global tokens / median iteration time (forward only; --backward adds the backward pass);
- exch ms: the median time of the two all_to_all_single calls alone with the forward's own splits
  (the exchange share of an iteration);
- off-rank B/token: bytes that crossed to another rank per token, dispatch + combine, measured from the
  splits; the uniform-routing model is 2 * k * d * bytes * (W - 1) / W;
- GB/s: those bytes (summed over ranks) / exch time: what the transport delivers here;
- GFLOP/s: SPEC §6 FLOPs of the layer (2*T*k*d*f*(3 gated, 2 otherwise) + 2*T*d*E) / iteration time.
Ranks get cores // W threads each (at least 1), so every world uses the same cores. On one machine the
"link" is loopback TCP through gloo, and W > cores oversubscribes: read docs/expert_parallel.md before
extrapolating.
"""
import argparse
import datetime
import multiprocessing
import os
import statistics
import tempfile
import time
import traceback


def _rank_main(rank, W, store, args, results):
    try:
        import torch
        import torch.distributed as dist

        import moe_ext
        import moe_ext.torch as mt

        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        threads = max(1, (os.cpu_count() or 1) // W) if args.threads is None else args.threads
        torch.set_num_threads(threads)
        moe_ext.set_num_threads(threads)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=W,
                                timeout=datetime.timedelta(seconds=300))
        torch.manual_seed(0)  # the same layer on every rank
        moe = mt.MoE(args.d, args.f, args.experts, args.top_k, activation=args.activation)
        ep = mt.ExpertParallelMoE.from_moe(moe, None)
        del moe
        T_local = args.tokens // W
        torch.manual_seed(1 + rank)
        x = torch.randn(T_local, args.d)
        if args.backward:
            x.requires_grad_(True)
        g = torch.randn(T_local, args.d)

        def step():
            if args.backward:
                (ep(x) * g).sum().backward()
            else:
                with torch.no_grad():
                    ep(x)

        def slowest(seconds):
            t = torch.tensor([seconds], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            return float(t)

        iters = []
        for i in range(args.warmup + args.iters):
            dist.barrier()
            t0 = time.perf_counter()
            step()
            dt = slowest(time.perf_counter() - t0)
            if i >= args.warmup:
                iters.append(dt)

        # The exchange alone, with the forward's own splits (dispatch, then combine the other way).
        send, recv = ep.last_splits
        dtype_bytes = torch.finfo(torch.float32).bits // 8
        a = torch.randn(sum(send), args.d)
        b = torch.empty(sum(recv), args.d)
        exch = []
        for i in range(args.warmup + args.iters):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_to_all_single(b, a, recv, send)
            dist.all_to_all_single(a, b, send, recv)
            dt = slowest(time.perf_counter() - t0)
            if i >= args.warmup:
                exch.append(dt)
        off_rows = torch.tensor([sum(send) - send[rank] + sum(recv) - recv[rank]], dtype=torch.int64)
        # Summed over ranks, (sent + received) off-rank rows of the dispatch = the rows that crossed in
        # the dispatch and in the combine (which moves the same rows back).
        dist.all_reduce(off_rows)
        off_bytes = int(off_rows) * args.d * dtype_bytes
        dist.destroy_process_group()
        results.put((rank, dict(iters=iters, exch=exch, off_bytes=off_bytes, threads=threads), None))
    except BaseException:  # noqa: BLE001 - report to the parent
        results.put((rank, None, traceback.format_exc()))


def run_world(W, args):
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "torch._dynamo", "moe_ext", "moe_ext.torch"])
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_rank_main, args=(r, W, os.path.join(tmp, "store"), args, results),
                             daemon=True) for r in range(W)]
        for p in procs:
            p.start()
        got = {}
        try:
            for _ in range(W):
                rank, out, tb = results.get(timeout=args.timeout)
                if tb is not None:
                    raise RuntimeError(f"rank {rank} failed:\n{tb}")
                got[rank] = out
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
    return got[0]  # every rank holds the same (all-reduced) figures


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--tokens", type=int, default=512, help="global batch, split over the ranks")
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--f", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--activation", default="swiglu")
    p.add_argument("--backward", action="store_true", help="time forward + backward")
    p.add_argument("--threads", type=int, default=None, help="threads per rank (default cores // W)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--timeout", type=float, default=600)
    args = p.parse_args(argv)

    mode = "fwd+bwd" if args.backward else "fwd"
    print(f"expert parallelism over gloo (loopback), {os.cpu_count()} cores: T={args.tokens} global, "
          f"d={args.d} f={args.f} E={args.experts} k={args.top_k} {args.activation} fp32, {mode}, "
          f"median of {args.iters}")
    head = (f"{'W':>3} {'thr/rank':>8} {'T/rank':>7} {'tokens/s':>10} {'iter ms':>9} {'exch ms':>8} "
            f"{'off-rank B/token':>16} {'model B/token':>13} {'GB/s':>6} {'GFLOP/s':>8}")
    print(head)
    print("-" * len(head))
    for W in args.worlds:
        r = run_world(W, args)
        it, ex = statistics.median(r["iters"]), statistics.median(r["exch"])
        T = args.tokens // W * W
        per_token = r["off_bytes"] / T
        model = 2 * args.top_k * args.d * 4 * (W - 1) / W
        gbs = r["off_bytes"] / ex / 1e9 if r["off_bytes"] else float("nan")
        gated = 3 if args.activation in ("swiglu", "geglu") else 2
        flops = 2 * T * args.top_k * args.d * args.f * gated + 2 * T * args.d * args.experts
        flops *= 3 if args.backward else 1  # backward: two GEMMs per forward GEMM
        print(f"{W:>3} {r['threads']:>8} {T // W:>7} {T / it:>10.0f} {it * 1e3:>9.2f} {ex * 1e3:>8.2f} "
              f"{per_token:>16.0f} {model:>13.0f} {gbs:>6.2f} {flops / it / 1e9:>8.1f}")


if __name__ == "__main__":
    main()
