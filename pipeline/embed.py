"""Shard mode: img2dataset shards in, DataComp-layout metadata + embeddings + scores out, resumable.

    shards ──read tasks (one per shard)──> chunk rows: encoded images, captions, json fields, skips
           ──decode tasks (CPU, one chunk each, parallel)──> uint8 images, int32 tokens
           ──ONE model stage (an actor per GPU, or one CPU actor)──> every model's embeddings, every head
           ──driver──> per shard: sort chunks, write parquet + npz, then the done marker

Shards already done (marker present, same plan fingerprint) are skipped, so a killed run restarted
with the same config finishes the rest and its outputs are byte-identical to an uninterrupted
run's. The driver writes, so outputs have stable names (the input shard's stem) and atomic renames.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from clipsift import config, formats, shards
from clipsift.pipeline.config import EmbedConfig
from clipsift.pipeline.decode import DecodeStage, drop_failed, read_task
from clipsift.pipeline.device_decode import decode_on_device
from clipsift.pipeline.encoders import Encoder, Plan, make_plan
from clipsift.pipeline.output import finished, output_schema, run_stats, summary_table, write_outputs
from clipsift.pipeline.raysession import StagePlan, ray_session, stage_plan
from clipsift.runlog import Counts, atomic_write_text

MISSING_FROM_TAR = "missing_from_tar"  # the stats file counts more successes than the tar holds
MISSING_STATS = "missing_stats_file"


def run_embed(cfg: EmbedConfig, echo=print) -> dict[str, Any]:
    """Embed and score every shard of cfg.input not yet done in cfg.out; return the run's stats."""
    config.check(cfg)  # sizes in range, for configs built in Python too
    t_start, epoch_start = time.perf_counter(), time.time()
    out = Path(cfg.out)
    shard_paths = formats.list_shards(cfg.input) if Path(cfg.input).is_dir() else []
    if not shard_paths:
        raise FileNotFoundError(f"input={cfg.input!r}: no {{:08d}}.tar shards there")
    source_stats = read_source_stats(shard_paths, cfg.on_missing_stats)
    plan = make_plan(cfg.models, cfg.heads, batch_size=cfg.batch_size, normalize=cfg.normalize,
                     precision=cfg.precision, seed=cfg.seed, allow_random_weights=cfg.allow_random_weights,
                     jpeg_draft=cfg.jpeg_draft, image_decode=cfg.image_decode, max_image_pixels=cfg.max_image_pixels)
    fingerprint = plan.fingerprint()
    stems = [p.stem for p in shard_paths]
    done_before = finished(out, shard_paths, fingerprint)
    pending = [p for p in shard_paths if p.stem not in done_before]
    out.mkdir(parents=True, exist_ok=True)
    config.dump(cfg, out / "config.yaml")
    echo(f"embed: {len(shard_paths)} shards in {cfg.input}, {len(done_before)} already done, {len(pending)} to do")

    written: list[str] = []
    rows = 0
    run: dict[str, Any] = {"fingerprint": fingerprint, "shards_skipped_done": len(done_before)}
    timeline: list[tuple[float, int]] = []  # (seconds since start, rows written): startup vs steady state
    chunk_timings: list[dict[str, float]] = []
    if pending:
        t0 = time.perf_counter()
        with ray_session(cfg.ray, cfg.progress):
            run["ray_init_s"] = round(time.perf_counter() - t0, 3)
            sp = stage_plan(cfg.ray, cfg.device, tokenise_only=cfg.image_decode == "device")
            run["stages"] = vars(sp)
            ds = build_dataset(pending, plan, sp)
            for shard, chunk_rows in assembled_shards(ds):
                chunk_timings.extend({k: r[k] for k in CHUNK_TIMINGS} for r in chunk_rows)
                path = pending[shard]
                rows += write_shard(out, path, chunk_rows, plan, fingerprint, source_stats[path.stem])
                written.append(path.stem)
                timeline.append((round(time.perf_counter() - t_start, 3), rows))
                if cfg.max_shards and len(written) >= cfg.max_shards:
                    echo(f"embed: stopping after max_shards={cfg.max_shards}; re-run to finish the rest")
                    break
            write_ray_stats(out, ds)
    wall = time.perf_counter() - t_start
    run.update(shards_written=len(written), rows_written=rows, wall_s=round(wall, 3), rows_per_s=round(rows / wall, 1),
               timeline=timeline, steady_rows_per_s=steady_rate(timeline))
    if chunk_timings:
        run.update(stage_profile(chunk_timings, run["stages"], epoch_start, wall))
    stats = run_stats(out, stems, run)
    echo(summary_table(stats))
    failed = stats["totals"].get("download_failures", {})
    if any(failed.values()):
        echo("embed: img2dataset could not fetch these samples (not in the shards; from their _stats.json): "
             + ", ".join(f"{k}={n}" for k, n in failed.items()))
    echo(f"embed: wrote {len(written)} shards ({rows} rows) in {run['wall_s']:.1f} s; "
         f"{stats['shards_done']}/{len(stems)} shards done; outputs in {out}")
    return stats


def steady_rate(timeline: list[tuple[float, int]]) -> float | None:
    """Rows/s from the first shard written to the last: the run without its start-up (worker
    processes, model load, first chunks in flight). None with fewer than two shards."""
    if len(timeline) < 2 or timeline[-1][0] <= timeline[0][0]:
        return None
    (t0, r0), (t1, r1) = timeline[0], timeline[-1]
    return round((r1 - r0) / (t1 - t0), 1)


CHUNK_TIMINGS = ("read_at", "decode_s", "decode_cpu_s", "decode_start", "decode_setup_s", "decoded", "model_s",
                 "model_start", "model_ready_at", "model_setup_s")


def stage_profile(chunks: list[dict[str, float]], stages: dict[str, Any], epoch_start: float,
                  wall: float) -> dict[str, Any]:
    """How the decode tasks and the model stage spent this run, from per-chunk timings.

    decode.mean_in_flight: decode tasks running at once, on average, from the first decode start to
    the last decode end (its ceiling is decode.slots); decode.cpu_ms_per_image against
    decode.wall_ms_per_image tells per-image work apart from waiting for a core. decode.setup_s is
    the one-off start-up of each decode process (imports, tokenizers), kept out of the per-image
    figures; first_chunk_read_s and decode.first_start_s are how long after the run's start the first
    chunk was read and began decoding (planning, worker start). model.setup_s is the slowest model
    actor's start-up (imports, device, loading the models), model.ready_s when the first one was
    ready and model.first_start_s when it began its first chunk, all since the run's start.
    model.busy_fraction near 1 means the model stage is the bottleneck.
    """
    images = sum(c["decoded"] for c in chunks)
    busy = sum(c["decode_s"] for c in chunks)
    spans = sorted((c["decode_start"], c["decode_start"] + c["decode_s"]) for c in chunks)
    window = max(end for _, end in spans) - spans[0][0]
    events = sorted([(t0, 1) for t0, _ in spans] + [(t1, -1) for _, t1 in spans])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    def ms_per_image(seconds: float) -> float | None:  # None with image_decode=device: nothing decoded here
        return round(1000 * seconds / images, 3) if images else None

    model_busy = sum(c["model_s"] for c in chunks)
    return {
        "first_chunk_read_s": round(min(c["read_at"] for c in chunks) - epoch_start, 3),
        "decode": {"images": images, "chunks": len(chunks), "slots": stages["decode_slots"],
                   "cpu_ms_per_image": ms_per_image(sum(c["decode_cpu_s"] for c in chunks)),
                   "wall_ms_per_image": ms_per_image(busy),
                   "setup_s": round(sum(c["decode_setup_s"] for c in chunks), 3),
                   "first_start_s": round(spans[0][0] - epoch_start, 3), "window_s": round(window, 3),
                   "mean_in_flight": round(busy / window, 2) if window > 0 else None, "peak_in_flight": peak},
        "model": {"busy_s": round(model_busy, 3),
                  "busy_fraction": round(model_busy / (wall * stages["model_actors"]), 3),
                  "setup_s": round(max(c["model_setup_s"] for c in chunks), 3),
                  "ready_s": round(min(c["model_ready_at"] for c in chunks) - epoch_start, 3),
                  "first_start_s": round(min(c["model_start"] for c in chunks) - epoch_start, 3)},
    }


def write_ray_stats(out: Path, ds) -> None:
    """Ray Data's own per-operator report (wall/CPU time, rows, backpressure) next to stats.json."""
    try:
        text = ds.stats()
    except Exception as e:  # informational only; never fail a finished run over it
        text = f"Ray Data stats unavailable: {e}"
    atomic_write_text(out / "ray_stats.txt", text + "\n")


def read_source_stats(shard_paths: list[Path], on_missing: str) -> dict[str, dict[str, Any] | None]:
    """Each shard's _stats.json (None where missing); a missing file is an error unless on_missing=process."""
    found = {path.stem: shards.read_stats(path) for path in shard_paths}  # names a malformed file itself
    missing = [path.name for path in shard_paths if found[path.stem] is None]
    if missing and on_missing == "error":
        raise formats.FormatError(
            f"{len(missing)} shard(s) have no _stats.json ({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}). "
            f"img2dataset writes it when a shard is finished, so these may be cut short and the loss would go "
            f"unnoticed. Re-download them, or set on_missing_stats=process to embed what they hold.")
    return found


def build_dataset(pending: list[Path], plan: Plan, sp: StagePlan):
    """shards -> read tasks (raw chunks) -> decode actors (one chunk at a time) -> one actor pool of every model and head."""
    import ray

    items = [{"path": str(p), "shard": i, "batch_size": plan.batch_size} for i, p in enumerate(pending)]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # A 1-byte block target: every chunk row a read task yields exceeds it, so each leaves as its own
    # block at once and decode tasks take chunks as they come, not a whole shard each (a repartition
    # step did this before, but it runs as tasks that need CPU slots of their own). This dataset's
    # context only; the session's default is untouched.
    ds.context.target_max_block_size = 1
    # The cap on read tasks matters: without it Ray Data sets CPU budget aside for the read stage
    # while any shard is unread (its reserved share plus an equal split of the rest), and decoding,
    # the real work, gets what is left: 5 of 7 free CPUs in a run on 8, 12 of 15 on 16.
    ds = ds.map_batches(read_task, batch_size=1, batch_format="pyarrow", num_cpus=sp.read_cpus,
                        compute=ray.data.TaskPoolStrategy(size=sp.read_tasks))
    # Decoders are a fixed pool of actors, one per decode slot, not tasks: Ray Data budgets a task
    # stage's CPUs among all stages and ran ~10 of 15 decode tasks at once on a 16-core GPU machine;
    # a sized actor pool holds its CPUs for the whole run, and each process imports torch/open_clip once.
    ds = ds.map_batches(DecodeStage, fn_constructor_kwargs={"plan": plan}, batch_size=1, batch_format="pyarrow",
                        num_cpus=sp.decode_cpus, memory=decode_task_memory(plan),
                        compute=ray.data.ActorPoolStrategy(size=sp.decode_slots))
    return ds.map_batches(
        EncodeStage, fn_constructor_kwargs={"plan": plan, "device": "cuda" if sp.use_gpu else "cpu",
                                            "threads": sp.model_threads},
        compute=ray.data.ActorPoolStrategy(size=sp.model_actors), num_gpus=sp.gpus_per_actor or None,
        num_cpus=sp.model_cpus, batch_size=1, batch_format="pyarrow")


def decode_task_memory(plan: Plan) -> int:
    """Bytes a decode actor reserves: the worker with torch and open_clip imported (~600 MB), plus a
    chunk's encoded images (~256 KB each at most) and its arrays, twice.

    Reserving memory also keeps decoding apart from the model actor: Ray fuses a task map into the
    following actor map when their resource requests match, and then every image would be decoded
    serially inside the model actor.
    """
    per_sample = 2**18 + sum(int(np.prod(p.shape)) for p in plan.images) + 4 * sum(t.context_length for t in plan.texts)
    return 600 * 2**20 + 2 * plan.batch_size * per_sample


class EncodeStage:
    """The model stage (a Ray actor): per chunk row, every model's embeddings and every head's scores."""

    def __init__(self, plan: Plan, device: str, threads: int):
        t0 = time.perf_counter()
        import torch

        if device == "cpu":  # Ray limits a 1-CPU actor to one thread unless told otherwise
            torch.set_num_threads(threads or os.cpu_count() or 1)
        self.plan = plan
        self.encoder = Encoder(plan, device)
        self.dims = self.encoder.embedding_dims()
        self.setup_s, self.ready_at = time.perf_counter() - t0, time.time()

    def __call__(self, table: pa.Table) -> pa.Table:
        called = time.time()
        on_device = self.plan.image_decode == "device"
        decoded = []  # image_decode=device: per row (its images on the device, decoding seconds)
        if on_device:  # decode first: failed images leave their rows (and get their skip reasons)
            rows = [self._decode_on_device(table.slice(i, 1)) for i in range(table.num_rows)]
            table = pa.concat_tables([row for row, _, _ in rows])
            decoded = [(images, seconds) for _, images, seconds in rows]
        blobs = ["encoded"] if on_device else [p.key for p in self.plan.images]
        blobs += [t.key for t in self.plan.texts]
        new: dict[str, list] = {"model_s": [], "model_start": [], "model_ready_at": [], "model_setup_s": []}
        for i in range(table.num_rows):
            t0 = time.perf_counter()
            new["model_start"].append(called)
            new["model_ready_at"].append(self.ready_at)
            new["model_setup_s"].append(self.setup_s)
            images, decode_s = decoded[i] if on_device else (
                {p.key: _array(table, p.key, i, np.uint8, p.shape) for p in self.plan.images}, 0.0)
            tokens = {t.key: _array(table, t.key, i, np.int32, (t.context_length,)) for t in self.plan.texts}
            n = len(table.column("uid")[i])
            if n:
                embs, scores = self.encoder.encode(images, tokens)
            else:
                embs = {k: np.zeros((0, d), np.float16) for k, d in self.dims.items()}
                scores = {c: np.zeros(0, np.float32) for c in self.plan.score_columns}
            for prefix, arrays in (("emb", embs), ("score", scores)):
                for k, v in arrays.items():
                    new.setdefault(f"{prefix}:{k}", []).append(v.tobytes())
            for k, d in self.dims.items():
                new.setdefault(f"dim:{k}", []).append(d)
            new["model_s"].append(time.perf_counter() - t0 + decode_s)
        table = table.drop_columns(blobs)
        for name, values in new.items():
            kind = pa.large_binary() if name.startswith(("emb:", "score:")) else (
                pa.int64() if name.startswith("dim:") else pa.float64())
            table = table.append_column(name, pa.array(values, kind))
        return table

    def _decode_on_device(self, row: pa.Table) -> tuple[pa.Table, dict, float]:
        """One chunk row's images decoded on the device: (the row without the images that failed,
        the images, the seconds it took)."""
        t0 = time.perf_counter()
        images, errors = decode_on_device(row.column("encoded")[0].as_py(), self.plan, self.encoder.device)
        return (drop_failed(row, errors, self.plan) if any(errors) else row), images, time.perf_counter() - t0


def _array(table: pa.Table, column: str, row: int, dtype, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(table.column(column)[row].as_buffer(), dtype).reshape(-1, *shape)


def assembled_shards(ds) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """Collect chunk rows per shard as they stream in (any order); yield a shard once all its chunks arrived."""
    chunks: dict[int, dict[int, dict[str, Any]]] = {}
    last: dict[int, int] = {}
    for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in table.to_pylist():
            shard = row["shard"]
            chunks.setdefault(shard, {})[row["chunk"]] = row
            if row["last"]:
                last[shard] = row["chunk"]
            if shard in last and len(chunks[shard]) == last[shard] + 1:
                del last[shard]
                yield shard, [c for _, c in sorted(chunks.pop(shard).items())]
    if chunks:  # a read task that died would surface as a Ray error before this; this guards the bookkeeping
        raise RuntimeError(f"pipeline ended with incomplete shards: "
                           f"{ {s: sorted(c) for s, c in chunks.items()} } (chunk indices received)")


def write_shard(out: Path, path: Path, rows: list[dict[str, Any]], plan: Plan, fingerprint: str,
                source_stats: dict[str, Any] | None) -> int:
    """Concatenate a shard's chunks in order and write parquet + npz + done marker (with img2dataset's
    own counts: successes to check the tar against, failures it never wrote into the tar)."""
    expected = None if source_stats is None else int(source_stats.get("successes", source_stats.get("count", 0)))
    counts, skips = Counts(), []
    notes: dict[str, int] = {}
    for row in rows:
        for key, reason, detail in zip(row["keys"], row["reasons"], row["details"]):
            if reason:
                counts.drop(reason)
                skips.append({"key": key, "reason": reason, "detail": detail})
        for note in row["notes"]:
            notes[note] = notes.get(note, 0) + 1
    counts.keep(sum(len(r["uid"]) for r in rows))
    records = sum(len(r["keys"]) for r in rows)
    if expected is None:
        notes[MISSING_STATS] = 1
    elif expected > records:  # e.g. a tar cut short: these samples never reached us
        counts.drop(MISSING_FROM_TAR, expected - records)
    elif expected < records:
        notes["more_samples_than_stats_successes"] = records - expected

    columns = {f.name: [v for r in rows for v in r[f.name]] for f in formats.METADATA_SCHEMA}
    for col in plan.score_columns:
        columns[col] = np.concatenate([np.frombuffer(r[f"score:{col}"], np.float32) for r in rows])
    table = pa.table(columns, schema=output_schema(plan.score_columns))
    arrays = {name: np.concatenate([np.frombuffer(r[f"emb:{name}"], np.float16).reshape(-1, r[f"dim:{name}"])
                                    for r in rows]) for name in plan.embedding_names()}
    c = counts.as_dict()
    marker = {"fingerprint": fingerprint, "source": str(path), "source_bytes": path.stat().st_size,
              "rows_in": c["seen"], "rows_out": c["kept"], "skipped": c["dropped"], "expected_rows": expected,
              "download_failures": shards.download_failures(source_stats),
              "notes": dict(sorted(notes.items())), "skips": skips,
              "timings": {step: round(sum(r[f"{step}_s"] for r in rows), 4) for step in ("read", "decode", "model")}}
    write_outputs(out, path.stem, table, arrays, marker)
    return c["kept"]
