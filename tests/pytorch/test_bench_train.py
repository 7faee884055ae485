"""`moe-ext bench --mode train` runs (tiny custom shape) and reports every implementation; no timing
is asserted."""
import json

import pytest

torch = pytest.importorskip("torch")
from moe_ext import bench  # noqa: E402

PER_TIER = False


def test_bench_train_mode(tmp_path, capsys):
    path = tmp_path / "train.json"
    assert bench.main(["--mode", "train", "--shape-spec", "16,8,12,4,2", "--dtype", "fp32", "--repeats", "1",
                       "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert {r["impl"] for r in rows} == {"moe_ext", "torch_eager", "torch_grouped_mm"}
    ours = next(r for r in rows if r["impl"] == "moe_ext")
    assert ours["status"] == "ok" and ours["moe_ext_speedup"] == 1.0
    for r in rows:
        if r["status"] == "ok":
            assert r["max_rel_err"] < 1e-4, r  # every peer computes the same gradients
    assert "forward+backward" in capsys.readouterr().out
