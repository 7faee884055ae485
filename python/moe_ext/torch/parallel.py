"""Expert parallelism over torch.distributed: `ExpertParallelMoE`, the sharded counterpart of `MoE`.

Each rank of a process group owns a contiguous block of E / world_size experts and a replica of the
router. A forward pass on one rank's own tokens:

1. routes them (replicated router) and orders the T*k copies by expert with `permute`; experts are laid
   out in blocks by owner, so that order is also "by destination rank", and the permuted rows are the
   send buffer as they are;
2. exchanges the per-expert copy counts (`all_to_all_single`, E / world_size integers per pair of ranks),
   and with a capacity a second small exchange of grants (see below);
3. exchanges the copies (`all_to_all_single`, uneven splits);
4. runs the local experts on what it received with `experts` (k = 1, weight 1: a multiply by 1.0 is
   exact), which groups the rows by local expert inside the kernel;
5. sends the results back by the reverse exchange and combines them at the token's rank with
   `unpermute` and the routing weights.

Both exchanges are autograd functions whose backward is the reverse exchange, so the expert weights'
gradients arrive on the rank that owns the expert and the input's gradient on the rank that owns the token.
The backward pass is collective too: every rank of the group must run backward through every forward call
(a rank with no tokens included), or the others wait in the exchange until the group's timeout.

Global token order (capacity): the copies of expert e are ordered by source rank, then the source's token
index, then slot: the order `permute` gives the concatenation x_0, x_1, ..., x_{W-1} of the ranks' inputs.
With `capacity=C` an expert keeps its first C copies in that order, so the sharded layer equals the
unsharded layer with capacity C applied to that concatenation. The owner decides the grants: it receives
the counts of every source, and sends each source back how many of its copies it keeps (a prefix, in the
source's own token order); the source then sends only those, and dropped copies contribute nothing.

Router gradients: the router is replicated and each rank's `w_router.grad` covers its own tokens only;
all-reduce them (sum) as for any replicated parameter (DDP does that).
"""
import math

import torch
import torch.distributed as dist
from torch import nn

from . import _functional as F
from . import _ops


class _AllToAll(torch.autograd.Function):
    """all_to_all_single of the rows of x with uneven splits; backward is the reverse exchange.

    (torch.distributed.nn.functional.all_to_all_single does the same but is deprecated in torch 2.13 and
    warns on every call; this is the same few lines on the non-deprecated collective.)"""

    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):
        ctx.splits = (send_splits, recv_splits)
        ctx.group = group
        return _all_to_all(x, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        return _all_to_all(grad, recv_splits, send_splits, ctx.group), None, None, None


def _all_to_all(x, send_splits, recv_splits, group):
    out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=list(recv_splits),
                           input_split_sizes=list(send_splits), group=group)
    return out


def _exchange_counts(counts, group):
    """counts [W, n] int64 (row r: what this rank sends to rank r) -> [W, n] (row s: what s sends here)."""
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts.contiguous(), group=group)
    return out


def _group_info(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ExpertParallelMoE: torch.distributed is not initialised "
                           "(call torch.distributed.init_process_group first)")
    return dist.get_rank(group), dist.get_world_size(group)


def local_expert_block(num_experts, rank, world_size):
    """The experts rank `rank` owns: a contiguous block of num_experts // world_size ids."""
    if num_experts % world_size != 0:
        raise ValueError(f"num_experts: expected a multiple of the group's world size {world_size} "
                         f"(each rank owns E / world_size experts); got {num_experts}")
    n = num_experts // world_size
    return range(rank * n, (rank + 1) * n)


class ExpertParallelMoE(nn.Module):
    """An MoE layer whose experts are sharded over a torch.distributed process group.

    Parameters (the names of `MoE`): `w_router [E, d]` and `router_bias [E]` (if any) replicated,
    `w13 [E_l, 2f, d]` (gated activations) or `w1 [E_l, f, d]`, and `w2 [E_l, d, f]`, where
    E_l = E / world_size and row i of the expert parameters is expert `local_expert_ids[i]`; a
    `correction_bias [E]` buffer (replicated) if the layer has one. Build it from an unsharded layer with
    `ExpertParallelMoE.from_moe(moe, group)` on every rank.

    `forward(x)` takes this rank's tokens `[..., d]` (any number, zero included) and returns `[..., d]`,
    equal to the unsharded layer applied to them. It is a collective: every rank of the group must call it
    (and run backward through it) the same number of times, in the same order.

    `capacity` (int >= 0) or `capacity_factor` (float > 0, giving C = ceil(factor * T_global * k / E) with
    T_global the group's total token count, one more all-reduce) limit the copies each expert keeps, in the
    global token order described in the module docstring. After a forward: `last_expert_counts [E]` holds
    the copies this rank's tokens sent to each expert (before drops), `last_num_dropped` the copies they
    lost, and `last_splits` the (sent, received) rows per rank of the dispatch exchange.
    """

    def __init__(self, w_router, w13_or_w1, w2, *, num_experts, top_k, activation="swiglu",
                 scoring="softmax", renormalize=True, scale=1.0, router_bias=None, correction_bias=None,
                 n_group=None, topk_group=None, capacity=None, capacity_factor=None, group=None):
        super().__init__()
        self.group = group
        self.rank, self.world_size = _group_info(group)
        self.num_experts = int(num_experts)
        self.local_expert_ids = local_expert_block(self.num_experts, self.rank, self.world_size)
        self.num_local_experts = len(self.local_expert_ids)
        if capacity is not None and capacity_factor is not None:
            raise ValueError("capacity_factor: expected None when capacity is given; "
                             f"got capacity={capacity!r}, capacity_factor={capacity_factor!r}")
        if capacity is not None and (isinstance(capacity, bool) or int(capacity) != capacity
                                     or capacity < 0):
            raise ValueError(f"capacity: expected an int >= 0 or None; got {capacity!r}")
        if capacity_factor is not None and not (capacity_factor > 0 and math.isfinite(capacity_factor)):
            raise ValueError(f"capacity_factor: expected a finite float > 0 or None; got {capacity_factor!r}")
        activation = _ops._spec(activation)  # any description (moe_ext.Activation), kept as its string
        self.top_k, self.activation = int(top_k), activation
        self.scoring, self.renormalize, self.scale = scoring, bool(renormalize), float(scale)
        self.n_group, self.topk_group = n_group, topk_group
        self.capacity = None if capacity is None else int(capacity)
        self.capacity_factor = capacity_factor
        for name, w in (("w13_or_w1", w13_or_w1), ("w2", w2)):
            if w.dim() != 3 or w.shape[0] != self.num_local_experts:
                raise ValueError(f"{name}: expected this rank's block ({self.num_local_experts}, ., .) of "
                                 f"the experts; got shape {tuple(w.shape)}")
        self.w_router = _param(w_router)
        self.router_bias = None if router_bias is None else _param(router_bias)
        if correction_bias is not None:
            self.register_buffer("correction_bias", correction_bias.detach().clone())
        else:
            self.correction_bias = None
        if _ops._gated(activation):
            self.w13 = _param(w13_or_w1)
        else:
            self.w1 = _param(w13_or_w1)
        self.w2 = _param(w2)
        self.last_expert_counts = None
        self.last_num_dropped = 0
        self.last_splits = None

    @property
    def w13_or_w1(self):
        return self.w13 if _ops._gated(self.activation) else self.w1

    @classmethod
    def from_moe(cls, moe, group=None, *, capacity_factor=None):
        """The shard of `moe` (a `moe_ext.torch.MoE`, identical on every rank) that this rank keeps: its
        block of experts and the router, copied; routing, activation and capacity options taken over.
        `capacity_factor` replaces the layer's `capacity` by ceil(factor * T_global * k / E)."""
        rank, world = _group_info(group)
        for name in ("w_router", "w2", "w13_or_w1", "top_k", "activation"):
            if not hasattr(moe, name):
                raise TypeError(f"moe: expected a moe_ext.torch.MoE (attribute {name!r}); "
                                f"got {type(moe).__name__}")
        if getattr(moe, "b2", None) is not None:
            raise ValueError("moe: expert biases (MoE(bias=True)) are not supported by ExpertParallelMoE yet")
        E = moe.w_router.shape[0]
        block = local_expert_block(E, rank, world)
        local = slice(block.start, block.stop)
        return cls(moe.w_router, moe.w13_or_w1[local], moe.w2[local], num_experts=E, top_k=moe.top_k,
                   activation=moe.activation, scoring=moe.scoring, renormalize=moe.renormalize,
                   scale=moe.scale, router_bias=moe.router_bias, correction_bias=moe.correction_bias,
                   n_group=moe.n_group, topk_group=moe.topk_group,
                   capacity=moe.capacity if capacity_factor is None else None,
                   capacity_factor=capacity_factor, group=group)

    def extra_repr(self):
        return (f"num_experts={self.num_experts}, local_expert_ids={self.local_expert_ids}, "
                f"top_k={self.top_k}, activation={self.activation!r}, world_size={self.world_size}")

    # ------------------------------------------------------------------------------------------------
    def forward(self, x):
        shape = x.shape
        if x.dim() < 1 or shape[-1] != self.w_router.shape[1]:
            # Checked before the first collective; the other ranks still wait for this one until the
            # group's timeout: an error on one rank cannot be reported to the others.
            raise ValueError(f"x: expected shape (..., {self.w_router.shape[1]}) (d = w_router.shape[1]); "
                             f"got {tuple(shape)}")
        x = x.reshape(-1, shape[-1])
        T, E, W, El = x.shape[0], self.num_experts, self.world_size, self.num_local_experts
        weights, ids = F.route(x, self.w_router, self.top_k, scoring=self.scoring,
                               renormalize=self.renormalize, scale=self.scale, bias=self.router_bias,
                               correction_bias=self.correction_bias, n_group=self.n_group,
                               topk_group=self.topk_group)[:2]
        x_perm, offsets, perm_rows = F.permute(x, ids, E)[:3]
        counts = (offsets[1:] - offsets[:-1]).to(torch.int64)
        self.last_expert_counts = counts
        counts = counts.view(W, El)
        recv_counts = _exchange_counts(counts, self.group)

        capacity = self._capacity(T)
        if capacity is not None:
            # The owner grants each source a prefix of its copies (sources in rank order), then tells it.
            before = torch.cumsum(recv_counts, 0) - recv_counts  # copies from lower ranks, per expert
            recv_counts = (capacity - before).clamp(min=0).minimum(recv_counts)
            kept = _exchange_counts(recv_counts, self.group).reshape(-1)  # [E], this rank's copies
            x_perm, perm_rows = _drop(x_perm, offsets, perm_rows, kept)
            counts = kept.view(W, El)
        self.last_num_dropped = int(perm_rows.numel() - x_perm.shape[0])

        send_splits = counts.sum(1).tolist()
        recv_splits = recv_counts.sum(1).tolist()
        self.last_splits = (send_splits, recv_splits)
        x_recv = _AllToAll.apply(x_perm, send_splits, recv_splits, self.group)
        # Rows arrive by source rank, then local expert, then token: tell experts() whose each row is.
        local_ids = torch.repeat_interleave(
            torch.arange(El, device=x.device, dtype=torch.int32).repeat(W), recv_counts.reshape(-1),
            output_size=x_recv.shape[0]).view(-1, 1)
        ones = torch.ones(local_ids.shape, device=x.device, dtype=torch.float32)
        y_recv = _local_experts(x_recv, self.w13_or_w1, self.w2, ones, local_ids, self.activation)
        y_perm = _AllToAll.apply(y_recv, recv_splits, send_splits, self.group)
        return F.unpermute(y_perm, perm_rows, weights).reshape(shape)

    def _capacity(self, T):
        if self.capacity_factor is None:
            return self.capacity
        device = self.w2.device if dist.get_backend(self.group) == "nccl" else "cpu"
        total = torch.tensor([T], dtype=torch.int64, device=device)
        dist.all_reduce(total, group=self.group)
        return math.ceil(self.capacity_factor * int(total) * self.top_k / self.num_experts)


# ----------------------------------------------------------------------------------------------------
def _local_experts(x, w13_or_w1, w2, weights, ids, activation):
    """F.experts on the received rows (none on a rank nobody routed to: the weights still get a zero
    gradient, not None)."""
    return F.experts(x, w13_or_w1, w2, weights, ids, activation=activation)


def _param(t):
    return nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad)


def _drop(x_perm, offsets, perm_rows, kept):
    """Keep the first kept[e] rows of each expert's segment of x_perm (token order); perm_rows of the
    dropped copies become -1 and the others index the compacted rows."""
    counts = (offsets[1:] - offsets[:-1]).to(torch.int64)
    device = x_perm.device
    expert_of_row = torch.repeat_interleave(torch.arange(counts.numel(), device=device), counts,
                                            output_size=x_perm.shape[0])
    pos = torch.arange(x_perm.shape[0], device=device) - offsets[:-1].to(torch.int64)[expert_of_row]
    keep = pos < kept[expert_of_row]
    new_index = torch.cumsum(keep.to(torch.int64), 0) - 1
    new_index = torch.where(keep, new_index, torch.full_like(new_index, -1))
    flat = perm_rows.reshape(-1).to(torch.int64)
    remapped = torch.where(flat >= 0, new_index[flat.clamp(min=0)], torch.full_like(flat, -1))
    return x_perm[keep], remapped.to(perm_rows.dtype).view(perm_rows.shape)
