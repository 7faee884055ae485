"""Fair GPU benchmark of moe_ext's CUDA expert layer against what a GPU user would run instead.

    python bench/gpu.py [--quick] [--iters 20] [--json results.json] [--only mixtral,qwen3,...]
    python bench/gpu.py --dry-run [--json out.json]     # CPU, tiny shapes: checks this script's own logic

Without a CUDA device (or a moe_ext built without CUDA) it refuses with exit status 2, unless --dry-run.

Same work for every implementation: the SwiGLU expert layer over PRECOMPUTED routing (routing is EXCLUDED
for all), y[t] = sum_j topk_weights[t,j] * FFN_{topk_ids[t,j]}(x[t]), from the same x [T,d],
w13 [E,2f,d], w2 [E,d,f], topk_weights and topk_ids (from a softmax top-k over random logits, drawn once per
case). Each implementation does its own permutation and weighted combine:
  moe_ext            torch.ops.moe_ext.experts: the op users call (its id check reads one value back)
  moe_ext kernels    moe_ext.cuda.experts(check_ids=False): the kernels alone, no host synchronisation
  torch._grouped_mm  the same layer in PyTorch: stable argsort by expert, gather, torch._grouped_mm
                     (CUTLASS on Hopper), SiLU(gate) * up, torch._grouped_mm, weighted combine
  torch eager        transformers' Mixtral block: one_hot mask, loop over the experts hit (host syncs)
Ceilings measured in the same run: for each case one dense torch.mm with the same FLOPs
([T*k, d] @ [d, 3f]); an 8192^3 torch.mm per dtype; the device's read bandwidth (torch.sum over 4 GiB).
Reported per implementation: median (p50) and p95 ms over --iters CUDA-event timings after warm-up,
tokens/s, TFLOP/s (2*T*k*d*f*3: the experts' FLOPs; no router, as routing is excluded), % of the 790
TFLOP/s bf16 dense rate, GB/s (expert weights actually touched + x + y) and % of the measured read
bandwidth, and speed relative to the fastest peer (not moe_ext) and to torch._grouped_mm (>1: faster).
Decode cases (T <= 64) are also timed as CUDA-graph replays (launch overhead dominates at T = 1).

Cross-check: every output is compared, per row (max |got - ref| / max |ref| and isfinite everywhere),
with a float32 reference (the expert loop on weights upcast one expert at a time). An implementation
beyond its dtype's tolerance is marked FAIL and not counted as a peer; a failing moe_ext makes the script
exit 1 (after writing its results): a fast wrong kernel fails the benchmark.
Training (--only training): forward + backward of the layer (bf16, Mixtral, T = 4096), moe_ext.torch.experts
vs the torch._grouped_mm layer under autograd; gradients cross-checked against each other.
"""
import argparse
import datetime
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

DENSE_BF16_TFLOPS = 790.0  # H100/H200 bf16 dense rate on random data, measured by this workplace (KINDS.md)
DTYPE_NAMES = ("bf16", "fp16", "fp32")
# per-row max relative error of an implementation against the float32 reference: the bf16/fp16 layers round
# h, the activation and the expert outputs to the dtype (a few unit roundoffs: 3.9e-3 / 4.9e-4 each)
CHECK_RTOL = {"bf16": 5e-2, "fp16": 8e-3, "fp32": 1e-4}
GRAPH_MAX_T = 64


@dataclass
class Case:
    model: str
    T: int
    d: int
    f: int
    E: int
    k: int
    dtype: str = "bf16"
    training: bool = False
    tags: list = field(default_factory=list)

    @property
    def name(self):
        return f"{self.model} T={self.T} {self.dtype}" + (" fwd+bwd" if self.training else "")

    @property
    def decode(self):
        return self.T <= GRAPH_MAX_T and not self.training


MODELS = {  # name: (d, f, E, k, token counts)
    "mixtral": (4096, 14336, 8, 2, (1, 16, 128, 1024, 8192)),
    "qwen3": (2048, 768, 128, 8, (1, 64, 4096)),
    "deepseek-v3": (7168, 2048, 256, 8, (1, 4096)),
}


def build_cases(quick=False, dry_run=False, only=None):
    """The issue's shapes: bf16 everywhere, fp16 and fp32 on Mixtral prefill (T = 1024), training on
    Mixtral T = 4096. --quick: one decode and one prefill shape per model. --dry-run: the same list with
    d, f and T scaled down to what a CPU does in seconds."""
    cases = []
    for model, (d, f, E, k, counts) in MODELS.items():
        if quick:
            counts = (counts[0], counts[-2] if len(counts) > 2 else counts[-1])
        cases += [Case(model, T, d, f, E, k) for T in counts]
    cases += [Case("mixtral", 1024, 4096, 14336, 8, 2, dtype) for dtype in ("fp16", "fp32")]
    cases.append(Case("mixtral", 4096, 4096, 14336, 8, 2, training=True, tags=["training"]))
    if only:
        wanted = set(only)
        cases = [c for c in cases if c.model in wanted or c.dtype in wanted or wanted & set(c.tags)]
    if dry_run:
        scaled = {}
        for c in cases:
            small = Case(c.model, min(c.T, 48), max(16, c.d // 64), max(16, c.f // 64), c.E, c.k, c.dtype, c.training,
                         c.tags)
            scaled.setdefault(small.name, small)
        cases = list(scaled.values())
    return cases


def flops(case):
    """FLOPs of the expert layer (routing excluded): three GEMMs of [T*k, d] x [d, f] shape, 2 FLOPs per MAC;
    training: the forward plus dA and dW of each GEMM (3x)."""
    forward = 2 * case.T * case.k * case.d * case.f * 3
    return 3 * forward if case.training else forward


def bytes_moved(case, experts_touched, element_size):
    """The fewest bytes the layer must move: each touched expert's w13 and w2 once, x read, y written."""
    return experts_touched * 3 * case.f * case.d * element_size + 2 * case.T * case.d * element_size


# ------------------------------------------------------------------------------------------ implementations
def eager_loop(torch, x, w13, w2, weights, ids):
    """transformers' Mixtral sparse block: a mask per expert, a loop over the experts hit."""
    T, d = x.shape
    E, f = w13.shape[0], w2.shape[2]
    out = torch.zeros_like(x)
    mask = torch.nn.functional.one_hot(ids.long(), E).permute(2, 1, 0)  # [E, k, T]
    for e in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist():
        slot, token = torch.where(mask[e])
        gate, up = torch.nn.functional.linear(x[token], w13[e]).chunk(2, dim=-1)
        h = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, w2[e])
        out.index_add_(0, token, (h * weights[token, slot, None]).to(x.dtype))
    return out


def reference_layer(torch, x, w13, w2, weights, ids):
    """float32 reference: the expert loop on x and weights upcast one expert at a time (memory stays small)."""
    T, k = ids.shape
    f = w2.shape[2]
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    xf, y, start = x.float(), torch.zeros(x.shape, dtype=torch.float32, device=x.device), 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        copies = order[start:start + n]
        start += n
        token, slot = copies // k, copies % k
        h = xf[token] @ w13[e].float().T
        out = (torch.nn.functional.silu(h[:, :f]) * h[:, f:]) @ w2[e].float().T
        y.index_add_(0, token, out * weights[token, slot, None].float())
    return y


def grouped_mm_layer(torch, x, w13, w2, weights, ids):
    """The layer in PyTorch over torch._grouped_mm; no host synchronisation (capturable)."""
    T, k = ids.shape
    E, f, d = w13.shape[0], w2.shape[2], x.shape[1]
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(E, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    offs = counts.cumsum(0).to(torch.int32)
    h = torch._grouped_mm(x[order // k], w13.transpose(1, 2), offs=offs)
    y_sorted = torch._grouped_mm(torch.nn.functional.silu(h[:, :f]) * h[:, f:], w2.transpose(1, 2), offs=offs)
    y_copies = torch.empty_like(y_sorted).index_copy(0, order, y_sorted)
    return (y_copies.view(T, k, d).float() * weights[..., None]).sum(1).to(x.dtype)


def implementations(torch, gpu):
    """name -> fn(x, w13, w2, weights, ids); moe_ext first."""
    import moe_ext.torch  # noqa: F401  (registers torch.ops.moe_ext)
    impls = {"moe_ext": lambda x, w13, w2, w, i: torch.ops.moe_ext.experts(x, w13, w2, w, i, "swiglu", None)}
    if gpu:
        from moe_ext import cuda
        impls["moe_ext kernels"] = lambda x, w13, w2, w, i: cuda.experts(x, w13, w2, w, i, check_ids=False)
    if hasattr(torch, "_grouped_mm"):
        impls["torch._grouped_mm"] = lambda x, w13, w2, w, i: grouped_mm_layer(torch, x, w13, w2, w, i)
    impls["torch eager"] = lambda x, w13, w2, w, i: eager_loop(torch, x, w13, w2, w, i)
    return impls


def is_moe_ext(name):
    return name.startswith("moe_ext")


# ------------------------------------------------------------------------------------------ checks, timing
def row_errors(torch, got, want):
    """Per-row max |got - want| / max |want| (inf where got is not finite), as a float64 CPU tensor."""
    got, want = got.detach().double(), want.detach().double()
    scale = want.abs().amax(dim=1).clamp_min(1e-300)
    err = (got - want).abs().amax(dim=1) / scale
    err[~torch.isfinite(got).all(dim=1)] = math.inf
    return err.cpu()


def cross_check(torch, outputs, reference, dtype):
    """name -> {"max_row_error", "worst_row", "finite", "ok"} against the reference."""
    checks = {}
    for name, out in outputs.items():
        if isinstance(out, Exception):
            checks[name] = {"ok": False, "error": f"{type(out).__name__}: {out}"}
            continue
        if tuple(out.shape) != tuple(reference.shape):
            checks[name] = {"ok": False, "error": f"shape {tuple(out.shape)}, expected {tuple(reference.shape)}"}
            continue
        err = row_errors(torch, out, reference)
        worst = float(err.max()) if err.numel() else 0.0
        finite = bool(torch.isfinite(out).all())
        checks[name] = {"max_row_error": worst, "worst_row": int(err.argmax()) if err.numel() else -1,
                        "finite": finite, "ok": finite and worst <= CHECK_RTOL[dtype]}
    return checks


class Timer:
    """Milliseconds per call: CUDA events around each call on the GPU, perf_counter on the CPU (dry run)."""

    def __init__(self, torch, gpu, iters, warmup=3):
        self.torch, self.gpu, self.iters, self.warmup = torch, gpu, iters, warmup

    def __call__(self, fn):
        for _ in range(self.warmup):
            fn()
        times = []
        if not self.gpu:
            for _ in range(self.iters):
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)
            return times
        torch = self.torch
        torch.cuda.synchronize()
        for _ in range(self.iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return times

    def graph(self, fn):
        """Times replays of fn captured in a CUDA graph (warm-up on a side stream first, as torch asks)."""
        torch = self.torch
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        return self(graph.replay), graph, out


def summary_stats(times):
    ordered = sorted(times)
    p95 = ordered[min(len(ordered) - 1, int(math.ceil(0.95 * len(ordered))) - 1)]
    return {"median_ms": statistics.median(ordered), "p95_ms": p95, "min_ms": ordered[0], "iters": len(ordered)}


# ------------------------------------------------------------------------------------------ one case
def make_inputs(torch, case, device, seed=0):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[case.dtype]
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale):  # drawn in the dtype itself: no float32 copy of DeepSeek-V3's 22 GB of weights
        return torch.randn(*shape, generator=g, device=device, dtype=dtype).mul_(scale)

    x = randn(case.T, case.d, scale=1.0)
    w13 = randn(case.E, 2 * case.f, case.d, scale=case.d ** -0.5)
    w2 = randn(case.E, case.d, case.f, scale=case.f ** -0.5)
    logits = torch.randn(case.T, case.E, generator=g, device=device)
    weights, ids = torch.softmax(logits, dim=-1).topk(case.k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    return x, w13, w2, weights.float().contiguous(), ids.to(torch.int32).contiguous()


def rate_fields(case, ms, nbytes, ceilings):
    tflops = flops(case) / (ms * 1e-3) / 1e12
    gbs = nbytes / (ms * 1e-3) / 1e9
    fields = {"tokens_per_s": case.T / (ms * 1e-3), "tflops": tflops, "pct_of_790": 100 * tflops / DENSE_BF16_TFLOPS,
              "gbs": gbs}
    if ceilings.get("read_gbs"):
        fields["pct_of_read_bw"] = 100 * gbs / ceilings["read_gbs"]
    return fields


def run_case(torch, case, impls, timer, gpu, ceilings):
    """Rows (one per implementation) for one case: outputs cross-checked, then timed."""
    device = "cuda" if gpu else "cpu"
    x, w13, w2, weights, ids = make_inputs(torch, case, device)
    outputs = {}
    for name, fn in impls.items():
        try:
            outputs[name] = fn(x, w13, w2, weights, ids)
        except Exception as error:  # noqa: BLE001  (a peer this torch/GPU cannot run is reported, not fatal)
            outputs[name] = error
    checks = cross_check(torch, outputs, reference_layer(torch, x, w13, w2, weights, ids), case.dtype)
    del outputs
    touched = int(torch.unique(ids).numel())
    nbytes = bytes_moved(case, touched, x.element_size())
    rows = []
    for name, fn in impls.items():
        row = {"case": case.name, **asdict(case), "impl": name, "experts_touched": touched, "flops": flops(case),
               "bytes": nbytes, "check": checks[name]}
        if checks[name]["ok"]:
            stats = summary_stats(timer(lambda: fn(x, w13, w2, weights, ids)))
            row.update(stats, **rate_fields(case, stats["median_ms"], nbytes, ceilings))
            if gpu and case.decode and name == "torch eager":
                row["graph"] = {"skipped": "a host synchronisation per expert: not capturable"}
            elif gpu and case.decode:
                try:
                    times, _, out = timer.graph(lambda: fn(x, w13, w2, weights, ids))
                    row["graph"] = summary_stats(times)
                    row["graph"].update(rate_fields(case, row["graph"]["median_ms"], nbytes, ceilings))
                except Exception as error:  # noqa: BLE001  (e.g. the eager loop syncs: not capturable)
                    row["graph"] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
        rows.append(row)
    rows.append(dense_row(torch, case, timer, device, x.dtype, nbytes, ceilings))
    add_relative_speed(rows)
    return rows


def dense_row(torch, case, timer, device, dtype, nbytes, ceilings):
    """One dense torch.mm with the layer's FLOPs: [T*k, d] @ [d, 3f]."""
    a = torch.randn(case.T * case.k, case.d, device=device).to(dtype)
    b = torch.randn(case.d, 3 * case.f, device=device).to(dtype)
    stats = summary_stats(timer(lambda: torch.mm(a, b)))
    row = {"case": case.name, **asdict(case), "impl": "dense torch.mm (ceiling)", "flops": flops(case) // (
        3 if case.training else 1), "bytes": nbytes, "check": {"ok": True, "note": "not the layer: a ceiling"}}
    row.update(stats, **rate_fields(Case(case.model, case.T, case.d, case.f, case.E, case.k, case.dtype),
                                    stats["median_ms"], nbytes, ceilings))
    return row


def add_relative_speed(rows):
    """speed_vs_fastest_peer = fastest working peer's median / this median (> 1: faster than every peer);
    speed_vs_grouped_mm likewise against torch._grouped_mm. Peers: the implementations that are not moe_ext
    and passed the cross-check; the dense ceiling is not a peer."""
    timed = {r["impl"]: r for r in rows if "median_ms" in r}
    peers = [r["median_ms"] for name, r in timed.items() if not is_moe_ext(name) and "ceiling" not in name]
    grouped = timed.get("torch._grouped_mm")
    for r in timed.values():
        if peers:
            r["speed_vs_fastest_peer"] = min(peers) / r["median_ms"]
        if grouped:
            r["speed_vs_grouped_mm"] = grouped["median_ms"] / r["median_ms"]


# ------------------------------------------------------------------------------------------ training
def run_training_case(torch, case, timer, gpu, ceilings):
    from moe_ext import torch as mt
    device = "cuda" if gpu else "cpu"
    x, w13, w2, weights, ids = make_inputs(torch, case, device)
    grad_y = torch.randn(x.shape, device=device).to(x.dtype)
    impls = {"moe_ext": lambda a, b, c: mt.experts(a, b, c, weights, ids)}
    if hasattr(torch, "_grouped_mm"):
        impls["torch._grouped_mm"] = lambda a, b, c: grouped_mm_layer(torch, a, b, c, weights, ids)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w13, w2)]

    def step(fn):
        for t in leaves:
            t.grad = None
        fn(*leaves).backward(grad_y)
        return [t.grad for t in leaves]

    grads, rows = {}, []
    for name, fn in impls.items():
        try:
            grads[name] = [g.clone() for g in step(fn)]
        except Exception as error:  # noqa: BLE001
            grads[name] = error
    base = next((g for g in grads.values() if not isinstance(g, Exception)), None)
    nbytes = bytes_moved(case, int(torch.unique(ids).numel()), x.element_size())
    for name, fn in impls.items():
        g = grads[name]
        if isinstance(g, Exception):
            check = {"ok": False, "error": f"{type(g).__name__}: {g}"}
        else:  # gradients against each other (the first implementation's): dx, dw13 (rows), dw2 (rows)
            errors = [float(row_errors(torch, a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])).max())
                      for a, b in zip(g, base)]
            finite = all(bool(torch.isfinite(a).all()) for a in g)
            check = {"grad_max_row_error_vs_moe_ext": errors, "finite": finite,
                     "ok": finite and max(errors) <= 2 * CHECK_RTOL[case.dtype]}
        row = {"case": case.name, **asdict(case), "impl": name, "flops": flops(case), "bytes": nbytes, "check": check}
        if check["ok"]:
            stats = summary_stats(timer(lambda: step(fn)))
            row.update(stats, **rate_fields(case, stats["median_ms"], nbytes, ceilings))
        rows.append(row)
    add_relative_speed(rows)
    return rows


# ------------------------------------------------------------------------------------------ ceilings, output
def measure_ceilings(torch, timer, gpu, dtypes):
    if not gpu:
        return {"mm_tflops": {}, "read_gbs": None, "note": "dry run: no ceilings"}
    out = {"mm_tflops": {}}
    for name in dtypes:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
        a, b = torch.randn(8192, 8192, device="cuda").to(dtype), torch.randn(8192, 8192, device="cuda").to(dtype)
        ms = statistics.median(timer(lambda: torch.mm(a, b)))
        out["mm_tflops"][name] = 2 * 8192**3 / (ms * 1e-3) / 1e12
        del a, b
    big = torch.randn(1 << 30, device="cuda")  # 4 GiB of float32, far past the L2
    ms = statistics.median(timer(lambda: big.sum()))
    out["read_gbs"] = big.numel() * 4 / (ms * 1e-3) / 1e9
    del big
    return out


def fmt(value, spec):
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def format_table(rows):
    header = (f"{'case':<28} {'impl':<26} {'check':>11} {'p50 ms':>9} {'TFLOP/s':>8} {'%790':>5} {'GB/s':>7} "
              f"{'%read':>6} {'vs peer':>7} {'vs gmm':>7} {'graph ms':>9} {'g %read':>7}")
    lines = [header, "-" * len(header)]
    for r in rows:
        check = r["check"]
        status = "ok" if check.get("ok") else "FAIL"
        if "max_row_error" in check:
            status = f"{check['max_row_error']:.1e} {status if status == 'FAIL' else ''}".strip()
        graph = r.get("graph", {})
        lines.append(f"{r['case']:<28} {r['impl']:<26} {status:>11} {fmt(r.get('median_ms'), '9.3f')} "
                     f"{fmt(r.get('tflops'), '8.1f')} {fmt(r.get('pct_of_790'), '5.1f')} {fmt(r.get('gbs'), '7.0f')} "
                     f"{fmt(r.get('pct_of_read_bw'), '6.1f')} {fmt(r.get('speed_vs_fastest_peer'), '7.2f')} "
                     f"{fmt(r.get('speed_vs_grouped_mm'), '7.2f')} {fmt(graph.get('median_ms'), '9.3f')} "
                     f"{fmt(graph.get('pct_of_read_bw'), '7.1f')}")
    return "\n".join(lines)


def failures(rows):
    """(moe_ext rows that failed their cross-check, peer rows that did)."""
    bad = [r for r in rows if not r["check"].get("ok")]
    return [r for r in bad if is_moe_ext(r["impl"])], [r for r in bad if not is_moe_ext(r["impl"])]


def write_json(path, meta, rows):
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)


def device_meta(torch, gpu, dry_run):
    import moe_ext
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "moe_ext": moe_ext.info().get("cuda"), "dry_run": dry_run,
            "routing": "excluded for every implementation (precomputed topk_weights / topk_ids)",
            "dense_bf16_nominal_tflops": DENSE_BF16_TFLOPS, "check_rtol": CHECK_RTOL}
    if gpu:
        props = torch.cuda.get_device_properties(0)
        meta.update(device=torch.cuda.get_device_name(0), sm_count=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1),
                    capability=list(torch.cuda.get_device_capability(0)))
    else:
        meta["device"] = "cpu (dry run: timings are not GPU figures)"
    return meta


def main(argv=None, impl_overrides=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and iterations")
    parser.add_argument("--dry-run", action="store_true", help="CPU tensors, tiny shapes: this script's logic only")
    parser.add_argument("--only", default=None, help="comma-separated models, dtypes or 'training'")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("bench/gpu.py: needs torch", file=sys.stderr)
        return 2
    gpu = not args.dry_run
    if gpu:
        from moe_ext import cuda
        if not torch.cuda.is_available() or cuda.device_count() == 0:
            print("bench/gpu.py: no CUDA device (torch.cuda.is_available() = "
                  f"{torch.cuda.is_available()}, moe_ext CUDA devices = {cuda.device_count()}, moe_ext._cuda "
                  f"{'built' if cuda._cuda is not None else 'not built'}); refusing to run (--dry-run checks the "
                  "script's logic on the CPU)", file=sys.stderr)
            return 2
    iters = args.iters or (5 if args.quick or args.dry_run else 20)
    timer = Timer(torch, gpu, iters, warmup=1 if args.dry_run else 3)
    cases = build_cases(args.quick, args.dry_run, args.only.split(",") if args.only else None)
    meta = device_meta(torch, gpu, args.dry_run)
    meta["ceilings"] = ceilings = measure_ceilings(torch, timer, gpu, sorted({c.dtype for c in cases}))
    print(f"device: {meta['device']}; routing excluded for all; ceilings: {ceilings}", flush=True)
    impls = implementations(torch, gpu)
    impls.update(impl_overrides or {})
    rows = []
    for case in cases:
        started = time.perf_counter()
        try:
            new = (run_training_case(torch, case, timer, gpu, ceilings) if case.training
                   else run_case(torch, case, impls, timer, gpu, ceilings))
        except Exception as error:  # noqa: BLE001  (e.g. out of memory: recorded, the other cases still run)
            new = [{"case": case.name, **asdict(case), "impl": "moe_ext", "flops": flops(case), "bytes": 0,
                    "check": {"ok": False, "error": f"{type(error).__name__}: {str(error)[:300]}"}}]
        rows += new
        print(format_table(new).split("\n", 2)[-1], f"  [{time.perf_counter() - started:.1f} s]", flush=True)
        if args.json:  # after every case: a run stopped by a timeout still leaves the cases it finished
            write_json(args.json, meta, rows)
        if gpu:
            torch.cuda.empty_cache()
    print("\n" + format_table(rows))
    if args.json:
        write_json(args.json, meta, rows)
        print(f"results: {args.json}")
    ours, peers = failures(rows)
    for r in peers:
        print(f"peer failed its cross-check (not counted): {r['case']} {r['impl']}: {r['check']}")
    for r in ours:
        print(f"FAIL: {r['case']} {r['impl']}: {r['check']}", file=sys.stderr)
    return 1 if ours else 0


if __name__ == "__main__":
    sys.exit(main())
