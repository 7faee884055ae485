"""Plain-PyTorch float64 implementations of the moe_ext ops (autograd gives their gradients): the ground
truth the moe_ext.torch ops and their backward are compared against. Selection (topk_ids) is taken as
given: it is piecewise constant, so gradients flow only through the chosen experts' scores."""
import torch
import torch.nn.functional as F

GATED = ("swiglu", "geglu")


def route_weights(x, w_router, topk_ids, *, scoring="softmax", renormalize=True, scale=1.0, bias=None):
    """(topk_weights, probs) of route() for the given ids."""
    logits = x @ w_router.t()
    if bias is not None:
        logits = logits + bias
    probs = torch.softmax(logits, -1) if scoring == "softmax" else torch.sigmoid(logits)
    s = probs.gather(1, topk_ids.long())
    if renormalize:
        total = s.sum(1, keepdim=True)
        s = torch.where(total != 0, s / torch.where(total != 0, total, torch.ones_like(total)), s)
    return s * scale, probs


def activation(h, act):
    """A moe_ext activation description (preset name, canonical string or moe_ext.Activation): gated ones
    act(gate) * (up + up_offset) with gate/up concatenated or interleaved and clamped by the limit, then
    softcapped (c tanh(z / c): up by up_softcap; gate_softcap replaces silu's linear factor)."""
    import moe_ext
    a = moe_ext.activation_from(act)
    fn = {"silu": lambda z: z * torch.sigmoid(a.alpha * z), "gelu": F.gelu,
          "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"), "relu": F.relu,
          "relu2": lambda z: F.relu(z) ** 2}[a.fn]
    if a.gate_softcap is not None:
        fn = lambda z: a.gate_softcap * torch.tanh(z / a.gate_softcap) * torch.sigmoid(a.alpha * z)  # noqa: E731
    if not a.gated:
        return fn(h)
    f = h.shape[1] // 2
    gate, up = (h[:, 0::2], h[:, 1::2]) if a.interleaved else (h[:, :f], h[:, f:])
    if a.limit is not None:
        gate, up = gate.clamp(max=a.limit), up.clamp(-a.limit, a.limit)
    if a.up_softcap is not None:
        up = a.up_softcap * torch.tanh(up / a.up_softcap)
    return fn(gate) * (up + a.up_offset)


def experts(x, w13, w2, topk_weights, topk_ids, act="swiglu", b13=None, b2=None):
    """The HF-style loop over experts, in the dtype of the inputs (optional expert biases)."""
    y = torch.zeros_like(x)
    for e in range(w2.shape[0]):
        token, slot = torch.where(topk_ids == e)
        if token.numel() == 0:
            continue
        h = x[token] @ w13[e].t() + (0 if b13 is None else b13[e])
        out = activation(h, act) @ w2[e].t() + (0 if b2 is None else b2[e])
        y = y.index_add(0, token, out * topk_weights[token, slot, None])
    return y


def grouped_gemm(a, w, offsets):
    parts = [a[int(offsets[e]):int(offsets[e + 1])] @ w[e].t() for e in range(w.shape[0])]
    return torch.cat(parts) if parts else a.new_zeros((0, w.shape[1]))


def unpermute(y_perm, perm_rows, topk_weights):
    y = y_perm.new_zeros((perm_rows.shape[0], y_perm.shape[1]))
    for j in range(perm_rows.shape[1]):
        rows = perm_rows[:, j].long()
        keep = rows >= 0
        y = y + torch.where(keep[:, None], topk_weights[:, j, None] * y_perm[rows.clamp(min=0)], 0)
    return y


def permute(x, perm_rows, M):
    """x_perm [M, d] for the given perm_rows (the gather permute() does)."""
    x_perm = x.new_zeros((M, x.shape[1]))
    rows = perm_rows.reshape(-1).long()
    src = torch.arange(x.shape[0]).repeat_interleave(perm_rows.shape[1])
    keep = rows >= 0
    return x_perm.index_add(0, rows[keep], x[src[keep]])
