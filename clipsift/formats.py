"""DataComp / img2dataset formats, defined once and used by every stage (the world included).

- uids: 32-char lowercase hex (128 bit). Subset files hold them as np.dtype("u8,u8"), sorted,
  f0 = int(uid[:16], 16), f1 = int(uid[16:], 16); a repeated uid means "use it that many times".
- shards: {shard:08d}.tar with <key>.jpg/.txt/.json members, {shard:08d}_stats.json and
  {shard:08d}.parquet (status table); the key is 12 digits, shard * 10**4 + row. Readers take any
  number of digits (img2dataset's default is {shard:05d}) and the <stem>_stats.json beside each.
- metadata: one parquet per chunk with METADATA_COLUMNS (+ score columns) and a row-aligned .npz
  of float16 embeddings with the same stem.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa

SUBSET_DTYPE = np.dtype("u8,u8")
SAMPLES_PER_SHARD = 10_000
# Whole-string only: Python's `$` also matches before a final "\n", so match() would let "<uid>\n"
# through; is_uid uses fullmatch. (pyarrow's RE2 reads `$` as the very end, as intended.)
_UID_RE = re.compile(r"^[0-9a-f]{32}$")

# The DataComp pool metadata columns (scores are added by the pipeline).
METADATA_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("url", pa.string()),
        ("text", pa.string()),
        ("original_width", pa.int64()),
        ("original_height", pa.int64()),
        ("face_bboxes", pa.list_(pa.list_(pa.float64()))),
        ("sha256", pa.string()),
    ]
)
METADATA_COLUMNS = METADATA_SCHEMA.names
SCORE_TYPE = pa.float32()  # every score column, e.g. clip_b32_similarity_score


class FormatError(ValueError):
    """Input that does not follow the DataComp / img2dataset conventions."""


# ---------------------------------------------------------------- uids
def is_uid(uid: str) -> bool:
    return isinstance(uid, str) and _UID_RE.fullmatch(uid) is not None


def check_uid_column(path: str | Path, uids: pa.ChunkedArray | pa.Array) -> None:
    """A FormatError naming the file and row of the first value of a uid column that is not a uid
    (checked in Arrow, no Python loop)."""
    import pyarrow.compute as pc

    if not (pa.types.is_string(uids.type) or pa.types.is_large_string(uids.type)):
        raise FormatError(f"{path}: uid is a {uids.type} column; DataComp uids are 32-character lowercase hex "
                          "strings (an integer uid u is f'{u:032x}')")
    ok = pc.fill_null(pc.match_substring_regex(uids, _UID_RE.pattern), False)
    if not pc.all(ok, min_count=0).as_py():
        row = pc.index(ok, False).as_py()
        raise FormatError(f"{path}: row {row}: uid {uids[row].as_py()!r} is not 32 lowercase hex characters; "
                          "fix the metadata (DataComp uids are 128-bit hex)")


def random_uids(rng: np.random.Generator, n: int) -> list[str]:
    """n distinct 128-bit hex uids drawn from rng (deterministic given its state)."""
    raw = rng.bytes(16 * n)
    uids = [raw[16 * i : 16 * (i + 1)].hex() for i in range(n)]
    if len(set(uids)) != n:  # 2^-100 odds; fail loudly rather than emit a duplicate
        raise RuntimeError("uid collision; use another seed")
    return uids


def uids_to_u8u8(uids: Iterable[str]) -> np.ndarray:
    """Hex uids -> structured u8,u8 array (unsorted, same order). Vectorised: one hex decode of
    the joined string, so 100M uids take seconds, not minutes."""
    arr = uids.tolist() if isinstance(uids, np.ndarray) else uids if isinstance(uids, list) else list(uids)
    out = np.empty(len(arr), dtype=SUBSET_DTYPE)
    if not len(arr):
        return out
    try:
        joined = "".join(arr)
    except TypeError:  # not all str: the bad one is named below
        joined = ""
    try:
        raw = bytes.fromhex(joined) if len(joined) == 32 * len(arr) else None
    except ValueError:
        raw = None
    # fromhex also takes upper case and skips whitespace (fewer bytes); 6 scans beat a lower() copy
    if raw is not None and (len(raw) != 16 * len(arr) or any(c in joined for c in "ABCDEF")):
        raw = None
    if raw is None:  # name the first bad uid (a default: a StopIteration here would end a caller's iterator)
        i = next((i for i, u in enumerate(arr) if not is_uid(u)), 0)
        raise FormatError(f"uid #{i} {arr[i]!r} is not 32 lowercase hex characters")
    words = np.frombuffer(raw, dtype=">u8").reshape(-1, 2)
    out["f0"], out["f1"] = words[:, 0], words[:, 1]
    return out


def u8u8_to_uids(arr: np.ndarray) -> list[str]:
    words = np.empty((len(arr), 2), dtype=">u8")
    words[:, 0], words[:, 1] = arr["f0"], arr["f1"]
    hexed = words.tobytes().hex()
    return [hexed[32 * i : 32 * (i + 1)] for i in range(len(arr))]


def sort_subset(arr: np.ndarray) -> np.ndarray:
    """np.sort(arr, order=["f0", "f1"]) in a fraction of its time: sort by f0, then order by f1 only
    the runs that share an f0 (repeats, or the rare uids equal in their upper 64 bits)."""
    order = np.argsort(arr["f0"])
    out = arr[order]
    f0 = out["f0"]
    same = np.flatnonzero(f0[1:] == f0[:-1])
    if same.size:
        pos = np.union1d(same, same + 1)  # every member of every run, in place order
        part = out[pos]
        out[pos] = part[np.lexsort((part["f1"], part["f0"]))]
    return out


def write_subset(path: str | Path, uids: Iterable[str] | np.ndarray) -> np.ndarray:
    """Write a DataComp subset file: sorted u8,u8 uids, repeats kept. Returns the array.

    `uids`: hex strings, or a u8,u8 array (any order) already converted."""
    from clipsift.runlog import atomic_path

    is_u8u8 = isinstance(uids, np.ndarray) and uids.dtype == SUBSET_DTYPE
    arr = sort_subset(uids if is_u8u8 else uids_to_u8u8(uids))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr)
    return arr


def read_subset(path: str | Path) -> np.ndarray:
    """Read and validate a subset file from any tool (a .npy of dtype u8,u8, 1-D, sorted).

    Errors say what the file is instead and how to convert it (`clipsift subset`).
    """
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: subset file does not exist")
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic != b"\x93NUMPY":
        hint = " (a text file of hex uids? convert it: clipsift subset action=from_text)" if _looks_like_text(path) else ""
        raise FormatError(f"{path}: not a .npy file{hint}")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise FormatError(f"{path}: not a plain .npy subset file ({e})") from None
    if arr.dtype != SUBSET_DTYPE:
        raise FormatError(f"{path}: dtype {arr.dtype} is not DataComp's u8,u8 ({SUBSET_DTYPE}){_dtype_hint(arr)}")
    if arr.ndim != 1:
        raise FormatError(f"{path}: expected a 1-D array, got shape {arr.shape}")
    key = arr["f0"].astype(np.uint64), arr["f1"].astype(np.uint64)
    bad = np.flatnonzero((key[0][1:] < key[0][:-1]) | ((key[0][1:] == key[0][:-1]) & (key[1][1:] < key[1][:-1])))
    if bad.size:
        raise FormatError(f"{path}: uids are not sorted (first out of order at index {bad[0] + 1}); "
                          f"DataComp subsets are sorted by (f0, f1): np.sort(arr, order=['f0', 'f1'])")
    return arr


def _looks_like_text(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(64)
    return bool(head) and all(c in b"0123456789abcdefABCDEF\r\n \t" for c in head)


def _dtype_hint(arr: np.ndarray) -> str:
    dt = arr.dtype
    if dt.kind in "US":
        return "; it holds strings: convert hex uids with clipsift subset action=from_text"
    if dt.kind == "O":
        return "; it holds Python objects"
    if dt.names and len(dt.names) == 2 and all(dt[n].kind == "u" and dt[n].itemsize == 8 for n in dt.names):
        return (f"; two uint64 fields {dt.names} in {'big' if dt[0].byteorder == '>' else 'another'} layout: "
                f"rebuild with names f0, f1 little-endian (np.dtype('u8,u8'))")
    if dt == np.uint64 and arr.ndim == 2 and arr.shape[1] == 2:
        return "; an (N, 2) uint64 array: np.ascontiguousarray(arr).view('u8,u8').ravel() gives DataComp's layout"
    return ""


def read_uid_text(path: str | Path) -> list[str]:
    """Hex uids from a text file, one per line (blank lines ignored); a bad line is an error naming it."""
    uids = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            uid = line.strip()
            if not uid:
                continue
            if not is_uid(uid):
                raise FormatError(f"{path}:{n}: {uid[:60]!r} is not a uid (32 lowercase hex characters)")
            uids.append(uid)
    return uids


# ---------------------------------------------------------------- shard names
def shard_name(shard: int) -> str:
    return f"{shard:08d}.tar"


def stats_name(shard: int) -> str:
    return f"{shard:08d}_stats.json"


def status_name(shard: int) -> str:
    return f"{shard:08d}.parquet"


def sample_key(shard: int, row: int) -> str:
    return f"{shard:08d}{row:04d}"


def stats_path(tar: str | Path) -> Path:
    """The _stats.json img2dataset writes beside shard `tar`, for any shard name: 00000012.tar ->
    00000012_stats.json, and 00012.tar -> 00012_stats.json (img2dataset's default oom_shard_count=5)."""
    tar = Path(tar)
    return tar.with_name(f"{tar.stem}_stats.json")


def shard_index(path: str | Path) -> int:
    """00000012.tar (or 00012.tar) -> 12, with a clear error for names outside the convention."""
    stem = Path(path).name.split(".")[0]
    if not stem.isdigit():
        raise FormatError(f"{path}: shard names are digits, {{:08d}}.tar or img2dataset's {{:05d}}.tar")
    return int(stem)


def list_shards(folder: str | Path) -> list[Path]:
    """The shards of a folder, named by digits of any width (img2dataset writes as many as its
    oom_shard_count, 5 by default), in index order. Two names of one index (00012.tar and
    00000012.tar) are an error: which one is meant cannot be told."""
    shards = sorted((p for p in Path(folder).glob("*.tar") if p.stem.isdigit()), key=lambda p: (int(p.stem), p.name))
    for a, b in zip(shards, shards[1:]):
        if int(a.stem) == int(b.stem):
            raise FormatError(f"{a.parent}: {a.name} and {b.name} are both shard {int(a.stem)}; keep one of them")
    return shards
