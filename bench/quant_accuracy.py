"""Accuracy of the quantised experts (docs/api.md §9): layer-output error against the unquantised layer.

A SwiGLU experts layer (d=1024, f=512, E=8, k=2, T=256 tokens) with Gaussian weights at fan-in scale
(N(0, 1/in)) and Gaussian tokens N(0, 1), routed at random. For each scheme and group size, weight-only and
with per-token int8 activations:
- weight error: ||dequantize(q) - w|| / ||w|| over both weights;
- layer error: ||experts(x, q13, q2) - y|| / ||y||, y the float64 reference on the unquantised weights;
- kernel vs dequantised: the same against the float64 reference on dequantize(q) (weight-only), or on
  dequantize(q) with the activations quantised by the same rule (W8A8 / W4A8): what the kernels add of
  their own (float32 rounding).
Prints a Markdown table (the one in docs/api.md §9) and writes JSON to bench/results/quant_accuracy.json.

    python bench/quant_accuracy.py [--seed 0]
"""
import argparse
import json
import pathlib

import numpy as np

import moe_ext
from moe_ext import reference

D, F, E, K_TOP, T = 1024, 512, 8, 2, 256
FORMATS = [("int8", None, False), ("int8", 32, False), ("int8", 128, False),
           ("int4", 32, False), ("int4", 64, False), ("int4", 128, False),
           ("int4", 32, True), ("int4", 64, True), ("int4", 128, True)]


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "quant_accuracy.json"))
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    w13 = (rng.standard_normal((E, 2 * F, D)) / np.sqrt(D)).astype(np.float32)
    w2 = (rng.standard_normal((E, D, F)) / np.sqrt(F)).astype(np.float32)
    x = rng.standard_normal((T, D)).astype(np.float32)
    ids = np.stack([rng.permutation(E)[:K_TOP] for _ in range(T)]).astype(np.int32)
    weights = rng.random((T, K_TOP)).astype(np.float32)
    weights /= weights.sum(1, keepdims=True)
    y = reference.experts(x.astype(np.float64), w13.astype(np.float64), w2.astype(np.float64), weights, ids)
    rows = []
    print("| scheme | group | zero point | bits/weight | weight error | layer error, weight-only | "
          "layer error, int8 activations | kernel vs dequantised (w-only / a8) |")
    print("|---|---|---|---|---|---|---|---|")
    for scheme, group, zp in FORMATS:
        row = dict(scheme=scheme, group_size=group, zero_point=zp)
        for act in (None, "int8"):
            q13 = moe_ext.quantize(w13, scheme, group_size=group, zero_point=zp, activations=act)
            q2 = moe_ext.quantize(w2, scheme, group_size=group, zero_point=zp, activations=act)
            d13, d2 = moe_ext.dequantize(q13), moe_ext.dequantize(q2)
            got = moe_ext.experts(x, q13, q2, weights, ids)
            on_dq = reference.quantized_experts(x, d13, d2, weights, ids, quantize_inputs=(act is not None,) * 2)
            key = "a8" if act else "w_only"
            row[f"layer_error_{key}"] = rel(got, y)
            row[f"kernel_vs_dequantised_{key}"] = rel(got, on_dq)
        row["weight_error"] = float(np.sqrt((np.linalg.norm(d13 - w13) ** 2 + np.linalg.norm(d2 - w2) ** 2)
                                            / (np.linalg.norm(w13) ** 2 + np.linalg.norm(w2) ** 2)))
        row["bits_per_weight"] = 8 * (q13.nbytes + q2.nbytes) / (w13.size + w2.size)
        rows.append(row)
        print(f"| {scheme} | {group or 'row'} | {'yes' if zp else 'no'} | {row['bits_per_weight']:.2f} | "
              f"{row['weight_error']:.2%} | {row['layer_error_w_only']:.2%} | {row['layer_error_a8']:.2%} | "
              f"{row['kernel_vs_dequantised_w_only']:.1e} / {row['kernel_vs_dequantised_a8']:.1e} |")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(shape=dict(d=D, f=F, E=E, k=K_TOP, T=T), seed=args.seed, rows=rows), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
