"""Time moe_ext's fused forward on SPEC §6 shapes and write the results as JSON.

    python bench/forward.py --shape small --shape fine --repeats 5 --json bench/results/forward.json

moe_ext alone (moe_ext.bench.report); the comparison against the peers (NumPy reference, PyTorch
eager, torch._grouped_mm, dense), with ceilings and plots, is bench/run.py (= `moe-ext bench`).
"""
import argparse
import json
import os

import moe_ext
from moe_ext import bench


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", choices=bench.SHAPE_CHOICES)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default="bench/results/forward.json")
    args = parser.parse_args()
    names = [s.name for s in bench.workload.expand(args.shape or ["small"])]
    rows = [bench.report(name, args.repeats) for name in names]
    for row in rows:
        print(f"{row['shape']:<8} p50 {row['p50_ms']:9.2f} ms  {row['tokens_per_s']:10.1f} tokens/s  "
              f"{row['gflop_per_s']:7.2f} GFLOP/s")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as out:
        json.dump({"info": moe_ext.info(), "rows": rows}, out, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
