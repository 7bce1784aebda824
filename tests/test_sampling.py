"""Samplers (filters/sampling.py, filters/sampling_blocks.py) and `clipsift sample`.

Statistical tests use fixed seeds, so they are deterministic; their tolerances are set so that a
correct sampler fails with probability ~1e-4 or less, and `test_equivalence_test_has_power` shows
the same statistic does flag a real difference.
"""
from __future__ import annotations

import copy
import itertools
import json
import math
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipsift import cli
from clipsift.filters.sample_cli import SampleConfig, sample_counts
from clipsift.filters.sampling import (hard_cap_sample, repetition_histogram, soft_cap_sample,
                                       soft_cap_sample_direct, standardise, threshold_select, top_fraction,
                                       write_counts_subset)
from clipsift.filters.sampling_blocks import BlockPool
from clipsift.formats import SUBSET_DTYPE, random_uids, read_subset, u8u8_to_uids


# ---------------------------------------------------------------- statistics helpers
def chi2_pvalue(stat: float, dof: int) -> float:
    """Upper tail of chi-square(dof), Wilson-Hilferty approximation (good for dof >= 3)."""
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def two_sample_stat(a: np.ndarray, b: np.ndarray) -> tuple[float, int, float]:
    """Per-item z-scores of mean counts of two (runs, items) samples -> (chi2, dof, max |z|).

    Items whose count never varies must agree exactly; they add no degree of freedom.
    """
    va, vb = a.var(axis=0, ddof=1), b.var(axis=0, ddof=1)
    diff = a.mean(axis=0) - b.mean(axis=0)
    varies = (va + vb) > 0
    assert np.all(diff[~varies] == 0), "an item with a fixed count differs between the samplers"
    z = diff[varies] / np.sqrt(va[varies] / len(a) + vb[varies] / len(b))
    return float(np.sum(z**2)), int(varies.sum()), float(np.abs(z).max())


def pool_scores(n: int = 200, seed: int = 7) -> np.ndarray:
    """Varied scores with a tie group, a high outlier and a long low tail (float32 like DataComp)."""
    s = np.random.default_rng(seed).normal(0.0, 1.5, n)
    s[:10] = 1.25  # ties
    s[10] = 6.0  # one example far above the rest
    s[11:30] -= 8.0  # rarely drawn
    return s.astype(np.float32)


def run_many(fn, scores, runs, seed0, **kw) -> np.ndarray:
    return np.stack([fn(scores, seed=seed0 + i, **kw) for i in range(runs)]).astype(np.float64)


# ---------------------------------------------------------------- SCS: fast == direct
@pytest.mark.parametrize("alpha,batch_size,total,block_size", [
    (0.15, 20, 200, 8),  # the paper's alpha, 10 rounds
    (0.6, 37, 300, 4),  # total not a multiple of the batch; more pressure per draw
    (2.5, 50, 150, 64),  # strong cap, one block holds the whole pool
])
def test_scs_matches_direct_procedure_in_distribution(alpha, batch_size, total, block_size):
    scores = pool_scores()
    runs = 300
    fast = run_many(soft_cap_sample, scores, runs, 10_000, total=total, alpha=alpha,
                    batch_size=batch_size, block_size=block_size)
    direct = run_many(soft_cap_sample_direct, scores, runs, 90_000, total=total, alpha=alpha,
                      batch_size=batch_size)
    assert np.all(fast.sum(axis=1) == total) and np.all(direct.sum(axis=1) == total)
    # each round draws distinct examples, so no example exceeds the number of rounds
    assert fast.max() <= -(-total // batch_size)
    stat, dof, zmax = two_sample_stat(fast, direct)
    assert chi2_pvalue(stat, dof) > 1e-4, (stat, dof)
    assert zmax < 5.0


def test_equivalence_test_has_power():
    """The statistic above does detect a change of alpha 0.15 -> 0.3, and draws with replacement."""
    scores = pool_scores()
    runs = 300
    base = run_many(soft_cap_sample_direct, scores, runs, 90_000, total=200, alpha=0.15, batch_size=20)
    other_alpha = run_many(soft_cap_sample, scores, runs, 10_000, total=200, alpha=0.3, batch_size=20,
                           block_size=8)
    stat, dof, _ = two_sample_stat(base, other_alpha)
    assert chi2_pvalue(stat, dof) < 1e-6
    # i.i.d. draws inside each round (no "distinct" constraint) is a different law
    rng = np.random.default_rng(3)

    def with_replacement(seed):
        r = np.random.default_rng(seed)
        logits, counts = scores.astype(np.float64), np.zeros(len(scores))
        for _ in range(10):
            q = np.exp(logits - logits.max())
            batch = r.choice(len(scores), 20, replace=True, p=q / q.sum())
            np.add.at(counts, batch, 1)
            logits -= 0.15 * np.bincount(batch, minlength=len(scores))
        return counts

    wrong = np.stack([with_replacement(int(rng.integers(1 << 30))) for _ in range(runs)])
    stat, dof, _ = two_sample_stat(base, wrong)
    assert chi2_pvalue(stat, dof) < 1e-6


# ---------------------------------------------------------------- one round == Gumbel-top-b
def successive_sampling_law(logits: np.ndarray, b: int) -> dict[frozenset, float]:
    """Exact probability of each b-subset under successive sampling ∝ exp(logits)."""
    p = np.exp(logits - logits.max())
    p /= p.sum()
    law: dict[frozenset, float] = {}
    for seq in itertools.permutations(range(len(p)), b):
        prob, left = 1.0, 1.0
        for i in seq:
            prob *= p[i] / left
            left -= p[i]
        law[frozenset(seq)] = law.get(frozenset(seq), 0.0) + prob
    return law


def goodness_of_fit(samples: list[frozenset], law: dict[frozenset, float]) -> float:
    """Pearson chi-square p-value of observed subsets against the exact law (pooling rare cells)."""
    n = len(samples)
    observed = {k: 0 for k in law}
    for s in samples:
        observed[s] += 1
    cells = sorted(law, key=law.get, reverse=True)
    big = [k for k in cells if law[k] * n >= 5]
    rest = [k for k in cells if law[k] * n < 5]
    obs = [observed[k] for k in big] + ([sum(observed[k] for k in rest)] if rest else [])
    exp = [law[k] * n for k in big] + ([sum(law[k] for k in rest) * n] if rest else [])
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    return chi2_pvalue(stat, len(obs) - 1)


@pytest.mark.parametrize("b,block_size", [(3, 2), (5, 4)])
def test_one_round_is_exact_successive_sampling(b, block_size):
    """A block-sampler round after a few rounds (loose envelopes, varied counts) draws each
    b-subset with its exact successive-sampling probability, as plain Gumbel-top-b does."""
    scores = np.array([2.0, 1.2, 1.1, 0.0, -0.5, 1.9, -1.5], dtype=np.float32)
    pool = BlockPool(scores, alpha=0.7, block_size=block_size, max_rounds=10)
    warm = np.random.default_rng(0)
    for _ in range(3):
        pool.draw_round(2, warm)
    counts = pool.counts()
    assert counts.sum() == 6 and counts.max() <= 3
    logits = scores.astype(np.float64) - 0.7 * counts
    law = successive_sampling_law(logits, b)
    rng = np.random.default_rng(1)
    trials = 6000
    ours = []
    for _ in range(trials):
        trial = copy.deepcopy(pool)
        drawn = trial.order[trial.draw_round(b, rng)]
        assert len(set(drawn.tolist())) == b
        ours.append(frozenset(drawn.tolist()))
        assert np.array_equal(trial.counts() - counts, np.isin(np.arange(7), drawn).astype(int))
    gumbel = [frozenset(np.argsort(-(logits + rng.gumbel(size=7)))[:b].tolist()) for _ in range(trials)]
    assert goodness_of_fit(ours, law) > 1e-4
    assert goodness_of_fit(gumbel, law) > 1e-4


def test_heavy_item_does_not_stall_a_round():
    """One item e^40 times heavier than the rest: after it is drawn, the round must still find
    the others (envelopes tighten mid-round); counts stay exact."""
    scores = np.array([40.0] + [0.0] * 9, dtype=np.float32)
    counts = soft_cap_sample(scores, 30, alpha=0.15, batch_size=3, seed=0, block_size=4)
    assert counts[0] == 10 and counts.sum() == 30


# ---------------------------------------------------------------- alpha limits
def test_huge_alpha_gives_no_repeats():
    scores = pool_scores(300)
    for total in (300, 250):
        counts = soft_cap_sample(scores, total, alpha=1e6, batch_size=40, seed=3, block_size=16)
        assert counts.max() == 1 and counts.sum() == total
        direct = soft_cap_sample_direct(scores, total, alpha=1e6, batch_size=40, seed=3)
        assert direct.max() == 1 and direct.sum() == total


def test_zero_alpha_with_single_draw_rounds_is_iid():
    """alpha = 0 and one draw per round is exactly i.i.d. sampling from softmax(scores)."""
    scores = np.linspace(-1.0, 2.0, 12).astype(np.float32)
    total = 2000
    counts = soft_cap_sample(scores, total, alpha=0.0, batch_size=1, seed=5, block_size=4)
    p = np.exp(scores - scores.max()).astype(np.float64)
    p /= p.sum()
    expected = p * total
    stat = float(np.sum((counts - expected) ** 2 / expected))
    assert chi2_pvalue(stat, len(scores) - 1) > 1e-4


# ---------------------------------------------------------------- edges
def test_total_and_batch_edges():
    scores = pool_scores(50)
    c = soft_cap_sample(scores, 101, batch_size=7, seed=0, block_size=8)
    assert c.sum() == 101 and c.max() <= 15  # 15 rounds: 14 of 7 and one of 3
    with pytest.raises(ValueError, match="batch_size"):
        soft_cap_sample(scores, 200, batch_size=51, seed=0)  # a round of 51 distinct from 50
    with pytest.raises(ValueError, match="batch_size"):
        soft_cap_sample_direct(scores, 200, batch_size=51, seed=0)
    # batch larger than the pool is fine while total fits one round: every draw distinct
    c = soft_cap_sample(scores, 40, batch_size=100_000, seed=0)
    assert c.max() == 1 and c.sum() == 40
    assert soft_cap_sample(scores, 0, seed=0).sum() == 0
    assert soft_cap_sample(scores, seed=0).sum() == 50  # total=None: as many draws as examples
    with pytest.raises(ValueError, match="non-finite"):
        soft_cap_sample(np.array([0.0, np.nan]), 1, batch_size=1)
    with pytest.raises(ValueError, match="total"):
        soft_cap_sample(scores, -1)


def test_single_example_and_equal_scores():
    assert soft_cap_sample(np.array([0.3]), 5, batch_size=1, seed=0).tolist() == [5]
    with pytest.raises(ValueError):
        soft_cap_sample(np.array([0.3]), 5, batch_size=2)
    flat = np.zeros(40, dtype=np.float32)
    # rounds of the whole pool: every example exactly once per round
    assert np.all(soft_cap_sample(flat, 120, batch_size=40, seed=0, block_size=8) == 3)
    c = soft_cap_sample(flat, 400, batch_size=10, alpha=0.15, seed=0, block_size=8)
    assert c.sum() == 400 and c.min() >= 1  # the cap pushes draws to the least-drawn


def test_same_seed_same_counts():
    scores = pool_scores(1000)
    a = soft_cap_sample(scores, 3000, batch_size=100, seed=11)
    b = soft_cap_sample(scores, 3000, batch_size=100, seed=11)
    c = soft_cap_sample(scores, 3000, batch_size=100, seed=12)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_scs_counts_follow_the_soft_cap_law():
    """FLYT's description of SCS: counts grow with score above a threshold instead of top-k's flat
    repetition. In the many-small-rounds limit, dc_i/dt ∝ exp(s_i - alpha c_i) integrates to
    c_i = softplus(s_i - lambda) / alpha (linear in s above lambda), lambda fixed by the total."""
    s = np.random.default_rng(2).normal(size=20_000).astype(np.float64)
    c = np.mean([soft_cap_sample(s, 20_000, alpha=0.15, batch_size=500, seed=k) for k in range(3)], axis=0)
    lo, hi = -10.0, 10.0
    for _ in range(60):  # bisection: total softplus mass = total draws
        lam = (lo + hi) / 2
        lo, hi = (lo, lam) if np.logaddexp(0, s - lam).sum() / 0.15 < 20_000 else (lam, hi)
    law = np.logaddexp(0, s - lam) / 0.15
    for q in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0):
        near = np.abs(s - q) < 0.25
        assert abs(c[near].mean() - law[near].mean()) < 0.1 * law[near].mean() + 0.1, q
    assert c[s > 3.2].mean() > 3 * c[np.abs(s - 1.5) < 0.1].mean()


def test_logit_std_fixes_the_samplers_spread_whatever_the_scorers_scale():
    """logit_std > 0: SCS sees the scores standardised, so any positive rescaling and shift of a
    scorer's output gives the same draws, and a larger std concentrates them on fewer examples."""
    s = np.random.default_rng(3).normal(size=5_000)
    z = standardise(s, 2.0)
    assert abs(z.mean()) < 1e-9 and abs(z.std() - 2.0) < 1e-9
    assert np.array_equal(np.argsort(z), np.argsort(s))
    assert not standardise(np.full(10, 4.2), 2.0).any()  # a constant column: every example alike
    cfg = SampleConfig(method="scs", alpha=0.15, total=5_000, batch_size=50, logit_std=2.0, seed=4)
    base = sample_counts(s, cfg)
    assert np.array_equal(base, sample_counts(0.1 * s - 3.0, cfg))
    assert np.array_equal(sample_counts(z, replace(cfg, logit_std=0.0)), base)  # = SCS on the standardised logits
    sharper = sample_counts(s, replace(cfg, logit_std=3.0))
    assert base.sum() == sharper.sum() == 5_000
    assert np.count_nonzero(sharper) < 0.8 * np.count_nonzero(base) and sharper.max() > base.max()


# ---------------------------------------------------------------- other samplers
def test_hard_cap_respects_cap_and_total():
    scores = pool_scores(100)
    c = hard_cap_sample(scores, 250, cap=3, seed=0)
    assert c.sum() == 250 and c.max() == 3
    assert np.all(c[np.argsort(-scores)[:10]] == 3)  # the best examples hit the cap
    assert np.array_equal(hard_cap_sample(np.array([5.0, 0.0]), 2, cap=1), [1, 1])
    with pytest.raises(ValueError, match="cap"):
        hard_cap_sample(scores, 301, cap=3)
    assert np.array_equal(c, hard_cap_sample(scores, 250, cap=3, seed=0))


def test_hard_cap_without_binding_cap_is_multinomial():
    scores = np.linspace(-1.0, 1.5, 10)
    c = hard_cap_sample(scores, 3000, cap=3000, seed=4)
    p = np.exp(scores - scores.max())
    p /= p.sum()
    stat = float(np.sum((c - 3000 * p) ** 2 / (3000 * p)))
    assert chi2_pvalue(stat, 9) > 1e-4


def test_top_fraction_count_and_ties():
    scores = np.array([5.0, 3.0, 4.0, 3.0, 3.0, 1.0])
    # DataComp's rule: keep scores >= the score at rank int(0.5 * 6) = 3 of [5, 4, 3, 3, 3, 1]: ties kept
    assert top_fraction(scores, 0.5).tolist() == [1, 1, 1, 1, 1, 0]
    assert top_fraction(np.arange(100.0), 0.29).sum() == 29  # int(0.29 * 100) = 28 in floats: rank 28 kept
    assert top_fraction(np.arange(100.0), 0.3).sum() == 31  # rank int(30.0) = 30 kept too
    assert top_fraction(scores, 1.0).sum() == 6
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError):
            top_fraction(scores, bad)


def test_threshold_keeps_scores_at_or_above():
    scores = np.array([0.1, 0.28, 0.3, 0.279, 0.5])
    assert threshold_select(scores, 0.28).tolist() == [0, 1, 1, 0, 1]


def test_write_counts_subset_and_histogram(tmp_path):
    uids = random_uids(np.random.default_rng(0), 4)
    arr = write_counts_subset(tmp_path / "s.npy", uids, np.array([2, 0, 1, 3]))
    assert len(arr) == 6 and arr.dtype == SUBSET_DTYPE
    assert sorted(u8u8_to_uids(read_subset(tmp_path / "s.npy"))) == sorted([uids[0]] * 2 + [uids[2]] + [uids[3]] * 3)
    assert repetition_histogram(np.array([2, 0, 1, 3, 0])) == {0: 2, 1: 1, 2: 1, 3: 1}


# ---------------------------------------------------------------- the command
def write_metadata(folder, rows_per_file=(400, 250, 350), seed=0):
    """Real DataComp-style metadata parquet files with a score column and planted bad rows."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    planted = {"null_score": 0, "nan_score": 0, "infinite_score": 0, "malformed_uid": 0, "missing_uid": 0}
    for f, n in enumerate(rows_per_file):
        uids = random_uids(rng, n)
        score = rng.normal(0.3, 0.05, n).astype(np.float32)
        null = np.zeros(n, dtype=bool)
        null[1], score[2], score[3] = True, np.nan, np.inf
        uids[4] = uids[4].upper()
        uids[5] = None
        for k in planted:
            planted[k] += 1
        table = pa.table({"uid": pa.array(uids, pa.string()), "text": [f"caption {i}" for i in range(n)],
                          "clip_b32_similarity_score": pa.array(score, mask=null)})
        pq.write_table(table, folder / f"{f:08d}.parquet")
    return planted


def test_sample_command_writes_datacomp_subset(tmp_path):
    planted = write_metadata(tmp_path / "meta")
    out = tmp_path / "subsets" / "scs.npy"
    argv = ["sample", "-p", "scs", f"metadata={tmp_path / 'meta'}", f"out={out}", "batch_size=20",
            "progress=false"]
    assert cli.main(argv) == 0
    raw = np.load(out, allow_pickle=False)
    assert raw.dtype == np.dtype("u8,u8") and raw.ndim == 1
    order = np.lexsort((raw["f1"], raw["f0"]))
    assert np.array_equal(order, np.arange(len(raw)))  # sorted
    read_subset(out)  # the repo's validator agrees
    stats = json.loads((tmp_path / "subsets" / "scs.stats.json").read_text())
    pool = 1000 - sum(planted.values())
    assert stats["rows"] == {"seen": 1000, "kept": pool, "dropped": dict(sorted(planted.items()))}
    assert len(raw) == stats["total"] == pool  # total 0 -> one draw per usable row
    uids, reps = np.unique(raw, return_counts=True)
    assert reps.max() > 1 and stats["unique"] == len(uids)  # repeats are kept
    hist = {int(k): v for k, v in stats["repetition_histogram"].items()}
    assert sum(hist.values()) == pool and sum(k * v for k, v in hist.items()) == pool
    assert stats["scores"]["kept_unique"]["q0.5"] > stats["scores"]["pool"]["q0.5"]
    assert (tmp_path / "subsets" / "scs.config.yaml").read_text().count("batch_size: 20") == 1
    # every uid in the subset is a usable pool row
    good = set()
    for f in sorted((tmp_path / "meta").glob("*.parquet")):
        t = pq.read_table(f).to_pydict()
        good |= {u for u, s in zip(t["uid"], t["clip_b32_similarity_score"])
                 if u and u == u.lower() and s is not None and np.isfinite(s)}
    assert set(u8u8_to_uids(uids)) <= good

    # same seed -> identical bytes (and a glob reads the same files in the same order)
    again = tmp_path / "again.npy"
    assert cli.main(["sample", "-p", "scs", f"metadata={tmp_path / 'meta'}/*.parquet", f"out={again}",
                     "batch_size=20", "progress=false"]) == 0
    assert again.read_bytes() == out.read_bytes()
    other = tmp_path / "other.npy"
    assert cli.main(["sample", "-p", "scs", f"metadata={tmp_path / 'meta'}", f"out={other}", "batch_size=20",
                     "seed=1", "progress=false"]) == 0
    assert other.read_bytes() != out.read_bytes()


def test_sample_command_other_methods_and_errors(tmp_path, capsys):
    write_metadata(tmp_path / "meta")
    meta = f"metadata={tmp_path / 'meta'}"
    assert cli.main(["sample", "-p", "top30", meta, f"out={tmp_path / 'top.npy'}"]) == 0
    top = np.load(tmp_path / "top.npy")
    # DataComp's rule: every row scoring >= the score at rank int(0.3 N) (0-based), so int(0.3 N) + 1 rows without ties
    assert len(top) == math.floor(0.3 * 985) + 1 and len(np.unique(top)) == len(top)
    assert cli.main(["sample", "-p", "hcs", meta, f"out={tmp_path / 'hcs.npy'}", "cap=2", "total=1500"]) == 0
    _, reps = np.unique(np.load(tmp_path / "hcs.npy"), return_counts=True)
    assert reps.sum() == 1500 and reps.max() == 2
    assert cli.main(["sample", meta, "method=threshold", "threshold=0.35", f"out={tmp_path / 't.npy'}"]) == 0
    stats = json.loads((tmp_path / "t.stats.json").read_text())
    assert stats["scores"]["kept_unique"]["q0"] >= 0.35 and stats["unique"] == stats["total"]
    # clear errors, no traceback
    assert cli.main(["sample", meta, "score=flyt", f"out={tmp_path / 'x.npy'}"]) == 2
    assert "no column 'flyt'" in capsys.readouterr().err
    assert cli.main(["sample", meta, "method=hcs", f"out={tmp_path / 'x.npy'}"]) == 2
    assert "cap" in capsys.readouterr().err
    assert cli.main(["sample", f"metadata={tmp_path / 'nowhere'}", f"out={tmp_path / 'x.npy'}"]) == 2
    assert "no metadata parquet" in capsys.readouterr().err
    assert cli.main(["sample", meta, f"out={tmp_path / 'x.npy'}", "batch_size=5000", "total=2000"]) == 2
    assert "batch_size" in capsys.readouterr().err
    # a uid that appears twice in the pool is an error, not a double weight
    t = pq.read_table(tmp_path / "meta" / "00000000.parquet")
    pq.write_table(t.slice(10, 5), tmp_path / "meta" / "00000009.parquet")
    assert cli.main(["sample", meta, f"out={tmp_path / 'x.npy'}", "batch_size=10"]) == 2
    assert "repeat a uid" in capsys.readouterr().err
    assert not (tmp_path / "x.npy").exists()


def test_scs_round_size_scales_to_the_pool_as_flyt():
    from clipsift.filters.sample_cli import scs_round_size

    assert scs_round_size(128_000_000) == 100_000  # FLYT's rounds at DataComp medium
    assert scs_round_size(60_000) == 47 and scs_round_size(3_000) == 2 and scs_round_size(500) == 1
    assert scs_round_size(60_000, 20) == 20  # an explicit round size is kept


def test_sample_command_default_round_is_scaled_to_the_pool(tmp_path, capsys):
    write_metadata(tmp_path / "meta")
    out = tmp_path / "scs.npy"
    assert cli.main(["sample", f"metadata={tmp_path / 'meta'}", f"out={out}", "progress=false"]) == 0
    assert "over 10%" not in capsys.readouterr().err  # one distinct draw per round of 985 rows
    stats = json.loads((tmp_path / "scs.stats.json").read_text())
    assert stats["total"] == 985 and stats["round_size"] == 1 and stats["warnings"] == []
