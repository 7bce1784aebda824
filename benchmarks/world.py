"""World generation throughput (pairs/s) per preset. Writes benchmarks/results/world.json.

    python benchmarks/world.py [--presets ci tiny] [--repeats 3] [--workers N]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from clipsift import config
from clipsift.world.config import WorldConfig
from clipsift.world.generate import generate_world


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--presets", nargs="+", default=["ci", "tiny"])
    p.add_argument("--repeats", type=int, default=3, help="runs per preset (tiny and larger run once)")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "world.json"))
    args = p.parse_args()
    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()}, "presets": {}}
    for preset in args.presets:
        runs = []
        for _ in range(args.repeats if preset == "ci" else 1):
            with tempfile.TemporaryDirectory() as tmp:
                cfg = config.load(WorldConfig, config.preset_path("world", preset),
                                  [f"out={tmp}/w", f"workers={args.workers}"])
                t0 = time.perf_counter()
                out = generate_world(cfg, progress=False)
                seconds = time.perf_counter() - t0
                stats = json.loads((out / "stats.json").read_text())
            pairs = cfg.pool_size + cfg.curated_size + sum(sum(t.values()) for t in stats["tasks"].values())
            runs.append({"seconds": seconds, "pairs": pairs, "pairs_per_s": pairs / seconds,
                         "pool_pairs_per_s": cfg.pool_size / stats["timings_s"]["pool"]})
        med = statistics.median(r["pairs_per_s"] for r in runs)
        pool_med = statistics.median(r["pool_pairs_per_s"] for r in runs)
        results["presets"][preset] = {"runs": runs, "median_pairs_per_s": med, "median_pool_pairs_per_s": pool_med,
                                      "workers": args.workers}
        print(f"{preset:>6}: {runs[0]['pairs']:>8} pairs  median {med:8.0f} pairs/s overall, "
              f"{pool_med:8.0f} pool pairs/s  ({len(runs)} run(s), {args.workers} workers)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
