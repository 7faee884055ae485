"""The moe_ext command line: `python -m moe_ext {info,check,bench}` (also installed as `moe-ext`)."""
import argparse
import json
import sys


def _info(args):
    import moe_ext

    info = moe_ext.info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(key) for key in info)
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        shown = ", ".join(value) if isinstance(value, list) else value
        print(f"{key:<{width}}  {shown}")
    return 0


def _check(args):
    import moe_ext
    from moe_ext import _selfcheck

    isas = args.isa or moe_ext.available_isas()
    print(f"moe_ext {moe_ext.__version__}: parity against moe_ext.reference (float64), "
          f"tolerance {_selfcheck.TOLERANCE:g}, tiers {', '.join(isas)}")
    print(f"{'isa':<7} {'op':<24} {'shape (T,d,f,E,k)':<22} {'rel err':>10}  result")
    failures = total = 0
    for isa, op, shape, err, ok in _selfcheck.run(isas):
        total += 1
        failures += not ok
        print(f"{isa:<7} {op:<24} {str(shape):<22} {err:>10.2e}  {'ok' if ok else 'FAIL'}")
    print(f"{total - failures} passed, {failures} failed")
    return 1 if failures else 0


def _bench(args):
    from moe_ext import bench

    return bench.run_args(args, ["moe-ext", "bench"] + list(args.argv))


def main(argv=None):
    from moe_ext import bench

    parser = argparse.ArgumentParser(prog="moe-ext", description="moe_ext: Mixture-of-Experts kernels")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="version, build, CPU tiers, threads, CUDA")
    info.add_argument("--json", action="store_true", help="print JSON")
    check = commands.add_parser("check", help="parity of this install against the NumPy reference")
    check.add_argument("--isa", action="append", choices=["scalar", "avx2", "avx512"],
                       help="check only this tier (repeatable; default: every tier this CPU has)")
    run = commands.add_parser("bench", help="moe_ext against its peers on the SPEC §6 shapes (table, "
                              "JSON, PNGs)", description=bench.__doc__.splitlines()[0])
    bench.add_arguments(run)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv[1:]
    return {"info": _info, "check": _check, "bench": _bench}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
