"""FLYT's mathematical core on a real tiny open_clip model and real world data.

The central check: the efficient hypergradient (g; v through the AdamW step; a JVP of the
embeddings; d at embedding level; the softmax VJP) equals plain autograd through the unrolled
update with create_graph=True, for every scorer parameter and for ρ, in float64 to 1e-9.
"""
from __future__ import annotations

import contextlib
import copy
import math

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

import clipsift.training  # noqa: F401  (registers world-rn-s)
from clipsift import shards
from clipsift.eval.tasks import load_tasks
from clipsift.training.data import decode_image, normalize, tokenizer
from clipsift.training.flyt import data as fdata
from clipsift.training.flyt.adamw import (AdamWHyper, AdamWState, _jacobian_lists, adamw_jacobian_product, adamw_step,
                                          adamw_update, decayed_names)
from clipsift.training.flyt.hypergrad import (JVP_MODES, FunctionalCLIP, brute_force_objective, hypergradient_step,
                                              scorer_backward)
from clipsift.training.flyt.losses import clip_loss, weighted_clip_loss, weighted_clip_loss_jvp_grad, zeroshot_loss
from clipsift.training.flyt.scorer import GLUScorer, LinearMixer, standardisation


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


# ---------------------------------------------------------------- losses
def test_weighted_clip_loss_is_flyts_formula_and_clip_loss_for_uniform_weights():
    g = torch.Generator().manual_seed(0)
    B, D = 7, 5
    u, t = unit(torch.randn(B, D, generator=g, dtype=torch.float64)), unit(torch.randn(B, D, generator=g, dtype=torch.float64))
    tau = torch.tensor(11.0, dtype=torch.float64)
    w = torch.softmax(torch.randn(B, generator=g, dtype=torch.float64), 0)
    ell = tau * u @ t.T
    # flyt.md, term by term: L_i2t = −Σ_i w_i log(w_i e^{ℓ_ii} / Σ_j w_j e^{ℓ_ij}), L_t2i on columns.
    i2t = -sum(w[i] * math.log(w[i] * math.exp(ell[i, i]) / sum(w[j] * math.exp(ell[i, j]) for j in range(B)))
               for i in range(B))
    t2i = -sum(w[j] * math.log(w[j] * math.exp(ell[j, j]) / sum(w[i] * math.exp(ell[i, j]) for i in range(B)))
               for j in range(B))
    assert float(weighted_clip_loss(u, t, tau, w)) == pytest.approx(float(i2t + t2i) / 2, rel=1e-12)
    # Uniform weights: exactly open_clip's ClipLoss (no constant left over).
    uniform = torch.full((B,), 1 / B, dtype=torch.float64)
    expected = open_clip.ClipLoss()(u, t, tau)
    assert float(weighted_clip_loss(u, t, tau, uniform)) == pytest.approx(float(expected), rel=1e-12)
    assert float(clip_loss(u, t, tau)) == pytest.approx(float(expected), rel=1e-12)
    # Down-weighting an example to ~0 removes it from the loss, as if the batch did not hold it.
    w0 = torch.cat([torch.full((B - 1,), 1 / (B - 1), dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    assert float(weighted_clip_loss(u, t, tau, w0)) == pytest.approx(float(open_clip.ClipLoss()(u[:-1], t[:-1], tau)),
                                                                      rel=1e-9)
    # Weights on the loss terms only: −Σ_i w_i (log softmax of row i at i + log softmax of column i at i) / 2,
    # every negative counted once; the same value as the paper's loss at uniform weights.
    terms = -0.5 * (w * (torch.log_softmax(ell, 1).diagonal() + torch.log_softmax(ell, 0).diagonal())).sum()
    assert float(weighted_clip_loss(u, t, tau, w, weighted_negatives=False)) == pytest.approx(float(terms), rel=1e-12)
    assert float(weighted_clip_loss(u, t, tau, uniform, weighted_negatives=False)) == pytest.approx(float(expected),
                                                                                                     rel=1e-12)


def test_zeroshot_loss_is_cross_entropy_with_learned_temperature():
    g = torch.Generator().manual_seed(1)
    img, cls = unit(torch.randn(6, 4, generator=g)), unit(torch.randn(3, 4, generator=g))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    rho = torch.tensor(math.log(1 / 0.07))
    logits = (1 / 0.07) * img @ cls.T
    expected = -torch.log_softmax(logits, 1)[torch.arange(6), labels].mean()
    assert float(zeroshot_loss(img, cls, labels, rho)) == pytest.approx(float(expected), rel=1e-5)


def test_downstream_clip_losses_one_over_all_tasks_or_one_per_task():
    """loss=clip: one contrastive loss over every task's pairs (another task's prompts are
    negatives); loss=clip_per_task: each task's own CLIP loss, averaged over tasks. Hand-built:
    a classification task (3 images, 2 class prompts) and a retrieval task (2 image-caption pairs)."""
    g = torch.Generator().manual_seed(2)
    img, txt = unit(torch.randn(5, 4, generator=g)), unit(torch.randn(4, 4, generator=g))
    labels = torch.tensor([1, 0, 1])
    batch = fdata.DownBatch(torch.zeros(5, 1), torch.zeros(4, 1, dtype=torch.long),
                            [("classification", slice(0, 3), slice(0, 2), labels), ("retrieval", slice(3, 5), slice(2, 4), None)])
    rho = torch.tensor(2.0)
    embed = lambda images, tokens: (img, txt, torch.tensor(1.0))  # noqa: E731
    pairs = torch.cat([txt[:2][labels], txt[2:4]])  # each image's text: its class prompt, or its caption

    def clip(u, t):  # both directions' mean cross-entropy at scale exp(rho), written out
        logits = math.exp(2.0) * u @ t.T
        n = torch.arange(len(u))
        return float(-(torch.log_softmax(logits, 1)[n, n].mean() + torch.log_softmax(logits, 0)[n, n].mean()) / 2)

    joint = fdata.downstream_loss(embed, batch, rho, "clip")
    per_task = fdata.downstream_loss(embed, batch, rho, "clip_per_task")
    assert float(joint) == pytest.approx(clip(img, pairs), rel=1e-6)
    assert float(per_task) == pytest.approx((clip(img[:3], pairs[:3]) + clip(img[3:], pairs[3:])) / 2, rel=1e-6)
    assert float(joint) != pytest.approx(float(per_task), rel=1e-3)


def test_used_prompts_only_encodes_fewer_texts_and_gives_the_same_clip_losses(ci_world):
    """The CLIP-loss variants see only the prompts of classes in the batch: a batch that keeps just
    those (relabelled) gives the same losses through a real model, with fewer texts to encode."""
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("world-rn-s")
    model.eval()
    tok = open_clip.get_tokenizer("world-rn-s")
    tasks = {t.name: t for t in load_tasks(ci_world / "tasks.yaml")}
    task_data = [fdata.load_task(tasks[n], "train", preprocess, tok) for n in ("shapes", "colour_shape", "retrieval")]
    full, compact = (fdata.DownstreamBatches(task_data, 6, seed=0, used_prompts_only=u).batch(step=2) for u in (False, True))
    assert compact.tokens.shape[0] < full.tokens.shape[0]
    assert torch.equal(compact.images, full.images)
    rho = torch.tensor(2.5)
    embed = lambda x, t: model(x, t)[:3]  # noqa: E731
    with torch.no_grad():
        for loss in fdata.CLIP_LOSSES:
            assert float(fdata.downstream_loss(embed, compact, rho, loss)) == pytest.approx(
                float(fdata.downstream_loss(embed, full, rho, loss)), rel=1e-5)


def test_downstream_tasks_leave_the_shift_group_out_unless_told(ci_world):
    """FLYT learns from the tasks the paper could: a distribution-shift task has no training split in
    DataComp, so its group is left out by default (the world still gives it one), and why is recorded."""
    from clipsift.training.flyt.config import DownstreamConfig
    from clipsift.training.flyt.train import downstream_tasks

    tasks_yaml = str(ci_world / "tasks.yaml")
    names = lambda cfg: [t.name for t in downstream_tasks(cfg)[0]]  # noqa: E731
    used, left_out = downstream_tasks(DownstreamConfig(tasks=tasks_yaml))
    assert [t.name for t in used] == ["shapes", "colour_shape", "count", "retrieval"]
    assert list(left_out) == ["shapes_outline"] and "left_out_groups" in left_out["shapes_outline"]
    _, left_out = downstream_tasks(DownstreamConfig(tasks=tasks_yaml, loss="ce"))
    assert sorted(left_out) == ["retrieval", "shapes_outline"]
    assert names(DownstreamConfig(tasks=tasks_yaml, left_out_groups=[])) == [
        "shapes", "shapes_outline", "colour_shape", "count", "retrieval"]
    assert names(DownstreamConfig(tasks=tasks_yaml, names=["shapes_outline"], left_out_groups=[])) == ["shapes_outline"]
    with pytest.raises(ValueError, match="shapes_outline.*left_out_groups"):
        downstream_tasks(DownstreamConfig(tasks=tasks_yaml, names=["shapes", "shapes_outline"]))
    with pytest.raises(ValueError, match="no task left"):
        downstream_tasks(DownstreamConfig(tasks=tasks_yaml, loss="ce", left_out_groups=["main", "distribution shift",
                                                                                        "other classification"]))


# ---------------------------------------------------------------- AdamW
def test_functional_adamw_matches_torch_adamw_over_several_steps():
    torch.manual_seed(0)
    params = {"w": torch.randn(4, 3, dtype=torch.float64), "b": torch.randn(3, dtype=torch.float64),
              "emb": torch.randn(5, 2, dtype=torch.float64),
              "big": torch.randn(3 * 2**16 + 7, dtype=torch.float64)}  # several CPU blocks, one partial
    ref = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    hp = AdamWHyper(lr=1e-2, beta1=0.9, beta2=0.98, eps=1e-6, wd=0.2)
    opt = torch.optim.AdamW([{"params": [ref["w"], ref["emb"]], "weight_decay": hp.wd},
                             {"params": [ref["b"], ref["big"]], "weight_decay": 0.0}], lr=hp.lr, betas=(hp.beta1, hp.beta2),
                            eps=hp.eps)
    decay = decayed_names(params)
    assert decay == {"w", "emb"}
    state = AdamWState.zeros_like(params)
    for step in range(4):
        grads = {k: torch.randn_like(v) for k, v in params.items()}
        grads["emb"][1] = 0.0  # an unused embedding row: zero gradient must not give NaN derivatives
        for k, p in ref.items():
            p.grad = grads[k].clone()
        opt.step()
        new, m, v = adamw_step(params, grads, state, hp, decay)
        params, state = new, AdamWState(m, v, state.step + 1)
        for k in params:
            torch.testing.assert_close(params[k], ref[k].detach(), rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(state.exp_avg[k], opt.state[ref[k]]["exp_avg"], rtol=1e-12, atol=1e-14)
    # Differentiable in g, finite where g = 0 (sqrt(v) at v = 0).
    g = {k: torch.zeros_like(v, requires_grad=True) for k, v in params.items()}
    new, _, _ = adamw_step(params, g, AdamWState.zeros_like(params), hp, decay)
    (dg,) = torch.autograd.grad(new["w"].sum(), [g["w"]])
    assert torch.isfinite(dg).all()
    # The fused update is adamw_step's, and the closed-form (diagonal) Jacobian in g is autograd's,
    # with history, at g = 0 and fresh state too; on a lookup table (>= 2**14 rows) with a
    # cotangent on a few rows only, the product is computed on those rows and is the same.
    params["table"] = torch.randn(2**14, 3, dtype=torch.float64)
    decay = decayed_names(params)
    history = AdamWState({**state.exp_avg, "table": 0.1 * torch.randn_like(params["table"])},
                         {**state.exp_avg_sq, "table": torch.rand_like(params["table"])}, state.step)
    for st in (history, AdamWState.zeros_like(params)):
        g = {k: torch.randn_like(v) for k, v in params.items()}
        g["emb"][1] = 0.0
        g["table"][5:] = 0.0
        fast, fast_m, fast_v = adamw_update(params, g, st, hp, decay)
        plain, plain_m, plain_v = adamw_step(params, g, st, hp, decay)
        cot = {k: torch.randn_like(v) for k, v in params.items()}
        cot["table"][torch.randperm(2**14)[: 2**14 - 40]] = 0.0  # 40 rows touched
        cot["w"] = torch.randn(3, 4, dtype=torch.float64).t()  # not contiguous (the product writes through views)
        product = adamw_jacobian_product({k: c.clone() for k, c in cot.items()}, g, fast_m, fast_v, hp, st.step + 1)
        # the GPU's arrangement: every tensor whole, in one multi-tensor pass
        together = [cot[k].clone(memory_format=torch.contiguous_format) for k in params]
        _jacobian_lists([x.view(-1) for x in together], *([d[k].reshape(-1) for k in params] for d in (g, fast_m, fast_v)),
                        hp, st.step + 1)
        for k in params:
            torch.testing.assert_close(fast[k], plain[k], rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(fast_m[k], plain_m[k], rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(fast_v[k], plain_v[k], rtol=1e-12, atol=1e-15)
            leaf = g[k].clone().requires_grad_(True)
            new, _, _ = adamw_step(params, {**g, k: leaf}, st, hp, decay)
            (diag,) = torch.autograd.grad(new[k].sum(), [leaf])  # the update is element-wise
            torch.testing.assert_close(product[k], cot[k] * diag, rtol=1e-11, atol=1e-15)  # closed form vs autograd
        for k, x in zip(params, together):
            torch.testing.assert_close(x, product[k], rtol=1e-14, atol=0)


# ---------------------------------------------------------------- the hypergradient
def _pool_batch(world, n: int, size: int):
    samples = [r for r in shards.read_shard(sorted((world / "pool" / "shards").glob("*.tar"))[0])
               if isinstance(r, shards.Sample)]
    images, texts = [], []
    for rec in samples:
        try:
            images.append(torch.from_numpy(decode_image(rec.image, size)))
        except Exception:  # the world plants a few undecodable images
            continue
        texts.append(rec.text)
        if len(images) == n:
            break
    return torch.stack(images), tokenizer("world-rn-s")(texts).long()


@pytest.fixture(scope="module", params=["world-rn-s", "world-vit-t"])
def tiny_setup(ci_world, request):
    """A world model (random init, eval mode) with real pool pairs and real downstream tasks: the
    ResNet stand-in, and a tiny ViT whose attention is open_clip's nn.MultiheadAttention (the
    paper's reference is a ViT; forward-mode AD had no rule for its fused kernel)."""
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(request.param)
    model.eval()
    images, tokens = _pool_batch(ci_world, 8, 32)
    mean, std = (torch.tensor(model.visual.preprocess_cfg[k]) for k in ("mean", "std"))
    tasks = {t.name: t for t in load_tasks(ci_world / "tasks.yaml")}
    tok = open_clip.get_tokenizer("world-rn-s")
    task_data = [fdata.load_task(tasks[name], "train", preprocess, tok) for name in ("shapes", "count", "retrieval")]
    down = fdata.DownstreamBatches(task_data, 4, seed=0).batch(step=3)
    return model, normalize(images, mean, std), tokens, down


def _check_against_brute_force(tiny_setup, dtype, rtol, atol, sgd=False, up_loss=weighted_clip_loss,
                               jvp_mode="backward"):
    model, images, tokens, down = tiny_setup
    model = model.to(dtype)
    images, down = images.to(dtype), fdata.DownBatch(down.images.to(dtype), down.tokens, down.parts)
    fm = FunctionalCLIP(model)
    params = fm.params()
    with torch.no_grad():
        u, t, _ = model(images, tokens)
    torch.manual_seed(1)
    scorer = GLUScorer(2 * u.shape[1]).to(dtype)
    psi = fdata.psi(u, t).to(dtype) + 0.1 * torch.randn(u.shape[0], 2 * u.shape[1], dtype=dtype)
    rho = torch.tensor(math.log(1 / 0.07), dtype=dtype, requires_grad=True)
    project = lambda p: {**p, "logit_scale": p["logit_scale"].clamp(2.0, math.log(100))}  # noqa: E731
    down_loss = lambda p: fdata.downstream_loss(lambda x, tk: fm(p, x, tk), down, rho)  # noqa: E731
    decay = decayed_names(params)
    hp = AdamWHyper(lr=1e-3, wd=0.2, sgd=sgd)
    # A first real step gives the AdamW history (moments, t = 1) the checked step starts from.
    w = torch.softmax(scorer(psi), 0).detach()
    first = hypergradient_step(fm, params, AdamWState.zeros_like(params), hp, decay, images, tokens, w, down_loss,
                               [rho], project, up_loss=up_loss)
    params, state = first.params, first.state

    scores = scorer(psi)
    res = hypergradient_step(fm, params, state, hp, decay, images, tokens, torch.softmax(scores.detach(), 0),
                             down_loss, [rho], project, up_loss=up_loss, jvp_mode=jvp_mode)
    scorer.zero_grad()
    scorer_backward(scores, res.d)
    efficient = [p.grad.clone() for p in scorer.parameters()] + [res.extra_grads[0]]

    J = brute_force_objective(fm, params, state, hp, decay, images, tokens, torch.softmax(scorer(psi), 0),
                              down_loss, project, up_loss)
    brute = torch.autograd.grad(J, list(scorer.parameters()) + [rho])
    assert float(J.detach()) == pytest.approx(float(res.down_loss), rel=1e-6)
    names = [n for n, _ in scorer.named_parameters()] + ["rho"]
    scale = max(float(b.abs().max()) for b in brute)
    scorer_scale = max(float(b.abs().max()) for b in brute[:-1])  # ρ's gradient can dwarf the scorer's
    for name, a, b in zip(names, efficient, brute):
        if name == "blocks.0.w2.bias":  # softmax ignores a shift of every score: exactly 0 both ways
            assert float(a.abs().max()) < 1e-6 * scale and float(b.abs().max()) < 1e-6 * scale
            continue
        assert float(b.abs().max()) > 1e-3 * (scale if name == "rho" else scorer_scale), name  # a real signal, not two zeros
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol * scale, msg=name)
    # θ' of the efficient path is the AdamW step of g: the downstream loss it reports is at θ'.
    assert float(down_loss(res.params).detach()) == pytest.approx(float(res.down_loss), rel=1e-6)


@pytest.mark.parametrize("jvp_mode", JVP_MODES)
def test_efficient_hypergradient_equals_autograd_through_the_unrolled_step_float64(tiny_setup, jvp_mode):
    _check_against_brute_force(tiny_setup, torch.float64, rtol=1e-9, atol=1e-9, jvp_mode=jvp_mode)


@pytest.mark.parametrize("jvp_mode", JVP_MODES)
def test_efficient_hypergradient_equals_autograd_through_the_unrolled_step_float32(tiny_setup, jvp_mode):
    _check_against_brute_force(tiny_setup, torch.float32, rtol=1e-4, atol=1e-4, jvp_mode=jvp_mode)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_jvp_modes_agree_in_fp32_and_under_bf16_autocast(tiny_setup):
    """On a GPU, as training runs there: both JVP modes give the fp32 hypergradient (up to TF32
    convolutions) and, under bf16 autocast, a d pointing the same way as the fp32 one (centred:
    the softmax ignores a shift of every score)."""
    model, images, tokens, down = tiny_setup
    dev = torch.device("cuda")
    model = copy.deepcopy(model).to(dev)
    images, tokens, down = images.to(dev), tokens.to(dev), down.to(dev)
    fm = FunctionalCLIP(model)
    params = fm.params()
    rho = torch.tensor(math.log(1 / 0.07), device=dev, requires_grad=True)
    down_loss = lambda p: fdata.downstream_loss(lambda x, tk: fm(p, x, tk), down, rho)  # noqa: E731
    decay, hp = decayed_names(params), AdamWHyper(1e-3)
    w = torch.softmax(torch.randn(images.shape[0], generator=torch.Generator().manual_seed(0)), 0).to(dev)
    first = hypergradient_step(fm, params, AdamWState.zeros_like(params), hp, decay, images, tokens, w, down_loss, [rho])
    bf16 = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731

    def d(mode, amp=contextlib.nullcontext):
        x = hypergradient_step(fm, first.params, first.state, hp, decay, images, tokens, w, down_loss, [rho],
                               amp=amp, jvp_mode=mode).d
        return x - x.mean()

    ref = d("backward")
    cos = {f"{m}/{p}": float(F.cosine_similarity(d(m, amp), ref, dim=0))
           for m in JVP_MODES for p, amp in (("fp32", contextlib.nullcontext), ("bf16", bf16))}
    print(cos)
    assert min(cos["backward/fp32"], cos["forward/fp32"]) > 0.999, cos
    assert min(cos["backward/bf16"], cos["forward/bf16"]) > 0.95, cos


def test_jvp_auto_takes_forward_mode_only_for_a_vit_on_a_gpu():
    """jvp=auto follows the measured speeds: forward-mode for a ViT image tower on CUDA, the
    backward's transpose for a ResNet there and for everything on a CPU; explicit modes stay."""
    from clipsift.training.flyt.config import LoopConfig
    from clipsift.training.flyt.train import _jvp_mode

    vit, rn = (open_clip.create_model(a) for a in ("world-vit-t", "world-rn-s"))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # device objects only: nothing runs on them
    auto = LoopConfig()
    assert (_jvp_mode(auto, cuda, vit), _jvp_mode(auto, cuda, rn), _jvp_mode(auto, cpu, vit)) == \
        ("forward", "backward", "backward")
    assert _jvp_mode(LoopConfig(jvp="forward"), cpu, rn) == "forward"
    assert _jvp_mode(LoopConfig(jvp="backward"), cuda, vit) == "backward"


def test_closed_form_d_equals_torch_func_including_underflowed_weights():
    """The FLYT step's d for weighted_clip_loss in closed form = torch.func.grad of the jvp (the
    generic path the diagnostics' loss variants take), also where a weight underflows."""
    g = torch.Generator().manual_seed(5)
    u, t, du, dt = (torch.randn(10, 6, generator=g, dtype=torch.float64) for _ in range(4))
    u, t = F.normalize(u, dim=1), F.normalize(t, dim=1)
    tau, dtau = torch.tensor(12.0, dtype=torch.float64), torch.tensor(-0.4, dtype=torch.float64)
    for w in (torch.softmax(2 * torch.randn(10, generator=g, dtype=torch.float64), 0),
              torch.tensor([0.5, 0.5] + [0.0] * 8, dtype=torch.float64)):
        generic = torch.func.grad(lambda w_: torch.func.jvp(lambda a, b, c: weighted_clip_loss(a, b, c, w_),
                                                            (u, t, tau), (du, dt, dtau))[1])(w)
        closed = weighted_clip_loss_jvp_grad(u, t, tau, w, du, dt, dtau)
        torch.testing.assert_close(closed, generic, rtol=1e-10, atol=1e-10 * float(generic.abs().max()))


@pytest.mark.parametrize("sgd, weighted_negatives", [(True, True), (False, False)])
def test_diagnostic_variants_hypergradient_equals_autograd(tiny_setup, sgd, weighted_negatives):
    """benchmarks/flyt_by_noise.py's variants (a plain SGD inner step; weights on the loss terms
    only) are exact derivatives of their own one-step objectives too."""
    up = lambda u, t, tau, w: weighted_clip_loss(u, t, tau, w, weighted_negatives)  # noqa: E731
    _check_against_brute_force(tiny_setup, torch.float64, rtol=1e-9, atol=1e-9, sgd=sgd, up_loss=up)


def test_hypergradient_parts_of_theta_sum_to_the_whole(tiny_setup):
    """tangent_names: d restricted to a partition of θ (image tower, text side) sums to the full d,
    and each part is a real share of it."""
    model, images, tokens, down = tiny_setup
    model = model.double()
    images, down = images.double(), fdata.DownBatch(down.images.double(), down.tokens, down.parts)
    fm = FunctionalCLIP(model)
    params = fm.params()
    rho = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)
    down_loss = lambda p: fdata.downstream_loss(lambda x, tk: fm(p, x, tk), down, rho)  # noqa: E731
    w = torch.full((images.shape[0],), 1.0 / images.shape[0], dtype=torch.float64)
    state = AdamWState.zeros_like(params)
    step = lambda names=None: hypergradient_step(fm, params, state, AdamWHyper(1e-3), decayed_names(params), images,  # noqa: E731
                                                 tokens, w, down_loss, [rho], tangent_names=names).d
    visual = frozenset(k for k in params if k.startswith("visual."))
    whole, a, b = step(), step(visual), step(frozenset(params) - visual)
    torch.testing.assert_close(a + b, whole, rtol=1e-9, atol=1e-12 * float(whole.abs().max()))
    assert float(a.abs().max()) > 1e-3 * float(whole.abs().max()) and float(b.abs().max()) > 1e-3 * float(whole.abs().max())


def test_sgd_step_and_its_jacobian():
    g = torch.Generator().manual_seed(3)
    params = {"w": torch.randn(4, 3, generator=g, dtype=torch.float64), "b": torch.randn(3, generator=g, dtype=torch.float64)}
    grads = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in params.items()}
    state = AdamWState.zeros_like(params)
    hp = AdamWHyper(lr=1e-2, wd=0.2, sgd=True)
    for step in (adamw_step, adamw_update):
        new, m, v = step(params, grads, state, hp, frozenset({"w"}))
        torch.testing.assert_close(new["w"], params["w"] * (1 - 1e-2 * 0.2) - 1e-2 * grads["w"], rtol=1e-15, atol=0)
        torch.testing.assert_close(new["b"], params["b"] - 1e-2 * grads["b"], rtol=1e-15, atol=0)
        assert all(float(x.abs().max()) == 0 for x in (*m.values(), *v.values()))  # moments untouched
    cot = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in params.items()}
    product = adamw_jacobian_product({k: c.clone() for k, c in cot.items()}, grads, m, v, hp, 1)
    for k in params:
        torch.testing.assert_close(product[k], -1e-2 * cot[k], rtol=1e-15, atol=0)
    # the default is AdamW's step, bit for bit
    assert not AdamWHyper(1e-2).sgd


# ---------------------------------------------------------------- scorers
def test_glu_clip_score_init_starts_as_scaled_cosine():
    torch.manual_seed(0)
    D = 64
    u, t = unit(torch.randn(500, D)), unit(torch.randn(500, D))
    t[:250] = unit(u[:250] + 0.3 * torch.randn(250, D))  # half the pairs aligned: cosines spread over [-0.3, 0.95]
    scorer = GLUScorer(2 * D)
    scorer.init_as_clip_score(scale=10.0)
    cos = (u * t).sum(1)
    s = scorer(fdata.psi(u, t)).detach()
    assert float((s - 10 * cos).abs().max()) < 0.02 * 10
    assert np.corrcoef(s.numpy(), cos.numpy())[0, 1] > 0.9999
    with pytest.raises(ValueError, match="hidden >= input dim"):
        GLUScorer(2 * D, hidden=D).init_as_clip_score(10.0)


def test_mixer_standardises_inputs_and_treats_missing_as_mean():
    x = torch.tensor([[1.0, 10.0], [3.0, float("nan")], [5.0, 30.0]])
    mean, std = standardisation(x)
    assert mean == pytest.approx([3.0, 20.0]) and std == pytest.approx([2.0, math.sqrt(200)])
    mixer = LinearMixer(["a", "b"], mean, std).zero_()  # bias 0 (the default init is random)
    with torch.no_grad():
        mixer.linear.weight[:] = torch.tensor([[1.0, 2.0]])
    s = mixer(x)
    assert s.tolist() == pytest.approx([-1 - 2 * 10 / math.sqrt(200), 0.0, 1 + 2 * 10 / math.sqrt(200)])
    assert set(mixer.weights()) == {"a", "b", "(bias)"}
    # equal: the mean of the standardised inputs, missing as the mean
    s = LinearMixer(["a", "b"], mean, std).equal_()(x)
    assert s.tolist() == pytest.approx([(-1 - 10 / math.sqrt(200)) / 2, 0.0, (1 + 10 / math.sqrt(200)) / 2])


def test_whitened_mixer_decorrelates_its_inputs_and_reports_weights_on_the_standardised_scores(tmp_path):
    """mixer.inputs=whitened: zP has identity covariance on the pool (ZCA, P symmetric), weights() are
    a = P a' (a standardised mixer with those weights scores the same), and a saved mixer loads back
    whitened through the heads' loader."""
    from clipsift.training.flyt.heads import score_columns
    from clipsift.training.flyt.scorer import build_scorer, whitening

    g = torch.Generator().manual_seed(3)
    base = torch.randn(500, 1, generator=g)
    x = torch.cat([base + 0.1 * torch.randn(500, 1, generator=g), 2 * base + torch.randn(500, 1, generator=g),
                   torch.randn(500, 1, generator=g)], dim=1)  # two correlated scores and an independent one
    mean, std = standardisation(x)
    P = whitening(x, mean, std)
    z = (x.double() - torch.tensor(mean, dtype=torch.float64)) / torch.tensor(std, dtype=torch.float64)
    w = z @ torch.tensor(P, dtype=torch.float64)
    assert torch.allclose(torch.cov(w.T), torch.eye(3, dtype=torch.float64), atol=1e-3)
    assert torch.allclose(torch.tensor(P), torch.tensor(P).T)

    mixer = LinearMixer(["a", "b", "c"], mean, std, P).zero_()
    with torch.no_grad():
        mixer.linear.weight[:] = torch.tensor([[0.5, -0.2, 0.1]])
    plain = LinearMixer(["a", "b", "c"], mean, std).zero_()
    with torch.no_grad():
        plain.linear.weight[:] = torch.tensor([[mixer.weights()[c] for c in "abc"]])
    assert torch.allclose(mixer(x), plain(x), atol=1e-5)

    torch.save({"kind": "mflyt", "spec": mixer.spec, "inputs": ["a", "b", "c"], "state_dict": mixer.state_dict()},
               tmp_path / "scorer.pt")
    loaded = score_columns(tmp_path / "scorer.pt", {c: x[:, i].numpy() for i, c in enumerate("abc")})
    assert np.allclose(loaded, mixer(x).detach().numpy(), atol=1e-5)
    assert build_scorer({"kind": "linear", "columns": ["a"]}).whiten is None  # older mixers load unwhitened


@pytest.mark.parametrize("preset", ["ci", "bench", "paper"])
def test_mflyt_presets_give_the_mixer_the_papers_reach(preset):
    """AdamW moves a weight ~lr a step, so lr x steps is how far the mixer can go: every M-FLYT
    preset keeps the paper's 1e-3 x 5000 = 5 (within rounding of the lr written in the YAML)."""
    from clipsift import config
    from clipsift.training.flyt.config import MFlytConfig

    cfg = config.load(MFlytConfig, config.preset_path("mflyt", preset), [])
    assert cfg.mixer.lr * cfg.steps == pytest.approx(5.0, rel=0.01)
