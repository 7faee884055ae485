"""bench/gpu.py's own logic on the CPU (--dry-run): the shape list, FLOP and byte counting, the per-row
cross-check that fails a wrong implementation, relative speeds, the table and the JSON. Its GPU figures
come from a GPU run (bench/device_check.sh); without a GPU it refuses (test_cuda_host.py)."""
import importlib.util
import json
import math
import os

import pytest

torch = pytest.importorskip("torch")

PER_TIER = False

_spec = importlib.util.spec_from_file_location(
    "bench_gpu", os.path.join(os.path.dirname(__file__), "..", "..", "bench", "gpu.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_the_issues_shapes():
    cases = bench.build_cases()
    shapes = {(c.model, c.T, c.d, c.f, c.E, c.k, c.dtype, c.training) for c in cases}
    for T in (1, 16, 128, 1024, 8192):
        assert ("mixtral", T, 4096, 14336, 8, 2, "bf16", False) in shapes
    for T in (1, 64, 4096):
        assert ("qwen3", T, 2048, 768, 128, 8, "bf16", False) in shapes
    for T in (1, 4096):
        assert ("deepseek-v3", T, 7168, 2048, 256, 8, "bf16", False) in shapes
    for dtype in ("fp16", "fp32"):
        assert ("mixtral", 1024, 4096, 14336, 8, 2, dtype, False) in shapes
    assert ("mixtral", 4096, 4096, 14336, 8, 2, "bf16", True) in shapes
    assert len(shapes) == len(cases) == 13
    decode = {c.name for c in cases if c.decode}
    assert decode == {"mixtral T=1 bf16", "mixtral T=16 bf16", "qwen3 T=1 bf16", "qwen3 T=64 bf16",
                      "deepseek-v3 T=1 bf16"}
    assert [c.name for c in bench.build_cases(only=["training"])] == ["mixtral T=4096 bf16 fwd+bwd"]
    dry = bench.build_cases(dry_run=True)
    assert len({c.name for c in dry}) == len(dry) and all(c.T <= 48 and c.d <= 112 for c in dry)


def test_flop_and_byte_counts():
    case = bench.Case("mixtral", 8192, 4096, 14336, 8, 2)
    assert bench.flops(case) == 2 * 8192 * 2 * 4096 * 14336 * 3  # three GEMMs, no router (routing excluded)
    assert bench.flops(bench.Case("m", 8, 4, 6, 2, 1, training=True)) == 3 * 2 * 8 * 4 * 6 * 3
    decode = bench.Case("mixtral", 1, 4096, 14336, 8, 2)
    assert bench.bytes_moved(decode, 2, 2) == 2 * 3 * 14336 * 4096 * 2 + 2 * 4096 * 2
    rates = bench.rate_fields(decode, 0.1, 1e9, {"read_gbs": 4000.0})
    assert math.isclose(rates["gbs"], 1e4) and math.isclose(rates["pct_of_read_bw"], 250.0)
    assert math.isclose(rates["pct_of_790"], 100 * bench.flops(decode) / 1e-4 / 1e12 / 790)


def test_peers_compute_the_same_layer():
    case = bench.Case("t", 37, 24, 40, 6, 2)  # torch._grouped_mm wants 16-byte row strides
    x, w13, w2, weights, ids = bench.make_inputs(torch, case, "cpu")
    want = bench.reference_layer(torch, x, w13, w2, weights, ids)
    for fn in (bench.eager_loop, bench.grouped_mm_layer):
        got = fn(torch, x, w13, w2, weights, ids)
        assert float(bench.row_errors(torch, got, want).max()) < bench.CHECK_RTOL["bf16"]


def test_cross_check_fails_a_wrong_or_unfinished_implementation():
    want = torch.randn(50, 16)
    wrong_row = want.clone()
    wrong_row[7] *= 1.2
    unwritten = want.clone()
    unwritten[3, 3] = float("nan")
    checks = bench.cross_check(torch, {"good": want.to(torch.bfloat16), "wrong": wrong_row, "nan": unwritten,
                                       "raised": RuntimeError("no kernel"), "shape": want[:3]}, want, "bf16")
    assert checks["good"]["ok"]
    assert not checks["wrong"]["ok"] and checks["wrong"]["worst_row"] == 7
    assert not checks["nan"]["ok"] and not checks["nan"]["finite"]
    assert not checks["raised"]["ok"] and "no kernel" in checks["raised"]["error"]
    assert not checks["shape"]["ok"]


def test_relative_speed():
    rows = [{"impl": "moe_ext", "median_ms": 2.0}, {"impl": "torch._grouped_mm", "median_ms": 1.0},
            {"impl": "torch eager", "median_ms": 4.0}, {"impl": "dense torch.mm (ceiling)", "median_ms": 0.5},
            {"impl": "broken peer"}]
    bench.add_relative_speed(rows)
    assert rows[0]["speed_vs_fastest_peer"] == 0.5 and rows[0]["speed_vs_grouped_mm"] == 0.5
    assert rows[2]["speed_vs_fastest_peer"] == 0.25


def test_dry_run_writes_table_and_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert bench.main(["--dry-run", "--only", "mixtral,training", "--iters", "1", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "routing excluded for all" in out and "mixtral T=1 bf16" in out and "fwd+bwd" in out
    data = json.loads(path.read_text())
    assert data["meta"]["dry_run"] and "excluded" in data["meta"]["routing"]
    impls = {r["impl"] for r in data["rows"]}
    assert {"moe_ext", "torch eager", "dense torch.mm (ceiling)"} <= impls
    assert all(r["check"]["ok"] for r in data["rows"])
    timed = [r for r in data["rows"] if r["impl"] == "moe_ext" and not r["training"]]
    assert timed and all(r["median_ms"] > 0 and r["tflops"] > 0 and "speed_vs_fastest_peer" in r for r in timed)


def test_a_wrong_moe_ext_fails_the_benchmark(tmp_path, capsys):
    def off_by_a_bit(x, w13, w2, weights, ids):
        y = torch.ops.moe_ext.experts(x, w13, w2, weights, ids, "swiglu", None)
        y[-1] *= 1.5  # one wrong token
        return y
    path = tmp_path / "bench.json"
    code = bench.main(["--dry-run", "--only", "fp32", "--iters", "1", "--json", str(path)],
                      impl_overrides={"moe_ext": off_by_a_bit})
    assert code == 1
    rows = json.loads(path.read_text())["rows"]
    failed = [r for r in rows if not r["check"]["ok"]]
    assert [r["impl"] for r in failed] == ["moe_ext"] and "median_ms" not in failed[0]
    assert "FAIL: mixtral T=48 fp32 moe_ext" in capsys.readouterr().err
