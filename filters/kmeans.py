"""k-means on embeddings with faiss, with the subsampling made explicit and reported.

faiss.Kmeans silently trains on a random subset when given more than k * max_points_per_centroid
points. Here the caller picks the training rows itself (`training_rows`, seeded), and faiss is told
to use all of them, so the report says exactly how many points trained the centroids.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from clipsift.filters.base import FilterError

FAISS_MIN_POINTS_PER_CENTROID = 39  # below this faiss warns that clusters are poorly estimated


def normalize(x: np.ndarray) -> np.ndarray:
    """float32, unit L2 norm per row (embeddings are not assumed normalised; zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def training_rows(candidates: np.ndarray, k: int, max_points_per_centroid: int, seed: int) -> np.ndarray:
    """Rows to train k centroids on: all candidates, or a seeded sorted subsample of k * max of them."""
    cap = k * max_points_per_centroid
    if len(candidates) <= cap:
        return candidates
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(candidates, size=cap, replace=False))


def train(x: np.ndarray, k: int, niter: int, seed: int, spherical: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    """Centroids (k, d) float32 from training points x (already chosen); returns them and a report."""
    import faiss

    n, d = x.shape
    if k < 1:
        raise FilterError(f"k-means needs at least 1 centroid, got {k}")
    if n < k:
        raise FilterError(f"k-means with {k} centroids needs at least {k} points, got {n}; lower the centroid count")
    km = faiss.Kmeans(d, k, niter=niter, seed=seed, spherical=spherical, verbose=False,
                      max_points_per_centroid=(n + k - 1) // k + 1, min_points_per_centroid=1)
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    report = {
        "centroids": k, "iterations": niter, "seed": seed, "spherical": spherical, "trained_on_points": n,
        "points_per_centroid": round(n / k, 2),
        "objective": float(km.obj[-1]) if len(km.obj) else None,
    }
    if n < k * FAISS_MIN_POINTS_PER_CENTROID:
        report["warning"] = f"only {n / k:.1f} training points per centroid (faiss recommends >= 39)"
    return np.asarray(km.centroids, dtype=np.float32), report


def assign(x: np.ndarray, centroids: np.ndarray, batch_size: int = 65536, unit_norm: bool = True,
           device: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by inner product for each row of x: (ids int64, similarity float32).

    unit_norm: rows of x scaled to unit norm first (k-means here is spherical); DataComp's
    image_based compares the raw float32 embeddings with its centroids, so it passes False.
    device "": exact brute force as a blocked numpy matmul (numpy's BLAS was ~4x faster than
    faiss.IndexFlatIP on the 2-core CPU); a torch device ("cuda", "cpu"): torch.einsum on it, as
    DataComp's get_centroid_ids_gpu does. Blocks hold at most ~16M similarities. Ties go to the
    lowest centroid id (numpy's and torch's argmax).
    """
    if x.ndim != 2 or x.shape[1] != centroids.shape[1]:
        raise FilterError(f"embeddings of shape {x.shape} vs centroids of dim {centroids.shape[1]}")
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    block = max(1, min(batch_size, (1 << 24) // len(c)))
    ids = np.empty(len(x), dtype=np.int64)
    sims = np.empty(len(x), dtype=np.float32)
    if device:
        import torch

        ct = torch.from_numpy(c).to(device)
    for start in range(0, len(x), block):
        xb = normalize(x[start:start + block]) if unit_norm else np.asarray(x[start:start + block], np.float32)
        if device:
            s = torch.einsum("ik,jk->ij", torch.from_numpy(np.ascontiguousarray(xb)).to(device), ct)
            best = s.argmax(1)  # DataComp's call
            ids[start:start + len(xb)] = best.cpu().numpy()
            sims[start:start + len(xb)] = s.gather(1, best[:, None])[:, 0].cpu().numpy()
            continue
        s = xb @ c.T
        ids[start:start + len(s)] = s.argmax(1)
        sims[start:start + len(s)] = s[np.arange(len(s)), ids[start:start + len(s)]]
    return ids, sims
