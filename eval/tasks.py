"""The task list (tasks.yaml) and the files of one task folder (clip_benchmark webdataset layout).

tasks.yaml is a list of mappings, paths relative to the YAML file's folder:

    - {name: shapes, path: tasks/shapes, type: classification, main_metric: acc1, group: main}
    - {name: retrieval, path: tasks/retrieval, type: retrieval, main_metric: mean_recall@1, group: retrieval}

Optional keys: split (default "test"). A task folder holds <split>/{0..n-1}.tar with
<split>/nshards.txt, and for classification classnames.txt (one class per line) and
zeroshot_classification_templates.txt (one prompt per line containing "{c}"); dataset_type.txt
("retrieval", "multilabel", ...) is optional and, when present, must agree with `type`.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import yaml

from clipsift.eval.metrics import METRICS

REQUIRED_KEYS = ("name", "path", "type", "main_metric", "group")
OPTIONAL_KEYS = ("split",)


class TaskError(ValueError):
    """A task list or task folder that does not follow the expected layout."""


@dataclass(frozen=True)
class Task:
    name: str
    path: Path  # absolute task folder
    type: str  # classification | retrieval
    main_metric: str
    group: str
    split: str = "test"

    def shards(self) -> list[Path]:
        """<split>/{0..n-1}.tar as nshards.txt lists them (all must exist), else the tars present."""
        folder = self.path / self.split
        if not folder.is_dir():
            raise TaskError(f"task {self.name}: no split folder {folder}")
        nshards_file = folder / "nshards.txt"
        if nshards_file.is_file():
            try:
                n = int(nshards_file.read_text().strip())
            except ValueError:
                raise TaskError(f"task {self.name}: {nshards_file} does not hold an integer") from None
            shards = [folder / f"{i}.tar" for i in range(n)]
            missing = [p.name for p in shards if not p.is_file()]
            if missing:
                raise TaskError(f"task {self.name}: nshards.txt says {n} shards but {', '.join(missing)} missing in {folder}")
        else:  # clip_benchmark writes nshards.txt; tolerate its absence, but only with numbered tars
            shards = sorted((p for p in folder.glob("*.tar") if p.stem.isdigit()), key=lambda p: int(p.stem))
        if not shards:
            raise TaskError(f"task {self.name}: no shards in {folder}")
        return shards

    def classnames(self) -> list[str]:
        names = _lines(self.path / "classnames.txt", self.name)
        if len(set(names)) != len(names):
            raise TaskError(f"task {self.name}: classnames.txt repeats a class name")
        return names

    def templates(self) -> list[str]:
        templates = _lines(self.path / "zeroshot_classification_templates.txt", self.name)
        bad = [t for t in templates if "{c}" not in t]
        if bad:
            raise TaskError(f"task {self.name}: template {bad[0]!r} has no {{c}} placeholder")
        return templates

    def check_dataset_type(self) -> None:
        path = self.path / "dataset_type.txt"
        if not path.is_file():
            return
        declared = path.read_text().strip()
        if declared == "multilabel":
            raise TaskError(f"task {self.name}: multilabel datasets are not supported")
        if (declared == "retrieval") != (self.type == "retrieval"):
            raise TaskError(f"task {self.name}: tasks.yaml says {self.type} but {path} says {declared!r}")

    def fingerprint(self) -> str:
        """Changes when the task's files do: type, split, class names, templates, and each
        shard's name, size and modification time (not its bytes: hashing large sets is slow)."""
        h = hashlib.sha256(f"{self.type}|{self.split}".encode())
        for name in ("classnames.txt", "zeroshot_classification_templates.txt", "dataset_type.txt"):
            p = self.path / name
            h.update(name.encode() + (p.read_bytes() if p.is_file() else b"<none>"))
        for shard in self.shards():
            st = shard.stat()
            h.update(f"{shard.name}|{st.st_size}|{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]


def load_tasks(tasks_yaml: str | Path) -> list[Task]:
    """Read and check a task list; every error names the file and the entry."""
    tasks_yaml = Path(tasks_yaml)
    if not tasks_yaml.is_file():
        raise TaskError(f"task list {tasks_yaml} does not exist")
    entries = yaml.safe_load(tasks_yaml.read_text())
    if not isinstance(entries, list) or not entries:
        raise TaskError(f"{tasks_yaml}: expected a non-empty list of tasks")
    tasks: list[Task] = []
    for i, entry in enumerate(entries):
        where = f"{tasks_yaml} entry {i}"
        if not isinstance(entry, dict):
            raise TaskError(f"{where}: expected a mapping, got {type(entry).__name__}")
        missing = [k for k in REQUIRED_KEYS if k not in entry]
        unknown = sorted(set(entry) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
        if missing or unknown:
            raise TaskError(f"{where}: missing keys {missing}, unknown keys {unknown}")
        entry = {k: str(v) for k, v in entry.items()}
        if entry["type"] not in METRICS:
            raise TaskError(f"{where}: type {entry['type']!r} is not one of {list(METRICS)}")
        if entry["main_metric"] not in METRICS[entry["type"]]:
            raise TaskError(f"{where}: main_metric {entry['main_metric']!r} is not a {entry['type']} metric "
                            f"({', '.join(METRICS[entry['type']])})")
        path = (tasks_yaml.parent / entry.pop("path")).resolve()
        if not path.is_dir():
            raise TaskError(f"{where}: task folder {path} does not exist")
        tasks.append(Task(path=path, **entry))
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise TaskError(f"{tasks_yaml}: task names repeat: {sorted({n for n in names if names.count(n) > 1})}")
    return tasks


def _lines(path: Path, task: str) -> list[str]:
    if not path.is_file():
        raise TaskError(f"task {task}: {path.name} is missing in {path.parent}")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise TaskError(f"task {task}: {path} is empty")
    if "" in lines:  # a blank line would shift every class index after it
        raise TaskError(f"task {task}: {path} has a blank line at line {lines.index('') + 1}")
    return lines
