"""Streaming a task's webdataset shards into batches of preprocessed images and their targets.

Each tar is walked with clipsift.shards.iter_groups (the project's one tar reader). A sample is
<key>.(jpg|jpeg|png|webp) plus <key>.cls (an integer class index) for classification, or plus
<key>.txt (one caption per line) for retrieval. A sample that cannot be used becomes a Skip with
a reason; batches carry them so the caller counts every one.

DataLoader workers split the shards (worker w reads shards w, w + n, ...). Every item carries its
(shard, position) so the caller can restore tar order: results do not depend on num_workers.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Union

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipsift import shards
from clipsift.shards import Skip

# Skip reasons of task samples (the shard-level ones come from clipsift.shards).
MISSING_LABEL = "missing_label"
BAD_LABEL = "malformed_label"
LABEL_OUT_OF_RANGE = "label_out_of_range"
EMPTY_CAPTION = "empty_caption"

Order = tuple[int, int]  # (shard index, position of the sample in its tar)
Target = Union[int, list[str]]  # class index, or the image's captions


@dataclass
class Example:
    key: str
    image: torch.Tensor
    target: Target


@dataclass
class Batch:
    orders: list[Order] = field(default_factory=list)
    images: torch.Tensor | None = None  # (n, 3, H, W), None when every item was skipped
    targets: list[Target] = field(default_factory=list)
    skips: list[tuple[Order, Skip]] = field(default_factory=list)


class TaskShards(IterableDataset):
    """Yields (order, Example | Skip) for every sample of the given shards."""

    def __init__(self, paths: list[Path], kind: str, transform: Callable, n_classes: int | None = None):
        if kind not in ("classification", "retrieval"):
            raise ValueError(f"unknown task type {kind!r}")
        if kind == "classification" and not n_classes:
            raise ValueError("classification needs the number of classes")
        self.paths, self.kind, self.transform, self.n_classes = list(paths), kind, transform, n_classes

    def __iter__(self) -> Iterator[tuple[Order, Example | Skip]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for s in range(worker, len(self.paths), workers):
            for pos, group in enumerate(shards.iter_groups(self.paths[s])):
                yield (s, pos), group if isinstance(group, Skip) else self.example(*group)

    def example(self, key: str, members: dict[str, bytes]) -> Example | Skip:
        image = next((members[e] for e in shards.IMAGE_EXTS if e in members), None)
        if image is None:
            return Skip(key, shards.MISSING_IMAGE)
        target = self.label(key, members) if self.kind == "classification" else captions(key, members)
        if isinstance(target, Skip):
            return target
        try:
            tensor = decode_image(image, self.transform)
        except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
            return Skip(key, shards.CORRUPT_IMAGE, shards.describe_error(e))
        return Example(key, tensor, target)

    def label(self, key: str, members: dict[str, bytes]) -> int | Skip:
        if "cls" not in members:
            return Skip(key, MISSING_LABEL)
        try:
            label = int(members["cls"].decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            return Skip(key, BAD_LABEL, repr(members["cls"][:40]))
        if not 0 <= label < self.n_classes:  # type: ignore[operator]
            return Skip(key, LABEL_OUT_OF_RANGE, f"{label} not in [0, {self.n_classes})")
        return label


def captions(key: str, members: dict[str, bytes]) -> list[str] | Skip:
    if "txt" not in members:
        return Skip(key, shards.MISSING_TEXT)
    try:
        text = members["txt"].decode("utf-8")
    except UnicodeDecodeError as e:
        return Skip(key, shards.BAD_TEXT, str(e)[:200])
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines or Skip(key, EMPTY_CAPTION)


def decode_image(data: bytes, transform: Callable) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # decode fully now, so a truncated file fails here and not inside the transform
        rgb = im.convert("RGB")
    return transform(rgb)


def collate(items: list[tuple[Order, Example | Skip]]) -> Batch:
    batch = Batch()
    tensors = []
    for order, item in items:
        if isinstance(item, Skip):
            batch.skips.append((order, item))
        else:
            batch.orders.append(order)
            tensors.append(item.image)
            batch.targets.append(item.target)
    batch.images = torch.stack(tensors) if tensors else None
    return batch


def task_loader(dataset: TaskShards, batch_size: int, num_workers: int) -> DataLoader:
    # Never more workers than shards: an idle worker costs a process and reads nothing.
    workers = min(num_workers, len(dataset.paths))
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate,
                      persistent_workers=False)
