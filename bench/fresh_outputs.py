"""What a fresh output array costs to first touch, NumPy's allocator against moe_ext's (docs/api.md "Arrays").

NumPy madvise(MADV_HUGEPAGE)s every array of 4 MiB or more; where transparent huge pages defragment on
madvise (cat /sys/kernel/mm/transparent_hugepage/defrag), that first touch may compact memory
synchronously. moe_ext's bindings allocate their outputs themselves, without the madvise. Each case runs
in its own process and keeps every array alive, as a training step keeps its activations and gradients.

    python bench/fresh_outputs.py [--mib 32] [--count 8]

Prints, per case, the milliseconds of each call: NumPy arrays filled once (madvise on, then off through
NUMPY_MADVISE_HUGEPAGE=0), and moe_ext.activation_backward returning an output of the same size.
"""
import argparse
import os
import subprocess
import sys

CASE = r"""
import sys, time
import numpy as np
mib, count, case = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
n = mib * 2**20 // 4
if case == "moe_ext":
    import moe_ext
    rows = n // 1024
    h = np.random.default_rng(0).standard_normal((rows, 2048), dtype=np.float32)
    g = np.random.default_rng(1).standard_normal((rows, 1024), dtype=np.float32)
    call = lambda: moe_ext.activation_backward(g, h, "swiglu")  # a [rows, 2048] float32 output
else:
    def call():
        a = np.empty(2 * n, np.float32)
        a.fill(1.0)
        return a
kept, ms = [], []
for _ in range(count):
    start = time.perf_counter()
    kept.append(call())
    ms.append((time.perf_counter() - start) * 1e3)
print(" ".join(f"{t:.1f}" for t in ms))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=16, help="MiB of the inputs; outputs are twice that")
    parser.add_argument("--count", type=int, default=8, help="arrays made (and kept) per case")
    args = parser.parse_args()
    try:
        with open("/sys/kernel/mm/transparent_hugepage/defrag") as fh:
            print(f"transparent_hugepage/defrag: {fh.read().strip()}")
    except OSError:
        print("transparent_hugepage/defrag: unknown")
    cases = [("numpy, madvise on", "numpy", {}), ("numpy, NUMPY_MADVISE_HUGEPAGE=0", "numpy",
             {"NUMPY_MADVISE_HUGEPAGE": "0"}), ("moe_ext.activation_backward output", "moe_ext", {})]
    for label, case, env in cases:
        out = subprocess.run([sys.executable, "-c", CASE, str(args.mib), str(args.count), case], check=True,
                             capture_output=True, text=True, env=dict(os.environ, **env)).stdout.strip()
        print(f"{label:36} {2 * args.mib} MiB each, ms per call: {out}")


if __name__ == "__main__":
    main()
