"""Peak resident memory (VmHWM of /proc/self/status) of a process holding one MoE layer, before and after its
first inference call, with the packed expert-weight cache on and off (docs/api.md §8). Each case runs in a
fresh subprocess, so peaks do not mix.

    python bench/weight_cache_rss.py [--layer moe|mixtral] [--hidden 1024] [--intermediate 3584] [--experts 8]
                                     [--dtype fp32|bf16] [--tokens 256]
"""
import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys
import torch
import moe_ext.torch as mt

def peak_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

a = json.loads(sys.argv[1])
dtype = dict(fp32=torch.float32, bf16=torch.bfloat16)[a["dtype"]]
torch.manual_seed(0)
if a["layer"] == "moe":
    layer = mt.MoE(a["hidden"], a["intermediate"], a["experts"], 2, dtype=dtype)
    x = torch.randn(a["tokens"], a["hidden"]).to(dtype)
    experts = [layer.w13, layer.w2]
else:
    import transformers
    from transformers.models.mixtral import modeling_mixtral
    config = transformers.MixtralConfig(hidden_size=a["hidden"], intermediate_size=a["intermediate"],
                                        num_local_experts=a["experts"], num_experts_per_tok=2, num_hidden_layers=1,
                                        num_attention_heads=8, num_key_value_heads=8)
    config._experts_implementation = "moe_ext"
    layer = modeling_mixtral.MixtralSparseMoeBlock(config).to(dtype)
    with torch.no_grad():  # the block's weights are torch.empty: write them, so that they are resident
        for p in layer.parameters():
            p.normal_(0.0, p.shape[-1] ** -0.5)
    x = torch.randn(1, a["tokens"], a["hidden"]).to(dtype)
    experts = [layer.experts.gate_up_proj, layer.experts.down_proj]
with torch.no_grad():
    # warm, on the plain path (a private switch that packs nothing): workspaces and first-call allocations
    from moe_ext.torch import _weight_cache
    enabled, _weight_cache._state["enabled"] = _weight_cache._state["enabled"], False
    layer(x[..., :1, :] if x.dim() == 3 else x[:1])
    _weight_cache._state["enabled"] = enabled
    before = peak_mib()
    layer(x)
    after = peak_mib()
print(json.dumps(dict(before_mib=before, after_mib=after, experts_mib=sum(w.nbytes for w in experts) / 2**20,
                      cache=mt.weight_cache_info()._asdict())))
"""


def measure(args, cache_on):
    env = dict(os.environ, MOE_EXT_WEIGHT_CACHE="1" if cache_on else "0")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", CHILD, json.dumps(vars(args))], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", choices=["moe", "mixtral"], default="moe")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=3584)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--tokens", type=int, default=256)  # prefill-sized: decode calls build nothing
    args = parser.parse_args()
    print(f"# {args.layer} d={args.hidden} f={args.intermediate} E={args.experts} {args.dtype}, first inference "
          f"call with T={args.tokens}; VmHWM in MiB")
    print(f"{'cache':6} {'experts':>8} {'peak before':>12} {'peak after':>11} {'growth':>8} {'cache bytes':>12}")
    for on in (False, True):
        r = measure(args, on)
        print(f"{'on' if on else 'off':6} {r['experts_mib']:>8.1f} {r['before_mib']:>12.1f} {r['after_mib']:>11.1f} "
              f"{r['after_mib'] - r['before_mib']:>8.1f} {r['cache']['bytes'] / 2**20:>12.1f}")


if __name__ == "__main__":
    main()
