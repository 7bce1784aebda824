"""Reading and writing img2dataset-layout webdataset shards, one implementation for every stage.

ShardWriter writes byte-reproducible shards (fixed tar headers, no timestamps) with their
_stats.json and status parquet. read_shard() walks a shard and yields either a valid Sample or a
Skip with a reason, so a caller can count every sample it could not use; it never raises on bad
content. A shard that cannot be opened at all yields a single Skip for the whole shard.
"""
from __future__ import annotations

import io
import json
import mmap
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Union

import pyarrow as pa
import pyarrow.parquet as pq

from clipsift import formats
from clipsift.runlog import atomic_path, write_json

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

# Skip reasons, named once so stats from every stage use the same words.
MISSING_IMAGE = "missing_image"
MISSING_TEXT = "missing_text"
MISSING_JSON = "missing_json"
BAD_JSON = "malformed_json"
NO_UID = "json_without_uid"
BAD_TEXT = "non_utf8_caption"
DUPLICATE_KEY = "duplicate_key"
TRUNCATED_TAR = "truncated_tar"
UNREADABLE_SHARD = "unreadable_shard"
CORRUPT_IMAGE = "corrupt_image"
IMAGE_TOO_LARGE = "image_too_large"  # more pixels than the pipeline's max_image_pixels


@dataclass
class Sample:
    key: str
    uid: str
    image: bytes  # encoded, undecoded
    text: str
    meta: dict[str, Any]


@dataclass
class Skip:
    key: str
    reason: str
    detail: str = ""
    uid: str | None = None


Record = Union[Sample, Skip]


class ShardWriter:
    """Writes one {:08d}.tar plus {:08d}_stats.json and {:08d}.parquet, atomically.

    Use as a context manager; nothing appears under the final names unless the block succeeds.
    `add_raw` writes members verbatim (the world uses it to plant corrupt samples).
    """

    def __init__(self, folder: str | Path, shard: int):
        self.folder = Path(folder)
        self.shard = shard
        self.tar_path = self.folder / formats.shard_name(shard)
        self._status: list[dict[str, Any]] = []
        self._buf = io.BytesIO()
        self._tar: tarfile.TarFile | None = None

    def __enter__(self) -> "ShardWriter":
        self._tar = tarfile.open(fileobj=self._buf, mode="w", format=tarfile.USTAR_FORMAT)
        return self

    def add(self, key: str, image: bytes, text: str, meta: dict[str, Any], ext: str = "jpg") -> None:
        meta = {**meta, "key": key}
        self.add_raw(key, {ext: image, "txt": text.encode("utf-8"), "json": _dump_json(meta)}, status=meta)

    def add_raw(self, key: str, members: dict[str, bytes], status: dict[str, Any]) -> None:
        assert self._tar is not None, "use ShardWriter as a context manager"
        for ext, data in members.items():
            add_member(self._tar, f"{key}.{ext}", data)
        self._status.append({**status, "key": key})

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._tar is not None
        self._tar.close()
        if exc_type is not None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.folder / formats.status_name(self.shard)) as tmp:
            pq.write_table(_status_table(self._status), tmp)
        ok = sum(1 for s in self._status if s.get("status") == "success")
        write_json(
            self.folder / formats.stats_name(self.shard),
            {"count": len(self._status), "successes": ok, "failed_to_download": len(self._status) - ok,
             "failed_to_resize": 0, "status_dict": {"success": ok}},
        )
        # The tar last: a tar on disk means its sidecar files are there too.
        with atomic_path(self.tar_path) as tmp:
            tmp.write_bytes(self._buf.getvalue())


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add a file with fixed header fields (no mtime, owner) so tars are byte-reproducible."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_tar(path: str | Path, members: list[tuple[str, bytes]]) -> None:
    """A plain reproducible tar (for eval-task shards, which have no img2dataset sidecars)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            add_member(tar, name, data)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def read_shard(path: str | Path) -> Iterator[Record]:
    """Yield a Sample or a Skip for every key in the shard, in tar order."""
    for group in iter_groups(path):
        yield group if isinstance(group, Skip) else _finish(*group)


def iter_groups(path: str | Path) -> Iterator[tuple[str, dict[str, bytes]] | Skip]:
    """Walk any webdataset tar: yield (key, {ext: bytes}) per sample key in tar order, or a Skip.

    Skips: a key seen twice (duplicate_key), the group being read when the tar ended early
    (truncated_tar), a tar cut exactly between members or damaged in a header, which tarfile reads
    as a clean end (one truncated_tar skip keyed by the tar's name, after its last readable group),
    or the whole tar when it cannot be opened
    (unreadable_shard). Callers that know the layout (read_shard for img2dataset shards, eval for
    clip_benchmark task shards) check the members themselves.
    """
    path = Path(path)
    seen: set[str] = set()
    group_key: str | None = None
    members: dict[str, bytes] = {}
    for item in _walk_members(path):
        if isinstance(item, _TarEnd):
            if item.reason == UNREADABLE_SHARD:
                yield Skip(key=path.name, reason=UNREADABLE_SHARD, detail=item.detail)
                return
            if item.reason == TRUNCATED_TAR:  # the group being read when the tar ended is lost
                yield Skip(key=group_key or path.name, reason=TRUNCATED_TAR, detail=item.detail)
                return
            if group_key is not None:  # cut between members: the groups read so far are whole
                yield _group(group_key, members, seen)
            yield Skip(key=path.name, reason=TRUNCATED_TAR,
                       detail=f"{item.detail}; samples after {group_key or 'its start'} may be missing")
            return
        name, data = item
        key, _, ext = name.rpartition("/")[2].partition(".")
        if key != group_key:
            if group_key is not None:
                yield _group(group_key, members, seen)
            group_key, members = key, {}
        if ext in members:  # same key and member twice inside one group
            members["__dup__"] = b""
        members[ext.lower()] = data
    if group_key is not None:
        yield _group(group_key, members, seen)


@dataclass
class _TarEnd:
    """A member walk that did not end cleanly: UNREADABLE_SHARD (never opened), TRUNCATED_TAR (ended
    inside a member or header) or _UNFINISHED (ended between members, without end-of-archive blocks)."""

    reason: str
    detail: str


_UNFINISHED = "unfinished"


def _walk_members(path: Path) -> Iterator[tuple[str, bytes] | _TarEnd]:
    """(name, bytes) of every regular file in the tar, then a _TarEnd if it did not end cleanly.

    A plain, complete ustar tar (what img2dataset, webdataset and ShardWriter write) is indexed
    straight from a memory map, ~10x faster than tarfile, which costs more than decoding a small
    image. Any other tar (compressed, pax or GNU headers, cut short, damaged) goes through tarfile
    from its start, so both paths yield the same members and the same ends.
    """
    index = _plain_tar_index(path)
    if index is None:
        yield from _tarfile_members(path)
        return
    mm, entries = index
    try:
        for name, start, size in entries:
            yield name, mm[start:start + size]
    finally:
        mm.close()


_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_USTAR_MAGICS = (b"ustar\x0000", b"ustar  \x00")  # POSIX, GNU


def _plain_tar_index(path: Path):
    """(memory map, [(name, data offset, size)]) of a plain complete ustar tar, else None."""
    try:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):  # unreadable or empty: tarfile says why
        return None
    try:
        entries = _scan_ustar(mm)
    except ValueError:  # a number field that is not octal
        entries = None
    if entries is None:
        mm.close()
        return None
    return mm, entries


def _scan_ustar(mm) -> list[tuple[str, int, int]] | None:
    entries = []
    end, off = len(mm), 0
    while True:
        if off + _BLOCK > end:
            return None  # cut inside a header, or no end-of-archive block
        header = mm[off:off + _BLOCK]
        if header == _ZERO_BLOCK:
            # tarfile reads a tar with < 2 blocks left here as unfinished; let it say so
            return entries if end - off >= 2 * _BLOCK else None
        if header[257:265] not in _USTAR_MAGICS or header[124] & 0x80 or header[148] & 0x80:
            return None  # not ustar, or base-256 numbers
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        checksum = int(header[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
        if checksum != sum(header) - sum(header[148:156]) + 8 * 32:
            return None
        kind = header[156:157]
        start = off + _BLOCK
        if start + size > end:
            return None  # cut inside the data
        if kind in (b"0", b"\0"):
            name = header[:100].split(b"\0", 1)[0]
            prefix = header[345:500].split(b"\0", 1)[0] if header[257:263] == b"ustar\x00" else b""
            if prefix:
                name = prefix + b"/" + name
            if kind == b"\0" and name.endswith(b"/"):  # an old-style directory entry
                return None
            entries.append((name.decode("utf-8", "surrogateescape"), start, size))
        elif kind != b"5":  # links, pax/GNU extension headers, devices: tarfile handles them
            return None
        off = start + -(-size // _BLOCK) * _BLOCK


def _tarfile_members(path: Path) -> Iterator[tuple[str, bytes] | _TarEnd]:
    try:
        tar = tarfile.open(path, mode="r|*")
    except (tarfile.TarError, OSError, EOFError) as e:
        yield _TarEnd(UNREADABLE_SHARD, str(e))
        return
    try:
        for info in tar:
            if info.isfile():
                yield info.name, tar.extractfile(info).read()  # type: ignore[union-attr]
        # tar.offset counts uncompressed bytes, comparable with the file size only for a plain tar
        ended = _plain_tar_ending(path, tar.offset) if getattr(tar.fileobj, "comptype", "tar") == "tar" else ""
    except (tarfile.TarError, OSError, EOFError) as e:
        yield _TarEnd(TRUNCATED_TAR, str(e))
        return
    finally:
        tar.close()
    if ended:
        yield _TarEnd(_UNFINISHED, ended)


def _plain_tar_ending(path: Path, offset: int) -> str:
    """Why a plain tar that tarfile read to its end at `offset` did not end cleanly ("" if it did).

    tarfile ends quietly both without end-of-archive blocks (a writer that never finished) and at a
    damaged header (everything after it unread); both lose samples, so both are said."""
    if path.stat().st_size - offset < 2 * tarfile.BLOCKSIZE:
        return f"no end-of-archive blocks after byte {offset}: the writer did not finish this tar"
    with open(path, "rb") as f:
        f.seek(offset)
        if f.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
            return f"invalid tar header at byte {offset}: the rest of the tar is unreadable"
    return ""


def _group(key: str, members: dict[str, bytes], seen: set[str]) -> tuple[str, dict[str, bytes]] | Skip:
    if key in seen or "__dup__" in members:
        return Skip(key, DUPLICATE_KEY)
    seen.add(key)
    return key, members


def _finish(key: str, members: dict[str, bytes]) -> Record:
    image = next((members[e] for e in IMAGE_EXTS if e in members), None)
    if image is None:
        return Skip(key, MISSING_IMAGE)
    if "json" not in members:
        return Skip(key, MISSING_JSON)
    try:
        meta = json.loads(members["json"].decode("utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("not an object")
    except ValueError as e:
        return Skip(key, BAD_JSON, str(e)[:200])
    uid = meta.get("uid")
    if not formats.is_uid(uid):
        return Skip(key, NO_UID, f"uid={uid!r}"[:200])
    if "txt" not in members:
        return Skip(key, MISSING_TEXT, uid=uid)
    try:
        text = members["txt"].decode("utf-8")
    except UnicodeDecodeError as e:
        return Skip(key, BAD_TEXT, str(e)[:200], uid=uid)
    return Sample(key=key, uid=uid, image=image, text=text, meta=meta)


def describe_error(e: Exception) -> str:
    """A skip's detail from an exception: its type and message, without the object addresses PIL puts
    in messages ("<_io.BytesIO object at 0x...>"), so stats and markers are the same every run."""
    return re.sub(r" ?<[^<>]* at 0x[0-9a-fA-F]+>", "", f"{type(e).__name__}: {e}")[:200]


def read_stats(tar: str | Path) -> dict[str, Any] | None:
    """The _stats.json beside shard `tar` (formats.stats_path: <stem>_stats.json for any shard name),
    None when there is none; a FormatError naming the file when it is not img2dataset's object of counts."""
    path = formats.stats_path(tar)
    if not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as f:
            stats = json.load(f)
    except ValueError as e:  # not JSON, or not UTF-8
        raise formats.FormatError(f"{path}: not JSON ({e}); fix or delete it (img2dataset writes it per shard)") from None
    if not isinstance(stats, dict):
        raise formats.FormatError(f"{path}: a JSON {type(stats).__name__}, not img2dataset's object of counts; "
                                  "fix or delete it")
    for key in STATS_COUNTS:
        value = stats.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise formats.FormatError(f"{path}: {key} is {value!r}, not a count of samples; fix or delete the file")
    return stats


# The counts of an img2dataset _stats.json that clipsift reads.
STATS_COUNTS = ("count", "successes", "failed_to_download", "failed_to_resize")
# Samples img2dataset could not fetch or resize: never in the tar, so only its stats know them.
DOWNLOAD_FAILURES = ("failed_to_download", "failed_to_resize")


def download_failures(stats: dict[str, Any] | None) -> dict[str, int]:
    """A shard's img2dataset failure counts, to carry into clipsift's own stats ({} without stats)."""
    return {k: stats.get(k, 0) for k in DOWNLOAD_FAILURES} if stats is not None else {}


SIZES_FILE = "sizes.json"


def write_sizes_json(folder: str | Path) -> dict[str, int]:
    """sizes.json, {shard file name: samples}, which open_clip_train's loader reads for a folder's
    sample count. A sample is what that loader keeps: a key with a caption and an image."""
    sizes = {}
    for tar in formats.list_shards(folder):
        sizes[tar.name] = sum(1 for g in iter_groups(tar) if not isinstance(g, Skip)
                              and "txt" in g[1] and any(e in g[1] for e in IMAGE_EXTS))
    write_json(Path(folder) / SIZES_FILE, sizes)
    return sizes


def _dump_json(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=True).encode("utf-8")


_STATUS_SCHEMA = pa.schema(
    [("key", pa.string()), ("uid", pa.string()), ("url", pa.string()), ("caption", pa.string()),
     ("status", pa.string()), ("error_message", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
     ("original_width", pa.int64()), ("original_height", pa.int64()), ("sha256", pa.string())]
)


def _status_table(rows: list[dict[str, Any]]) -> pa.Table:
    cols = {name: [r.get(name) for r in rows] for name in _STATUS_SCHEMA.names}
    return pa.table(cols, schema=_STATUS_SCHEMA)
