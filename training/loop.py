"""train(cfg): fixed-compute contrastive training of an open_clip CLIP on shards (+ subset).

The compute is fixed by the config (samples seen, global batch, lr, warmup, AdamW betas/eps/wd,
cosine schedule, the model and so its image size); a filtering strategy only changes the data.
One process or DDP under torchrun (ranks split each global batch; the contrastive loss is over
the global batch: features are gathered with their gradient and each rank computes the loss of
its own rows against all columns, so the averaged gradient is the one-process gradient).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from open_clip import ClipLoss

from clipsift import config
from clipsift.runlog import Timer, write_json
from clipsift.training import checkpoint
from clipsift.training.config import TrainConfig, flat_config, config_differences
from clipsift.training.data import normalize, open_data
from clipsift.training.models import create_model, image_size, param_groups, use_global_batchnorm

log = logging.getLogger("clipsift.training")


def cosine_lr(step: int, base_lr: float, warmup: int, steps: int) -> float:
    """open_clip's schedule: linear warmup to base_lr over `warmup` steps, then cosine to 0."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    span = max(steps - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / span)) * base_lr


class Stepper:
    """The model, its optimiser and loss, and one optimisation step on a batch of uint8 images
    and tokens. Shared by train() and benchmarks/train.py (its data-free ceiling)."""

    def __init__(self, cfg: TrainConfig, device: torch.device, rank: int = 0, world_size: int = 1):
        torch.manual_seed(cfg.seed)
        self.model = model = create_model(cfg.model, device)
        global_bn = cfg.batch_norm == "global" or (cfg.batch_norm == "auto" and world_size > 1)
        if global_bn:
            use_global_batchnorm(model)
        self.device, self.grad_clip_norm = device, cfg.grad_clip_norm
        self.mean = torch.tensor(model.visual.preprocess_cfg["mean"], device=device)
        self.std = torch.tensor(model.visual.preprocess_cfg["std"], device=device)
        cuda = device.type == "cuda"
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)
        # Fused AdamW on CPU too: one pass over the parameters, ~8x faster than the default on
        # CPU; with the token table (49408 x width) the optimiser step was ~15% of a tiny step.
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg.wd), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                           eps=cfg.eps, fused=True)
        self.loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=rank,
                                world_size=world_size)
        self.forward = model
        if world_size > 1:
            self.forward = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device] if cuda else None, broadcast_buffers=not global_bn)
        self.graphs = cuda and cfg.compile == "reduce-overhead"
        if cfg.compile != "off" and cuda:  # as open_clip's --torchcompile: the model, not the loss
            self.forward = torch.compile(self.forward, mode=None if cfg.compile == "default" else cfg.compile)
        elif cfg.compile != "off":
            log.info("compile=%s applies on cuda; the step runs eagerly on %s", cfg.compile, device)
        model.train()

    def step(self, images: torch.Tensor, tokens: torch.Tensor, lr: float) -> torch.Tensor:
        """One AdamW step at learning rate `lr`; returns the (local) loss, not synchronised."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.graphs:  # a new iteration: the CUDA graphs may reuse the last one's outputs
            torch.compiler.cudagraph_mark_step_begin()
        images = normalize(images.to(self.device, non_blocking=True), self.mean, self.std)
        tokens = tokens.to(self.device, non_blocking=True)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with autocast:
            image_features, text_features, logit_scale = self.forward(images, tokens)[:3]
            loss = self.loss_fn(image_features, text_features, logit_scale)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip_norm)
        self.optimizer.step()
        with torch.no_grad():  # as open_clip: keep the temperature in [1, 100]
            self.model.logit_scale.clamp_(0, math.log(100))
        return loss.detach()


def train(cfg: TrainConfig) -> Path:
    """Train to cfg.samples_seen (or stop_after_steps) and return the run directory."""
    run = Path(cfg.out)
    rank, world_size, local_rank = init_distributed(cfg.device)
    device = resolve_device(cfg.device, local_rank)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or default_threads())
    handler = log_to(run / "train.log") if rank == 0 else None
    try:
        return _train(cfg, run, rank, world_size, device)
    finally:
        torch.set_num_threads(old_threads)
        if handler is not None:
            log.removeHandler(handler)
            handler.close()


def _train(cfg: TrainConfig, run: Path, rank: int, world_size: int, device: torch.device) -> Path:
    timer = Timer()
    t_start = time.perf_counter()
    config.check(cfg)  # sizes in range (a loaded config was checked already; this is for library callers)
    steps = cfg.samples_seen // cfg.batch_size
    if steps < 1:
        raise config.ConfigError(f"samples_seen: {cfg.samples_seen} is less than one batch of {cfg.batch_size}; "
                                 "raise samples_seen or lower batch_size")
    resolved = config.to_dict(cfg)

    ckpt_path = checkpoint.latest_path(run)
    resume_from = checkpoint.resolve_resume(cfg.resume, run)
    if resume_from is None and ckpt_path.is_file():
        raise FileExistsError(f"{run} already holds a checkpoint; pass resume=latest to continue it "
                              "or choose another out")
    state = checkpoint.load(resume_from, resume=True) if resume_from else None
    if state is not None:
        _check_resumable(state["config"], resolved, resume_from)
        if state["step"] >= steps:
            log.info("%s: already complete (%d steps); nothing to do", run, state["step"])
            return run
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_stale_temporaries(run)
        config.dump(cfg, run / "config.yaml")

    stepper = Stepper(cfg, device, rank, world_size)
    model, optimizer = stepper.model, stepper.optimizer
    if cfg.init and state is None:  # fine-tuning: a resumed run already holds its own weights
        from clipsift.eval.models import resolve_pretrained

        init = resolve_pretrained(cfg.model, cfg.init)
        model.load_state_dict(checkpoint.load(Path(init))["state_dict"])
        log.info("weights initialised from %s", init)
    size, cuda, bf16 = image_size(model), device.type == "cuda", stepper.bf16

    with timer("load_data"):
        data, notes = open_data(cfg.data, cfg.model, size, int(model.context_length) * 4, cfg.batch_size, cfg.seed,
                                rank, world_size, progress=cfg.progress and rank == 0, pin_memory=cuda,
                                device=device)
        if data.mode == "memory" and cuda:
            data.to(device)

    start, rows, prior_seconds = 0, [], 0.0
    if state is not None:
        if state.get("data_mode") != data.mode or state.get("lanes") != _lanes(data, world_size):
            raise config.ConfigError(
                f"resume: the checkpoint was written with data mode {state.get('data_mode')} and {state.get('lanes')} "
                f"stream lanes; this run has {data.mode} / {_lanes(data, world_size)}, which would change the data "
                "order; set data.mode and data.workers as that run did")
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        checkpoint.set_rng_state(state["rng"])
        data.load_state(state["data_state"])
        start, rows, prior_seconds = state["step"], list(state["log"]), float(state["train_seconds"])
        log.info("resuming %s at step %d/%d", resume_from, start, steps)
    end = min(steps, cfg.stop_after_steps) if cfg.stop_after_steps is not None else steps
    params = sum(p.numel() for p in model.parameters())
    log.info("model %s (%.2fM params, %d px) on %s x%d, %s; %d steps of %d; data %s", cfg.model, params / 1e6, size,
             device, world_size, "bf16 autocast" if bf16 else "fp32", steps, cfg.batch_size, data.mode)

    def save(step: int) -> None:
        if rank != 0:
            return
        with timer("checkpoint"):
            checkpoint.save(checkpoint.latest_path(run), {
                "epoch": _passes_done(data, step * cfg.batch_size), "name": cfg.model, "step": step,
                "samples_seen": step * cfg.batch_size, "state_dict": model.state_dict(),
                "optimizer": optimizer.state_dict(), "rng": checkpoint.rng_state(), "data_state": data.state(),
                "data_mode": data.mode, "lanes": _lanes(data, world_size), "config": resolved, "log": rows,
                "train_seconds": prior_seconds + time.perf_counter() - t_train})

    from tqdm import tqdm

    bar = tqdm(total=steps, initial=start, unit="step", desc=f"train {cfg.model}", dynamic_ncols=True,
               disable=not cfg.progress or rank != 0)
    batches = data.batches(start)
    clock = StepClock(device)
    t_train = time.perf_counter()
    window = (t_train, start)
    step, loss = start, None
    try:
        with timer("train"):
            for step in range(start, end):
                with timer("data_wait" if step > start else "first_batch"):  # start-up apart
                    batch = next(batches)
                lr = cosine_lr(step, cfg.lr, cfg.warmup, steps)
                mark = clock.start()
                loss = stepper.step(batch.images, batch.tokens, lr)
                clock.stop(mark)
                done = step + 1
                if done % cfg.log_every == 0 or done == end:  # the only reads from the device: every log_every steps
                    now = time.perf_counter()
                    rate = (done - window[1]) * cfg.batch_size / max(now - window[0], 1e-9)
                    window = (now, done)
                    row = {"step": done, "loss": _global_mean(loss.float(), world_size), "lr": lr,
                           "samples_per_s": round(rate, 1), "logit_scale": round(float(model.logit_scale.detach().exp()), 3)}
                    rows.append(row)
                    clock.collect()  # the loss was read: every step's events have completed
                    log.info("step %d/%d loss %.4f lr %.3g samples/s %.0f", done, steps, row["loss"], lr, rate)
                    bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.2e}", sps=f"{rate:.0f}")
                bar.update(1)
                if done % cfg.checkpoint_every == 0 and done != end:
                    save(done)
            step = end
    finally:
        bar.close()
        batches.close()
    clock.collect(sync=True)
    timer.seconds["gpu_step"] = clock.seconds
    save(step)

    timer.seconds["total"] = time.perf_counter() - t_start
    if rank == 0:
        stats = _stats(cfg, data, notes, step, steps, params, device, world_size, bf16, timer, prior_seconds, rows,
                       start)
        write_json(run / "stats.json", stats)
        log.info("%s: %d/%d steps, %.0f samples/s while training", run, step, steps, stats["samples_per_s"])
    if world_size > 1:
        dist.barrier()
    return run


def _stats(cfg, data, notes, step, steps, params, device, world_size, bf16, timer, prior_seconds, rows, start):
    trained = (step - start) * cfg.batch_size
    train_s = timer.seconds.get("train", 0.0)
    data_stats = {**notes, **data.stats()}
    if data.mode == "memory":
        data_stats["passes"] = round(step * cfg.batch_size / data.order.pass_size, 3)
        data_stats["repeats_in_same_batch"] = data.duplicates_in_batch(step)
    return {
        "done": step >= steps, "steps": step, "steps_total": steps, "samples_seen": step * cfg.batch_size,
        "samples_seen_total": steps * cfg.batch_size, "batch_size": cfg.batch_size, "model": cfg.model,
        "params": params, "device": str(device), "world_size": world_size, "precision": "bf16" if bf16 else "fp32",
        "resumed_at_step": start or None, "data": data_stats, "timings": timer.as_dict(),
        "train_seconds_all_sessions": round(prior_seconds + train_s, 3),
        "samples_per_s": round(trained / train_s, 1) if train_s else 0.0,
        "data_wait_fraction": round(timer.seconds.get("data_wait", 0.0) / train_s, 4) if train_s else 0.0,
        # cuda: the time the GPU spent inside steps (CUDA events) / the training loop's wall time
        "gpu_busy_fraction": round(timer.seconds["gpu_step"] / train_s, 4) if device.type == "cuda" and train_s else None,
        "final_loss": rows[-1]["loss"] if rows else None, "log": rows,
    }


class StepClock:
    """GPU time of each step from CUDA events: recorded around every step without a sync and read
    only when the loop has synced anyway (its loss read every log_every steps). Nothing on a CPU.
    A step's span runs from when the GPU reaches its first work to its last kernel's end, so gaps
    where the GPU waits for kernel launches inside a step count as busy."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.pending: list[tuple[Any, Any]] = []
        self.seconds = 0.0

    def start(self):
        if not self.cuda:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, start) -> None:
        if start is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.pending.append((start, end))

    def collect(self, sync: bool = False) -> None:
        if self.cuda and sync:
            torch.cuda.synchronize(self.device)
        self.seconds += sum(a.elapsed_time(b) for a, b in self.pending) / 1000
        self.pending.clear()


def _check_resumable(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    differ = config_differences(saved, current)
    if differ:
        a, b = flat_config(saved), flat_config(current)
        detail = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in differ[:5])
        raise config.ConfigError(f"resume: {path} was trained with a different config ({detail}); resume with "
                                 "its config, or choose another out to start a new run")


def _lanes(data, world_size: int) -> int:
    return world_size * max(data.workers, 1) if data.mode == "stream" else 0


def _passes_done(data, samples: int) -> int:
    return samples // data.order.pass_size if data.mode == "memory" else 0


def _global_mean(x: torch.Tensor, world_size: int) -> float:
    if world_size > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= world_size
    return round(float(x), 6)


def default_threads() -> int:
    """CPU threads per process: the cores, shared by the local ranks. (Not lowered on a busy
    machine: the load average also counts this job's own previous stage, e.g. the pipeline's
    workers, which made every following training run single-threaded. Set `threads` to share.)"""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def init_distributed(device: str) -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; a process group when > 1 process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size > 1 and not dist.is_initialized():
        use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if world_size > 1 else 0
    return rank, world_size, local_rank


def resolve_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(device)


def log_to(path: Path, logger: logging.Logger = log) -> logging.Handler:
    """Also write `logger`'s records to the run's log file (the caller removes the handler)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler
