"""Metadata mode: DataComp metadata (parquet + row-aligned npz, no images) -> the same layout with
score heads computed from the stored embeddings.

Each input file is handled whole by one actor of a pool (one per GPU, else up to one per spare
CPU): it reads the parquet and the embeddings its heads need, runs the heads in chunks of
batch_size rows, and writes OUT/metadata/<stem>.parquet (the input's columns, score columns added
or replaced) and OUT/metadata/<stem>.npz (hard-linked or copied, byte-identical), then the done
marker. Resumable like shard mode: finished files are skipped.

Every input file is checked before any work, from headers only (parquet schema and row count, npz
member names, dtypes and shapes), so a bad 3rd file is one line naming it, not a Ray traceback:
a uid column of 32-hex strings, the inputs the heads need, numeric and row-aligned. Rows whose
inputs hold NaN or infinity get a NaN score and are counted (notes.nonfinite_inputs per file);
sample and the filters skip NaN scores by reason.

Heads read the float16 embeddings as float32 and shard mode computes its heads from the same
float16-rounded values, so re-scoring the pipeline's own output reproduces its scores.
"""
from __future__ import annotations

import hashlib
import json
import time
import zipfile
from dataclasses import asdict, dataclass
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
    config.check(cfg)  # sizes in range, for configs built in Python too
    t_start = time.perf_counter()
    src, out = Path(cfg.input), Path(cfg.out)
    files = sorted(src.glob("*.parquet")) if src.is_dir() else []
    if not files:
        raise FileNotFoundError(f"input={cfg.input!r}: no metadata .parquet files there")
    if not cfg.heads:
        raise config.ConfigError("heads: empty, nothing to score; configure at least one head")
    if src.resolve() == out.resolve() or src.resolve() == (out / "metadata").resolve():
        raise config.ConfigError(f"out: {cfg.out} would overwrite the input; choose another folder")
    check_inputs(files, cfg.heads)
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
                errors = [e for e in table.column("error").to_pylist() if e]
                if errors:  # bad input found while reading rows: one line, as the up-front checks
                    raise formats.FormatError(errors[0])
                written += table.num_rows
                rows += sum(table.column("rows").to_pylist())
                if cfg.max_shards and written >= cfg.max_shards:
                    echo(f"score: stopping after max_shards={cfg.max_shards}; re-run to finish the rest")
                    break
    wall = time.perf_counter() - t_start
    run.update(shards_written=written, rows_written=rows, wall_s=round(wall, 3), rows_per_s=round(rows / wall, 1))
    stats = run_stats(out, stems, run)
    echo(summary_table(stats))
    nonfinite = sum(m["notes"].get(NONFINITE, 0) for m in stats["shards"].values())
    if nonfinite:
        echo(f"score: {nonfinite} rows have NaN/inf inputs and a NaN score ({NONFINITE} per file in stats.json)")
    echo(f"score: scored {written} files ({rows} rows) in {wall:.1f} s; outputs in {out}")
    return stats


NONFINITE = "nonfinite_inputs"  # rows whose head inputs hold NaN or infinity (their score is NaN)


@dataclass
class MetadataHeader:
    """What one metadata file offers, from its headers: rows and {input name: (shape, dtype)}."""

    path: Path
    rows: int
    columns: dict[str, pa.DataType]
    arrays: dict[str, tuple[tuple[int, ...], np.dtype]] | None  # None: no npz beside it

    @classmethod
    def read(cls, path: Path) -> "MetadataHeader":
        try:
            meta = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise formats.FormatError(f"{path}: not a parquet file ({e}); remove it from the input folder") from None
        columns = {f.name: f.type for f in meta.schema_arrow}
        if "uid" not in columns:
            raise formats.FormatError(f"{path}: no uid column (DataComp metadata has a 32-hex uid string per row); "
                                      f"it has {', '.join(columns) or 'no columns'}")
        formats.check_uid_column(path, pa.array([], columns["uid"]))  # its type, from the schema alone
        npz = path.with_suffix(".npz")
        return cls(path, meta.metadata.num_rows, columns, _npz_header(npz) if npz.is_file() else None)

    def available(self) -> set[str]:
        """Inputs a head may read: numeric parquet columns and the npz's arrays (checked in check())."""
        return {n for n, t in self.columns.items() if pa.types.is_floating(t) or pa.types.is_integer(t)} | \
            set(self.arrays or {})

    def check(self, needs: set[str]) -> None:
        """Every input in `needs` is here, numeric and row-aligned."""
        npz = self.path.with_suffix(".npz")
        for name in sorted(needs):
            if name in self.columns:
                t = self.columns[name]
                if not (pa.types.is_floating(t) or pa.types.is_integer(t)):
                    raise formats.FormatError(f"{self.path}: column {name} is {t}, not numeric; heads need numbers")
                continue
            if self.arrays is None:
                raise formats.FormatError(f"{npz}: missing, no npz beside {self.path.name}; heads need {sorted(needs)}")
            if name not in self.arrays:
                raise formats.FormatError(f"{npz}: no array {name}; it has {', '.join(sorted(self.arrays)) or 'none'}")
            shape, dtype = self.arrays[name]
            if dtype.kind not in "fiu":
                raise formats.FormatError(f"{npz}: {name} holds {dtype} values, not numbers; embeddings are float "
                                          "arrays (DataComp's are float16)")
            if len(shape) != 2 or shape[0] != self.rows:
                raise formats.FormatError(f"{npz}: {name} has shape {shape}; expected ({self.rows}, dim), row-aligned "
                                          f"with {self.path.name}")


def _npz_header(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{array name: (shape, dtype)} of an .npz, from each member's .npy header (no data read)."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    out = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                with zf.open(name) as f:
                    version = np.lib.format.read_magic(f)
                    if version not in readers:
                        raise ValueError(f"unsupported .npy version {version}")
                    shape, _, dtype = readers[version](f)
                out[name.removesuffix(".npy")] = (shape, dtype)
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise formats.FormatError(f"{path}: not an npz of arrays ({e}); replace it with the embeddings of "
                                  f"{path.with_suffix('.parquet').name}") from None
    return out


def check_inputs(files: list[Path], specs: dict[str, HeadSpec]) -> None:
    """Every file's headers against what the heads need, before any work (and before Ray starts)."""
    headers = [MetadataHeader.read(f) for f in files]
    needs = inputs_needed(build_heads(specs, headers[0].available()))  # checks that each head's inputs can exist
    for header in headers:
        header.check(needs)


def inputs_needed(heads: dict[str, Any]) -> set[str]:
    """The file inputs (columns, npz arrays) built heads read; a head may also read an earlier head's score."""
    return {n for h in heads.values() for n in h.needs} - set(heads)


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
        rows, errors = [], []
        for p in batch.column("path").to_pylist():
            try:
                rows.append(self.score_file(Path(p)))
                errors.append("")
            except formats.FormatError as e:  # returned: Ray would hand the driver only its traceback text
                rows.append(0)
                errors.append(str(e))
        return pa.table({"path": batch.column("path"), "rows": pa.array(rows, pa.int64()),
                         "error": pa.array(errors, pa.string())})

    def score_file(self, path: Path) -> int:
        torch = self.torch
        t0 = time.perf_counter()
        table = pq.read_table(path)
        n = table.num_rows
        formats.check_uid_column(path, table.column("uid"))
        if self.heads is None:
            available = MetadataHeader.read(path).available()
            self.heads = {k: h.to(self.device) for k, h in build_heads(self.specs, available).items()}
        needs = inputs_needed(self.heads)
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
        finite = np.ones(n, bool)  # rows whose inputs are all finite
        for a in arrays.values() if n else ():  # (an empty array cannot reshape to (0, -1))
            finite &= np.isfinite(a).reshape(n, -1).all(axis=1)
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
            values = np.concatenate(parts) if parts else np.zeros(0, np.float32)
            values[~finite] = np.nan  # whatever a head made of NaN/inf inputs: counted below
            col = pa.array(values, formats.SCORE_TYPE)
            if c in table.column_names:
                table = table.set_column(table.column_names.index(c), pa.field(c, formats.SCORE_TYPE), col)
            else:
                table = table.append_column(pa.field(c, formats.SCORE_TYPE), col)
        marker = {"fingerprint": self.fingerprint, "source": str(path), "source_bytes": path.stat().st_size,
                  "rows_in": n, "rows_out": n, "skipped": {},
                  "notes": {NONFINITE: int((~finite).sum())} if not finite.all() else {},
                  "timings": {"read": round(t1 - t0, 4), "model": round(t2 - t1, 4)}}
        write_outputs(self.out, path.stem, table, None, marker, npz_source=npz_path if npz_path.is_file() else None)
        return n

