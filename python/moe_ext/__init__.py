"""moe_ext: Mixture-of-Experts layer kernels (gating, permutation, grouped expert GEMM, fused layer).

The operations of SPEC §3 on NumPy arrays; `moe_ext.reference` is their pure-NumPy ground truth.
Semantics: docs/api.md. The CPU tier is chosen at import (MOE_EXT_ISA overrides it).
"""
from importlib import metadata as _metadata

from . import _checks, _core, reference
from ._activation import Activation, activation_from
from ._api import (experts, grouped_gemm, load_balancing_loss, moe, permute, prepack, route, router_z_loss,
                   unpermute)
from ._backward import (activation, activation_backward, bias_grad, grouped_gemm_backward, permute_backward,
                        unpermute_backward)
from ._core import PackedWeight, QuantizedWeight
from .quant import dequantize, quantize
from ._types import PermuteResult

try:
    __version__ = _metadata.version("moe_ext")
except _metadata.PackageNotFoundError:  # imported from a source tree
    __version__ = "0+unknown"

__all__ = [
    "route", "permute", "grouped_gemm", "unpermute", "experts", "moe", "prepack", "PackedWeight",
    "Activation", "activation_from", "bias_grad",
    "quantize", "dequantize", "QuantizedWeight",
    "load_balancing_loss", "router_z_loss", "activation", "activation_backward", "grouped_gemm_backward",
    "unpermute_backward", "permute_backward", "PermuteResult", "info", "available_isas", "get_isa", "set_isa",
    "get_num_threads", "set_num_threads", "__version__",
]


def available_isas():
    """The CPU tiers this build and CPU can run, lowest first ("scalar", "avx2", "avx512")."""
    return list(_core.available_isas())


def get_isa():
    """The CPU tier the kernels use now."""
    return _core.get_isa()


def set_isa(name):
    """Use the CPU tier `name` for every later call, in every thread. ValueError if unavailable."""
    return _core.set_isa(_checks.choice(name, "isa", ("scalar", "avx2", "avx512")))


def get_num_threads():
    return _core.get_num_threads()


def set_num_threads(n):
    """Threads each kernel uses (default: OMP_NUM_THREADS, else the number of cores)."""
    _core.set_num_threads(_checks.integer(n, "n", 1))


def info():
    """What this install is and what it runs: version, build, ISA tiers, threads, CUDA."""
    build = dict(_core.build_info())
    return {
        "version": __version__,
        "build_type": build["build_type"],
        "compiler": build["compiler"],
        "cxx_flags": build["cxx_flags"].strip(),
        "openmp": build["openmp"],
        "isa_compiled": list(build["isa_compiled"]),
        "isa_available": available_isas(),
        "isa": get_isa(),
        "num_threads": get_num_threads(),
        "cuda": _cuda_info(),
    }


def _cuda_info():
    """Whether the CUDA kernels (module moe_ext._cuda) were built, and the devices they can see."""
    try:
        from . import _cuda
    except ImportError:
        return {"built": False, "available": False, "device_count": 0}
    count = _cuda.device_count()
    build = dict(_cuda.build_info())
    info = {"built": True, "available": count > 0, "device_count": count,
            "architectures": build["architectures"], "runtime_version": build["runtime_version"]}
    if count == 0:
        info["reason"] = _cuda.runtime_error()
    return info
