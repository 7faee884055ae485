"""Memory of a transformers MoE model before and after moe_ext.torch.quantize_experts (docs/api.md §9).

A random bfloat16 Mixtral-style model built from a config (no download): hidden 1024, expert intermediate
3584, 8 experts (top 2), 4 layers, vocab 1024: 704 MB of bf16 expert weights. Each variant runs in its own
process (so one's freed memory does not hide in another's heap):
- expert bytes (moe_ext.torch.expert_bytes) and the process's resident memory (VmRSS) after the model is
  built, and after quantize_experts (float experts released; glibc's free memory returned with malloc_trim);
- the peak resident memory of generate() (16 new tokens, greedy) alone: the kernel's high-water mark
  (VmHWM) is reset right before it (/proc/self/clear_refs), so it is the inference peak of the model as
  it then is.

    python bench/quant_memory.py            # bf16, int8, int4 g128
"""
import ctypes
import json
import pathlib
import subprocess
import sys

VARIANTS = {"bf16": None, "int8": ("int8", None), "int4 g128": ("int4", 128)}


def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def child(variant):
    import torch
    import transformers

    import moe_ext.torch as mt
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    cfg = transformers.MixtralConfig(hidden_size=1024, intermediate_size=3584, num_local_experts=8,
                                     num_experts_per_tok=2, num_hidden_layers=4, num_attention_heads=8,
                                     num_key_value_heads=4, vocab_size=1024, max_position_embeddings=256)
    model = transformers.MixtralForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    out = dict(variant=variant, expert_bytes_before=mt.expert_bytes(model), rss_built=status("VmRSS"))
    if VARIANTS[variant]:
        scheme, group = VARIANTS[variant]
        mt.quantize_experts(model, scheme, group_size=group)
    import gc
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    out.update(expert_bytes_after=mt.expert_bytes(model), rss_after=status("VmRSS"))
    ids = torch.randint(3, 1024, (1, 32), generator=torch.Generator().manual_seed(1))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    with torch.no_grad():
        model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    out["peak_rss_generate"] = status("VmHWM")
    print(json.dumps(out))


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        return child(sys.argv[2])
    rows = []
    print("| model | expert bytes | RSS after build | RSS after quantize_experts | peak RSS of generate() |")
    print("|---|---|---|---|---|")
    for variant in VARIANTS:
        res = subprocess.run([sys.executable, __file__, "--child", variant], check=True, capture_output=True, text=True)
        row = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append(row)
        mb = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
        print(f"| {variant} | {mb(row['expert_bytes_after'])} | {mb(row['rss_built'])} | {mb(row['rss_after'])} | "
              f"{mb(row['peak_rss_generate'])} |", flush=True)
    out = pathlib.Path(__file__).parent / "results" / "quant_memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
