"""The FLYT training loop, shared by FLYT (GLU scorer on embeddings) and M-FLYT (linear mixer).

Per step: draw the global upstream batch (pool images + captions for the reference model, Ψ for
the scorer), weights w = softmax(q_φ(Ψ)) over the global batch, one hypergradient step
(hypergrad.py: dJ/dw and θ'), ∇φ J by the VJP of the softmax, φ <- AdamW(φ), θ <- θ'. The
reference model starts from a pretrained CLIP and keeps training with the functional AdamW whose
history is in the checkpoint. Afterwards the pool is scored with q_φ (one forward per example).

Run directory: config.yaml, checkpoints/latest.pt (everything to resume), scorer.pt (what a
score head needs), scores/<stem>.parquet (uid + score column, row-aligned with the metadata),
stats.json (losses over time, timings, counts), train.log; M-FLYT also mixer_weights.json.
Data parallel under torchrun: each rank takes a slice of the global batch; scores are gathered
so the softmax is over the global batch; gradients are summed (see hypergrad.Comm).
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from clipsift import config, formats
from clipsift.runlog import Timer, atomic_path, write_json
from clipsift.training.config import flat_config
from clipsift.training.data import normalize
from clipsift.training.loop import default_threads, init_distributed, log_to, resolve_device
from clipsift.training.flyt import data as fdata
from clipsift.training.flyt.adamw import AdamWHyper, AdamWState, decayed_names
from clipsift.training.flyt.config import RESUME_FREE_KEYS, DownstreamConfig, FlytConfig, LoopConfig, MFlytConfig
from clipsift.training.flyt.heads import SCORER_FILE, features_from_inputs
from clipsift.training.flyt.hypergrad import Comm, FunctionalCLIP, hypergradient_step, scorer_backward, warm_moments
from clipsift.training.flyt.scorer import GLUScorer, LinearMixer, standardisation, whitening

log = logging.getLogger("clipsift.training.flyt")
CHECKPOINT = Path("checkpoints") / "latest.pt"


@dataclass
class ScorerSetup:
    """What differs between FLYT and M-FLYT: the scorer, its inputs and its optimiser settings."""

    kind: str  # flyt | mflyt
    scorer: torch.nn.Module
    features: fdata.Features
    inputs: list[str]  # pipeline names the scorer reads (saved in scorer.pt)
    lr: float
    wd: float


def run(cfg: LoopConfig) -> Path:
    """Train the scorer of cfg (FlytConfig or MFlytConfig), then score the pool. Returns the run dir."""
    _fill_from_world(cfg)
    rank, world_size, local_rank = init_distributed(cfg.device)
    device = resolve_device(cfg.device, local_rank)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or default_threads())
    run_dir = Path(cfg.out)
    handler = log_to(run_dir / "train.log", log) if rank == 0 else None
    try:
        return _run(cfg, run_dir, device)
    finally:
        torch.set_num_threads(old_threads)
        if handler is not None:
            log.removeHandler(handler)
            handler.close()


def _fill_from_world(cfg: LoopConfig) -> None:
    if not cfg.world:
        return
    world = Path(cfg.world)
    cfg.pool = cfg.pool or str(world / "pool" / "shards")
    cfg.downstream.tasks = cfg.downstream.tasks or str(world / "tasks.yaml")
    cfg.reference.pretrained = cfg.reference.pretrained or str(world / "models" / "b32")


def _check_inputs(cfg: LoopConfig) -> None:
    """Say what is missing before anything slow starts."""
    if not cfg.metadata:
        raise ValueError("metadata is required: the pipeline's OUT/metadata folder for this pool "
                         "(DataComp parquet + npz; `clipsift embed` writes it)")
    if not cfg.pool:
        raise ValueError("pool is required (a folder of {:08d}.tar shards), or world=DIR")
    if not cfg.downstream.tasks:
        raise ValueError("downstream.tasks is required (a tasks.yaml), or world=DIR")
    if not cfg.reference.pretrained:
        raise ValueError("reference.pretrained is required (a pretrained CLIP checkpoint or run folder; "
                         "with world=DIR it is DIR/models/b32, see `clipsift train --reference-models`)")
    for name, path in (("metadata", cfg.metadata), ("pool", cfg.pool), ("downstream.tasks", cfg.downstream.tasks)):
        if not Path(path).exists():
            raise FileNotFoundError(f"{name}: {path} does not exist")


def setup_scorer(cfg: LoopConfig) -> ScorerSetup:
    """The scorer and its features for this config (seed torch first: the init is random)."""
    if isinstance(cfg, FlytConfig):
        sc = cfg.scorer
        names = [f"{sc.embeddings}_img", f"{sc.embeddings}_txt"]
        feats = fdata.embedding_features(cfg.metadata, *names)
        scorer = GLUScorer(feats.values.shape[1], sc.hidden or None, sc.depth)
        if sc.init == "clip_score":
            scorer.init_as_clip_score(sc.init_scale)
        elif sc.init == "uniform":
            scorer.zero_output()
        return ScorerSetup("flyt", scorer, feats, names, sc.lr, sc.wd)
    if isinstance(cfg, MFlytConfig):
        mc = cfg.mixer
        feats = fdata.column_features([cfg.metadata, *mc.extra_metadata], mc.columns)
        mean, std = standardisation(torch.from_numpy(feats.values))
        whiten = whitening(torch.from_numpy(feats.values), mean, std) if mc.inputs == "whitened" else None
        mixer = LinearMixer(mc.columns, mean, std, whiten)
        if mc.init == "zero":
            mixer.zero_()
        elif mc.init == "equal":
            mixer.equal_()
        return ScorerSetup("mflyt", mixer, feats, list(mc.columns), mc.lr, mc.wd)
    raise TypeError(f"not a FLYT config: {type(cfg).__name__}")


def downstream_tasks(cfg: DownstreamConfig) -> tuple[list, dict[str, str]]:
    """The tasks FLYT's downstream loss uses (eval.tasks.Task, in list order; only `names` if given)
    and those it leaves out, with why: a group in `left_out_groups`, or a retrieval task under ce."""
    from clipsift.eval.tasks import load_tasks

    tasks = load_tasks(cfg.tasks)
    if cfg.names:
        unknown = sorted(set(cfg.names) - {t.name for t in tasks})
        if unknown:
            raise ValueError(f"downstream.names: {unknown} not in {cfg.tasks}")
        tasks = [t for t in tasks if t.name in cfg.names]
    named_but_left_out = [t.name for t in tasks if t.group in cfg.left_out_groups] if cfg.names else []
    if named_but_left_out:
        raise ValueError(f"downstream.names: {named_but_left_out} in a group that downstream.left_out_groups "
                         f"{cfg.left_out_groups} leaves out; drop one of the two")
    left_out = {t.name: f"group {t.group!r} is in downstream.left_out_groups (no training split in the paper's "
                        "setting)" for t in tasks if t.group in cfg.left_out_groups}
    left_out |= {t.name: "loss=ce has no cross-entropy for a retrieval task" for t in tasks
                 if t.name not in left_out and cfg.loss == "ce" and t.type != "classification"}
    tasks = [t for t in tasks if t.name not in left_out]
    if not tasks:
        raise ValueError(f"downstream: no task left for loss={cfg.loss} (left out: {left_out})")
    return tasks, left_out


def load_downstream(cfg: LoopConfig, ref) -> tuple[list[fdata.TaskData], dict[str, str]]:
    """The selected downstream tasks' training splits, preprocessed for the reference `ref`
    (eval.models.load_model's result), and the tasks left out for the loss, with why."""
    tasks, left_out = downstream_tasks(cfg.downstream)
    for name, why in left_out.items():
        log.info("downstream task %s left out: %s", name, why)
    return [fdata.load_task(t, cfg.downstream.split, ref.preprocess, ref.tokenizer) for t in tasks], left_out


def _run(cfg: LoopConfig, run_dir: Path, device: torch.device) -> Path:
    from clipsift.eval.models import load_model
    from clipsift.training.loop import cosine_lr

    _check_inputs(cfg)
    comm = Comm()
    timer = Timer()
    t_start = time.perf_counter()
    resolved = config.to_dict(cfg)
    ckpt_path = run_dir / CHECKPOINT
    state = _resume_state(cfg, run_dir, resolved)
    if comm.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.dump(cfg, run_dir / "config.yaml")
    if cfg.batch_size % comm.world_size:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {comm.world_size} ranks")

    # Scorer and its features (first: a wrong column or embedding name fails fast), reference model
    # (eval mode: BatchNorm statistics frozen, see hypergrad.py), ρ.
    torch.manual_seed(cfg.seed)
    with timer("load_features"):
        setup = setup_scorer(cfg)
    with timer("load_models"):
        ref = load_model(cfg.reference.arch, cfg.reference.pretrained, device)
    model = ref.model.eval()
    fmodel = FunctionalCLIP(model)
    scorer = setup.scorer.to(device)
    rho = torch.nn.Parameter(torch.tensor(cfg.downstream.rho_init, device=device))
    rho_with_scorer = cfg.downstream.rho_optimizer == "scorer"
    decay = [p for p in scorer.parameters() if p.ndim >= 2]
    no_decay = [p for p in scorer.parameters() if p.ndim < 2] + ([rho] if rho_with_scorer else [])
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": setup.wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=setup.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    # the paper's ρ is a reference parameter: the reference's AdamW settings and schedule, no decay
    rho_opt = None if rho_with_scorer else torch.optim.AdamW([rho], lr=cfg.reference.lr, betas=(cfg.beta1, cfg.beta2),
                                                              eps=cfg.eps, weight_decay=0.0)

    # Data: the pool (decoded once) with Ψ, and the downstream tasks' training splits.
    size = int(model.visual.image_size[0] if isinstance(model.visual.image_size, (tuple, list))
               else model.visual.image_size)
    with timer("load_pool"):
        pool = fdata.PoolBatches(cfg.pool, cfg.reference.arch, size, setup.features, cfg.batch_size, cfg.seed,
                                 workers=cfg.workers, progress=cfg.progress and comm.rank == 0, cache=cfg.decode_cache)
    with timer("load_tasks"):
        task_data, left_out = load_downstream(cfg, ref)
        down = fdata.DownstreamBatches(task_data, cfg.downstream.batch_size, cfg.seed,
                                       used_prompts_only=cfg.downstream.loss in fdata.CLIP_LOSSES)
    mean = torch.tensor(model.visual.preprocess_cfg["mean"], device=device)
    std = torch.tensor(model.visual.preprocess_cfg["std"], device=device)

    params = fmodel.params()
    ref_state = AdamWState.zeros_like(params)
    start, rows, prior_seconds, auc_rows = 0, [], 0.0, []
    if state is not None:
        model.load_state_dict(state["reference"])
        params = fmodel.params()
        ref_state = AdamWState.from_state_dict(state["reference_opt"], device)
        scorer.load_state_dict(state["scorer"])
        with torch.no_grad():
            rho.copy_(state["rho"])
        opt.load_state_dict(state["scorer_opt"])
        if rho_opt is not None:
            rho_opt.load_state_dict(state["rho_opt"])
        auc_rows = list(state.get("noise_auc", []))
        start, rows, prior_seconds = int(state["step"]), list(state["log"]), float(state["train_seconds"])
        log.info("resuming %s at step %d/%d", ckpt_path, start, cfg.steps)
    decay_names = decayed_names(params)
    cuda = device.type == "cuda"
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)
    amp: Callable[[], Any] = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16
                              else contextlib.nullcontext)
    jvp_mode = _jvp_mode(cfg, device, model)
    rows_local = comm.local_rows(cfg.batch_size)
    hyper = lambda lr: AdamWHyper(lr, cfg.beta1, cfg.beta2, cfg.eps, cfg.reference.wd)  # noqa: E731
    if state is None and cfg.reference.moment_warmup:
        with timer("moment_warmup"):
            ref_state = moment_warmup(fmodel, params, ref_state, hyper(0.0), pool, cfg.reference.moment_warmup,
                                      rows_local, (mean, std), comm, amp)
    lo, hi = cfg.reference.logit_scale_min, cfg.reference.logit_scale_max

    def project(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**p, "logit_scale": p["logit_scale"].clamp(lo, hi)} if "logit_scale" in p else p

    def save(step: int) -> None:
        if comm.rank != 0:
            return
        with timer("checkpoint"):
            fmodel.load(params)
            from clipsift.training import checkpoint

            checkpoint.save(run_dir / CHECKPOINT, {
                "step": step, "config": resolved, "kind": setup.kind, "scorer": scorer.state_dict(),
                "scorer_spec": scorer.spec, "inputs": setup.inputs, "rho": rho.detach().cpu(),
                "scorer_opt": opt.state_dict(), "rho_opt": rho_opt.state_dict() if rho_opt else None,
                "noise_auc": auc_rows, "reference": model.state_dict(), "name": cfg.reference.arch,
                "reference_opt": ref_state.state_dict(), "log": rows,
                "train_seconds": prior_seconds + timer.seconds.get("train", 0.0)})

    end = min(cfg.steps, cfg.stop_after_steps) if cfg.stop_after_steps is not None else cfg.steps
    log.info("%s: reference %s on %s x%d (%s), pool %d usable, %d tasks, steps %d..%d of %d, batch %d",
             setup.kind, cfg.reference.arch, device, comm.world_size, "bf16 autocast" if bf16 else "fp32",
             len(pool), len(task_data), start, end, cfg.steps, cfg.batch_size)
    from tqdm import tqdm

    truth = noise_kinds(cfg, setup.features) if cfg.noise_auc and comm.rank == 0 else None

    def log_auc(done: int) -> None:
        if truth is None:
            return
        with timer("noise_auc"):
            auc_rows.append({"step": done, "auc": noise_aucs(pool_scores(scorer, setup.features, device), truth)})
        log.info("step %d clean-vs-noise AUC: %s", done, ", ".join(f"{k} {v:.3f}" for k, v in auc_rows[-1]["auc"].items()))

    if start == 0:
        log_auc(0)
    bar = tqdm(total=cfg.steps, initial=start, unit="step", desc=setup.kind, dynamic_ncols=True,
               disable=not cfg.progress or comm.rank != 0)
    step = start
    try:
        with timer("train"):
            for step in range(start, end):
                t0 = time.perf_counter()
                lr_ref = cosine_lr(step, cfg.reference.lr, cfg.warmup, cfg.steps)
                lr_phi = cosine_lr(step, setup.lr, cfg.warmup, cfg.steps)
                images, tokens, feats, _ = pool.batch(step, rows_local)
                images = normalize(images.to(device, non_blocking=True), mean, std)
                tokens, feats = tokens.to(device, non_blocking=True), feats.to(device, non_blocking=True)
                dbatch = down.batch(step, comm.rank, comm.world_size).to(device)
                scores = scorer(feats)
                w = torch.softmax(comm.gather(scores.detach().float()), dim=0)

                def down_loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
                    return fdata.downstream_loss(lambda x, t: fmodel(p, x, t), dbatch, rho, cfg.downstream.loss)

                res = hypergradient_step(fmodel, params, ref_state, hyper(lr_ref), decay_names, images, tokens, w,
                                         down_loss, [rho], project, comm, amp, timer, jvp_mode=jvp_mode)
                opt.zero_grad(set_to_none=True)
                scorer_backward(scores, res.d, comm)
                rho.grad = res.extra_grads[0].to(rho.dtype)
                comm.sum_([p.grad for p in scorer.parameters() if p.grad is not None])
                for group in opt.param_groups:
                    group["lr"] = lr_phi
                opt.step()
                if rho_opt is not None:
                    rho_opt.param_groups[0]["lr"] = lr_ref
                    rho_opt.step()
                params, ref_state = res.params, res.state
                done = step + 1
                if done % cfg.log_every == 0 or done == end:
                    rows.append(_log_row(done, res, w, lr_ref, lr_phi, rho, params, time.perf_counter() - t0, comm))
                    log.info("step %d/%d up %.4f down %.4f ess %.3f", done, cfg.steps, rows[-1]["up_loss"],
                             rows[-1]["down_loss"], rows[-1]["ess_fraction"])
                    bar.set_postfix(up=f"{rows[-1]['up_loss']:.3f}", down=f"{rows[-1]['down_loss']:.3f}")
                bar.update(1)
                if done % cfg.checkpoint_every == 0 and done != end:
                    log_auc(done)
                    save(done)
            step = end
    finally:
        bar.close()
    if step > start:
        log_auc(step)
    save(step)

    out: dict[str, Any] = {}
    finished = step >= cfg.steps
    if comm.rank == 0:
        write_scorer(run_dir / SCORER_FILE, setup, scorer, cfg, step)
        if setup.kind == "mflyt":
            weights = scorer.weights()
            write_json(run_dir / "mixer_weights.json", weights)
            out["mixer_weights"] = weights
            log.info("M-FLYT weights (standardised inputs): %s",
                     ", ".join(f"{k} {v:+.3f}" for k, v in weights.items()))
        if cfg.score_pool and finished:
            with timer("score_pool"):
                out["scored"] = score_metadata(scorer, setup, cfg, run_dir / "scores", device)
    timer.seconds["total"] = time.perf_counter() - t_start
    if comm.rank == 0:
        out["noise_auc"] = auc_rows or None
        out["downstream_left_out"] = left_out
        out["jvp"] = jvp_mode
        write_json(run_dir / "stats.json", _stats(cfg, setup, pool, task_data, step, start, device, comm, bf16,
                                                  timer, prior_seconds, rows, out))
    if comm.distributed:
        dist.barrier()
    return run_dir


def moment_warmup(fmodel: FunctionalCLIP, params, state: AdamWState, hp: AdamWHyper, pool: fdata.PoolBatches,
                  batches: int, rows: slice, mean_std: tuple[torch.Tensor, torch.Tensor], comm: Comm,
                  amp: Callable[[], Any]) -> AdamWState:
    """AdamW's moments filled from the first `batches` upstream batches (θ does not move; see
    hypergrad.warm_moments), on the device of mean_std (the preprocessing's mean and std)."""
    mean, std = mean_std
    for k in range(batches):
        images, tokens, _, _ = pool.batch(k, rows)
        state = warm_moments(fmodel, params, state, hp, normalize(images.to(mean.device), mean, std),
                             tokens.to(mean.device), comm, amp)
    return state


def _log_row(step, res, w, lr_ref, lr_phi, rho, params, seconds, comm) -> dict[str, Any]:
    n = w.numel()
    return {"step": step, "up_loss": round(float(res.up_loss), 6), "down_loss": round(_mean(res.down_loss, comm), 6),
            # effective sample size of the weights as a fraction of the batch (1 = uniform)
            "ess_fraction": round(float(1.0 / (w * w).sum() / n), 4), "w_max_x_batch": round(float(w.max() * n), 3),
            "lr_reference": lr_ref, "lr_scorer": lr_phi, "rho": round(float(rho.detach()), 4),
            "logit_scale": round(float(params["logit_scale"].exp()), 3) if "logit_scale" in params else None,
            "step_seconds": round(seconds, 4)}


def _mean(x: torch.Tensor, comm: Comm) -> float:
    # a copy on the loss's device (NCCL reduces device tensors only; the reduction is in place)
    t = x.to(torch.float64, copy=True).reshape(1)
    comm.mean_([t])
    return float(t)


def noise_kinds(cfg: LoopConfig, features: fdata.Features) -> np.ndarray | None:
    """The planted noise kind of each feature row from the world's ground truth ("" where a uid has
    none); None without a world (a real pool has no ground truth)."""
    if not cfg.world or not (Path(cfg.world) / "pool" / "ground_truth").is_dir():
        return None
    from clipsift.world.generate import load_ground_truth

    gt = load_ground_truth(cfg.world)
    kind_of = dict(zip(gt.column("uid").to_pylist(), gt.column("noise").to_pylist()))
    return np.array([kind_of.get(u, "") for u in features.uids])


@torch.no_grad()
def pool_scores(scorer: torch.nn.Module, features: fdata.Features, device: torch.device,
                chunk: int = 16384) -> np.ndarray:
    """The scorer's score of every feature row (fp32, in chunks)."""
    values = torch.from_numpy(features.values)
    return torch.cat([scorer(values[i : i + chunk].to(device)).float().cpu()
                      for i in range(0, len(values), chunk)]).numpy()


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a random positive scores above a random negative), ties counting half."""
    neg = np.sort(neg)
    below = np.searchsorted(neg, pos, "left")
    ties = np.searchsorted(neg, pos, "right") - below
    return float((below + 0.5 * ties).sum() / (len(pos) * len(neg)))


def noise_aucs(scores: np.ndarray, kinds: np.ndarray) -> dict[str, float]:
    """AUC of clean pairs against each planted noise kind present (1 = every clean pair above it)."""
    clean = scores[kinds == "clean"]
    return {str(k): round(auc(clean, scores[kinds == k]), 4) for k in sorted(set(kinds) - {"clean", ""})
            if len(clean) and (kinds == k).any()}


def write_scorer(path: Path, setup: ScorerSetup, scorer: torch.nn.Module, cfg: LoopConfig, step: int) -> None:
    from clipsift.training import checkpoint

    checkpoint.save(path, {"kind": setup.kind, "spec": scorer.spec, "inputs": setup.inputs, "column": cfg.column,
                           "state_dict": {k: v.detach().cpu() for k, v in scorer.state_dict().items()},
                           "step": step, "reference": cfg.reference.arch})


@torch.no_grad()
def score_metadata(scorer: torch.nn.Module, setup: ScorerSetup, cfg: LoopConfig, out: Path,
                   device: torch.device) -> dict[str, Any]:
    """Score every row of the metadata folder: out/<stem>.parquet with uid and the score column,
    row-aligned with the input (a folder another M-FLYT run can read as extra_metadata)."""
    from clipsift.filters.pool import MetadataPool

    scorer.eval()
    pool = MetadataPool(cfg.metadata)
    if setup.kind == "flyt":  # Ψ from the npz, one metadata file per batch (found by its first row)
        first_row = dict(zip(np.cumsum([0] + pool.rows[:-1]).tolist(), pool.files))
        for path, n in zip(pool.files, pool.rows):
            if n == 0:
                _write_scores(out / f"{path.stem}.parquet", [], np.zeros(0, np.float32), cfg.column)
        for batch in pool.batches({"uid"}, set(setup.inputs), batch_size=max(max(pool.rows), 1)):
            x = features_from_inputs("flyt", [torch.from_numpy(batch.embedding(k)) for k in setup.inputs])
            _write_scores(out / f"{first_row[batch.offset].stem}.parquet", list(batch.column("uid")),
                          scorer(x.to(device)).float().cpu().numpy(), cfg.column)
    else:  # the mixer's inputs were all read already, in the row order of the main metadata folder
        values = torch.from_numpy(setup.features.values)
        offset = 0
        for path, n in zip(pool.files, pool.rows):
            _write_scores(out / f"{path.stem}.parquet", setup.features.uids[offset : offset + n],
                          scorer(values[offset : offset + n].to(device)).float().cpu().numpy(), cfg.column)
            offset += n
    rows = pool.num_rows
    scorer.train()
    return {"rows": rows, "folder": str(out), "column": cfg.column}


def _write_scores(path: Path, uids: list[str], scores: np.ndarray, column: str) -> None:
    table = pa.table({"uid": pa.array(uids, pa.string()), column: pa.array(scores.astype(np.float32),
                                                                          formats.SCORE_TYPE)})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _jvp_mode(cfg: LoopConfig, device: torch.device, model: torch.nn.Module) -> str:
    """auto: the faster mode as measured (benchmarks/flyt.py, docs/results/performance.md): forward-mode
    for a transformer image tower on a GPU (ViT-B-32 3.98x a plain step against 4.47x on an H100),
    the backward's transpose otherwise (world-rn-s on the H100 4.12x against 5.38x; every CPU case)."""
    if cfg.jvp != "auto":
        return cfg.jvp
    from open_clip.transformer import VisionTransformer

    return "forward" if device.type == "cuda" and isinstance(model.visual, VisionTransformer) else "backward"


def _stats(cfg, setup, pool, task_data, step, start, device, comm, bf16, timer, prior_seconds, rows, out):
    train_s = timer.seconds.get("train", 0.0)
    return {
        "done": step >= cfg.steps, "kind": setup.kind, "steps": step, "steps_total": cfg.steps,
        "resumed_at_step": start or None, "batch_size": cfg.batch_size, "device": str(device),
        "world_size": comm.world_size, "precision": "bf16" if bf16 else "fp32",
        "pool": pool.stats(), "features": {"inputs": setup.inputs, "rows": len(setup.features.uids)},
        "downstream": {t.name: {"kind": t.kind, "examples": int(t.images.shape[0]), "records": t.counts}
                       for t in task_data},
        "timings": timer.as_dict(), "train_seconds_all_sessions": round(prior_seconds + train_s, 3),
        "seconds_per_step": round(train_s / (step - start), 4) if step > start else None,
        "final": rows[-1] if rows else None, "log": rows, **out,
    }


def _resume_state(cfg: LoopConfig, run_dir: Path, resolved: dict[str, Any]) -> dict[str, Any] | None:
    from clipsift.training import checkpoint

    path = run_dir / CHECKPOINT
    if cfg.resume is None:
        if path.is_file():
            raise FileExistsError(f"{run_dir} already holds a checkpoint; pass resume=latest to continue it "
                                  "or choose another out")
        return None
    if cfg.resume != "latest":
        path = Path(cfg.resume)
        if not path.is_file():
            raise FileNotFoundError(f"resume: no checkpoint at {path}")
    elif not path.is_file():
        return None
    state = checkpoint.load(path)
    a, b = flat_config(state["config"]), flat_config(resolved)
    differ = sorted(k for k in set(a) | set(b) if k not in RESUME_FREE_KEYS and a.get(k) != b.get(k))
    if differ:
        raise ValueError(f"resume: {path} was trained with a different config "
                         f"({', '.join(f'{k}: {a.get(k)!r} -> {b.get(k)!r}' for k in differ[:5])})")
    return state
