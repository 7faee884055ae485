"""What the packed expert-weight cache (docs/api.md §8) buys on the paths users take: moe_ext.torch.MoE and a
transformers Mixtral sparse MoE block with experts_implementation="moe_ext", inference (torch.no_grad), cache on
against cache off (the plain-weight path: packing per tile inside each call), interleaved call by call.

On a shared machine the speed left to this process drifts over seconds, so each "on" call is paired with an
"off" call right next to it (alternating which goes first) and the figure is the median over the pairs of
off seconds / on seconds (> 1: the cache is faster). Only ratios are reported. "Off" here keeps the entries
(a private switch: moe_ext.torch.set_weight_cache(False) would free them, and the next "on" call would pack).
Calls in which no expert gets more than 16 rows stay on the plain weights even with the cache on (column
"on ran": plain); `--few-rows 0` lowers that threshold (a private one) to time packed weights there too.

    python bench/weight_cache.py [--hidden 1024] [--intermediate 3584] [--experts 8] [--top-k 2]
                                 [--tokens 1 16 256] [--dtypes fp32 bf16] [--pairs 9] [--few-rows 16]
                                 [--json out.json]
"""
import argparse
import json
import statistics
import time

import torch

import moe_ext
import moe_ext.torch as mt
from moe_ext.torch import _weight_cache

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _moe_layer(args, dtype):
    torch.manual_seed(0)
    return mt.MoE(args.hidden, args.intermediate, args.experts, args.top_k, dtype=dtype).eval()


def _mixtral_layer(args, dtype):
    import transformers
    from transformers.models.mixtral import modeling_mixtral
    config = transformers.MixtralConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                                        num_local_experts=args.experts, num_experts_per_tok=args.top_k,
                                        num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8)
    config._experts_implementation = "moe_ext"
    torch.manual_seed(0)
    block = modeling_mixtral.MixtralSparseMoeBlock(config).to(dtype).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, p.shape[-1] ** -0.5)
    return block


def _timed(layer, x, cached):
    _weight_cache._state["enabled"] = cached
    start = time.perf_counter()
    out = layer(x)
    elapsed = time.perf_counter() - start
    _weight_cache._state["enabled"] = True
    return elapsed, out[0] if isinstance(out, tuple) else out


def _ratio(layer, x, pairs):
    """median(off / on), min(off) / min(on), median on ms, median off ms, max |on - off| over interleaved
    pairs, after one warm call each."""
    with torch.no_grad():
        before = mt.weight_cache_info()
        _, on_out = _timed(layer, x, True)  # builds the entries (first T) or hits them
        after = mt.weight_cache_info()
        if after.hits + after.builds >= before.hits + before.builds + 2:
            path = "packed"
        elif after.few_rows > before.few_rows:
            path = "plain"
        else:
            raise RuntimeError(f"{type(layer).__name__} did not run on the weight cache: {after}")
        _, off_out = _timed(layer, x, False)
        diff = (on_out.float() - off_out.float()).abs().max().item()
        on, off = [], []
        for i in range(pairs):
            for cached in ((True, False) if i % 2 == 0 else (False, True)):
                (on if cached else off).append(_timed(layer, x, cached)[0])
    ratios = [b / a for a, b in zip(on, off)]
    return (statistics.median(ratios), min(off) / min(on), statistics.median(on) * 1e3, statistics.median(off) * 1e3,
            diff, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=3584)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--layers", nargs="+", choices=["moe", "mixtral"], default=["moe", "mixtral"])
    parser.add_argument("--pairs", type=int, default=9)
    parser.add_argument("--few-rows", type=int, default=_weight_cache.FEW_ROWS)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    _weight_cache.FEW_ROWS = args.few_rows
    torch.set_num_threads(moe_ext.get_num_threads())
    print(f"# moe_ext {moe_ext.__version__}, ISA {moe_ext.get_isa()}, {moe_ext.get_num_threads()} threads; "
          f"d={args.hidden} f={args.intermediate} E={args.experts} k={args.top_k}; {args.pairs} pairs; "
          f"few rows <= {args.few_rows}")
    print(f"{'layer':8} {'dtype':5} {'T':>4} {'off/on (median)':>16} {'best off/best on':>17} {'on ms':>9} "
          f"{'off ms':>9} {'max |diff|':>11} {'on ran':>7}")
    rows = []
    for layer_name in args.layers:
        for dtype_name in args.dtypes:
            make = _moe_layer if layer_name == "moe" else _mixtral_layer
            layer = make(args, DTYPES[dtype_name])
            for T in args.tokens:
                shape = (T, args.hidden) if layer_name == "moe" else (1, T, args.hidden)  # the block takes [B, S, d]
                x = torch.randn(*shape, generator=torch.Generator().manual_seed(T)).to(DTYPES[dtype_name])
                ratio, best, on_ms, off_ms, diff, path = _ratio(layer, x, args.pairs)
                rows.append(dict(layer=layer_name, dtype=dtype_name, T=T, ratio_off_over_on=ratio, best_ratio=best,
                                 on_ms=on_ms, off_ms=off_ms, max_abs_diff=diff, on_ran=path))
                print(f"{layer_name:8} {dtype_name:5} {T:>4} {ratio:>16.2f} {best:>17.2f} {on_ms:>9.2f} {off_ms:>9.2f} "
                      f"{diff:>11.2e} {path:>7}", flush=True)
            del layer
            mt.clear_weight_cache()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(args=vars(args), info=mt.weight_cache_info()._asdict(), rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
