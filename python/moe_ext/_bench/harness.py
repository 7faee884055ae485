"""Time every implementation on every (shape, dtype) in one process; table, JSON and plots.

Per (shape, dtype): every implementation is prepared and makes its first call (the first warm-up; it
is timed, and a peer whose first call takes longer than the budget is skipped) and the rest of its
warm-up; then the `repeats` timed calls are interleaved: round r calls each implementation once, in an
order rotated by r. A shared machine's load drifts over seconds; interleaved, the drift falls on every
implementation alike instead of on whichever ran during a busy spell, so the ratios stay fair.
From the timed calls: p50/p95/p99 ms, tokens/s = T / p50, GFLOP/s = FLOPs (SPEC §6) / p50, for decode
shapes GB/s = weight bytes touched / p50, the fraction of this run's ceiling (bandwidth for decode,
compute otherwise; the ceilings are measured before the first and after the last implementation, the
best pass counts), and the ratios: on a peer's row, moe_ext_speedup = that row's p50 / moe_ext's p50
(> 1: moe_ext is faster); per (shape, dtype), ratio_vs_fastest_peer = the fastest MoE peer's p50 /
moe_ext's p50 (the dense equivalent is not an MoE and is reported separately as ratio_vs_dense).
"""
import contextlib
import datetime
import json
import os
import platform
import sys
import time

import numpy as np

from . import ceiling, peers, workload

DEFINITIONS = {
    "flops": "SPEC §6: 2*T*k*d*f*3 (SwiGLU) + 2*T*d*E (router); the dense row: 2*T*d*(k*f)*3",
    "bytes": "decode shapes only: (3*d*f * distinct experts moe_ext's float32 routing of x touched + E*d "
             "router) * itemsize; the dense row: 3*d*(k*f) * itemsize",
    "tokens_per_s": "T / p50",
    "fraction_of_ceiling": "GFLOP/s / compute ceiling, or for decode shapes GB/s / bandwidth ceiling, "
                           "in the row's dtype; each ceiling is the best of two passes of this run, "
                           "one before the first implementation and one after the last",
    "moe_ext_speedup": "this row's p50 / moe_ext's p50 in the same (shape, dtype): > 1 means moe_ext "
                       "is faster",
    "ratio_vs_fastest_peer": "fastest MoE peer's p50 / moe_ext's p50 (peers: reference, torch_eager, "
                             "torch_grouped_mm; dense excluded)",
    "ratio_vs_dense": "dense p50 / moe_ext p50",
    "user paths": "moe_ext_plain (moe_ext.moe on unpacked weights) and moe_ext_torch (torch.ops.moe_ext.moe on "
                  "torch tensors): moe_ext as users call it, not peers; on their rows ratio_vs_fastest_peer = "
                  "fastest MoE peer's p50 / the row's p50 and ratio_vs_packed = moe_ext's (prepacked) p50 / "
                  "the row's p50",
    "dense": peers.Dense.description + "; its weights are views of the first k experts' weights "
             "(the same bytes read as [2*k*f, d] and [d, k*f]; values do not change a dense FFN's time)",
    "reference": "moe_ext.reference.moe on float32 arrays: computes in float32 (fp32 only)",
    "rel_err": "||y - y_moe_ext_fp32|| / ||y_moe_ext_fp32|| of the first call's output (MoE rows)",
    "percentiles": "numpy.percentile (linear) over the timed calls",
    "weights": "expert weights above 4M elements are a random N(0, 1/fan_in) pool tiled over the array "
               "(values do not change timings); x and w_router are drawn in full",
}
BUDGET_S = 60.0
DEFAULT_JSON = os.path.join("bench", "results", "bench.json")
DEFAULT_PNG_DIR = os.path.join("bench", "results")
FP32_MISMATCH = 1e-3  # a float32 MoE row further than this from moe_ext gets a note
# A pause before each implementation: thread pools of the previous one (OpenBLAS, OpenMP) spin for a
# while after their last call and would steal the cores from the next one on a small machine.
SETTLE_S = 0.2


def _percentiles(seconds):
    ms = np.asarray(seconds) * 1e3
    return {f"p{q}_ms": float(np.percentile(ms, q)) for q in (50, 95, 99)}


def measure(fn, warmup=1, repeats=5, budget_s=None):
    """(status, first_call_s, seconds, output): the first call is timed (it is the first warm-up, or the
    first repeat if warmup is 0); a first call over budget_s gives status "skipped" and no repeats."""
    start = time.perf_counter()
    out = fn()
    first = time.perf_counter() - start
    if budget_s and first > budget_s:
        return "skipped", first, [], out
    seconds = [] if warmup > 0 else [first]
    for _ in range(max(warmup - 1, 0)):
        fn()
    while len(seconds) < repeats:
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return "ok", first, seconds, out


@contextlib.contextmanager
def _torch_settings(threads):
    """torch.set_num_threads(threads) and inference mode for the run; restored afterwards."""
    try:
        import torch
    except ImportError:
        yield None
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            yield torch
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _blas_threads(threads):
    """Limit NumPy's BLAS to `threads` if threadpoolctl is installed; yields what was done."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield "NumPy's BLAS default (threadpoolctl not installed)"
        return
    with threadpool_limits(limits=threads):
        yield threads


def _environment(torch):
    env = {"python": platform.python_version(), "numpy": np.__version__, "platform": platform.platform(),
           "machine": platform.machine(), "processor": _cpu_model(), "cpu_count": os.cpu_count(),
           "torch": getattr(torch, "__version__", None), "torch_threads": None}
    if torch is not None:
        env["torch_threads"] = torch.get_num_threads()
    for name in ("tqdm", "matplotlib"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = None
    return env


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _rel_err(got, want):
    got = peers.as_numpy(got).astype(np.float64)
    want = want.astype(np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), np.finfo(np.float64).tiny))


class _Progress:
    """A tqdm bar on stderr over the runs when tqdm is installed and stderr is a terminal; otherwise (and
    unless disabled) one line per finished run on stderr, so that long runs show life in logs too."""

    def __init__(self, total, enabled, out):
        self.total, self.done, self.enabled, self.bar = total, 0, enabled, None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, desc="bench", unit="run", dynamic_ncols=True,
                            disable=None)  # None: no bar when stderr is not a terminal

    @property
    def shown(self):
        return self.bar is not None and not self.bar.disable

    def status(self, text):
        if self.shown:
            self.bar.set_postfix_str(text, refresh=True)

    def step(self, row):
        self.done += 1
        if self.shown:
            self.bar.update(1)
        elif self.enabled:
            what = f"p50 {row['p50_ms']:.3f} ms" if row["status"] == "ok" else row["note"]
            print(f"[{self.done}/{self.total}] {row['shape']} {row['dtype']} {row['impl']}: {what}",
                  file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _fmt(value, spec, missing="-"):
    return missing if value is None else format(value, spec)


def header(width=10):
    return (f"{'shape':<{width}} {'dtype':<5} {'impl':<17} {'p50 ms':>10} {'p95 ms':>10} {'p99 ms':>10} "
          f"{'tokens/s':>11} {'GFLOP/s':>9} {'GB/s':>7} {'ceil %':>7} {'moe_ext x':>9}  note")


def format_row(r, width=10):
    ratio = r.get("ratio_vs_fastest_peer") if r["kind"] != "moe" and r["kind"] != "dense" \
        else r.get("moe_ext_speedup")
    note = r.get("note") or ""
    frac = r.get("fraction_of_ceiling")
    return (f"{r['shape']:<{width}} {r['dtype']:<5} {r['impl']:<17} {_fmt(r.get('p50_ms'), '10.3f'):>10} "
            f"{_fmt(r.get('p95_ms'), '10.3f'):>10} {_fmt(r.get('p99_ms'), '10.3f'):>10} "
            f"{_fmt(r.get('tokens_per_s'), '11.1f'):>11} {_fmt(r.get('gflop_per_s'), '9.2f'):>9} "
            f"{_fmt(r.get('gb_per_s'), '7.2f'):>7} {_fmt(None if frac is None else 100 * frac, '7.1f'):>7} "
            f"{_fmt(ratio, '8.2f') + ('x' if ratio is not None else ''):>9}  {note}").rstrip()


LEGEND = ("moe_ext x: on a peer's row, that row's p50 / moe_ext's p50 (> 1: moe_ext faster); on the rows of "
          "moe_ext and its user paths (moe_ext_plain, moe_ext_torch), the fastest MoE peer's p50 / the row's "
          "p50 (dense excluded). ceil %: of this run's compute "
          "ceiling, decode rows of its bandwidth ceiling. GB/s: expert weights touched (decode rows).")


def run(shapes=None, dtypes=("fp32",), impls=None, warmup=1, repeats=5, budget_s=BUDGET_S,
        json_path=DEFAULT_JSON, png_dir=DEFAULT_PNG_DIR, progress=True, out=None, ceiling_n=ceiling.COMPUTE_N,
        ceiling_bytes=ceiling.BANDWIDTH_BYTES, seed=0, argv=None):
    """Benchmark `shapes` (names, groups or workload.Shape; default the quick set) in `dtypes` for the
    implementations `impls` (names; default all). Prints the table to `out` (a text stream, default
    stdout), writes the JSON to json_path and the PNGs into png_dir (either falsy: not
    written). Returns the JSON document (a dict)."""
    import moe_ext

    out = sys.stdout if out is None else out
    shapes = _resolve_shapes(shapes or workload.QUICK)
    for dt in dtypes:
        if dt not in peers.DTYPES:
            raise ValueError(f"dtype: expected one of {peers.DTYPES}, got {dt!r}")
    dtypes = [dt for dt in peers.DTYPES if dt in dtypes]  # fp32 first: its moe_ext output is the baseline
    impl_names = list(dict.fromkeys(impls or peers.NAMES))
    for name in impl_names:
        if name not in peers.BY_NAME:
            raise ValueError(f"impl: expected one of {peers.NAMES}, got {name!r}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats >= 1 and warmup >= 0 expected, got {repeats}, {warmup}")
    threads = moe_ext.get_num_threads()
    notes = []
    doc = {"schema": "moe_ext.bench/1", "created": datetime.datetime.now().astimezone().isoformat(),
           "command": argv, "info": moe_ext.info(), "definitions": DEFINITIONS,
           "settings": {"shapes": [s._asdict() for s in shapes], "dtypes": dtypes, "impls": impl_names,
                        "warmup": warmup, "repeats": repeats, "budget_s": budget_s, "threads": threads,
                        "ceiling_matmul_n": ceiling_n, "ceiling_bandwidth_bytes": ceiling_bytes},
           "ceilings": {}, "results": [], "groups": [], "notes": notes, "files": {}}
    print(f"moe_ext {moe_ext.__version__}, isa {moe_ext.get_isa()}, {threads} threads; "
          f"warm-up {warmup}, {repeats} timed calls, budget {budget_s:g} s per call", file=out, flush=True)

    with _torch_settings(threads) as torch, _blas_threads(threads) as blas:
        doc["environment"] = _environment(torch)
        doc["environment"]["blas_threads"] = blas
        if torch is None:
            notes.append("torch is not installed: the torch peers (torch_eager, torch_grouped_mm, dense) "
                         "are skipped and the ceilings use NumPy only (pip install 'moe_ext[bench]')")
        else:
            notes.append(f"torch {torch.__version__}, {torch.get_num_threads()} threads, inference_mode")
        passes = {dt: [] for dt in dtypes}
        _measure_ceilings(passes, "start", ceiling_n, ceiling_bytes, out)

        bar = _Progress(len(shapes) * len(dtypes) * len(impl_names), progress, out)
        if progress and bar.bar is None:
            notes.append("tqdm is not installed: no progress bar")
        work = workload.Workload(seed)
        try:
            for shape in shapes:
                bar.status(f"{shape.name}: inputs")
                work.load(shape)
                touched = work.experts_touched() if shape.decode else None
                baseline = None
                for dt in dtypes:
                    bar.status(f"{shape.name} {dt}")
                    rows = _run_interleaved([peers.BY_NAME[n] for n in impl_names], work, shape, dt, touched,
                                            warmup, repeats, budget_s)
                    for row in rows:
                        name = row["impl"]
                        output = row.pop("_output", None)
                        if name == "moe_ext" and dt == "fp32" and output is not None:
                            baseline = output
                        if output is not None and peers.BY_NAME[name].kind in ("moe", "user_path"):
                            if baseline is None:
                                baseline = work_baseline(work)
                            row["rel_err"] = _rel_err(output, baseline)
                            if dt == "fp32" and row["rel_err"] > FP32_MISMATCH:
                                row["note"] = (row.get("note", "") + f" differs from moe_ext "
                                               f"(rel err {row['rel_err']:.2g})").strip()
                        del output
                        bar.step(row)
                    doc["groups"].append(_ratios(rows, shape, dt, touched))
                    doc["results"].extend(rows)
        finally:
            bar.close()
            work.release()
        # Measured again at the end: a busy machine can depress one pass; the ceiling is the best of both.
        _measure_ceilings(passes, "end", ceiling_n, ceiling_bytes, out)
    for dt in dtypes:
        doc["ceilings"][dt] = _combine(passes[dt])
    _fractions(doc["results"], doc["ceilings"])

    width = max([10] + [len(s.name) for s in shapes])
    print(header(width), file=out)
    for row in doc["results"]:
        print(format_row(row, width), file=out)
    print(LEGEND, file=out)
    for dt in dtypes:
        print(f"ceilings {dt} (best of the start and end passes): compute "
              f"{_ceiling_text(doc['ceilings'][dt], 'compute', 'GFLOP/s')}, bandwidth "
              f"{_ceiling_text(doc['ceilings'][dt], 'bandwidth', 'GB/s')}", file=out)
    for g in doc["groups"]:
        if g["ratio_vs_fastest_peer"] is not None:
            print(f"{g['shape']} {g['dtype']}: moe_ext {g['ratio_vs_fastest_peer']:.2f}x the fastest peer "
                  f"({g['fastest_peer']})", file=out)
        for name, u in g["user_paths"].items():
            print(f"{g['shape']} {g['dtype']}: {name} {_fmt(u['ratio_vs_fastest_peer'], '.2f')}x the fastest peer, "
                  f"{_fmt(u['ratio_vs_packed'], '.2f')}x moe_ext prepacked", file=out)
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        doc["files"]["json"] = json_path
    if png_dir:
        from . import plots

        written, note = plots.write(doc, png_dir)
        doc["files"]["png"] = written
        if note:
            notes.append(note)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
    for note in notes:
        print(f"note: {note}", file=out)
    for kind, path in doc["files"].items():
        for p in path if isinstance(path, list) else [path]:
            print(f"wrote {p}", file=out)
    return doc


def _measure_ceilings(passes, label, n, nbytes, out):
    for dt, got in passes.items():
        print(f"measuring the {dt} ceilings ({label} of the run: matmul {n}^3, {nbytes / 2**20:g} MiB reads, "
              f"copies and GEMVs)...", file=out, flush=True)
        c = ceiling.measure(dt, n, nbytes)
        c["pass"] = label
        got.append(c)
        print(f"  {dt}: compute {_ceiling_text(c, 'compute', 'GFLOP/s')}, "
              f"bandwidth {_ceiling_text(c, 'bandwidth', 'GB/s')}", file=out, flush=True)


def _combine(passes):
    """The best compute and the best bandwidth over the passes, with every pass kept."""
    out = {"passes": passes}
    for kind, key in (("compute", "compute_gflop_per_s"), ("bandwidth", "bandwidth_gb_per_s")):
        best = max((p for p in passes if p[key] is not None), key=lambda p: p[key], default=None)
        out[key] = best and best[key]
        out[kind + "_by"] = best and f"{best[kind + '_by']}, {best['pass']}"
    out["candidates"] = [dict(c, **{"pass": p["pass"]}) for p in passes for c in p["candidates"]]
    return out


def _fractions(rows, ceilings):
    """fraction_of_ceiling of every measured row: GB/s over the bandwidth ceiling for decode shapes,
    GFLOP/s over the compute ceiling otherwise, in the row's dtype."""
    for row in rows:
        if row["status"] != "ok":
            continue
        c = ceilings[row["dtype"]]
        if row["bound"] == "bandwidth":
            value, peak = row["gb_per_s"], c["bandwidth_gb_per_s"]
        else:
            value, peak = row["gflop_per_s"], c["compute_gflop_per_s"]
        row["fraction_of_ceiling"] = value / peak if peak else None
        if peak and value > peak:
            extra = "above this run's ceiling (a busy machine during both ceiling passes?)"
            row["note"] = f"{row['note']}; {extra}" if row["note"] else extra


def _ceiling_text(c, kind, unit):
    value = c[f"{kind}_gflop_per_s" if kind == "compute" else f"{kind}_gb_per_s"]
    if value is None:
        reasons = {cand["note"] for cand in c["candidates"]
                   if (cand["what"] == "compute") == (kind == "compute") and cand.get("note")}
        return "n/a (" + "; ".join(sorted(reasons)) + ")"
    return f"{value:.1f} {unit} ({c[kind + '_by']})"


def _resolve_shapes(items):
    """Names, group names and workload.Shape objects -> [Shape] (duplicates dropped, order kept)."""
    out = []
    for item in items:
        for s in [item] if isinstance(item, workload.Shape) else workload.expand([item]):
            if s.name not in [o.name for o in out]:
                out.append(s)
    return out


def work_baseline(work):
    """moe_ext's float32 output of the loaded shape, the cross-check's ground truth."""
    from .. import _api

    return _api.moe(work.x, work.w_router, work.w13, work.w2, work.shape.k)


def _run_interleaved(peer_list, work, shape, dtype, touched, warmup, repeats, budget_s):
    """The rows of every peer on one (shape, dtype): prepare and warm each up, then `repeats` rounds of
    one timed call per peer (order rotated each round). All prepared peers are alive together."""
    rows, fns = [], {}
    for peer in peer_list:
        time.sleep(SETTLE_S)
        row, fn = _start(peer, work, shape, dtype, warmup, budget_s)
        rows.append(row)
        if fn is not None:
            fns[peer.name] = fn
    live = [r for r in rows if r["impl"] in fns]
    for r in range(repeats):
        for row in live[r % len(live):] + live[:r % len(live)]:
            if row["status"] != "ok" or len(row["seconds"]) >= repeats:
                continue
            time.sleep(SETTLE_S)  # the previous peer's thread pools stop spinning
            try:
                start = time.perf_counter()
                fns[row["impl"]]()
                row["seconds"].append(time.perf_counter() - start)
            except Exception as e:  # noqa: BLE001 - a failing implementation is a row, not a crash
                row.update(status="error", note=f"error: {type(e).__name__}: {str(e)[:200]}", seconds=[])
                row.pop("_output", None)
    fns.clear()
    for row in live:
        if row["status"] == "ok":
            _finish(row, shape, dtype, touched)
    return rows


def _start(peer, work, shape, dtype, warmup, budget_s):
    """(row, fn): the row with its first call and warm-up done, and the callable to time (None when the
    peer is unavailable, failed or over budget: the row says which)."""
    T, d, f, E, k = shape.dims
    row = {"shape": shape.name, "T": T, "d": d, "f": f, "E": E, "k": k, "dtype": dtype, "impl": peer.name,
           "kind": peer.kind, "bound": "bandwidth" if shape.decode else "compute", "status": "ok",
           "note": "", "first_call_s": None, "seconds": []}
    try:
        fn = peer.prepare(work, dtype)
    except peers.Unavailable as e:
        row.update(status=e.status, note=str(e))
        return row, None
    try:
        status, first, seconds, output = measure(fn, warmup, 0, None if peer.name == "moe_ext" else budget_s)
    except Exception as e:  # noqa: BLE001 - a failing implementation is a row, not a crash
        row.update(status="error", note=f"error: {type(e).__name__}: {str(e)[:200]}")
        return row, None
    row["first_call_s"] = first
    if status == "skipped":
        row.update(status="skipped", note=f"skipped (budget): first call {first:.1f} s > {budget_s:g} s")
        return row, None
    row["seconds"] = seconds  # the first call, when there is no warm-up
    row["_output"] = output
    return row, fn


def _finish(row, shape, dtype, touched):
    """Percentiles, throughput and bytes of a row from its timed calls."""
    T, d, f, E, k = shape.dims
    row.update(_percentiles(row["seconds"]))
    p50 = row["p50_ms"] / 1e3
    itemsize = 4 if dtype == "fp32" else 2
    dense = row["kind"] == "dense"
    row["flop"] = workload.dense_flops(*shape.dims) if dense else workload.flops(*shape.dims)
    row["tokens_per_s"] = T / p50
    row["gflop_per_s"] = row["flop"] / p50 / 1e9
    if shape.decode:
        row["bytes"] = (workload.dense_bytes(d, f, k, itemsize) if dense
                        else workload.weight_bytes(d, f, E, touched, itemsize))
        row["gb_per_s"] = row["bytes"] / p50 / 1e9


def _ratios(rows, shape, dtype, touched):
    """Fill each row's moe_ext_speedup and return the (shape, dtype) summary."""
    ok = {r["impl"]: r for r in rows if r["status"] == "ok"}
    moe = ok.get("moe_ext")
    for r in rows:
        r["moe_ext_speedup"] = (r["p50_ms"] / moe["p50_ms"]) if (moe and r["impl"] in ok and
                                                                r["impl"] != "moe_ext") else None
    moe_peers = [r for name, r in ok.items() if name != "moe_ext" and r["kind"] == "moe"]
    fastest = min(moe_peers, key=lambda r: r["p50_ms"]) if moe_peers else None
    ratio = fastest["p50_ms"] / moe["p50_ms"] if (moe and fastest) else None
    dense = ok.get("dense")
    group = {"shape": shape.name, "dtype": dtype, "T": shape.T, "d": shape.d, "f": shape.f, "E": shape.E,
             "k": shape.k, "decode": shape.decode, "experts_touched": touched,
             "moe_ext_p50_ms": moe and moe["p50_ms"], "fastest_peer": fastest and fastest["impl"],
             "fastest_peer_p50_ms": fastest and fastest["p50_ms"], "ratio_vs_fastest_peer": ratio,
             "ratio_vs_dense": dense["p50_ms"] / moe["p50_ms"] if (moe and dense) else None}
    group["user_paths"] = {}
    for r in rows:
        if r["impl"] == "moe_ext":
            r["ratio_vs_fastest_peer"] = ratio
            r["fastest_peer"] = group["fastest_peer"]
            if ratio is not None and not r["note"]:
                r["note"] = f"vs {fastest['impl']}"
        elif r["kind"] == "user_path" and r["impl"] in ok:
            r["ratio_vs_fastest_peer"] = fastest["p50_ms"] / r["p50_ms"] if fastest else None
            r["ratio_vs_packed"] = moe["p50_ms"] / r["p50_ms"] if moe else None
            r["fastest_peer"] = group["fastest_peer"]
            group["user_paths"][r["impl"]] = {k: r[k] for k in ("p50_ms", "ratio_vs_fastest_peer", "ratio_vs_packed")}
            if fastest and not r["note"]:
                r["note"] = f"vs {fastest['impl']}"
    return group
