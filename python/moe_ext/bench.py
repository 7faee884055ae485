"""`moe-ext bench` (and bench/run.py): moe_ext against its peers on the SPEC §6 shapes.

Every implementation is measured in the same process on the same arrays: moe_ext, the NumPy reference,
PyTorch eager (the Hugging Face Mixtral loop over experts), torch._grouped_mm where it runs, and the
dense FFN of the same active FLOPs; with warm-up, repeated timings, p50/p95/p99, tokens/s, GFLOP/s
(SPEC §6 FLOPs), GB/s of expert weights touched for decode, the fraction of this machine's ceilings
measured in the same run, and moe_ext's ratio to every peer and to the fastest one. Output: a terminal
table (with a tqdm bar), a JSON file and two PNGs. torch, tqdm and matplotlib are optional
(pip install 'moe_ext[bench]'): without them the torch rows, the bar or the PNGs are left out with a note.

Python API: ``run(...)`` (moe_ext._bench.harness.run) returns the JSON document.
"""
import argparse
import os
import sys

from ._bench import ceiling, harness, peers, workload
from ._bench.harness import run
from ._bench.workload import QUICK, SHAPE_CHOICES, SHAPE_GROUPS, SHAPES, flops, make_inputs

__all__ = ["run", "main", "add_arguments", "flops", "make_inputs", "SHAPES",
           "SHAPE_GROUPS", "QUICK", "IMPLS"]
IMPLS = peers.NAMES


def add_arguments(parser):
    """The bench options, shared by `moe-ext bench` and bench/run.py."""
    parser.add_argument("--shape", action="append", choices=SHAPE_CHOICES, metavar="NAME",
                        help="SPEC §6 shape, repeatable: " + ", ".join(SHAPES) + "; decode = decode-1, "
                             "decode-4 and decode-16; all = every shape; quick = "
                             + " and ".join(QUICK) + " (the default)")
    parser.add_argument("--quick", action="store_true",
                        help="the quick set (" + " and ".join(QUICK) + "), also the default without --shape")
    parser.add_argument("--dtype", action="append", choices=peers.DTYPES + ("fp16",),
                        help="fp32 (default) and/or bf16, repeatable (fp16: --mode hf only)")
    parser.add_argument("--impl", action="append", choices=peers.NAMES,
                        help="only these implementations, repeatable (default: all)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per row (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")
    parser.add_argument("--budget", type=float, default=harness.BUDGET_S, metavar="SECONDS",
                        help="skip a peer whose first call takes longer (default %(default)g; 0: no limit)")
    parser.add_argument("--json", default=harness.DEFAULT_JSON, metavar="PATH",
                        help="JSON output (default %(default)s; '' for none)")
    parser.add_argument("--png-dir", default=harness.DEFAULT_PNG_DIR, metavar="DIR",
                        help="PNG plots directory (default %(default)s; '' for none)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--mode", choices=("forward", "train", "hf"), default="forward",
                        help="forward (default); train: forward+backward of one layer vs the PyTorch peers "
                             "(shapes small and medium by default; moe_ext._bench.train); hf: a transformers "
                             "Mixtral decoder layer (d=4096, f=14336, E=8, k=2) with experts_implementation "
                             "moe_ext / grouped_mm / eager, prefill T=512 and decode batch 1 and 8 "
                             "(--dtype, default bf16; moe_ext._bench.hf_layer)")
    parser.add_argument("--hf-model", choices=("mixtral", "gpt_oss"), default="mixtral",
                        help="--mode hf: the layer (mixtral, default; gpt_oss: gpt-oss-20b's layer)")
    # Hidden: custom shapes and small ceilings, for tests and quick experiments.
    parser.add_argument("--shape-spec", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--ceiling-n", type=int, default=ceiling.COMPUTE_N, help=argparse.SUPPRESS)
    parser.add_argument("--ceiling-mib", type=float, default=ceiling.BANDWIDTH_BYTES / 2**20,
                        help=argparse.SUPPRESS)
    return parser


def run_args(args, argv=None):
    """Run the benchmark from parsed add_arguments() options. Returns the exit status."""
    try:
        specs = [workload.parse_spec(s) for s in args.shape_spec]
    except ValueError as e:
        print(f"moe-ext bench: {e}", file=sys.stderr)
        return 2
    if args.repeats < 1 or args.warmup < 0:
        print("moe-ext bench: --repeats must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    shapes = list(args.shape or []) + (QUICK if args.quick else []) + specs
    if args.mode == "train":
        from ._bench import train
        train_shapes = [s.name for s in workload.expand(list(args.shape or []) + (QUICK if args.quick else []))]
        impls = [i for i in args.impl or train.IMPLS if i in train.IMPLS]  # --impl picks among train's
        train.run(shapes=train_shapes + list(args.shape_spec) or list(train.TRAIN_SHAPES),
                  dtypes=args.dtype or ["fp32", "bf16"], impls=impls, warmup=args.warmup, repeats=args.repeats,
                  json_path=args.json or None)
        return 0
    if args.mode == "hf":
        from ._bench import hf_layer
        stem = "hf_layer" if args.hf_model == "mixtral" else f"hf_layer_{args.hf_model}"
        hf_layer.run(dtype=(args.dtype or ["bf16"])[0], repeats=args.repeats,
                     json_path=args.json if args.json != harness.DEFAULT_JSON else
                     os.path.join("bench", "results", stem + ".json"),
                     png_path=os.path.join(args.png_dir, stem + ".png") if args.png_dir else None,
                     ceiling_n=args.ceiling_n, ceiling_bytes=int(args.ceiling_mib * 2**20), model=args.hf_model,
                     **dict(_hf_overrides(specs)))
        return 0
    run(shapes=shapes or QUICK, dtypes=args.dtype or ["fp32"], impls=args.impl, warmup=args.warmup,
        repeats=args.repeats, budget_s=args.budget, json_path=args.json or None,
        png_dir=args.png_dir or None, progress=not args.no_progress, ceiling_n=args.ceiling_n,
        ceiling_bytes=int(args.ceiling_mib * 2**20), argv=argv)
    return 0


def _hf_overrides(specs):
    """--mode hf with one --shape-spec 'T,d,f,E,k': a smaller layer (tests, quick looks); T is the prefill."""
    if not specs:
        return {}
    s = specs[0]
    return dict(prefill_tokens=s.T, hidden_size=s.d, intermediate_size=s.f, num_local_experts=s.E,
                num_experts_per_tok=s.k)


def main(argv=None, prog="bench/run.py"):
    """bench/run.py's command line (the same options as `moe-ext bench`)."""
    parser = add_arguments(argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0]))
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_args(parser.parse_args(argv), [prog] + argv)
