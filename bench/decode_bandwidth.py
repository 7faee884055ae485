"""Decode (T <= 16) against the machine's read bandwidth at the same moment: moe_ext.moe on prepacked (or plain)
Mixtral-shaped experts, interleaved call by call with a plain read (torch.sum, else NumPy's sum) of a
buffer holding as many bytes as the decode step reads.

On a shared machine the bandwidth left to this process drifts by tens of percent over seconds, so a
fraction of a ceiling measured at another moment says as much about the neighbours as about the
kernel. Here every moe_ext call has a read right next to it; the figure is the median over the pairs
of read seconds / moe_ext seconds (1.0 = as fast as a plain read of the same bytes).

    python bench/decode_bandwidth.py [--tokens 1] [--dtype fp32|bf16|fp16] [--weights packed|plain] [--pairs 15]
"""
import argparse
import time

import numpy as np

import moe_ext
from moe_ext._bench import workload

D, F, E, K = workload.SHAPES["decode-1"][1:]


def _reader(nbytes):
    """(description, fn) reading about nbytes with every thread moe_ext uses: a float32 sum whatever the
    weights' dtype (torch's bfloat16 and float16 sums convert as they go and read 10-15% slower here, which
    would understate the ceiling)."""
    try:
        import torch
    except ImportError:
        buf = np.ones(nbytes // 4, dtype=np.float32)
        return "numpy.sum (one thread)", buf.sum
    torch.set_num_threads(moe_ext.get_num_threads())
    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    return f"torch.sum float32, {torch.get_num_threads()} threads", buf.sum


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1)
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--weights", choices=["packed", "plain"], default="packed",
                        help="moe_ext.prepack'd weights (default) or the plain arrays")
    parser.add_argument("--pairs", type=int, default=15, help="timed (moe_ext, read) pairs")
    args = parser.parse_args()

    x, w_router, w13, w2 = workload.make_inputs(args.tokens, D, F, E, K)
    if args.dtype != "fp32":
        import ml_dtypes

        half = ml_dtypes.bfloat16 if args.dtype == "bf16" else np.float16
        x, w13, w2 = x.astype(half), w13.astype(half), w2.astype(half)
    if args.weights == "packed":
        w13, w2 = moe_ext.prepack(w13), moe_ext.prepack(w2)
    touched = len(np.unique(moe_ext.route(np.asarray(x, np.float32), w_router, K)[1]))
    nbytes = workload.weight_bytes(D, F, E, touched, 4 if args.dtype == "fp32" else 2)
    what, read = _reader(nbytes)

    def timed(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def decode():
        return moe_ext.moe(x, w_router, w13, w2, K)

    decode(), read()  # warm-up
    ours, reads = [], []
    for i in range(args.pairs):
        first, second = (decode, read) if i % 2 == 0 else (read, decode)
        a, b = timed(first), timed(second)
        ours.append(a if first is decode else b)
        reads.append(b if first is decode else a)
    ours, reads = np.array(ours), np.array(reads)
    print(f"decode T={args.tokens} {args.dtype}: {touched} experts touched, {nbytes / 1e9:.3f} GB per step; "
          f"{args.weights} weights; read: {what}; {args.pairs} pairs")
    print(f"  moe_ext  p50 {np.median(ours) * 1e3:8.2f} ms  {nbytes / np.median(ours) / 1e9:6.1f} GB/s")
    print(f"  read     p50 {np.median(reads) * 1e3:8.2f} ms  {nbytes / np.median(reads) / 1e9:6.1f} GB/s")
    print(f"  moe_ext / read bandwidth: median over pairs {np.median(reads / ours):.3f}, "
          f"ratio of medians {np.median(reads) / np.median(ours):.3f}")


if __name__ == "__main__":
    main()
