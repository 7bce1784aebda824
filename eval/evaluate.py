"""Zero-shot evaluation of one CLIP on a task list: the library entry point behind `clipsift eval`.

    from clipsift.eval import ModelSpec, evaluate
    summary = evaluate(ModelSpec("world-rn-s", "runs/x"), "world/tasks.yaml", "runs/x/eval")

writes into the output folder: eval_results.jsonl (DataComp lines, also the cache, see
results.py), eval_summary.json (per task main metric, group means, average), config.yaml (the
resolved EvalConfig) and stats.json (device, timings, per task sample counts and skip reasons).

Classification: classifier = per class, the normalised mean of the normalised embeddings of its
prompts; logits = cosine similarity of image and class vectors. Retrieval: cosine similarity of
all images and all captions. Images stream through a DataLoader in batches; embeddings are
collected in tar order, so results do not depend on batch size boundaries or worker count
beyond floating-point noise. On a GPU the forward passes run under bf16 autocast.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from clipsift import config
from clipsift.config import Count, Natural
from clipsift.eval import metrics as M
from clipsift.eval.data import TaskShards, task_loader
from clipsift.eval.models import LoadedModel, ModelSpec, load_model, weights_id
from clipsift.eval.results import (RESULTS_FILE, SUMMARY_FILE, append_result, find_cached, read_results,
                                   result_line, summarize)
from clipsift.eval.tasks import Task, TaskError, load_tasks
from clipsift.runlog import Counts, Timer, write_json

log = logging.getLogger(__name__)

MAX_SKIP_EXAMPLES = 10  # per task, in stats.json


@dataclass
class EvalConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    tasks: str = ""  # tasks.yaml (DataComp-style task list; paths relative to its folder)
    out: str = ""  # output folder for eval_results.jsonl, eval_summary.json, config.yaml, stats.json
    only: list[str] = field(default_factory=list)  # evaluate just these task names (default: all)
    batch_size: Count = 64
    num_workers: Natural = 0  # DataLoader processes decoding images (0: in the main process)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available
    precision: Literal["auto", "fp32", "amp_bf16"] = "auto"  # auto: amp_bf16 on cuda, fp32 on cpu
    seed: int = 0  # seeds torch before the model is built (matters for a random init)
    force: bool = False  # recompute tasks already in eval_results.jsonl


def evaluate(model: ModelSpec, tasks: str | Path, out: str | Path, **options: Any) -> dict[str, Any]:
    """Evaluate `model` on every task of `tasks` (a tasks.yaml); returns the summary. `options`
    are the other EvalConfig fields (batch_size, num_workers, device, precision, seed, force, only)."""
    return run(EvalConfig(model=model, tasks=str(tasks), out=str(out), **options))


def run(cfg: EvalConfig) -> dict[str, Any]:
    if not cfg.tasks or not cfg.out:
        raise config.ConfigError("eval needs tasks=<tasks.yaml> and out=<folder>")
    config.check(cfg)  # sizes in range, for configs built in Python too
    out = Path(cfg.out)
    timer = Timer()
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    tasks = select(load_tasks(cfg.tasks), cfg.only)
    with timer("fingerprint"):
        model_id = f"{weights_id(cfg.model.arch, cfg.model.pretrained, cfg.seed)}|{precision}"
        task_ids = {t.name: t.fingerprint() for t in tasks}

    results_path = out / RESULTS_FILE
    old_lines, bad_lines = read_results(results_path)
    lines: dict[str, dict[str, Any]] = {}
    if not cfg.force:
        for t in tasks:
            hit = find_cached(old_lines, t.name, model_id, task_ids[t.name])
            if hit is not None:
                lines[t.name] = hit
    cached = set(lines)
    todo = [t for t in tasks if t.name not in cached]
    for name in sorted(cached):
        log.info("%s: cached result in %s", name, results_path)

    task_stats: dict[str, Any] = {t: {"cached": True} for t in cached}
    if todo:
        with timer("load_model"), torch.random.fork_rng(devices=[]):  # seed the init, leave the caller's RNG alone
            torch.manual_seed(cfg.seed)
            loaded = load_model(cfg.model.arch, cfg.model.pretrained, device)
        for t in todo:
            t0 = time.perf_counter()
            with timer(f"task/{t.name}"), torch.no_grad(), deterministic(device):
                task_metrics, stats = run_task(t, loaded, device, precision, cfg.batch_size, cfg.num_workers)
            stats["seconds"] = round(time.perf_counter() - t0, 3)
            lines[t.name] = result_line(t, task_metrics, model_id, task_ids[t.name],
                                        {"samples": stats["counts"]["kept"],
                                         "skipped": sum(stats["counts"]["dropped"].values())})
            append_result(results_path, lines[t.name])  # now, so a killed run keeps finished tasks
            task_stats[t.name] = {"cached": False, **stats}
            log.info("%s: %s = %.4f (%d samples, %.1fs)", t.name, t.main_metric,
                     task_metrics[t.main_metric], stats["counts"]["kept"], stats["seconds"])

    summary = summarize(tasks, lines, cached, model_id)
    write_json(out / SUMMARY_FILE, summary)
    config.dump(cfg, out / "config.yaml")
    write_json(out / "stats.json", {
        "model_id": model_id, "device": str(device), "precision": precision,
        "torch": torch.__version__, "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "computed": [t.name for t in todo], "cached": sorted(cached),
        "malformed_result_lines": bad_lines, "timings": timer.as_dict(),
        "tasks": {t.name: task_stats[t.name] for t in tasks},
    })
    return summary


def run_task(task: Task, loaded: LoadedModel, device: torch.device, precision: str, batch_size: int,
             num_workers: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Metrics of one task, and what it read (counts by reason, skip examples, timings)."""
    task.check_dataset_type()
    paths = task.shards()
    timer = Timer()
    autocast = _autocast(device, precision)
    if task.type == "classification":
        classnames, templates = task.classnames(), task.templates()
        if task.main_metric == "acc5" and len(classnames) < 5:
            raise TaskError(f"task {task.name}: main_metric acc5 needs >= 5 classes, it has {len(classnames)}")
        with timer("text"):
            prompts = [t.replace("{c}", c) for c in classnames for t in templates]
            text = encode_texts(loaded, prompts, device, autocast, batch_size)
            weights = M.class_weights(text.reshape(len(classnames), len(templates), -1))
        with timer("images"):
            images, targets, counts, skips = encode_images(loaded, paths, task, device, autocast, batch_size,
                                                           num_workers, len(classnames))
        task_metrics = M.classification_metrics(images @ weights.T, np.asarray(targets))
        sizes = {"classes": len(classnames), "templates": len(templates)}
    else:
        with timer("images"):
            images, targets, counts, skips = encode_images(loaded, paths, task, device, autocast, batch_size,
                                                           num_workers)
        captions = [c for caps in targets for c in caps]
        text_image = np.repeat(np.arange(len(targets)), [len(caps) for caps in targets])
        with timer("text"):
            text = encode_texts(loaded, captions, device, autocast, batch_size)
        task_metrics = M.retrieval_metrics(images, text, text_image)
        sizes = {"captions": len(captions)}
    if counts.dropped:
        log.warning("%s: skipped %d of %d samples: %s", task.name, sum(counts.dropped.values()), counts.seen,
                    dict(counts.dropped))
    examples = [{"shard": paths[order[0]].name, "key": s.key, "reason": s.reason, "detail": s.detail}
                for order, s in skips[:MAX_SKIP_EXAMPLES]]
    seconds = timer.as_dict()
    return task_metrics, {
        "counts": counts.as_dict(), "skip_examples": examples, "shards": len(paths), **sizes,
        "timings": seconds, "images_per_second": round(counts.kept / max(seconds["images"], 1e-9), 1),
    }


def encode_images(loaded: LoadedModel, paths: list[Path], task: Task, device: torch.device, autocast,
                  batch_size: int, num_workers: int, n_classes: int | None = None):
    """Unit image embeddings and targets of every usable sample, in tar order; counts; skips."""
    dataset = TaskShards(paths, task.type, loaded.preprocess, n_classes)
    counts = Counts()
    orders, chunks, targets, skips = [], [], [], []
    for batch in task_loader(dataset, batch_size, num_workers):
        for order, skip in batch.skips:
            counts.drop(skip.reason)
            skips.append((order, skip))
        if batch.images is None:
            continue
        with autocast:
            emb = loaded.model.encode_image(batch.images.to(device, non_blocking=True), normalize=True)
        chunks.append(emb.float().cpu().numpy())
        orders.extend(batch.orders)
        targets.extend(batch.targets)
        counts.keep(len(batch.orders))
    if not orders:
        raise TaskError(f"task {task.name}: no usable samples in {len(paths)} shard(s); skipped {dict(counts.dropped)}")
    index = sorted(range(len(orders)), key=orders.__getitem__)  # tar order, whatever the worker count
    skips.sort(key=lambda item: item[0])
    return np.concatenate(chunks)[index], [targets[i] for i in index], counts, skips


def encode_texts(loaded: LoadedModel, texts: list[str], device: torch.device, autocast, batch_size: int) -> np.ndarray:
    out = []
    for s in range(0, len(texts), batch_size):
        tokens = loaded.tokenizer(texts[s : s + batch_size]).to(device)
        with autocast:
            out.append(loaded.model.encode_text(tokens, normalize=True).float().cpu().numpy())
    return np.concatenate(out)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but torch sees no CUDA GPU (use device=auto or cpu)")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> str:
    if name == "auto":
        return "amp_bf16" if device.type == "cuda" else "fp32"
    return name


def _autocast(device: torch.device, precision: str):
    if precision == "amp_bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def deterministic(device: torch.device):
    """cuDNN picks the same kernels every run (benchmark mode would time and choose)."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved


def select(tasks: list[Task], only: list[str]) -> list[Task]:
    if not only:
        return tasks
    known = {t.name for t in tasks}
    unknown = [n for n in only if n not in known]
    if unknown:
        raise TaskError(f"only= names unknown tasks {unknown}; tasks: {sorted(known)}")
    return [t for t in tasks if t.name in set(only)]


def embed_task_images(model: ModelSpec, tasks: str | Path, split: str = "train", only: list[str] | None = None,
                      device: str = "auto", batch_size: int = 256) -> np.ndarray:
    """Unit image embeddings of every task's `split` images (tasks in list order, tar order within):
    the downstream training images that image_based filtering and NormSim compare the pool with."""
    dev = resolve_device(device)
    precision = resolve_precision("auto", dev)
    loaded = load_model(model.arch, model.pretrained, dev)
    chunks = []
    with torch.no_grad(), deterministic(dev):
        for task in select(load_tasks(tasks), only or []):
            task = Task(task.name, task.path, task.type, task.main_metric, task.group, split=split)
            n_classes = len(task.classnames()) if task.type == "classification" else None
            emb, _, _, _ = encode_images(loaded, task.shards(), task, dev, _autocast(dev, precision), batch_size, 0,
                                         n_classes)
            chunks.append(emb)
    return np.concatenate(chunks).astype(np.float32)
