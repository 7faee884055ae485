"""`moe-ext bench --mode hf`: what a transformers user sees. One Mixtral decoder layer at real layer sizes
(d=4096, f=14336, E=8, k=2, 32 heads, 8 KV heads) in a MixtralForCausalLM with a tiny vocabulary (or, with
--hf-model gpt_oss, gpt-oss-20b's layer: d=f=2880, E=32, k=4, biases, transposed interleaved experts), run with
`experts_implementation` "moe_ext", "grouped_mm" and "eager" on the same model (same weights; the switch
is `model.set_experts_implementation`, nothing is prepacked or copied by hand).

Phases, timed in one process and interleaved (round r runs every implementation once, the order rotated
by r, so load drift on a shared machine falls on all alike):
* prefill: one forward of T tokens (batch 1, no cache): tokens/s = T / p50;
* decode batch B: a context of `context` tokens is prefilled (not timed), then `steps` single-token steps
  with the KV cache, each step timed: p50/p95/p99 ms per step, tokens/s = B / p50.
Ceilings, measured in the same run: the dtype's matmul rate and read bandwidth (moe_ext._bench.ceiling).
Prefill reports GFLOP/s of the layer's matmuls (experts as SPEC §6 counts them, plus the attention
projections and the LM head); decode reports GB/s of the weights a step reads (attention projections,
router, LM head, and the experts the step's routing touched, counted by a hook on the experts module).
Every implementation's outputs are cross-checked against "eager" (relative error of the prefill logits).
"""
import json
import os
import time

import numpy as np

from . import ceiling, harness

IMPLS = ("moe_ext", "grouped_mm", "eager")
LAYER = dict(hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
             num_attention_heads=32, num_key_value_heads=8, vocab_size=128, num_hidden_layers=1,
             max_position_embeddings=4096)
DEFAULT_JSON = os.path.join("bench", "results", "hf_layer.json")
DEFAULT_PNG = os.path.join("bench", "results", "hf_layer.png")


# The models: (config class, causal-LM class, real layer sizes). gpt_oss: gpt-oss-20b's layer (SPEC §6:
# biases, transposed weights, interleaved clamped gate), 64 query heads of 64, 8 KV heads.
MODELS = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", LAYER),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(hidden_size=2880, intermediate_size=2880, num_local_experts=32, num_experts_per_tok=4,
                     num_attention_heads=64, num_key_value_heads=8, head_dim=64, vocab_size=128,
                     num_hidden_layers=1, layer_types=["full_attention"], max_position_embeddings=4096)),
}


def build_model(dtype, seed=0, model="mixtral", **overrides):
    """A 1-layer causal LM of `model`'s family and `dtype` with random weights (N(0, 1/fan_in) matrices,
    so routing and activations have realistic spreads; biases small)."""
    import torch
    import transformers

    config_name, model_name, layer = MODELS[model]
    config = getattr(transformers, config_name)(**dict(layer, **overrides))
    torch.manual_seed(seed)
    with torch.no_grad():
        lm = getattr(transformers, model_name)(config).to(dtype).eval()
        for name, p in lm.named_parameters():
            if p.dim() >= 2:
                # transposed experts ([E, in, out]) have their fan-in on dim 1
                fan_in = p.shape[-2] if (p.dim() == 3 and getattr(_experts_of(lm, name), "is_transposed", False)) \
                    else p.shape[-1]
                p.normal_(0.0, fan_in ** -0.5)
            elif "bias" in name:
                p.normal_(0.0, 0.02)
    return lm


def _experts_of(model, param_name):
    module = model
    for part in param_name.split(".")[:-1]:
        module = getattr(module, part)
    return module


class _ExpertCounter:
    """Counts the distinct experts each call of every experts module routes to (a forward pre-hook)."""

    def __init__(self, model):
        self.touched = []
        self.handles = [m.register_forward_pre_hook(self._hook) for m in model.modules()
                        if type(m).__name__.endswith("Experts")]

    def _hook(self, module, args):
        if len(args) >= 2:
            self.touched.append(int(args[1].unique().numel()))

    def take(self):
        out, self.touched = self.touched, []
        return out

    def remove(self):
        for h in self.handles:
            h.remove()


def _weight_bytes(model, experts_touched):
    """Bytes one decode step reads: every parameter but the experts' (attention, router, norms, embedding
    rows are a few, the LM head), plus the touched experts' three projections."""
    cfg = model.config
    itemsize = next(model.parameters()).element_size()
    expert = 3 * cfg.hidden_size * cfg.intermediate_size * itemsize
    other = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                if ".experts." not in n and "embed_tokens" not in n)
    return other + sum(experts_touched) * expert


def _prefill_flops(cfg, T):
    d, f, E, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.num_experts_per_tok
    head_dim = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
    attention = 2 * T * d * (2 * q + 2 * kv) + 2 * 2 * T * T * q  # projections + scores and values
    experts = 2 * T * k * d * f * 3 + 2 * T * d * E
    return attention + experts + 2 * T * d * cfg.vocab_size


def _with_cache(model, ids, cache):
    """One forward with the KV cache; returns the cache. transformers 5.25 calls the argument and the
    output `cache`, earlier 5.x releases `past_key_values`."""
    import inspect

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(ids, use_cache=True, **({name: cache} if cache is not None else {}))
    return getattr(out, name)


def _ceiling(dtype, n, nbytes):
    # ceiling.measure knows fp32 and bf16; fp16 weights stream like bf16 ones, and its matmul rate is
    # measured as bf16's (a lower bound where the CPU has native fp16 FMAs)
    return ceiling.measure(dtype if dtype != "fp16" else "bf16", n, nbytes)


def run(dtype="bf16", prefill_tokens=512, batches=(1, 8), context=16, steps=16, repeats=3, impls=IMPLS,
        json_path=DEFAULT_JSON, png_path=DEFAULT_PNG, out=print, seed=0, ceiling_n=ceiling.COMPUTE_N,
        ceiling_bytes=ceiling.BANDWIDTH_BYTES, model="mixtral", **overrides):
    import torch
    import transformers

    import moe_ext
    import moe_ext.torch  # noqa: F401 - registers "moe_ext" in transformers' ExpertsInterface

    tdt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    threads = moe_ext.get_num_threads()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows, notes = [], []
    try:
        out(f"moe-ext bench --mode hf: {model} decoder layer {dict(MODELS[model][2], **overrides)}, {dtype}, {threads} threads, "
            f"isa {moe_ext.get_isa()}, torch {torch.__version__}, transformers {transformers.__version__}")
        ceilings = {"start": _ceiling(dtype, ceiling_n, ceiling_bytes)}
        model_name, model = model, build_model(tdt, seed, model, **overrides)
        counter = _ExpertCounter(model)
        cfg = model.config
        gen = torch.Generator().manual_seed(seed + 1)
        prompt = torch.randint(3, cfg.vocab_size, (1, prefill_tokens), generator=gen)
        ctx = {b: torch.randint(3, cfg.vocab_size, (b, context), generator=gen) for b in batches}
        nxt = {b: torch.randint(3, cfg.vocab_size, (b, steps), generator=gen) for b in batches}
        seconds = {(impl, phase): [] for impl in impls for phase in ["prefill"] + [f"decode-b{b}" for b in batches]}
        touched = {key: [] for key in seconds}
        logits = {}

        def prefill(impl):
            model.set_experts_implementation(impl)
            start = time.perf_counter()
            y = model(prompt, use_cache=False).logits
            seconds[(impl, "prefill")].append(time.perf_counter() - start)
            touched[(impl, "prefill")].extend(counter.take())
            logits.setdefault(impl, y.float())

        def decode(impl, b):
            model.set_experts_implementation(impl)
            cache = _with_cache(model, ctx[b], None)
            counter.take()
            for s in range(steps):
                start = time.perf_counter()
                cache = _with_cache(model, nxt[b][:, s:s + 1], cache)
                seconds[(impl, f"decode-b{b}")].append(time.perf_counter() - start)
                touched[(impl, f"decode-b{b}")].extend(counter.take())

        with torch.inference_mode():
            # Warm-up with the whole prompt: first calls pay for lazy setup (moe_ext's packed-weight cache is
            # filled by the first call with many rows an expert).
            for impl in impls:
                model.set_experts_implementation(impl)
                model(prompt, use_cache=False)
            counter.take()
            for r in range(repeats):
                order = list(impls[r % len(impls):]) + list(impls[:r % len(impls)])
                for impl in order:
                    time.sleep(harness.SETTLE_S)
                    prefill(impl)
                for b in batches:
                    for impl in order:
                        time.sleep(harness.SETTLE_S)
                        decode(impl, b)
        counter.remove()
        ceilings["end"] = _ceiling(dtype, ceiling_n, ceiling_bytes)
        compute = max((c["compute_gflop_per_s"] or 0) for c in ceilings.values()) or None
        bandwidth = max((c["bandwidth_gb_per_s"] or 0) for c in ceilings.values()) or None
        base = logits.get("eager")
        for (impl, phase), secs in seconds.items():
            ms = np.asarray(secs) * 1e3
            row = {"impl": impl, "phase": phase, "calls": len(secs),
                   **{f"p{q}_ms": float(np.percentile(ms, q)) for q in (50, 95, 99)}}
            p50 = row["p50_ms"] / 1e3
            if phase == "prefill":
                row["tokens_per_s"] = prefill_tokens / p50
                row["gflop_per_s"] = _prefill_flops(cfg, prefill_tokens) / p50 / 1e9
                row["fraction_of_ceiling"] = row["gflop_per_s"] / compute if compute else None
                if base is not None and impl in logits:
                    row["rel_err_vs_eager"] = float((logits[impl] - base).norm() / base.norm())
                    if row["rel_err_vs_eager"] > (1e-4 if dtype == "fp32" else 5e-2):
                        notes.append(f"{impl}: prefill logits differ from eager (rel err "
                                     f"{row['rel_err_vs_eager']:.2g}): its timings are not comparable")
            else:
                b = int(phase.split("-b")[1])
                row["tokens_per_s"] = b / p50
                per_step = [_weight_bytes(model, [t]) for t in touched[(impl, phase)]]
                row["bytes_per_step"] = float(np.median(per_step)) if per_step else None
                row["gb_per_s"] = row["bytes_per_step"] / p50 / 1e9 if per_step else None
                row["fraction_of_ceiling"] = row["gb_per_s"] / bandwidth if (bandwidth and per_step) else None
            rows.append(row)
        for row in rows:
            ours = next(r for r in rows if r["impl"] == "moe_ext" and r["phase"] == row["phase"]) \
                if "moe_ext" in impls else None
            row["moe_ext_speedup"] = row["p50_ms"] / ours["p50_ms"] if ours else None
    finally:
        torch.set_num_threads(previous)
    doc = {"schema": "moe_ext.bench.hf/1", "mode": "hf", "model": model_name, "dtype": dtype,
           "layer": dict(MODELS[model_name][2], **overrides),
           "prefill_tokens": prefill_tokens, "batches": list(batches), "context": context, "steps": steps,
           "repeats": repeats, "threads": threads, "info": moe_ext.info(), "ceilings": ceilings,
           "compute_ceiling_gflop_per_s": compute, "bandwidth_ceiling_gb_per_s": bandwidth,
           "rows": rows, "notes": notes, "definitions": {
               "moe_ext_speedup": "this row's p50 / moe_ext's p50 in the same phase (> 1: moe_ext faster)",
               "prefill": __doc__.split("Phases")[1].split("* decode")[0].strip(),
               "gb_per_s": "weights a decode step reads / p50: non-expert parameters (embedding excluded) "
                           "+ the touched experts' w1, w3, w2"}}
    out(table(doc))
    for note in notes:
        out(f"note: {note}")
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as fh:
            json.dump(doc, fh, indent=1)
            fh.write("\n")
        out(f"wrote {json_path}")
    if png_path:
        written = plot(doc, png_path)
        out(f"wrote {written}" if written else "note: matplotlib is not installed: no PNG")
    return doc


def table(doc):
    """A Markdown table of the run (the README's is this output)."""
    lines = [f"| phase | impl | p50 ms | p95 ms | p99 ms | tokens/s | GFLOP/s or GB/s | % of ceiling | "
             f"moe_ext x |", "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        rate = (f"{r['gflop_per_s']:.1f} GFLOP/s" if "gflop_per_s" in r
                else (f"{r['gb_per_s']:.1f} GB/s" if r.get("gb_per_s") else "-"))
        frac, speedup = r.get("fraction_of_ceiling"), r["moe_ext_speedup"]
        frac = "-" if frac is None else f"{100 * frac:.0f}%"
        speedup = "-" if speedup is None else f"{speedup:.2f}x"
        lines.append(f"| {r['phase']} | {r['impl']} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} | "
                     f"{r['tokens_per_s']:.1f} | {rate} | {frac} | {speedup} |")
    c, b = (harness._fmt(doc[key], ".1f") for key in ("compute_ceiling_gflop_per_s", "bandwidth_ceiling_gb_per_s"))
    lines.append(f"\nCeilings in this run ({doc['dtype']}): matmul {c} GFLOP/s, read bandwidth {b} GB/s. "
                 "moe_ext x: the row's p50 / moe_ext's p50.")
    return "\n".join(lines)


def plot(doc, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    phases = list(dict.fromkeys(r["phase"] for r in doc["rows"]))
    impls = list(dict.fromkeys(r["impl"] for r in doc["rows"]))
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        vals = [next(r["tokens_per_s"] for r in doc["rows"] if r["impl"] == impl and r["phase"] == p) for p in phases]
        ax.bar(np.arange(len(phases)) + i * width, vals, width, label=impl)
    ax.set_xticks(np.arange(len(phases)) + width * (len(impls) - 1) / 2, phases)
    ax.set_yscale("log")
    ax.set_ylabel("tokens/s (p50)")
    ax.set_title(f"transformers {doc['model']} layer, {doc['dtype']}, experts_implementation, {doc['threads']} threads")
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
