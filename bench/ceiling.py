"""This machine's compute (GFLOP/s) and bandwidth (GB/s) ceilings as the benchmark measures them in
its own run: see moe_ext/_bench/ceiling.py, installed with the package.

    python bench/ceiling.py [--dtype fp32|bf16] [--n 2048] [--mib 1024]
"""
import argparse

from moe_ext._bench.ceiling import *  # noqa: F401,F403
from moe_ext._bench.ceiling import BANDWIDTH_BYTES, COMPUTE_N, measure

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", action="append", choices=["fp32", "bf16"])
    parser.add_argument("--n", type=int, default=COMPUTE_N, help="matmul size (default %(default)s)")
    parser.add_argument("--mib", type=float, default=BANDWIDTH_BYTES / 2**20,
                        help="bytes read by the bandwidth candidates, MiB (default %(default)g)")
    args = parser.parse_args()
    try:
        import moe_ext
        import torch

        torch.set_num_threads(moe_ext.get_num_threads())
    except ImportError:
        pass
    for dtype in args.dtype or ["fp32"]:
        c = measure(dtype, args.n, int(args.mib * 2**20))
        print(f"{dtype}: compute {c['compute_gflop_per_s'] or 0:.1f} GFLOP/s ({c['compute_by']}), "
              f"bandwidth {c['bandwidth_gb_per_s'] or 0:.1f} GB/s ({c['bandwidth_by']})")
        for cand in c["candidates"]:
            value = f"{cand['value']:.1f} {cand['unit']}" if cand["value"] is not None else cand["note"]
            print(f"  {cand['name']:<13} {cand['what']:<8} {cand['size'] or '':<30} {value}")
