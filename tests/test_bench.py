"""The benchmark harness (`moe-ext bench`, moe_ext.bench) on tiny shapes: every implementation gets a
row with a measurement or the reason it has none; ratios, ceilings, the JSON document and the PNGs.

torch, tqdm and matplotlib are optional (the `bench` extra): without torch its rows must say so.
"""
import importlib
import io
import json

import pytest

import moe_ext
from moe_ext import __main__ as cli
from moe_ext import bench
from moe_ext._bench import harness, peers, workload

PER_TIER = False  # the harness times whatever tier is in use; once is enough

TINY = "32,32,64,4,2"  # T,d,f,E,k: a prefill-like (compute-bound) row (T > 16)
DECODE = "1,32,64,4,2"  # T <= 16: a decode (bandwidth-bound) row
SMALL_CEILINGS = ["--ceiling-n", "128", "--ceiling-mib", "4"]


def importable(name):
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


HAS_TORCH = importable("torch")
HAS_MATPLOTLIB = importable("matplotlib")
STATUSES = {"ok", "unsupported", "unavailable", "skipped", "error"}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    """One run through the command line: two tiny shapes, fp32 and bf16, one timed call each."""
    out = tmp_path_factory.mktemp("bench")
    settle, harness.SETTLE_S = harness.SETTLE_S, 0.0
    try:
        status = cli.main([
            "bench", "--shape-spec", TINY, "--shape-spec", DECODE, "--dtype", "fp32", "--dtype", "bf16",
            "--repeats", "1", "--warmup", "1", "--json", str(out / "bench.json"), "--png-dir", str(out),
            "--no-progress", *SMALL_CEILINGS])
    finally:
        harness.SETTLE_S = settle
    assert status == 0
    return json.loads((out / "bench.json").read_text()), out


def rows_of(doc, shape, dtype):
    return {r["impl"]: r for r in doc["results"] if r["shape"] == shape and r["dtype"] == dtype}


def test_every_implementation_has_a_row_or_a_reason(result):
    doc, _ = result
    names = [workload.parse_spec(s).name for s in (TINY, DECODE)]
    for shape in names:
        for dtype in ("fp32", "bf16"):
            rows = rows_of(doc, shape, dtype)
            assert list(rows) == peers.NAMES
            for r in rows.values():
                assert r["status"] in STATUSES
                if r["status"] != "ok":
                    assert r["note"], r
        fp32, bf16 = rows_of(doc, shape, "fp32"), rows_of(doc, shape, "bf16")
        assert fp32["moe_ext"]["status"] == "ok" and fp32["reference"]["status"] == "ok"
        assert bf16["moe_ext"]["status"] == "ok"
        assert bf16["reference"]["status"] == "unavailable"
        for dt_rows in (fp32, bf16):
            assert dt_rows["moe_ext_plain"]["status"] == "ok"
            assert dt_rows["moe_ext_torch"]["status"] == ("ok" if HAS_TORCH else "unavailable")
        for impl in ("torch_eager", "torch_grouped_mm", "dense"):
            for rows in (fp32, bf16):
                r = rows[impl]
                if not HAS_TORCH:
                    assert r["status"] == "unavailable" and "torch is not installed" in r["note"]
                elif impl == "torch_grouped_mm":  # runs on CPU in torch 2.13; elsewhere: the reason
                    assert r["status"] == "ok" or r["note"].startswith("not available"), r
                else:
                    assert r["status"] == "ok", r


def test_rows_carry_timings_throughput_and_ceiling_fractions(result):
    doc, _ = result
    for r in doc["results"]:
        if r["status"] != "ok":
            continue
        assert len(r["seconds"]) == 1 and r["first_call_s"] > 0
        assert 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
        p50 = r["p50_ms"] / 1e3
        dims = (r["T"], r["d"], r["f"], r["E"], r["k"])
        want_flop = workload.dense_flops(*dims) if r["impl"] == "dense" else workload.flops(*dims)
        assert r["flop"] == want_flop
        assert r["tokens_per_s"] == pytest.approx(r["T"] / p50)
        assert r["gflop_per_s"] == pytest.approx(want_flop / p50 / 1e9)
        c = doc["ceilings"][r["dtype"]]
        peak = c["bandwidth_gb_per_s"] if r["bound"] == "bandwidth" else c["compute_gflop_per_s"]
        if peak is None:  # e.g. no bfloat16 GEMM to measure without torch (NumPy has none)
            assert r["fraction_of_ceiling"] is None
        else:
            assert r["fraction_of_ceiling"] > 0
        if r["kind"] in ("moe", "user_path"):  # the same layer as moe_ext's float32 output
            assert r["rel_err"] < (1e-4 if r["dtype"] == "fp32" else 0.1), r
        if r["T"] == 1:
            assert r["bound"] == "bandwidth" and r["gb_per_s"] == pytest.approx(r["bytes"] / p50 / 1e9)
        else:
            assert r["bound"] == "compute" and "gb_per_s" not in r


def test_decode_bytes_count_the_experts_touched(result):
    doc, _ = result
    group = next(g for g in doc["groups"] if g["T"] == 1 and g["dtype"] == "fp32")
    assert group["decode"] and 1 <= group["experts_touched"] <= group["k"]
    r = rows_of(doc, group["shape"], "fp32")["moe_ext"]
    assert r["bytes"] == workload.weight_bytes(r["d"], r["f"], r["E"], group["experts_touched"], 4)


def test_ratios_against_every_peer_and_the_fastest(result):
    doc, _ = result
    assert len(doc["groups"]) == 4
    for g in doc["groups"]:
        rows = rows_of(doc, g["shape"], g["dtype"])
        moe = rows["moe_ext"]
        if moe["status"] != "ok":  # bf16: nothing to compare
            assert g["ratio_vs_fastest_peer"] is None
            continue
        peers_ok = [r for name, r in rows.items() if name != "moe_ext" and r["status"] == "ok"]
        for r in peers_ok:
            assert r["moe_ext_speedup"] == pytest.approx(r["p50_ms"] / moe["p50_ms"])
        moe_peers = [r for r in peers_ok if r["kind"] == "moe"]
        if not moe_peers:  # bf16 without torch: no MoE peer runs in that dtype
            assert g["ratio_vs_fastest_peer"] is None
            continue
        fastest = min(moe_peers, key=lambda r: r["p50_ms"])
        assert g["fastest_peer"] == fastest["impl"] != "dense"
        assert g["ratio_vs_fastest_peer"] == pytest.approx(fastest["p50_ms"] / moe["p50_ms"])
        assert moe["ratio_vs_fastest_peer"] == g["ratio_vs_fastest_peer"]
        # the user paths are moe_ext, not peers: compared with the fastest peer and the prepacked path
        assert all(r["kind"] != "user_path" for r in moe_peers)
        for name, u in g["user_paths"].items():
            r = rows[name]
            assert u["ratio_vs_fastest_peer"] == pytest.approx(fastest["p50_ms"] / r["p50_ms"])
            assert u["ratio_vs_packed"] == pytest.approx(moe["p50_ms"] / r["p50_ms"])


def test_json_has_ceilings_info_and_definitions(result):
    doc, out = result
    assert doc["info"]["version"] == moe_ext.__version__ and doc["info"]["isa"] == moe_ext.get_isa()
    assert doc["settings"]["repeats"] == 1 and doc["settings"]["threads"] == moe_ext.get_num_threads()
    for dtype in ("fp32", "bf16"):
        c = doc["ceilings"][dtype]
        assert [p["pass"] for p in c["passes"]] == ["start", "end"]  # measured before and after the runs
        names = [cand["name"] for cand in c["candidates"]]
        assert "torch.mm" in names and "numpy.sum" in names
        assert c["bandwidth_gb_per_s"] > 0
        assert c["bandwidth_gb_per_s"] == max(p["bandwidth_gb_per_s"] for p in c["passes"])
        if dtype == "fp32" or HAS_TORCH:
            assert c["compute_gflop_per_s"] == max(p["compute_gflop_per_s"] for p in c["passes"]) > 0
    assert doc["ceilings"]["fp32"]["compute_by"].split(",")[0] in ("torch.mm", "numpy.matmul")
    assert "dense" in doc["definitions"] and "k*f" in doc["definitions"]["dense"]
    assert doc["environment"]["torch"] == (__import__("torch").__version__ if HAS_TORCH else None)
    assert doc["files"]["json"] == str(out / "bench.json")


def test_pngs_written_when_matplotlib_is_there(result):
    doc, out = result
    pngs = [out / "throughput.png", out / "ceiling_fraction.png"]
    if HAS_MATPLOTLIB:
        for png in pngs:
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert doc["files"]["png"] == [str(p) for p in pngs]
    else:
        assert not any(p.exists() for p in pngs)
        assert any("matplotlib is not installed" in n for n in doc["notes"])


def test_budget_skips_slow_peers_but_not_moe_ext():
    table = io.StringIO()
    doc = bench.run(shapes=[workload.parse_spec(TINY)], impls=["moe_ext", "reference"], repeats=2,
                    warmup=0, budget_s=1e-9, json_path=None, png_dir=None, progress=False, out=table,
                    ceiling_n=64, ceiling_bytes=1 << 20)
    rows = {r["impl"]: r for r in doc["results"]}
    assert rows["moe_ext"]["status"] == "ok" and len(rows["moe_ext"]["seconds"]) == 2
    assert rows["reference"]["status"] == "skipped" and "skipped (budget)" in rows["reference"]["note"]
    assert doc["groups"][0]["ratio_vs_fastest_peer"] is None
    text = table.getvalue()
    assert "tokens/s" in text and "skipped (budget)" in text and doc["files"] == {}


class _FakePeer(peers.Peer):
    """A peer whose calls append its name to a shared log; `fail_on` makes that call raise."""

    def __init__(self, name, log, fail_on=None):
        self.name, self.log, self.fail_on, self.calls = name, log, fail_on, 0

    def prepare(self, work, dtype):
        def forward():
            self.calls += 1
            if self.calls == self.fail_on:
                raise RuntimeError("boom")
            self.log.append(self.name)
            return None

        return forward


def test_timed_calls_interleave_in_rotated_rounds(monkeypatch):
    monkeypatch.setattr(harness, "SETTLE_S", 0)
    log = []
    fakes = [_FakePeer("a", log), _FakePeer("b", log), _FakePeer("c", log, fail_on=3)]
    shape = workload.parse_spec(TINY)
    rows = harness._run_interleaved(fakes, None, shape, "fp32", None, warmup=1, repeats=3, budget_s=None)
    # warm-ups a b c; round 0: a b c; round 1, rotated: b c a (c's third call raises: an error row,
    # no more calls); round 2: a b
    assert log == ["a", "b", "c", "a", "b", "c", "b", "a", "a", "b"]
    by = {r["impl"]: r for r in rows}
    assert [r["impl"] for r in rows] == ["a", "b", "c"]
    assert len(by["a"]["seconds"]) == 3 and by["a"]["status"] == "ok" and "p50_ms" in by["a"]
    assert by["c"]["status"] == "error" and "boom" in by["c"]["note"] and by["c"]["seconds"] == []


def test_shape_names():
    assert [s.name for s in workload.expand(["decode"])] == ["decode-1", "decode-4", "decode-16"]
    assert [s.name for s in workload.expand(["quick"])] == ["small"] == bench.QUICK
    assert [s.name for s in workload.expand(["all", "small"])] == list(bench.SHAPES)
    assert workload.shape("mixtral").dims == (1024, 4096, 14336, 8, 2) and workload.shape("decode-4").decode
    with pytest.raises(ValueError, match="T,d,f,E,k"):
        workload.parse_spec("1,2,3")


@pytest.mark.skipif(not (HAS_TORCH and importable("transformers")), reason="needs torch and transformers")
def test_hf_layer_mode(tmp_path):
    """--mode hf on a tiny Mixtral layer: every implementation has prefill and decode rows with
    percentiles, the outputs agree with eager, decode bytes count the touched experts, JSON and table."""
    from moe_ext._bench import hf_layer

    settle, harness.SETTLE_S = harness.SETTLE_S, 0.0
    try:
        status = cli.main(["bench", "--mode", "hf", "--shape-spec", "8,64,96,4,2", "--dtype", "fp32",
                           "--repeats", "1", "--json", str(tmp_path / "hf.json"), "--png-dir", str(tmp_path),
                           *SMALL_CEILINGS])
    finally:
        harness.SETTLE_S = settle
    assert status == 0
    doc = json.loads((tmp_path / "hf.json").read_text())
    assert doc["layer"]["hidden_size"] == 64 and doc["prefill_tokens"] == 8
    phases = {(r["impl"], r["phase"]): r for r in doc["rows"]}
    assert set(phases) == {(i, p) for i in hf_layer.IMPLS for p in ("prefill", "decode-b1", "decode-b8")}
    for (impl, phase), r in phases.items():
        assert 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
        assert r["calls"] == (1 if phase == "prefill" else doc["steps"])
        if phase == "prefill":
            assert r["rel_err_vs_eager"] < 1e-4, r
        else:
            one_expert = 3 * 64 * 96 * 4
            assert r["bytes_per_step"] > one_expert  # at least one expert and the attention weights
        assert r["moe_ext_speedup"] == pytest.approx(r["p50_ms"] / phases[("moe_ext", phase)]["p50_ms"])
    assert "| prefill | moe_ext |" in hf_layer.table(doc)
    if HAS_MATPLOTLIB:
        assert (tmp_path / "hf_layer.png").exists()
