"""Which planted noise kinds FLYT's one-step objective asks to up-weight, and why (issue 20, item 4).

    python benchmarks/flyt_by_noise.py [--world DIR --metadata DIR] [--preset ci] [--batches 50]
        [--batch N] [--variants base lr=5e-5 ce sgd terms trained ...] [--ref-steps 30] [--seed 0]
        [--threads N] [--override key=value ...] [--out FILE]

At the scorer's initial weights (w = 1/B for the preset's uniform init) the scorer's first move
follows d = dJ/dw, the exact hypergradient of
J(w) = L_down(AdamW_step(θ, ∇θ L_up(θ; w))) (training/flyt/hypergrad.hypergradient_step). Softmax
weights only see d up to a constant, so per batch the centred d_i − mean(d) is what counts; a
NEGATIVE centred d means the objective wants example i up-weighted. For --batches upstream
batches (the FLYT loop's own batches 0..N-1, the moments warmed as the loop warms them) at one θ,
this collects the centred d per planted noise kind (the world's ground truth) and prints, per kind:
its mean ± standard error over examples (and over batches: the batch means' spread, since a
batch's examples share one downstream batch), the mean z (centred d over the batch's std, so
variants of different scale compare), `pref` (the mean share of the rest of its batch whose d is
larger than the example's: 0.5 neutral, 1 the most wanted) and the mean per-example
upstream CLIP loss at θ (how badly the reference fits the pair).

Everything is built as training/flyt/train.py builds it (setup_scorer, PoolBatches, load_downstream,
moment_warmup, hypergradient_step) from the preset (default ci: reference lr 1e-3, 10 warm-up
batches, downstream loss clip, 32 examples per task). Variants, each one change (join with '+'):
  base     the preset as the loop runs it
  ce       downstream loss ce (zero-shot cross-entropy; the retrieval task left out)
  sgd      the reference's inner step a plain SGD step (∂θ'/∂g = −lr: no Adam preconditioner)
  terms    the weights on each example's own loss term only, not on the negatives in the softmax
           denominators (with base in the same run, base − terms is the negatives' share of d)
  trained  the reference after --ref-steps plain CLIP steps (uniform weights, AdamW, the preset's
           lr) on the batches after the measured ones: the θ a FLYT run's reference reaches
           (the ci run's cosine schedule over 60 steps integrates to ~30 steps at the peak lr)
  lr=X     the inner step's lr X (default: the preset's peak reference lr; the loop's warmup and
           cosine schedule pass through every smaller lr; the paper's is 5e-5)
  part=P   only the part P of θ (visual, text: the text transformer, its projection and positional
           embedding; tokens: the token embedding table) in v: d is linear in v, so the parts sum
           to the whole d and say which parameters carry the preference
  init=I   weights from the scorer at its init I (uniform, the preset's: w = 1/B; clip_score;
           random) instead of the preset's init
  task=T   only downstream task T's term of a per-task mean loss (ce, clip_per_task, mixed; with the
           same downstream batches): the loss is that mean, so the tasks' d sum to the whole d and
           say which downstream task asks for the preference
Per variant, the scorer's first move is read too: the scorer at its init (the preset's or init=I's,
seeded as the loop seeds it) receives ∇φ J = VJP of softmax(q_φ(Ψ)) with d each batch; summed over the
batches, its first-order change of score Δs = J_φ s · Δφ on random pool rows, for Δφ = −Σ ∇φ J
(gradient descent) and Δφ = −mean/rms of the per-batch ∇φ J (what AdamW's early steps follow), is
given per kind as the mean z of Δs over those rows (positive: that kind's scores rise). Unlike d,
this includes how the scorer generalises from the examples it saw to similar Ψ.
Default world: the demo's tiny world (runs/compare/tiny: world, pipeline metadata, the world's b32
as reference, as compare wires FLYT); without it a ci world, its reference and metadata are made
in a temporary folder (several minutes on a CPU; --world ci asks for it). Deterministic given --seed.
Writes benchmarks/results/flyt_by_noise.json.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from clipsift import config

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "runs" / "compare" / "tiny"
CHANGES = ("ce", "sgd", "terms", "trained")  # and lr=X, part=P, init=I, task=T
# parts of the reference (world-rn-s / open_clip CLIP parameter names); with logit_scale (whose v is
# 0: neither downstream loss reads the model's τ) they partition θ
PARTS = {"visual": lambda k: k.startswith("visual."), "tokens": lambda k: k == "token_embedding.weight",
         "text": lambda k: not k.startswith("visual.") and k not in ("token_embedding.weight", "logit_scale")}
INITS = ("uniform", "clip_score", "random")
SCORER_SAMPLE = 8192  # pool rows on which the scorer's first move is read


def _changes(variant: str) -> list[str]:
    """A variant's changes in a canonical order (keyed ones last); an unknown one is an error."""
    tokens = [c for c in variant.split("+") if c != "base"]
    for c in tokens:
        key, _, value = c.partition("=")
        ok = (c in CHANGES or (key == "lr" and _is_float(value)) or (key == "part" and value in PARTS)
              or (key == "init" and value in INITS) or (key == "task" and value))
        if not ok:
            raise ValueError(f"--variants {variant}: unknown change {c!r} (base, {', '.join(CHANGES)}, lr=X, "
                             f"part={'|'.join(PARTS)}, init={'|'.join(INITS)}, task=NAME)")
    return sorted(set(tokens), key=lambda c: (CHANGES.index(c), "") if c in CHANGES else (len(CHANGES), c))


def _value(changes: list[str], key: str, default):
    return next((c.partition("=")[2] for c in changes if c.startswith(key + "=")), default)


def _is_float(x: str) -> bool:
    try:
        return float(x) > 0
    except ValueError:
        return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default="", help="a world folder with ground truth (default: the demo's tiny world; "
                   "'ci': make a ci world, its reference and metadata in a temporary folder)")
    p.add_argument("--metadata", default="", help="the pipeline's OUT/metadata for the world's pool")
    p.add_argument("--reference", default="", help="reference CLIP (default: <world>/models/b32, as compare)")
    p.add_argument("--preset", default="ci", help="FLYT preset (configs/flyt/)")
    p.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE", help="more FLYT config overrides")
    p.add_argument("--batches", type=int, default=50, help="upstream batches measured")
    p.add_argument("--batch", type=int, default=0, help="upstream batch size (default: the preset's)")
    p.add_argument("--variants", nargs="*", default=["base", "lr=5e-5", "ce", "sgd", "terms", "trained"],
                   help=f"base, or '+'-joined changes of {', '.join(CHANGES)}, lr=X")
    p.add_argument("--ref-steps", type=int, default=30, help="plain reference steps before measuring (trained)")
    p.add_argument("--seed", type=int, default=0, help="the loop's seed (batch order, downstream batches)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "flyt_by_noise.json"))
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for v in args.variants:
        try:
            _changes(v)
        except ValueError as e:
            p.error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(_inputs(args, Path(tmp)), args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


def _inputs(args, tmp: Path) -> list[str]:
    """FLYT config overrides naming the world, its metadata and the reference."""
    if args.world == "ci":
        return _ci_inputs(tmp)
    if args.world:
        if not args.metadata:
            raise SystemExit("--world needs --metadata (the pipeline's OUT/metadata for its pool)")
        out = [f"world={args.world}", f"metadata={args.metadata}"]
        return out + ([f"reference.pretrained={args.reference}"] if args.reference else [])
    if (TINY / "world" / "pool" / "ground_truth").is_dir() and (TINY / "pipeline" / "metadata").is_dir():
        from clipsift.training import checkpoint

        ref = args.reference or str(checkpoint.latest_path(TINY / "world" / "models" / "b32"))
        return [f"world={TINY / 'world'}", f"metadata={TINY / 'pipeline' / 'metadata'}", f"reference.pretrained={ref}",
                f"decode_cache={TINY / 'decoded'}"]
    print("no runs/compare/tiny: making a ci world, its reference CLIP and pool metadata in", tmp)
    return _ci_inputs(tmp)


def _ci_inputs(root: Path) -> list[str]:
    """A ci world, a reference trained on its curated split (configs/train/ci.yaml) and the pool's
    metadata embedded with it as b32: what tests/test_flyt_world.py gives `clipsift flyt`."""
    from clipsift.eval.models import ModelSpec
    from clipsift.pipeline.config import EmbedConfig, RayConfig
    from clipsift.pipeline.embed import run_embed
    from clipsift.pipeline.heads import HeadSpec
    from clipsift.training.config import TrainConfig
    from clipsift.training.loop import train
    from clipsift.world.config import WorldConfig
    from clipsift.world.generate import generate_world

    world = generate_world(config.load(WorldConfig, config.preset_path("world", "ci"), [f"out={root / 'world'}"]),
                           progress=False)
    ref = root / "reference"
    train(config.load(TrainConfig, config.preset_path("train", "ci"),
                      [f"out={ref}", f"data.shards={world / 'curated' / 'shards'}", "data.workers=0", "progress=false"]))
    pipe = root / "pipeline"
    run_embed(EmbedConfig(input=str(world / "pool" / "shards"), out=str(pipe),
                          models={"b32": ModelSpec("world-rn-s", str(ref))},
                          heads={"clip_b32_similarity_score": HeadSpec("clip_score", "b32")},
                          batch_size=256, progress=False, ray=RayConfig(num_cpus=2)), echo=lambda *a: None)
    return [f"world={world}", f"metadata={pipe / 'metadata'}", f"reference.pretrained={ref}"]


def measure(inputs: list[str], args) -> dict:
    from clipsift.eval.models import load_model
    from clipsift.training.data import normalize
    from clipsift.training.flyt import data as fdata
    from clipsift.training.flyt import train as ftrain
    from clipsift.training.flyt.adamw import AdamWHyper, AdamWState, adamw_update, decayed_names
    from clipsift.training.flyt.config import FlytConfig
    from clipsift.training.flyt.hypergrad import (Comm, FunctionalCLIP, hypergradient_step, scorer_backward,
                                                  upstream_gradient)
    from clipsift.training.flyt.losses import weighted_clip_loss
    from clipsift.training.loop import resolve_device

    t_start = time.perf_counter()
    overrides = [*inputs, f"seed={args.seed}", *([f"batch_size={args.batch}"] if args.batch else []), *args.override]
    cfg = config.load(FlytConfig, config.preset_path("flyt", args.preset), overrides)
    ftrain._fill_from_world(cfg)
    device = resolve_device(cfg.device, 0)
    cuda = device.type == "cuda"
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    torch.manual_seed(cfg.seed)
    setup = ftrain.setup_scorer(cfg)  # only its features: PoolBatches joins Ψ by uid as the loop does
    ref = load_model(cfg.reference.arch, cfg.reference.pretrained, device)
    model = ref.model.eval()
    fmodel = FunctionalCLIP(model)
    size = model.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    pool = fdata.PoolBatches(cfg.pool, cfg.reference.arch, size, setup.features, cfg.batch_size, cfg.seed,
                             cache=cfg.decode_cache)
    truth = ftrain.noise_kinds(cfg, setup.features)
    if truth is None:
        raise SystemExit(f"{cfg.world}: no pool/ground_truth; this diagnostic needs a world's planted noise kinds")
    rows = setup.features.rows_for(pool.data.uids)  # a drawn sample always has a feature row
    kind_of_sample = truth[np.maximum(rows, 0)]
    kind_of_sample[kind_of_sample == ""] = "(unknown)"  # a uid without ground truth
    mean = torch.tensor(model.visual.preprocess_cfg["mean"], device=device)
    std = torch.tensor(model.visual.preprocess_cfg["std"], device=device)
    lo, hi = cfg.reference.logit_scale_min, cfg.reference.logit_scale_max

    def project(p):
        return {**p, "logit_scale": p["logit_scale"].clamp(lo, hi)} if "logit_scale" in p else p

    theta0 = fmodel.params()
    decay = decayed_names(theta0)
    all_rows = slice(None)
    hyper = lambda lr, sgd=False: AdamWHyper(lr, cfg.beta1, cfg.beta2, cfg.eps, cfg.reference.wd, sgd)  # noqa: E731
    state0 = AdamWState.zeros_like(theta0)
    if cfg.reference.moment_warmup:  # as the loop: the first batches fill the moments, θ stays
        state0 = ftrain.moment_warmup(fmodel, theta0, state0, hyper(0.0), pool, cfg.reference.moment_warmup,
                                      all_rows, (mean, std), Comm(), amp)

    def upstream(step: int):
        images, tokens, feats, idx = pool.batch(step, all_rows)
        return normalize(images.to(device), mean, std), tokens.to(device), kind_of_sample[idx], feats.to(device)

    trained: tuple | None = None  # (θ, state) after the plain steps, computed once

    def trained_reference():
        nonlocal trained
        if trained is None:
            params, state = theta0, state0
            for k in range(args.ref_steps):  # plain CLIP steps on the batches after the measured ones
                images, tokens, _, _ = upstream(args.batches + k)
                w = torch.full((images.shape[0],), 1.0 / images.shape[0], device=device)
                g = upstream_gradient(fmodel, params, images, tokens, w, amp=amp).g
                new, m, v = adamw_update(params, dict(zip(params, g)), state, hyper(cfg.reference.lr), decay)
                params, state = project(new), AdamWState(m, v, state.step + 1)
            trained = (params, state)
        return trained

    downs: dict[str, fdata.DownstreamBatches] = {}

    def downstream(loss: str) -> fdata.DownstreamBatches:
        if loss not in downs:
            c = copy.deepcopy(cfg)
            c.downstream.loss = loss
            task_data, _ = ftrain.load_downstream(c, ref)
            downs[loss] = fdata.DownstreamBatches(task_data, cfg.downstream.batch_size, cfg.seed,
                                                  used_prompts_only=loss in fdata.CLIP_LOSSES)
        return downs[loss]

    print(f"{cfg.world}: reference {cfg.reference.arch} ({cfg.reference.pretrained}) on {device}, "
          f"{args.batches} batches of {cfg.batch_size}, preset {args.preset}, seed {cfg.seed}")
    rng = np.random.default_rng([cfg.seed, 17])
    sample = rng.choice(len(truth), size=min(SCORER_SAMPLE, len(truth)), replace=False)
    sample = (torch.from_numpy(setup.features.values[sample]), np.where(truth[sample] == "", "(unknown)", truth[sample]))
    raw: dict[str, dict] = {}
    results: dict[str, dict] = {}
    for name in args.variants:
        changes = _changes(name)
        lr = float(_value(changes, "lr", cfg.reference.lr))
        part = _value(changes, "part", None)
        tangent = None if part is None else frozenset(k for k in theta0 if PARTS[part](k))
        scfg = copy.deepcopy(cfg)
        scfg.scorer.init = _value(changes, "init", cfg.scorer.init)
        torch.manual_seed(cfg.seed)  # the scorer's init as the loop draws it
        scorer = ftrain.setup_scorer(scfg).scorer.to(device)
        g_sum = g_sq = None
        t0 = time.perf_counter()
        loss = "ce" if "ce" in changes else cfg.downstream.loss
        params, state = trained_reference() if "trained" in changes else (theta0, state0)
        hp = hyper(lr, "sgd" in changes)
        negatives = "terms" not in changes
        up_loss = lambda u, t, tau, w: weighted_clip_loss(u, t, tau, w, negatives)  # noqa: E731
        down = downstream(loss)
        task = _value(changes, "task", None)
        keep = _task_terms(down, loss, task)
        rho = torch.nn.Parameter(torch.tensor(cfg.downstream.rho_init, device=device))
        ds, kinds, ups, down_losses = [], [], [], []
        for b in range(args.batches):
            images, tokens, kind, feats = upstream(b)
            dbatch = down.batch(b).to(device)
            if keep is not None:  # the same batch, the loss's other tasks' terms dropped
                dbatch = fdata.DownBatch(dbatch.images, dbatch.tokens, [dbatch.parts[i] for i in keep[0]])
            scores = scorer(feats)
            w = torch.softmax(scores.detach().float(), 0)  # uniform for the preset's init

            def down_loss(p):
                value = fdata.downstream_loss(lambda x, t: fmodel(p, x, t), dbatch, rho, loss)
                return value if keep is None else value / keep[1]  # that task's share of the mean

            res = hypergradient_step(fmodel, params, state, hp, decay, images, tokens, w, down_loss, [rho], project,
                                     amp=amp, up_loss=up_loss, tangent_names=tangent)
            scorer.zero_grad(set_to_none=True)
            scorer_backward(scores, res.d)
            g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().double()
                           for p in scorer.parameters()])
            g_sum, g_sq = (g, g * g) if g_sum is None else (g_sum + g, g_sq + g * g)
            ds.append(res.d.double().cpu().numpy())
            kinds.append(kind)
            ups.append(_per_example_loss(fmodel, params, images, tokens, amp))
            down_losses.append(float(res.down_loss))
        raw[name] = {"d": ds, "kinds": kinds}
        results[name] = summarise(ds, kinds, ups)
        move = scorer_move(scorer, g_sum / args.batches, g_sq / args.batches, sample, device)
        for k, row in results[name]["kinds"].items():
            row.update(move.get(k, {}))
        results[name]["scorer_init"] = scfg.scorer.init
        results[name]["part"] = part
        results[name]["task"] = task
        results[name]["changes"] = changes
        results[name]["inner_lr"] = hp.lr
        results[name]["downstream_loss"] = {"kind": loss, "mean_value": round(float(np.mean(down_losses)), 5)}
        results[name]["seconds"] = round(time.perf_counter() - t0, 1)
        print_block(name, results[name])
    derived = {}
    for name in args.variants:  # the negatives' share: the same batches, θ and v, only dJ/dw's loss differs
        changes = _changes(name)
        terms = next((t for t in raw if "terms" not in changes and _changes(t) == _changes("+".join([*changes, "terms"]))),
                     None)
        if terms is not None:
            diff = [a - b for a, b in zip(raw[name]["d"], raw[terms]["d"])]
            key = f"{name} - {terms} (negatives' share)"
            derived[key] = summarise(diff, raw[name]["kinds"], None)
            print_block(key, derived[key])
    return {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "commit": _commit(),
        "setup": {"world": str(cfg.world), "metadata": str(cfg.metadata), "reference": str(cfg.reference.pretrained),
                  "arch": cfg.reference.arch, "preset": args.preset, "overrides": args.override,
                  "batch_size": cfg.batch_size, "batches": args.batches, "downstream_per_task": cfg.downstream.batch_size,
                  "reference_lr": cfg.reference.lr, "moment_warmup": cfg.reference.moment_warmup,
                  "ref_steps": args.ref_steps, "seed": cfg.seed, "device": str(device),
                  "torch_threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - t_start, 1)},
        "variants": results, "derived": derived,
    }


def _task_terms(down, loss: str, task: str | None) -> tuple[list[int], int] | None:
    """For task=T: the indices of T's part in a downstream batch and how many terms the loss averages."""
    if task is None:
        return None
    if loss not in ("ce", "clip_per_task", "mixed"):
        raise SystemExit(f"task={task}: downstream loss {loss!r} is not a mean over tasks (use ce, clip_per_task or mixed)")
    names = [t.name for t in down.tasks]  # the loss's tasks (train.downstream_tasks chose them)
    if task not in names:
        raise SystemExit(f"task={task}: not one of this loss's tasks ({', '.join(names)})")
    return [names.index(task)], len(names)


def scorer_move(scorer: torch.nn.Module, g_mean: torch.Tensor, g_sq: torch.Tensor, sample, device) -> dict:
    """Per noise kind, the mean z of the scorer's first-order score change on the sampled rows,
    along −(mean ∇φ J) ("move_gd") and −(mean / rms of the per-batch ∇φ J) ("move_adam")."""
    from torch.func import functional_call, jvp

    x, kinds = sample
    x = x.to(device)
    names = [n for n, _ in scorer.named_parameters()]
    primals = tuple(p.detach() for _, p in scorer.named_parameters())
    out: dict[str, dict] = {}
    for key, direction in (("move_gd", -g_mean), ("move_adam", -g_mean / (g_sq.sqrt() + 1e-30))):
        tangents, at = [], 0
        for p in primals:
            tangents.append(direction[at:at + p.numel()].view_as(p).to(p.dtype))
            at += p.numel()
        with torch.no_grad():
            ds = jvp(lambda *ps: functional_call(scorer, dict(zip(names, ps)), (x,)), primals, tuple(tangents))[1]
        ds = ds.double().cpu().numpy()
        z = (ds - ds.mean()) / (ds.std() or 1.0)
        for k in sorted(set(kinds)):
            out.setdefault(str(k), {})[key] = float(z[kinds == k].mean())
    return out


@torch.no_grad()
def _per_example_loss(fmodel, params, images, tokens, amp) -> np.ndarray:
    """Each pair's CLIP loss at θ (its row's and column's cross-entropy, averaged): how badly the
    reference fits it."""
    with amp():
        u, t, tau = fmodel(params, images, tokens)
    logits = tau.float() * u.float() @ t.float().T
    diag = logits.diagonal()
    return (0.5 * ((torch.logsumexp(logits, 1) - diag) + (torch.logsumexp(logits, 0) - diag))).double().cpu().numpy()


def summarise(ds: list[np.ndarray], kinds: list[np.ndarray], ups: list[np.ndarray] | None) -> dict:
    """Per noise kind: the centred d's mean and standard errors, z, pref and upstream loss."""
    cen, z, pref = [], [], []
    for d in ds:
        c = d - d.mean()
        cen.append(c)
        z.append(c / (c.std() or 1.0))
        # share of the rest of the batch with a larger d (that example is preferred to them)
        pref.append((d[None, :] > d[:, None]).sum(1) / (len(d) - 1))
    cen_all, z_all, pref_all, kind_all = (np.concatenate(x) for x in (cen, z, pref, kinds))
    up_all = np.concatenate(ups) if ups is not None else None
    out = {}
    for k in sorted(set(kind_all)):
        sel = kind_all == k
        means = [c[kd == k].mean() for c, kd in zip(cen, kinds) if (kd == k).any()]  # one per batch holding k
        row = {"n": int(sel.sum()), "batches": len(means), "mean": float(cen_all[sel].mean()),
               "se": float(cen_all[sel].std(ddof=1) / np.sqrt(sel.sum())) if sel.sum() > 1 else None,
               "se_batches": float(np.std(means, ddof=1) / np.sqrt(len(means))) if len(means) > 1 else None,
               "z": float(z_all[sel].mean()), "pref": float(pref_all[sel].mean())}
        if up_all is not None:
            row["up_loss"] = float(up_all[sel].mean())
        out[k] = row
    summary = {"kinds": out, "mean_abs_d": float(np.mean([np.abs(d).mean() for d in ds])),
               "std_centred_d": float(np.mean([c.std() for c in cen]))}
    if ups is not None:  # does the objective simply follow how badly a pair is fitted?
        summary["corr_d_up_loss"] = float(np.mean([np.corrcoef(c, u)[0, 1] for c, u in zip(cen, ups)]))
    return summary


def print_block(name: str, r: dict) -> None:
    extra = "" if "changes" not in r else (f"  inner lr {r['inner_lr']:g}, downstream {r['downstream_loss']['kind']} "
                                           f"(mean {r['downstream_loss']['mean_value']:.4f}), scorer init "
                                           f"{r['scorer_init']}, {r['seconds']} s")
    print(f"\n[{name}]{extra}")
    print(f"  std of centred d per batch {r['std_centred_d']:.3e}"
          + (f"; corr(centred d, pair's upstream loss) {r['corr_d_up_loss']:+.3f}" if "corr_d_up_loss" in r else ""))
    moves = "move_gd" in next(iter(r["kinds"].values()))
    print(f"  {'kind':<16}{'n':>6}  {'mean centred d ± se (se over batches)':>40}  {'z':>7}  {'pref':>6}"
          + ("  up_loss" if "corr_d_up_loss" in r else "") + ("  Δs_gd  Δs_adam" if moves else ""))
    for k, row in r["kinds"].items():
        se = "—" if row["se"] is None else f"{row['se']:.2e}"
        seb = "—" if row["se_batches"] is None else f"{row['se_batches']:.2e}"
        print(f"  {k:<16}{row['n']:>6}  {row['mean']:>+14.3e} ± {se:>9} ({seb:>9})  {row['z']:>+7.3f}  "
              f"{row['pref']:>6.3f}" + (f"  {row['up_loss']:7.3f}" if "up_loss" in row else "")
              + (f"  {row['move_gd']:+.3f}  {row['move_adam']:+.3f}" if "move_gd" in row else ""))


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


if __name__ == "__main__":
    main()
