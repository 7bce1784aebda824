"""Where filters read the pool from: DataComp-layout metadata on disk, or arrays in memory.

MetadataPool reads a folder of chunk parquets (sorted by name, the row order every pass uses) with
an optional row-aligned .npz of float16 embeddings of the same stem (b32_img, b32_txt, l14_img,
l14_txt). Only the columns and embeddings the filters need are read. ArrayPool serves the same
batches from arrays (benchmarks, library use).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow.parquet as pq

from clipsift import formats
from clipsift.filters.base import Batch, FilterError


class MetadataPool:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FilterError(f"metadata folder {self.folder} does not exist")
        self.files = sorted(self.folder.glob("*.parquet"))
        if not self.files:
            raise FilterError(f"no .parquet metadata files in {self.folder}")
        self.rows = [pq.ParquetFile(f).metadata.num_rows for f in self.files]
        self.num_rows = int(sum(self.rows))
        self.schema_names = set(pq.ParquetFile(self.files[0]).schema_arrow.names)

    def fingerprint(self) -> dict[str, Any]:
        return {"files": [f.name for f in self.files], "rows": self.rows}

    def batches(self, columns: set[str], embeddings: set[str] = frozenset(),  # type: ignore[assignment]
                batch_size: int = 65536) -> Iterator[Batch]:
        columns = set(columns) | {"uid"}
        offset = 0
        for path, n in zip(self.files, self.rows):
            table = pq.read_table(path, columns=sorted(columns & _names(path)))
            missing = columns - set(table.column_names)
            if missing:
                raise FilterError(f"{path}: missing column(s) {sorted(missing)}; it has {sorted(_names(path))}")
            formats.check_uid_column(path, table.column("uid"))  # a bad uid could never be in a subset file
            cols = {name: table.column(name).to_numpy(zero_copy_only=False) for name in columns}
            embs = self._embeddings(path, embeddings, n)
            for start in range(0, n, batch_size):
                stop = min(n, start + batch_size)
                yield Batch(offset + start, {k: v[start:stop] for k, v in cols.items()},
                            {k: v[start:stop] for k, v in embs.items()})
            offset += n

    def _embeddings(self, path: Path, names: set[str], n: int) -> dict[str, np.ndarray]:
        if not names:
            return {}
        npz_path = path.with_suffix(".npz")
        if not npz_path.is_file():
            raise FilterError(f"{npz_path}: embeddings file missing (filters need {sorted(names)})")
        with np.load(npz_path, allow_pickle=False) as npz:
            missing = names - set(npz.files)
            if missing:
                raise FilterError(f"{npz_path}: no array(s) {sorted(missing)}; it has {sorted(npz.files)}")
            out = {name: npz[name] for name in names}
        for name, arr in out.items():
            if arr.ndim != 2 or arr.shape[0] != n:
                raise FilterError(f"{npz_path}: {name} has shape {arr.shape}; expected ({n}, dim), row-aligned "
                                  f"with {path.name}")
        return out


def _names(path: Path) -> set[str]:
    return set(pq.ParquetFile(path).schema_arrow.names)


class ArrayPool:
    """A pool held in memory: columns (uid required) and embeddings, all of the same length."""

    def __init__(self, columns: dict[str, np.ndarray], embeddings: dict[str, np.ndarray] | None = None):
        self.columns = columns
        self.embeddings = embeddings or {}
        self.num_rows = len(columns["uid"])
        for name, arr in {**columns, **self.embeddings}.items():
            if len(arr) != self.num_rows:
                raise FilterError(f"{name} has {len(arr)} rows, uid has {self.num_rows}")

    def fingerprint(self) -> dict[str, Any]:
        return {"rows": self.num_rows, "columns": sorted(self.columns), "embeddings": sorted(self.embeddings)}

    def batches(self, columns: set[str], embeddings: set[str] = frozenset(),  # type: ignore[assignment]
                batch_size: int = 65536) -> Iterator[Batch]:
        columns = set(columns) | {"uid"}
        for name in columns - set(self.columns):
            raise FilterError(f"pool has no column {name!r}; it has {sorted(self.columns)}")
        for name in set(embeddings) - set(self.embeddings):
            raise FilterError(f"pool has no embedding {name!r}; it has {sorted(self.embeddings)}")
        for start in range(0, self.num_rows, batch_size):
            stop = min(self.num_rows, start + batch_size)
            yield Batch(start, {k: self.columns[k][start:stop] for k in columns},
                        {k: self.embeddings[k][start:stop] for k in embeddings})
