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
    new_params = {k: p.detach().clone(memory_format=torch.contiguous_format) for k, p in params.items()}
    new_m = {k: state.exp_avg[k].to(grads[k].dtype, copy=True) for k in params}
    new_v = {k: state.exp_avg_sq[k].to(grads[k].dtype, copy=True) for k in params}
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


# Elements per pass on a CPU: the Jacobian takes ~12 element-wise passes, which stream from memory
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
    This is what autograd through adamw_step gives (tests compare them), without its graph: on a CPU
    block by block, and on a lookup table only over the rows the cotangent touches.
    """
    step_size, bc2_sqrt = hp.lr / (1 - hp.beta1 ** step), math.sqrt(1 - hp.beta2 ** step)
    for name, c in cot.items():
        if not c.is_contiguous():  # written through flat views below
            c = cot[name] = c.contiguous()
        g, m, v = grads[name], exp_avg[name], exp_avg_sq[name]
        # (not on a GPU: its bandwidth makes a whole table cheap, and finding the rows needs a host sync)
        if c.device.type == "cpu" and c.ndim >= 2 and c.shape[0] >= _TABLE_ROWS:
            rows = c.reshape(c.shape[0], -1).abs().amax(dim=1).nonzero().squeeze(1)
            if 2 * rows.numel() < c.shape[0]:
                part = c[rows]
                _jacobian_block(part.view(-1), g[rows].reshape(-1), m[rows].reshape(-1), v[rows].reshape(-1),
                                hp, step_size, bc2_sqrt)
                c.index_copy_(0, rows, part)  # the other rows are 0 and stay 0
                continue
        flat = [x.reshape(-1) for x in (c, g, m, v)]
        n = c.numel()
        block = n if c.device.type != "cpu" else _CPU_BLOCK
        for lo in range(0, n, block):
            _jacobian_block(*(x[lo:lo + block] for x in flat), hp, step_size, bc2_sqrt)
    return cot


def _jacobian_block(c, g, m, v, hp: AdamWHyper, step_size: float, bc2_sqrt: float) -> None:
    """c *= ∂θ'/∂g on one block of 1-D views (c is a view written in place)."""
    root = v.sqrt()
    denom = root.div(bc2_sqrt).add_(hp.eps)
    zero = root == 0
    # (1−β1) − u · ∂denom/∂g with u = m / denom and ∂denom/∂g = 0 where v = 0
    inner = g.mul((1 - hp.beta2) / bc2_sqrt).div_(root.masked_fill_(zero, 1.0)).masked_fill_(zero, 0.0)
    inner.mul_(m).div_(denom).neg_().add_(1 - hp.beta1)
    c.mul_(inner.div_(denom)).mul_(-step_size)
