"""negCLIPLoss (Wang et al. 2024, "CLIPLoss and Norm-Based Data Selection Methods for Multimodal
Contrastive Learning"): the CLIP score minus a normaliser from the example's contrastive row and
column in random batches -- the negative of the teacher's CLIP loss for that example, times τ.

For example i in a batch B of b pairs, with cosines s_ij = <u_i, v_j> of unit image / text
embeddings and the teacher's temperature τ (logit scale 1/τ), the teacher's symmetric CLIP loss is

    ℓ_B(i) = -1/2 [ log( e^{s_ii/τ} / Σ_{j∈B} e^{s_ij/τ} ) + log( e^{s_ii/τ} / Σ_{j∈B} e^{s_ji/τ} ) ]

so    -τ ℓ_B(i) = s_ii - R_B(i),   R_B(i) = τ/2 [ LSE_{j∈B}(s_ij/τ) + LSE_{j∈B}(s_ji/τ) ].

negCLIPLoss(i) = s_ii - (1/K) Σ_k R_{B_k(i)}(i), the B_k(i) being i's batch in K independent random
partitions of the pool into batches of b. Paper values (as we read the paper): b = 32,768 (OpenAI
CLIP's training batch), K = 10, τ = the teacher's learned temperature (OpenAI CLIP: 0.01, logit
scale 100) -- the defaults here. On the world, the principle "the teacher's own training batch and
temperature" gives b = 128 (configs/train/reference_*.yaml) and the reference checkpoint's logit
scale (training.reference.logit_scale; `clipsift train --reference-models` prints it); configs/filters/negclip.yaml.

Every batch has exactly b rows: the last, short one of a partition is topped up with rows of that
partition's first batch (their normalisers come from their own batch, as everywhere else).

A pool larger than `memory_rows` is first split at random into groups of at most that many rows,
written group by group to the work folder (one pass over the metadata), and each example's K
batches are drawn within its group: every batch is still a uniform random b-subset of the pool,
but an example's K batches share one group. With the pool in memory (the default for up to 2M
rows) this is exactly the paper's procedure. Deterministic given the seed.
"""
from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from clipsift import config
from clipsift.filters.base import Batch, Filter, FilterError, Needs, Pool, Verdict, register
from clipsift.filters.baselines import check_cut, score_cut, score_verdict

PAPER_BATCH = 32768
PAPER_REPEATS = 10
OPENAI_LOGIT_SCALE = 100.0


def batch_normalisers(img: torch.Tensor, txt: torch.Tensor, logit_scale: float,
                      tile_elems: int = 1 << 24) -> torch.Tensor:
    """R(i) = τ/2 [LSE_j(s_ij/τ) + LSE_j(s_ji/τ)] for every row of m batches at once: unit-norm
    (m, b, dim) image and text embeddings -> (m, b), τ = 1/logit_scale.

    Row tiles of the (m, b, b) similarities keep memory near tile_elems floats, however big b is."""
    m, b, _ = img.shape
    tile = max(1, tile_elems // (m * b))
    rows = torch.empty((m, b), dtype=torch.float64, device=img.device)
    cols = torch.full((m, b), -math.inf, dtype=torch.float64, device=img.device)
    for t0 in range(0, b, tile):
        logits = torch.bmm(img[:, t0:t0 + tile], txt.transpose(1, 2)) * logit_scale  # images t0.. vs every text
        rows[:, t0:t0 + tile] = torch.logsumexp(logits, dim=2).double()
        cols = torch.logaddexp(cols, torch.logsumexp(logits, dim=1).double())
    return (rows + cols) / (2.0 * logit_scale)


def negclip_scores(img: np.ndarray, txt: np.ndarray, batch_size: int, repeats: int, logit_scale: float,
                   rng: np.random.Generator, device: str = "cpu", tile_elems: int = 1 << 24) -> np.ndarray:
    """negCLIPLoss of every row of (img, txt) -- one group, held in memory -- from `repeats` random
    partitions into batches of `batch_size` (small batches are computed many at once)."""
    n, b = len(img), batch_size
    if b > n:
        raise FilterError(f"negclip: batch_size {b} is larger than the {n} rows to batch; lower batch_size")
    u = torch.nn.functional.normalize(torch.from_numpy(np.asarray(img, np.float32)).to(device), dim=-1)
    v = torch.nn.functional.normalize(torch.from_numpy(np.asarray(txt, np.float32)).to(device), dim=-1)
    nb = -(-n // b)
    own = torch.ones(nb * b, dtype=torch.bool, device=device)
    own[n:] = False  # the top-up rows of the last batch: already scored in the first
    per_call = max(1, tile_elems // (b * b))
    norm = torch.zeros(n, dtype=torch.float64, device=device)
    for _ in range(repeats):
        perm = rng.permutation(n)
        members = torch.from_numpy(np.concatenate([perm, perm[:nb * b - n]])).to(device).view(nb, b)
        for c0 in range(0, nb, per_call):
            idx = members[c0:c0 + per_call]
            r = batch_normalisers(u[idx], v[idx], logit_scale, tile_elems).reshape(-1)
            keep = own[c0 * b:(c0 + len(idx)) * b]
            norm.index_add_(0, idx.reshape(-1)[keep], r[keep])
    clip = (u * v).sum(-1).double()
    return (clip - norm / repeats).cpu().numpy().astype(np.float32)


@register("negclip")
@dataclass
class NegClipLoss(Filter):
    """negCLIPLoss as a pool-level score (column negclip_score); optionally kept by threshold or fraction."""

    model: str = "l14"  # the teacher: reads <model>_img and <model>_txt
    batch_size: int = PAPER_BATCH  # b
    repeats: int = PAPER_REPEATS  # K
    logit_scale: float = OPENAI_LOGIT_SCALE  # 1/τ of the teacher
    memory_rows: int = 2_000_000  # rows whose embeddings are held at once (a larger pool is split, see above)
    seed: int | None = None  # None: the run's seed
    device: str = "auto"  # auto: cuda when available
    threshold: float | None = None  # neither threshold nor fraction: a score only, nothing dropped
    fraction: float | None = None

    def __post_init__(self) -> None:
        check_cut(self.threshold, self.fraction, "negclip", required=False)
        for key in ("batch_size", "repeats"):
            if getattr(self, key) < 1:
                raise config.ConfigError(f"negclip: {key} must be >= 1, got {getattr(self, key)}")
        if self.memory_rows < self.batch_size:
            raise config.ConfigError(f"negclip: memory_rows ({self.memory_rows}) must hold at least one batch ({self.batch_size})")
        if not self.logit_scale > 0:
            raise config.ConfigError(f"negclip: logit_scale must be > 0 (the teacher's 1/τ), got {self.logit_scale}")

    def needs(self) -> Needs:
        return Needs(embeddings=frozenset({f"{self.model}_img", f"{self.model}_txt"}))

    def fit(self, pool: Pool) -> dict[str, Any]:
        seed = self.ctx.seed if self.seed is None else self.seed
        device = ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
        n = pool.num_rows
        groups = max(1, math.ceil(n / self.memory_rows))
        group_of = np.zeros(n, np.int64)
        group_of[np.random.default_rng([seed, 0]).permutation(n)] = np.arange(n) * groups // max(n, 1)
        self._scores = np.full(n, np.nan, np.float32)
        for g, (rows, img, txt) in enumerate(self._groups(pool, group_of, groups)):
            rng = np.random.default_rng([seed, 1, g])
            self._scores[rows] = negclip_scores(img, txt, self.batch_size, self.repeats, self.logit_scale, rng, device)
        self._threshold, cut = score_cut(self._scores, self.threshold, self.fraction)
        return {"batch_size": self.batch_size, "repeats": self.repeats, "logit_scale": self.logit_scale,
                "groups": groups, "seed": seed, **cut}

    def _groups(self, pool: Pool, group_of: np.ndarray,
                groups: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(pool rows, image, text embeddings) of each group in turn: from memory when there is one
        group, else through per-group spill files (one pass over the pool, then one group at a time)."""
        names = (f"{self.model}_img", f"{self.model}_txt")
        if groups == 1:
            parts = [(b.embedding(names[0]), b.embedding(names[1])) for b in self._batches(pool, names)]
            yield (np.arange(pool.num_rows), np.concatenate([p[0] for p in parts]),
                   np.concatenate([p[1] for p in parts]))
            return
        work = Path(self.ctx.work_dir) / self.name.replace("#", "_") if self.ctx.work_dir else None
        if work:
            work.mkdir(parents=True, exist_ok=True)
        spill = Path(tempfile.mkdtemp(prefix="negclip-", dir=work))
        try:
            dims: dict[str, int] = {}
            files = {(g, k): open(spill / f"{g}.{k}", "wb") for g in range(groups) for k in ("rows", *names)}
            try:
                for b in self._batches(pool, names):
                    g_of = group_of[b.offset:b.offset + len(b)]
                    for g in np.unique(g_of):
                        sel = np.flatnonzero(g_of == g)
                        files[g, "rows"].write((sel + b.offset).astype(np.int64).tobytes())
                        for k in names:
                            x = np.ascontiguousarray(b.embedding(k)[sel], np.float16)
                            dims[k] = x.shape[1]
                            files[g, k].write(x.tobytes())
            finally:
                for f in files.values():
                    f.close()
            for g in range(groups):
                rows = np.fromfile(spill / f"{g}.rows", np.int64)
                img, txt = (np.fromfile(spill / f"{g}.{k}", np.float16).reshape(len(rows), dims[k]) for k in names)
                yield rows, img, txt
        finally:
            shutil.rmtree(spill, ignore_errors=True)

    def _batches(self, pool: Pool, names: tuple[str, str]) -> Iterator[Batch]:
        for b in pool.batches(set(), set(names), self.ctx.batch_size):
            img, txt = b.embedding(names[0]), b.embedding(names[1])
            if img.shape != txt.shape:
                raise FilterError(f"negclip: {names[0]} {img.shape} and {names[1]} {txt.shape} differ in shape "
                                  f"(rows from {b.offset}); both must be one CLIP's embeddings")
            yield b

    def apply(self, batch: Batch) -> Verdict:
        return score_verdict(batch, self._scores, self._threshold)
