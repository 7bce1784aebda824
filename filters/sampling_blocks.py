"""Exact Soft Cap Sampling rounds whose cost grows with the batch, not with the pool.

One SCS round draws b DISTINCT items with probabilities p = softmax(l) (successive sampling
without replacement), then lowers the logit of every drawn item by alpha. Done directly a round
costs O(N) (softmax + weighted choice over the whole pool): at N = 128M and 1280 rounds, too slow.
`BlockPool` draws from exactly the same distribution with O(b) work per round, plus upkeep
(re-tightening block envelopes, O(N / m) to rebuild the proposal table) only in rounds that need it.

Why it is exact, in three steps:
1. Successive sampling = "draw i.i.d. with replacement from p, keep first occurrences". The next
   new item of an i.i.d. sequence from p is p restricted to the items not yet seen, which is the
   definition of successive sampling (numpy's choice(replace=False, p=p) and Gumbel-top-b give the
   same law). Any prefix of the first-occurrence sequence is exact, so we may draw more i.i.d.
   samples than needed and keep the first `need` new items; when a batch of draws runs short we
   continue with p restricted to the unseen items (the same sequence with seen items skipped).
   Items drawn this round have their logit set to -inf until the round ends, so they are never
   accepted again within it.
2. i.i.d. draws from p by rejection. Block B gets a whole number of "quanta" n_B >= its envelope
   mass size_B * exp(env_B) / Delta (a quantum is Delta of proposal mass, Delta ~ 1/16 of the
   mean block mass, so the rounding up wastes a few percent of proposals). A proposal is a
   uniform u on [0, K) (K quanta in all): its quantum floor(u) names the block through a table,
   where u falls inside the block's quanta picks the item uniformly, and the item is accepted
   with probability exp(l_j - T_B), T_B = log(n_B * Delta / size_B) >= env_B. The chance of
   proposing and accepting j is then (n_B / (K size_B)) * exp(l_j) * size_B / (n_B Delta), which
   is proportional to exp(l_j): exactly p (standard rejection sampling), with one table read per
   proposal instead of a search over the block CDF.
3. The envelope stays valid for free: logits only go down (each draw subtracts alpha), so
   env_B = the block's max logit at any earlier time is still >= every current logit. It is
   tightened (set to the block's current max) only where and when too many proposals fail:
   mid-round over the items not yet drawn this round (re-admitted at the round's end), after a
   round over all items. Any valid envelope gives the same law; tightness only buys speed.
   A batch's uniforms are generated already sorted, so memory is walked in order and the
   proposed items come out sorted; the i.i.d. sequence order needed to keep "the first `need`"
   is a uniform random permutation, independent of the values, drawn only in a batch that found
   more new items than needed.

Items are grouped by score before being cut into blocks of at most m items (a radix sort into
score bands of equal width, 0.05 or 1/65535 of the score range at most; no block spans two
bands), so the items of a block have nearly equal scores, its envelope is tight and acceptance
stays high.

Numerics: scores are stored as float32 (DataComp score columns are float32); the current logits
are float64, recomputed as score - alpha * count for the drawn items after every round, so they
never drift with repeated subtraction. Floating-point rounding enters only at the 1e-15 level
(e.g. the item map inside a block is shrunk by 2**-50 so rounding can never leave the block). An
item is drawn at most once per round, so counts fit in uint16 unless there are >= 2**16 rounds.
"""
from __future__ import annotations

import math

import numpy as np

_CHUNK_ROWS = 1 << 12  # blocks per chunk for envelope refreshes: temporaries stay in cache
_CHUNK_ITEMS = 1 << 16  # items per chunk for the grouping pass
_REFRESH_MID_ROUND = 0.5  # tighten envelopes before another batch if its yield fell below this
_REFRESH_END_ROUND = 0.75  # ... and after a round that drew fewer items per proposal than this
_QUANTA_PER_BLOCK = 16  # proposal table entries per block on average: rounding wastes <~ 1/16
_BAND_WIDTH = 0.05  # widest score band (in logits) that the coarse, faster grouping may use
_INSIDE = 1.0 - 2.0**-50  # shrinks the item map so float rounding cannot reach the next block


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
        # int64 order: numpy gathers and scatters over the whole pool fastest with it
        self.order, self.s, band_sizes = _group_by_score(scores)
        self.start = _block_starts(band_sizes, m)  # block B is positions start[B]:start[B + 1]
        self.size = np.diff(self.start)
        self.nblocks = len(self.size)
        # an item is drawn at most once per round; the smallest type keeps more items in cache
        self.c = np.zeros(n, dtype=np.uint8 if max_rounds < 2**8 else np.uint16 if max_rounds < 2**16 else np.uint32)
        self.env = np.maximum.reduceat(self.s, self.start[:-1]).astype(np.float64)
        self._build_table()
        self.yield_rate = [1.0, 1.0]  # new items / proposal, in first and in later batches
        self.yield_last = 1.0  # ... in the last batch: decides whether to tighten envelopes
        self.refresh_below = _REFRESH_END_ROUND  # draws per proposal that trigger tightening
        self.stats = {"proposals": 0, "accepted": 0, "batches": 0, "refreshed_blocks": 0}

    # ------------------------------------------------------------------ state
    def counts(self) -> np.ndarray:
        """Draw counts per item, in the caller's original order (uint16, or uint32 past 2**16 rounds)."""
        out = np.empty(self.n, dtype=np.promote_types(self.c.dtype, np.uint16))
        out[self.order] = self.c
        return out

    def _logits(self, items: np.ndarray) -> np.ndarray:
        """Current logits s - alpha * c of `items` (float64, computed afresh: no drift)."""
        logits = np.multiply(self.c.take(items), -self.alpha, dtype=np.float64)
        logits += self.s.take(items)
        return logits

    def _refresh(self, rows: np.ndarray, taken: np.ndarray) -> float:
        """Tighten the envelope of the sorted block ids `rows` to the current max logit of their
        items not in `taken` (sorted). Returns the proposal mass this removed, as a fraction of
        the total at the last table build."""
        old = self.env[rows]
        taken_blocks = np.searchsorted(self.start, taken, side="right") - 1
        for lo in range(0, len(rows), _CHUNK_ROWS):
            part = rows[lo : lo + _CHUNK_ROWS]
            size, start = self.size[part], self.start[part]
            first = np.cumsum(size) - size  # where each block's items begin in `idx`
            idx = np.repeat(start - first, size)
            idx += np.arange(len(idx))
            logits = self._logits(idx)
            if taken.size:
                hit = _isin_sorted(taken_blocks, part)
                row = np.searchsorted(part, taken_blocks[hit])
                logits[first[row] + taken[hit] - start[row]] = -np.inf
            self.env[part] = np.maximum.reduceat(logits, first)
        self.stats["refreshed_blocks"] += len(rows)
        # elementwise, not `@`: a BLAS dot may wake a thread pool, which costs more than it saves
        change = np.exp(old - self.log_mass) - np.exp(self.env[rows] - self.log_mass)
        return float((change * self.size[rows]).sum())

    def _build_table(self) -> None:
        """Whole quanta per block covering its envelope mass, the quantum -> block table, and
        per block: its first quantum, item scale and acceptance threshold T (see step 2)."""
        top = self.env.max()
        mass = np.exp(self.env - top)
        mass *= self.size  # a block's envelope mass (relative to exp(top))
        total = float(mass.sum())
        self.log_mass = top + math.log(total)
        quantum = total / (_QUANTA_PER_BLOCK * self.nblocks)
        mass /= quantum
        # floor + 1 >= mass / quantum even after rounding; an empty block (all -inf) gets none
        quanta = np.where(mass > 0, np.floor(mass) + 1, 0.0)
        self.first_quantum = np.cumsum(quanta) - quanta
        self.nquanta = float(self.first_quantum[-1] + quanta[-1])
        nonzero = quanta > 0
        # u may round up to exactly nquanta: one spare entry naming the last block with quanta
        last = np.flatnonzero(nonzero)[-1]
        block_id = np.int32 if self.nblocks < 2**31 else np.int64  # halves table reads
        self.table = np.append(np.repeat(np.arange(self.nblocks, dtype=block_id), quanta.astype(np.int64)),
                               np.array(last, dtype=block_id))
        with np.errstate(divide="ignore"):
            self.threshold = top + np.log(quanta * (quantum / self.size))
            self.scale = np.where(nonzero, self.size / np.maximum(quanta, 1.0), 0.0) * _INSIDE

    def _propose(self, r: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """r i.i.d. proposals: block B with probability n_B / K, then an item uniform in B.
        Returns (blocks, items), both sorted (the uniforms are generated in sorted order).

        Where u falls inside the block's quanta is uniform and independent of B, and picks the
        item, so a single uniform serves both levels.
        """
        u = _sorted_uniforms(rng, r, self.nquanta)
        blocks = self.table.take(u.astype(np.int64))
        within = u - self.first_quantum.take(blocks)  # exact: both in [0, 2**53), u >= first quantum
        within *= self.scale.take(blocks)  # < size_B, thanks to _INSIDE
        items = within.astype(np.int64)
        items += self.start.take(blocks)
        return blocks, items

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
        batches: list[tuple[np.ndarray, np.ndarray]] = []  # (blocks, accepted) of each batch
        need, proposals = b, self.stats["proposals"]
        while need:
            new, blocks, ok = self._draw_new(need, rng, taken)
            taken.append(new)
            batches.append((blocks, ok))
            need -= len(new)
            if need and self.yield_last < _REFRESH_MID_ROUND:
                # Much of the proposal mass sits on items taken this round (or loose blocks):
                # tighten the envelopes this batch proposed from before drawing again.
                rows = _distinct_sorted(blocks)
                self._refresh(rows, np.sort(np.concatenate(taken)))
                self._build_table()
                tightened.append(rows)
        drawn = np.concatenate(taken) if len(taken) > 1 else taken[0]
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
            rejected = np.concatenate([blocks.compress(~ok) for blocks, ok in batches])
            removed = self._refresh(_distinct_sorted(np.sort(rejected)), drawn[:0])
            self.refresh_below = _REFRESH_END_ROUND if removed > 0.05 else 0.9 * rate
        if tightened or loose:
            self._build_table()
        return drawn

    def _draw_new(self, need: int, rng: np.random.Generator,
                  taken: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Up to `need` new items (sorted): the first occurrences of i.i.d. draws ∝ exp(logits)
        among items not in `taken` (sorted arrays). Also the proposals' blocks and whether each
        proposal was accepted.

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
        blocks, items = self._propose(r, rng)
        logit = self._logits(items)
        logit -= self.threshold.take(blocks)
        ok = rng.random(r) < np.exp(logit, out=logit)
        if taken:  # p restricted to items not drawn yet this round
            hits = np.flatnonzero(ok)
            for part in taken:
                hits = hits.compress(~_isin_sorted(items.take(hits), part))
            ok[:] = False
            ok[hits] = True
        accepted = items.compress(ok)  # i.i.d. ∝ exp(logit) over the free items, sorted
        new = _distinct_sorted(accepted)
        self.yield_last = len(new) / r
        self.yield_rate[not first] = max(self.yield_last, 1e-3)
        for key, value in (("proposals", r), ("accepted", len(accepted)), ("batches", 1)):
            self.stats[key] += value
        if len(new) > need:  # keep the `need` earliest in sequence order
            new, when = _first_occurrences(accepted, rng.permutation(len(accepted)))
            new = new[when <= np.partition(when, need - 1)[need - 1]]
        return new, blocks, ok


def _sorted_uniforms(rng: np.random.Generator, r: int, high: float) -> np.ndarray:
    """r i.i.d. uniforms on [0, high], generated in sorted order: S_i / S_(r+1) for S the partial
    sums of r + 1 standard exponentials has the law of sorted uniforms on [0, 1] (no sort
    needed). (high itself has probability 0 but can come out of rounding.)"""
    s = rng.random(r + 1)
    np.subtract(1.0, s, out=s)  # in (0, 1]
    np.log(s, out=s)  # minus standard exponentials (cheaper than numpy's own): the signs cancel
    np.cumsum(s, out=s)
    u = s[:-1]
    u *= high / s[-1]
    return u


def _isin_sorted(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """values in sorted_set, by binary search (sorted_set non-empty)."""
    pos = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return sorted_set[pos] == values


def _distinct_sorted(a: np.ndarray) -> np.ndarray:
    """Distinct values of a sorted array."""
    keep = np.empty(len(a), dtype=bool)
    keep[:1] = True
    np.not_equal(a[1:], a[:-1], out=keep[1:])
    return a.compress(keep)


def _first_occurrences(seq: np.ndarray, position: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of seq and the smallest position at which each occurs."""
    n = len(seq)
    keys = np.sort(seq * n + position)  # value-major, position-minor; fits int64 (< 2**63)
    values = keys // n
    first = np.empty(n, dtype=bool)
    first[:1] = True
    np.not_equal(values[1:], values[:-1], out=first[1:])
    return values[first], keys[first] - values[first] * n


def _group_by_score(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Permutation putting high scores first, in score bands of equal width; the scores in that
    order; and the number of items in each band (in that order).

    Bands are at most _BAND_WIDTH wide (a block's envelope then loses at most that much), with
    256 of them (a one-pass radix sort on 8-bit keys) when the score range allows, else up to
    65536 (two passes). Stable: ties keep their original order, so the result is deterministic.
    """
    top, span = float(scores.max()), float(scores.max()) - float(scores.min())
    bands = 256 if span <= 255 * _BAND_WIDTH else 65536
    scale = np.float32((bands - 1) / span if span > 0 else 0.0)
    key = np.empty(len(scores), dtype=np.uint8 if bands == 256 else np.uint16)
    band_sizes = np.zeros(bands, dtype=np.int64)
    # In chunks: the float temporaries stay small and warm in cache (fresh pool-sized
    # temporaries cost page faults), and counting a chunk's keys widens only the chunk.
    gap = np.empty(min(len(scores), _CHUNK_ITEMS), dtype=np.float32)
    for lo in range(0, len(scores), _CHUNK_ITEMS):
        part = scores[lo : lo + _CHUNK_ITEMS]
        g = gap[: len(part)]
        np.subtract(top, part, out=g, dtype=np.float32)
        g *= scale
        np.minimum(g, np.float32(bands - 1), out=g)  # float rounding at the bottom edge
        band = key[lo : lo + _CHUNK_ITEMS]
        band[...] = g  # truncation: the band number, 0 for the top band
        band_sizes += np.bincount(band, minlength=bands)
    order = np.argsort(key, kind="stable")
    del key
    return order, scores.take(order), band_sizes


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
