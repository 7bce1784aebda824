"""Training data: shards (+ optional DataComp subset) -> an endless, seeded stream of global batches.

Two ways to feed the model, with the same selection rules and the same skip accounting:

- MemoryData decodes every selected sample once (in DataLoader worker processes) into a uint8
  image tensor and a token tensor. The order is a pure function of (seed, step): pass e is a
  seeded permutation of the selected multiset, passes are concatenated and cut into batches. So
  resuming needs nothing but the step, and DDP ranks slice the same global batch. For the
  synthetic worlds (32x32x3 bytes a sample) this is the fast path.
- StreamData decodes in DataLoader workers while the model trains, for data that does not fit in
  memory. Each pass visits the shards in a seeded order, dealt round-robin to the workers of all
  ranks; a worker shuffles its samples through a seeded buffer and yields whole batches, which the
  DataLoader hands over in worker order. The stream is therefore a pure function of (seed,
  workers, ranks), and a resumed run fast-forwards each worker past the batches already trained.
  With image_decode=device (an option for hosts with few cores per GPU) the workers only read, select,
  shuffle and tokenise: complete JPEGs travel as bytes and the training process decodes each batch
  in one batched call on the device (nvJPEG; pipeline.device_decode, the pipeline's decoder) and
  resizes/crops there, in a thread that keeps batches ready ahead of the step. The sample order is
  the same as with image_decode=cpu (see StreamData).

Selection: with a subset file, a sample whose uid appears k times there is used k times per pass
(weight k; uids not listed: weight 0, counted as not_in_subset). Without one, every readable
sample has weight 1 (a resharded subset already holds its repeats as separate samples).
Unusable samples are counted by read_shard's reasons plus CORRUPT_IMAGE (decode failed) and
IMAGE_TOO_LARGE: every decoder here applies the pipeline's pixel limit (data.max_image_pixels, the
pipeline's max_image_pixels and default; pipeline.decode.fit_pixel_limit) from the image's header,
before decoding, so a decompression bomb in the shards is a counted skip, not a full decode.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from clipsift import formats, shards
from clipsift.config import ConfigError
from clipsift.eval.models import tokenizer
from clipsift.pipeline.config import MAX_IMAGE_PIXELS
from clipsift.pipeline.decode import fit_pixel_limit, header_fits, image_failure, open_image
from clipsift.pipeline.image_header import JPEG_MAGIC
from clipsift.pipeline.device_decode import complete_jpeg, decode_jpegs, resize_crop, within_limit
from clipsift.runlog import Counts

log = logging.getLogger("clipsift.training")

NOT_IN_SUBSET = "not_in_subset"  # readable, but the subset gives it weight 0


# ---------------------------------------------------------------- inputs
def find_shards(path: str | Path) -> list[Path]:
    """The {:08d}.tar shards in `path`, or in `path`/shards (so a pool folder works too)."""
    if not str(path):
        raise ConfigError("data.shards is required: a folder of {:08d}.tar webdataset shards")
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"data.shards: {folder} is not a folder")
    found = formats.list_shards(folder) or formats.list_shards(folder / "shards")
    if not found:
        raise FileNotFoundError(f"data.shards: no {{:08d}}.tar shards in {folder} or {folder / 'shards'}")
    return found


def shards_without_stats(paths: list[Path]) -> list[str]:
    """Shards lacking their <stem>_stats.json. DataComp's tools skip these silently; we read them and say so."""
    return [p.name for p in paths if shards.read_stats(p) is None]


def estimated_samples(paths: list[Path]) -> int:
    """Samples in the shards per their _stats.json (a full shard assumed where it is missing)."""
    total = 0
    for p in paths:
        stats = shards.read_stats(p)
        total += int(stats.get("successes", stats.get("count", 0))) if stats else formats.SAMPLES_PER_SHARD
    return total


class SubsetWeights:
    """uid -> how many times a DataComp subset file lists it (0 if absent)."""

    def __init__(self, path: str | Path):
        arr = formats.read_subset(path)  # validates dtype and order
        self.path = str(path)
        self.total = int(arr.shape[0])
        self.keys, self.counts = np.unique(np.asarray(arr), return_counts=True)

    def lookup(self, uids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(weight per uid, indices of the distinct subset entries that were found)."""
        q = formats.uids_to_u8u8(uids)
        pos = np.minimum(np.searchsorted(self.keys, q), max(len(self.keys) - 1, 0))  # (f0, f1) lexicographic
        hit = self.keys[pos] == q if len(self.keys) else np.zeros(len(q), bool)
        return np.where(hit, self.counts[pos] if len(self.keys) else 0, 0).astype(np.int64), pos[hit]


# ---------------------------------------------------------------- decoding
def _torchvision_decoder():
    """torchvision's C++ image decoder, or None where a release no longer ships it (deprecated
    since 0.29 in favour of torchcodec, with a warning on every call): then PIL decodes all."""
    try:
        from torchvision.io import ImageReadMode, decode_image
    except ImportError:
        return None

    def decode(data: bytes) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)

    return decode


_TV_DECODE = _torchvision_decoder()


def decode_image(data: bytes, size: int, max_image_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Encoded image -> uint8 [3, size, size]: shortest side resized to `size` (bicubic, antialiased),
    centre crop, as open_clip's eval preprocessing does. Raises on any undecodable input, and
    pipeline.decode.ImageTooLarge when the header gives more than `max_image_pixels` (0: no limit),
    unless a JPEG fits at a draft reduction: it is decoded reduced, as the pipeline does.

    Only a JPEG goes to torchvision's C++ decoder (libjpeg; 3-4x faster than PIL on small JPEGs, and
    it refuses truncated files exactly where PIL does): straight away when its header shows it within
    both limits (pipeline.decode.header_fits, ~2.5 us), else once PIL has read the header (~15 us),
    unless it is to be decoded reduced. Everything else (PNG, WebP, GIF, BMP, ...) and a JPEG
    torchvision refuses is decoded by PIL and converted to 8-bit RGB, as the pipeline's DecodeStage
    does (open_clip's convert("RGB")), so the same bytes give the same pixels in both. Not
    torchvision's PNG decoder: in 0.29.1 it kills the process on damaged IDAT data (PIL raises) and
    returns a 16-bit PNG as uint16."""
    jpeg = data[:3] == JPEG_MAGIC
    if jpeg and _TV_DECODE is not None and header_fits(data, max_image_pixels):
        with contextlib.suppress(RuntimeError):
            return resize_crop(_TV_DECODE(data), (size, size)).numpy()
    with open_image(data) as pil:
        full_size = pil.size
        fit_pixel_limit(pil, max_image_pixels)
        img = None
        if jpeg and _TV_DECODE is not None and pil.size == full_size:
            with contextlib.suppress(RuntimeError):
                img = _TV_DECODE(data)
        if img is None:
            pil.load()  # damaged or truncated data raises here rather than decoding garbage
            img = torch.from_numpy(np.asarray(pil.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1).copy())
    return resize_crop(img, (size, size)).numpy()


@dataclass
class DecodedShard:
    """The usable samples of one shard (weight > 0), plus what happened to every record."""

    uids: list[str]
    images: np.ndarray  # uint8 [n, 3, S, S]; with keep_jpegs a list of (JPEG bytes | uint8 [3, S, S])
    texts: list[str]
    weights: np.ndarray  # int64 [n]
    counts: dict[str, Any]
    subset_hits: np.ndarray  # distinct subset entries found in this shard


def decode_shard(path: Path, size: int, subset: SubsetWeights | None, cache: str | Path | None = None,
                 keep_jpegs: bool = False, max_image_pixels: int = MAX_IMAGE_PIXELS) -> DecodedShard:
    """The shard's selected samples, decoded. With `cache` (a folder), the shard's records are
    decoded once into cache/<stem>-<size>px.npz and later calls only select from it: runs over
    the same shards with different subsets (a compare) decode each shard once. With keep_jpegs,
    complete JPEGs within max_image_pixels stay encoded (the device decodes them); anything else
    is decoded here (see decode_image)."""
    if cache:
        return _select(_cached_records(path, size, Path(cache), max_image_pixels), subset)
    counts = Counts()
    records = []
    for rec in shards.read_shard(path):
        if isinstance(rec, shards.Skip):
            counts.drop(rec.reason)
        else:
            records.append(rec)
    if subset is not None:
        weights, hits = subset.lookup([r.uid for r in records])
    else:
        weights, hits = np.ones(len(records), np.int64), np.zeros(0, np.int64)
    uids, images, texts, kept_w = [], [], [], []
    for rec, w in zip(records, weights):
        if w == 0:
            counts.drop(NOT_IN_SUBSET)
            continue
        if keep_jpegs and complete_jpeg(rec.image) and within_limit(rec.image, max_image_pixels):
            image, failed = rec.image, ""
        else:
            image, failed = _decode(rec, size, max_image_pixels, path)
        if failed:
            counts.drop(failed)
            continue
        counts.keep()
        uids.append(rec.uid)
        images.append(image)
        texts.append(rec.text)
        kept_w.append(int(w))
    return DecodedShard(
        uids=uids,
        images=images if keep_jpegs else np.stack(images) if images else np.zeros((0, 3, size, size), np.uint8),
        texts=texts,
        weights=np.asarray(kept_w, np.int64),
        counts=counts.as_dict(),
        subset_hits=hits,
    )


def _decode(rec: shards.Sample, size: int, max_image_pixels: int, path: Path) -> tuple[np.ndarray | None, str]:
    """(the sample's image decoded, "") or (None, why not: corrupt_image or image_too_large)."""
    try:
        return decode_image(rec.image, size, max_image_pixels), ""
    except Exception as e:  # undecodable or too large: the caller counts it, never crash
        failure = image_failure(e)
        log.debug("%s %s: %s: %s", path.name, rec.key, failure.reason, failure.detail)
        return None, failure.reason


@dataclass
class _ShardRecords:
    """Every readable record of a shard, decoded (or why its image was not)."""

    uids: np.ndarray  # str [n]
    texts: np.ndarray  # str [n]
    images: np.ndarray  # uint8 [n, 3, S, S], zeros where failed
    failed: np.ndarray  # str [n]: "" (decoded), corrupt_image or image_too_large
    skips: dict[str, int]  # read_shard's skips by reason


def _cached_records(path: Path, size: int, cache: Path, max_image_pixels: int) -> _ShardRecords:
    import json

    from clipsift.runlog import atomic_path

    target = cache / f"{path.stem}-{size}px.npz"
    stat = path.stat()
    # a rewritten shard, or another pixel limit, invalidates it
    source = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|max_image_pixels={max_image_pixels}"
    if target.is_file():
        with np.load(target) as z:
            if str(z["source"]) == source:
                return _ShardRecords(z["uids"], z["texts"], z["images"], z["failed"], json.loads(str(z["skips"])))
    skips, recs = Counts(), []
    for rec in shards.read_shard(path):
        if isinstance(rec, shards.Skip):
            skips.drop(rec.reason)
        else:
            recs.append(rec)
    decoded = [_decode(r, size, max_image_pixels, path) for r in recs]
    images = np.zeros((len(recs), 3, size, size), np.uint8)
    for i, (image, _) in enumerate(decoded):
        if image is not None:
            images[i] = image
    out = _ShardRecords(np.array([r.uid for r in recs], dtype=str), np.array([r.text for r in recs], dtype=str),
                        images, np.array([failed for _, failed in decoded], dtype=str), skips.as_dict()["dropped"])
    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        np.savez(f, uids=out.uids, texts=out.texts, images=out.images, failed=out.failed,
                 skips=json.dumps(out.skips), source=source)
    return out


def _select(recs: _ShardRecords, subset: SubsetWeights | None) -> DecodedShard:
    """decode_shard's selection and accounting, on already-decoded records."""
    counts = Counts()
    for reason, n in recs.skips.items():
        counts.drop(reason, n)
    if subset is not None:
        weights, hits = subset.lookup(recs.uids.tolist())
    else:
        weights, hits = np.ones(len(recs.uids), np.int64), np.zeros(0, np.int64)
    chosen = weights > 0
    ok = recs.failed == ""
    keep = chosen & ok
    if (~chosen).any():
        counts.drop(NOT_IN_SUBSET, int((~chosen).sum()))
    for reason, n in zip(*np.unique(recs.failed[chosen & ~ok], return_counts=True)):
        counts.drop(str(reason), int(n))
    counts.keep(int(keep.sum()))
    return DecodedShard(uids=recs.uids[keep].tolist(), images=recs.images[keep], texts=recs.texts[keep].tolist(),
                        weights=weights[keep].astype(np.int64), counts=counts.as_dict(), subset_hits=hits)


@dataclass
class EncodedImages:
    """A stream batch's images as its worker hands them over with image_decode=device."""

    data: torch.Tensor  # uint8: the complete JPEGs end to end
    offsets: torch.Tensor  # int64 [b + 1]: row i is data[offsets[i]:offsets[i + 1]] (empty: see pixels)
    pixels: torch.Tensor  # uint8 [m, 3, S, S]: rows the worker decoded (not a complete JPEG)
    pixel_rows: torch.Tensor  # int64 [m]

    @classmethod
    def pack(cls, images: list[bytes | np.ndarray], size: int) -> "EncodedImages":
        rows = [i for i, im in enumerate(images) if not isinstance(im, bytes)]
        lengths = [len(im) if isinstance(im, bytes) else 0 for im in images]
        data = np.frombuffer(b"".join(im for im in images if isinstance(im, bytes)), np.uint8)
        return cls(torch.from_numpy(data.copy()), torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)])),
                   torch.from_numpy(np.stack([images[i] for i in rows])) if rows else
                   torch.zeros((0, 3, size, size), dtype=torch.uint8), torch.tensor(rows, dtype=torch.int64))

    def decode(self, size: int, device: torch.device, max_image_pixels: int) -> tuple[torch.Tensor, list[str]]:
        """uint8 [n_ok, 3, S, S] on `device` and per row why it failed ("": decoded): the JPEGs (the
        worker kept only those within max_image_pixels) in one batched call on the device, resized
        there; a JPEG the device refuses goes through the CPU decoder, as in image_decode=cpu, and a
        row neither decodes is left out (the caller counts it)."""
        n = len(self.offsets) - 1
        out: list[torch.Tensor | None] = [None] * n
        failed = [""] * n
        for row, px in zip(self.pixel_rows.tolist(), self.pixels):
            out[row] = px.to(device)
        bounds = self.offsets.tolist()
        jpeg_rows = [i for i in range(n) if out[i] is None]
        jpegs = [self.data[bounds[i]:bounds[i + 1]] for i in jpeg_rows]
        for i, data, img in zip(jpeg_rows, jpegs, decode_jpegs(jpegs, device)):
            if img is not None:
                out[i] = resize_crop(img, (size, size))
                continue
            try:
                out[i] = torch.from_numpy(decode_image(data.numpy().tobytes(), size, max_image_pixels)).to(device)
            except Exception as e:  # undecodable on the CPU too: counted by the caller
                failure = image_failure(e)
                failed[i] = failure.reason
                log.debug("%s: %s", failure.reason, failure.detail)
        kept = [img for img in out if img is not None]
        images = torch.stack(kept) if kept else torch.zeros((0, 3, size, size), dtype=torch.uint8, device=device)
        return images, failed


@dataclass
class _RawBatch:
    """A device-decoded raw batch (image_decode=device) while StreamData cuts it into batches."""

    index: int  # its number in the stream of raw batches
    images: torch.Tensor
    tokens: torch.Tensor
    uids: list[str]
    used: int  # samples already handed on (or, resumed mid-batch, trained on before)
    counts: dict[str, Any] | None  # its records' counts until the first batch that takes from it

    @property
    def left(self) -> int:
        return len(self.uids) - self.used

    def take(self, n: int, counts: Counts) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Its next min(n, left) samples; its counts go to `counts` the first time."""
        if self.counts is not None:
            counts.merge(self.counts)
            self.counts = None
        a, self.used = self.used, min(self.used + n, len(self.uids))
        return self.images[a:self.used], self.tokens[a:self.used], self.uids[a:self.used]


@dataclass
class Batch:
    images: torch.Tensor | None  # uint8 [b, 3, S, S] (None while `encoded`)
    tokens: torch.Tensor  # int64 [b, context]
    uids: list[str]
    counts: dict[str, Any] | None = None  # stream mode: records read while filling this batch
    encoded: EncodedImages | None = None  # stream mode, image_decode=device: not decoded yet
    resume: tuple[int, int] | None = None  # device-decoded stream: where a resumed run restarts after it

    def pin_memory(self) -> "Batch":  # called by DataLoader(pin_memory=True): async host-to-GPU copies
        return Batch(self.images.pin_memory(), self.tokens.pin_memory(), self.uids, self.counts)


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 [b,3,S,S] -> float, normalised as open_clip's preprocessing does (mean/std per channel)."""
    return (images.float().div_(255) - mean[None, :, None, None]) / std[None, :, None, None]


# ---------------------------------------------------------------- memory mode
class _ShardDecoder(Dataset):
    def __init__(self, paths: list[Path], size: int, model: str, subset: SubsetWeights | None,
                 cache: str | None = None, max_image_pixels: int = MAX_IMAGE_PIXELS):
        self.paths, self.size, self.model, self.subset, self.cache = paths, size, model, subset, cache
        self.max_image_pixels = max_image_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[DecodedShard, torch.Tensor]:
        try:
            d = decode_shard(self.paths[i], self.size, self.subset, self.cache, max_image_pixels=self.max_image_pixels)
        except StopIteration as e:  # it would end the DataLoader's iteration: the shard would vanish
            raise RuntimeError(f"{self.paths[i]}: reading the shard raised StopIteration") from e
        tokens = tokenizer(self.model)(d.texts) if d.texts else torch.zeros(0, 0, dtype=torch.long)
        return d, tokens.to(torch.int32)


class SampleOrder:
    """Which selected samples form the global batch of each step: a pure function of (seed, step).

    The multiset (sample i repeated weights[i] times) is permuted afresh for every pass with
    seed (seed, pass) and the passes are concatenated, so over a run every sample is seen in
    proportion to its weight and a subset smaller than the budget is simply repeated.
    """

    def __init__(self, weights: np.ndarray, batch_size: int, seed: int):
        self.multiset = np.repeat(np.arange(len(weights), dtype=np.int64), weights)
        if self.multiset.size == 0:
            raise ConfigError("no usable samples selected: nothing to train on; check data.shards and "
                              "data.subset (stats of the reads are in the log)")
        self.batch_size, self.seed = batch_size, seed
        self._pass: tuple[int, np.ndarray] | None = None
        self._on_device: torch.Tensor | None = None

    @property
    def pass_size(self) -> int:
        return int(self.multiset.size)

    def _permutation(self, p: int) -> np.ndarray:
        if self._pass is None or self._pass[0] != p:
            self._pass = (p, self.multiset[np.random.default_rng([self.seed, p]).permutation(self.multiset.size)])
            self._on_device = None
        return self._pass[1]

    def _segments(self, step: int) -> Iterator[tuple[int, int, int]]:
        """(pass, offset, length) pieces of the global batch of `step` (a batch may straddle passes)."""
        start, stop = step * self.batch_size, (step + 1) * self.batch_size
        while start < stop:
            p, offset = divmod(start, self.pass_size)
            take = min(stop - start, self.pass_size - offset)
            yield p, offset, take
            start += take

    def indices(self, step: int) -> np.ndarray:
        return np.concatenate([self._permutation(p)[o : o + n] for p, o, n in self._segments(step)])

    def device_indices(self, step: int, device: torch.device) -> torch.Tensor:
        """indices(step) as a tensor on `device`: one copy per pass, so steps never wait on the host."""
        out = []
        for p, o, n in self._segments(step):
            perm = self._permutation(p)
            if self._on_device is None or self._on_device.device != device:
                self._on_device = torch.from_numpy(perm).to(device, non_blocking=False)
            out.append(self._on_device[o : o + n])
        return out[0] if len(out) == 1 else torch.cat(out)


class MemoryData:
    """Every selected sample decoded once; batches are gathers from the in-memory tensors."""

    mode = "memory"

    def __init__(self, paths: list[Path], size: int, model: str, subset: SubsetWeights | None,
                 batch_size: int, seed: int, rank: int = 0, world_size: int = 1, workers: int = 0,
                 progress: bool = False, cache: str | None = None, max_image_pixels: int = MAX_IMAGE_PIXELS):
        from tqdm import tqdm

        self.counts = Counts()
        hits: list[np.ndarray] = []
        uids: list[str] = []
        images, tokens, weights = [], [], []
        loader = DataLoader(_ShardDecoder(paths, size, model, subset, cache, max_image_pixels), batch_size=None,
                            num_workers=workers, collate_fn=lambda x: x)
        shards_read = 0
        for d, tok in tqdm(loader, total=len(paths), desc="decode shards", unit="shard", disable=not progress):
            shards_read += 1
            self.counts.merge(d.counts)
            hits.append(d.subset_hits)
            uids += d.uids
            images.append(torch.from_numpy(d.images))
            tokens.append(tok)
            weights.append(d.weights)
        if shards_read != len(paths):  # every shard is counted: read, or an error
            raise RuntimeError(f"decoded {shards_read} of {len(paths)} shards; the loader ended early")
        self.uids = np.array(uids, dtype=object)
        self.images = torch.cat(images)
        self.tokens = torch.cat([t for t in tokens if t.numel()]) if uids else torch.zeros(0, 1, dtype=torch.int32)
        self.weights = np.concatenate(weights)
        self.subset_missing = (len(subset.keys) - len(np.unique(np.concatenate(hits)))) if subset else 0
        self.order = SampleOrder(self.weights, batch_size, seed)
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by {world_size} ranks")
        self.local = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)

    def to(self, device: torch.device) -> "MemoryData":
        """Keep the decoded samples on the accelerator: batches never wait for the host."""
        self.images, self.tokens = self.images.to(device), self.tokens.to(device)
        return self

    def batches(self, start_step: int) -> Iterator[Batch]:
        device = self.images.device
        for step in count(start_step):
            idx = self.order.indices(step)[self.local]
            sel = torch.from_numpy(idx) if device.type == "cpu" else self.order.device_indices(step, device)[self.local]
            yield Batch(self.images[sel], self.tokens[sel].long(), self.uids[idx].tolist())

    def duplicates_in_batch(self, steps: int) -> int:
        """Samples that were a repeat of another in the same global batch (false negatives for the loss)."""
        return int(sum(len(ix) - len(np.unique(ix)) for ix in map(self.order.indices, range(steps))))

    def stats(self) -> dict[str, Any]:
        return {"mode": self.mode, "records": self.counts.as_dict(), "selected_samples": len(self.uids),
                "selected_with_repeats": self.order.pass_size, "subset_uids_missing": int(self.subset_missing),
                "bytes_in_memory": int(self.images.numel() + self.tokens.numel() * 4)}

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        pass


# ---------------------------------------------------------------- stream mode
class _ShardStream(IterableDataset):
    """Endless batches from the shards dealt to this worker (see the module docstring)."""

    def __init__(self, paths: list[Path], size: int, model: str, subset: SubsetWeights | None, batch_size: int,
                 seed: int, rank: int, world_size: int, start_step: int, shuffle_buffer: int,
                 image_decode: str = "cpu", max_image_pixels: int = MAX_IMAGE_PIXELS):
        self.paths, self.size, self.model, self.subset = paths, size, model, subset
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.start_step, self.shuffle_buffer, self.image_decode = start_step, shuffle_buffer, image_decode
        self.max_image_pixels = max_image_pixels

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        # Lane `role` makes batches role, role + workers, ... The DataLoader takes its first batch
        # from worker 0, then worker 1, ...: so worker w plays the lane whose next batch is
        # start_step + w, and skips the batches before it (already trained on).
        role = (worker + self.start_step) % workers
        lane, lanes = self.rank * workers + role, self.world_size * workers
        skip = len(range(role, self.start_step, workers))
        for i, batch in enumerate(self._batches(lane, lanes)):
            if i >= skip:
                yield batch

    def _samples(self, lane: int, lanes: int) -> Iterator[tuple[str, np.ndarray | bytes, str] | dict]:
        empty_passes = 0
        for p in count():
            order = np.random.default_rng([self.seed, p]).permutation(len(self.paths))
            produced = 0
            for shard in order[lane::lanes]:
                d = decode_shard(self.paths[shard], self.size, self.subset, keep_jpegs=self.image_decode == "device",
                                 max_image_pixels=self.max_image_pixels)
                yield d.counts
                for uid, image, text, w in zip(d.uids, d.images, d.texts, d.weights):
                    for _ in range(w):
                        produced += 1
                        yield uid, image, text
            # A lane whose shards hold none of the selection this pass gets others next pass.
            empty_passes = 0 if produced else empty_passes + 1
            if empty_passes == 10:
                raise RuntimeError(f"stream lane {lane}/{lanes}: 10 passes over its shards gave no usable sample; "
                                   "the selection is empty or sits in a few shards (use data.mode=memory)")

    def _batches(self, lane: int, lanes: int) -> Iterator[Batch]:
        rng = np.random.default_rng([self.seed, 1_000_003, lane])
        buffer: list[tuple[str, np.ndarray | bytes, str]] = []
        pending, counts = [], Counts()
        for item in self._samples(lane, lanes):
            if isinstance(item, dict):
                counts.merge(item)
                continue
            buffer.append(item)
            if len(buffer) < self.shuffle_buffer:
                continue
            j = int(rng.integers(len(buffer)))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            pending.append(buffer.pop())
            if len(pending) == self.batch_size:
                uids, images, texts = zip(*pending)
                tokens = tokenizer(self.model)(list(texts))
                if self.image_decode == "device":
                    yield Batch(None, tokens, list(uids), counts.as_dict(), EncodedImages.pack(list(images), self.size))
                else:
                    yield Batch(torch.from_numpy(np.stack(images)), tokens, list(uids), counts.as_dict())
                pending, counts = [], Counts()


class StreamData:
    """Batches decoded by DataLoader workers while the model trains (prefetched, pinned on cuda).

    With image_decode=device the workers' batches ("raw batches", JPEGs still encoded) are decoded
    in order by a thread of the training process on `device`. A JPEG that passed the workers'
    completeness check but decodes nowhere is dropped and counted (corrupt_image) and the next raw
    batch's samples move up to fill its place, so every batch is full and the sample order is
    image_decode=cpu's whenever no such file turns up. Where a resumed run restarts is then
    (raw batch, samples of it already used), kept in state(), rather than the step.
    On cuda the thread also makes the host-to-device copies, on its own stream, ahead of the step.
    """

    mode = "stream"

    def __init__(self, paths: list[Path], size: int, model: str, subset: SubsetWeights | None,
                 batch_size: int, seed: int, rank: int = 0, world_size: int = 1, workers: int = 2,
                 shuffle_buffer: int = 4096, pin_memory: bool = False, image_decode: str = "cpu",
                 device: torch.device | None = None, prefetch: int = 3, decode_threads: int = 4,
                 max_image_pixels: int = MAX_IMAGE_PIXELS):
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by {world_size} ranks")
        lanes = world_size * max(workers, 1)
        if len(paths) < lanes:
            raise ConfigError(f"stream mode needs at least workers x ranks = {lanes} shards, found {len(paths)}; "
                             "use data.mode=memory or fewer data.workers")
        if image_decode not in ("cpu", "device"):
            raise ValueError(f"data.image_decode must be cpu or device here, got {image_decode!r}")
        self.args = dict(paths=paths, size=size, model=model, subset=subset, batch_size=batch_size // world_size,
                         seed=seed, rank=rank, world_size=world_size, shuffle_buffer=shuffle_buffer,
                         image_decode=image_decode, max_image_pixels=max_image_pixels)
        if subset is not None and subset.total == 0:
            raise ConfigError(f"{subset.path}: the subset is empty; nothing to train on")
        self.workers, self.pin_memory, self.image_decode = workers, pin_memory, image_decode
        self.device = device if device is not None else torch.device("cpu")
        self.prefetch, self.decode_threads = prefetch, decode_threads
        self.counts = Counts()
        self.subset = subset
        self.resume_at: tuple[int, int] | None = None  # image_decode=device: (raw batch, samples used)
        self.decode_seconds = 0.0  # the decoding threads' busy time (decode, resize, copies), for the stats

    def batches(self, start_step: int) -> Iterator[Batch]:
        if self.image_decode == "cpu" and self.device.type == "cpu":
            for batch in self._loader(start_step):  # the CPU path: batches as the workers made them
                self.counts.merge(batch.counts)
                yield batch
            return
        first, used = self.resume_at if self.image_decode == "device" and self.resume_at else (start_step, 0)
        produce = (self._decoded(first, used) if self.image_decode == "device" else
                   (self._to_device(b) for b in self._loader(start_step)))
        for batch in _ahead(produce, self.prefetch, self.device):
            self.counts.merge(batch.counts)
            self.resume_at = batch.resume
            yield batch

    def _loader(self, start: int) -> Iterator[Batch]:
        stream = _ShardStream(start_step=start, **self.args)
        pin = self.pin_memory and self.image_decode == "cpu"  # encoded bytes go to the decoder unpinned
        loader = DataLoader(stream, batch_size=None, num_workers=self.workers, pin_memory=pin,
                            prefetch_factor=4 if self.workers else None, persistent_workers=False)
        yield from loader

    def _to_device(self, batch: Batch) -> Batch:
        t0 = time.perf_counter()
        out = Batch(batch.images.to(self.device, non_blocking=True), batch.tokens.to(self.device, non_blocking=True),
                    batch.uids, batch.counts)
        _finish(self.device)
        self.decode_seconds += time.perf_counter() - t0
        return out

    def _decoded(self, first: int, used: int) -> Iterator[Batch]:
        """Raw batches from number `first` on (its first `used` samples already trained on) ->
        full batches of device-decoded images (see the class docstring)."""
        b = self.args["batch_size"]
        held: deque[_RawBatch] = deque()
        available, counts = 0, Counts()
        for r, (images, tokens, uids, raw_counts) in zip(count(first), self._decoded_raw(first)):
            skip = used if r == first else 0  # resumed mid-batch: its counts are in the checkpoint already
            held.append(_RawBatch(r, images, tokens, uids, skip, None if skip else raw_counts))
            available += len(uids) - skip
            while available >= b:
                parts, need = [], b
                while need:
                    part = held[0].take(need, counts)
                    if part[2]:
                        parts.append(part)
                    need -= len(part[2])
                    if not held[0].left:
                        held.popleft()
                available -= b
                while held and not held[0].left:  # a raw batch that decoded to nothing
                    held.popleft().take(0, counts)
                resume = (held[0].index, held[0].used) if held else (r + 1, 0)
                cat = (lambda xs: xs[0]) if len(parts) == 1 else torch.cat  # one part: no copy
                part_images, part_tokens, part_uids = zip(*parts)
                batch = Batch(cat(part_images), cat(part_tokens), [u for us in part_uids for u in us], counts.as_dict(),
                              resume=resume)
                _finish(self.device)  # the copies are done before their sources can be freed and reused
                yield batch
                counts = Counts()

    def _decoded_raw(self, first: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str], dict[str, Any]]]:
        """The raw batches from number `first` on, decoded in order by `decode_threads` threads at
        once, each on a CUDA stream of its own on cuda (nvJPEG's batched decode does part of its work
        on the calling CPU thread): (images, tokens on the device, uids, counts), undecodable rows out."""
        from concurrent.futures import ThreadPoolExecutor

        size, local = self.args["size"], threading.local()

        def decode(raw: Batch):
            if self.device.type == "cuda" and not hasattr(local, "stream"):
                local.stream = torch.cuda.Stream(self.device)
            t0 = time.perf_counter()
            with torch.cuda.stream(local.stream) if self.device.type == "cuda" else contextlib.nullcontext():
                images, failed = raw.encoded.decode(size, self.device, self.args["max_image_pixels"])
                keep = torch.tensor([not f for f in failed], dtype=torch.bool)
                tokens = raw.tokens[keep].to(self.device, non_blocking=True)
                _finish(self.device)
            counts = Counts()
            counts.merge(raw.counts)
            for reason in filter(None, failed):  # the worker counted these as kept; they are not
                counts.drop(reason)
                counts.keep(-1)
            uids = [u for u, f in zip(raw.uids, failed) if not f]
            return images, tokens, uids, counts.as_dict(), time.perf_counter() - t0

        pending: deque = deque()
        with ThreadPoolExecutor(self.decode_threads, thread_name_prefix="clipsift-decode") as pool:
            try:
                for raw in self._loader(first):
                    pending.append(pool.submit(decode, raw))
                    if len(pending) < self.decode_threads:
                        continue
                    *out, seconds = pending.popleft().result()
                    self.decode_seconds += seconds
                    yield tuple(out)
            finally:
                for f in pending:
                    f.cancel()

    def stats(self) -> dict[str, Any]:
        # Counted per read: a shard read in three passes counts its records three times.
        return {"mode": self.mode, "records": self.counts.as_dict(), "workers": self.workers,
                "shuffle_buffer": self.args["shuffle_buffer"], "image_decode": self.image_decode,
                "decode_thread_s": round(self.decode_seconds, 3)}

    def state(self) -> dict[str, Any]:
        return {"records": self.counts.as_dict(), "resume_at": list(self.resume_at) if self.resume_at else None}

    def load_state(self, state: dict[str, Any]) -> None:
        self.counts = Counts()
        if state.get("records"):
            self.counts.merge(state["records"])
        self.resume_at = tuple(state["resume_at"]) if state.get("resume_at") else None


def _finish(device: torch.device) -> None:
    """Wait (in the batch thread) for the work queued on its stream: the batch is then ready and
    its time is measured."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def _ahead(produce: Iterator[Batch], depth: int, device: torch.device) -> Iterator[Batch]:
    """`produce` run in a thread `depth` batches ahead of the consumer; on cuda on a stream of its
    own, each batch complete before it is handed over (the thread waits for it, not the step)."""
    ready: queue.Queue = queue.Queue(maxsize=max(depth, 1))
    stop = threading.Event()
    side = torch.cuda.Stream(device) if device.type == "cuda" else None
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                for batch in produce:
                    if not put(batch):
                        break
            put(done)
        except BaseException as e:  # handed to the consumer, which raises it
            put(e)
        finally:
            produce.close()

    thread = threading.Thread(target=run, name="clipsift-batches", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            if side is not None:  # the step's stream uses memory the side stream allocated
                consumer = torch.cuda.current_stream(device)
                item.images.record_stream(consumer)
                item.tokens.record_stream(consumer)
            yield item
    finally:
        stop.set()
        thread.join()


def resolve_image_decode(setting: str, device: torch.device | None) -> str:
    """data.image_decode resolved. auto is cpu: on an H100 with 16 cores the workers' CPU decoding
    fed more samples/s than batched nvJPEG for both small world JPEGs (0.54 vs ~1.0 of the
    ceiling) and DataComp-like ones (0.79 vs 0.91) in benchmarks/train.py; device stays an option
    for hosts with few cores per GPU (docs/results/performance.md)."""
    if setting == "auto":
        return "cpu"
    if setting not in ("cpu", "device"):
        raise ValueError(f"data.image_decode must be auto, cpu or device, got {setting!r}")
    return setting


def open_data(data_cfg, model: str, size: int, context_bytes: int, batch_size: int, seed: int, rank: int = 0,
              world_size: int = 1, progress: bool = False, pin_memory: bool = False,
              device: torch.device | None = None) -> tuple[Any, dict[str, Any]]:
    """Resolve shards, subset and mode; returns (MemoryData | StreamData, notes for stats.json).
    `device`: where training runs (stream batches go there ahead of the step; with
    data.image_decode=device they are decoded there)."""
    paths = find_shards(data_cfg.shards)
    missing_stats = shards_without_stats(paths)
    if missing_stats:
        log.warning("%d shard(s) have no _stats.json (DataComp's tools would silently skip them); reading them "
                    "anyway: %s", len(missing_stats), ", ".join(missing_stats[:5]))
    subset = SubsetWeights(data_cfg.subset) if data_cfg.subset else None
    mode = data_cfg.mode
    if mode == "auto":
        need = estimated_samples(paths) * (3 * size * size + context_bytes)
        mode = "memory" if need <= data_cfg.memory_limit_gb * 2**30 else "stream"
    notes = {"shards": len(paths), "shards_without_stats": missing_stats, "subset": data_cfg.subset,
             "subset_entries": subset.total if subset else None}
    if mode == "memory":
        data = MemoryData(paths, size, model, subset, batch_size, seed, rank, world_size, data_cfg.workers, progress,
                          data_cfg.decode_cache or None, data_cfg.max_image_pixels)
        if data.subset_missing:
            log.warning("%d distinct subset uids are not in the shards (not downloaded?)", data.subset_missing)
    else:
        data = StreamData(paths, size, model, subset, batch_size, seed, rank, world_size, data_cfg.workers,
                          data_cfg.shuffle_buffer, pin_memory, resolve_image_decode(data_cfg.image_decode, device),
                          device, max_image_pixels=data_cfg.max_image_pixels)
    return data, notes
