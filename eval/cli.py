"""`clipsift eval`: zero-shot evaluation of one CLIP on a DataComp-style task list."""
from __future__ import annotations

import argparse
import logging

from clipsift.eval.evaluate import EvalConfig, run
from clipsift.eval.results import RESULTS_FILE, format_table

CONFIG = EvalConfig
GROUP = "eval"
HELP = """Zero-shot evaluation (DataComp / clip_benchmark formats).

Evaluates model.arch with weights from model.pretrained ("" = random init, an open_clip tag,
hf-hub:org/repo, a checkpoint file, or a training run folder -> checkpoints/epoch_latest.pt) on
every task of tasks=<tasks.yaml>. Writes out/eval_results.jsonl (one DataComp line per task;
tasks already there for the same model and task files are not recomputed unless force=true),
out/eval_summary.json (main metric per task, group means, average), out/config.yaml and
out/stats.json, and prints the summary table.

example: clipsift eval tasks=world/tasks.yaml model.arch=world-rn-s model.pretrained=runs/a out=runs/a/eval
"""


def main(cfg: EvalConfig, args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:  # open_clip logs chatty INFO lines to the root logger
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("clipsift").setLevel(logging.INFO)
    summary = run(cfg)  # bad input raises; clipsift.cli prints it as one line
    print(format_table(summary))
    print(f"results: {cfg.out}/{RESULTS_FILE}")
    return 0
