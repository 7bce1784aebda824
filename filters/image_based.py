"""DataComp's image-based filter, this project's variant of it, and NormSim.

image_based (DataComp's rule, with DataComp's files): keep a pool row if its caption passes
DataComp's pre-filter (fastText lid.176 says English, > 1 fastText token, > 5 characters) and its
L/14 image embedding's nearest centroid (inner product, raw float32 embeddings, first id on ties)
among DataComp's precomputed centroids is the nearest centroid of at least one ImageNet-1k training
image. Files (from DataComp's baselines/utils.py download list):
  centroids            {small,medium,large,xlarge}_centroids_l14.pt: torch.save of a numpy
                       array (100000, 768) float32; or a .npy of shape (k, d), float
  imagenet_embeddings  in1k_clip_vit_l14_{0..4}.pt: torch.save of {"image_features": tensor
                       (n, 768)}, concatenated in the order given; or .npy files (n, d), float
  target_centroids     instead of imagenet_embeddings: a .npy of integer centroid ids in [0, k)
                       (written by an earlier run as work/<filter>/target_centroids.npy)

image_based_world (not DataComp's rule): the same pre-filter, but the centroids come from k-means
trained here on the pool's embeddings and the targets from the downstream tasks' training images
(downstream.embeddings). DataComp used 100k centroids for a 12.8M pool (128 rows per centroid),
the default ratio here when `centroids` is not set.

normsim: a score per pool row, the p-norm (p = inf: max) of the similarities between its image
embedding and the downstream training image embeddings; kept by threshold or pool fraction, or
just written out as a score.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipsift import config
from clipsift.filters import kmeans
from clipsift.filters.base import Batch, Filter, FilterError, Needs, Pool, Verdict, register
from clipsift.filters.baselines import (caption_rules, check_cut, english_rule, fasttext_token_counts,
                                        score_cut, score_verdict)

DATACOMP_ROWS_PER_CENTROID = 128  # 12.8M pool / 100k centroids
IMAGENET_KEY = "image_features"  # the tensor in DataComp's in1k_clip_vit_l14_*.pt


def image_caption_rules(filt: Filter, batch: Batch) -> list[tuple[str, Any]]:
    """DataComp's image_based caption pre-filter: > 1 fastText token, > 5 characters, English."""
    return caption_rules(batch, min_words=2, min_chars=6, words=fasttext_token_counts) + [english_rule(filt, batch)]


def load_array(path: str, what: str, key: str = "") -> np.ndarray:
    """An array from a .npy, or a .pt holding a numpy array, a tensor, or a dict with it under `key`."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FilterError(f"{what} {path} does not exist")
    if p.suffix == ".npy":
        return np.load(p, allow_pickle=False)
    if p.suffix not in (".pt", ".pth"):
        raise FilterError(f"{what} {path}: expected a .npy or .pt file")
    import torch

    # DataComp's centroid files are pickled numpy arrays: allow numpy's array classes, nothing else,
    # under numpy 2's names and numpy 1's (numpy.core: the files were written with numpy 1).
    numpy_types = [np._core.multiarray._reconstruct, (np._core.multiarray._reconstruct,
                                                      "numpy.core.multiarray._reconstruct"),
                   np.ndarray, np.dtype, *(getattr(np.dtypes, n) for n in np.dtypes.__all__)]
    try:
        with torch.serialization.safe_globals(numpy_types):
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several kinds for a file it cannot read
        raise FilterError(f"{what} {path}: not a readable torch file ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200]})") from None
    if isinstance(obj, dict) and key:
        if key not in obj:
            raise FilterError(f"{what} {path}: no {key!r} in it (keys: {sorted(map(str, obj))[:10]})")
        obj = obj[key]
    if isinstance(obj, torch.Tensor):
        obj = obj.numpy()
    if not isinstance(obj, np.ndarray):
        raise FilterError(f"{what} {path}: holds a {type(obj).__name__}, expected an array"
                          + (f" or a dict with {key!r}" if key else ""))
    return obj


def load_float_matrix(path: str, what: str, key: str = "", dim: int | None = None) -> np.ndarray:
    arr = load_array(path, what, key)
    if arr.ndim != 2 or len(arr) == 0 or not np.issubdtype(arr.dtype, np.floating) \
            or (dim is not None and arr.shape[1] != dim):
        want = f"(n > 0, {dim})" if dim is not None else "(n > 0, d)"
        raise FilterError(f"{what} {path}: shape {arr.shape} dtype {arr.dtype}; expected a float array of shape {want}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def load_downstream(path: str, dim: int) -> np.ndarray:
    """Unit-norm float32 embeddings of downstream training images from a .npy (n, dim)."""
    if not path:
        raise FilterError("needs downstream training-image embeddings: set downstream.embeddings=/path/to.npy "
                          "(embeddings of the tasks' train images from the same CLIP as the pool column)")
    return kmeans.normalize(load_float_matrix(path, "downstream embeddings", dim=dim))


def gather(pool: Pool, embedding: str, rows: np.ndarray, batch_size: int) -> np.ndarray:
    """Unit-norm float32 embeddings of the given (sorted) pool rows, in one pass."""
    parts = []
    for b in pool.batches(set(), {embedding}, batch_size):
        local = rows[(rows >= b.offset) & (rows < b.offset + len(b))] - b.offset
        if len(local):
            parts.append(kmeans.normalize(b.embedding(embedding)[local]))
    if not parts:
        raise FilterError(f"no rows to gather embedding {embedding!r} from")
    return np.concatenate(parts)


@register("image_based")
@dataclass
class ImageBased(Filter):
    """DataComp's image_based with DataComp's centroid and ImageNet-1k embedding files (module doc)."""

    centroids: str = ""  # DataComp's <scale>_centroids_l14.pt, or a .npy (k, d) float
    imagenet_embeddings: list[str] = field(default_factory=list)  # in1k_clip_vit_l14_{0..4}.pt or .npy (n, d)
    target_centroids: str = ""  # or: a .npy of centroid ids (int, 1-D) the ImageNet images fall into
    embedding: str = "l14_img"
    device: str = ""  # "": numpy on the CPU; a torch device ("cuda") runs the assignment there

    def setup(self, ctx, name) -> None:  # type: ignore[override]
        super().setup(ctx, name)
        if not self.centroids:
            raise FilterError("image_based needs DataComp's centroids: set filter.args.centroids=<scale>_centroids_l14.pt "
                              "(see docs/datacomp.md), or use image_based_world (centroids trained on this pool)")
        if bool(self.imagenet_embeddings) == bool(self.target_centroids):
            raise FilterError("image_based needs exactly one of imagenet_embeddings (DataComp's "
                              "in1k_clip_vit_l14_{0..4}.pt) and target_centroids (a .npy of centroid ids)")

    def needs(self) -> Needs:
        return Needs(frozenset({"text"}), frozenset({self.embedding}))

    def fit(self, pool: Pool) -> dict[str, Any]:
        self._centroids = load_float_matrix(self.centroids, "image_based centroids")
        k, dim = self._centroids.shape
        report: dict[str, Any] = {"centroids_file": self.centroids, "centroids": k, "dim": dim}
        if self.target_centroids:
            ids = load_array(self.target_centroids, "image_based target_centroids")
            if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer) or len(ids) == 0 \
                    or ids.min() < 0 or ids.max() >= k:
                raise FilterError(f"image_based target_centroids {self.target_centroids}: shape {ids.shape} dtype "
                                  f"{ids.dtype}; expected a 1-D integer array of ids in [0, {k})")
            report["target_centroids_file"] = self.target_centroids
        else:
            parts = []
            for path in self.imagenet_embeddings:
                x = load_float_matrix(path, "image_based imagenet_embeddings", IMAGENET_KEY, dim)
                parts.append(kmeans.assign(x, self._centroids, unit_norm=False, device=self.device)[0])
            ids = np.concatenate(parts)
            report.update(imagenet_files=list(self.imagenet_embeddings), imagenet_images=int(len(ids)))
        self._targets = np.unique(ids)
        report["target_centroid_ids"] = int(len(self._targets))
        if self.imagenet_embeddings and self.ctx.work_dir is not None:
            work = Path(self.ctx.work_dir) / self.name.replace("#", "_")
            work.mkdir(parents=True, exist_ok=True)
            np.save(work / "target_centroids.npy", self._targets)
            report["target_centroids_saved"] = str(work / "target_centroids.npy")  # reuse: target_centroids=
        return report

    def near_imagenet(self, batch: Batch, keep: np.ndarray) -> np.ndarray:
        rows = np.flatnonzero(keep)
        x = batch.embedding(self.embedding)
        if x.ndim != 2 or x.shape[1] != self._centroids.shape[1]:
            raise FilterError(f"pool embedding {self.embedding!r} has shape {x.shape}; DataComp's centroids "
                              f"{self.centroids} have dim {self._centroids.shape[1]} (L/14 image embeddings)")
        out = np.zeros(len(batch), dtype=bool)
        if len(rows):
            ids, _ = kmeans.assign(x[rows], self._centroids, unit_norm=False, device=self.device)
            out[rows] = np.isin(ids, self._targets)
        return out

    def apply(self, batch: Batch) -> Verdict:
        return Verdict.from_rules(len(batch), image_caption_rules(self, batch) + [
            ("not_imagenet_centroid", lambda keep: self.near_imagenet(batch, keep))])


@register("image_based_world")
@dataclass
class ImageBasedWorld(Filter):
    """image_based for a world without DataComp's files (not DataComp's rule): k-means trained here
    on the pool's embeddings; targets from the downstream tasks' training images."""

    embedding: str = "l14_img"
    centroids: int | None = None  # None: rows passing the caption filter / 128 (DataComp's ratio)
    iterations: int = 20
    max_points_per_centroid: int = 256  # training subsample cap, seeded and reported
    seed: int | None = None  # None: the run's seed
    downstream_embeddings: str = ""  # "": the run's downstream.embeddings

    def needs(self) -> Needs:
        return Needs(embeddings=frozenset({self.embedding}))

    def fit(self, pool: Pool) -> dict[str, Any]:
        seed = self.ctx.seed if self.seed is None else self.seed
        # 1. caption pre-filter over the whole pool; kept for apply so captions are read once.
        reasons = []
        for b in pool.batches({"text"}, set(), self.ctx.batch_size):
            reasons.append(Verdict.from_rules(len(b), image_caption_rules(self, b)).reason)
        self._prefilter_reason = np.concatenate(reasons)
        candidates = np.flatnonzero(self._prefilter_reason == "")
        k = self.centroids or max(1, len(candidates) // DATACOMP_ROWS_PER_CENTROID)
        # 2. k-means on (a seeded subsample of) the candidates' image embeddings.
        rows = kmeans.training_rows(candidates, k, self.max_points_per_centroid, seed)
        x = gather(pool, self.embedding, rows, self.ctx.batch_size)
        self._centroids, km_report = kmeans.train(x, k, self.iterations, seed)
        # 3. the centroids downstream images fall into.
        target = load_downstream(self.downstream_embeddings or self.ctx.downstream_embeddings, x.shape[1])
        target_ids, _ = kmeans.assign(target, self._centroids)
        self._targets = np.unique(target_ids)
        return {
            "caption_prefilter_passed": int(len(candidates)), "pool_rows": int(pool.num_rows),
            "kmeans": km_report,
            "subsampled": f"trained on {len(rows)} of {len(candidates)} candidate rows "
                          f"(cap {k} x {self.max_points_per_centroid}, seed {seed})",
            "downstream_images": int(len(target)), "target_centroids": int(len(self._targets)),
        }

    def apply(self, batch: Batch) -> Verdict:
        pre = self._prefilter_reason[batch.offset:batch.offset + len(batch)]
        hit = np.zeros(len(batch), dtype=bool)
        passed = np.flatnonzero(pre == "")
        if len(passed):
            ids, _ = kmeans.assign(batch.embedding(self.embedding)[passed], self._centroids)
            hit[passed] = np.isin(ids, self._targets)
        verdict = Verdict(keep=(pre == "") & hit, reason=pre.copy())
        verdict.reason[(pre == "") & ~hit] = "no_downstream_centroid"
        return verdict


def normsim_scores(x: np.ndarray, targets: np.ndarray, p: float, tile: int = 8192) -> np.ndarray:
    """NormSim_p per row of x: (sum_t |<x, t>|^p)^(1/p); p = inf gives max_t <x, t>."""
    x = kmeans.normalize(x)
    if math.isinf(p):
        out = np.full(len(x), -np.inf, dtype=np.float32)
        for t0 in range(0, len(targets), tile):
            np.maximum(out, (x @ targets[t0:t0 + tile].T).max(1), out=out)
        return out
    acc = np.zeros(len(x), dtype=np.float64)
    for t0 in range(0, len(targets), tile):
        acc += (np.abs(x @ targets[t0:t0 + tile].T).astype(np.float64) ** p).sum(1)
    return (acc ** (1.0 / p)).astype(np.float32)


@register("normsim")
@dataclass
class NormSim(Filter):
    embedding: str = "l14_img"
    p: float = math.inf  # 2.0 and inf are the NormSim paper's choices
    threshold: float | None = None  # neither threshold nor fraction: a score only, nothing dropped
    fraction: float | None = None
    downstream_embeddings: str = ""

    def __post_init__(self) -> None:
        check_cut(self.threshold, self.fraction, "normsim", required=False)
        if not self.p >= 1:
            raise config.ConfigError(f"normsim: p must be >= 1 (or .inf), got {self.p}")

    def needs(self) -> Needs:
        return Needs(embeddings=frozenset({self.embedding}))

    def fit(self, pool: Pool) -> dict[str, Any]:
        parts, targets = [], None
        for b in pool.batches(set(), {self.embedding}, self.ctx.batch_size):
            x = b.embedding(self.embedding)
            if targets is None:
                targets = load_downstream(self.downstream_embeddings or self.ctx.downstream_embeddings, x.shape[1])
            parts.append(normsim_scores(x, targets, self.p))
        self._scores = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        self._threshold, cut = score_cut(self._scores, self.threshold, self.fraction)
        return {"p": self.p, "downstream_images": 0 if targets is None else len(targets), **cut}

    def apply(self, batch: Batch) -> Verdict:
        return score_verdict(batch, self._scores, self._threshold)
