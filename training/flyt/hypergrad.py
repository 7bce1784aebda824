"""FLYT's hypergradient: how the downstream loss after one reference-model step depends on the
upstream example weights, computed without a Hessian.

Objective (flyt.md): J(φ) = L_down(θ'), θ' = AdamW(θ, g(w)), g(w) = ∇θ L_up(θ; w), w = softmax(q_φ(Ψ)).

By the chain rule dJ/dw = (∂θ'/∂g · ∂g/∂w)ᵀ ∇θ' L_down, computed in three passes:

  1. g = ∇θ L_up(θ; w), detached (one forward + backward of the reference model).
  2. v = ∂ L_down(AdamW(θ, g)) / ∂g — one forward + backward on the downstream batch at θ', times
     the AdamW update's Jacobian in g, which is diagonal (the update is element-wise) and taken in
     closed form. Also gives ∂J/∂ρ of the downstream head.
  3. d = dJ/dw = ∂/∂w ⟨∇θ L_up(θ; w), v⟩. L_up depends on θ only through the batch embeddings
     E = (u, t, τ) = f_θ(x), so ⟨∇θ L_up, v⟩ = ⟨∇_E L_up(E; w), Ė⟩ with Ė = J_θ f · v, the JVP of
     the embeddings along v, taken one of two ways (`upstream_gradient`'s jvp, same values):
     "backward" differentiates pass 1's backward (its transpose, reusing the saved activations);
     "forward" runs the model once more in forward-mode AD, so pass 1 keeps the fast kernels and
     needs no graph of its backward. What is left is a mixed second derivative of a function of
     a few [B, D] tensors at embedding level: in closed form for weighted_clip_loss
     (losses.weighted_clip_loss_jvp_grad), with torch.func for any other upstream loss.
  Then ∇φ J = VJP of w = softmax(q_φ(Ψ)) with d (left to the caller: `scorer_backward`).

`brute_force_objective` builds J with create_graph=True through the unrolled update instead;
tests check the two agree. Everything is written for data parallelism: `Comm` gathers the
global batch (the softmax of the weights is over the global batch) and sums per-rank gradients;
in one process it is the identity.

The model must be a function of its parameters and the batch only: FLYT runs the reference
CLIP in eval mode (BatchNorm uses its running statistics, which stay fixed; there is no dropout
in open_clip's CLIPs by default). BatchNorm in train mode would still be covered by the maths
(E is then a function of the whole batch), but its running-statistics side effects do not mix
with torch.func, and it couples ranks.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from clipsift.training.flyt.adamw import (AdamWHyper, AdamWState, Params, adamw_jacobian_product, adamw_step,
                                          adamw_update)
from clipsift.training.flyt.losses import weighted_clip_loss, weighted_clip_loss_jvp_grad

Embeddings = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (images [B,D], texts [B,D], τ scalar)
JVP_MODES = ("backward", "forward")  # how the embeddings' JVP is taken (module docstring, pass 3)


class FunctionalCLIP:
    """An open_clip CLIP called with explicit parameters: (θ, images, tokens) -> (u, t, τ)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.buffers = dict(model.named_buffers())

    def params(self) -> Params:
        return {k: p.detach() for k, p in self.model.named_parameters() if p.requires_grad}

    def __call__(self, params: Params, images: torch.Tensor, tokens: torch.Tensor) -> Embeddings:
        out = functional_call(self.model, (params, self.buffers), (images, tokens))
        if isinstance(out, dict):
            return out["image_features"], out["text_features"], out["logit_scale"]
        return out[0], out[1], out[2]

    def load(self, params: Params) -> None:
        """Copy θ' into the module (the reference model keeps training)."""
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if name in params:
                    p.copy_(params[name])


class Comm:
    """Collectives over the data-parallel group; the identity in one process."""

    def __init__(self, use_dist: bool = True) -> None:
        self.distributed = use_dist and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1

    def gather(self, x: torch.Tensor, keep_grad: bool = False) -> torch.Tensor:
        """Concatenate every rank's rows (rank order). keep_grad: this rank's rows stay in the
        graph, so a loss on the global batch sends gradient into the local rows only."""
        if not self.distributed:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.detach().contiguous())
        if keep_grad:
            parts[self.rank] = x
        return torch.cat(parts)

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        if self.distributed:
            for t in tensors:
                dist.all_reduce(t)

    def mean_(self, tensors: list[torch.Tensor]) -> None:
        if self.distributed:
            for t in tensors:
                dist.all_reduce(t)
                t.div_(self.world_size)

    def local_rows(self, n_global: int) -> slice:
        per = n_global // self.world_size
        return slice(self.rank * per, (self.rank + 1) * per)


LOCAL = Comm(use_dist=False)


@dataclass
class StepResult:
    d: torch.Tensor  # dJ/dw over the global batch
    params: Params  # θ' (detached): the reference model after the step
    state: AdamWState  # AdamW history after the step
    extra_grads: list[torch.Tensor]  # ∂J/∂ of the downstream head's own parameters (ρ)
    up_loss: torch.Tensor  # L_up(θ; w), 0-dim and detached (float() waits for the device: read it when logging)
    down_loss: torch.Tensor  # L_down(θ') (this rank's share), likewise


DownLoss = Callable[[Params], torch.Tensor]  # θ' -> downstream loss (closes over batch and ρ)
# (u, t, τ, w) -> the upstream loss: weighted_clip_loss, or a variant of it (a diagnostic's)
UpLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Project = Callable[[Params], Params]  # applied to θ' after the update (the logit-scale clamp)


def _full(x: torch.Tensor) -> torch.Tensor:
    """Up-cast autocast outputs (bf16/fp16) to fp32 for the losses; fp32/fp64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _with_zeros(grads, params: Params) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params.values())]


def _frozen_batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
                       momentum=0.1, eps=1e-5):
    if training or running_mean is None:
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -running_mean * scale
    if bias is not None:
        shift = shift + bias
    shape = (1, -1) + (1,) * (input.dim() - 2)
    return torch.addcmul(shift.view(shape), input, scale.view(shape))


class _AffineBatchNorm(TorchFunctionMode):
    """BatchNorm with running statistics written as the affine map it is (x·s + b). Same values;
    its second derivative is then a few element-wise ops, where batch_norm's general double
    backward (batch statistics included) cost more than the whole rest of a ResNet's tangent pass."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.batch_norm:
            return _frozen_batch_norm(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


@dataclass
class Upstream:
    g: list[torch.Tensor]  # ∇θ L_up summed over ranks, in params order, detached
    loss: torch.Tensor  # L_up(θ; w), 0-dim, detached
    embeddings: Embeddings | None  # the global batch's (u, t, τ), detached (with jvp)
    tangent: Callable[[list[torch.Tensor]], Embeddings] | None  # v -> this rank's Ė = J_θ f · v (with jvp)


@contextlib.contextmanager
def _twice_differentiable():
    """The model's forward in the form both JVPs can differentiate: attention through the math
    SDPA kernel (the fused kernels have neither double backward nor forward-mode AD), without
    nn.MultiheadAttention's inference fast path (no forward-mode AD either), and BatchNorm with
    running statistics as its affine map (_AffineBatchNorm)."""
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH), _AffineBatchNorm():
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)


def upstream_gradient(fmodel: FunctionalCLIP, params: Params, images: torch.Tensor, tokens: torch.Tensor,
                      w: torch.Tensor, comm: Comm = LOCAL,
                      amp: Callable[[], ContextManager] = contextlib.nullcontext, jvp_mode: str | None = None,
                      up_loss: UpLoss = weighted_clip_loss) -> Upstream:
    """g = ∇θ L_up(θ; w) from one forward + backward of the reference model.

    jvp_mode: also return `tangent`, the JVP of this rank's embeddings along any v (None: g only).
    "backward": the backward from the embeddings E to θ is g = J_θ fᵀ · G with G = ∇_E L_up; it is
    linear in G, so running it with create_graph and differentiating g in G along v gives
    J_θ f · v: the transpose of a transpose, which walks the backward's G-chain with the forward's
    saved activations instead of running the model again. The graph is kept until `tangent` is
    called once; this pass then takes the math attention kernel (_twice_differentiable).
    "forward": this pass is a plain one (fused attention, no graph kept) and `tangent` runs the
    model again in forward-mode AD (torch.func.jvp), the primal and its tangent together. Which
    is faster depends on the model and device (measured on an H100: forward for ViT-B-32, backward
    for the world's ResNet; backward on a CPU; LoopConfig.jvp's auto follows that).
    """
    if jvp_mode not in (None, *JVP_MODES):
        raise ValueError(f"jvp_mode must be one of {JVP_MODES} or None, not {jvp_mode!r}")
    linearize = jvp_mode == "backward"
    theta = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    leaves = list(theta.values())
    with _twice_differentiable() if linearize else contextlib.nullcontext():
        with amp():
            u_l, t_l, tau = fmodel(theta, images, tokens)
        u_l, t_l, tau = _full(u_l), _full(t_l), _full(tau)
        u, t = comm.gather(u_l, keep_grad=True), comm.gather(t_l, keep_grad=True)
        up = up_loss(u, t, tau, w.detach())
        gu, gt, gtau = torch.autograd.grad(up, (u_l, t_l, tau))
        if comm.rank != 0:
            # τ is one shared parameter: only rank 0 lets its loss gradient through, so the sum
            # over ranks counts it once. (The tangent in G_τ stays J_τ · v on every rank.)
            gtau = torch.zeros_like(gtau)
        # G as leaves: g is then a differentiable function of G (and of nothing else that varies).
        cot = [x.detach().requires_grad_(linearize) for x in (gu, gt, gtau)]
        g_graph = torch.autograd.grad((u_l, t_l, tau), leaves, cot, create_graph=linearize, allow_unused=True)
    used = [i for i, x in enumerate(g_graph) if x is not None]
    g = [torch.zeros_like(p) if x is None else x.detach() for x, p in zip(g_graph, leaves)]
    if comm.distributed and linearize:
        g = [x.clone() for x in g]  # the all-reduce must not write into the graph's tensors
    comm.sum_(g)
    if jvp_mode is None:
        return Upstream(g, up.detach(), None, None)
    embeddings = (u.detach(), t.detach(), tau.detach())
    del u_l, t_l, u, t, theta, leaves  # "forward" keeps no graph: its activations go now

    def tangent_backward(v: list[torch.Tensor]) -> Embeddings:
        du, dt, dtau = torch.autograd.grad([g_graph[i] for i in used], cot, [v[i] for i in used], allow_unused=True)
        return tuple(torch.zeros_like(c) if d is None else d for d, c in zip((du, dt, dtau), cot))

    def tangent_forward(v: list[torch.Tensor]) -> Embeddings:
        primal = {k: x.detach() for k, x in params.items()}
        along = dict(zip(params, v))
        with _twice_differentiable(), amp():
            out = jvp(lambda p: fmodel(p, images, tokens), (primal,), (along,))[1]
        return tuple(_full(x) for x in out)

    return Upstream(g, up.detach(), embeddings, tangent_backward if linearize else tangent_forward)


def warm_moments(fmodel: FunctionalCLIP, params: Params, state: AdamWState, hp: AdamWHyper,
                 images: torch.Tensor, tokens: torch.Tensor, comm: Comm = LOCAL,
                 amp: Callable[[], ContextManager] = contextlib.nullcontext) -> AdamWState:
    """Accumulate AdamW's moments from one uniform-weight batch without moving θ.

    Why: with fresh moments, step t = 1 of AdamW is g / (|g| + eps), whose derivative in g is
    eps / (|g| + eps)², ~0 except where |g| ~ eps; the first hypergradients then mostly measure
    parameters with vanishing gradients. A few warm-up batches give v a history, so ∂θ'/∂g is
    the usual preconditioner from the first scorer step (this matters for short runs only).
    """
    n = images.shape[0] * comm.world_size
    w = torch.full((n,), 1.0 / n, device=images.device)
    g = upstream_gradient(fmodel, params, images, tokens, w, comm, amp).g
    _, m, v = adamw_update(params, dict(zip(params, g)), state, hp, frozenset())
    return AdamWState(m, v, state.step + 1)


def hypergradient_step(fmodel: FunctionalCLIP, params: Params, state: AdamWState, hp: AdamWHyper,
                       decay: frozenset[str], images: torch.Tensor, tokens: torch.Tensor, w: torch.Tensor,
                       down_loss: DownLoss, down_params: list[torch.Tensor] = (), project: Project | None = None,
                       comm: Comm = LOCAL, amp: Callable[[], ContextManager] = contextlib.nullcontext,
                       timer: Callable[[str], ContextManager] | None = None,
                       up_loss: UpLoss = weighted_clip_loss, tangent_names: frozenset[str] | None = None,
                       jvp_mode: str = "backward") -> StepResult:
    """One FLYT step for the reference model: θ' and dJ/dw (see the module docstring).

    params: θ (detached); images/tokens: this rank's rows of the upstream batch; w: weights of the
    global batch (detached, Σ w = 1); down_loss(θ') -> this rank's downstream loss; down_params:
    leaves of the downstream head (ρ) whose gradients are returned; amp: a context factory for
    the model's forward passes (bf16 autocast on GPU); timer(name): a context that times a phase
    (runlog.Timer), for the phases up_grad, down_grad, jvp, d. For diagnostics: up_loss, the
    upstream loss (a variant of weighted_clip_loss); tangent_names, the parameters whose part of v
    enters the JVP (d is linear in v, so the parts of a partition of θ sum to the whole d).
    jvp_mode: how the embeddings' JVP is taken ("backward" or "forward", upstream_gradient; the
    same d up to rounding, different speed).
    """
    names = list(params)
    w = w.detach()
    phase = timer or (lambda _name: contextlib.nullcontext())

    # 1. g = ∇θ L_up(θ; w), summed over ranks.
    with phase("up_grad"):
        upstream = upstream_gradient(fmodel, params, images, tokens, w, comm, amp, jvp_mode, up_loss)
        g, up = upstream.g, upstream.loss

    # 2. v = ∂ L_down(AdamW(θ, g)) / ∂g (averaged over ranks), and ∂J/∂ρ. The update is element-wise,
    #    so v = ∇θ' L_down ⊙ ∂θ'/∂g with the diagonal Jacobian in closed form (adamw_jacobian_product;
    #    the same as autograd through adamw_step, which the tests check, without its graph).
    with phase("down_grad"):
        g = dict(zip(names, g))
        new_params, exp_avg, exp_avg_sq = adamw_update(params, g, state, hp, decay)
        leaves_theta = {k: x.requires_grad_(True) for k, x in new_params.items()}
        with amp():
            down = down_loss(project(leaves_theta) if project is not None else leaves_theta)
        leaves = list(leaves_theta.values()) + list(down_params)
        grads = torch.autograd.grad(_full(down), leaves, allow_unused=True)
        grads = [torch.zeros_like(x) if gr is None else gr for gr, x in zip(grads, leaves)]
        comm.mean_(grads)
        v = adamw_jacobian_product(dict(zip(names, grads[: len(names)])), g, exp_avg, exp_avg_sq, hp, state.step + 1)
        if project is not None:
            new_params = project(new_params)

    # 3. Ė = J_θ f · v (upstream_gradient's tangent), then d = ∂/∂w ⟨∇_E L_up(E; w), Ė⟩ at
    #    embedding level.
    with phase("jvp"):
        along = [v[k] if tangent_names is None or k in tangent_names else torch.zeros_like(v[k]) for k in names]
        du, dt, dtau = upstream.tangent(along)
    u, t, tau = upstream.embeddings
    du, dt = comm.gather(du), comm.gather(dt)

    with phase("d"):
        if up_loss is weighted_clip_loss:  # a few [B, B] ops instead of torch.func's nested transforms
            d = weighted_clip_loss_jvp_grad(u, t, tau, w, du, dt, dtau)
        else:
            d = torch.func.grad(lambda w_: jvp(lambda a, b, c: up_loss(a, b, c, w_), (u, t, tau), (du, dt, dtau))[1])(w)

    new_state = AdamWState({k: x.detach() for k, x in exp_avg.items()},
                           {k: x.detach() for k, x in exp_avg_sq.items()}, state.step + 1)
    return StepResult(d=d, params={k: x.detach() for k, x in new_params.items()}, state=new_state,
                      extra_grads=grads[len(names):], up_loss=up, down_loss=down.detach())


def scorer_backward(scores_local: torch.Tensor, d: torch.Tensor, comm: Comm = LOCAL) -> torch.Tensor:
    """∇φ J: the VJP of w = softmax(global scores) with d, into this rank's rows of the scorer.

    Accumulates into the scorer's .grad (the caller sums them over ranks); returns w.
    """
    s = comm.gather(_full(scores_local), keep_grad=True)
    w = torch.softmax(s, dim=0)
    w.backward(d)
    return w.detach()


def brute_force_objective(fmodel: FunctionalCLIP, params: Params, state: AdamWState, hp: AdamWHyper,
                          decay: frozenset[str], images: torch.Tensor, tokens: torch.Tensor, w: torch.Tensor,
                          down_loss: DownLoss, project: Project | None = None,
                          up_loss: UpLoss = weighted_clip_loss) -> torch.Tensor:
    """J = L_down(AdamW(θ, ∇θ L_up(θ; w))) with the whole update in the graph (create_graph=True).

    Differentiating this with autograd is the reference the efficient path is tested against:
    it materialises Hessian-vector products and costs far more memory, so it is for tests only.
    """
    theta = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    with sdpa_kernel(SDPBackend.MATH):  # double backward through attention
        u, t, tau = fmodel(theta, images, tokens)
        up = up_loss(u, t, tau, w)
        g = torch.autograd.grad(up, list(theta.values()), create_graph=True, allow_unused=True)
        g = dict(zip(theta, _with_zeros(g, theta)))
        new_params, _, _ = adamw_step(theta, g, state, hp, decay)
        if project is not None:
            new_params = project(new_params)
        return down_loss(new_params)
