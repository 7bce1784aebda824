"""DataComp's image-based filter, and NormSim: pool examples that look like downstream training images.

image_based: a caption pre-filter (English, > 1 whitespace token (DataComp counted fastText
tokens), > 5 characters); k-means on the image
embeddings of the rows that pass it; keep a pool row if its nearest centroid (inner product) is the
nearest centroid of at least one downstream training image. DataComp used 100k centroids for a
12.8M pool (128 rows per centroid), the default ratio here when `centroids` is not set.

normsim: a score per pool row, the p-norm (p = inf: max) of the similarities between its image
embedding and the downstream training image embeddings; kept by threshold or pool fraction, or
just written out as a score.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipsift import config
from clipsift.filters import kmeans
from clipsift.filters.base import Batch, Filter, FilterError, Needs, Pool, Verdict, register
from clipsift.filters.baselines import caption_rules, check_cut, cut_report, fraction_threshold

DATACOMP_ROWS_PER_CENTROID = 128  # 12.8M pool / 100k centroids


def load_downstream(path: str, dim: int) -> np.ndarray:
    """Unit-norm float32 embeddings of downstream training images from a .npy (n, dim)."""
    if not path:
        raise FilterError("needs downstream training-image embeddings: set downstream.embeddings=/path/to.npy "
                          "(embeddings of the tasks' train images from the same CLIP as the pool column)")
    if not Path(path).is_file():
        raise FilterError(f"downstream embeddings {path} do not exist")
    arr = np.load(path, allow_pickle=False)
    if arr.ndim != 2 or arr.shape[1] != dim or len(arr) == 0:
        raise FilterError(f"{path}: downstream embeddings have shape {arr.shape}; expected (n > 0, {dim}) to match "
                          f"the pool embedding")
    return kmeans.normalize(arr)


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
    embedding: str = "l14_img"
    centroids: int | None = None  # None: rows passing the caption filter / 128 (DataComp's ratio)
    iterations: int = 20
    max_points_per_centroid: int = 256  # training subsample cap, seeded and reported
    seed: int | None = None  # None: the run's seed
    downstream_embeddings: str = ""  # None: the run's downstream.embeddings
    min_words: int = 2  # DataComp: > 1 token
    min_chars: int = 6  # DataComp: > 5 characters
    english: bool = True

    def needs(self) -> Needs:
        return Needs(embeddings=frozenset({self.embedding}))

    def fit(self, pool: Pool) -> dict[str, Any]:
        seed = self.ctx.seed if self.seed is None else self.seed
        # 1. caption pre-filter over the whole pool; kept for apply so captions are read once.
        reasons = []
        for b in pool.batches({"text"}, set(), self.ctx.batch_size):
            reasons.append(Verdict.from_rules(len(b), caption_rules(self, b, self.min_words, self.min_chars,
                                                                    self.english)).reason)
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
        self._threshold = self.threshold
        if self.fraction is not None:
            self._threshold = fraction_threshold(self._scores, self.fraction)
        report: dict[str, Any] = {"p": self.p, "downstream_images": 0 if targets is None else len(targets)}
        if self._threshold is not None:
            report.update(cut_report(self._scores, self._threshold, self.fraction))
        return report

    def apply(self, batch: Batch) -> Verdict:
        s = self._scores[batch.offset:batch.offset + len(batch)]
        rules = [] if self._threshold is None else [("low_score", s >= np.float32(self._threshold))]
        return Verdict.from_rules(len(batch), rules, score=s)
