"""moe_ext for PyTorch: torch.ops.moe_ext.* custom ops (autograd, fake tensors, torch.compile), a
functional API on tensors, and the nn.Module `MoE`. Needs torch (`import moe_ext` does not).

Ops (torch.ops.moe_ext.<name>): route, permute, grouped_gemm, activation, unpermute, experts, moe, and
the backward ops grouped_gemm_backward, activation_backward, unpermute_backward, permute_backward,
bias_grad; quantized_experts (inference only) behind quantize_experts (docs/api.md §9.1); schemas with the
functional API's defaults. Activations are descriptions (moe_ext.Activation,
passed to the ops as its canonical string), experts may have biases, and expert weights may be transposed
views of contiguous [E, K, N] tensors (read in place). float32, bfloat16 and float16 tensors (scores and
top-k weights float32). The packed expert-weight cache (set_weight_cache, weight_cache_info,
clear_weight_cache; MOE_EXT_WEIGHT_CACHE=0 switches it off) lets MoE and the transformers backend run
inference on prepacked weights. Semantics: docs/api.md §8.
"""
import torch  # noqa: F401  (a clear ImportError here when torch is missing)

if not hasattr(getattr(torch, "library", None), "custom_op"):
    raise ImportError(f"moe_ext.torch needs torch >= 2.4 (torch.library.custom_op); this is torch {torch.__version__}")

from . import _ops  # registers torch.ops.moe_ext.*
from ._functional import (PermuteResult, RouteResult, activation, experts, grouped_gemm, load_balancing_loss,
                          moe, permute, route, router_z_loss, unpermute)
from ._module import MoE
from .quant import QuantizedExperts, QuantizedExpertWeight, expert_bytes, quantize_experts  # docs/api.md §9
from ._weight_cache import WeightCacheInfo, clear_weight_cache, set_weight_cache, weight_cache_info
from . import hf  # noqa: E402,F401  registers "moe_ext" with transformers' experts interface (SPEC §7)

__all__ = ["route", "permute", "grouped_gemm", "activation", "unpermute", "experts", "moe",
           "load_balancing_loss", "router_z_loss", "RouteResult", "PermuteResult", "MoE",
           "quantize_experts", "QuantizedExpertWeight", "QuantizedExperts", "expert_bytes",
           "set_weight_cache", "weight_cache_info", "clear_weight_cache", "WeightCacheInfo"]
from .parallel import ExpertParallelMoE  # noqa: E402,F401  (expert parallelism over torch.distributed)
