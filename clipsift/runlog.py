"""What every stage writes next to its output: atomic files, counts by reason, timings.

A stage owns a run directory. It writes its resolved config there (config.yaml), counts what it
kept and dropped by reason (Counts), times its steps (Timer), and finishes with stats.json.
Files are written to a temporary name and renamed, so a file that exists is complete. One run at
a time writes an output: output_lock.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)


class LockError(RuntimeError):
    """An output that another running clipsift command is writing."""


@contextmanager
def output_lock(target: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on the output `target` (a folder or a file) for the block.

    The lock is a POSIX record lock (lockf) on a sibling file .<name>.lock (outside the output, so
    output folders hold only outputs) that names its holder. The kernel releases it when the holding
    process exits, however it exits, so the lock of a killed run is simply taken by the next run and
    a rerun resumes; a second run while the first is alive gets a LockError naming the first one's
    pid. Unlike flock, a forked child (a DataLoader or multiprocessing worker still winding down
    after its parent was killed) does not hold it.
    """
    import fcntl

    target = Path(target).resolve()
    path = target.parent / f".{target.name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise LockError(f"{target}: another clipsift run is writing it ({_lock_holder(fd)}); wait for it "
                            "to finish or choose another out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock


def _lock_holder(fd: int) -> str:
    for _ in range(20):  # the holder writes its pid just after taking the lock
        text = os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
        if text:
            return text
        time.sleep(0.05)
    return "pid unknown"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds.

    For writers that want a file name (pyarrow, numpy, tarfile) rather than bytes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class Counts:
    """Rows in, kept, and dropped by reason. The one place that counts, so stages agree."""

    def __init__(self) -> None:
        self.seen = 0
        self.kept = 0
        self.dropped: Counter[str] = Counter()

    def keep(self, n: int = 1) -> None:
        self.seen += n
        self.kept += n

    def drop(self, reason: str, n: int = 1) -> None:
        self.seen += n
        self.dropped[reason] += n

    def merge(self, other: "Counts | dict[str, Any]") -> None:
        d = other.as_dict() if isinstance(other, Counts) else other
        self.seen += d["seen"]
        self.kept += d["kept"]
        self.dropped.update(d["dropped"])

    def as_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "kept": self.kept, "dropped": dict(sorted(self.dropped.items()))}


class Timer:
    """Wall time per named step, accumulated."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.seconds.items()}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Counts):
        return obj.as_dict()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
