"""GGUF import: Q8_0 and Q4_0 expert tensors as QuantizedWeights with the same numbers.

GGUF (llama.cpp's format) stores a quantised tensor as blocks of 32 values along its fastest axis (our
K): Q8_0 = a float16 scale d then 32 int8 codes, value d * q; Q4_0 = d then 16 bytes whose low nibbles
are values 0..15 and high nibbles 16..31 of the block, value d * (q - 8). Those are moe_ext's int8
group-32 and int4 symmetric group-32 formats exactly (docs/api.md §9): the codes are copied as they are
and d stays a float16 scale (the weight's scale_dtype; as bytes, 18 a Q4_0 block and 34 a Q8_0 one, as in
the file), so `moe_ext.dequantize` gives what `gguf.quants.dequantize` gives, bit for bit, and nothing is
requantised. The `gguf` package itself is needed only to read files.
"""
import numpy as np

from . import _checks as check
from .quant import from_parts

# ggml_type ids (GGMLQuantizationType) and block byte sizes.
Q4_0, Q8_0 = 2, 8
_BLOCK_BYTES = {Q8_0: 34, Q4_0: 18}
_NAMES = {Q8_0: "Q8_0", Q4_0: "Q4_0"}
BLOCK = 32


def from_gguf(tensor=None, *, data=None, ggml_type=None, shape=None, activations=None):
    """A QuantizedWeight [E, N, K] from a GGUF expert tensor: either a `gguf.GGUFReader` tensor
    (`reader.tensors[i]`, e.g. blk.0.ffn_gate_exps.weight, whose GGML shape is [K, N, E]), or its raw
    blocks `data` (uint8, E*N*K/32 blocks) with `ggml_type` (8 = Q8_0, 2 = Q4_0) and `shape` (E, N, K).
    A 2-d tensor [N, K] becomes one expert. activations: None or "int8", as in moe_ext.quantize."""
    if tensor is not None:
        data, ggml_type = tensor.data, int(tensor.tensor_type)
        shape = tuple(int(s) for s in reversed(list(tensor.shape)))  # GGML lists the fastest axis first
    if data is None or ggml_type is None or shape is None:
        check.fail(TypeError, "tensor", "a GGUFReader tensor, or data, ggml_type and shape", "neither")
    ggml_type = int(ggml_type)
    if ggml_type not in _BLOCK_BYTES:
        check.fail(ValueError, "ggml_type", "8 (Q8_0) or 2 (Q4_0)", ggml_type)
    shape = tuple(int(s) for s in shape)
    if len(shape) == 2:
        shape = (1,) + shape
    if len(shape) != 3 or min(shape) < 1 or shape[2] % BLOCK != 0:
        check.fail(ValueError, "shape", "(E, N, K) or (N, K) with K a multiple of 32", shape)
    E, N, K = shape
    blocks = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    want = E * N * (K // BLOCK) * _BLOCK_BYTES[ggml_type]
    if blocks.size != want:
        check.fail(ValueError, "data", f"{want} bytes of {_NAMES[ggml_type]} blocks for shape {shape}",
                   f"{blocks.size} bytes")
    blocks = blocks.reshape(E, N, K // BLOCK, _BLOCK_BYTES[ggml_type])
    scales = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    values = np.ascontiguousarray(blocks[..., 2:]).reshape(E, N, -1)
    scheme = "int8" if ggml_type == Q8_0 else "int4"
    return from_parts(scheme, shape, BLOCK, values, scales, None, activations=activations)
