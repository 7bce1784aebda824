"""What every stage writes next to its output: atomic files, counts by reason, timings.

A stage owns a run directory. It writes its resolved config there (config.yaml), counts what it
kept and dropped by reason (Counts), times its steps (Timer), and finishes with stats.json.
Files are written to a temporary name and renamed, so a file that exists is complete.
"""
from __future__ import annotations

import json
import os
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
