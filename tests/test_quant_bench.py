"""The quantised-experts benchmark scripts run (tiny shape, one round): bench/quant.py writes its rows, and
bench/llama_cpp.py's ggml-free parts (blocks, moe_ext weights on them) agree with moe_ext's GGUF import."""
import importlib.util
import json
import pathlib
import subprocess
import sys

import numpy as np

import moe_ext

PER_TIER = False
BENCH = pathlib.Path(__file__).resolve().parent.parent / "bench"


def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quant_bench_runs(tmp_path):
    out = tmp_path / "quant.json"
    subprocess.run([sys.executable, str(BENCH / "quant.py"), "--shape", "tiny", "--tokens", "1,32", "--rounds", "1",
                    "--out", str(out)], check=True, capture_output=True, text=True)
    rows = json.loads(out.read_text())["rows"]
    impls = {r["impl"] for r in rows}
    assert {"int8", "int8 W8A8", "int4 g128", "int4 g128 W4A8", "bf16 packed"} <= impls
    decode = [r for r in rows if r["T"] == 1 and "fraction_of_read" in r]
    assert decode and all(r["seconds"] > 0 and r["touched_experts"] == 2 for r in decode)


def test_llama_cpp_blocks_are_gguf_blocks():
    bench = load("llama_cpp")
    rng = np.random.default_rng(0)
    d, f, E = 64, 32, 2
    for type_name in ("q8_0", "q4_0"):
        gate, up = bench.random_blocks(rng, type_name, E * f, d), bench.random_blocks(rng, type_name, E * f, d)
        down = bench.random_blocks(rng, type_name, E * d, f)
        w13, w2 = bench.moe_ext_weights(type_name, d, f, E, gate, up, down, rng, None)
        assert w13.shape == (E, 2 * f, d) and w2.shape == (E, d, f)
        assert np.all(w13.scales == np.float32(np.float16(0.01)))
        a8 = bench.borrow(w13, "int8")
        assert a8.activations == "int8"
        np.testing.assert_array_equal(moe_ext.dequantize(a8), moe_ext.dequantize(w13))
    q4k = bench.random_blocks(rng, "q4_K", 4, 256)
    assert q4k.shape == (4, 144)
