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

With --models (needs torch and transformers): greedy decoding of tiny random bfloat16 Mixtral and Qwen3-MoE
models (hidden 64, 8 experts, top 2, 2 layers, built from configs) against the same models after
moe_ext.torch.quantize_experts: the fraction of positions whose teacher-forced greedy token (argmax of
the logits over 4 x 16 prompt tokens) agrees, and of the 4 x 16 tokens generate() produces that agree
(a sequence that diverges once rarely re-aligns). Two weight scales: transformers' initialisation
(std 0.02: the experts are a small part of the logits) and fan-in Gaussian experts with a spread router
(the experts dominate, as in tests/pytorch/test_quant_torch.py).

    python bench/quant_accuracy.py [--seed 0] [--models]
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


def model_agreement():
    import copy
    import math

    import torch
    import transformers

    import moe_ext.torch as mt
    from moe_ext.torch import quant as tq
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=128, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    configs = {"mixtral": lambda: transformers.MixtralConfig(**common, intermediate_size=128, num_local_experts=8,
                                                              num_experts_per_tok=2),
               "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**common, moe_intermediate_size=64,
                                                                 intermediate_size=128, num_experts=8,
                                                                 num_experts_per_tok=2, head_dim=16,
                                                                 norm_topk_prob=True)}
    rows = []
    print("\n| model | weights | scheme | greedy tokens agreeing (teacher-forced) | generate() tokens agreeing |")
    print("|---|---|---|---|---|")
    for arch, config in configs.items():
        for init in ("transformers", "fan-in"):
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(config()).eval()
            if init == "fan-in":
                with torch.no_grad():
                    for m in model.modules():
                        if tq._hf_weights(m) is not None:
                            m.gate_up_proj.normal_(0.0, 1 / math.sqrt(m.gate_up_proj.shape[-1]))
                            m.down_proj.normal_(0.0, 1 / math.sqrt(m.down_proj.shape[-1]))
                        elif type(m).__name__.lower().endswith("topkrouter"):
                            m.weight.normal_(0.0, 2 / math.sqrt(m.weight.shape[-1]))
            model = model.to(torch.bfloat16)
            ids = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                want = model(ids).logits.float().argmax(-1)
            gen = model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)[:, 16:]
            for scheme, group in (("int8", None), ("int4", 32), ("int4", 64)):
                q = mt.quantize_experts(copy.deepcopy(model), scheme, group_size=group)
                with torch.no_grad():
                    got = q(ids).logits.float().argmax(-1)
                gen_q = q.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)[:, 16:]
                row = dict(model=arch, weights=init, scheme=scheme, group_size=group,
                           teacher_forced=float((got == want).float().mean()),
                           generated=float((gen_q == gen).float().mean()))
                rows.append(row)
                print(f"| {arch} | {init} | {scheme} {'g' + str(group) if group else 'per row'} | "
                      f"{row['teacher_forced']:.0%} | {row['generated']:.0%} |", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", action="store_true", help="also greedy agreement of tiny bf16 models")
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
    models = model_agreement() if args.models else None
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(shape=dict(d=D, f=F, E=E, k=K_TOP, T=T), seed=args.seed, rows=rows,
                                   models=models), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
