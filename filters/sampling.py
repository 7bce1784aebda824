"""Samplers: one score per example -> how many times each example goes into the training stream.

Every sampler takes a 1-D float array of scores (one per pool example, all finite; the command
skips NaN/null rows with a reason before calling) and returns an integer count per example. The
multiset "uid i repeated counts[i] times" is a DataComp subset; `write_counts_subset` writes it.

- soft_cap_sample  Soft Cap Sampling (FLYT): rounds of b distinct draws ∝ softmax(logits), each
                   draw lowers that example's logit by alpha. Exact, fast (sampling_blocks.py).
- soft_cap_sample_direct  the same procedure written plainly (full softmax + numpy's weighted
                   choice without replacement each round): the reference for tests and benchmarks.
- hard_cap_sample  i.i.d. draws from the fixed softmax(scores); draws of an example already at
                   `cap` are dropped, until `total` draws are kept.
- top_fraction     DataComp's top fraction (filters/base.py): every example scoring >= the score at
                   rank int(fraction * N), once each (ties kept, as the clip_score filter does).
- threshold_select examples with score >= t, once each.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from clipsift.filters.base import top_fraction_mask
from clipsift.filters.sampling_blocks import BlockPool
from clipsift.formats import write_subset

DEFAULT_ALPHA = 0.15
DEFAULT_BATCH_SIZE = 100_000
DEFAULT_BLOCK_SIZE = 64


def _rng(seed: int | np.random.Generator) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _check_scores(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores)
    if scores.ndim != 1:
        raise ValueError(f"scores must be a 1-D array, got shape {scores.shape}")
    if not np.issubdtype(scores.dtype, np.floating) and not np.issubdtype(scores.dtype, np.integer):
        raise ValueError(f"scores must be numbers, got dtype {scores.dtype}")
    if scores.size and np.isfinite(scores.min()) and np.isfinite(scores.max()):
        return scores  # NaN and +-inf all show in the extremes: no pool-sized temporaries
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        raise ValueError(f"scores contain {bad.size} non-finite values (first at index {bad[0]}: "
                         f"{scores[bad[0]]}); drop or fill them before sampling")
    return scores


def _resolve_total(total: int | None, n: int) -> int:
    """None -> n (DataComp: samples seen = pool size)."""
    if total is None:
        return n
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    return int(total)


def _check_scs(n: int, total: int, alpha: float, batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not alpha >= 0 or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha}")
    # Each round draws min(batch_size, draws left) DISTINCT examples, so a round cannot ask for
    # more examples than the pool has. (batch_size > N is fine when total <= N: one round.)
    if min(batch_size, total) > n:
        raise ValueError(
            f"SCS draws distinct examples per round: a round of {min(batch_size, total)} does not fit "
            f"a pool of {n}; use batch_size <= {n} (e.g. batch_size={max(1, n // 100)})")


def soft_cap_sample(scores: np.ndarray, total: int | None = None, *, alpha: float = DEFAULT_ALPHA,
                    batch_size: int = DEFAULT_BATCH_SIZE, seed: int | np.random.Generator = 0,
                    block_size: int = DEFAULT_BLOCK_SIZE, progress: bool = False) -> np.ndarray:
    """Soft Cap Sampling; returns draw counts per example (uint16, or uint32 past 2**16 rounds).

    total=None draws N (the pool size). Rounds: b = min(batch_size, total - drawn) distinct
    examples ∝ softmax(logits), then logits[drawn] -= alpha. Raises ValueError when a round would
    need more distinct examples than the pool has. Deterministic given the seed. Scores are
    held as float32 (as DataComp stores them); block_size only trades speed.
    """
    scores = _check_scores(scores)
    n = len(scores)
    total = _resolve_total(total, n)
    _check_scs(n, total, alpha, batch_size)
    rounds = -(-total // batch_size)
    if total == 0:
        return np.zeros(n, dtype=np.uint16)
    rng = _rng(seed)
    pool = BlockPool(scores, alpha, block_size=block_size, max_rounds=rounds)
    drawn = 0
    for _ in _progress(range(rounds), progress, "soft cap sampling"):
        b = min(batch_size, total - drawn)
        pool.draw_round(b, rng)
        drawn += b
    return pool.counts()


def soft_cap_sample_direct(scores: np.ndarray, total: int | None = None, *, alpha: float = DEFAULT_ALPHA,
                           batch_size: int = DEFAULT_BATCH_SIZE,
                           seed: int | np.random.Generator = 0) -> np.ndarray:
    """The SCS procedure as written in the paper: O(N) softmax and weighted choice per round."""
    scores = _check_scores(scores)
    n = len(scores)
    total = _resolve_total(total, n)
    _check_scs(n, total, alpha, batch_size)
    rng = _rng(seed)
    logits = scores.astype(np.float64)
    counts = np.zeros(n, dtype=np.int64)
    drawn = 0
    while drawn < total:
        b = min(batch_size, total - drawn)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        batch = rng.choice(n, size=b, replace=False, p=p)
        counts[batch] += 1
        logits[batch] -= alpha
        drawn += b
    return counts


def standardise(scores: np.ndarray, std: float) -> np.ndarray:
    """Scores shifted and scaled to mean 0 and the given standard deviation (float64).

    Softmax samplers read scores as logits, so their spread sets how strongly a draw prefers a
    high score; this fixes that spread instead of inheriting whatever scale a scorer ended at.
    A constant score column stays constant (all zeros): every example equally likely.
    """
    scores = _check_scores(scores).astype(np.float64)
    if not scores.size or scores.min() == scores.max():  # (the std of equal floats can round above 0)
        return np.zeros_like(scores)
    centred = scores - scores.mean()
    return centred * (std / centred.std())


def hard_cap_sample(scores: np.ndarray, total: int | None = None, *, cap: int,
                    seed: int | np.random.Generator = 0, chunk: int = 1 << 22) -> np.ndarray:
    """Hard Cap Sampling; returns counts (int32) with every count <= cap and sum == total.

    Draws are i.i.d. from the fixed p = softmax(scores), taken in order; a draw of an example
    already drawn `cap` times is dropped. Dropped draws vanish, so after an example reaches the
    cap the next kept draw is p restricted to the others: each chunk of draws is taken from p with
    capped examples removed, which is the same process without generating the dropped draws.
    """
    scores = _check_scores(scores)
    n = len(scores)
    total = _resolve_total(total, n)
    if cap < 1:
        raise ValueError(f"hard cap sampling needs cap >= 1, got {cap}")
    weights = np.exp(scores.astype(np.float64) - (scores.max() if n else 0.0))
    positive = int(np.count_nonzero(weights))
    if total > cap * positive:
        raise ValueError(f"hard cap sampling cannot keep {total} draws with cap={cap} per example: only "
                         f"{positive} examples have non-zero probability (at most {cap * positive} draws)")
    rng = _rng(seed)
    counts = np.zeros(n, dtype=np.int32)
    left = total
    while left:
        cdf = np.cumsum(np.where(counts < cap, weights, 0.0))
        cdf /= cdf[-1]
        draws = np.searchsorted(cdf, rng.random(min(left, chunk)), side="right")
        # In draw order, example i keeps only its first cap - counts[i] draws of this chunk.
        order = np.argsort(draws, kind="stable")
        sorted_draws = draws[order]
        starts = np.flatnonzero(np.r_[True, sorted_draws[1:] != sorted_draws[:-1]])
        rank = np.arange(len(sorted_draws)) - np.repeat(starts, np.diff(np.r_[starts, len(sorted_draws)]))
        kept = sorted_draws[rank < cap - counts[sorted_draws]]
        counts += np.bincount(kept, minlength=n).astype(np.int32)
        left -= len(kept)
    return counts


def top_fraction(scores: np.ndarray, fraction: float) -> np.ndarray:
    """DataComp's top `fraction` once each (uint8 counts): the rule the clip_score filter uses.

    Keeps every example scoring >= the score at rank int(fraction * N) in descending order, ties
    included, so int(fraction * N) + 1 examples or more (filters.base.top_fraction_threshold).
    """
    scores = _check_scores(scores)
    return top_fraction_mask(scores, fraction).astype(np.uint8)


def threshold_select(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Keep examples with score >= threshold once each (uint8 counts)."""
    scores = _check_scores(scores)
    return (scores >= threshold).astype(np.uint8)


def write_counts_subset(path: str | Path, uids: Sequence[str] | np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Write the DataComp subset "uid i repeated counts[i] times" (sorted u8,u8, repeats kept)."""
    uids = np.asarray(uids, dtype=object)
    counts = np.asarray(counts)
    if uids.shape != counts.shape:
        raise ValueError(f"{len(uids)} uids but {len(counts)} counts")
    return write_subset(path, np.repeat(uids, counts.astype(np.int64)))


def repetition_histogram(counts: np.ndarray) -> dict[int, int]:
    """count -> number of examples drawn that many times (0 included)."""
    values, freq = np.unique(counts, return_counts=True)
    return {int(v): int(f) for v, f in zip(values, freq)}


def _progress(it, enabled: bool, desc: str):
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, unit="round", mininterval=1.0)  # tqdm writes to stderr
