"""The CPU stage: walk a shard, decode and preprocess its images, tokenise its captions.

A shard is cut into chunks of `batch_size` samples in tar order (the last chunk is shorter, and a
final chunk flagged `last` closes the shard, possibly empty). Every record of the tar -- sample or
Skip -- belongs to exactly one chunk, so per-shard counts add up. A chunk is ONE row of the Ray
dataset: its images travel as one fixed-shape uint8 array, so Ray can neither split a model batch
nor merge two, and a chunk's embeddings never depend on how Ray grouped rows. That is what makes a
resumed run byte-identical to an uninterrupted one.

A shard may be read by several tasks (`parts`): each walks the whole tar (cheap) but decodes only
the chunks c with c % parts == part (the expensive bit), so a few big shards still fill every core.
"""
from __future__ import annotations

import io
import time
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
from PIL import Image

from clipsift import shards
from clipsift.pipeline.encoders import Plan, split_transform, tokenizer_for

CHUNK_FIELDS = ["shard", "chunk", "last", "keys", "reasons", "details", "uid", "url", "text", "original_width",
                "original_height", "face_bboxes", "sha256", "notes", "read_s"]
_LIST_STR = pa.list_(pa.string())
_LIST_INT = pa.list_(pa.int64())
_BBOXES = pa.list_(pa.list_(pa.list_(pa.float64())))


def read_task(batch: pa.Table, plan: Plan) -> Iterator[pa.Table]:
    """Ray map_batches UDF: one (path, shard, part, parts) row in, the chunks of that part out."""
    for row in batch.to_pylist():
        yield from read_chunks(row["path"], row["shard"], plan, row["part"], row["parts"])


def read_chunks(path: str, shard: int, plan: Plan, part: int = 0, parts: int = 1) -> Iterator[pa.Table]:
    """Yield one single-row table per chunk owned by `part` (see the module docstring)."""
    chunk, t0 = 0, time.perf_counter()
    records: list[shards.Record] = []
    n_samples = 0
    for rec in shards.read_shard(path):
        records.append(rec)
        if isinstance(rec, shards.Sample):
            n_samples += 1
            if n_samples == plan.batch_size:
                if chunk % parts == part:
                    yield chunk_table(shard, chunk, False, records, plan, time.perf_counter() - t0)
                    t0 = time.perf_counter()
                chunk, records, n_samples = chunk + 1, [], 0
    if chunk % parts == part:
        yield chunk_table(shard, chunk, True, records, plan, time.perf_counter() - t0)


def chunk_table(shard: int, chunk: int, last: bool, records: list[shards.Record], plan: Plan,
                read_s: float) -> pa.Table:
    """Decode a chunk's samples (a failed decode becomes a corrupt_image skip) into one row."""
    t0 = time.perf_counter()
    keys, reasons, details = [], [], []
    kept: list[shards.Sample] = []
    pixels: dict[str, list[np.ndarray]] = {p.key: [] for p in plan.images}
    for rec in records:
        keys.append(rec.key)
        if isinstance(rec, shards.Skip):
            reasons.append(rec.reason)
            details.append(rec.detail)
            continue
        arrays, error = decode_image(rec.image, plan)
        if error:
            reasons.append(shards.CORRUPT_IMAGE)
            details.append(error)
            continue
        reasons.append("")
        details.append("")
        kept.append(rec)
        for k, a in arrays.items():
            pixels[k].append(a)
    notes: list[str] = []
    meta = [sample_fields(s, notes) for s in kept]
    cols: dict[str, pa.Array] = {
        "shard": pa.array([shard], pa.int64()),
        "chunk": pa.array([chunk], pa.int64()),
        "last": pa.array([last], pa.bool_()),
        "keys": pa.array([keys], _LIST_STR),
        "reasons": pa.array([reasons], _LIST_STR),
        "details": pa.array([details], _LIST_STR),
        "uid": pa.array([[s.uid for s in kept]], _LIST_STR),
        "url": pa.array([[m["url"] for m in meta]], _LIST_STR),
        "text": pa.array([[s.text for s in kept]], _LIST_STR),
        "original_width": pa.array([[m["original_width"] for m in meta]], _LIST_INT),
        "original_height": pa.array([[m["original_height"] for m in meta]], _LIST_INT),
        "face_bboxes": pa.array([[m["face_bboxes"] for m in meta]], _BBOXES),
        "sha256": pa.array([[m["sha256"] for m in meta]], _LIST_STR),
        "notes": pa.array([notes], _LIST_STR),
    }
    for p in plan.images:
        arr = np.stack(pixels[p.key]) if kept else np.zeros((0, *p.shape), np.uint8)
        cols[p.key] = pa.array([arr.tobytes()], pa.large_binary())
    for t in plan.texts:
        toks = tokenizer_for(t.open_clip_name)([s.text for s in kept]).numpy() if kept else np.zeros((0, t.context_length))
        cols[t.key] = pa.array([toks.astype(np.int32).tobytes()], pa.large_binary())
    cols["read_s"] = pa.array([read_s + time.perf_counter() - t0], pa.float64())
    return pa.table(cols)


def decode_image(data: bytes, plan: Plan) -> tuple[dict[str, np.ndarray], str]:
    """Every image array the plan needs, or an error string (truncated or undecodable bytes)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decodes fully: truncated data raises here, not later
            out = {}
            for p in plan.images:
                pil_steps, _, _ = split_transform(p.cfg_json)
                arr = np.asarray(pil_steps(img), dtype=np.uint8)
                if arr.shape != p.shape:
                    return {}, f"preprocessed to shape {arr.shape}, expected {p.shape}"
                out[p.key] = arr
            return out, ""
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        return {}, f"{type(e).__name__}: {e}"[:200]


def sample_fields(sample: shards.Sample, notes: list[str]) -> dict[str, Any]:
    """The DataComp columns a sample's json carries; a value of the wrong type becomes null + a note."""
    m = sample.meta
    out = {"url": m.get("url"), "sha256": m.get("sha256"), "original_width": m.get("original_width"),
           "original_height": m.get("original_height"), "face_bboxes": m.get("face_bboxes")}
    for name in ("url", "sha256"):
        if out[name] is not None and not isinstance(out[name], str):
            notes.append(f"invalid_{name}")
            out[name] = None
    for name in ("original_width", "original_height"):
        v = out[name]
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            notes.append(f"invalid_{name}")
            out[name] = None
    boxes = out["face_bboxes"]
    if boxes is not None and not (isinstance(boxes, list) and all(
            isinstance(b, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in b)
            for b in boxes)):
        notes.append("invalid_face_bboxes")
        out["face_bboxes"] = None
    return out
