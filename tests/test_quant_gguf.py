"""GGUF Q8_0 / Q4_0 import: the QuantizedWeight dequantises to exactly what the gguf package's own
dequantize gives (skipped without the gguf package), and computes on it."""
import numpy as np
import pytest

import moe_ext
import moe_ext.gguf
from moe_ext import reference
from conftest import GEMM_RTOL, assert_close

gguf = pytest.importorskip("gguf")
PER_TIER = False

TYPES = {"Q8_0": gguf.GGMLQuantizationType.Q8_0, "Q4_0": gguf.GGMLQuantizationType.Q4_0}


@pytest.mark.parametrize("name", list(TYPES))
@pytest.mark.parametrize("shape", [(1, 1, 32), (3, 7, 96), (2, 33, 256)], ids=str)
def test_dequantize_matches_gguf(rng, name, shape):
    w = (rng.standard_normal(shape) * rng.uniform(0.01, 10)).astype(np.float32)
    blocks = gguf.quants.quantize(w, TYPES[name])
    q = moe_ext.gguf.from_gguf(data=blocks, ggml_type=TYPES[name], shape=shape)
    assert q.shape == shape and q.group_size == 32 and q.scheme == ("int8" if name == "Q8_0" else "int4")
    np.testing.assert_array_equal(moe_ext.dequantize(q), gguf.quants.dequantize(blocks, TYPES[name]))
    assert q.scale_dtype == np.float16 and q.nbytes == blocks.nbytes  # the file's bytes, no more


@pytest.mark.parametrize("name", list(TYPES))
def test_reader_round_trip(rng, tmp_path, name):
    """Through a GGUF file: GGUFWriter, then GGUFReader's tensor straight into from_gguf."""
    E, N, K = 2, 5, 64
    w = rng.standard_normal((E, N, K)).astype(np.float32)
    blocks = gguf.quants.quantize(w, TYPES[name])
    path = str(tmp_path / "experts.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor("blk.0.ffn_gate_exps.weight", blocks, raw_dtype=TYPES[name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensor = gguf.GGUFReader(path).tensors[0]
    q = moe_ext.gguf.from_gguf(tensor, activations="int8")
    assert q.shape == (E, N, K) and q.activations == "int8"
    np.testing.assert_array_equal(moe_ext.dequantize(q), gguf.quants.dequantize(blocks, TYPES[name]))


@pytest.mark.parametrize("name", list(TYPES))
@pytest.mark.parametrize("isa_name", ["scalar", "avx2", "avx512"])
def test_gemm_on_imported_blocks(rng, name, isa_name):
    if isa_name not in moe_ext.available_isas():
        pytest.skip("tier not available")
    E, N, K = 3, 20, 128
    blocks = gguf.quants.quantize(rng.standard_normal((E, N, K)).astype(np.float32), TYPES[name])
    q = moe_ext.gguf.from_gguf(data=blocks, ggml_type=TYPES[name], shape=(E, N, K))
    a = rng.standard_normal((9, K)).astype(np.float32)
    offsets = np.array([0, 1, 1, 9], np.int32)
    previous = moe_ext.get_isa()
    moe_ext.set_isa(isa_name)
    try:
        out = moe_ext.grouped_gemm(a, q, offsets)
    finally:
        moe_ext.set_isa(previous)
    want = reference.grouped_gemm(a.astype(np.float64), gguf.quants.dequantize(blocks, TYPES[name]).astype(np.float64),
                                  offsets)
    assert_close(out, want, GEMM_RTOL, name)


def test_bad_input(rng):
    blocks = gguf.quants.quantize(rng.standard_normal((2, 3, 64)).astype(np.float32), TYPES["Q8_0"])
    with pytest.raises(ValueError, match="^data: expected 612 bytes of Q8_0 blocks for shape \\(2, 3, 96\\); got 408"):
        moe_ext.gguf.from_gguf(data=blocks, ggml_type=TYPES["Q8_0"], shape=(2, 3, 96))
    with pytest.raises(ValueError, match="^ggml_type: expected 8 \\(Q8_0\\) or 2 \\(Q4_0\\)"):
        moe_ext.gguf.from_gguf(data=blocks, ggml_type=gguf.GGMLQuantizationType.Q4_K, shape=(2, 3, 64))
    with pytest.raises(ValueError, match="^shape: expected"):
        moe_ext.gguf.from_gguf(data=blocks, ggml_type=TYPES["Q8_0"], shape=(2, 3, 60))
