"""Exact Soft Cap Sampling rounds whose cost grows with the batch, not with the pool.

One SCS round draws b DISTINCT items with probabilities p = softmax(l) (successive sampling
without replacement), then lowers the logit of every drawn item by alpha. Done directly a round
costs O(N) (softmax + weighted choice over the whole pool): at N = 128M and 1280 rounds, too slow.
`BlockPool` draws from exactly the same distribution with O(b) work per round plus occasional
O(touched blocks) upkeep.

Why it is exact, in three steps:
1. Successive sampling = "draw i.i.d. with replacement from p, keep first occurrences". The next
   new item of an i.i.d. sequence from p is p restricted to the items not yet seen, which is the
   definition of successive sampling (numpy's choice(replace=False, p=p) and Gumbel-top-b give the
   same law). Any prefix of the first-occurrence sequence is exact, so we may draw more i.i.d.
   samples than needed and keep the first `need` new items; when a batch of draws runs short we
   continue with p restricted to the unseen items (the same sequence with seen items skipped).
2. i.i.d. draws from p by rejection: propose block B with probability ∝ m * exp(env_B), an item j
   uniformly inside it, and accept with probability exp(l_j - env_B). When env_B >= l_j for every
   item of the block, an accepted draw is exactly p-distributed (standard rejection sampling);
   items already drawn this round get acceptance 0, which gives p restricted to unseen items.
3. The envelope stays valid for free: logits only go down (each draw subtracts alpha), so
   env_B = the block's max logit at any earlier time is still >= every current logit. We only
   tighten it (recompute the max of the blocks where proposals were rejected) when the
   acceptance rate drops, and sampling stays exact whatever the envelope is.

Items are grouped by score before being cut into blocks of m (an 8-bit radix sort into 256 score
bands of equal width), so the items of a block have nearly equal scores, its envelope is tight
and acceptance stays high. Blocks are picked with a guide table over their CDF (O(1) per draw on
average) rather than a binary search.

Numerics: scores are stored as float32 (DataComp score columns are float32); logits are computed
in float64 as score - alpha * count, so they never drift with repeated subtraction. An item is
drawn at most once per round, so counts fit in uint16 unless there are >= 2**16 rounds.
"""
from __future__ import annotations

import math

import numpy as np

_CHUNK_ROWS = 1 << 16  # rows per chunk for whole-pool passes: keeps temporaries small
_REFRESH_MID_ROUND = 0.5  # tighten envelopes before another batch if acceptance fell below this
_REFRESH_END_ROUND = 0.75  # ... and after a round whose last batch accepted less than this
_GUIDE_PER_BLOCK = 4  # guide buckets per block: most draws then need one comparison


class BlockPool:
    """Logits s_i - alpha * c_i of N items, in score-grouped blocks of `block_size` items.

    Positions used inside are positions in grouped order; `counts()` returns counts in the
    caller's original order.
    """

    def __init__(self, scores: np.ndarray, alpha: float, block_size: int = 64, max_rounds: int = 1):
        m = int(block_size)
        if m < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        scores = np.asarray(scores, dtype=np.float32)
        n = len(scores)
        self.n, self.m, self.alpha = n, m, float(alpha)
        self.nblocks = max(1, -(-n // m))
        self.order = _group_by_score(scores)
        s = np.full(self.nblocks * m, -np.inf, dtype=np.float32)  # padding: weight 0, never drawn
        np.take(scores, self.order, out=s[:n])
        self.s = s.reshape(self.nblocks, m)
        self.c = np.zeros((self.nblocks, m), dtype=np.uint16 if max_rounds < 2**16 else np.uint32)
        self.env = np.empty(self.nblocks, dtype=np.float64)
        for lo in range(0, self.nblocks, _CHUNK_ROWS):
            self.env[lo : lo + _CHUNK_ROWS] = self.s[lo : lo + _CHUNK_ROWS].max(axis=1)
        self._build_guide()
        self.accept_rate = 1.0  # accepted / proposed in the last batch: decides envelope upkeep
        self.yield_rate = [1.0, 1.0]  # new items / proposal, in first and in later batches
        self.stats = {"proposals": 0, "accepted": 0, "batches": 0, "refreshed_blocks": 0}

    # ------------------------------------------------------------------ state
    def counts(self) -> np.ndarray:
        """Draw counts per item, in the caller's original order."""
        out = np.empty(self.n, dtype=self.c.dtype)
        out[self.order] = self.c.reshape(-1)[: self.n]
        return out

    def _logits(self, rows: np.ndarray, taken: np.ndarray) -> np.ndarray:
        """(len(rows), m) float64 current logits of sorted block ids `rows`; -inf for `taken`
        (any order)."""
        logits = self.s[rows].astype(np.float64)
        logits -= self.alpha * self.c[rows]
        if taken.size:
            blocks = taken // self.m
            hit = _isin_sorted(blocks, rows)
            logits[np.searchsorted(rows, blocks[hit]), taken[hit] % self.m] = -np.inf
        return logits

    def _refresh(self, rows: np.ndarray, taken: np.ndarray) -> None:
        """Tighten the envelope of these blocks to the current max logit of their free items."""
        for lo in range(0, len(rows), _CHUNK_ROWS):
            part = rows[lo : lo + _CHUNK_ROWS]
            self.env[part] = self._logits(part, taken).max(axis=1)
        self.stats["refreshed_blocks"] += len(rows)

    def _build_guide(self) -> None:
        """Block CDF ∝ exp(env_B), and a guide table of K equal buckets of [0, 1):
        guide[k] = a block index <= the first block whose CDF exceeds any u in bucket k."""
        edges = np.empty(self.nblocks + 1)  # edges[B], edges[B + 1]: block B's CDF interval
        edges[0] = 0.0
        cdf = edges[1:]
        np.exp(self.env - self.env.max(), out=cdf)
        np.cumsum(cdf, out=cdf)
        cdf /= cdf[-1]  # last entry exactly 1.0: every u in [0, 1) has an answer
        k = _GUIDE_PER_BLOCK * len(cdf)
        # The factor rounds borderline blocks up a bucket, so a guide never starts past the answer.
        bucket = np.minimum((cdf * (k * (1 + 1e-12))).astype(np.int64), k)
        per_bucket = np.bincount(bucket, minlength=k + 1)
        self.edges, self.cdf, self.guide = edges, cdf, np.cumsum(per_bucket) - per_bucket

    def _propose(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Inverse CDF of the proposal: block B with probability ∝ exp(env_B), then an item
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
        offset = np.minimum((within * self.m).astype(np.int64), self.m - 1)
        return blocks, blocks * self.m + offset

    # ------------------------------------------------------------------ one round
    def draw_round(self, b: int, rng: np.random.Generator) -> np.ndarray:
        """Draw b distinct items ∝ exp(logits), then lower their logits by alpha.

        Returns their positions in grouped order (see `order`). The b items are a successive sample
        without replacement from softmax of the current logits, as Gumbel-top-b would give.
        """
        if not 0 <= b <= self.n:
            raise ValueError(f"cannot draw {b} distinct items from {self.n}")
        taken: list[np.ndarray] = []  # drawn so far this round: sorted, disjoint batches
        tightened: list[np.ndarray] = []  # envelopes that left out this round's draws
        need, rejected = b, np.empty(0, dtype=np.int64)
        while need:
            new, rejected = self._draw_new(need, rng, taken)
            if new.size:
                taken.append(new)
            need -= len(new)
            if need and self.accept_rate < _REFRESH_MID_ROUND:
                self._refresh(rejected, np.concatenate(taken) if taken else rejected[:0])
                self._build_guide()
                tightened.append(rejected)
        drawn = np.concatenate(taken) if len(taken) > 1 else taken[0] if taken else rejected
        self.c.reshape(-1)[drawn] += 1  # distinct positions, so a plain fancy update is exact
        # Re-admit this round's draws to tightened envelopes; tighten where the last batch
        # rejected many proposals.
        redo = tightened + ([rejected] if self.accept_rate < _REFRESH_END_ROUND else [])
        if redo:
            self._refresh(np.unique(np.concatenate(redo)), drawn[:0])
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
        r = max(16, min(int(math.ceil(aim / self.yield_rate[not first])), 16 * need + 4096))
        blocks, items = self._propose(_sorted_uniforms(rng, r))
        logit = self.s.reshape(-1)[items].astype(np.float64)
        logit -= self.alpha * self.c.reshape(-1)[items]
        logit -= self.env[blocks]
        ok = rng.random(r) < np.exp(logit, out=logit)
        for part in taken:  # p restricted to items not drawn yet this round
            ok[ok] = ~_isin_sorted(items[ok], part)
        accepted = items[ok]  # i.i.d. ∝ exp(logit) over the free items, sorted
        new = _distinct_sorted(accepted)
        self.accept_rate = max(len(accepted) / r, 1e-3)
        self.yield_rate[not first] = max(len(new) / r, 1e-3)
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


def _group_by_score(scores: np.ndarray) -> np.ndarray:
    """Permutation putting high scores first, in 256 groups of equal score width.

    Groups span (max - min) / 256 of score (the lowest group also takes every score more than
    32 below the max: their weight is < e^-32 of the top one), so block envelopes are tight. A
    stable one-pass radix sort on 8-bit keys: O(N), ties keep their original order.
    """
    index_type = np.int32 if len(scores) < 2**31 else np.int64
    if len(scores) == 0:
        return np.empty(0, dtype=index_type)
    top = float(scores.max())
    width = max(min(top - float(scores.min()), 32.0), 1e-30) / 256
    key = np.subtract(top, scores, dtype=np.float32)
    key *= np.float32(1 / width)
    np.minimum(key, np.float32(255), out=key)
    return np.argsort(key.astype(np.uint8), kind="stable").astype(index_type)
