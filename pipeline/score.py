"""Metadata mode: DataComp metadata (parquet + row-aligned npz, no images) -> the same layout with
score heads computed from the stored embeddings.

Each input file is handled whole by one actor of a pool (one per GPU, else up to one per spare
CPU): it reads the parquet and the embeddings its heads need, runs the heads in chunks of
batch_size rows, and writes OUT/metadata/<stem>.parquet (the input's columns, score columns added
or replaced) and OUT/metadata/<stem>.npz (hard-linked or copied, byte-identical), then the done
marker. Resumable like shard mode: finished files are skipped.

Heads read the float16 embeddings as float32 and shard mode computes its heads from the same
float16-rounded values, so re-scoring the pipeline's own output reproduces its scores.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipsift import config, formats
from clipsift.pipeline.config import ScoreConfig
from clipsift.pipeline.heads import HeadSpec, build_heads, run_heads
from clipsift.pipeline.output import finished, run_stats, summary_table, write_outputs
from clipsift.pipeline.raysession import cluster, ray_session


def run_score(cfg: ScoreConfig, echo=print) -> dict[str, Any]:
    t_start = time.perf_counter()
    src, out = Path(cfg.input), Path(cfg.out)
    files = sorted(src.glob("*.parquet")) if src.is_dir() else []
    if not files:
        raise FileNotFoundError(f"input={cfg.input!r}: no metadata .parquet files there")
    if not cfg.heads:
        raise ValueError("heads is empty: nothing to score")
    if src.resolve() == out.resolve() or src.resolve() == (out / "metadata").resolve():
        raise ValueError(f"out={cfg.out} would overwrite the input; choose another folder")
    available = inputs_of(files[0])
    build_heads(cfg.heads, available)  # checks every head's inputs before any work starts
    fingerprint = score_fingerprint(cfg.heads, cfg.batch_size)
    stems = [f.stem for f in files]
    done_before = finished(out, files, fingerprint)
    pending = [f for f in files if f.stem not in done_before]
    out.mkdir(parents=True, exist_ok=True)
    config.dump(cfg, out / "config.yaml")
    echo(f"score: {len(files)} metadata files in {src}, {len(done_before)} already done, {len(pending)} to do")

    written, rows = 0, 0
    run: dict[str, Any] = {"fingerprint": fingerprint, "shards_skipped_done": len(done_before)}
    if pending:
        import ray

        with ray_session(cfg.ray, cfg.progress):
            cpus, gpus, use_gpu = cluster(cfg.device)
            # heads are light: one actor per GPU, or per CPU but one (left to the driver, which waits)
            actors = min(len(pending), cfg.ray.model_actors or (int(gpus) if use_gpu else max(1, int(cpus) - 1)))
            run["stages"] = {"actors": actors, "use_gpu": use_gpu, "cluster_cpus": cpus, "cluster_gpus": gpus}
            ds = ray.data.from_items([{"path": str(f)} for f in pending], override_num_blocks=len(pending))
            ds = ds.map_batches(
                ScoreFiles, fn_constructor_kwargs={"heads": cfg.heads, "batch_size": cfg.batch_size,
                                                   "device": "cuda" if use_gpu else "cpu", "out": str(out),
                                                   "fingerprint": fingerprint},
                compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=1 if use_gpu else None,
                num_cpus=cfg.ray.model_cpus if use_gpu else 1, batch_size=1, batch_format="pyarrow")
            for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                written += table.num_rows
                rows += sum(table.column("rows").to_pylist())
                if cfg.max_shards and written >= cfg.max_shards:
                    echo(f"score: stopping after max_shards={cfg.max_shards}; re-run to finish the rest")
                    break
    wall = time.perf_counter() - t_start
    run.update(shards_written=written, rows_written=rows, wall_s=round(wall, 3), rows_per_s=round(rows / wall, 1))
    stats = run_stats(out, stems, run)
    echo(summary_table(stats))
    echo(f"score: scored {written} files ({rows} rows) in {wall:.1f} s; outputs in {out}")
    return stats


def inputs_of(parquet: Path) -> list[str]:
    """What heads may read from one metadata file: its npz arrays and its numeric columns."""
    names = [f.name for f in pq.ParquetFile(parquet).schema_arrow
             if pa.types.is_floating(f.type) or pa.types.is_integer(f.type)]
    npz = parquet.with_suffix(".npz")
    if npz.is_file():
        with np.load(npz, allow_pickle=False) as z:
            names += list(z.files)
    return names


def score_fingerprint(heads: dict[str, HeadSpec], batch_size: int) -> str:
    doc = {"heads": {k: asdict(v) for k, v in heads.items()}, "batch_size": batch_size}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


class ScoreFiles:
    """Ray actor: score whole metadata files and write their outputs; returns one stats row per file."""

    def __init__(self, heads: dict[str, HeadSpec], batch_size: int, device: str, out: str, fingerprint: str):
        import torch

        self.torch = torch
        self.specs, self.batch_size, self.out, self.fingerprint = heads, batch_size, Path(out), fingerprint
        self.device = torch.device(device)
        self.heads: dict | None = None

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [self.score_file(Path(p)) for p in batch.column("path").to_pylist()]
        return pa.table({"path": batch.column("path"), "rows": pa.array(rows, pa.int64())})

    def score_file(self, path: Path) -> int:
        torch = self.torch
        t0 = time.perf_counter()
        table = pq.read_table(path)
        n = table.num_rows
        if self.heads is None:
            self.heads = {k: h.to(self.device) for k, h in build_heads(self.specs, inputs_of(path)).items()}
        needs = {name for h in self.heads.values() for name in h.needs} - set(self.heads)
        npz_path = path.with_suffix(".npz")
        arrays: dict[str, np.ndarray] = {}
        from_npz = needs - set(table.column_names)
        if from_npz:
            if not npz_path.is_file():
                raise formats.FormatError(f"{npz_path}: missing; heads need {sorted(from_npz)}")
            with np.load(npz_path, allow_pickle=False) as z:
                missing = from_npz - set(z.files)
                if missing:
                    raise formats.FormatError(f"{npz_path}: no array(s) {sorted(missing)}; it has {sorted(z.files)}")
                arrays = {k: z[k] for k in from_npz}
        for k in needs - from_npz:
            arrays[k] = table.column(k).to_numpy(zero_copy_only=False)
        for k, a in arrays.items():
            if a.shape[0] != n:
                raise formats.FormatError(f"{npz_path}: {k} has {a.shape[0]} rows, {path.name} has {n}")
        scores: dict[str, list[np.ndarray]] = {c: [] for c in self.heads}
        t1 = time.perf_counter()
        with torch.no_grad():
            for start in range(0, n, self.batch_size):
                stop = start + self.batch_size
                chunk = {k: torch.from_numpy(np.asarray(a[start:stop], np.float32)).to(self.device) for k, a in arrays.items()}
                for c, v in run_heads(self.heads, chunk).items():
                    scores[c].append(v.cpu().numpy().astype(np.float32))
        t2 = time.perf_counter()
        for c, parts in scores.items():
            col = pa.array(np.concatenate(parts) if parts else np.zeros(0, np.float32), formats.SCORE_TYPE)
            if c in table.column_names:
                table = table.set_column(table.column_names.index(c), pa.field(c, formats.SCORE_TYPE), col)
            else:
                table = table.append_column(pa.field(c, formats.SCORE_TYPE), col)
        marker = {"fingerprint": self.fingerprint, "source": str(path), "source_bytes": path.stat().st_size,
                  "rows_in": n, "rows_out": n, "skipped": {}, "notes": {},
                  "timings": {"read": round(t1 - t0, 4), "model": round(t2 - t1, 4)}}
        write_outputs(self.out, path.stem, table, None, marker, npz_source=npz_path if npz_path.is_file() else None)
        return n
