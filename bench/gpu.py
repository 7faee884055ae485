"""GPU benchmark of moe_ext's CUDA kernels on the SPEC §6 shapes, against the peers measured in the same run.

    python bench/gpu.py [--shapes small,medium,mixtral,decode,fine] [--dtypes bf16,fp32] [--iters 50]
                        [--json results.json]

Refuses to run (exit status 2) without a CUDA device. For each shape and dtype it times, with CUDA events
after warm-up: moe_ext.cuda.moe (the fused layer: router, permute, grouped GEMMs with the activation in
GEMM1's epilogue, unpermute), PyTorch eager (the Hugging Face Mixtral block's loop over experts),
torch._grouped_mm (where this torch and GPU run it), and a Triton fused-MoE kernel (vLLM's or SGLang's
fused_experts, where importable). Reported: tokens/s, TFLOP/s (SPEC §6 FLOP count), the fraction of the
dense rate of a large torch.mm in the same dtype measured in this run; for decode shapes also GB/s of
expert weights actually touched and the fraction of a large device-to-device copy's rate; p50/p95/p99
latency and each peer's time relative to moe_ext.
"""
import argparse
import json
import sys

import numpy as np

SHAPES = {  # name: (T, d, f, E, k)
    "small": [(512, 512, 1024, 8, 2)],
    "medium": [(2048, 1024, 2048, 8, 2)],
    "mixtral": [(1024, 4096, 14336, 8, 2)],
    "decode": [(1, 4096, 14336, 8, 2), (4, 4096, 14336, 8, 2), (16, 4096, 14336, 8, 2)],
    "fine": [(1024, 2048, 768, 64, 6)],
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("bench/gpu.py: needs torch with CUDA", file=sys.stderr)
        return 2
    from moe_ext import cuda
    if not torch.cuda.is_available() or cuda.device_count() == 0:
        print("bench/gpu.py: no CUDA device (torch.cuda.is_available() = "
              f"{torch.cuda.is_available()}, moe_ext devices = {cuda.device_count()}); refusing to run",
              file=sys.stderr)
        return 2
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    print(f"device: {torch.cuda.get_device_name()}")
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = dtypes[dtype_name]
        dense = dense_tflops(torch, dtype)
        copy = copy_gbs(torch)
        print(f"\n{dtype_name}: ceilings measured now: torch.mm {dense:.1f} TFLOP/s, copy {copy:.0f} GB/s")
        for shape_name in args.shapes.split(","):
            for shape in SHAPES[shape_name]:
                rows.extend(bench_shape(torch, cuda, shape_name, shape, dtype_name, dtype, dense, copy, args.iters))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


def time_ms(torch, fn, iters):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return np.percentile(times, [50, 95, 99])


def dense_tflops(torch, dtype, n=8192):
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = time_ms(torch, lambda: torch.mm(a, b), 10)[0]
    return 2 * n**3 / (ms * 1e-3) / 1e12


def copy_gbs(torch, n=1 << 28):
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(torch, lambda: dst.copy_(src), 10)[0]
    return 2 * n / (ms * 1e-3) / 1e9


def eager_loop(torch, x, w13, w2, weights, ids):
    """The Hugging Face Mixtral sparse block's loop over experts (SwiGLU)."""
    y = torch.zeros_like(x)
    f = w2.shape[2]
    mask = torch.nn.functional.one_hot(ids.long(), w13.shape[0]).permute(2, 1, 0)
    for e in range(w13.shape[0]):
        slot, token = torch.where(mask[e])
        if token.numel() == 0:
            continue
        h = x[token] @ w13[e].T
        a = torch.nn.functional.silu(h[:, :f]) * h[:, f:]
        y.index_add_(0, token, (a @ w2[e].T) * weights[token, slot, None].to(x.dtype))
    return y


def grouped_mm_peer(torch, cuda, x, w13, w2, weights, ids):
    if not hasattr(torch, "_grouped_mm"):
        return None
    E, f = w13.shape[0], w2.shape[2]

    def run():
        x_perm, offsets, perm_rows = cuda.permute(x, ids, E, check_ids=False)
        offs = offsets[1:].contiguous()
        h = torch._grouped_mm(x_perm, w13.transpose(1, 2), offs=offs)
        a = torch.nn.functional.silu(h[:, :f]) * h[:, f:]
        y_perm = torch._grouped_mm(a, w2.transpose(1, 2), offs=offs)
        return cuda.unpermute(y_perm, perm_rows, weights)
    try:
        run()
    except Exception:  # dtype / architecture this torch does not support
        return None
    return run


def triton_peer(torch, x, w13, w2, weights, ids):
    for module in ("vllm.model_executor.layers.fused_moe", "sglang.srt.layers.moe.fused_moe_triton"):
        try:
            fused_experts = __import__(module, fromlist=["fused_experts"]).fused_experts
        except Exception:
            continue
        try:
            fused_experts(x, w13, w2, weights, ids)
            return lambda: fused_experts(x, w13, w2, weights, ids)
        except Exception:
            return None
    return None


def bench_shape(torch, cuda, name, shape, dtype_name, dtype, dense, copy, iters):
    T, d, f, E, k = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(T, d, device="cuda", dtype=dtype, generator=gen)
    w_router = torch.randn(E, d, device="cuda", dtype=dtype, generator=gen) / d**0.5
    w13 = torch.randn(E, 2 * f, d, device="cuda", dtype=dtype, generator=gen) / d**0.5
    w2 = torch.randn(E, d, f, device="cuda", dtype=dtype, generator=gen) / f**0.5
    weights, ids = cuda.route(x, w_router, k)
    flops = 2 * T * k * d * f * 3 + 2 * T * d * E
    touched = int(torch.unique(ids).numel()) * 3 * f * d * x.element_size()
    peers = {"moe_ext": lambda: cuda.moe(x, w_router, w13, w2, k),
             "torch eager": lambda: eager_loop(torch, x, w13, w2, weights, ids)}
    grouped = grouped_mm_peer(torch, cuda, x, w13, w2, weights, ids)
    if grouped is not None:
        peers["torch._grouped_mm"] = grouped
    triton = triton_peer(torch, x, w13, w2, weights, ids)
    if triton is not None:
        peers["triton fused_moe"] = triton
    results = {label: time_ms(torch, fn, iters) for label, fn in peers.items()}
    base = results["moe_ext"][0]
    rows = []
    print(f"{name} T={T} d={d} f={f} E={E} k={k} {dtype_name}")
    for label, (p50, p95, p99) in results.items():
        tflops = flops / (p50 * 1e-3) / 1e12
        row = dict(shape=name, T=T, d=d, f=f, E=E, k=k, dtype=dtype_name, impl=label, p50_ms=p50, p95_ms=p95,
                   p99_ms=p99, tokens_per_s=T / (p50 * 1e-3), tflops=tflops, fraction_of_dense=tflops / dense,
                   time_vs_moe_ext=p50 / base)
        line = (f"  {label:<18} p50 {p50:8.3f} ms  p95 {p95:8.3f}  p99 {p99:8.3f}  {row['tokens_per_s']:12.0f} tok/s"
                f"  {tflops:7.2f} TFLOP/s ({row['fraction_of_dense']:.0%} of mm)  x{p50 / base:.2f} of moe_ext")
        if name == "decode":
            row["gbs"] = touched / (p50 * 1e-3) / 1e9
            row["fraction_of_copy"] = row["gbs"] / copy
            line += f"  {row['gbs']:7.0f} GB/s ({row['fraction_of_copy']:.0%} of copy)"
        print(line)
        rows.append(row)
    return rows


if __name__ == "__main__":
    sys.exit(main())
