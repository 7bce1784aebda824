"""Filter and reshard throughput.

    .venv/bin/python benchmarks/filters.py [--rows 1000000] [--world DIR] [--repeats 3]

Metadata mode: a synthetic pool of --rows rows held in memory (random captions from a small
vocabulary with some non-English ones, random sizes and scores, float16 embeddings of 512 (B/32)
and 768 (L/14) dimensions) run through clip_score (pool fraction), basic, image_based and SemDeDup;
throughput = pool rows / wall seconds of the whole filter (its pool pass, k-means and masks).
k-means is sized for a 2-core CPU: 1024 centroids trained on 64 points per centroid (65,536 points,
subsampled with a seed and reported), 10 iterations; DataComp's image_based used 100k centroids
and 20 iterations on GPUs.

Reshard mode: the world's pool shards (a fresh `ci` world unless --world is given) resharded with
a subset of every readable uid, half of them repeated twice; samples/s = written samples / seconds.

Prints a table and writes benchmarks/results/filters.json. Quote medians over --repeats.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from clipsift import config, formats  # noqa: E402
from clipsift.filters.base import Context, FilterSpec, build, run_filters  # noqa: E402
from clipsift.filters.lang import LanguageId  # noqa: E402
from clipsift.filters.pool import ArrayPool  # noqa: E402
from clipsift.runlog import write_json  # noqa: E402

WORDS = ("a photo of the red blue green small large circle square star on white table in garden with dog cat "
         "car house tree man woman child two three old new").split()
FOREIGN = "ein rotes Quadrat auf dem Tisch un cercle rouge sur la table".split()


def synthetic_pool(n: int, seed: int = 0) -> ArrayPool:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 12, n)
    words = rng.integers(0, len(WORDS), int(lengths.sum()))
    foreign = rng.random(n) < 0.1
    texts = np.empty(n, dtype=object)
    pos = 0
    for i, k in enumerate(lengths):
        vocab = FOREIGN if foreign[i] else WORDS
        texts[i] = " ".join(vocab[w % len(vocab)] for w in words[pos:pos + k])
        pos += k
    raw = rng.bytes(16 * n)
    uids = np.array([raw[16 * i:16 * i + 16].hex() for i in range(n)], dtype=object)

    def emb(d: int) -> np.ndarray:
        out = np.empty((n, d), np.float16)
        for s in range(0, n, 100_000):
            out[s:s + 100_000] = rng.standard_normal((min(100_000, n - s), d), dtype=np.float32)
        return out

    return ArrayPool(
        {"uid": uids, "text": texts, "original_width": rng.integers(50, 2000, n),
         "original_height": rng.integers(50, 2000, n),
         "clip_b32_similarity_score": rng.normal(0.28, 0.05, n).astype(np.float32),
         "clip_l14_similarity_score": rng.normal(0.25, 0.05, n).astype(np.float32)},
        {"b32_img": emb(512), "l14_img": emb(768)})


def time_filter(spec: dict, pool: ArrayPool, ctx: Context, repeats: int) -> dict:
    secs, result = [], None
    for _ in range(repeats):
        tree = build(config.from_dict(FilterSpec, spec), ctx)
        t0 = time.perf_counter()
        result = run_filters(tree, pool)
        secs.append(time.perf_counter() - t0)
    med = statistics.median(secs)
    return {"rows": pool.num_rows, "seconds": [round(s, 2) for s in secs], "median_s": round(med, 2),
            "rows_per_s": round(pool.num_rows / med), "kept": result.counts.kept,
            "steps_s": result.timings.as_dict(), "fit": result.fits}


def bench_reshard(world: Path, repeats: int) -> dict:
    from clipsift.filters.reshard import ReshardConfig, reshard
    from clipsift.shards import Sample, read_shard

    shards = world / "pool" / "shards"
    uids = [r.uid for p in formats.list_shards(shards) for r in read_shard(p) if isinstance(r, Sample)]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        subset = Path(tmp) / "subset.npy"
        formats.write_subset(subset, uids + uids[::2])
        for workers in (1, 2):
            secs = []
            for r in range(repeats):
                t0 = time.perf_counter()
                stats = reshard(ReshardConfig(shards=str(shards), subset=str(subset), out=f"{tmp}/o{workers}_{r}",
                                              workers=workers), log=lambda s: None)
                secs.append(time.perf_counter() - t0)
            n = stats["meta"]["written_samples"]
            med = statistics.median(secs)
            out[f"workers_{workers}"] = {"samples": n, "input_samples": len(uids), "seconds": [round(s, 2) for s in secs],
                                         "median_s": round(med, 2), "samples_per_s": round(n / med)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--world", type=Path, help="world folder for the reshard figures (default: a fresh ci world)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per fast filter and per reshard setting")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "filters.json")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    pool = synthetic_pool(args.rows)
    gen_s = time.perf_counter() - t0
    print(f"synthetic pool: {args.rows} rows in {gen_s:.1f} s", flush=True)
    ctx = Context(lang=LanguageId(), seed=0, log=lambda s: None)
    km = {"centroids": 1024, "max_points_per_centroid": 64, "iterations": 10}
    down = Path(tempfile.mkdtemp()) / "downstream.npy"
    np.save(down, np.random.default_rng(1).standard_normal((2000, 768), dtype=np.float32).astype(np.float16))
    cases = {  # name -> (spec, repeats): k-means filters run once (minutes each on 2 cores)
        "clip_score_fraction": ({"kind": "clip_score", "args": {"column": "l14", "fraction": 0.3}}, args.repeats),
        "basic": ({"kind": "basic"}, 1),
        "image_based": ({"kind": "image_based", "args": {**km, "downstream_embeddings": str(down)}}, 1),
        "semdedup": ({"kind": "semdedup", "args": {"clusters": km["centroids"], "iterations": km["iterations"],
                                                   "max_points_per_centroid": km["max_points_per_centroid"],
                                                   "epsilon": 0.05}}, 1),
    }
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                     "rows": args.rows, "generate_s": round(gen_s, 1), "kmeans": km, "metadata": {}}
    for name, (spec, reps) in cases.items():
        r = time_filter(spec, pool, ctx, reps)
        results["metadata"][name] = r
        print(f"{name:<22} {r['rows_per_s']:>12,} rows/s  (median {r['median_s']} s of {r['seconds']}; kept {r['kept']:,})",
              flush=True)
    del pool

    world = args.world
    if world is None:
        from clipsift.world.config import WorldConfig
        from clipsift.world.generate import generate_world

        world = Path(tempfile.mkdtemp()) / "ci"
        generate_world(config.load(WorldConfig, config.preset_path("world", "ci"), [f"out={world}"]), progress=False)
    results["reshard"] = {"world": str(world), **bench_reshard(world, args.repeats)}
    for k, v in results["reshard"].items():
        if isinstance(v, dict):
            print(f"reshard {k:<14} {v['samples_per_s']:>12,} samples/s  ({v['samples']} samples, median {v['median_s']} s)")
    write_json(args.out, results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
