"""The pipeline's output folder: DataComp-layout metadata, done markers, run stats.

    OUT/config.yaml                 the resolved config of the latest run
    OUT/metadata/<stem>.parquet     METADATA_SCHEMA columns + one float32 column per score head
    OUT/metadata/<stem>.npz         float16 embeddings <model>_img / <model>_txt, row-aligned
    OUT/done/<stem>.json            written LAST: counts, skips with reasons, timings, fingerprint
    OUT/stats.json                  every shard's counts and timings, totals, this run's timings

A shard is done when its marker exists (the parquet and npz were renamed into place before it), so
a killed run leaves nothing that looks finished. Every file is written to a temporary name and
renamed; the parquet and npz bytes depend only on the input and the plan fingerprint.
"""
from __future__ import annotations

import io
import os
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipsift import formats
from clipsift.runlog import atomic_path, read_json, write_json

METADATA_DIR = "metadata"
STEP_ORDER = ("read", "decode", "model", "write")  # how a shard flows, for the summary table
DONE_DIR = "done"


class OutputError(RuntimeError):
    """An output folder that holds results of a different configuration."""


def metadata_path(out: Path, stem: str, suffix: str = ".parquet") -> Path:
    return Path(out) / METADATA_DIR / f"{stem}{suffix}"


def done_path(out: Path, stem: str) -> Path:
    return Path(out) / DONE_DIR / f"{stem}.json"


def output_schema(score_columns: list[str]) -> pa.Schema:
    return pa.schema(list(formats.METADATA_SCHEMA) + [pa.field(c, formats.SCORE_TYPE) for c in score_columns])


def finished(out: Path, sources: list[Path], fingerprint: str) -> set[str]:
    """Stems of `sources` whose outputs are complete. A marker from another configuration is an
    error, not a skip; an input whose size changed since (re-downloaded) or an output deleted since
    is simply recomputed."""
    done = set()
    for source in sources:
        path = done_path(out, source.stem)
        if not path.is_file():
            continue
        marker = read_json(path)
        if marker.get("fingerprint") != fingerprint:
            raise OutputError(
                f"{out} already holds {source.stem} computed with a different configuration (fingerprint "
                f"{marker.get('fingerprint')} != {fingerprint}: other models, weights, heads, batch_size or "
                f"precision). Use a new out folder, or delete {Path(out) / DONE_DIR} to recompute everything.")
        same_input = marker.get("source_bytes") == source.stat().st_size
        if same_input and all((Path(out) / METADATA_DIR / name).is_file() for name in marker.get("files", [])):
            done.add(source.stem)
    return done


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An .npz np.load reads, with fixed zip timestamps so equal arrays give equal bytes (np.savez stamps now)."""
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            for name, arr in arrays.items():
                buf = io.BytesIO()
                np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
                zf.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue())


def write_parquet(path: Path, table: pa.Table) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def link_or_copy(src: Path, dst: Path) -> None:
    """Put src's bytes at dst atomically: a hard link when possible (no space), else a copy."""
    with atomic_path(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def write_outputs(out: Path, stem: str, table: pa.Table, arrays: dict[str, np.ndarray] | None,
                  marker: dict[str, Any], npz_source: Path | None = None) -> None:
    """parquet, npz (written, or linked from npz_source), then the done marker -- in that order."""
    t0 = time.perf_counter()
    write_parquet(metadata_path(out, stem), table)
    files = [f"{stem}.parquet"]
    if arrays is not None:
        write_npz(metadata_path(out, stem, ".npz"), arrays)
    elif npz_source is not None:
        link_or_copy(npz_source, metadata_path(out, stem, ".npz"))
    if arrays is not None or npz_source is not None:
        files.append(f"{stem}.npz")
    marker["files"] = files  # what `finished` checks for
    marker.setdefault("timings", {})["write"] = round(time.perf_counter() - t0, 4)
    write_json(done_path(out, stem), marker)


def run_stats(out: Path, stems: list[str], run: dict[str, Any]) -> dict[str, Any]:
    """stats.json: per-shard counts and timings from the markers (earlier runs included), totals, this run."""
    per_shard: dict[str, Any] = {}
    totals: dict[str, Any] = {"rows_in": 0, "rows_out": 0, "skipped": {}, "download_failures": {}}
    timings: dict[str, float] = {}
    for stem in stems:
        path = done_path(out, stem)
        if not path.is_file():
            continue
        m = read_json(path)
        per_shard[stem] = {k: m[k] for k in ("source", "rows_in", "rows_out", "skipped", "notes", "timings")}
        if "download_failures" in m:
            per_shard[stem]["download_failures"] = m["download_failures"]
        totals["rows_in"] += m["rows_in"]
        totals["rows_out"] += m["rows_out"]
        for kind in ("skipped", "download_failures"):  # the second: img2dataset's, from the shard's _stats.json
            for reason, n in m.get(kind, {}).items():
                totals[kind][reason] = totals[kind].get(reason, 0) + n
        for step, s in m["timings"].items():
            timings[step] = round(timings.get(step, 0.0) + s, 4)
    totals["skipped"] = dict(sorted(totals["skipped"].items()))
    if not totals["download_failures"]:  # metadata mode, or shards without _stats.json
        del totals["download_failures"]
    stats = {"shards_done": len(per_shard), "shards_total": len(stems), "totals": totals,
             "shard_timings_s": timings, "run": run, "shards": per_shard}
    write_json(Path(out) / "stats.json", stats)
    return stats


def summary_table(stats: dict[str, Any], limit: int = 30) -> str:
    """A readable per-shard table for the end of a run (the first `limit` shards, then the total)."""
    found = {s for m in stats["shards"].values() for s in m["timings"]}
    steps = [s for s in STEP_ORDER if s in found] + sorted(found - set(STEP_ORDER))
    head = ["shard", "rows in", "rows out", *[f"{s} s" for s in steps], "skipped"]
    rows = []
    shown = list(stats["shards"].items())
    if len(shown) > limit:
        rows_more = [f"... {len(shown) - limit} more", "", "", *[""] * len(steps), "(every shard is in stats.json)"]
        shown = shown[:limit]
    else:
        rows_more = None
    for stem, m in shown:
        skipped = ", ".join(f"{r}={n}" for r, n in m["skipped"].items()) or "-"
        rows.append([stem, str(m["rows_in"]), str(m["rows_out"]),
                     *[f"{m['timings'].get(s, 0):.2f}" for s in steps], skipped])
    if rows_more:
        rows.append(rows_more)
    t = stats["totals"]
    rows.append(["TOTAL", str(t["rows_in"]), str(t["rows_out"]),
                 *[f"{stats['shard_timings_s'].get(s, 0):.2f}" for s in steps],
                 ", ".join(f"{r}={n}" for r, n in t["skipped"].items()) or "-"])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def fmt(r: list[str]) -> str:  # numbers right-aligned, names and reasons left
        return "  ".join(c.rjust(w) if 0 < i < len(r) - 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))

    lines = [fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows)]
    return "\n".join(lines)
