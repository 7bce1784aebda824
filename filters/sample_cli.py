"""`clipsift sample`: one score column of the pool metadata -> a DataComp subset (.npy of uids).

Reads only `uid` and the score column of every metadata parquet (file-name order, then row
order), skips rows it cannot sample with a counted reason, runs one sampler (filters/sampling.py)
and writes the subset plus, beside it, <stem>.config.yaml (resolved config) and <stem>.stats.json
(row counts by reason, unique/total, repetition histogram, kept vs pool score quantiles, timings).
"""
from __future__ import annotations

import glob
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clipsift import config
from clipsift.config import Count, Fraction, Natural, NonNegative
from clipsift.formats import _UID_RE  # the one uid pattern, applied in pyarrow (no Python loop)
from clipsift.runlog import Counts, Timer, write_json

from clipsift.filters import sampling


@dataclass
class SampleConfig:
    metadata: str = ""  # a folder of DataComp metadata .parquet files, or a glob of them
    score: str = "clip_b32_similarity_score"  # the column to sample by (higher = better)
    method: Literal["scs", "hcs", "top_fraction", "threshold"] = "scs"
    alpha: NonNegative = sampling.DEFAULT_ALPHA  # scs: logit decrease per draw
    logit_std: NonNegative = 0.0  # scs/hcs: 0 = the scores as logits (the paper); > 0 = standardised to this std first
    batch_size: Natural = 0  # scs: distinct draws per round; 0 = scaled to the rows as FLYT's 100k to 128M
    total: Natural = 0  # scs/hcs: draws to make; 0 = number of sampled rows (DataComp: samples seen = pool size)
    fraction: Fraction = 0.3  # top_fraction: scores >= the one at rank int(fraction * rows), ties kept (DataComp)
    threshold: Optional[float] = None  # threshold: keep score >= threshold
    cap: Natural = 0  # hcs: at most this many draws per example (required for hcs)
    seed: int = 0
    out: str = ""  # the subset file to write (.npy)
    block_size: Count = sampling.DEFAULT_BLOCK_SIZE  # scs: items per block (speed only)
    progress: bool = True  # scs: a progress bar over rounds on stderr


# FLYT's Soft Cap Sampling at DataComp medium: rounds of 100k distinct draws from a 128M pool.
FLYT_ROUND_FRACTION = 100_000 / 128_000_000


def scs_round_size(rows: int, batch_size: int = 0) -> int:
    """A round's distinct draws: batch_size, or (0) the rows scaled as FLYT's 100k is to 128M (>= 1)."""
    return batch_size or max(1, round(rows * FLYT_ROUND_FRACTION))


CONFIG = SampleConfig
GROUP = "sample"
HELP = """Turn one score column into a DataComp subset: Soft Cap Sampling (scs, FLYT), Hard Cap
Sampling (hcs), the top fraction, or a threshold. Reads uid + the score column of every parquet
under `metadata` (a folder or a glob; file-name order). Rows with a null/NaN/infinite score or a
malformed uid are skipped and counted by reason. total=0 draws as many samples as there are rows
(DataComp: samples seen = pool size); scs batch_size=0 scales the round to the pool as FLYT's
100k draws are to its 128M rows. Writes `out` (sorted u8,u8 uids, one entry per draw) and
<stem>.config.yaml, <stem>.stats.json beside it. Deterministic given `seed`.
Example: clipsift sample -p scs metadata=runs/scores score=flyt_score out=runs/subsets/scs.npy"""


def main(cfg: SampleConfig, args=None) -> int:
    try:
        stats = run(cfg)
    except ValueError as e:  # the sampler's checks of its input: a user error, printed by clipsift.cli
        raise config.ConfigError(str(e)) from e
    print(f"{cfg.method}: {stats['total']} samples, {stats['unique']} unique of {stats['pool']} rows "
          f"-> {cfg.out}")
    return 0


def run(cfg: SampleConfig) -> dict:
    """Read, sample, write; returns the stats written beside the subset."""
    _check(cfg)
    timer = Timer()
    with timer("read"):
        files = metadata_files(cfg.metadata)
        rows, uids, scores = read_scores(files, cfg.score)
    n = len(scores)
    if n == 0:
        raise ValueError(f"{cfg.metadata}: no row has a usable {cfg.score!r} (skips: {rows.as_dict()['dropped']})")
    warnings = []
    round_size = min(scs_round_size(n, cfg.batch_size), cfg.total or n)
    if cfg.method == "scs" and round_size > n // 10:
        warnings.append(f"a round draws {round_size} distinct examples, over 10% of "
                        f"the {n} rows, so few rounds adapt the logits (FLYT: 100k of 128M); lower "
                        f"batch_size (0 scales it to the pool) for a small pool")
    for w in warnings:
        print(f"clipsift sample: warning: {w}", file=sys.stderr)
    with timer("sample"):
        counts = sample_counts(scores, cfg)
    with timer("write"):
        keep = np.flatnonzero(counts)
        sampling.write_counts_subset(cfg.out, uids.take(pa.array(keep)).to_numpy(zero_copy_only=False),
                                     counts[keep])
    out = Path(cfg.out)
    stats = {
        "method": cfg.method,
        "score": cfg.score,
        "files": len(files),
        "rows": rows.as_dict(),
        "pool": n,
        "total": int(counts.sum(dtype=np.int64)),
        "unique": int(len(keep)),
        "round_size": scs_round_size(n, cfg.batch_size) if cfg.method == "scs" else None,
        "repetition_histogram": sampling.repetition_histogram(counts),
        "scores": {
            "pool": _quantiles(scores),
            "kept_unique": _quantiles(scores[keep]),
            "mean_per_draw": float(np.average(scores[keep], weights=counts[keep])) if len(keep) else None,
        },
        "timings_s": timer.as_dict(),
        "warnings": warnings,
        "subset": out.name,
    }
    config.dump(cfg, out.with_name(out.stem + ".config.yaml"))
    write_json(out.with_name(out.stem + ".stats.json"), stats)
    return stats


def sample_counts(scores: np.ndarray, cfg: SampleConfig) -> np.ndarray:
    total = cfg.total or None  # 0 means "as many draws as rows"
    if cfg.method in ("scs", "hcs") and cfg.logit_std:
        scores = sampling.standardise(scores, cfg.logit_std)
    if cfg.method == "scs":
        return sampling.soft_cap_sample(scores, total, alpha=cfg.alpha,
                                        batch_size=scs_round_size(len(scores), cfg.batch_size),
                                        seed=cfg.seed, block_size=cfg.block_size, progress=cfg.progress)
    if cfg.method == "hcs":
        return sampling.hard_cap_sample(scores, total, cap=cfg.cap, seed=cfg.seed)
    if cfg.method == "top_fraction":
        return sampling.top_fraction(scores, cfg.fraction)
    return sampling.threshold_select(scores, cfg.threshold)


def _check(cfg: SampleConfig) -> None:
    if not cfg.metadata:
        raise config.ConfigError("metadata: set a folder or glob of metadata parquet files")
    if not cfg.out.endswith(".npy"):
        raise config.ConfigError(f"out: a subset is a .npy file, got {cfg.out!r}")
    config.check(cfg)  # sizes in range (batch_size, total, ...), for configs built in Python too
    if cfg.method == "hcs" and cfg.cap < 1:
        raise config.ConfigError("cap: hard cap sampling needs cap >= 1")
    if cfg.method == "threshold" and cfg.threshold is None:
        raise config.ConfigError("threshold: set the score threshold for method=threshold")


def metadata_files(spec: str) -> list[Path]:
    """A folder's *.parquet, or the files a glob matches; sorted by path (the row order)."""
    path = Path(spec)
    files = sorted(path.glob("*.parquet")) if path.is_dir() else sorted(Path(p) for p in glob.glob(spec))
    if not files:
        raise FileNotFoundError(f"no metadata parquet files at {spec!r}")
    return files


def read_scores(files: list[Path], column: str) -> tuple[Counts, pa.ChunkedArray, np.ndarray]:
    """uid + score of every row, minus rows that cannot be sampled (counted by reason)."""
    rows = Counts()
    uids, scores = [], []
    for path in files:
        names = pq.read_schema(path).names
        for needed in ("uid", column):
            if needed not in names:
                raise ValueError(f"{path}: no column {needed!r}; columns are {names}")
        table = pq.read_table(path, columns=["uid", column])
        uid, score = table.column("uid"), table.column(column)
        if not (pa.types.is_string(uid.type) or pa.types.is_large_string(uid.type)):
            raise ValueError(f"{path}: column 'uid' is {uid.type}, not a string of 32 hex characters")
        uid = uid.cast(pa.string())
        if not (pa.types.is_floating(score.type) or pa.types.is_integer(score.type)):
            raise ValueError(f"{path}: column {column!r} is {score.type}, not a number")
        values = score.to_numpy(zero_copy_only=False).astype(np.float64)  # nulls become NaN
        reasons = [  # first matching reason wins
            ("missing_uid", uid.is_null().to_numpy(zero_copy_only=False)),
            ("malformed_uid", ~pc.fill_null(pc.match_substring_regex(uid, _UID_RE.pattern), False)
             .to_numpy(zero_copy_only=False)),
            ("null_score", score.is_null().to_numpy(zero_copy_only=False)),
            ("nan_score", np.isnan(values)),
            ("infinite_score", np.isinf(values)),
        ]
        bad = np.zeros(len(values), dtype=bool)
        for reason, hit in reasons:
            hit = hit & ~bad
            if hit.any():
                rows.drop(reason, int(hit.sum()))
            bad |= hit
        good = np.flatnonzero(~bad)
        rows.keep(len(good))
        uids.append(uid.take(pa.array(good)))
        scores.append(values[good])
    all_uids = pa.chunked_array([c for u in uids for c in u.chunks], type=pa.string())
    distinct = pc.count_distinct(all_uids).as_py()
    if distinct != len(all_uids):
        counts = pc.value_counts(all_uids)
        dup = counts.filter(pc.greater(counts.field("counts"), 1))[0]["values"].as_py()
        raise ValueError(f"{len(all_uids) - distinct} rows repeat a uid (e.g. {dup}); a pool has one row per uid")
    return rows, all_uids, np.concatenate(scores) if scores else np.empty(0)


def _quantiles(values: np.ndarray) -> dict[str, float] | None:
    if not len(values):
        return None
    qs = (0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)
    return {f"q{q:g}": float(v) for q, v in zip(qs, np.quantile(values, qs))} | {"mean": float(values.mean())}
