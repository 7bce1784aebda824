"""eval_results.jsonl (DataComp's format, also a cache) and the summary built from it.

One line per evaluated task, appended as soon as the task finishes (a killed run keeps what it
finished), in DataComp's format plus one namespaced field:

    {"key": "shapes", "dataset": "shapes", "metrics": {"acc1": .., ..., "main_metric": ..},
     "clipsift": {"model": "<model id>", "task": "<task fingerprint>", ...}}

Cache key: (key, clipsift.model, clipsift.task). The model id is the architecture, the weights
(sha256 of a checkpoint file, the tag / hub id, or the seed of a random init) and the precision;
the task fingerprint covers its type, split, class names, templates and each shard's name, size
and mtime. A line matching all three is reused; anything else (another model, a regenerated
task, a plain DataComp line) is recomputed and appended. The last matching line wins, so a
forced re-run supersedes older lines without rewriting the file.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from clipsift.eval.tasks import Task

log = logging.getLogger(__name__)

RESULTS_FILE = "eval_results.jsonl"
SUMMARY_FILE = "eval_summary.json"


def result_line(task: Task, metrics: dict[str, float], model_id: str, task_id: str,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "key": task.name,
        "dataset": task.name,
        "metrics": {**metrics, "main_metric": metrics[task.main_metric]},
        "clipsift": {"model": model_id, "task": task_id, "type": task.type, "group": task.group,
                     "main_metric_name": task.main_metric, **(extra or {})},
    }


def read_results(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """All well-formed lines, and how many were not (e.g. a line cut by a killed writer)."""
    path = Path(path)
    if not path.is_file():
        return [], 0
    lines, bad = [], 0
    for raw in path.read_text(encoding="utf-8").splitlines():
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
            if not isinstance(line, dict) or "key" not in line or "metrics" not in line:
                raise ValueError("not a result line")
            lines.append(line)
        except ValueError:
            bad += 1
    if bad:
        log.warning("%s: ignored %d malformed line(s)", path, bad)
    return lines, bad


def append_result(path: str | Path, line: dict[str, Any]) -> None:
    """Append one line durably; start on a fresh line if a previous writer was cut mid-line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab+") as f:
        cut = False
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            cut = f.read(1) != b"\n"
        f.write((b"\n" if cut else b"") + json.dumps(line, sort_keys=True).encode("utf-8") + b"\n")
        f.flush()
        os.fsync(f.fileno())


def find_cached(lines: Sequence[dict[str, Any]], task: str, model_id: str, task_id: str) -> dict[str, Any] | None:
    match = None
    for line in lines:
        tag = line.get("clipsift") or {}
        if line.get("key") == task and tag.get("model") == model_id and tag.get("task") == task_id:
            match = line  # the last one wins
    return match


def summarize(tasks: Sequence[Task], lines: dict[str, dict[str, Any]], cached: set[str], model_id: str) -> dict[str, Any]:
    """Per task main metric, group means, and DataComp's average: the unweighted mean of main metrics."""
    rows = [{"name": t.name, "group": t.group, "type": t.type, "main_metric": t.main_metric,
             "value": lines[t.name]["metrics"]["main_metric"], "cached": t.name in cached} for t in tasks]
    groups: dict[str, list[float]] = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row["value"])
    return {
        "model": model_id,
        "n_tasks": len(rows),
        "average": float(np.mean([r["value"] for r in rows])),
        "groups": {g: float(np.mean(v)) for g, v in groups.items()},
        "tasks": rows,
    }


def format_table(summary: dict[str, Any]) -> str:
    rows = summary["tasks"]
    w_name = max([len(r["name"]) for r in rows] + [4])
    w_group = max([len(r["group"]) for r in rows] + [5])
    w_metric = max([len(r["main_metric"]) for r in rows] + [6])
    label = w_name + w_group + w_metric + 4
    out = [f"{'task':<{w_name}}  {'group':<{w_group}}  {'metric':<{w_metric}} {'value':>7}"]
    for r in rows:
        out.append(f"{r['name']:<{w_name}}  {r['group']:<{w_group}}  {r['main_metric']:<{w_metric}} {r['value']:>7.4f}"
                   + ("  (cached)" if r["cached"] else ""))
    out.append("")
    for g, v in summary["groups"].items():
        out.append(f"{'mean of group ' + repr(g):<{label}} {v:>7.4f}")
    out.append(f"{'average of ' + str(summary['n_tasks']) + ' main metrics':<{label}} {summary['average']:>7.4f}")
    return "\n".join(out)
