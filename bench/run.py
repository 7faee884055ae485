"""Benchmark moe_ext against its peers on the SPEC §6 shapes: terminal table, JSON and PNGs.

    python bench/run.py                                   # the quick set (small, decode-1), fp32
    python bench/run.py --shape all --dtype fp32 --dtype bf16 --repeats 10
    python bench/run.py --shape mixtral --impl moe_ext --impl torch_eager --budget 60

The same command as `moe-ext bench` (the harness is installed with the package, in moe_ext._bench, so
that the command works from a wheel); this file is a thin wrapper. `--help` lists the options.
Outputs: bench/results/bench.json, bench/results/throughput.png, bench/results/ceiling_fraction.png.
"""
import sys

from moe_ext import bench

if __name__ == "__main__":
    sys.exit(bench.main(prog="bench/run.py"))
