"""AdamW as a pure function of the gradient, so a training step can sit inside an autograd graph.

FLYT differentiates the downstream loss through one reference-model update, θ' = AdamW(θ, g).
`adamw_step` computes exactly what torch.optim.AdamW computes (decoupled weight decay, bias-
corrected moments), but out of place: the new moments and θ' are functions of g in the graph,
while the history (previous moments, step count) enters as constants. `AdamWState` holds that
history between steps and is what the checkpoint saves.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class AdamWHyper:
    lr: float
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    wd: float = 0.2  # applied only to the names in `decay` (weights with ndim >= 2)
    # A diagnostic (benchmarks/flyt_by_noise.py): a plain SGD step θ' = θ (1 - lr wd) - lr g instead,
    # so ∂θ'/∂g = -lr (no preconditioner); the moments are left as they were.
    sgd: bool = False


@dataclass
class AdamWState:
    """Per-parameter first and second moments and the number of steps taken (all detached)."""

    exp_avg: Params = field(default_factory=dict)
    exp_avg_sq: Params = field(default_factory=dict)
    step: int = 0

    @classmethod
    def zeros_like(cls, params: Params) -> "AdamWState":
        return cls({k: torch.zeros_like(v) for k, v in params.items()},
                   {k: torch.zeros_like(v) for k, v in params.items()}, 0)

    def state_dict(self) -> dict:
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "step": self.step}

    @classmethod
    def from_state_dict(cls, d: dict, device: torch.device | str = "cpu") -> "AdamWState":
        return cls({k: v.to(device) for k, v in d["exp_avg"].items()},
                   {k: v.to(device) for k, v in d["exp_avg_sq"].items()}, int(d["step"]))


def decayed_names(params: Params) -> frozenset[str]:
    """Weight decay on matrices and conv kernels only (as training.models.param_groups)."""
    return frozenset(k for k, v in params.items() if v.ndim >= 2)


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    # d sqrt(x)/dx is infinite at 0, and 0 * inf = NaN would poison the whole hypergradient for
    # a parameter whose gradient is exactly 0 (unused token embeddings on the first step). Where
    # x == 0 the value is 0 and the derivative is taken as 0 (a subgradient of |g| at g = 0).
    pos = x > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, x, torch.ones_like(x))), torch.zeros_like(x))


def adamw_step(params: Params, grads: Params, state: AdamWState, hp: AdamWHyper,
               decay: frozenset[str]) -> tuple[Params, Params, Params]:
    """One AdamW update, out of place: returns (θ', new exp_avg, new exp_avg_sq).

    θ' = θ (1 - lr wd) - lr m̂ / (sqrt(v̂) + eps),  m = β1 m₀ + (1-β1) g,  v = β2 v₀ + (1-β2) g²,
    m̂ = m / (1 - β1^t), v̂ = v / (1 - β2^t), t = state.step + 1. Differentiable in params and grads;
    state holds constants. Same arithmetic as torch.optim.AdamW (tests check it to rounding).
    """
    if hp.sgd:
        return ({k: p * (1 - hp.lr * hp.wd if k in decay else 1.0) - hp.lr * grads[k] for k, p in params.items()},
                dict(state.exp_avg), dict(state.exp_avg_sq))
    t = state.step + 1
    bc1 = 1 - hp.beta1 ** t
    bc2_sqrt = math.sqrt(1 - hp.beta2 ** t)
    new_params, new_m, new_v = {}, {}, {}
    for name, p in params.items():
        g = grads[name]
        m = state.exp_avg[name].to(g.dtype) * hp.beta1 + (1 - hp.beta1) * g
        v = state.exp_avg_sq[name].to(g.dtype) * hp.beta2 + (1 - hp.beta2) * g * g
        denom = _safe_sqrt(v) / bc2_sqrt + hp.eps
        shrink = 1 - hp.lr * hp.wd if name in decay else 1.0
        new_params[name] = p * shrink - (hp.lr / bc1) * m / denom
        new_m[name], new_v[name] = m, v
    return new_params, new_m, new_v


@torch.no_grad()
def adamw_update(params: Params, grads: Params, state: AdamWState, hp: AdamWHyper,
                 decay: frozenset[str]) -> tuple[Params, Params, Params]:
    """`adamw_step` without a graph, through torch's fused AdamW kernel: (θ', exp_avg, exp_avg_sq).

    The same arithmetic (tests compare it with adamw_step to rounding) at the cost of one
    optimiser step; the inputs are left untouched (the kernel updates copies in place)."""
    if hp.sgd:
        return adamw_step(params, grads, state, hp, decay)
    names = list(params)
    new_params = {k: torch.empty_like(params[k], memory_format=torch.contiguous_format) for k in names}
    new_m = {k: torch.empty_like(params[k], dtype=grads[k].dtype, memory_format=torch.contiguous_format) for k in names}
    new_v = {k: torch.empty_like(new_m[k]) for k in names}
    for out, src in ((new_params, params), (new_m, state.exp_avg), (new_v, state.exp_avg_sq)):  # multi-tensor copies
        torch._foreach_copy_([out[k] for k in names], [src[k].detach() for k in names])
    groups: dict[tuple, list[str]] = {}
    for k, p in new_params.items():  # one kernel call per device, dtype and weight decay
        groups.setdefault((p.device, p.dtype, grads[k].dtype, k in decay), []).append(k)
    for (device, _, _, decayed), names in groups.items():
        step = torch.tensor(float(state.step + 1), device=device)
        torch._fused_adamw_([new_params[k] for k in names], [grads[k].contiguous() for k in names],
                            [new_m[k] for k in names], [new_v[k] for k in names], [], [step] * len(names),
                            lr=hp.lr, beta1=hp.beta1, beta2=hp.beta2, weight_decay=hp.wd if decayed else 0.0,
                            eps=hp.eps, amsgrad=False, maximize=False)
    return new_params, new_m, new_v


# Elements per pass on a CPU: the Jacobian takes ~11 element-wise passes, which stream from memory
# when each runs over a whole tensor and mostly from L2 over blocks this size (~1.5x faster).
_CPU_BLOCK = 1 << 16
# A parameter with at least this many rows is a lookup table (token embeddings): a downstream batch
# touches a few of its rows, and the Jacobian is only needed where the cotangent is non-zero.
_TABLE_ROWS = 1 << 14


@torch.no_grad()
def adamw_jacobian_product(cot: Params, grads: Params, exp_avg: Params, exp_avg_sq: Params, hp: AdamWHyper,
                           step: int) -> Params:
    """cot ⊙ ∂θ'/∂g for the update `adamw_step` made at step `step` (1-based) from grads g to the
    moments exp_avg, exp_avg_sq (the new ones). Overwrites and returns cot.

    The update is element-wise, so ∂θ'/∂g is diagonal; in closed form, with m, v the new moments,
    denom = sqrt(v / bc2) + eps and u = m / denom:
        ∂θ'/∂g = −(lr / bc1) [ (1−β1) − u · ∂denom/∂g ] / denom,
        ∂denom/∂g = (1−β2) g / (sqrt(v) sqrt(bc2))   (0 where v = 0, as _safe_sqrt's derivative).
    This is what autograd through adamw_step gives (tests compare them), without its graph. On a
    GPU all tensors go through each pass together (multi-tensor kernels: a dozen launches, not a
    dozen per parameter); on a CPU block by block, and on a lookup table only over the rows the
    cotangent touches.
    """
    if hp.sgd:
        torch._foreach_mul_(list(cot.values()), -hp.lr)
        return cot
    cpu = next(iter(cot.values())).device.type == "cpu" if cot else True
    parts: list[tuple[torch.Tensor, ...]] = []  # (c, g, m, v) flat, c written in place
    scatter: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (table, rows, part): written back
    for name, c in cot.items():
        if not c.is_contiguous():  # written through flat views below
            c = cot[name] = c.contiguous()
        g, m, v = grads[name], exp_avg[name], exp_avg_sq[name]
        # (not on a GPU: its bandwidth makes a whole table cheap, and finding the rows needs a host sync)
        if cpu and c.ndim >= 2 and c.shape[0] >= _TABLE_ROWS:
            flat_rows = c.reshape(c.shape[0], -1)
            rows = ((flat_rows.amax(dim=1) != 0) | (flat_rows.amin(dim=1) != 0)).nonzero().squeeze(1)
            if 2 * rows.numel() < c.shape[0]:
                part = c[rows]
                parts.append((part.view(-1), g[rows].reshape(-1), m[rows].reshape(-1), v[rows].reshape(-1)))
                scatter.append((c, rows, part))  # the other rows are 0 and stay 0
                continue
        parts.append(tuple(x.reshape(-1) for x in (c, g, m, v)))
    for group in _groups(parts, _CPU_BLOCK if cpu else None):
        _jacobian_lists(*(list(x) for x in zip(*group)), hp, step)
    for table, rows, part in scatter:
        table.index_copy_(0, rows, part)
    return cot


def _groups(parts: list[tuple[torch.Tensor, ...]], block: int | None):
    """Batches of aligned 1-D views for the multi-tensor passes: all of them (block None), or
    slices packed into batches of about `block` elements (small tensors share one)."""
    if block is None:
        if parts:
            yield parts
        return
    group, size = [], 0
    for flat in parts:
        n = flat[0].numel()
        for lo in range(0, n, block):
            group.append(tuple(x[lo:lo + block] for x in flat))
            size += min(block, n - lo)
            if size >= block:
                yield group
                group, size = [], 0
    if group:
        yield group


def _jacobian_lists(c: list[torch.Tensor], g: list[torch.Tensor], m: list[torch.Tensor], v: list[torch.Tensor],
                    hp: AdamWHyper, step: int) -> None:
    """c *= ∂θ'/∂g over lists of 1-D views (each c a view written in place), in 11 passes:
    ∂θ'/∂g = (k c₂ g m / (sqrt(v) denom) − k (1−β1)) / denom with k = lr / bc1, c₂ = (1−β2) / sqrt(bc2).
    Where v = 0, g = 0 (v accumulates g²), so the clamped divisor gives the 0 of _safe_sqrt's derivative."""
    k, bc2_sqrt = hp.lr / (1 - hp.beta1 ** step), math.sqrt(1 - hp.beta2 ** step)
    root = torch._foreach_sqrt(v)
    denom = torch._foreach_mul(root, 1.0 / bc2_sqrt)
    torch._foreach_add_(denom, hp.eps)
    t = torch._foreach_mul(g, m)
    torch._foreach_mul_(root, denom)
    torch._foreach_clamp_min_(root, torch.finfo(v[0].dtype).tiny)
    torch._foreach_div_(t, root)
    torch._foreach_mul_(t, k * (1 - hp.beta2) / bc2_sqrt)
    torch._foreach_sub_(t, k * (1 - hp.beta1))
    torch._foreach_mul_(c, t)
    torch._foreach_div_(c, denom)
