"""M-FLYT against the equal-weight mean of its own standardised inputs (no learning), per scorer seed.

    .venv/bin/python benchmarks/mflyt_vs_mean.py runs/compare/tiny [--world DIR] [--subsets DIR]

Reads a finished `clipsift compare` folder: the pipeline's metadata (the CLIP scores), the NormSim,
FLYT and M-FLYT scores of each scorer seed, and the world's ground truth. For each scorer seed it
ranks the pool by the mean of z(CLIP-B32), z(CLIP-L14), z(NormSim), z(FLYT) (the score_mean filter:
z standardised over the pool, as the mixer's inputs; a missing score counts as the mean) and compares the top 30% with M-FLYT's:
Jaccard overlap, Spearman correlation of the two rankings, and the share of each planted noise kind
each keeps. With --subsets, writes each seed's equal-weight top 30% as a DataComp subset
(ens_seed{S}.npy) to train and evaluate like any other (docs/results/flyt-ablations.md).
The inputs are the demo preset's M-FLYT columns; a compare run with other columns needs them here.
"""
from __future__ import annotations

import argparse
import glob
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipsift import config
from clipsift.compare.report import noise_kept
from clipsift.filters.base import Context, FilterSpec, build, run_filters
from clipsift.filters.pool import ArrayPool
from clipsift.world.generate import load_ground_truth

INPUTS = ("clip_b32_similarity_score", "clip_l14_similarity_score", "normsim_score", "flyt_score")


def read(pattern: str, columns: list[str]) -> dict[str, np.ndarray]:
    files = sorted(glob.glob(pattern))
    if not files:
        raise SystemExit(f"no parquet file matches {pattern}: is this a finished compare folder?")
    t = pa.concat_tables([pq.read_table(f, columns=columns) for f in files])
    return {c: t[c].to_numpy(zero_copy_only=False) for c in columns}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("compare", type=Path, help="a finished clipsift compare output folder")
    p.add_argument("--world", type=Path, help="the run's world folder (default: COMPARE/world)")
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1], help="scorer seeds")
    p.add_argument("--fraction", type=float, default=0.3)
    p.add_argument("--subsets", type=Path, help="write each seed's equal-weight top fraction here")
    args = p.parse_args()
    root = args.compare
    meta = read(f"{root}/pipeline/metadata/*.parquet", ["uid", *INPUTS[:2]])
    uids = meta["uid"]
    row = {u: i for i, u in enumerate(uids)}

    def aligned(pattern: str, column: str) -> np.ndarray:
        t = read(pattern, ["uid", column])
        out = np.full(len(uids), np.nan)
        out[[row[u] for u in t["uid"]]] = t[column]
        return out

    gt = load_ground_truth(args.world or root / "world")
    gt_uids = np.array(gt.column("uid").to_pylist(), dtype=object)

    def kept(sel: np.ndarray) -> dict[str, float]:
        """The compare report's noise_kept of the rows `sel`."""
        return {str(kind): round(v, 3) for kind, v in noise_kept(gt, {"": [np.isin(gt_uids, uids[sel])]})[""].items()}

    k = int(round(args.fraction * len(uids)))

    def equal_mean(scores: dict[str, np.ndarray]) -> np.ndarray:
        """The score_mean filter's score (one implementation of the equal-weight mean)."""
        pool = ArrayPool({"uid": uids, **scores})
        tree = build(config.from_dict(FilterSpec, {"kind": "score_mean", "args": {"columns": list(scores), "fraction": 1.0}}),
                     Context(log=lambda _: None))
        return run_filters(tree, pool).scores["score_mean"].astype(np.float64)

    fixed = {**{c: meta[c] for c in INPUTS[:2]}, INPUTS[2]: aligned(f"{root}/scores/normsim/scores.parquet", INPUTS[2])}
    for seed in args.seeds:
        flyt = aligned(f"{root}/scores/flyt/seed{seed}/scores/*.parquet", "flyt_score")
        mflyt = aligned(f"{root}/scores/mflyt/seed{seed}/scores/*.parquet", "mflyt_score")
        mean = equal_mean({**fixed, INPUTS[3]: flyt})
        a, b = (np.argsort(-s, kind="stable")[:k] for s in (np.nan_to_num(mflyt, nan=-np.inf), mean))
        jaccard = len(np.intersect1d(a, b)) / len(np.union1d(a, b))
        ranks = [np.argsort(np.argsort(s, kind="stable")) for s in (np.nan_to_num(mflyt, nan=-np.inf), mean)]
        spearman = float(np.corrcoef(*ranks)[0, 1])
        print(f"scorer seed {seed}: top {k} — Jaccard(M-FLYT, equal-weight mean) {jaccard:.3f}, Spearman {spearman:.3f}")
        print(f"  kept by M-FLYT:            {kept(a)}")
        print(f"  kept by the equal mean:    {kept(b)}")
        if args.subsets:
            from clipsift.formats import write_subset

            args.subsets.mkdir(parents=True, exist_ok=True)
            write_subset(args.subsets / f"ens_seed{seed}.npy", uids[b])
            print(f"  wrote {args.subsets / f'ens_seed{seed}.npy'}")


if __name__ == "__main__":
    main()
