"""Exact Soft Cap Sampling rounds whose cost grows with the batch, not with the pool.

One SCS round draws b DISTINCT items with probabilities p = softmax(l) (successive sampling
without replacement), then lowers the logit of every drawn item by alpha. Done directly a round
costs O(N) (softmax + weighted choice over the whole pool): at N = 128M and 1280 rounds, too slow.
`BlockPool` draws from exactly the same distribution with O(b) work per round, plus upkeep
(re-tightening block envelopes, O(N / m) to rebuild the block CDF) only in rounds that need it.

Why it is exact, in three steps:
1. Successive sampling = "draw i.i.d. with replacement from p, keep first occurrences". The next
   new item of an i.i.d. sequence from p is p restricted to the items not yet seen, which is the
   definition of successive sampling (numpy's choice(replace=False, p=p) and Gumbel-top-b give the
   same law). Any prefix of the first-occurrence sequence is exact, so we may draw more i.i.d.
   samples than needed and keep the first `need` new items; when a batch of draws runs short we
   continue with p restricted to the unseen items (the same sequence with seen items skipped).
2. i.i.d. draws from p by rejection: propose block B with probability ∝ size_B * exp(env_B), item j
   uniformly inside it, and accept with probability exp(l_j - env_B). When env_B >= l_j for every
   item of the block, an accepted draw is exactly p-distributed (standard rejection sampling);
   items already drawn this round get acceptance 0, which gives p restricted to unseen items.
3. The envelope stays valid for free: logits only go down (each draw subtracts alpha), so
   env_B = the block's max logit at any earlier time is still >= every current logit. It is
   tightened (set to the block's current max) only where and when too many proposals fail:
   mid-round over the items not yet drawn this round (re-admitted at the round's end), after a
   round over all items. Any valid envelope gives the same law; tightness only buys speed.
   A batch's uniforms are generated already sorted, so memory is walked in order; the i.i.d.
   sequence order needed to keep "the first `need`" is a uniform random permutation,
   independent of the values, drawn only in a batch that found more new items than needed.

Items are grouped by score before being cut into blocks of at most m items (a radix sort into
score bands of equal width, 0.05 or 1/65535 of the score range at most; no block spans two
bands), so the items of a block have nearly equal scores, its envelope is tight and acceptance
stays high. Blocks are picked with a guide table over their CDF (O(1) per draw on average)
rather than a binary search.

Numerics: scores are stored as float32 (DataComp score columns are float32); logits are computed
in float64 as score - alpha * count, so they never drift with repeated subtraction. An item is
drawn at most once per round, so counts fit in uint16 unless there are >= 2**16 rounds.
"""
from __future__ import annotations

import math

import numpy as np

_CHUNK_ROWS = 1 << 16  # rows per chunk for whole-pool passes: keeps temporaries small
_REFRESH_MID_ROUND = 0.5  # tighten envelopes before another batch if its yield fell below this
_REFRESH_END_ROUND = 0.75  # ... and after a round that drew fewer items per proposal than this
_GUIDE_PER_BLOCK = 4  # guide buckets per block: most draws then need one comparison
_BAND_WIDTH = 0.05  # widest score band (in logits) that the coarse, faster grouping may use


class BlockPool:
    """Logits s_i - alpha * c_i of N items, in blocks of at most `block_size` items of nearly
    equal score. Positions used inside are positions in score-grouped order (`order` maps them
    to the caller's indices); `counts()` returns counts in the caller's order."""

    def __init__(self, scores: np.ndarray, alpha: float, block_size: int = 64, max_rounds: int = 1):
        m = int(block_size)
        if m < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        scores = np.asarray(scores, dtype=np.float32)
        n = len(scores)
        if n == 0:
            raise ValueError("BlockPool needs at least one item")
        self.n, self.m, self.alpha = n, m, float(alpha)
        self.order, band_sizes = _group_by_score(scores)
        self.start = _block_starts(band_sizes, m)  # block B is positions start[B]:start[B + 1]
        self.size = np.diff(self.start)
        self.nblocks = len(self.size)
        self.s = np.take(scores, self.order)
        self.c = np.zeros(n, dtype=np.uint16 if max_rounds < 2**16 else np.uint32)
        self.env = np.maximum.reduceat(self.s, self.start[:-1]).astype(np.float64)
        self._build_guide()
        self.yield_rate = [1.0, 1.0]  # new items / proposal, in first and in later batches
        self.yield_last = 1.0  # ... in the last batch: decides whether to tighten envelopes
        self.refresh_below = _REFRESH_END_ROUND  # draws per proposal that trigger tightening
        self.stats = {"proposals": 0, "accepted": 0, "batches": 0, "refreshed_blocks": 0}

    # ------------------------------------------------------------------ state
    def counts(self) -> np.ndarray:
        """Draw counts per item, in the caller's original order."""
        out = np.empty(self.n, dtype=self.c.dtype)
        out[self.order] = self.c
        return out

    def block_of(self, items: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.start, items, side="right") - 1

    def _refresh(self, rows: np.ndarray, taken: np.ndarray) -> float:
        """Tighten the envelope of the sorted block ids `rows` to the current max logit of their
        items not in `taken` (any order). Returns the proposal mass this removed, as a fraction
        of the total at the last guide build."""
        old = self.env[rows]
        for lo in range(0, len(rows), _CHUNK_ROWS):
            part = rows[lo : lo + _CHUNK_ROWS]
            size, start = self.size[part], self.start[part]
            first = np.cumsum(size) - size  # where each block's items begin in `idx`
            idx = np.repeat(start - first, size) + np.arange(first[-1] + size[-1])
            logits = self.s[idx].astype(np.float64)
            logits -= self.alpha * self.c[idx]
            if taken.size:
                blocks = self.block_of(taken)
                hit = _isin_sorted(blocks, part)
                row = np.searchsorted(part, blocks[hit])
                logits[first[row] + taken[hit] - start[row]] = -np.inf
            self.env[part] = np.maximum.reduceat(logits, first)
        self.stats["refreshed_blocks"] += len(rows)
        size = self.size[rows]
        return float(size @ np.exp(old - self.log_mass) - size @ np.exp(self.env[rows] - self.log_mass))

    def _build_guide(self) -> None:
        """Block CDF ∝ size_B * exp(env_B), and a guide table of K equal buckets of [0, 1):
        guide[k] = a block index <= the first block whose CDF exceeds any u in bucket k."""
        edges = np.empty(self.nblocks + 1)  # edges[B], edges[B + 1]: block B's CDF interval
        edges[0] = 0.0
        cdf = edges[1:]
        top = self.env.max()
        np.exp(self.env - top, out=cdf)
        cdf *= self.size  # a block's proposal mass: its size times its envelope weight
        np.cumsum(cdf, out=cdf)
        self.log_mass = top + math.log(cdf[-1])
        cdf /= cdf[-1]  # last entry exactly 1.0: every u in [0, 1) has an answer
        k = _GUIDE_PER_BLOCK * len(cdf)
        # The factor rounds borderline blocks up a bucket, so a guide never starts past the answer.
        bucket = np.minimum((cdf * (k * (1 + 1e-12))).astype(np.int64), k)
        per_bucket = np.bincount(bucket, minlength=k + 1)
        self.edges, self.cdf, self.guide = edges, cdf, np.cumsum(per_bucket) - per_bucket

    def _propose(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Inverse CDF of the proposal: block B with probability ∝ size_B exp(env_B), then an item
        uniform in B. Returns (blocks, items) for sorted uniforms u in [0, 1), both sorted.

        The block is the first one whose CDF exceeds u (guide table, one step, exact binary
        search for the rare rest); where u falls inside that block's CDF interval is uniform,
        and picks the item, so a single uniform serves both levels.
        """
        cdf, k = self.cdf, len(self.guide) - 1
        blocks = self.guide[np.minimum((u * k).astype(np.int64), k - 1)]
        blocks += cdf[blocks] <= u  # most buckets meet at most two blocks
        late = np.flatnonzero(cdf[blocks] <= u)  # buckets crossing several small blocks
        if late.size:
            blocks[late] = np.searchsorted(cdf, u[late], side="right")
        lo = self.edges[blocks]
        within = (u - lo) / (self.edges[blocks + 1] - lo)  # uniform in [0, 1), independent of B
        size = self.size[blocks]
        offset = np.minimum((within * size).astype(np.int64), size - 1)
        return blocks, self.start[blocks] + offset

    # ------------------------------------------------------------------ one round
    def draw_round(self, b: int, rng: np.random.Generator) -> np.ndarray:
        """Draw b distinct items ∝ exp(logits), then lower their logits by alpha.

        Returns their positions in grouped order (see `order`). The b items are a successive sample
        without replacement from softmax of the current logits, as Gumbel-top-b would give.
        """
        if not 0 <= b <= self.n:
            raise ValueError(f"cannot draw {b} distinct items from {self.n}")
        if b == 0:
            return np.empty(0, dtype=np.int64)
        taken: list[np.ndarray] = []  # drawn so far this round: sorted, disjoint batches
        tightened: list[np.ndarray] = []  # envelopes that left out this round's draws
        rejected: list[np.ndarray] = []  # blocks where proposals were rejected
        need, proposals = b, self.stats["proposals"]
        while need:
            new, missed = self._draw_new(need, rng, taken)
            if new.size:
                taken.append(new)
            rejected.append(missed)
            need -= len(new)
            if need and self.yield_last < _REFRESH_MID_ROUND:
                # Much of the proposal mass sits on items taken this round (or loose blocks):
                # tighten those envelopes, leaving the taken items out, before drawing again.
                rows = _distinct_sorted(np.sort(np.concatenate([missed, self.block_of(new)])))
                self._refresh(rows, np.concatenate(taken))
                self._build_guide()
                tightened.append(rows)
        drawn = np.concatenate(taken) if len(taken) > 1 else taken[0] if taken else np.empty(0, np.int64)
        self.c[drawn] += 1  # distinct positions, so a plain fancy update is exact
        # Re-admit this round's draws to envelopes tightened without them.
        if tightened:
            self._refresh(_distinct_sorted(np.sort(np.concatenate(tightened))), drawn[:0])
        # Tighten the blocks that rejected proposals when the round needed too many proposals
        # per draw. Items drawn more often than their block-mates keep their block's envelope
        # loose and no refresh fixes that, so when one barely shrinks the envelope mass, wait
        # for the rate to drop another 10% before paying for the next.
        rate = b / max(self.stats["proposals"] - proposals, 1)
        loose = rate < self.refresh_below
        if loose:
            removed = self._refresh(_distinct_sorted(np.sort(np.concatenate(rejected))), drawn[:0])
            self.refresh_below = _REFRESH_END_ROUND if removed > 0.05 else 0.9 * rate
        if tightened or loose:
            self._build_guide()
        return drawn

    def _draw_new(self, need: int, rng: np.random.Generator,
                  taken: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Up to `need` new items (sorted): the first occurrences of i.i.d. draws ∝ exp(logits)
        among items not in `taken` (sorted arrays). Also the blocks where proposals were rejected.

        Draws are generated in sorted order of their uniforms (memory is then walked in order);
        the i.i.d. sequence order is a uniformly random permutation independent of the values,
        so it is drawn only when it matters: when the batch found more than `need` new items.
        The first batch of a large round aims just short of `need` (so it rarely needs that
        order); other batches over-draw so that they usually complete the round.
        """
        slack = 3.0 * math.sqrt(need) + 8
        first = not taken and need > 4 * slack  # small rounds: just over-draw
        aim = need - slack - 0.005 * need if first else need * 1.02 + slack
        # At most ~4 proposals per wanted item: when the yield is lower, tightening the envelopes
        # between batches (draw_round) is cheaper than proposing the same taken items again.
        r = max(16, min(int(math.ceil(aim / self.yield_rate[not first])), 4 * need + 1024))
        blocks, items = self._propose(_sorted_uniforms(rng, r))
        logit = self.s[items].astype(np.float64)
        logit -= self.alpha * self.c[items]
        logit -= self.env[blocks]
        ok = rng.random(r) < np.exp(logit, out=logit)
        for part in taken:  # p restricted to items not drawn yet this round
            ok[ok] = ~_isin_sorted(items[ok], part)
        accepted = items[ok]  # i.i.d. ∝ exp(logit) over the free items, sorted
        new = _distinct_sorted(accepted)
        self.yield_last = len(new) / r
        self.yield_rate[not first] = max(self.yield_last, 1e-3)
        for key, value in (("proposals", r), ("accepted", len(accepted)), ("batches", 1)):
            self.stats[key] += value
        if len(new) > need:  # keep the `need` earliest in sequence order
            new, when = _first_occurrences(accepted, rng.permutation(len(accepted)))
            new = new[when <= np.partition(when, need - 1)[need - 1]]
        return new, _distinct_sorted(blocks[~ok])


def _sorted_uniforms(rng: np.random.Generator, r: int) -> np.ndarray:
    """r i.i.d. uniforms on [0, 1), generated in sorted order: S_i / S_(r+1) for S the partial
    sums of r + 1 standard exponentials has the law of sorted uniforms (no sort needed)."""
    s = np.cumsum(rng.standard_exponential(r + 1))
    u = s[:-1] / s[-1]
    return np.minimum(u, np.nextafter(1.0, 0.0), out=u)  # rounding could give 1.0; keep [0, 1)


def _isin_sorted(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """values in sorted_set, by binary search (sorted_set non-empty)."""
    pos = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return sorted_set[pos] == values


def _distinct_sorted(a: np.ndarray) -> np.ndarray:
    """Distinct values of a sorted array."""
    keep = np.empty(len(a), dtype=bool)
    keep[:1] = True
    np.not_equal(a[1:], a[:-1], out=keep[1:])
    return a[keep]


def _first_occurrences(seq: np.ndarray, position: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of seq and the smallest position at which each occurs."""
    n = len(seq)
    keys = np.sort(seq * n + position)  # value-major, position-minor; fits int64 (< 2**63)
    values = keys // n
    first = np.empty(n, dtype=bool)
    first[:1] = True
    np.not_equal(values[1:], values[:-1], out=first[1:])
    return values[first], keys[first] - values[first] * n


def _group_by_score(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Permutation putting high scores first, in score bands of equal width, and the number of
    items in each band (in that order).

    Bands are at most _BAND_WIDTH wide (a block's envelope then loses at most that much), with
    256 of them (a one-pass radix sort on 8-bit keys) when the score range allows, else up to
    65536 (two passes). Stable: ties keep their original order, so the result is deterministic.
    """
    index_type = np.int32 if len(scores) < 2**31 else np.int64
    top, span = float(scores.max()), float(scores.max()) - float(scores.min())
    bands = 256 if span <= 255 * _BAND_WIDTH else 65536
    scale = (bands - 1) / span if span > 0 else 0.0
    gap = np.subtract(top, scores, dtype=np.float32)
    gap *= np.float32(scale)
    np.minimum(gap, np.float32(bands - 1), out=gap)  # float rounding at the bottom edge
    key = gap.astype(np.uint8 if bands == 256 else np.uint16)
    del gap
    return np.argsort(key, kind="stable").astype(index_type), np.bincount(key, minlength=bands)


def _block_starts(band_sizes: np.ndarray, m: int) -> np.ndarray:
    """Start positions of blocks, then the total: each band is cut into blocks of m items (its
    last one shorter), so no block mixes bands."""
    band_sizes = band_sizes[band_sizes > 0]
    per_band = -(-band_sizes // m)
    band_start = np.cumsum(band_sizes) - band_sizes
    first_block = np.cumsum(per_band) - per_band
    j = np.arange(per_band.sum()) - np.repeat(first_block, per_band)  # block number in its band
    starts = np.repeat(band_start, per_band) + m * j
    return np.append(starts, band_sizes.sum()).astype(np.int64)
