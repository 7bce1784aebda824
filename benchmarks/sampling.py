"""Soft Cap Sampling speed: the exact block sampler vs the direct procedure, side by side.

    .venv/bin/python benchmarks/sampling.py                      # 1M and 4M (with direct), 16M
    .venv/bin/python benchmarks/sampling.py --sizes 128M          # the DataComp-medium scale

Scores are standard-normal float32 logits; total = N draws (samples seen = pool size), alpha 0.15,
rounds of 100k distinct draws, as FLYT uses at DataComp medium. Each measurement runs in a fresh
subprocess, so its peak RSS (ru_maxrss) belongs to that one run. Wall and CPU time are both
reported: other jobs may share the cores, and CPU time is the steadier basis for the ratio.
Writes benchmarks/results/sampling.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "sampling.json"


def parse_size(text: str) -> int:
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}
    text = text.strip().upper()
    return int(float(text[:-1]) * scale[text[-1]]) if text[-1] in scale else int(text)


def measure(method: str, n: int, alpha: float, batch_size: int, block_size: int, seed: int) -> dict:
    """One timed run (called inside a fresh subprocess)."""
    from clipsift.filters.sampling import soft_cap_sample, soft_cap_sample_direct

    scores = np.random.default_rng(seed).standard_normal(n, dtype=np.float32)
    wall, cpu = time.perf_counter(), time.process_time()
    if method == "fast":
        counts = soft_cap_sample(scores, n, alpha=alpha, batch_size=batch_size, seed=seed, block_size=block_size)
    else:
        counts = soft_cap_sample_direct(scores, n, alpha=alpha, batch_size=batch_size, seed=seed)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # KiB on Linux
        "unique_fraction": float(np.count_nonzero(counts) / n),
        "max_count": int(counts.max()),
        "draws": int(counts.sum(dtype=np.int64)),
    }


def run_child(method: str, n: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", method, str(n), "--alpha", str(args.alpha),
           "--batch-size", str(args.batch_size), "--block-size", str(args.block_size), "--seed", str(args.seed)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict]) -> dict:
    out = {k: runs[0][k] for k in ("unique_fraction", "max_count", "draws")}
    for key in ("wall_s", "cpu_s"):
        out[key] = statistics.median(r[key] for r in runs)
        out[key + "_runs"] = [round(r[key], 3) for r in runs]
    out["peak_rss_gib"] = max(r["peak_rss_gib"] for r in runs)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1M,4M,16M", help="pool sizes, e.g. 1M,4M,16M,128M")
    p.add_argument("--direct-max", default="4M", help="largest size to also run the direct procedure at")
    p.add_argument("--repeats", type=int, default=3, help="runs of the fast sampler per size up to 16M (median)")
    p.add_argument("--direct-repeats", type=int, default=3,
                   help="runs of the direct procedure per size up to 2M (1 above: it is slow)")
    p.add_argument("--alpha", type=float, default=0.15)
    p.add_argument("--batch-size", type=int, default=100_000)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--child", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), args.alpha, args.batch_size,
                                 args.block_size, args.seed)))
        return

    sizes = [parse_size(s) for s in args.sizes.split(",")]
    direct_max = parse_size(args.direct_max)
    load_start = os.getloadavg()
    rows = []
    for n in sizes:
        repeats = args.repeats if n <= 16 * 10**6 else 1
        load = os.getloadavg()[0]
        row = {"n": n, "fast": summarise([run_child("fast", n, args) for _ in range(repeats)])}
        if n <= direct_max:
            repeats = args.direct_repeats if n <= 2 * 10**6 else 1
            row["direct"] = summarise([run_child("direct", n, args) for _ in range(repeats)])
            for key in ("wall_s", "cpu_s"):
                row[f"speedup_{key[:-2]}"] = row["direct"][key] / row["fast"][key]
        row["loadavg_1min"] = [load, os.getloadavg()[0]]  # other jobs on the cores: start, end
        rows.append(row)
        print_row(row, flush=True)
    result = {
        "what": "Soft Cap Sampling, total = N draws, standard-normal float32 scores",
        "settings": {"alpha": args.alpha, "batch_size": args.batch_size, "block_size": args.block_size,
                     "seed": args.seed},
        "machine": {"cpus": os.cpu_count(), "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
                    "numpy": np.__version__},  # this invocation; each row has its own load
        "reference_direct_s": {"1000000": 1.1, "4000000": 10.3},  # the figures, same machine
        "results": rows,
    }
    out = Path(args.out)
    if out.exists() and out.resolve() == RESULTS.resolve():  # keep other sizes measured earlier
        earlier = json.loads(out.read_text())
        old = {r["n"]: r for r in earlier.get("results", [])}
        for r in old.values():  # rows from before per-row load was recorded
            r.setdefault("loadavg_1min", [earlier["machine"]["loadavg_start"][0],
                                          earlier["machine"]["loadavg_end"][0]])
        old.update({r["n"]: r for r in rows})
        result["results"] = [old[k] for k in sorted(old)]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"load average {load_start[0]:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; wrote {out}")


HEADER_DONE = []


def print_row(row: dict, flush: bool = False) -> None:
    if not HEADER_DONE:
        print(f"{'N':>12} | {'fast wall s':>11} {'fast cpu s':>10} {'peak GiB':>8} | {'direct wall s':>13} "
              f"{'direct cpu s':>12} | {'x wall':>6} {'x cpu':>6} | unique  max")
        HEADER_DONE.append(True)
    f, d = row["fast"], row.get("direct")
    direct = (f"{d['wall_s']:13.2f} {d['cpu_s']:12.2f} | {row['speedup_wall']:6.1f} {row['speedup_cpu']:6.1f}"
              if d else f"{'-':>13} {'-':>12} | {'-':>6} {'-':>6}")
    print(f"{row['n']:>12,} | {f['wall_s']:11.2f} {f['cpu_s']:10.2f} {f['peak_rss_gib']:8.2f} | {direct} | "
          f"{f['unique_fraction']:.3f} {f['max_count']:4d}", flush=flush)


if __name__ == "__main__":
    main()
