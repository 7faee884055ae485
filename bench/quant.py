"""Quantised experts: decode and prefill time of moe_ext.experts on int8 / int4 weights, against moe_ext's own
float path (packed bfloat16) and a plain read of the same bytes, all in one run, calls interleaved.

Shapes: the Mixtral layer (d=4096, f=14336, E=8, k=2) and a fine-grained one (d=2048, f=768, E=128, k=8),
SwiGLU. Weights are random codes and scales in moe_ext's layout (moe_ext.quant.from_parts; the time does
not depend on the values), bf16 weights random and prepacked. Schemes: int8 (one scale per row, the
vLLM layout) and int4 g128 (symmetric), each weight-only (W8A16 / W4A16) and with per-token int8
activations (W8A8 / W4A8: the same bytes, moe_ext._core.quantized_borrow, no second copy). Tokens are
bfloat16 by default (what a bfloat16 model feeds its layers; on a CPU with AVX512_BF16 the packed bf16
path and int4 weight-only decode then multiply with vdpbf16ps), float32 with --x-dtype float32.

Per (shape, T): every implementation is called once per round, the order rotated each round (load drift
on a shared machine falls on all alike), and the medians are reported:
- decode: bytes of the touched experts' weights / time (GB/s), and that as a fraction of a plain read
  (torch.sum over a float32 buffer of the int8 scheme's touched bytes, same threads) in the same run;
- every T: time ratio to the packed bf16 float path (> 1: the quantised path is faster).

    python bench/quant.py [--shape mixtral,fine] [--tokens 1,4,16,512] [--rounds 5] [--threads 2] [--no-float]
                          [--x-dtype bfloat16|float32]
JSON: bench/results/quant.json (or --out).
"""
import argparse
import json
import pathlib
import time

import ml_dtypes
import numpy as np

import moe_ext
from moe_ext import quant

SHAPES = {"mixtral": (4096, 14336, 8, 2), "fine": (2048, 768, 128, 8), "tiny": (256, 128, 8, 2)}  # tiny: tests
SCHEMES = {"int8": ("int8", None), "int4 g128": ("int4", 128)}
X_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}


def random_weight(rng, scheme, group, E, N, K):
    layout = moe_ext.quantize(np.zeros((1, 1, K), np.float32), scheme, group_size=group)  # the parts' shapes
    values = rng.integers(0, 256, (E, N, layout.values.shape[-1]), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.01, (E, N, layout.scales.shape[-1])).astype(np.float32)
    return quant.from_parts(scheme, (E, N, K), group, values, scales)


def borrow(q, activations):
    return moe_ext._core.quantized_borrow(q.scheme, *q.shape, q.group_size or 0, *q.kernel_parts(), activations)


def random_bf16(rng, E, N, K):
    """bf16 weights of magnitude ~0.01 drawn as bits (fast for GBs), prepacked, the raw array freed."""
    w = np.empty((E, N, K), dtype=np.uint16)
    for e in range(E):  # exponent 120 (2^-7), random sign and mantissa
        w[e] = rng.integers(0, 128, (N, K), dtype=np.uint16) | (120 << 7) | (rng.integers(0, 2, (N, K), dtype=np.uint16) << 15)
    return moe_ext.prepack(w.view(ml_dtypes.bfloat16))


def reader(nbytes, threads):
    """(name, fn) reading nbytes with `threads` threads: torch.sum over float32 (NumPy's sum without torch)."""
    try:
        import torch
        torch.set_num_threads(threads)
        buf = torch.ones(nbytes // 4)
        return f"torch.sum ({threads} threads)", buf.sum
    except ImportError:
        buf = np.ones(nbytes // 4, np.float32)
        return "numpy.sum (1 thread)", buf.sum


def routing(rng, T, E, k):
    ids = np.stack([rng.permutation(E)[:k] for _ in range(T)]).astype(np.int32)
    w = rng.random((T, k)).astype(np.float32)
    return ids, w / w.sum(1, keepdims=True)


def timed_rounds(impls, rounds):
    names = list(impls)
    for name in names:
        impls[name]()
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            impls[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(v)) for name, v in times.items()}


def bench_shape(shape, tokens, rounds, threads, with_float, x_dtype, rng):
    d, f, E, k = SHAPES[shape]
    weights = {}
    for label, (scheme, group) in SCHEMES.items():
        q13, q2 = random_weight(rng, scheme, group, E, 2 * f, d), random_weight(rng, scheme, group, E, d, f)
        weights[label] = (q13, q2)
        weights[label + (" W8A8" if scheme == "int8" else " W4A8")] = (borrow(q13, True), borrow(q2, True))
    per_expert = {label: (q13.nbytes + q2.nbytes) / E for label, (q13, q2) in weights.items()}
    if with_float:
        weights["bf16 packed"] = (random_bf16(rng, E, 2 * f, d), random_bf16(rng, E, d, f))
        per_expert["bf16 packed"] = 2 * 3 * d * f
    rows = []
    for T in tokens:
        ids, w = routing(rng, T, E, k)
        x = rng.standard_normal((T, d)).astype(x_dtype)
        touched = len(np.unique(ids))
        impls = {label: (lambda a, b: lambda: moe_ext.experts(x, a, b, w, ids))(*ws) for label, ws in weights.items()}
        read_bytes = int(per_expert["int8"] * touched)
        read_name = None
        if T <= 16:
            read_name, read_fn = reader(read_bytes, threads)
            impls[read_name] = read_fn
        med = timed_rounds(impls, rounds)
        read_bw = read_bytes / med[read_name] if read_name else None
        flops = 2 * T * k * d * f * 3
        line = [f"{shape} T={T} ({touched} experts touched, {np.dtype(x_dtype).name} tokens)"]
        for label in weights:
            bytes_ = per_expert[label] * touched
            row = dict(shape=shape, T=T, impl=label, x_dtype=np.dtype(x_dtype).name, seconds=med[label], touched_experts=touched,
                       touched_bytes=bytes_, gb_per_s=bytes_ / med[label] / 1e9, gflop_per_s=flops / med[label] / 1e9,
                       threads=threads)
            if read_bw:
                row["fraction_of_read"] = bytes_ / med[label] / read_bw
            if "bf16 packed" in med:
                row["speedup_vs_bf16_packed"] = med["bf16 packed"] / med[label]
            rows.append(row)
            extra = f", {row['fraction_of_read']:.2f} of read" if read_bw else ""
            extra += f", {row['speedup_vs_bf16_packed']:.2f}x bf16" if "bf16 packed" in med and label != "bf16 packed" else ""
            line.append(f"  {label}: {med[label] * 1e3:.2f} ms, {row['gb_per_s']:.1f} GB/s, "
                        f"{row['gflop_per_s']:.0f} GFLOP/s{extra}")
        if read_bw:
            rows.append(dict(shape=shape, T=T, impl=read_name, seconds=med[read_name], touched_bytes=read_bytes,
                             gb_per_s=read_bw / 1e9, threads=threads))
            line.append(f"  read ({read_name}) of {read_bytes / 1e6:.0f} MB: {med[read_name] * 1e3:.2f} ms, "
                        f"{read_bw / 1e9:.1f} GB/s")
        print("\n".join(line), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="mixtral,fine")
    ap.add_argument("--tokens", default="1,4,16,512")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-float", action="store_true", help="skip the packed bf16 float path")
    ap.add_argument("--x-dtype", default="bfloat16", choices=["bfloat16", "float32"], help="the tokens' dtype")
    ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "quant.json"))
    args = ap.parse_args()
    moe_ext.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    rows = []
    for shape in args.shape.split(","):
        rows += bench_shape(shape, [int(t) for t in args.tokens.split(",")], args.rounds, args.threads,
                            not args.no_float, X_DTYPES[args.x_dtype], rng)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(moe_ext=moe_ext.info(), rows=rows), indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
