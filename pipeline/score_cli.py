"""`clipsift score`: score heads over DataComp metadata (parquet + npz embeddings), no images."""
from __future__ import annotations

import argparse
import logging

from clipsift.pipeline.config import ScoreConfig

CONFIG = ScoreConfig
GROUP = "pipeline/score"
HELP = """Metadata mode of the pipeline. For every <stem>.parquet in `input` (with its row-aligned
<stem>.npz of float16 embeddings, as DataComp ships them and `clipsift embed` writes them), runs
the score heads in `heads` on the stored embeddings and writes out/metadata/<stem>.parquet (the
input columns with the score columns added or replaced) and out/metadata/<stem>.npz (hard-linked
or copied), then out/done/<stem>.json. Resumable like `clipsift embed`.

example: clipsift score -p default input=runs/pipeline/tiny/metadata out=runs/pipeline/tiny-rescored
"""


def main(cfg: ScoreConfig, args: argparse.Namespace) -> int:
    from clipsift.pipeline.score import run_score

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run_score(cfg)  # bad input raises; clipsift.cli prints it as one line
    return 0
