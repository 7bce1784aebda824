"""Filter throughput: DataComp's metadata baselines against a plain pandas implementation of the same rules.

    .venv/bin/python benchmarks/filters.py [--rows 1000000] [--cases basic,...] [--repeats 3] [--kmeans] [--reshard]

Metadata mode (always): a synthetic pool of --rows rows in memory (captions drawn from a small
English vocabulary with ImageNet-class words, 10% from a German/French/Spanish one, 1-12 words;
sizes 50-2000 px; CLIP scores ~ N(0.28, 0.05)) through no_filter, basic, clip_score (L/14 top 30%),
laion2b and text_based, each as clipsift runs it (filters/ over the pool, then the sorted u8,u8
subset, written to a new file each run) and as a straightforward pandas implementation of DataComp's rules would (a pandas
DataFrame; per-row `apply` of fastText / cld3 / the WordNet lookup and of len(text.split()),
hex uids parsed per kept row, np.sort of the pool for the fraction threshold, then uids.sort()).
Both produce the subset array; the run checks they are equal. Model and WordNet loading is timed
once, separately (start-up), and is not in either throughput. One process, one thread of work each.
For basic it also times fastText alone on the rows the cheap rules keep (`fasttext_only_s`): the
reference's time over it (`ceiling_speedup`) bounds any implementation that runs fastText's predict on
each of them; `fasttext_distinct_captions` says how much identifying each distinct caption once could save.
--cases runs some baselines; the others keep their previous figures (each entry notes its repeats and
the load average when it ran).

--kmeans adds image_based_world and SemDeDup (minutes on 2 cores; k-means sized for a CPU: 1024
centroids on 64 points each, 10 iterations). --reshard adds the reshard figures (the world's pool
shards, a subset of every readable uid with half repeated). Sections not run keep their previous
values in the JSON. Writes benchmarks/results/filters.json.
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
import pandas as pd

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from clipsift import config, formats  # noqa: E402
from clipsift.filters.base import Context, FilterSpec, build, run_filters  # noqa: E402
from clipsift.filters.lang import Languages, identifier  # noqa: E402
from clipsift.filters.pool import ArrayPool  # noqa: E402
from clipsift.filters.wordnet import POS_ORDER, default_in21k_file, load_wordnet, read_in21k_ids  # noqa: E402
from clipsift.runlog import read_json, write_json  # noqa: E402

WORDS = ("a photo of the red blue green small large circle square star on white table in garden with dog cat "
         "car house tree man woman child two three old new beach sunset mountain shoes poster vintage").split()
FOREIGN = "ein rotes Quadrat auf dem Tisch un cercle rouge sur la table el perro en la playa".split()


def synthetic_pool(n: int, seed: int = 0, embeddings: bool = False) -> ArrayPool:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 13, n)
    words = rng.integers(0, 1 << 30, int(lengths.sum()))
    foreign = rng.random(n) < 0.1
    texts = np.empty(n, dtype=object)
    pos = 0
    for i, k in enumerate(lengths):
        vocab = FOREIGN if foreign[i] else WORDS
        texts[i] = " ".join(vocab[w % len(vocab)] for w in words[pos:pos + k])
        pos += k
    raw = rng.bytes(16 * n)
    uids = np.array([raw[16 * i:16 * i + 16].hex() for i in range(n)], dtype=object)
    emb = {}
    if embeddings:
        for name, d in (("b32_img", 512), ("l14_img", 768)):
            out = np.empty((n, d), np.float16)
            for s in range(0, n, 100_000):
                out[s:s + 100_000] = rng.standard_normal((min(100_000, n - s), d), dtype=np.float32)
            emb[name] = out
    return ArrayPool(
        {"uid": uids, "text": texts, "original_width": rng.integers(50, 2000, n),
         "original_height": rng.integers(50, 2000, n),
         "clip_b32_similarity_score": rng.normal(0.28, 0.05, n).astype(np.float32),
         "clip_l14_similarity_score": rng.normal(0.25, 0.05, n).astype(np.float32)}, emb)


# ---------------------------------------------------------------- the plain pandas reference
def _u8u8(uids) -> np.ndarray:
    arr = np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in uids], np.dtype("u8,u8"))
    arr.sort()
    return arr


def _fasttext_lang(model, text: str) -> str:
    return model.predict(text.replace("\n", " "))[0][0].split("__label__")[1]


def ref_no_filter(df: pd.DataFrame, _) -> np.ndarray:
    return _u8u8(df.uid.values)


def ref_basic(df: pd.DataFrame, models) -> np.ndarray:
    lang = df.text.apply(lambda t: _fasttext_lang(models["fasttext"], t))
    n_words = df.text.apply(lambda t: len(t.split()))
    n_chars = df.text.apply(len)
    lo = np.minimum(df.original_width, df.original_height)
    hi = np.maximum(df.original_width, df.original_height)
    mask = (lang == "en") & (n_words > 2) & (n_chars > 5) & (lo >= 200) & (hi / lo <= 3.0)
    return _u8u8(df.uid[mask].values)


def ref_clip_score(df: pd.DataFrame, _) -> np.ndarray:
    key = "clip_l14_similarity_score"
    threshold = -np.sort(-df[key].values)[int(len(df) * 0.3)]
    return _u8u8(df.uid[df[key] >= threshold].values)


def ref_laion2b(df: pd.DataFrame, models) -> np.ndarray:
    cld3 = models["cld3"]
    lang = df.text.apply(lambda t: cld3.FindLanguage(text=t.replace("\n", " ")).language)
    return _u8u8(df.uid[(lang == "en") & (df.clip_b32_similarity_score >= 0.28)].values)


def ref_text_based(df: pd.DataFrame, models) -> np.ndarray:
    wn, classes = models["wordnet"], models["in21k"]

    def first_synset(word: str) -> int:  # looked up per word, as wordnet.synsets(word)[0] is
        for pos in POS_ORDER:
            forms = wn.base_forms(word.lower(), pos)
            if forms:
                return wn._first[pos][forms[0]]
        return -1

    lang = df.text.apply(lambda t: _fasttext_lang(models["fasttext"], t))
    named = df.text.apply(lambda t: any(first_synset(w) in classes for w in t.split()))
    return _u8u8(df.uid[(lang == "en") & named].values)


CASES = {  # name -> (clipsift filter spec, reference)
    "no_filter": ({"kind": "no_filter"}, ref_no_filter),
    "basic": ({"kind": "basic"}, ref_basic),
    "clip_score_l14_30": ({"kind": "clip_score", "args": {"column": "l14", "fraction": 0.3}}, ref_clip_score),
    "laion2b": ({"kind": "laion2b"}, ref_laion2b),
    "text_based": ({"kind": "text_based"}, ref_text_based),
}


def run_clipsift(spec: dict, pool: ArrayPool, ctx: Context, out: Path) -> tuple[np.ndarray, dict]:
    """What `clipsift filter` does after loading: build, run over the pool, write subset.npy."""
    tree = build(config.from_dict(FilterSpec, spec), ctx)
    result = run_filters(tree, pool)
    subset = formats.write_subset(out, result.uids)
    return subset, {"steps_s": result.timings.as_dict(), "dropped": result.counts.as_dict()["dropped"]}


def fasttext_floor(pool: ArrayPool) -> dict:
    """basic's floor in clipsift: fastText alone on the rows the cheap rules keep (what clipsift
    must identify), batched. reference_s / this is the most any implementation calling fastText's
    predict could gain over the reference."""
    text = pool.columns["text"]
    w, h = pool.columns["original_width"], pool.columns["original_height"]
    lo, hi = np.minimum(w, h), np.maximum(w, h)
    words = np.fromiter(map(len, map(str.split, text)), np.int64, count=len(text))
    chars = np.fromiter(map(len, text), np.int64, count=len(text))
    rows = text[(words > 2) & (chars > 5) & (lo >= 200) & (hi / lo <= 3.0)]
    t = time.perf_counter()
    identifier("fasttext").predict(rows)
    # distinct captions: what identifying each caption once (a cache by exact text) could save at most
    return {"fasttext_rows": int(len(rows)), "fasttext_only_s": round(time.perf_counter() - t, 3),
            "fasttext_distinct_captions": len(set(rows.tolist()))}


def bench_baselines(pool: ArrayPool, repeats: int, cases: list[str], previous: dict) -> dict:
    t0 = time.perf_counter()
    startup = {}
    t = time.perf_counter()
    from clipsift.filters import registry  # noqa: F401  (every filter module, as `clipsift filter` imports them)
    startup["imports_s"] = round(time.perf_counter() - t, 3)
    for name, load in (("fasttext", lambda: identifier("fasttext")), ("cld3", lambda: identifier("cld3")),
                       ("wordnet", lambda: load_wordnet("")),
                       ("in21k", lambda: read_in21k_ids(default_in21k_file()))):
        t = time.perf_counter()
        load()
        startup[f"{name}_s"] = round(time.perf_counter() - t, 3)
    models = {"fasttext": identifier("fasttext").model, "cld3": identifier("cld3").model,
              "wordnet": load_wordnet(""), "in21k": read_in21k_ids(default_in21k_file())}
    t = time.perf_counter()
    df = pd.DataFrame(pool.columns)
    startup["reference_dataframe_s"] = round(time.perf_counter() - t, 3)
    startup["total_s"] = round(time.perf_counter() - t0, 3)
    out: dict = {k: v for k, v in previous.items() if k in CASES}  # cases not run this time keep their figures
    out["startup"] = startup
    tmp = tempfile.TemporaryDirectory()
    for name in cases:
        spec, ref = CASES[name]
        ours_s, ref_s = [], []
        for r in range(repeats):
            load_wordnet("")._cache.clear()  # no lookups carried over from an earlier run
            ctx = Context(lang=Languages(), seed=0, log=lambda s: None)
            t = time.perf_counter()
            # a new file per run, as each `clipsift filter` run writes its own out folder (replacing
            # the last run's file made ext4 flush it first: a few ms that are no part of a run)
            ours, info = run_clipsift(spec, pool, ctx, Path(tmp.name) / f"{name}_{r}.npy")
            ours_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            expected = ref(df, models)
            ref_s.append(time.perf_counter() - t)
        if ours.tobytes() != expected.tobytes():
            raise SystemExit(f"{name}: clipsift keeps {len(ours)} rows, the reference {len(expected)}")
        o, r = statistics.median(ours_s), statistics.median(ref_s)
        out[name] = {"kept": int(len(ours)), "identical_subset": True,
                     "clipsift_s": round(o, 3), "clipsift_rows_per_s": round(pool.num_rows / o),
                     "reference_s": round(r, 3), "reference_rows_per_s": round(pool.num_rows / r),
                     "speedup": round(r / o, 2), "repeats": repeats, "load_average_1m": round(os.getloadavg()[0], 1),
                     **info}
        if name == "basic":
            floor = fasttext_floor(pool)
            out[name].update(floor, ceiling_speedup=round(r / floor["fasttext_only_s"], 2))
        print(f"{name:<18} clipsift {out[name]['clipsift_rows_per_s']:>10,} rows/s   reference "
              f"{out[name]['reference_rows_per_s']:>9,} rows/s   x{out[name]['speedup']:<6} kept {len(ours):,}",
              flush=True)
        if name == "basic":
            b = out[name]
            print(f"{'':<18} bound by fastText: its predict alone on the {b['fasttext_rows']:,} rows the cheap rules "
                  f"keep takes {b['fasttext_only_s']} s, so running it on each of them is at most x{b['ceiling_speedup']} "
                  f"the reference (which runs it on every row); 10x needs a fastText {10 / b['ceiling_speedup']:.1f}x "
                  f"faster. Only {b['fasttext_distinct_captions']:,} of those captions are distinct: identifying each "
                  f"once would save at most {1 - b['fasttext_distinct_captions'] / b['fasttext_rows']:.0%}", flush=True)
    tmp.cleanup()
    return out


def bench_kmeans(pool: ArrayPool) -> dict:
    km = {"centroids": 1024, "max_points_per_centroid": 64, "iterations": 10}
    down = Path(tempfile.mkdtemp()) / "downstream.npy"
    np.save(down, np.random.default_rng(1).standard_normal((2000, 768), dtype=np.float32).astype(np.float16))
    out: dict = {"kmeans": km}
    for name, spec in {
        "image_based_world": {"kind": "image_based_world", "args": {**km, "downstream_embeddings": str(down)}},
        "semdedup": {"kind": "semdedup", "args": {"clusters": km["centroids"], "iterations": km["iterations"],
                                                  "max_points_per_centroid": km["max_points_per_centroid"],
                                                  "epsilon": 0.05}},
    }.items():
        ctx = Context(lang=Languages(), seed=0, log=lambda s: None)
        t = time.perf_counter()
        result = run_filters(build(config.from_dict(FilterSpec, spec), ctx), pool)
        s = time.perf_counter() - t
        out[name] = {"rows": pool.num_rows, "seconds": round(s, 2), "rows_per_s": round(pool.num_rows / s),
                     "kept": result.counts.kept, "steps_s": result.timings.as_dict(), "fit": result.fits}
        print(f"{name:<18} {out[name]['rows_per_s']:>12,} rows/s", flush=True)
    return out


def bench_reshard(world: Path, repeats: int) -> dict:
    from clipsift.filters.reshard import ReshardConfig, reshard
    from clipsift.shards import Sample, read_shard

    shards = world / "pool" / "shards"
    uids = [r.uid for p in formats.list_shards(shards) for r in read_shard(p) if isinstance(r, Sample)]
    out: dict = {"world": str(world)}
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
            out[f"workers_{workers}"] = {"samples": n, "input_samples": len(uids), "decode_check": "quick",
                                         "seconds": [round(s, 2) for s in secs], "median_s": round(med, 2),
                                         "samples_per_s": round(n / med)}
            print(f"reshard workers={workers} {out[f'workers_{workers}']['samples_per_s']:>10,} samples/s", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=1, help="runs per baseline (median quoted)")
    ap.add_argument("--cases", default=",".join(CASES), help=f"baselines to run (default all: {','.join(CASES)}); "
                    "the others keep their previous figures")
    ap.add_argument("--kmeans", action="store_true", help="also image_based_world and SemDeDup (minutes)")
    ap.add_argument("--reshard", action="store_true", help="also reshard a world's pool shards")
    ap.add_argument("--world", type=Path, help="world folder for --reshard (default: a fresh ci world)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "filters.json")
    args = ap.parse_args(argv)

    results = read_json(args.out) if args.out.is_file() else {}
    results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    t0 = time.perf_counter()
    pool = synthetic_pool(args.rows, embeddings=args.kmeans)
    gen_s = time.perf_counter() - t0
    print(f"synthetic pool: {args.rows} rows in {gen_s:.1f} s", flush=True)
    cases = args.cases.split(",")
    for name in set(cases) - set(CASES):
        ap.error(f"--cases: unknown baseline {name!r}; known: {', '.join(CASES)}")
    results["baselines"] = {"rows": args.rows, "generate_s": round(gen_s, 1),
                            "load_average_1m_at_start": round(os.getloadavg()[0], 1),
                            **bench_baselines(pool, args.repeats, cases, results.get("baselines", {}))}
    if args.kmeans:
        results["metadata_kmeans"] = bench_kmeans(pool)
    del pool
    if args.reshard:
        world = args.world
        if world is None:
            from clipsift.world.config import WorldConfig
            from clipsift.world.generate import generate_world

            world = Path(tempfile.mkdtemp()) / "ci"
            generate_world(config.load(WorldConfig, config.preset_path("world", "ci"), [f"out={world}"]),
                           progress=False)
        results["reshard"] = bench_reshard(world, 3)
    write_json(args.out, results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
