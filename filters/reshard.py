"""Resharding: pool shards + a subset file -> new img2dataset-layout shards holding only the subset.

Two passes, both parallel and both resumable:

1. scan (one task per input shard): read the shard with clipsift.shards.read_shard, list the
   samples whose uid is in the subset with the number of times the subset repeats it, and check
   each selected image (decode_check: header and end marker by default, or a decode) so unusable
   ones are dropped and counted by reason, not written. Results are saved per input shard under out/scan/, so a rerun only scans what is missing.
2. write (one task per output shard): the scanned selections, in input-shard then tar order, each
   sample written once per repeat, are cut into consecutive output shards of `samples_per_shard`.
   Each output shard reads only the input shards it draws from and is written with ShardWriter
   (tar last, atomically), then a marker out/done/{:08d}.json records the run's fingerprint and a
   digest of the shard's plan; a rerun skips exactly the shards whose marker matches (a stray .tar
   is never taken for finished work), so its output is identical to an uninterrupted run's.

Like DataComp's resharder: a uid found in several input samples is written for every copy (counted
as duplicate_uid_copies); keys are f"{uid}-{j}" with j running over all written copies of the uid
(DataComp repeats j per copy, which gives equal keys); sample_ids.npy is a byte copy of the subset
file (sorted u8,u8, as DataComp writes it). written_ids.npy lists the uid of every written sample in
output order. Input shards without a _stats.json or that cannot be opened are a loud error by
default, or a skip listed in meta.json; per-sample problems are counted by read_shard's reasons.
"""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from clipsift import formats
from clipsift import config
from clipsift.runlog import Counts, Timer, atomic_path, read_json, write_json
from clipsift.shards import (CORRUPT_IMAGE, SIZES_FILE, UNREADABLE_SHARD, Sample, ShardWriter, Skip, describe_error,
                             read_shard, read_stats)

NOT_IN_SUBSET = "not_in_subset"
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
    # Check every selected image before writing it; failures are dropped and counted by reason.
    # "quick": header parsed and end-of-image marker present (catches cut-off files, ~30 us a sample);
    # "draft": JPEGs decoded at 1/8 scale (~1.5 ms a 512x384 JPEG here); "full": a full decode
    # (~1.9 ms); "off": written unchecked, as DataComp's resharder does.
    decode_check: Literal["quick", "draft", "full", "off"] = "quick"


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
# What a complete image ends with; a cut-off file (the usual failure) lacks it.
_END_MARKERS = {"JPEG": (b"\xff\xd9", "JPEG end-of-image marker"), "PNG": (b"IEND\xaeB`\x82", "PNG IEND chunk")}


def _end_problem(fmt: str | None, image: bytes) -> str:
    if fmt in _END_MARKERS:
        marker, what = _END_MARKERS[fmt]
        if marker not in image[-(len(marker) + 32):]:  # a few bytes of trailing padding are fine
            return f"truncated: no {what} at the end"
    if fmt == "WEBP" and int.from_bytes(image[4:8], "little") + 8 > len(image):
        return "truncated: shorter than its RIFF size"
    return ""


def decode_problem(image: bytes, mode: str) -> str:
    """Why the image is not usable ("" if it is), by the decode_check mode: "quick" parses the header
    and checks the end-of-image marker (microseconds), "draft" decodes JPEGs at 1/8 scale, "full"
    decodes fully."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(image)) as img:
            if mode == "quick":
                return _end_problem(img.format, image)
            if mode == "draft":
                img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))  # JPEG only
            img.load()
        return ""
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        return describe_error(e)


def _problem_kind(detail: str) -> str:
    # "OSError: image file is truncated (3 bytes not processed)" -> "OSError: image file is truncated (N bytes ...)"
    return re.sub(r"\d+", "N", detail)[:120]


def scan_shard(path: str, subset_path: str, decode_check: str = "quick") -> dict[str, Any]:
    """Selected samples of one input shard: [(key, uid, repeats)] plus per-reason skip counts."""
    subset = formats.read_subset(subset_path)
    counts = Counts()
    selected, corrupt, unreadable, absent = [], {}, "", 0
    for rec in read_shard(path):
        if isinstance(rec, Skip):
            counts.drop(rec.reason)
            if rec.reason == UNREADABLE_SHARD:
                unreadable = rec.detail or "cannot open"
            continue
        reps = int(repeats_in_subset(subset, [rec.uid])[0])
        if reps == 0:
            absent += 1
            continue
        problem = decode_problem(rec.image, decode_check) if decode_check != "off" else ""
        if problem:  # dropped and counted, by kind of problem
            counts.drop(CORRUPT_IMAGE)
            kind = _problem_kind(problem)
            corrupt[kind] = corrupt.get(kind, 0) + 1
            continue
        selected.append((rec.key, rec.uid, reps))
    counts.keep(len(selected))
    counts.drop(NOT_IN_SUBSET, absent)
    return {"shard": Path(path).name, "selected": selected, "counts": counts.as_dict(), "unreadable": unreadable,
            "corrupt_images": corrupt}


def _scan_job(args: tuple[str, str, str, str]) -> dict[str, Any]:
    path, subset_path, cache, decode_check = args
    result = scan_shard(path, subset_path, decode_check)
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


def _plan_digest(items: list) -> str:
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def _marker(out: Path, index: int) -> Path:
    return out / "done" / f"{index:08d}.json"


def _is_done(out: Path, index: int, run: str, items: list) -> bool:
    """Shard `index` was finished by this run: its marker matches the run and plan, its tar is there."""
    marker, tar = _marker(out, index), out / formats.shard_name(index)
    if not marker.is_file() or not tar.is_file():
        return False
    m = read_json(marker)
    return (m.get("run"), m.get("plan_sha256"), m.get("tar_bytes")) == (run, _plan_digest(items), tar.stat().st_size)


def _write_job(args: tuple[str, int, list, str]) -> int:
    out, index, items, run = args
    n = write_output_shard(out, index, items)
    tar = Path(out) / formats.shard_name(index)
    write_json(_marker(Path(out), index), {"run": run, "plan_sha256": _plan_digest(items), "samples": n,
                                           "tar_bytes": tar.stat().st_size})
    return n


# ---------------------------------------------------------------- driver
def _map(fn, jobs: list, workers: int):
    if workers <= 1 or len(jobs) <= 1:
        yield from map(fn, jobs)
        return
    with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
        yield from pool.imap(fn, jobs)  # imap keeps job order: the output never depends on timing


def _fingerprint(cfg: ReshardConfig, inputs: list[Path]) -> dict[str, Any]:
    digest = hashlib.sha256(Path(cfg.subset).read_bytes()).hexdigest()
    return {"subset_sha256": digest, "inputs": [[p.name, p.stat().st_size] for p in inputs],
            "samples_per_shard": cfg.samples_per_shard, "decode_check": cfg.decode_check,
            "shards": str(Path(cfg.shards).resolve())}


def _check_folders(cfg: ReshardConfig) -> None:
    shards, out = Path(cfg.shards).resolve(), Path(cfg.out).resolve()
    if out == shards or out.is_relative_to(shards) or shards.is_relative_to(out):
        raise config.ConfigError(f"out={cfg.out} overlaps the input shard folder shards={cfg.shards}; "
                                 f"write the new shards to a folder outside it")


def reshard(cfg: ReshardConfig, log=print) -> dict[str, Any]:
    if not cfg.shards or not cfg.subset or not cfg.out:
        raise config.ConfigError("set shards=<input shard folder> subset=<subset.npy> out=<output folder>")
    if cfg.samples_per_shard < 1:
        raise config.ConfigError(f"samples_per_shard: must be >= 1, got {cfg.samples_per_shard}")
    _check_folders(cfg)
    timer = Timer()
    out = Path(cfg.out)
    subset = formats.read_subset(cfg.subset)  # validate before any work
    inputs = formats.list_shards(cfg.shards)
    if not inputs:
        raise ReshardError(f"{cfg.shards}: no {{:08d}}.tar shards in this folder")
    state = _fingerprint(cfg, inputs)
    run = hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()
    if (out / "state.json").is_file():
        if read_json(out / "state.json") != state:
            raise ReshardError(f"{out}: holds a reshard of other inputs, another subset or other settings; "
                               f"use another out folder")
    elif out.is_dir() and any(out.glob("*.tar")):
        raise ReshardError(f"{out}: already holds .tar files that no clipsift reshard wrote here; "
                           f"use an empty out folder")
    write_json(out / "state.json", state)
    config.dump(cfg, out / "config.yaml")

    skipped_shards: dict[str, str] = {}
    usable = []
    for p in inputs:
        if read_stats(p) is None:
            if cfg.on_missing_stats == "error":
                raise ReshardError(f"{p}: no {formats.stats_path(p).name} beside it (DataComp's "
                                   f"resharder would silently skip this shard); set on_missing_stats=skip to skip it")
            skipped_shards[p.name] = MISSING_STATS
            log(f"warning: skipping {p} (no stats file)")
        else:
            usable.append(p)

    # Pass 1: scan input shards (cached per shard).
    scan_dir = out / "scan"
    scans: list[dict[str, Any]] = []
    with timer("scan"):
        todo = [(str(p), str(cfg.subset), str(scan_dir / f"{p.stem}.json"), cfg.decode_check) for p in usable
                if not (scan_dir / f"{p.stem}.json").is_file()]
        fresh = {Path(j[0]).name: r for j, r in zip(todo, _map(_scan_job, todo, cfg.workers))}
        for p in usable:
            scans.append(fresh.get(p.name) or read_json(scan_dir / f"{p.stem}.json"))

    counts = Counts()
    corrupt: dict[str, int] = {}
    plan: list[tuple[str, str, str, int]] = []  # (input path, key, uid, j)
    written_per_uid: dict[str, int] = {}
    duplicate_copies = 0
    for p, scan in zip(usable, scans):
        if scan["unreadable"]:
            if cfg.on_unreadable_shard == "error":
                raise ReshardError(f"{p}: unreadable shard ({scan['unreadable']}); set on_unreadable_shard=skip "
                                   f"to skip it")
            skipped_shards[p.name] = UNREADABLE_SHARD
            log(f"warning: skipping unreadable shard {p}")
        for reason, n in scan["counts"]["dropped"].items():
            counts.drop(reason, n)
        for kind, n in scan.get("corrupt_images", {}).items():
            corrupt[kind] = corrupt.get(kind, 0) + n
        for key, uid, reps in scan["selected"]:
            first = written_per_uid.get(uid, 0)
            duplicate_copies += first > 0  # every copy is written, as DataComp does
            written_per_uid[uid] = first + reps
            counts.keep()
            plan.extend((str(p), key, uid, first + j) for j in range(reps))

    # Pass 2: cut the plan into output shards; write those this run has not finished yet.
    n_out = (len(plan) + cfg.samples_per_shard - 1) // cfg.samples_per_shard
    jobs = []
    for o in range(n_out):
        items = [list(t) for t in plan[o * cfg.samples_per_shard:(o + 1) * cfg.samples_per_shard]]
        if not _is_done(out, o, run, items):
            jobs.append((str(out), o, items, run))
    with timer("write"):
        for _ in _map(_write_job, jobs, cfg.workers):
            pass

    # sample_ids.npy is the subset file itself, as DataComp's resharder writes it (sorted u8,u8).
    with atomic_path(out / "sample_ids.npy") as tmp:
        shutil.copyfile(cfg.subset, tmp)
    written = formats.uids_to_u8u8(uid for _, _, uid, _ in plan)
    with atomic_path(out / "written_ids.npy") as tmp:  # one entry per written sample, output order
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
    if duplicate_copies:
        log(f"note: {duplicate_copies} input samples repeat a uid of an earlier sample; every copy was written "
            f"(as DataComp's resharder does)")
    meta = {
        "format": "img2dataset webdataset ({:08d}.tar + _stats.json + .parquet); keys f'{uid}-{j}'",
        "input_shards": len(inputs), "skipped_input_shards": skipped_shards,
        "output_shard_count": n_out, "samples_per_shard": cfg.samples_per_shard,
        "written_samples": len(plan), "unique_uids_written": len(written_per_uid),
        "duplicate_uid_copies": duplicate_copies, "decode_check": cfg.decode_check,
        "corrupt_images": int(counts.dropped.get(CORRUPT_IMAGE, 0)),
        "subset_rows": int(len(subset)), "subset_unique_uids": int(len(sub_uids)),
        "subset_uids_not_found": int(len(not_found)),
    }
    write_json(out / "meta.json", meta)
    # sizes.json: open_clip_train's loader reads a folder's sample count from it (every written
    # sample has a caption and an image, so it is each shard's share of the plan).
    write_json(out / SIZES_FILE, {formats.shard_name(o): min(cfg.samples_per_shard, len(plan) - o * cfg.samples_per_shard)
                                  for o in range(n_out)})
    stats = {"counts": counts.as_dict(), "corrupt_images": corrupt, "meta": meta, "seconds": timer.as_dict(),
             "config": asdict(cfg), "output_shards_written_this_run": len(jobs),
             "input_shards_scanned_this_run": len(todo)}
    write_json(out / "stats.json", stats)
    log(f"wrote {len(plan)} samples ({len(written_per_uid)} uids) into {n_out} shards in {out}")
    return stats
