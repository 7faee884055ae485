"""llama.cpp's MoE FFN (ggml) against moe_ext's quantised experts, same weights' bytes, same run, same threads.

Builds ggml (llama.cpp's tensor library) from a source tree given on the command line, in a build
directory given on the command line (never inside this repo), plus a small harness library (its C source
is below) that runs the MoE FFN the way llama.cpp's graph builder does (build_moe_ffn): three
ggml_mul_mat_id (gate, up, down) with the routing given, ggml_swiglu_split, the weights multiplied in and
the k expert outputs summed. Weights are random blocks of q8_0, q4_0 or q4_K (the format's fp16 scales
set to a finite value; the time does not depend on the values), in a plain CPU buffer or in ggml's
CPU_REPACK buffer (its interleaved layouts, q4_0x8 / q4_Kx8 on AVX2); ggml quantises the activations
itself (q8_0 / q8_K), as in llama.cpp.

moe_ext runs the same blocks: q8_0 and q4_0 imported with moe_ext.gguf.from_gguf (int8 g32 / int4 g32,
no requantisation), weight-only (W8A16 / W4A16) and with int8 activations (W8A8 / W4A8); against q4_K,
moe_ext's int4 g128 with zero points (4.28 bits a weight; q4_K has 4.5). The calls of all implementations
are interleaved round by round, so load drift on a shared machine falls on all alike; the figure is the
median per implementation and the ratio ggml time / moe_ext time (> 1: moe_ext is faster).

Check (--check, small shape): ggml's output on the same q8_0 / q4_0 blocks against moe_ext's weight-only
output, relative error printed and required below 5% (ggml quantises activations to 8 bits per block of
32; a wrong layout or routing gives O(100%)).

    python bench/llama_cpp.py --source /path/to/llama.cpp --build /tmp/ggml-build [--shape mixtral]
        [--tokens 1,4,16] [--types q8_0,q4_0,q4_K] [--threads 2] [--rounds 7] [--check]
--source may be a llama.cpp checkout (its ggml/ is used) or a ggml checkout.
"""
import argparse
import ctypes
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

import moe_ext
from moe_ext.gguf import from_gguf

SHAPES = {"mixtral": (4096, 14336, 8, 2), "fine": (2048, 768, 128, 8), "tiny": (256, 128, 4, 2)}
# ggml_type ids, block sizes (values, bytes) and where the fp16 scales sit in a block
TYPES = {"q8_0": (8, 32, 34, (0,)), "q4_0": (2, 32, 18, (0,)), "q4_K": (12, 256, 144, (0, 2))}

HARNESS = r"""
#include <stdlib.h>
#include <string.h>
#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"

typedef struct {
  ggml_backend_t backend;
  struct ggml_context *wctx, *gctx;
  ggml_backend_buffer_t wbuf;
  ggml_gallocr_t galloc;
  struct ggml_tensor *gate, *up, *down, *x, *ids, *w, *out;
  struct ggml_cgraph *graph;
  int d, f, E, k, T;
} moe_ffn;

static ggml_backend_buffer_type_t repack_buft(void) {
  ggml_backend_reg_t reg = ggml_backend_cpu_reg();
  ggml_backend_dev_t dev = ggml_backend_reg_dev_get(reg, 0);
  ggml_backend_dev_get_extra_bufts_t get =
      (ggml_backend_dev_get_extra_bufts_t)ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts");
  if (!get) return NULL;
  for (ggml_backend_buffer_type_t *b = get(dev); b && *b; ++b)
    if (strcmp(ggml_backend_buft_name(*b), "CPU_REPACK") == 0) return *b;
  return NULL;
}

/* weights: gate/up [E][f][d], down [E][d][f] in blocks of `type` along the last axis. repack: 1 for the
   CPU_REPACK buffer. Returns NULL on failure. */
moe_ffn *moe_ffn_new(int type, int d, int f, int E, int k, const void *gate, const void *up, const void *down,
                     int repack, int threads) {
  moe_ffn *m = calloc(1, sizeof(moe_ffn));
  m->d = d, m->f = f, m->E = E, m->k = k;
  m->backend = ggml_backend_cpu_init();
  ggml_backend_cpu_set_n_threads(m->backend, threads);
  struct ggml_init_params p = {3 * ggml_tensor_overhead(), NULL, true};
  m->wctx = ggml_init(p);
  m->gate = ggml_new_tensor_3d(m->wctx, (enum ggml_type)type, d, f, E);
  m->up = ggml_new_tensor_3d(m->wctx, (enum ggml_type)type, d, f, E);
  m->down = ggml_new_tensor_3d(m->wctx, (enum ggml_type)type, f, d, E);
  ggml_backend_buffer_type_t buft = repack ? repack_buft() : ggml_backend_cpu_buffer_type();
  if (!buft) return NULL;
  m->wbuf = ggml_backend_alloc_ctx_tensors_from_buft(m->wctx, buft);
  if (!m->wbuf) return NULL;
  /* the repack buffer gives a tensor traits (extra) only for types it has an interleaved layout for on
     this CPU; setting data without one would crash */
  if (repack && (!m->gate->extra || !m->down->extra)) return NULL;
  ggml_backend_tensor_set(m->gate, gate, 0, ggml_nbytes(m->gate));
  ggml_backend_tensor_set(m->up, up, 0, ggml_nbytes(m->up));
  ggml_backend_tensor_set(m->down, down, 0, ggml_nbytes(m->down));
  return m;
}

/* 1 when the weights were given a repacked layout (the buffer's tensor traits), else 0 */
int moe_ffn_repacked(moe_ffn *m) { return m->gate->extra != NULL; }

/* the graph for T tokens, as llama.cpp's build_moe_ffn: up, gate, swiglu, down, weights, sum over k */
int moe_ffn_plan(moe_ffn *m, int T) {
  if (m->gctx) { ggml_gallocr_free(m->galloc); ggml_free(m->gctx); }
  m->T = T;
  struct ggml_init_params p = {64 * ggml_tensor_overhead() + ggml_graph_overhead(), NULL, true};
  m->gctx = ggml_init(p);
  struct ggml_context *c = m->gctx;
  m->x = ggml_new_tensor_3d(c, GGML_TYPE_F32, m->d, 1, T);
  m->ids = ggml_new_tensor_2d(c, GGML_TYPE_I32, m->k, T);
  m->w = ggml_new_tensor_3d(c, GGML_TYPE_F32, 1, m->k, T);
  struct ggml_tensor *up = ggml_mul_mat_id(c, m->up, m->x, m->ids);      /* [f, k, T] */
  struct ggml_tensor *gate = ggml_mul_mat_id(c, m->gate, m->x, m->ids);  /* [f, k, T] */
  struct ggml_tensor *act = ggml_swiglu_split(c, gate, up);              /* silu(gate) * up */
  struct ggml_tensor *y = ggml_mul_mat_id(c, m->down, act, m->ids);      /* [d, k, T] */
  y = ggml_mul(c, y, m->w);
  struct ggml_tensor *sum = ggml_view_2d(c, y, m->d, T, y->nb[2], 0);
  for (int j = 1; j < m->k; ++j) sum = ggml_add(c, sum, ggml_view_2d(c, y, m->d, T, y->nb[2], j * y->nb[1]));
  m->out = ggml_cont(c, sum);
  m->graph = ggml_new_graph(c);
  ggml_build_forward_expand(m->graph, m->out);
  m->galloc = ggml_gallocr_new(ggml_backend_cpu_buffer_type());
  return ggml_gallocr_alloc_graph(m->galloc, m->graph) ? 0 : 1;
}

/* x [T][d] f32, ids [T][k] i32, weights [T][k] f32 -> out [T][d] f32 */
int moe_ffn_run(moe_ffn *m, const float *x, const int *ids, const float *weights, float *out) {
  ggml_backend_tensor_set(m->x, x, 0, ggml_nbytes(m->x));
  ggml_backend_tensor_set(m->ids, ids, 0, ggml_nbytes(m->ids));
  ggml_backend_tensor_set(m->w, weights, 0, ggml_nbytes(m->w));
  if (ggml_backend_graph_compute(m->backend, m->graph) != GGML_STATUS_SUCCESS) return 1;
  if (out) ggml_backend_tensor_get(m->out, out, 0, ggml_nbytes(m->out));
  return 0;
}

void moe_ffn_free(moe_ffn *m) {
  if (m->gctx) { ggml_gallocr_free(m->galloc); ggml_free(m->gctx); }
  ggml_backend_buffer_free(m->wbuf);
  ggml_free(m->wctx);
  ggml_backend_free(m->backend);
  free(m);
}
"""


def ggml_dir(source):
    source = pathlib.Path(source).resolve()
    for cand in (source / "ggml", source):
        if (cand / "include" / "ggml.h").exists() and (cand / "src" / "ggml-cpu").is_dir():
            return cand
    sys.exit(f"--source: no ggml tree (include/ggml.h, src/ggml-cpu) in {source} or {source / 'ggml'}")


def build(source, build_dir):
    """Configure and build ggml (CPU backend, native ISA, OpenMP, shared libs) and the harness; returns it."""
    src, out = ggml_dir(source), pathlib.Path(build_dir).resolve()
    repo = pathlib.Path(__file__).resolve().parent.parent
    if out == repo or repo in out.parents:
        sys.exit(f"--build: {out} is inside this repository; give a directory outside it")
    out.mkdir(parents=True, exist_ok=True)
    run = lambda *cmd: subprocess.run(cmd, check=True, stdout=sys.stderr)  # noqa: E731
    if not (out / "build.ninja").exists() and not (out / "Makefile").exists():
        run("cmake", "-S", str(src), "-B", str(out), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
            "-DBUILD_SHARED_LIBS=ON", "-DGGML_BUILD_TESTS=OFF", "-DGGML_BUILD_EXAMPLES=OFF", "-DGGML_OPENMP=ON",
            *(["-G", "Ninja"] if subprocess.run(["which", "ninja"], capture_output=True).returncode == 0 else []))
    run("cmake", "--build", str(out), "--target", "ggml", "ggml-base", "ggml-cpu", "-j", str(os.cpu_count() or 1))
    libs = out / "src"
    (out / "moe_ffn.c").write_text(HARNESS)
    lib = out / "libmoe_ffn.so"
    run("gcc", "-O2", "-shared", "-fPIC", "-o", str(lib), str(out / "moe_ffn.c"), f"-I{src / 'include'}",
        f"-L{libs}", "-lggml", "-lggml-base", "-lggml-cpu", f"-Wl,-rpath,{libs}")
    return lib


def load(lib):
    h = ctypes.CDLL(str(lib))
    p, i = ctypes.c_void_p, ctypes.c_int
    h.moe_ffn_new.restype = p
    h.moe_ffn_new.argtypes = [i, i, i, i, i, p, p, p, i, i]
    for name, args in (("moe_ffn_repacked", [p]), ("moe_ffn_plan", [p, i]), ("moe_ffn_run", [p, p, p, p, p])):
        getattr(h, name).restype = i
        getattr(h, name).argtypes = args
    h.moe_ffn_free.argtypes = [p]
    return h


def random_blocks(rng, type_name, rows, depth):
    """uint8 [rows, depth / block * bytes]: random codes, finite fp16 scales (0.01, and dmin for q4_K)."""
    _, values, nbytes, scale_at = TYPES[type_name]
    blocks = rng.integers(0, 256, size=(rows, depth // values, nbytes), dtype=np.uint8)
    for at in scale_at:
        blocks[..., at:at + 2] = np.array([0.01], dtype=np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


class Ggml:
    def __init__(self, h, type_name, d, f, E, k, gate, up, down, repack, threads):
        self.h = h
        self.m = h.moe_ffn_new(TYPES[type_name][0], d, f, E, k, gate.ctypes.data, up.ctypes.data, down.ctypes.data,
                               int(repack), threads)
        if not self.m:
            raise RuntimeError(f"ggml: no {'CPU_REPACK layout' if repack else 'CPU buffer'} for {type_name} here")
        self.repacked = bool(h.moe_ffn_repacked(self.m))
        self.T = None

    def __call__(self, x, ids, weights, out=None):
        if self.T != x.shape[0]:
            if self.h.moe_ffn_plan(self.m, x.shape[0]):
                raise RuntimeError("ggml: graph allocation failed")
            self.T = x.shape[0]
        if self.h.moe_ffn_run(self.m, x.ctypes.data, ids.ctypes.data, weights.ctypes.data,
                              None if out is None else out.ctypes.data):
            raise RuntimeError("ggml: graph compute failed")
        return out

    def close(self):
        if self.m:
            self.h.moe_ffn_free(self.m)
            self.m = None


def routing(rng, T, E, k):
    ids = np.stack([rng.permutation(E)[:k] for _ in range(T)]).astype(np.int32)
    w = rng.random((T, k)).astype(np.float32)
    return ids, w / w.sum(1, keepdims=True)


def moe_ext_weights(type_name, d, f, E, gate, up, down, rng, activations):
    """moe_ext's QuantizedWeights: the same blocks (q8_0, q4_0) or int4 g128 with zero points (q4_K)."""
    if type_name in ("q8_0", "q4_0"):
        t = TYPES[type_name][0]
        w13 = from_gguf(data=np.concatenate([gate.reshape(E, f, -1), up.reshape(E, f, -1)], axis=1), ggml_type=t,
                        shape=(E, 2 * f, d), activations=activations)
        return w13, from_gguf(data=down, ggml_type=t, shape=(E, d, f), activations=activations)

    def int4_g128(N, K):
        return moe_ext.quant.from_parts("int4", (E, N, K), 128, rng.integers(0, 256, (E, N, K // 2), dtype=np.uint8),
                                        np.full((E, N, K // 128), 0.01, np.float32),
                                        rng.integers(0, 16, (E, N, K // 128), dtype=np.uint8), activations=activations)
    return int4_g128(2 * f, d), int4_g128(d, f)


def borrow(q, activations):
    """A QuantizedWeight over q's own memory (no copy) with the given activation mode; q must outlive it."""
    return moe_ext._core.quantized_borrow(q.scheme, *q.shape, q.group_size or 0, *q.kernel_parts(),
                                          activations == "int8")


def check(h, threads):
    """ggml and moe_ext on the same q8_0 / q4_0 blocks (tiny shape): outputs within 5%."""
    rng = np.random.default_rng(0)
    d, f, E, k = SHAPES["tiny"]
    for type_name in ("q8_0", "q4_0"):
        gate, up = random_blocks(rng, type_name, E * f, d), random_blocks(rng, type_name, E * f, d)
        down = random_blocks(rng, type_name, E * d, f)
        w13, w2 = moe_ext_weights(type_name, d, f, E, gate, up, down, rng, None)
        for repack in (False, True):
            try:
                g = Ggml(h, type_name, d, f, E, k, gate, up, down, repack, threads)
            except RuntimeError as e:
                print(f"check {type_name} repack={repack}: {e}")
                continue
            x = rng.standard_normal((9, d)).astype(np.float32)
            ids, w = routing(rng, 9, E, k)
            got = g(x, ids, w, np.empty((9, d), np.float32))
            want = moe_ext.experts(x, w13, w2, w, ids)
            err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
            print(f"check {type_name} repack={repack} (repacked: {g.repacked}): ggml vs moe_ext rel {err:.2e}")
            g.close()
            if not err < 0.05:
                sys.exit(f"check failed: {type_name} repack={repack}: relative difference {err:.3g}")


def bench_type(h, type_name, shape, tokens, threads, rounds):
    d, f, E, k = SHAPES[shape]
    rng = np.random.default_rng(0)
    gate, up = random_blocks(rng, type_name, E * f, d), random_blocks(rng, type_name, E * f, d)
    down = random_blocks(rng, type_name, E * d, f)
    impls = {}
    for repack in (False, True):
        try:
            g = Ggml(h, type_name, d, f, E, k, gate, up, down, repack, threads)
        except RuntimeError as e:
            print(f"  {e}", file=sys.stderr)
            continue
        name = f"ggml {type_name}" + (" repack" if repack else "")
        if repack and not g.repacked:
            name += " (not repacked)"
        impls[name] = g
    ours = "int8 g32" if type_name == "q8_0" else "int4 g32" if type_name == "q4_0" else "int4 g128 zp"
    weights = moe_ext_weights(type_name, d, f, E, gate, up, down, rng, None)
    for act in (None, "int8"):
        w13, w2 = (borrow(w, act) for w in weights)  # one copy of the weights for both modes
        label = f"moe_ext {ours} " + ("W8A8" if act and ours.startswith("int8") else "W4A8" if act else "weight-only")
        impls[label] = (lambda w13, w2: lambda x, ids, w, out=None: moe_ext.experts(x, w13, w2, w, ids))(w13, w2)
    del gate, up, down
    rows = []
    for T in tokens:
        x = rng.standard_normal((T, d)).astype(np.float32)
        ids, w = routing(rng, T, E, k)
        times = {name: [] for name in impls}
        names = list(impls)
        for name in names:  # warm up (and plan the ggml graph)
            impls[name](x, ids, w)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                t0 = time.perf_counter()
                impls[name](x, ids, w)
                times[name].append(time.perf_counter() - t0)
        med = {name: float(np.median(v)) for name, v in times.items()}
        for name in names:
            rows.append(dict(shape=shape, type=type_name, T=T, impl=name, seconds=med[name], threads=threads))
        print(f"{shape} {type_name} T={T}: " + ", ".join(f"{n} {med[n] * 1e3:.2f} ms" for n in names))
        for g in (n for n in names if n.startswith("ggml")):
            for m in (n for n in names if n.startswith("moe_ext")):
                print(f"    {g} / {m} = {med[g] / med[m]:.2f}x")
    for impl in impls.values():
        if isinstance(impl, Ggml):
            impl.close()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", required=True, help="llama.cpp (or ggml) source tree")
    ap.add_argument("--build", required=True, help="build directory, outside this repository")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="mixtral")
    ap.add_argument("--tokens", default="1,4,16")
    ap.add_argument("--types", default="q8_0,q4_0,q4_K")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--check", action="store_true", help="only the tiny-shape parity check")
    ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "llama_cpp.json"))
    args = ap.parse_args()
    moe_ext.set_num_threads(args.threads)
    h = load(build(args.source, args.build))
    check(h, args.threads)
    if args.check:
        return
    rows = []
    for type_name in args.types.split(","):
        rows += bench_type(h, type_name, args.shape, [int(t) for t in args.tokens.split(",")], args.threads,
                           args.rounds)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(moe_ext=moe_ext.info(), rows=rows), indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
