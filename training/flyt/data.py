"""What a FLYT step reads: upstream batches from the pool, their scorer features, downstream batches.

- Upstream: the pool's shards decoded once into memory (training.data.MemoryData: read_shard's
  skip accounting, the training loop's decoding and tokenizer). The reference model needs the
  images and captions; the scorer needs only Ψ, joined by uid.
- Features Ψ come from the pipeline's output (DataComp metadata parquet + row-aligned npz, read
  with filters.pool.MetadataPool): FLYT reads one model's normalised image and text embeddings
  (e.g. b32_img, b32_txt) and concatenates them; M-FLYT reads score columns. A decoded pool
  sample without features gets weight 0 and is counted (no_features); it is never drawn.
- Downstream: every selected task's training split (clip_benchmark layout, read with eval.data),
  preprocessed once with the reference model's eval transform. Classification tasks keep their
  class-name prompts (every template x class, tokenised once); retrieval tasks their captions.

Batches are pure functions of (seed, step), so a resumed run sees exactly the batches it would
have seen, and data-parallel ranks agree on the global batch and take equal slices of it.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from clipsift.runlog import Counts

log = logging.getLogger("clipsift.training.flyt")

NO_FEATURES = "no_features"  # decoded pool sample whose uid is not in the features metadata


# ---------------------------------------------------------------- scorer features
@dataclass
class Features:
    """One feature row per uid (float32), and what was read."""

    uids: list[str]
    values: np.ndarray  # [n, dim]
    names: list[str]  # the embeddings or columns the rows are made of

    def rows_for(self, uids: list[str]) -> np.ndarray:
        """Row index per uid (-1 where the uid has no features)."""
        index = {u: i for i, u in enumerate(self.uids)}
        return np.array([index.get(u, -1) for u in uids], dtype=np.int64)


def psi(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
    """FLYT's scorer input: [normalised image embedding; normalised text embedding], float32.

    The pipeline stores normalised float16 vectors; renormalising undoes the fp16 round trip.
    """
    img, txt = img.float(), txt.float()
    return torch.cat([torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1)], dim=-1)


def _metadata_pool(folder: str | Path):
    from clipsift.filters.pool import MetadataPool

    return MetadataPool(folder)


def embedding_features(metadata: str | Path, image_key: str, text_key: str) -> Features:
    """Ψ = [normalised image embedding; normalised text embedding] from the pipeline's npz files."""
    pool = _metadata_pool(metadata)
    uids, rows = [], []
    for batch in pool.batches({"uid"}, {image_key, text_key}):
        uids += list(batch.column("uid"))
        rows.append(psi(torch.from_numpy(batch.embedding(image_key)), torch.from_numpy(batch.embedding(text_key))).numpy())
    return Features(uids, np.concatenate(rows), [image_key, text_key])


def column_features(sources: list[str], columns: list[str]) -> Features:
    """M-FLYT inputs: score columns joined by uid across metadata folders (first folder that has a
    column wins). Rows are the uids of the first folder; a value missing elsewhere is NaN."""
    if not sources:
        raise ValueError("mixer.metadata: give at least one metadata folder (the pipeline's OUT/metadata)")
    pools = [_metadata_pool(s) for s in sources]
    owner: dict[str, int] = {}
    for c in columns:
        where = [i for i, p in enumerate(pools) if c in p.schema_names]
        if not where:
            raise ValueError(f"score column {c!r} is in none of {sources}")
        owner[c] = where[0]
    uids: list[str] = []
    for batch in pools[0].batches({"uid"}):
        uids += list(batch.column("uid"))
    index = {u: i for i, u in enumerate(uids)}
    values = np.full((len(uids), len(columns)), np.nan, dtype=np.float32)
    for p, pool in enumerate(pools):
        mine = [c for c in columns if owner[c] == p]
        if not mine:
            continue
        for batch in pool.batches(set(mine)):
            rows = np.array([index.get(u, -1) for u in batch.column("uid")], dtype=np.int64)
            hit = rows >= 0
            for c in mine:
                values[rows[hit], columns.index(c)] = np.asarray(batch.column(c), dtype=np.float32)[hit]
    return Features(uids, values, list(columns))


# ---------------------------------------------------------------- upstream (pool)
class PoolBatches:
    """The decoded pool with a feature row per sample; global batches by (seed, step)."""

    def __init__(self, shards: str | Path, model: str, size: int, features: Features,
                 batch_size: int, seed: int, workers: int = 0, progress: bool = False, cache: str = ""):
        from clipsift.training.data import MemoryData, SampleOrder, find_shards

        self.data = MemoryData(find_shards(shards), size, model, None, batch_size, seed, workers=workers,
                               progress=progress, cache=cache or None)
        rows = features.rows_for(self.data.uids)
        # A sample that decoded but has no features cannot be scored: weight 0, counted.
        self.no_features = missing = int((rows < 0).sum())
        if missing:
            log.warning("%d decoded pool samples have no features (not in the metadata); they are not used", missing)
        weights = (rows >= 0).astype(np.int64)
        self.order = SampleOrder(weights, batch_size, seed)  # raises when nothing is usable
        self.features = torch.from_numpy(features.values[np.maximum(rows, 0)])
        self.batch_size = batch_size

    def __len__(self) -> int:
        return self.order.pass_size

    def batch(self, step: int, rows: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
        """(uint8 images, tokens, features, sample indices) of this rank's rows of the global batch."""
        idx = self.order.indices(step)[rows]
        sel = torch.from_numpy(idx)
        return self.data.images[sel], self.data.tokens[sel].long(), self.features[sel], idx

    def stats(self) -> dict[str, Any]:
        return {"records": self.data.counts.as_dict(), NO_FEATURES: self.no_features, "usable": self.order.pass_size}


# ---------------------------------------------------------------- downstream (tasks)
@dataclass
class TaskData:
    name: str
    kind: str  # classification | retrieval
    images: torch.Tensor  # float, preprocessed [n, 3, S, S]
    labels: torch.Tensor | None  # classification: [n]
    prompts: torch.Tensor | None  # classification: tokens [templates, classes, context]
    captions: list[torch.Tensor] | None  # retrieval: tokens [k_i, context] per image
    counts: dict[str, Any]


@dataclass
class DownBatch:
    """All tasks' downstream examples of one step, in one forward pass: images, then texts.

    parts: per task (kind, image slice, text slice, labels or None).
    """

    images: torch.Tensor
    tokens: torch.Tensor
    parts: list[tuple[str, slice, slice, torch.Tensor | None]]

    def to(self, device: torch.device) -> "DownBatch":
        return DownBatch(self.images.to(device, non_blocking=True), self.tokens.to(device, non_blocking=True),
                         [(k, a, b, None if y is None else y.to(device)) for k, a, b, y in self.parts])


def load_task(task, split: str, transform: Callable, tokenize: Callable) -> TaskData:
    """A task's split preprocessed into memory; unusable samples are counted by reason."""
    from clipsift.eval.data import TaskShards

    task = dataclasses.replace(task, split=split)
    task.check_dataset_type()
    n_classes = len(task.classnames()) if task.type == "classification" else None
    counts = Counts()
    images, targets = [], []
    for _, item in TaskShards(task.shards(), task.type, transform, n_classes):
        if hasattr(item, "reason"):
            counts.drop(item.reason)
            continue
        counts.keep()
        images.append(item.image)
        targets.append(item.target)
    if not images:
        raise ValueError(f"task {task.name}: no usable sample in its {split} split ({counts.as_dict()})")
    data = TaskData(task.name, task.type, torch.stack(images), None, None, None, counts.as_dict())
    if task.type == "classification":
        classes, templates = task.classnames(), task.templates()
        data.labels = torch.tensor(targets, dtype=torch.long)
        data.prompts = torch.stack([tokenize([t.replace("{c}", c) for c in classes]) for t in templates]).long()
    else:
        data.captions = [tokenize(caps).long() for caps in targets]
    return data


CLIP_LOSSES = ("clip", "clip_per_task")  # downstream losses over image-prompt pairs (no full classifier)


class DownstreamBatches:
    """Per step and task: a random batch of training examples and, for classification, one random
    template per class (FLYT's downstream loss). Every rank draws the same global batch and keeps
    its slice of each task's examples (the classifier prompts are the same on every rank).

    used_prompts_only: keep only the prompts of classes this rank's examples carry (labels point
    into them). The CLIP-loss variants use nothing else, so the values are the same and the
    model encodes fewer texts; the cross-entropy needs every class (the default keeps them all)."""

    def __init__(self, tasks: list[TaskData], batch_size: int, seed: int, used_prompts_only: bool = False):
        if not tasks:
            raise ValueError("no downstream task selected")
        self.tasks, self.batch_size, self.seed = tasks, batch_size, seed
        self.used_prompts_only = used_prompts_only

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> DownBatch:
        images, tokens, parts = [], [], []
        n_img = n_txt = 0
        for t, task in enumerate(self.tasks):
            rng = np.random.default_rng([self.seed, 7_919, step, t])
            n = task.images.shape[0]
            take = min(self.batch_size, n) // world_size * world_size
            if take == 0:
                raise ValueError(f"task {task.name}: {n} training examples cannot be split over {world_size} ranks")
            idx = rng.choice(n, size=take, replace=False)
            per = take // world_size
            idx = idx[rank * per : (rank + 1) * per]
            if task.kind == "classification":
                chosen = rng.integers(task.prompts.shape[0], size=task.prompts.shape[1])
                text = task.prompts[chosen, torch.arange(task.prompts.shape[1])]
                labels = task.labels[idx]
                if self.used_prompts_only:
                    used, labels = torch.unique(labels, return_inverse=True)
                    text = text[used]
            else:
                text = torch.stack([task.captions[i][rng.integers(task.captions[i].shape[0])] for i in idx])
                labels = None
            images.append(task.images[idx])
            tokens.append(text)
            parts.append((task.kind, slice(n_img, n_img + len(idx)), slice(n_txt, n_txt + text.shape[0]), labels))
            n_img += len(idx)
            n_txt += text.shape[0]
        return DownBatch(torch.cat(images), torch.cat(tokens), parts)


def downstream_loss(embed: Callable, batch: DownBatch, rho: torch.Tensor, loss: str = "clip") -> torch.Tensor:
    """FLYT's downstream loss of the updated model (DownstreamConfig.loss says which):
    ce: mean over classification tasks of the zero-shot cross-entropy at scale exp(ρ);
    clip: one CLIP loss at scale exp(ρ) over every task's image-text pairs (a classification
    image paired with the sampled prompt of its class);
    mixed: mean over tasks of the cross-entropy (classification) or the CLIP loss at the model's τ
    (retrieval).

    embed(images, tokens) -> (normalised image emb, normalised text emb, τ) of the updated model.
    """
    from clipsift.training.flyt.losses import clip_loss, zeroshot_loss

    u, t, tau = embed(batch.images, batch.tokens)
    u, t, tau, rho = u.float(), t.float(), tau.float(), rho.float()
    if loss in CLIP_LOSSES:
        texts = [t[txt] if labels is None else t[txt][labels] for _, _, txt, labels in batch.parts]
        images = [u[img] for _, img, _, _ in batch.parts]
        if loss == "clip_per_task":
            return torch.stack([clip_loss(i, x, rho.exp()) for i, x in zip(images, texts)]).mean()
        return clip_loss(torch.cat(images), torch.cat(texts), rho.exp())
    losses = []
    for kind, img, txt, labels in batch.parts:
        if kind == "classification":
            losses.append(zeroshot_loss(u[img], t[txt], labels, rho))
        elif loss == "mixed":
            losses.append(clip_loss(u[img], t[txt], tau))
        else:
            raise ValueError(f"downstream loss {loss!r}: a {kind} task has no cross-entropy (leave it out)")
    return torch.stack(losses).mean()
