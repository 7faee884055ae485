"""Peak memory and page-fault cost of training steps: `moe-ext bench --mode train`'s step (forward + backward
of one MoE layer, gradients of x, w_router, w13, w2) run in this process, then its peak RSS.

    python bench/train_memory.py [--shape mixtral] [--dtype bf16] [--impl moe_ext] [--steps 1]

Prints p50/min ms per step, minor page faults and system CPU seconds per step (fresh memory first touched:
on small VMs a large share of a big step), user CPU seconds per step, and ru_maxrss (the process's peak
resident set: inputs, weights, gradients and every intermediate). Run one configuration per process (the
peak is the process's)."""
import argparse
import resource
import time

import numpy as np


def main():
    import torch
    import moe_ext
    from moe_ext._bench import train, workload
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="mixtral", help="a SPEC §6 shape name or T,d,f,E,k")
    parser.add_argument("--dtype", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--impl", default="moe_ext", choices=train.IMPLS)
    parser.add_argument("--steps", type=int, default=1, help="timed steps after one untimed step")
    args = parser.parse_args()
    torch.set_num_threads(moe_ext.get_num_threads())
    s = workload.shape(args.shape) if args.shape in workload.SHAPES else workload.parse_spec(args.shape)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    tensors = [torch.from_numpy(a).to(dtype) for a in workload.make_inputs(s.T, s.d, s.f, s.E, s.k)]
    tensors[1] = tensors[1] * (1.0 / np.sqrt(s.d))  # spread routing, as the bench does
    dy = torch.randn(s.T, s.d, generator=torch.Generator().manual_seed(1)).to(dtype)
    forward = train.FORWARDS[args.impl]
    train._step(torch, forward, tensors, dy, s.k)
    before = resource.getrusage(resource.RUSAGE_SELF)
    seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        train._step(torch, forward, tensors, dy, s.k)
        seconds.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    n = args.steps
    print(f"{s.name} {args.dtype} {args.impl}: p50 {np.median(seconds) * 1e3:.1f} ms, min {min(seconds) * 1e3:.1f} ms; "
          f"minor faults/step {(after.ru_minflt - before.ru_minflt) / n:.0f}; "
          f"sys s/step {(after.ru_stime - before.ru_stime) / n:.2f}; user s/step {(after.ru_utime - before.ru_utime) / n:.2f}; "
          f"peak RSS {after.ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
