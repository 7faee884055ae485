"""Thread safety and determinism (SPEC §5): concurrent calls from Python threads give the serial
results bit for bit; reruns and thread counts do not change results; inputs are never written to;
read-only and unaligned inputs work."""
import concurrent.futures
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import moe_ext
from conftest import (random_expert_weights, random_ids, random_offsets, random_router,
                      random_topk_weights, random_weights, random_x)


def _as_tuple(result):
    return tuple(result) if isinstance(result, tuple) else (result,)


def _bits(result):
    return tuple(np.asarray(r).tobytes() if isinstance(r, np.ndarray) else r for r in _as_tuple(result))


def make_tasks(rng, n_shapes=3):
    """(name, function, args, kwargs) for every op, on several shapes (so per-thread workspaces
    grow and shrink between calls). Arrays are shared between all the threads that run a task."""
    tasks = []
    for i in range(n_shapes):
        T, d, f, E, k = [(37, 45, 23, 8, 2), (150, 32, 24, 16, 4), (5, 17, 9, 3, 3)][i % 3]
        x, wr = random_x(rng, T, d), random_router(rng, E, d)
        w13, w2 = random_expert_weights(rng, E, d, f, "swiglu")
        w1, w2r = random_expert_weights(rng, E, d, f, "relu")
        weights, ids = random_topk_weights(rng, T, k), random_ids(rng, T, E, k)
        offsets = random_offsets(rng, E, max_rows=9)
        a, w = random_x(rng, int(offsets[-1]), d), random_weights(rng, (E, f, d), d)
        _, _, rows = moe_ext.permute(x, ids, E, capacity=2)
        y_perm = random_x(rng, int(rows.max()) + 1, d)
        cb = (rng.standard_normal(E) * 0.1).astype(np.float32)
        group = dict(n_group=E // 4, topk_group=2) if E % 4 == 0 and 2 * (E // (E // 4)) >= k else {}
        tasks += [
            ("route", moe_ext.route, (x, wr, k), dict(return_probs=True, correction_bias=cb, **group)),
            ("route-sigmoid", moe_ext.route, (x, wr, k), dict(scoring="sigmoid", scale=2.0)),
            ("permute", moe_ext.permute, (x, ids, E), dict(capacity=3)),
            ("grouped_gemm", moe_ext.grouped_gemm, (a, w, offsets), {}),
            ("unpermute", moe_ext.unpermute, (y_perm, rows, weights), {}),
            ("experts", moe_ext.experts, (x, w13, w2, weights, ids), {}),
            ("experts-relu-cap", moe_ext.experts, (x, w1, w2r, weights, ids), dict(activation="relu", capacity=4)),
            ("moe", moe_ext.moe, (x, wr, w13, w2, k), dict(scoring="sigmoid", correction_bias=cb, **group)),
            ("moe-gelu", moe_ext.moe, (x, wr, w1, w2r, k), dict(activation="gelu", renormalize=False)),
            ("losses", lambda p, i, e, l: (moe_ext.load_balancing_loss(p, i, e), moe_ext.router_z_loss(l)),
             (random_topk_weights(rng, T, E), ids, E, random_x(rng, T, E)), {}),
        ]
    return tasks


def _inputs_of(tasks):
    return [a for _, _, args, kw in tasks for a in list(args) + list(kw.values()) if isinstance(a, np.ndarray)]


def test_concurrent_calls_match_serial(rng):
    """8 threads, each running every task many times in its own order, on shared inputs and on inputs
    of its own: every result is bit-identical to the serial one, and no input changes."""
    shared = make_tasks(rng)
    own = [make_tasks(np.random.default_rng(rng.integers(2 ** 32)), n_shapes=1) for _ in range(8)]
    expected = {id(t): _bits(t[1](*t[2], **t[3])) for t in shared + sum(own, [])}
    snapshot = [(a, a.copy()) for a in _inputs_of(shared + sum(own, []))]

    def worker(i):
        order = np.random.default_rng(i).permutation(len(shared))
        mismatches = []
        for rep in range(4):
            for j in order:
                task = shared[j]
                if _bits(task[1](*task[2], **task[3])) != expected[id(task)]:
                    mismatches.append((rep, task[0], "shared"))
            for task in own[i]:
                if _bits(task[1](*task[2], **task[3])) != expected[id(task)]:
                    mismatches.append((rep, task[0], "own"))
        return mismatches

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(worker, range(8)))
    assert results == [[]] * 8
    for a, before in snapshot:
        assert a.tobytes() == before.tobytes()


def test_concurrent_same_call(rng):
    """Many threads on exactly the same large-ish call at once (contention on shared inputs)."""
    T, d, f, E, k = 256, 64, 48, 8, 2
    x, wr = random_x(rng, T, d), random_router(rng, E, d)
    w13, w2 = random_expert_weights(rng, E, d, f)
    want = moe_ext.moe(x, wr, w13, w2, k).tobytes()
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(lambda _: moe_ext.moe(x, wr, w13, w2, k).tobytes(), range(24)))
    assert all(g == want for g in got)


def test_reruns_are_bit_identical(rng):
    tasks = make_tasks(rng)
    first = [_bits(t[1](*t[2], **t[3])) for t in tasks]
    for _ in range(3):
        assert [_bits(t[1](*t[2], **t[3])) for t in tasks] == first


@pytest.mark.parametrize("counts", [(1, 2), (2, 1), (1, 3), (2, 7)])
def test_thread_count_does_not_change_results(rng, counts):
    """Results are bit-identical whatever set_num_threads says (also more threads than cores)."""
    tasks = make_tasks(rng)
    saved = moe_ext.get_num_threads()
    try:
        results = []
        for n in counts:
            moe_ext.set_num_threads(n)
            assert moe_ext.get_num_threads() == n
            results.append([_bits(t[1](*t[2], **t[3])) for t in tasks])
    finally:
        moe_ext.set_num_threads(saved)
    assert moe_ext.get_num_threads() == saved
    assert results[0] == results[1]


def test_read_only_inputs(rng):
    """Arrays with writeable=False are accepted and give the same results."""
    tasks = make_tasks(rng, n_shapes=2)
    want = [_bits(t[1](*t[2], **t[3])) for t in tasks]
    frozen = []
    for name, fn, args, kw in tasks:
        args = tuple(np.array(a) if isinstance(a, np.ndarray) else a for a in args)
        kw = {key: np.array(v) if isinstance(v, np.ndarray) else v for key, v in kw.items()}
        for a in list(args) + list(kw.values()):
            if isinstance(a, np.ndarray):
                a.flags.writeable = False
        frozen.append((name, fn, args, kw))
    assert [_bits(t[1](*t[2], **t[3])) for t in frozen] == want


def _unaligned(a):
    """A C-contiguous copy of `a` at an odd byte address (flags.aligned is False)."""
    buf = np.empty(a.nbytes + 1, np.uint8)
    out = np.frombuffer(buf.data, dtype=np.uint8, count=a.nbytes, offset=1).view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def test_unaligned_inputs(rng):
    """C-contiguous but misaligned arrays (e.g. from a byte buffer) either work, with the same
    results, or are rejected with a ValueError -- never a crash."""
    tasks = make_tasks(rng, n_shapes=1)
    for name, fn, args, kw in tasks:
        want = _bits(fn(*args, **kw))
        args = tuple(_unaligned(a) if isinstance(a, np.ndarray) and a.size else a for a in args)
        kw = {key: _unaligned(v) if isinstance(v, np.ndarray) else v for key, v in kw.items()}
        try:
            got = _bits(fn(*args, **kw))
        except ValueError:
            continue
        assert got == want, name


def test_views_of_larger_arrays(rng):
    """A contiguous row slice of a bigger array (non-zero offset into its buffer) works."""
    big = random_x(rng, 100, 24)
    x = big[17:60]
    assert x.flags.c_contiguous and not x.flags.owndata
    wr, (w13, w2) = random_router(rng, 6, 24), random_expert_weights(rng, 6, 24, 16)
    assert moe_ext.moe(x, wr, w13, w2, 2).tobytes() == moe_ext.moe(x.copy(), wr, w13, w2, 2).tobytes()


RACE_SCRIPT = textwrap.dedent("""
    import threading, time
    import numpy as np
    import moe_ext
    rng = np.random.default_rng(0)
    T, d, f, E, k = 64, 8, 16, 256, 4
    x = rng.standard_normal((T, d)).astype(np.float32)
    w = rng.standard_normal((E, d)).astype(np.float32)
    a = rng.standard_normal((96, 40)).astype(np.float32)         # grouped_gemm: 3 experts x 32 rows
    wg = rng.standard_normal((3, 72, 40)).astype(np.float32)
    offsets = np.array([0, 32, 64, 96], np.int32)
    wr = rng.standard_normal((4, d)).astype(np.float32)          # moe: 4 experts
    w13 = rng.standard_normal((4, 2 * f, d)).astype(np.float32)
    w2 = rng.standard_normal((4, d, f)).astype(np.float32)
    calls = [lambda: moe_ext.route(x, w, k, return_probs=True),
             lambda: moe_ext.grouped_gemm(a, wg, offsets),
             lambda: moe_ext.moe(x, wr, w13, w2, 2)]
    def bits(r):
        return [v.tobytes() for v in (r if isinstance(r, tuple) else (r,))]
    moe_ext.set_num_threads(1)
    want = [bits(c()) for c in calls]
    stop = threading.Event()
    def toggle():
        i = 0
        while not stop.is_set():
            moe_ext.set_num_threads(1 if i % 2 else 16)
            i += 1
            if i % 64 == 0:
                time.sleep(0)
    bad = []
    def work():
        for _ in range(2):  # fresh threads: fresh, small per-thread workspaces
            for c, expected in zip(calls, want):
                if bits(c()) != expected:
                    bad.append(1)
    toggler = threading.Thread(target=toggle)
    toggler.start()
    for rep in range(120):
        workers = [threading.Thread(target=work) for _ in range(4)]
        for t in workers: t.start()
        for t in workers: t.join()
    stop.set()
    toggler.join()
    print("mismatches", len(bad))
""")


def test_set_num_threads_while_calls_run(isa):
    """set_num_threads from one thread while others run route, grouped_gemm and moe: no crash, hang or
    wrong result (per-thread scratch sized for the old thread count must not be used by more threads). Run in a subprocess so
    that memory corruption cannot take the test session down."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(moe_ext.__file__)), MOE_EXT_ISA=isa)
    try:
        proc = subprocess.run([sys.executable, "-c", RACE_SCRIPT], env=env, capture_output=True, text=True,
                              timeout=15)
    except subprocess.TimeoutExpired:
        pytest.fail("hung (timeout 15 s) while set_num_threads changed during calls")
    assert proc.returncode == 0, f"exit status {proc.returncode}: {proc.stderr[-2000:]}"
    assert "mismatches 0" in proc.stdout, proc.stdout + proc.stderr[-2000:]
