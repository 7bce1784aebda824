"""The CPU stages: walk a shard into chunks, then decode and preprocess each chunk.

read_task walks one shard with shards.read_shard and cuts it into chunks of `batch_size` samples in
tar order (the last chunk is shorter; a final chunk flagged `last` closes the shard, possibly
empty). Every record of the tar -- sample or Skip -- belongs to exactly one chunk, so per-shard
counts add up. A chunk is ONE row of the Ray dataset, carrying its samples' encoded images.

DecodeStage turns one chunk row into fixed-shape arrays: every image through the PIL part of each
model's open_clip transform (uint8, H x W x 3, all images of the chunk in one blob), every caption
through each tokenizer (int32). An image that fails to decode becomes a corrupt_image skip; one
over max_image_pixels (read from its header, before decoding) becomes an image_too_large skip,
except a JPEG that PIL's draft mode can decode at 1/2, 1/4 or 1/8 scale within the limit: it is
decoded reduced (a CLIP model sees a few hundred pixels a side either way).

Because a chunk is one row, Ray can neither split a model batch nor merge two: a chunk's
embeddings never depend on how Ray grouped rows, which makes a resumed run byte-identical to an
uninterrupted one. Because decoding runs per chunk (not per shard), a few large shards still
keep every core busy.
"""
from __future__ import annotations

import io
import time
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from clipsift import shards
from clipsift.eval.models import tokenizer
from clipsift.pipeline.encoders import Plan, split_transform
from clipsift.pipeline.image_header import image_size

_LIST_STR = pa.list_(pa.string())
_LIST_INT = pa.list_(pa.int64())
_BBOXES = pa.list_(pa.list_(pa.list_(pa.float64())))
# per kept sample, in the order of the chunk's samples
SAMPLE_COLUMNS = {"uid": _LIST_STR, "url": _LIST_STR, "text": _LIST_STR, "original_width": _LIST_INT,
                  "original_height": _LIST_INT, "face_bboxes": _BBOXES, "sha256": _LIST_STR}


def read_task(batch: pa.Table) -> Iterator[pa.Table]:
    """Ray map_batches UDF: (path, shard) rows in, one raw chunk row out per chunk."""
    for row in batch.to_pylist():
        yield from read_chunks(row["path"], row["shard"], row["batch_size"])


def read_chunks(path: str, shard: int, batch_size: int) -> Iterator[pa.Table]:
    t0 = time.perf_counter()
    records: list[shards.Record] = []
    chunk = n_samples = 0
    for rec in shards.read_shard(path):
        records.append(rec)
        if isinstance(rec, shards.Sample):
            n_samples += 1
            if n_samples == batch_size:
                yield raw_chunk(shard, chunk, False, records, time.perf_counter() - t0)
                t0 = time.perf_counter()
                chunk, records, n_samples = chunk + 1, [], 0
    yield raw_chunk(shard, chunk, True, records, time.perf_counter() - t0)


def raw_chunk(shard: int, chunk: int, last: bool, records: list[shards.Record], read_s: float) -> pa.Table:
    """One row: every record's key and skip reason; each sample's metadata and encoded image."""
    samples = [r for r in records if isinstance(r, shards.Sample)]
    notes: list[str] = []
    meta = [sample_fields(s, notes) for s in samples]
    cols = {
        "shard": pa.array([shard], pa.int64()),
        "chunk": pa.array([chunk], pa.int64()),
        "last": pa.array([last], pa.bool_()),
        "keys": pa.array([[r.key for r in records]], _LIST_STR),
        "reasons": pa.array([["" if isinstance(r, shards.Sample) else r.reason for r in records]], _LIST_STR),
        "details": pa.array([["" if isinstance(r, shards.Sample) else r.detail for r in records]], _LIST_STR),
        **{name: pa.array([[m[name] for m in meta]], kind) for name, kind in SAMPLE_COLUMNS.items()},
        "notes": pa.array([notes], _LIST_STR),
        "encoded": pa.array([[s.image for s in samples]], pa.list_(pa.large_binary())),
        "read_s": pa.array([read_s], pa.float64()),
        "read_at": pa.array([time.time()], pa.float64()),  # epoch seconds: when the chunk was ready
    }
    return pa.table(cols)


def sample_fields(sample: shards.Sample, notes: list[str]) -> dict[str, Any]:
    """The DataComp columns of a sample (text from its .txt, the rest from its json).

    A json value of the wrong type becomes null and a note; an absent one is null (img2dataset
    jsons have no face_bboxes, for instance).
    """
    m = sample.meta
    out = {"uid": sample.uid, "text": sample.text, "url": m.get("url"), "sha256": m.get("sha256"),
           "original_width": m.get("original_width"), "original_height": m.get("original_height"),
           "face_bboxes": m.get("face_bboxes")}
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


class DecodeStage:
    """Ray map_batches actor: raw chunk rows in, decoded chunk rows out (see decode_chunk)."""

    def __init__(self, plan: Plan):
        one_thread()
        self.plan = plan
        # imports and tokenizers now, while the other actors start and the first shards are read
        self.setup_s = prepare(plan)

    def __call__(self, batch: pa.Table) -> pa.Table:
        tables = [decode_chunk(batch.slice(i, 1), self.plan, self.setup_s if i == 0 else 0.0)
                  for i in range(batch.num_rows)]
        self.setup_s = 0.0  # reported once, with this actor's first chunk
        return pa.concat_tables(tables)


def one_thread() -> None:
    """A decode process is one of many, one per core: torch must not start a thread per core in each
    (Ray sets OMP_NUM_THREADS=1 for 1-CPU tasks, but not when the environment already sets it)."""
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


def prepare(plan: Plan) -> float:
    """Build the plan's transforms and tokenizers in this process; the seconds it took.

    The first call in a process imports open_clip and loads the tokenizers (seconds); later calls
    hit the caches (microseconds). decode_chunk reports this apart from its per-image time.
    """
    key = tuple(p.cfg_json for p in plan.images) + tuple(t.open_clip_name for t in plan.texts)
    if key in _PREPARED:
        return 0.0
    t0 = time.perf_counter()
    for p in plan.images:
        split_transform(p.cfg_json)
    for t in plan.texts:
        tokenizer(t.open_clip_name)(["warm up"])  # the first call compiles patterns and fills caches
    _PREPARED.add(key)
    return time.perf_counter() - t0


_PREPARED: set[tuple[str, ...]] = set()


def decode_chunk(row: pa.Table, plan: Plan, setup_s: float = 0.0) -> pa.Table:
    """Decode and preprocess one chunk row: image and token blobs replace the encoded images.

    With image_decode=device only the captions are tokenised here; the encoded images travel on to
    the model stage, which decodes them (pipeline.device_decode) and drops failures with
    drop_failed, as this function does.

    Timings it adds: decode_s (wall) and decode_cpu_s (this process's CPU) of the chunk's work,
    decode_start (epoch seconds, to see how many decode tasks overlapped), decode_setup_s (one-off
    per process, see prepare) and decoded (images attempted).
    """
    setup_s += prepare(plan)
    t0, c0, start = time.perf_counter(), time.process_time(), time.time()
    r = row.to_pylist()[0]
    on_device = plan.image_decode == "device"
    errors: list[ImageFailure | None] = [None] * len(r["encoded"])
    if not on_device:
        pixels = {p.key: np.empty((len(r["encoded"]), *p.shape), np.uint8) for p in plan.images}
        n_ok = 0
        for j, data in enumerate(r["encoded"]):
            arrays, errors[j] = decode_image(data, plan)
            for key, a in arrays.items():
                pixels[key][n_ok] = a
            n_ok += not errors[j]
    kept = mark_failed(r, errors)
    texts = [r["text"][j] for j in kept]
    cols = {"shard": row.column("shard"), "chunk": row.column("chunk"), "last": row.column("last"),
            "keys": row.column("keys"), **sample_columns(r, kept), "notes": row.column("notes")}
    if on_device:
        cols["encoded"] = row.column("encoded")
    else:
        cols.update({p.key: blob(pixels[p.key][:len(kept)]) for p in plan.images})
    for t in plan.texts:
        toks = tokenizer(t.open_clip_name)(texts).numpy() if kept else np.zeros((0, t.context_length))
        cols[t.key] = blob(toks.astype(np.int32))
    cols["read_s"], cols["read_at"] = row.column("read_s"), row.column("read_at")
    cols["decode_s"] = pa.array([time.perf_counter() - t0], pa.float64())
    cols["decode_cpu_s"] = pa.array([time.process_time() - c0], pa.float64())
    cols["decode_start"] = pa.array([start], pa.float64())
    cols["decode_setup_s"] = pa.array([setup_s], pa.float64())
    cols["decoded"] = pa.array([len(r["encoded"]) if not on_device else 0], pa.int64())
    return pa.table(cols)


def mark_failed(r: dict[str, Any], errors: list[ImageFailure | None]) -> list[int]:
    """Turn each sample of chunk row `r` (as a dict) whose image failed into a skip with the
    failure's reason and detail; the indices of the samples kept."""
    sample_records = [i for i, reason in enumerate(r["reasons"]) if not reason]
    for j, error in enumerate(errors):
        if error:
            r["reasons"][sample_records[j]] = error.reason
            r["details"][sample_records[j]] = error.detail
    return [j for j, error in enumerate(errors) if not error]


def sample_columns(r: dict[str, Any], kept: list[int]) -> dict[str, pa.Array]:
    """The row's reasons and details, and its per-sample columns for the kept samples only."""
    return {"reasons": pa.array([r["reasons"]], _LIST_STR), "details": pa.array([r["details"]], _LIST_STR),
            **{name: pa.array([[r[name][j] for j in kept]], kind) for name, kind in SAMPLE_COLUMNS.items()}}


def drop_failed(row: pa.Table, errors: list[ImageFailure | None], plan: Plan) -> pa.Table:
    """A decoded chunk row without the samples whose image failed on the device (see mark_failed)."""
    r = {name: row.column(name)[0].as_py() for name in ("reasons", "details", *SAMPLE_COLUMNS)}
    kept = mark_failed(r, errors)
    new = sample_columns(r, kept)
    for t in plan.texts:
        toks = np.frombuffer(row.column(t.key)[0].as_buffer(), np.int32).reshape(-1, t.context_length)
        new[t.key] = blob(toks[kept])
    return pa.table({name: new.get(name, row.column(name)) for name in row.column_names})


def blob(arr: np.ndarray) -> pa.Array:
    """A one-element large_binary array viewing `arr`'s bytes (no copy; the shape is in the plan)."""
    arr = np.ascontiguousarray(arr)
    offsets = pa.py_buffer(np.array([0, arr.nbytes], np.int64))
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), 1, [None, offsets, pa.py_buffer(arr)])


@dataclass(frozen=True)
class ImageFailure:
    reason: str  # shards.CORRUPT_IMAGE or shards.IMAGE_TOO_LARGE
    detail: str


def decode_image(data: bytes, plan: Plan) -> tuple[dict[str, np.ndarray], ImageFailure | None]:
    """Every image array the plan needs, or why not (undecodable bytes, or too many pixels)."""
    try:
        with open_image(data) as img:
            if plan.jpeg_draft:  # JPEG only (a no-op for other formats): the largest scale-down that still covers every input size
                img.draft(None, (max(p.shape[1] for p in plan.images), max(p.shape[0] for p in plan.images)))
            fit_pixel_limit(img, plan.max_image_pixels)
            img.load()  # decodes fully: truncated data raises here, not later
            out = {}
            for p in plan.images:
                pil_steps, _, _ = split_transform(p.cfg_json)
                arr = np.asarray(pil_steps(img), dtype=np.uint8)
                if arr.shape != p.shape:
                    return {}, ImageFailure(shards.CORRUPT_IMAGE, f"preprocessed to shape {arr.shape}, expected {p.shape}")
                out[p.key] = arr
            return out, None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ...)
        return {}, image_failure(e)


# The pixel limit, shared by every decoder of encoded images (this stage, pipeline.device_decode,
# training.data): open_image reads the header, fit_pixel_limit checks it before anything is decoded;
# header_fits answers first, without PIL, for the common case (a JPEG or PNG within the limit).
# PIL's own soft-limit warning (Image.MAX_IMAGE_PIXELS) is silenced once here, as ours (lower) decides:
# catch_warnings per call is not thread-safe, and training decodes in threads.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageTooLarge(ValueError):
    """More pixels than max_image_pixels (the message gives the size)."""


def open_image(data: bytes) -> Image.Image:
    """`data` opened by PIL: its header read, no pixels decoded yet. Raises PIL's error for bytes it
    cannot identify, and DecompressionBombError past PIL's own hard limit (2 x Image.MAX_IMAGE_PIXELS)."""
    return Image.open(io.BytesIO(data))


def header_fits(data: bytes, limit: int) -> bool:
    """Whether `data` is a JPEG or PNG that PIL would open, as its header shows without PIL (~2.5 us,
    against ~15 us for open_image), at a size within `limit` (0: no limit) and PIL's own limit: then
    open_image and fit_pixel_limit would pass it unchanged, and a decoder that needs no PIL image may
    skip them. False decides nothing: ask them."""
    size = image_size(data)
    if size is None:
        return False
    pixels = size[0] * size[1]
    # past Image.MAX_IMAGE_PIXELS PIL warns, then refuses: let it decide
    return (not limit or pixels <= limit) and (Image.MAX_IMAGE_PIXELS is None or pixels <= Image.MAX_IMAGE_PIXELS)


def fit_pixel_limit(img: Image.Image, limit: int) -> None:
    """Make opened image `img` fit `limit` pixels (0: no limit), if need be by setting a JPEG to
    decode at the least reduction (1/2, 1/4, 1/8) that fits; raise ImageTooLarge when it cannot."""
    w, h = img.size
    if not limit or w * h <= limit:
        return
    scale = next((s for s in (2, 4, 8) if -(-w // s) * -(-h // s) <= limit), 8)  # draft rounds sizes up
    img.draft(None, (max(w // scale, 1), max(h // scale, 1)))  # JPEG only: other formats keep their size
    if img.size[0] * img.size[1] > limit:
        raise ImageTooLarge(f"{w}x{h} = {w * h / 1e6:.1f} Mpx, over max_image_pixels={limit}")


def image_failure(e: Exception) -> ImageFailure:
    """Why an image failed to decode: image_too_large (ours or PIL's limit), else corrupt_image."""
    if isinstance(e, ImageTooLarge):
        return ImageFailure(shards.IMAGE_TOO_LARGE, str(e))
    too_large = isinstance(e, Image.DecompressionBombError)
    return ImageFailure(shards.IMAGE_TOO_LARGE if too_large else shards.CORRUPT_IMAGE, shards.describe_error(e))
