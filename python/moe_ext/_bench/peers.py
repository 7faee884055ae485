"""The implementations of one MoE forward that the benchmark times side by side.

Every one computes the same layer from the same float32 arrays (moe_ext's layout): softmax router
w_router [E,d], top-k, renormalised weights, SwiGLU experts w13 [E,2f,d] (gate rows 0..f-1, up rows
f..2f-1) and w2 [E,d,f]; y[t] = sum_j weight[t,j] * w2[e] @ (silu(gate[e] @ x[t]) * (up[e] @ x[t])).

* ``moe_ext``: moe_ext.moe on the same arrays (bf16: the arrays rounded to ml_dtypes.bfloat16), the
  expert weights packed once with moe_ext.prepack in prepare (outside the timing, as the torch peers'
  weights are laid out before it).
* ``moe_ext_plain``: the path users take from NumPy: moe_ext.moe on the plain (unpacked) weight arrays,
  as a caller holds them (bf16: the arrays rounded to ml_dtypes.bfloat16 once, outside the timing).
* ``moe_ext_torch``: the path users take from PyTorch: torch.ops.moe_ext.moe on the torch tensors the
  torch peers use (moe_ext.torch's custom op; nothing prepacked).
* ``reference``: moe_ext.reference.moe on the float32 arrays, so it computes in float32 (the reference
  computes in its inputs' dtype); Python loops over tokens for routing and permutation, one NumPy matmul
  per expert. NumPy has no bfloat16, so there is no bf16 row.
* ``torch_eager``: the Hugging Face MixtralSparseMoeBlock forward (transformers' modeling_mixtral) with
  torch ops: router linear, softmax in float32, topk, renormalise, then a Python loop over the experts
  that got tokens: index_select their tokens, w2(silu(w1(x)) * w3(x)) * routing weight, index_add_.
* ``torch_grouped_mm``: the same routing, the token copies sorted by expert, then two
  ``torch._grouped_mm`` calls (w13, then w2, as transposed views of the same weights) and a weighted
  index_add_; only where torch._grouped_mm runs on this CPU in this dtype (probed first).
* ``dense``: not an MoE: one dense SwiGLU FFN of intermediate size k*f (no router), i.e. the same FLOPs
  per token as the k active experts, timed with torch: what the active compute costs without routing.
  Its weights are views of the first k experts' weights, the same bytes read as [2*k*f, d] and
  [d, k*f] (a dense FFN's time does not depend on its values; no extra gigabytes for Mixtral).

torch tensors come from the same arrays: torch.from_numpy (no copy) for fp32, .to(torch.bfloat16) for
bf16. The harness runs every call under torch.inference_mode() with torch.set_num_threads equal to
moe_ext.get_num_threads().
"""
import numpy as np

from .. import _api, reference

DTYPES = ("fp32", "bf16")
MOE_EXT_DTYPES = ("fp32", "bf16")


class Unavailable(Exception):
    """This implementation cannot run here; str() is the reason shown in the table and the JSON."""

    def __init__(self, reason, status="unavailable"):
        super().__init__(reason)
        self.status = status


def torch_module():
    try:
        import torch
    except ImportError:
        raise Unavailable("torch is not installed (pip install 'moe_ext[bench]')") from None
    return torch


def torch_dtype(dtype):
    torch = torch_module()
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]


def as_numpy(out):
    """An implementation's output as a float32 NumPy array (for the cross-check)."""
    if isinstance(out, np.ndarray):
        return out.astype(np.float32, copy=False)
    return out.detach().float().cpu().numpy()


class Peer:
    name = ""
    kind = "moe"  # "moe": computes the layer (a peer for the ratio); "dense": the reference point
    uses_torch = False
    description = ""

    def prepare(self, work, dtype):
        """A no-argument callable doing one forward of work's shape in `dtype` (conversions done here,
        outside the timing). Raises Unavailable when it cannot run."""
        raise NotImplementedError


class MoeExt(Peer):
    name = "moe_ext"
    description = "moe_ext.moe (fused C++ kernels, the tier in use, prepacked expert weights)"

    def prepare(self, work, dtype):
        if dtype not in MOE_EXT_DTYPES:
            raise Unavailable(f"not supported: dtype {dtype}", status="unsupported")
        x, w_router, k = work.x, work.w_router, work.shape.k
        if dtype == "bf16":
            import ml_dtypes

            x, w_router = x.astype(ml_dtypes.bfloat16), w_router.astype(ml_dtypes.bfloat16)
            w13 = _api.prepack(work.w13.astype(ml_dtypes.bfloat16))  # the bf16 copies die here
            w2 = _api.prepack(work.w2.astype(ml_dtypes.bfloat16))
        else:
            w13, w2 = _api.prepack(work.w13), _api.prepack(work.w2)
        return lambda: _api.moe(x, w_router, w13, w2, k)


class MoeExtPlain(Peer):
    name = "moe_ext_plain"
    kind = "user_path"  # moe_ext itself: not a peer in the ratios, compared with the fastest peer and moe_ext
    description = "moe_ext.moe on plain (unpacked) weight arrays: the NumPy user's path"

    def prepare(self, work, dtype):
        if dtype not in MOE_EXT_DTYPES:
            raise Unavailable(f"not supported: dtype {dtype}", status="unsupported")
        x, w_router, w13, w2, k = work.x, work.w_router, work.w13, work.w2, work.shape.k
        if dtype == "bf16":
            import ml_dtypes

            x, w_router, w13, w2 = (a.astype(ml_dtypes.bfloat16) for a in (x, w_router, w13, w2))
        return lambda: _api.moe(x, w_router, w13, w2, k)


class MoeExtTorch(Peer):
    name = "moe_ext_torch"
    kind = "user_path"
    uses_torch = True
    description = "torch.ops.moe_ext.moe on the torch peers' tensors (nothing prepacked): the PyTorch user's path"

    def prepare(self, work, dtype):
        torch = torch_module()
        try:
            import moe_ext.torch  # noqa: F401 - registers torch.ops.moe_ext
        except ImportError as e:
            raise Unavailable(f"moe_ext.torch cannot be imported: {e}") from None
        x, w_router, w13, w2 = work.torch_arrays(torch_dtype(dtype))
        k = work.shape.k
        op = torch.ops.moe_ext.moe

        def forward():
            with torch.inference_mode():
                return op(x, w_router, w13, w2, k, "swiglu", "softmax", True, 1.0, None, None, None, None, None)

        return forward


class Reference(Peer):
    name = "reference"
    description = "moe_ext.reference.moe, NumPy, float32 inputs so float32 compute"

    def prepare(self, work, dtype):
        if dtype != "fp32":
            raise Unavailable("not available: NumPy has no bfloat16")
        x, w_router, w13, w2, k = work.x, work.w_router, work.w13, work.w2, work.shape.k
        return lambda: reference.moe(x, w_router, w13, w2, k)


def _torch_route(torch, x, w_router, k):
    """Mixtral routing: logits in the activations' dtype, softmax in float32, top-k, renormalise."""
    F = torch.nn.functional
    probs = F.softmax(F.linear(x, w_router), dim=1, dtype=torch.float)
    weights, ids = torch.topk(probs, k, dim=-1)
    weights /= weights.sum(dim=-1, keepdim=True)
    return weights.to(x.dtype), ids


class TorchEager(Peer):
    name = "torch_eager"
    uses_torch = True
    description = "PyTorch eager, the Hugging Face Mixtral sparse-MoE block's loop over experts"

    def prepare(self, work, dtype):
        torch = torch_module()
        F = torch.nn.functional
        x, w_router, w13, w2 = work.torch_arrays(torch_dtype(dtype))
        E, f, k = work.shape.E, work.shape.f, work.shape.k
        # The experts' nn.Linear weights: w1 (gate) [f,d], w3 (up) [f,d], w2 [d,f]; views, no copies.
        w1 = [w13[e, :f] for e in range(E)]
        w3 = [w13[e, f:] for e in range(E)]
        w2s = [w2[e] for e in range(E)]

        def forward():
            with torch.inference_mode():
                T, d = x.shape
                routing_weights, selected = _torch_route(torch, x, w_router, k)
                final = torch.zeros((T, d), dtype=x.dtype)
                expert_mask = F.one_hot(selected, num_classes=E).permute(2, 1, 0)  # [E, k, T]
                expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
                for e in expert_hit.view(-1).tolist():
                    idx, top_x = torch.where(expert_mask[e])
                    current = x.index_select(0, top_x)
                    h = F.silu(F.linear(current, w1[e])) * F.linear(current, w3[e])
                    out = F.linear(h, w2s[e]) * routing_weights[top_x, idx, None]
                    final.index_add_(0, top_x, out.to(x.dtype))
                return final

        return forward


def grouped_mm_probe(dtype):
    """None if torch._grouped_mm runs on the CPU in this dtype (and matches a loop of matmuls), else
    the reason it does not."""
    try:
        torch = torch_module()
    except Unavailable as e:
        return str(e)
    if not hasattr(torch, "_grouped_mm"):
        return f"not available: torch {torch.__version__} has no torch._grouped_mm"
    try:
        with torch.inference_mode():
            gen = torch.Generator().manual_seed(0)
            a = torch.randn(10, 16, generator=gen).to(torch_dtype(dtype))
            w = torch.randn(4, 8, 16, generator=gen).to(torch_dtype(dtype))  # [E, N, K], as w13
            offs = torch.tensor([3, 3, 7, 10], dtype=torch.int32)  # one empty group
            out = torch._grouped_mm(a, w.transpose(1, 2), offs=offs)
            want = torch.cat([a[0:3] @ w[0].T, a[3:7] @ w[2].T, a[7:10] @ w[3].T])
            err = float((out.float() - want.float()).abs().max())
            if not err <= 1e-2 * float(want.float().abs().max()):
                return f"not available: torch._grouped_mm on CPU differs from a matmul loop ({err:.3g})"
    except Exception as e:  # noqa: BLE001 - any failure means "does not run here"
        return f"not available: torch._grouped_mm raised on CPU ({type(e).__name__}: {str(e)[:200]})"
    return None


class TorchGroupedMM(Peer):
    name = "torch_grouped_mm"
    uses_torch = True
    description = "PyTorch: routing, sort by expert, torch._grouped_mm for w13 and w2, index_add_"

    def prepare(self, work, dtype):
        torch = torch_module()
        reason = grouped_mm_probe(dtype)
        if reason:
            raise Unavailable(reason)
        F = torch.nn.functional
        x, w_router, w13, w2 = work.torch_arrays(torch_dtype(dtype))
        E, f, k = work.shape.E, work.shape.f, work.shape.k
        w13t = w13.transpose(1, 2)  # [E, d, 2f] view: out = a @ w13[e].T
        w2t = w2.transpose(1, 2)  # [E, f, d]

        def forward():
            with torch.inference_mode():
                T, d = x.shape
                weights, ids = _torch_route(torch, x, w_router, k)
                flat = ids.view(-1)
                order = torch.argsort(flat, stable=True)  # copies grouped by expert, token order kept
                token = torch.div(order, k, rounding_mode="floor")
                offs = torch.cumsum(torch.bincount(flat, minlength=E), 0, dtype=torch.int32)
                h = torch._grouped_mm(x.index_select(0, token), w13t, offs=offs)  # [T*k, 2f]
                a = F.silu(h[:, :f]) * h[:, f:]
                y_perm = torch._grouped_mm(a, w2t, offs=offs) * weights.view(-1)[order, None]
                return torch.zeros((T, d), dtype=x.dtype).index_add_(0, token, y_perm)

        return forward


class Dense(Peer):
    name = "dense"
    kind = "dense"
    uses_torch = True
    description = ("dense equivalent: one SwiGLU FFN of intermediate size k*f (the FLOPs per token of "
                   "the k active experts), no router, torch")

    def prepare(self, work, dtype):
        torch = torch_module()
        F = torch.nn.functional
        x = work.torch_arrays(torch_dtype(dtype))[0]
        w13d, w2d = work.torch_dense(torch_dtype(dtype))
        kf = work.shape.k * work.shape.f

        def forward():
            with torch.inference_mode():
                h = F.linear(x, w13d)
                return F.linear(F.silu(h[:, :kf]) * h[:, kf:], w2d)

        return forward


PEERS = [MoeExt(), MoeExtPlain(), MoeExtTorch(), Reference(), TorchEager(), TorchGroupedMM(), Dense()]
BY_NAME = {p.name: p for p in PEERS}
NAMES = [p.name for p in PEERS]
