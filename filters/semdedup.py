"""SemDeDup-style semantic deduplication on image embeddings.

Spherical k-means groups the pool; within each cluster the members are visited in a fixed order
(farthest from the centroid first, as SemDeDup keeps the least prototypical copy; ties by pool row)
and a member is dropped when its cosine similarity to an earlier *kept* member exceeds 1 - epsilon.
Similarities are computed tile by tile, so memory stays O(tile^2) however big a cluster is.

Resumable: with a work directory, the centroids, the assignment and the results of each group of
clusters are saved as they finish; a rerun loads them and only computes what is missing. A work
directory holding state for another pool or other parameters is refused, never silently reused.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from clipsift import config
from clipsift.filters import kmeans
from clipsift.filters.base import Batch, Filter, FilterError, Needs, Pool, Verdict, register
from clipsift.runlog import Timer, atomic_path, read_json, write_json


def dedup_ordered(x: np.ndarray, threshold: float, tile: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy dedup of unit-norm rows x in order: row i is dropped if sim(i, j) > threshold for a kept j < i.

    Returns keep (bool), dup_of (index of the most similar earlier kept row, -1 if kept) and that
    similarity (the max similarity to earlier kept rows; -inf when there is none).
    """
    m = len(x)
    keep = np.zeros(m, dtype=bool)
    dup_of = np.full(m, -1, dtype=np.int64)
    best = np.full(m, -np.inf, dtype=np.float32)
    for t0 in range(0, m, tile):
        t1 = min(m, t0 + tile)
        xt = x[t0:t1]
        # Against rows kept in earlier tiles, a tile of them at a time.
        kept_before = np.flatnonzero(keep[:t0])
        for k0 in range(0, len(kept_before), tile):
            kk = kept_before[k0:k0 + tile]
            s = xt @ x[kk].T
            j = s.argmax(1)
            sj = s[np.arange(len(xt)), j]
            better = sj > best[t0:t1]
            best[t0:t1][better] = sj[better]
            dup_of[t0:t1][better] = kk[j[better]]
        # Within the tile: rows with no similar earlier row at all are decided at once; the rest in order.
        s = xt @ xt.T
        s[np.triu_indices(len(xt))] = -np.inf  # only earlier rows count
        undecided = (s > threshold).any(1)
        tile_keep = best[t0:t1] <= threshold
        for i in np.flatnonzero(undecided & tile_keep):
            earlier_kept = np.flatnonzero(tile_keep[:i])
            if len(earlier_kept) == 0:
                continue
            j = earlier_kept[s[i, earlier_kept].argmax()]
            if s[i, j] > best[t0 + i]:
                best[t0 + i], dup_of[t0 + i] = s[i, j], t0 + j
            if s[i, j] > threshold:
                tile_keep[i] = False
        keep[t0:t1] = tile_keep
    dup_of[keep] = -1
    return keep, dup_of, best


@register("semdedup")
@dataclass
class SemDeDup(Filter):
    embedding: str = "l14_img"
    epsilon: float = 0.05  # drop when cosine similarity to an earlier kept member > 1 - epsilon
    clusters: int | None = None  # None: pool rows / 1000
    iterations: int = 20
    max_points_per_centroid: int = 256  # k-means training subsample cap, seeded and reported
    seed: int | None = None
    order: Literal["far_from_centroid", "pool"] = "far_from_centroid"
    tile: int = 4096
    clusters_per_file: int = 256  # resume granularity

    def __post_init__(self) -> None:
        if not 0.0 <= self.epsilon < 2.0:
            raise config.ConfigError(f"semdedup: epsilon must be in [0, 2), got {self.epsilon}")
        if self.tile < 1 or self.clusters_per_file < 1:
            raise config.ConfigError("semdedup: tile and clusters_per_file must be >= 1")

    def needs(self) -> Needs:
        return Needs()  # fit decides every row; apply only slices its result

    def fit(self, pool: Pool) -> dict[str, Any]:
        seed = self.ctx.seed if self.seed is None else self.seed
        work = self._work_dir(pool, seed)
        timer = Timer()
        with timer("gather"):
            x = np.concatenate([kmeans.normalize(b.embedding(self.embedding)).astype(np.float16)
                                for b in pool.batches(set(), {self.embedding}, self.ctx.batch_size)])
        k = self.clusters or max(1, len(x) // 1000)
        report: dict[str, Any] = {"clusters": k, "epsilon": self.epsilon, "order": self.order}
        with timer("kmeans_and_assign"):
            labels, sims = self._cluster(x, k, seed, work, report)
        # Visiting order: by cluster, then (far from centroid first | pool order), then row.
        rows = np.arange(len(x))
        key = sims if self.order == "far_from_centroid" else np.zeros(len(x), np.float32)
        order = np.lexsort((rows, key, labels))
        bounds = np.searchsorted(labels[order], np.arange(k + 1))
        self._drop = np.zeros(len(x), dtype=bool)
        self.duplicate_of = np.full(len(x), -1, dtype=np.int64)  # pool row each dropped row duplicates
        self.similarity = np.full(len(x), np.nan, dtype=np.float32)
        resumed = computed = 0
        for g0 in range(0, k, self.clusters_per_file):
            g1 = min(k, g0 + self.clusters_per_file)
            path = work / "clusters" / f"{g0:08d}.npz" if work else None
            if path is not None and path.is_file():
                with np.load(path) as z:
                    dropped, dup_of, sim = z["dropped"], z["dup_of"], z["sim"]
                resumed += 1
            else:
                with timer("dedup"):
                    dropped, dup_of, sim = self._dedup_clusters(x, order, bounds, g0, g1)
                if path is not None:
                    with atomic_path(path) as tmp:
                        with open(tmp, "wb") as f:
                            np.savez(f, dropped=dropped, dup_of=dup_of, sim=sim)
                computed += 1
            self._drop[dropped] = True
            self.duplicate_of[dropped], self.similarity[dropped] = dup_of, sim
        sizes = np.diff(bounds)
        report.update(dropped=int(self._drop.sum()), largest_cluster=int(sizes.max()),
                      empty_clusters=int((sizes == 0).sum()), cluster_files_resumed=resumed,
                      cluster_files_computed=computed, seconds=timer.as_dict())
        return report

    def _cluster(self, x: np.ndarray, k: int, seed: int, work: Path | None, report: dict) -> tuple[np.ndarray, np.ndarray]:
        path = work / "assignment.npz" if work else None
        if path is not None and path.is_file():
            with np.load(path) as z:
                report["kmeans"] = json.loads(str(z["report"]))
                return z["labels"], z["sims"]
        rows = kmeans.training_rows(np.arange(len(x)), k, self.max_points_per_centroid, seed)
        centroids, km = kmeans.train(x[rows].astype(np.float32), k, self.iterations, seed)
        km["subsampled"] = f"trained on {len(rows)} of {len(x)} rows (cap {k} x {self.max_points_per_centroid})"
        labels, sims = kmeans.assign(x, centroids)
        report["kmeans"] = km
        if path is not None:
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, labels=labels, sims=sims, centroids=centroids, report=json.dumps(km))
        return labels, sims

    def _dedup_clusters(self, x: np.ndarray, order: np.ndarray, bounds: np.ndarray, g0: int,
                        g1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        dropped, dup_of, sim = [], [], []
        for c in range(g0, g1):
            members = order[bounds[c]:bounds[c + 1]]
            if len(members) < 2:
                continue
            # x is kept as float16 to halve memory; renormalise so exact copies score 1.0.
            keep, dup, best = dedup_ordered(kmeans.normalize(x[members]), 1.0 - self.epsilon, self.tile)
            dropped.append(members[~keep])
            dup_of.append(members[dup[~keep]])
            sim.append(best[~keep])
        if not dropped:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        return np.concatenate(dropped), np.concatenate(dup_of), np.concatenate(sim)

    def _work_dir(self, pool: Pool, seed: int) -> Path | None:
        if self.ctx.work_dir is None:
            return None
        work = Path(self.ctx.work_dir) / self.name.replace("#", "_")
        state = {"pool": pool.fingerprint(), "params": {**asdict(self), "seed": seed}}
        state = json.loads(json.dumps(state, default=str))
        state_file = work / "state.json"
        if state_file.is_file():
            if read_json(state_file) != state:
                raise FilterError(f"{work} holds SemDeDup state for another pool or other parameters; "
                                  f"remove it or use another output folder")
        else:
            write_json(state_file, state)
        return work

    def apply(self, batch: Batch) -> Verdict:
        drop = self._drop[batch.offset:batch.offset + len(batch)]
        return Verdict.from_rules(len(batch), [("semantic_duplicate", ~drop)])
