"""Resharding: pool shards + a subset file -> new img2dataset-layout shards holding only the subset.

Two passes, both parallel and both resumable:

1. scan (one task per input shard): read the shard with clipsift.shards.read_shard and list the
   samples whose uid is in the subset, with the number of times the subset repeats it. Results are
   saved per input shard under out/scan/, so a rerun only scans what is missing.
2. write (one task per output shard): the scanned selections, in input-shard then tar order, each
   sample written once per repeat with key f"{uid}-{j}", are cut into consecutive output shards of
   `samples_per_shard`. Each output shard reads only the input shards it draws from and is written
   with ShardWriter (tar last, atomically), so a shard on disk is complete and a rerun skips it;
   the output is identical to an uninterrupted run's because the plan depends only on the inputs.

Finally sample_ids.npy (u8,u8 uids in output order, repeats included), meta.json and stats.json.
Input shards without a _stats.json or that cannot be opened are a loud error by default, or a
skip listed in meta.json; per-sample problems are counted by read_shard's reasons.
"""
from __future__ import annotations

import hashlib
import multiprocessing as mp
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from clipsift import formats
from clipsift import config
from clipsift.runlog import Counts, Timer, atomic_path, read_json, write_json
from clipsift.shards import UNREADABLE_SHARD, Sample, ShardWriter, Skip, read_shard, read_stats

NOT_IN_SUBSET = "not_in_subset"
DUPLICATE_UID = "duplicate_uid_in_pool"  # a uid already taken from an earlier sample of the pool
MISSING_STATS = "missing_stats_file"


class ReshardError(RuntimeError):
    """An input problem the configuration says to stop on."""


@dataclass
class ReshardConfig:
    shards: str = ""  # folder of input {:08d}.tar shards (+ _stats.json)
    subset: str = ""  # DataComp subset .npy
    out: str = ""  # output folder
    samples_per_shard: int = 10_000
    workers: int = 2  # processes; the output does not depend on it
    on_missing_stats: Literal["error", "skip"] = "error"
    on_unreadable_shard: Literal["error", "skip"] = "error"


# ---------------------------------------------------------------- subset lookup
def repeats_in_subset(subset: np.ndarray, uids: list[str]) -> np.ndarray:
    """How many times each uid occurs in the sorted subset (0 if absent), by binary search."""
    if not uids:
        return np.zeros(0, dtype=np.int64)
    q = formats.uids_to_u8u8(uids)
    f0, f1 = np.asarray(subset["f0"]), np.asarray(subset["f1"])
    lo, hi = np.searchsorted(f0, q["f0"], "left"), np.searchsorted(f0, q["f0"], "right")
    out = np.zeros(len(uids), dtype=np.int64)
    for i in np.flatnonzero(hi > lo):  # rows sharing the upper 64 bits: search the lower 64 bits
        seg = f1[lo[i]:hi[i]]
        out[i] = np.searchsorted(seg, q["f1"][i], "right") - np.searchsorted(seg, q["f1"][i], "left")
    return out


# ---------------------------------------------------------------- pass 1: scan
def scan_shard(path: str, subset_path: str) -> dict[str, Any]:
    """Selected samples of one input shard: [(key, uid, repeats)] plus per-reason skip counts."""
    subset = formats.read_subset(subset_path)
    counts = Counts()
    candidates: list[tuple[str, str]] = []
    unreadable = ""
    for rec in read_shard(path):
        if isinstance(rec, Skip):
            counts.drop(rec.reason)
            if rec.reason == UNREADABLE_SHARD:
                unreadable = rec.detail or "cannot open"
            continue
        candidates.append((rec.key, rec.uid))
    reps = repeats_in_subset(subset, [u for _, u in candidates])
    selected = [(k, u, int(r)) for (k, u), r in zip(candidates, reps) if r > 0]
    counts.keep(len(selected))
    counts.drop(NOT_IN_SUBSET, len(candidates) - len(selected))
    return {"shard": Path(path).name, "selected": selected, "counts": counts.as_dict(), "unreadable": unreadable}


def _scan_job(args: tuple[str, str, str]) -> dict[str, Any]:
    path, subset_path, cache = args
    result = scan_shard(path, subset_path)
    write_json(cache, result)
    return result


# ---------------------------------------------------------------- pass 2: write
def _image_ext(image: bytes) -> str:
    if image[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if image[:4] == b"RIFF" and image[8:12] == b"WEBP":
        return "webp"
    return "jpg"


def write_output_shard(out_dir: str, index: int, items: list[tuple[str, str, str, int]]) -> int:
    """Write output shard `index` from items [(input shard path, key, uid, repeat j)], in that order."""
    wanted: dict[str, set[str]] = {}
    for path, key, _, _ in items:
        wanted.setdefault(path, set()).add(key)
    samples: dict[tuple[str, str], Sample] = {}
    for path, keys in wanted.items():
        for rec in read_shard(path):
            if isinstance(rec, Sample) and rec.key in keys:
                samples[(path, rec.key)] = rec
    with ShardWriter(out_dir, index) as writer:
        for path, key, uid, j in items:
            s = samples.get((path, key))
            if s is None:
                raise ReshardError(f"{path}: sample {key} (uid {uid}) was readable when scanned but not now")
            writer.add(f"{uid}-{j}", s.image, s.text, {**s.meta, "source_key": key}, ext=_image_ext(s.image))
    return len(items)


def _write_job(args: tuple[str, int, list]) -> int:
    return write_output_shard(*args)


# ---------------------------------------------------------------- driver
def _map(fn, jobs: list, workers: int):
    if workers <= 1 or len(jobs) <= 1:
        yield from map(fn, jobs)
        return
    with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
        yield from pool.imap(fn, jobs)  # imap keeps job order: the output never depends on timing


def _fingerprint(cfg: ReshardConfig, inputs: list[Path]) -> dict[str, Any]:
    digest = hashlib.sha256(Path(cfg.subset).read_bytes()).hexdigest()
    return {"subset_sha256": digest, "inputs": [p.name for p in inputs], "samples_per_shard": cfg.samples_per_shard,
            "shards": str(Path(cfg.shards).resolve())}


def reshard(cfg: ReshardConfig, log=print) -> dict[str, Any]:
    if not cfg.shards or not cfg.subset or not cfg.out:
        raise ReshardError("set shards=<input shard folder> subset=<subset.npy> out=<output folder>")
    if cfg.samples_per_shard < 1:
        raise ReshardError("samples_per_shard must be >= 1")
    timer = Timer()
    out = Path(cfg.out)
    subset = formats.read_subset(cfg.subset)  # validate before any work
    inputs = formats.list_shards(cfg.shards)
    if not inputs:
        raise ReshardError(f"no {{:08d}}.tar shards in {cfg.shards}")
    state = _fingerprint(cfg, inputs)
    if (out / "state.json").is_file() and read_json(out / "state.json") != state:
        raise ReshardError(f"{out} holds a reshard of other inputs or another subset; use another out folder")
    write_json(out / "state.json", state)
    config.dump(cfg, out / "config.yaml")

    skipped_shards: dict[str, str] = {}
    usable = []
    for p in inputs:
        if read_stats(p.parent, formats.shard_index(p)) is None:
            if cfg.on_missing_stats == "error":
                raise ReshardError(f"{p}: no {formats.stats_name(formats.shard_index(p))} beside it (DataComp's "
                                   f"resharder would silently skip this shard); set on_missing_stats=skip to skip it")
            skipped_shards[p.name] = MISSING_STATS
            log(f"warning: skipping {p} (no stats file)")
        else:
            usable.append(p)

    # Pass 1: scan input shards (cached per shard).
    scan_dir = out / "scan"
    scans: list[dict[str, Any]] = []
    with timer("scan"):
        todo = [(str(p), str(cfg.subset), str(scan_dir / f"{p.stem}.json")) for p in usable
                if not (scan_dir / f"{p.stem}.json").is_file()]
        fresh = {Path(j[0]).name: r for j, r in zip(todo, _map(_scan_job, todo, cfg.workers))}
        for p in usable:
            scans.append(fresh.get(p.name) or read_json(scan_dir / f"{p.stem}.json"))

    counts = Counts()
    plan: list[tuple[str, str, str, int]] = []  # (input path, key, uid, repeat)
    seen_uids: set[str] = set()
    for p, scan in zip(usable, scans):
        if scan["unreadable"]:
            if cfg.on_unreadable_shard == "error":
                raise ReshardError(f"{p}: unreadable shard ({scan['unreadable']}); set on_unreadable_shard=skip "
                                   f"to skip it")
            skipped_shards[p.name] = UNREADABLE_SHARD
            log(f"warning: skipping unreadable shard {p}")
        for reason, n in scan["counts"]["dropped"].items():
            counts.drop(reason, n)
        for key, uid, reps in scan["selected"]:
            if uid in seen_uids:
                counts.drop(DUPLICATE_UID)
                continue
            seen_uids.add(uid)
            counts.keep()
            plan.extend((str(p), key, uid, j) for j in range(reps))

    # Pass 2: cut the plan into output shards; write those not on disk yet.
    n_out = (len(plan) + cfg.samples_per_shard - 1) // cfg.samples_per_shard
    jobs = []
    for o in range(n_out):
        if not (out / formats.shard_name(o)).is_file():
            jobs.append((str(out), o, plan[o * cfg.samples_per_shard:(o + 1) * cfg.samples_per_shard]))
    with timer("write"):
        for _ in _map(_write_job, jobs, cfg.workers):
            pass

    written = formats.uids_to_u8u8(uid for _, _, uid, _ in plan)
    with atomic_path(out / "sample_ids.npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, written)
    sub_uids = np.unique(subset)
    found = np.unique(written) if len(written) else written
    not_found = np.setdiff1d(sub_uids, found)
    if len(not_found):
        with atomic_path(out / "uids_not_found.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, not_found)
        log(f"warning: {len(not_found)} of {len(sub_uids)} subset uids were not found in the pool "
            f"(listed in {out / 'uids_not_found.npy'})")
    meta = {
        "format": "img2dataset webdataset ({:08d}.tar + _stats.json + .parquet); keys f'{uid}-{j}'",
        "input_shards": len(inputs), "skipped_input_shards": skipped_shards,
        "output_shard_count": n_out, "samples_per_shard": cfg.samples_per_shard,
        "written_samples": len(plan), "unique_uids_written": len(seen_uids),
        "subset_rows": int(len(subset)), "subset_unique_uids": int(len(sub_uids)),
        "subset_uids_not_found": int(len(not_found)),
    }
    write_json(out / "meta.json", meta)
    stats = {"counts": counts.as_dict(), "meta": meta, "seconds": timer.as_dict(), "config": asdict(cfg),
             "output_shards_written_this_run": len(jobs), "input_shards_scanned_this_run": len(todo)}
    write_json(out / "stats.json", stats)
    log(f"wrote {len(plan)} samples ({len(seen_uids)} uids) into {n_out} shards in {out}")
    return stats
