"""`moe-ext bench --mode train`: forward + backward of one MoE layer (SwiGLU, softmax top-k router,
renormalised) against PyTorch peers measured in the same run.

One step = y = layer(x); (y * dy).sum().backward() with gradients for x, w_router, w13, w2 (the router's
gradient flows through the top-k weights). Implementations:
* ``moe_ext``: moe_ext.torch.moe (our custom ops; backward on moe_ext's backward kernels);
* ``torch_eager``: the Hugging Face Mixtral block's loop over experts (transformers' modeling_mixtral),
  autograd through torch ops;
* ``torch_grouped_mm``: the same routing, copies sorted by expert, two torch._grouped_mm calls (where
  it runs, forward and backward, on this CPU in this dtype).
Every implementation starts from the same tensors; each one's gradients are compared with moe_ext's
(the `max_rel_err` column). Timings: warm-up, then `repeats` timed steps of each implementation, one of each
per round (the order rotated round by round); p50/p95/p99, tokens/s, and moe_ext's speed-up over each
peer (peer p50 / moe_ext p50) in the same run.
"""
import json
import os
import time

import numpy as np

from . import peers, workload

TRAIN_SHAPES = ("small", "medium")
IMPLS = ("moe_ext", "torch_eager", "torch_grouped_mm")


def _route(torch, x, w_router, k):
    F = torch.nn.functional
    probs = F.softmax(F.linear(x, w_router), dim=1, dtype=torch.float)
    weights, ids = torch.topk(probs, k, dim=-1)
    return (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype), ids


def _eager(torch, x, w_router, w13, w2, k):
    F = torch.nn.functional
    T, d = x.shape
    E, f = w2.shape[0], w2.shape[2]
    weights, ids = _route(torch, x, w_router, k)
    final = torch.zeros((T, d), dtype=x.dtype)
    with torch.no_grad():
        mask = F.one_hot(ids, num_classes=E).permute(2, 1, 0)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero().view(-1).tolist()
    for e in hit:
        slot, tok = torch.where(mask[e])
        gate, up = F.linear(x[tok], w13[e]).chunk(2, dim=-1)
        out = F.linear(F.silu(gate) * up, w2[e]) * weights[tok, slot, None]
        final = final.index_add(0, tok, out.to(x.dtype))
    return final


def _grouped_mm(torch, x, w_router, w13, w2, k):
    F = torch.nn.functional
    T, d = x.shape
    E, f = w2.shape[0], w2.shape[2]
    weights, ids = _route(torch, x, w_router, k)
    flat = ids.view(-1)
    order = torch.argsort(flat, stable=True)
    token = torch.div(order, k, rounding_mode="floor")
    offs = torch.cumsum(torch.bincount(flat, minlength=E), 0, dtype=torch.int32)
    h = torch._grouped_mm(x[token], w13.transpose(1, 2), offs=offs)
    a = F.silu(h[:, :f]) * h[:, f:]
    y_perm = torch._grouped_mm(a, w2.transpose(1, 2), offs=offs) * weights.view(-1)[order, None]
    return torch.zeros((T, d), dtype=x.dtype).index_add(0, token, y_perm)


def _moe_ext(torch, x, w_router, w13, w2, k):
    import moe_ext.torch as mt
    return mt.moe(x, w_router, w13, w2, k)


FORWARDS = {"moe_ext": _moe_ext, "torch_eager": _eager, "torch_grouped_mm": _grouped_mm}


def _step(torch, fn, tensors, dy, k):
    leaves = [t.detach().requires_grad_(True) for t in tensors]
    y = fn(torch, *leaves, k)
    grads = torch.autograd.grad((y * dy).sum(), leaves)
    return grads


def run(shapes=TRAIN_SHAPES, dtypes=("fp32", "bf16"), impls=IMPLS, warmup=1, repeats=5, json_path=None, out=print):
    import torch
    import moe_ext
    threads = moe_ext.get_num_threads()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    try:
        for name in shapes:
            s = workload.shape(name) if name in workload.SHAPES else workload.parse_spec(name)
            arrays = workload.make_inputs(s.T, s.d, s.f, s.E, s.k)
            for dtype in dtypes:
                tdt = peers.torch_dtype(dtype)
                tensors = [torch.from_numpy(a).to(tdt) for a in arrays]
                tensors[1] = tensors[1] * (1.0 / np.sqrt(s.d))  # spread routing, not saturated softmax
                dy = torch.randn(s.T, s.d, generator=torch.Generator().manual_seed(1)).to(tdt)
                base, timed = None, {}
                for impl in impls:
                    row = {"shape": s.name, "dtype": dtype, "impl": impl, "T": s.T, "d": s.d, "f": s.f,
                           "E": s.E, "k": s.k, "threads": threads}
                    rows.append(row)
                    if impl == "torch_grouped_mm" and peers.grouped_mm_probe(dtype):
                        row.update(status="unavailable", reason=peers.grouped_mm_probe(dtype))
                        continue
                    try:
                        grads = _step(torch, FORWARDS[impl], tensors, dy, s.k)
                        for _ in range(max(warmup - 1, 0)):
                            _step(torch, FORWARDS[impl], tensors, dy, s.k)
                    except Exception as e:  # noqa: BLE001 - a peer that cannot run here is reported
                        row.update(status="unavailable", reason=f"{type(e).__name__}: {str(e)[:200]}")
                        continue
                    if base is None and impl == "moe_ext":
                        base = grads
                    if base is not None:
                        row["max_rel_err"] = max(float((g.double() - b.double()).norm() / b.double().norm())
                                                 for g, b in zip(grads, base))
                    timed[impl] = (row, [])
                # The timed steps interleaved round by round, the order rotated each round, so load drift on
                # a shared machine falls on every implementation alike.
                order = list(timed)
                for i in range(repeats):
                    for impl in order[i % len(order):] + order[:i % len(order)]:
                        start = time.perf_counter()
                        _step(torch, FORWARDS[impl], tensors, dy, s.k)
                        timed[impl][1].append(time.perf_counter() - start)
                for row, seconds in timed.values():
                    ms = np.asarray(seconds) * 1e3
                    row.update(status="ok", **{f"p{q}_ms": float(np.percentile(ms, q)) for q in (50, 95, 99)})
                    row["tokens_per_s"] = s.T / (row["p50_ms"] / 1e3)
                ours = next((r for r in rows if r["shape"] == s.name and r["dtype"] == dtype
                             and r["impl"] == "moe_ext" and r["status"] == "ok"), None)
                for r in rows:
                    if ours and r["shape"] == s.name and r["dtype"] == dtype and r["status"] == "ok":
                        r["moe_ext_speedup"] = r["p50_ms"] / ours["p50_ms"]
    finally:
        torch.set_num_threads(previous)
    out(f"moe-ext bench --mode train: forward+backward of one MoE layer, {threads} threads, "
        f"isa {moe_ext.get_isa()}, torch {torch.__version__}")
    out(f"{'shape':8} {'dtype':5} {'impl':17} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} {'tok/s':>9} "
        f"{'moe_ext x':>9} {'rel err':>8}")
    for r in rows:
        if r["status"] != "ok":
            out(f"{r['shape']:8} {r['dtype']:5} {r['impl']:17} {r['status']}: {r['reason']}")
            continue
        out(f"{r['shape']:8} {r['dtype']:5} {r['impl']:17} {r['p50_ms']:9.2f} {r['p95_ms']:9.2f} "
            f"{r['p99_ms']:9.2f} {r['tokens_per_s']:9.0f} {r.get('moe_ext_speedup', float('nan')):9.2f} "
            f"{r.get('max_rel_err', float('nan')):8.1e}")
    doc = {"mode": "train", "rows": rows}
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as fh:
            json.dump(doc, fh, indent=1)
    return doc
